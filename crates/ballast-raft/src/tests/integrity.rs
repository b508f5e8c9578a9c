//! Damaged blocks on a 3-replica shard on real RocksDB disks: a leader read
//! names the damaged blocks instead of failing, a follower hands out its
//! verified copies only once it has applied what the read needs (and
//! refuses, retryably, while it lags), and a repair entry puts back the
//! damaged copy on the replica that had it while the healthy replicas keep
//! theirs.

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_storage::StorageError;
use ballast_types::{Geometry, Retryable, VolumeId};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::support::*;
use crate::shard::RangeRead;
use crate::testing::LocalRouter;
use crate::types::{BlockCopy, BlockRef, RepairBlock, RepairCause, ShardRequest, ShardResponse};
use crate::ShardError;

const VOLUME: VolumeId = VolumeId(9);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_leader_block_is_read_from_a_caught_up_follower_and_repaired_through_the_log() {
    let seed = ballast_storage::conformance::seed_from_env();
    println!("BALLAST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let router = LocalRouter::new();
    let config = test_config();
    let mut nodes = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        nodes.push(start_node(&router, i as u64 + 1, d.path(), &config).await);
    }
    nodes[0].shard.initialize(members(&[1, 2, 3])).await.expect("initialize");
    let l = leader(&nodes.iter().collect::<Vec<_>>()).await;
    let lead = nodes.iter().find(|n| n.id == l).expect("leader");
    let data: Vec<u8> = (0..16 * 4096).map(|_| rng.gen()).collect();
    let w = ShardRequest::Write { volume: VOLUME, epoch: 1, offset: 0, data: Bytes::from(data.clone()) };
    assert_eq!(lead.shard.write(w).await.expect("write"), ShardResponse::Done);
    let target = last_applied(lead);
    for n in &nodes {
        wait_applied(n, target).await;
    }

    // A lagging follower refuses, retryably; once caught up it answers.
    let follower = nodes.iter().find(|n| n.id != l).expect("follower");
    router.isolate(follower.id, true);
    let more = ShardRequest::Write { volume: VOLUME, epoch: 1, offset: 64 << 10, data: Bytes::from(vec![5u8; 4096]) };
    let (ahead, resp) = lead.shard.write_at(more).await.expect("write without the isolated follower");
    assert_eq!(resp, ShardResponse::Done);
    match follower.shard.wait_applied(ahead, Duration::from_millis(300)).await {
        Err(e @ ShardError::Unavailable { .. }) => assert!(e.is_retryable()),
        other => panic!("a follower behind min_applied answered: {other:?}"),
    }
    router.isolate(follower.id, false);
    assert!(follower.shard.wait_applied(ahead, Duration::from_secs(10)).await.expect("caught up") >= ahead);
    // The isolated follower may have campaigned: find the leader again.
    let l = leader(&nodes.iter().collect::<Vec<_>>()).await;
    let lead = nodes.iter().find(|n| n.id == l).expect("leader");
    let follower = nodes.iter().find(|n| n.id != l).expect("follower");
    wait_applied(follower, ahead).await;

    // Damage two blocks on the leader only.
    let damaged: Vec<u64> = {
        let mut b = vec![rng.gen_range(0..8u64), rng.gen_range(8..16u64)];
        b.sort();
        b
    };
    for b in &damaged {
        assert!(lead.store.corrupt(&Geometry::default().key(SHARD, VOLUME, *b)).expect("corrupt"));
    }
    assert!(matches!(
        lead.shard.read(VOLUME, 0, 16 * 4096).await,
        Err(ShardError::Storage(StorageError::Corrupt { .. }))
    ));
    let (applied, blocks) = match lead.shard.read_checked(VOLUME, 0, 16 * 4096).await.expect("read_checked") {
        RangeRead::Damaged { applied, blocks } => (applied, blocks),
        other => panic!("damage not reported: {other:?} (BALLAST_SEED={seed})"),
    };
    assert_eq!(blocks, damaged);
    assert!(applied >= ahead);

    let refs: Vec<BlockRef> = damaged.iter().map(|b| BlockRef { volume: VOLUME.0, block: *b }).collect();
    let fetched = follower.shard.copies(refs.clone()).await.expect("copies");
    assert!(fetched.applied >= applied);
    let mut patch = BTreeMap::new();
    let mut repair = Vec::new();
    for (b, c) in damaged.iter().zip(&fetched.copies) {
        let BlockCopy::Data(d) = c else { panic!("follower copy of block {b} not healthy: {c:?}") };
        assert_eq!(&d[..], &data[*b as usize * 4096..(*b as usize + 1) * 4096]);
        patch.insert(*b, Some(d.clone()));
        repair.push(RepairBlock { block: *b, data: Some(d.clone()) });
    }
    // The leader's own copies of the damaged blocks are reported as such.
    let own = lead.shard.copies(refs).await.expect("own copies");
    assert!(own.copies.iter().all(|c| *c == BlockCopy::Corrupt));

    // The read answered from the healthy copies, then the repair through the log.
    let segs = lead.shard.read_patched(VOLUME, 0, 16 * 4096, patch).await.expect("patched read");
    assert_eq!(flat(&segs), data, "BALLAST_SEED={seed}");
    let before: Vec<_> = nodes.iter().filter(|n| n.id != l).map(|n| shard_blocks(&n.store)).collect();
    let index = lead.shard.repair(VOLUME, fetched.applied, RepairCause::Read, repair).await.expect("repair");
    for n in &nodes {
        wait_applied(n, index).await;
    }
    let segs = lead.shard.read(VOLUME, 0, 16 * 4096).await.expect("read after repair");
    assert_eq!(flat(&segs), data, "BALLAST_SEED={seed}");
    let after: Vec<_> = nodes.iter().filter(|n| n.id != l).map(|n| shard_blocks(&n.store)).collect();
    assert_eq!(before, after, "healthy replicas keep their blocks");
    assert_eq!(shard_blocks(&lead.store), after[0], "the repaired leader equals its peers");
    for n in nodes {
        kill(&router, n).await;
    }
}

fn flat(segs: &[ballast_storage::Segment]) -> Vec<u8> {
    let mut v = Vec::new();
    for s in segs {
        match s {
            ballast_storage::Segment::Data(d) => v.extend_from_slice(d),
            ballast_storage::Segment::Hole(n) => v.extend(std::iter::repeat_n(0u8, *n as usize)),
        }
    }
    v
}

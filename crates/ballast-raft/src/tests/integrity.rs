//! Damaged blocks on a 3-replica shard on real RocksDB disks: a leader read
//! names the damaged blocks instead of failing, a follower hands out its
//! verified copies only once it has applied what the read needs (and
//! refuses, retryably, while it lags), and a repair entry puts back the
//! damaged copy on the replica that had it while the healthy replicas keep
//! theirs. Replicas compared at one log index: every replica's digest at
//! the same `Digest` entry agrees except where one diverges, and a realign
//! writes on its target only, never over a block written after its digest,
//! and not at all on a replica restarted since.

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_storage::StorageError;
use ballast_types::{Geometry, Retryable, VolumeId};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::support::*;
use crate::divergence::compare;
use crate::shard::RangeRead;
use crate::testing::LocalRouter;
use crate::types::{
    BlockCopy, BlockRef, RangeDigest, RealignBlock, RepairBlock, RepairCause, ShardRequest, ShardResponse,
};
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
    let nodes = start_group(&router, &dirs, &config).await;
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

/// Replace (or delete) a block's value directly in a replica's store: an
/// intact value (right checksum) that differs from its peers'.
fn diverge(node: &Node, block: u64, data: Option<Vec<u8>>) {
    use ballast_storage::{BlockStore, Durability, WriteBatch};
    let mut b = WriteBatch::new();
    let key = Geometry::default().key(SHARD, VOLUME, block);
    match data {
        Some(d) => b.put(key, Bytes::from(d)),
        None => b.delete(key),
    }
    node.store.write(b, Durability::Sync).expect("write");
}

fn stored(node: &Node, block: u64) -> Option<Bytes> {
    use ballast_storage::BlockStore;
    node.store.get(&Geometry::default().key(SHARD, VOLUME, block)).expect("intact")
}

fn realign_block(block: u64, data: &[u8]) -> RealignBlock {
    RealignBlock { block, data: Some(Bytes::copy_from_slice(data)), crc: ballast_types::crc32c(data) }
}

/// Every replica's digest at `index` (each waits until it applied it).
async fn digests_at(nodes: &[Node], index: u64) -> BTreeMap<u64, RangeDigest> {
    let mut out = BTreeMap::new();
    for n in nodes {
        let f = n.shard.digest_at(index, Duration::from_secs(10)).await.expect("digest_at");
        assert!(f.applied >= index);
        out.insert(n.id, f.digest.expect("digest kept"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_digest_at_one_log_index_and_only_the_divergent_target_is_realigned() {
    let seed = ballast_storage::conformance::seed_from_env();
    println!("BALLAST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let router = LocalRouter::new();
    let config = test_config();
    let mut nodes = start_group(&router, &dirs, &config).await;
    let l = leader(&nodes.iter().collect::<Vec<_>>()).await;
    let data: Vec<u8> = (0..16 * 4096).map(|_| rng.gen()).collect();
    let block = |b: u64| &data[b as usize * 4096..(b as usize + 1) * 4096];
    let lead = nodes.iter().find(|n| n.id == l).expect("leader");
    let w = ShardRequest::Write { volume: VOLUME, epoch: 1, offset: 0, data: Bytes::from(data.clone()) };
    assert_eq!(lead.shard.write(w).await.expect("write"), ShardResponse::Done);
    let target = last_applied(lead);
    for n in &nodes {
        wait_applied(n, target).await;
    }
    let others: Vec<u64> = nodes.iter().map(|n| n.id).filter(|id| *id != l).collect();
    let (f, g) = (others[0], others[1]);
    let node = |id: u64| nodes.iter().find(|n| n.id == id).expect("node");

    // Follower f diverges at blocks 3 (another intact value) and 9 (a hole);
    // follower g at block 14.
    let other: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
    diverge(node(f), 3, Some(other.clone()));
    diverge(node(f), 9, None);
    diverge(node(g), 14, Some(other.clone()));

    // The digest at I; a client write lands right after it (in chunk 1).
    let from = BlockRef { volume: 0, block: 0 };
    let own = node(l).shard.propose_digest(from).await.expect("digest");
    let index = own.index;
    let later = ShardRequest::Write { volume: VOLUME, epoch: 1, offset: 4 << 20, data: Bytes::from(vec![8u8; 4096]) };
    assert_eq!(node(l).shard.write(later).await.expect("write"), ShardResponse::Done);
    let digests = digests_at(&nodes, index).await;
    assert_eq!(digests[&l], own);
    assert!(digests.values().all(|d| d.blocks.len() <= 16), "the later write is in no digest at I");
    let differ = |a: &RangeDigest, b: &RangeDigest| -> Vec<u64> {
        let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) =
            (a.blocks.iter().copied().collect(), b.blocks.iter().copied().collect());
        (0..16)
            .filter(|x| {
                a.get(&BlockRef { volume: VOLUME.0, block: *x }) != b.get(&BlockRef { volume: VOLUME.0, block: *x })
            })
            .collect()
    };
    assert_eq!(differ(&digests[&l], &digests[&f]), vec![3, 9], "BALLAST_SEED={seed}");
    assert_eq!(differ(&digests[&l], &digests[&g]), vec![14]);
    let cmp = compare(3, &digests);
    let found: Vec<(u64, Vec<u64>)> = cmp.divergent.iter().map(|d| (d.block.block, d.targets.clone())).collect();
    assert_eq!(found, vec![(3, vec![f]), (9, vec![f]), (14, vec![g])]);

    // Realign f at I, with block 14 listed too: g (not the target) keeps its
    // value; f's divergent blocks get the majority's.
    let blocks = vec![realign_block(3, block(3)), realign_block(9, block(9)), realign_block(14, block(14))];
    let at = node(l).shard.realign(VOLUME, f, index, blocks).await.expect("realign");
    for n in &nodes {
        wait_applied(n, at).await;
    }
    assert_eq!(stored(node(f), 3).as_deref(), Some(block(3)));
    assert_eq!(stored(node(f), 9).as_deref(), Some(block(9)));
    assert_eq!(stored(node(g), 14).as_deref(), Some(&other[..]), "only the target writes");

    // A block written after the digest is skipped by the realign.
    diverge(node(f), 5, Some(other.clone()));
    let index = node(l).shard.propose_digest(from).await.expect("digest").index;
    let rewrite =
        ShardRequest::Write { volume: VOLUME, epoch: 1, offset: 6 * 4096, data: Bytes::from(vec![6u8; 4096]) };
    assert_eq!(node(l).shard.write(rewrite).await.expect("write"), ShardResponse::Done);
    let at = node(l).shard.realign(VOLUME, f, index, vec![realign_block(5, block(5))]).await.expect("realign");
    wait_applied(node(f), at).await;
    assert_eq!(stored(node(f), 5).as_deref(), Some(&other[..]), "its chunk was written after the digest");

    // A replica restarted after the digest cannot tell what touched the block
    // since: it skips; a realign from a digest after its restart applies.
    let index = node(l).shard.propose_digest(from).await.expect("digest").index;
    let bump = ShardRequest::Write { volume: VOLUME, epoch: 1, offset: 4 << 20, data: Bytes::from(vec![9u8; 4096]) };
    let (bumped, _) = node(l).shard.write_at(bump).await.expect("write");
    wait_applied(node(f), bumped).await;
    let pos = nodes.iter().position(|n| n.id == f).expect("f");
    let dir = kill(&router, nodes.remove(pos)).await;
    nodes.push(start_node(&router, f, &dir, &config).await);
    let l = leader(&nodes.iter().collect::<Vec<_>>()).await;
    let lead = nodes.iter().find(|n| n.id == l).expect("leader");
    let at = lead.shard.realign(VOLUME, f, index, vec![realign_block(5, block(5))]).await.expect("realign");
    wait_applied(node_of(&nodes, f), at).await;
    assert_eq!(stored(node_of(&nodes, f), 5).as_deref(), Some(&other[..]), "since is below the restarted floor");
    let index = lead.shard.propose_digest(from).await.expect("digest").index;
    let at = lead.shard.realign(VOLUME, f, index, vec![realign_block(5, block(5))]).await.expect("realign");
    wait_applied(node_of(&nodes, f), at).await;
    assert_eq!(stored(node_of(&nodes, f), 5).as_deref(), Some(block(5)), "BALLAST_SEED={seed}");
    for n in nodes {
        kill(&router, n).await;
    }
}

fn node_of(nodes: &[Node], id: u64) -> &Node {
    nodes.iter().find(|n| n.id == id).expect("node")
}

//! A replica added behind a purged log catches up by a snapshot streamed
//! over the gRPC transport (client-streaming `InstallSnapshot`), and then
//! serves as a voter.

mod support;

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::BTreeMap;
use std::time::Duration;

use ballast_raft::{BallastNode, NodeId};
use ballast_types::{GroupId, DEFAULT_CHUNK_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_behind_a_purged_log_catches_up_by_a_grpc_snapshot() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut nodes = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        let id = i as NodeId + 1;
        let node = start_node(id, d.path(), "127.0.0.1:0".parse().expect("addr"), |c| {
            c.snapshot_every = 1_000_000;
            c.logs_to_keep = 0;
        })
        .await;
        nodes.insert(id, node);
    }
    // Two voters; node 3 joins later.
    let members: BTreeMap<NodeId, BallastNode> = nodes.iter().take(2).map(|(id, n)| (*id, n.node_info())).collect();
    for shard in SHARDS {
        nodes[&1].initialize_shard(shard, members.clone()).await.expect("initialize");
    }
    let addrs: Vec<String> = nodes.values().take(2).map(|n| n.advertise().to_string()).collect();
    let mut client = Client::new(addrs);
    let mut model = vec![0u8; VOLUME_SIZE as usize];
    // Several snapshot pages (256 blocks each) per shard.
    for i in 0..(VOLUME_SIZE / (64 << 10)) {
        let data: Vec<u8> = (0..64 << 10).map(|_| rng.gen()).collect();
        let offset = i * (64 << 10);
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        client.write(1, offset, data).await.expect("write");
    }
    for _ in 0..20 {
        random_write(&mut client, &mut rng, &mut model, 1).await;
    }

    for shard in SHARDS {
        let group = GroupId::for_shard(shard);
        let leader = wait_for("a leader", Duration::from_secs(15), || {
            nodes.values().find(|n| n.replica(group).is_some_and(|r| r.group.raft().is_leader())).map(|n| n.id())
        })
        .await;
        let lead = nodes[&leader].replica(group).expect("replica");
        let raft = lead.group.raft();
        let applied = last_applied(&nodes[&leader], group);
        raft.trigger().snapshot().await.expect("trigger snapshot");
        wait_for("a snapshot", Duration::from_secs(10), || {
            let m = raft.metrics().borrow_watched().clone();
            (m.snapshot.map(|s| s.index) >= Some(applied)).then_some(())
        })
        .await;
        raft.trigger().purge_log(applied).await.expect("purge");
        wait_for("the purge", Duration::from_secs(10), || {
            let m = raft.metrics().borrow_watched().clone();
            (m.purged.map(|p| p.index) >= Some(applied)).then_some(())
        })
        .await;
        raft.add_learner(3, nodes[&3].node_info(), true).await.expect("add learner");
        let newcomer = nodes[&3].replica(group).expect("replica");
        wait_for(&format!("node 3 to install a snapshot of {group}"), Duration::from_secs(20), || {
            let m = newcomer.group.raft().metrics().borrow_watched().clone();
            m.snapshot.is_some_and(|s| s.index >= applied).then_some(())
        })
        .await;
        raft.change_membership([1, 2, 3], false).await.expect("promote");
    }
    for shard in SHARDS {
        assert_replicas_identical(&nodes, shard, seed).await;
    }
    // Node 3 is now a voter the client can be sent to.
    let mut client = Client::new(nodes.values().map(|n| n.advertise().to_string()).collect());
    for _ in 0..10 {
        random_write(&mut client, &mut rng, &mut model, 1).await;
    }
    check_reads(&mut client, &mut rng, &model, seed).await;
    let chunk = DEFAULT_CHUNK_SIZE;
    assert!(client.read(chunk, 4096).await == model[chunk as usize..chunk as usize + 4096]);
    for (_, n) in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

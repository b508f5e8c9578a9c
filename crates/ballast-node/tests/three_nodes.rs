//! Three nodes in one process, each with its own RocksDB and its own TCP
//! port, two shard groups replicated on all three. A tonic Data client
//! writes and reads through the leaders (following NOT_LEADER hints); the
//! cluster survives the loss of a leader node, and the node restarted from
//! its data dir catches up until every replica holds identical blocks.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ballast_proto::{pb, ProtoError, Reply};
use ballast_raft::{BallastNode, NodeId};
use ballast_types::{Epoch, ErrorCode, GroupId, WriteRequest, DEFAULT_CHUNK_SIZE};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::SeedableRng;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_serve_through_leader_loss_and_a_restarted_node_catches_up() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let mut nodes = BTreeMap::new();
    let mut paths: BTreeMap<NodeId, PathBuf> = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        let id = i as NodeId + 1;
        let node = start_node(id, d.path(), "127.0.0.1:0".parse().expect("addr"), |_| {}).await;
        paths.insert(id, d.path().to_path_buf());
        nodes.insert(id, node);
    }
    let members: BTreeMap<NodeId, BallastNode> = nodes.iter().map(|(id, n)| (*id, n.node_info())).collect();
    for shard in SHARDS {
        nodes[&1].initialize_shard(shard, members.clone()).await.expect("initialize");
    }
    let addrs: BTreeMap<NodeId, String> = nodes.iter().map(|(id, n)| (*id, n.advertise().to_string())).collect();
    let mut client = Client::new(addrs.values().cloned().collect());
    let mut model = vec![0u8; VOLUME_SIZE as usize];

    for _ in 0..60 {
        random_write(&mut client, &mut rng, &mut model, 1).await;
    }
    check_reads(&mut client, &mut rng, &model, seed).await;

    // Fencing and checksums travel as typed errors.
    client.write(2, 0, vec![3u8; 4096]).await.expect("write with a newer epoch");
    model[..4096].fill(3);
    let fenced = client.write(1, 0, vec![4u8; 4096]).await.expect_err("an older epoch is fenced");
    assert_eq!(fenced.code, ErrorCode::Fenced);
    let mut bad = pb::WriteRequest::from(WriteRequest::new(VOLUME, Epoch(2), 0, Bytes::from(vec![5u8; 4096])));
    bad.crc32c ^= 1;
    let reply = client.channel(&addrs[&1]).write(bad).await.expect("rpc").into_inner().into_result();
    assert!(matches!(reply, Err(ProtoError::Api(ref e)) if e.code == ErrorCode::BadChecksum), "{reply:?}");

    // Zeroes: a punched whole-block range reads as zeros and shows as a hole.
    let chunk1 = DEFAULT_CHUNK_SIZE;
    client.zero(2, chunk1 + 8192, 3 * 4096, true).await.expect("punch");
    client.zero(2, chunk1 + 100, 50, false).await.expect("zero");
    model[(chunk1 + 8192) as usize..(chunk1 + 8192 + 3 * 4096) as usize].fill(0);
    model[(chunk1 + 100) as usize..(chunk1 + 150) as usize].fill(0);
    assert!(client.read(chunk1, 8 * 4096).await == model[chunk1 as usize..(chunk1 + 8 * 4096) as usize]);
    let extents = client.block_status(chunk1 + 8192, 3 * 4096).await;
    assert!(extents.iter().all(|e| e.hole), "punched blocks are holes: {extents:?}");
    // A request crossing a chunk boundary is refused, not half-applied.
    let crossing = client.write(2, chunk1 - 10, vec![1u8; 20]).await.expect_err("crosses a chunk");
    assert_eq!(crossing.code, ErrorCode::OutOfRange);

    // The Raft service refuses unknown groups and other clusters, typed.
    let mut raft =
        ballast_proto::pb::raft_client::RaftClient::connect(format!("http://{}", addrs[&1])).await.expect("connect");
    let req = |cluster, group| pb::RaftRequest {
        cluster_id: cluster,
        from_node: 2,
        target_node: 1,
        group,
        payload: Bytes::from_static(b"x"),
    };
    let unknown = raft.vote(req(CLUSTER.0, 99)).await.expect("rpc").into_inner().into_result();
    assert!(matches!(unknown, Err(ProtoError::Api(ref e)) if e.code == ErrorCode::NotFound), "{unknown:?}");
    let foreign = raft.vote(req(CLUSTER.0 + 1, 1)).await.expect("rpc").into_inner().into_result();
    assert!(matches!(foreign, Err(ProtoError::Api(ref e)) if e.code == ErrorCode::WrongCluster), "{foreign:?}");

    // Kill the node leading shard 0's group: writes continue through new leaders.
    let g0 = GroupId::for_shard(SHARDS[0]);
    let victim = wait_for("a leader of shard 0", Duration::from_secs(15), || {
        nodes.values().find(|n| n.replica(g0).is_some_and(|r| r.group.raft().is_leader())).map(|n| n.id())
    })
    .await;
    eprintln!("shutting down node {victim}, leader of {g0}");
    let listen: SocketAddr = addrs[&victim].parse().expect("addr");
    nodes.remove(&victim).expect("victim").shutdown().await.expect("shutdown");
    let since = Instant::now();
    random_write(&mut client, &mut rng, &mut model, 2).await;
    for _ in 0..40 {
        random_write(&mut client, &mut rng, &mut model, 2).await;
    }
    eprintln!("40 writes after the leader loss took {:?}", since.elapsed());
    check_reads(&mut client, &mut rng, &model, seed).await;

    // Restart it from its data dir on the same address: it catches up.
    // Its replicas come back from the disk's manifest.
    let restarted = start_node_bare(victim, &paths[&victim], listen, |_| {}).await;
    assert_eq!(restarted.groups(), SHARDS.map(GroupId::for_shard).to_vec());
    nodes.insert(victim, restarted);
    for _ in 0..20 {
        random_write(&mut client, &mut rng, &mut model, 2).await;
    }
    for shard in SHARDS {
        assert_replicas_identical(&nodes, shard, seed).await;
    }
    check_reads(&mut client, &mut rng, &model, seed).await;

    for (_, n) in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

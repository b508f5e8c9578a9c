//! Self-healing of an in-process cluster (real RocksDB dirs, real TCP on
//! 127.0.0.1), observed only through the Admin API and real NBD clients:
//! - a node holding replicas is lost; after `down_after` the meta leader
//!   marks it down and every shard it held gets a new replica on another
//!   node, built from the survivors, without anyone asking;
//! - the rebuilt replicas hold the data: with a second node stopped, every
//!   shard still commits writes and everything reads back;
//! - the lost node returns: it is marked up again and deletes the replicas
//!   its groups no longer have (and runs just those the map then lists,
//!   rebalancing moving some back onto it);
//! - a drained node's replicas move to the others while a client writes.
//!
//! Seeded: the seed is printed; `BALLAST_SEED=<seed>` replays it.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ballast_client::{AdminClient, ClientConfig};
use ballast_node::{Node, NodeHandle};
use ballast_types::{ClusterStatus, CreateVolume, FailureDomain, InitCluster, NodeId, PoolSpec};
use common::cluster::*;
use common::*;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;
const CHUNKS: u64 = 16;
const HEAL: Duration = Duration::from_secs(120);

async fn wait_status(admin: &AdminClient, what: &str, timeout: Duration, ok: impl Fn(&ClusterStatus) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match admin.status().await {
            Ok(s) if ok(&s) => return,
            Ok(s) => format!("{s:?}"),
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}; last status: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One seeded byte per chunk, so every shard holds a pattern.
fn patterns(seed: u64) -> Vec<u8> {
    random_bytes(seed, CHUNKS as usize).into_iter().map(|b| b | 1).collect()
}

fn writes(p: &[u8]) -> Vec<String> {
    p.iter().enumerate().map(|(i, b)| format!("write -P {b} {} 1M", i as u64 * CHUNK + 12_288)).collect()
}

fn check(uri: &str, p: &[u8]) {
    let reads: Vec<String> =
        p.iter().enumerate().map(|(i, b)| format!("read -P {b} {} 1M", i as u64 * CHUNK + 12_288)).collect();
    qemu_io_each(uri, &reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_node_s_replicas_are_rebuilt_on_the_others_without_help() {
    require_tool("qemu-io", "qemu-utils");
    let seed = seed("self_healing");
    let root = tempfile::Builder::new().prefix("ballast-heal-").tempdir().expect("tempdir");
    let addrs: Vec<SocketAddr> = (0..4).map(|_| free_addr()).collect();
    let dirs: Vec<PathBuf> = (0..4).map(|i| root.path().join(format!("node{i}"))).collect();
    let endpoints: Vec<String> = addrs[..3].iter().map(|a| a.to_string()).collect();
    let node_config = |i: usize| {
        let join = if i == 3 { endpoints.clone() } else { vec![] };
        let mut c = config(addrs[i], &dirs[i], join);
        c.down_after = Duration::from_secs(3);
        c
    };
    let mut nodes: Vec<Option<NodeHandle>> = Vec::new();
    for i in 0..3 {
        nodes.push(Some(Node::start(node_config(i)).await.expect("start node")));
    }
    let admin = AdminClient::new(endpoints.clone(), ClientConfig::default()).expect("admin client");
    admin.init_cluster(&InitCluster { endpoints: endpoints.clone(), default_pool: None }).await.expect("init");
    nodes.push(Some(Node::start(node_config(3)).await.expect("start joiner")));
    wait_status(&admin, "four nodes up", HEAL, |s| s.nodes.len() == 4 && s.nodes.iter().all(|n| n.up)).await;
    // The pool spreads over all four nodes, so the joined node holds replicas.
    let pool = PoolSpec { name: "default".into(), replicas: 3, shards: 4, failure_domain: FailureDomain::Node };
    admin.create_pool(&pool).await.expect("create pool");

    // Data in every shard, written while all four nodes hold replicas.
    let create = CreateVolume { name: "vol".into(), size: CHUNKS * CHUNK, pool: "default".into() };
    admin.create_volume(&create).await.expect("create volume");
    let first = patterns(seed);
    let nbd = serve(admin.clone(), "vol").await;
    let (uri, commands) = (nbd.uri.clone(), writes(&first));
    blocking(move || qemu_io_each(&uri, &commands)).await;

    // Lose the joined node (it holds replicas, and is not a meta member, so
    // the meta group keeps its leader and this test is about shards only).
    let lost = NodeId(4);
    let held = admin.status().await.expect("status").shards.iter().filter(|s| s.shard.voters.contains(&lost)).count();
    assert!(held > 0, "node 4 holds no replica");
    eprintln!("[ballast-test] stopping node 4, a voter of {held} shards");
    let started = Instant::now();
    nodes[3].take().expect("running").shutdown().await.expect("shutdown");
    wait_status(&admin, "node 4 marked down and its shards rebuilt", HEAL, |s| {
        s.nodes.iter().any(|n| n.id == lost && !n.up)
            && s.shards
                .iter()
                .all(|sh| !sh.shard.voters.contains(&lost) && sh.shard.joining.is_empty() && sh.shard.voters.len() == 3)
    })
    .await;
    eprintln!("[ballast-test] {held} shards rebuilt {:?} after the loss (down_after 3 s)", started.elapsed());
    let uri = nbd.uri.clone();
    let p = first.clone();
    blocking(move || check(&uri, &p)).await;

    // The rebuilt replicas are real: with another node stopped, each shard
    // still has a majority only if its new replica counts, and it commits.
    let meta_leader = admin.status().await.expect("status").meta_leader.expect("a meta leader");
    let second = (0..3).find(|i| nodes[*i].as_ref().is_some_and(|n| n.id() != meta_leader.0)).expect("a second victim");
    eprintln!("[ballast-test] stopping node {} as well", second + 1);
    nodes[second].take().expect("running").shutdown().await.expect("shutdown");
    let again = patterns(seed.wrapping_add(1));
    let (uri, p) = (nbd.uri.clone(), again.clone());
    blocking(move || {
        qemu_io_each(&uri, &writes(&p));
        check(&uri, &p);
    })
    .await;
    nodes[second] = Some(Node::start(node_config(second)).await.expect("restart"));

    // Node 4 comes back: marked up, and it drops the replicas it no longer
    // has (rebalancing may then give it new ones: it runs exactly the
    // replicas the map lists for it once the moves settle).
    nodes[3] = Some(Node::start(node_config(3)).await.expect("restart node 4"));
    wait_status(&admin, "node 4 marked up", HEAL, |s| s.nodes.iter().all(|n| n.up)).await;
    let deadline = Instant::now() + HEAL;
    loop {
        let s = admin.status().await.expect("status");
        let listed: BTreeSet<u32> =
            s.shards.iter().filter(|sh| sh.shard.voters.contains(&lost)).map(|sh| sh.shard.id.0).collect();
        let running: BTreeSet<u32> =
            nodes[3].as_ref().expect("node 4").groups().iter().filter_map(|g| g.shard()).map(|s| s.0).collect();
        if running == listed && s.shards.iter().all(|sh| sh.shard.joining.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 runs {running:?}, the map lists {listed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (uri, p) = (nbd.uri.clone(), again.clone());
    blocking(move || check(&uri, &p)).await;

    // Drain a node while a client writes: its replicas move (node 4 takes
    // them), nothing is lost, and a meta member cannot be removed.
    let drained = NodeId(nodes[second].as_ref().expect("running").id());
    admin.drain_node(drained).await.expect("drain");
    let (uri, p) = (nbd.uri.clone(), first.clone());
    let writer = tokio::task::spawn_blocking(move || qemu_io_each(&uri, &writes(&p)));
    wait_status(&admin, "the drained node holds no replica", HEAL, |s| {
        s.shards.iter().all(|sh| !sh.shard.voters.contains(&drained) && sh.shard.joining.is_empty())
    })
    .await;
    writer.await.expect("writer");
    let (uri, p) = (nbd.uri.clone(), first.clone());
    blocking(move || check(&uri, &p)).await;
    let refused = admin.remove_node(drained).await.expect_err("a meta member cannot be removed");
    assert!(refused.to_string().contains("meta group"), "{refused}");

    let _ = nbd.stop.send(());
    nbd.exports.detach_all().await.expect("detach");
    for n in nodes.iter_mut() {
        n.take().expect("running").shutdown().await.expect("shutdown");
    }
}

//! Balancing an in-process cluster (real RocksDB dirs, real TCP on
//! 127.0.0.1), observed through the Admin API and a real NBD client:
//! - a fourth node joins a three-node cluster whose shards all live on the
//!   first three: the meta leader moves replicas onto it, a few at a time,
//!   until replica counts differ by at most one, while a client keeps
//!   writing; everything written reads back afterwards;
//! - while a moved replica is built from a snapshot (the logs are purged
//!   early and `rebuild_rate` is low), `ClusterStatus` shows its progress in
//!   bytes: done ≤ total, total the shard's data;
//! - leaderships even out: no node leads two shards more than another;
//! - a meta member is lost: after `down_after` the spare node replaces it
//!   in the meta group, and with a second member gone admin commands still
//!   commit; the replaced member can then be removed.
//!
//! Seeded: the seed is printed; `BALLAST_SEED=<seed>` replays it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ballast_client::{AdminClient, ClientConfig};
use ballast_node::{Node, NodeHandle};
use ballast_types::{ClusterStatus, CreateVolume, FailureDomain, InitCluster, PoolSpec, RebuildProgress};
use common::cluster::*;
use common::*;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;
const CHUNKS: u64 = 24;
const SHARDS: u32 = 6;
/// Bytes per second of every snapshot stream a node sends: slow enough that
/// a shard's few MiB take seconds to copy, so progress can be seen.
const REBUILD_RATE: u64 = MIB;
const SETTLE: Duration = Duration::from_secs(240);

/// One seeded byte per chunk.
fn patterns(seed: u64) -> Vec<u8> {
    random_bytes(seed, CHUNKS as usize).into_iter().map(|b| b | 1).collect()
}

/// Two MiB per chunk, one MiB per write: every shard gets several log entries.
fn writes(p: &[u8]) -> Vec<String> {
    p.iter()
        .enumerate()
        .flat_map(|(i, b)| (0..2).map(move |m| format!("write -P {b} {} 1M", i as u64 * CHUNK + m * MIB)))
        .collect()
}

fn check(uri: &str, p: &[u8]) {
    let reads: Vec<String> =
        p.iter().enumerate().map(|(i, b)| format!("read -P {b} {} 2M", i as u64 * CHUNK)).collect();
    qemu_io_each(uri, &reads);
}

/// Replicas per node, every node of the status counted (0 for none).
fn replica_counts(s: &ClusterStatus) -> BTreeMap<u64, usize> {
    let mut c: BTreeMap<u64, usize> = s.nodes.iter().map(|n| (n.id.0, 0)).collect();
    for sh in &s.shards {
        for v in &sh.shard.voters {
            *c.entry(v.0).or_default() += 1;
        }
    }
    c
}

fn spread(c: &BTreeMap<u64, usize>) -> usize {
    c.values().max().copied().unwrap_or(0) - c.values().min().copied().unwrap_or(0)
}

/// Shards each running node leads, as the nodes themselves see it.
fn leader_counts(nodes: &[NodeHandle]) -> BTreeMap<u64, usize> {
    nodes
        .iter()
        .map(|n| {
            let me = n.id();
            let led =
                n.groups().into_iter().filter(|g| g.shard().is_some() && n.leader(*g).is_some_and(|(l, _)| l == me));
            (me, led.count())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_node_gets_replicas_until_even_while_writes_go_on_and_leaders_even_out() {
    require_tool("qemu-io", "qemu-utils");
    let seed = seed("rebalance");
    let root = tempfile::Builder::new().prefix("ballast-rebalance-").tempdir().expect("tempdir");
    let addrs: Vec<SocketAddr> = (0..4).map(|_| free_addr()).collect();
    let dirs: Vec<PathBuf> = (0..4).map(|i| root.path().join(format!("node{i}"))).collect();
    let endpoints: Vec<String> = addrs[..3].iter().map(|a| a.to_string()).collect();
    let node_config = |i: usize| {
        let join = if i == 3 { endpoints.clone() } else { vec![] };
        let mut c = config(addrs[i], &dirs[i], join);
        c.down_after = Duration::from_secs(10);
        // Purge the logs early: a new replica must be built from a snapshot.
        c.shard.snapshot_every = 4;
        c.shard.logs_to_keep = 0;
        c.rebuild_rate = Some(REBUILD_RATE);
        c
    };
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for i in 0..3 {
        nodes.push(Node::start(node_config(i)).await.expect("start node"));
    }
    let admin = AdminClient::new(endpoints.clone(), ClientConfig::default()).expect("admin client");
    admin.init_cluster(&InitCluster { endpoints: endpoints.clone(), default_pool: None }).await.expect("init");
    let pool = PoolSpec { name: "default".into(), replicas: 3, shards: SHARDS, failure_domain: FailureDomain::Node };
    admin.create_pool(&pool).await.expect("create pool");
    let create = CreateVolume { name: "vol".into(), size: CHUNKS * CHUNK, pool: "default".into() };
    admin.create_volume(&create).await.expect("create volume");
    let nbd = serve(admin.clone(), "vol").await;
    let first = patterns(seed);
    let (uri, commands) = (nbd.uri.clone(), writes(&first));
    blocking(move || qemu_io_each(&uri, &commands)).await;

    // The fourth node joins empty; a client writes a second pattern meanwhile.
    eprintln!("[ballast-test] node 4 joins a cluster whose {SHARDS} shards live on nodes 1-3");
    let started = Instant::now();
    nodes.push(Node::start(node_config(3)).await.expect("start joiner"));
    let again = patterns(seed.wrapping_add(1));
    let (uri, commands) = (nbd.uri.clone(), writes(&again));
    let writer = tokio::task::spawn_blocking(move || qemu_io_each(&uri, &commands));

    // Watch the moves: at most two at once, progress in bytes, until even.
    let deadline = Instant::now() + SETTLE;
    let mut seen: Option<RebuildProgress> = None;
    let mut most_in_flight = 0;
    let last = loop {
        let s = match admin.status().await {
            Ok(s) => s,
            Err(e) => {
                assert!(Instant::now() < deadline, "status: {e}");
                continue;
            }
        };
        let in_flight = s.shards.iter().filter(|sh| !sh.shard.joining.is_empty()).count();
        most_in_flight = most_in_flight.max(in_flight);
        for r in s.shards.iter().filter_map(|sh| sh.rebuilding) {
            assert!(r.done_bytes <= r.total_bytes, "{r:?}");
            // Mid-copy (some of it, not all) is the progress worth seeing.
            if r.total_bytes > 0 && r.done_bytes < r.total_bytes && seen.is_none_or(|p| p.done_bytes == 0) {
                seen = Some(r);
            }
        }
        let counts = replica_counts(&s);
        if in_flight == 0 && s.nodes.len() == 4 && counts.get(&4).is_some_and(|n| *n > 0) && spread(&counts) <= 1 {
            break s;
        }
        assert!(Instant::now() < deadline, "not balanced within {SETTLE:?}: {counts:?}; {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let counts = replica_counts(&last);
    eprintln!(
        "[ballast-test] balanced {:?} after the join: replicas per node {counts:?}, at most {most_in_flight} moves at once, \
         progress seen {seen:?}",
        started.elapsed()
    );
    assert!(most_in_flight <= 2, "rebalancing runs at most two moves at once, saw {most_in_flight}");
    // A learner counts as caught up only once it has acknowledged an entry,
    // so every move streams its snapshot, at a rate that takes seconds.
    let seen = seen.expect("a move's copy was seen in progress");
    assert!(seen.total_bytes >= MIB, "the total is the shard's data: {seen:?}");
    for sh in &last.shards {
        let mut v: Vec<u64> = sh.shard.voters.iter().map(|n| n.0).collect();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), 3, "three distinct voters: {sh:?}");
    }

    // The writes that ran during the moves completed, and all of it reads back.
    writer.await.expect("writer");
    let (uri, p) = (nbd.uri.clone(), again.clone());
    blocking(move || check(&uri, &p)).await;

    // Leaderships even out (the joined node started leading nothing).
    let deadline = Instant::now() + SETTLE;
    loop {
        let c = leader_counts(&nodes);
        if c.values().sum::<usize>() == SHARDS as usize && spread(&c) <= 1 {
            eprintln!("[ballast-test] leaders per node {c:?} after {:?}", started.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "leaders not even within {SETTLE:?}: {c:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Snapshot bytes are counted (the registry is process-wide: one scrape).
    let text = nodes[0].metrics_text();
    let sent = text
        .lines()
        .find_map(|l| l.strip_prefix("ballast_rebuild_sent_bytes_total ")?.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(sent >= seen.done_bytes as f64, "ballast_rebuild_sent_bytes_total {sent}");
    let (uri, p) = (nbd.uri.clone(), again.clone());
    blocking(move || check(&uri, &p)).await;

    let _ = nbd.stop.send(());
    nbd.exports.detach_all().await.expect("detach");
    for n in nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// The meta voters as the node leading the meta group sees them (settled).
fn meta_voters(nodes: &[Option<NodeHandle>]) -> Option<(u64, BTreeSet<u64>)> {
    nodes.iter().flatten().find_map(|n| {
        let m = n.meta()?.group().membership();
        (m.leading && !m.joint).then(|| (n.id(), m.voters))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_meta_member_is_replaced_and_admin_commands_survive_losing_another() {
    let root = tempfile::Builder::new().prefix("ballast-meta-").tempdir().expect("tempdir");
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
    let all: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let admin = AdminClient::new(all, ClientConfig::default()).expect("admin client");
    admin.init_cluster(&InitCluster { endpoints: endpoints.clone(), default_pool: None }).await.expect("init");
    nodes.push(Some(Node::start(node_config(3)).await.expect("start the spare node")));
    let deadline = Instant::now() + SETTLE;
    while !admin.status().await.is_ok_and(|s| s.nodes.len() == 4 && s.nodes.iter().all(|n| n.up)) {
        assert!(Instant::now() < deadline, "four nodes not up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (leader, before) = meta_voters(&nodes).expect("a meta leader");
    assert_eq!(before, BTreeSet::from([1, 2, 3]));

    // Lose a meta member that does not lead.
    let lost = (0..3).find(|i| nodes[*i].as_ref().is_some_and(|n| n.id() != leader)).expect("a follower");
    let lost_id = nodes[lost].as_ref().expect("running").id();
    eprintln!("[ballast-test] stopping meta member node {lost_id}");
    let started = Instant::now();
    nodes[lost].take().expect("running").shutdown().await.expect("shutdown");
    let want: BTreeSet<u64> = before.iter().copied().filter(|v| *v != lost_id).chain([4]).collect();
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = meta_voters(&nodes);
        if now.as_ref().is_some_and(|(_, v)| *v == want) {
            break;
        }
        assert!(Instant::now() < deadline, "meta voters {now:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("[ballast-test] meta voters {want:?} {:?} after the loss (down_after 3 s)", started.elapsed());
    assert!(nodes[3].as_ref().expect("spare").meta().is_some(), "the spare node runs a meta replica");

    // Lose another original member (the leader this time): the new meta
    // group still has a majority and keeps committing admin commands.
    let (leader, _) = meta_voters(&nodes).expect("a meta leader");
    let second = (0..3)
        .find(|i| nodes[*i].as_ref().is_some_and(|n| n.id() == leader))
        .unwrap_or_else(|| (0..3).find(|i| nodes[*i].is_some()).expect("another original member"));
    eprintln!("[ballast-test] stopping meta member node {} as well", second + 1);
    nodes[second].take().expect("running").shutdown().await.expect("shutdown");
    let pool = PoolSpec { name: "after".into(), replicas: 1, shards: 1, failure_domain: FailureDomain::Node };
    admin.create_pool(&pool).await.expect("a pool created with two meta members gone");
    let create = CreateVolume { name: "v".into(), size: 64 * MIB, pool: "after".into() };
    admin.create_volume(&create).await.expect("a volume created with two meta members gone");
    // The replaced member is no longer a meta voter: it can be removed.
    let deadline = Instant::now() + SETTLE;
    loop {
        match admin.remove_node(ballast_types::NodeId(lost_id)).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "removing the replaced member: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let s = admin.status().await.expect("status");
    assert!(s.nodes.iter().all(|n| n.id.0 != lost_id), "{s:?}");
    for n in nodes.iter_mut() {
        if let Some(n) = n.take() {
            n.shutdown().await.expect("shutdown");
        }
    }
}

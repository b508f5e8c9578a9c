//! A multi-node cluster inside one test process (real RocksDB dirs, real TCP
//! on 127.0.0.1), formed and used only through the Admin API and the thin
//! client, with real NBD clients on top:
//! - three nodes bootstrap with `InitCluster`; a fourth joins through them;
//! - a 3-replica volume served by `ClusterExports` to qemu-io, fio (crc32c
//!   verify) and the nbdfuse → loop → ext4 attach path;
//! - the node leading most of the volume's shards stops in the middle of a
//!   fio run: no error, nothing corrupt, I/O resumes;
//! - every node restarts from its data dirs and everything reads back.
//!
//! Seeded: the seed is printed; `BALLAST_SEED=<seed>` replays it.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ballast_client::{AdminClient, ClientConfig};
use ballast_node::{Node, NodeHandle};
use ballast_types::{CreateVolume, FailureDomain, InitCluster, PoolSpec};
use common::cluster::*;
use common::*;

const MIB: u64 = 1 << 20;
const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(300);

fn fio_args(name: &str, seed: u64, size: u64) -> Vec<String> {
    vec![
        format!("--name={name}"),
        "--rw=randwrite".into(),
        "--bssplit=4k/50:16k/25:64k/25".into(),
        "--iodepth=16".into(),
        format!("--size={size}"),
        "--verify=crc32c".into(),
        // No verify-state file in the working directory.
        "--verify_state_save=0".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        format!("--randseed={}", seed & (i64::MAX as u64)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_process_cluster_bootstraps_joins_serves_nbd_survives_a_leader_loss_and_restarts() {
    require_tool("fio", "fio");
    let seed = seed("cluster_inprocess");
    let root = tempfile::Builder::new().prefix("ballast-cluster-").tempdir().expect("tempdir");
    let addrs: Vec<SocketAddr> = (0..4).map(|_| free_addr()).collect();
    let dirs: Vec<PathBuf> = (0..4).map(|i| root.path().join(format!("node{i}"))).collect();
    let endpoints: Vec<String> = addrs[..3].iter().map(|a| a.to_string()).collect();
    let mut nodes: Vec<Option<NodeHandle>> = Vec::new();
    for i in 0..3 {
        nodes.push(Some(Node::start(config(addrs[i], &dirs[i], vec![])).await.expect("start node")));
    }
    let admin = AdminClient::new(endpoints.clone(), ClientConfig::default()).expect("admin client");

    // Bootstrap, then a second init is refused.
    let pool = PoolSpec { name: "default".into(), replicas: 3, shards: 4, failure_domain: FailureDomain::Node };
    let init = InitCluster { endpoints: endpoints.clone(), default_pool: Some(pool) };
    let reply = admin.init_cluster(&init).await.expect("init");
    assert_eq!(reply.members.len(), 3);
    assert!(admin.init_cluster(&init).await.is_err(), "a second init must be refused");
    let status = admin.status().await.expect("status");
    assert_eq!(status.nodes.iter().filter(|n| n.up).count(), 3, "{status:?}");
    assert_eq!(status.shards.len(), 4);
    assert!(status.meta_leader.is_some());

    // A fourth node joins through the first three.
    nodes.push(Some(Node::start(config(addrs[3], &dirs[3], endpoints.clone())).await.expect("start joiner")));
    let deadline = Instant::now() + SHORT;
    loop {
        let s = admin.status().await.expect("status");
        if s.nodes.len() == 4 && s.nodes.iter().all(|n| n.up) {
            break;
        }
        assert!(Instant::now() < deadline, "the fourth node did not join: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A 3-replica volume over NBD: patterns, ext4 through nbdfuse.
    let create = CreateVolume { name: "vol".into(), size: 256 * MIB, pool: "default".into() };
    admin.create_volume(&create).await.expect("create volume");
    let nbd = serve(admin.clone(), "vol").await;
    let uri = nbd.uri.clone();
    blocking(move || {
        qemu_io(&uri, "write -P 0x5a 4190208 12288");
        qemu_io(&uri, "read -P 0x5a 4190208 12288");
    })
    .await;
    let (uri, work) = (nbd.uri.clone(), root.path().join("ext4"));
    std::fs::create_dir_all(&work).expect("work dir");
    blocking(move || ext4_files_survive_reattach(&uri, &work, seed)).await;

    // Stop the node leading most shards while fio writes and verifies.
    let fio = require_tool("fio", "fio");
    let (uri, args) = (nbd.uri.clone(), fio_args("leader-loss", seed, 96 * MIB));
    let run = tokio::task::spawn_blocking(move || run_fio(&fio, &uri, &args, LONG));
    tokio::time::sleep(Duration::from_millis(1000 + seed % 1500)).await;
    let leads = |n: &NodeHandle| {
        n.groups()
            .into_iter()
            .filter(|g| g.shard().is_some())
            .filter(|g| n.leader(*g).map(|l| l.0) == Some(n.id()))
            .count()
    };
    let victim = (0..3).max_by_key(|i| nodes[*i].as_ref().map_or(0, leads)).expect("a victim");
    eprintln!(
        "[ballast-test] stopping node {} (leads {} shards) during fio",
        victim + 1,
        nodes[victim].as_ref().map_or(0, leads)
    );
    nodes[victim].take().expect("running").shutdown().await.expect("shutdown");
    let r = run.await.expect("fio thread");
    eprintln!("[ballast-test] fio through the leader loss: {} MiB written and verified", r.write_bytes / MIB);
    nodes[victim] = Some(Node::start(config(addrs[victim], &dirs[victim], vec![])).await.expect("restart"));
    // A pattern across a chunk boundary, past what fio wrote, to read after the restart.
    let uri = nbd.uri.clone();
    blocking(move || qemu_io(&uri, "write -P 0xc3 218099712 12288")).await;

    // Restart every node; the data is still there.
    let _ = nbd.stop.send(());
    nbd.exports.detach_all().await.expect("detach");
    for (i, n) in nodes.iter_mut().enumerate() {
        n.take().expect("running").shutdown().await.unwrap_or_else(|e| panic!("shutdown {i}: {e}"));
    }
    for i in 0..4 {
        let join = if i == 3 { endpoints.clone() } else { vec![] };
        nodes[i] = Some(Node::start(config(addrs[i], &dirs[i], join)).await.expect("restart"));
    }
    assert_eq!(nodes[3].as_ref().expect("joiner").id(), 4, "the joined node keeps its id");
    let nbd = serve(admin.clone(), "vol").await;
    let uri = nbd.uri.clone();
    blocking(move || qemu_io(&uri, "read -P 0xc3 218099712 12288")).await;
    let _ = nbd.stop.send(());
    nbd.exports.detach_all().await.expect("detach");
    for n in nodes.iter_mut() {
        n.take().expect("running").shutdown().await.expect("shutdown");
    }
}

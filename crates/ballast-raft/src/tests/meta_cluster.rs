//! The meta group on three in-process nodes with RocksDB disks: admin
//! commands replicate, fencing holds, the group survives the loss of its
//! leader, and a restarted replica (caught up by log or snapshot) ends with
//! exactly the leader's map.

use openraft::async_runtime::watch::WatchReceiver;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ballast_storage::RocksStore;
use ballast_types::{ErrorCode, MapVersion, VolumeId};

use super::support::{members, node_info, open_store, test_config, wait_for};
use crate::log_writer::LogWriter;
use crate::meta::{
    meta_snapshot_dir, start_meta, MetaCommand, MetaGroup, MetaNode, MetaOutcome, MetaPoolSpec, META_GROUP,
};
use crate::shard::ShardConfig;
use crate::testing::LocalRouter;
use crate::types::NodeId;

struct MetaNodeUnderTest {
    id: NodeId,
    dir: PathBuf,
    meta: MetaGroup<RocksStore>,
    _writer: LogWriter<RocksStore>,
}

fn config() -> ShardConfig {
    // Snapshot often and keep no log behind it, so a restarted replica
    // catches up through a meta snapshot.
    ShardConfig { snapshot_every: 4, logs_to_keep: 0, ..test_config() }
}

async fn start(router: &Arc<LocalRouter<RocksStore>>, id: NodeId, dir: &Path) -> MetaNodeUnderTest {
    let store = open_store(dir);
    let writer = LogWriter::spawn(store.clone()).expect("writer");
    let snaps = dir.join("snapshots");
    let meta = start_meta(id, &config(), &writer, store, &snaps, router.transport(id)).await.expect("start meta");
    router.register(id, META_GROUP, meta.raft().clone(), meta_snapshot_dir(&snaps));
    MetaNodeUnderTest { id, dir: dir.to_path_buf(), meta, _writer: writer }
}

async fn kill(router: &LocalRouter<RocksStore>, node: MetaNodeUnderTest) -> PathBuf {
    router.unregister(node.id, META_GROUP);
    node.meta.shutdown().await.expect("shutdown");
    node.dir
}

/// The leader, once every given node agrees on it.
async fn leader(nodes: &[&MetaNodeUnderTest]) -> NodeId {
    wait_for("a meta leader", Duration::from_secs(15), async || {
        let ids: Vec<_> = nodes.iter().map(|n| n.meta.raft().metrics().borrow_watched().current_leader).collect();
        let first = ids[0]?;
        (ids.iter().all(|l| *l == Some(first)) && nodes.iter().any(|n| n.id == first && n.meta.raft().is_leader()))
            .then_some(first)
    })
    .await
}

fn meta_node(id: NodeId) -> MetaNode {
    MetaNode {
        id,
        addr: node_info(id).addr,
        zone: None,
        up: true,
        disks: vec![("/disk0".into(), 1 << 40, 0)],
        draining: false,
    }
}

async fn ok(node: &MetaNodeUnderTest, cmd: MetaCommand) -> MetaOutcome {
    let what = format!("{cmd:?}");
    node.meta.propose(cmd).await.expect("replicated").unwrap_or_else(|e| panic!("{what} refused: {e}"))
}

fn attach(name: &str, force: bool) -> MetaCommand {
    MetaCommand::Attach { name: name.into(), read_only: false, force }
}

fn create(name: &str) -> MetaCommand {
    MetaCommand::CreateVolume { name: name.into(), size: 1 << 30, pool: "main".into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meta_group_replicates_admin_commands_and_a_restarted_replica_rejoins_with_the_same_map() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let router = LocalRouter::<RocksStore>::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start(&router, id, &tmp.path().join(format!("n{id}"))).await);
    }
    nodes[0].meta.initialize(members(&[1, 2, 3])).await.expect("initialize");
    let lead = leader(&nodes.iter().collect::<Vec<_>>()).await;
    let l = nodes.iter().find(|n| n.id == lead).expect("leader is a node");

    // A follower refuses to propose and to serve linearizable reads.
    let follower = nodes.iter().find(|n| n.id != lead).expect("a follower");
    assert!(follower.meta.propose(MetaCommand::SetNodeState { node: 1, up: true }).await.is_err());
    assert!(follower.meta.read_map().await.is_err());

    let init =
        MetaCommand::InitCluster { cluster_id: 0xba11a57, default_pool: None, nodes: (1..=3).map(meta_node).collect() };
    assert_eq!(ok(l, init).await, MetaOutcome::Cluster { cluster_id: 0xba11a57 });
    let spec = MetaPoolSpec { name: "main".into(), replicas: 3, shards: 8, zone_domain: false };
    let MetaOutcome::Pool(pool) = ok(l, MetaCommand::CreatePool { spec }).await else { panic!("pool") };
    assert_eq!(pool.first_shard, 0);
    let MetaOutcome::Volume(a) = ok(l, create("a")).await else { panic!("volume") };
    let MetaOutcome::Volume(b) = ok(l, create("b")).await else { panic!("volume") };
    assert_eq!((a.id, b.id), (1, 2));

    // One writer per volume: a second writable attach is refused, a forced one fences the first.
    let MetaOutcome::Attached { epoch: e1, .. } = ok(l, attach("a", false)).await else { panic!("attach") };
    let refused = l.meta.propose(attach("a", false)).await.expect("replicated").expect_err("second writer");
    assert_eq!(refused.code, ErrorCode::Conflict);
    let MetaOutcome::Attached { epoch: e2, .. } = ok(l, attach("a", true)).await else { panic!("attach") };
    assert_eq!((e1, e2), (1, 2));

    let map = l.meta.read_map().await.expect("linearizable read");
    let placement = map.placement();
    placement.validate().expect("a valid placement map");
    assert_eq!(placement.shards.len(), 8);
    assert!(placement.shards.values().all(|s| s.voters.len() == 3));
    assert_eq!(placement.volumes[&VolumeId(1)].epoch.0, 2);
    assert!(placement.shard_of(VolumeId(2), 0).is_some());
    let before = map.version;

    // Lose the leader; the others elect a new one and keep going.
    let idx = nodes.iter().position(|n| n.id == lead).expect("leader index");
    let dead = nodes.remove(idx);
    let dead_id = dead.id;
    let dead_dir = kill(&router, dead).await;
    let lead2 = leader(&nodes.iter().collect::<Vec<_>>()).await;
    assert_ne!(lead2, lead);
    let l2 = nodes.iter().find(|n| n.id == lead2).expect("new leader");
    // The new leader's first lease read may wait for its lease: retry it.
    let version = wait_for("a linearizable read on the new leader", Duration::from_secs(20), async || {
        l2.meta.read_map().await.ok().map(|m| m.version)
    })
    .await;
    assert_eq!(version, before, "nothing lost with the leader");
    ok(l2, MetaCommand::SetNodeState { node: dead_id, up: false }).await;
    for name in ["c", "d", "e", "f", "g"] {
        ok(l2, create(name)).await;
    }
    let MetaOutcome::Attached { epoch: e3, .. } = ok(l2, attach("a", true)).await else { panic!("attach") };
    assert_eq!(e3, 3);
    assert!(!l2.meta.read_map().await.expect("read").plan_repair(&[ballast_types::NodeId(dead_id)].into()).is_empty());

    // Restart the lost node from its disk: it catches up to the same map.
    let dead_applied = {
        let store = open_store(&dead_dir);
        let m = crate::meta::state::load(&*store).expect("load");
        m.applied.map_or(0, |l| l.index)
    };
    // Make the leader snapshot and purge past it: the restarted replica must
    // catch up by installing a meta snapshot.
    l2.meta.raft().trigger().snapshot().await.expect("trigger snapshot");
    let applied = l2.meta.raft().metrics().borrow_watched().last_applied.map_or(0, |l| l.index);
    wait_for("the leader to snapshot", Duration::from_secs(10), async || {
        let m = l2.meta.raft().metrics().borrow_watched().clone();
        (m.snapshot.map_or(0, |l| l.index) >= applied).then_some(())
    })
    .await;
    l2.meta.raft().trigger().purge_log(applied).await.expect("trigger purge");
    wait_for("the leader to purge its log", Duration::from_secs(10), async || {
        let m = l2.meta.raft().metrics().borrow_watched().clone();
        (m.purged.map_or(0, |l| l.index) > dead_applied).then_some(())
    })
    .await;
    let back = start(&router, dead_id, &dead_dir).await;
    ok(l2, MetaCommand::SetNodeState { node: dead_id, up: true }).await;
    let want = l2.meta.read_map().await.expect("read");
    let got = wait_for("the restarted replica to catch up", Duration::from_secs(20), async || {
        let m = back.meta.local_map();
        (m.version == want.version).then_some(m)
    })
    .await;
    assert_eq!(got, want);
    assert_eq!(got.placement().version, MapVersion(want.version));
    assert_eq!(got.volumes.len(), 7);

    nodes.push(back);
    for n in nodes {
        kill(&router, n).await;
    }
}

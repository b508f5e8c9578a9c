//! An in-process cluster of shard replicas, each "node" with its own
//! RocksStore (one disk) and group-commit writer.

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_storage::{BlockStore, RocksConfig, RocksStore};
use ballast_types::{BlockKey, ShardId};
use bytes::Bytes;

use crate::log_writer::LogWriter;
use crate::shard::{start_shard, ShardConfig, ShardGroup, ShardSpec};
use crate::snapshot::shard_range;
use crate::state_machine::shard_snapshot_dir;
use crate::testing::LocalRouter;
use crate::types::{BallastNode, GroupId, NodeId};

pub const GROUP: GroupId = 7;
pub const SHARD: ShardId = ShardId(3);

/// Fast timers: tests wait for elections.
pub fn test_config() -> ShardConfig {
    ShardConfig {
        heartbeat_interval: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(300),
        election_timeout_max: Duration::from_millis(600),
        ..ShardConfig::default()
    }
}

pub fn node_info(id: NodeId) -> BallastNode {
    BallastNode::new(format!("127.0.0.1:{}", 7000 + id))
}

pub struct Node {
    pub id: NodeId,
    pub dir: PathBuf,
    pub store: Arc<RocksStore>,
    /// Keeps the disk's group-commit writer alive for the node's lifetime.
    pub writer: LogWriter<RocksStore>,
    pub shard: ShardGroup<RocksStore>,
}

/// Open a RocksDB, waiting for a previous instance's last handle to go away.
pub fn open_store(dir: &Path) -> Arc<RocksStore> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match RocksStore::open(
            dir,
            &RocksConfig { block_cache_bytes: 8 << 20, write_buffer_bytes: 4 << 20, wal: false },
        ) {
            Ok(s) => return Arc::new(s),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("store still locked: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("reopen {}: {e}", dir.display()),
        }
    }
}

pub async fn start_node(router: &Arc<LocalRouter<RocksStore>>, id: NodeId, dir: &Path, config: &ShardConfig) -> Node {
    let store = open_store(dir);
    let writer = LogWriter::spawn(store.clone()).expect("writer");
    let spec = ShardSpec { group: GROUP, shard: SHARD, node: id };
    let snaps = dir.join("snapshots");
    let shard =
        start_shard(spec, config, &writer, store.clone(), &snaps, router.transport(id)).await.expect("start shard");
    router.register(id, GROUP, shard.raft().clone(), shard_snapshot_dir(&snaps, SHARD));
    shard.enable_realign().await.expect("enable realign");
    Node { id, dir: dir.to_path_buf(), store, writer, shard }
}

/// Stop a node and release its disk (so it can be reopened).
/// Start a replica in each of `dirs` (node ids 1, 2, ...) and form their
/// group from the first.
pub async fn start_group(
    router: &Arc<LocalRouter<RocksStore>>,
    dirs: &[tempfile::TempDir],
    config: &ShardConfig,
) -> Vec<Node> {
    let mut nodes = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        nodes.push(start_node(router, i as u64 + 1, d.path(), config).await);
    }
    let ids: Vec<NodeId> = (1..=dirs.len() as u64).collect();
    nodes[0].shard.initialize(members(&ids)).await.expect("initialize");
    nodes
}

pub async fn kill(router: &LocalRouter<RocksStore>, node: Node) -> PathBuf {
    router.unregister(node.id, GROUP);
    node.shard.shutdown().await.expect("shutdown");
    let Node { dir, .. } = node;
    dir
}

pub async fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leader as every live node sees it, once they agree.
pub async fn leader(nodes: &[&Node]) -> NodeId {
    wait_for("a leader", Duration::from_secs(15), async || {
        let ids: Vec<_> = nodes.iter().map(|n| n.shard.raft().metrics().borrow_watched().current_leader).collect();
        let first = ids[0]?;
        let is_live = nodes.iter().any(|n| n.id == first);
        (is_live
            && ids.iter().all(|l| *l == Some(first))
            && nodes.iter().any(|n| n.id == first && n.shard.raft().is_leader()))
        .then_some(first)
    })
    .await
}

pub async fn wait_applied(node: &Node, index: u64) {
    wait_for(&format!("node {} to apply {index}", node.id), Duration::from_secs(20), async || {
        let m = node.shard.raft().metrics().borrow_watched().clone();
        (m.last_applied.map(|l| l.index) >= Some(index)).then_some(())
    })
    .await
}

pub fn last_applied(node: &Node) -> u64 {
    node.shard.raft().metrics().borrow_watched().last_applied.map_or(0, |l| l.index)
}

/// Every block of the shard on a node's disk.
pub fn shard_blocks(store: &RocksStore) -> BTreeMap<BlockKey, Bytes> {
    store.scan(&shard_range(SHARD), usize::MAX).expect("scan").into_iter().collect()
}

pub fn members(ids: &[NodeId]) -> BTreeMap<NodeId, BallastNode> {
    ids.iter().map(|id| (*id, node_info(*id))).collect()
}

//! Node assembly: the disks (one `RocksStore` + one group-commit `LogWriter`
//! per data dir), the replica registry, the Raft transport, and the gRPC
//! server that serves the `Raft` and `Data` services on one listener.
//!
//! A new shard replica goes on disk `shard % data_dirs.len()` and is recorded
//! in that disk's [`manifest`](crate::manifest); `Node::start` reopens every
//! replica the manifests list, on the disk that holds it, so replicas come
//! back after a restart without outside help (and data dirs may be reordered).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_proto::pb::data_server::DataServer;
use ballast_proto::pb::raft_server::RaftServer;
use ballast_proto::MAX_MESSAGE_SIZE;
use ballast_raft::state_machine::shard_snapshot_dir;
use ballast_raft::{start_shard, BallastNode, LogWriter, NodeId, ShardConfig, ShardSpec};
use ballast_storage::{RocksConfig, RocksStore, StorageError};
use ballast_types::{ClusterId, GroupId, ShardId};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::data_service::{DataService, HashPlacement, ShardLocator};
use crate::error::NodeError;
use crate::raft_service::RaftService;
use crate::router::{MultiRaft, Replica};
use crate::transport::GrpcTransport;

/// How long `start` waits for a data dir still held by a previous instance
/// in this process (its last handles are released asynchronously).
const REOPEN_WAIT: Duration = Duration::from_secs(10);
/// How long `shutdown` lets open connections drain before dropping them.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// What a node needs to start.
#[derive(Clone)]
pub struct NodeConfig {
    /// This node's Raft id; never 0.
    pub node_id: NodeId,
    /// The cluster every node-to-node message must name; never 0.
    pub cluster: ClusterId,
    /// Where to listen for gRPC (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The `host:port` peers and clients reach this node at, as recorded in
    /// Raft memberships. Empty: the bound listen address.
    pub advertise: String,
    /// One per disk; the order must stay the same across restarts.
    pub data_dirs: Vec<PathBuf>,
    pub shard: ShardConfig,
    pub rocks: RocksConfig,
    /// Where chunks live (the meta group's placement map, later).
    pub locator: Arc<dyn ShardLocator>,
}

impl NodeConfig {
    /// Defaults: cluster 1, default timers and RocksDB sizes, every volume
    /// hashed over shards `0..1`.
    pub fn new(node_id: NodeId, listen: SocketAddr, advertise: impl Into<String>, data_dirs: Vec<PathBuf>) -> Self {
        Self {
            node_id,
            cluster: ClusterId(1),
            listen,
            advertise: advertise.into(),
            data_dirs,
            shard: ShardConfig::default(),
            rocks: RocksConfig::default(),
            locator: Arc::new(HashPlacement { first_shard: 0, shards: 1 }),
        }
    }
}

/// One data dir: its store and the group-commit writer of its Raft logs.
struct Disk {
    dir: PathBuf,
    store: Arc<RocksStore>,
    writer: LogWriter<RocksStore>,
}

/// The storage node process.
pub struct Node;

impl Node {
    /// Open every data dir, bind `listen` and serve. Replicas are started
    /// separately ([`NodeHandle::create_shard_replica`]).
    pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
        if config.node_id == 0 || config.cluster.0 == 0 {
            return Err(NodeError::Config("node id and cluster id must not be 0".into()));
        }
        if config.data_dirs.is_empty() {
            return Err(NodeError::Config("at least one data dir is needed".into()));
        }
        let mut disks = Vec::with_capacity(config.data_dirs.len());
        for dir in &config.data_dirs {
            disks.push(open_disk(dir.clone(), config.rocks.clone()).await?);
        }
        let listen_err = |reason: String| NodeError::Listen { addr: config.listen.to_string(), reason };
        let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| listen_err(e.to_string()))?;
        let local_addr = listener.local_addr().map_err(|e| listen_err(e.to_string()))?;
        let advertise = if config.advertise.is_empty() { local_addr.to_string() } else { config.advertise.clone() };
        ballast_types::validate_addr(&advertise).map_err(|e| NodeError::Config(format!("advertise: {e}")))?;

        let mut on_disk = BTreeMap::new();
        for (i, disk) in disks.iter().enumerate() {
            for shard in crate::manifest::load(&disk.dir)? {
                if let Some(other) = on_disk.insert(shard, i) {
                    let dirs = (disks[other].dir.display(), disk.dir.display());
                    return Err(NodeError::Config(format!(
                        "{shard} is listed on two disks: {} and {}",
                        dirs.0, dirs.1
                    )));
                }
            }
        }
        let groups = Arc::new(MultiRaft::default());
        let transport = Arc::new(GrpcTransport::new(config.cluster, config.node_id));
        let raft = RaftServer::new(RaftService::new(config.cluster, config.node_id, groups.clone()))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let data = DataServer::new(DataService::new(groups.clone(), config.locator.clone()))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(Server::builder().add_service(raft).add_service(data).serve_with_incoming_shutdown(
            incoming,
            async {
                let _ = stopped.await;
            },
        ));
        tracing::info!(node = config.node_id, %local_addr, %advertise, disks = disks.len(), "node serving");
        let node = NodeHandle {
            id: config.node_id,
            advertise,
            local_addr,
            shard_config: config.shard,
            disks,
            groups,
            transport,
            stop: Mutex::new(Some(stop)),
            server: Mutex::new(Some(server)),
            placement: tokio::sync::Mutex::new(on_disk.clone()),
        };
        for shard in on_disk.keys() {
            if let Err(e) = node.create_shard_replica(*shard).await {
                tracing::error!(node = node.id, %shard, "reopening replica failed: {e}");
                let _ = node.shutdown_inner().await;
                return Err(e);
            }
        }
        Ok(node)
    }
}

/// Open a data dir, waiting (bounded) for a previous instance's lock.
async fn open_disk(dir: PathBuf, rocks: RocksConfig) -> Result<Disk, NodeError> {
    let deadline = Instant::now() + REOPEN_WAIT;
    let store = loop {
        let (d, r) = (dir.clone(), rocks.clone());
        let opened = tokio::task::spawn_blocking(move || RocksStore::open(&d, &r))
            .await
            .map_err(|e| NodeError::Io(std::io::Error::other(e)))?;
        match opened {
            Ok(s) => break Arc::new(s),
            Err(StorageError::Open { reason, .. }) if reason.contains("lock") && Instant::now() < deadline => {
                tracing::debug!(dir = %dir.display(), "data dir still locked: {reason}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let writer = LogWriter::spawn(store.clone())?;
    Ok(Disk { dir, store, writer })
}

/// A running node.
pub struct NodeHandle {
    id: NodeId,
    advertise: String,
    local_addr: SocketAddr,
    shard_config: ShardConfig,
    disks: Vec<Disk>,
    groups: Arc<MultiRaft<RocksStore>>,
    transport: Arc<GrpcTransport>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    server: Mutex<Option<JoinHandle<Result<(), tonic::transport::Error>>>>,
    /// Which disk holds each shard replica (the union of the manifests).
    /// Held across replica start so manifest updates are serialised.
    placement: tokio::sync::Mutex<BTreeMap<ShardId, usize>>,
}

impl NodeHandle {
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address peers and clients use (what memberships record).
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// This node as a Raft membership entry.
    pub fn node_info(&self) -> BallastNode {
        BallastNode::new(self.advertise.clone())
    }

    /// The bound listener address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn running(&self) -> Result<(), NodeError> {
        let stopped = self.stop.lock().unwrap_or_else(|e| e.into_inner()).is_none();
        if stopped {
            Err(NodeError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Start this node's replica of `shard` (Raft group `GroupId::for_shard`),
    /// empty or from what its disk holds, and record it in the disk's
    /// manifest (durable before this returns). A new group also needs
    /// [`initialize_shard`](Self::initialize_shard) on exactly one member.
    pub async fn create_shard_replica(&self, shard: ShardId) -> Result<GroupId, NodeError> {
        self.running()?;
        let group = GroupId::for_shard(shard);
        let mut placement = self.placement.lock().await;
        if self.groups.contains(group) {
            return Err(NodeError::GroupExists { group });
        }
        let known = placement.get(&shard).copied();
        let disk_no = known.unwrap_or(shard.0 as usize % self.disks.len());
        let disk = &self.disks[disk_no];
        if known.is_none() {
            let mut listed: Vec<ShardId> =
                placement.iter().filter(|(_, d)| **d == disk_no).map(|(s, _)| *s).chain([shard]).collect();
            listed.sort();
            let dir = disk.dir.clone();
            tokio::task::spawn_blocking(move || crate::manifest::store(&dir, &listed))
                .await
                .map_err(|e| NodeError::Io(std::io::Error::other(e)))??;
            placement.insert(shard, disk_no);
        }
        let spec = ShardSpec { group: group.0, shard, node: self.id };
        let snapshots = disk.dir.join("snapshots");
        let started =
            start_shard(spec, &self.shard_config, &disk.writer, disk.store.clone(), &snapshots, self.transport.clone())
                .await?;
        let replica = Replica { group: started, snapshot_dir: shard_snapshot_dir(&snapshots, shard) };
        if let Err(dup) = self.groups.insert(group, replica) {
            dup.group.shutdown().await?;
            return Err(NodeError::GroupExists { group });
        }
        tracing::info!(node = self.id, %shard, %group, "shard replica started");
        Ok(group)
    }

    /// Form a new group of `members` from this node's (empty) replica.
    pub async fn initialize_shard(
        &self,
        shard: ShardId,
        members: BTreeMap<NodeId, BallastNode>,
    ) -> Result<(), NodeError> {
        let group = GroupId::for_shard(shard);
        let replica = self.groups.get(group).ok_or(NodeError::NoSuchGroup { group })?;
        Ok(replica.group.initialize(members).await?)
    }

    /// Stop this node's replica of `shard`; its data and manifest entry stay
    /// on disk, so the next start reopens it.
    pub async fn stop_shard_replica(&self, shard: ShardId) -> Result<(), NodeError> {
        let group = GroupId::for_shard(shard);
        let replica = self.groups.remove(group).ok_or(NodeError::NoSuchGroup { group })?;
        Ok(replica.group.shutdown().await?)
    }

    /// A running replica (for metrics, tests and the meta group's scheduler).
    pub fn replica(&self, group: GroupId) -> Option<Arc<Replica<RocksStore>>> {
        self.groups.get(group)
    }

    /// The groups running on this node.
    pub fn groups(&self) -> Vec<GroupId> {
        self.groups.groups()
    }

    /// The leader of `group` as this node's replica knows it.
    pub fn leader(&self, group: GroupId) -> Option<(NodeId, BallastNode)> {
        self.groups.get(group)?.group.leader()
    }

    /// Stop serving, stop every replica, and release the data dirs.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.shutdown_inner().await
    }

    async fn shutdown_inner(&self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
        let mut first_err = None;
        for (group, replica) in self.groups.drain() {
            if let Err(e) = replica.group.shutdown().await {
                tracing::warn!(node = self.id, %group, "replica shutdown: {e}");
                first_err.get_or_insert(NodeError::from(e));
            }
        }
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut server) = server {
            match tokio::time::timeout(DRAIN_WAIT, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(node = self.id, "gRPC server ended with: {e}"),
                Ok(Err(e)) => tracing::warn!(node = self.id, "gRPC server task: {e}"),
                Err(_) => {
                    tracing::warn!(node = self.id, "connections did not drain in {DRAIN_WAIT:?}; dropping them");
                    server.abort();
                }
            }
        }
        tracing::info!(node = self.id, "node stopped");
        first_err.map_or(Ok(()), Err)
    }
}

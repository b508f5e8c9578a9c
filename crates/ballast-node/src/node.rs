//! Node assembly: the disks (one `RocksStore` + one group-commit `LogWriter`
//! per data dir), the replica registry, the Raft transport, and the gRPC
//! server that serves the `Raft`, `Data` and `Admin` services on one listener.
//!
//! **Life of a node.** A node starts knowing only its disks and address. It
//! becomes part of a cluster once, in one of two ways: `cluster init` names
//! it as a first member (the coordinator assigns it an id and it starts a
//! replica of the meta group), or it joins through existing members
//! (`--join`: the meta leader assigns an id; it holds no meta replica). The
//! [`identity`](crate::identity) is then stored in the first data dir, so a
//! restart comes back as the same node with every replica its disks'
//! [`manifest`](crate::manifest)s list — without asking anyone.
//!
//! **Replicas follow the map.** A member node runs a reconciler
//! ([`crate::reconcile`]) that keeps the node's copy of the placement map
//! current and starts a replica of every shard the map assigns to it; the
//! first voter of a new shard forms the group. A new replica goes on disk
//! `shard % data_dirs.len()` and is recorded in that disk's manifest.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ballast_proto::pb::admin_server::AdminServer;
use ballast_proto::pb::data_server::DataServer;
use ballast_proto::pb::raft_server::RaftServer;
use ballast_proto::MAX_MESSAGE_SIZE;
use ballast_raft::meta::meta_snapshot_dir;
use ballast_raft::state_machine::shard_snapshot_dir;
use ballast_raft::{start_meta, start_shard, BallastNode, LogWriter, MetaGroup, NodeId, ShardConfig, ShardSpec};
use ballast_storage::{LogStore as _, RocksConfig, RocksStore, StorageError};
use ballast_types::{ClusterId, DiskInfo, GroupId, ShardId};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::admin_service::AdminService;
use crate::data_service::{DataService, HashPlacement, MapLocator, ShardLocator};
use crate::error::NodeError;
use crate::identity::{self, Identity};
use crate::raft_service::{RaftService, WhoAmI};
use crate::router::{MultiRaft, Replica};
use crate::transport::GrpcTransport;

/// What a node without `--join-token` presents when it joins (the wire
/// requires a token). Configured tokens cannot contain its parentheses, so
/// it never matches one.
pub const NO_JOIN_TOKEN: &str = "(none)";

/// How long `start` waits for a data dir still held by a previous instance
/// in this process (its last handles are released asynchronously).
const REOPEN_WAIT: Duration = Duration::from_secs(10);
/// How long `shutdown` lets open connections drain before dropping them.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// What a node needs to start.
#[derive(Clone)]
pub struct NodeConfig {
    /// A fixed identity (tests that wire groups by hand). `None`: read it
    /// from the first data dir, or wait for `cluster init` / join.
    pub identity: Option<Identity>,
    /// Where to listen for gRPC (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The `host:port` peers and clients reach this node at, as recorded in
    /// Raft memberships. Empty: the bound address, or `hostname:port` when
    /// listening on every interface.
    pub advertise: String,
    /// One per disk; the order must stay the same across restarts.
    pub data_dirs: Vec<PathBuf>,
    /// Failure-domain label recorded in the cluster map.
    pub zone: Option<String>,
    /// Endpoints of an existing cluster to join through (when this node has
    /// no identity yet). Empty: wait for `cluster init`.
    pub join: Vec<String>,
    /// The cluster's join token (`--join-token`). `Some`: this node refuses
    /// `JoinNode` and `AssignIdentity` calls that do not carry the same one,
    /// and presents it when it joins or assigns identities. `None`: no check;
    /// a join presents [`NO_JOIN_TOKEN`].
    pub join_token: Option<String>,
    /// Mutual TLS for the server and every channel this node opens; `None`:
    /// plain HTTP/2.
    pub tls: Option<ballast_proto::TlsConfig>,
    pub shard: ShardConfig,
    pub rocks: RocksConfig,
    /// `Some`: a fixed chunk→shard rule and no reconciler (tests that place
    /// replicas by hand). `None`: the cluster map decides.
    pub locator: Option<Arc<dyn ShardLocator>>,
    /// How often the reconciler re-reads the map when nothing asks it to.
    pub reconcile_every: Duration,
    /// On the meta leader: a node that has not answered for this long is
    /// marked down and its shard replicas are rebuilt on other nodes. A node
    /// back sooner catches up from its groups' logs.
    pub down_after: Duration,
    /// Bytes per second for all snapshot streams this node sends (how
    /// rebuilt replicas get their data); `None`: unlimited.
    pub rebuild_rate: Option<u64>,
    /// Bytes per second scrub reads at (`None`: unpaced); see [`crate::scrub`].
    pub scrub_rate: Option<u64>,
    /// Time between the end of one scrub pass and the start of the next.
    pub scrub_interval: Duration,
}

impl NodeConfig {
    /// A node with a fixed identity (cluster 1, no meta replica) whose
    /// volumes hash over shards `0..1`; replicas are started by hand.
    pub fn new(node_id: NodeId, listen: SocketAddr, advertise: impl Into<String>, data_dirs: Vec<PathBuf>) -> Self {
        let mut c = Self::daemon(listen, advertise.into(), data_dirs);
        c.identity =
            Some(Identity { cluster: ClusterId(1), node: ballast_types::NodeId(node_id), meta: false, seeds: vec![] });
        c.locator = Some(Arc::new(HashPlacement { first_shard: 0, shards: 1 }));
        c
    }

    /// The `ballast node` daemon: identity from the data dir, `cluster init`
    /// or `join`; replicas from the cluster map.
    pub fn daemon(listen: SocketAddr, advertise: String, data_dirs: Vec<PathBuf>) -> Self {
        Self {
            identity: None,
            listen,
            advertise,
            data_dirs,
            zone: None,
            join: Vec::new(),
            join_token: None,
            tls: None,
            shard: ShardConfig::default(),
            rocks: RocksConfig::default(),
            locator: None,
            reconcile_every: Duration::from_millis(500),
            down_after: Duration::from_secs(60),
            rebuild_rate: None,
            scrub_rate: Some(crate::scrub::DEFAULT_RATE),
            scrub_interval: crate::scrub::DEFAULT_INTERVAL,
        }
    }
}

/// One data dir: its store and the group-commit writer of its Raft logs.
pub(crate) struct Disk {
    pub dir: PathBuf,
    pub store: Arc<RocksStore>,
    pub writer: LogWriter<RocksStore>,
}

/// The storage node process.
pub struct Node;

impl Node {
    /// Open every data dir, bind `listen` and serve. A node with an identity
    /// (configured or stored) takes up its replicas at once; one without
    /// waits for `cluster init` or joins through `config.join`.
    pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
        if config.data_dirs.is_empty() {
            return Err(NodeError::Config("at least one data dir is needed".into()));
        }
        for e in &config.join {
            ballast_types::validate_addr(e).map_err(|err| NodeError::Config(format!("join endpoint {e:?}: {err}")))?;
        }
        if let Some(z) = &config.zone {
            ballast_types::validate_name(z).map_err(|e| NodeError::Config(format!("zone {z:?}: {e}")))?;
        }
        let token = config.join_token.as_deref();
        let invalid_token = |e: ballast_proto::auth::InvalidToken| NodeError::Config(format!("join token: {e}"));
        let peer_token = ballast_proto::PresentToken::new(token).map_err(invalid_token)?;
        let require_token = ballast_proto::RequireToken::new(token).map_err(invalid_token)?;
        let mut disks = Vec::with_capacity(config.data_dirs.len());
        for dir in &config.data_dirs {
            std::fs::create_dir_all(dir).map_err(|e| NodeError::Config(format!("data dir {}: {e}", dir.display())))?;
            disks.push(open_disk(dir.clone(), config.rocks.clone()).await?);
        }
        let stored = identity::load(&disks[0].dir)?;
        let identity = match (stored, config.identity.clone()) {
            (Some(s), Some(c)) if s.cluster != c.cluster || s.node != c.node => {
                return Err(NodeError::Config(format!(
                    "{} belongs to {} as {}, not {} as {}",
                    disks[0].dir.display(),
                    s.cluster,
                    s.node,
                    c.cluster,
                    c.node
                )));
            }
            (Some(s), _) => Some(s),
            (None, c) => c,
        };
        let listen_err = |reason: String| NodeError::Listen { addr: config.listen.to_string(), reason };
        let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| listen_err(e.to_string()))?;
        let local_addr = listener.local_addr().map_err(|e| listen_err(e.to_string()))?;
        let advertise = if !config.advertise.is_empty() {
            config.advertise.clone()
        } else if local_addr.ip().is_unspecified() {
            format!("{}:{}", hostname(), local_addr.port())
        } else {
            local_addr.to_string()
        };
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
        let who: WhoAmI = Arc::new(OnceLock::new());
        let map = Arc::new(MapLocator::default());
        let locator: Arc<dyn ShardLocator> = match &config.locator {
            Some(l) => l.clone(),
            None => map.clone(),
        };
        let (stop_tasks, _) = watch::channel(false);
        let scrub = Arc::new(crate::scrub::Scrubber::new(config.scrub_rate, config.scrub_interval));
        let inner = Arc::new(NodeInner {
            scrub,
            config,
            peer_token,
            advertise,
            local_addr,
            disks,
            groups: groups.clone(),
            who: who.clone(),
            identity: OnceLock::new(),
            transport: OnceLock::new(),
            meta: OnceLock::new(),
            map,
            placement: tokio::sync::Mutex::new(on_disk),
            activation: tokio::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
            channels: Mutex::new(Default::default()),
            io: Arc::default(),
            stop_tasks,
            tasks: Mutex::new(Vec::new()),
        });

        let weak = Arc::downgrade(&inner);
        let connect: crate::integrity::Connect = Box::new(move |addr: &str| {
            weak.upgrade().ok_or_else(|| "the node is stopping".to_string())?.peer_client(addr)
        });
        let peers = Arc::new(crate::integrity::Peers::new(who.clone(), connect));
        // Every Raft call must carry the join token when this node has one.
        let raft = InterceptedService::new(
            RaftServer::new(RaftService::new(who, groups.clone()).with_peers(peers.clone()))
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
            require_token,
        );
        let data = DataServer::new(crate::metrics::MeteredData(
            DataService::new(groups, locator).observed(inner.io.clone(), inner.who.clone()).repairing(peers.clone()),
        ))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let admin = AdminServer::new(AdminService::new(inner.clone()))
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop, stopped) = oneshot::channel::<()>();
        let mut builder = Server::builder();
        if let Some(tls) = &inner.config.tls {
            builder = builder.tls_config(tls.server()).map_err(|e| NodeError::Config(format!("TLS: {e}")))?;
        }
        let server =
            tokio::spawn(builder.add_service(raft).add_service(data).add_service(admin).serve_with_incoming_shutdown(
                incoming,
                async {
                    let _ = stopped.await;
                },
            ));
        tracing::info!(%local_addr, advertise = %inner.advertise, disks = inner.disks.len(), "node serving");
        inner.spawn(crate::scrub::run(inner.clone(), peers));
        let node = NodeHandle { inner, stop: Mutex::new(Some(stop)), server: Mutex::new(Some(server)) };
        match identity {
            Some(id) => {
                if let Err(e) = node.inner.activate(id).await {
                    tracing::error!("taking up this node's replicas failed: {e}");
                    let _ = node.shutdown_inner().await;
                    return Err(e);
                }
            }
            None if !node.inner.config.join.is_empty() => node.inner.spawn(crate::reconcile::join(node.inner.clone())),
            None => tracing::info!("waiting for `ballast cluster init` or a join"),
        }
        Ok(node)
    }
}

/// This machine's host name (for the advertised address of a node that
/// listens on every interface).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Open a data dir, waiting (bounded) for a previous instance's lock.
async fn open_disk(dir: PathBuf, rocks: RocksConfig) -> Result<Disk, NodeError> {
    // The block store of a replica needs no write-ahead log: its Raft log
    // is the durable source, replayed after a crash (RocksConfig::wal).
    let store = open_store(dir.clone(), RocksConfig { wal: false, ..rocks }).await?;
    if store.holds_raft_logs()? {
        return Err(NodeError::Io(std::io::Error::other(format!(
            "{} was written by an older Ballast that kept Raft logs inside the block database; \
             this version keeps them in {}/{LOG_DB_DIR}: start from an empty data dir",
            dir.display(),
            dir.display()
        ))));
    }
    let log_store = open_store(dir.join(LOG_DB_DIR), RocksConfig::raft_log()).await?;
    let writer = LogWriter::spawn(log_store)?;
    Ok(Disk { dir, store, writer })
}

/// The Raft logs of a disk's groups live in their own RocksDB under the data
/// dir, so the block writes of `apply` never queue behind a log fsync in one
/// database's write path (see docs/decisions.md).
pub(crate) const LOG_DB_DIR: &str = "raft-log";

async fn open_store(dir: PathBuf, rocks: RocksConfig) -> Result<Arc<RocksStore>, NodeError> {
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
    Ok(store)
}

/// Capacity and use of the file system holding `dir`.
pub(crate) fn disk_info(dir: &std::path::Path) -> DiskInfo {
    let path = dir.display().to_string();
    let (mut capacity, mut used) = (0, 0);
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: `c` is a valid NUL-terminated path and `st` a properly
        // sized, writable statvfs buffer; statvfs only writes into it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
            let frsize = st.f_frsize as u64;
            capacity = st.f_blocks as u64 * frsize;
            used = capacity.saturating_sub(st.f_bfree as u64 * frsize);
        }
    }
    DiskInfo { path, capacity, used }
}

/// Everything a node owns, shared by its services and background tasks.
pub(crate) struct NodeInner {
    pub config: NodeConfig,
    /// Presented on every `Raft` call this node makes ([`ballast_proto::auth`]).
    pub peer_token: ballast_proto::PresentToken,
    pub advertise: String,
    pub local_addr: SocketAddr,
    pub disks: Vec<Disk>,
    pub groups: Arc<MultiRaft<RocksStore>>,
    who: WhoAmI,
    pub identity: OnceLock<Identity>,
    pub transport: OnceLock<Arc<GrpcTransport>>,
    pub meta: OnceLock<Arc<MetaGroup<RocksStore>>>,
    /// The placement map as this node last saw it.
    pub map: Arc<MapLocator>,
    /// Which disk holds each shard replica (the union of the manifests).
    /// Held across replica start so manifest updates are serialised.
    placement: tokio::sync::Mutex<BTreeMap<ShardId, usize>>,
    /// Serialises taking an identity.
    activation: tokio::sync::Mutex<()>,
    stopping: AtomicBool,
    /// gRPC channels to other nodes (Admin forwarding, map fetches, purges).
    channels: Mutex<std::collections::HashMap<String, tonic::transport::Channel>>,
    /// Data requests served per volume (`NodeStats`, `ballast status`).
    pub io: Arc<crate::data_service::VolumeIoCounters>,
    /// Flips to `true` when background tasks must end.
    pub stop_tasks: watch::Sender<bool>,
    /// Scrub settings and figures (`NodeStats`, `ScrubNode`).
    pub scrub: Arc<crate::scrub::Scrubber>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl NodeInner {
    /// This node's id; 0 before it belongs to a cluster.
    pub fn id(&self) -> NodeId {
        self.identity.get().map_or(0, |i| i.node.0)
    }

    pub fn running(&self) -> Result<(), NodeError> {
        if self.stopping.load(Ordering::Acquire) {
            Err(NodeError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// A lazily connected channel to the node at `addr` (reused).
    pub fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let ep = ballast_proto::tls::endpoint(addr, self.config.tls.as_ref())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let c = ep.connect_lazy();
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// A `Raft` client for the node at `addr` that presents the join token.
    pub fn peer_client(&self, addr: &str) -> Result<ballast_proto::PeerClient, String> {
        Ok(ballast_proto::peer_client(self.channel(addr)?, &self.peer_token))
    }

    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut stop = self.stop_tasks.subscribe();
        let handle = tokio::spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    }

    /// The disks as the cluster map records them.
    pub fn disk_infos(&self) -> Vec<DiskInfo> {
        self.disks.iter().map(|d| disk_info(&d.dir)).collect()
    }

    /// Become `id` (once): persist it, start the meta replica if this node
    /// is a meta member, reopen every replica the manifests list, and (for
    /// map-driven nodes) start the reconciler. Calling it again with the same
    /// identity does nothing; another identity is refused.
    pub async fn activate(self: &Arc<Self>, id: Identity) -> Result<(), NodeError> {
        let _guard = self.activation.lock().await;
        if let Some(have) = self.identity.get() {
            return if have.cluster == id.cluster && have.node == id.node {
                Ok(())
            } else {
                Err(NodeError::Config(format!("this node is already {} in {}", have.node, have.cluster)))
            };
        }
        self.running()?;
        id.validate().map_err(NodeError::Config)?;
        if identity::load(&self.disks[0].dir)?.as_ref() != Some(&id) && self.config.identity.as_ref() != Some(&id) {
            let (dir, stored) = (self.disks[0].dir.clone(), id.clone());
            tokio::task::spawn_blocking(move || identity::store(&dir, &stored))
                .await
                .map_err(|e| NodeError::Io(std::io::Error::other(e)))??;
        }
        let transport = Arc::new(
            GrpcTransport::new(id.cluster, id.node.0, self.config.rebuild_rate)
                .with_tls(self.config.tls.clone())
                .with_token(self.peer_token.clone()),
        );
        let _ = self.transport.set(transport.clone());
        let _ = self.who.set((id.cluster, id.node));
        let _ = self.identity.set(id.clone());
        tracing::info!(node = id.node.0, cluster = %id.cluster, meta = id.meta, "node identity");
        if id.meta {
            let disk = &self.disks[0];
            let snapshots = disk.dir.join("snapshots");
            let meta = start_meta(
                id.node.0,
                &self.config.shard,
                &disk.writer,
                disk.store.clone(),
                &meta_snapshot_dir(&snapshots),
                transport,
            )
            .await?;
            let replica = Replica { group: meta.router_handle(), snapshot_dir: meta_snapshot_dir(&snapshots) };
            if self.groups.insert(GroupId::META, replica).is_err() {
                return Err(NodeError::GroupExists { group: GroupId::META });
            }
            let _ = self.meta.set(Arc::new(meta));
        }
        let listed: Vec<ShardId> = self.placement.lock().await.keys().copied().collect();
        for shard in listed {
            self.create_shard_replica(shard).await?;
        }
        if self.config.locator.is_none() {
            self.spawn(crate::reconcile::run(self.clone()));
        }
        Ok(())
    }

    /// Become a meta member: start an empty meta replica (the meta leader
    /// then adds it as a learner and makes it a voter in place of a lost
    /// member) and record it in the stored identity, so a restart reopens
    /// it. Idempotent.
    pub async fn join_meta(self: &Arc<Self>) -> Result<(), NodeError> {
        let _guard = self.activation.lock().await;
        self.running()?;
        if self.meta.get().is_some() {
            return Ok(());
        }
        let id = self.identity.get().cloned().ok_or(NodeError::NoIdentity)?;
        let transport = self.transport.get().cloned().ok_or(NodeError::NoIdentity)?;
        let (dir, stored) = (self.disks[0].dir.clone(), Identity { meta: true, ..id.clone() });
        tokio::task::spawn_blocking(move || identity::store(&dir, &stored))
            .await
            .map_err(|e| NodeError::Io(std::io::Error::other(e)))??;
        let disk = &self.disks[0];
        let snapshots = disk.dir.join("snapshots");
        let meta = start_meta(
            id.node.0,
            &self.config.shard,
            &disk.writer,
            disk.store.clone(),
            &meta_snapshot_dir(&snapshots),
            transport,
        )
        .await?;
        let replica = Replica { group: meta.router_handle(), snapshot_dir: meta_snapshot_dir(&snapshots) };
        if self.groups.insert(GroupId::META, replica).is_err() {
            return Err(NodeError::GroupExists { group: GroupId::META });
        }
        let _ = self.meta.set(Arc::new(meta));
        tracing::info!(node = id.node.0, "started a meta replica: joining the meta group");
        Ok(())
    }

    pub async fn create_shard_replica(&self, shard: ShardId) -> Result<GroupId, NodeError> {
        self.running()?;
        let transport = self.transport.get().cloned().ok_or(NodeError::NoIdentity)?;
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
        let spec = ShardSpec { group: group.0, shard, node: self.id() };
        let snapshots = disk.dir.join("snapshots");
        let started =
            start_shard(spec, &self.config.shard, &disk.writer, disk.store.clone(), &snapshots, transport).await?;
        if let Err(e) = started.enable_realign().await {
            // Never a realign target then: it skips them, which is safe.
            tracing::warn!(%shard, "replica does not know its node for realigns: {e}");
        }
        let replica = Replica { group: started, snapshot_dir: shard_snapshot_dir(&snapshots, shard) };
        if let Err(dup) = self.groups.insert(group, replica) {
            dup.group.shutdown().await?;
            return Err(NodeError::GroupExists { group });
        }
        tracing::info!(node = self.id(), %shard, %group, "shard replica started");
        Ok(group)
    }
}

impl NodeInner {
    /// Stop this node's replica of `shard` and delete everything it kept:
    /// blocks, apply state, the group's log, its snapshot files and its
    /// manifest entry. Only for a replica its group no longer has.
    pub async fn destroy_shard_replica(&self, shard: ShardId) -> Result<(), NodeError> {
        let group = GroupId::for_shard(shard);
        let mut placement = self.placement.lock().await;
        if let Some(replica) = self.groups.remove(group) {
            replica.group.shutdown().await?;
        }
        let Some(disk_no) = placement.get(&shard).copied() else { return Ok(()) };
        let disk = &self.disks[disk_no];
        let (store, log, dir) = (disk.store.clone(), disk.writer.store().clone(), disk.dir.clone());
        let listed: Vec<ShardId> =
            placement.iter().filter(|(s, d)| **d == disk_no && **s != shard).map(|(s, _)| *s).collect();
        tokio::task::spawn_blocking(move || -> Result<(), NodeError> {
            ballast_raft::state_machine::destroy_replica(&*store, shard)?;
            // The vote stays: a replica made here again must not vote twice
            // in a term, nor take an old leader's entries (a deposed leader
            // that missed its deposition would count it toward a quorum).
            // Marked first, so a crash in between leaves a replica that
            // still has its log (the mark matters only without one).
            use ballast_raft::log_store::{REMADE_KEY, VOTE_KEY};
            log.put_state(group.0, REMADE_KEY, bytes::Bytes::from_static(b"1"))?;
            log.delete_group(group.0, &[VOTE_KEY, REMADE_KEY])?;
            let snapshots = shard_snapshot_dir(&dir.join("snapshots"), shard);
            match std::fs::remove_dir_all(&snapshots) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(NodeError::Io(e)),
                _ => {}
            }
            crate::manifest::store(&dir, &listed)?;
            Ok(())
        })
        .await
        .map_err(|e| NodeError::Io(std::io::Error::other(e)))??;
        placement.remove(&shard);
        tracing::info!(node = self.id(), %shard, "shard replica removed and its data deleted");
        Ok(())
    }
}

/// A running node.
pub struct NodeHandle {
    inner: Arc<NodeInner>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    server: Mutex<Option<JoinHandle<Result<(), tonic::transport::Error>>>>,
}

impl NodeHandle {
    /// This node's id; 0 until it belongs to a cluster.
    pub fn id(&self) -> NodeId {
        self.inner.id()
    }

    /// This node's identity, once it has one.
    pub fn identity(&self) -> Option<Identity> {
        self.inner.identity.get().cloned()
    }

    /// The address peers and clients use (what memberships record).
    pub fn advertise(&self) -> &str {
        &self.inner.advertise
    }

    /// This node as a Raft membership entry.
    pub fn node_info(&self) -> BallastNode {
        BallastNode::new(self.inner.advertise.clone())
    }

    /// The bound listener address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Start this node's replica of `shard` (Raft group `GroupId::for_shard`),
    /// empty or from what its disk holds, and record it in the disk's
    /// manifest (durable before this returns). A new group also needs
    /// [`initialize_shard`](Self::initialize_shard) on exactly one member.
    pub async fn create_shard_replica(&self, shard: ShardId) -> Result<GroupId, NodeError> {
        self.inner.create_shard_replica(shard).await
    }

    /// Form a new group of `members` from this node's (empty) replica.
    pub async fn initialize_shard(
        &self,
        shard: ShardId,
        members: BTreeMap<NodeId, BallastNode>,
    ) -> Result<(), NodeError> {
        let group = GroupId::for_shard(shard);
        let replica = self.inner.groups.get(group).ok_or(NodeError::NoSuchGroup { group })?;
        Ok(replica.group.initialize(members).await?)
    }

    /// Stop this node's replica of `shard`; its data and manifest entry stay
    /// on disk, so the next start reopens it.
    pub async fn stop_shard_replica(&self, shard: ShardId) -> Result<(), NodeError> {
        let group = GroupId::for_shard(shard);
        let replica = self.inner.groups.remove(group).ok_or(NodeError::NoSuchGroup { group })?;
        Ok(replica.group.shutdown().await?)
    }

    /// A running replica (for metrics, tests and the meta group's scheduler).
    pub fn replica(&self, group: GroupId) -> Option<Arc<Replica<RocksStore>>> {
        self.inner.groups.get(group)
    }

    /// This node's meta replica, if it is a meta member.
    pub fn meta(&self) -> Option<Arc<MetaGroup<RocksStore>>> {
        self.inner.meta.get().cloned()
    }

    /// The groups running on this node.
    pub fn groups(&self) -> Vec<GroupId> {
        self.inner.groups.groups()
    }

    /// The leader of `group` as this node's replica knows it.
    pub fn leader(&self, group: GroupId) -> Option<(NodeId, BallastNode)> {
        self.inner.groups.get(group)?.group.leader()
    }

    /// The node's state in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(&self.inner)
    }

    /// Stop serving, stop every replica, and release the data dirs.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.shutdown_inner().await
    }

    async fn shutdown_inner(&self) -> Result<(), NodeError> {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::Release);
        let _ = inner.stop_tasks.send(true);
        let tasks: Vec<_> = inner.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
        // Wait for replica starts in flight, then stop every replica.
        let _placement = inner.placement.lock().await;
        let mut first_err = None;
        for (group, replica) in inner.groups.drain() {
            if let Err(e) = replica.group.shutdown().await {
                tracing::warn!(node = inner.id(), %group, "replica shutdown: {e}");
                first_err.get_or_insert(NodeError::from(e));
            }
        }
        // Block writes have no write-ahead log: flush them now, so a restart
        // finds every applied entry in place instead of replaying the logs.
        for disk in &inner.disks {
            let store = disk.store.clone();
            let flushed = tokio::task::spawn_blocking(move || {
                ballast_storage::BlockStore::sync(&*store).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = flushed {
                tracing::warn!(node = inner.id(), disk = %disk.dir.display(), "flushing blocks at shutdown: {e}");
            }
        }
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut server) = server {
            match tokio::time::timeout(DRAIN_WAIT, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(node = inner.id(), "gRPC server ended with: {e}"),
                Ok(Err(e)) => tracing::warn!(node = inner.id(), "gRPC server task: {e}"),
                Err(_) => {
                    tracing::warn!(node = inner.id(), "connections did not drain in {DRAIN_WAIT:?}; dropping them");
                    server.abort();
                }
            }
        }
        tracing::info!(node = inner.id(), "node stopped");
        first_err.map_or(Ok(()), Err)
    }
}

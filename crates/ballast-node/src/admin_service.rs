//! The tonic `Admin` service: cluster bootstrap, membership, pools, volumes,
//! attachments and the placement map.
//!
//! **Who answers.** Every node serves Admin; only the meta leader executes.
//! A node that holds a meta replica forwards a call to the leader it knows
//! of; a node without one forwards to a seed. A call travels at most
//! [`MAX_HOPS`] forwards (counted in the `x-ballast-hops` header), so a
//! moving leadership ends in a retryable `NOT_LEADER`/`UNAVAILABLE` rather
//! than a loop; clients then try another endpoint. Forwarded replies,
//! errors included, are passed back unchanged.
//!
//! **What is linearizable.** Changes are meta commands, acknowledged once
//! committed on a majority of the meta group and applied by the leader. Reads
//! (status, lists, the placement map) are served from the leader's map after
//! a lease check, so they see every acknowledged change.
//!
//! `InitCluster` and `AssignIdentity` are the exceptions: they run on the
//! node that receives them (see [`AdminService::init_cluster`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_proto::pb;
use ballast_proto::pb::admin_client::AdminClient;
use ballast_proto::pb::admin_server::Admin;
use ballast_proto::{status_from_api_error, MAX_MESSAGE_SIZE};
use ballast_raft::meta::{MetaNode, MetaPoolSpec};
use ballast_raft::{BallastNode, ClusterMap, MetaCommand, MetaGroup, MetaOutcome};
use ballast_storage::RocksStore;
use ballast_types::{
    ApiError, AttachVolume, ClusterId, ClusterStatus, CreateVolume, DetachVolume, ErrorCode, InitCluster,
    InitClusterReply, JoinNode, JoinNodeReply, MapVersion, NodeAddr, NodeId, NodeInfo, NodeStats, PlacementReply,
    PoolInfo, PoolSpec, RebuildProgress, RebuildStream, ResizeVolume, ScrubReport, ShardStatus, VolumeId, VolumeInfo,
    VolumeIo, PROTOCOL_VERSION,
};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::data_service::api_error;
use crate::identity::Identity;
use crate::node::NodeInner;

/// Forwards a call may take before it is refused as retryable.
pub const MAX_HOPS: u32 = 2;
const HOPS: &str = "x-ballast-hops";
/// How long `InitCluster` waits for members that are still starting, and
/// for the new meta group to elect a leader.
const INIT_WAIT: Duration = Duration::from_secs(30);
/// How long a liveness probe of a node may take in `ClusterStatus`.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How long `DeleteVolume` waits for the volume's blocks to be freed before
/// answering (they are freed in the background either way).
const DELETE_WAIT: Duration = Duration::from_secs(15);

pub struct AdminService {
    inner: Arc<NodeInner>,
    next_seed: AtomicUsize,
}

enum Route {
    Local(Arc<MetaGroup<RocksStore>>),
    Remote(String),
}

fn hops_of<T>(r: &Request<T>) -> u32 {
    r.metadata().get(HOPS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn unavailable(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, msg)
}

fn internal(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Internal, msg)
}

/// `Ok` when this node has no join token, or `presented` is the same one.
/// The token gates who may join (or be made a member by `cluster init`);
/// TLS, when configured, gates every call; the `Raft` service checks the
/// token on every call too ([`ballast_proto::auth`]).
fn check_join_token(configured: Option<&str>, presented: &str) -> Result<(), ApiError> {
    match configured {
        Some(token) if !ballast_proto::auth::tokens_match(token.as_bytes(), presented.as_bytes()) => {
            Err(ApiError::new(ErrorCode::Unauthenticated, ballast_proto::auth::REFUSED))
        }
        _ => Ok(()),
    }
}

/// Run `$local` on the meta leader, or forward the call to it.
macro_rules! leader_call {
    ($self:ident, $request:ident, $method:ident, |$meta:ident, $msg:ident| $local:expr) => {{
        let hops = hops_of(&$request);
        let $msg = $request.into_inner();
        match $self.route(hops) {
            Err(e) => Err(status_from_api_error(&e)),
            Ok(Route::Remote(addr)) => {
                let mut client = $self.client(&addr)?;
                let mut req = Request::new($msg);
                if let Ok(v) = MetadataValue::try_from((hops + 1).to_string()) {
                    req.metadata_mut().insert(HOPS, v);
                }
                client.$method(req).await
            }
            Ok(Route::Local($meta)) => {
                let r: Result<_, ApiError> = $local.await;
                if let Err(e) = &r {
                    log_refusal(stringify!($method), e);
                }
                r.map(Response::new).map_err(|e| status_from_api_error(&e))
            }
        }
    }};
}

fn log_refusal(what: &str, e: &ApiError) {
    match e.code {
        ErrorCode::Internal => tracing::warn!("admin {what} failed: {e}"),
        _ => tracing::debug!("admin {what} refused: {e}"),
    }
}

async fn propose(meta: &MetaGroup<RocksStore>, cmd: MetaCommand) -> Result<MetaOutcome, ApiError> {
    meta.propose(cmd).await.map_err(api_error)?
}

async fn read_map(meta: &MetaGroup<RocksStore>) -> Result<ClusterMap, ApiError> {
    let map = meta.read_map().await.map_err(api_error)?;
    if !map.is_initialized() {
        return Err(unavailable("the cluster is not initialized: run `ballast cluster init`"));
    }
    Ok(map)
}

/// A node's figures and the replicas its shard leaders are building.
/// A node's figures, the replicas it is building, and the shards it leads.
type StatsAndRebuilds = (NodeStats, Vec<RebuildStream>, Vec<u32>);

/// A `NodeStatsReply` as the node's figures and the replicas it is building.
fn split_stats(m: pb::NodeStatsReply) -> Result<StatsAndRebuilds, ballast_proto::ConvertError> {
    let streams = m.rebuilds.iter().cloned().map(RebuildStream::try_from).collect::<Result<Vec<_>, _>>()?;
    let leading = m.leading.clone();
    Ok((NodeStats::try_from(m)?, streams, leading))
}

fn volume_of(outcome: MetaOutcome) -> Result<VolumeInfo, ApiError> {
    match outcome {
        MetaOutcome::Volume(v) => Ok(v.info()),
        other => Err(internal(format!("unexpected outcome {other:?}"))),
    }
}

impl AdminService {
    pub(crate) fn new(inner: Arc<NodeInner>) -> Self {
        Self { inner, next_seed: AtomicUsize::new(0) }
    }

    fn client(&self, addr: &str) -> Result<AdminClient<tonic::transport::Channel>, Status> {
        let channel = self.inner.channel(addr).map_err(Status::unavailable)?;
        Ok(AdminClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE))
    }

    /// Where a leader-only call runs.
    fn route(&self, hops: u32) -> Result<Route, ApiError> {
        let inner = &self.inner;
        let Some(identity) = inner.identity.get() else {
            return Err(unavailable("this node is not part of a cluster yet: run `ballast cluster init`"));
        };
        let meta = inner.meta.get();
        if let Some(meta) = meta {
            match meta.leader() {
                Some((id, _)) if id == inner.id() => return Ok(Route::Local(meta.clone())),
                Some((_, node)) if hops < MAX_HOPS && !node.addr.is_empty() => return Ok(Route::Remote(node.addr)),
                Some((id, node)) => {
                    let hint = ballast_types::LeaderHint { node: NodeId(id), addr: node.addr };
                    return Err(ApiError::not_leader(Some(hint)));
                }
                // An election, or this node was replaced in the meta group
                // while it was away (its replica hears from no leader): ask
                // the other members.
                None => {}
            }
        }
        let seeds: Vec<&String> =
            identity.seeds.iter().filter(|s| **s != inner.advertise && **s != inner.local_addr.to_string()).collect();
        if hops >= MAX_HOPS || seeds.is_empty() {
            return Err(unavailable(match meta {
                Some(_) => "the meta group has no leader at the moment",
                None => "no meta member reachable from this node",
            }));
        }
        let i = self.next_seed.fetch_add(1, Ordering::Relaxed);
        Ok(Route::Remote(seeds[i % seeds.len()].clone()))
    }

    /// This node as the cluster map records it.
    fn node_info(&self, id: NodeId) -> NodeInfo {
        let inner = &self.inner;
        NodeInfo {
            id,
            addr: inner.advertise.clone(),
            zone: inner.config.zone.clone(),
            up: true,
            disks: inner.disk_infos(),
        }
    }

    /// Take the identity a coordinator assigned during `cluster init`.
    async fn assign(&self, m: pb::AssignIdentityRequest) -> Result<NodeInfo, ApiError> {
        let members: Vec<NodeAddr> =
            m.meta_members.into_iter().map(NodeAddr::try_from).collect::<Result<_, _>>().map_err(ApiError::from)?;
        if m.cluster_id == 0 || m.node_id == 0 || !members.iter().any(|n| n.id.0 == m.node_id) {
            return Err(ApiError::new(ErrorCode::Invalid, "assign: cluster, node and a member list naming it"));
        }
        let id = Identity {
            cluster: ClusterId(m.cluster_id),
            node: NodeId(m.node_id),
            meta: true,
            seeds: members.iter().map(|n| n.addr.clone()).collect(),
        };
        if let Some(have) = self.inner.identity.get() {
            if have.cluster != id.cluster || have.node != id.node {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("{} already belongs to {} as {}", self.inner.advertise, have.cluster, have.node),
                ));
            }
        }
        self.inner.activate(id).await.map_err(|e| unavailable(e.to_string()))?;
        Ok(self.node_info(NodeId(m.node_id)))
    }

    /// Form the cluster: runs on the endpoint that received the call, which
    /// must be one of `endpoints`. It assigns ids 1..=n in endpoint order and
    /// one cluster id, has every endpoint take its identity and start a meta
    /// replica (waiting up to [`INIT_WAIT`] for nodes still starting), forms
    /// the meta group, and has its leader commit the cluster (and the
    /// default pool). Re-running after a partial failure is safe; on an
    /// initialized cluster it answers `ALREADY_EXISTS`.
    async fn init_cluster(&self, req: InitCluster, hops: u32) -> Result<InitClusterReply, ApiError> {
        let inner = &self.inner;
        if let Some(meta) = inner.meta.get() {
            let map = meta.local_map();
            if map.is_initialized() {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("the cluster is already initialized ({})", ClusterId(map.cluster_id)),
                ));
            }
        }
        let local = inner.local_addr.to_string();
        if !req.endpoints.iter().any(|e| *e == inner.advertise || *e == local) {
            return Err(ApiError::new(
                ErrorCode::Invalid,
                format!("send `cluster init` to one of its endpoints; this node is {}", inner.advertise),
            ));
        }
        let cluster = match inner.identity.get() {
            Some(id) => id.cluster,
            None => ClusterId(rand::random::<u64>().max(1)),
        };
        let members: Vec<pb::NodeAddr> =
            req.endpoints.iter().enumerate().map(|(i, e)| pb::NodeAddr { id: i as u64 + 1, addr: e.clone() }).collect();
        let deadline = Instant::now() + INIT_WAIT;
        let assigns = members.iter().map(|m| self.assign_remote(cluster, m.clone(), members.clone(), deadline));
        let nodes: Vec<NodeInfo> = futures::future::try_join_all(assigns).await?;
        let meta = inner.meta.get().cloned().ok_or_else(|| internal("this member has no meta replica"))?;
        let initialized = meta.raft().is_initialized().await.map_err(|e| unavailable(e.to_string()))?;
        if !initialized {
            let voters: BTreeMap<u64, BallastNode> =
                nodes.iter().map(|n| (n.id.0, BallastNode::new(n.addr.clone()))).collect();
            meta.initialize(voters).await.map_err(api_error)?;
        }
        let leader = loop {
            if let Some((id, node)) = meta.leader() {
                break (id, node);
            }
            if Instant::now() > deadline {
                return Err(unavailable("the new meta group elected no leader in time"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let reply_members: Vec<NodeAddr> = nodes.iter().map(|n| NodeAddr { id: n.id, addr: n.addr.clone() }).collect();
        if leader.0 != inner.id() {
            if hops >= MAX_HOPS {
                return Err(ApiError::not_leader(Some(ballast_types::LeaderHint {
                    node: NodeId(leader.0),
                    addr: leader.1.addr,
                })));
            }
            let mut client = self.client(&leader.1.addr).map_err(|s| unavailable(s.message()))?;
            let mut fwd = Request::new(pb::InitClusterRequest::from(req));
            if let Ok(v) = MetadataValue::try_from((hops + 1).to_string()) {
                fwd.metadata_mut().insert(HOPS, v);
            }
            let reply = client.init_cluster(fwd).await.map_err(|s| ballast_proto::ProtoError::from(s).into_api())?;
            return InitClusterReply::try_from(reply.into_inner()).map_err(ApiError::from);
        }
        let cmd = MetaCommand::InitCluster {
            cluster_id: cluster.0,
            default_pool: req.default_pool.as_ref().map(MetaPoolSpec::from),
            nodes: nodes.iter().map(MetaNode::from).collect(),
        };
        propose(&meta, cmd).await?;
        tracing::info!(%cluster, members = nodes.len(), "cluster initialized");
        Ok(InitClusterReply { cluster, members: reply_members })
    }

    /// Assign `member` its identity (locally or by RPC), retrying while the
    /// node is not up yet.
    async fn assign_remote(
        &self,
        cluster: ClusterId,
        member: pb::NodeAddr,
        members: Vec<pb::NodeAddr>,
        deadline: Instant,
    ) -> Result<NodeInfo, ApiError> {
        let req = pb::AssignIdentityRequest {
            cluster_id: cluster.0,
            node_id: member.id,
            meta_members: members,
            join_token: self.inner.config.join_token.clone().unwrap_or_else(|| crate::node::NO_JOIN_TOKEN.into()),
        };
        let local = self.inner.local_addr.to_string();
        if member.addr == self.inner.advertise || member.addr == local {
            return self.assign(req).await;
        }
        loop {
            let mut client = self.client(&member.addr).map_err(|s| unavailable(s.message()))?;
            let err = match client.assign_identity(req.clone()).await {
                Ok(reply) => return NodeInfo::try_from(reply.into_inner()).map_err(ApiError::from),
                Err(s) => ballast_proto::ProtoError::from(s).into_api(),
            };
            if !matches!(err.code, ErrorCode::Unavailable | ErrorCode::Timeout) || Instant::now() > deadline {
                return Err(ApiError::new(err.code, format!("{}: {}", member.addr, err.message)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn join(&self, meta: &MetaGroup<RocksStore>, j: JoinNode) -> Result<JoinNodeReply, ApiError> {
        let map = read_map(meta).await?;
        let cluster = ClusterId(map.cluster_id);
        if let Some(n) = map.nodes.values().find(|n| n.addr == j.addr) {
            // A node that joined before and lost the answer (or restarted
            // without its data): the same address gets the same id.
            return Ok(JoinNodeReply { cluster, node: NodeId(n.id) });
        }
        let id = match j.node {
            Some(id) if map.nodes.contains_key(&id.0) => {
                return Err(ApiError::new(ErrorCode::AlreadyExists, format!("{id} exists with another address")))
            }
            Some(id) => id.0,
            None => map.next_node_id(),
        };
        let info = NodeInfo { id: NodeId(id), addr: j.addr, zone: j.zone, up: true, disks: j.disks };
        propose(meta, MetaCommand::AddNode { node: MetaNode::from(&info) }).await?;
        tracing::info!(node = id, addr = %info.addr, "node joined");
        Ok(JoinNodeReply { cluster, node: NodeId(id) })
    }

    async fn status(&self, meta: &MetaGroup<RocksStore>) -> Result<ClusterStatus, ApiError> {
        let map = read_map(meta).await?;
        let cluster = ClusterId(map.cluster_id);
        let me = self.inner.id();
        let probes = map.nodes.values().map(|n| async move {
            if n.id == me {
                let mine = (
                    self.local_stats(),
                    crate::repair::rebuild_streams(&self.inner),
                    crate::repair::leading(&self.inner),
                );
                return (n.id, (true, Some(mine)));
            }
            (
                n.id,
                tokio::join!(crate::repair::probe(&self.inner, cluster, &n.addr), self.remote_stats(cluster, &n.addr)),
            )
        });
        let answers: BTreeMap<u64, (bool, Option<StatsAndRebuilds>)> =
            futures::future::join_all(probes).await.into_iter().collect();
        // Snapshot progress of each shard's replicas being built, as their
        // leaders report it (log replay alone shows no bytes).
        let mut rebuilding: BTreeMap<u32, RebuildProgress> = BTreeMap::new();
        for (_, streams, _) in answers.values().filter_map(|(_, s)| s.as_ref()) {
            for r in streams.iter().filter(|r| r.snapshot) {
                let joining = map.shards.get(&r.shard.0).is_some_and(|s| s.joining.contains(&r.target.0));
                if joining {
                    let p = rebuilding.entry(r.shard.0).or_default();
                    p.done_bytes = p.done_bytes.saturating_add(r.progress.done_bytes);
                    p.total_bytes = p.total_bytes.saturating_add(r.progress.total_bytes);
                }
            }
        }
        let up: BTreeMap<u64, bool> = answers.iter().map(|(id, (up, _))| (*id, *up)).collect();
        let mut leaders: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (id, (_, s)) in &answers {
            for shard in s.iter().flat_map(|(_, _, leading)| leading) {
                leaders.entry(*shard).or_default().push(*id);
            }
        }
        let mut volume_io: BTreeMap<VolumeId, VolumeIo> =
            map.volumes.keys().map(|v| (VolumeId(*v), VolumeIo::new(VolumeId(*v)))).collect();
        for (stats, _, _) in answers.values().filter_map(|(_, s)| s.as_ref()) {
            for io in &stats.volumes {
                if let Some(sum) = volume_io.get_mut(&io.volume) {
                    sum.add(io);
                }
            }
        }
        let nodes: Vec<NodeInfo> = map
            .nodes
            .values()
            .map(|n| {
                let mut info = n.info();
                let (up, stats) =
                    answers.get(&n.id).map_or((false, None), |(u, s)| (*u, s.as_ref().map(|(s, _, _)| s)));
                info.up = up;
                // Disk use as the node sees it now; the map's figures are as of its join.
                if let Some(s) = stats.filter(|s| !s.disks.is_empty()) {
                    info.disks = s.disks.clone();
                }
                info
            })
            .collect();
        let shards = map
            .shards
            .values()
            .map(|s| {
                let replicas = map.pools.get(&s.pool).map_or(0, |p| p.spec.replicas as usize);
                // Joining voters are being built: not a copy yet.
                let live = s.settled().filter(|v| up.get(v).copied().unwrap_or(false)).count();
                let under_replicated = live < replicas.max(s.voters.len());
                let mut shard = s.info();
                // Who leads now, as the voters answered; the map's hint otherwise.
                if let Some(l) = s.voters.iter().find(|v| leaders.get(&s.id).is_some_and(|ls| ls.contains(v))) {
                    shard.leader = Some(NodeId(*l));
                }
                ShardStatus { shard, under_replicated, rebuilding: rebuilding.get(&s.id).copied() }
            })
            .collect();
        Ok(ClusterStatus {
            cluster,
            protocol_version: PROTOCOL_VERSION,
            map_version: MapVersion(map.version),
            meta_leader: Some(NodeId(me)),
            nodes,
            shards,
            volume_io: volume_io.into_values().collect(),
            scrub: answers.values().filter_map(|(_, s)| s.as_ref().and_then(|(s, _, _)| s.scrub)).collect(),
        })
    }

    /// This node's live figures (`NodeStats`).
    fn local_stats(&self) -> NodeStats {
        let node = NodeId(self.inner.id());
        NodeStats {
            node,
            disks: self.inner.disk_infos(),
            volumes: self.inner.io.snapshot(),
            scrub: Some(self.inner.scrub.report(node)),
        }
    }

    /// On the meta leader: start a scrub pass on every node that answers
    /// (`ScrubNode`); their reports as of the start.
    async fn scrub_all(&self, meta: &MetaGroup<RocksStore>) -> Result<Vec<ScrubReport>, ApiError> {
        let map = read_map(meta).await?;
        let cluster = ClusterId(map.cluster_id);
        let me = self.inner.id();
        let asks = map.nodes.values().map(|n| async move {
            if n.id == me {
                return Some(self.inner.scrub.start_now(NodeId(me)));
            }
            let mut client = self.client(&n.addr).ok()?;
            let call = client.scrub_node(pb::ScrubRequest { cluster_id: cluster.0 });
            match tokio::time::timeout(PROBE_TIMEOUT, call).await {
                Ok(Ok(r)) => match Vec::<ScrubReport>::try_from(r.into_inner()) {
                    Ok(v) => v.into_iter().next(),
                    Err(e) => {
                        tracing::warn!(addr = %n.addr, "malformed scrub reply: {e}");
                        None
                    }
                },
                Ok(Err(e)) => {
                    tracing::info!(addr = %n.addr, "scrub not started there: {}", e.message());
                    None
                }
                Err(_) => None,
            }
        });
        let reports: Vec<ScrubReport> = futures::future::join_all(asks).await.into_iter().flatten().collect();
        tracing::info!(nodes = reports.len(), "scrub pass requested");
        Ok(reports)
    }

    /// The live figures of the node at `addr`, with the replicas its shard
    /// leaders are building, if it answers in time.
    async fn remote_stats(&self, cluster: ClusterId, addr: &str) -> Option<StatsAndRebuilds> {
        let mut client = self.client(addr).ok()?;
        let call = client.node_stats(pb::NodeStatsRequest { cluster_id: cluster.0 });
        match tokio::time::timeout(PROBE_TIMEOUT, call).await {
            Ok(Ok(r)) => match split_stats(r.into_inner()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(%addr, "malformed node stats: {e}");
                    None
                }
            },
            Ok(Err(e)) => {
                tracing::debug!(%addr, "node stats: {}", e.message());
                None
            }
            Err(_) => None,
        }
    }

    async fn delete(&self, meta: &MetaGroup<RocksStore>, name: String) -> Result<pb::Empty, ApiError> {
        let v = volume_of(propose(meta, MetaCommand::DeleteVolume { name: name.clone() }).await?)?;
        self.inner.map.want_refresh();
        let deadline = Instant::now() + DELETE_WAIT;
        while meta.local_map().deleted.contains_key(&v.id.0) {
            if Instant::now() > deadline {
                tracing::warn!(volume = %name, "deleted; its blocks are still being freed in the background");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(pb::Empty {})
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn init_cluster(
        &self,
        request: Request<pb::InitClusterRequest>,
    ) -> Result<Response<pb::InitClusterReply>, Status> {
        let hops = hops_of(&request);
        let r = match InitCluster::try_from(request.into_inner()) {
            Ok(req) => AdminService::init_cluster(self, req, hops).await,
            Err(e) => Err(ApiError::from(e)),
        };
        if let Err(e) = &r {
            tracing::warn!("cluster init: {e}");
        }
        r.map(|x| Response::new(x.into())).map_err(|e| status_from_api_error(&e))
    }

    async fn assign_identity(&self, request: Request<pb::AssignIdentityRequest>) -> Result<Response<pb::Node>, Status> {
        let msg = request.into_inner();
        if let Err(e) = check_join_token(self.inner.config.join_token.as_deref(), &msg.join_token) {
            tracing::warn!("cluster init refused: {e}");
            return Err(status_from_api_error(&e));
        }
        self.assign(msg).await.map(|n| Response::new(n.into())).map_err(|e| status_from_api_error(&e))
    }

    async fn join_node(&self, request: Request<pb::JoinNodeRequest>) -> Result<Response<pb::JoinNodeReply>, Status> {
        leader_call!(self, request, join_node, |meta, msg| async move {
            let j = JoinNode::try_from(msg).map_err(ApiError::from)?;
            if let Err(e) = check_join_token(self.inner.config.join_token.as_deref(), &j.token) {
                tracing::warn!(addr = %j.addr, "join refused: {e}");
                return Err(e);
            }
            self.join(&meta, j).await.map(pb::JoinNodeReply::from)
        })
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        leader_call!(self, request, cluster_status, |meta, _msg| async move {
            self.status(&meta).await.map(pb::ClusterStatusReply::from)
        })
    }

    async fn create_pool(&self, request: Request<pb::CreatePoolRequest>) -> Result<Response<pb::PoolReply>, Status> {
        leader_call!(self, request, create_pool, |meta, msg| async move {
            let spec = PoolSpec::try_from(msg).map_err(ApiError::from)?;
            match propose(&meta, MetaCommand::CreatePool { spec: MetaPoolSpec::from(&spec) }).await? {
                MetaOutcome::Pool(p) => {
                    self.inner.map.want_refresh();
                    Ok(pb::PoolReply::from(p.info()))
                }
                other => Err(internal(format!("unexpected outcome {other:?}"))),
            }
        })
    }

    async fn list_pools(&self, request: Request<pb::ListPoolsRequest>) -> Result<Response<pb::ListPoolsReply>, Status> {
        leader_call!(self, request, list_pools, |meta, _msg| async move {
            let map = read_map(&meta).await?;
            Ok(pb::ListPoolsReply::from(map.pools.values().map(|p| p.info()).collect::<Vec<PoolInfo>>()))
        })
    }

    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::VolumeReply>, Status> {
        leader_call!(self, request, create_volume, |meta, msg| async move {
            let c = CreateVolume::try_from(msg).map_err(ApiError::from)?;
            let cmd = MetaCommand::CreateVolume { name: c.name, size: c.size, pool: c.pool };
            volume_of(propose(&meta, cmd).await?).map(pb::VolumeReply::from)
        })
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesReply>, Status> {
        leader_call!(self, request, list_volumes, |meta, _msg| async move {
            let map = read_map(&meta).await?;
            Ok(pb::ListVolumesReply::from(map.volumes.values().map(|v| v.info()).collect::<Vec<VolumeInfo>>()))
        })
    }

    async fn get_volume(&self, request: Request<pb::VolumeByName>) -> Result<Response<pb::VolumeReply>, Status> {
        leader_call!(self, request, get_volume, |meta, msg| async move {
            let name = String::try_from(msg).map_err(ApiError::from)?;
            let map = read_map(&meta).await?;
            let v = map
                .volume_by_name(&name)
                .ok_or_else(|| ApiError::new(ErrorCode::NoSuchVolume, format!("no volume {name:?}")))?;
            Ok(pb::VolumeReply::from(v.info()))
        })
    }

    async fn resize_volume(
        &self,
        request: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::VolumeReply>, Status> {
        leader_call!(self, request, resize_volume, |meta, msg| async move {
            let r = ResizeVolume::try_from(msg).map_err(ApiError::from)?;
            let cmd = MetaCommand::ResizeVolume { name: r.name, size: r.size };
            volume_of(propose(&meta, cmd).await?).map(pb::VolumeReply::from)
        })
    }

    async fn delete_volume(&self, request: Request<pb::VolumeByName>) -> Result<Response<pb::Empty>, Status> {
        leader_call!(self, request, delete_volume, |meta, msg| async move {
            let name = String::try_from(msg).map_err(ApiError::from)?;
            self.delete(&meta, name).await
        })
    }

    async fn attach_volume(
        &self,
        request: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::AttachVolumeReply>, Status> {
        leader_call!(self, request, attach_volume, |meta, msg| async move {
            let a = AttachVolume::try_from(msg).map_err(ApiError::from)?;
            let cmd = MetaCommand::Attach { name: a.name, read_only: a.read_only, force: a.force };
            let outcome = propose(&meta, cmd).await?;
            let attachment = outcome.attachment().ok_or_else(|| internal(format!("unexpected outcome {outcome:?}")))?;
            Ok(pb::AttachVolumeReply::from(attachment))
        })
    }

    async fn detach_volume(&self, request: Request<pb::DetachVolumeRequest>) -> Result<Response<pb::Empty>, Status> {
        leader_call!(self, request, detach_volume, |meta, msg| async move {
            let d = DetachVolume::try_from(msg).map_err(ApiError::from)?;
            propose(&meta, MetaCommand::Detach { name: d.name, epoch: d.epoch.map(|e| e.0) }).await?;
            Ok(pb::Empty {})
        })
    }

    async fn drain_node(&self, request: Request<pb::NodeRef>) -> Result<Response<pb::Empty>, Status> {
        leader_call!(self, request, drain_node, |meta, msg| async move {
            propose(&meta, MetaCommand::DrainNode { node: msg.node_id }).await?;
            tracing::info!(node = msg.node_id, "draining: its replicas move to other nodes");
            self.inner.map.want_refresh();
            Ok(pb::Empty {})
        })
    }

    async fn remove_node(&self, request: Request<pb::NodeRef>) -> Result<Response<pb::Empty>, Status> {
        leader_call!(self, request, remove_node, |meta, msg| async move {
            if meta.group().membership().voters.contains(&msg.node_id) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "{} is a voter of the meta group: it can be removed once it is down and replaced",
                        NodeId(msg.node_id)
                    ),
                ));
            }
            propose(&meta, MetaCommand::RemoveNode { node: msg.node_id }).await?;
            tracing::info!(node = msg.node_id, "node removed from the cluster");
            self.inner.map.want_refresh();
            Ok(pb::Empty {})
        })
    }

    async fn shard_moved(&self, request: Request<pb::ShardMovedRequest>) -> Result<Response<pb::Empty>, Status> {
        leader_call!(self, request, shard_moved, |meta, msg| async move {
            let cmd = MetaCommand::ShardMoved { shard: msg.shard, voters: msg.voters };
            propose(&meta, cmd).await?;
            tracing::info!(shard = %ballast_types::ShardId(msg.shard), "shard rebuilt: its new replicas are complete");
            Ok(pb::Empty {})
        })
    }

    async fn scrub(&self, request: Request<pb::ScrubRequest>) -> Result<Response<pb::ScrubReply>, Status> {
        leader_call!(
            self,
            request,
            scrub,
            |meta, _msg| async move { self.scrub_all(&meta).await.map(pb::ScrubReply::from) }
        )
    }

    /// Answered by this node itself: start a pass here, never forwarded.
    async fn scrub_node(&self, request: Request<pb::ScrubRequest>) -> Result<Response<pb::ScrubReply>, Status> {
        let asked = ClusterId(request.into_inner().cluster_id);
        match self.inner.identity.get() {
            None => Err(status_from_api_error(&unavailable("this node is not part of a cluster yet"))),
            Some(id) if id.cluster != asked => Err(status_from_api_error(&ApiError::new(
                ErrorCode::Conflict,
                format!("this node belongs to {}, not {asked}", id.cluster),
            ))),
            Some(id) => Ok(Response::new(pb::ScrubReply::from(vec![self.inner.scrub.start_now(id.node)]))),
        }
    }

    /// Answered by this node itself: its own figures, never forwarded.
    async fn node_stats(&self, request: Request<pb::NodeStatsRequest>) -> Result<Response<pb::NodeStatsReply>, Status> {
        let asked = ClusterId(request.into_inner().cluster_id);
        match self.inner.identity.get() {
            None => Err(status_from_api_error(&unavailable("this node is not part of a cluster yet"))),
            Some(id) if id.cluster != asked => Err(status_from_api_error(&ApiError::new(
                ErrorCode::Conflict,
                format!("this node belongs to {}, not {asked}", id.cluster),
            ))),
            Some(_) => {
                let mut reply = pb::NodeStatsReply::from(self.local_stats());
                reply.rebuilds = crate::repair::rebuild_streams(&self.inner).into_iter().map(Into::into).collect();
                reply.leading = crate::repair::leading(&self.inner);
                Ok(Response::new(reply))
            }
        }
    }

    /// Answered by this node itself (meta member replacement), never forwarded.
    async fn join_meta(&self, request: Request<pb::JoinMetaRequest>) -> Result<Response<pb::Empty>, Status> {
        match crate::repair::join_meta(&self.inner, request.into_inner()).await {
            Ok(()) => Ok(Response::new(pb::Empty {})),
            Err(e) => {
                log_refusal("join meta", &e);
                Err(status_from_api_error(&e))
            }
        }
    }

    /// Answered by this node itself (leader balancing), never forwarded.
    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        match crate::repair::transfer_leader(&self.inner, request.into_inner()).await {
            Ok(()) => Ok(Response::new(pb::Empty {})),
            Err(e) => {
                log_refusal("transfer leader", &e);
                Err(status_from_api_error(&e))
            }
        }
    }

    async fn get_placement(
        &self,
        request: Request<pb::GetPlacementRequest>,
    ) -> Result<Response<pb::GetPlacementReply>, Status> {
        leader_call!(self, request, get_placement, |meta, msg| async move {
            let have = MapVersion::from(msg);
            let map = read_map(&meta).await?;
            let placement = (have.0 != map.version).then(|| map.placement());
            Ok(pb::GetPlacementReply::from(PlacementReply { cluster: ClusterId(map.cluster_id), map: placement }))
        })
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn a_configured_join_token_must_be_presented_exactly() {
        assert!(check_join_token(None, "anything").is_ok());
        assert!(check_join_token(Some("s3cret"), "s3cret").is_ok());
        for wrong in ["", "s3cre", "s3cret!", "S3cret", crate::node::NO_JOIN_TOKEN] {
            let e = check_join_token(Some("s3cret"), wrong).expect_err(wrong);
            assert_eq!(e.code, ErrorCode::Unauthenticated);
            assert_eq!(e.message, "join token missing or wrong");
        }
    }
}

//! The cluster map and the commands that change it: a deterministic
//! `apply(command) -> Result<outcome, ApiError>` over an in-memory struct,
//! with no I/O. The meta group's state machine is this plus persistence.
//!
//! Every replica applies the same commands in the same order and so holds the
//! same map: `apply` reads nothing but the map and the command (the cluster
//! id and anything random are chosen by the proposer and carried in the
//! command). A successful change bumps `version`; a refused command changes
//! nothing. The types here are serde mirrors of `ballast-types`' domain
//! types (which have no serde), converted at the edge.

use std::collections::{BTreeMap, BTreeSet};

use ballast_types::{
    validate_name, validate_volume_size, ApiError, Attachment, ClusterId, DiskInfo, Epoch, ErrorCode, FailureDomain,
    MapVersion, NodeId, NodeInfo, PlacementMap, PoolId, PoolInfo, PoolSpec, ShardId, ShardInfo, VolumeId, VolumeInfo,
    DEFAULT_CHUNK_SIZE, MAX_REPLICAS,
};
use serde::{Deserialize, Serialize};

use super::placement::{self, Load, NodeSlot, PlacementRule};

/// A node as the map records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNode {
    pub id: u64,
    pub addr: String,
    pub zone: Option<String>,
    pub up: bool,
    /// `(path, capacity, used)` per disk.
    pub disks: Vec<(String, u64, u64)>,
    /// Being drained: takes no new replicas, and its replicas move to
    /// other nodes (`ballast node drain`).
    pub draining: bool,
}

impl From<&NodeInfo> for MetaNode {
    fn from(n: &NodeInfo) -> Self {
        Self {
            id: n.id.0,
            addr: n.addr.clone(),
            zone: n.zone.clone(),
            up: n.up,
            disks: n.disks.iter().map(|d| (d.path.clone(), d.capacity, d.used)).collect(),
            draining: false,
        }
    }
}

impl MetaNode {
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            id: NodeId(self.id),
            addr: self.addr.clone(),
            zone: self.zone.clone(),
            up: self.up,
            disks: self.disks.iter().map(|(p, c, u)| DiskInfo { path: p.clone(), capacity: *c, used: *u }).collect(),
        }
    }
}

/// A pool's spec: `PoolSpec` with serde.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaPoolSpec {
    pub name: String,
    pub replicas: u32,
    pub shards: u32,
    /// `true`: replicas on distinct zones ([`FailureDomain::Zone`]).
    pub zone_domain: bool,
}

impl From<&PoolSpec> for MetaPoolSpec {
    fn from(s: &PoolSpec) -> Self {
        Self {
            name: s.name.clone(),
            replicas: s.replicas,
            shards: s.shards,
            zone_domain: s.failure_domain == FailureDomain::Zone,
        }
    }
}

impl MetaPoolSpec {
    pub fn spec(&self) -> PoolSpec {
        PoolSpec {
            name: self.name.clone(),
            replicas: self.replicas,
            shards: self.shards,
            failure_domain: if self.zone_domain { FailureDomain::Zone } else { FailureDomain::Node },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaPool {
    pub id: u32,
    pub spec: MetaPoolSpec,
    pub first_shard: u32,
}

impl MetaPool {
    pub fn info(&self) -> PoolInfo {
        PoolInfo { id: PoolId(self.id), spec: self.spec.spec(), first_shard: ShardId(self.first_shard) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaVolume {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub pool: u32,
    pub chunk_size: u64,
    /// The current attach epoch (0: never attached read-write).
    pub epoch: u64,
    /// Whether the holder of `epoch` is still attached read-write.
    pub writer: bool,
    /// Live read-only attachments.
    pub readers: u32,
}

impl MetaVolume {
    pub fn info(&self) -> VolumeInfo {
        VolumeInfo {
            id: VolumeId(self.id),
            name: self.name.clone(),
            size: self.size,
            pool: PoolId(self.pool),
            chunk_size: self.chunk_size,
            epoch: Epoch(self.epoch),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaShard {
    pub id: u32,
    pub pool: u32,
    /// The voters the group must have: the shard's leader converges the
    /// group's membership to them.
    pub voters: Vec<u64>,
    pub leader: Option<u64>,
    /// Voters not yet made voters by the group (being built); see
    /// [`ShardInfo::joining`]. Never all of `voters`.
    pub joining: Vec<u64>,
}

impl MetaShard {
    pub fn info(&self) -> ShardInfo {
        ShardInfo {
            id: ShardId(self.id),
            pool: PoolId(self.pool),
            voters: self.voters.iter().map(|v| NodeId(*v)).collect(),
            leader: self.leader.map(NodeId),
            joining: self.joining.iter().map(|v| NodeId(*v)).collect(),
        }
    }

    /// Voters holding a complete replica.
    pub fn settled(&self) -> impl Iterator<Item = u64> + '_ {
        self.voters.iter().copied().filter(|v| !self.joining.contains(v))
    }
}

/// Everything the meta group owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// 0 until `InitCluster`.
    pub cluster_id: u64,
    /// Bumped by every change; 0 = nothing yet.
    pub version: u64,
    pub nodes: BTreeMap<u64, MetaNode>,
    pub pools: BTreeMap<u32, MetaPool>,
    pub volumes: BTreeMap<u64, MetaVolume>,
    pub shards: BTreeMap<u32, MetaShard>,
    /// Deleted volumes whose blocks some shard may still hold: volume id →
    /// pool id. The meta leader purges them from every shard of the pool and
    /// then forgets them ([`MetaCommand::ForgetVolume`]).
    pub deleted: BTreeMap<u64, u32>,
    /// Next ids to hand out (never reused).
    pub next_pool: u32,
    pub next_shard: u32,
    pub next_volume: u64,
    /// The highest node id ever added. A removed node's id is never given
    /// again: shard groups may still list it (a learner of a move cut
    /// short), and Raft must never take a new node for an old one.
    pub last_node: u64,
}

/// [`ClusterMap`] as stored before `last_node`; read only, to load data
/// written then.
#[derive(Deserialize)]
pub(crate) struct ClusterMapV1 {
    cluster_id: u64,
    version: u64,
    nodes: BTreeMap<u64, MetaNode>,
    pools: BTreeMap<u32, MetaPool>,
    volumes: BTreeMap<u64, MetaVolume>,
    shards: BTreeMap<u32, MetaShard>,
    deleted: BTreeMap<u64, u32>,
    next_pool: u32,
    next_shard: u32,
    next_volume: u64,
}

impl From<ClusterMapV1> for ClusterMap {
    fn from(m: ClusterMapV1) -> Self {
        let last_node = m.nodes.keys().max().copied().unwrap_or(0);
        Self {
            cluster_id: m.cluster_id,
            version: m.version,
            nodes: m.nodes,
            pools: m.pools,
            volumes: m.volumes,
            shards: m.shards,
            deleted: m.deleted,
            next_pool: m.next_pool,
            next_shard: m.next_shard,
            next_volume: m.next_volume,
            last_node,
        }
    }
}

/// What [`ClusterMap::repair_moves`] proposes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairPlan {
    /// `(shard, voters once repaired)`, for `MetaCommand::MoveShard`.
    pub moves: Vec<(u32, Vec<u64>)>,
    /// `(shard, why)`: shards that cannot be repaired now.
    pub stuck: Vec<(u32, String)>,
}

/// A change to the cluster map, as replicated through the meta group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Create the cluster (once). `cluster_id` is chosen by the proposer.
    InitCluster {
        cluster_id: u64,
        default_pool: Option<MetaPoolSpec>,
        nodes: Vec<MetaNode>,
    },
    AddNode {
        node: MetaNode,
    },
    SetNodeState {
        node: u64,
        up: bool,
    },
    CreatePool {
        spec: MetaPoolSpec,
    },
    CreateVolume {
        name: String,
        size: u64,
        pool: String,
    },
    /// Grow only.
    ResizeVolume {
        name: String,
        size: u64,
    },
    /// Refused while attached read-write.
    DeleteVolume {
        name: String,
    },
    /// Read-write attaches bump the epoch; a second one needs `force`.
    Attach {
        name: String,
        read_only: bool,
        force: bool,
    },
    /// Every shard of the deleted volume's pool has dropped its blocks.
    ForgetVolume {
        id: u64,
    },
    /// `epoch`: the read-write attachment released; `None` for a read-only one.
    Detach {
        name: String,
        epoch: Option<u64>,
    },
    /// Record a shard's voters after a membership change (and a leader hint).
    UpdateShardVoters {
        shard: u32,
        voters: Vec<u64>,
        leader: Option<u64>,
    },
    /// Give a shard new voters (a rebuild after node loss, a drain, a
    /// rebalance). At least one current settled voter must stay; the new
    /// ones become `joining` until the shard's leader has made them voters
    /// and reports it with [`MetaCommand::ShardMoved`].
    MoveShard {
        shard: u32,
        voters: Vec<u64>,
    },
    /// The shard's group now has exactly `voters` as voters: its joining
    /// replicas are complete. Refused (`CONFLICT`) when the map's voters
    /// have changed since.
    ShardMoved {
        shard: u32,
        voters: Vec<u64>,
    },
    /// Move every replica off `node` and place none there (until it is
    /// removed). Idempotent.
    DrainNode {
        node: u64,
    },
    /// Forget `node`. Refused (`CONFLICT`) while any shard lists it as a
    /// voter: drain it first (or let a down node's replicas be rebuilt).
    RemoveNode {
        node: u64,
    },
}

/// What a successful command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOutcome {
    Done,
    Cluster {
        cluster_id: u64,
    },
    Pool(MetaPool),
    Volume(MetaVolume),
    /// Send `epoch` on every write (read-only: the current epoch, informational).
    Attached {
        volume: MetaVolume,
        epoch: u64,
    },
}

impl MetaOutcome {
    /// The domain form of an `Attached` outcome.
    pub fn attachment(&self) -> Option<Attachment> {
        match self {
            Self::Attached { volume, epoch } => Some(Attachment { volume: volume.info(), epoch: Epoch(*epoch) }),
            _ => None,
        }
    }
}

/// The replicated answer to a command: the outcome or the typed refusal,
/// with the map version after applying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaReply {
    pub version: u64,
    pub result: Result<MetaOutcome, MetaFailure>,
}

impl MetaReply {
    pub fn into_result(self) -> Result<MetaOutcome, ApiError> {
        self.result.map_err(|f| {
            let mut e = f.into_api();
            e.map_version = Some(MapVersion(self.version));
            e
        })
    }
}

/// `ApiError` with serde: the code as its index in [`ErrorCode::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaFailure {
    pub code: u8,
    pub message: String,
}

impl MetaFailure {
    pub fn from_api(e: &ApiError) -> Self {
        let code = ErrorCode::ALL.iter().position(|c| *c == e.code).unwrap_or(ErrorCode::ALL.len() - 1);
        Self { code: code as u8, message: e.message.clone() }
    }

    pub fn into_api(self) -> ApiError {
        let code = ErrorCode::ALL.get(self.code as usize).copied().unwrap_or(ErrorCode::Unknown);
        ApiError::new(code, self.message)
    }
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

impl ClusterMap {
    pub fn is_initialized(&self) -> bool {
        self.cluster_id != 0
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&MetaVolume> {
        self.volumes.values().find(|v| v.name == name)
    }

    fn volume_id(&self, name: &str) -> Result<u64, ApiError> {
        self.volume_by_name(name)
            .map(|v| v.id)
            .ok_or_else(|| err(ErrorCode::NoSuchVolume, format!("no volume {name:?}")))
    }

    pub fn pool_by_name(&self, name: &str) -> Option<&MetaPool> {
        self.pools.values().find(|p| p.spec.name == name)
    }

    /// Placement's view of the nodes.
    pub fn node_slots(&self) -> Vec<NodeSlot> {
        self.nodes
            .values()
            .map(|n| NodeSlot {
                id: NodeId(n.id),
                zone: n.zone.clone(),
                up: n.up && !n.draining,
                disks: n.disks.len() as u32,
            })
            .collect()
    }

    pub fn shard_infos(&self) -> BTreeMap<ShardId, ShardInfo> {
        self.shards.values().map(|s| (ShardId(s.id), s.info())).collect()
    }

    pub fn pool_infos(&self) -> BTreeMap<PoolId, PoolInfo> {
        self.pools.values().map(|p| (PoolId(p.id), p.info())).collect()
    }

    /// The scheduler's repair plan for the nodes in `down` (see [`placement::plan_repair`]).
    pub fn plan_repair(&self, down: &BTreeSet<NodeId>) -> Vec<placement::Action> {
        placement::plan_repair(&self.node_slots(), &self.pool_infos(), &self.shard_infos(), down)
    }

    /// What clients route with.
    pub fn placement(&self) -> PlacementMap {
        PlacementMap {
            version: MapVersion(self.version),
            pools: self.pool_infos(),
            volumes: self.volumes.values().map(|v| (VolumeId(v.id), v.info())).collect(),
            shards: self.shard_infos(),
            nodes: self.nodes.values().map(|n| (NodeId(n.id), n.addr.clone())).collect(),
        }
    }

    pub fn node_infos(&self) -> Vec<NodeInfo> {
        self.nodes.values().map(MetaNode::info).collect()
    }

    /// Apply `cmd`; on success the map changed (and `version` grew) unless the
    /// command was a no-op. On error the map is unchanged.
    pub fn apply(&mut self, cmd: &MetaCommand) -> Result<MetaOutcome, ApiError> {
        // Work on a copy so a refusal half-way leaves nothing behind. The map
        // is small (thousands of entries at most) and meta commands are rare.
        let mut next = self.clone();
        let out = next.apply_inner(cmd)?;
        if next != *self {
            next.version += 1;
            *self = next;
        }
        Ok(out)
    }

    fn apply_inner(&mut self, cmd: &MetaCommand) -> Result<MetaOutcome, ApiError> {
        if !self.is_initialized() && !matches!(cmd, MetaCommand::InitCluster { .. }) {
            return Err(err(ErrorCode::Unavailable, "the cluster is not initialized"));
        }
        match cmd {
            MetaCommand::InitCluster { cluster_id, default_pool, nodes } => {
                if self.is_initialized() {
                    return if self.cluster_id == *cluster_id {
                        Ok(MetaOutcome::Cluster { cluster_id: *cluster_id })
                    } else {
                        Err(err(ErrorCode::AlreadyExists, format!("already {}", ClusterId(self.cluster_id))))
                    };
                }
                if *cluster_id == 0 {
                    return Err(err(ErrorCode::Invalid, "cluster id 0"));
                }
                self.cluster_id = *cluster_id;
                for n in nodes {
                    self.add_node(n)?;
                }
                if let Some(spec) = default_pool {
                    self.create_pool(spec)?;
                }
                Ok(MetaOutcome::Cluster { cluster_id: *cluster_id })
            }
            MetaCommand::AddNode { node } => {
                if node.id <= self.last_node && !self.nodes.contains_key(&node.id) {
                    let e = format!("{} belonged to a node since removed; ids are never reused", NodeId(node.id));
                    return Err(err(ErrorCode::AlreadyExists, e));
                }
                self.add_node(node)?;
                Ok(MetaOutcome::Done)
            }
            MetaCommand::SetNodeState { node, up } => {
                let n = self
                    .nodes
                    .get_mut(node)
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("no {}", NodeId(*node))))?;
                n.up = *up;
                Ok(MetaOutcome::Done)
            }
            MetaCommand::CreatePool { spec } => self.create_pool(spec).map(MetaOutcome::Pool),
            MetaCommand::CreateVolume { name, size, pool } => {
                validate_name(name)?;
                validate_volume_size(*size)?;
                if self.volume_by_name(name).is_some() {
                    return Err(err(ErrorCode::AlreadyExists, format!("volume {name:?} exists")));
                }
                let pool =
                    self.pool_by_name(pool).ok_or_else(|| err(ErrorCode::NotFound, format!("no pool {pool:?}")))?.id;
                self.next_volume += 1;
                let v = MetaVolume {
                    id: self.next_volume,
                    name: name.clone(),
                    size: *size,
                    pool,
                    chunk_size: DEFAULT_CHUNK_SIZE,
                    epoch: 0,
                    writer: false,
                    readers: 0,
                };
                self.volumes.insert(v.id, v.clone());
                Ok(MetaOutcome::Volume(v))
            }
            MetaCommand::ResizeVolume { name, size } => {
                validate_volume_size(*size)?;
                let id = self.volume_id(name)?;
                let v = self.volumes.get_mut(&id).ok_or_else(|| err(ErrorCode::Internal, "volume index"))?;
                if *size < v.size {
                    return Err(err(ErrorCode::Invalid, format!("volumes only grow: {} < {}", size, v.size)));
                }
                v.size = *size;
                Ok(MetaOutcome::Volume(v.clone()))
            }
            MetaCommand::DeleteVolume { name } => {
                let id = self.volume_id(name)?;
                if self.volumes[&id].writer {
                    return Err(err(ErrorCode::Conflict, format!("volume {name:?} is attached read-write")));
                }
                let v = self.volumes.remove(&id).ok_or_else(|| err(ErrorCode::Internal, "volume index"))?;
                self.deleted.insert(v.id, v.pool);
                Ok(MetaOutcome::Volume(v))
            }
            MetaCommand::ForgetVolume { id } => {
                self.deleted.remove(id);
                Ok(MetaOutcome::Done)
            }
            MetaCommand::Attach { name, read_only, force } => {
                let id = self.volume_id(name)?;
                let v = self.volumes.get_mut(&id).ok_or_else(|| err(ErrorCode::Internal, "volume index"))?;
                if *read_only {
                    v.readers = v.readers.saturating_add(1);
                } else {
                    if v.writer && !force {
                        return Err(err(
                            ErrorCode::Conflict,
                            format!("volume {name:?} is attached read-write (epoch {}); force to take over", v.epoch),
                        ));
                    }
                    v.epoch += 1;
                    v.writer = true;
                }
                Ok(MetaOutcome::Attached { volume: v.clone(), epoch: v.epoch })
            }
            MetaCommand::Detach { name, epoch } => {
                let id = self.volume_id(name)?;
                let v = self.volumes.get_mut(&id).ok_or_else(|| err(ErrorCode::Internal, "volume index"))?;
                match epoch {
                    None => v.readers = v.readers.saturating_sub(1),
                    Some(e) if *e == v.epoch => v.writer = false,
                    // A fenced writer letting go: the volume has moved on.
                    Some(e) => {
                        return Err(err(ErrorCode::Fenced, format!("epoch {e} was replaced by {}", v.epoch)));
                    }
                }
                Ok(MetaOutcome::Done)
            }
            MetaCommand::UpdateShardVoters { shard, voters, leader } => {
                let distinct: BTreeSet<_> = voters.iter().collect();
                if voters.is_empty() || voters.len() > MAX_REPLICAS as usize || distinct.len() != voters.len() {
                    return Err(err(ErrorCode::Invalid, "a shard has 1..=5 distinct voters"));
                }
                if let Some(n) = voters.iter().find(|n| !self.nodes.contains_key(n)) {
                    return Err(err(ErrorCode::NotFound, format!("no {}", NodeId(*n))));
                }
                if leader.is_some_and(|l| !voters.contains(&l)) {
                    return Err(err(ErrorCode::Invalid, "the leader hint is not a voter"));
                }
                let s = self
                    .shards
                    .get_mut(shard)
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("no {}", ShardId(*shard))))?;
                s.voters = voters.clone();
                s.leader = *leader;
                s.joining.clear();
                Ok(MetaOutcome::Done)
            }
            MetaCommand::MoveShard { shard, voters } => self.move_shard(*shard, voters),
            MetaCommand::DrainNode { node } => {
                let n = self
                    .nodes
                    .get_mut(node)
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("no {}", NodeId(*node))))?;
                n.draining = true;
                Ok(MetaOutcome::Done)
            }
            MetaCommand::RemoveNode { node } => {
                if !self.nodes.contains_key(node) {
                    return Ok(MetaOutcome::Done);
                }
                let holds: Vec<String> = self
                    .shards
                    .values()
                    .filter(|s| s.voters.contains(node))
                    .map(|s| ShardId(s.id).to_string())
                    .collect();
                if !holds.is_empty() {
                    return Err(err(
                        ErrorCode::Conflict,
                        format!("{} still holds replicas of {}: drain it first", NodeId(*node), holds.join(", ")),
                    ));
                }
                self.nodes.remove(node);
                Ok(MetaOutcome::Done)
            }
            MetaCommand::ShardMoved { shard, voters } => {
                let s = self
                    .shards
                    .get_mut(shard)
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("no {}", ShardId(*shard))))?;
                let (have, told): (BTreeSet<_>, BTreeSet<_>) = (s.voters.iter().collect(), voters.iter().collect());
                if have != told {
                    return Err(err(ErrorCode::Conflict, format!("{} has other voters now", ShardId(*shard))));
                }
                s.joining.clear();
                Ok(MetaOutcome::Done)
            }
        }
    }

    fn move_shard(&mut self, shard: u32, voters: &[u64]) -> Result<MetaOutcome, ApiError> {
        let distinct: BTreeSet<_> = voters.iter().collect();
        if voters.is_empty() || voters.len() > MAX_REPLICAS as usize || distinct.len() != voters.len() {
            return Err(err(ErrorCode::Invalid, "a shard has 1..=5 distinct voters"));
        }
        if let Some(n) = voters.iter().find(|n| !self.nodes.contains_key(n)) {
            return Err(err(ErrorCode::NotFound, format!("no {}", NodeId(*n))));
        }
        let s =
            self.shards.get_mut(&shard).ok_or_else(|| err(ErrorCode::NotFound, format!("no {}", ShardId(shard))))?;
        if distinct == s.voters.iter().collect() {
            return Ok(MetaOutcome::Done);
        }
        let settled: Vec<u64> = s.settled().collect();
        // Settled voters first: a replica that may hold no data is never the
        // one a new group would be formed on.
        let (mut next, new): (Vec<u64>, Vec<u64>) = voters.iter().partition(|v| settled.contains(v));
        if next.is_empty() {
            return Err(err(
                ErrorCode::Invalid,
                format!("{} must keep one of its complete replicas on {:?}", ShardId(shard), settled),
            ));
        }
        next.extend(new.iter().copied());
        s.joining = new;
        if s.leader.is_some_and(|l| !next.contains(&l) || s.joining.contains(&l)) {
            s.leader = None;
        }
        s.voters = next;
        Ok(MetaOutcome::Done)
    }

    /// The moves that replace every voter on a node marked down: for each
    /// affected shard, its voters once repaired. Shards no eligible node can
    /// take are left out and returned as stuck.
    pub fn repair_moves(&self) -> RepairPlan {
        let down: BTreeSet<NodeId> =
            self.nodes.values().filter(|n| !n.up || n.draining).map(|n| NodeId(n.id)).collect();
        let mut moves: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut stuck = Vec::new();
        if down.is_empty() {
            return RepairPlan::default();
        }
        for action in self.plan_repair(&down) {
            match action {
                placement::Action::Promote { shard, voters, .. } => {
                    moves.insert(shard.0, voters.iter().map(|v| v.0).collect());
                }
                placement::Action::Stuck { shard, reason } => stuck.push((shard.0, reason.to_string())),
                _ => {}
            }
        }
        // A shard whose every settled voter is down cannot be rebuilt from
        // anything: leave it for a node to come back.
        let moves = moves
            .into_iter()
            .filter(|(shard, voters)| {
                let ok = self.shards.get(shard).is_some_and(|s| s.settled().any(|v| voters.contains(&v)));
                if !ok {
                    stuck.push((*shard, "every complete replica is on a node that is down".to_string()));
                }
                ok
            })
            .collect();
        RepairPlan { moves, stuck }
    }

    /// Shards whose voters are changing now (a repair, a drain or a
    /// rebalance in flight).
    pub fn moves_in_flight(&self) -> usize {
        self.shards.values().filter(|s| !s.joining.is_empty()).count()
    }

    /// Replica moves that even out replica counts (a node joined or came
    /// back empty), as `(shard, voters)` for `MetaCommand::MoveShard`: none
    /// while a repair is due (a node down or draining still holds voters),
    /// and at most `max_in_flight` moves of any kind under way at once. See
    /// [`placement::plan_rebalance`].
    pub fn rebalance_moves(&self, max_in_flight: usize) -> Vec<(u32, Vec<u64>)> {
        let budget = max_in_flight.saturating_sub(self.moves_in_flight());
        if budget == 0 || !self.repair_moves().moves.is_empty() {
            return Vec::new();
        }
        placement::plan_rebalance(&self.node_slots(), &self.pool_infos(), &self.shard_infos(), budget)
            .into_iter()
            .map(|m| (m.shard.0, m.voters.iter().map(|v| v.0).collect()))
            .collect()
    }

    /// Leadership transfers that even out leaders per node, given who leads
    /// each shard now (`shard → node`). None while any move is in flight (a
    /// group changing its voters is left alone). See
    /// [`placement::plan_leader_moves`].
    pub fn leader_moves(&self, leaders: &BTreeMap<u32, u64>, budget: usize) -> Vec<placement::LeaderMove> {
        if self.moves_in_flight() > 0 {
            return Vec::new();
        }
        let leaders: BTreeMap<ShardId, NodeId> = leaders
            .iter()
            .filter(|(s, _)| self.shards.contains_key(s))
            .map(|(s, n)| (ShardId(*s), NodeId(*n)))
            .collect();
        placement::plan_leader_moves(&self.node_slots(), &self.shard_infos(), &leaders, budget)
    }

    fn add_node(&mut self, node: &MetaNode) -> Result<(), ApiError> {
        node.info().validate()?;
        if node.id == 0 {
            return Err(err(ErrorCode::Invalid, "node id 0"));
        }
        if let Some(old) = self.nodes.get(&node.id) {
            return if old == node {
                Ok(())
            } else {
                Err(err(ErrorCode::AlreadyExists, format!("{} exists", NodeId(node.id))))
            };
        }
        if self.nodes.values().any(|n| n.addr == node.addr) {
            return Err(err(ErrorCode::AlreadyExists, format!("address {} is taken", node.addr)));
        }
        self.last_node = self.last_node.max(node.id);
        self.nodes.insert(node.id, node.clone());
        Ok(())
    }

    /// The id for the next node to join: above every id ever given
    /// ([`Self::add_node`] raises `last_node`, and so does loading a map
    /// stored before it existed).
    pub fn next_node_id(&self) -> u64 {
        self.last_node + 1
    }

    fn create_pool(&mut self, spec: &MetaPoolSpec) -> Result<MetaPool, ApiError> {
        let domain = spec.spec();
        domain.validate()?;
        if self.pool_by_name(&spec.name).is_some() {
            return Err(err(ErrorCode::AlreadyExists, format!("pool {:?} exists", spec.name)));
        }
        let first = self.next_shard;
        first.checked_add(spec.shards).ok_or_else(|| err(ErrorCode::NoSpace, "shard ids exhausted"))?;
        let rule = PlacementRule { replicas: spec.replicas, failure_domain: domain.failure_domain };
        let mut load = Load::of(self.shard_infos().values());
        let placed = placement::place_shards(&self.node_slots(), rule, ShardId(first), spec.shards, &mut load)
            .map_err(|e| err(ErrorCode::NoSpace, e.to_string()))?;
        self.next_pool += 1;
        let pool = MetaPool { id: self.next_pool, spec: spec.clone(), first_shard: first };
        for p in placed {
            let voters: Vec<u64> = p.voters.iter().map(|v| v.0).collect();
            let leader = voters.first().copied();
            self.shards
                .insert(p.shard.0, MetaShard { id: p.shard.0, pool: pool.id, voters, leader, joining: Vec::new() });
        }
        self.next_shard = first + spec.shards;
        self.pools.insert(pool.id, pool.clone());
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn node(id: u64) -> MetaNode {
        MetaNode {
            id,
            addr: format!("10.0.0.{id}:7000"),
            zone: Some(format!("z{id}")),
            up: true,
            disks: vec![("/d0".into(), 1 << 40, 0)],
            draining: false,
        }
    }

    fn spec(name: &str, replicas: u32, shards: u32) -> MetaPoolSpec {
        MetaPoolSpec { name: name.into(), replicas, shards, zone_domain: true }
    }

    fn init(nodes: u64) -> ClusterMap {
        let mut m = ClusterMap::default();
        let cmd = MetaCommand::InitCluster {
            cluster_id: 77,
            default_pool: Some(spec("default", 3, 8)),
            nodes: (1..=nodes).map(node).collect(),
        };
        assert_eq!(m.apply(&cmd), Ok(MetaOutcome::Cluster { cluster_id: 77 }));
        m
    }

    fn code(r: Result<MetaOutcome, ApiError>) -> ErrorCode {
        r.expect_err("refused").code
    }

    #[test]
    fn init_creates_nodes_and_the_default_pool_once() {
        let mut m = init(3);
        assert_eq!(m.version, 1);
        assert_eq!(m.nodes.len(), 3);
        assert_eq!(m.shards.len(), 8);
        m.placement().validate().expect("a valid placement map");
        let again = MetaCommand::InitCluster { cluster_id: 77, default_pool: None, nodes: vec![] };
        assert!(m.apply(&again).is_ok());
        assert_eq!(m.version, 1, "idempotent re-init changes nothing");
        let other = MetaCommand::InitCluster { cluster_id: 78, default_pool: None, nodes: vec![] };
        assert_eq!(code(m.apply(&other)), ErrorCode::AlreadyExists);
        let mut empty = ClusterMap::default();
        assert_eq!(code(empty.apply(&MetaCommand::SetNodeState { node: 1, up: false })), ErrorCode::Unavailable);
        // An impossible default pool refuses the whole init.
        let bad = MetaCommand::InitCluster { cluster_id: 5, default_pool: Some(spec("p", 3, 1)), nodes: vec![node(1)] };
        assert_eq!(code(empty.apply(&bad)), ErrorCode::NoSpace);
        assert_eq!(empty, ClusterMap::default());
    }

    #[test]
    fn pools_and_volumes_are_validated_and_unique() {
        let mut m = init(3);
        assert_eq!(code(m.apply(&MetaCommand::CreatePool { spec: spec("default", 1, 1) })), ErrorCode::AlreadyExists);
        assert_eq!(code(m.apply(&MetaCommand::CreatePool { spec: spec("big", 5, 1) })), ErrorCode::NoSpace);
        assert_eq!(code(m.apply(&MetaCommand::CreatePool { spec: spec("bad/name", 1, 1) })), ErrorCode::Invalid);
        let Ok(MetaOutcome::Pool(p)) = m.apply(&MetaCommand::CreatePool { spec: spec("cache", 1, 4) }) else {
            panic!("pool")
        };
        assert_eq!((p.id, p.first_shard), (2, 8));
        let create = |name: &str, size| MetaCommand::CreateVolume { name: name.into(), size, pool: "default".into() };
        let Ok(MetaOutcome::Volume(v1)) = m.apply(&create("a", 1 << 30)) else { panic!("volume") };
        let Ok(MetaOutcome::Volume(v2)) = m.apply(&create("b", 1 << 30)) else { panic!("volume") };
        assert_eq!((v1.id, v2.id), (1, 2));
        assert_eq!(code(m.apply(&create("a", 1 << 30))), ErrorCode::AlreadyExists);
        assert_eq!(code(m.apply(&create("c", 4095))), ErrorCode::Invalid);
        let nopool = MetaCommand::CreateVolume { name: "c".into(), size: 4096, pool: "x".into() };
        assert_eq!(code(m.apply(&nopool)), ErrorCode::NotFound);
        let v = m.version;
        let grow = MetaCommand::ResizeVolume { name: "a".into(), size: 2 << 30 };
        assert!(m.apply(&grow).is_ok());
        assert_eq!(m.version, v + 1);
        assert!(m.apply(&grow).is_ok());
        assert_eq!(m.version, v + 1, "same size: no change");
        assert_eq!(code(m.apply(&MetaCommand::ResizeVolume { name: "a".into(), size: 1 << 30 })), ErrorCode::Invalid);
        assert_eq!(
            code(m.apply(&MetaCommand::ResizeVolume { name: "zz".into(), size: 1 << 30 })),
            ErrorCode::NoSuchVolume
        );
        let placement = m.placement();
        placement.validate().expect("valid");
        assert!(placement.shard_of(VolumeId(1), 3).is_some_and(|s| s.0 < 8));
        // Deleted ids are not reused.
        assert!(m.apply(&MetaCommand::DeleteVolume { name: "b".into() }).is_ok());
        let Ok(MetaOutcome::Volume(v3)) = m.apply(&create("b", 4096)) else { panic!("volume") };
        assert_eq!(v3.id, 3);
    }

    #[test]
    fn attach_fences_writers_and_guards_delete() {
        let mut m = init(3);
        let create = MetaCommand::CreateVolume { name: "v".into(), size: 1 << 20, pool: "default".into() };
        m.apply(&create).expect("create");
        let attach = |read_only, force| MetaCommand::Attach { name: "v".into(), read_only, force };
        let Ok(MetaOutcome::Attached { epoch: e1, .. }) = m.apply(&attach(false, false)) else { panic!() };
        assert_eq!(e1, 1);
        assert_eq!(code(m.apply(&attach(false, false))), ErrorCode::Conflict);
        let Ok(MetaOutcome::Attached { epoch: ro, .. }) = m.apply(&attach(true, false)) else { panic!() };
        assert_eq!(ro, 1, "read-only attaches do not bump the epoch");
        assert_eq!(code(m.apply(&MetaCommand::DeleteVolume { name: "v".into() })), ErrorCode::Conflict);
        let Ok(MetaOutcome::Attached { epoch: e2, .. }) = m.apply(&attach(false, true)) else { panic!() };
        assert_eq!(e2, 2);
        assert_eq!(m.placement().volumes[&VolumeId(1)].epoch, Epoch(2));
        let detach = |epoch| MetaCommand::Detach { name: "v".into(), epoch };
        assert_eq!(code(m.apply(&detach(Some(1)))), ErrorCode::Fenced);
        assert!(m.apply(&detach(Some(2))).is_ok());
        assert!(m.apply(&detach(None)).is_ok());
        assert_eq!(m.volumes[&1].readers, 0);
        assert!(m.apply(&MetaCommand::DeleteVolume { name: "v".into() }).is_ok());
        assert!(m.volumes.is_empty());
        assert_eq!(m.deleted.get(&1), Some(&1), "a tombstone until every shard is purged");
        assert!(m.apply(&MetaCommand::ForgetVolume { id: 1 }).is_ok());
        assert!(m.deleted.is_empty());
    }

    #[test]
    fn nodes_and_voters_change_and_bump_the_version() {
        let mut m = init(3);
        let v = m.version;
        assert!(m.apply(&MetaCommand::AddNode { node: node(4) }).is_ok());
        assert!(m.apply(&MetaCommand::AddNode { node: node(4) }).is_ok(), "same node again is a no-op");
        let mut clash = node(5);
        clash.addr = node(4).addr;
        assert_eq!(code(m.apply(&MetaCommand::AddNode { node: clash })), ErrorCode::AlreadyExists);
        assert!(m.apply(&MetaCommand::SetNodeState { node: 2, up: false }).is_ok());
        assert_eq!(code(m.apply(&MetaCommand::SetNodeState { node: 9, up: false })), ErrorCode::NotFound);
        assert_eq!(m.version, v + 2);
        let actions = m.plan_repair(&BTreeSet::from([NodeId(2)]));
        assert!(!actions.is_empty());
        let update = |voters: Vec<u64>| MetaCommand::UpdateShardVoters { shard: 0, voters, leader: Some(1) };
        assert!(m.apply(&update(vec![1, 3, 4])).is_ok());
        assert_eq!(m.shards[&0].voters, vec![1, 3, 4]);
        assert_eq!(code(m.apply(&update(vec![1, 1]))), ErrorCode::Invalid);
        assert_eq!(code(m.apply(&update(vec![1, 9]))), ErrorCode::NotFound);
        assert_eq!(code(m.apply(&update(vec![3, 4]))), ErrorCode::Invalid, "leader hint not a voter");
        m.placement().validate().expect("valid");
    }

    #[test]
    fn a_down_node_s_shards_move_and_settle_once_their_groups_report() {
        let mut m = init(4);
        assert_eq!(m.repair_moves(), RepairPlan::default(), "nothing is down");
        m.apply(&MetaCommand::SetNodeState { node: 2, up: false }).expect("down");
        let RepairPlan { moves, stuck } = m.repair_moves();
        assert!(stuck.is_empty(), "{stuck:?}");
        let affected: Vec<u32> = m.shards.values().filter(|s| s.voters.contains(&2)).map(|s| s.id).collect();
        assert_eq!(moves.iter().map(|(s, _)| *s).collect::<Vec<_>>(), affected);
        for (shard, voters) in &moves {
            assert!(!voters.contains(&2) && voters.len() == 3, "{shard}: {voters:?}");
            let before: Vec<u64> = m.shards[shard].voters.iter().copied().filter(|v| *v != 2).collect();
            let new: Vec<u64> = voters.iter().copied().filter(|v| !before.contains(v)).collect();
            assert_eq!(new.len(), 1, "{shard}: one replacement for one lost voter");
            m.apply(&MetaCommand::MoveShard { shard: *shard, voters: voters.clone() }).expect("move");
            let s = &m.shards[shard];
            assert_eq!(s.joining, new);
            assert_eq!(s.voters[..2], before[..], "complete replicas stay first");
            assert!(s.leader.is_none_or(|l| l != new[0]));
        }
        m.placement().validate().expect("valid");
        assert_eq!(m.repair_moves().moves, vec![], "nothing left on the down node");
        let (shard, voters) = moves[0].clone();
        let v = m.version;
        assert!(m.apply(&MetaCommand::MoveShard { shard, voters: voters.clone() }).is_ok());
        assert_eq!(m.version, v, "the same voters again change nothing");
        assert_eq!(code(m.apply(&MetaCommand::MoveShard { shard, voters: vec![4] })), ErrorCode::Invalid);
        assert_eq!(code(m.apply(&MetaCommand::ShardMoved { shard, voters: vec![1, 3, 2] })), ErrorCode::Conflict);
        let mut reversed = voters.clone();
        reversed.reverse();
        m.apply(&MetaCommand::ShardMoved { shard, voters: reversed }).expect("settled");
        assert!(m.shards[&shard].joining.is_empty());
        // Every complete replica down: nothing to rebuild from.
        let mut m = init(4);
        let s0 = m.shards[&0].voters.clone();
        for n in &s0 {
            m.apply(&MetaCommand::SetNodeState { node: *n, up: false }).expect("down");
        }
        let RepairPlan { moves, stuck } = m.repair_moves();
        assert!(moves.iter().all(|(s, _)| *s != 0));
        assert!(stuck.iter().any(|(s, _)| *s == 0), "{stuck:?}");
    }

    #[test]
    fn a_drained_node_gives_up_its_replicas_and_is_removed_only_when_empty() {
        let mut m = init(4);
        let held: Vec<u32> = m.shards.values().filter(|s| s.voters.contains(&3)).map(|s| s.id).collect();
        assert!(!held.is_empty());
        assert_eq!(code(m.apply(&MetaCommand::RemoveNode { node: 3 })), ErrorCode::Conflict);
        m.apply(&MetaCommand::DrainNode { node: 3 }).expect("drain");
        assert_eq!(code(m.apply(&MetaCommand::DrainNode { node: 9 })), ErrorCode::NotFound);
        let RepairPlan { moves, stuck } = m.repair_moves();
        assert!(stuck.is_empty(), "{stuck:?}");
        assert_eq!(moves.iter().map(|(s, _)| *s).collect::<Vec<_>>(), held);
        for (shard, voters) in moves {
            assert!(!voters.contains(&3), "a draining node takes no replica");
            m.apply(&MetaCommand::MoveShard { shard, voters: voters.clone() }).expect("move");
            m.apply(&MetaCommand::ShardMoved { shard, voters }).expect("moved");
        }
        assert_eq!(m.repair_moves(), RepairPlan::default());
        let v = m.version;
        m.apply(&MetaCommand::RemoveNode { node: 3 }).expect("remove");
        assert!(!m.nodes.contains_key(&3) && m.version == v + 1);
        m.apply(&MetaCommand::RemoveNode { node: 3 }).expect("removing again is a no-op");
        m.placement().validate().expect("valid");
    }

    #[test]
    fn a_removed_nodes_id_is_never_given_again() {
        let mut m = init(4);
        m.apply(&MetaCommand::DrainNode { node: 4 }).expect("drain");
        for (shard, voters) in m.repair_moves().moves {
            m.apply(&MetaCommand::MoveShard { shard, voters: voters.clone() }).expect("move");
            m.apply(&MetaCommand::ShardMoved { shard, voters }).expect("moved");
        }
        m.apply(&MetaCommand::RemoveNode { node: 4 }).expect("remove");
        assert_eq!(m.next_node_id(), 5, "the highest id left is 3, but 4 was given");
        let mut again = node(4);
        again.addr = "10.0.0.99:7100".into();
        assert_eq!(code(m.apply(&MetaCommand::AddNode { node: again })), ErrorCode::AlreadyExists);
        m.apply(&MetaCommand::AddNode { node: node(5) }).expect("a new id");
        assert_eq!(m.next_node_id(), 6);
    }

    #[test]
    fn a_map_stored_before_last_node_loads_with_it_set() {
        #[derive(Serialize)]
        struct Old<'a> {
            cluster_id: u64,
            version: u64,
            nodes: &'a BTreeMap<u64, MetaNode>,
            pools: &'a BTreeMap<u32, MetaPool>,
            volumes: &'a BTreeMap<u64, MetaVolume>,
            shards: &'a BTreeMap<u32, MetaShard>,
            deleted: &'a BTreeMap<u64, u32>,
            next_pool: u32,
            next_shard: u32,
            next_volume: u64,
        }
        let m = init(3);
        let old = Old {
            cluster_id: m.cluster_id,
            version: m.version,
            nodes: &m.nodes,
            pools: &m.pools,
            volumes: &m.volumes,
            shards: &m.shards,
            deleted: &m.deleted,
            next_pool: m.next_pool,
            next_shard: m.next_shard,
            next_volume: m.next_volume,
        };
        let bytes = crate::codec::encode(&old).expect("encode");
        assert!(crate::codec::decode::<ClusterMap>(&bytes).is_err(), "the new layout does not read the old");
        let loaded: ClusterMap = crate::codec::decode::<ClusterMapV1>(&bytes).expect("decode").into();
        assert_eq!(loaded, m);
    }

    #[test]
    fn a_joined_node_gets_replicas_a_few_moves_at_a_time_after_repairs() {
        let mut m = init(3);
        assert!(m.rebalance_moves(2).is_empty(), "three nodes hold every shard");
        m.apply(&MetaCommand::AddNode { node: node(4) }).expect("join");
        let moves = m.rebalance_moves(2);
        assert_eq!(moves.len(), 2, "{moves:?}");
        for (shard, voters) in &moves {
            assert!(voters.contains(&4) && voters.len() == 3, "{shard}: {voters:?}");
            m.apply(&MetaCommand::MoveShard { shard: *shard, voters: voters.clone() }).expect("move");
            assert_eq!(m.shards[shard].joining, vec![4]);
        }
        assert!(m.rebalance_moves(2).is_empty(), "two moves in flight already");
        assert!(m.leader_moves(&BTreeMap::new(), 1).is_empty(), "no leader moves while voters change");
        for (shard, voters) in &moves {
            m.apply(&MetaCommand::ShardMoved { shard: *shard, voters: voters.clone() }).expect("moved");
        }
        let mut rounds = 0;
        loop {
            let moves = m.rebalance_moves(2);
            if moves.is_empty() {
                break;
            }
            for (shard, voters) in moves {
                m.apply(&MetaCommand::MoveShard { shard, voters: voters.clone() }).expect("move");
                m.apply(&MetaCommand::ShardMoved { shard, voters }).expect("moved");
            }
            rounds += 1;
            assert!(rounds < 20, "rebalancing does not settle");
        }
        let mut counts = BTreeMap::<u64, usize>::new();
        for s in m.shards.values() {
            for v in &s.voters {
                *counts.entry(*v).or_default() += 1;
            }
        }
        let (max, min) = (counts.values().max().copied(), counts.values().min().copied());
        assert!(counts.len() == 4 && max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{counts:?}");
        m.placement().validate().expect("valid");
        // A down node holding voters: its repair comes first, no rebalance.
        m.apply(&MetaCommand::SetNodeState { node: 4, up: false }).expect("down");
        m.apply(&MetaCommand::AddNode { node: node(5) }).expect("join");
        assert!(!m.repair_moves().moves.is_empty());
        assert!(m.rebalance_moves(2).is_empty());
    }

    #[test]
    fn failures_survive_the_wire_form() {
        for c in ErrorCode::ALL {
            let e = ApiError::new(c, "m");
            assert_eq!(MetaFailure::from_api(&e).into_api(), e);
        }
        let reply = MetaReply { version: 4, result: Err(MetaFailure { code: 200, message: "x".into() }) };
        let e = reply.into_result().expect_err("refused");
        assert_eq!((e.code, e.map_version), (ErrorCode::Unknown, Some(MapVersion(4))));
    }
}

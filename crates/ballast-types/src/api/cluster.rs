//! Cluster objects (pools, nodes, volumes, shards, the placement map) and the
//! admin requests that create them. Re-exported from `api`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::{
    shard_index, validate_addr, validate_chunk_size, validate_name, validate_volume_size, ClusterId, Epoch, MapVersion,
    NodeId, PoolId, ValidationError, MAX_ADDR_LEN, MAX_META_MEMBERS, MAX_REPLICAS, MAX_SHARDS, MAX_TOKEN_LEN,
};
use crate::{Geometry, ShardId, VolumeId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureDomain {
    /// Replicas of a shard on distinct nodes.
    Node,
    /// Replicas on distinct zone labels (falls back to nodes where labels are missing).
    Zone,
}

/// What `pool create` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub replicas: u32,
    /// Fixed for the pool's life: changing it would move every chunk.
    pub shards: u32,
    pub failure_domain: FailureDomain,
}

impl PoolSpec {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name(&self.name)?;
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(ValidationError::Replicas(self.replicas));
        }
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return Err(ValidationError::Shards(self.shards));
        }
        Ok(())
    }
}

/// A created pool. Its shards have the contiguous ids
/// `first_shard .. first_shard + spec.shards`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub id: PoolId,
    pub spec: PoolSpec,
    pub first_shard: ShardId,
}

impl PoolInfo {
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.spec.validate()?;
        if self.first_shard.0.checked_add(self.spec.shards).is_none() {
            return Err(ValidationError::Other("pool shard ids overflow u32"));
        }
        Ok(())
    }

    /// The global id of the pool's `index`-th shard.
    pub fn shard(&self, index: u32) -> ShardId {
        ShardId(self.first_shard.0 + index)
    }

    pub fn shard_ids(&self) -> impl Iterator<Item = ShardId> + '_ {
        (0..self.spec.shards).map(|i| self.shard(i))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub path: String,
    pub capacity: u64,
    pub used: u64,
}

impl DiskInfo {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.path.is_empty() || self.path.len() > MAX_ADDR_LEN {
            return Err(ValidationError::Other("disk path must be 1-255 bytes"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    pub addr: String,
    /// Failure-domain label; `None` when the node has none.
    pub zone: Option<String>,
    pub up: bool,
    pub disks: Vec<DiskInfo>,
}

impl NodeInfo {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_addr(&self.addr)?;
        if let Some(z) = &self.zone {
            validate_name(z)?;
        }
        self.disks.iter().try_for_each(DiskInfo::validate)
    }
}

/// A node id with the address to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    pub id: NodeId,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub pool: PoolId,
    pub chunk_size: u64,
    /// Current attach epoch; `Epoch(0)` = never attached read-write.
    pub epoch: Epoch,
}

impl VolumeInfo {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name(&self.name)?;
        validate_volume_size(self.size)?;
        validate_chunk_size(self.chunk_size)
    }

    pub fn geometry(&self) -> Geometry {
        Geometry { chunk_size: self.chunk_size }
    }
}

/// One shard's replica set, as the placement map knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: ShardId,
    pub pool: PoolId,
    /// Distinct, non-empty; the order carries no meaning.
    pub voters: Vec<NodeId>,
    /// A hint only: the leader may have changed since.
    pub leader: Option<NodeId>,
    /// Voters still being built (a rebuild or a move): they are in `voters`,
    /// the group has not yet made them voters, and they may hold no data.
    /// Empty when the group's membership equals `voters`.
    pub joining: Vec<NodeId>,
}

impl ShardInfo {
    /// Voters that hold a complete replica (not [`joining`](Self::joining)).
    pub fn settled(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().copied().filter(|v| !self.joining.contains(v))
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.voters.is_empty() || self.voters.len() > MAX_REPLICAS as usize {
            return Err(ValidationError::Other("a shard has 1..=5 voters"));
        }
        if self.joining.iter().any(|j| !self.voters.contains(j)) {
            return Err(ValidationError::Other("a joining replica is not a voter"));
        }
        if self.joining.len() >= self.voters.len() {
            return Err(ValidationError::Other("a shard needs a voter that is not joining"));
        }
        let mut seen = BTreeSet::new();
        for v in &self.voters {
            if v.0 == 0 {
                return Err(ValidationError::Other("voter node id 0"));
            }
            if !seen.insert(*v) {
                return Err(ValidationError::Duplicate { what: "voter", id: v.0 });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    pub shard: ShardInfo,
    pub under_replicated: bool,
    /// Progress of the replica being rebuilt, while one is; `None` otherwise.
    pub rebuilding: Option<RebuildProgress>,
}

/// How far a shard's rebuild (copying it to a new replica) has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RebuildProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

impl RebuildProgress {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.done_bytes > self.total_bytes {
            return Err(ValidationError::Other("rebuild done_bytes exceeds total_bytes"));
        }
        Ok(())
    }
}

/// One replica a shard's leader is building now: the snapshot bytes streamed
/// to `target` so far against the shard's data on the leader, and the log
/// entries `target` still lacks. A node reports these in its stats; the
/// meta leader folds them into [`ShardStatus::rebuilding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildStream {
    pub shard: ShardId,
    pub target: NodeId,
    pub progress: RebuildProgress,
    /// Log entries the target lacks; 0 when caught up or not known yet.
    pub entries_behind: u64,
    /// A snapshot has been (or is being) streamed to the target; `false`:
    /// it catches up by log replay only.
    pub snapshot: bool,
}

/// Data requests served for one volume since the serving nodes started:
/// counters that only grow (a restarted node's share starts again at zero).
/// Only successful requests count, once per chunk piece; writes include
/// zeroes and trims, whose bytes are the range they cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeIo {
    pub volume: VolumeId,
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
}

impl VolumeIo {
    pub fn new(volume: VolumeId) -> Self {
        Self { volume, reads: 0, read_bytes: 0, writes: 0, write_bytes: 0 }
    }

    /// Add `other`'s counts (saturating: they are statistics).
    pub fn add(&mut self, other: &VolumeIo) {
        self.reads = self.reads.saturating_add(other.reads);
        self.read_bytes = self.read_bytes.saturating_add(other.read_bytes);
        self.writes = self.writes.saturating_add(other.writes);
        self.write_bytes = self.write_bytes.saturating_add(other.write_bytes);
    }
}

/// One node's live figures, gathered by the meta leader for `ClusterStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    pub node: NodeId,
    /// Capacity and use now (the map holds them as of the node's join).
    pub disks: Vec<DiskInfo>,
    pub volumes: Vec<VolumeIo>,
    /// `None` from a node that predates scrub.
    pub scrub: Option<ScrubReport>,
}

/// Everything a client needs to route I/O: which shard holds a chunk and who
/// leads it. Built by the meta leader; clients cache it and refetch on
/// `StaleMap`/`NotLeader`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlacementMap {
    pub version: MapVersion,
    pub pools: BTreeMap<PoolId, PoolInfo>,
    pub volumes: BTreeMap<VolumeId, VolumeInfo>,
    pub shards: BTreeMap<ShardId, ShardInfo>,
    pub nodes: BTreeMap<NodeId, String>,
}

impl PlacementMap {
    /// Checks every entry and every reference: volumes name existing pools,
    /// each pool's shard range exists and belongs to it, voters are known nodes.
    /// Keys and the ids inside the values must agree.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.version.0 == 0 {
            return Err(ValidationError::Other("map version 0"));
        }
        for (id, addr) in &self.nodes {
            if id.0 == 0 {
                return Err(ValidationError::Other("node id 0"));
            }
            validate_addr(addr)?;
        }
        for (id, p) in &self.pools {
            p.validate()?;
            if p.id != *id {
                return Err(ValidationError::Other("pool key differs from its id"));
            }
            for s in p.shard_ids() {
                match self.shards.get(&s) {
                    Some(info) if info.pool == p.id => {}
                    _ => return Err(ValidationError::Dangling { what: "pool", target: "shard", id: s.0.into() }),
                }
            }
        }
        for (id, v) in &self.volumes {
            v.validate()?;
            if v.id != *id {
                return Err(ValidationError::Other("volume key differs from its id"));
            }
            if !self.pools.contains_key(&v.pool) {
                return Err(ValidationError::Dangling { what: "volume", target: "pool", id: v.pool.0.into() });
            }
        }
        for (id, s) in &self.shards {
            s.validate()?;
            if s.id != *id {
                return Err(ValidationError::Other("shard key differs from its id"));
            }
            let pool = self.pools.get(&s.pool);
            if !pool.is_some_and(|p| (p.first_shard..p.shard(p.spec.shards)).contains(id)) {
                return Err(ValidationError::Dangling { what: "shard", target: "pool", id: s.pool.0.into() });
            }
            if let Some(n) = s.voters.iter().find(|n| !self.nodes.contains_key(n)) {
                return Err(ValidationError::Dangling { what: "shard voter", target: "node", id: n.0 });
            }
        }
        Ok(())
    }

    /// The shard holding `chunk` of `volume`: `hash(volume, chunk) % pool.shards`
    /// within the pool's shard range. `None` for a volume the map does not know.
    pub fn shard_of(&self, volume: VolumeId, chunk: u64) -> Option<ShardId> {
        let pool = self.pools.get(&self.volumes.get(&volume)?.pool)?;
        Some(pool.shard(shard_index(volume, chunk, pool.spec.shards)))
    }

    /// The leader hint of `shard` with its address, if both are known.
    pub fn leader_of(&self, shard: ShardId) -> Option<NodeAddr> {
        let id = self.shards.get(&shard)?.leader?;
        Some(NodeAddr { id, addr: self.nodes.get(&id)?.clone() })
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeInfo> {
        self.volumes.values().find(|v| v.name == name)
    }
}

// ----- Admin service -----

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitCluster {
    /// Addresses of the first meta group's nodes.
    pub endpoints: Vec<String>,
    pub default_pool: Option<PoolSpec>,
}

impl InitCluster {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_META_MEMBERS {
            return Err(ValidationError::Other("init needs 1..=7 endpoints"));
        }
        let mut seen = BTreeSet::new();
        for e in &self.endpoints {
            validate_addr(e)?;
            if !seen.insert(e) {
                return Err(ValidationError::Other("endpoint listed twice"));
            }
        }
        self.default_pool.as_ref().map_or(Ok(()), PoolSpec::validate)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitClusterReply {
    pub cluster: ClusterId,
    pub members: Vec<NodeAddr>,
}

/// A node asking to join. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinNode {
    pub node: Option<NodeId>,
    pub addr: String,
    pub zone: Option<String>,
    pub disks: Vec<DiskInfo>,
    pub token: String,
    pub protocol_version: u32,
}

impl fmt::Debug for JoinNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinNode")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .field("zone", &self.zone)
            .field("disks", &self.disks)
            .field("token", &"<redacted>")
            .field("protocol_version", &self.protocol_version)
            .finish()
    }
}

impl JoinNode {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_addr(&self.addr)?;
        if let Some(z) = &self.zone {
            validate_name(z)?;
        }
        if self.token.is_empty() || self.token.len() > MAX_TOKEN_LEN {
            return Err(ValidationError::Other("join token must be 1-1024 bytes"));
        }
        self.disks.iter().try_for_each(DiskInfo::validate)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinNodeReply {
    pub cluster: ClusterId,
    pub node: NodeId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub cluster: ClusterId,
    pub protocol_version: u32,
    pub map_version: MapVersion,
    pub meta_leader: Option<NodeId>,
    pub nodes: Vec<NodeInfo>,
    pub shards: Vec<ShardStatus>,
    /// Every volume of the map once, its counters summed over the nodes that
    /// answered (a node that is down contributes nothing).
    pub volume_io: Vec<VolumeIo>,
    /// Scrub figures of every node that answered with them, by node id.
    pub scrub: Vec<ScrubReport>,
}

/// One node's scrub state: passes finished since it started, whether one
/// runs now, and the figures of the last finished pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScrubReport {
    pub node: NodeId,
    pub passes: u64,
    pub running: bool,
    /// When the last pass finished, in milliseconds since the Unix epoch;
    /// `None` before the first one.
    pub last_finished_unix_ms: Option<u64>,
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    /// Blocks whose stored value failed its checksum.
    pub corrupt_found: u64,
    /// Of those, put back from a healthy replica.
    pub repaired: u64,
    /// Of those, not repaired (no healthy copy, or the repair failed).
    pub unrepaired: u64,
    /// Intact copies that differed from a strict majority of their shard's
    /// voters (found by the nodes leading shards; one per replica and block).
    pub divergent_found: u64,
    /// Of those, equal to the majority once the realign entry applied.
    pub realigned: u64,
    /// Of those, not realigned (written meanwhile, or no majority copy to
    /// send; the next pass retries).
    pub unrealigned: u64,
    /// Blocks whose intact copies differed with no value held by a strict
    /// majority: left as they are.
    pub no_majority: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    pub pool: String,
}

impl CreateVolume {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name(&self.name)?;
        validate_volume_size(self.size)?;
        validate_name(&self.pool)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeVolume {
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachVolume {
    pub name: String,
    pub read_only: bool,
    /// Take over from a live read-write attachment (which gets fenced).
    pub force: bool,
}

/// A granted attachment: send `epoch` on every write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub volume: VolumeInfo,
    pub epoch: Epoch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachVolume {
    pub name: String,
    /// The read-write attachment released; `None` for a read-only one.
    pub epoch: Option<Epoch>,
}

/// `GetPlacement`'s answer: `map` is `None` when the caller is current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementReply {
    pub cluster: ClusterId,
    pub map: Option<PlacementMap>,
}

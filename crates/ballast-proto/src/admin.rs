//! Admin service conversions and the placement map. Admin errors travel as a
//! `Status` (see `error.rs`), so replies here carry only the happy path.

use std::collections::BTreeMap;

use ballast_types::{
    validate_addr, validate_name, validate_volume_size, AttachVolume, Attachment, ClusterId, ClusterStatus,
    CreateVolume, DetachVolume, DiskInfo, Epoch, FailureDomain, InitCluster, InitClusterReply, JoinNode, JoinNodeReply,
    MapVersion, NodeAddr, NodeId, NodeInfo, NodeStats, PlacementMap, PlacementReply, PoolId, PoolInfo, PoolSpec,
    RebuildProgress, RebuildStream, ResizeVolume, ScrubReport, ShardId, ShardInfo, ShardStatus, ValidationError,
    VolumeId, VolumeInfo, VolumeIo,
};

use crate::error::{nonzero, required, ConvertError, Field, Problem};
use crate::pb;

fn opt_name(s: String, field: &'static str) -> Result<Option<String>, ConvertError> {
    if s.is_empty() {
        return Ok(None);
    }
    validate_name(&s).field(field)?;
    Ok(Some(s))
}

fn name(s: String, field: &'static str) -> Result<String, ConvertError> {
    validate_name(&s).field(field)?;
    Ok(s)
}

fn list<P, D: TryFrom<P, Error = ConvertError>>(v: Vec<P>) -> Result<Vec<D>, ConvertError> {
    v.into_iter().map(D::try_from).collect()
}

fn to_pb<D, P: From<D>>(v: Vec<D>) -> Vec<P> {
    v.into_iter().map(P::from).collect()
}

fn version(v: u32, field: &'static str) -> Result<u32, ConvertError> {
    Ok(nonzero(v.into(), field)? as u32)
}

// ----- pools -----

impl TryFrom<pb::PoolSpec> for PoolSpec {
    type Error = ConvertError;
    fn try_from(m: pb::PoolSpec) -> Result<Self, ConvertError> {
        let failure_domain = match pb::FailureDomain::try_from(m.failure_domain) {
            Ok(pb::FailureDomain::Node) => FailureDomain::Node,
            Ok(pb::FailureDomain::Zone) => FailureDomain::Zone,
            Ok(pb::FailureDomain::Unspecified) => return Err(ConvertError::missing("PoolSpec.failure_domain")),
            Err(_) => return Err(ConvertError::new("PoolSpec.failure_domain", Problem::UnknownEnum(m.failure_domain))),
        };
        let spec = PoolSpec { name: m.name, replicas: m.replicas, shards: m.shards, failure_domain };
        spec.validate().field("PoolSpec")?;
        Ok(spec)
    }
}

impl From<PoolSpec> for pb::PoolSpec {
    fn from(s: PoolSpec) -> Self {
        let fd = match s.failure_domain {
            FailureDomain::Node => pb::FailureDomain::Node,
            FailureDomain::Zone => pb::FailureDomain::Zone,
        };
        pb::PoolSpec { name: s.name, replicas: s.replicas, shards: s.shards, failure_domain: fd as i32 }
    }
}

impl TryFrom<pb::Pool> for PoolInfo {
    type Error = ConvertError;
    fn try_from(m: pb::Pool) -> Result<Self, ConvertError> {
        let p = PoolInfo {
            id: PoolId(m.id),
            spec: required(m.spec, "Pool.spec")?.try_into()?,
            first_shard: ShardId(m.first_shard),
        };
        p.validate().field("Pool.first_shard")?;
        Ok(p)
    }
}

impl From<PoolInfo> for pb::Pool {
    fn from(p: PoolInfo) -> Self {
        pb::Pool { id: p.id.0, spec: Some(p.spec.into()), first_shard: p.first_shard.0 }
    }
}

impl TryFrom<pb::CreatePoolRequest> for PoolSpec {
    type Error = ConvertError;
    fn try_from(m: pb::CreatePoolRequest) -> Result<Self, ConvertError> {
        required(m.spec, "CreatePoolRequest.spec")?.try_into()
    }
}

impl From<PoolSpec> for pb::CreatePoolRequest {
    fn from(s: PoolSpec) -> Self {
        pb::CreatePoolRequest { spec: Some(s.into()) }
    }
}

impl TryFrom<pb::PoolReply> for PoolInfo {
    type Error = ConvertError;
    fn try_from(m: pb::PoolReply) -> Result<Self, ConvertError> {
        required(m.pool, "PoolReply.pool")?.try_into()
    }
}

impl From<PoolInfo> for pb::PoolReply {
    fn from(p: PoolInfo) -> Self {
        pb::PoolReply { pool: Some(p.into()) }
    }
}

impl TryFrom<pb::ListPoolsReply> for Vec<PoolInfo> {
    type Error = ConvertError;
    fn try_from(m: pb::ListPoolsReply) -> Result<Self, ConvertError> {
        list(m.pools)
    }
}

impl From<Vec<PoolInfo>> for pb::ListPoolsReply {
    fn from(v: Vec<PoolInfo>) -> Self {
        pb::ListPoolsReply { pools: to_pb(v) }
    }
}

// ----- nodes -----

impl TryFrom<pb::Disk> for DiskInfo {
    type Error = ConvertError;
    fn try_from(m: pb::Disk) -> Result<Self, ConvertError> {
        let d = DiskInfo { path: m.path, capacity: m.capacity, used: m.used };
        d.validate().field("Disk.path")?;
        Ok(d)
    }
}

impl From<DiskInfo> for pb::Disk {
    fn from(d: DiskInfo) -> Self {
        pb::Disk { path: d.path, capacity: d.capacity, used: d.used }
    }
}

impl TryFrom<pb::Node> for NodeInfo {
    type Error = ConvertError;
    fn try_from(m: pb::Node) -> Result<Self, ConvertError> {
        validate_addr(&m.addr).field("Node.addr")?;
        Ok(NodeInfo {
            id: NodeId(nonzero(m.id, "Node.id")?),
            addr: m.addr,
            zone: opt_name(m.zone, "Node.zone")?,
            up: m.up,
            disks: list(m.disks)?,
        })
    }
}

impl From<NodeInfo> for pb::Node {
    fn from(n: NodeInfo) -> Self {
        pb::Node { id: n.id.0, addr: n.addr, zone: n.zone.unwrap_or_default(), up: n.up, disks: to_pb(n.disks) }
    }
}

impl TryFrom<pb::NodeAddr> for NodeAddr {
    type Error = ConvertError;
    fn try_from(m: pb::NodeAddr) -> Result<Self, ConvertError> {
        validate_addr(&m.addr).field("NodeAddr.addr")?;
        Ok(NodeAddr { id: NodeId(nonzero(m.id, "NodeAddr.id")?), addr: m.addr })
    }
}

impl From<NodeAddr> for pb::NodeAddr {
    fn from(n: NodeAddr) -> Self {
        pb::NodeAddr { id: n.id.0, addr: n.addr }
    }
}

impl TryFrom<pb::InitClusterRequest> for InitCluster {
    type Error = ConvertError;
    fn try_from(m: pb::InitClusterRequest) -> Result<Self, ConvertError> {
        let i =
            InitCluster { endpoints: m.endpoints, default_pool: m.default_pool.map(TryInto::try_into).transpose()? };
        i.validate().field("InitClusterRequest.endpoints")?;
        Ok(i)
    }
}

impl From<InitCluster> for pb::InitClusterRequest {
    fn from(i: InitCluster) -> Self {
        pb::InitClusterRequest { endpoints: i.endpoints, default_pool: i.default_pool.map(Into::into) }
    }
}

impl TryFrom<pb::InitClusterReply> for InitClusterReply {
    type Error = ConvertError;
    fn try_from(m: pb::InitClusterReply) -> Result<Self, ConvertError> {
        Ok(InitClusterReply {
            cluster: ClusterId(nonzero(m.cluster_id, "InitClusterReply.cluster_id")?),
            members: list(m.members)?,
        })
    }
}

impl From<InitClusterReply> for pb::InitClusterReply {
    fn from(r: InitClusterReply) -> Self {
        pb::InitClusterReply { cluster_id: r.cluster.0, members: to_pb(r.members) }
    }
}

impl TryFrom<pb::JoinNodeRequest> for JoinNode {
    type Error = ConvertError;
    fn try_from(m: pb::JoinNodeRequest) -> Result<Self, ConvertError> {
        let j = JoinNode {
            node: (m.node_id != 0).then_some(NodeId(m.node_id)),
            zone: opt_name(m.zone, "JoinNodeRequest.zone")?,
            disks: list(m.disks)?,
            protocol_version: version(m.protocol_version, "JoinNodeRequest.protocol_version")?,
            addr: m.addr,
            token: m.token,
        };
        j.validate().field("JoinNodeRequest")?;
        Ok(j)
    }
}

impl From<JoinNode> for pb::JoinNodeRequest {
    fn from(j: JoinNode) -> Self {
        pb::JoinNodeRequest {
            node_id: j.node.map_or(0, |n| n.0),
            addr: j.addr,
            zone: j.zone.unwrap_or_default(),
            disks: to_pb(j.disks),
            token: j.token,
            protocol_version: j.protocol_version,
        }
    }
}

impl TryFrom<pb::JoinNodeReply> for JoinNodeReply {
    type Error = ConvertError;
    fn try_from(m: pb::JoinNodeReply) -> Result<Self, ConvertError> {
        Ok(JoinNodeReply {
            cluster: ClusterId(nonzero(m.cluster_id, "JoinNodeReply.cluster_id")?),
            node: NodeId(nonzero(m.node_id, "JoinNodeReply.node_id")?),
        })
    }
}

impl From<JoinNodeReply> for pb::JoinNodeReply {
    fn from(r: JoinNodeReply) -> Self {
        pb::JoinNodeReply { cluster_id: r.cluster.0, node_id: r.node.0 }
    }
}

// ----- shards and status -----

impl TryFrom<pb::Shard> for ShardInfo {
    type Error = ConvertError;
    fn try_from(m: pb::Shard) -> Result<Self, ConvertError> {
        let s = ShardInfo {
            id: ShardId(m.id),
            pool: PoolId(m.pool_id),
            voters: m.voters.into_iter().map(NodeId).collect(),
            leader: (m.leader != 0).then_some(NodeId(m.leader)),
            joining: m.joining.into_iter().map(NodeId).collect(),
        };
        s.validate().field("Shard.voters")?;
        Ok(s)
    }
}

impl From<ShardInfo> for pb::Shard {
    fn from(s: ShardInfo) -> Self {
        pb::Shard {
            id: s.id.0,
            pool_id: s.pool.0,
            voters: s.voters.into_iter().map(|n| n.0).collect(),
            leader: s.leader.map_or(0, |n| n.0),
            joining: s.joining.into_iter().map(|n| n.0).collect(),
        }
    }
}

impl TryFrom<pb::ShardStatus> for ShardStatus {
    type Error = ConvertError;
    fn try_from(m: pb::ShardStatus) -> Result<Self, ConvertError> {
        Ok(ShardStatus {
            shard: required(m.shard, "ShardStatus.shard")?.try_into()?,
            under_replicated: m.under_replicated,
            rebuilding: m.rebuilding.map(RebuildProgress::try_from).transpose()?,
        })
    }
}

impl From<ShardStatus> for pb::ShardStatus {
    fn from(s: ShardStatus) -> Self {
        pb::ShardStatus {
            shard: Some(s.shard.into()),
            under_replicated: s.under_replicated,
            rebuilding: s.rebuilding.map(pb::Rebuild::from),
        }
    }
}

impl TryFrom<pb::Rebuild> for RebuildProgress {
    type Error = ConvertError;
    fn try_from(m: pb::Rebuild) -> Result<Self, ConvertError> {
        let r = RebuildProgress { done_bytes: m.done_bytes, total_bytes: m.total_bytes };
        r.validate().field("Rebuild.done_bytes")?;
        Ok(r)
    }
}

impl From<RebuildProgress> for pb::Rebuild {
    fn from(r: RebuildProgress) -> Self {
        pb::Rebuild { done_bytes: r.done_bytes, total_bytes: r.total_bytes }
    }
}

impl TryFrom<pb::VolumeIo> for VolumeIo {
    type Error = ConvertError;
    fn try_from(m: pb::VolumeIo) -> Result<Self, ConvertError> {
        Ok(VolumeIo {
            volume: VolumeId(nonzero(m.volume_id, "VolumeIo.volume_id")?),
            reads: m.reads,
            read_bytes: m.read_bytes,
            writes: m.writes,
            write_bytes: m.write_bytes,
        })
    }
}

impl From<VolumeIo> for pb::VolumeIo {
    fn from(v: VolumeIo) -> Self {
        pb::VolumeIo {
            volume_id: v.volume.0,
            reads: v.reads,
            read_bytes: v.read_bytes,
            writes: v.writes,
            write_bytes: v.write_bytes,
        }
    }
}

impl TryFrom<pb::NodeStatsReply> for NodeStats {
    type Error = ConvertError;
    fn try_from(m: pb::NodeStatsReply) -> Result<Self, ConvertError> {
        Ok(NodeStats {
            node: NodeId(nonzero(m.node_id, "NodeStatsReply.node_id")?),
            disks: list(m.disks)?,
            volumes: list(m.volumes)?,
            scrub: m.scrub.map(ScrubReport::try_from).transpose()?,
        })
    }
}

impl From<NodeStats> for pb::NodeStatsReply {
    fn from(s: NodeStats) -> Self {
        pb::NodeStatsReply {
            node_id: s.node.0,
            disks: to_pb(s.disks),
            volumes: to_pb(s.volumes),
            scrub: s.scrub.map(Into::into),
            ..Default::default()
        }
    }
}

impl TryFrom<pb::RebuildStream> for RebuildStream {
    type Error = ConvertError;
    fn try_from(m: pb::RebuildStream) -> Result<Self, ConvertError> {
        let progress = RebuildProgress { done_bytes: m.done_bytes, total_bytes: m.total_bytes };
        progress.validate().field("RebuildStream.done_bytes")?;
        Ok(RebuildStream {
            shard: ShardId(m.shard),
            target: NodeId(nonzero(m.target, "RebuildStream.target")?),
            progress,
            entries_behind: m.entries_behind,
            snapshot: m.snapshot,
        })
    }
}

impl From<RebuildStream> for pb::RebuildStream {
    fn from(r: RebuildStream) -> Self {
        pb::RebuildStream {
            shard: r.shard.0,
            target: r.target.0,
            done_bytes: r.progress.done_bytes,
            total_bytes: r.progress.total_bytes,
            entries_behind: r.entries_behind,
            snapshot: r.snapshot,
        }
    }
}

impl TryFrom<pb::ScrubReport> for ScrubReport {
    type Error = ConvertError;
    fn try_from(m: pb::ScrubReport) -> Result<Self, ConvertError> {
        if m.repaired.checked_add(m.unrepaired).is_none_or(|r| r > m.corrupt_found) {
            let e = ValidationError::Other("repaired + unrepaired exceed corrupt_found");
            return Err(ConvertError::invalid("ScrubReport.repaired", e));
        }
        if m.realigned.checked_add(m.unrealigned).is_none_or(|r| r > m.divergent_found) {
            let e = ValidationError::Other("realigned + unrealigned exceed divergent_found");
            return Err(ConvertError::invalid("ScrubReport.realigned", e));
        }
        Ok(ScrubReport {
            node: NodeId(nonzero(m.node_id, "ScrubReport.node_id")?),
            passes: m.passes,
            running: m.running,
            last_finished_unix_ms: (m.last_finished_unix_ms != 0).then_some(m.last_finished_unix_ms),
            blocks_checked: m.blocks_checked,
            bytes_checked: m.bytes_checked,
            corrupt_found: m.corrupt_found,
            repaired: m.repaired,
            unrepaired: m.unrepaired,
            divergent_found: m.divergent_found,
            realigned: m.realigned,
            unrealigned: m.unrealigned,
            no_majority: m.no_majority,
        })
    }
}

impl From<ScrubReport> for pb::ScrubReport {
    fn from(r: ScrubReport) -> Self {
        pb::ScrubReport {
            node_id: r.node.0,
            passes: r.passes,
            running: r.running,
            last_finished_unix_ms: r.last_finished_unix_ms.unwrap_or(0),
            blocks_checked: r.blocks_checked,
            bytes_checked: r.bytes_checked,
            corrupt_found: r.corrupt_found,
            repaired: r.repaired,
            unrepaired: r.unrepaired,
            divergent_found: r.divergent_found,
            realigned: r.realigned,
            unrealigned: r.unrealigned,
            no_majority: r.no_majority,
        }
    }
}

impl TryFrom<pb::ScrubReply> for Vec<ScrubReport> {
    type Error = ConvertError;
    fn try_from(m: pb::ScrubReply) -> Result<Self, ConvertError> {
        list(m.nodes)
    }
}

impl From<Vec<ScrubReport>> for pb::ScrubReply {
    fn from(v: Vec<ScrubReport>) -> Self {
        pb::ScrubReply { nodes: to_pb(v) }
    }
}

impl TryFrom<pb::ClusterStatusReply> for ClusterStatus {
    type Error = ConvertError;
    fn try_from(m: pb::ClusterStatusReply) -> Result<Self, ConvertError> {
        Ok(ClusterStatus {
            cluster: ClusterId(nonzero(m.cluster_id, "ClusterStatusReply.cluster_id")?),
            protocol_version: version(m.protocol_version, "ClusterStatusReply.protocol_version")?,
            map_version: MapVersion(m.map_version),
            meta_leader: (m.meta_leader != 0).then_some(NodeId(m.meta_leader)),
            nodes: list(m.nodes)?,
            shards: list(m.shards)?,
            volume_io: list(m.volume_io)?,
            scrub: list(m.scrub)?,
        })
    }
}

impl From<ClusterStatus> for pb::ClusterStatusReply {
    fn from(s: ClusterStatus) -> Self {
        pb::ClusterStatusReply {
            cluster_id: s.cluster.0,
            protocol_version: s.protocol_version,
            map_version: s.map_version.0,
            meta_leader: s.meta_leader.map_or(0, |n| n.0),
            nodes: to_pb(s.nodes),
            shards: to_pb(s.shards),
            volume_io: to_pb(s.volume_io),
            scrub: to_pb(s.scrub),
        }
    }
}

// ----- volumes -----

impl TryFrom<pb::Volume> for VolumeInfo {
    type Error = ConvertError;
    fn try_from(m: pb::Volume) -> Result<Self, ConvertError> {
        let v = VolumeInfo {
            id: VolumeId(nonzero(m.id, "Volume.id")?),
            name: m.name,
            size: m.size,
            pool: PoolId(m.pool_id),
            chunk_size: m.chunk_size,
            epoch: Epoch(m.epoch),
        };
        v.validate().field("Volume")?;
        Ok(v)
    }
}

impl From<VolumeInfo> for pb::Volume {
    fn from(v: VolumeInfo) -> Self {
        pb::Volume {
            id: v.id.0,
            name: v.name,
            size: v.size,
            pool_id: v.pool.0,
            chunk_size: v.chunk_size,
            epoch: v.epoch.0,
        }
    }
}

impl TryFrom<pb::VolumeReply> for VolumeInfo {
    type Error = ConvertError;
    fn try_from(m: pb::VolumeReply) -> Result<Self, ConvertError> {
        required(m.volume, "VolumeReply.volume")?.try_into()
    }
}

impl From<VolumeInfo> for pb::VolumeReply {
    fn from(v: VolumeInfo) -> Self {
        pb::VolumeReply { volume: Some(v.into()) }
    }
}

impl TryFrom<pb::ListVolumesReply> for Vec<VolumeInfo> {
    type Error = ConvertError;
    fn try_from(m: pb::ListVolumesReply) -> Result<Self, ConvertError> {
        list(m.volumes)
    }
}

impl From<Vec<VolumeInfo>> for pb::ListVolumesReply {
    fn from(v: Vec<VolumeInfo>) -> Self {
        pb::ListVolumesReply { volumes: to_pb(v) }
    }
}

impl TryFrom<pb::CreateVolumeRequest> for CreateVolume {
    type Error = ConvertError;
    fn try_from(m: pb::CreateVolumeRequest) -> Result<Self, ConvertError> {
        validate_volume_size(m.size).field("CreateVolumeRequest.size")?;
        Ok(CreateVolume {
            name: name(m.name, "CreateVolumeRequest.name")?,
            size: m.size,
            pool: name(m.pool, "CreateVolumeRequest.pool")?,
        })
    }
}

impl From<CreateVolume> for pb::CreateVolumeRequest {
    fn from(c: CreateVolume) -> Self {
        pb::CreateVolumeRequest { name: c.name, size: c.size, pool: c.pool }
    }
}

/// `GetVolume` and `DeleteVolume` name a volume; the name is validated.
impl TryFrom<pb::VolumeByName> for String {
    type Error = ConvertError;
    fn try_from(m: pb::VolumeByName) -> Result<Self, ConvertError> {
        name(m.name, "VolumeByName.name")
    }
}

impl From<&str> for pb::VolumeByName {
    fn from(name: &str) -> Self {
        pb::VolumeByName { name: name.to_owned() }
    }
}

impl TryFrom<pb::ResizeVolumeRequest> for ResizeVolume {
    type Error = ConvertError;
    fn try_from(m: pb::ResizeVolumeRequest) -> Result<Self, ConvertError> {
        validate_volume_size(m.size).field("ResizeVolumeRequest.size")?;
        Ok(ResizeVolume { name: name(m.name, "ResizeVolumeRequest.name")?, size: m.size })
    }
}

impl From<ResizeVolume> for pb::ResizeVolumeRequest {
    fn from(r: ResizeVolume) -> Self {
        pb::ResizeVolumeRequest { name: r.name, size: r.size }
    }
}

impl TryFrom<pb::AttachVolumeRequest> for AttachVolume {
    type Error = ConvertError;
    fn try_from(m: pb::AttachVolumeRequest) -> Result<Self, ConvertError> {
        Ok(AttachVolume { name: name(m.name, "AttachVolumeRequest.name")?, read_only: m.read_only, force: m.force })
    }
}

impl From<AttachVolume> for pb::AttachVolumeRequest {
    fn from(a: AttachVolume) -> Self {
        pb::AttachVolumeRequest { name: a.name, read_only: a.read_only, force: a.force }
    }
}

impl TryFrom<pb::AttachVolumeReply> for Attachment {
    type Error = ConvertError;
    fn try_from(m: pb::AttachVolumeReply) -> Result<Self, ConvertError> {
        Ok(Attachment {
            volume: required(m.volume, "AttachVolumeReply.volume")?.try_into()?,
            epoch: Epoch(nonzero(m.epoch, "AttachVolumeReply.epoch")?),
        })
    }
}

impl From<Attachment> for pb::AttachVolumeReply {
    fn from(a: Attachment) -> Self {
        pb::AttachVolumeReply { volume: Some(a.volume.into()), epoch: a.epoch.0 }
    }
}

impl TryFrom<pb::DetachVolumeRequest> for DetachVolume {
    type Error = ConvertError;
    fn try_from(m: pb::DetachVolumeRequest) -> Result<Self, ConvertError> {
        Ok(DetachVolume {
            name: name(m.name, "DetachVolumeRequest.name")?,
            epoch: (m.epoch != 0).then_some(Epoch(m.epoch)),
        })
    }
}

impl From<DetachVolume> for pb::DetachVolumeRequest {
    fn from(d: DetachVolume) -> Self {
        pb::DetachVolumeRequest { name: d.name, epoch: d.epoch.map_or(0, |e| e.0) }
    }
}

// ----- placement -----

/// The caller's map version (`MapVersion(0)` = none yet).
impl From<pb::GetPlacementRequest> for MapVersion {
    fn from(m: pb::GetPlacementRequest) -> Self {
        MapVersion(m.map_version)
    }
}

impl From<MapVersion> for pb::GetPlacementRequest {
    fn from(v: MapVersion) -> Self {
        pb::GetPlacementRequest { map_version: v.0 }
    }
}

/// Collect `(key, value)` pairs, refusing a key seen twice: a repeated field
/// on the wire must not silently overwrite an earlier entry.
fn keyed<K: Ord + Copy + Into<u64>, V>(
    items: impl IntoIterator<Item = (K, V)>,
    what: &'static str,
) -> Result<BTreeMap<K, V>, ConvertError> {
    let mut map = BTreeMap::new();
    for (k, v) in items {
        if map.insert(k, v).is_some() {
            return Err(ConvertError::invalid(what, ValidationError::Duplicate { what, id: k.into() }));
        }
    }
    Ok(map)
}

impl TryFrom<pb::PlacementMap> for PlacementMap {
    type Error = ConvertError;
    /// Every entry is validated, then the whole map's references
    /// ([`PlacementMap::validate`]): a client never routes with a map that
    /// points at a shard or node it does not contain.
    fn try_from(m: pb::PlacementMap) -> Result<Self, ConvertError> {
        let pools: Vec<PoolInfo> = list(m.pools)?;
        let volumes: Vec<VolumeInfo> = list(m.volumes)?;
        let shards: Vec<ShardInfo> = list(m.shards)?;
        let nodes: Vec<NodeAddr> = list(m.nodes)?;
        let map = PlacementMap {
            version: MapVersion(nonzero(m.map_version, "PlacementMap.map_version")?),
            pools: keyed(pools.into_iter().map(|p| (p.id.0, p)), "PlacementMap.pools")?
                .into_iter()
                .map(|(k, v)| (PoolId(k), v))
                .collect(),
            volumes: keyed(volumes.into_iter().map(|v| (v.id.0, v)), "PlacementMap.volumes")?
                .into_iter()
                .map(|(k, v)| (VolumeId(k), v))
                .collect(),
            shards: keyed(shards.into_iter().map(|s| (s.id.0, s)), "PlacementMap.shards")?
                .into_iter()
                .map(|(k, v)| (ShardId(k), v))
                .collect(),
            nodes: keyed(nodes.into_iter().map(|n| (n.id.0, n.addr)), "PlacementMap.nodes")?
                .into_iter()
                .map(|(k, v)| (NodeId(k), v))
                .collect(),
        };
        map.validate().field("PlacementMap")?;
        Ok(map)
    }
}

impl From<PlacementMap> for pb::PlacementMap {
    fn from(m: PlacementMap) -> Self {
        pb::PlacementMap {
            map_version: m.version.0,
            pools: to_pb(m.pools.into_values().collect()),
            volumes: to_pb(m.volumes.into_values().collect()),
            shards: to_pb(m.shards.into_values().collect()),
            nodes: m.nodes.into_iter().map(|(id, addr)| pb::NodeAddr { id: id.0, addr }).collect(),
        }
    }
}

impl TryFrom<pb::GetPlacementReply> for PlacementReply {
    type Error = ConvertError;
    fn try_from(m: pb::GetPlacementReply) -> Result<Self, ConvertError> {
        Ok(PlacementReply {
            cluster: ClusterId(nonzero(m.cluster_id, "GetPlacementReply.cluster_id")?),
            map: m.map.map(TryInto::try_into).transpose()?,
        })
    }
}

impl From<PlacementReply> for pb::GetPlacementReply {
    fn from(r: PlacementReply) -> Self {
        pb::GetPlacementReply { cluster_id: r.cluster.0, map: r.map.map(Into::into) }
    }
}

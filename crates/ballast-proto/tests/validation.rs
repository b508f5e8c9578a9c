//! Every rule enforced on receipt: a message that breaks it is refused with a
//! `ConvertError` naming the field, and never reaches domain code.

mod common;

use std::fmt::Debug;

use bytes::Bytes;
use tonic::{Code, Status};

use ballast_proto::{pb, status_from_api_error, ConvertError, Problem, ProtoError, Reply, SnapshotSequencer};
use ballast_types::{
    ApiError, Attachment, ClusterStatus, CreateVolume, DetachVolume, DiskInfo, ErrorCode, InitCluster,
    InitClusterReply, JoinNode, JoinNodeReply, NodeAddr, NodeHello, NodeInfo, NodeStats, PlacementMap, PlacementReply,
    PoolInfo, PoolSpec, RaftRequest, RangeRequest, RebuildProgress, ResizeVolume, Retryable, ShardInfo, ShardStatus,
    SnapshotChunk, ValidationError, VolumeInfo, VolumeIo, WriteRequest, ZeroRequest, MAX_IO_LEN, MAX_RANGE_LEN,
};
use common::{bytes, sample_map};

/// Converting `p` fails on `field`; returns the problem for finer checks.
#[track_caller]
fn fails<D: TryFrom<P, Error = ConvertError> + Debug, P>(p: P, field: &str) -> Problem {
    match D::try_from(p) {
        Err(e) => {
            assert_eq!(e.field, field, "{e}");
            e.problem
        }
        Ok(d) => panic!("accepted {d:?}, expected a failure on {field}"),
    }
}

#[track_caller]
fn invalid(p: Problem) -> ValidationError {
    match p {
        Problem::Invalid(v) => v,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

fn write(data: Bytes) -> pb::WriteRequest {
    pb::WriteRequest { volume_id: 1, epoch: 1, offset: 0, crc32c: ballast_types::crc32c(&data), data }
}

#[test]
fn write_requests_are_checked() {
    assert_eq!(
        fails::<WriteRequest, _>(pb::WriteRequest { volume_id: 0, ..write(bytes(10, 0)) }, "WriteRequest.volume_id"),
        Problem::Missing
    );
    assert_eq!(
        fails::<WriteRequest, _>(pb::WriteRequest { epoch: 0, ..write(bytes(10, 0)) }, "WriteRequest.epoch"),
        Problem::Missing
    );
    assert_eq!(
        invalid(fails::<WriteRequest, _>(write(Bytes::new()), "WriteRequest.data")),
        ValidationError::EmptyRange
    );
    let big = write(Bytes::from(vec![0u8; MAX_IO_LEN as usize + 1]));
    assert!(matches!(
        invalid(fails::<WriteRequest, _>(big, "WriteRequest.data")),
        ValidationError::RangeTooLong { .. }
    ));
    let over = pb::WriteRequest { offset: u64::MAX - 3, ..write(bytes(10, 0)) };
    assert!(matches!(
        invalid(fails::<WriteRequest, _>(over, "WriteRequest.data")),
        ValidationError::RangeOverflow { .. }
    ));

    // A flipped bit anywhere in the payload is caught, and is retryable.
    let mut bad = write(bytes(4096, 7));
    let mut v = bad.data.to_vec();
    v[1234] ^= 0x10;
    bad.data = v.into();
    let e = WriteRequest::try_from(bad).unwrap_err();
    assert!(matches!(e.problem, Problem::Invalid(ValidationError::CrcMismatch { .. })));
    assert_eq!(e.code(), ErrorCode::BadChecksum);
    assert!(e.is_retryable());
    assert_eq!(Status::from(e).code(), Code::Aborted);
}

#[test]
fn range_requests_are_checked() {
    let z = pb::ZeroRequest { volume_id: 1, epoch: 1, offset: 0, length: 4096, punch: false };
    assert_eq!(
        fails::<ZeroRequest, _>(pb::ZeroRequest { volume_id: 0, ..z }, "ZeroRequest.volume_id"),
        Problem::Missing
    );
    assert_eq!(fails::<ZeroRequest, _>(pb::ZeroRequest { epoch: 0, ..z }, "ZeroRequest.epoch"), Problem::Missing);
    assert_eq!(
        invalid(fails::<ZeroRequest, _>(pb::ZeroRequest { length: 0, ..z }, "ZeroRequest.length")),
        ValidationError::EmptyRange
    );
    fails::<ZeroRequest, _>(pb::ZeroRequest { length: MAX_RANGE_LEN + 1, ..z }, "ZeroRequest.length");
    fails::<ZeroRequest, _>(pb::ZeroRequest { offset: u64::MAX, ..z }, "ZeroRequest.length");

    let r = pb::ReadRequest { volume_id: 1, offset: 0, length: 4096 };
    assert_eq!(
        fails::<RangeRequest, _>(pb::ReadRequest { volume_id: 0, ..r }, "ReadRequest.volume_id"),
        Problem::Missing
    );
    fails::<RangeRequest, _>(pb::ReadRequest { length: 0, ..r }, "ReadRequest.length");
    fails::<RangeRequest, _>(pb::ReadRequest { length: MAX_IO_LEN + 1, ..r }, "ReadRequest.length");
    let b = pb::BlockStatusRequest { volume_id: 1, offset: 0, length: MAX_RANGE_LEN };
    assert!(RangeRequest::try_from(b).is_ok());
    fails::<RangeRequest, _>(pb::BlockStatusRequest { volume_id: 0, ..b }, "BlockStatusRequest.volume_id");
    fails::<RangeRequest, _>(pb::BlockStatusRequest { length: 0, ..b }, "BlockStatusRequest.length");
}

#[track_caller]
fn reply_fails<R: Reply>(r: R, field: &str) -> Problem
where
    R::Ok: Debug,
{
    match r.into_result() {
        Err(ProtoError::Convert(e)) => {
            assert_eq!(e.field, field);
            e.problem
        }
        other => panic!("expected a conversion failure on {field}, got {other:?}"),
    }
}

#[test]
fn replies_are_checked() {
    use pb::read_segment::Body;
    let seg = |offset, body| pb::ReadSegment { offset, body };
    let data = |d: Bytes| Some(Body::Data(pb::DataSegment { crc32c: ballast_types::crc32c(&d), data: d }));
    let read = |segments| pb::ReadReply { error: None, segments };
    reply_fails(read(vec![seg(0, None)]), "ReadSegment.body");
    let p = reply_fails(read(vec![seg(0, data(bytes(10, 1))), seg(11, data(bytes(10, 1)))]), "ReadReply.segments");
    assert_eq!(invalid(p), ValidationError::NotContiguous(11));
    let bad_crc = Some(Body::Data(pb::DataSegment { data: bytes(10, 1), crc32c: 0 }));
    let e = read(vec![seg(0, bad_crc)]).into_result().unwrap_err();
    assert!(e.is_retryable(), "a damaged read reply may be re-read: {e}");
    reply_fails(read(vec![seg(0, data(Bytes::new()))]), "ReadReply.segments");
    reply_fails(read(vec![seg(0, Some(Body::HoleLen(0)))]), "ReadReply.segments");

    let ext = |offset, length| pb::Extent { offset, length, hole: false };
    let bs = |extents| pb::BlockStatusReply { error: None, extents };
    reply_fails(bs(vec![ext(0, 4096), ext(8192, 4096)]), "BlockStatusReply.extents");
    reply_fails(bs(vec![ext(0, 0)]), "BlockStatusReply.extents");
    assert_eq!(reply_fails(pb::RaftReply::default(), "RaftReply.payload"), Problem::Missing);
    assert_eq!(reply_fails(pb::NodeHelloReply::default(), "NodeHelloReply.cluster_id"), Problem::Missing);
}

#[test]
fn raft_messages_are_checked() {
    let h = pb::NodeHello { cluster_id: 1, node_id: 2, addr: "n2:7000".into(), protocol_version: 1 };
    fails::<NodeHello, _>(pb::NodeHello { cluster_id: 0, ..h.clone() }, "NodeHello.cluster_id");
    fails::<NodeHello, _>(pb::NodeHello { node_id: 0, ..h.clone() }, "NodeHello.node_id");
    fails::<NodeHello, _>(pb::NodeHello { addr: "n2".into(), ..h.clone() }, "NodeHello.addr");
    fails::<NodeHello, _>(pb::NodeHello { protocol_version: 0, ..h.clone() }, "NodeHello.protocol_version");
    let future = NodeHello::try_from(pb::NodeHello { protocol_version: 2, ..h }).unwrap();
    assert_eq!(future.check_version().unwrap_err().code, ErrorCode::VersionMismatch);

    let r = pb::RaftRequest { cluster_id: 1, from_node: 1, target_node: 2, group: 0, payload: bytes(5, 0) };
    fails::<RaftRequest, _>(pb::RaftRequest { cluster_id: 0, ..r.clone() }, "RaftRequest.cluster_id");
    fails::<RaftRequest, _>(pb::RaftRequest { from_node: 0, ..r.clone() }, "RaftRequest.from_node");
    fails::<RaftRequest, _>(pb::RaftRequest { target_node: 0, ..r.clone() }, "RaftRequest.target_node");
    fails::<RaftRequest, _>(pb::RaftRequest { payload: Bytes::new(), ..r }, "RaftRequest.payload");

    let first = pb::SnapshotChunk {
        cluster_id: 1,
        from_node: 1,
        target_node: 2,
        group: 3,
        offset: 0,
        vote: bytes(4, 0),
        meta: bytes(4, 1),
        data: bytes(100, 2),
        done: false,
    };
    let next = pb::SnapshotChunk { offset: 100, vote: Bytes::new(), meta: Bytes::new(), ..first.clone() };
    fails::<SnapshotChunk, _>(pb::SnapshotChunk { cluster_id: 0, ..first.clone() }, "SnapshotChunk.cluster_id");
    fails::<SnapshotChunk, _>(pb::SnapshotChunk { vote: Bytes::new(), ..first.clone() }, "SnapshotChunk.vote");
    fails::<SnapshotChunk, _>(pb::SnapshotChunk { meta: Bytes::new(), ..first.clone() }, "SnapshotChunk.meta");
    fails::<SnapshotChunk, _>(pb::SnapshotChunk { vote: bytes(1, 0), ..next.clone() }, "SnapshotChunk.vote");
    fails::<SnapshotChunk, _>(pb::SnapshotChunk { meta: bytes(1, 0), ..next.clone() }, "SnapshotChunk.meta");

    let c = |m: &pb::SnapshotChunk| SnapshotChunk::try_from(m.clone()).unwrap();
    let mut seq = SnapshotSequencer::default();
    assert_eq!(seq.accept(&c(&next)).unwrap_err().field, "SnapshotChunk.offset");
    seq.accept(&c(&first)).unwrap();
    assert_eq!(
        seq.accept(&c(&pb::SnapshotChunk { group: 4, ..next.clone() })).unwrap_err().field,
        "SnapshotChunk.group"
    );
    assert_eq!(
        seq.accept(&c(&pb::SnapshotChunk { offset: 99, ..next.clone() })).unwrap_err().field,
        "SnapshotChunk.offset"
    );
    assert!(!seq.is_complete());
    seq.accept(&c(&pb::SnapshotChunk { done: true, ..next.clone() })).unwrap();
    assert!(seq.is_complete() && seq.received() == 200);
    let after = pb::SnapshotChunk { offset: 200, ..next };
    assert_eq!(seq.accept(&c(&after)).unwrap_err().field, "SnapshotChunk.done");
}

fn spec() -> pb::PoolSpec {
    pb::PoolSpec { name: "fast".into(), replicas: 3, shards: 16, failure_domain: pb::FailureDomain::Node as i32 }
}

#[test]
fn pools_and_nodes_are_checked() {
    let name = |n: &str| pb::PoolSpec { name: n.into(), ..spec() };
    assert_eq!(invalid(fails::<PoolSpec, _>(name(""), "PoolSpec")), ValidationError::EmptyName);
    assert_eq!(invalid(fails::<PoolSpec, _>(name("a b"), "PoolSpec")), ValidationError::NameChar(' '));
    assert_eq!(invalid(fails::<PoolSpec, _>(name(&"x".repeat(129)), "PoolSpec")), ValidationError::NameTooLong);
    for r in [0, 6] {
        assert_eq!(
            invalid(fails::<PoolSpec, _>(pb::PoolSpec { replicas: r, ..spec() }, "PoolSpec")),
            ValidationError::Replicas(r)
        );
    }
    for s in [0, 4097] {
        assert_eq!(
            invalid(fails::<PoolSpec, _>(pb::PoolSpec { shards: s, ..spec() }, "PoolSpec")),
            ValidationError::Shards(s)
        );
    }
    assert_eq!(
        fails::<PoolSpec, _>(pb::PoolSpec { failure_domain: 0, ..spec() }, "PoolSpec.failure_domain"),
        Problem::Missing
    );
    assert_eq!(
        fails::<PoolSpec, _>(pb::PoolSpec { failure_domain: 9, ..spec() }, "PoolSpec.failure_domain"),
        Problem::UnknownEnum(9)
    );
    fails::<PoolSpec, _>(pb::CreatePoolRequest { spec: None }, "CreatePoolRequest.spec");
    fails::<PoolInfo, _>(pb::Pool { id: 1, spec: None, first_shard: 0 }, "Pool.spec");
    fails::<PoolInfo, _>(pb::Pool { id: 1, spec: Some(spec()), first_shard: u32::MAX - 2 }, "Pool.first_shard");
    fails::<PoolInfo, _>(pb::PoolReply { pool: None }, "PoolReply.pool");

    fails::<DiskInfo, _>(pb::Disk { path: String::new(), capacity: 1, used: 0 }, "Disk.path");
    let node = pb::Node { id: 1, addr: "n1:7000".into(), zone: "az1".into(), up: true, disks: vec![] };
    fails::<NodeInfo, _>(pb::Node { id: 0, ..node.clone() }, "Node.id");
    fails::<NodeInfo, _>(pb::Node { addr: "n1:x".into(), ..node.clone() }, "Node.addr");
    fails::<NodeInfo, _>(pb::Node { zone: "a/z".into(), ..node.clone() }, "Node.zone");
    let bad_disk = pb::Disk { path: String::new(), capacity: 0, used: 0 };
    fails::<NodeInfo, _>(pb::Node { disks: vec![bad_disk], ..node }, "Disk.path");
    fails::<NodeAddr, _>(pb::NodeAddr { id: 0, addr: "n1:1".into() }, "NodeAddr.id");
    fails::<NodeAddr, _>(pb::NodeAddr { id: 1, addr: String::new() }, "NodeAddr.addr");

    let init = |eps: &[&str]| pb::InitClusterRequest {
        endpoints: eps.iter().map(|s| s.to_string()).collect(),
        default_pool: None,
    };
    fails::<InitCluster, _>(init(&[]), "InitClusterRequest.endpoints");
    fails::<InitCluster, _>(init(&["n1:1"; 8]), "InitClusterRequest.endpoints");
    fails::<InitCluster, _>(init(&["n1:1", "n1:1"]), "InitClusterRequest.endpoints");
    fails::<InitCluster, _>(init(&["n1"]), "InitClusterRequest.endpoints");
    fails::<InitCluster, _>(
        pb::InitClusterRequest { default_pool: Some(pb::PoolSpec { replicas: 9, ..spec() }), ..init(&["n1:1"]) },
        "PoolSpec",
    );
    fails::<InitClusterReply, _>(pb::InitClusterReply::default(), "InitClusterReply.cluster_id");

    let join = pb::JoinNodeRequest {
        node_id: 0,
        addr: "n4:7000".into(),
        zone: String::new(),
        disks: vec![],
        token: "t".into(),
        protocol_version: 1,
    };
    assert!(JoinNode::try_from(join.clone()).is_ok());
    fails::<JoinNode, _>(pb::JoinNodeRequest { addr: "n4".into(), ..join.clone() }, "JoinNodeRequest");
    fails::<JoinNode, _>(pb::JoinNodeRequest { token: String::new(), ..join.clone() }, "JoinNodeRequest");
    fails::<JoinNode, _>(pb::JoinNodeRequest { token: "t".repeat(1025), ..join.clone() }, "JoinNodeRequest");
    fails::<JoinNode, _>(pb::JoinNodeRequest { zone: "ö".into(), ..join.clone() }, "JoinNodeRequest.zone");
    fails::<JoinNode, _>(pb::JoinNodeRequest { protocol_version: 0, ..join }, "JoinNodeRequest.protocol_version");
    fails::<JoinNodeReply, _>(pb::JoinNodeReply { cluster_id: 1, node_id: 0 }, "JoinNodeReply.node_id");
    fails::<JoinNodeReply, _>(pb::JoinNodeReply { cluster_id: 0, node_id: 1 }, "JoinNodeReply.cluster_id");
}

#[test]
fn shards_and_status_are_checked() {
    let shard = |voters: Vec<u64>| pb::Shard { id: 1, pool_id: 1, voters, leader: 0, joining: vec![] };
    fails::<ShardInfo, _>(pb::Shard { joining: vec![9], ..shard(vec![1, 2]) }, "Shard.voters");
    fails::<ShardInfo, _>(pb::Shard { joining: vec![1], ..shard(vec![1]) }, "Shard.voters");
    fails::<ShardInfo, _>(shard(vec![]), "Shard.voters");
    fails::<ShardInfo, _>(shard(vec![1, 2, 3, 4, 5, 6]), "Shard.voters");
    fails::<ShardInfo, _>(shard(vec![1, 0]), "Shard.voters");
    let dup = invalid(fails::<ShardInfo, _>(shard(vec![1, 2, 1]), "Shard.voters"));
    assert_eq!(dup, ValidationError::Duplicate { what: "voter", id: 1 });
    fails::<ShardStatus, _>(pb::ShardStatus { shard: None, ..Default::default() }, "ShardStatus.shard");
    fails::<RebuildProgress, _>(pb::Rebuild { done_bytes: 2, total_bytes: 1 }, "Rebuild.done_bytes");
    fails::<VolumeIo, _>(pb::VolumeIo { volume_id: 0, reads: 1, ..Default::default() }, "VolumeIo.volume_id");
    fails::<NodeStats, _>(pb::NodeStatsReply::default(), "NodeStatsReply.node_id");
    let st = pb::ClusterStatusReply { cluster_id: 1, protocol_version: 1, ..Default::default() };
    assert!(ClusterStatus::try_from(st.clone()).is_ok());
    fails::<ClusterStatus, _>(pb::ClusterStatusReply { cluster_id: 0, ..st.clone() }, "ClusterStatusReply.cluster_id");
    fails::<ClusterStatus, _>(
        pb::ClusterStatusReply { protocol_version: 0, ..st },
        "ClusterStatusReply.protocol_version",
    );
}

#[test]
fn volumes_are_checked() {
    let v = pb::Volume { id: 1, name: "db".into(), size: 1 << 30, pool_id: 1, chunk_size: 4 << 20, epoch: 0 };
    assert!(VolumeInfo::try_from(v.clone()).is_ok());
    fails::<VolumeInfo, _>(pb::Volume { id: 0, ..v.clone() }, "Volume.id");
    assert_eq!(
        invalid(fails::<VolumeInfo, _>(pb::Volume { name: "".into(), ..v.clone() }, "Volume")),
        ValidationError::EmptyName
    );
    assert_eq!(
        invalid(fails::<VolumeInfo, _>(pb::Volume { size: 0, ..v.clone() }, "Volume")),
        ValidationError::ZeroSize
    );
    assert_eq!(
        invalid(fails::<VolumeInfo, _>(pb::Volume { size: 4097, ..v.clone() }, "Volume")),
        ValidationError::UnalignedSize(4097)
    );
    assert_eq!(
        invalid(fails::<VolumeInfo, _>(pb::Volume { size: 1 << 61, ..v.clone() }, "Volume")),
        ValidationError::SizeTooLarge(1 << 61)
    );
    for cs in [0, 4096, 3 << 20, 2 << 30] {
        assert_eq!(
            invalid(fails::<VolumeInfo, _>(pb::Volume { chunk_size: cs, ..v.clone() }, "Volume")),
            ValidationError::ChunkSize(cs)
        );
    }
    fails::<VolumeInfo, _>(pb::VolumeReply { volume: None }, "VolumeReply.volume");
    fails::<Vec<VolumeInfo>, _>(pb::ListVolumesReply { volumes: vec![pb::Volume { id: 0, ..v.clone() }] }, "Volume.id");

    let c = pb::CreateVolumeRequest { name: "db".into(), size: 1 << 30, pool: "fast".into() };
    fails::<CreateVolume, _>(pb::CreateVolumeRequest { name: "d b".into(), ..c.clone() }, "CreateVolumeRequest.name");
    fails::<CreateVolume, _>(pb::CreateVolumeRequest { size: 100, ..c.clone() }, "CreateVolumeRequest.size");
    fails::<CreateVolume, _>(pb::CreateVolumeRequest { pool: String::new(), ..c }, "CreateVolumeRequest.pool");
    fails::<String, _>(pb::VolumeByName { name: "../etc".into() }, "VolumeByName.name");
    fails::<ResizeVolume, _>(pb::ResizeVolumeRequest { name: "db".into(), size: 0 }, "ResizeVolumeRequest.size");
    fails::<ResizeVolume, _>(pb::ResizeVolumeRequest { name: "".into(), size: 4096 }, "ResizeVolumeRequest.name");
    fails::<ballast_types::AttachVolume, _>(pb::AttachVolumeRequest::default(), "AttachVolumeRequest.name");
    fails::<Attachment, _>(pb::AttachVolumeReply { volume: Some(v.clone()), epoch: 0 }, "AttachVolumeReply.epoch");
    fails::<Attachment, _>(pb::AttachVolumeReply { volume: None, epoch: 1 }, "AttachVolumeReply.volume");
    fails::<DetachVolume, _>(pb::DetachVolumeRequest { name: "".into(), epoch: 1 }, "DetachVolumeRequest.name");
}

#[test]
fn placement_maps_are_checked() {
    let good = pb::PlacementMap::from(sample_map());
    assert!(PlacementMap::try_from(good.clone()).is_ok());
    fails::<PlacementMap, _>(pb::PlacementMap { map_version: 0, ..good.clone() }, "PlacementMap.map_version");

    let mut dup = good.clone();
    dup.pools.push(dup.pools[0].clone());
    assert_eq!(
        invalid(fails::<PlacementMap, _>(dup, "PlacementMap.pools")),
        ValidationError::Duplicate { what: "PlacementMap.pools", id: 1 }
    );
    let mut dup = good.clone();
    dup.nodes.push(dup.nodes[0].clone());
    fails::<PlacementMap, _>(dup, "PlacementMap.nodes");

    let dangling = |m: pb::PlacementMap| match invalid(fails::<PlacementMap, _>(m, "PlacementMap")) {
        ValidationError::Dangling { what, target, .. } => (what, target),
        other => panic!("{other:?}"),
    };
    let mut m = good.clone();
    m.volumes[0].pool_id = 42;
    assert_eq!(dangling(m), ("volume", "pool"));
    let mut m = good.clone();
    m.shards.retain(|s| s.id != 2);
    assert_eq!(dangling(m), ("pool", "shard"));
    let mut m = good.clone();
    m.shards[0].voters.push(77);
    assert_eq!(dangling(m), ("shard voter", "node"));
    let mut m = good.clone();
    m.shards.push(pb::Shard { id: 100, pool_id: 1, voters: vec![1], leader: 0, joining: vec![] });
    assert_eq!(dangling(m), ("shard", "pool"));
    let mut m = good.clone();
    let s = m.shards.iter_mut().find(|s| s.id == 0).unwrap();
    s.pool_id = 2;
    fails::<PlacementMap, _>(m, "PlacementMap");
    fails::<PlacementReply, _>(
        pb::GetPlacementReply { cluster_id: 0, map: Some(good) },
        "GetPlacementReply.cluster_id",
    );
}

#[test]
fn statuses_keep_their_typed_errors() {
    let e = ApiError { leader_hint: None, ..ApiError::stale_map(ballast_types::MapVersion(9)) };
    let s = status_from_api_error(&e);
    assert_eq!(s.code(), Code::Aborted);
    match ProtoError::from(s) {
        ProtoError::Api(got) => assert_eq!(got, e),
        other => panic!("{other:?}"),
    }
    // A bare Status from the transport keeps its code and gets a retry verdict.
    for (code, retry) in [
        (Code::Unavailable, true),
        (Code::DeadlineExceeded, true),
        (Code::InvalidArgument, false),
        (Code::Internal, false),
    ] {
        let p = ProtoError::from(Status::new(code, "x"));
        assert!(matches!(p, ProtoError::Transport(_)));
        assert_eq!(p.is_retryable(), retry, "{code:?}");
        assert_eq!(Status::from(p).code(), code);
    }
    // Details that are not ours are ignored rather than misread.
    let foreign = Status::with_details(Code::Internal, "x", Bytes::from_static(b"\xff\xff\xff"));
    assert!(matches!(ProtoError::from(foreign), ProtoError::Transport(_)));
    // A conversion failure on receipt becomes INVALID with the field in the message.
    let s = Status::from(ConvertError::missing("WriteRequest.epoch"));
    assert_eq!(s.code(), Code::InvalidArgument);
    match ProtoError::from(s) {
        ProtoError::Api(got) => {
            assert_eq!(got.code, ErrorCode::Invalid);
            assert!(got.message.contains("WriteRequest.epoch"));
        }
        other => panic!("{other:?}"),
    }
    // A newer peer's code is Unknown and not retried.
    let e = ApiError::from(pb::Error { code: 1000, ..Default::default() });
    assert_eq!(e.code, ErrorCode::Unknown);
    assert!(!e.is_retryable());
    // A hint without a node id is dropped, not trusted.
    let e = ApiError::from(pb::Error { code: 1, leader_hint: Some(pb::LeaderHint::default()), ..Default::default() });
    assert_eq!((e.code, e.leader_hint), (ErrorCode::NotLeader, None));
}

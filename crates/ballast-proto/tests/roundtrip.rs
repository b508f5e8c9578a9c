//! Every message survives domain → protobuf bytes → domain unchanged, and
//! every reply carries its typed error through.

mod common;

use bytes::Bytes;

use ballast_proto::{pb, status_from_api_error, ProtoError, Reply};
use ballast_types::{
    ApiError, AttachVolume, Attachment, ClusterId, ClusterStatus, CreateVolume, DetachVolume, DiskInfo, Epoch,
    ErrorCode, Extent, FailureDomain, GroupId, InitCluster, InitClusterReply, JoinNode, JoinNodeReply, LeaderHint,
    MapVersion, NodeAddr, NodeHello, NodeId, NodeInfo, NodeStats, PlacementReply, PoolInfo, PoolSpec, RaftEnvelope,
    RaftRequest, RangeRequest, ReadData, ReadSegment, RebuildProgress, ResizeVolume, ScrubReport, SegmentBody, ShardId,
    ShardInfo, ShardStatus, SnapshotChunk, SnapshotStart, VolumeId, VolumeInfo, VolumeIo, WriteRequest, ZeroRequest,
    PROTOCOL_VERSION,
};
use common::{bytes, pool, roundtrip, sample_map, volume, wire};

fn envelope() -> RaftEnvelope {
    RaftEnvelope { cluster: ClusterId(99), from: NodeId(1), target: NodeId(2), group: GroupId::for_shard(ShardId(5)) }
}

#[test]
fn data_requests_round_trip() {
    roundtrip::<_, pb::WriteRequest>(WriteRequest::new(VolumeId(3), Epoch(2), 4096 * 7 + 512, bytes(8192, 1)));
    roundtrip::<_, pb::ZeroRequest>(ZeroRequest {
        volume: VolumeId(3),
        epoch: Epoch(2),
        offset: 1 << 20,
        length: 4 << 20,
        punch: true,
    });
    let r = RangeRequest { volume: VolumeId(3), offset: 12345, length: 65536 };
    roundtrip::<_, pb::ReadRequest>(r);
    roundtrip::<_, pb::BlockStatusRequest>(r);
}

#[test]
fn data_replies_carry_results_and_errors() {
    assert_eq!(wire(pb::WriteReply::from(Ok(()))).into_result().ok(), Some(()));
    assert_eq!(wire(pb::ZeroReply::from(Ok(()))).into_result().ok(), Some(()));
    assert_eq!(wire(pb::FlushReply::from(Ok(()))).into_result().ok(), Some(()));

    let read = ReadData {
        segments: vec![
            ReadSegment::data(4096, bytes(4096, 9)),
            ReadSegment { offset: 8192, body: SegmentBody::Hole(1 << 20) },
            ReadSegment::data(8192 + (1 << 20), bytes(100, 3)),
        ],
    };
    assert_eq!(wire(pb::ReadReply::from(Ok(read.clone()))).into_result().ok(), Some(read));
    let extents =
        vec![Extent { offset: 0, length: 4096, hole: false }, Extent { offset: 4096, length: 1 << 22, hole: true }];
    assert_eq!(wire(pb::BlockStatusReply::from(Ok(extents.clone()))).into_result().ok(), Some(extents));

    let hint = LeaderHint { node: NodeId(4), addr: "n4:7000".into() };
    let err = ApiError { map_version: Some(MapVersion(12)), ..ApiError::not_leader(Some(hint)) };
    let check = |got: Result<(), ProtoError>| match got {
        Err(ProtoError::Api(e)) => assert_eq!(e, err),
        other => panic!("expected the typed error, got {other:?}"),
    };
    check(wire(pb::WriteReply::from(Err(err.clone()))).into_result());
    check(wire(pb::ZeroReply::from(Err(err.clone()))).into_result());
    check(wire(pb::FlushReply::from(Err(err.clone()))).into_result());
    check(wire(pb::ReadReply::from(Err(err.clone()))).into_result().map(drop));
    check(wire(pb::BlockStatusReply::from(Err(err.clone()))).into_result().map(drop));
    check(wire(pb::RaftReply::from(Err(err.clone()))).into_result().map(drop));
    check(wire(pb::NodeHelloReply::from(Err(err.clone()))).into_result().map(drop));
}

#[test]
fn every_error_code_round_trips() {
    for code in ErrorCode::ALL {
        let e = ApiError::new(code, format!("{code} happened"));
        let back = ApiError::from(wire(pb::Error::from(e.clone())));
        // Unknown is what *we* call a newer peer's code; we send it as Internal.
        let want = if code == ErrorCode::Unknown { ErrorCode::Internal } else { code };
        assert_eq!(back.code, want);
        assert_eq!(back.message, e.message);
        // And through a Status, as Admin errors travel.
        match ProtoError::from(status_from_api_error(&e)) {
            ProtoError::Api(got) => assert_eq!(got.code, want),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn raft_messages_round_trip() {
    let hello = NodeHello { cluster: ClusterId(99), node: NodeId(1), addr: "n1:7000".into(), protocol_version: 1 };
    roundtrip::<_, pb::NodeHello>(hello.clone());
    let ack = wire(pb::NodeHelloReply::from(Ok(hello.clone()))).into_result().unwrap();
    assert_eq!(ack, NodeHello { addr: String::new(), ..hello });
    roundtrip::<_, pb::RaftRequest>(RaftRequest { envelope: envelope(), payload: bytes(300, 2) });
    let reply = wire(pb::RaftReply::from(Ok(bytes(40, 5)))).into_result().unwrap();
    assert_eq!(reply, bytes(40, 5));
    roundtrip::<_, pb::SnapshotChunk>(SnapshotChunk {
        envelope: envelope(),
        offset: 0,
        start: Some(SnapshotStart { vote: bytes(20, 1), meta: bytes(50, 2) }),
        data: bytes(1 << 16, 3),
        done: false,
    });
    roundtrip::<_, pb::SnapshotChunk>(SnapshotChunk {
        envelope: RaftEnvelope { group: GroupId::META, ..envelope() },
        offset: 1 << 16,
        start: None,
        data: Bytes::new(),
        done: true,
    });
}

#[test]
fn admin_messages_round_trip() {
    let spec = PoolSpec { name: "fast".into(), replicas: 3, shards: 64, failure_domain: FailureDomain::Node };
    roundtrip::<_, pb::PoolSpec>(spec.clone());
    roundtrip::<_, pb::CreatePoolRequest>(spec.clone());
    roundtrip::<_, pb::Pool>(pool(1, "fast", 64, 0));
    roundtrip::<_, pb::PoolReply>(pool(2, "cache", 1, 64));
    roundtrip::<_, pb::ListPoolsReply>(vec![pool(1, "fast", 64, 0), pool(2, "cache", 1, 64)]);
    roundtrip::<_, pb::ListPoolsReply>(Vec::<PoolInfo>::new());

    let disk = DiskInfo { path: "/var/lib/ballast/d0".into(), capacity: 1 << 40, used: 1 << 30 };
    roundtrip::<_, pb::Disk>(disk.clone());
    let node = NodeInfo {
        id: NodeId(3),
        addr: "10.0.0.3:7000".into(),
        zone: Some("az-1".into()),
        up: true,
        disks: vec![disk.clone()],
    };
    roundtrip::<_, pb::Node>(node.clone());
    roundtrip::<_, pb::Node>(NodeInfo { zone: None, up: false, disks: vec![], ..node.clone() });
    roundtrip::<_, pb::NodeAddr>(NodeAddr { id: NodeId(3), addr: "[::1]:7000".into() });

    roundtrip::<_, pb::InitClusterRequest>(InitCluster {
        endpoints: vec!["n1:7000".into(), "n2:7000".into(), "n3:7000".into()],
        default_pool: Some(spec.clone()),
    });
    roundtrip::<_, pb::InitClusterRequest>(InitCluster { endpoints: vec!["n1:7000".into()], default_pool: None });
    roundtrip::<_, pb::InitClusterReply>(InitClusterReply {
        cluster: ClusterId(0xdead_beef),
        members: vec![NodeAddr { id: NodeId(1), addr: "n1:7000".into() }],
    });
    let join = JoinNode {
        node: Some(NodeId(4)),
        addr: "n4:7000".into(),
        zone: Some("az-2".into()),
        disks: vec![disk],
        token: "s3cret".into(),
        protocol_version: PROTOCOL_VERSION,
    };
    roundtrip::<_, pb::JoinNodeRequest>(join.clone());
    roundtrip::<_, pb::JoinNodeRequest>(JoinNode { node: None, zone: None, ..join.clone() });
    assert!(!format!("{join:?}").contains("s3cret"));
    assert!(!format!("{:?}", pb::JoinNodeRequest::from(join)).contains("s3cret"));
    roundtrip::<_, pb::JoinNodeReply>(JoinNodeReply { cluster: ClusterId(5), node: NodeId(4) });

    let shard = ShardInfo {
        id: ShardId(7),
        pool: ballast_types::PoolId(1),
        voters: vec![NodeId(1), NodeId(3)],
        leader: None,
        joining: vec![],
    };
    roundtrip::<_, pb::Shard>(shard.clone());
    roundtrip::<_, pb::ShardStatus>(ShardStatus { shard: shard.clone(), under_replicated: true, rebuilding: None });
    let rebuilding = Some(RebuildProgress { done_bytes: 3 << 20, total_bytes: 8 << 20 });
    roundtrip::<_, pb::ShardStatus>(ShardStatus { shard: shard.clone(), under_replicated: true, rebuilding });
    let io = VolumeIo { volume: VolumeId(10), reads: 1, read_bytes: 4096, writes: 2, write_bytes: 8192 };
    let disk = DiskInfo { path: "/d".into(), capacity: 100, used: 7 };
    roundtrip::<_, pb::NodeStatsReply>(NodeStats {
        node: NodeId(2),
        disks: vec![disk.clone()],
        volumes: vec![io],
        scrub: None,
    });
    let scrub = ScrubReport {
        node: NodeId(2),
        passes: 3,
        running: true,
        last_finished_unix_ms: Some(1_700_000_000_000),
        blocks_checked: 9000,
        bytes_checked: 9000 * 4096,
        corrupt_found: 4,
        repaired: 3,
        unrepaired: 1,
        divergent_found: 5,
        realigned: 4,
        unrealigned: 1,
        no_majority: 2,
    };
    roundtrip::<_, pb::NodeStatsReply>(NodeStats {
        node: NodeId(2),
        disks: vec![disk],
        volumes: vec![],
        scrub: Some(scrub),
    });
    roundtrip::<_, pb::ScrubReply>(vec![scrub, ScrubReport { node: NodeId(4), ..Default::default() }]);
    let bad = pb::ScrubReport { node_id: 1, corrupt_found: 1, repaired: 1, unrepaired: 1, ..Default::default() };
    assert!(ScrubReport::try_from(bad).is_err(), "more repaired than found");
    let bad = pb::ScrubReport { node_id: 1, divergent_found: 1, realigned: 2, ..Default::default() };
    assert!(ScrubReport::try_from(bad).is_err(), "more realigned than found");
    assert!(ScrubReport::try_from(pb::ScrubReport::default()).is_err(), "node id required");
    roundtrip::<_, pb::ClusterStatusReply>(ClusterStatus {
        cluster: ClusterId(5),
        protocol_version: PROTOCOL_VERSION,
        map_version: MapVersion(9),
        meta_leader: Some(NodeId(1)),
        nodes: vec![node],
        shards: vec![ShardStatus { shard, under_replicated: false, rebuilding: None }],
        volume_io: vec![io, VolumeIo::new(VolumeId(11))],
        scrub: vec![scrub],
    });

    let vol = volume(10, "db", 1);
    roundtrip::<_, pb::Volume>(vol.clone());
    roundtrip::<_, pb::VolumeReply>(VolumeInfo { epoch: Epoch(0), ..vol.clone() });
    roundtrip::<_, pb::ListVolumesReply>(vec![vol.clone(), volume(11, "logs", 2)]);
    roundtrip::<_, pb::CreateVolumeRequest>(CreateVolume { name: "db".into(), size: 1 << 30, pool: "fast".into() });
    roundtrip::<_, pb::ResizeVolumeRequest>(ResizeVolume { name: "db".into(), size: 2 << 30 });
    roundtrip::<_, pb::AttachVolumeRequest>(AttachVolume { name: "db".into(), read_only: true, force: false });
    roundtrip::<_, pb::AttachVolumeReply>(Attachment { volume: vol, epoch: Epoch(4) });
    roundtrip::<_, pb::DetachVolumeRequest>(DetachVolume { name: "db".into(), epoch: Some(Epoch(4)) });
    roundtrip::<_, pb::DetachVolumeRequest>(DetachVolume { name: "db".into(), epoch: None });
    assert_eq!(String::try_from(wire(pb::VolumeByName::from("db"))), Ok("db".to_string()));
    assert_eq!(MapVersion::from(wire(pb::GetPlacementRequest::from(MapVersion(3)))), MapVersion(3));
}

#[test]
fn placement_map_round_trips_and_routes() {
    let map = sample_map();
    roundtrip::<_, pb::PlacementMap>(map.clone());
    roundtrip::<_, pb::GetPlacementReply>(PlacementReply { cluster: ClusterId(5), map: Some(map.clone()) });
    roundtrip::<_, pb::GetPlacementReply>(PlacementReply { cluster: ClusterId(5), map: None });
    // Volume 10 lives in pool 1 (shards 0..4), volume 11 in pool 2 (shards 4..6).
    for chunk in 0..100 {
        assert!(map.shard_of(VolumeId(10), chunk).unwrap().0 < 4);
        assert!((4..6).contains(&map.shard_of(VolumeId(11), chunk).unwrap().0));
    }
    assert_eq!(map.shard_of(VolumeId(12), 0), None);
    assert_eq!(map.leader_of(ShardId(0)), Some(NodeAddr { id: NodeId(1), addr: "node1:7000".into() }));
    assert_eq!(map.leader_of(ShardId(1)), None);
    assert_eq!(map.volume_by_name("scratch").map(|v| v.id), Some(VolumeId(11)));
}

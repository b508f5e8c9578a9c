//! Every protobuf message a peer can send us, decoded from arbitrary bytes
//! and converted into `ballast_types`.
//!
//! Input: one selector byte (which message, see [`MESSAGES`]), then the
//! message's protobuf bytes. The target decodes them with prost and runs the
//! receiving side's conversion (`TryFrom<pb::…>` for requests and Admin
//! messages, `Reply::into_result` for Data and Raft replies). It asserts
//! that:
//! - nothing panics, whatever the bytes (a conversion fails with a typed
//!   `ConvertError`/`ProtoError` instead);
//! - a value that converts is stable: domain → protobuf → bytes → protobuf
//!   → domain gives the same value, and encoding it again gives the same
//!   bytes. Typed errors carried in replies round-trip the same way, with the
//!   one documented exception: a code this build does not know (`Unknown`)
//!   is passed on as `Internal`.

use std::fmt::Debug;

use prost::Message;

use ballast_proto::{pb, ProtoError, Reply};
use ballast_types::{
    ApiError, AttachVolume, Attachment, ClusterStatus, CreateVolume, DetachVolume, DiskInfo, ErrorCode, Extent,
    InitCluster, InitClusterReply, JoinNode, JoinNodeReply, MapVersion, NodeAddr, NodeHello, NodeInfo, PlacementMap,
    PlacementReply, PoolInfo, PoolSpec, RaftRequest, RangeRequest, ReadData, ResizeVolume, ShardInfo, ShardStatus,
    SnapshotChunk, VolumeInfo, WriteRequest, ZeroRequest,
};

/// The messages, in selector order (the selector byte is taken modulo the
/// count). Append new ones at the end so committed seeds keep their meaning.
pub const MESSAGES: &[&str] = &[
    "WriteRequest",
    "ZeroRequest",
    "ReadRequest",
    "BlockStatusRequest",
    "NodeHello",
    "RaftRequest",
    "SnapshotChunk",
    "WriteReply",
    "ZeroReply",
    "FlushReply",
    "PurgeReply",
    "ReadReply",
    "BlockStatusReply",
    "NodeHelloReply",
    "RaftReply",
    "Error",
    "PoolSpec",
    "Pool",
    "CreatePoolRequest",
    "PoolReply",
    "ListPoolsReply",
    "Disk",
    "Node",
    "NodeAddr",
    "InitClusterRequest",
    "InitClusterReply",
    "JoinNodeRequest",
    "JoinNodeReply",
    "Shard",
    "ShardStatus",
    "ClusterStatusReply",
    "Volume",
    "VolumeReply",
    "ListVolumesReply",
    "CreateVolumeRequest",
    "VolumeByName",
    "ResizeVolumeRequest",
    "AttachVolumeRequest",
    "AttachVolumeReply",
    "DetachVolumeRequest",
    "GetPlacementRequest",
    "PlacementMap",
    "GetPlacementReply",
];

/// A received message `P` converted to the domain value `D`, and back.
fn convert<P, D>(bytes: &[u8])
where
    P: Message + Default + From<D>,
    D: TryFrom<P> + Clone + PartialEq + Debug,
    <D as TryFrom<P>>::Error: Debug,
{
    let Ok(m) = P::decode(bytes) else { return };
    let Ok(d) = D::try_from(m) else { return };
    let first = P::from(d.clone()).encode_to_vec();
    let again = P::decode(first.as_slice()).expect("a message we encoded decodes");
    let back = D::try_from(again).unwrap_or_else(|e| panic!("{d:?} does not convert back: {e:?}"));
    assert_eq!(back, d, "domain → protobuf → domain changed the value");
    assert_eq!(P::from(back).encode_to_vec(), first, "encoding the same value twice differs");
}

/// What a typed error becomes when passed on: `Unknown` (a newer peer's
/// code) is sent as `Internal`, by design (`ballast-proto` `error.rs`).
fn forwarded(e: &ApiError) -> ApiError {
    let mut e = e.clone();
    if e.code == ErrorCode::Unknown {
        e.code = ErrorCode::Internal;
    }
    e
}

/// A received `pb::Error` converted to `ApiError`, and back.
fn error(bytes: &[u8]) {
    let Ok(m) = pb::Error::decode(bytes) else { return };
    let e = ApiError::from(m);
    let first = pb::Error::from(e.clone()).encode_to_vec();
    let back = ApiError::from(pb::Error::decode(first.as_slice()).expect("a message we encoded decodes"));
    assert_eq!(back, forwarded(&e), "typed error changed on the way back");
    assert_eq!(pb::Error::from(back).encode_to_vec(), first, "encoding the same error twice differs");
}

/// A received reply `P` turned into its result, and back.
fn reply<P, T>(bytes: &[u8])
where
    P: Message + Default + Reply<Ok = T> + From<Result<T, ApiError>>,
    T: Clone + PartialEq + Debug,
{
    let Ok(m) = P::decode(bytes) else { return };
    let result = match m.into_result() {
        Ok(v) => Ok(v),
        Err(ProtoError::Api(e)) => Err(e),
        // A malformed reply: refused with a typed error, which is the point.
        Err(_) => return,
    };
    let first = P::from(result.clone()).encode_to_vec();
    let again = P::decode(first.as_slice()).expect("a message we encoded decodes").into_result();
    match (&result, again) {
        (Ok(v), Ok(back)) => assert_eq!(&back, v, "reply value changed on the way back"),
        (Err(e), Err(ProtoError::Api(back))) => assert_eq!(back, forwarded(e), "typed error changed on the way back"),
        (_, other) => panic!("{result:?} came back as {other:?}"),
    }
    let result = result.map_err(|e| forwarded(&e));
    assert_eq!(P::from(result).encode_to_vec(), first, "encoding the same reply twice differs");
}

/// `VolumeByName` converts to a plain `String` and is built from `&str`.
fn volume_by_name(bytes: &[u8]) {
    let Ok(m) = pb::VolumeByName::decode(bytes) else { return };
    let Ok(name) = String::try_from(m) else { return };
    let first = pb::VolumeByName::from(name.as_str()).encode_to_vec();
    let back = String::try_from(pb::VolumeByName::decode(first.as_slice()).expect("decodes"));
    assert_eq!(back.as_ref().ok(), Some(&name), "volume name changed on the way back");
}

pub fn run(data: &[u8]) {
    let Some((&selector, b)) = data.split_first() else {
        return;
    };
    match usize::from(selector) % MESSAGES.len() {
        0 => convert::<pb::WriteRequest, WriteRequest>(b),
        1 => convert::<pb::ZeroRequest, ZeroRequest>(b),
        2 => convert::<pb::ReadRequest, RangeRequest>(b),
        3 => convert::<pb::BlockStatusRequest, RangeRequest>(b),
        4 => convert::<pb::NodeHello, NodeHello>(b),
        5 => convert::<pb::RaftRequest, RaftRequest>(b),
        6 => convert::<pb::SnapshotChunk, SnapshotChunk>(b),
        7 => reply::<pb::WriteReply, ()>(b),
        8 => reply::<pb::ZeroReply, ()>(b),
        9 => reply::<pb::FlushReply, ()>(b),
        10 => reply::<pb::PurgeReply, ()>(b),
        11 => reply::<pb::ReadReply, ReadData>(b),
        12 => reply::<pb::BlockStatusReply, Vec<Extent>>(b),
        13 => reply::<pb::NodeHelloReply, NodeHello>(b),
        14 => reply::<pb::RaftReply, bytes::Bytes>(b),
        15 => error(b),
        16 => convert::<pb::PoolSpec, PoolSpec>(b),
        17 => convert::<pb::Pool, PoolInfo>(b),
        18 => convert::<pb::CreatePoolRequest, PoolSpec>(b),
        19 => convert::<pb::PoolReply, PoolInfo>(b),
        20 => convert::<pb::ListPoolsReply, Vec<PoolInfo>>(b),
        21 => convert::<pb::Disk, DiskInfo>(b),
        22 => convert::<pb::Node, NodeInfo>(b),
        23 => convert::<pb::NodeAddr, NodeAddr>(b),
        24 => convert::<pb::InitClusterRequest, InitCluster>(b),
        25 => convert::<pb::InitClusterReply, InitClusterReply>(b),
        26 => convert::<pb::JoinNodeRequest, JoinNode>(b),
        27 => convert::<pb::JoinNodeReply, JoinNodeReply>(b),
        28 => convert::<pb::Shard, ShardInfo>(b),
        29 => convert::<pb::ShardStatus, ShardStatus>(b),
        30 => convert::<pb::ClusterStatusReply, ClusterStatus>(b),
        31 => convert::<pb::Volume, VolumeInfo>(b),
        32 => convert::<pb::VolumeReply, VolumeInfo>(b),
        33 => convert::<pb::ListVolumesReply, Vec<VolumeInfo>>(b),
        34 => convert::<pb::CreateVolumeRequest, CreateVolume>(b),
        35 => volume_by_name(b),
        36 => convert::<pb::ResizeVolumeRequest, ResizeVolume>(b),
        37 => convert::<pb::AttachVolumeRequest, AttachVolume>(b),
        38 => convert::<pb::AttachVolumeReply, Attachment>(b),
        39 => convert::<pb::DetachVolumeRequest, DetachVolume>(b),
        40 => convert::<pb::GetPlacementRequest, MapVersion>(b),
        41 => convert::<pb::PlacementMap, PlacementMap>(b),
        42 => convert::<pb::GetPlacementReply, PlacementReply>(b),
        _ => unreachable!("the selector is taken modulo MESSAGES.len()"),
    }
}

//! Ballast's vocabulary: ids, volume geometry (byte ranges → chunks → blocks),
//! block checksums and the error classification shared by every crate.
//!
//! No I/O lives here; everything is pure and cheap to test.

mod api;
mod checksum;
mod error;
mod geometry;
mod ids;
mod size;

pub use api::{
    chunk_hash, shard_index, validate_addr, validate_chunk_size, validate_extents, validate_name, validate_range,
    validate_volume_size, ApiError, AttachVolume, Attachment, BlockStatusRequest, ClusterId, ClusterStatus,
    CreateVolume, DataError, DataRequest, DetachVolume, DiskInfo, Epoch, ErrorCode, Extent, FailureDomain, GroupId,
    InitCluster, InitClusterReply, JoinNode, JoinNodeReply, LeaderHint, MapVersion, NodeAddr, NodeHello, NodeId,
    NodeInfo, NodeStats, PlacementMap, PlacementReply, PoolId, PoolInfo, PoolSpec, RaftEnvelope, RaftRequest,
    RangeRequest, ReadData, ReadRequest, ReadSegment, RebuildProgress, RebuildStream, ResizeVolume, ScrubReport,
    SegmentBody, ShardInfo, ShardStatus, SnapshotChunk, SnapshotStart, ValidationError, VolumeInfo, VolumeIo,
    WriteRequest, ZeroRequest, MAX_ADDR_LEN, MAX_CHUNK_SIZE, MAX_IO_LEN, MAX_META_MEMBERS, MAX_NAME_LEN, MAX_RANGE_LEN,
    MAX_REPLICAS, MAX_SHARDS, MAX_TOKEN_LEN, MAX_VOLUME_SIZE, MIN_CHUNK_SIZE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use checksum::{crc32c, Checksummed};
pub use error::Retryable;
pub use geometry::{BlockPiece, Geometry, BLOCK_SIZE, DEFAULT_CHUNK_SIZE};
pub use ids::{BlockKey, ShardId, VolumeId, BLOCK_KEY_LEN};
pub use size::{format_size, parse_size};

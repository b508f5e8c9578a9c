//! The cluster API in domain terms: what the gRPC messages of `ballast-proto`
//! mean once they have been validated.
//!
//! Nothing here knows prost or tonic. `ballast-proto` converts wire messages
//! into these types with `TryFrom`, calling the `validate` methods below, so
//! node and client code only ever see values that passed them. The same
//! checks are the ones the meta group applies to admin requests, which keeps
//! "what is a valid pool/volume" in one place.

use std::fmt;

use thiserror::Error;

use crate::{crc32c, Retryable, ShardId, VolumeId, BLOCK_SIZE};

mod cluster;
mod data;

pub use cluster::{
    AttachVolume, Attachment, ClusterStatus, CreateVolume, DetachVolume, DiskInfo, FailureDomain, InitCluster,
    InitClusterReply, JoinNode, JoinNodeReply, NodeAddr, NodeInfo, NodeStats, PlacementMap, PlacementReply, PoolInfo,
    PoolSpec, RebuildProgress, RebuildStream, ResizeVolume, ScrubReport, ShardInfo, ShardStatus, VolumeInfo, VolumeIo,
};
pub use data::{
    validate_extents, BlockStatusRequest, DataRequest, Extent, NodeHello, RaftEnvelope, RaftRequest, RangeRequest,
    ReadData, ReadRequest, ReadSegment, SegmentBody, SnapshotChunk, SnapshotStart, WriteRequest, ZeroRequest,
};

/// Version of the wire protocol spoken by this build. Sent in `NodeHello`,
/// `JoinNode` and `ClusterStatus`. Additive changes keep it; a change of
/// meaning bumps it (see `docs/wire-format.md`).
pub const PROTOCOL_VERSION: u32 = 1;
/// Oldest peer version this build still talks to.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Largest `Write` payload or `Read` length: the NBD server's maximum request.
pub const MAX_IO_LEN: u64 = 32 << 20;
/// Largest `Zero`/`BlockStatus` range in one call (no payload, so larger).
pub const MAX_RANGE_LEN: u64 = 1 << 30;
/// Volume sizes stay far from `u64::MAX` so `offset + len` never overflows.
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_REPLICAS: u32 = 5;
pub const MAX_SHARDS: u32 = 4096;
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// Longest node address (`host:port`) or disk path accepted.
pub const MAX_ADDR_LEN: usize = 255;
pub const MAX_TOKEN_LEN: usize = 1024;
/// Largest initial meta group.
pub const MAX_META_MEMBERS: usize = 7;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident($t:ty), $prefix:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $t);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A storage node. 0 is never a valid id (it means "absent" on the wire).
    NodeId(u64), "node-"
);
id_type!(
    /// A cluster, chosen at random by `InitCluster`; 0 is never valid.
    /// Every node-to-node call carries it so two clusters never mix.
    ClusterId(u64), "cluster-"
);
id_type!(
    /// A pool (durability class).
    PoolId(u32), "pool-"
);
id_type!(
    /// A volume's attach epoch: `attach` bumps it and shards refuse writes
    /// with an older one, so there is one writer per volume.
    Epoch(u64), "epoch-"
);
id_type!(
    /// Version of the placement map; grows with every change, 0 = none.
    MapVersion(u64), "map-v"
);
id_type!(
    /// A Raft group: 0 is the meta group, `n + 1` is shard `n`.
    GroupId(u64), "group-"
);

impl GroupId {
    pub const META: GroupId = GroupId(0);

    /// The group replicating `shard` (shard ids start at 0, group 0 is meta).
    pub fn for_shard(shard: ShardId) -> Self {
        GroupId(u64::from(shard.0) + 1)
    }

    /// The shard this group replicates; `None` for the meta group (or an id
    /// beyond the shard id space).
    pub fn shard(self) -> Option<ShardId> {
        self.0.checked_sub(1).and_then(|s| u32::try_from(s).ok()).map(ShardId)
    }
}

/// Why a request failed, as programs see it. The wire enum mirrors it; a
/// code this build does not know arrives as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotLeader,
    StaleMap,
    Fenced,
    NoSuchVolume,
    OutOfRange,
    Corrupt,
    Unavailable,
    Invalid,
    Timeout,
    Busy,
    NotFound,
    AlreadyExists,
    Conflict,
    NoSpace,
    Unauthenticated,
    WrongCluster,
    VersionMismatch,
    Internal,
    BadChecksum,
    /// Sent by a newer peer; never retried, because we cannot know it is safe.
    Unknown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 20] = [
        Self::NotLeader,
        Self::StaleMap,
        Self::Fenced,
        Self::NoSuchVolume,
        Self::OutOfRange,
        Self::Corrupt,
        Self::Unavailable,
        Self::Invalid,
        Self::Timeout,
        Self::Busy,
        Self::NotFound,
        Self::AlreadyExists,
        Self::Conflict,
        Self::NoSpace,
        Self::Unauthenticated,
        Self::WrongCluster,
        Self::VersionMismatch,
        Self::Internal,
        Self::BadChecksum,
        Self::Unknown,
    ];
}

impl Retryable for ErrorCode {
    /// Retryable codes go away by themselves or after the caller refreshes
    /// what it knows: re-route (`NotLeader`), refetch the map (`StaleMap`),
    /// wait (`Unavailable`, `Timeout`, `Busy`) or resend (`BadChecksum`).
    /// Everything else needs a human or a different request; in particular
    /// `Fenced` means another writer owns the volume and must never be retried.
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotLeader | Self::StaleMap | Self::Unavailable | Self::Timeout | Self::Busy | Self::BadChecksum
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Who leads a group, as far as the replier knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub node: NodeId,
    /// May be empty when the replier knows the id but not the address.
    pub addr: String,
}

/// A typed error from a peer (or for one). `message` is for humans only.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// With `NotLeader`: where to go instead.
    pub leader_hint: Option<LeaderHint>,
    /// With `StaleMap` (and whenever known): the replier's map version.
    pub map_version: Option<MapVersion>,
}

/// The brief's name for the error carried by Data replies; Admin uses the same type.
pub type DataError = ApiError;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), leader_hint: None, map_version: None }
    }

    pub fn not_leader(hint: Option<LeaderHint>) -> Self {
        Self { leader_hint: hint, ..Self::new(ErrorCode::NotLeader, "not the leader") }
    }

    pub fn stale_map(current: MapVersion) -> Self {
        Self { map_version: Some(current), ..Self::new(ErrorCode::StaleMap, "placement map is stale") }
    }
}

impl Retryable for ApiError {
    fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let code =
            if matches!(e, ValidationError::CrcMismatch { .. }) { ErrorCode::BadChecksum } else { ErrorCode::Invalid };
        ApiError::new(code, e.to_string())
    }
}

/// A value that breaks a rule of the API. Never retryable except a CRC
/// mismatch, which is damage in transit.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    #[error("name is empty")]
    EmptyName,
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    #[error("name contains {0:?}; allowed are A-Z a-z 0-9 . _ -")]
    NameChar(char),
    #[error("size must be more than 0")]
    ZeroSize,
    #[error("size {0} is not a multiple of {BLOCK_SIZE}")]
    UnalignedSize(u64),
    #[error("size {0} exceeds the maximum {MAX_VOLUME_SIZE}")]
    SizeTooLarge(u64),
    #[error("chunk size {0} must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}")]
    ChunkSize(u64),
    #[error("replicas {0} must be 1..={MAX_REPLICAS}")]
    Replicas(u32),
    #[error("shards {0} must be 1..={MAX_SHARDS}")]
    Shards(u32),
    #[error("length must be more than 0")]
    EmptyRange,
    #[error("length {len} exceeds the maximum {max}")]
    RangeTooLong { len: u64, max: u64 },
    #[error("offset {offset} + length {len} overflows")]
    RangeOverflow { offset: u64, len: u64 },
    #[error("crc32c mismatch: sent {sent:#010x}, computed {computed:#010x}")]
    CrcMismatch { sent: u32, computed: u32 },
    #[error("address {0:?} is not host:port")]
    Address(String),
    #[error("{0}")]
    Other(&'static str),
    #[error("{what} {id} appears twice")]
    Duplicate { what: &'static str, id: u64 },
    #[error("{what} refers to unknown {target} {id}")]
    Dangling { what: &'static str, target: &'static str, id: u64 },
    #[error("segments or extents are not contiguous at offset {0}")]
    NotContiguous(u64),
    #[error("reply covers {got} bytes from {offset}, expected {want}")]
    Coverage { offset: u64, got: u64, want: u64 },
}

impl Retryable for ValidationError {
    fn is_retryable(&self) -> bool {
        matches!(self, Self::CrcMismatch { .. })
    }
}

/// Volume, pool and zone names: 1-128 characters of `[A-Za-z0-9._-]`. Kept
/// narrow so names are safe in paths, URLs, labels and NBD export names.
pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ValidationError::NameTooLong);
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(ValidationError::NameChar(c)),
        None => Ok(()),
    }
}

/// A volume size: more than 0, whole 4 KiB blocks, at most [`MAX_VOLUME_SIZE`].
pub fn validate_volume_size(size: u64) -> Result<(), ValidationError> {
    if size == 0 {
        Err(ValidationError::ZeroSize)
    } else if size & (u64::from(BLOCK_SIZE) - 1) != 0 {
        // BLOCK_SIZE is a power of two; `is_multiple_of` needs Rust 1.87 (we support 1.85).
        Err(ValidationError::UnalignedSize(size))
    } else if size > MAX_VOLUME_SIZE {
        Err(ValidationError::SizeTooLarge(size))
    } else {
        Ok(())
    }
}

/// A chunk size: a power of two (so chunk math is shifts) in [64 KiB, 1 GiB].
pub fn validate_chunk_size(chunk_size: u64) -> Result<(), ValidationError> {
    if chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(ValidationError::ChunkSize(chunk_size))
    }
}

/// A byte range on the wire: non-empty, at most `max`, no overflow. Whether
/// it fits the volume is the server's check (`OutOfRange`), not the codec's.
pub fn validate_range(offset: u64, len: u64, max: u64) -> Result<(), ValidationError> {
    if len == 0 {
        Err(ValidationError::EmptyRange)
    } else if len > max {
        Err(ValidationError::RangeTooLong { len, max })
    } else if offset.checked_add(len).is_none() {
        Err(ValidationError::RangeOverflow { offset, len })
    } else {
        Ok(())
    }
}

/// A node address `host:port` (DNS name, IPv4 or `[IPv6]`); not resolved here.
pub fn validate_addr(addr: &str) -> Result<(), ValidationError> {
    let bad = || ValidationError::Address(addr.chars().take(MAX_ADDR_LEN).collect());
    if addr.len() > MAX_ADDR_LEN || addr.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

/// `Ok` when `sent` is the CRC32C of `data`.
pub(crate) fn verify_crc(data: &[u8], sent: u32) -> Result<(), ValidationError> {
    let computed = crc32c(data);
    if computed == sent {
        Ok(())
    } else {
        Err(ValidationError::CrcMismatch { sent, computed })
    }
}

/// The hash that places chunks on shards. **Part of the on-disk and wire
/// contract: it must never change** (data would be looked for on the wrong
/// shard). FNV-1a 64 over `volume.to_be_bytes() ++ chunk.to_be_bytes()`, then
/// the MurmurHash3 `fmix64` finaliser so that the low bits used by `%` depend
/// on every input bit. Pinned by `chunk_hash_is_pinned`.
pub fn chunk_hash(volume: VolumeId, chunk: u64) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for b in volume.0.to_be_bytes().into_iter().chain(chunk.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Index (0-based, within its pool) of the shard holding `chunk` of `volume`.
/// `shards` is validated to be at least 1; 0 is treated as 1 rather than panic.
pub fn shard_index(volume: VolumeId, chunk: u64, shards: u32) -> u32 {
    (chunk_hash(volume, chunk) % u64::from(shards.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn chunk_hash_is_pinned() {
        // These values are the placement of real data: if this test fails,
        // the change is wrong, not the test.
        // Computed independently (Python, from the definition in the doc comment).
        assert_eq!(chunk_hash(VolumeId(0), 0), 0xa5e0_dba6_c385_580a);
        assert_eq!(chunk_hash(VolumeId(1), 0), 0xd110_8a8b_ec2b_47fa);
        assert_eq!(chunk_hash(VolumeId(1), 1), 0xb1da_13f9_0218_b3ad);
        assert_eq!(chunk_hash(VolumeId(42), 7), 0x6d8e_0c33_b2e5_c0e8);
        assert_eq!(chunk_hash(VolumeId(u64::MAX), u64::MAX), 0xb985_182d_97d9_d96f);
        let idx: Vec<u32> = (0..8).map(|c| shard_index(VolumeId(1), c, 16)).collect();
        assert_eq!(idx, vec![10, 13, 1, 4, 8, 10, 9, 3]);
    }

    #[test]
    fn shard_index_spreads_chunks_evenly() {
        let shards = 64u32;
        let mut counts = vec![0u32; shards as usize];
        for v in 1..=16 {
            for c in 0..4096 {
                counts[shard_index(VolumeId(v), c, shards) as usize] += 1;
            }
        }
        let mean = 16 * 4096 / shards;
        assert!(counts.iter().all(|&n| n > mean * 8 / 10 && n < mean * 12 / 10), "{counts:?}");
        assert_eq!(shard_index(VolumeId(3), 9, 0), 0);
    }

    #[test]
    fn group_ids_keep_meta_apart_from_shards() {
        assert_eq!(GroupId::META.shard(), None);
        assert_eq!(GroupId::for_shard(ShardId(0)), GroupId(1));
        assert_eq!(GroupId::for_shard(ShardId(u32::MAX)).shard(), Some(ShardId(u32::MAX)));
        assert_eq!(GroupId(u64::MAX).shard(), None);
    }

    #[test]
    fn names_sizes_and_specs_are_checked() {
        assert_eq!(validate_name("db-1.data_x"), Ok(()));
        assert_eq!(validate_name(""), Err(ValidationError::EmptyName));
        assert_eq!(validate_name(&"a".repeat(129)), Err(ValidationError::NameTooLong));
        assert_eq!(validate_name(&"a".repeat(128)), Ok(()));
        assert_eq!(validate_name("a/b"), Err(ValidationError::NameChar('/')));
        assert_eq!(validate_name("é"), Err(ValidationError::NameChar('é')));
        assert_eq!(validate_volume_size(0), Err(ValidationError::ZeroSize));
        assert_eq!(validate_volume_size(4095), Err(ValidationError::UnalignedSize(4095)));
        assert_eq!(validate_volume_size(1 << 30), Ok(()));
        assert!(validate_volume_size(MAX_VOLUME_SIZE + 4096).is_err());
        assert!(validate_chunk_size(3 << 20).is_err() && validate_chunk_size(4 << 20).is_ok());
        let spec =
            |replicas, shards| PoolSpec { name: "p".into(), replicas, shards, failure_domain: FailureDomain::Zone };
        assert_eq!(spec(3, 64).validate(), Ok(()));
        assert_eq!(spec(0, 64).validate(), Err(ValidationError::Replicas(0)));
        assert_eq!(spec(6, 64).validate(), Err(ValidationError::Replicas(6)));
        assert_eq!(spec(5, 0).validate(), Err(ValidationError::Shards(0)));
        assert_eq!(spec(5, 4097).validate(), Err(ValidationError::Shards(4097)));
        for good in ["n1:7000", "10.0.0.1:1", "[::1]:7000"] {
            assert_eq!(validate_addr(good), Ok(()), "{good}");
        }
        for bad in ["n1", ":7000", "n1:0", "n1:70000", "a b:1", ""] {
            assert!(validate_addr(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_range(u64::MAX, 1, 10), Err(ValidationError::RangeOverflow { offset: u64::MAX, len: 1 }));
    }

    #[test]
    fn retry_rules() {
        let retry: Vec<_> = ErrorCode::ALL.into_iter().filter(|c| c.is_retryable()).collect();
        use ErrorCode::*;
        assert_eq!(retry, vec![NotLeader, StaleMap, Unavailable, Timeout, Busy, BadChecksum]);
        assert!(!ApiError::new(Fenced, "x").is_retryable());
        assert_eq!(ApiError::from(ValidationError::CrcMismatch { sent: 1, computed: 2 }).code, BadChecksum);
    }

    #[test]
    fn read_data_checks_contiguity_crc_and_coverage() {
        let req = RangeRequest { volume: VolumeId(1), offset: 4096, length: 12288 };
        let mut r = ReadData {
            segments: vec![
                ReadSegment::data(4096, Bytes::from(vec![7u8; 4096])),
                ReadSegment { offset: 8192, body: SegmentBody::Hole(8192) },
            ],
        };
        assert_eq!(r.validate(), Ok(()));
        assert_eq!(r.check_covers(&req), Ok(()));
        let mut buf = vec![1u8; 12288];
        r.copy_into(&mut buf);
        assert!(buf[..4096].iter().all(|&b| b == 7) && buf[4096..].iter().all(|&b| b == 0));
        r.segments[1].offset = 8193;
        assert_eq!(r.validate(), Err(ValidationError::NotContiguous(8193)));
        r.segments[1].offset = 8192;
        r.segments[0].body = SegmentBody::Data { data: Bytes::from_static(b"x"), crc32c: 0 };
        assert!(matches!(r.validate(), Err(ValidationError::CrcMismatch { .. })));
        let short = ReadData { segments: vec![ReadSegment { offset: 4096, body: SegmentBody::Hole(4096) }] };
        assert!(short.check_covers(&req).is_err());
    }
}

//! Data-path requests and replies, and the node-to-node Raft envelopes.
//! Re-exported from `api`.

use bytes::Bytes;

use super::{
    validate_range, verify_crc, ApiError, ClusterId, Epoch, ErrorCode, GroupId, NodeId, ValidationError, MAX_IO_LEN,
    MAX_RANGE_LEN, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::{crc32c, VolumeId};

// ----- Data service -----

/// Write `data` at `offset`. `crc32c` is the client's checksum of `data`,
/// computed where the bytes entered the client and checked on receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRequest {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub offset: u64,
    pub data: Bytes,
    pub crc32c: u32,
}

impl WriteRequest {
    pub fn new(volume: VolumeId, epoch: Epoch, offset: u64, data: Bytes) -> Self {
        let crc32c = crc32c(&data);
        Self { volume, epoch, offset, data, crc32c }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_range(self.offset, self.data.len() as u64, MAX_IO_LEN)?;
        verify_crc(&self.data, self.crc32c)
    }
}

/// Zero `[offset, offset+length)`; `punch` deallocates whole blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRequest {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub offset: u64,
    pub length: u64,
    pub punch: bool,
}

/// A byte range of a volume: `Read` and `BlockStatus` take the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeRequest {
    pub volume: VolumeId,
    pub offset: u64,
    pub length: u64,
}

pub type ReadRequest = RangeRequest;
pub type BlockStatusRequest = RangeRequest;

/// Every Data call, for a node that handles them in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataRequest {
    Write(WriteRequest),
    Zero(ZeroRequest),
    Read(ReadRequest),
    BlockStatus(BlockStatusRequest),
    Flush,
}

impl DataRequest {
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::Write(w) => w.validate(),
            Self::Zero(z) => validate_range(z.offset, z.length, MAX_RANGE_LEN),
            Self::Read(r) => validate_range(r.offset, r.length, MAX_IO_LEN),
            Self::BlockStatus(r) => validate_range(r.offset, r.length, MAX_RANGE_LEN),
            Self::Flush => Ok(()),
        }
    }
}

/// One piece of a read reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentBody {
    /// Stored bytes with their CRC32C (checked by the client on receipt).
    Data { data: Bytes, crc32c: u32 },
    /// `len` bytes that were never written (or were punched): zeros.
    Hole(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSegment {
    pub offset: u64,
    pub body: SegmentBody,
}

impl ReadSegment {
    pub fn data(offset: u64, data: Bytes) -> Self {
        let crc32c = crc32c(&data);
        Self { offset, body: SegmentBody::Data { data, crc32c } }
    }

    pub fn len(&self) -> u64 {
        match &self.body {
            SegmentBody::Data { data, .. } => data.len() as u64,
            SegmentBody::Hole(len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A successful read: ordered, contiguous segments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadData {
    pub segments: Vec<ReadSegment>,
}

impl ReadData {
    /// Each segment non-empty and CRC-clean, each starting where the last ended.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut next = self.segments.first().map(|s| s.offset);
        for s in &self.segments {
            if Some(s.offset) != next {
                return Err(ValidationError::NotContiguous(s.offset));
            }
            match &s.body {
                SegmentBody::Data { data, crc32c } => {
                    validate_range(s.offset, data.len() as u64, MAX_IO_LEN)?;
                    verify_crc(data, *crc32c)?;
                }
                SegmentBody::Hole(len) => validate_range(s.offset, *len, MAX_RANGE_LEN)?,
            }
            next = Some(s.offset + s.len());
        }
        Ok(())
    }

    /// Whether the segments cover exactly what `req` asked for (a client
    /// check: a reply may be well formed and still answer another question).
    pub fn check_covers(&self, req: &ReadRequest) -> Result<(), ValidationError> {
        let got: u64 = self.segments.iter().map(ReadSegment::len).sum();
        let start = self.segments.first().map_or(req.offset, |s| s.offset);
        if start != req.offset || got != req.length {
            return Err(ValidationError::Coverage { offset: start, got, want: req.length });
        }
        Ok(())
    }

    /// Copy into `buf` (which starts at the first segment's offset), zeroing holes.
    /// Panics if `buf` is shorter than the segments: call `check_covers` first.
    pub fn copy_into(&self, buf: &mut [u8]) {
        let mut at = 0usize;
        for s in &self.segments {
            let n = s.len() as usize;
            match &s.body {
                SegmentBody::Data { data, .. } => buf[at..at + n].copy_from_slice(data),
                SegmentBody::Hole(_) => buf[at..at + n].fill(0),
            }
            at += n;
        }
    }
}

/// One run of `NBD_CMD_BLOCK_STATUS` (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// Unallocated: reads as zeros.
    pub hole: bool,
}

/// Extents must be non-empty and contiguous; they may stop short of the
/// request's end (NBD allows it) but never start elsewhere or run past it.
pub fn validate_extents(extents: &[Extent], req: Option<&BlockStatusRequest>) -> Result<(), ValidationError> {
    let mut next = req.map(|r| r.offset).or(extents.first().map(|e| e.offset));
    for e in extents {
        validate_range(e.offset, e.length, MAX_RANGE_LEN)?;
        if Some(e.offset) != next {
            return Err(ValidationError::NotContiguous(e.offset));
        }
        next = Some(e.offset + e.length);
    }
    if let (Some(r), Some(end)) = (req, next) {
        if end > r.offset.saturating_add(r.length) {
            return Err(ValidationError::Coverage { offset: r.offset, got: end - r.offset, want: r.length });
        }
    }
    Ok(())
}

// ----- Raft service -----

/// Node-to-node handshake, the first call on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHello {
    pub cluster: ClusterId,
    pub node: NodeId,
    pub addr: String,
    pub protocol_version: u32,
}

impl NodeHello {
    /// `Err(VersionMismatch)` when the peer is outside what we speak.
    pub fn check_version(&self) -> Result<(), ApiError> {
        if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&self.protocol_version) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::VersionMismatch,
                format!(
                    "peer speaks protocol {}, this node {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                    self.protocol_version
                ),
            ))
        }
    }
}

/// Where a Raft message comes from and goes to; on every node-to-node call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftEnvelope {
    pub cluster: ClusterId,
    pub from: NodeId,
    pub target: NodeId,
    pub group: GroupId,
}

/// `AppendEntries` or `Vote`: the payload is ballast-raft's postcard encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftRequest {
    pub envelope: RaftEnvelope,
    pub payload: Bytes,
}

/// Vote and snapshot meta, sent on the first chunk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStart {
    pub vote: Bytes,
    pub meta: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    pub envelope: RaftEnvelope,
    pub offset: u64,
    /// Present exactly on the chunk with offset 0.
    pub start: Option<SnapshotStart>,
    pub data: Bytes,
    pub done: bool,
}

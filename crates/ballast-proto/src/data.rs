//! Data and Raft service conversions. Requests are validated on receipt
//! (`TryFrom<pb::…>`), including the CRC32C of every payload; replies are
//! built from `Result<_, ApiError>` by the server and turned back into one by
//! the client with [`Reply::into_result`].

use bytes::Bytes;

use ballast_types::{
    validate_addr, validate_extents, validate_range, ApiError, ClusterId, Epoch, Extent, GroupId, NodeHello, NodeId,
    RaftEnvelope, RaftRequest, RangeRequest, ReadData, ReadSegment, SegmentBody, SnapshotChunk, SnapshotStart,
    VolumeId, WriteRequest, ZeroRequest, MAX_IO_LEN, MAX_RANGE_LEN,
};

use crate::error::{nonzero, required, ConvertError, Field, Problem, ProtoError, Reply};
use crate::pb;

// ----- requests -----

impl TryFrom<pb::WriteRequest> for WriteRequest {
    type Error = ConvertError;
    fn try_from(m: pb::WriteRequest) -> Result<Self, ConvertError> {
        let w = WriteRequest {
            volume: VolumeId(nonzero(m.volume_id, "WriteRequest.volume_id")?),
            epoch: Epoch(nonzero(m.epoch, "WriteRequest.epoch")?),
            offset: m.offset,
            data: m.data,
            crc32c: m.crc32c,
        };
        w.validate().field("WriteRequest.data")?;
        Ok(w)
    }
}

impl From<WriteRequest> for pb::WriteRequest {
    fn from(w: WriteRequest) -> Self {
        pb::WriteRequest { volume_id: w.volume.0, epoch: w.epoch.0, offset: w.offset, data: w.data, crc32c: w.crc32c }
    }
}

impl TryFrom<pb::ZeroRequest> for ZeroRequest {
    type Error = ConvertError;
    fn try_from(m: pb::ZeroRequest) -> Result<Self, ConvertError> {
        validate_range(m.offset, m.length, MAX_RANGE_LEN).field("ZeroRequest.length")?;
        Ok(ZeroRequest {
            volume: VolumeId(nonzero(m.volume_id, "ZeroRequest.volume_id")?),
            epoch: Epoch(nonzero(m.epoch, "ZeroRequest.epoch")?),
            offset: m.offset,
            length: m.length,
            punch: m.punch,
        })
    }
}

impl From<ZeroRequest> for pb::ZeroRequest {
    fn from(z: ZeroRequest) -> Self {
        pb::ZeroRequest { volume_id: z.volume.0, epoch: z.epoch.0, offset: z.offset, length: z.length, punch: z.punch }
    }
}

fn range(
    volume_id: u64,
    offset: u64,
    length: u64,
    max: u64,
    f: [&'static str; 2],
) -> Result<RangeRequest, ConvertError> {
    validate_range(offset, length, max).field(f[1])?;
    Ok(RangeRequest { volume: VolumeId(nonzero(volume_id, f[0])?), offset, length })
}

impl TryFrom<pb::ReadRequest> for RangeRequest {
    type Error = ConvertError;
    fn try_from(m: pb::ReadRequest) -> Result<Self, ConvertError> {
        range(m.volume_id, m.offset, m.length, MAX_IO_LEN, ["ReadRequest.volume_id", "ReadRequest.length"])
    }
}

impl TryFrom<pb::BlockStatusRequest> for RangeRequest {
    type Error = ConvertError;
    fn try_from(m: pb::BlockStatusRequest) -> Result<Self, ConvertError> {
        let f = ["BlockStatusRequest.volume_id", "BlockStatusRequest.length"];
        range(m.volume_id, m.offset, m.length, MAX_RANGE_LEN, f)
    }
}

impl From<RangeRequest> for pb::ReadRequest {
    fn from(r: RangeRequest) -> Self {
        pb::ReadRequest { volume_id: r.volume.0, offset: r.offset, length: r.length }
    }
}

impl From<RangeRequest> for pb::BlockStatusRequest {
    fn from(r: RangeRequest) -> Self {
        pb::BlockStatusRequest { volume_id: r.volume.0, offset: r.offset, length: r.length }
    }
}

// ----- replies: server side builds them from a Result -----

impl From<Result<(), ApiError>> for pb::WriteReply {
    fn from(r: Result<(), ApiError>) -> Self {
        pb::WriteReply { error: r.err().map(Into::into) }
    }
}

impl From<Result<(), ApiError>> for pb::ZeroReply {
    fn from(r: Result<(), ApiError>) -> Self {
        pb::ZeroReply { error: r.err().map(Into::into) }
    }
}

impl From<Result<(), ApiError>> for pb::FlushReply {
    fn from(r: Result<(), ApiError>) -> Self {
        pb::FlushReply { error: r.err().map(Into::into) }
    }
}

impl From<Result<(), ApiError>> for pb::PurgeReply {
    fn from(r: Result<(), ApiError>) -> Self {
        pb::PurgeReply { error: r.err().map(Into::into) }
    }
}

impl From<Result<ReadData, ApiError>> for pb::ReadReply {
    fn from(r: Result<ReadData, ApiError>) -> Self {
        match r {
            Err(e) => pb::ReadReply { error: Some(e.into()), segments: Vec::new() },
            Ok(d) => pb::ReadReply { error: None, segments: d.segments.into_iter().map(Into::into).collect() },
        }
    }
}

impl From<ReadSegment> for pb::ReadSegment {
    fn from(s: ReadSegment) -> Self {
        use pb::read_segment::Body;
        let body = match s.body {
            SegmentBody::Data { data, crc32c } => Body::Data(pb::DataSegment { data, crc32c }),
            SegmentBody::Hole(len) => Body::HoleLen(len),
        };
        pb::ReadSegment { offset: s.offset, body: Some(body) }
    }
}

impl From<Result<Vec<Extent>, ApiError>> for pb::BlockStatusReply {
    fn from(r: Result<Vec<Extent>, ApiError>) -> Self {
        match r {
            Err(e) => pb::BlockStatusReply { error: Some(e.into()), extents: Vec::new() },
            Ok(x) => pb::BlockStatusReply {
                error: None,
                extents: x
                    .into_iter()
                    .map(|e| pb::Extent { offset: e.offset, length: e.length, hole: e.hole })
                    .collect(),
            },
        }
    }
}

// ----- replies: client side validates them -----

fn unit(error: Option<pb::Error>) -> Result<(), ProtoError> {
    error.map_or(Ok(()), |e| Err(ProtoError::Api(e.into())))
}

impl Reply for pb::WriteReply {
    type Ok = ();
    fn into_result(self) -> Result<(), ProtoError> {
        unit(self.error)
    }
}

impl Reply for pb::ZeroReply {
    type Ok = ();
    fn into_result(self) -> Result<(), ProtoError> {
        unit(self.error)
    }
}

impl Reply for pb::FlushReply {
    type Ok = ();
    fn into_result(self) -> Result<(), ProtoError> {
        unit(self.error)
    }
}

impl Reply for pb::PurgeReply {
    type Ok = ();
    fn into_result(self) -> Result<(), ProtoError> {
        unit(self.error)
    }
}

impl Reply for pb::ReadReply {
    /// Segments are contiguous and CRC-checked; the caller still checks that
    /// they cover its request ([`ReadData::check_covers`]).
    type Ok = ReadData;
    fn into_result(self) -> Result<ReadData, ProtoError> {
        unit(self.error)?;
        let mut segments = Vec::with_capacity(self.segments.len());
        for s in self.segments {
            use pb::read_segment::Body;
            let body = match required(s.body, "ReadSegment.body")? {
                Body::Data(d) => SegmentBody::Data { data: d.data, crc32c: d.crc32c },
                Body::HoleLen(len) => SegmentBody::Hole(len),
            };
            segments.push(ReadSegment { offset: s.offset, body });
        }
        let data = ReadData { segments };
        data.validate().field("ReadReply.segments")?;
        Ok(data)
    }
}

impl Reply for pb::BlockStatusReply {
    /// Contiguous, non-empty extents; check them against the request with
    /// `validate_extents(&extents, Some(&req))`.
    type Ok = Vec<Extent>;
    fn into_result(self) -> Result<Vec<Extent>, ProtoError> {
        unit(self.error)?;
        let x: Vec<Extent> =
            self.extents.into_iter().map(|e| Extent { offset: e.offset, length: e.length, hole: e.hole }).collect();
        validate_extents(&x, None).field("BlockStatusReply.extents")?;
        Ok(x)
    }
}

// ----- Raft -----

impl TryFrom<pb::NodeHello> for NodeHello {
    type Error = ConvertError;
    /// Shape only; whether the version is acceptable is the handler's call
    /// ([`NodeHello::check_version`]) so it can answer `VersionMismatch`.
    fn try_from(m: pb::NodeHello) -> Result<Self, ConvertError> {
        validate_addr(&m.addr).field("NodeHello.addr")?;
        Ok(NodeHello {
            cluster: ClusterId(nonzero(m.cluster_id, "NodeHello.cluster_id")?),
            node: NodeId(nonzero(m.node_id, "NodeHello.node_id")?),
            addr: m.addr,
            protocol_version: nonzero(m.protocol_version.into(), "NodeHello.protocol_version")? as u32,
        })
    }
}

impl From<NodeHello> for pb::NodeHello {
    fn from(h: NodeHello) -> Self {
        pb::NodeHello { cluster_id: h.cluster.0, node_id: h.node.0, addr: h.addr, protocol_version: h.protocol_version }
    }
}

/// The answer names the replying node; its `addr` is not sent back.
impl From<Result<NodeHello, ApiError>> for pb::NodeHelloReply {
    fn from(r: Result<NodeHello, ApiError>) -> Self {
        match r {
            Err(e) => pb::NodeHelloReply { error: Some(e.into()), ..Default::default() },
            Ok(h) => pb::NodeHelloReply {
                error: None,
                cluster_id: h.cluster.0,
                node_id: h.node.0,
                protocol_version: h.protocol_version,
            },
        }
    }
}

impl Reply for pb::NodeHelloReply {
    /// The peer's identity (`addr` left empty).
    type Ok = NodeHello;
    fn into_result(self) -> Result<NodeHello, ProtoError> {
        unit(self.error)?;
        Ok(NodeHello {
            cluster: ClusterId(nonzero(self.cluster_id, "NodeHelloReply.cluster_id")?),
            node: NodeId(nonzero(self.node_id, "NodeHelloReply.node_id")?),
            addr: String::new(),
            protocol_version: nonzero(self.protocol_version.into(), "NodeHelloReply.protocol_version")? as u32,
        })
    }
}

fn envelope(
    cluster: u64,
    from: u64,
    target: u64,
    group: u64,
    f: [&'static str; 3],
) -> Result<RaftEnvelope, ConvertError> {
    Ok(RaftEnvelope {
        cluster: ClusterId(nonzero(cluster, f[0])?),
        from: NodeId(nonzero(from, f[1])?),
        target: NodeId(nonzero(target, f[2])?),
        group: GroupId(group),
    })
}

impl TryFrom<pb::RaftRequest> for RaftRequest {
    type Error = ConvertError;
    fn try_from(m: pb::RaftRequest) -> Result<Self, ConvertError> {
        let f = ["RaftRequest.cluster_id", "RaftRequest.from_node", "RaftRequest.target_node"];
        let envelope = envelope(m.cluster_id, m.from_node, m.target_node, m.group, f)?;
        if m.payload.is_empty() {
            return Err(ConvertError::missing("RaftRequest.payload"));
        }
        Ok(RaftRequest { envelope, payload: m.payload })
    }
}

impl From<RaftRequest> for pb::RaftRequest {
    fn from(r: RaftRequest) -> Self {
        let e = r.envelope;
        pb::RaftRequest {
            cluster_id: e.cluster.0,
            from_node: e.from.0,
            target_node: e.target.0,
            group: e.group.0,
            payload: r.payload,
        }
    }
}

impl From<Result<Bytes, ApiError>> for pb::RaftReply {
    fn from(r: Result<Bytes, ApiError>) -> Self {
        match r {
            Err(e) => pb::RaftReply { error: Some(e.into()), payload: Bytes::new() },
            Ok(payload) => pb::RaftReply { error: None, payload },
        }
    }
}

impl Reply for pb::RaftReply {
    /// The postcard-encoded openraft response, for ballast-raft to decode.
    type Ok = Bytes;
    fn into_result(self) -> Result<Bytes, ProtoError> {
        unit(self.error)?;
        if self.payload.is_empty() {
            return Err(ConvertError::missing("RaftReply.payload").into());
        }
        Ok(self.payload)
    }
}

impl TryFrom<pb::SnapshotChunk> for SnapshotChunk {
    type Error = ConvertError;
    /// Per chunk: the first (offset 0) must carry vote and meta, later ones
    /// must not. Order across chunks is checked by [`SnapshotSequencer`].
    fn try_from(m: pb::SnapshotChunk) -> Result<Self, ConvertError> {
        let f = ["SnapshotChunk.cluster_id", "SnapshotChunk.from_node", "SnapshotChunk.target_node"];
        let envelope = envelope(m.cluster_id, m.from_node, m.target_node, m.group, f)?;
        let start = if m.offset == 0 {
            if m.vote.is_empty() {
                return Err(ConvertError::missing("SnapshotChunk.vote"));
            }
            if m.meta.is_empty() {
                return Err(ConvertError::missing("SnapshotChunk.meta"));
            }
            Some(SnapshotStart { vote: m.vote, meta: m.meta })
        } else {
            if !m.vote.is_empty() {
                return Err(ConvertError::new("SnapshotChunk.vote", Problem::Unexpected));
            }
            if !m.meta.is_empty() {
                return Err(ConvertError::new("SnapshotChunk.meta", Problem::Unexpected));
            }
            None
        };
        if m.offset.checked_add(m.data.len() as u64).is_none() {
            return Err(ConvertError::new("SnapshotChunk.offset", Problem::Unexpected));
        }
        Ok(SnapshotChunk { envelope, offset: m.offset, start, data: m.data, done: m.done })
    }
}

impl From<SnapshotChunk> for pb::SnapshotChunk {
    fn from(c: SnapshotChunk) -> Self {
        let e = c.envelope;
        let (vote, meta) = c.start.map_or((Bytes::new(), Bytes::new()), |s| (s.vote, s.meta));
        pb::SnapshotChunk {
            cluster_id: e.cluster.0,
            from_node: e.from.0,
            target_node: e.target.0,
            group: e.group.0,
            offset: c.offset,
            vote,
            meta,
            data: c.data,
            done: c.done,
        }
    }
}

/// Receiver-side order check of an `InstallSnapshot` stream: one envelope
/// throughout, offsets without gaps starting at 0, nothing after `done`.
/// Feed every chunk to [`accept`](Self::accept); install only when
/// [`is_complete`](Self::is_complete) — a stream that ends without `done` was cut.
#[derive(Debug, Default)]
pub struct SnapshotSequencer {
    envelope: Option<RaftEnvelope>,
    next_offset: u64,
    done: bool,
}

impl SnapshotSequencer {
    pub fn accept(&mut self, c: &SnapshotChunk) -> Result<(), ConvertError> {
        if self.done {
            return Err(ConvertError::new("SnapshotChunk.done", Problem::Unexpected));
        }
        if *self.envelope.get_or_insert(c.envelope) != c.envelope {
            return Err(ConvertError::new("SnapshotChunk.group", Problem::Unexpected));
        }
        if c.offset != self.next_offset {
            return Err(ConvertError::new("SnapshotChunk.offset", Problem::Unexpected));
        }
        self.next_offset += c.data.len() as u64;
        self.done = c.done;
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.done
    }

    /// Bytes of snapshot data received so far.
    pub fn received(&self) -> u64 {
        self.next_offset
    }
}

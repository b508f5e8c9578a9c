//! The tonic `Data` service: a thin client's reads and writes of one chunk
//! piece, served by this node's replica of the shard that owns the chunk.
//!
//! Every request is validated on receipt (`ballast-proto`: required fields,
//! range limits, the CRC32C of write payloads → `BAD_CHECKSUM`) before it is
//! routed; a request must stay inside one chunk (`OUT_OF_RANGE` otherwise;
//! `BlockStatus` is clipped to its first chunk instead, as NBD allows a short
//! answer). Only the shard's leader answers: writes go through its Raft log
//! and reads are linearizable (leader lease), so a follower answers
//! `NOT_LEADER` with the leader it knows of. Stored blocks are CRC-checked on
//! read by the store; a mismatch is `CORRUPT`, never the bytes.
//!
//! **Observability.** Each request runs in a `debug`-level span `data` with
//! the op, node, volume and shard (disabled spans cost a level check, so the
//! hot path allocates nothing for them at the default `info`); refusals are
//! logged with the same ids. Successful requests are counted per volume in
//! [`VolumeIoCounters`], which `NodeStats` reports to `ballast status`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use ballast_proto::pb;
use ballast_proto::pb::data_server::Data;
use ballast_raft::shard::RangeRead;
use ballast_raft::types::{BlockRef, RepairCause};
use ballast_raft::{ShardError, ShardRequest, ShardResponse};
use ballast_storage::{BlockStore, Segment, StorageError};
use ballast_types::{
    shard_index, ApiError, ClusterId, ErrorCode, Extent, Geometry, GroupId, LeaderHint, NodeId, PlacementMap,
    RangeRequest, ReadData, ReadSegment, ShardId, VolumeId, VolumeIo, WriteRequest, ZeroRequest,
};
use bytes::Bytes;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::integrity::{self, Peers};
use crate::router::{MultiRaft, Replica};

/// Where a chunk of a volume lives. The meta group's placement map will
/// implement this; [`HashPlacement`] serves a fixed pool until then.
pub trait ShardLocator: Send + Sync + 'static {
    /// The shard holding `chunk` of `volume`, or why there is none
    /// (`NO_SUCH_VOLUME`, `STALE_MAP`, ...).
    fn locate(&self, volume: VolumeId, chunk: u64) -> Result<ShardId, ApiError>;

    /// How `volume` is cut into chunks. Shard replicas read and write with
    /// the default geometry today, so only that is supported.
    fn geometry(&self, _volume: VolumeId) -> Geometry {
        Geometry::default()
    }
}

/// Every volume spread over one pool's shards
/// `first_shard .. first_shard + shards` by `ballast_types::shard_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashPlacement {
    pub first_shard: u32,
    pub shards: u32,
}

impl ShardLocator for HashPlacement {
    fn locate(&self, volume: VolumeId, chunk: u64) -> Result<ShardId, ApiError> {
        Ok(ShardId(self.first_shard + shard_index(volume, chunk, self.shards)))
    }
}

/// The cluster's placement map as this node last saw it (the meta group's
/// applied map on a meta member, fetched from one otherwise). A volume the
/// map does not know is `STALE_MAP` (retryable): the client may know a newer
/// map than this node, which refreshes at once (see [`MapLocator::wanted`]).
#[derive(Default)]
pub struct MapLocator {
    map: std::sync::RwLock<Arc<PlacementMap>>,
    refresh: tokio::sync::Notify,
}

impl MapLocator {
    pub fn map(&self) -> Arc<PlacementMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Install `map` if it is newer than the one held.
    pub fn update(&self, map: PlacementMap) -> bool {
        let mut held = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.version > held.version {
            *held = Arc::new(map);
            true
        } else {
            false
        }
    }

    /// Resolves when someone asked for a fresher map.
    pub async fn wanted(&self) {
        self.refresh.notified().await
    }

    pub fn want_refresh(&self) {
        self.refresh.notify_one();
    }
}

impl ShardLocator for MapLocator {
    fn locate(&self, volume: VolumeId, chunk: u64) -> Result<ShardId, ApiError> {
        let map = self.map();
        map.shard_of(volume, chunk).ok_or_else(|| {
            self.want_refresh();
            let mut e = ApiError::new(ErrorCode::StaleMap, format!("{volume} is not in this node's map"));
            e.map_version = Some(map.version);
            e
        })
    }

    fn geometry(&self, volume: VolumeId) -> Geometry {
        self.map().volumes.get(&volume).map(|v| v.geometry()).unwrap_or_default()
    }
}

/// Successful Data requests per volume, kept by one node's [`DataService`]
/// since it started. Counting costs a shared lock and four relaxed atomic
/// adds; a volume's first request takes the write lock once.
#[derive(Default)]
pub struct VolumeIoCounters {
    volumes: RwLock<HashMap<VolumeId, Arc<Counts>>>,
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
}

impl VolumeIoCounters {
    fn counts(&self, volume: VolumeId) -> Arc<Counts> {
        if let Some(c) = self.volumes.read().unwrap_or_else(|e| e.into_inner()).get(&volume) {
            return c.clone();
        }
        self.volumes.write().unwrap_or_else(|e| e.into_inner()).entry(volume).or_default().clone()
    }

    pub fn count_read(&self, volume: VolumeId, bytes: u64) {
        let c = self.counts(volume);
        c.reads.fetch_add(1, Ordering::Relaxed);
        c.read_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A write, zero or trim of `bytes`.
    pub fn count_write(&self, volume: VolumeId, bytes: u64) {
        let c = self.counts(volume);
        c.writes.fetch_add(1, Ordering::Relaxed);
        c.write_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Every volume this node served, by id.
    pub fn snapshot(&self) -> Vec<VolumeIo> {
        let volumes = self.volumes.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<VolumeIo> = volumes
            .iter()
            .map(|(v, c)| VolumeIo {
                volume: *v,
                reads: c.reads.load(Ordering::Relaxed),
                read_bytes: c.read_bytes.load(Ordering::Relaxed),
                writes: c.writes.load(Ordering::Relaxed),
                write_bytes: c.write_bytes.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by_key(|v| v.volume);
        out
    }
}

/// Who this node is, once it has joined a cluster (for log spans).
pub type NodeIdentity = Arc<OnceLock<(ClusterId, NodeId)>>;

/// Serves the Data API for one node.
pub struct DataService<S: BlockStore> {
    groups: Arc<MultiRaft<S>>,
    locator: Arc<dyn ShardLocator>,
    io: Arc<VolumeIoCounters>,
    who: NodeIdentity,
    /// Read repair: healthy copies of damaged blocks from the other voters.
    /// `None`: a damaged block fails the read with `CORRUPT`.
    peers: Option<Arc<Peers>>,
}

impl<S: BlockStore> DataService<S> {
    pub fn new(groups: Arc<MultiRaft<S>>, locator: Arc<dyn ShardLocator>) -> Self {
        Self { groups, locator, io: Arc::default(), who: Arc::default(), peers: None }
    }

    /// Answer reads that meet damaged blocks from the other voters' copies,
    /// and repair them (see [`crate::integrity`]).
    pub fn repairing(mut self, peers: Arc<Peers>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// Count successful requests in `io` and name the node (once it has an
    /// identity) in log spans.
    pub fn observed(mut self, io: Arc<VolumeIoCounters>, who: NodeIdentity) -> Self {
        self.io = io;
        self.who = who;
        self
    }

    /// The `data` span of one request: disabled (no cost beyond a level
    /// check) unless `debug` is on for this crate.
    fn span(&self, op: &'static str, volume: VolumeId, offset: u64) -> tracing::Span {
        let span = tracing::debug_span!(
            "data",
            op,
            node = tracing::field::Empty,
            volume = volume.0,
            offset,
            shard = tracing::field::Empty
        );
        if !span.is_disabled() {
            if let Some((_, node)) = self.who.get() {
                span.record("node", node.0);
            }
            let chunk = offset / self.locator.geometry(volume).chunk_size;
            if let Ok(shard) = self.locator.locate(volume, chunk) {
                span.record("shard", shard.0);
            }
        }
        span
    }

    fn node_id(&self) -> u64 {
        self.who.get().map_or(0, |(_, n)| n.0)
    }

    /// The local replica of the shard holding `[offset, offset+len)`, which
    /// must lie in one chunk.
    fn route(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Arc<Replica<S>>, ApiError> {
        let chunk_size = self.locator.geometry(volume).chunk_size;
        let chunk = offset / chunk_size;
        if (offset + len - 1) / chunk_size != chunk {
            return Err(ApiError::new(
                ErrorCode::OutOfRange,
                format!("{offset}+{len} crosses a chunk boundary (chunk size {chunk_size})"),
            ));
        }
        let shard = self.locator.locate(volume, chunk)?;
        let group = GroupId::for_shard(shard);
        // Not hosted here: the caller's placement is out of date; it refreshes
        // on NOT_LEADER without a hint.
        self.groups.get(group).ok_or_else(|| {
            let mut e = ApiError::not_leader(None);
            e.message = format!("{shard} ({group}) has no replica on this node");
            e
        })
    }

    async fn write(&self, w: WriteRequest) -> Result<(), ApiError> {
        let replica = self.route(w.volume, w.offset, w.data.len() as u64)?;
        let (volume, len) = (w.volume, w.data.len() as u64);
        let req = ShardRequest::Write { volume: w.volume, epoch: w.epoch.0, offset: w.offset, data: w.data };
        applied(replica.group.write(req).await.map_err(api_error)?)?;
        self.io.count_write(volume, len);
        Ok(())
    }

    async fn zero(&self, z: ZeroRequest) -> Result<(), ApiError> {
        let replica = self.route(z.volume, z.offset, z.length)?;
        let req =
            ShardRequest::Zero { volume: z.volume, epoch: z.epoch.0, offset: z.offset, len: z.length, punch: z.punch };
        applied(replica.group.write(req).await.map_err(api_error)?)?;
        self.io.count_write(z.volume, z.length);
        Ok(())
    }

    /// Drop every block of `volume` in `shard` through the shard's log.
    async fn purge(&self, volume: VolumeId, shard: ShardId) -> Result<(), ApiError> {
        let group = GroupId::for_shard(shard);
        let replica = self.groups.get(group).ok_or_else(|| {
            let mut e = ApiError::not_leader(None);
            e.message = format!("{shard} ({group}) has no replica on this node");
            e
        })?;
        applied(replica.group.write(ShardRequest::DeleteVolume { volume }).await.map_err(api_error)?)
    }

    async fn read(&self, r: RangeRequest) -> Result<ReadData, ApiError> {
        let replica = self.route(r.volume, r.offset, r.length)?;
        let found = match &self.peers {
            None => replica.group.read(r.volume, r.offset, r.length).await.map_err(api_error)?,
            Some(peers) => match replica.group.read_checked(r.volume, r.offset, r.length).await.map_err(api_error)? {
                RangeRead::Data(segments) => segments,
                RangeRead::Damaged { applied, blocks } => {
                    self.read_repair(peers, &replica, &r, applied, blocks).await?
                }
            },
        };
        let mut at = r.offset;
        let mut segments = Vec::with_capacity(found.len());
        for s in found {
            let seg = match s {
                Segment::Data(d) => ReadSegment::data(at, d),
                Segment::Hole(n) => ReadSegment { offset: at, body: ballast_types::SegmentBody::Hole(n) },
            };
            at += seg.len();
            if !seg.is_empty() {
                segments.push(seg);
            }
        }
        if at != r.offset + r.length {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("shard read covered {} of {} bytes", at - r.offset, r.length),
            ));
        }
        self.io.count_read(r.volume, r.length);
        Ok(ReadData { segments })
    }

    /// The read `r` met `blocks` damaged on this leader (at applied index
    /// `applied`): answer it from the other voters' copies, then repair
    /// through the log in the background. No healthy copy: `CORRUPT`.
    async fn read_repair(
        &self,
        peers: &Arc<Peers>,
        replica: &Arc<Replica<S>>,
        r: &RangeRequest,
        applied: u64,
        blocks: Vec<u64>,
    ) -> Result<Vec<Segment>, ApiError> {
        let refs: Vec<BlockRef> = blocks.iter().map(|b| BlockRef { volume: r.volume.0, block: *b }).collect();
        let copies = integrity::healthy_copies(peers, &replica.group, &refs, applied, false).await;
        let shard = replica.group.spec().shard;
        if !copies.missing.is_empty() {
            let first = copies.missing[0].block;
            return Err(ApiError::new(
                ErrorCode::Corrupt,
                format!(
                    "{} block(s) of {} in {shard} (first: block {first}) fail their checksum on every replica asked",
                    copies.missing.len(),
                    r.volume
                ),
            ));
        }
        crate::metrics::count_stored_checksum_errors(blocks.len() as u64);
        tracing::warn!(%shard, volume = r.volume.0, blocks = blocks.len(), first = blocks[0], "read met damaged blocks on the leader; answered from a healthy replica, repairing");
        let patch: BTreeMap<u64, Option<Bytes>> = copies.found.iter().map(|(b, d)| (b.block, d.clone())).collect();
        let segments = replica.group.read_patched(r.volume, r.offset, r.length, patch).await.map_err(api_error)?;
        let replica = replica.clone();
        tokio::spawn(async move {
            if let Err(e) = integrity::propose_repair(&replica.group, &copies, RepairCause::Read).await {
                tracing::warn!(%shard, "read repair not committed (the next read or scrub retries): {e}");
            }
        });
        Ok(segments)
    }

    async fn block_status(&self, r: RangeRequest) -> Result<Vec<Extent>, ApiError> {
        let chunk_size = self.locator.geometry(r.volume).chunk_size;
        let chunk_end = (r.offset / chunk_size + 1) * chunk_size;
        let len = r.length.min(chunk_end - r.offset);
        let replica = self.route(r.volume, r.offset, len)?;
        let runs = replica.group.extents(r.volume, r.offset, len).await.map_err(api_error)?;
        let mut at = r.offset;
        let mut extents: Vec<Extent> = Vec::with_capacity(runs.len());
        for (length, allocated) in runs {
            if length == 0 {
                continue;
            }
            match extents.last_mut() {
                Some(last) if last.hole != allocated => last.length += length,
                _ => extents.push(Extent { offset: at, length, hole: !allocated }),
            }
            at += length;
        }
        Ok(extents)
    }
}

/// What the state machine decided, as an API result.
fn applied(r: ShardResponse) -> Result<(), ApiError> {
    match r {
        ShardResponse::Done => Ok(()),
        ShardResponse::Fenced { current } => {
            Err(ApiError::new(ErrorCode::Fenced, format!("a newer writer attached (epoch {current})")))
        }
        ShardResponse::Invalid { reason } => Err(ApiError::new(ErrorCode::Invalid, reason)),
    }
}

fn hint(leader: Option<u64>, addr: Option<String>) -> Option<LeaderHint> {
    leader.map(|l| LeaderHint { node: ballast_types::NodeId(l), addr: addr.unwrap_or_default() })
}

/// A replica's failure as the client must see it.
pub fn api_error(e: ShardError) -> ApiError {
    let code = match &e {
        ShardError::NotLeader { leader, addr, .. } => return ApiError::not_leader(hint(*leader, addr.clone())),
        // Writes are blind overwrites: retrying through the new leader is safe.
        ShardError::OutcomeUnknown { leader: Some(l), addr, .. } => {
            return ApiError::not_leader(hint(Some(*l), addr.clone()))
        }
        ShardError::OutcomeUnknown { .. } | ShardError::Unavailable { .. } => ErrorCode::Unavailable,
        ShardError::Storage(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => ErrorCode::Corrupt,
        ShardError::Storage(StorageError::Engine(_)) => ErrorCode::Unavailable,
        ShardError::Storage(_) | ShardError::Rejected { .. } | ShardError::Codec(_) => ErrorCode::Internal,
    };
    if code == ErrorCode::Corrupt {
        tracing::error!("stored data failed its checksum: {e}");
    }
    ApiError::new(code, e.to_string())
}

/// Log a refused request once, here where it is answered, with its ids.
fn log_refusal(what: &str, node: u64, volume: u64, e: &ApiError) {
    match e.code {
        ErrorCode::Internal | ErrorCode::Corrupt => tracing::warn!(node, volume, "{what} failed: {e}"),
        _ => tracing::debug!(node, volume, "{what} refused: {e}"),
    }
}

#[tonic::async_trait]
impl<S: BlockStore> Data for DataService<S> {
    async fn write(&self, request: Request<pb::WriteRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let (r, volume) = match WriteRequest::try_from(request.into_inner()) {
            Ok(w) => {
                let (volume, span) = (w.volume, self.span("write", w.volume, w.offset));
                (DataService::write(self, w).instrument(span).await, volume.0)
            }
            Err(e) => (Err(ApiError::from(e)), 0),
        };
        if let Err(e) = &r {
            log_refusal("write", self.node_id(), volume, e);
        }
        Ok(Response::new(r.into()))
    }

    async fn zero(&self, request: Request<pb::ZeroRequest>) -> Result<Response<pb::ZeroReply>, Status> {
        let (r, volume) = match ZeroRequest::try_from(request.into_inner()) {
            Ok(z) => {
                let (volume, span) = (z.volume, self.span("zero", z.volume, z.offset));
                (DataService::zero(self, z).instrument(span).await, volume.0)
            }
            Err(e) => (Err(ApiError::from(e)), 0),
        };
        if let Err(e) = &r {
            log_refusal("zero", self.node_id(), volume, e);
        }
        Ok(Response::new(r.into()))
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let (r, volume) = match RangeRequest::try_from(request.into_inner()) {
            Ok(q) => {
                let span = self.span("read", q.volume, q.offset);
                (DataService::read(self, q).instrument(span).await, q.volume.0)
            }
            Err(e) => (Err(ApiError::from(e)), 0),
        };
        if let Err(e) = &r {
            log_refusal("read", self.node_id(), volume, e);
        }
        Ok(Response::new(r.into()))
    }

    async fn block_status(
        &self,
        request: Request<pb::BlockStatusRequest>,
    ) -> Result<Response<pb::BlockStatusReply>, Status> {
        let (r, volume) = match RangeRequest::try_from(request.into_inner()) {
            Ok(q) => {
                let span = self.span("block_status", q.volume, q.offset);
                (DataService::block_status(self, q).instrument(span).await, q.volume.0)
            }
            Err(e) => (Err(ApiError::from(e)), 0),
        };
        if let Err(e) = &r {
            log_refusal("block status", self.node_id(), volume, e);
        }
        Ok(Response::new(r.into()))
    }

    async fn purge(&self, request: Request<pb::PurgeRequest>) -> Result<Response<pb::PurgeReply>, Status> {
        let m = request.into_inner();
        let r = if m.volume_id == 0 {
            Err(ApiError::new(ErrorCode::Invalid, "purge: volume_id is required"))
        } else {
            DataService::purge(self, VolumeId(m.volume_id), ShardId(m.shard)).await
        };
        if let Err(e) = &r {
            log_refusal("purge", self.node_id(), m.volume_id, e);
        }
        Ok(Response::new(r.into()))
    }

    /// Acknowledged writes are already durable on a majority (the Raft log is
    /// fsync'd before an entry commits), so a flush has nothing to wait for.
    async fn flush(&self, _request: Request<pb::FlushRequest>) -> Result<Response<pb::FlushReply>, Status> {
        Ok(Response::new(Ok(()).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_types::{BlockKey, Retryable};

    #[test]
    fn shard_errors_become_the_codes_clients_act_on() {
        let e = api_error(ShardError::NotLeader { group: 1, leader: Some(3), addr: Some("n3:7000".into()) });
        assert_eq!(e.code, ErrorCode::NotLeader);
        assert_eq!(e.leader_hint, Some(LeaderHint { node: ballast_types::NodeId(3), addr: "n3:7000".into() }));
        let e = api_error(ShardError::OutcomeUnknown { group: 1, leader: Some(2), addr: None });
        assert_eq!((e.code, e.leader_hint.map(|h| h.node.0)), (ErrorCode::NotLeader, Some(2)));
        let e = api_error(ShardError::OutcomeUnknown { group: 1, leader: None, addr: None });
        assert_eq!(e.code, ErrorCode::Unavailable);
        let key = BlockKey { shard: ShardId(0), volume: VolumeId(1), chunk: 0, block: 0 };
        let e = api_error(ShardError::Storage(StorageError::Corrupt { key, stored: 1, computed: 2 }));
        assert_eq!(e.code, ErrorCode::Corrupt);
        assert!(!e.is_retryable());
        assert_eq!(applied(ShardResponse::Fenced { current: 4 }).map_err(|e| e.code), Err(ErrorCode::Fenced));
    }

    #[test]
    fn hash_placement_stays_inside_its_pool() {
        let p = HashPlacement { first_shard: 10, shards: 4 };
        for chunk in 0..256 {
            let s = p.locate(VolumeId(9), chunk).expect("located");
            assert!((10..14).contains(&s.0), "{s}");
            assert_eq!(s.0 - 10, shard_index(VolumeId(9), chunk, 4));
        }
    }
}

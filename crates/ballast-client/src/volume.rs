//! The Data path: [`RemoteVolume`] turns NBD requests into per-chunk Data
//! RPCs to shard leaders, through the channels and leader cache of a shared
//! [`ClientPool`]. See the crate documentation for the routing rules.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ballast_nbd::{BlockDevice, DeviceError, DeviceErrorKind, ExportProvider, Extent, ReadSegment};
use ballast_proto::pb::data_client::DataClient;
use ballast_proto::tls::ConnectFailure;
use ballast_proto::{pb, ProtoError, Reply};
use ballast_types::{
    validate_extents, ApiError, Epoch, ErrorCode, Geometry, RangeRequest, Retryable, SegmentBody, ShardId, VolumeId,
    WriteRequest, ZeroRequest,
};
use bytes::Bytes;
use futures::future::try_join_all;
use tonic::transport::Channel;

use crate::metrics::Retry;
use crate::{Backoff, ClientConfig, Placement, TlsConfig};

/// One lazily connected tonic channel per node address and the last known
/// leader of every shard, shared by all volumes of a process.
pub struct ClientPool {
    config: ClientConfig,
    /// Mutual TLS towards every node; `None`: plain HTTP/2.
    tls: Option<TlsConfig>,
    channels: Mutex<HashMap<String, DataClient<Channel>>>,
    leaders: Mutex<HashMap<ShardId, String>>,
    next: AtomicUsize,
}

impl ClientPool {
    pub fn new(config: ClientConfig) -> Arc<Self> {
        Self::with_tls(config, None)
    }

    /// [`ClientPool::new`] over mutual TLS (`None`: plain HTTP/2). A TLS
    /// failure fails the device call at once, never retried.
    pub fn with_tls(config: ClientConfig, tls: Option<TlsConfig>) -> Arc<Self> {
        Arc::new(Self {
            config,
            tls,
            channels: Mutex::new(HashMap::new()),
            leaders: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The Data client for `addr` (the channel is created on first use and
    /// connects lazily; it reconnects by itself after a failure).
    pub fn client(&self, addr: &str) -> Result<DataClient<Channel>, DeviceError> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let ep = ballast_proto::tls::endpoint(addr, self.tls.as_ref())
            .map_err(|e| DeviceError::new(DeviceErrorKind::Io, e.to_string()))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true);
        let client = DataClient::new(ep.connect_lazy())
            .max_decoding_message_size(ballast_proto::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(ballast_proto::MAX_MESSAGE_SIZE);
        channels.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// The cached leader of `shard`, if any.
    pub fn leader(&self, shard: ShardId) -> Option<String> {
        self.leaders.lock().unwrap_or_else(|e| e.into_inner()).get(&shard).cloned()
    }

    fn set_leader(&self, shard: ShardId, addr: &str) {
        let mut leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        if leaders.get(&shard).map(String::as_str) != Some(addr) {
            leaders.insert(shard, addr.to_string());
        }
    }

    /// Forget `addr` as the leader of `shard` (unless another caller has
    /// already learned a different one).
    fn forget_leader(&self, shard: ShardId, addr: &str) {
        let mut leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        if leaders.get(&shard).map(String::as_str) == Some(addr) {
            leaders.remove(&shard);
        }
    }

    fn rotate(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// What the client needs to know about one attached volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeSpec {
    pub id: VolumeId,
    /// Logical size in bytes.
    pub size: u64,
    /// The attach epoch: writes carry it, shards refuse older ones (`FENCED`).
    pub epoch: Epoch,
    pub geometry: Geometry,
    pub read_only: bool,
}

impl VolumeSpec {
    /// A writable volume with the default 4 MiB chunks.
    pub fn new(id: VolumeId, size: u64, epoch: Epoch) -> Self {
        Self { id, size, epoch, geometry: Geometry::default(), read_only: false }
    }
}

/// Largest range one `block_status` call reports on (NBD allows a short
/// answer), so one call is at most this many chunk RPCs.
const MAX_STATUS_CHUNKS: u64 = 16;

/// One replicated volume as an NBD block device.
///
/// **Durability (FUA and FLUSH).** A write, zero or trim returns only after
/// every chunk piece was acknowledged by its shard leader, and a leader
/// acknowledges only once the Raft entry is committed, i.e. fsync'd in the
/// logs of a majority of replicas. Every completed write is therefore
/// already on stable storage: `fua` needs no extra work and
/// [`BlockDevice::flush`] has nothing to wait for, on any connection.
///
/// **Atomicity per block.** Read-modify-write of partial blocks happens in
/// the shard's state machine, which applies entries one at a time, so two
/// concurrent sub-block writes to one block never tear.
pub struct RemoteVolume {
    spec: VolumeSpec,
    placement: Arc<dyn Placement>,
    pool: Arc<ClientPool>,
}

impl RemoteVolume {
    pub fn new(spec: VolumeSpec, placement: Arc<dyn Placement>, pool: Arc<ClientPool>) -> Self {
        Self { spec, placement, pool }
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    /// Call `f` on the leader of the shard holding `chunk`, following hints
    /// and retrying what is retryable until the request deadline. Tells the
    /// placement when an answer suggests its map is out of date.
    async fn call<T, F, Fut>(&self, chunk: u64, deadline: Instant, what: &str, f: F) -> Result<T, DeviceError>
    where
        F: Fn(DataClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, ProtoError>>,
    {
        let m = crate::metrics::metrics();
        let shard = self.placement.shard_of(self.spec.id, chunk).map_err(|e| {
            m.failures.inc();
            device_error(&e)
        })?;
        let cfg = *self.pool.config();
        let mut backoff = Backoff::new(&cfg);
        let mut hops = 0u32;
        let mut first = true;
        let mut last = String::from("no attempt");
        loop {
            let addr = match self.pool.leader(shard) {
                Some(a) => a,
                None => {
                    let nodes = self.placement.nodes(shard);
                    if nodes.is_empty() {
                        self.placement.stale(shard);
                        m.failures.inc();
                        return Err(DeviceError::new(DeviceErrorKind::Io, format!("no node known for {shard}")));
                    }
                    // The placement lists the likely leader first: try it
                    // once, then spread over the others.
                    let i = if first { 0 } else { self.pool.rotate() % nodes.len() };
                    nodes[i].clone()
                }
            };
            first = false;
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(%shard, "{what} gave up: {last}");
                m.failures.inc();
                return Err(DeviceError::new(
                    DeviceErrorKind::Io,
                    format!("{what} on {shard} did not succeed before its deadline: {last}"),
                ));
            }
            let client = self.pool.client(&addr).inspect_err(|_| m.failures.inc())?;
            let timeout = cfg.rpc_timeout.min(deadline - now);
            m.attempts.inc();
            let err = match tokio::time::timeout(timeout, f(client)).await {
                Ok(Ok(v)) => {
                    self.pool.set_leader(shard, &addr);
                    return Ok(v);
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    last = format!("{addr} did not answer in {timeout:?}");
                    m.retry(Retry::Timeout);
                    self.pool.forget_leader(shard, &addr);
                    self.placement.stale(shard);
                    backoff.wait().await;
                    continue;
                }
            };
            last = format!("{addr}: {err}");
            if let ProtoError::Transport(s) = &err {
                match ballast_proto::tls::connect_failure(s, self.pool.tls.is_some()) {
                    // A node that died mid-call looks the same: ask the node.
                    Some(ConnectFailure::PlainRefused) if !ballast_proto::tls::requires_tls(&addr).await => {}
                    Some(f) => {
                        m.failures.inc();
                        return Err(DeviceError::new(DeviceErrorKind::Io, f.at(&addr)));
                    }
                    None => {}
                }
            }
            match &err {
                ProtoError::Api(e) if e.code == ErrorCode::NotLeader => {
                    match e.leader_hint.as_ref().filter(|h| !h.addr.is_empty() && h.addr != addr) {
                        Some(h) => {
                            tracing::debug!(%shard, from = %addr, to = %h.addr, "following leader hint");
                            self.pool.set_leader(shard, &h.addr);
                            m.redirects.inc();
                            hops += 1;
                            // Hints may chase each other during an election: pace them.
                            if hops <= 3 {
                                continue;
                            }
                        }
                        None => {
                            m.retry(Retry::NotLeader);
                            self.pool.forget_leader(shard, &addr);
                            self.placement.stale(shard);
                        }
                    }
                }
                ProtoError::Api(e) if e.code == ErrorCode::NoSuchVolume => {
                    // The node does not know the volume: our map or its may
                    // lag. Not retryable, but worth a fresh map.
                    self.placement.stale(shard);
                    m.failures.inc();
                    return Err(device_error(e));
                }
                ProtoError::Api(e) if !e.is_retryable() => {
                    m.failures.inc();
                    return Err(device_error(e));
                }
                ProtoError::Convert(e) if !e.is_retryable() => {
                    m.failures.inc();
                    return Err(DeviceError::new(DeviceErrorKind::Io, format!("malformed reply from {addr}: {e}")));
                }
                ProtoError::Api(e) if e.code == ErrorCode::StaleMap => {
                    m.retry(Retry::StaleMap);
                    self.pool.forget_leader(shard, &addr);
                    self.placement.stale(shard);
                }
                // Below gRPC: the node may be gone, and the shard with it.
                ProtoError::Transport(_) => {
                    m.retry(Retry::Unreachable);
                    self.pool.forget_leader(shard, &addr);
                    self.placement.stale(shard);
                }
                // Other retryable typed errors: try elsewhere.
                _ => {
                    m.retry(Retry::Other);
                    self.pool.forget_leader(shard, &addr);
                }
            }
            tracing::debug!(%shard, "{what} retrying: {last}");
            backoff.wait().await;
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.pool.config().request_deadline
    }

    fn check_writable(&self) -> Result<(), DeviceError> {
        if self.spec.read_only {
            return Err(DeviceError::new(DeviceErrorKind::NotPermitted, "volume is attached read-only"));
        }
        Ok(())
    }

    fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        self.spec.geometry.chunk_spans(offset, len)
    }

    async fn read_span(
        &self,
        chunk: u64,
        offset: u64,
        length: u64,
        deadline: Instant,
    ) -> Result<Vec<ReadSegment>, DeviceError> {
        let range = RangeRequest { volume: self.spec.id, offset, length };
        let data = self
            .call(chunk, deadline, "read", |mut c| async move {
                let data = c.read(pb::ReadRequest::from(range)).await?.into_inner().into_result()?;
                data.check_covers(&range)
                    .map_err(|e| ProtoError::Api(ApiError::new(ErrorCode::Internal, e.to_string())))?;
                Ok(data)
            })
            .await?;
        Ok(data
            .segments
            .into_iter()
            .map(|s| match s.body {
                SegmentBody::Data { data, .. } => ReadSegment::Data(data),
                SegmentBody::Hole(n) => ReadSegment::Hole(n as u32),
            })
            .collect())
    }

    async fn zero_range(&self, offset: u64, len: u64, punch: bool) -> Result<(), DeviceError> {
        self.check_writable()?;
        let deadline = self.deadline();
        let calls = self.spans(offset, len).map(|(chunk, offset, length)| {
            let z = ZeroRequest { volume: self.spec.id, epoch: self.spec.epoch, offset, length, punch };
            self.call(chunk, deadline, "zero", move |mut c| async move {
                c.zero(pb::ZeroRequest::from(z)).await?.into_inner().into_result()
            })
        });
        try_join_all(calls).await.map(|_| ())
    }
}

/// The device error for a typed error that retrying cannot fix.
pub(crate) fn device_error(e: &ApiError) -> DeviceError {
    let kind = match e.code {
        ErrorCode::Fenced => DeviceErrorKind::NotPermitted,
        ErrorCode::OutOfRange | ErrorCode::Invalid => DeviceErrorKind::Invalid,
        ErrorCode::NoSpace => DeviceErrorKind::NoSpace,
        _ => DeviceErrorKind::Io,
    };
    if e.code == ErrorCode::Corrupt {
        tracing::error!("stored data failed its checksum: {e}");
    }
    DeviceError::new(kind, e.to_string())
}

/// Merge neighbouring holes (pieces of adjacent chunks).
fn merge_holes(segments: Vec<ReadSegment>) -> Vec<ReadSegment> {
    let mut out: Vec<ReadSegment> = Vec::with_capacity(segments.len());
    for s in segments {
        match (out.last_mut(), &s) {
            (Some(ReadSegment::Hole(a)), ReadSegment::Hole(b)) => *a += *b,
            _ if s.is_empty() => {}
            _ => out.push(s),
        }
    }
    out
}

impl BlockDevice for RemoteVolume {
    fn size(&self) -> u64 {
        self.spec.size
    }

    fn read_only(&self) -> bool {
        self.spec.read_only
    }

    fn description(&self) -> Option<String> {
        Some(format!("ballast replicated volume {}, {} bytes", self.spec.id, self.spec.size))
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        let deadline = self.deadline();
        let pieces =
            try_join_all(self.spans(offset, len as u64).map(|(c, o, l)| self.read_span(c, o, l, deadline))).await?;
        Ok(merge_holes(pieces.into_iter().flatten().collect()))
    }

    /// `fua` is honoured by construction: see the type's documentation.
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        self.check_writable()?;
        let deadline = self.deadline();
        let calls = self.spans(offset, data.len() as u64).map(|(chunk, at, length)| {
            let start = (at - offset) as usize;
            let piece = data.slice(start..start + length as usize);
            let req = pb::WriteRequest::from(WriteRequest::new(self.spec.id, self.spec.epoch, at, piece));
            self.call(chunk, deadline, "write", move |mut c| {
                let req = req.clone();
                async move { c.write(req).await?.into_inner().into_result() }
            })
        });
        try_join_all(calls).await.map(|_| ())
    }

    /// Zeroing is a metadata operation on the shard (whole blocks become
    /// deletes), never slower than a write, so `fast` always succeeds.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        _fast: bool,
        _fua: bool,
    ) -> Result<(), DeviceError> {
        self.zero_range(offset, len as u64, may_trim).await
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), DeviceError> {
        self.zero_range(offset, len as u64, true).await
    }

    /// Nothing to do: every acknowledged write is already fsync'd on a
    /// majority of replicas (see the type's documentation).
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn cache(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let chunk_size = self.spec.geometry.chunk_size;
        let limit = (offset / chunk_size + MAX_STATUS_CHUNKS) * chunk_size;
        let len = (len as u64).min(limit - offset);
        let deadline = self.deadline();
        let calls = self.spans(offset, len).map(|(chunk, offset, length)| {
            let range = RangeRequest { volume: self.spec.id, offset, length };
            self.call(chunk, deadline, "block status", move |mut c| async move {
                let x = c.block_status(pb::BlockStatusRequest::from(range)).await?.into_inner().into_result()?;
                validate_extents(&x, Some(&range))
                    .map_err(|e| ProtoError::Api(ApiError::new(ErrorCode::Internal, e.to_string())))?;
                Ok((range, x))
            })
        });
        let answers = try_join_all(calls).await?;
        let mut out: Vec<Extent> = Vec::new();
        for (range, extents) in answers {
            let covered: u64 = extents.iter().map(|e| e.length).sum();
            for e in extents {
                let len = e.length as u32;
                match out.last_mut() {
                    Some(last) if last.hole == e.hole && last.len.checked_add(len).is_some() => last.len += len,
                    _ => out.push(Extent { len, hole: e.hole, zero: e.hole }),
                }
            }
            // A short answer ends the reply here: extents must be contiguous.
            if covered < range.length {
                break;
            }
        }
        if out.is_empty() {
            return Err(DeviceError::new(DeviceErrorKind::Io, "block status answered no extents"));
        }
        Ok(out)
    }
}

/// A fixed set of named [`RemoteVolume`]s as NBD exports; the empty name
/// opens the default export. For tests and static setups: a cluster's
/// volumes are served by [`crate::ClusterExports`].
pub struct RemoteExports {
    volumes: HashMap<String, Arc<RemoteVolume>>,
    default_export: Option<String>,
}

impl RemoteExports {
    pub fn new(volumes: impl IntoIterator<Item = (String, Arc<RemoteVolume>)>) -> Self {
        Self { volumes: volumes.into_iter().collect(), default_export: None }
    }

    /// Serve `name` to clients that ask for the empty export name.
    pub fn with_default(mut self, name: impl Into<String>) -> Self {
        self.default_export = Some(name.into());
        self
    }
}

impl ExportProvider for RemoteExports {
    type Device = RemoteVolume;

    async fn list(&self) -> Result<Vec<(String, String)>, DeviceError> {
        let mut names: Vec<(String, String)> =
            self.volumes.iter().map(|(n, v)| (n.clone(), v.description().unwrap_or_default())).collect();
        names.sort();
        Ok(names)
    }

    async fn open(&self, name: &str) -> Result<Option<Arc<RemoteVolume>>, DeviceError> {
        let name = match (name, &self.default_export) {
            ("", Some(d)) => d.as_str(),
            _ => name,
        };
        Ok(self.volumes.get(name).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_holes_merge() {
        let segs = vec![
            ReadSegment::Hole(10),
            ReadSegment::Hole(5),
            ReadSegment::Data(Bytes::from_static(b"ab")),
            ReadSegment::Hole(0),
            ReadSegment::Hole(3),
        ];
        assert_eq!(
            merge_holes(segs),
            vec![ReadSegment::Hole(15), ReadSegment::Data(Bytes::from_static(b"ab")), ReadSegment::Hole(3)]
        );
    }

    #[test]
    fn errors_map_to_the_kinds_nbd_clients_see() {
        let k = |c| device_error(&ApiError::new(c, "x")).kind;
        assert_eq!(k(ErrorCode::Fenced), DeviceErrorKind::NotPermitted);
        assert_eq!(k(ErrorCode::Corrupt), DeviceErrorKind::Io);
        assert_eq!(k(ErrorCode::OutOfRange), DeviceErrorKind::Invalid);
        assert_eq!(k(ErrorCode::Invalid), DeviceErrorKind::Invalid);
    }
}

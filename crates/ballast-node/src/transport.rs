//! The gRPC side of `ballast_raft::Transport`: node-to-node Raft messages for
//! every group of this process over one HTTP/2 connection per peer.
//!
//! Each openraft message is encoded with `ballast_raft::codec` (versioned
//! postcard) into the opaque `payload` of a `RaftRequest`; the envelope names
//! cluster, sender, target and group so the receiver refuses misrouted
//! traffic. A snapshot is a client-streaming `InstallSnapshot` call carrying
//! **one `ShardSnapshot` frame per chunk** (the receiver relies on chunk
//! boundaries being frame boundaries), vote and meta on the first chunk, and
//! a final empty chunk with `done`. Memory stays bounded: frames are produced
//! at most two ahead of the socket. Snapshot streams (how a rebuilt replica
//! gets a shard's data) share one [`Pacer`] per node when a rebuild rate is
//! set, so rebuilds never take the whole disk or network from client I/O.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ballast_proto::{pb, ProtoError, Reply};
use ballast_proto::{PeerClient, PresentToken};
use ballast_raft::types::{SnapshotMeta, Vote};
use ballast_raft::{codec, BallastNode, FullSnapshot, NodeId, Transport, TransportError, TypeConfig};
use ballast_types::{ClusterId, GroupId, RaftEnvelope, RaftRequest, SnapshotChunk, SnapshotStart};
use bytes::Bytes;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long a new connection may take before the call counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One node's Raft transport: a lazily connected channel per peer address,
/// shared by every group.
pub struct GrpcTransport {
    cluster: ClusterId,
    me: NodeId,
    peers: Mutex<HashMap<String, PeerClient>>,
    /// Paces outgoing snapshot bytes (rebuilds); `None`: as fast as they go.
    rebuild: Option<std::sync::Arc<Pacer>>,
    /// Mutual TLS towards peers; `None`: plain HTTP/2.
    tls: Option<ballast_proto::TlsConfig>,
    /// Presented on every call ([`ballast_proto::auth`]).
    token: PresentToken,
    /// Snapshot bytes sent per (group, target), for rebuild progress.
    rebuilds: std::sync::Arc<crate::repair::Rebuilds>,
}

/// Spreads bytes over time at `rate` bytes per second, across every caller:
/// each [`take`](Self::take) reserves its share of the timeline and waits
/// for its turn.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    next: Mutex<Instant>,
}

impl Pacer {
    /// `rate` bytes per second (at least 1).
    pub fn new(rate: u64) -> Self {
        Self { rate: rate.max(1), next: Mutex::new(Instant::now()) }
    }

    /// Wait until `bytes` more may go.
    pub async fn take(&self, bytes: u64) {
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

impl GrpcTransport {
    /// `rebuild_rate`: bytes per second for all snapshot streams of this node
    /// together (`None` or 0: unlimited).
    pub fn new(cluster: ClusterId, me: NodeId, rebuild_rate: Option<u64>) -> Self {
        let rebuild = rebuild_rate.filter(|r| *r > 0).map(|r| std::sync::Arc::new(Pacer::new(r)));
        Self {
            cluster,
            me,
            peers: Mutex::new(HashMap::new()),
            rebuild,
            tls: None,
            token: PresentToken::default(),
            rebuilds: Default::default(),
        }
    }

    /// The replicas being built through this transport's snapshot streams.
    pub(crate) fn rebuilds(&self) -> &std::sync::Arc<crate::repair::Rebuilds> {
        &self.rebuilds
    }

    /// Connect to peers over mutual TLS (`None`: plain HTTP/2).
    pub fn with_tls(mut self, tls: Option<ballast_proto::TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Present `token` on every call (the peers refuse calls without their token).
    pub fn with_token(mut self, token: PresentToken) -> Self {
        self.token = token;
        self
    }

    /// The client for `node`'s address; connects on first use and reconnects
    /// by itself after the peer restarts.
    fn client(&self, target: NodeId, node: &BallastNode) -> Result<PeerClient, TransportError> {
        if crate::faults::blocked(target) {
            return Err(TransportError::Unreachable { target, reason: "partition fault".into() });
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = peers.get(&node.addr) {
            return Ok(c.clone());
        }
        let endpoint = ballast_proto::tls::endpoint(&node.addr, self.tls.as_ref())
            .map_err(|e| TransportError::Unreachable { target, reason: e.to_string() })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let client = ballast_proto::peer_client(endpoint.connect_lazy(), &self.token);
        peers.insert(node.addr.clone(), client.clone());
        Ok(client)
    }

    fn envelope(&self, target: NodeId, group: GroupId) -> RaftEnvelope {
        RaftEnvelope {
            cluster: self.cluster,
            from: ballast_types::NodeId(self.me),
            target: ballast_types::NodeId(target),
            group,
        }
    }

    fn request<Q: Serialize>(
        &self,
        target: NodeId,
        group: GroupId,
        rpc: &Q,
        timeout: Duration,
    ) -> Result<tonic::Request<pb::RaftRequest>, TransportError> {
        let payload = codec::encode(rpc).map_err(|e| remote(target, &e))?;
        let msg = pb::RaftRequest::from(RaftRequest { envelope: self.envelope(target, group), payload });
        let mut req = tonic::Request::new(msg);
        req.set_timeout(timeout);
        Ok(req)
    }
}

fn remote(target: NodeId, e: &dyn std::fmt::Display) -> TransportError {
    TransportError::Remote { target, reason: e.to_string() }
}

/// A failed call as openraft's transport sees it.
fn call_error(target: NodeId, timeout: Option<Duration>, status: tonic::Status) -> TransportError {
    match (status.code(), timeout) {
        (tonic::Code::DeadlineExceeded, Some(after)) => TransportError::Timeout { target, after },
        (tonic::Code::Unavailable | tonic::Code::Unknown, _)
            if ballast_proto::api_error_from_status(&status).is_none() =>
        {
            TransportError::Unreachable { target, reason: status.message().to_string() }
        }
        _ => remote(target, &ProtoError::from(status)),
    }
}

/// Decode a `RaftReply` into the openraft response it carries.
fn decode_reply<R: DeserializeOwned>(target: NodeId, reply: pb::RaftReply) -> Result<R, TransportError> {
    let payload = reply.into_result().map_err(|e| remote(target, &e))?;
    codec::decode(&payload).map_err(|e| remote(target, &e))
}

/// Run a unary call within `timeout` (the deadline also travels to the server).
async fn unary<R: DeserializeOwned>(
    target: NodeId,
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<pb::RaftReply>, tonic::Status>>,
) -> Result<R, TransportError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(TransportError::Timeout { target, after: timeout }),
        Ok(Err(status)) => Err(call_error(target, Some(timeout), status)),
        Ok(Ok(resp)) => decode_reply(target, resp.into_inner()),
    }
}

impl Transport for GrpcTransport {
    async fn append_entries(
        &self,
        target: NodeId,
        node: &BallastNode,
        group: u64,
        rpc: AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> Result<AppendEntriesResponse<TypeConfig>, TransportError> {
        let mut client = self.client(target, node)?;
        let req = self.request(target, GroupId(group), &rpc, timeout)?;
        unary(target, timeout, client.append_entries(req)).await
    }

    async fn vote(
        &self,
        target: NodeId,
        node: &BallastNode,
        group: u64,
        rpc: VoteRequest<TypeConfig>,
        pre: bool,
        timeout: Duration,
    ) -> Result<VoteResponse<TypeConfig>, TransportError> {
        let mut client = self.client(target, node)?;
        let req = self.request(target, GroupId(group), &rpc, timeout)?;
        if pre {
            unary(target, timeout, client.pre_vote(req)).await
        } else {
            unary(target, timeout, client.vote(req)).await
        }
    }

    async fn full_snapshot(
        &self,
        target: NodeId,
        node: &BallastNode,
        group: u64,
        vote: Vote,
        snapshot: FullSnapshot,
    ) -> Result<SnapshotResponse<TypeConfig>, TransportError> {
        let mut client = self.client(target, node)?;
        let envelope = self.envelope(target, GroupId(group));
        let meta: &SnapshotMeta = &snapshot.meta;
        let start = SnapshotStart {
            vote: codec::encode(&vote).map_err(|e| remote(target, &e))?,
            meta: codec::encode(meta).map_err(|e| remote(target, &e))?,
        };
        let frames = snapshot.snapshot.into_frames();
        // State of the outgoing stream: frames left, next offset, the start
        // (taken by the first chunk), and whether `done` was sent.
        let state = (frames, 0u64, Some(start), false);
        let pacer = self.rebuild.clone();
        let rebuilds = self.rebuilds.clone();
        rebuilds.stream_started(group, target);
        let chunks = futures::stream::unfold(state, move |(mut frames, offset, mut start, finished)| {
            let (pacer, rebuilds) = (pacer.clone(), rebuilds.clone());
            async move {
                if finished {
                    return None;
                }
                let (data, done) = match frames.recv().await {
                    Some(Ok(frame)) => (frame, false),
                    None => (Bytes::new(), true),
                    Some(Err(e)) => {
                        // Ending without `done` makes the receiver discard what it got.
                        tracing::warn!(group, target, "snapshot frames failed, stream cut: {e}");
                        return None;
                    }
                };
                let len = data.len() as u64;
                if let Some(p) = &pacer {
                    p.take(len).await;
                }
                rebuilds.sent(group, target, len);
                let chunk = SnapshotChunk { envelope, offset, start: start.take(), data, done };
                Some((pb::SnapshotChunk::from(chunk), (frames, offset + len, start, done)))
            }
        });
        let reply =
            client.install_snapshot(tonic::Request::new(chunks)).await.map_err(|s| call_error(target, None, s))?;
        decode_reply(target, reply.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pacer_spreads_bytes_at_its_rate_across_callers() {
        // 20 MiB at 100 MiB/s through four callers: never sooner than 0.19 s
        // (the first megabyte goes at once); the upper bound only catches a
        // pacer that sleeps far too long.
        let pacer = std::sync::Arc::new(Pacer::new(100 << 20));
        let started = Instant::now();
        let streams: Vec<_> = (0..4)
            .map(|_| {
                let p = pacer.clone();
                tokio::spawn(async move {
                    for _ in 0..5 {
                        p.take(1 << 20).await;
                    }
                })
            })
            .collect();
        for s in streams {
            s.await.expect("stream");
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(185) && took < Duration::from_secs(5), "{took:?}");
    }
}

//! openraft adapter: the network. [`Transport`] is what the node crate
//! implements (over tonic); [`ShardNetworkFactory`] turns it into openraft's
//! `RaftNetworkFactory` / `RaftNetworkV2` for one group.
//!
//! Every call names the target node and the group, so one transport (one
//! connection pool per peer) serves every group of the process. Messages are
//! openraft's own request and response types; a transport serializes them
//! with [`crate::codec`] (they are serde types) into an opaque bytes field.
//! Snapshots are sent whole, as a [`ShardSnapshot`] whose frames the transport
//! streams (client-streaming RPC) and the receiver rebuilds with a
//! [`crate::SnapshotReceiver`] before calling `Raft::install_full_snapshot`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::Snapshot;

use crate::snapshot::ShardSnapshot;
use crate::types::{BallastNode, GroupId, NodeId, ShardRequest, TypeConfig, Vote};

/// Why a transport call failed. Every variant means "no answer": openraft
/// retries with backoff.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The peer could not be reached (connection refused, isolated, ...).
    #[error("node {target} unreachable: {reason}")]
    Unreachable { target: NodeId, reason: String },
    /// The call did not finish within its deadline.
    #[error("call to node {target} timed out after {after:?}")]
    Timeout { target: NodeId, after: Duration },
    /// The peer answered with an error (e.g. the group is not running there).
    #[error("node {target} failed the call: {reason}")]
    Remote { target: NodeId, reason: String },
}

impl ballast_types::Retryable for TransportError {
    fn is_retryable(&self) -> bool {
        true
    }
}

/// A full snapshot as openraft hands it over.
pub type FullSnapshot = Snapshot<openraft::alias::CommittedLeaderIdOf<TypeConfig>, NodeId, BallastNode, ShardSnapshot>;

/// Node-to-node Raft messages, for every group of this process.
///
/// Implementations route by `(target, group)`: the receiving node hands the
/// request to its `Raft` handle of `group` (`append_entries`, `vote`, or, for
/// snapshots, rebuild the frames and call `install_full_snapshot(vote, ..)`)
/// and returns its answer. `timeout` is openraft's deadline for the call.
pub trait Transport: Send + Sync + 'static {
    fn append_entries(
        &self,
        target: NodeId,
        node: &BallastNode,
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> impl Future<Output = Result<AppendEntriesResponse<TypeConfig>, TransportError>> + Send;

    /// Ask `target` for its vote; with `pre`, only whether it would grant
    /// `rpc` (a Pre-Vote, which changes nothing there).
    fn vote(
        &self,
        target: NodeId,
        node: &BallastNode,
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
        pre: bool,
        timeout: Duration,
    ) -> impl Future<Output = Result<VoteResponse<TypeConfig>, TransportError>> + Send;

    /// Stream `snapshot` to `target`, which installs it with `vote`.
    /// [`ShardSnapshot::into_frames`] gives the frames to send, in order.
    fn full_snapshot(
        &self,
        target: NodeId,
        node: &BallastNode,
        group: GroupId,
        vote: Vote,
        snapshot: FullSnapshot,
    ) -> impl Future<Output = Result<SnapshotResponse<TypeConfig>, TransportError>> + Send;
}

/// openraft's network factory for one group over a shared [`Transport`].
pub struct ShardNetworkFactory<T: Transport> {
    transport: Arc<T>,
    group: GroupId,
}

impl<T: Transport> ShardNetworkFactory<T> {
    pub fn new(transport: Arc<T>, group: GroupId) -> Self {
        Self { transport, group }
    }
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for ShardNetworkFactory<T> {
    type Network = ShardNetwork<T>;

    async fn new_client(&mut self, target: NodeId, node: &BallastNode) -> Self::Network {
        ShardNetwork { transport: self.transport.clone(), group: self.group, target, node: node.clone() }
    }
}

/// openraft's connection to one peer for one group.
pub struct ShardNetwork<T: Transport> {
    transport: Arc<T>,
    group: GroupId,
    target: NodeId,
    node: BallastNode,
}

/// Most entry payload bytes in one AppendEntries (at least one entry is
/// always sent; a single write is at most `MAX_IO_LEN`).
pub const MAX_APPEND_BYTES: usize = 8 << 20;

/// Bytes an entry adds to an AppendEntries message, roughly: its payload
/// plus a fixed allowance for ids and framing.
fn entry_bytes(e: &crate::types::Entry) -> usize {
    const OVERHEAD: usize = 64;
    match &e.payload {
        openraft::EntryPayload::Normal(ShardRequest::Write { data, .. }) => OVERHEAD + data.len(),
        _ => OVERHEAD,
    }
}

/// How many leading entries fit in `budget` bytes (at least one), and their size.
fn entries_within(entries: &[crate::types::Entry], budget: usize) -> (usize, usize) {
    let mut bytes = 0;
    for (i, e) in entries.iter().enumerate() {
        let b = entry_bytes(e);
        if i > 0 && bytes + b > budget {
            return (i, bytes);
        }
        bytes += b;
    }
    (entries.len(), bytes)
}

/// openraft's deadline for an AppendEntries is one heartbeat interval,
/// meant for heartbeats. A message carrying data also needs time to cross
/// the wire and be fsync'd on a busy follower: give it at least two seconds
/// plus a second per 8 MiB, or a large batch never completes and is resent
/// forever.
fn append_timeout(ttl: Duration, bytes: usize) -> Duration {
    ttl.max(Duration::from_secs(2)) + Duration::from_millis((bytes as u64 * 1000) / (8 << 20))
}

fn rpc_error(e: TransportError) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&e))
}

impl<T: Transport> RaftNetworkV2<TypeConfig> for ShardNetwork<T> {
    type SnapshotData = ShardSnapshot;

    /// Sends at most [`MAX_APPEND_BYTES`] of entries per call: openraft
    /// batches up to `max_payload_entries` entries whatever their size, and
    /// a backlog of large writes would otherwise make one message larger
    /// than the transport accepts (or slower than its deadline) and stall
    /// the follower for good. A cut batch is answered with `PartialSuccess`
    /// and openraft continues from there.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let (keep, bytes) = entries_within(&rpc.entries, MAX_APPEND_BYTES);
        let cut = keep < rpc.entries.len();
        if cut {
            rpc.entries.truncate(keep);
        }
        let last_sent = rpc.entries.last().map(|e| e.log_id);
        let timeout = append_timeout(option.hard_ttl(), bytes);
        let call = self.transport.append_entries(self.target, &self.node, self.group, rpc, timeout);
        match call.await.map_err(rpc_error)? {
            AppendEntriesResponse::Success if cut => Ok(AppendEntriesResponse::PartialSuccess(last_sent)),
            other => Ok(other),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.transport.vote(self.target, &self.node, self.group, rpc, false, option.hard_ttl()).await.map_err(rpc_error)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.transport.vote(self.target, &self.node, self.group, rpc, true, option.hard_ttl()).await.map_err(rpc_error)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: FullSnapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let send = self.transport.full_snapshot(self.target, &self.node, self.group, vote, snapshot);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r.map_err(|e| StreamingError::Unreachable(Unreachable::new(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Entry;
    use ballast_types::VolumeId;
    use bytes::Bytes;
    use openraft::entry::RaftEntry;

    fn write(index: u64, len: usize) -> Entry {
        let req = ShardRequest::Write { volume: VolumeId(1), epoch: 1, offset: 0, data: Bytes::from(vec![0u8; len]) };
        let log_id = crate::types::LogId::new(
            <openraft::impls::leader_id_adv::LeaderId<u64, u64> as openraft::vote::RaftLeaderId>::new(1, 1),
            index,
        );
        Entry::new_normal(log_id, req)
    }

    #[test]
    fn append_batches_are_cut_by_bytes_but_always_carry_one_entry() {
        let big: Vec<Entry> = (1..=40).map(|i| write(i, 1 << 20)).collect();
        let (keep, bytes) = entries_within(&big, MAX_APPEND_BYTES);
        assert_eq!(keep, 7, "7 entries of 1 MiB + overhead fit in 8 MiB");
        assert!(bytes <= MAX_APPEND_BYTES);
        let huge = vec![write(1, 32 << 20), write(2, 4096)];
        assert_eq!(entries_within(&huge, MAX_APPEND_BYTES).0, 1, "an oversized first entry still goes alone");
        let small: Vec<Entry> = (1..=300).map(|i| write(i, 4096)).collect();
        assert_eq!(entries_within(&small, MAX_APPEND_BYTES).0, 300, "small entries are not cut");
        assert_eq!(entries_within(&[], MAX_APPEND_BYTES), (0, 0));
    }

    #[test]
    fn append_deadline_grows_with_the_payload() {
        let hb = Duration::from_millis(250);
        assert_eq!(append_timeout(hb, 0), Duration::from_secs(2));
        assert_eq!(append_timeout(hb, 8 << 20), Duration::from_secs(3));
        assert_eq!(append_timeout(Duration::from_secs(5), 0), Duration::from_secs(5));
    }
}

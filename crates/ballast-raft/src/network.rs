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
use crate::types::{BallastNode, GroupId, NodeId, TypeConfig, Vote};

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

    fn vote(
        &self,
        target: NodeId,
        node: &BallastNode,
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
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

fn rpc_error(e: TransportError) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&e))
}

impl<T: Transport> RaftNetworkV2<TypeConfig> for ShardNetwork<T> {
    type SnapshotData = ShardSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let call = self.transport.append_entries(self.target, &self.node, self.group, rpc, option.hard_ttl());
        call.await.map_err(rpc_error)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.transport.vote(self.target, &self.node, self.group, rpc, option.hard_ttl()).await.map_err(rpc_error)
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

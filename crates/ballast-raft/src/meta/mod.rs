//! The meta group: Raft group 0, replicating the [`ClusterMap`] (nodes,
//! pools, volumes, shard placement, attach epochs).
//!
//! Read first: [`map`] (the commands and their deterministic `apply`), then
//! [`placement`] (pure placement and repair decisions), then [`state`] (how
//! the map is persisted and snapshotted). [`start_meta`] runs the group on
//! the same machinery as the shards: the disk's [`LogWriter`] and log store,
//! the shared [`Transport`], and [`ShardStateMachine`] opened in its meta
//! mode — so the meta group's `Raft` has the same type as a shard's
//! ([`ShardRaft`]) and a router or transport serves it without change.
//!
//! Replies: a command's typed answer ([`MetaReply`]) is computed by every
//! replica but handed over out of band — the state machine answers
//! `ShardResponse::Done` to openraft and keeps the reply for the local
//! proposer, which [`MetaGroup::propose`] picks up by log index. (So
//! `ShardResponse` keeps its three variants, which callers match exhaustively.)

pub mod map;
pub mod placement;
pub(crate) mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ballast_storage::{BlockStore, LogStore};
use ballast_types::{ApiError, ErrorCode};
use openraft::Raft;

pub use map::{
    ClusterMap, MetaCommand, MetaFailure, MetaNode, MetaOutcome, MetaPool, MetaPoolSpec, MetaReply, MetaShard,
    MetaVolume, RepairPlan,
};
pub use placement::{Action, Load, NodeSlot, Placement, PlacementError, PlacementRule};
pub use state::META_SHARD;

use crate::error::ShardError;
use crate::log_store::ShardLogStore;
use crate::log_writer::LogWriter;
use crate::network::{ShardNetworkFactory, Transport};
use crate::shard::{ShardConfig, ShardGroup, ShardRaft, ShardSpec};
use crate::state_machine::ShardStateMachine;
use crate::types::{BallastNode, GroupId, NodeId, ShardRequest};
use state::MetaState;

/// The meta group's Raft group id.
pub const META_GROUP: GroupId = 0;

/// Where the meta replica spills received snapshots, under the node's
/// snapshot directory `base` (the counterpart of
/// [`crate::state_machine::shard_snapshot_dir`] for group 0).
pub fn meta_snapshot_dir(base: &Path) -> PathBuf {
    base.join("meta")
}

/// A running meta replica.
pub struct MetaGroup<S: BlockStore> {
    group: ShardGroup<S>,
    state: Arc<Mutex<MetaState>>,
}

/// Start (or restart, from what `log` and `store` hold) this node's meta
/// replica. Received snapshots are spilled under [`meta_snapshot_dir`].
pub async fn start_meta<L: LogStore, S: BlockStore, T: Transport>(
    node: NodeId,
    config: &ShardConfig,
    log: &LogWriter<L>,
    store: Arc<S>,
    snapshot_dir: &Path,
    transport: Arc<T>,
) -> Result<MetaGroup<S>, ShardError> {
    let unavailable = |e: &dyn std::fmt::Display| ShardError::Unavailable { group: META_GROUP, reason: e.to_string() };
    let raft_config = Arc::new(config.openraft(META_GROUP)?);
    let log_store = ShardLogStore::open(META_GROUP, log.clone())?;
    let sm = ShardStateMachine::open_meta(store.clone(), snapshot_dir).map_err(|e| unavailable(&e))?;
    let state = sm.meta_state().ok_or_else(|| unavailable(&"meta state machine without meta state"))?;
    let network = ShardNetworkFactory::new(transport, META_GROUP);
    let raft = Raft::new(node, raft_config, network, log_store, sm).await.map_err(|e| unavailable(&e))?;
    let spec = ShardSpec { group: META_GROUP, shard: META_SHARD, node };
    tokio::spawn(crate::shard::log_role_changes(spec, raft.metrics()));
    Ok(MetaGroup { group: ShardGroup::from_parts(spec, raft, store, config, false), state })
}

impl<S: BlockStore> MetaGroup<S> {
    pub fn raft(&self) -> &ShardRaft<S> {
        self.group.raft()
    }

    /// The group as a [`ShardGroup`] (for routers that hold every group).
    pub fn group(&self) -> &ShardGroup<S> {
        &self.group
    }

    /// A second handle on the same replica, for a router that owns its
    /// groups. Shutting either down stops the replica.
    pub fn router_handle(&self) -> ShardGroup<S> {
        self.group.handle()
    }

    /// Make this replica the first member of a new meta group of `members`
    /// (call on one node only).
    pub async fn initialize(&self, members: BTreeMap<NodeId, BallastNode>) -> Result<(), ShardError> {
        self.group.initialize(members).await
    }

    /// The leader this replica knows of, with its address.
    pub fn leader(&self) -> Option<(NodeId, BallastNode)> {
        self.group.leader()
    }

    /// Replicate and apply `cmd` through this replica (which must lead).
    /// `Err` means the command may not have been applied (re-route on
    /// `NotLeader`; after `OutcomeUnknown` read the map before retrying —
    /// meta commands are not all idempotent). `Ok(Err(_))` means it was
    /// applied and refused, with the typed reason.
    pub async fn propose(&self, cmd: MetaCommand) -> Result<Result<MetaOutcome, ApiError>, ShardError> {
        let (index, _) = self.group.write_at(ShardRequest::Meta(cmd)).await?;
        let reply = state::lock(&self.state).replies.remove(&index);
        Ok(match reply {
            Some(r) => r.into_result(),
            None => Err(ApiError::new(ErrorCode::Internal, format!("no reply recorded for meta entry {index}"))),
        })
    }

    /// A linearizable copy of the map: this replica leads, holds a valid
    /// lease and has applied everything committed before the call.
    pub async fn read_map(&self) -> Result<ClusterMap, ShardError> {
        self.group.linearize().await?;
        Ok(self.local_map())
    }

    /// This replica's applied map, without any freshness guarantee (a
    /// follower's may lag). For metrics, tests and map-version checks.
    pub fn local_map(&self) -> ClusterMap {
        state::lock(&self.state).map.clone()
    }

    /// Stop the replica's Raft tasks. Its storage stays as it is.
    pub async fn shutdown(&self) -> Result<(), ShardError> {
        self.group.shutdown().await
    }
}

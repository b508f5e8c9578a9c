//! The Raft layer of Ballast: one openraft group per shard, over the disk's
//! [`LogStore`](ballast_storage::LogStore) and [`BlockStore`](ballast_storage::BlockStore).
//!
//! Read first: [`shard`] (how a replica is started and used), then the three
//! openraft adapters — [`log_store`], [`state_machine`], [`network`] — which
//! are the only modules that see openraft's storage and network traits, so an
//! openraft upgrade touches them (and [`types`]) only.
//!
//! - [`log_writer`]: the per-disk group-commit writer (one sync for the log
//!   writes of every group on a disk).
//! - [`apply`]: how a request becomes block changes (fencing, validation).
//! - [`divergence`]: comparing replicas with each other (digests at a log
//!   position, the majority vote) and realigning a divergent one.
//! - [`snapshot`]: bounded-memory snapshots (live scans on the sender, a
//!   spill file on the receiver) and why a live scan is a valid snapshot.
//! - [`meta`]: the meta group (group 0): the cluster map, placement and
//!   repair planning, and [`start_meta`].
//! - [`codec`]: the versioned binary format of entries and frames.
//!
//! Invariants: an acknowledged write is in the log of a majority, fsync'd;
//! the state machine's last-applied id is written in the same batch as the
//! changes it covers; the log is purged only below a synced applied state.

pub mod apply;
pub mod codec;
pub mod divergence;
mod error;
#[cfg(feature = "faults")]
pub mod faults;
pub mod log_store;
pub mod log_writer;
pub mod meta;
pub mod metrics;
pub mod network;
pub mod shard;
pub mod snapshot;
pub mod state_machine;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod types;

#[cfg(test)]
mod tests;

pub use error::ShardError;
pub use log_store::ShardLogStore;
pub use log_writer::{LogWriter, WriteFailed, WriterCounts};
pub use meta::{start_meta, ClusterMap, MetaCommand, MetaGroup, MetaOutcome, META_GROUP};
pub use network::{FullSnapshot, ShardNetworkFactory, Transport, TransportError};
pub use shard::{start_shard, Membership, ShardConfig, ShardGroup, ShardRaft, ShardSpec};
pub use snapshot::{ShardSnapshot, SnapshotError, SnapshotHeader, SnapshotPage, SnapshotReceiver};
pub use state_machine::ShardStateMachine;
pub use types::{BallastNode, GroupId, NodeId, ShardRequest, ShardResponse, TypeConfig};

//! Errors of the Raft layer, classified for retries.

use ballast_storage::StorageError;
use ballast_types::Retryable;

use crate::codec::CodecError;
use crate::types::NodeId;

/// Why a request to a shard group failed.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// This replica is not the leader. `leader` (with its address) is the
    /// leader it knows of, if any: retry there.
    #[error("not the leader of group {group}; leader: {leader:?} at {addr:?}")]
    NotLeader { group: u64, leader: Option<NodeId>, addr: Option<String> },
    /// The entry was proposed but leadership changed before it committed here:
    /// it may or may not be applied. Ballast writes are idempotent, so retrying
    /// through the new leader is safe.
    #[error("leadership of group {group} changed; outcome unknown, retry through {leader:?}")]
    OutcomeUnknown { group: u64, leader: Option<NodeId>, addr: Option<String> },
    /// The group's Raft instance stopped on this node (shutdown or a fatal
    /// storage error). Another replica may serve.
    #[error("group {group} is unavailable on this node: {reason}")]
    Unavailable { group: u64, reason: String },
    /// A Raft operation refused the request (e.g. a membership change in progress).
    #[error("group {group}: {reason}")]
    Rejected { group: u64, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl Retryable for ShardError {
    fn is_retryable(&self) -> bool {
        match self {
            ShardError::NotLeader { .. } | ShardError::OutcomeUnknown { .. } | ShardError::Unavailable { .. } => true,
            ShardError::Rejected { .. } | ShardError::Codec(_) => false,
            ShardError::Storage(e) => e.is_retryable(),
        }
    }
}

/// Map a storage error into the `io::Error` openraft's storage traits speak.
pub(crate) fn io_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::other(e)
}

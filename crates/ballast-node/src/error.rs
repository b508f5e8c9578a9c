//! Errors of the node process, classified for retries.

use ballast_raft::ShardError;
use ballast_storage::StorageError;
use ballast_types::{GroupId, Retryable};

/// Why a node-level operation (start, replica management, shutdown) failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration cannot work (no data dir, bad address, ...).
    #[error("invalid node configuration: {0}")]
    Config(String),
    /// A data dir's store could not be opened.
    #[error("opening data dir: {0}")]
    Storage(#[from] StorageError),
    /// Binding or serving the gRPC listener failed.
    #[error("gRPC listener on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    /// A replica of `group` already runs on this node.
    #[error("{group} already runs on this node")]
    GroupExists { group: GroupId },
    /// No replica of `group` runs on this node.
    #[error("{group} does not run on this node")]
    NoSuchGroup { group: GroupId },
    /// The node does not belong to a cluster yet (no `cluster init`/join).
    #[error("this node is not part of a cluster yet")]
    NoIdentity,
    /// The node is shutting down and takes no new work.
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A disk's replica manifest is unreadable or could not be written.
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Retryable for NodeError {
    fn is_retryable(&self) -> bool {
        match self {
            NodeError::Storage(e) => e.is_retryable(),
            NodeError::Shard(e) => e.is_retryable(),
            // A port in use or a store still held by a previous instance may free up.
            NodeError::Listen { .. } | NodeError::Io(_) => true,
            NodeError::Config(_)
            | NodeError::Manifest(_)
            | NodeError::GroupExists { .. }
            | NodeError::NoSuchGroup { .. }
            | NodeError::ShuttingDown => false,
            NodeError::NoIdentity => true,
        }
    }
}

use ballast_types::{BlockKey, Retryable};

/// Errors of a block store. Corruption is its own variant so callers can
/// answer from another replica and repair, never hand out bad bytes.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("checksum mismatch at {key:?}: stored {stored:#010x}, computed {computed:#010x}")]
    Corrupt { key: BlockKey, stored: u32, computed: u32 },
    #[error("malformed stored value at {key:?}: {reason}")]
    Malformed { key: BlockKey, reason: &'static str },
    #[error("block payload must be {expected} bytes, got {got}")]
    BadBlockLength { expected: usize, got: usize },
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("opening store at {path}: {reason}")]
    Open { path: String, reason: String },
}

impl Retryable for StorageError {
    fn is_retryable(&self) -> bool {
        // A local engine error (e.g. a busy write stall) may pass; corruption and
        // bad input never do.
        matches!(self, StorageError::Engine(_))
    }
}

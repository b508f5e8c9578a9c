//! The Raft-log contract: per-group logs of opaque entries plus a few named
//! state values per group, on one disk.
//!
//! [`LogStore`] knows nothing of Raft or of any engine: entries are bytes at an
//! index, state values are bytes under a short name. [`MemLogStore`] keeps
//! everything in memory; `RocksStore` keeps it in the `raft_log` and
//! `raft_state` column families. Both pass [`crate::log_conformance`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use bytes::Bytes;

use crate::StorageError;

/// A Raft group on this disk (a shard replica, or the meta group).
pub type GroupId = u64;

/// One change in a [`LogBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// Store `data` at `index` of `group`'s log, replacing what was there.
    Append {
        group: GroupId,
        index: u64,
        data: Bytes,
    },
    /// Remove every entry of `group` with an index `>= index` (a conflicting suffix).
    TruncateFrom {
        group: GroupId,
        index: u64,
    },
    /// Remove every entry of `group` with an index `<= index` (compaction).
    PurgeUpto {
        group: GroupId,
        index: u64,
    },
    /// Set a state value of `group` (vote, purge point, ...). Names are short
    /// UTF-8 strings chosen by the caller.
    PutState {
        group: GroupId,
        key: String,
        value: Bytes,
    },
    DeleteState {
        group: GroupId,
        key: String,
    },
}

/// Log changes applied atomically and in order: after a crash either the whole
/// batch is there or none of it. One batch may touch any number of groups —
/// that is what lets one writer commit many groups with one sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogBatch {
    pub ops: Vec<LogOp>,
}

impl LogBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn append(&mut self, group: GroupId, index: u64, data: Bytes) {
        self.ops.push(LogOp::Append { group, index, data });
    }
    pub fn truncate_from(&mut self, group: GroupId, index: u64) {
        self.ops.push(LogOp::TruncateFrom { group, index });
    }
    pub fn purge_upto(&mut self, group: GroupId, index: u64) {
        self.ops.push(LogOp::PurgeUpto { group, index });
    }
    pub fn put_state(&mut self, group: GroupId, key: impl Into<String>, value: Bytes) {
        self.ops.push(LogOp::PutState { group, key: key.into(), value });
    }
    pub fn delete_state(&mut self, group: GroupId, key: impl Into<String>) {
        self.ops.push(LogOp::DeleteState { group, key: key.into() });
    }
    /// Append every op of `other` after this batch's ops.
    pub fn extend(&mut self, other: LogBatch) {
        self.ops.extend(other.ops);
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    /// Payload bytes carried by the batch (entries and state values).
    pub fn payload_bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                LogOp::Append { data, .. } => data.len(),
                LogOp::PutState { value, .. } => value.len(),
                _ => 0,
            })
            .sum()
    }
}

/// Raft logs of every group whose replica lives on one disk.
///
/// Contract, tested by [`crate::log_conformance`]:
/// - **Atomicity and order.** [`LogStore::write`] applies a batch atomically,
///   its ops in order (an append after a truncate in the same batch survives).
/// - **Visibility.** Once `write` returns, every reader on any thread sees the
///   batch, whatever `sync` was.
/// - **Durability.** `write(batch, sync = true)` returns only once the batch and
///   every batch that returned before it survive power loss. With
///   `sync = false` the batch survives a process crash in engines with a
///   write-ahead log, and power loss only after a later sync write or
///   [`LogStore::sync`]. Helpers that do not take `sync` document their own.
/// - **No holes.** The store does not check Raft's rules (contiguous indexes);
///   callers keep them. Reads return what is stored, in index order.
/// - **Integrity.** Nothing read back is trusted blindly by callers; engines
///   return [`StorageError::Engine`] for malformed keys rather than panic.
/// - **Who may call.** Any number of threads; calls block on I/O, so async
///   callers use a dedicated thread or `spawn_blocking` (a per-disk writer is
///   the intended sole caller of `write`).
pub trait LogStore: Send + Sync + 'static {
    /// Apply `batch` atomically; durable on return iff `sync`.
    fn write(&self, batch: LogBatch, sync: bool) -> Result<(), StorageError>;

    /// Entries of `group` with indexes in `range`, in order. Missing indexes
    /// (purged or never written) are simply absent.
    fn read(&self, group: GroupId, range: Range<u64>) -> Result<Vec<(u64, Bytes)>, StorageError>;

    /// The lowest stored index of `group`, if any.
    fn first(&self, group: GroupId) -> Result<Option<u64>, StorageError>;

    /// The highest stored index of `group` and its entry, if any.
    fn last(&self, group: GroupId) -> Result<Option<(u64, Bytes)>, StorageError>;

    /// A state value of `group`.
    fn get_state(&self, group: GroupId, key: &str) -> Result<Option<Bytes>, StorageError>;

    /// Make every write that has returned durable.
    fn sync(&self) -> Result<(), StorageError>;

    /// Remove every entry and state value of `group` (its replica left this
    /// disk) except the state values named in `keep`, in one atomic,
    /// durable step: a crash leaves either all of it or only what was kept.
    /// (A Raft replica keeps its vote: a node must never forget a vote it
    /// cast, even when its replica is deleted and later made again.)
    fn delete_group(&self, group: GroupId, keep: &[&str]) -> Result<(), StorageError>;

    /// Entries of one or more groups and state changes in one batch.
    fn append(&self, entries: Vec<(GroupId, u64, Bytes)>, sync: bool) -> Result<(), StorageError> {
        let mut b = LogBatch::new();
        for (group, index, data) in entries {
            b.append(group, index, data);
        }
        self.write(b, sync)
    }

    /// Remove entries `>= index`. Visible on return; durable with the next sync.
    fn truncate_from(&self, group: GroupId, index: u64) -> Result<(), StorageError> {
        let mut b = LogBatch::new();
        b.truncate_from(group, index);
        self.write(b, false)
    }

    /// Remove entries `<= index`. Visible on return; durable with the next sync.
    fn purge_upto(&self, group: GroupId, index: u64) -> Result<(), StorageError> {
        let mut b = LogBatch::new();
        b.purge_upto(group, index);
        self.write(b, false)
    }

    /// Set a state value. Durable on return (votes must be).
    fn put_state(&self, group: GroupId, key: &str, value: Bytes) -> Result<(), StorageError> {
        let mut b = LogBatch::new();
        b.put_state(group, key, value);
        self.write(b, true)
    }
}

#[derive(Default)]
struct MemInner {
    entries: BTreeMap<(GroupId, u64), Bytes>,
    state: BTreeMap<(GroupId, String), Bytes>,
}

/// In-memory [`LogStore`]: nothing survives the process. Counts syncing
/// writes, so tests can see group commit at work.
#[derive(Default)]
pub struct MemLogStore {
    inner: RwLock<MemInner>,
    syncs: AtomicU64,
}

impl MemLogStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many writes asked for a sync (plus explicit `sync` calls).
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn read_inner(&self) -> std::sync::RwLockReadGuard<'_, MemInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogStore for MemLogStore {
    fn write(&self, batch: LogBatch, sync: bool) -> Result<(), StorageError> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for op in batch.ops {
            match op {
                LogOp::Append { group, index, data } => {
                    inner.entries.insert((group, index), data);
                }
                LogOp::TruncateFrom { group, index } => {
                    let doomed: Vec<_> =
                        inner.entries.range((group, index)..=(group, u64::MAX)).map(|(k, _)| *k).collect();
                    doomed.iter().for_each(|k| {
                        inner.entries.remove(k);
                    });
                }
                LogOp::PurgeUpto { group, index } => {
                    let doomed: Vec<_> = inner.entries.range((group, 0)..=(group, index)).map(|(k, _)| *k).collect();
                    doomed.iter().for_each(|k| {
                        inner.entries.remove(k);
                    });
                }
                LogOp::PutState { group, key, value } => {
                    inner.state.insert((group, key), value);
                }
                LogOp::DeleteState { group, key } => {
                    inner.state.remove(&(group, key));
                }
            }
        }
        if sync {
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn read(&self, group: GroupId, range: Range<u64>) -> Result<Vec<(u64, Bytes)>, StorageError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let inner = self.read_inner();
        Ok(inner.entries.range((group, range.start)..(group, range.end)).map(|((_, i), v)| (*i, v.clone())).collect())
    }

    fn first(&self, group: GroupId) -> Result<Option<u64>, StorageError> {
        let inner = self.read_inner();
        Ok(inner.entries.range((group, 0)..=(group, u64::MAX)).next().map(|((_, i), _)| *i))
    }

    fn last(&self, group: GroupId) -> Result<Option<(u64, Bytes)>, StorageError> {
        let inner = self.read_inner();
        Ok(inner.entries.range((group, 0)..=(group, u64::MAX)).next_back().map(|((_, i), v)| (*i, v.clone())))
    }

    fn get_state(&self, group: GroupId, key: &str) -> Result<Option<Bytes>, StorageError> {
        Ok(self.read_inner().state.get(&(group, key.to_string())).cloned())
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn delete_group(&self, group: GroupId, keep: &[&str]) -> Result<(), StorageError> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.entries.retain(|(g, _), _| *g != group);
        inner.state.retain(|(g, k), _| *g != group || keep.contains(&k.as_str()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_conformance::{run_all, LogHarness};

    struct Mem;

    impl LogHarness for Mem {
        type Store = MemLogStore;
        fn open(&mut self) -> MemLogStore {
            MemLogStore::new()
        }
        fn reopen(&mut self, _store: MemLogStore) -> Option<MemLogStore> {
            None
        }
    }

    #[test]
    fn mem_log_store_passes_conformance() {
        run_all(&mut Mem);
    }
}

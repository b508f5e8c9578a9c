//! [`LogStore`] on the `raft_log` and `raft_state` column families of a
//! [`RocksStore`]: the Raft logs share the disk's one database (and its one
//! write-ahead log) with the block data, so one WAL sync makes both durable.
//!
//! Keys: `raft_log` = `[group u64 BE][index u64 BE]` (so a group is one
//! contiguous range and entries sort by index); `raft_state` =
//! `[group u64 BE][name UTF-8]`.

use std::ops::Range;

use bytes::Bytes;
use rocksdb::{ReadOptions, WriteOptions};

use crate::log::{GroupId, LogBatch, LogOp, LogStore};
use crate::rocks::{RocksStore, CF_RAFT_LOG, CF_RAFT_STATE};
use crate::StorageError;

fn engine(e: rocksdb::Error) -> StorageError {
    StorageError::Engine(e.into_string())
}

fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

fn state_key(group: GroupId, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

/// The first key past every key of `group`, in either column family. State
/// names are UTF-8, which never contains 0xff, so 9 bytes of 0xff are past
/// every key of the last group.
fn group_end(group: GroupId) -> Vec<u8> {
    match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 17],
    }
}

fn decode_index(group: GroupId, key: &[u8]) -> Result<u64, StorageError> {
    if key.len() != 16 || key[..8] != group.to_be_bytes() {
        return Err(StorageError::Engine(format!("malformed raft log key of {} bytes", key.len())));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[8..]);
    Ok(u64::from_be_bytes(b))
}

impl RocksStore {
    /// Whether any Raft group has a log entry or state in this database.
    pub fn holds_raft_logs(&self) -> Result<bool, StorageError> {
        for cf in [CF_RAFT_LOG, CF_RAFT_STATE] {
            let mut it = self.db.raw_iterator_cf(self.cf(cf)?);
            it.seek_to_first();
            let found = it.valid();
            it.status().map_err(engine)?;
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn log_range(&self, group: GroupId, range: Range<u64>) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(log_key(group, range.start).to_vec());
        ro.set_iterate_upper_bound(log_key(group, range.end).to_vec());
        ro
    }
}

impl LogStore for RocksStore {
    fn write(&self, batch: LogBatch, sync: bool) -> Result<(), StorageError> {
        let log = self.cf(CF_RAFT_LOG)?;
        let state = self.cf(CF_RAFT_STATE)?;
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                LogOp::Append { group, index, data } => wb.put_cf(log, log_key(*group, *index), data),
                LogOp::TruncateFrom { group, index } => {
                    wb.delete_range_cf(log, &log_key(*group, *index)[..], &group_end(*group))
                }
                LogOp::PurgeUpto { group, index } => match index.checked_add(1) {
                    Some(end) => wb.delete_range_cf(log, log_key(*group, 0), log_key(*group, end)),
                    None => wb.delete_range_cf(log, &log_key(*group, 0)[..], &group_end(*group)),
                },
                LogOp::PutState { group, key, value } => wb.put_cf(state, state_key(*group, key), value),
                LogOp::DeleteState { group, key } => wb.delete_cf(state, state_key(*group, key)),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(engine)
    }

    fn read(&self, group: GroupId, range: Range<u64>) -> Result<Vec<(u64, Bytes)>, StorageError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_RAFT_LOG)?, self.log_range(group, range.clone()));
        it.seek(log_key(group, range.start));
        let mut out = Vec::new();
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
            out.push((decode_index(group, k)?, Bytes::copy_from_slice(v)));
            it.next();
        }
        it.status().map_err(engine)?;
        Ok(out)
    }

    fn first(&self, group: GroupId) -> Result<Option<u64>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(group_end(group));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_RAFT_LOG)?, ro);
        it.seek(log_key(group, 0));
        let found = match it.key() {
            Some(k) if it.valid() => Some(decode_index(group, k)?),
            _ => None,
        };
        it.status().map_err(engine)?;
        Ok(found)
    }

    fn last(&self, group: GroupId) -> Result<Option<(u64, Bytes)>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(log_key(group, 0).to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_RAFT_LOG)?, ro);
        it.seek_for_prev(log_key(group, u64::MAX));
        let found = match (it.key(), it.value()) {
            (Some(k), Some(v)) if it.valid() => Some((decode_index(group, k)?, Bytes::copy_from_slice(v))),
            _ => None,
        };
        it.status().map_err(engine)?;
        Ok(found)
    }

    fn get_state(&self, group: GroupId, key: &str) -> Result<Option<Bytes>, StorageError> {
        let v = self.db.get_pinned_cf(self.cf(CF_RAFT_STATE)?, state_key(group, key)).map_err(engine)?;
        Ok(v.map(|v| Bytes::copy_from_slice(&v)))
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true).map_err(engine)
    }

    fn delete_group(&self, group: GroupId, keep: &[&str]) -> Result<(), StorageError> {
        let mut wb = rocksdb::WriteBatch::default();
        wb.delete_range_cf(self.cf(CF_RAFT_LOG)?, &group.to_be_bytes()[..], &group_end(group));
        wb.delete_range_cf(self.cf(CF_RAFT_STATE)?, &group.to_be_bytes()[..], &group_end(group));
        // Put back after the range delete, in the same batch: later
        // operations of a batch win, and the batch is applied atomically.
        for key in keep {
            if let Some(v) = self.get_state(group, key)? {
                wb.put_cf(self.cf(CF_RAFT_STATE)?, state_key(group, key), v);
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(wb, &wo).map_err(engine)
    }
}

#[cfg(test)]
mod tests {
    use crate::log_conformance::{run_all, LogHarness};
    use crate::{RocksConfig, RocksStore};

    struct Rocks {
        dirs: Vec<tempfile::TempDir>,
    }

    impl LogHarness for Rocks {
        type Store = RocksStore;
        fn open(&mut self) -> RocksStore {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = RocksStore::open(dir.path(), &RocksConfig::default()).expect("open");
            self.dirs.push(dir);
            s
        }
        fn reopen(&mut self, store: RocksStore) -> Option<RocksStore> {
            let path = store.path().to_path_buf();
            drop(store);
            Some(RocksStore::open(&path, &RocksConfig::default()).expect("reopen"))
        }
    }

    #[test]
    fn rocks_log_store_passes_conformance() {
        run_all(&mut Rocks { dirs: Vec::new() });
    }
}

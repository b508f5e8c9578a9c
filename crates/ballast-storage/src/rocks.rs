//! [`BlockStore`] on RocksDB: one database per disk, shared by every shard
//! on that disk. Column families: `data` (blocks, keyed by [`BlockKey`]) and
//! `meta` (the catalog, plus the store's format version), and `raft_log` /
//! `raft_state` for the Raft groups whose replicas live on this disk.

use std::path::{Path, PathBuf};

use ballast_types::BlockKey;
use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    Options, ReadOptions, WriteOptions, DB,
};

use crate::store::{BlockSnapshot, BlockStore, Durability, KeyRange, MetaEntry, WriteBatch, WriteOp};
use crate::value::{decode_block, encode_block};
use crate::StorageError;

pub(crate) const CF_DATA: &str = "data";
pub(crate) const CF_META: &str = "meta";
/// Raft log entries of every group on this disk, keyed `[group u64 BE][index u64 BE]`.
pub(crate) const CF_RAFT_LOG: &str = "raft_log";
/// Per-group Raft state (vote, committed, purged), keyed by group.
pub(crate) const CF_RAFT_STATE: &str = "raft_state";
/// Catalog key holding the on-disk format version of the whole store.
const FORMAT_KEY: &[u8] = b"\x00ballast/format";
const FORMAT_VERSION: u32 = 1;

/// Tuning for a [`RocksStore`].
#[derive(Debug, Clone)]
pub struct RocksConfig {
    /// Block cache shared by the column families.
    pub block_cache_bytes: usize,
    /// Memtable size of the data column family.
    pub write_buffer_bytes: usize,
}

impl Default for RocksConfig {
    fn default() -> Self {
        Self { block_cache_bytes: 256 << 20, write_buffer_bytes: 128 << 20 }
    }
}

impl RocksConfig {
    /// A database that holds only Raft logs: entries are read back while
    /// recent (from the memtable), so a small cache suffices.
    pub fn raft_log() -> Self {
        Self { block_cache_bytes: 16 << 20, write_buffer_bytes: 128 << 20 }
    }
}

/// A RocksDB-backed block store.
pub struct RocksStore {
    pub(crate) db: DB,
    path: PathBuf,
}

fn engine(e: rocksdb::Error) -> StorageError {
    StorageError::Engine(e.into_string())
}

impl RocksStore {
    /// Open (creating if missing) the store at `path`. Refuses a store written
    /// by a newer, unknown format version.
    pub fn open(path: &Path, config: &RocksConfig) -> Result<Self, StorageError> {
        let open_err = |reason: String| StorageError::Open { path: path.display().to_string(), reason };
        std::fs::create_dir_all(path).map_err(|e| open_err(e.to_string()))?;

        let cache = Cache::new_lru_cache(config.block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        table.set_block_size(16 << 10);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        // No WAL recycling (`recycle_log_file_num`): it made FLUSH cheaper, but a
        // replica restarted after a snapshot install diverged from its peers in
        // 5 of 10 runs of ballast-raft's cluster tests (0 of 10 without it).
        db_opts.set_enable_pipelined_write(true);
        // Writers waiting for a group's leader sleep instead of spinning:
        // syncs take hundreds of microseconds here, and the spinning showed
        // up as CPU taken from the other replicas on the same machine.
        db_opts.set_enable_write_thread_adaptive_yield(false);
        // Write back SST data in the background rather than in one burst at sync.
        db_opts.set_bytes_per_sync(1 << 20);
        // Memtable flushes and compactions write with O_DIRECT: block data is
        // written once more by the flush, and copying it through the page
        // cache was the largest CPU cost of sequential writes.
        db_opts.set_use_direct_io_for_flush_and_compaction(true);

        // Block payloads are mostly incompressible: don't spend CPU trying.
        let mut data_opts = Options::default();
        data_opts.set_block_based_table_factory(&table);
        data_opts.set_compression_type(DBCompressionType::None);
        data_opts.set_write_buffer_size(config.write_buffer_bytes);
        data_opts.set_max_write_buffer_number(4);
        // Fewer, larger L0 files before compaction: sequential volume writes
        // are key-ordered, so less rewriting pays off.
        data_opts.set_level_zero_slowdown_writes_trigger(30);
        data_opts.set_level_zero_stop_writes_trigger(48);
        data_opts.set_target_file_size_base(128 << 20);
        data_opts.set_max_bytes_for_level_base(1 << 30);
        // Key-value separation: 4 KiB block payloads go to blob files, so
        // compaction rewrites only keys and small pointers. Overwritten blocks
        // are reclaimed by blob garbage collection during compaction.
        data_opts.set_enable_blob_files(true);
        data_opts.set_min_blob_size(1024);
        data_opts.set_blob_file_size(256 << 20);
        data_opts.set_enable_blob_gc(true);
        data_opts.set_blob_gc_age_cutoff(0.25);

        let mut meta_opts = Options::default();
        meta_opts.set_block_based_table_factory(&table);
        meta_opts.set_compression_type(DBCompressionType::Lz4);

        let mut log_opts = Options::default();
        log_opts.set_compression_type(DBCompressionType::None);
        log_opts.set_write_buffer_size(config.write_buffer_bytes);
        // Entries that outlive a memtable (large writes fill one quickly) go
        // to blob files: compaction then moves keys, not payloads, and a
        // purged stretch of log frees whole blob files.
        log_opts.set_enable_blob_files(true);
        log_opts.set_min_blob_size(4096);
        log_opts.set_blob_file_size(256 << 20);
        log_opts.set_enable_blob_gc(true);
        let mut state_opts = Options::default();
        state_opts.set_compression_type(DBCompressionType::None);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_DATA, data_opts),
            ColumnFamilyDescriptor::new(CF_META, meta_opts),
            ColumnFamilyDescriptor::new(CF_RAFT_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_RAFT_STATE, state_opts),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| open_err(e.into_string()))?;
        let store = Self { db, path: path.to_path_buf() };
        store.check_format().map_err(|e| open_err(e.to_string()))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_format(&self) -> Result<(), StorageError> {
        match self.get_meta(FORMAT_KEY)? {
            None => {
                let mut b = WriteBatch::new();
                b.put_meta(FORMAT_KEY.to_vec(), FORMAT_VERSION.to_be_bytes().to_vec());
                self.write(b, Durability::Sync)
            }
            Some(v) => {
                let version = <[u8; 4]>::try_from(v.as_slice()).map(u32::from_be_bytes).unwrap_or(u32::MAX);
                if version > FORMAT_VERSION {
                    return Err(StorageError::Engine(format!(
                        "store format version {version} is newer than this binary understands ({FORMAT_VERSION})"
                    )));
                }
                Ok(())
            }
        }
    }

    pub(crate) fn cf(&self, name: &str) -> Result<&ColumnFamily, StorageError> {
        self.db.cf_handle(name).ok_or_else(|| StorageError::Engine(format!("missing column family {name}")))
    }

    /// Overwrite a block's stored bytes without fixing its checksum: simulates
    /// bit rot for tests and fault drills.
    pub fn corrupt(&self, key: &BlockKey) -> Result<bool, StorageError> {
        let cf = self.cf(CF_DATA)?;
        let Some(mut raw) = self.db.get_cf(cf, key.encode()).map_err(engine)? else { return Ok(false) };
        if let Some(last) = raw.last_mut() {
            *last ^= 0x5a;
        }
        self.db.put_cf(cf, key.encode(), raw).map_err(engine)?;
        Ok(true)
    }
}

fn read_opts(range: &KeyRange) -> ReadOptions {
    let mut ro = ReadOptions::default();
    if let Some(end) = range.end {
        ro.set_iterate_upper_bound(end.encode().to_vec());
    }
    ro
}

fn collect_blocks(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, DB>,
    range: &KeyRange,
    limit: usize,
    with_values: bool,
) -> Result<Vec<(BlockKey, Option<Bytes>)>, StorageError> {
    let mut out = Vec::new();
    it.seek(range.start.encode());
    while it.valid() && out.len() < limit {
        let (Some(k), Some(v)) = (it.key(), it.value()) else { break };
        let key = BlockKey::decode(k).ok_or(StorageError::Engine("malformed key in data column family".into()))?;
        let value = if with_values { Some(decode_block(&key, v)?) } else { None };
        out.push((key, value));
        it.next();
    }
    it.status().map_err(engine)?;
    Ok(out)
}

impl BlockStore for RocksStore {
    type Snapshot<'a> = RocksSnapshot<'a>;

    fn get(&self, key: &BlockKey) -> Result<Option<Bytes>, StorageError> {
        let raw = self.db.get_pinned_cf(self.cf(CF_DATA)?, key.encode()).map_err(engine)?;
        raw.map(|v| decode_block(key, &v)).transpose()
    }

    fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<(BlockKey, Bytes)>, StorageError> {
        let it = self.db.raw_iterator_cf_opt(self.cf(CF_DATA)?, read_opts(range));
        Ok(collect_blocks(it, range, limit, true)?.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect())
    }

    fn allocated(&self, range: &KeyRange, limit: usize) -> Result<Vec<BlockKey>, StorageError> {
        let it = self.db.raw_iterator_cf_opt(self.cf(CF_DATA)?, read_opts(range));
        Ok(collect_blocks(it, range, limit, false)?.into_iter().map(|(k, _)| k).collect())
    }

    fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), StorageError> {
        let data = self.cf(CF_DATA)?;
        let meta = self.cf(CF_META)?;
        let mut wb = rocksdb::WriteBatch::default();
        for op in &batch.ops {
            match op {
                WriteOp::Put(k, d) => wb.put_cf(data, k.encode(), encode_block(d)?),
                WriteOp::Delete(k) => wb.delete_cf(data, k.encode()),
                WriteOp::DeleteRange(r) => {
                    let end = match r.end {
                        Some(e) => e.encode().to_vec(),
                        // Past every 24-byte key.
                        None => vec![0xff; ballast_types::BLOCK_KEY_LEN + 1],
                    };
                    wb.delete_range_cf(data, &r.start.encode()[..], &end[..])
                }
                WriteOp::PutMeta(k, v) => wb.put_cf(meta, k, v),
                WriteOp::DeleteMeta(k) => wb.delete_cf(meta, k),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(durability == Durability::Sync);
        self.db.write_opt(wb, &wo).map_err(engine)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true).map_err(engine)
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db.get_cf(self.cf(CF_META)?, key).map_err(engine)
    }

    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, StorageError> {
        let it = self.db.iterator_cf(self.cf(CF_META)?, IteratorMode::From(prefix, Direction::Forward));
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item.map_err(engine)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn snapshot(&self) -> RocksSnapshot<'_> {
        RocksSnapshot { store: self, snap: self.db.snapshot() }
    }
}

/// A RocksDB snapshot of the data column family.
pub struct RocksSnapshot<'a> {
    store: &'a RocksStore,
    snap: rocksdb::SnapshotWithThreadMode<'a, DB>,
}

impl BlockSnapshot for RocksSnapshot<'_> {
    fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<(BlockKey, Bytes)>, StorageError> {
        let mut ro = read_opts(range);
        ro.set_snapshot(&self.snap);
        let it = self.store.db.raw_iterator_cf_opt(self.store.cf(CF_DATA)?, ro);
        Ok(collect_blocks(it, range, limit, true)?.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{run_all, Harness};

    struct Rocks {
        dirs: Vec<tempfile::TempDir>,
    }

    impl Harness for Rocks {
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
        fn corrupt(&mut self, store: &RocksStore, key: &BlockKey) {
            assert!(store.corrupt(key).expect("corrupt"));
        }
    }

    #[test]
    fn rocks_store_passes_conformance() {
        run_all(&mut Rocks { dirs: Vec::new() });
    }

    #[test]
    fn refuses_a_newer_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RocksStore::open(dir.path(), &RocksConfig::default()).expect("open");
        let mut b = WriteBatch::new();
        b.put_meta(FORMAT_KEY.to_vec(), 99u32.to_be_bytes().to_vec());
        s.write(b, Durability::Sync).expect("write");
        drop(s);
        let err = RocksStore::open(dir.path(), &RocksConfig::default()).err().expect("must refuse");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn a_second_opener_gets_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _s = RocksStore::open(dir.path(), &RocksConfig::default()).expect("open");
        let err = RocksStore::open(dir.path(), &RocksConfig::default()).err().expect("locked");
        assert!(matches!(err, StorageError::Open { .. }), "{err}");
    }
}

//! [`BlockStore`] on RocksDB: one database per disk, shared by every shard
//! on that disk. Column families: `data` (blocks, keyed by [`BlockKey`]) and
//! `meta` (the catalog, plus the store's format version), and `raft_log` /
//! `raft_state` for the Raft groups whose replicas live on this disk.

use std::path::{Path, PathBuf};

use ballast_types::BlockKey;
use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction, FlushOptions,
    IteratorMode, Options, ReadOptions, WriteOptions, DB,
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
const ALL_CFS: [&str; 4] = [CF_DATA, CF_META, CF_RAFT_LOG, CF_RAFT_STATE];
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
    /// Whether block writes go through RocksDB's write-ahead log.
    ///
    /// `true` (the default): a `Buffered` write survives a process crash,
    /// `Sync` writes and [`BlockStore::sync`] fsync the log.
    ///
    /// `false`, for the replicas of a Raft group, whose Raft log is the
    /// durable source and is replayed after a crash: blocks are written
    /// once less, and no block write ever waits behind a log fsync. A
    /// `Buffered` write is then lost on a process crash too, until the
    /// next `sync` or `Sync` write, which flush every memtable (atomically
    /// across column families, so what survives a crash is always a prefix
    /// of the writes: blocks never without the catalog entries written with
    /// them, nor the other way round).
    pub wal: bool,
}

impl Default for RocksConfig {
    fn default() -> Self {
        Self { block_cache_bytes: 256 << 20, write_buffer_bytes: 128 << 20, wal: true }
    }
}

impl RocksConfig {
    /// A database that holds only Raft logs: entries are read back while
    /// recent (from the memtable), so a small cache suffices.
    pub fn raft_log() -> Self {
        Self { block_cache_bytes: 16 << 20, write_buffer_bytes: 128 << 20, wal: true }
    }
}

/// A RocksDB-backed block store.
pub struct RocksStore {
    pub(crate) db: DB,
    path: PathBuf,
    /// [`RocksConfig::wal`].
    wal: bool,
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
        if config.wal {
            db_opts.set_enable_pipelined_write(true);
        } else {
            // Without a write-ahead log the column families are only
            // consistent with each other (blocks with the applied index beside
            // them) if every flush, automatic ones included, writes them all
            // at one point in time. (RocksDB refuses pipelined writes with it;
            // they only overlap a WAL write with the memtable insert.)
            db_opts.set_atomic_flush(true);
        }
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
        let store = Self { db, path: path.to_path_buf(), wal: config.wal };
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

    /// Write every column family's memtable to table files, atomically
    /// (`atomic_flush`), and wait until they and the manifest are synced.
    fn flush_all(&self) -> Result<(), StorageError> {
        let cfs = ALL_CFS.iter().map(|n| self.cf(n)).collect::<Result<Vec<_>, _>>()?;
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &fo).map_err(engine)
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
        if self.wal {
            wo.set_sync(durability == Durability::Sync);
            return self.db.write_opt(wb, &wo).map_err(engine);
        }
        if durability == Durability::Logged {
            // Into the log (not synced): replayed after a process crash on
            // top of the flushed state; only this batch's own keys change.
            return self.db.write_opt(wb, &wo).map_err(engine);
        }
        wo.disable_wal(true);
        self.db.write_opt(wb, &wo).map_err(engine)?;
        if durability == Durability::Sync {
            self.flush_all()?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        if self.wal {
            self.db.flush_wal(true).map_err(engine)
        } else {
            self.flush_all()
        }
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
        config: RocksConfig,
    }

    impl Harness for Rocks {
        type Store = RocksStore;
        fn open(&mut self) -> RocksStore {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = RocksStore::open(dir.path(), &self.config).expect("open");
            self.dirs.push(dir);
            s
        }
        fn reopen(&mut self, store: RocksStore) -> Option<RocksStore> {
            let path = store.path().to_path_buf();
            drop(store);
            Some(RocksStore::open(&path, &self.config).expect("reopen"))
        }
        fn corrupt(&mut self, store: &RocksStore, key: &BlockKey) {
            assert!(store.corrupt(key).expect("corrupt"));
        }
    }

    #[test]
    fn rocks_store_passes_conformance() {
        run_all(&mut Rocks { dirs: Vec::new(), config: RocksConfig::default() });
    }

    #[test]
    fn rocks_store_without_wal_passes_conformance() {
        run_all(&mut Rocks { dirs: Vec::new(), config: RocksConfig { wal: false, ..RocksConfig::default() } });
    }

    const CRASH_DIR: &str = "BALLAST_TEST_CRASH_DIR";
    const CRASH_WAL: &str = "BALLAST_TEST_CRASH_WAL";
    const CRASH_BATCHES: u64 = 300;

    fn applied(s: &RocksStore) -> u64 {
        let v = s.get_meta(b"applied").expect("meta").expect("applied is written first, synced");
        u64::from_be_bytes(v.try_into().expect("u64"))
    }

    /// Not a test of its own: the process [`a_crash_keeps_synced_writes_and_a_prefix_of_the_rest`]
    /// starts writes batches to the store its environment names, then aborts.
    #[test]
    fn crash_writer_process() {
        let Ok(dir) = std::env::var(CRASH_DIR) else { return };
        let wal = std::env::var(CRASH_WAL).as_deref() == Ok("1");
        let s = RocksStore::open(Path::new(&dir), &RocksConfig { wal, ..RocksConfig::default() }).expect("open");
        for i in 1..=CRASH_BATCHES {
            let mut b = WriteBatch::new();
            b.put(crate::conformance::key(1, 1, 0, i as u32), crate::conformance::block(i));
            b.put_meta(b"applied".to_vec(), i.to_be_bytes().to_vec());
            let durability = if i == 1 || i == 100 { Durability::Sync } else { Durability::Buffered };
            s.write(b, durability).expect("write");
        }
        let mut b = WriteBatch::new();
        b.put_meta(b"logged".to_vec(), b"yes".to_vec());
        s.write(b, Durability::Logged).expect("logged write");
        std::process::abort();
    }

    /// A process crash (abort, no close): with the write-ahead log every
    /// returned write survives; without it the synced and `Logged` ones do,
    /// and of the `Buffered` ones a prefix, each batch whole.
    #[test]
    fn a_crash_keeps_synced_writes_and_a_prefix_of_the_rest() {
        for wal in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args(["--exact", "rocks::tests::crash_writer_process", "--nocapture", "--test-threads", "1"])
                .env(CRASH_DIR, dir.path())
                .env(CRASH_WAL, if wal { "1" } else { "0" })
                .output()
                .expect("run the writer");
            assert!(!out.status.success(), "the writer must abort: {}", String::from_utf8_lossy(&out.stderr));
            let s = RocksStore::open(dir.path(), &RocksConfig { wal, ..RocksConfig::default() }).expect("reopen");
            let n = applied(&s);
            assert_eq!(
                s.get_meta(b"logged").expect("meta"),
                Some(b"yes".to_vec()),
                "wal {wal}: a Logged write was lost"
            );
            if wal {
                assert_eq!(n, CRASH_BATCHES, "with a WAL every returned write survives a process crash");
            } else {
                assert!(n >= 100, "synced batch 100 was lost: applied {n}");
                // Nothing flushed the last (buffered) batches: this run did
                // test a crash, not a clean close.
                assert!(n < CRASH_BATCHES, "applied {n}: the crash lost nothing");
            }
            for i in 1..=CRASH_BATCHES {
                let got = s.get(&crate::conformance::key(1, 1, 0, i as u32)).expect("get");
                let want = (i <= n).then(|| crate::conformance::block(i));
                assert_eq!(got, want, "wal {wal}: block {i} with applied {n}");
            }
        }
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

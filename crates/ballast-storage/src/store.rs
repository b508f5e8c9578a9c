//! The block-store contract.

use ballast_types::BlockKey;
use bytes::Bytes;

use crate::StorageError;

/// A half-open range of block keys: `start` inclusive, `end` exclusive
/// (`None`: to the end of the key space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRange {
    pub start: BlockKey,
    pub end: Option<BlockKey>,
}

impl KeyRange {
    pub fn new(start: BlockKey, end: BlockKey) -> Self {
        Self { start, end: Some(end) }
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        *key >= self.start && self.end.is_none_or(|e| *key < e)
    }
}

/// A catalog entry: key and value.
pub type MetaEntry = (Vec<u8>, Vec<u8>);

/// One change in a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Store one full block (exactly 4096 bytes).
    Put(BlockKey, Bytes),
    /// Deallocate one block: it reads as a hole afterwards.
    Delete(BlockKey),
    /// Deallocate every block in the range.
    DeleteRange(KeyRange),
    /// Set a catalog entry (small metadata next to the blocks).
    PutMeta(Vec<u8>, Vec<u8>),
    DeleteMeta(Vec<u8>),
}

/// Changes applied atomically, in order: after a crash either all of a
/// batch is visible or none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, key: BlockKey, data: Bytes) {
        self.ops.push(WriteOp::Put(key, data));
    }
    pub fn delete(&mut self, key: BlockKey) {
        self.ops.push(WriteOp::Delete(key));
    }
    pub fn delete_range(&mut self, range: KeyRange) {
        self.ops.push(WriteOp::DeleteRange(range));
    }
    pub fn put_meta(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::PutMeta(key.into(), value.into()));
    }
    pub fn delete_meta(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::DeleteMeta(key.into()));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// How durable a write must be when [`BlockStore::write`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Visible to readers at once; on stable storage after the next
    /// [`BlockStore::sync`] (or a later `Sync` write). Lost on power loss
    /// before that, and in an engine without a write-ahead log on a process
    /// crash too.
    Buffered,
    /// As `Buffered`, but always through a write-ahead log: survives a
    /// process crash even where `Buffered` writes skip the log (for small
    /// state a restart must find as it was, such as the meta group's map).
    /// Lost on power loss until the next `sync` or `Sync` write.
    Logged,
    /// On stable storage before `write` returns, with every write before it.
    Sync,
}

/// Storage for the blocks of shards on one disk.
///
/// Contract, tested by [`crate::conformance`]:
/// - **Integrity.** Every block is stored with its CRC32C; every read path
///   (`get`, `scan`, snapshot scans) verifies it and returns
///   [`StorageError::Corrupt`] on mismatch — never the bad bytes.
/// - **Atomicity and order.** A batch is applied atomically and its ops in
///   order; once `write` returns, every reader sees it (read-your-writes across
///   threads).
/// - **Durability.** `write(.., Durability::Sync)` returns only once the batch
///   and every write that returned before it survive power loss. `sync()`
///   returns only once every write that returned before `sync` was called
///   survives power loss. `Buffered` writes promise nothing about power loss
///   until then; they survive a process crash in engines with a write-ahead
///   log. Whatever a crash or power loss keeps is a prefix of the writes in
///   the order they returned: a later batch never survives without an
///   earlier one. (So a Raft state machine that stores its applied index in
///   each batch and replays its log from that index after a crash needs no
///   write-ahead log of its own.)
/// - **Snapshots.** A snapshot sees the store as of its creation, unaffected by
///   later writes, and is read in bounded pages so a whole shard never has to
///   sit in memory.
/// - **Who may call.** Any number of threads; calls block on I/O, so async
///   callers use `spawn_blocking`.
pub trait BlockStore: Send + Sync + 'static {
    type Snapshot<'a>: BlockSnapshot
    where
        Self: 'a;

    /// One block, verified; `None` for a hole.
    fn get(&self, key: &BlockKey) -> Result<Option<Bytes>, StorageError>;

    /// Allocated blocks in `range`, in key order, verified; at most `limit`.
    fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<(BlockKey, Bytes)>, StorageError>;

    /// Keys of allocated blocks in `range`, in order; at most `limit`. Reads no
    /// payload checksums (it answers "is it allocated", not "is it intact").
    fn allocated(&self, range: &KeyRange, limit: usize) -> Result<Vec<BlockKey>, StorageError>;

    /// Apply a batch atomically with the given durability.
    fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), StorageError>;

    /// Make every write that has returned durable.
    fn sync(&self) -> Result<(), StorageError>;

    /// A catalog entry.
    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Catalog entries whose key starts with `prefix`, in key order.
    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, StorageError>;

    /// A point-in-time view, e.g. to stream a shard to a new replica.
    fn snapshot(&self) -> Self::Snapshot<'_>;
}

/// A point-in-time view of a [`BlockStore`]'s blocks.
pub trait BlockSnapshot: Send {
    /// Same as [`BlockStore::scan`], as of the snapshot.
    fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<(BlockKey, Bytes)>, StorageError>;
}

//! An in-memory [`BlockStore`]: for tests and rebuildable caches. Values are
//! stored encoded (with their checksum) so it behaves like a disk engine,
//! corruption included.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use ballast_types::BlockKey;
use bytes::Bytes;

use crate::store::{BlockSnapshot, BlockStore, Durability, KeyRange, MetaEntry, WriteBatch, WriteOp};
use crate::value::{decode_block, encode_block};
use crate::StorageError;

type Blocks = BTreeMap<BlockKey, Arc<Vec<u8>>>;

#[derive(Default)]
struct Inner {
    // Copy-on-write: a snapshot holds the Arc; the next write clones the map.
    blocks: Arc<Blocks>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// In-memory block store. Nothing survives the process; `sync` is a no-op.
#[derive(Default)]
pub struct MemStore {
    inner: RwLock<Inner>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Overwrite a block's stored bytes without recomputing the checksum:
    /// simulates bit rot for tests.
    pub fn corrupt(&self, key: &BlockKey) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let blocks = Arc::make_mut(&mut inner.blocks);
        if let Some(v) = blocks.get_mut(key) {
            let v = Arc::make_mut(v);
            if let Some(last) = v.last_mut() {
                *last ^= 0x5a;
            }
        }
    }
}

fn scan_map(blocks: &Blocks, range: &KeyRange, limit: usize) -> Result<Vec<(BlockKey, Bytes)>, StorageError> {
    let upper = match range.end {
        Some(e) => std::ops::Bound::Excluded(e),
        None => std::ops::Bound::Unbounded,
    };
    blocks
        .range((std::ops::Bound::Included(range.start), upper))
        .take(limit)
        .map(|(k, v)| decode_block(k, v).map(|d| (*k, d)))
        .collect()
}

impl BlockStore for MemStore {
    type Snapshot<'a> = MemSnapshot;

    fn get(&self, key: &BlockKey) -> Result<Option<Bytes>, StorageError> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.blocks.get(key).map(|v| decode_block(key, v)).transpose()
    }

    fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<(BlockKey, Bytes)>, StorageError> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        scan_map(&inner.blocks, range, limit)
    }

    fn allocated(&self, range: &KeyRange, limit: usize) -> Result<Vec<BlockKey>, StorageError> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Ok(inner.blocks.keys().filter(|k| range.contains(k)).take(limit).copied().collect())
    }

    fn write(&self, batch: WriteBatch, _durability: Durability) -> Result<(), StorageError> {
        // Encode first so a bad op leaves the store untouched (atomicity).
        let mut encoded = Vec::with_capacity(batch.ops.len());
        for op in batch.ops {
            let raw = match &op {
                WriteOp::Put(_, data) => Some(Arc::new(encode_block(data)?)),
                _ => None,
            };
            encoded.push((op, raw));
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (op, raw) in encoded {
            match op {
                WriteOp::Put(k, _) => {
                    if let Some(raw) = raw {
                        Arc::make_mut(&mut inner.blocks).insert(k, raw);
                    }
                }
                WriteOp::Delete(k) => {
                    Arc::make_mut(&mut inner.blocks).remove(&k);
                }
                WriteOp::DeleteRange(r) => {
                    let blocks = Arc::make_mut(&mut inner.blocks);
                    let doomed: Vec<BlockKey> = blocks.keys().filter(|k| r.contains(k)).copied().collect();
                    for k in doomed {
                        blocks.remove(&k);
                    }
                }
                WriteOp::PutMeta(k, v) => {
                    inner.meta.insert(k, v);
                }
                WriteOp::DeleteMeta(k) => {
                    inner.meta.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Ok(inner.meta.get(key).cloned())
    }

    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, StorageError> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Ok(inner
            .meta
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn snapshot(&self) -> MemSnapshot {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        MemSnapshot { blocks: inner.blocks.clone() }
    }
}

/// A frozen copy of a [`MemStore`]'s blocks (shared until the next write).
pub struct MemSnapshot {
    blocks: Arc<Blocks>,
}

impl BlockSnapshot for MemSnapshot {
    fn scan(&self, range: &KeyRange, limit: usize) -> Result<Vec<(BlockKey, Bytes)>, StorageError> {
        scan_map(&self.blocks, range, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::conformance::{run_all, Harness};

    struct Mem;
    impl Harness for Mem {
        type Store = MemStore;
        fn open(&mut self) -> MemStore {
            MemStore::new()
        }
        fn reopen(&mut self, _: MemStore) -> Option<MemStore> {
            None
        }
        fn corrupt(&mut self, store: &MemStore, key: &BlockKey) {
            store.corrupt(key);
        }
    }

    #[test]
    fn mem_store_passes_conformance() {
        run_all(&mut Mem);
    }
}

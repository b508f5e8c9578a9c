//! Byte ranges of one volume in one shard, mapped onto 4 KiB blocks.
//!
//! Reads come back as data and holes; writes, zeroing and trims are turned
//! into a [`WriteBatch`] the caller applies with the durability it needs.
//! Pieces smaller than a block are read-modify-write: the caller must hold a
//! lock on the touched blocks from building the batch until it is written, or
//! two concurrent partial writes to one block could lose one of them.

use ballast_types::{BlockKey, Geometry, ShardId, VolumeId, BLOCK_SIZE};
use bytes::{Bytes, BytesMut};

use crate::store::{BlockStore, KeyRange, WriteBatch};
use crate::StorageError;

/// Runs of at least this many whole blocks are deallocated with one range
/// delete instead of one delete per block.
const RANGE_DELETE_MIN_BLOCKS: u64 = 16;

/// One piece of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Data(Bytes),
    /// Unallocated bytes: they read as zeros.
    Hole(u64),
}

/// A volume's blocks that live in one shard of a [`BlockStore`].
pub struct VolumeView<'a, S: BlockStore> {
    pub store: &'a S,
    pub shard: ShardId,
    pub volume: VolumeId,
    pub geometry: Geometry,
}

static ZERO_BLOCK: [u8; BLOCK_SIZE as usize] = [0u8; BLOCK_SIZE as usize];

impl<'a, S: BlockStore> VolumeView<'a, S> {
    pub fn new(store: &'a S, shard: ShardId, volume: VolumeId, geometry: Geometry) -> Self {
        Self { store, shard, volume, geometry }
    }

    fn key(&self, block_no: u64) -> BlockKey {
        self.geometry.key(self.shard, self.volume, block_no)
    }

    fn block_range(&self, first: u64, end: u64) -> KeyRange {
        KeyRange::new(self.key(first), self.key(end))
    }

    /// Blocks `[first, end)` that are allocated, verified, in order.
    fn load(&self, first: u64, end: u64) -> Result<Vec<(u64, Bytes)>, StorageError> {
        if end == first + 1 {
            return Ok(self.store.get(&self.key(first))?.map(|b| (first, b)).into_iter().collect());
        }
        let found = self.store.scan(&self.block_range(first, end), (end - first) as usize)?;
        Ok(found.into_iter().map(|(k, b)| (self.geometry.block_no(&k), b)).collect())
    }

    /// Read `[offset, offset+len)`: data runs and holes whose lengths add up to `len`.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<Segment>, StorageError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK_SIZE as u64;
        let end = (offset + len).div_ceil(BLOCK_SIZE as u64);
        let blocks = self.load(first, end)?;
        Ok(self.assemble(offset, len, blocks))
    }

    /// Keys of the allocated blocks of `[offset, offset+len)` whose stored
    /// value fails its checksum (or cannot be decoded). Reads every block.
    pub fn corrupt_blocks(&self, offset: u64, len: u64) -> Result<Vec<BlockKey>, StorageError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK_SIZE as u64;
        let end = (offset + len).div_ceil(BLOCK_SIZE as u64);
        let mut bad = Vec::new();
        for key in self.store.allocated(&self.block_range(first, end), (end - first) as usize)? {
            match self.store.get(&key) {
                Ok(_) => {}
                Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => bad.push(key),
                Err(e) => return Err(e),
            }
        }
        Ok(bad)
    }

    /// [`Self::read`], with the blocks in `patch` (by block number; `None`:
    /// a hole) standing in for stored blocks that fail their checksum. A
    /// patched block whose stored value is intact by now (rewritten since the
    /// patch was taken) is read from the store: the store is never older.
    /// A block that fails its checksum and has no patch fails the read.
    pub fn read_patched(
        &self,
        offset: u64,
        len: u64,
        patch: &std::collections::BTreeMap<u64, Option<Bytes>>,
    ) -> Result<Vec<Segment>, StorageError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK_SIZE as u64;
        let end = (offset + len).div_ceil(BLOCK_SIZE as u64);
        let mut blocks = Vec::new();
        for key in self.store.allocated(&self.block_range(first, end), (end - first) as usize)? {
            let n = self.geometry.block_no(&key);
            match self.store.get(&key) {
                Ok(Some(b)) => blocks.push((n, b)),
                Ok(None) => {}
                Err(e @ (StorageError::Corrupt { .. } | StorageError::Malformed { .. })) => match patch.get(&n) {
                    Some(Some(b)) => blocks.push((n, b.clone())),
                    Some(None) => {}
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
        Ok(self.assemble(offset, len, blocks))
    }

    /// Data runs and holes of `[offset, offset+len)` from the allocated
    /// `blocks` (by block number, in order).
    fn assemble(&self, offset: u64, len: u64, blocks: Vec<(u64, Bytes)>) -> Vec<Segment> {
        let mut blocks = blocks.into_iter().peekable();
        let mut out: Vec<Segment> = Vec::new();
        let mut run = BytesMut::new();
        for p in self.geometry.pieces(offset, len) {
            while blocks.peek().is_some_and(|(n, _)| *n < p.block_no) {
                blocks.next();
            }
            let range = p.in_block as usize..(p.in_block + p.len) as usize;
            match blocks.peek() {
                Some((n, data)) if *n == p.block_no => run.extend_from_slice(&data[range]),
                _ => {
                    if !run.is_empty() {
                        out.push(Segment::Data(run.split().freeze()));
                    }
                    match out.last_mut() {
                        Some(Segment::Hole(h)) => *h += p.len as u64,
                        _ => out.push(Segment::Hole(p.len as u64)),
                    }
                }
            }
        }
        if !run.is_empty() {
            out.push(Segment::Data(run.freeze()));
        }
        out
    }

    /// The batch that writes `data` at `offset` (read-modify-write at the edges).
    pub fn write(&self, offset: u64, data: &Bytes) -> Result<WriteBatch, StorageError> {
        let mut batch = WriteBatch::new();
        for p in self.geometry.pieces(offset, data.len() as u64) {
            let piece = data.slice(p.buf_offset..p.buf_offset + p.len as usize);
            if p.is_full() {
                batch.put(self.key(p.block_no), piece);
            } else {
                let mut block = self.current(p.block_no)?;
                block[p.in_block as usize..(p.in_block + p.len) as usize].copy_from_slice(&piece);
                batch.put(self.key(p.block_no), block.freeze());
            }
        }
        Ok(batch)
    }

    /// [`Self::write`] for a replica that must not stop on a damaged block: a
    /// piece smaller than a block whose stored block fails its checksum is
    /// left out (the block stays as it is, so it keeps failing its checksum
    /// and is never read as data) and its key returned. Whole blocks are
    /// written as usual, which replaces a damaged value.
    pub fn write_keeping_corrupt(
        &self,
        offset: u64,
        data: &Bytes,
    ) -> Result<(WriteBatch, Vec<BlockKey>), StorageError> {
        let mut batch = WriteBatch::new();
        let mut kept = Vec::new();
        for p in self.geometry.pieces(offset, data.len() as u64) {
            let piece = data.slice(p.buf_offset..p.buf_offset + p.len as usize);
            if p.is_full() {
                batch.put(self.key(p.block_no), piece);
            } else {
                let Some(mut block) = self.current_unless_corrupt(p.block_no)? else {
                    kept.push(self.key(p.block_no));
                    continue;
                };
                block[p.in_block as usize..(p.in_block + p.len) as usize].copy_from_slice(&piece);
                batch.put(self.key(p.block_no), block.freeze());
            }
        }
        Ok((batch, kept))
    }

    /// The batch that makes `[offset, offset+len)` read as zeros. With `punch`,
    /// whole blocks are deallocated; without it they are written as zeros and
    /// stay allocated (`NO_HOLE`).
    pub fn zero(&self, offset: u64, len: u64, punch: bool) -> Result<WriteBatch, StorageError> {
        let (batch, kept) = self.zero_inner(offset, len, punch, false)?;
        debug_assert!(kept.is_empty());
        Ok(batch)
    }

    /// [`Self::zero`] that leaves damaged blocks under partial pieces as they
    /// are and returns their keys (see [`Self::write_keeping_corrupt`]).
    pub fn zero_keeping_corrupt(
        &self,
        offset: u64,
        len: u64,
        punch: bool,
    ) -> Result<(WriteBatch, Vec<BlockKey>), StorageError> {
        self.zero_inner(offset, len, punch, true)
    }

    fn zero_inner(
        &self,
        offset: u64,
        len: u64,
        punch: bool,
        keep_corrupt: bool,
    ) -> Result<(WriteBatch, Vec<BlockKey>), StorageError> {
        let mut kept = Vec::new();
        let mut batch = WriteBatch::new();
        let mut full_run: Option<(u64, u64)> = None;
        let flush_run = |batch: &mut WriteBatch, run: Option<(u64, u64)>| {
            if let Some((a, b)) = run {
                if b - a >= RANGE_DELETE_MIN_BLOCKS {
                    batch.delete_range(self.block_range(a, b));
                } else {
                    (a..b).for_each(|n| batch.delete(self.key(n)));
                }
            }
        };
        for p in self.geometry.pieces(offset, len) {
            if p.is_full() {
                if punch {
                    full_run = match full_run {
                        Some((a, b)) if b == p.block_no => Some((a, b + 1)),
                        other => {
                            flush_run(&mut batch, other);
                            Some((p.block_no, p.block_no + 1))
                        }
                    };
                } else {
                    batch.put(self.key(p.block_no), Bytes::from_static(&ZERO_BLOCK));
                }
                continue;
            }
            let key = self.key(p.block_no);
            let existing = match self.store.get(&key) {
                Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) if keep_corrupt => {
                    kept.push(key);
                    continue;
                }
                other => other?,
            };
            match existing {
                // Zeroing part of a hole changes nothing unless it must be allocated.
                None if punch => {}
                existing => {
                    let mut block = match existing {
                        Some(b) => BytesMut::from(&b[..]),
                        None => BytesMut::zeroed(BLOCK_SIZE as usize),
                    };
                    block[p.in_block as usize..(p.in_block + p.len) as usize].fill(0);
                    batch.put(key, block.freeze());
                }
            }
        }
        flush_run(&mut batch, full_run);
        Ok((batch, kept))
    }

    /// Allocation of `[offset, offset+len)` as `(length, allocated)` runs.
    /// A block partly inside the range counts by its own state.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, StorageError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK_SIZE as u64;
        let end = (offset + len).div_ceil(BLOCK_SIZE as u64);
        let allocated = self.store.allocated(&self.block_range(first, end), (end - first) as usize)?;
        let mut allocated = allocated.into_iter().map(|k| self.geometry.block_no(&k)).peekable();
        let mut out: Vec<(u64, bool)> = Vec::new();
        for p in self.geometry.pieces(offset, len) {
            while allocated.peek().is_some_and(|n| *n < p.block_no) {
                allocated.next();
            }
            let is_alloc = allocated.peek() == Some(&p.block_no);
            match out.last_mut() {
                Some((l, a)) if *a == is_alloc => *l += p.len as u64,
                _ => out.push((p.len as u64, is_alloc)),
            }
        }
        Ok(out)
    }

    fn current(&self, block_no: u64) -> Result<BytesMut, StorageError> {
        Ok(match self.store.get(&self.key(block_no))? {
            Some(b) => BytesMut::from(&b[..]),
            None => BytesMut::zeroed(BLOCK_SIZE as usize),
        })
    }

    /// The block's current content; `None` when its stored value is damaged.
    fn current_unless_corrupt(&self, block_no: u64) -> Result<Option<BytesMut>, StorageError> {
        match self.current(block_no) {
            Ok(b) => Ok(Some(b)),
            Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Durability, MemStore};
    use rand::{Rng, SeedableRng};

    fn flatten(segs: &[Segment]) -> Vec<u8> {
        let mut v = Vec::new();
        for s in segs {
            match s {
                Segment::Data(d) => v.extend_from_slice(d),
                Segment::Hole(n) => v.extend(std::iter::repeat_n(0u8, *n as usize)),
            }
        }
        v
    }

    /// Random byte-granular writes, zeroes and trims against a flat model.
    #[test]
    fn byte_ranges_match_a_flat_model() {
        let seed = crate::conformance::seed_from_env();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let store = MemStore::new();
        let view = VolumeView::new(&store, ShardId(0), VolumeId(1), Geometry { chunk_size: 64 << 10 });
        const SIZE: u64 = 1 << 20;
        let mut model = vec![0u8; SIZE as usize];
        for step in 0..600 {
            let off = rng.gen_range(0..SIZE - 1);
            let len = rng.gen_range(1..=(SIZE - off).min(70_000));
            let batch = match rng.gen_range(0..4) {
                0 | 1 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    view.write(off, &Bytes::from(data)).expect("write")
                }
                k => {
                    model[off as usize..(off + len) as usize].fill(0);
                    view.zero(off, len, k == 2).expect("zero")
                }
            };
            store.write(batch, Durability::Buffered).expect("apply");
            let (ro, rl) = (rng.gen_range(0..SIZE - 1), rng.gen_range(1..100_000u64));
            let rl = rl.min(SIZE - ro);
            let segs = view.read(ro, rl).expect("read");
            assert_eq!(
                segs.iter()
                    .map(|s| match s {
                        Segment::Data(d) => d.len() as u64,
                        Segment::Hole(n) => *n,
                    })
                    .sum::<u64>(),
                rl
            );
            assert!(flatten(&segs) == model[ro as usize..(ro + rl) as usize], "step {step}: BALLAST_SEED={seed}");
            let ext = view.extents(ro, rl).expect("extents");
            assert_eq!(ext.iter().map(|e| e.0).sum::<u64>(), rl);
        }
    }

    #[test]
    fn punched_blocks_are_holes_and_no_hole_zeroes_stay_allocated() {
        let store = MemStore::new();
        let view = VolumeView::new(&store, ShardId(0), VolumeId(1), Geometry::default());
        store.write(view.write(0, &Bytes::from(vec![7u8; 40 * 4096])).expect("w"), Durability::Sync).expect("apply");
        store.write(view.zero(4096, 30 * 4096, true).expect("z"), Durability::Sync).expect("apply");
        assert_eq!(view.extents(0, 40 * 4096).expect("e"), vec![(4096, true), (30 * 4096, false), (9 * 4096, true)]);
        store.write(view.zero(4096, 2 * 4096, false).expect("z"), Durability::Sync).expect("apply");
        assert_eq!(view.extents(0, 4 * 4096).expect("e"), vec![(3 * 4096, true), (4096, false)]);
        assert_eq!(view.read(4096, 4096).expect("r"), vec![Segment::Data(Bytes::from(vec![0u8; 4096]))]);
        assert_eq!(view.read(5 * 4096, 100).expect("r"), vec![Segment::Hole(100)]);
    }
}

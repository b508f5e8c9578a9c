//! Byte ranges of a volume, cut into chunks and 4 KiB blocks.

use crate::ids::{BlockKey, ShardId, VolumeId};

/// The native block: the unit of storage, checksumming and read-modify-write.
pub const BLOCK_SIZE: u32 = 4096;

/// Default chunk: the unit of placement (a chunk lives in exactly one shard).
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// How a volume's bytes map to chunks and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub chunk_size: u64,
}

impl Default for Geometry {
    fn default() -> Self {
        Self { chunk_size: DEFAULT_CHUNK_SIZE }
    }
}

/// The part of a byte range that falls in one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPiece {
    /// Volume-wide block number (`offset / BLOCK_SIZE`).
    pub block_no: u64,
    /// Offset of the piece inside the block.
    pub in_block: u32,
    /// Length of the piece (1..=BLOCK_SIZE).
    pub len: u32,
    /// Offset of the piece inside the caller's buffer.
    pub buf_offset: usize,
}

impl BlockPiece {
    /// Whether the piece covers the whole block (no read-modify-write needed).
    pub fn is_full(&self) -> bool {
        self.in_block == 0 && self.len == BLOCK_SIZE
    }
}

impl Geometry {
    pub fn blocks_per_chunk(&self) -> u64 {
        self.chunk_size / BLOCK_SIZE as u64
    }

    /// Chunk index of a volume-wide block number.
    pub fn chunk_of_block(&self, block_no: u64) -> u64 {
        block_no / self.blocks_per_chunk()
    }

    /// The storage key of a volume-wide block number in `shard`.
    pub fn key(&self, shard: ShardId, volume: VolumeId, block_no: u64) -> BlockKey {
        let bpc = self.blocks_per_chunk();
        BlockKey { shard, volume, chunk: block_no / bpc, block: (block_no % bpc) as u32 }
    }

    /// Inverse of [`Geometry::key`]: the volume-wide block number of a key.
    pub fn block_no(&self, key: &BlockKey) -> u64 {
        key.chunk * self.blocks_per_chunk() + key.block as u64
    }

    /// Cut `[offset, offset+len)` into per-block pieces, in order.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = BlockPiece> {
        let end = offset.saturating_add(len);
        let bs = BLOCK_SIZE as u64;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let block_no = pos / bs;
            let in_block = pos % bs;
            let take = (bs - in_block).min(end - pos);
            let piece = BlockPiece {
                block_no,
                in_block: in_block as u32,
                len: take as u32,
                buf_offset: (pos - offset) as usize,
            };
            pos += take;
            Some(piece)
        })
    }

    /// Cut `[offset, offset+len)` at chunk boundaries: `(chunk, offset, len)`.
    pub fn chunk_spans(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let end = offset.saturating_add(len);
        let cs = self.chunk_size;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let chunk = pos / cs;
            let take = (cs - pos % cs).min(end - pos);
            let span = (chunk, pos, take);
            pos += take;
            Some(span)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_exactly() {
        let g = Geometry::default();
        for (off, len) in [(0u64, 4096u64), (512, 512), (4000, 200), (1, 3 * 4096), (8191, 2)] {
            let pieces: Vec<_> = g.pieces(off, len).collect();
            assert_eq!(pieces.iter().map(|p| p.len as u64).sum::<u64>(), len);
            let mut expect = off;
            for p in &pieces {
                assert_eq!(p.block_no * 4096 + p.in_block as u64, expect);
                assert_eq!(p.buf_offset as u64, expect - off);
                assert!(p.in_block + p.len <= BLOCK_SIZE);
                expect += p.len as u64;
            }
        }
        assert!(g.pieces(0, 4096).all(|p| p.is_full()));
    }

    #[test]
    fn chunk_spans_split_at_boundaries() {
        let g = Geometry { chunk_size: 8192 };
        let spans: Vec<_> = g.chunk_spans(4096, 16384).collect();
        assert_eq!(spans, vec![(0, 4096, 4096), (1, 8192, 8192), (2, 16384, 4096)]);
        let k = g.key(ShardId(3), VolumeId(7), 5);
        assert_eq!((k.chunk, k.block), (2, 1));
        assert_eq!(g.block_no(&k), 5);
    }
}

use std::fmt;

/// A shard: one Raft group holding chunks of many volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ShardId(pub u32);

/// A volume, by its numeric id (names live in the catalog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VolumeId(pub u64);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vol-{}", self.0)
    }
}

/// Length of an encoded [`BlockKey`].
pub const BLOCK_KEY_LEN: usize = 4 + 8 + 8 + 4;

/// The address of one 4 KiB block: `[shard][volume][chunk][block-in-chunk]`.
///
/// Encoded big-endian, so byte order equals numeric order: every block of a
/// shard is one contiguous key range (a snapshot is a range scan, removing a
/// volume from a shard is a range delete), and blocks of a chunk sort by offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockKey {
    pub shard: ShardId,
    pub volume: VolumeId,
    pub chunk: u64,
    pub block: u32,
}

impl BlockKey {
    pub fn encode(&self) -> [u8; BLOCK_KEY_LEN] {
        let mut k = [0u8; BLOCK_KEY_LEN];
        k[0..4].copy_from_slice(&self.shard.0.to_be_bytes());
        k[4..12].copy_from_slice(&self.volume.0.to_be_bytes());
        k[12..20].copy_from_slice(&self.chunk.to_be_bytes());
        k[20..24].copy_from_slice(&self.block.to_be_bytes());
        k
    }

    /// Decode a key; `None` when the length is wrong (never trust stored bytes).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != BLOCK_KEY_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Some(Self { shard: ShardId(u32_at(0)), volume: VolumeId(u64_at(4)), chunk: u64_at(12), block: u32_at(20) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_sorts_like_the_key() {
        let keys = [
            BlockKey { shard: ShardId(0), volume: VolumeId(5), chunk: 9, block: 1023 },
            BlockKey { shard: ShardId(1), volume: VolumeId(0), chunk: 0, block: 0 },
            BlockKey { shard: ShardId(1), volume: VolumeId(0), chunk: 0, block: 1 },
            BlockKey { shard: ShardId(1), volume: VolumeId(0), chunk: 1, block: 0 },
            BlockKey { shard: ShardId(1), volume: VolumeId(1 << 40), chunk: 0, block: 0 },
        ];
        for w in keys.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].encode() < w[1].encode());
        }
        for k in keys {
            assert_eq!(BlockKey::decode(&k.encode()), Some(k));
        }
        assert_eq!(BlockKey::decode(&[0u8; 3]), None);
    }
}

//! The self-describing block values the workload writes: each 4 KiB block
//! names the write that made it and the block it belongs in, so a read says
//! exactly which write it returned, and a torn, misplaced or rotten block is
//! told apart from any real write.
//!
//! Layout (little-endian): magic `BLSTVRFY` (8 bytes), write id (8), block
//! number (8), filler derived from both (4068), CRC32C of everything before
//! it (4).

use ballast_types::crc32c;

/// Size of one workload block.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"BLSTVRFY";

/// What a read of one block found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Zeros: no write ever reached the block.
    Initial,
    /// The value written by this write id.
    Write(u64),
    /// Something no write of this workload produced.
    Garbage(String),
}

/// The bytes write `id` puts in block `block`.
pub fn encode(id: u64, block: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    v[..8].copy_from_slice(MAGIC);
    v[8..16].copy_from_slice(&id.to_le_bytes());
    v[16..24].copy_from_slice(&block.to_le_bytes());
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block ^ 0x2545_f491_4f6c_dd1d;
    for word in v[24..BLOCK - 4].chunks_mut(8) {
        // xorshift64: cheap filler that differs for every (id, block).
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = word.len();
        word.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    let crc = crc32c(&v[..BLOCK - 4]);
    v[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    v
}

/// Which write `data` (read from block `block`) is.
pub fn decode(data: &[u8], block: u64) -> Observed {
    if data.len() != BLOCK {
        return Observed::Garbage(format!("{} bytes, not {BLOCK}", data.len()));
    }
    if data.iter().all(|b| *b == 0) {
        return Observed::Initial;
    }
    if &data[..8] != MAGIC {
        return Observed::Garbage("no workload header (torn or foreign data)".into());
    }
    let id = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    let home = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
    if home != block {
        return Observed::Garbage(format!("write {id} of block {home} found in block {block}"));
    }
    if data != encode(id, block).as_slice() {
        return Observed::Garbage(format!("write {id}: contents damaged"));
    }
    Observed::Write(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_decode_to_their_write_and_damage_is_caught() {
        let v = encode(77, 5);
        assert_eq!(decode(&v, 5), Observed::Write(77));
        assert_eq!(decode(&vec![0; BLOCK], 5), Observed::Initial);
        assert!(matches!(decode(&v, 6), Observed::Garbage(_)), "misplaced");
        let mut torn = v.clone();
        torn[2048..].copy_from_slice(&encode(78, 5)[2048..]);
        assert!(matches!(decode(&torn, 5), Observed::Garbage(_)), "torn");
        let mut rot = v;
        rot[100] ^= 1;
        assert!(matches!(decode(&rot, 5), Observed::Garbage(_)), "bit flip");
        assert_ne!(encode(1, 1), encode(1, 2));
        assert_ne!(encode(1, 1), encode(2, 1));
    }
}

//! On-disk value of one block: `[format u8][crc32c u32 BE][4096 bytes]`.
//!
//! The format byte lets a later version change the layout and keep reading old
//! values; the checksum covers the payload and is checked on every read.

use ballast_types::{crc32c, BlockKey, BLOCK_SIZE};
use bytes::Bytes;

use crate::StorageError;

pub const VALUE_FORMAT_V1: u8 = 1;
const HEADER: usize = 5;

/// Encode a block for storage; `data` must be exactly one block.
pub fn encode_block(data: &[u8]) -> Result<Vec<u8>, StorageError> {
    if data.len() != BLOCK_SIZE as usize {
        return Err(StorageError::BadBlockLength { expected: BLOCK_SIZE as usize, got: data.len() });
    }
    let mut v = Vec::with_capacity(HEADER + data.len());
    v.push(VALUE_FORMAT_V1);
    v.extend_from_slice(&crc32c(data).to_be_bytes());
    v.extend_from_slice(data);
    Ok(v)
}

/// Decode and verify a stored block.
pub fn decode_block(key: &BlockKey, raw: &[u8]) -> Result<Bytes, StorageError> {
    if raw.len() != HEADER + BLOCK_SIZE as usize {
        return Err(StorageError::Malformed { key: *key, reason: "wrong value length" });
    }
    if raw[0] != VALUE_FORMAT_V1 {
        return Err(StorageError::Malformed { key: *key, reason: "unknown value format" });
    }
    let stored = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]);
    let data = &raw[HEADER..];
    let computed = crc32c(data);
    if stored != computed {
        return Err(StorageError::Corrupt { key: *key, stored, computed });
    }
    Ok(Bytes::copy_from_slice(data))
}

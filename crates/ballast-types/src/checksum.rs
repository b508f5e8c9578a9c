//! Per-block checksums: CRC32C (Castagnoli), computed with the SSE4.2
//! instruction where available. Not CRC-32/IEEE: `crc32fast` is the wrong tool.

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    ::crc32c::crc32c(data)
}

/// Something that carries its own checksum and can verify it.
pub trait Checksummed {
    /// The stored checksum.
    fn stored_crc(&self) -> u32;
    /// The checksum recomputed over the payload.
    fn computed_crc(&self) -> u32;
    /// `true` when the two agree.
    fn verify(&self) -> bool {
        self.stored_crc() == self.computed_crc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C (Castagnoli).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}

//! NBD wire constants and the small encoders/decoders both protocol phases use.
//!
//! Everything here is pure (no I/O) so the byte layouts can be unit-tested on
//! their own and so the handshake and transmission code read as protocol logic
//! rather than as byte shuffling. All values are big-endian, as the NBD spec
//! (fixed newstyle) requires.

use bytes::{BufMut, Bytes, BytesMut};

use crate::device::DeviceErrorKind;

// ---- handshake ------------------------------------------------------------

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client handshake flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;
/// Every client flag we understand; any other bit closes the connection.
pub const CLIENT_KNOWN_FLAGS: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

/// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;

const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// `NBD_INFO_*` types inside `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Option payloads above this are discarded and answered `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Option payloads above this are not even drained: the connection is closed.
pub const MAX_OPTION_DRAIN: u32 = 16 * 1024 * 1024;
/// Longest string (export name, description, error message) we put in a reply;
/// the spec caps names and messages at 4096 bytes.
pub const MAX_STRING: usize = 4096;

/// The only metadata context we serve, and the id we give it.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const META_BASE_ALLOCATION_ID: u32 = 1;

// ---- transmission ---------------------------------------------------------

/// Transmission flags sent with the export.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of a (compact) request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_KNOWN_FLAGS: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 32769;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 32770;

/// Block status flags for `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Errors on the wire (Linux errno values, as the spec fixes them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The errno a device failure is reported as.
pub fn errno_for(kind: &DeviceErrorKind) -> u32 {
    match kind {
        DeviceErrorKind::Io => EIO,
        DeviceErrorKind::Invalid => EINVAL,
        DeviceErrorKind::NoSpace => ENOSPC,
        DeviceErrorKind::NotPermitted => EPERM,
        DeviceErrorKind::NotSupported => ENOTSUP,
        DeviceErrorKind::Shutdown => ESHUTDOWN,
    }
}

/// Human name of an option code, for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

/// Cut `s` to at most `max` bytes without splitting a UTF-8 character, so
/// every string we send fits its length field and the spec's 4096-byte cap.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- option replies -------------------------------------------------------

/// One option reply: header plus payload, ready to write.
pub fn option_reply(opt: u32, reply_type: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPT_REPLY_MAGIC);
    b.put_u32(opt);
    b.put_u32(reply_type);
    // Every payload we build is far below 4 GiB (strings are capped at 4096).
    b.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    b.put_slice(data);
    b.freeze()
}

// ---- requests -------------------------------------------------------------

/// A decoded request header (the payload, for writes, follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Decode a 28-byte request header. `Err(magic)` when the magic is wrong: the
/// stream cannot be resynchronised after that, so the caller closes.
pub fn decode_request(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, u32> {
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[i..i + 8]);
        u64::from_be_bytes(a)
    };
    Ok(RequestHeader {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        typ: u16::from_be_bytes([buf[6], buf[7]]),
        cookie: u64_at(8),
        offset: u64_at(16),
        len: u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]),
    })
}

// ---- transmission replies -------------------------------------------------

/// A simple reply header (`data` for a successful read follows separately).
pub fn simple_reply(cookie: u64, error: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(SIMPLE_REPLY_LEN);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    b.freeze()
}

/// A structured reply chunk header announcing `len` payload bytes.
pub fn chunk_header(cookie: u64, flags: u16, typ: u16, len: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(CHUNK_HEADER_LEN + 12);
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(typ);
    b.put_u64(cookie);
    b.put_u32(len);
    b
}

/// Header (plus the 8-byte offset) of an `OFFSET_DATA` chunk; `data_len`
/// bytes of data follow it. `None` if the chunk length would not fit in u32.
pub fn offset_data_header(cookie: u64, done: bool, offset: u64, data_len: u32) -> Option<Bytes> {
    let len = data_len.checked_add(8)?;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = chunk_header(cookie, flags, REPLY_TYPE_OFFSET_DATA, len);
    b.put_u64(offset);
    Some(b.freeze())
}

/// A complete `OFFSET_HOLE` chunk.
pub fn offset_hole_chunk(cookie: u64, done: bool, offset: u64, hole_len: u32) -> Bytes {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = chunk_header(cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    b.put_u64(offset);
    b.put_u32(hole_len);
    b.freeze()
}

/// A complete final `NONE` chunk.
pub fn none_chunk(cookie: u64) -> Bytes {
    chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).freeze()
}

/// A complete final `ERROR` chunk carrying `errno` and a (truncated) message.
pub fn error_chunk(cookie: u64, errno: u32, message: &str) -> Bytes {
    let msg = truncate_str(message, MAX_STRING);
    // msg.len() <= 4096, so both conversions are lossless.
    let len = 6 + msg.len() as u32;
    let mut b = chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, len);
    b.put_u32(errno);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg.as_bytes());
    b.freeze()
}

/// A complete `BLOCK_STATUS` chunk for one context. `extents` are
/// `(length, flags)` pairs; the caller keeps their count small enough to fit.
pub fn block_status_chunk(cookie: u64, done: bool, context: u32, extents: &[(u32, u32)]) -> Bytes {
    let len = 4 + 8 * extents.len();
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = chunk_header(cookie, flags, REPLY_TYPE_BLOCK_STATUS, u32::try_from(len).unwrap_or(u32::MAX));
    b.reserve(len);
    b.put_u32(context);
    for &(l, f) in extents {
        b.put_u32(l);
        b.put_u32(f);
    }
    b.freeze()
}

/// 64 KiB of zeros, sliced (never copied) to fill holes in simple and `DF` reads.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Push `len` zero bytes onto `parts` as static slices, without allocating
/// `len` bytes.
pub fn push_zeros(parts: &mut Vec<Bytes>, mut len: u32) {
    while len > 0 {
        let n = (len as usize).min(ZEROS.len());
        parts.push(Bytes::from_static(&ZEROS[..n]));
        // n <= len, so this cannot underflow.
        len -= n as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(CMD_FLAG_FUA);
        b.put_u16(CMD_WRITE);
        b.put_u64(0xdead_beef);
        b.put_u64(4096);
        b.put_u32(512);
        let arr: [u8; REQUEST_HEADER_LEN] = b[..].try_into().unwrap();
        let h = decode_request(&arr).unwrap();
        assert_eq!(
            h,
            RequestHeader { flags: CMD_FLAG_FUA, typ: CMD_WRITE, cookie: 0xdead_beef, offset: 4096, len: 512 }
        );
        let mut bad = arr;
        bad[0] = 0;
        assert_eq!(decode_request(&bad), Err(0x0060_9513));
    }

    #[test]
    fn reply_layouts() {
        let s = simple_reply(7, EINVAL);
        assert_eq!(&s[..], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]);
        let h = offset_hole_chunk(9, true, 512, 1024);
        assert_eq!(h.len(), CHUNK_HEADER_LEN + 12);
        assert_eq!(&h[4..6], &[0, 1]);
        assert_eq!(&h[6..8], &[0, 2]);
        assert_eq!(&h[16..20], &[0, 0, 0, 12]);
        let e = error_chunk(1, EIO, "boom");
        assert_eq!(e.len(), CHUNK_HEADER_LEN + 6 + 4);
        let bs = block_status_chunk(1, true, 1, &[(4096, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(bs.len(), CHUNK_HEADER_LEN + 12);
        let r = option_reply(OPT_LIST, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(offset_data_header(1, false, 0, u32::MAX), None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(3000); // 6000 bytes
        let t = truncate_str(&s, MAX_STRING);
        assert!(t.len() <= MAX_STRING);
        assert_eq!(t.len() % 2, 0);
        assert_eq!(truncate_str("abc", 10), "abc");
    }

    #[test]
    fn zeros_cover_exact_length() {
        let mut parts = Vec::new();
        push_zeros(&mut parts, 200_000);
        assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), 200_000);
        assert!(parts.iter().all(|p| p.iter().all(|&b| b == 0)));
        let mut none = Vec::new();
        push_zeros(&mut none, 0);
        assert!(none.is_empty());
    }
}

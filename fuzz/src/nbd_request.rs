//! The server's transmission phase, fed arbitrary request bytes.
//!
//! Input: one byte of connection setup (structured replies, the
//! `base:allocation` context, a read-only export, the export size, the
//! in-flight window), then raw transmission-phase bytes. The target performs
//! a correct handshake, sends the raw bytes (with each header's cookie set to
//! its index so replies can be matched), closes its side and reads everything
//! the server sends back. It asserts that:
//! - nothing panics and the connection never hangs;
//! - the device only ever sees in-range, non-empty calls, and no writes on a
//!   read-only export (the server validates before the device);
//! - the server's output is well-formed: greeting and option replies, then
//!   replies that each answer a request sent, with valid framing (simple
//!   replies, or structured chunks where the spec requires them, data chunks
//!   inside the read range and covering it exactly);
//! - requests the spec says must fail (out of range, zero length, writes to
//!   a read-only export, unknown commands or flags) get an error;
//! - when the input ends cleanly (at a message boundary or with
//!   `NBD_CMD_DISC`) every request is answered exactly once and the server
//!   returns `Ok`; after a broken message (bad magic, truncation) it returns
//!   an error and no request is answered twice.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ballast_nbd::proto::*;
use ballast_nbd::{NbdServer, ServerConfig};

use crate::harness::{block_on, MemDevice, MemExports, Reader};

/// Largest read or write payload the server accepts here (small, so one
/// input cannot make the target allocate much).
pub const MAX_BLOCK: u32 = 64 * 1024;

/// Export sizes the setup byte chooses from: aligned, unaligned, empty, and
/// one whose end is near `u64::MAX` (offset overflow).
pub const SIZES: [u64; 4] = [1 << 20, 3 * 4096 + 100, 0, !0xfffu64];

/// Connection setup decoded from the first input byte.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub structured: bool,
    pub base_allocation: bool,
    pub read_only: bool,
    pub size: u64,
    pub max_in_flight: usize,
}

impl Setup {
    pub fn from_byte(b: u8) -> Self {
        let structured = b & 1 != 0;
        Setup {
            structured,
            base_allocation: structured && b & 2 != 0,
            read_only: b & 4 != 0,
            size: SIZES[usize::from((b >> 3) & 3)],
            max_in_flight: usize::from(b >> 5) + 1,
        }
    }
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The client's handshake bytes for `setup`, and the options it sent.
fn handshake(setup: &Setup) -> (Vec<u8>, Vec<u32>) {
    let mut out = Vec::new();
    out.extend_from_slice(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    let mut opts = Vec::new();
    if setup.structured {
        option(&mut out, OPT_STRUCTURED_REPLY, &[]);
        opts.push(OPT_STRUCTURED_REPLY);
    }
    if setup.base_allocation {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        option(&mut out, OPT_SET_META_CONTEXT, &d);
        opts.push(OPT_SET_META_CONTEXT);
    }
    let mut go = Vec::new();
    go.extend_from_slice(&0u32.to_be_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut out, OPT_GO, &go);
    opts.push(OPT_GO);
    (out, opts)
}

/// A request as the server will see it.
#[derive(Debug, Clone, Copy)]
struct Sent {
    header: RequestHeader,
}

/// Walk the raw transmission bytes as the server frames them, giving each
/// header its index as cookie. Returns the bytes to send, the complete
/// requests (DISC excluded) and whether the stream ends cleanly.
fn frame(raw: &[u8]) -> (Vec<u8>, Vec<Sent>, bool) {
    let mut bytes = raw.to_vec();
    let mut sent = Vec::new();
    let mut pos = 0usize;
    let clean = loop {
        if pos == bytes.len() {
            break true;
        }
        let Some(hdr) = bytes.get(pos..pos + REQUEST_HEADER_LEN) else {
            break false;
        };
        let mut arr = [0u8; REQUEST_HEADER_LEN];
        arr.copy_from_slice(hdr);
        let Ok(mut header) = decode_request(&arr) else {
            break false;
        };
        header.cookie = sent.len() as u64;
        bytes[pos + 8..pos + 16].copy_from_slice(&header.cookie.to_be_bytes());
        if header.typ == CMD_DISC {
            // The server stops reading here.
            bytes.truncate(pos + REQUEST_HEADER_LEN);
            break true;
        }
        let mut next = pos + REQUEST_HEADER_LEN;
        if header.typ == CMD_WRITE {
            // The payload is on the wire whether or not the write is valid.
            match next.checked_add(header.len as usize) {
                Some(end) if end <= bytes.len() => next = end,
                _ => break false,
            }
        }
        sent.push(Sent { header });
        pos = next;
    };
    (bytes, sent, clean)
}

pub fn run(data: &[u8]) {
    let Some((&first, raw)) = data.split_first() else {
        return;
    };
    let setup = Setup::from_byte(first);
    let (mut input, options) = handshake(&setup);
    let (body, sent, clean) = frame(raw);
    input.extend_from_slice(&body);

    let device = Arc::new(MemDevice::new(setup.size, setup.read_only));
    let violated = device.violated.clone();
    let config = ServerConfig {
        max_in_flight: setup.max_in_flight,
        min_block: 512,
        preferred_block: 4096,
        max_block: MAX_BLOCK,
        max_in_flight_bytes: 2 * MAX_BLOCK as usize,
    };
    let server = NbdServer::new(Arc::new(MemExports { device }), config);

    let mut output = Vec::new();
    let mut result = None;
    block_on(async {
        let (ours, theirs) = tokio::io::duplex(16 * 1024);
        let (mut rd, mut wr) = tokio::io::split(ours);
        let send = async {
            // The server may close first (after a bad message): ignore that.
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let receive = async {
            let _ = rd.read_to_end(&mut output).await;
        };
        let (res, (), ()) = tokio::join!(server.serve_connection(theirs), send, receive);
        result = Some(res);
    });

    assert!(!violated.load(Ordering::SeqCst), "the device was called outside its contract");
    let result = result.expect("the connection ran");
    if clean {
        assert!(result.is_ok(), "a clean stream ended with {result:?}");
    } else {
        assert!(result.is_err(), "a broken stream ended without an error");
    }
    check_output(&setup, &options, &sent, clean, &output);
}

/// Whether the spec makes this request fail whatever the device says.
fn must_fail(setup: &Setup, h: &RequestHeader) -> bool {
    let ranged = matches!(h.typ, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS);
    let out_of_range = h.len == 0 || h.offset.checked_add(u64::from(h.len)).is_none_or(|end| end > setup.size);
    let writes = matches!(h.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    (ranged && out_of_range)
        || (writes && setup.read_only)
        || h.typ > CMD_BLOCK_STATUS
        || h.flags & !CMD_KNOWN_FLAGS != 0
        || (h.typ == CMD_BLOCK_STATUS && !setup.base_allocation)
        || (matches!(h.typ, CMD_READ | CMD_WRITE) && h.len > MAX_BLOCK)
}

/// Progress of one request's reply.
#[derive(Default)]
struct Answer {
    done: bool,
    failed: bool,
    covered: u64,
}

fn check_output(setup: &Setup, options: &[u32], sent: &[Sent], clean: bool, output: &[u8]) {
    let mut r = Reader::new(output);
    assert_eq!(r.u64(), Some(NBD_MAGIC), "greeting");
    assert_eq!(r.u64(), Some(IHAVEOPT), "greeting");
    assert!(r.u16().is_some(), "greeting flags");
    for &opt in options {
        loop {
            assert_eq!(r.u64(), Some(OPT_REPLY_MAGIC), "option reply magic for {}", option_name(opt));
            assert_eq!(r.u32(), Some(opt), "option reply echoes the option");
            let typ = r.u32().expect("option reply type");
            let len = r.u32().expect("option reply length");
            assert!(r.take(len as usize).is_some(), "option reply payload of {len} bytes");
            if typ == REP_ACK {
                break;
            }
            assert!(typ & (1 << 31) == 0, "option {} refused with {typ:#x}", option_name(opt));
        }
    }

    // After a broken message the server drops replies still queued, so its
    // output may stop anywhere; after a clean end it must be complete.
    macro_rules! need {
        ($e:expr, $what:expr) => {
            match $e {
                Some(v) => v,
                None if clean => panic!("the output stops inside {}", $what),
                None => return,
            }
        };
    }
    let mut answers: HashMap<u64, Answer> = HashMap::new();
    while !r.is_empty() {
        let magic = need!(r.peek_u32(), "a reply magic");
        match magic {
            SIMPLE_REPLY_MAGIC => {
                r.take(4);
                let error = need!(r.u32(), "simple reply error");
                let cookie = need!(r.u64(), "simple reply cookie");
                let s = sent.get(cookie as usize).unwrap_or_else(|| panic!("reply for unknown cookie {cookie}"));
                let h = s.header;
                let a = answers.entry(cookie).or_default();
                assert!(!a.done, "request {cookie} answered twice");
                assert!(
                    !(setup.structured && matches!(h.typ, CMD_READ | CMD_BLOCK_STATUS)),
                    "simple reply to {h:?} with structured replies on"
                );
                assert!(h.typ != CMD_BLOCK_STATUS || error != 0, "BLOCK_STATUS answered by a simple success");
                if error == 0 {
                    assert!(!must_fail(setup, &h), "invalid request {h:?} succeeded");
                    if h.typ == CMD_READ {
                        need!(r.take(h.len as usize), "simple read reply data");
                    }
                }
                a.done = true;
            }
            STRUCTURED_REPLY_MAGIC => {
                assert!(setup.structured, "structured chunk without structured replies");
                r.take(4);
                let flags = need!(r.u16(), "chunk flags");
                let typ = need!(r.u16(), "chunk type");
                let cookie = need!(r.u64(), "chunk cookie");
                let len = need!(r.u32(), "chunk length");
                let payload = need!(r.take(len as usize), "chunk payload");
                let s = sent.get(cookie as usize).unwrap_or_else(|| panic!("chunk for unknown cookie {cookie}"));
                let h = s.header;
                assert!(matches!(h.typ, CMD_READ | CMD_BLOCK_STATUS), "structured chunk for {h:?}");
                let a = answers.entry(cookie).or_default();
                assert!(!a.done, "chunk after the last one for request {cookie}");
                check_chunk(setup, &h, typ, payload, a);
                if flags & REPLY_FLAG_DONE != 0 {
                    a.done = true;
                    if !a.failed && h.typ == CMD_READ {
                        assert_eq!(a.covered, u64::from(h.len), "read reply covers the request");
                    }
                }
            }
            m => panic!("reply with bad magic {m:#x}"),
        }
    }
    if clean {
        for (cookie, a) in &answers {
            assert!(a.done, "request {cookie}'s reply stops before its last chunk");
        }
        assert_eq!(answers.len(), sent.len(), "every request of a clean stream is answered");
    }
}

fn check_chunk(setup: &Setup, h: &RequestHeader, typ: u16, payload: &[u8], a: &mut Answer) {
    let mut p = Reader::new(payload);
    match typ {
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let errno = p.u32().expect("error chunk errno");
            let msg_len = p.u16().expect("error chunk message length");
            assert_ne!(errno, 0, "error chunk with errno 0");
            assert!(p.take(usize::from(msg_len)).is_some(), "error message fits its chunk");
            a.failed = true;
        }
        _ => {
            assert!(!must_fail(setup, h), "invalid request {h:?} answered with data");
            match (h.typ, typ) {
                (CMD_READ, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE) => {
                    let at = p.u64().expect("chunk offset");
                    let n = if typ == REPLY_TYPE_OFFSET_DATA {
                        p.buf.len() as u64
                    } else {
                        u64::from(p.u32().expect("hole length"))
                    };
                    assert!(n > 0, "empty data or hole chunk");
                    let end = h.offset + u64::from(h.len);
                    assert!(at >= h.offset && at.checked_add(n).is_some_and(|e| e <= end), "chunk outside the read");
                    a.covered += n;
                }
                (CMD_READ, REPLY_TYPE_NONE) => assert!(payload.is_empty(), "NONE chunk with payload"),
                (CMD_BLOCK_STATUS, REPLY_TYPE_BLOCK_STATUS) => {
                    assert_eq!(p.u32(), Some(META_BASE_ALLOCATION_ID), "block status context");
                    assert!(!p.is_empty() && p.buf.len().is_multiple_of(8), "block status descriptors");
                    let mut total = 0u64;
                    while let Some(l) = p.u32() {
                        let _flags = p.u32();
                        assert!(l > 0, "empty extent");
                        total += u64::from(l);
                    }
                    assert!(total <= u64::from(h.len), "extents past the request");
                }
                (cmd, t) => panic!("chunk type {t} in reply to command {cmd}"),
            }
        }
    }
}

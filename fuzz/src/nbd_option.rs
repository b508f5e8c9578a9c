//! The server's handshake, fed arbitrary client bytes.
//!
//! Input: everything the client sends after the server's greeting (client
//! flags, then options; whatever follows a successful `GO` is transmission).
//! The target sends it, closes its side and reads the server's output. It
//! asserts that:
//! - nothing panics and the connection never hangs;
//! - the greeting is exact;
//! - every complete option of a well-framed input is answered, in order, by
//!   replies that echo its code and end with an `ACK` or an error reply
//!   (fixed newstyle: a malformed option gets an error and haggling goes on),
//!   except `EXPORT_NAME`, which has no reply, and an oversized option, after
//!   which the server closes;
//! - after `ABORT`, a refused client flag or the last option of the input,
//!   the server sends nothing more.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ballast_nbd::proto::*;
use ballast_nbd::{NbdServer, ServerConfig};

use crate::harness::{block_on, MemDevice, MemExports, Reader};

pub fn run(data: &[u8]) {
    let device = Arc::new(MemDevice::new(1 << 20, false));
    let config = ServerConfig { max_block: 64 * 1024, max_in_flight_bytes: 128 * 1024, ..ServerConfig::default() };
    let server = NbdServer::new(Arc::new(MemExports { device }), config);
    let mut output = Vec::new();
    block_on(async {
        let (ours, theirs) = tokio::io::duplex(16 * 1024);
        let (mut rd, mut wr) = tokio::io::split(ours);
        let send = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let receive = async {
            let _ = rd.read_to_end(&mut output).await;
        };
        let (_, (), ()) = tokio::join!(server.serve_connection(theirs), send, receive);
    });
    check_output(data, &output);
}

fn check_output(input: &[u8], output: &[u8]) {
    let mut out = Reader::new(output);
    assert_eq!(out.u64(), Some(NBD_MAGIC), "greeting");
    assert_eq!(out.u64(), Some(IHAVEOPT), "greeting");
    assert_eq!(out.u16(), Some(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), "greeting flags");

    let mut inp = Reader::new(input);
    let Some(flags) = inp.u32() else {
        assert!(out.is_empty(), "output before the client flags arrived");
        return;
    };
    if flags & !CLIENT_KNOWN_FLAGS != 0 {
        assert!(out.is_empty(), "the server went on after unknown client flags {flags:#x}");
        return;
    }
    loop {
        let (Some(magic), Some(opt), Some(len)) = (inp.u64(), inp.u32(), inp.u32()) else {
            assert!(out.is_empty(), "output after the input ran out");
            return;
        };
        if magic != IHAVEOPT {
            assert!(out.is_empty(), "the server went on after a bad option magic");
            return;
        }
        if len > MAX_OPTION_DRAIN || (opt == OPT_EXPORT_NAME && len > MAX_OPTION_DATA) {
            assert!(out.is_empty(), "the server went on after an oversized option");
            return;
        }
        if inp.take(len as usize).is_none() {
            assert!(out.is_empty(), "output for a truncated option");
            return;
        }
        if opt == OPT_EXPORT_NAME {
            // No option reply: export data (or a close) and transmission follow.
            return;
        }
        // Replies for this option until the final one.
        let final_type = loop {
            assert_eq!(out.u64(), Some(OPT_REPLY_MAGIC), "a reply to {} ({opt})", option_name(opt));
            assert_eq!(out.u32(), Some(opt), "the reply echoes option {opt}");
            let typ = out.u32().expect("reply type");
            let rlen = out.u32().expect("reply length");
            assert!(rlen <= MAX_OPTION_DATA, "reply of {rlen} bytes");
            let payload = out.take(rlen as usize).expect("the reply's payload");
            match typ {
                REP_ACK => break typ,
                REP_SERVER | REP_INFO | REP_META_CONTEXT => {
                    assert!(matches!(opt, OPT_LIST | OPT_INFO | OPT_GO | OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT));
                    if typ == REP_INFO {
                        assert!(payload.len() >= 2, "NBD_REP_INFO without a type");
                    }
                }
                t if t & (1 << 31) != 0 => {
                    let known = [
                        REP_ERR_UNSUP,
                        REP_ERR_POLICY,
                        REP_ERR_INVALID,
                        REP_ERR_PLATFORM,
                        REP_ERR_TLS_REQD,
                        REP_ERR_UNKNOWN,
                        REP_ERR_SHUTDOWN,
                        REP_ERR_BLOCK_SIZE_REQD,
                        REP_ERR_TOO_BIG,
                    ];
                    assert!(known.contains(&t), "unknown error reply {t:#x}");
                    assert!(std::str::from_utf8(payload).is_ok(), "error message is UTF-8");
                    break t;
                }
                t => panic!("reply type {t} to option {opt}"),
            }
        };
        if opt == OPT_ABORT {
            assert_eq!(final_type, REP_ACK);
            assert!(out.is_empty(), "output after ABORT");
            return;
        }
        if opt == OPT_GO && final_type == REP_ACK {
            // Transmission; its bytes are the nbd_request target's business.
            return;
        }
    }
}

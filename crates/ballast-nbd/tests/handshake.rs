//! Handshake (option haggling) tests against a hand-written client.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 2;
const TF_EXPECTED: u16 = 1 | 4 | 8 | 32 | 64 | 128 | 256 | 1024 | 2048;
/// Without structured replies the server must leave SEND_DF (128) clear.
const TF_SIMPLE: u16 = TF_EXPECTED & !128;

#[tokio::test]
async fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    assert_eq!(greet(&mut s, 3).await, 3);
    send_opt(&mut s, OPT_ABORT, &[]).await;
    assert_eq!(read_opt_reply(&mut s, OPT_ABORT).await.0, REP_ACK);
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn unknown_client_flags_close() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 1 | 8).await;
    assert!(server_result(h).await.is_err());
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).await.unwrap(), 0);
}

#[tokio::test]
async fn bad_option_magic_closes() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    s.write_all(&[0u8; 16]).await.unwrap();
    let err = server_result(h).await.unwrap_err();
    assert!(err.is_protocol_violation(), "{err}");
}

#[tokio::test]
async fn leaving_at_a_message_boundary_is_clean() {
    let (_, _, server) = setup();
    // Connect, take the greeting and leave (a health probe).
    let (mut s, h) = connect(&server);
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    drop(s);
    server_result(h).await.unwrap();
    // Leave between options without NBD_OPT_ABORT.
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(read_opt_reply(&mut s, OPT_STRUCTURED_REPLY).await.0, REP_ACK);
    drop(s);
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn eof_during_handshake_is_an_error_not_a_panic() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
    drop(s);
    assert!(server_result(h).await.is_err());
}

#[tokio::test]
async fn list_exports() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    send_opt(&mut s, OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (t, d) = read_opt_reply(&mut s, OPT_LIST).await;
        if t == REP_ACK {
            break;
        }
        assert_eq!(t, REP_SERVER);
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        let name = String::from_utf8(d[4..4 + n].to_vec()).unwrap();
        let desc = String::from_utf8(d[4 + n..].to_vec()).unwrap();
        assert_eq!(desc, format!("export {name}"));
        names.push(name);
    }
    assert_eq!(names, vec!["ro", "vol"]);
    // LIST with data is invalid, and haggling continues.
    send_opt(&mut s, OPT_LIST, b"x").await;
    assert_eq!(read_opt_reply(&mut s, OPT_LIST).await.0, ERR_INVALID);
    send_opt(&mut s, OPT_ABORT, &[]).await;
    assert_eq!(read_opt_reply(&mut s, OPT_ABORT).await.0, REP_ACK);
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn info_reports_real_size_block_sizes_name_and_description() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    send_opt(&mut s, OPT_INFO, &info_data("ro", &[1, 2, 3, 999])).await;
    let info = read_info(&mut s, OPT_INFO).await.unwrap();
    assert_eq!(info.size, 65536 + 100);
    assert_eq!(info.flags, TF_SIMPLE | TF_READ_ONLY);
    assert_eq!(info.block, Some((512, 4096, 32 << 20)));
    assert_eq!(info.name.as_deref(), Some("ro"));
    assert_eq!(info.description.as_deref(), Some("in-memory test device"));
    // Block sizes are sent even when not asked for; name is not.
    send_opt(&mut s, OPT_INFO, &info_data("vol", &[])).await;
    let info = read_info(&mut s, OPT_INFO).await.unwrap();
    assert_eq!(info.size, SIZE);
    assert_eq!(info.flags, TF_SIMPLE);
    assert!(info.block.is_some());
    assert!(info.name.is_none());
    // Unknown export, provider failure, malformed data: errors, haggling goes on.
    send_opt(&mut s, OPT_INFO, &info_data("nope", &[])).await;
    assert_eq!(read_info(&mut s, OPT_INFO).await.unwrap_err(), ERR_UNKNOWN);
    send_opt(&mut s, OPT_INFO, &info_data("broken", &[])).await;
    assert_eq!(read_info(&mut s, OPT_INFO).await.unwrap_err(), ERR_UNKNOWN);
    for bad in [vec![], vec![0, 0, 0, 9, b'v'], {
        let mut d = info_data("vol", &[1]);
        d.push(0);
        d
    }] {
        send_opt(&mut s, OPT_GO, &bad).await;
        assert_eq!(read_info(&mut s, OPT_GO).await.unwrap_err(), ERR_INVALID);
    }
    // Still usable: GO on the default export.
    send_opt(&mut s, OPT_GO, &info_data("", &[])).await;
    let info = read_info(&mut s, OPT_GO).await.unwrap();
    assert_eq!(info.size, SIZE);
    send_req(&mut s, 0, CMD_DISC, 1, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn unknown_options_starttls_and_extended_headers_are_unsupported() {
    let (vol, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    for opt in [OPT_EXTENDED_HEADERS, OPT_STARTTLS, 4, 12, 0, 0xffff_ffff] {
        send_opt(&mut s, opt, b"ignored").await;
        let (t, msg) = read_opt_reply(&mut s, opt).await;
        assert_eq!(t, ERR_UNSUP, "option {opt}");
        assert!(std::str::from_utf8(&msg).is_ok());
    }
    // Oversized option data is drained and refused.
    send_opt(&mut s, 77, &vec![7u8; 70_000]).await;
    assert_eq!(read_opt_reply(&mut s, 77).await.0, ERR_TOO_BIG);
    let (size, flags) = go(&mut s, "vol", true, false).await;
    assert_eq!(size, SIZE);
    assert_eq!(flags & TF_HAS_FLAGS, TF_HAS_FLAGS);
    send_req(&mut s, 0, CMD_WRITE, 1, 0, 4, b"abcd").await;
    expect_simple(&mut s, 1, 0).await;
    assert_eq!(vol.contents(0, 4), b"abcd");
    send_req(&mut s, 0, CMD_DISC, 2, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn huge_option_closes() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&77u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&b).await.unwrap();
    assert!(server_result(h).await.is_err());
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let (_, _, server) = setup();
    for (client_flags, zeroes) in [(3u32, 0usize), (1, 124)] {
        let (mut s, h) = connect(&server);
        greet(&mut s, client_flags).await;
        send_opt(&mut s, OPT_EXPORT_NAME, b"ro").await;
        assert_eq!(s.read_u64().await.unwrap(), 65536 + 100);
        assert_eq!(s.read_u16().await.unwrap(), TF_SIMPLE | TF_READ_ONLY);
        let mut z = vec![1u8; zeroes];
        s.read_exact(&mut z).await.unwrap();
        assert!(z.iter().all(|&b| b == 0));
        // The very next bytes are transmission replies.
        let data = simple_read(&mut s, 9, 0, 16).await;
        assert_eq!(data, vec![0; 16]);
        send_req(&mut s, 0, CMD_DISC, 2, 0, 0, &[]).await;
        server_result(h).await.unwrap();
    }
}

#[tokio::test]
async fn export_name_unknown_closes() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    send_opt(&mut s, OPT_EXPORT_NAME, b"missing").await;
    assert!(server_result(h).await.is_err());
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).await.unwrap(), 0);
}

#[tokio::test]
async fn structured_reply_with_data_is_invalid() {
    let (_, _, server) = setup();
    let (mut s, _h) = connect(&server);
    greet(&mut s, 3).await;
    send_opt(&mut s, OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(read_opt_reply(&mut s, OPT_STRUCTURED_REPLY).await.0, ERR_INVALID);
}

#[tokio::test]
async fn meta_contexts() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;

    // SET before structured replies: invalid.
    send_opt(&mut s, OPT_SET_META, &meta_data("vol", &["base:allocation"])).await;
    assert_eq!(read_opt_reply(&mut s, OPT_SET_META).await.0, ERR_INVALID);

    // LIST works without structured replies; no query lists everything,
    // "base:" matches the namespace, unknown queries match nothing.
    for (queries, expect) in [
        (vec![], true),
        (vec!["base:"], true),
        (vec!["base:allocation", "base:allocation"], true),
        (vec!["qemu:dirty-bitmap:x"], false),
        (vec!["base:other"], false),
    ] {
        send_opt(&mut s, OPT_LIST_META, &meta_data("vol", &queries)).await;
        let (t, d) = read_opt_reply(&mut s, OPT_LIST_META).await;
        if expect {
            assert_eq!(t, REP_META_CONTEXT, "{queries:?}");
            assert_eq!(&d[4..], b"base:allocation");
            assert_eq!(read_opt_reply(&mut s, OPT_LIST_META).await.0, REP_ACK);
        } else {
            assert_eq!(t, REP_ACK, "{queries:?}");
        }
    }
    send_opt(&mut s, OPT_LIST_META, &meta_data("nope", &[])).await;
    assert_eq!(read_opt_reply(&mut s, OPT_LIST_META).await.0, ERR_UNKNOWN);
    send_opt(&mut s, OPT_LIST_META, &[0, 0, 0, 0, 0, 0, 0, 5]).await;
    assert_eq!(read_opt_reply(&mut s, OPT_LIST_META).await.0, ERR_INVALID);

    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(read_opt_reply(&mut s, OPT_STRUCTURED_REPLY).await.0, REP_ACK);

    // SET selects; a later SET with no match replaces it with nothing.
    send_opt(&mut s, OPT_SET_META, &meta_data("vol", &["base:allocation"])).await;
    let (t, d) = read_opt_reply(&mut s, OPT_SET_META).await;
    assert_eq!(t, REP_META_CONTEXT);
    assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), 1);
    assert_eq!(read_opt_reply(&mut s, OPT_SET_META).await.0, REP_ACK);
    send_opt(&mut s, OPT_SET_META, &meta_data("vol", &["x:y"])).await;
    assert_eq!(read_opt_reply(&mut s, OPT_SET_META).await.0, REP_ACK);
    send_opt(&mut s, OPT_SET_META, &meta_data("nope", &["base:"])).await;
    assert_eq!(read_opt_reply(&mut s, OPT_SET_META).await.0, ERR_UNKNOWN);

    send_opt(&mut s, OPT_GO, &info_data("vol", &[])).await;
    read_info(&mut s, OPT_GO).await.unwrap();
    // Nothing selected, so block status is refused.
    send_req(&mut s, 0, CMD_BLOCK_STATUS, 5, 0, 4096, &[]).await;
    let chunks = read_chunks(&mut s, 5).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, T_ERROR);
    assert_eq!(error_of(&chunks[0].2).0, EINVAL);
    send_req(&mut s, 0, CMD_DISC, 6, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn meta_context_for_another_export_is_dropped_at_go() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    greet(&mut s, 3).await;
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(read_opt_reply(&mut s, OPT_STRUCTURED_REPLY).await.0, REP_ACK);
    send_opt(&mut s, OPT_SET_META, &meta_data("ro", &["base:"])).await;
    assert_eq!(read_opt_reply(&mut s, OPT_SET_META).await.0, REP_META_CONTEXT);
    assert_eq!(read_opt_reply(&mut s, OPT_SET_META).await.0, REP_ACK);
    send_opt(&mut s, OPT_GO, &info_data("vol", &[])).await;
    read_info(&mut s, OPT_GO).await.unwrap();
    send_req(&mut s, 0, CMD_BLOCK_STATUS, 5, 0, 4096, &[]).await;
    let chunks = read_chunks(&mut s, 5).await;
    assert_eq!(error_of(&chunks[0].2).0, EINVAL);
    drop(s);
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn real_tcp_and_unix_listeners_serve_and_shut_down() {
    let (vol, _, server) = setup();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = server.clone();
    let accept = tokio::spawn(async move {
        srv.serve_tcp(listener, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(tcp.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(tcp.read_u64().await.unwrap(), IHAVEOPT);
    assert_eq!(tcp.read_u16().await.unwrap(), 3);
    tcp.write_u32(3).await.unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(b"vol");
    tcp.write_all(&opt).await.unwrap();
    assert_eq!(tcp.read_u64().await.unwrap(), SIZE);
    tcp.read_u16().await.unwrap();
    let mut req = request(0, CMD_WRITE, 1, 100, 3);
    req.extend_from_slice(b"tcp");
    tcp.write_all(&req).await.unwrap();
    assert_eq!(tcp.read_u32().await.unwrap(), SIMPLE_MAGIC);
    assert_eq!(tcp.read_u32().await.unwrap(), 0);
    assert_eq!(tcp.read_u64().await.unwrap(), 1);
    assert_eq!(vol.contents(100, 3), b"tcp");
    stop_tx.send(()).unwrap();
    accept.await.unwrap().unwrap();
    // The open connection outlives the listener.
    tcp.write_all(&request(0, CMD_FLUSH, 2, 0, 0)).await.unwrap();
    assert_eq!(tcp.read_u32().await.unwrap(), SIMPLE_MAGIC);

    let dir = std::env::temp_dir().join(format!("ballast-nbd-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = server.clone();
    let accept = tokio::spawn(async move {
        srv.serve_unix(listener, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let mut unix = tokio::net::UnixStream::connect(&path).await.unwrap();
    assert_eq!(unix.read_u64().await.unwrap(), NBDMAGIC);
    stop_tx.send(()).unwrap();
    accept.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

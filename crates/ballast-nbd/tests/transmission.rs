//! Transmission-phase tests against a hand-written client.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ballast_nbd::{DeviceErrorKind, NbdError, ServerConfig};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const B: u64 = BLOCK;

#[tokio::test]
async fn write_read_roundtrip_simple() {
    let (vol, _, server) = setup();
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", false, false).await;
    let data = pattern(1, 10_000);
    send_req(&mut s, F_FUA, CMD_WRITE, 1, 777, data.len() as u32, &data).await;
    expect_simple(&mut s, 1, 0).await;
    assert_eq!(simple_read(&mut s, 2, 777, 10_000).await, data);
    // Unaligned, crossing blocks, partly hole.
    let got = simple_read(&mut s, 3, 700, 20_000).await;
    assert_eq!(&got[..77], &vec![0; 77][..]);
    assert_eq!(&got[77..10_077], &data[..]);
    assert!(got[10_077..].iter().all(|&b| b == 0));
    // FUA is accepted on any command, and reaches the device on writes.
    send_req(&mut s, F_FUA, CMD_FLUSH, 4, 0, 0, &[]).await;
    expect_simple(&mut s, 4, 0).await;
    send_req(&mut s, F_FUA, CMD_CACHE, 5, 0, 4096, &[]).await;
    expect_simple(&mut s, 5, 0).await;
    assert!(vol.log.lock().unwrap().contains(&("write", 777, 10_000, true)));
    // Whole device, last byte.
    send_req(&mut s, 0, CMD_WRITE, 6, SIZE - 1, 1, b"z").await;
    expect_simple(&mut s, 6, 0).await;
    assert_eq!(simple_read(&mut s, 7, SIZE - 1, 1).await, b"z");
    // EOF between requests is a clean end.
    drop(s);
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn replies_come_out_of_order() {
    let (vol, _, server) = setup();
    vol.set_delay(0, Duration::from_millis(300));
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", true, false).await;
    send_req(&mut s, 0, CMD_READ, 100, 0, 512, &[]).await;
    for i in 1..=30u64 {
        let data = pattern(i as u8, 512);
        send_req(&mut s, 0, CMD_WRITE, i, i * B, 512, &data).await;
    }
    let mut order = Vec::new();
    for _ in 0..=30 {
        match read_reply(&mut s).await {
            Reply::Simple { error: 0, cookie } => order.push(cookie),
            Reply::Chunk { flags, cookie, .. } => {
                assert_eq!(flags & 1, 1);
                order.push(cookie);
            }
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(*order.last().unwrap(), 100, "the slow read must finish last");
    assert_eq!(order.iter().collect::<HashSet<_>>().len(), 31);
    assert!(vol.max_in_flight_seen.load(Ordering::SeqCst) > 1);
    for i in 1..=30u64 {
        assert_eq!(vol.contents(i * B, 512), pattern(i as u8, 512));
    }
    send_req(&mut s, 0, CMD_DISC, 0, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn in_flight_is_bounded() {
    let config = ServerConfig { max_in_flight: 4, ..ServerConfig::default() };
    let (vol, _, server) = setup_with(config);
    for i in 0..40u64 {
        vol.set_delay(i * B, Duration::from_millis(20));
    }
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", false, false).await;
    let mut all = Vec::new();
    for i in 0..40u64 {
        all.extend(request(0, CMD_WRITE, i, i * B, 8));
        all.extend_from_slice(b"12345678");
    }
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        wr.write_all(&all).await.unwrap();
        wr
    });
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let mut hdr = [0u8; 16];
        rd.read_exact(&mut hdr).await.unwrap();
        assert_eq!(&hdr[4..8], &[0, 0, 0, 0]);
        seen.insert(u64::from_be_bytes(hdr[8..].try_into().unwrap()));
    }
    assert_eq!(seen.len(), 40);
    let max = vol.max_in_flight_seen.load(Ordering::SeqCst);
    assert!((2..=4).contains(&max), "max in flight {max}");
    drop(writer.await.unwrap());
    drop(rd);
    server_result(h).await.unwrap();
}

/// Large payloads are bounded by bytes, not only by request count.
#[tokio::test]
async fn in_flight_bytes_are_bounded() {
    const LEN: u32 = 64 * 1024;
    let config = ServerConfig {
        max_in_flight: 64,
        max_block: LEN,
        max_in_flight_bytes: 2 * LEN as usize,
        ..ServerConfig::default()
    };
    let (vol, _, server) = setup_with(config);
    for i in 0..8u64 {
        vol.set_delay(i * LEN as u64, Duration::from_millis(30));
    }
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", false, false).await;
    let mut all = Vec::new();
    for i in 0..8u64 {
        all.extend(request(0, CMD_WRITE, i, i * LEN as u64, LEN));
        all.extend(vec![i as u8; LEN as usize]);
    }
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        wr.write_all(&all).await.unwrap();
        wr
    });
    for _ in 0..8 {
        let mut hdr = [0u8; 16];
        rd.read_exact(&mut hdr).await.unwrap();
        assert_eq!(&hdr[4..8], &[0, 0, 0, 0]);
    }
    let max = vol.max_in_flight_seen.load(Ordering::SeqCst);
    assert!((1..=2).contains(&max), "max in flight {max} with a budget of two payloads");
    drop(writer.await.unwrap());
    drop(rd);
    server_result(h).await.unwrap();
}

/// Every validation error, each followed by proof the connection still works.
#[tokio::test]
async fn validation_errors_keep_the_connection() {
    let config = ServerConfig { max_block: 64 * 1024, ..ServerConfig::default() };
    let (vol, _, server) = setup_with(config);
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", false, false).await;
    let big = vec![9u8; 64 * 1024 + 1];
    // (flags, type, offset, len, payload, errno)
    type Case<'a> = (u16, u16, u64, u32, &'a [u8], u32);
    let cases: Vec<Case> = vec![
        (0, CMD_READ, 0, 0, b"", EINVAL),
        (0, CMD_WRITE, 0, 0, b"", EINVAL),
        (0, CMD_TRIM, 0, 0, b"", EINVAL),
        (0, CMD_WRITE_ZEROES, 0, 0, b"", EINVAL),
        (0, CMD_CACHE, 0, 0, b"", EINVAL),
        (0, CMD_READ, 0, 64 * 1024 + 1, b"", EINVAL),
        (0, CMD_WRITE, 0, big.len() as u32, &big, EINVAL),
        (0, CMD_READ, SIZE - 10, 11, b"", EINVAL),
        (0, CMD_READ, u64::MAX, 1, b"", EINVAL),
        (0, CMD_READ, SIZE, 1, b"", EINVAL),
        (0, CMD_TRIM, SIZE - 10, 11, b"", EINVAL),
        (0, CMD_CACHE, u64::MAX - 1, 4, b"", EINVAL),
        (0, CMD_WRITE, SIZE - 2, 3, b"abc", ENOSPC),
        (0, CMD_WRITE, u64::MAX, 3, b"abc", ENOSPC),
        (0, CMD_WRITE_ZEROES, SIZE - 10, 11, b"", ENOSPC),
        (1 << 5, CMD_READ, 0, 1, b"", EINVAL),
        (1 << 15, CMD_FLUSH, 0, 0, b"", EINVAL),
        (F_DF, CMD_READ, 0, 1, b"", EINVAL), // DF without structured replies
        (F_DF, CMD_WRITE, 0, 2, b"xy", EINVAL),
        (F_REQ_ONE, CMD_READ, 0, 1, b"", EINVAL),
        (F_NO_HOLE, CMD_WRITE, 0, 2, b"xy", EINVAL),
        (F_FAST_ZERO, CMD_TRIM, 0, 512, b"", EINVAL),
        (F_NO_HOLE, CMD_TRIM, 0, 512, b"", EINVAL),
        (0, CMD_BLOCK_STATUS, 0, 512, b"", EINVAL), // no structured replies
        (0, 9, 0, 0, b"", EINVAL),
        (0, 0xffff, 5, 5, b"", EINVAL),
    ];
    for (i, (flags, typ, offset, len, payload, errno)) in cases.into_iter().enumerate() {
        let cookie = 1000 + i as u64;
        send_req(&mut s, flags, typ, cookie, offset, len, payload).await;
        expect_simple(&mut s, cookie, errno).await;
        // Still in sync and usable.
        let data = pattern(i as u8, 100);
        send_req(&mut s, 0, CMD_WRITE, 1, 4096, 100, &data).await;
        expect_simple(&mut s, 1, 0).await;
        assert_eq!(simple_read(&mut s, 2, 4096, 100).await, data, "after case {i}");
    }
    // Rejected writes never reached the device.
    assert!(vol.contents(0, 2).iter().all(|&b| b == 0));
    // FLUSH ignores offset and length.
    send_req(&mut s, 0, CMD_FLUSH, 3, u64::MAX, u32::MAX, &[]).await;
    expect_simple(&mut s, 3, 0).await;
    send_req(&mut s, 0, CMD_DISC, 4, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn read_only_refuses_writes_with_eperm() {
    let (_, ro, server) = setup();
    let (mut s, h) = connect(&server);
    let (size, flags) = open(&mut s, "ro", false, false).await;
    assert_eq!(flags & 2, 2);
    send_req(&mut s, 0, CMD_WRITE, 1, 0, 3, b"abc").await;
    expect_simple(&mut s, 1, EPERM).await;
    send_req(&mut s, 0, CMD_TRIM, 2, 0, 512, &[]).await;
    expect_simple(&mut s, 2, EPERM).await;
    send_req(&mut s, 0, CMD_WRITE_ZEROES, 3, 0, 512, &[]).await;
    expect_simple(&mut s, 3, EPERM).await;
    // Reads work, up to the odd-sized end.
    assert_eq!(simple_read(&mut s, 4, size - 100, 100).await, vec![0; 100]);
    send_req(&mut s, 0, CMD_READ, 5, size - 99, 100, &[]).await;
    expect_simple(&mut s, 5, EINVAL).await;
    assert_eq!(ro.calls.load(Ordering::SeqCst), 1);
    send_req(&mut s, 0, CMD_DISC, 6, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn device_errors_map_to_errnos() {
    let (vol, _, server) = setup();
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", false, false).await;
    let kinds = [
        (DeviceErrorKind::Io, EIO),
        (DeviceErrorKind::Invalid, EINVAL),
        (DeviceErrorKind::NoSpace, ENOSPC),
        (DeviceErrorKind::NotPermitted, EPERM),
        (DeviceErrorKind::NotSupported, ENOTSUP),
        (DeviceErrorKind::Shutdown, ESHUTDOWN),
    ];
    for (i, (kind, errno)) in kinds.into_iter().enumerate() {
        let off = i as u64 * B;
        vol.fail_at(off, kind.clone());
        send_req(&mut s, 0, CMD_WRITE, 10 + i as u64, off, 2, b"hi").await;
        expect_simple(&mut s, 10 + i as u64, errno).await;
        vol.fail_at(off, kind);
        send_req(&mut s, 0, CMD_READ, 20 + i as u64, off, 2, &[]).await;
        expect_simple(&mut s, 20 + i as u64, errno).await;
        // The same request now succeeds.
        send_req(&mut s, 0, CMD_WRITE, 30, off, 2, b"ok").await;
        expect_simple(&mut s, 30, 0).await;
    }
    vol.fail_at(0, DeviceErrorKind::Io);
    send_req(&mut s, 0, CMD_FLUSH, 40, 0, 0, &[]).await;
    expect_simple(&mut s, 40, EIO).await;
    drop(s);
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn bad_magic_closes_the_connection() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", false, false).await;
    let mut req = request(0, CMD_READ, 1, 0, 512);
    req[0] ^= 0xff;
    s.write_all(&req).await.unwrap();
    let err = server_result(h).await.unwrap_err();
    assert!(matches!(err, NbdError::BadMagic { .. }), "{err}");
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).await.unwrap(), 0);
}

#[tokio::test]
async fn truncated_requests_close_the_connection() {
    let (_, _, server) = setup();
    // EOF in the middle of a header.
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", false, false).await;
    s.write_all(&request(0, CMD_READ, 1, 0, 512)[..20]).await.unwrap();
    s.shutdown().await.unwrap();
    let err = server_result(h).await.unwrap_err();
    assert!(matches!(err, NbdError::Truncated(_)), "{err}");
    // EOF in the middle of a write payload (valid and rejected alike).
    for offset in [0, SIZE] {
        let (mut s, h) = connect(&server);
        open(&mut s, "vol", false, false).await;
        let mut req = request(0, CMD_WRITE, 1, offset, 4096);
        req.extend_from_slice(&[1u8; 1000]);
        s.write_all(&req).await.unwrap();
        s.shutdown().await.unwrap();
        let err = server_result(h).await.unwrap_err();
        assert!(matches!(err, NbdError::Truncated(_)), "{err}");
    }
}

#[tokio::test]
async fn disc_waits_for_in_flight_replies() {
    let (vol, _, server) = setup();
    vol.set_delay(B, Duration::from_millis(300));
    vol.set_delay(2 * B, Duration::from_millis(200));
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", true, false).await;
    send_req(&mut s, 0, CMD_WRITE, 1, B, 5, b"hello").await;
    send_req(&mut s, 0, CMD_READ, 2, 2 * B, 8, &[]).await;
    send_req(&mut s, 0, CMD_DISC, 3, 0, 0, &[]).await;
    // Anything after DISC is ignored.
    send_req(&mut s, 0, CMD_WRITE, 4, 0, 2, b"no").await;
    let r1 = read_reply(&mut s).await;
    let r2 = read_reply(&mut s).await;
    let mut cookies = [r1.cookie(), r2.cookie()];
    cookies.sort();
    assert_eq!(cookies, [1, 2]);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing after the in-flight replies");
    server_result(h).await.unwrap();
    assert_eq!(vol.contents(B, 5), b"hello");
    assert_eq!(vol.contents(0, 2), [0, 0]);
}

#[tokio::test]
async fn structured_reads_send_holes_and_df_sends_one_chunk() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", true, false).await;
    let d1 = pattern(3, B as usize);
    let d3 = pattern(4, 100);
    send_req(&mut s, 0, CMD_WRITE, 1, B, B as u32, &d1).await;
    expect_simple(&mut s, 1, 0).await;
    send_req(&mut s, 0, CMD_WRITE, 2, 3 * B, 100, &d3).await;
    expect_simple(&mut s, 2, 0).await;
    let mut expected = vec![0u8; 5 * B as usize];
    expected[B as usize..2 * B as usize].copy_from_slice(&d1);
    expected[3 * B as usize..3 * B as usize + 100].copy_from_slice(&d3);

    send_req(&mut s, 0, CMD_READ, 3, 0, 5 * B as u32, &[]).await;
    let chunks = read_chunks(&mut s, 3).await;
    let types: Vec<u16> = chunks.iter().map(|c| c.1).collect();
    assert_eq!(types, [T_OFFSET_HOLE, T_OFFSET_DATA, T_OFFSET_HOLE, T_OFFSET_DATA, T_OFFSET_HOLE]);
    assert!(chunks[..4].iter().all(|c| c.0 == 0), "only the last is DONE");
    assert_eq!(assemble(0, 5 * B as u32, &chunks), expected);

    // Unaligned read that starts in data and ends in a hole.
    send_req(&mut s, 0, CMD_READ, 4, B + 10, B as u32, &[]).await;
    let chunks = read_chunks(&mut s, 4).await;
    assert_eq!(assemble(B + 10, B as u32, &chunks), expected[B as usize + 10..2 * B as usize + 10]);

    // Entirely a hole: one OFFSET_HOLE with DONE.
    send_req(&mut s, 0, CMD_READ, 5, 10 * B, 3 * B as u32, &[]).await;
    let chunks = read_chunks(&mut s, 5).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, T_OFFSET_HOLE);

    // DF: exactly one OFFSET_DATA chunk with zeros in the holes.
    send_req(&mut s, F_DF, CMD_READ, 6, 0, 5 * B as u32, &[]).await;
    let chunks = read_chunks(&mut s, 6).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, T_OFFSET_DATA);
    assert_eq!(assemble(0, 5 * B as u32, &chunks), expected);

    // Validation and device errors on reads are structured errors.
    send_req(&mut s, 0, CMD_READ, 7, SIZE, 1, &[]).await;
    let chunks = read_chunks(&mut s, 7).await;
    assert_eq!((chunks[0].1, error_of(&chunks[0].2).0), (T_ERROR, EINVAL));
    send_req(&mut s, 0, CMD_DISC, 8, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn structured_device_error_carries_message() {
    let (vol, _, server) = setup();
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", true, false).await;
    vol.fail_at(0, DeviceErrorKind::Io);
    send_req(&mut s, 0, CMD_READ, 1, 0, 512, &[]).await;
    let chunks = read_chunks(&mut s, 1).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, T_ERROR);
    let (errno, msg) = error_of(&chunks[0].2);
    assert_eq!(errno, EIO);
    assert!(msg.contains("injected"), "{msg}");
    // Non-read errors may be simple even with structured replies.
    vol.fail_at(0, DeviceErrorKind::NoSpace);
    send_req(&mut s, 0, CMD_WRITE, 2, 0, 1, b"x").await;
    expect_simple(&mut s, 2, ENOSPC).await;
    drop(s);
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn block_status_extents() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", true, true).await;
    send_req(&mut s, 0, CMD_WRITE, 1, B, 10, b"0123456789").await;
    expect_simple(&mut s, 1, 0).await;

    send_req(&mut s, 0, CMD_BLOCK_STATUS, 2, 0, 3 * B as u32, &[]).await;
    let chunks = read_chunks(&mut s, 2).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, T_BLOCK_STATUS);
    let (id, ext) = extents_of(&chunks[0].2);
    assert_eq!(id, 1);
    // The device over-reports its last extent; the server clips to the range.
    assert_eq!(ext, vec![(B as u32, 3), (B as u32, 0), (B as u32, 3)]);

    send_req(&mut s, F_REQ_ONE, CMD_BLOCK_STATUS, 3, 0, 3 * B as u32, &[]).await;
    let (_, ext) = extents_of(&read_chunks(&mut s, 3).await[0].2);
    assert_eq!(ext, vec![(B as u32, 3)]);

    send_req(&mut s, F_REQ_ONE, CMD_BLOCK_STATUS, 4, B + 1, 5, &[]).await;
    let (_, ext) = extents_of(&read_chunks(&mut s, 4).await[0].2);
    assert_eq!(ext, vec![(5, 0)]);

    send_req(&mut s, 0, CMD_BLOCK_STATUS, 5, 100, 5000, &[]).await;
    let (_, ext) = extents_of(&read_chunks(&mut s, 5).await[0].2);
    assert_eq!(ext, vec![(3996, 3), (1004, 0)]);

    // Up to the very end of the device, and errors.
    send_req(&mut s, 0, CMD_BLOCK_STATUS, 6, SIZE - 1, 1, &[]).await;
    let (_, ext) = extents_of(&read_chunks(&mut s, 6).await[0].2);
    assert_eq!(ext, vec![(1, 3)]);
    for (cookie, offset, len) in [(7u64, SIZE, 1u32), (8, 0, 0), (9, u64::MAX, 2)] {
        send_req(&mut s, 0, CMD_BLOCK_STATUS, cookie, offset, len, &[]).await;
        let chunks = read_chunks(&mut s, cookie).await;
        assert_eq!((chunks[0].1, error_of(&chunks[0].2).0), (T_ERROR, EINVAL));
    }
    send_req(&mut s, 0, CMD_DISC, 10, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn write_zeroes_and_trim_pass_flags() {
    let (vol, _, server) = setup();
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", false, false).await;
    let d = pattern(9, 3 * B as usize);
    send_req(&mut s, 0, CMD_WRITE, 1, 0, d.len() as u32, &d).await;
    expect_simple(&mut s, 1, 0).await;
    send_req(&mut s, F_NO_HOLE, CMD_WRITE_ZEROES, 2, 0, B as u32, &[]).await;
    expect_simple(&mut s, 2, 0).await;
    assert!(vol.is_allocated(0));
    send_req(&mut s, F_FAST_ZERO | F_FUA, CMD_WRITE_ZEROES, 3, B, B as u32, &[]).await;
    expect_simple(&mut s, 3, 0).await;
    assert!(!vol.is_allocated(B));
    send_req(&mut s, F_FUA, CMD_TRIM, 4, 2 * B, B as u32, &[]).await;
    expect_simple(&mut s, 4, 0).await;
    assert!(!vol.is_allocated(2 * B));
    assert_eq!(simple_read(&mut s, 5, 0, 3 * B as u32).await, vec![0; 3 * B as usize]);
    let log = vol.log.lock().unwrap().clone();
    assert!(log.contains(&("write_zeroes", 0, B, false)), "NO_HOLE → may_trim false");
    assert!(log.contains(&("write_zeroes", B, B, true)));
    assert!(log.contains(&("trim", 2 * B, B, true)), "FUA reaches trim");
    drop(s);
    server_result(h).await.unwrap();
}

#[tokio::test]
async fn a_panicking_device_call_is_answered_with_eio() {
    let (_, _, server) = setup();
    let (mut s, h) = connect(&server);
    open(&mut s, "vol", true, false).await;
    send_req(&mut s, 0, CMD_WRITE, 1, PANIC_OFFSET, 1, b"x").await;
    expect_simple(&mut s, 1, EIO).await;
    send_req(&mut s, 0, CMD_READ, 2, PANIC_OFFSET, 1, &[]).await;
    let chunks = read_chunks(&mut s, 2).await;
    assert_eq!((chunks[0].1, error_of(&chunks[0].2).0), (T_ERROR, EIO));
    send_req(&mut s, 0, CMD_WRITE, 3, 0, 1, b"x").await;
    expect_simple(&mut s, 3, 0).await;
    send_req(&mut s, 0, CMD_DISC, 4, 0, 0, &[]).await;
    server_result(h).await.unwrap();
}

//! The NBD client (`ballast_nbd::client`) against our own server (both reply
//! modes, many requests in flight, device errors, refusals) and against
//! hand-written misbehaving servers: a broken server yields an error, never a
//! panic or a hang.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use ballast_nbd::client::{ClientError, ConnectOptions, NbdClient};
use ballast_nbd::DeviceErrorKind;
use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const LIMIT: Duration = Duration::from_secs(10);

fn opts(structured: bool) -> ConnectOptions {
    ConnectOptions { structured_replies: structured, ..ConnectOptions::default() }
}

async fn open(server: &ballast_nbd::NbdServer<MemProvider>, export: &str, structured: bool) -> NbdClient {
    let (stream, _server_task) = connect(server);
    NbdClient::from_stream(stream, export, &opts(structured)).await.expect("handshake")
}

#[tokio::test]
async fn reads_writes_and_flushes_in_both_reply_modes() {
    for structured in [true, false] {
        let (vol, _, server) = setup();
        let c = open(&server, "vol", structured).await;
        assert_eq!(c.info().structured_replies, structured);
        assert_eq!(c.info().size, SIZE);
        assert!(c.info().can_flush() && !c.info().read_only());
        let data = Bytes::from(pattern(7, 10_000));
        c.write(777, data.clone(), true).await.unwrap();
        assert_eq!(vol.contents(777, 10_000), data.to_vec());
        // Data in the middle, holes on both sides: one read, several chunks.
        let got = c.read(0, 20_480).await.unwrap();
        assert!(got[..777].iter().all(|&b| b == 0));
        assert_eq!(&got[777..10_777], &data[..]);
        assert!(got[10_777..].iter().all(|&b| b == 0));
        c.flush().await.unwrap();
        assert!(vol.log.lock().unwrap().contains(&("write", 777, 10_000, true)));
        c.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn many_requests_are_in_flight_on_one_connection() {
    let (vol, _, server) = setup();
    let c = open(&server, "vol", true).await;
    // Slow requests at every 4th block, so replies come back out of order.
    for i in (0..64u64).step_by(4) {
        vol.set_delay(i * 4096, Duration::from_millis(50));
    }
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let data = Bytes::from(vec![i as u8 + 1; 4096]);
            c.write(i * 4096, data.clone(), false).await?;
            let back = c.read(i * 4096, 4096).await?;
            assert_eq!(back, data, "block {i}");
            Ok::<_, ClientError>(())
        }));
    }
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.expect("request hung").unwrap().unwrap();
    }
    assert!(vol.max_in_flight_seen.load(Ordering::SeqCst) > 8, "requests were not pipelined");
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_device_error_fails_one_request_and_the_connection_stays_up() {
    for structured in [true, false] {
        let (vol, _, server) = setup();
        let c = open(&server, "vol", structured).await;
        vol.fail_at(8192, DeviceErrorKind::Io);
        match c.write(8192, Bytes::from_static(&[1; 512]), false).await {
            Err(ClientError::Request { command: "WRITE", errno: 5, .. }) => {}
            other => panic!("expected EIO, got {other:?}"),
        }
        vol.fail_at(4096, DeviceErrorKind::Io);
        let e = c.read(4096, 4096).await.unwrap_err();
        assert!(matches!(e, ClientError::Request { command: "READ", errno: 5, .. }), "{e}");
        // Still usable.
        c.write(8192, Bytes::from_static(&[2; 512]), false).await.unwrap();
        assert_eq!(c.read(8192, 512).await.unwrap(), Bytes::from_static(&[2; 512]));
    }
}

#[tokio::test]
async fn bad_requests_are_refused_before_they_are_sent() {
    let (vol, _, server) = setup();
    let c = open(&server, "vol", true).await;
    let calls = vol.calls.load(Ordering::SeqCst);
    for e in [
        c.read(SIZE - 10, 11).await.unwrap_err(),
        c.read(u64::MAX - 1, 4096).await.unwrap_err(),
        c.read(0, 0).await.unwrap_err(),
        c.read(0, 64 << 20).await.unwrap_err(),
    ] {
        assert!(matches!(e, ClientError::Invalid(_)), "{e}");
    }
    assert_eq!(vol.calls.load(Ordering::SeqCst), calls, "a refused request reached the device");

    let ro = open(&server, "ro", true).await;
    assert!(ro.info().read_only());
    assert!(matches!(ro.write(0, Bytes::from_static(b"x"), false).await, Err(ClientError::Invalid(_))));

    let (stream, _) = connect(&server);
    match NbdClient::from_stream(stream, "nope", &opts(true)).await {
        Err(ClientError::UnknownExport(name)) => assert_eq!(name, "nope"),
        other => panic!("expected UnknownExport, got {:?}", other.map(|c| c.info().clone())),
    }
}

#[tokio::test]
async fn disconnect_waits_for_the_server_to_close_and_later_requests_fail() {
    let (_, _, server) = setup();
    let (stream, server_task) = connect(&server);
    let c = NbdClient::from_stream(stream, "vol", &opts(true)).await.unwrap();
    let other_handle = c.clone();
    c.disconnect().await.unwrap();
    tokio::time::timeout(LIMIT, server_task).await.expect("server did not close").unwrap().unwrap();
    let e = other_handle.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, ClientError::Disconnected | ClientError::Closed(_)), "{e}");
}

// ---- misbehaving servers ---------------------------------------------------------

/// A minimal fixed-newstyle server: acknowledges structured replies, answers
/// GO with a 1 MiB writable export, then answers the first request with
/// `reply(cookie)` and closes (so a truncated reply is seen as one).
async fn fake_server(mut s: DuplexStream, reply: impl Fn(u64) -> Vec<u8>) {
    let mut g = Vec::new();
    g.extend_from_slice(&NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes()); // fixed newstyle, no zeroes
    if s.write_all(&g).await.is_err() || s.read_u32().await.is_err() {
        return;
    }
    loop {
        let mut h = [0u8; 16];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0; len as usize];
        if s.read_exact(&mut data).await.is_err() {
            return;
        }
        let mut out = Vec::new();
        let mut rep = |typ: u32, payload: &[u8]| {
            out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&opt.to_be_bytes());
            out.extend_from_slice(&typ.to_be_bytes());
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            out.extend_from_slice(payload);
        };
        if opt == OPT_GO {
            let mut info = vec![0, 0];
            info.extend_from_slice(&SIZE.to_be_bytes());
            info.extend_from_slice(&(1u16 | 4).to_be_bytes()); // HAS_FLAGS | SEND_FLUSH
            rep(REP_INFO, &info);
            rep(REP_ACK, &[]);
            let _ = s.write_all(&out).await;
            break;
        }
        rep(REP_ACK, &[]);
        let _ = s.write_all(&out).await;
    }
    let mut req = [0u8; 28];
    if s.read_exact(&mut req).await.is_err() {
        return;
    }
    let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap());
    let _ = s.write_all(&reply(cookie)).await;
}

/// Run one read against a fake server that answers with `reply`.
async fn read_against(reply: impl Fn(u64) -> Vec<u8> + Send + 'static) -> Result<Bytes, ClientError> {
    let (client, server) = tokio::io::duplex(1 << 20);
    tokio::spawn(fake_server(server, reply));
    let c = NbdClient::from_stream(client, "x", &opts(true)).await?;
    tokio::time::timeout(LIMIT, c.read(0, 4096)).await.expect("the client hung on a broken reply")
}

fn chunk(cookie: u64, flags: u16, typ: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&STRUCT_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// What a fake server answers to a request, given its cookie.
type ReplyFn = Box<dyn Fn(u64) -> Vec<u8> + Send>;

#[tokio::test]
async fn malformed_replies_are_errors() {
    let data_at = |offset: u64, len: usize| {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend(std::iter::repeat_n(0xab, len));
        p
    };
    // A well-formed reply works, so the cases below fail for their own reason.
    let ok = read_against(move |c| chunk(c, 1, T_OFFSET_DATA, &data_at(0, 4096))).await.unwrap();
    assert_eq!(ok, Bytes::from(vec![0xab; 4096]));

    let cases: Vec<(&str, ReplyFn)> = vec![
        ("unknown cookie", Box::new(move |c| chunk(c + 1, 1, T_OFFSET_DATA, &data_at(0, 4096)))),
        ("data past the request", Box::new(move |c| chunk(c, 1, T_OFFSET_DATA, &data_at(4000, 4096)))),
        ("data before the request", Box::new(move |c| chunk(c, 1, T_OFFSET_DATA, &data_at(u64::MAX, 16)))),
        ("short cover", Box::new(move |c| chunk(c, 1, T_OFFSET_DATA, &data_at(0, 100)))),
        ("hole of bad size", Box::new(move |c| chunk(c, 1, T_OFFSET_HOLE, &[0; 8]))),
        ("NONE with payload", Box::new(move |c| chunk(c, 1, T_NONE, &[0; 4]))),
        ("block status", Box::new(move |c| chunk(c, 1, T_BLOCK_STATUS, &[0; 12]))),
        ("error errno 0", Box::new(move |c| chunk(c, 1, T_ERROR, &[0; 6]))),
        ("error message too long", Box::new(move |c| chunk(c, 1, T_ERROR, &[0, 0, 0, 5, 0xff, 0xff]))),
        ("bad magic", Box::new(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0])),
        ("truncated", Box::new(move |c| chunk(c, 1, T_OFFSET_DATA, &data_at(0, 4096))[..100].to_vec())),
        (
            "huge chunk",
            Box::new(move |c| {
                let mut b = chunk(c, 1, T_OFFSET_DATA, &[]);
                b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                b
            }),
        ),
    ];
    for (what, reply) in cases {
        let r = read_against(reply).await;
        assert!(r.is_err(), "{what}: accepted");
    }
    // A server-side error chunk is a request error with its message.
    let e = read_against(|c| {
        let mut p = vec![0, 0, 0, 5, 0, 4];
        p.extend_from_slice(b"boom");
        chunk(c, 1, T_ERROR, &p)
    })
    .await
    .unwrap_err();
    assert_eq!(e.to_string(), "READ failed on the server: EIO (5): boom");
}

#[tokio::test]
async fn random_garbage_after_the_handshake_never_panics_or_hangs() {
    let seed: u64 = std::env::var("BALLAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    eprintln!("seed {seed} (rerun with BALLAST_SEED={seed})");
    for i in 0..200u64 {
        let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let len = (next() % 64) as usize;
        let garbage: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Half the cases start like a real chunk, so the parser gets past the magic.
        let keep = next() % 2 == 0;
        let reply = move |c: u64| {
            if keep {
                let mut b = chunk(c, (garbage.len() % 2) as u16, (garbage.len() % 6) as u16, &[]);
                b[16..20].copy_from_slice(&(garbage.len() as u32).to_be_bytes());
                b.extend_from_slice(&garbage);
                b
            } else {
                garbage.clone()
            }
        };
        // Any result is fine; a panic or a hang (caught by `read_against`) is not.
        let _ = read_against(reply).await;
    }
}

//! The NBD client against a server that sends arbitrary bytes.
//!
//! Input: one byte of client options (bit 0: ask for structured replies), a
//! big-endian u16 `n`, then what the "server" sends: `n` bytes of handshake
//! (greeting, option replies), then transmission replies. The target
//! connects an [`NbdClient`] over an in-memory pipe whose far end sends the
//! handshake bytes, waits until the client has sent everything it will send
//! without an answer (its requests), sends the rest, closes, and swallows
//! whatever else the client writes. (Sending replies before their requests
//! would only test a race no server can cause.) If the handshake succeeds it issues five
//! requests at once (cookies 1 to 5 in this order when all are in range:
//! read 512 at 0, read 4096 at 4096, write 512 at 8192, flush, read 100 at
//! 1000) and disconnects. It asserts that:
//! - nothing panics and nothing hangs: every request completes, with data or
//!   an error, even when replies are missing, duplicated, malformed or for
//!   unknown cookies, and the connection then closes;
//! - a read that succeeds returns exactly the bytes asked for.

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ballast_nbd::client::{ConnectOptions, NbdClient};

use crate::harness::block_on;

/// The reads the target issues, as (offset, length).
/// How long (on the paused clock) the fake server waits for the client to
/// go quiet before sending the replies.
const IDLE: std::time::Duration = std::time::Duration::from_secs(1);

pub const READS: [(u64, u32); 3] = [(0, 512), (4096, 4096), (1000, 100)];

pub fn run(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Some((len, server_bytes)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let (handshake, replies) = server_bytes.split_at(usize::from(u16::from_be_bytes(*len)).min(server_bytes.len()));
    let opts = ConnectOptions { structured_replies: first & 1 != 0, queue_depth: 8 };
    block_on(async {
        let (ours, theirs) = tokio::io::duplex(16 * 1024);
        let (mut rd, mut wr) = tokio::io::split(theirs);
        let serve = async {
            // The client may hang up first: ignore write errors.
            let _ = wr.write_all(handshake).await;
            // The clock is paused, so this times out exactly when every task
            // is blocked: the client waits for answers to what it sent.
            let mut buf = vec![0u8; 4096];
            let mut open = true;
            while open {
                match tokio::time::timeout(IDLE, rd.read(&mut buf)).await {
                    Ok(Ok(n)) => open = n > 0,
                    Ok(Err(_)) => open = false,
                    Err(_) => break,
                }
            }
            let _ = wr.write_all(replies).await;
            let _ = wr.shutdown().await;
            if open {
                let _ = tokio::io::copy(&mut rd, &mut tokio::io::sink()).await;
            }
        };
        let client = async {
            let Ok(client) = NbdClient::from_stream(ours, "", &opts).await else {
                return;
            };
            let read = |(offset, len): (u64, u32)| {
                let client = client.clone();
                async move {
                    if let Ok(b) = client.read(offset, len).await {
                        assert_eq!(b.len(), len as usize, "a read of {len} bytes at {offset} returned {}", b.len());
                    }
                }
            };
            let write = async {
                let _ = client.write(8192, Bytes::from(vec![0x5a; 512]), false).await;
            };
            let flush = async {
                let _ = client.flush().await;
            };
            tokio::join!(read(READS[0]), read(READS[1]), write, flush, read(READS[2]));
            let _ = client.disconnect().await;
        };
        tokio::join!(serve, client);
    });
}

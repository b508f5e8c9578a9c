//! The few pieces of HTTP/1.1 the `/metrics` responder and the Docker
//! plugin socket share: reading a request head and writing a whole reply
//! with `Connection: close` (one request per connection).

use tokio::io::{AsyncRead, AsyncReadExt};

/// Read up to the blank line ending the request head: the head (UTF-8) and
/// the bytes already read past it (the start of a body), or why it cannot
/// be read (longer than `max`, closed early, not UTF-8).
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> std::io::Result<Result<(String, Vec<u8>), &'static str>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > max {
            return Ok(Err("request head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err("connection closed before the request head ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let rest = buf.split_off(end + 4);
    buf.truncate(end);
    match String::from_utf8(buf) {
        Ok(head) => Ok(Ok((head, rest))),
        Err(_) => Ok(Err("request head is not UTF-8")),
    }
}

/// A complete reply: `status` is the status line's code and reason
/// (`200 OK`); `extra` are more header lines.
pub fn reply(status: &str, content_type: &str, body: &str, extra: &[&str]) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for h in extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

//! The transmission phase: requests in, replies out, many in flight.
//!
//! One reader (the caller's task) decodes and validates requests and spawns a
//! task per request; each task calls the device and hands its finished reply
//! to a single writer task that owns the socket's write half. A reply is a
//! list of buffers written back to back, so replies never interleave, and the
//! writer flushes only when its queue is empty, batching small replies into
//! few syscalls. A semaphore permit travels with each request until its reply
//! is written: when `max_in_flight` requests are outstanding the reader stops
//! reading, which pushes back on the client instead of buffering without
//! bound.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, trace, warn};

use crate::device::{BlockDevice, DeviceError, ReadSegment};
use crate::handshake::{discard, read_frame, Negotiated};
use crate::proto::*;
use crate::{NbdError, ServerConfig};

/// Cap on descriptors in one `BLOCK_STATUS` chunk (the spec lets a server
/// answer for a prefix of the range); keeps one reply under 1 MiB.
const MAX_EXTENTS: usize = 128 * 1024;

/// What every request handler needs; shared by all of one connection's tasks.
struct Ctx<D> {
    device: Arc<D>,
    size: u64,
    read_only: bool,
    structured: bool,
    base_allocation: bool,
    max_block: u32,
    /// Payload budget of the connection, in KiB permits.
    bytes: Arc<Semaphore>,
}

/// Permits of the byte budget are KiB: enough resolution, and a 32 MiB
/// request stays far below `Semaphore::MAX_PERMITS`.
const BUDGET_UNIT: u32 = 1024;

/// Reserve budget for a payload of `len` bytes (the read result or write data).
async fn reserve<D>(ctx: &Ctx<D>, len: u32) -> Result<OwnedSemaphorePermit, NbdError> {
    let units = len.div_ceil(BUDGET_UNIT).max(1);
    ctx.bytes
        .clone()
        .acquire_many_owned(units)
        .await
        .map_err(|_| NbdError::Io(std::io::Error::other("semaphore closed")))
}

/// A finished reply on its way to the writer, holding its in-flight permit so
/// the slot frees only once the bytes are in the socket buffer.
struct Outgoing {
    parts: Vec<Bytes>,
    _permit: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// A validated command (write payload read separately).
#[derive(Debug, Clone, Copy)]
enum Command {
    Read { offset: u64, len: u32, df: bool },
    Write { offset: u64, len: u32, fua: bool },
    Disc,
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    Cache { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, may_trim: bool, fast: bool, fua: bool },
    BlockStatus { offset: u64, len: u32, req_one: bool },
}

/// A command ready to run, with its write payload if any.
enum Job {
    Read { offset: u64, len: u32, df: bool },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    Cache { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, may_trim: bool, fast: bool, fua: bool },
    BlockStatus { offset: u64, len: u32, req_one: bool },
}

/// Whether errors for this command type are sent as structured chunks (when
/// structured replies are on): reads and block status must use them.
fn wants_structured(typ: u16) -> bool {
    typ == CMD_READ || typ == CMD_BLOCK_STATUS
}

/// Check a request against the export before anything touches the device.
/// `Err` carries the errno to answer with.
fn validate<D>(ctx: &Ctx<D>, h: &RequestHeader) -> Result<Command, u32> {
    let flags = h.flags;
    if flags & !CMD_KNOWN_FLAGS != 0 {
        return Err(EINVAL);
    }
    let (offset, len) = (h.offset, h.len);
    let fua = flags & CMD_FLAG_FUA != 0;
    if flags & CMD_FLAG_DF != 0 && (h.typ != CMD_READ || !ctx.structured) {
        return Err(EINVAL);
    }
    if flags & CMD_FLAG_REQ_ONE != 0 && h.typ != CMD_BLOCK_STATUS {
        return Err(EINVAL);
    }
    if flags & (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) != 0 && h.typ != CMD_WRITE_ZEROES {
        return Err(EINVAL);
    }
    let is_write = matches!(h.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if is_write && ctx.read_only {
        return Err(EPERM);
    }
    let ranged = matches!(h.typ, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS);
    if ranged {
        if len == 0 {
            return Err(EINVAL);
        }
        if matches!(h.typ, CMD_READ | CMD_WRITE) && len > ctx.max_block {
            return Err(EINVAL);
        }
        let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= ctx.size);
        if !in_range {
            return Err(if matches!(h.typ, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL });
        }
    }
    Ok(match h.typ {
        CMD_READ => Command::Read { offset, len, df: flags & CMD_FLAG_DF != 0 },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_DISC => Command::Disc,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            may_trim: flags & CMD_FLAG_NO_HOLE == 0,
            fast: flags & CMD_FLAG_FAST_ZERO != 0,
            fua,
        },
        CMD_BLOCK_STATUS => {
            if !ctx.structured || !ctx.base_allocation {
                return Err(EINVAL);
            }
            Command::BlockStatus { offset, len, req_one: flags & CMD_FLAG_REQ_ONE != 0 }
        }
        _ => return Err(EINVAL),
    })
}

/// One step of the reader.
enum Incoming {
    /// The peer closed between requests.
    Eof,
    /// `NBD_CMD_DISC`.
    Disc,
    /// A request that failed validation (its payload, if any, was drained).
    Rejected { header: RequestHeader, errno: u32 },
    /// A request to run.
    Job { cookie: u64, job: Job, bytes: Option<OwnedSemaphorePermit> },
}

/// Read a request header; `None` on a clean EOF before its first byte.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<[u8; REQUEST_HEADER_LEN]>, NbdError> {
    let mut buf = [0u8; REQUEST_HEADER_LEN];
    Ok(read_frame(r, &mut buf, "a request header").await?.then_some(buf))
}

/// Read exactly `len` payload bytes into one buffer (`len <= max_block`).
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> Result<Bytes, NbdError> {
    let len = len as usize;
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        let n = r.read_buf(&mut (&mut buf).limit(want)).await?;
        if n == 0 {
            return Err(NbdError::Truncated("a write payload"));
        }
    }
    Ok(buf.freeze())
}

/// Read one request (and its payload) and decide what to do with it.
async fn next_request<D, R: AsyncRead + Unpin>(ctx: &Ctx<D>, r: &mut R) -> Result<Incoming, NbdError> {
    let Some(raw) = read_header(r).await? else {
        return Ok(Incoming::Eof);
    };
    let header = decode_request(&raw).map_err(|magic| NbdError::BadMagic { what: "request", got: u64::from(magic) })?;
    trace!(?header, "NBD request");
    if header.typ == CMD_DISC {
        // DISC has no reply, so even odd flags cannot be refused: leave.
        return Ok(Incoming::Disc);
    }
    let cmd = validate(ctx, &header);
    if header.typ == CMD_WRITE {
        // The payload is on the wire whatever we think of the request.
        match cmd {
            Ok(Command::Write { offset, len, fua }) => {
                let bytes = Some(reserve(ctx, len).await?);
                let data = read_payload(r, len).await?;
                return Ok(Incoming::Job { cookie: header.cookie, job: Job::Write { offset, data, fua }, bytes });
            }
            _ => discard(r, u64::from(header.len), "a write payload").await?,
        }
    }
    let cookie = header.cookie;
    Ok(match cmd {
        Err(errno) => Incoming::Rejected { header, errno },
        Ok(Command::Disc) => Incoming::Disc,
        Ok(Command::Read { offset, len, df }) => {
            let bytes = Some(reserve(ctx, len).await?);
            Incoming::Job { cookie, job: Job::Read { offset, len, df }, bytes }
        }
        // Handled above; unreachable in practice, answered safely if not.
        Ok(Command::Write { .. }) => Incoming::Rejected { header, errno: EINVAL },
        Ok(Command::Flush) => Incoming::Job { cookie, job: Job::Flush, bytes: None },
        Ok(Command::Trim { offset, len, fua }) => {
            Incoming::Job { cookie, job: Job::Trim { offset, len, fua }, bytes: None }
        }
        Ok(Command::Cache { offset, len }) => Incoming::Job { cookie, job: Job::Cache { offset, len }, bytes: None },
        Ok(Command::WriteZeroes { offset, len, may_trim, fast, fua }) => {
            Incoming::Job { cookie, job: Job::WriteZeroes { offset, len, may_trim, fast, fua }, bytes: None }
        }
        Ok(Command::BlockStatus { offset, len, req_one }) => {
            Incoming::Job { cookie, job: Job::BlockStatus { offset, len, req_one }, bytes: None }
        }
    })
}

/// The single writer: writes whole replies, flushes when the queue is empty,
/// and half-closes the socket once every sender is gone.
async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: UnboundedReceiver<Outgoing>) -> Result<(), NbdError> {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next {
            for part in &msg.parts {
                w.write_all(part).await?;
            }
            drop(msg);
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    // Best effort: the peer may already be gone.
    let _ = w.shutdown().await;
    Ok(())
}

/// Run transmission until the client disconnects or breaks the protocol.
pub(crate) async fn run<D, R, W>(neg: Negotiated<D>, config: &ServerConfig, mut r: R, w: W) -> Result<(), NbdError>
where
    D: BlockDevice,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(Ctx {
        device: neg.device,
        size: neg.size,
        read_only: neg.read_only,
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        max_block: config.max_block,
        bytes: Arc::new(Semaphore::new(
            (config.max_in_flight_bytes.max(config.max_block as usize) / BUDGET_UNIT as usize)
                .clamp(1, Semaphore::MAX_PERMITS),
        )),
    });
    let permits = config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
    let sem = Arc::new(Semaphore::new(permits));
    let (tx, rx) = unbounded_channel::<Outgoing>();
    let mut writer = tokio::spawn(write_loop(w, rx));

    // Read until EOF, DISC or an error; the writer failing ends reading too.
    let ended: Result<(), NbdError> = loop {
        let step = async {
            // Acquire first: with the window full, stop reading.
            let permit = sem
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| NbdError::Io(std::io::Error::other("semaphore closed")))?;
            let incoming = next_request(&ctx, &mut r).await?;
            Ok::<_, NbdError>((permit, incoming))
        };
        let (permit, incoming) = tokio::select! {
            biased;
            res = &mut writer => {
                // The writer only stops early when the socket failed.
                return match res {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e),
                    Err(join) => Err(NbdError::Io(std::io::Error::other(join.to_string()))),
                };
            }
            step = step => match step {
                Ok(s) => s,
                Err(e) => break Err(e),
            },
        };
        match incoming {
            Incoming::Eof => break Ok(()),
            Incoming::Disc => {
                debug!("NBD_CMD_DISC received");
                break Ok(());
            }
            Incoming::Rejected { header, errno } => {
                debug!(?header, errno, "NBD request rejected");
                let parts = error_parts(&ctx, header.cookie, header.typ, errno, "invalid request");
                let _ = tx.send(Outgoing { parts, _permit: permit, _bytes: None });
            }
            Incoming::Job { cookie, job, bytes } => {
                let ctx = ctx.clone();
                let tx = tx.clone();
                let start = Instant::now();
                tokio::spawn(async move {
                    let typ = job_type(&job);
                    let covered = job_bytes(&job);
                    let parts = match AssertUnwindSafe(execute(&ctx, cookie, job)).catch_unwind().await {
                        Ok(parts) => parts,
                        Err(_) => {
                            error!(cookie, "NBD request handler panicked");
                            error_parts(&ctx, cookie, typ, EIO, "internal error")
                        }
                    };
                    crate::metrics::finished(typ, covered, start);
                    // The writer is gone only if the connection is closing.
                    let _ = tx.send(Outgoing { parts, _permit: permit, _bytes: bytes });
                });
            }
        }
    };

    match ended {
        Ok(()) => {
            // Let every in-flight request finish and its reply be written: the
            // channel closes once the last handler drops its sender.
            drop(tx);
            match writer.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(join) => Err(NbdError::Io(std::io::Error::other(join.to_string()))),
            }
        }
        Err(e) => {
            // A broken stream: stop now, replies still queued are moot.
            writer.abort();
            Err(e)
        }
    }
}

fn job_type(job: &Job) -> u16 {
    match job {
        Job::Read { .. } => CMD_READ,
        Job::Write { .. } => CMD_WRITE,
        Job::Flush => CMD_FLUSH,
        Job::Trim { .. } => CMD_TRIM,
        Job::Cache { .. } => CMD_CACHE,
        Job::WriteZeroes { .. } => CMD_WRITE_ZEROES,
        Job::BlockStatus { .. } => CMD_BLOCK_STATUS,
    }
}

/// Bytes a job covers, for the byte counters.
fn job_bytes(job: &Job) -> u64 {
    match job {
        Job::Read { len, .. }
        | Job::Trim { len, .. }
        | Job::Cache { len, .. }
        | Job::WriteZeroes { len, .. }
        | Job::BlockStatus { len, .. } => u64::from(*len),
        Job::Write { data, .. } => data.len() as u64,
        Job::Flush => 0,
    }
}

/// The reply for a failed request: a structured `ERROR` chunk for reads and
/// block status when structured replies are on, else a simple reply. Every
/// error reply passes here, so it is where errors are counted.
fn error_parts<D>(ctx: &Ctx<D>, cookie: u64, typ: u16, errno: u32, message: &str) -> Vec<Bytes> {
    crate::metrics::failed(typ);
    if ctx.structured && wants_structured(typ) {
        vec![error_chunk(cookie, errno, message)]
    } else {
        vec![simple_reply(cookie, errno)]
    }
}

fn device_error_parts<D>(ctx: &Ctx<D>, cookie: u64, typ: u16, e: &DeviceError) -> Vec<Bytes> {
    debug!(cookie, typ, error = %e, "NBD device error");
    error_parts(ctx, cookie, typ, errno_for(&e.kind), &e.message)
}

/// Answer for a command that returns only success or an errno.
fn status_parts<D>(ctx: &Ctx<D>, cookie: u64, typ: u16, res: Result<(), DeviceError>) -> Vec<Bytes> {
    match res {
        Ok(()) => vec![simple_reply(cookie, 0)],
        Err(e) => device_error_parts(ctx, cookie, typ, &e),
    }
}

/// Run one job against the device and build its reply.
async fn execute<D: BlockDevice>(ctx: &Ctx<D>, cookie: u64, job: Job) -> Vec<Bytes> {
    let dev = &ctx.device;
    match job {
        Job::Read { offset, len, df } => match dev.read(offset, len).await {
            Ok(segments) => read_reply(ctx, cookie, offset, len, df, segments),
            Err(e) => device_error_parts(ctx, cookie, CMD_READ, &e),
        },
        Job::Write { offset, data, fua } => status_parts(ctx, cookie, CMD_WRITE, dev.write(offset, data, fua).await),
        Job::Flush => status_parts(ctx, cookie, CMD_FLUSH, dev.flush().await),
        Job::Trim { offset, len, fua } => status_parts(ctx, cookie, CMD_TRIM, dev.trim(offset, len, fua).await),
        Job::Cache { offset, len } => status_parts(ctx, cookie, CMD_CACHE, dev.cache(offset, len).await),
        Job::WriteZeroes { offset, len, may_trim, fast, fua } => {
            let res = dev.write_zeroes(offset, len, may_trim, fast, fua).await;
            status_parts(ctx, cookie, CMD_WRITE_ZEROES, res)
        }
        Job::BlockStatus { offset, len, req_one } => match dev.block_status(offset, len).await {
            Ok(extents) => block_status_reply(ctx, cookie, len, req_one, &extents),
            Err(e) => device_error_parts(ctx, cookie, CMD_BLOCK_STATUS, &e),
        },
    }
}

fn segment_len(s: &ReadSegment) -> u64 {
    match s {
        ReadSegment::Data(b) => b.len() as u64,
        ReadSegment::Hole(n) => u64::from(*n),
    }
}

/// Build a read reply from the device's segments (already checked to be
/// `len` bytes long): simple, single `DF` chunk, or data/hole chunks.
fn read_reply<D>(ctx: &Ctx<D>, cookie: u64, offset: u64, len: u32, df: bool, segments: Vec<ReadSegment>) -> Vec<Bytes> {
    let total: u64 = segments.iter().map(segment_len).sum();
    if total != u64::from(len) {
        warn!(cookie, total, len, "device read returned the wrong length");
        let msg = "device returned a short or long read";
        return error_parts(ctx, cookie, CMD_READ, EIO, msg);
    }
    let fill = |parts: &mut Vec<Bytes>, segments: Vec<ReadSegment>| {
        for s in segments {
            match s {
                ReadSegment::Data(b) => parts.push(b),
                ReadSegment::Hole(n) => push_zeros(parts, n),
            }
        }
    };
    if !ctx.structured || df {
        let head =
            if ctx.structured { offset_data_header(cookie, true, offset, len) } else { Some(simple_reply(cookie, 0)) };
        let Some(head) = head else {
            return error_parts(ctx, cookie, CMD_READ, EOVERFLOW, "read too large");
        };
        let mut parts = Vec::with_capacity(1 + segments.len());
        parts.push(head);
        fill(&mut parts, segments);
        return parts;
    }

    // Structured, fragmentable: one chunk per data segment, adjacent holes
    // coalesced into one OFFSET_HOLE chunk. `pos` never exceeds `len`, and
    // `offset + len` was checked against the size, so offsets cannot overflow.
    enum Piece {
        Data(u64, Bytes),
        Hole(u64, u32),
    }
    let mut pieces: Vec<Piece> = Vec::with_capacity(segments.len());
    let mut pos: u64 = 0;
    for s in segments {
        let at = offset.saturating_add(pos);
        pos = pos.saturating_add(segment_len(&s));
        match s {
            ReadSegment::Data(b) if !b.is_empty() => pieces.push(Piece::Data(at, b)),
            ReadSegment::Hole(n) if n > 0 => match pieces.last_mut() {
                Some(Piece::Hole(_, h)) => *h = h.saturating_add(n),
                _ => pieces.push(Piece::Hole(at, n)),
            },
            _ => {}
        }
    }
    let mut parts = Vec::with_capacity(2 * pieces.len() + 1);
    let last = pieces.len().saturating_sub(1);
    for (i, p) in pieces.into_iter().enumerate() {
        let done = i == last;
        match p {
            Piece::Data(at, b) => {
                // b.len() <= len <= u32::MAX (the total was checked).
                let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
                match offset_data_header(cookie, done, at, n) {
                    Some(h) => {
                        parts.push(h);
                        parts.push(b);
                    }
                    None => return error_parts(ctx, cookie, CMD_READ, EOVERFLOW, "chunk too large"),
                }
            }
            Piece::Hole(at, n) => parts.push(offset_hole_chunk(cookie, done, at, n)),
        }
    }
    if parts.is_empty() {
        parts.push(none_chunk(cookie));
    }
    parts
}

/// Build the `BLOCK_STATUS` reply: extents clipped to the requested range,
/// neighbours with equal flags merged, one extent only with `REQ_ONE`.
fn block_status_reply<D>(
    ctx: &Ctx<D>,
    cookie: u64,
    len: u32,
    req_one: bool,
    extents: &[crate::device::Extent],
) -> Vec<Bytes> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut remaining = len;
    for e in extents {
        if remaining == 0 {
            break;
        }
        if e.len == 0 {
            continue;
        }
        let l = e.len.min(remaining);
        remaining -= l;
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        let full = req_one || out.len() >= MAX_EXTENTS;
        match out.last_mut() {
            // The merged length is at most `len`, so it cannot overflow.
            Some((ll, f)) if *f == flags => *ll = ll.saturating_add(l),
            Some(_) if full => break,
            _ => out.push((l, flags)),
        }
    }
    if out.is_empty() {
        warn!(cookie, "device block status returned no extents");
        let msg = "device returned no extents";
        return error_parts(ctx, cookie, CMD_BLOCK_STATUS, EIO, msg);
    }
    vec![block_status_chunk(cookie, true, META_BASE_ALLOCATION_ID, &out)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Extent;

    fn ctx(structured: bool) -> Ctx<()> {
        Ctx {
            device: Arc::new(()),
            size: 1 << 20,
            read_only: false,
            structured,
            base_allocation: true,
            max_block: 1 << 16,
            bytes: Arc::new(Semaphore::new(1024)),
        }
    }

    fn header(flags: u16, typ: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { flags, typ, cookie: 1, offset, len }
    }

    fn concat(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.iter().copied()).collect()
    }

    #[test]
    fn validation_table() {
        let c = ctx(true);
        assert!(matches!(validate(&c, &header(0, CMD_READ, 0, 1)), Ok(Command::Read { .. })));
        assert_eq!(validate(&c, &header(0, CMD_WRITE, (1 << 20) - 1, 2)).err(), Some(ENOSPC));
        assert_eq!(validate(&c, &header(0, CMD_READ, u64::MAX, 1)).err(), Some(EINVAL));
        assert_eq!(validate(&c, &header(CMD_FLAG_DF, CMD_READ, 0, 1)).err(), None);
        assert_eq!(validate(&ctx(false), &header(CMD_FLAG_DF, CMD_READ, 0, 1)).err(), Some(EINVAL));
        assert_eq!(validate(&c, &header(0, CMD_BLOCK_STATUS, 0, 0)).err(), Some(EINVAL));
        assert!(matches!(validate(&c, &header(CMD_FLAG_FUA, CMD_FLUSH, u64::MAX, u32::MAX)), Ok(Command::Flush)));
        let ro = Ctx { read_only: true, ..ctx(true) };
        assert_eq!(validate(&ro, &header(0, CMD_TRIM, 0, 1)).err(), Some(EPERM));
        assert!(validate(&ro, &header(0, CMD_CACHE, 0, 1)).is_ok());
    }

    #[test]
    fn wrong_length_reads_become_eio() {
        for structured in [false, true] {
            let c = ctx(structured);
            let parts = read_reply(&c, 1, 0, 10, false, vec![ReadSegment::Hole(9)]);
            let bytes = concat(&parts);
            if structured {
                assert_eq!(&bytes[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
                assert_eq!(&bytes[20..24], &EIO.to_be_bytes());
            } else {
                assert_eq!(bytes, simple_reply(1, EIO).to_vec());
            }
            let long = vec![ReadSegment::Data(Bytes::from_static(b"ab"))];
            let bytes = concat(&read_reply(&c, 1, 0, 1, false, long));
            if structured {
                assert_eq!(&bytes[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
            } else {
                assert_eq!(bytes, simple_reply(1, EIO).to_vec());
            }
        }
    }

    #[test]
    fn empty_segments_are_skipped_and_holes_merged() {
        let c = ctx(true);
        let segs = vec![
            ReadSegment::Hole(0),
            ReadSegment::Hole(3),
            ReadSegment::Data(Bytes::new()),
            ReadSegment::Hole(4),
            ReadSegment::Data(Bytes::from_static(b"xy")),
        ];
        let parts = read_reply(&c, 1, 100, 9, false, segs);
        // One hole chunk (7 bytes at 100), then one data chunk (2 bytes at 107).
        assert_eq!(parts.len(), 3);
        assert_eq!(&parts[0][6..8], &REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&parts[0][4..6], &0u16.to_be_bytes());
        assert_eq!(&parts[0][20..28], &100u64.to_be_bytes());
        assert_eq!(&parts[0][28..32], &7u32.to_be_bytes());
        assert_eq!(&parts[1][4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&parts[1][20..28], &107u64.to_be_bytes());
        assert_eq!(&parts[2][..], b"xy");
    }

    #[test]
    fn extents_are_clipped_merged_and_never_empty() {
        let c = ctx(true);
        let e = |len, hole| Extent { len, hole, zero: hole };
        let parts = block_status_reply(&c, 1, 100, false, &[e(0, false), e(30, true), e(30, true), e(1000, false)]);
        let b = concat(&parts);
        assert_eq!(&b[16..20], &20u32.to_be_bytes()); // id + two descriptors
        assert_eq!(&b[24..32], &[0, 0, 0, 60, 0, 0, 0, 3]);
        assert_eq!(&b[32..40], &[0, 0, 0, 40, 0, 0, 0, 0]);
        let one = concat(&block_status_reply(&c, 1, 100, true, &[e(30, true), e(30, true), e(50, false)]));
        assert_eq!(&one[16..20], &12u32.to_be_bytes());
        assert_eq!(&one[24..32], &[0, 0, 0, 60, 0, 0, 0, 3]);
        for bad in [vec![], vec![e(0, true)]] {
            let b = concat(&block_status_reply(&c, 1, 100, false, &bad));
            assert_eq!(&b[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        }
    }
}

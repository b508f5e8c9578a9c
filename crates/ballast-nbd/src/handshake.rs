//! The fixed-newstyle handshake: greeting, client flags, option haggling.
//!
//! Negotiation ends in one of three ways: the client picks an export (`GO` or
//! `EXPORT_NAME`) and transmission begins with it, the client aborts (a clean
//! end), or the client breaks the protocol (an [`NbdError`] and a close).
//! Malformed but well-framed options are answered with an error reply and
//! haggling continues, as the spec asks of fixed-newstyle servers.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::device::{BlockDevice, DeviceError, DeviceErrorKind, ExportProvider};
use crate::proto::*;
use crate::{NbdError, ServerConfig};

/// What negotiation settled on; everything transmission needs to know.
pub(crate) struct Negotiated<D> {
    pub device: Arc<D>,
    /// Size captured at the handshake; the spec fixes it for the connection.
    pub size: u64,
    pub read_only: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// `base:allocation` was selected with `SET_META_CONTEXT` for this export.
    pub base_allocation: bool,
}

/// The last successful `SET_META_CONTEXT`: which export it named and whether
/// it selected `base:allocation`. The spec ties the selection to that export.
struct MetaSelection {
    export: String,
    base_allocation: bool,
}

struct State {
    structured: bool,
    meta: Option<MetaSelection>,
}

/// `read_exact` that reports a peer close as [`NbdError::Truncated`].
pub(crate) async fn read_exact_or<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), NbdError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(NbdError::Truncated(what)),
        Err(e) => Err(NbdError::Io(e)),
    }
}

/// Fill `buf` completely, or return `false` if the peer closed cleanly before
/// its first byte (a message boundary); a close mid-message is
/// [`NbdError::Truncated`].
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<bool, NbdError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(NbdError::Truncated(what));
        }
        filled += n;
    }
    Ok(true)
}

/// Read and drop exactly `len` bytes in bounded pieces (never allocating `len`).
pub(crate) async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u64, what: &'static str) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied != len {
        return Err(NbdError::Truncated(what));
    }
    Ok(())
}

/// The transmission flags we advertise for a device.
/// `SEND_DF` only with structured replies: the spec says the server MUST
/// leave it clear otherwise (DF means "one data chunk", a structured notion).
pub(crate) fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if read_only {
        f |= TFLAG_READ_ONLY;
    }
    f
}

/// Run the handshake. `Ok(None)` means the client aborted or left cleanly
/// between messages.
pub(crate) async fn negotiate<P, R, W>(
    provider: &P,
    config: &ServerConfig,
    r: &mut R,
    w: &mut W,
) -> Result<Option<Negotiated<P::Device>>, NbdError>
where
    P: ExportProvider,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBD_MAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    w.write_all(&greeting).await?;
    w.flush().await?;

    let mut cf = [0u8; 4];
    // A peer that leaves at a message boundary (a TCP health probe, a client
    // that skips NBD_OPT_ABORT) ends the connection cleanly, not as a violation.
    if !read_frame(r, &mut cf, "the client flags").await? {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !CLIENT_KNOWN_FLAGS != 0 {
        return Err(NbdError::UnknownClientFlags(client_flags));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;

    let mut st = State { structured: false, meta: None };
    loop {
        let mut hdr = [0u8; 16];
        if !read_frame(r, &mut hdr, "an option header").await? {
            return Ok(None);
        }
        let (magic, rest) = hdr.split_at(8);
        let magic = u64::from_be_bytes(magic.try_into().unwrap_or([0; 8]));
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic { what: "option", got: magic });
        }
        let opt = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        debug!(option = option_name(opt), opt, len, "NBD option");

        if len > MAX_OPTION_DATA {
            // EXPORT_NAME has no error reply, so an oversized one can only close.
            if len > MAX_OPTION_DRAIN || opt == OPT_EXPORT_NAME {
                return Err(NbdError::OptionTooLarge { opt, len });
            }
            discard(r, u64::from(len), "oversized option data").await?;
            send(w, &[error_reply(opt, REP_ERR_TOO_BIG, "option data too large")]).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        read_exact_or(r, &mut data, "option data").await?;

        match opt {
            OPT_EXPORT_NAME => {
                let name = match std::str::from_utf8(&data) {
                    Ok(n) if n.len() <= MAX_STRING => n.to_owned(),
                    _ => return Err(NbdError::BadExportName),
                };
                let device = match provider.open(&name).await {
                    Ok(Some(d)) => d,
                    Ok(None) => return Err(NbdError::UnknownExport(name)),
                    Err(source) => return Err(NbdError::Open { name, source }),
                };
                let neg = finish(&mut st, &name, device);
                let mut b = BytesMut::with_capacity(10 + 124);
                b.put_u64(neg.size);
                b.put_u16(transmission_flags(neg.read_only, neg.structured));
                if !no_zeroes {
                    b.put_bytes(0, 124);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                return Ok(Some(neg));
            }
            OPT_ABORT => {
                // The client may already be gone; an abort is clean either way.
                let _ = send(w, &[option_reply(opt, REP_ACK, &[])]).await;
                return Ok(None);
            }
            OPT_LIST => list(provider, w, &data).await?,
            OPT_STARTTLS => {
                send(w, &[error_reply(opt, REP_ERR_UNSUP, "TLS is not supported")]).await?;
            }
            OPT_INFO | OPT_GO => {
                if let Some(neg) = info(provider, config, &mut st, w, opt, &data).await? {
                    return Ok(Some(neg));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    st.structured = true;
                    send(w, &[option_reply(opt, REP_ACK, &[])]).await?;
                } else {
                    let msg = "NBD_OPT_STRUCTURED_REPLY takes no data";
                    send(w, &[error_reply(opt, REP_ERR_INVALID, msg)]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(provider, &mut st, w, opt, &data).await?;
            }
            OPT_EXTENDED_HEADERS => {
                let msg = "extended headers are not supported";
                send(w, &[error_reply(opt, REP_ERR_UNSUP, msg)]).await?;
            }
            _ => {
                send(w, &[error_reply(opt, REP_ERR_UNSUP, "unsupported option")]).await?;
            }
        }
    }
}

/// Build the transmission state for `name`, keeping the meta-context
/// selection only if it was made for this same export (spec requirement).
fn finish<D: BlockDevice>(st: &mut State, name: &str, device: Arc<D>) -> Negotiated<D> {
    let base_allocation = st.meta.as_ref().is_some_and(|m| m.export == name && m.base_allocation);
    Negotiated {
        size: device.size(),
        read_only: device.read_only(),
        device,
        structured: st.structured,
        base_allocation,
    }
}

/// Write replies and flush them.
async fn send<W: AsyncWrite + Unpin>(w: &mut W, replies: &[Bytes]) -> Result<(), NbdError> {
    for r in replies {
        w.write_all(r).await?;
    }
    w.flush().await?;
    Ok(())
}

/// An error reply; its payload is a human-readable message (spec allows it,
/// and qemu prints it).
fn error_reply(opt: u32, code: u32, message: &str) -> Bytes {
    option_reply(opt, code, truncate_str(message, MAX_STRING).as_bytes())
}

/// The error reply for a provider failure while looking an export up.
fn provider_error_reply(opt: u32, e: &DeviceError, otherwise: u32) -> Bytes {
    let code = match e.kind {
        DeviceErrorKind::Shutdown => REP_ERR_SHUTDOWN,
        DeviceErrorKind::NotPermitted => REP_ERR_POLICY,
        _ => otherwise,
    };
    error_reply(opt, code, &e.to_string())
}

async fn list<P: ExportProvider, W: AsyncWrite + Unpin>(provider: &P, w: &mut W, data: &[u8]) -> Result<(), NbdError> {
    if !data.is_empty() {
        let msg = "NBD_OPT_LIST takes no data";
        return send(w, &[error_reply(OPT_LIST, REP_ERR_INVALID, msg)]).await;
    }
    let exports = match provider.list().await {
        Ok(e) => e,
        Err(e) => return send(w, &[provider_error_reply(OPT_LIST, &e, REP_ERR_PLATFORM)]).await,
    };
    let mut replies = Vec::with_capacity(exports.len() + 1);
    for (name, description) in &exports {
        let name = truncate_str(name, MAX_STRING);
        let description = truncate_str(description, MAX_STRING);
        let mut b = BytesMut::with_capacity(4 + name.len() + description.len());
        b.put_u32(name.len() as u32);
        b.put_slice(name.as_bytes());
        b.put_slice(description.as_bytes());
        replies.push(option_reply(OPT_LIST, REP_SERVER, &b));
    }
    replies.push(option_reply(OPT_LIST, REP_ACK, &[]));
    send(w, &replies).await
}

/// A bounds-checked reader over option data: every getter returns `None`
/// instead of reading past the end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A `u32` length followed by that many bytes of UTF-8, at most `MAX_STRING`.
    fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `INFO`/`GO` data: export name and the info types asked for.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor(data);
    let name = c.string()?.to_owned();
    let n = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n).min(c.0.len() / 2));
    for _ in 0..n {
        requests.push(c.u16()?);
    }
    c.is_empty().then_some((name, requests))
}

/// `LIST_META_CONTEXT`/`SET_META_CONTEXT` data: export name and queries.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor(data);
    let name = c.string()?.to_owned();
    let n = c.u32()?;
    // Each query takes at least 4 bytes, which bounds the loop by the data size.
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string()?.to_owned());
    }
    c.is_empty().then_some((name, queries))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`. Returns the negotiated state after a
/// successful `GO`; `None` to keep haggling.
async fn info<P, W>(
    provider: &P,
    config: &ServerConfig,
    st: &mut State,
    w: &mut W,
    opt: u32,
    data: &[u8],
) -> Result<Option<Negotiated<P::Device>>, NbdError>
where
    P: ExportProvider,
    W: AsyncWrite + Unpin,
{
    let Some((name, requests)) = parse_info_request(data) else {
        let msg = "malformed NBD_OPT_INFO/NBD_OPT_GO data";
        send(w, &[error_reply(opt, REP_ERR_INVALID, msg)]).await?;
        return Ok(None);
    };
    let device = match provider.open(&name).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            let msg = format!("no export named {name:?}");
            send(w, &[error_reply(opt, REP_ERR_UNKNOWN, &msg)]).await?;
            return Ok(None);
        }
        Err(e) => {
            send(w, &[provider_error_reply(opt, &e, REP_ERR_UNKNOWN)]).await?;
            return Ok(None);
        }
    };

    let mut replies = Vec::with_capacity(5);
    let mut export = BytesMut::with_capacity(12);
    export.put_u16(INFO_EXPORT);
    export.put_u64(device.size());
    export.put_u16(transmission_flags(device.read_only(), st.structured));
    replies.push(option_reply(opt, REP_INFO, &export));
    if requests.contains(&INFO_NAME) {
        let mut b = BytesMut::with_capacity(2 + name.len());
        b.put_u16(INFO_NAME);
        b.put_slice(name.as_bytes());
        replies.push(option_reply(opt, REP_INFO, &b));
    }
    if requests.contains(&INFO_DESCRIPTION) {
        if let Some(d) = device.description() {
            let d = truncate_str(&d, MAX_STRING);
            let mut b = BytesMut::with_capacity(2 + d.len());
            b.put_u16(INFO_DESCRIPTION);
            b.put_slice(d.as_bytes());
            replies.push(option_reply(opt, REP_INFO, &b));
        }
    }
    let mut bs = BytesMut::with_capacity(14);
    bs.put_u16(INFO_BLOCK_SIZE);
    bs.put_u32(config.min_block);
    bs.put_u32(config.preferred_block);
    bs.put_u32(config.max_block);
    replies.push(option_reply(opt, REP_INFO, &bs));
    replies.push(option_reply(opt, REP_ACK, &[]));
    send(w, &replies).await?;

    if opt == OPT_GO {
        Ok(Some(finish(st, &name, device)))
    } else {
        Ok(None)
    }
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`. We know one
/// context, `base:allocation`; `base:` matches every context of the namespace.
async fn meta_context<P, W>(provider: &P, st: &mut State, w: &mut W, opt: u32, data: &[u8]) -> Result<(), NbdError>
where
    P: ExportProvider,
    W: AsyncWrite + Unpin,
{
    if opt == OPT_SET_META_CONTEXT && !st.structured {
        let msg = "NBD_OPT_SET_META_CONTEXT needs structured replies first";
        return send(w, &[error_reply(opt, REP_ERR_INVALID, msg)]).await;
    }
    let Some((name, queries)) = parse_meta_request(data) else {
        let msg = "malformed meta context request";
        return send(w, &[error_reply(opt, REP_ERR_INVALID, msg)]).await;
    };
    match provider.open(&name).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            let msg = format!("no export named {name:?}");
            return send(w, &[error_reply(opt, REP_ERR_UNKNOWN, &msg)]).await;
        }
        Err(e) => return send(w, &[provider_error_reply(opt, &e, REP_ERR_UNKNOWN)]).await,
    }
    let matched = if queries.is_empty() {
        // An empty LIST lists everything; an empty SET selects nothing.
        opt == OPT_LIST_META_CONTEXT
    } else {
        queries.iter().any(|q| q == META_BASE_ALLOCATION || q == "base:")
    };
    let mut replies = Vec::with_capacity(2);
    if matched {
        let mut b = BytesMut::with_capacity(4 + META_BASE_ALLOCATION.len());
        b.put_u32(META_BASE_ALLOCATION_ID);
        b.put_slice(META_BASE_ALLOCATION.as_bytes());
        replies.push(option_reply(opt, REP_META_CONTEXT, &b));
    }
    replies.push(option_reply(opt, REP_ACK, &[]));
    if opt == OPT_SET_META_CONTEXT {
        st.meta = Some(MetaSelection { export: name, base_allocation: matched });
    }
    send(w, &replies).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_is_strict() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&3u32.to_be_bytes());
        ok.extend_from_slice(b"vol");
        ok.extend_from_slice(&2u16.to_be_bytes());
        ok.extend_from_slice(&1u16.to_be_bytes());
        ok.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info_request(&ok), Some(("vol".into(), vec![1, 3])));
        // Trailing byte, truncated name, truncated request list, huge length.
        let mut trailing = ok.clone();
        trailing.push(0);
        assert_eq!(parse_info_request(&trailing), None);
        assert_eq!(parse_info_request(&ok[..5]), None);
        assert_eq!(parse_info_request(&ok[..ok.len() - 1]), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);
        assert_eq!(parse_info_request(&[]), None);
    }

    #[test]
    fn meta_request_parsing_is_strict() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&0u32.to_be_bytes());
        ok.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:", "x:y"] {
            ok.extend_from_slice(&(q.len() as u32).to_be_bytes());
            ok.extend_from_slice(q.as_bytes());
        }
        assert_eq!(parse_meta_request(&ok), Some((String::new(), vec!["base:".into(), "x:y".into()])));
        assert_eq!(parse_meta_request(&ok[..ok.len() - 1]), None);
        // A query count far beyond the data does not allocate or loop forever.
        let mut lying = Vec::new();
        lying.extend_from_slice(&0u32.to_be_bytes());
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&lying), None);
        // Invalid UTF-8 in a query.
        let mut bad = Vec::new();
        bad.extend_from_slice(&0u32.to_be_bytes());
        bad.extend_from_slice(&1u32.to_be_bytes());
        bad.extend_from_slice(&1u32.to_be_bytes());
        bad.push(0xff);
        assert_eq!(parse_meta_request(&bad), None);
    }

    #[test]
    fn flags_mark_read_only() {
        assert_eq!(transmission_flags(false, true) & TFLAG_READ_ONLY, 0);
        assert_ne!(transmission_flags(true, true) & TFLAG_READ_ONLY, 0);
        assert_ne!(transmission_flags(false, true) & TFLAG_CAN_MULTI_CONN, 0);
        assert_ne!(transmission_flags(false, true) & TFLAG_SEND_DF, 0);
        assert_eq!(transmission_flags(false, false) & TFLAG_SEND_DF, 0, "DF needs structured replies");
    }
}

//! An asynchronous NBD client: the fixed-newstyle handshake and a pipelined
//! transmission phase, for `ballast bench` and for tests that need to drive
//! any NBD server (ours, qemu-nbd, nbdkit) from Rust.
//!
//! Negotiation asks for structured replies (`NBD_OPT_STRUCTURED_REPLY`) and
//! falls back to simple replies when the server refuses them, then picks the
//! export with `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` on servers too old for
//! `GO`). No TLS, no extended headers, no metadata contexts: the client asks
//! for nothing it does not use.
//!
//! Transmission: an [`NbdClient`] is a cheap handle (clone it for every task
//! that issues requests) onto two tasks per connection, each the one owner of
//! its half of the socket (STYLE #1):
//! - the *writer* takes requests from a queue, gives each a cookie, tells the
//!   reader about it and writes it, batching everything queued into one
//!   socket write;
//! - the *reader* parses replies and completes the request they answer.
//!
//! The writer registers a request with the reader *before* its bytes reach the
//! socket, so a reply can never arrive for a cookie the reader has not been
//! told about: a reply for an unknown cookie is a server bug, not a race.
//!
//! Errors: a [`ClientError::Request`] (the server answered one request with
//! an errno) leaves the connection usable; anything that breaks the stream
//! (I/O, bad magic, a malformed reply) is fatal: every request in flight and
//! every later one fails with that same first error. Nothing the server sends
//! can make the client panic or allocate more than one request's payload.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

use crate::proto::*;

/// The IANA port of NBD, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;
/// Largest payload sent or accepted when the server advertises no block
/// sizes: the spec's default maximum.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Longest option reply we read; the spec caps strings at 4096 bytes and no
/// reply we ask for is bigger.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest structured chunk payload that is not read data (errors, or chunk
/// types we never asked for but must skip).
const MAX_CHUNK_META: u32 = 64 * 1024;
/// Requests the writer folds into one socket write at most.
const MAX_WRITE_BATCH: usize = 64;

// ---- errors ----------------------------------------------------------------

/// Why a connection or a request failed. `Clone` because one fatal error is
/// handed to every request that was in flight on the connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The URI is not `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///EXPORT?socket=PATH`.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: &'static str },
    /// The socket failed (refused, reset, ...).
    #[error("{0}")]
    Io(Arc<std::io::Error>),
    /// The server closed the connection in the middle of something.
    #[error("the server closed the connection during {0}")]
    Closed(&'static str),
    /// A message started with the wrong magic number: not an NBD server, or
    /// the stream is out of step.
    #[error("not an NBD server (bad {what} magic {got:#x})")]
    BadMagic { what: &'static str, got: u64 },
    /// The server speaks only the oldstyle or plain newstyle handshake.
    #[error("the server does not offer the fixed newstyle handshake")]
    NotFixedNewstyle,
    /// `NBD_OPT_GO` (or `EXPORT_NAME`) named an export the server does not have.
    #[error("the server has no export named {0:?}")]
    UnknownExport(String),
    /// The server refused an option we cannot do without.
    #[error("the server refused NBD_OPT_{option}: {} {message}", reply_error_name(*.code))]
    OptionRefused { option: &'static str, code: u32, message: String },
    /// The server broke the protocol in a way that ends the connection.
    #[error("the server broke the NBD protocol: {0}")]
    Protocol(String),
    /// The server answered this request with an error; the connection is fine.
    #[error("{command} failed on the server: {} ({errno}){}", errno_name(*.errno), message_suffix(.message))]
    Request { command: &'static str, errno: u32, message: String },
    /// The request was refused before it was sent (range, size, flags the
    /// export does not support).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The connection was shut down (by [`NbdClient::disconnect`] or after an
    /// earlier failure whose cause is gone).
    #[error("the connection is closed")]
    Disconnected,
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ClientError::Closed("a message")
        } else {
            ClientError::Io(Arc::new(e))
        }
    }
}

/// Whether reading failed because the peer closed: report *what* was cut.
fn closed_during(what: &'static str) -> impl FnOnce(std::io::Error) -> ClientError {
    move |e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ClientError::Closed(what)
        } else {
            ClientError::Io(Arc::new(e))
        }
    }
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// The symbolic name of an errno the spec allows on the wire.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown errno",
    }
}

fn reply_error_name(code: u32) -> &'static str {
    match code {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "error",
    }
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

// ---- URIs ----------------------------------------------------------------------

/// Where an export is: the subset of the NBD URI standard that names a plain
/// TCP or unix-socket export (no TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    pub export: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp { host: String, port: u16 },
    Unix(std::path::PathBuf),
}

impl FromStr for NbdUri {
    type Err = ClientError;

    fn from_str(uri: &str) -> Result<Self, ClientError> {
        let bad = |reason| ClientError::InvalidUri { uri: uri.to_string(), reason };
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            if path.contains('?') || authority.contains('?') {
                return Err(bad("query parameters are only for nbd+unix"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                // [v6]:port or [v6]
                let (h, after) = v6.split_once(']').ok_or_else(|| bad("unterminated [IPv6] host"))?;
                match after {
                    "" => (h, None),
                    p => (h, Some(p.strip_prefix(':').ok_or_else(|| bad("expected :PORT after ]"))?)),
                }
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(bad("no host (expected nbd://HOST[:PORT]/EXPORT)"));
            }
            let port = match port {
                None => DEFAULT_PORT,
                Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("the port is not 1-65535"))?,
            };
            let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
            Ok(NbdUri { address: NbdAddress::Tcp { host: host.to_string(), port }, export })
        } else if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let rest = rest.strip_prefix('/').ok_or_else(|| bad("expected nbd+unix:///EXPORT?socket=PATH"))?;
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("no ?socket=PATH"))?;
            let socket = percent_decode(socket).ok_or_else(|| bad("bad %-escape in the socket path"))?;
            let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
            Ok(NbdUri { address: NbdAddress::Unix(socket.into()), export })
        } else {
            Err(bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"))
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            NbdAddress::Tcp { host, port } if host.contains(':') => write!(f, "nbd://[{host}]:{port}/{}", self.export),
            NbdAddress::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            NbdAddress::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

/// `%XX` escapes to bytes; `None` on a malformed escape or a name that is
/// not UTF-8 (export names are UTF-8 on the wire).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---- pure codec (client side) ----------------------------------------------------

/// A request header as the client puts it on the wire.
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.typ.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.len.to_be_bytes());
    b
}

/// A decoded simple reply header (read data, if any, follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// Decode a 16-byte simple reply header; `Err(magic)` if it is not one.
pub fn decode_simple_reply(buf: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, u32> {
    let magic = be_u32(&buf[0..4]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(magic);
    }
    Ok(SimpleReply { error: be_u32(&buf[4..8]), cookie: be_u64(&buf[8..16]) })
}

/// A decoded structured reply chunk header (`len` payload bytes follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Decode a 20-byte structured chunk header; `Err(magic)` if it is not one.
pub fn decode_chunk_header(buf: &[u8; CHUNK_HEADER_LEN]) -> Result<ChunkHeader, u32> {
    let magic = be_u32(&buf[0..4]);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(magic);
    }
    Ok(ChunkHeader {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        typ: u16::from_be_bytes([buf[6], buf[7]]),
        cookie: be_u64(&buf[8..16]),
        len: be_u32(&buf[16..20]),
    })
}

// Callers pass slices of exactly the right length (fixed-size arrays above).
fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

// ---- handshake -------------------------------------------------------------------

/// What to negotiate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Ask for structured replies (and use simple ones if refused).
    pub structured_replies: bool,
    /// Requests queued for the writer before callers wait for room.
    pub queue_depth: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { structured_replies: true, queue_depth: 256 }
    }
}

/// Block size constraints the server advertised (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// What the handshake settled on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub export: String,
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Structured replies are in use (the server acknowledged the option).
    pub structured_replies: bool,
    pub block_sizes: Option<BlockSizes>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    pub fn can_flush(&self) -> bool {
        self.flags & TFLAG_SEND_FLUSH != 0
    }
    pub fn can_fua(&self) -> bool {
        self.flags & TFLAG_SEND_FUA != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flags & TFLAG_CAN_MULTI_CONN != 0
    }
    /// Largest read or write payload the server accepts.
    pub fn max_payload(&self) -> u32 {
        self.block_sizes.map_or(DEFAULT_MAX_PAYLOAD, |b| b.maximum.min(DEFAULT_MAX_PAYLOAD))
    }
}

/// One option reply: type and payload.
struct OptReply {
    typ: u32,
    data: Vec<u8>,
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, data: &[u8]) -> Result<(), ClientError> {
    let len = u32::try_from(data.len()).map_err(|_| ClientError::Invalid("option data over 4 GiB".into()))?;
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await?;
    Ok(())
}

async fn read_option_reply<R: AsyncRead + Unpin>(r: &mut R, opt: u32) -> Result<OptReply, ClientError> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h).await.map_err(closed_during("an option reply"))?;
    let magic = be_u64(&h[0..8]);
    if magic != OPT_REPLY_MAGIC {
        return Err(ClientError::BadMagic { what: "option reply", got: magic });
    }
    let echoed = be_u32(&h[8..12]);
    if echoed != opt {
        return Err(ClientError::Protocol(format!(
            "reply to option {} while {} was pending",
            option_name(echoed),
            option_name(opt)
        )));
    }
    let typ = be_u32(&h[12..16]);
    let len = be_u32(&h[16..20]);
    if len > MAX_OPTION_REPLY {
        return Err(ClientError::Protocol(format!("option reply of {len} bytes (at most {MAX_OPTION_REPLY})")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await.map_err(closed_during("an option reply"))?;
    Ok(OptReply { typ, data })
}

fn is_error_reply(typ: u32) -> bool {
    typ & (1 << 31) != 0
}

/// The text an error reply carries (optional, UTF-8 by the spec, trusted for nothing).
fn reply_message(data: &[u8]) -> String {
    truncate_str(&String::from_utf8_lossy(data), MAX_STRING).to_string()
}

/// Run the fixed-newstyle handshake on `stream` up to transmission.
pub async fn handshake<S>(stream: &mut S, export: &str, opts: &ConnectOptions) -> Result<ExportInfo, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if export.len() > MAX_STRING {
        return Err(ClientError::Invalid(format!("export name of {} bytes (at most {MAX_STRING})", export.len())));
    }
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await.map_err(closed_during("the greeting"))?;
    let magic = be_u64(&greeting[0..8]);
    if magic != NBD_MAGIC {
        return Err(ClientError::BadMagic { what: "greeting", got: magic });
    }
    if be_u64(&greeting[8..16]) != IHAVEOPT {
        // Oldstyle servers send a size here instead.
        return Err(ClientError::NotFixedNewstyle);
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    stream.write_all(&client_flags.to_be_bytes()).await?;

    let mut structured = false;
    if opts.structured_replies {
        send_option(stream, OPT_STRUCTURED_REPLY, &[]).await?;
        let reply = read_option_reply(stream, OPT_STRUCTURED_REPLY).await?;
        match reply.typ {
            REP_ACK => structured = true,
            // Any refusal: simple replies work everywhere.
            t if is_error_reply(t) => {}
            t => return Err(ClientError::Protocol(format!("reply type {t} to NBD_OPT_STRUCTURED_REPLY"))),
        }
    }

    // GO: export name, and one information request (block sizes), so the
    // client learns the server's maximum payload.
    let mut go = Vec::with_capacity(8 + export.len());
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(stream, OPT_GO, &go).await?;
    let mut size_flags = None;
    let mut block_sizes = None;
    loop {
        let reply = read_option_reply(stream, OPT_GO).await?;
        match reply.typ {
            REP_INFO => match parse_info(&reply.data)? {
                Info::Export { size, flags } => size_flags = Some((size, flags)),
                Info::BlockSizes(b) => block_sizes = Some(b),
                Info::Other => {}
            },
            REP_ACK => break,
            REP_ERR_UNKNOWN => return Err(ClientError::UnknownExport(export.to_string())),
            REP_ERR_UNSUP => {
                // A server older than GO: EXPORT_NAME has no error reply (it closes).
                return export_name(stream, export, no_zeroes, structured).await;
            }
            t if is_error_reply(t) => {
                return Err(ClientError::OptionRefused { option: "GO", code: t, message: reply_message(&reply.data) })
            }
            t => return Err(ClientError::Protocol(format!("reply type {t} to NBD_OPT_GO"))),
        }
    }
    let (size, flags) =
        size_flags.ok_or_else(|| ClientError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into()))?;
    Ok(ExportInfo { export: export.to_string(), size, flags, structured_replies: structured, block_sizes })
}

enum Info {
    Export { size: u64, flags: u16 },
    BlockSizes(BlockSizes),
    Other,
}

fn parse_info(data: &[u8]) -> Result<Info, ClientError> {
    let short = || ClientError::Protocol(format!("NBD_REP_INFO of {} bytes is too short", data.len()));
    let typ = u16::from_be_bytes([*data.first().ok_or_else(short)?, *data.get(1).ok_or_else(short)?]);
    match typ {
        INFO_EXPORT => {
            if data.len() != 12 {
                return Err(ClientError::Protocol(format!("NBD_INFO_EXPORT of {} bytes (12 expected)", data.len())));
            }
            Ok(Info::Export { size: be_u64(&data[2..10]), flags: u16::from_be_bytes([data[10], data[11]]) })
        }
        INFO_BLOCK_SIZE => {
            if data.len() != 14 {
                return Err(ClientError::Protocol(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes (14 expected)",
                    data.len()
                )));
            }
            let b = BlockSizes {
                minimum: be_u32(&data[2..6]),
                preferred: be_u32(&data[6..10]),
                maximum: be_u32(&data[10..14]),
            };
            if b.minimum == 0 || b.maximum < b.minimum {
                return Err(ClientError::Protocol(format!("nonsensical block sizes {b:?}")));
            }
            Ok(Info::BlockSizes(b))
        }
        _ => Ok(Info::Other),
    }
}

/// The pre-`GO` way to pick an export: the server answers with size and
/// flags, or closes the connection if it has no such export.
async fn export_name<S>(
    stream: &mut S,
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> Result<ExportInfo, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(stream, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let mut b = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { b.len() };
    stream.read_exact(&mut b[..n]).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ClientError::UnknownExport(export.to_string())
        } else {
            ClientError::from(e)
        }
    })?;
    Ok(ExportInfo {
        export: export.to_string(),
        size: be_u64(&b[0..8]),
        flags: u16::from_be_bytes([b[8], b[9]]),
        structured_replies: structured,
        block_sizes: None,
    })
}

// ---- transmission -----------------------------------------------------------------

type Reply = oneshot::Sender<Result<Bytes, ClientError>>;

/// A request on its way to the writer.
enum Submit {
    Request { header: RequestHeader, payload: Option<Bytes>, reply: Reply },
    Disconnect { done: oneshot::Sender<Result<(), ClientError>> },
}

/// What the writer tells the reader before the bytes go out.
enum Registration {
    Request { cookie: u64, pending: Pending },
    Disconnect { done: oneshot::Sender<Result<(), ClientError>> },
}

/// A request waiting for its reply, owned by the reader.
struct Pending {
    cmd: u16,
    offset: u64,
    len: u32,
    /// Read data being assembled (zeroed: holes need no bytes).
    buf: Option<BytesMut>,
    /// Bytes of the read range covered by data and hole chunks so far.
    covered: u64,
    /// The first error chunk.
    error: Option<(u32, String)>,
    reply: Reply,
}

impl Pending {
    fn finish(self) {
        let result = match self.error {
            Some((errno, message)) => Err(ClientError::Request { command: command_name(self.cmd), errno, message }),
            None if self.cmd == CMD_READ && self.covered != u64::from(self.len) => Err(ClientError::Protocol(format!(
                "structured read reply covered {} of {} bytes",
                self.covered, self.len
            ))),
            None => Ok(self.buf.map(BytesMut::freeze).unwrap_or_default()),
        };
        // The caller may have given up waiting; nothing to do then.
        let _ = self.reply.send(result);
    }
}

/// A connection to one export; clone it to issue requests from many tasks.
/// The connection closes when the last handle is dropped or on
/// [`NbdClient::disconnect`].
#[derive(Clone)]
pub struct NbdClient {
    tx: mpsc::Sender<Submit>,
    info: Arc<ExportInfo>,
    /// The first fatal error, for requests that find the connection gone.
    fatal: Arc<OnceLock<ClientError>>,
}

impl NbdClient {
    /// Connect to `uri` and negotiate its export.
    pub async fn connect(uri: &NbdUri, opts: &ConnectOptions) -> Result<Self, ClientError> {
        match &uri.address {
            NbdAddress::Tcp { host, port } => {
                let mut s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                // Small requests must not wait for Nagle: latency is what we measure.
                s.set_nodelay(true)?;
                let info = handshake(&mut s, &uri.export, opts).await?;
                let (r, w) = s.into_split();
                Ok(Self::start(r, w, info, opts))
            }
            NbdAddress::Unix(path) => {
                let mut s = tokio::net::UnixStream::connect(path).await?;
                let info = handshake(&mut s, &uri.export, opts).await?;
                let (r, w) = s.into_split();
                Ok(Self::start(r, w, info, opts))
            }
        }
    }

    /// Negotiate `export` over an already connected stream (a pipe in tests).
    pub async fn from_stream<S>(mut stream: S, export: &str, opts: &ConnectOptions) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let info = handshake(&mut stream, export, opts).await?;
        let (r, w) = tokio::io::split(stream);
        Ok(Self::start(r, w, info, opts))
    }

    fn start<R, W>(r: R, w: W, info: ExportInfo, opts: &ConnectOptions) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(opts.queue_depth.max(1));
        let (reg_tx, reg_rx) = mpsc::unbounded_channel();
        let fatal = Arc::new(OnceLock::new());
        let info = Arc::new(info);
        let reader = tokio::spawn(read_loop(
            BufReader::with_capacity(256 << 10, r),
            reg_rx,
            fatal.clone(),
            info.structured_replies,
        ));
        tokio::spawn(write_loop(
            BufWriter::with_capacity(256 << 10, w),
            rx,
            reg_tx,
            fatal.clone(),
            reader.abort_handle(),
        ));
        Self { tx, info, fatal }
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Read `len` bytes at `offset` (holes read as zeros).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        self.check_range(offset, len)?;
        self.request(RequestHeader { flags: 0, typ: CMD_READ, cookie: 0, offset, len }, None).await
    }

    /// Write `data` at `offset`; with `fua`, durable when this returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        if self.info.read_only() {
            return Err(ClientError::Invalid(format!("export {:?} is read-only", self.info.export)));
        }
        if fua && !self.info.can_fua() {
            return Err(ClientError::Invalid("the server does not support FUA".into()));
        }
        let len = u32::try_from(data.len()).map_err(|_| ClientError::Invalid("write of 4 GiB or more".into()))?;
        self.check_range(offset, len)?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(RequestHeader { flags, typ: CMD_WRITE, cookie: 0, offset, len }, Some(data)).await.map(drop)
    }

    /// Make every completed write durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.info.can_flush() {
            return Err(ClientError::Invalid("the server does not support FLUSH".into()));
        }
        self.request(RequestHeader { flags: 0, typ: CMD_FLUSH, cookie: 0, offset: 0, len: 0 }, None).await.map(drop)
    }

    /// Send `NBD_CMD_DISC` and wait until the server has answered every
    /// request in flight and closed the connection.
    pub async fn disconnect(self) -> Result<(), ClientError> {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Submit::Disconnect { done }).await.is_err() {
            return Err(self.gone());
        }
        rx.await.unwrap_or_else(|_| Err(self.gone()))
    }

    fn check_range(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        if len == 0 {
            return Err(ClientError::Invalid("zero-length request".into()));
        }
        if len > self.info.max_payload() {
            return Err(ClientError::Invalid(format!(
                "request of {len} bytes, over the server's maximum of {}",
                self.info.max_payload()
            )));
        }
        if offset.checked_add(u64::from(len)).is_none_or(|end| end > self.info.size) {
            return Err(ClientError::Invalid(format!(
                "{len} bytes at offset {offset} end past the export's {} bytes",
                self.info.size
            )));
        }
        Ok(())
    }

    async fn request(&self, header: RequestHeader, payload: Option<Bytes>) -> Result<Bytes, ClientError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Submit::Request { header, payload, reply }).await.is_err() {
            return Err(self.gone());
        }
        rx.await.unwrap_or_else(|_| Err(self.gone()))
    }

    /// The error for a request that found the connection's tasks gone.
    fn gone(&self) -> ClientError {
        self.fatal.get().cloned().unwrap_or(ClientError::Disconnected)
    }
}

/// The writer: one owner of the socket's write half.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Submit>,
    reg: mpsc::UnboundedSender<Registration>,
    fatal: Arc<OnceLock<ClientError>>,
    reader: tokio::task::AbortHandle,
) {
    let mut next_cookie: u64 = 1;
    let result: Result<(), ClientError> = async {
        loop {
            // All handles dropped: leave politely, as after disconnect().
            let first = rx.recv().await.unwrap_or(Submit::Disconnect { done: oneshot::channel().0 });
            let mut batch = vec![first];
            while batch.len() < MAX_WRITE_BATCH {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            let mut disconnecting = false;
            for submit in batch {
                match submit {
                    Submit::Request { mut header, payload, reply } => {
                        header.cookie = next_cookie;
                        next_cookie = next_cookie.wrapping_add(1);
                        let pending = Pending {
                            cmd: header.typ,
                            offset: header.offset,
                            len: header.len,
                            buf: (header.typ == CMD_READ).then(|| BytesMut::zeroed(header.len as usize)),
                            covered: 0,
                            error: None,
                            reply,
                        };
                        if let Err(mpsc::error::SendError(r)) =
                            reg.send(Registration::Request { cookie: header.cookie, pending })
                        {
                            // The reader has ended: its error is in `fatal`.
                            if let Registration::Request { pending, .. } = r {
                                let _ =
                                    pending.reply.send(Err(fatal.get().cloned().unwrap_or(ClientError::Disconnected)));
                            }
                            return Ok(());
                        }
                        w.write_all(&encode_request(&header)).await?;
                        if let Some(p) = payload {
                            w.write_all(&p).await?;
                        }
                    }
                    Submit::Disconnect { done } => {
                        if reg.send(Registration::Disconnect { done }).is_ok() {
                            let header = RequestHeader { flags: 0, typ: CMD_DISC, cookie: 0, offset: 0, len: 0 };
                            w.write_all(&encode_request(&header)).await?;
                        }
                        disconnecting = true;
                        break;
                    }
                }
            }
            w.flush().await?;
            if disconnecting {
                // Requests queued behind the disconnect are dropped: their
                // callers see `Disconnected`.
                w.shutdown().await?;
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = fatal.set(e);
        // The stream is broken both ways: stop the reader, which drops every
        // pending request, whose callers then find `fatal`.
        reader.abort();
    }
}

/// The reader: one owner of the socket's read half and of every request in flight.
async fn read_loop<R: AsyncRead + Unpin>(
    mut r: BufReader<R>,
    mut reg: mpsc::UnboundedReceiver<Registration>,
    fatal: Arc<OnceLock<ClientError>>,
    structured: bool,
) {
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut disconnect: Option<oneshot::Sender<Result<(), ClientError>>> = None;
    let result = read_replies(&mut r, &mut reg, &mut pending, &mut disconnect, structured).await;
    // Whatever was registered but never answered fails with the cause.
    while let Ok(r) = reg.try_recv() {
        match r {
            Registration::Request { cookie, pending: p } => {
                pending.insert(cookie, p);
            }
            Registration::Disconnect { done } => disconnect = Some(done),
        }
    }
    let error = match result {
        Ok(()) if pending.is_empty() && disconnect.is_some() => None,
        // Closed without being asked to: later requests must not just vanish.
        Ok(()) => Some(ClientError::Closed("transmission")),
        Err(e) => Some(e),
    };
    if let Some(e) = &error {
        let _ = fatal.set(e.clone());
        for (_, p) in pending.drain() {
            let _ = p.reply.send(Err(e.clone()));
        }
    }
    if let Some(done) = disconnect {
        let _ = done.send(error.map_or(Ok(()), Err));
    }
}

/// Find the request `cookie` answers, taking registrations as needed.
fn lookup<'a>(
    pending: &'a mut HashMap<u64, Pending>,
    reg: &mut mpsc::UnboundedReceiver<Registration>,
    disconnect: &mut Option<oneshot::Sender<Result<(), ClientError>>>,
    cookie: u64,
) -> Result<&'a mut Pending, ClientError> {
    while !pending.contains_key(&cookie) {
        match reg.try_recv() {
            Ok(Registration::Request { cookie: c, pending: p }) => {
                pending.insert(c, p);
            }
            Ok(Registration::Disconnect { done }) => *disconnect = Some(done),
            Err(_) => return Err(ClientError::Protocol(format!("reply for unknown cookie {cookie:#x}"))),
        }
    }
    pending.get_mut(&cookie).ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie:#x}")))
}

/// Parse replies until the server closes between messages (`Ok`) or the
/// stream breaks (`Err`).
async fn read_replies<R: AsyncRead + Unpin>(
    r: &mut R,
    reg: &mut mpsc::UnboundedReceiver<Registration>,
    pending: &mut HashMap<u64, Pending>,
    disconnect: &mut Option<oneshot::Sender<Result<(), ClientError>>>,
    structured: bool,
) -> Result<(), ClientError> {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    loop {
        // A close here, between replies, is the normal end after DISC.
        if !read_or_eof(r, &mut h[..4]).await? {
            return Ok(());
        }
        match be_u32(&h[..4]) {
            SIMPLE_REPLY_MAGIC => {
                r.read_exact(&mut h[4..SIMPLE_REPLY_LEN]).await.map_err(closed_during("a reply header"))?;
                let mut s = [0u8; SIMPLE_REPLY_LEN];
                s.copy_from_slice(&h[..SIMPLE_REPLY_LEN]);
                let reply =
                    decode_simple_reply(&s).map_err(|m| ClientError::BadMagic { what: "reply", got: m.into() })?;
                let p = lookup(pending, reg, disconnect, reply.cookie)?;
                if reply.error != 0 {
                    p.error = Some((reply.error, String::new()));
                } else if let Some(buf) = p.buf.as_mut() {
                    // A simple reply to a read carries all of it (or, on error, nothing).
                    r.read_exact(buf).await.map_err(closed_during("read data"))?;
                    p.covered = u64::from(p.len);
                }
                if let Some(p) = pending.remove(&reply.cookie) {
                    p.finish();
                }
            }
            STRUCTURED_REPLY_MAGIC if structured => {
                r.read_exact(&mut h[4..]).await.map_err(closed_during("a reply chunk header"))?;
                let chunk =
                    decode_chunk_header(&h).map_err(|m| ClientError::BadMagic { what: "reply", got: m.into() })?;
                let p = lookup(pending, reg, disconnect, chunk.cookie)?;
                read_chunk(r, p, &chunk).await?;
                if chunk.done() {
                    if let Some(p) = pending.remove(&chunk.cookie) {
                        p.finish();
                    }
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                return Err(ClientError::Protocol("structured reply without NBD_OPT_STRUCTURED_REPLY".into()))
            }
            m => return Err(ClientError::BadMagic { what: "reply", got: m.into() }),
        }
    }
}

/// Fill `buf`, or `Ok(false)` if the peer closed before its first byte.
async fn read_or_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<bool, ClientError> {
    let n = r.read(buf).await?;
    if n == 0 {
        return Ok(false);
    }
    r.read_exact(&mut buf[n..]).await.map_err(closed_during("a reply header"))?;
    Ok(true)
}

/// Consume one structured chunk's payload into its request.
async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R, p: &mut Pending, chunk: &ChunkHeader) -> Result<(), ClientError> {
    let bad = |what: String| Err(ClientError::Protocol(format!("{what} (cookie {:#x})", chunk.cookie)));
    match chunk.typ {
        REPLY_TYPE_NONE => {
            if chunk.len != 0 {
                return bad(format!("NONE chunk of {} bytes", chunk.len));
            }
            if !chunk.done() {
                return bad("NONE chunk without the DONE flag".into());
            }
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
            let Some(buf) = p.buf.as_mut() else {
                return bad(format!("data chunk in reply to {}", command_name(p.cmd)));
            };
            if chunk.typ == REPLY_TYPE_OFFSET_HOLE && chunk.len != 12 {
                return bad(format!("OFFSET_HOLE chunk of {} bytes", chunk.len));
            }
            if chunk.len < 8 {
                return bad(format!("OFFSET_DATA chunk of {} bytes", chunk.len));
            }
            let mut a = [0u8; 8];
            r.read_exact(&mut a).await.map_err(closed_during("a reply chunk"))?;
            let offset = u64::from_be_bytes(a);
            let len = if chunk.typ == REPLY_TYPE_OFFSET_HOLE {
                let mut l = [0u8; 4];
                r.read_exact(&mut l).await.map_err(closed_during("a reply chunk"))?;
                u32::from_be_bytes(l)
            } else {
                chunk.len - 8
            };
            // The chunk must lie inside the request; check before touching the buffer.
            let start = offset
                .checked_sub(p.offset)
                .filter(|s| s.checked_add(u64::from(len)).is_some_and(|end| end <= u64::from(p.len)));
            let Some(start) = start.filter(|_| len > 0) else {
                return bad(format!("chunk [{offset}, +{len}) outside the read [{}, +{})", p.offset, p.len));
            };
            // start + len <= p.len <= u32::MAX, so these fit in usize.
            let range = start as usize..start as usize + len as usize;
            if chunk.typ == REPLY_TYPE_OFFSET_DATA {
                r.read_exact(&mut buf[range]).await.map_err(closed_during("read data"))?;
            }
            // Holes: the buffer is already zeros.
            p.covered += u64::from(len);
        }
        t if t & (1 << 15) != 0 => {
            // An error chunk (ERROR, ERROR_OFFSET, or one the spec adds later).
            if chunk.len < 6 || chunk.len > MAX_CHUNK_META {
                return bad(format!("error chunk of {} bytes", chunk.len));
            }
            let mut data = vec![0u8; chunk.len as usize];
            r.read_exact(&mut data).await.map_err(closed_during("an error chunk"))?;
            let errno = be_u32(&data[0..4]);
            let msg_len = usize::from(u16::from_be_bytes([data[4], data[5]]));
            let Some(msg) = data.get(6..6 + msg_len) else {
                return bad(format!("error message of {msg_len} bytes in a chunk of {}", chunk.len));
            };
            if errno == 0 {
                return bad("error chunk with errno 0".into());
            }
            if p.error.is_none() {
                p.error = Some((errno, reply_message(msg)));
            }
        }
        // BLOCK_STATUS (we select no context) or a type we do not know.
        t => return bad(format!("unexpected chunk type {t}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print() {
        let u: NbdUri = "nbd://127.0.0.1:10909/demo".parse().unwrap();
        assert_eq!(u.address, NbdAddress::Tcp { host: "127.0.0.1".into(), port: 10909 });
        assert_eq!(u.export, "demo");
        assert_eq!(u.to_string(), "nbd://127.0.0.1:10909/demo");
        let u: NbdUri = "nbd://host".parse().unwrap();
        assert_eq!(u.address, NbdAddress::Tcp { host: "host".into(), port: DEFAULT_PORT });
        assert_eq!(u.export, "");
        let u: NbdUri = "nbd://[::1]:99/a%20b".parse().unwrap();
        assert_eq!(u.address, NbdAddress::Tcp { host: "::1".into(), port: 99 });
        assert_eq!(u.export, "a b");
        assert_eq!(u.to_string(), "nbd://[::1]:99/a b");
        let u: NbdUri = "nbd+unix:///disk?socket=/run/x.sock".parse().unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/x.sock".into()));
        assert_eq!(u.export, "disk");
        for bad in [
            "",
            "http://h/x",
            "nbd://",
            "nbd://:10809/x",
            "nbd://h:0/x",
            "nbd://h:99999/x",
            "nbd://h:port/x",
            "nbd://[::1/x",
            "nbd://h/x%zz",
            "nbd://h/x?tls=1",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
        ] {
            let e = bad.parse::<NbdUri>().unwrap_err();
            assert!(matches!(e, ClientError::InvalidUri { .. }), "{bad}: {e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn request_and_reply_codecs_round_trip() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 0xdead_beef_0000_0001,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(decode_request(&encode_request(&h)), Ok(h));

        let simple = simple_reply(7, EIO);
        let arr: [u8; SIMPLE_REPLY_LEN] = simple[..].try_into().unwrap();
        assert_eq!(decode_simple_reply(&arr), Ok(SimpleReply { error: EIO, cookie: 7 }));
        let mut bad = arr;
        bad[0] = 0;
        assert!(decode_simple_reply(&bad).is_err());

        let hdr = offset_data_header(9, true, 4096, 512).unwrap();
        let arr: [u8; CHUNK_HEADER_LEN] = hdr[..CHUNK_HEADER_LEN].try_into().unwrap();
        let c = decode_chunk_header(&arr).unwrap();
        assert_eq!(c, ChunkHeader { flags: REPLY_FLAG_DONE, typ: REPLY_TYPE_OFFSET_DATA, cookie: 9, len: 520 });
        assert!(c.done());
        assert!(decode_chunk_header(&[0; CHUNK_HEADER_LEN]).is_err());
    }

    #[test]
    fn error_messages_are_one_readable_line() {
        let e = ClientError::Request { command: "WRITE", errno: EIO, message: "disk on fire".into() };
        assert_eq!(e.to_string(), "WRITE failed on the server: EIO (5): disk on fire");
        let e = ClientError::OptionRefused { option: "GO", code: REP_ERR_POLICY, message: "no".into() };
        assert_eq!(e.to_string(), "the server refused NBD_OPT_GO: NBD_REP_ERR_POLICY no");
    }
}

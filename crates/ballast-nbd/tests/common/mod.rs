//! Test support: an in-memory device with an allocation bitmap, a provider
//! over it, and a tiny hand-written NBD client speaking raw bytes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_nbd::{
    BlockDevice, DeviceError, DeviceErrorKind, ExportProvider, Extent, NbdError, NbdServer, ReadSegment, ServerConfig,
};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

/// Any [`MemDevice`] call at this offset panics (to test the server survives).
pub const PANIC_OFFSET: u64 = 12345;

/// Allocation granularity of [`MemDevice`].
pub const BLOCK: u64 = 4096;

/// An in-memory block device: bytes plus a per-4 KiB-block allocation bitmap
/// so reads can return holes and block status has something to report.
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
    alloc: Mutex<Vec<bool>>,
    read_only: bool,
    /// Artificial latency for any operation starting at this offset.
    delays: Mutex<HashMap<u64, Duration>>,
    /// Fail the next operation starting at this offset with this kind.
    failures: Mutex<HashMap<u64, DeviceErrorKind>>,
    in_flight: AtomicUsize,
    pub max_in_flight_seen: AtomicUsize,
    pub calls: AtomicUsize,
    /// Log of (operation, offset, len, flag) the server issued.
    pub log: Mutex<Vec<(&'static str, u64, u64, bool)>>,
}

impl MemDevice {
    pub fn new(size: u64, read_only: bool) -> Self {
        let blocks = size.div_ceil(BLOCK) as usize;
        Self {
            data: Mutex::new(vec![0; size as usize]),
            alloc: Mutex::new(vec![false; blocks]),
            read_only,
            delays: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight_seen: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        }
    }

    pub fn set_delay(&self, offset: u64, d: Duration) {
        self.delays.lock().unwrap().insert(offset, d);
    }

    pub fn fail_at(&self, offset: u64, kind: DeviceErrorKind) {
        self.failures.lock().unwrap().insert(offset, kind);
    }

    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + len].to_vec()
    }

    pub fn is_allocated(&self, offset: u64) -> bool {
        self.alloc.lock().unwrap()[(offset / BLOCK) as usize]
    }

    /// Common prologue of every call: count, log, inject failure, delay.
    async fn enter(&self, op: &'static str, offset: u64, len: u64, flag: bool) -> Result<Guard<'_>, DeviceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push((op, offset, len, flag));
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight_seen.fetch_max(now, Ordering::SeqCst);
        let guard = Guard(&self.in_flight);
        if offset == PANIC_OFFSET {
            panic!("MemDevice told to panic");
        }
        let delay = self.delays.lock().unwrap().get(&offset).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if let Some(kind) = self.failures.lock().unwrap().remove(&offset) {
            return Err(DeviceError::new(kind, format!("injected failure at {offset}")));
        }
        Ok(guard)
    }

    fn set_alloc(&self, offset: u64, len: u64, allocated: bool, whole_blocks_only: bool) {
        let mut a = self.alloc.lock().unwrap();
        let end = offset + len;
        let (first, last) = if whole_blocks_only {
            (offset.div_ceil(BLOCK), end / BLOCK)
        } else {
            (offset / BLOCK, end.div_ceil(BLOCK))
        };
        for b in first..last {
            a[b as usize] = allocated;
        }
    }

    fn zero(&self, offset: u64, len: u64) {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
    }
}

struct Guard<'a>(&'a AtomicUsize);
impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> Option<String> {
        Some("in-memory test device".into())
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        let _g = self.enter("read", offset, len.into(), false).await?;
        let d = self.data.lock().unwrap();
        let a = self.alloc.lock().unwrap();
        let mut segs: Vec<ReadSegment> = Vec::new();
        let end = offset + u64::from(len);
        let mut pos = offset;
        while pos < end {
            let next = ((pos / BLOCK) + 1) * BLOCK;
            let stop = next.min(end);
            let n = (stop - pos) as u32;
            if a[(pos / BLOCK) as usize] {
                let bytes = Bytes::copy_from_slice(&d[pos as usize..stop as usize]);
                match segs.last_mut() {
                    Some(ReadSegment::Data(prev)) => {
                        let mut v = prev.to_vec();
                        v.extend_from_slice(&bytes);
                        *prev = Bytes::from(v);
                    }
                    _ => segs.push(ReadSegment::Data(bytes)),
                }
            } else {
                match segs.last_mut() {
                    Some(ReadSegment::Hole(h)) => *h += n,
                    _ => segs.push(ReadSegment::Hole(n)),
                }
            }
            pos = stop;
        }
        Ok(segs)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let _g = self.enter("write", offset, data.len() as u64, fua).await?;
        {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        self.set_alloc(offset, data.len() as u64, true, false);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let _g = self.enter("write_zeroes", offset, len.into(), may_trim).await?;
        let _ = (fast, fua);
        self.zero(offset, len.into());
        if may_trim {
            self.set_alloc(offset, len.into(), false, true);
        } else {
            self.set_alloc(offset, len.into(), true, false);
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        let _g = self.enter("trim", offset, len.into(), fua).await?;
        self.zero(offset, len.into());
        self.set_alloc(offset, len.into(), false, true);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let _g = self.enter("flush", 0, 0, false).await?;
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        let _g = self.enter("cache", offset, len.into(), false).await?;
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let _g = self.enter("block_status", offset, len.into(), false).await?;
        let a = self.alloc.lock().unwrap();
        let end = offset + u64::from(len);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let stop = (((pos / BLOCK) + 1) * BLOCK).min(end);
            let hole = !a[(pos / BLOCK) as usize];
            let n = (stop - pos) as u32;
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += n,
                _ => out.push(Extent { len: n, hole, zero: hole }),
            }
            pos = stop;
        }
        // Report a little past the range, as a sloppy device might: the
        // server must clip.
        if let Some(e) = out.last_mut() {
            e.len = e.len.saturating_add(BLOCK as u32);
        }
        Ok(out)
    }
}

/// Exports by name; `""` maps to `default` when set.
pub struct MemProvider {
    pub exports: HashMap<String, Arc<MemDevice>>,
    pub default: Option<String>,
}

impl ExportProvider for MemProvider {
    type Device = MemDevice;

    async fn list(&self) -> Result<Vec<(String, String)>, DeviceError> {
        let mut v: Vec<_> = self.exports.keys().map(|k| (k.clone(), format!("export {k}"))).collect();
        v.sort();
        Ok(v)
    }

    async fn open(&self, name: &str) -> Result<Option<Arc<MemDevice>>, DeviceError> {
        if name == "broken" {
            return Err(DeviceError::new(DeviceErrorKind::Io, "cannot open"));
        }
        let name = if name.is_empty() {
            match &self.default {
                Some(d) => d.as_str(),
                None => return Ok(None),
            }
        } else {
            name
        };
        Ok(self.exports.get(name).cloned())
    }
}

pub const SIZE: u64 = 1 << 20;

/// A provider with `vol` (1 MiB, writable, the default) and `ro` (read-only,
/// 64 KiB + 100 bytes, so the size is not a multiple of any block size).
pub fn setup() -> (Arc<MemDevice>, Arc<MemDevice>, NbdServer<MemProvider>) {
    setup_with(ServerConfig::default())
}

pub fn setup_with(config: ServerConfig) -> (Arc<MemDevice>, Arc<MemDevice>, NbdServer<MemProvider>) {
    let vol = Arc::new(MemDevice::new(SIZE, false));
    let ro = Arc::new(MemDevice::new(65536 + 100, true));
    let mut exports = HashMap::new();
    exports.insert("vol".to_string(), vol.clone());
    exports.insert("ro".to_string(), ro.clone());
    let provider = MemProvider { exports, default: Some("vol".into()) };
    (vol, ro, NbdServer::new(Arc::new(provider), config))
}

/// Connect over an in-memory pipe; the server runs on its own task.
pub fn connect(server: &NbdServer<MemProvider>) -> (DuplexStream, JoinHandle<Result<(), NbdError>>) {
    let (client, srv) = tokio::io::duplex(4 << 20);
    let server = server.clone();
    let h = tokio::spawn(async move { server.serve_connection(srv).await });
    (client, h)
}

// ---- raw protocol helpers -------------------------------------------------

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454F5054;
pub const REPLY_MAGIC: u64 = 0x3e889045565a9;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const ERR_UNSUP: u32 = (1 << 31) + 1;
pub const ERR_INVALID: u32 = (1 << 31) + 3;
pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META: u32 = 9;
pub const OPT_SET_META: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REQ_MAGIC: u32 = 0x25609513;
pub const SIMPLE_MAGIC: u32 = 0x67446698;
pub const STRUCT_MAGIC: u32 = 0x668e33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const F_FUA: u16 = 1;
pub const F_NO_HOLE: u16 = 2;
pub const F_DF: u16 = 4;
pub const F_REQ_ONE: u16 = 8;
pub const F_FAST_ZERO: u16 = 16;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const T_NONE: u16 = 0;
pub const T_OFFSET_DATA: u16 = 1;
pub const T_OFFSET_HOLE: u16 = 2;
pub const T_BLOCK_STATUS: u16 = 5;
pub const T_ERROR: u16 = 32769;

pub type S = DuplexStream;

/// Read the greeting and answer with `client_flags`; returns server flags.
pub async fn greet(s: &mut S, client_flags: u32) -> u16 {
    assert_eq!(s.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let flags = s.read_u16().await.unwrap();
    s.write_u32(client_flags).await.unwrap();
    flags
}

pub async fn send_opt(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// One option reply: (type, data); asserts magic and option echo.
pub async fn read_opt_reply(s: &mut S, opt: u32) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), REPLY_MAGIC);
    assert_eq!(s.read_u32().await.unwrap(), opt);
    let typ = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).await.unwrap();
    (typ, data)
}

/// `u32 len, name, u16 n, infos`.
pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// `u32 len, name, u32 n, (u32 len, query)*`.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Read INFO replies up to the ACK: (size, flags, block sizes, name, description).
#[derive(Debug, Default)]
pub struct Info {
    pub size: u64,
    pub flags: u16,
    pub block: Option<(u32, u32, u32)>,
    pub name: Option<String>,
    pub description: Option<String>,
}

pub async fn read_info(s: &mut S, opt: u32) -> Result<Info, u32> {
    let mut info = Info::default();
    loop {
        let (typ, d) = read_opt_reply(s, opt).await;
        match typ {
            REP_ACK => return Ok(info),
            REP_INFO => {
                let t = u16::from_be_bytes([d[0], d[1]]);
                match t {
                    0 => {
                        assert_eq!(d.len(), 12);
                        info.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        info.flags = u16::from_be_bytes([d[10], d[11]]);
                    }
                    1 => info.name = Some(String::from_utf8(d[2..].to_vec()).unwrap()),
                    2 => info.description = Some(String::from_utf8(d[2..].to_vec()).unwrap()),
                    3 => {
                        assert_eq!(d.len(), 14);
                        let u = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                        info.block = Some((u(2), u(6), u(10)));
                    }
                    other => panic!("unexpected info type {other}"),
                }
            }
            e if e >= 1 << 31 => return Err(e),
            other => panic!("unexpected reply type {other}"),
        }
    }
}

/// Full handshake to transmission on `name`, optionally with structured
/// replies and `base:allocation`. Returns (size, transmission flags).
pub async fn open(s: &mut S, name: &str, structured: bool, meta: bool) -> (u64, u16) {
    greet(s, 3).await;
    go(s, name, structured, meta).await
}

/// As [`open`], after the greeting has already been exchanged.
pub async fn go(s: &mut S, name: &str, structured: bool, meta: bool) -> (u64, u16) {
    if structured {
        send_opt(s, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(read_opt_reply(s, OPT_STRUCTURED_REPLY).await.0, REP_ACK);
    }
    if meta {
        send_opt(s, OPT_SET_META, &meta_data(name, &["base:allocation"])).await;
        let (t, d) = read_opt_reply(s, OPT_SET_META).await;
        assert_eq!(t, REP_META_CONTEXT);
        assert_eq!(&d[4..], b"base:allocation");
        assert_eq!(read_opt_reply(s, OPT_SET_META).await.0, REP_ACK);
    }
    send_opt(s, OPT_GO, &info_data(name, &[])).await;
    let info = read_info(s, OPT_GO).await.expect("GO failed");
    (info.size, info.flags)
}

pub fn request(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&REQ_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

pub async fn send_req(s: &mut S, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let mut b = request(flags, typ, cookie, offset, len);
    b.extend_from_slice(payload);
    s.write_all(&b).await.unwrap();
}

/// A reply as the client sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, typ: u16, cookie: u64, payload: Vec<u8> },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// Read one reply header (plus the payload of a chunk; a simple read reply's
/// data must be read by the caller).
pub async fn read_reply(s: &mut S) -> Reply {
    let magic = s.read_u32().await.unwrap();
    match magic {
        SIMPLE_MAGIC => {
            let error = s.read_u32().await.unwrap();
            let cookie = s.read_u64().await.unwrap();
            Reply::Simple { error, cookie }
        }
        STRUCT_MAGIC => {
            let flags = s.read_u16().await.unwrap();
            let typ = s.read_u16().await.unwrap();
            let cookie = s.read_u64().await.unwrap();
            let len = s.read_u32().await.unwrap();
            let mut payload = vec![0; len as usize];
            s.read_exact(&mut payload).await.unwrap();
            Reply::Chunk { flags, typ, cookie, payload }
        }
        other => panic!("bad reply magic {other:#x}"),
    }
}

/// Expect a simple reply with `error` for `cookie`.
pub async fn expect_simple(s: &mut S, cookie: u64, error: u32) {
    assert_eq!(read_reply(s).await, Reply::Simple { error, cookie });
}

/// A read with simple replies.
pub async fn simple_read(s: &mut S, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    send_req(s, 0, CMD_READ, cookie, offset, len, &[]).await;
    expect_simple(s, cookie, 0).await;
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).await.unwrap();
    data
}

/// Read structured chunks for one cookie until DONE.
pub async fn read_chunks(s: &mut S, cookie: u64) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        match read_reply(s).await {
            Reply::Chunk { flags, typ, cookie: c, payload } => {
                assert_eq!(c, cookie);
                out.push((flags, typ, payload));
                if flags & 1 != 0 {
                    return out;
                }
            }
            r => panic!("expected a chunk, got {r:?}"),
        }
    }
}

/// Reassemble a structured read from its chunks (holes as zeros).
pub fn assemble(offset: u64, len: u32, chunks: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len as usize];
    let mut covered = 0usize;
    for (_, typ, p) in chunks {
        match *typ {
            T_OFFSET_DATA => {
                let at = u64::from_be_bytes(p[..8].try_into().unwrap()) - offset;
                let data = &p[8..];
                buf[at as usize..at as usize + data.len()].copy_from_slice(data);
                covered += data.len();
            }
            T_OFFSET_HOLE => {
                let at = u64::from_be_bytes(p[..8].try_into().unwrap()) - offset;
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                buf[at as usize..at as usize + n].fill(0);
                covered += n;
            }
            T_NONE => {}
            t => panic!("unexpected chunk type {t}"),
        }
    }
    assert_eq!(covered, len as usize, "chunks must cover the read exactly");
    buf
}

/// Decode a structured error chunk payload: (errno, message).
pub fn error_of(payload: &[u8]) -> (u32, String) {
    let errno = u32::from_be_bytes(payload[..4].try_into().unwrap());
    let n = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    (errno, String::from_utf8(payload[6..6 + n].to_vec()).unwrap())
}

/// Decode a block status payload: (context id, [(len, flags)]).
pub fn extents_of(payload: &[u8]) -> (u32, Vec<(u32, u32)>) {
    let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
    let ext = payload[4..]
        .chunks(8)
        .map(|c| (u32::from_be_bytes(c[..4].try_into().unwrap()), u32::from_be_bytes(c[4..].try_into().unwrap())))
        .collect();
    (id, ext)
}

/// A deterministic pattern for write payloads.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Wait for the server task, failing the test if it hangs.
pub async fn server_result(h: JoinHandle<Result<(), NbdError>>) -> Result<(), NbdError> {
    tokio::time::timeout(Duration::from_secs(10), h).await.expect("server did not end").expect("server task panicked")
}

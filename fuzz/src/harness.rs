//! What the NBD targets share: a runtime whose clock detects hangs, a
//! panic counter, an in-memory device and export provider, and a reader for
//! the bytes a peer sent.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;

use ballast_nbd::{BlockDevice, DeviceError, DeviceErrorKind, ExportProvider, Extent, ReadSegment};

/// Longer than anything an in-memory connection can take; with the paused
/// clock it elapses only when every task is blocked, i.e. on a deadlock.
const HANG_DEADLINE: Duration = Duration::from_secs(3600);

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

/// Count every panic (the server catches panics of request handlers and
/// answers `EIO`, which would otherwise hide a bug), then run the previous
/// hook (libFuzzer's aborts the process, which records the crash).
fn install_panic_counter() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Run `f` to completion on a fresh single-threaded runtime with a paused
/// clock; panic if it deadlocks or if anything panicked meanwhile.
pub fn block_on<F: Future<Output = ()>>(f: F) {
    install_panic_counter();
    let before = PANICS.load(Ordering::SeqCst);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    rt.block_on(async {
        if tokio::time::timeout(HANG_DEADLINE, f).await.is_err() {
            panic!("the connection hung: every task waits and nothing can wake it");
        }
    });
    drop(rt);
    let after = PANICS.load(Ordering::SeqCst);
    assert_eq!(before, after, "a task panicked while serving this input");
}

/// Reads the bytes a peer sent, failing loudly on a malformed message.
pub struct Reader<'a> {
    pub buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    }
    pub fn peek_u32(&self) -> Option<u32> {
        self.buf.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn peek_u64(&self) -> Option<u64> {
        self.buf.get(..8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    }
}

/// Block granularity of [`MemDevice`].
const BLOCK: u64 = 4096;

/// Reads at offsets with these low 12 bits fail with `EIO`, so device errors
/// are part of what the fuzzer explores.
pub const FAILING_OFFSET_LOW_BITS: u64 = 0xbad;

/// A sparse in-memory device that checks the server's side of the
/// [`BlockDevice`] contract: every call in range, non-empty, and no write
/// reaching a read-only export. A breach sets `violated` (and is reported
/// by the target after the connection ends).
pub struct MemDevice {
    size: u64,
    read_only: bool,
    blocks: Mutex<BTreeMap<u64, Vec<u8>>>,
    pub violated: Arc<AtomicBool>,
}

impl MemDevice {
    pub fn new(size: u64, read_only: bool) -> Self {
        Self { size, read_only, blocks: Mutex::new(BTreeMap::new()), violated: Arc::new(AtomicBool::new(false)) }
    }

    fn check(&self, offset: u64, len: u32, writes: bool) -> Result<(), DeviceError> {
        let in_range = len > 0 && offset.checked_add(u64::from(len)).is_some_and(|end| end <= self.size);
        if !in_range || (writes && self.read_only) {
            self.violated.store(true, Ordering::SeqCst);
            return Err(DeviceError::new(DeviceErrorKind::Invalid, "contract breach"));
        }
        Ok(())
    }

    fn store(&self, offset: u64, data: Option<&[u8]>, len: u64) {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let mut pos = 0u64;
        while pos < len {
            let at = offset + pos;
            let (idx, within) = (at / BLOCK, at % BLOCK);
            let n = (BLOCK - within).min(len - pos);
            let block = blocks.entry(idx).or_insert_with(|| vec![0; BLOCK as usize]);
            let dst = &mut block[within as usize..(within + n) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[pos as usize..(pos + n) as usize]),
                None => dst.fill(0),
            }
            pos += n;
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn description(&self) -> Option<String> {
        Some("in-memory fuzz device".into())
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        self.check(offset, len, false)?;
        if offset & 0xfff == FAILING_OFFSET_LOW_BITS {
            return Err(DeviceError::new(DeviceErrorKind::Io, "injected read error"));
        }
        let blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let (mut pos, len) = (0u64, u64::from(len));
        while pos < len {
            let at = offset + pos;
            let (idx, within) = (at / BLOCK, at % BLOCK);
            let n = (BLOCK - within).min(len - pos);
            match blocks.get(&idx) {
                Some(b) => {
                    out.push(ReadSegment::Data(Bytes::copy_from_slice(&b[within as usize..(within + n) as usize])))
                }
                None => out.push(ReadSegment::Hole(n as u32)),
            }
            pos += n;
        }
        Ok(out)
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        let len = u32::try_from(data.len()).unwrap_or(0);
        self.check(offset, len, true)?;
        self.store(offset, Some(&data), data.len() as u64);
        Ok(())
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _may_trim: bool,
        fast: bool,
        _fua: bool,
    ) -> Result<(), DeviceError> {
        self.check(offset, len, true)?;
        if fast {
            return Err(DeviceError::new(DeviceErrorKind::NotSupported, "no fast zeroing"));
        }
        self.store(offset, None, u64::from(len));
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), DeviceError> {
        self.check(offset, len, true)?;
        self.store(offset, None, u64::from(len));
        Ok(())
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.check(offset, len, false)
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        self.check(offset, len, false)?;
        let blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let (mut pos, len) = (0u64, u64::from(len));
        while pos < len {
            let at = offset + pos;
            let n = (BLOCK - at % BLOCK).min(len - pos);
            let hole = !blocks.contains_key(&(at / BLOCK));
            out.push(Extent { len: n as u32, hole, zero: hole });
            pos += n;
        }
        Ok(out)
    }
}

/// Export names the provider knows: `""` and `"vol"` open the device,
/// `"down"` fails as a shutting-down backend would, anything else is unknown.
pub struct MemExports {
    pub device: Arc<MemDevice>,
}

impl ExportProvider for MemExports {
    type Device = MemDevice;
    async fn list(&self) -> Result<Vec<(String, String)>, DeviceError> {
        Ok(vec![(String::new(), "default".into()), ("vol".into(), "the same device".into())])
    }
    async fn open(&self, name: &str) -> Result<Option<Arc<MemDevice>>, DeviceError> {
        match name {
            "" | "vol" => Ok(Some(self.device.clone())),
            "down" => Err(DeviceError::new(DeviceErrorKind::Shutdown, "backend shutting down")),
            _ => Ok(None),
        }
    }
}

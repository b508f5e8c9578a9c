//! Serve a sparse in-memory disk over NBD, for debugging against real clients.
//!
//! ```text
//! cargo run -p ballast-nbd --example memserver -- 127.0.0.1:10809 64
//! nbdinfo nbd://127.0.0.1:10809/mem
//! cargo run -p ballast-nbd --example memserver -- unix:/tmp/mem.sock 64
//! ```
//! Arguments: listen address (`host:port` or `unix:PATH`), size in MiB.
//! `RUST_LOG=debug` shows each option and connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ballast_nbd::{BlockDevice, DeviceError, ExportProvider, Extent, NbdServer, ReadSegment, ServerConfig};
use bytes::Bytes;

const CHUNK: u64 = 64 * 1024;

/// Sparse disk: 64 KiB chunks allocated on first write.
struct MemDisk {
    size: u64,
    chunks: Mutex<HashMap<u64, Vec<u8>>>,
}

impl MemDisk {
    /// Apply `f(chunk bytes, range within chunk, position in request)` over a range.
    fn each(&self, offset: u64, len: u64, mut f: impl FnMut(u64, std::ops::Range<usize>, usize)) {
        let mut pos = offset;
        while pos < offset + len {
            let idx = pos / CHUNK;
            let start = (pos % CHUNK) as usize;
            let end = ((offset + len).min((idx + 1) * CHUNK) - idx * CHUNK) as usize;
            f(idx, start..end, (pos - offset) as usize);
            pos = idx * CHUNK + end as u64;
        }
    }

    fn zero(&self, offset: u64, len: u32, deallocate: bool) {
        let mut chunks = self.chunks.lock().unwrap();
        self.each(offset, len.into(), |idx, r, _| {
            if deallocate && r.len() == CHUNK as usize {
                chunks.remove(&idx);
            } else if let Some(c) = chunks.get_mut(&idx) {
                c[r].fill(0);
            }
        });
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn description(&self) -> Option<String> {
        Some("ballast-nbd in-memory example disk".into())
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        let chunks = self.chunks.lock().unwrap();
        let mut out = Vec::new();
        self.each(offset, len.into(), |idx, r, _| match chunks.get(&idx) {
            Some(c) => out.push(ReadSegment::Data(Bytes::copy_from_slice(&c[r]))),
            None => out.push(ReadSegment::Hole(r.len() as u32)),
        });
        Ok(out)
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), DeviceError> {
        let mut chunks = self.chunks.lock().unwrap();
        self.each(offset, data.len() as u64, |idx, r, at| {
            let c = chunks.entry(idx).or_insert_with(|| vec![0; CHUNK as usize]);
            let n = r.len();
            c[r].copy_from_slice(&data[at..at + n]);
        });
        Ok(())
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        _fast: bool,
        _fua: bool,
    ) -> Result<(), DeviceError> {
        self.zero(offset, len, may_trim);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), DeviceError> {
        self.zero(offset, len, true);
        Ok(())
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn cache(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let chunks = self.chunks.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        self.each(offset, len.into(), |idx, r, _| {
            let hole = !chunks.contains_key(&idx);
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += r.len() as u32,
                _ => out.push(Extent { len: r.len() as u32, hole, zero: hole }),
            }
        });
        Ok(out)
    }
}

/// One export, `mem`, which is also the default (`""`).
struct One(Arc<MemDisk>);

impl ExportProvider for One {
    type Device = MemDisk;
    async fn list(&self) -> Result<Vec<(String, String)>, DeviceError> {
        Ok(vec![("mem".into(), "in-memory disk".into())])
    }
    async fn open(&self, name: &str) -> Result<Option<Arc<MemDisk>>, DeviceError> {
        Ok((name.is_empty() || name == "mem").then(|| self.0.clone()))
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let disk = Arc::new(MemDisk { size: mib << 20, chunks: Mutex::new(HashMap::new()) });
    let server = NbdServer::new(Arc::new(One(disk)), ServerConfig::default());
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        eprintln!("serving {mib} MiB on unix:{path}");
        server.serve_unix(listener, shutdown).await
    } else {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("serving {mib} MiB on {addr}");
        server.serve_tcp(listener, shutdown).await
    }
}

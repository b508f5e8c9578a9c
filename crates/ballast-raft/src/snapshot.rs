//! Shard snapshots that never hold a shard in memory.
//!
//! A snapshot's data is a [`ShardSnapshot`]: a small [`SnapshotHeader`] (the
//! shard and its fencing epochs) and a source of [`SnapshotPage`]s of at most
//! [`PAGE_BLOCKS`] blocks. Two sources exist:
//!
//! - **Live** (sender side): pages are scanned on demand from the shard's key
//!   range in the block store, each page a separate bounded scan. Building a
//!   snapshot therefore writes nothing but its metadata: "the shard's data is
//!   at least as new as `last_log_id`, and that is durable".
//! - **File** (receiver side): frames received from the leader are spilled to
//!   a file in the shard's snapshot directory, then loaded page by page.
//!
//! Why a live scan is a correct snapshot although it is not a point-in-time
//! view: every shard request is a *blind overwrite* of its byte range (write,
//! zero, trim, delete-volume). A scan taken while the leader applies entries
//! after `last_log_id = N` sees, for each block, the state at some index
//! `M >= N`. The follower installs it as "applied up to N" and replays
//! `N+1..` from the log: every byte touched by a replayed entry ends with the
//! value of the last entry that touched it, and every other byte was not
//! changed after N, so it already had its value at N. The result equals the
//! leader's state. The fencing epochs are the one piece of state whose
//! replay depends on history, so the header carries them exactly as of N
//! (captured together with N when the snapshot was built).
//!
//! Frames (the unit a transport sends) are versioned postcard records: the
//! first is the header, every other one a page. The spill file is
//! `MAGIC`, then frames as `[u32 LE length][u32 LE crc32c][frame]`, then a
//! zero-length end marker, so a truncated or damaged file is detected.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ballast_storage::{BlockStore, KeyRange};
use ballast_types::{crc32c, BlockKey, ShardId, VolumeId, BLOCK_KEY_LEN};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};

/// Blocks per page: 256 × 4 KiB = 1 MiB of payload.
pub const PAGE_BLOCKS: usize = 256;
const MAGIC: &[u8; 8] = b"BLSNAP01";
/// Largest frame accepted from a file or a transport.
const MAX_FRAME: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("snapshot frame: {0}")]
    Codec(#[from] CodecError),
    #[error("malformed snapshot: {0}")]
    Malformed(String),
    #[error(transparent)]
    Storage(#[from] ballast_storage::StorageError),
}

impl From<SnapshotError> for std::io::Error {
    fn from(e: SnapshotError) -> Self {
        match e {
            SnapshotError::Io { source, .. } => source,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

/// What a snapshot carries besides blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub shard: u32,
    /// Highest writer epoch per volume, as of the snapshot's last log id.
    pub epochs: Vec<(u64, u64)>,
}

impl SnapshotHeader {
    pub fn shard(&self) -> ShardId {
        ShardId(self.shard)
    }
    pub fn epochs(&self) -> impl Iterator<Item = (VolumeId, u64)> + '_ {
        self.epochs.iter().map(|(v, e)| (VolumeId(*v), *e))
    }
}

/// Up to [`PAGE_BLOCKS`] blocks of one shard, in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPage {
    pub blocks: Vec<([u8; BLOCK_KEY_LEN], Bytes)>,
}

impl SnapshotPage {
    /// The blocks with decoded keys; fails on a key outside `shard`.
    pub fn decoded(&self, shard: ShardId) -> Result<Vec<(BlockKey, Bytes)>, SnapshotError> {
        self.blocks
            .iter()
            .map(|(k, v)| match BlockKey::decode(k) {
                Some(key) if key.shard == shard => Ok((key, v.clone())),
                _ => Err(SnapshotError::Malformed(format!("block key outside {shard}"))),
            })
            .collect()
    }
}

/// Where pages come from.
trait PageSource: Send + Sync + 'static {
    fn next_page(&mut self) -> Result<Option<SnapshotPage>, SnapshotError>;
    /// The spill file behind this source, if any.
    fn file(&self) -> Option<&Path> {
        None
    }
}

/// The `SnapshotData` of a shard state machine: a header and a page source.
/// Reading pages blocks on I/O: call [`ShardSnapshot::next_page`] from a
/// blocking context, or use [`ShardSnapshot::into_frames`].
pub struct ShardSnapshot {
    header: SnapshotHeader,
    source: Box<dyn PageSource>,
}

impl std::fmt::Debug for ShardSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSnapshot").field("header", &self.header).field("file", &self.source.file()).finish()
    }
}

/// The whole key range of a shard.
pub fn shard_range(shard: ShardId) -> KeyRange {
    let start = BlockKey { shard, volume: VolumeId(0), chunk: 0, block: 0 };
    let end = shard.0.checked_add(1).map(|s| BlockKey { shard: ShardId(s), volume: VolumeId(0), chunk: 0, block: 0 });
    KeyRange { start, end }
}

/// The key right after `k`, if any.
fn successor(k: &BlockKey) -> Option<BlockKey> {
    if let Some(block) = k.block.checked_add(1) {
        return Some(BlockKey { block, ..*k });
    }
    if let Some(chunk) = k.chunk.checked_add(1) {
        return Some(BlockKey { chunk, block: 0, ..*k });
    }
    if let Some(v) = k.volume.0.checked_add(1) {
        return Some(BlockKey { volume: VolumeId(v), chunk: 0, block: 0, ..*k });
    }
    k.shard.0.checked_add(1).map(|s| BlockKey { shard: ShardId(s), volume: VolumeId(0), chunk: 0, block: 0 })
}

struct LivePages<S: BlockStore> {
    store: Arc<S>,
    next: Option<KeyRange>,
}

impl<S: BlockStore> PageSource for LivePages<S> {
    fn next_page(&mut self) -> Result<Option<SnapshotPage>, SnapshotError> {
        let Some(range) = self.next else { return Ok(None) };
        let found = self.store.scan(&range, PAGE_BLOCKS)?;
        self.next = match found.last() {
            Some((k, _)) if found.len() == PAGE_BLOCKS => {
                successor(k).filter(|s| range.contains(s)).map(|start| KeyRange { start, end: range.end })
            }
            _ => None,
        };
        if found.is_empty() {
            return Ok(None);
        }
        Ok(Some(SnapshotPage { blocks: found.into_iter().map(|(k, v)| (k.encode(), v)).collect() }))
    }
}

struct MemPages(std::collections::VecDeque<SnapshotPage>);

impl PageSource for MemPages {
    fn next_page(&mut self) -> Result<Option<SnapshotPage>, SnapshotError> {
        Ok(self.0.pop_front())
    }
}

struct FilePages {
    path: PathBuf,
    reader: BufReader<File>,
    done: bool,
}

fn read_frame(reader: &mut impl Read, path: &Path) -> Result<Option<Vec<u8>>, SnapshotError> {
    let mut head = [0u8; 8];
    reader.read_exact(&mut head).map_err(io_at(path))?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 {
        return Ok(None);
    }
    if len > MAX_FRAME {
        return Err(SnapshotError::Malformed(format!("frame of {len} bytes in {}", path.display())));
    }
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf).map_err(io_at(path))?;
    if crc32c(&buf) != crc {
        return Err(SnapshotError::Malformed(format!("checksum mismatch in {}", path.display())));
    }
    Ok(Some(buf))
}

impl FilePages {
    /// Open a spill file; returns its header and the page source.
    fn open(path: &Path) -> Result<(SnapshotHeader, Self), SnapshotError> {
        let mut reader = BufReader::new(File::open(path).map_err(io_at(path))?);
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic).map_err(io_at(path))?;
        if &magic != MAGIC {
            return Err(SnapshotError::Malformed(format!("{} is not a snapshot file", path.display())));
        }
        let header = read_frame(&mut reader, path)?
            .ok_or_else(|| SnapshotError::Malformed(format!("{} has no header", path.display())))?;
        let header: SnapshotHeader = codec::decode(&header)?;
        Ok((header, Self { path: path.to_path_buf(), reader, done: false }))
    }
}

impl PageSource for FilePages {
    fn next_page(&mut self) -> Result<Option<SnapshotPage>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        match read_frame(&mut self.reader, &self.path)? {
            None => {
                self.done = true;
                Ok(None)
            }
            Some(frame) => Ok(Some(codec::decode(&frame)?)),
        }
    }
    fn file(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

impl ShardSnapshot {
    /// A snapshot whose pages are scanned on demand from `store`.
    pub fn live<S: BlockStore>(store: Arc<S>, header: SnapshotHeader) -> Self {
        let range = shard_range(header.shard());
        Self { header, source: Box::new(LivePages { store, next: Some(range) }) }
    }

    /// A snapshot of pages held in memory: for small state (the meta group's
    /// map travels as one page; see `crate::meta`).
    pub fn in_memory(header: SnapshotHeader, pages: Vec<SnapshotPage>) -> Self {
        Self { header, source: Box::new(MemPages(pages.into())) }
    }

    /// A snapshot read back from a spill file written by [`SnapshotReceiver`].
    pub fn from_file(path: &Path) -> Result<Self, SnapshotError> {
        let (header, pages) = FilePages::open(path)?;
        Ok(Self { header, source: Box::new(pages) })
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The spill file behind this snapshot, if it is file-backed.
    pub fn file(&self) -> Option<&Path> {
        self.source.file()
    }

    /// The next page, or `None` at the end. Blocks on I/O.
    pub fn next_page(&mut self) -> Result<Option<SnapshotPage>, SnapshotError> {
        self.source.next_page()
    }

    /// The snapshot as transport frames: the header, then one frame per page.
    /// Pages are read on a blocking thread, at most two frames ahead of the
    /// consumer, so memory stays bounded whatever the shard's size. Feed the
    /// frames, in order, to a [`SnapshotReceiver`] on the other side.
    pub fn into_frames(mut self) -> tokio::sync::mpsc::Receiver<Result<Bytes, SnapshotError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            let header = codec::encode(&self.header).map_err(SnapshotError::from);
            let failed = header.is_err();
            if tx.blocking_send(header).is_err() || failed {
                return;
            }
            loop {
                let frame = match self.next_page() {
                    Ok(None) => return,
                    Ok(Some(page)) => codec::encode(&page).map_err(SnapshotError::from),
                    Err(e) => Err(e),
                };
                let failed = frame.is_err();
                if tx.blocking_send(frame).is_err() || failed {
                    return;
                }
            }
        });
        rx
    }
}

/// Builds a file-backed [`ShardSnapshot`] from frames, page by page.
/// Blocking I/O: call from a blocking context (`spawn_blocking`).
pub struct SnapshotReceiver {
    path: PathBuf,
    writer: BufWriter<File>,
    header: Option<SnapshotHeader>,
}

impl SnapshotReceiver {
    /// Start a new spill file in `dir` (created if missing).
    pub fn create(dir: &Path) -> Result<Self, SnapshotError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = dir.join(format!("incoming-{nanos}-{}.snap", std::process::id()));
        let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io_at(&path))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        writer.write_all(MAGIC).map_err(io_at(&path))?;
        Ok(Self { path, writer, header: None })
    }

    fn write_frame(&mut self, frame: &[u8]) -> Result<(), SnapshotError> {
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&crc32c(frame).to_le_bytes());
        self.writer.write_all(&head).map_err(io_at(&self.path))?;
        self.writer.write_all(frame).map_err(io_at(&self.path))
    }

    /// Add the next frame; the first must be the header. Frames are decoded
    /// and checked before they are written.
    pub fn push(&mut self, frame: &[u8]) -> Result<(), SnapshotError> {
        if frame.is_empty() || frame.len() > MAX_FRAME {
            return Err(SnapshotError::Malformed(format!("frame of {} bytes", frame.len())));
        }
        match &self.header {
            None => self.header = Some(codec::decode(frame)?),
            Some(h) => {
                let page: SnapshotPage = codec::decode(frame)?;
                page.decoded(h.shard())?;
                crate::metrics::metrics().rebuild_bytes.add(frame.len() as u64);
            }
        }
        self.write_frame(frame)
    }

    /// Seal the file (end marker, fsync) and open it as a snapshot.
    pub fn finish(mut self) -> Result<ShardSnapshot, SnapshotError> {
        if self.header.is_none() {
            return Err(SnapshotError::Malformed("no header received".into()));
        }
        self.writer.write_all(&[0u8; 8]).map_err(io_at(&self.path))?;
        let file = self
            .writer
            .into_inner()
            .map_err(|e| SnapshotError::Io { path: self.path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io_at(&self.path))?;
        ShardSnapshot::from_file(&self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Write `snapshot` to a new spill file in `dir` and return it file-backed.
pub(crate) fn spill(mut snapshot: ShardSnapshot, dir: &Path) -> Result<ShardSnapshot, SnapshotError> {
    let mut rx = SnapshotReceiver::create(dir)?;
    rx.push(&codec::encode(&snapshot.header)?)?;
    while let Some(page) = snapshot.next_page()? {
        rx.push(&codec::encode(&page)?)?;
    }
    rx.finish()
}

/// fsync a directory, so a rename or create in it survives power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_storage::conformance::{block, key};
    use ballast_storage::{Durability, MemStore, WriteBatch};

    fn store_with(n: u32, shard: u32) -> Arc<MemStore> {
        let s = Arc::new(MemStore::new());
        let mut b = WriteBatch::new();
        for i in 0..n {
            b.put(key(shard, 1 + (i % 3) as u64, 0, i), block(i as u64));
        }
        b.put(key(shard + 1, 0, 0, 0), block(999));
        s.write(b, Durability::Buffered).expect("write");
        s
    }

    #[tokio::test]
    async fn live_pages_cover_the_shard_and_survive_a_spill_file() {
        let store = store_with(700, 4);
        let header = SnapshotHeader { shard: 4, epochs: vec![(1, 5)] };
        let mut live = ShardSnapshot::live(store.clone(), header.clone());
        let mut n = 0;
        while let Some(p) = live.next_page().expect("page") {
            assert!(p.blocks.len() <= PAGE_BLOCKS);
            n += p.decoded(ShardId(4)).expect("decoded").len();
        }
        assert_eq!(n, 700, "every block of the shard, none of its neighbour");

        let dir = tempfile::tempdir().expect("tempdir");
        let mut frames = ShardSnapshot::live(store, header.clone()).into_frames();
        let mut rx = SnapshotReceiver::create(dir.path()).expect("create");
        while let Some(f) = frames.recv().await {
            rx.push(&f.expect("frame")).expect("push");
        }
        let mut snap = rx.finish().expect("finish");
        assert_eq!(snap.header(), &header);
        let mut n = 0;
        while let Some(p) = snap.next_page().expect("page") {
            n += p.blocks.len();
        }
        assert_eq!(n, 700);
    }

    #[test]
    fn damaged_spill_files_are_refused() {
        let store = store_with(10, 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let snap =
            spill(ShardSnapshot::live(store, SnapshotHeader { shard: 1, epochs: vec![] }), dir.path()).expect("spill");
        let path = snap.file().expect("file").to_path_buf();
        drop(snap);
        let mut bytes = fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(&path, &bytes).expect("write");
        let mut snap = ShardSnapshot::from_file(&path).expect("header intact");
        let mut err = None;
        while err.is_none() {
            match snap.next_page() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => err = Some(e),
            }
        }
        assert!(matches!(err, Some(SnapshotError::Malformed(_))), "{err:?}");
        // Truncated: no end marker.
        fs::write(&path, &bytes[..mid]).expect("write");
        let r = ShardSnapshot::from_file(&path).and_then(|mut s| loop {
            if s.next_page()?.is_none() {
                break Ok(());
            }
        });
        assert!(r.is_err());
        // A receiver refuses a page of another shard.
        let mut rx = SnapshotReceiver::create(dir.path()).expect("create");
        rx.push(&codec::encode(&SnapshotHeader { shard: 2, epochs: vec![] }).expect("enc")).expect("header");
        let page = SnapshotPage { blocks: vec![(key(3, 0, 0, 0).encode(), block(1))] };
        assert!(rx.push(&codec::encode(&page).expect("enc")).is_err());
    }
}

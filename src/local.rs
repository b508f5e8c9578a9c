//! Volumes on this machine's disk, served without replication: a RocksDB
//! store holds every volume's blocks in shard 0 and a small catalog of names
//! and sizes. Used by `ballast demo` on one node and by the NBD tests.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ballast_nbd::{BlockDevice, DeviceError, DeviceErrorKind, ExportProvider, Extent, ReadSegment};
use ballast_storage::{BlockStore, Durability, RocksConfig, RocksStore, Segment, StorageError, VolumeView, WriteBatch};
use ballast_types::{Geometry, ShardId, VolumeId, BLOCK_SIZE};
use bytes::Bytes;

const VOLUME_PREFIX: &[u8] = b"vol/";
const NEXT_ID_KEY: &[u8] = b"next-volume-id";
/// Block-status answers cover at most this much per call; clients ask again.
const MAX_STATUS_SPAN: u64 = 256 << 20;
const LOCK_STRIPES: usize = 1024;

/// Errors of the local catalog.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("volume size must be a positive multiple of {BLOCK_SIZE} bytes, got {0}")]
    BadSize(u64),
    #[error("invalid volume name {0:?}: use 1-128 characters of [A-Za-z0-9._-]")]
    BadName(String),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("corrupt catalog entry for volume {0}")]
    BadCatalog(String),
}

/// A volume's catalog entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub id: VolumeId,
    pub size: u64,
    pub read_only: bool,
}

impl VolumeInfo {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17);
        v.extend_from_slice(&self.id.0.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        v.push(self.read_only as u8);
        v
    }

    fn decode(name: &str, raw: &[u8]) -> Result<Self, LocalError> {
        let bad = || LocalError::BadCatalog(name.to_string());
        if raw.len() != 17 {
            return Err(bad());
        }
        let id = u64::from_be_bytes(raw[0..8].try_into().map_err(|_| bad())?);
        let size = u64::from_be_bytes(raw[8..16].try_into().map_err(|_| bad())?);
        Ok(Self { name: name.to_string(), id: VolumeId(id), size, read_only: raw[16] != 0 })
    }
}

pub fn validate_name(name: &str) -> Result<(), LocalError> {
    let ok =
        !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LocalError::BadName(name.to_string()))
    }
}

/// The volumes in one local store, served as NBD exports by name.
pub struct LocalVolumes {
    store: Arc<RocksStore>,
    default_export: RwLock<Option<String>>,
    open: Mutex<HashMap<String, Arc<LocalDevice>>>,
}

impl LocalVolumes {
    pub fn open(data_dir: &Path) -> Result<Self, LocalError> {
        let store = RocksStore::open(data_dir, &RocksConfig::default())?;
        Ok(Self { store: Arc::new(store), default_export: RwLock::new(None), open: Mutex::new(HashMap::new()) })
    }

    /// Make every completed write durable (used at shutdown).
    pub fn sync(&self) -> Result<(), LocalError> {
        Ok(self.store.sync()?)
    }

    /// The export served for the empty name.
    pub fn set_default_export(&self, name: &str) {
        *self.default_export.write().unwrap_or_else(|e| e.into_inner()) = Some(name.to_string());
    }

    pub fn get(&self, name: &str) -> Result<Option<VolumeInfo>, LocalError> {
        let key = [VOLUME_PREFIX, name.as_bytes()].concat();
        self.store.get_meta(&key)?.map(|raw| VolumeInfo::decode(name, &raw)).transpose()
    }

    pub fn list(&self) -> Result<Vec<VolumeInfo>, LocalError> {
        self.store
            .scan_meta(VOLUME_PREFIX)?
            .into_iter()
            .map(|(k, v)| VolumeInfo::decode(&String::from_utf8_lossy(&k[VOLUME_PREFIX.len()..]), &v))
            .collect()
    }

    /// Create a volume; refuses an existing name.
    pub fn create(&self, name: &str, size: u64, read_only: bool) -> Result<VolumeInfo, LocalError> {
        validate_name(name)?;
        if size == 0 || size % BLOCK_SIZE as u64 != 0 {
            return Err(LocalError::BadSize(size));
        }
        // One creator at a time: the id counter is read-modify-write.
        let _guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.get(name)?.is_some() {
            return Err(LocalError::Exists(name.to_string()));
        }
        let next = match self.store.get_meta(NEXT_ID_KEY)? {
            Some(raw) => {
                u64::from_be_bytes(raw.as_slice().try_into().map_err(|_| LocalError::BadCatalog(name.into()))?)
            }
            None => 1,
        };
        let info = VolumeInfo { name: name.to_string(), id: VolumeId(next), size, read_only };
        let mut b = WriteBatch::new();
        b.put_meta(NEXT_ID_KEY.to_vec(), (next + 1).to_be_bytes().to_vec());
        b.put_meta([VOLUME_PREFIX, name.as_bytes()].concat(), info.encode());
        self.store.write(b, Durability::Sync)?;
        Ok(info)
    }

    /// The volume `name`, created with `size` if missing.
    pub fn ensure(&self, name: &str, size: u64) -> Result<VolumeInfo, LocalError> {
        match self.get(name)? {
            Some(v) => Ok(v),
            None => self.create(name, size, false),
        }
    }

    fn device(&self, info: VolumeInfo) -> Arc<LocalDevice> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.entry(info.name.clone())
            .or_insert_with(|| {
                Arc::new(LocalDevice {
                    inner: Arc::new(DeviceInner {
                        store: self.store.clone(),
                        info,
                        geometry: Geometry::default(),
                        locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
                    }),
                })
            })
            .clone()
    }
}

impl ExportProvider for LocalVolumes {
    type Device = LocalDevice;

    async fn list(&self) -> Result<Vec<(String, String)>, DeviceError> {
        let vols = self.list().map_err(|e| DeviceError::new(DeviceErrorKind::Io, e.to_string()))?;
        Ok(vols.into_iter().map(|v| (v.name.clone(), format!("ballast local volume, {} bytes", v.size))).collect())
    }

    async fn open(&self, name: &str) -> Result<Option<Arc<LocalDevice>>, DeviceError> {
        let name = if name.is_empty() {
            match self.default_export.read().unwrap_or_else(|e| e.into_inner()).clone() {
                Some(n) => n,
                None => return Ok(None),
            }
        } else {
            name.to_string()
        };
        let info = self.get(&name).map_err(|e| DeviceError::new(DeviceErrorKind::Io, e.to_string()))?;
        Ok(info.map(|i| self.device(i)))
    }
}

/// One local volume as a block device.
///
/// Durability follows NBD: a write is in RocksDB's write-ahead log when it
/// returns; `FUA` writes and `FLUSH` fsync that log. Every call holds the
/// stripe locks of the blocks it touches, so read-modify-write never tears.
#[derive(Clone)]
pub struct LocalDevice {
    inner: Arc<DeviceInner>,
}

struct DeviceInner {
    store: Arc<RocksStore>,
    info: VolumeInfo,
    geometry: Geometry,
    locks: Vec<Mutex<()>>,
}

fn io_err(e: StorageError) -> DeviceError {
    let kind = match e {
        StorageError::BadBlockLength { .. } => DeviceErrorKind::Invalid,
        _ => DeviceErrorKind::Io,
    };
    tracing::error!(error = %e, "local volume I/O failed");
    DeviceError::new(kind, e.to_string())
}

impl LocalDevice {
    pub fn info(&self) -> &VolumeInfo {
        &self.inner.info
    }

    fn view(&self) -> VolumeView<'_, RocksStore> {
        VolumeView::new(&self.inner.store, ShardId(0), self.inner.info.id, self.inner.geometry)
    }

    /// Lock the stripes covering `[offset, offset+len)`, in stripe order.
    fn lock(&self, offset: u64, len: u64) -> Vec<MutexGuard<'_, ()>> {
        let first = offset / BLOCK_SIZE as u64;
        let end = (offset + len).div_ceil(BLOCK_SIZE as u64);
        let mut stripes: Vec<usize> =
            (first..end.min(first + LOCK_STRIPES as u64)).map(|b| (b % LOCK_STRIPES as u64) as usize).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes.into_iter().map(|i| self.inner.locks[i].lock().unwrap_or_else(|e| e.into_inner())).collect()
    }

    fn apply(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        build: impl FnOnce(&VolumeView<'_, RocksStore>) -> Result<WriteBatch, StorageError>,
    ) -> Result<(), DeviceError> {
        let _locks = self.lock(offset, len);
        let batch = build(&self.view()).map_err(io_err)?;
        let durability = if fua { Durability::Sync } else { Durability::Buffered };
        self.inner.store.write(batch, durability).map_err(io_err)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DeviceError> + Send + 'static,
) -> Result<T, DeviceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DeviceError::new(DeviceErrorKind::Io, format!("storage task failed: {e}")))?
}

impl BlockDevice for LocalDevice {
    fn size(&self) -> u64 {
        self.inner.info.size
    }

    fn read_only(&self) -> bool {
        self.inner.info.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadSegment>, DeviceError> {
        let me = self.clone();
        blocking(move || {
            let segs = me.view().read(offset, len as u64).map_err(io_err)?;
            Ok(segs
                .into_iter()
                .map(|s| match s {
                    Segment::Data(d) => ReadSegment::Data(d),
                    Segment::Hole(n) => ReadSegment::Hole(n as u32),
                })
                .collect())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let me = self.clone();
        blocking(move || me.apply(offset, data.len() as u64, fua, |v| v.write(offset, &data))).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        _fast: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        // Zeroing is never slower than writing here: whole blocks are metadata
        // deletes or constant buffers, so FAST_ZERO always succeeds.
        let me = self.clone();
        blocking(move || me.apply(offset, len as u64, fua, |v| v.zero(offset, len as u64, may_trim))).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        let me = self.clone();
        blocking(move || me.apply(offset, len as u64, fua, |v| v.zero(offset, len as u64, true))).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        let store = self.inner.store.clone();
        blocking(move || store.sync().map_err(io_err)).await
    }

    async fn cache(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        // Advisory; RocksDB's block cache warms on the real read.
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let me = self.clone();
        let len = (len as u64).min(MAX_STATUS_SPAN);
        blocking(move || {
            let ext = me.view().extents(offset, len).map_err(io_err)?;
            Ok(ext.into_iter().map(|(l, alloc)| Extent { len: l as u32, hole: !alloc, zero: !alloc }).collect())
        })
        .await
    }
}

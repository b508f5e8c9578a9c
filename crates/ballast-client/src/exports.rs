//! [`ClusterExports`]: the cluster's volumes as NBD exports, for `ballast
//! attach` (one volume) and `ballast gateway` (all of them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ballast_nbd::{DeviceError, DeviceErrorKind, ExportProvider};
use ballast_types::{
    format_size, validate_name, AttachVolume, Attachment, DetachVolume, ErrorCode, PlacementMap, Retryable, VolumeInfo,
};
use tokio::sync::OnceCell;

use crate::{AdminClient, ClientConfig, ClientError, ClientPool, MapPlacement, Placement, RemoteVolume, VolumeSpec};

/// The cluster's volumes as an [`ExportProvider`] of [`RemoteVolume`]s.
///
/// Two modes:
/// - [`ClusterExports::attach_one`] attaches one volume up front (so a
///   refusal reaches the operator at once) and serves only it, also as the
///   default export (the empty name).
/// - [`ClusterExports::gateway`] serves every volume by name, attaching each
///   read-write on its first `open` and keeping it attached until
///   [`ClusterExports::detach_all`]. There is no default export.
///
/// **Attachments and fencing.** A read-write attachment takes a new epoch;
/// every write carries it and shards refuse older ones, so at most one writer
/// exists per volume. Opening a volume another client holds read-write fails
/// with a `NotPermitted` device error (the NBD server answers the option with
/// `NBD_REP_ERR_POLICY`). Attaching is not idempotent: if an attach's reply
/// is lost and the retry is refused with `CONFLICT`, the volume stays
/// attached under an epoch this process never learned; it must be taken over
/// with `force` or detached by an operator (see [`AdminClient`]).
///
/// **Sizes.** Every `open` refreshes the placement map first, so a volume
/// grown with `volume resize` shows its new size on the next connection;
/// connections already open keep the size they were given. If the map cannot
/// be refreshed, `open` and `list` use the map they have.
///
/// **Shutdown.** Call [`ClusterExports::detach_all`] after the NBD server
/// stopped; later `open`s fail with `Shutdown`. Durability is
/// [`RemoteVolume`]'s: every acknowledged write is on a majority of replicas,
/// so detaching needs no flush.
pub struct ClusterExports {
    admin: AdminClient,
    placement: Arc<MapPlacement>,
    pool: Arc<ClientPool>,
    mode: Mode,
    /// Attachments this process holds, by volume name. The cell makes
    /// concurrent first opens of one volume attach once.
    held: Mutex<HashMap<String, Arc<OnceCell<Held>>>>,
    closed: AtomicBool,
}

enum Mode {
    One { name: String },
    Gateway,
}

#[derive(Debug, Clone)]
struct Held {
    attachment: Attachment,
    read_only: bool,
}

impl Held {
    fn detach_request(&self) -> DetachVolume {
        DetachVolume {
            name: self.attachment.volume.name.clone(),
            epoch: (!self.read_only).then_some(self.attachment.epoch),
        }
    }
}

impl ClusterExports {
    /// `ballast attach`: attach `name` now (errors surface at once), serve
    /// only it; it is also the default export (empty name).
    pub async fn attach_one(
        admin: AdminClient,
        name: &str,
        read_only: bool,
        force: bool,
        config: ClientConfig,
    ) -> Result<Arc<Self>, ClientError> {
        let placement = MapPlacement::connect(admin.clone()).await?;
        let req = AttachVolume { name: name.to_owned(), read_only, force };
        let attachment = admin.attach(&req).await?;
        tracing::info!(volume = name, epoch = %attachment.epoch, read_only, "attached");
        let held = Held { attachment, read_only };
        let cell = Arc::new(OnceCell::new_with(Some(held)));
        let pool = ClientPool::with_tls(config, admin.tls().cloned());
        Ok(Arc::new(Self {
            admin,
            placement,
            pool,
            mode: Mode::One { name: name.to_owned() },
            held: Mutex::new(HashMap::from([(name.to_owned(), cell)])),
            closed: AtomicBool::new(false),
        }))
    }

    /// `ballast gateway`: every volume by name; each is attached read-write
    /// on first open and stays attached until [`ClusterExports::detach_all`].
    pub async fn gateway(admin: AdminClient, config: ClientConfig) -> Result<Arc<Self>, ClientError> {
        let placement = MapPlacement::connect(admin.clone()).await?;
        let pool = ClientPool::with_tls(config, admin.tls().cloned());
        Ok(Arc::new(Self {
            admin,
            placement,
            pool,
            mode: Mode::Gateway,
            held: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }))
    }

    /// The placement every served volume routes with.
    pub fn placement(&self) -> &Arc<MapPlacement> {
        &self.placement
    }

    /// Release every attachment (call on shutdown); reports the first error
    /// after trying all. An attachment whose release failed with a retryable
    /// error is kept, so calling again retries it.
    pub async fn detach_all(&self) -> Result<(), ClientError> {
        self.closed.store(true, Ordering::SeqCst);
        let held: Vec<(String, Held)> =
            self.held_cells().into_iter().filter_map(|(name, cell)| cell.get().map(|h| (name, h.clone()))).collect();
        let mut first = None;
        for (name, h) in held {
            let r = self.admin.detach(&h.detach_request()).await;
            match &r {
                Ok(()) => tracing::info!(volume = %name, epoch = %h.attachment.epoch, "detached"),
                Err(e) => tracing::warn!(volume = %name, "detach failed: {e}"),
            }
            if !r.as_ref().is_err_and(Retryable::is_retryable) {
                self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
            }
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Detach `name` if we still hold it; failures are logged only.
    async fn release(&self, name: &str) {
        let cell = self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        if let Some(h) = cell.as_ref().and_then(|c| c.get()) {
            if let Err(e) = self.admin.detach(&h.detach_request()).await {
                tracing::warn!(volume = name, "detach failed: {e}");
            }
        }
    }

    fn held_cells(&self) -> Vec<(String, Arc<OnceCell<Held>>)> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter().map(|(n, c)| (n.clone(), c.clone())).collect()
    }

    fn cell(&self, name: &str) -> Arc<OnceCell<Held>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.entry(name.to_owned()).or_default().clone()
    }

    /// The newest map we can get; the one we have if the cluster does not answer.
    async fn fresh_map(&self) -> Arc<PlacementMap> {
        match self.placement.refresh().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("serving with placement map {}: refresh failed: {e}", self.placement.map().version);
                self.placement.map()
            }
        }
    }

    /// The attachment of `name` in gateway mode, attaching read-write on
    /// first use. `None` when there is no such volume.
    async fn gateway_attachment(&self, name: &str) -> Result<Option<Held>, DeviceError> {
        let cell = self.cell(name);
        let r = cell
            .get_or_try_init(|| async {
                let req = AttachVolume { name: name.to_owned(), read_only: false, force: false };
                let attachment = self.admin.attach(&req).await?;
                tracing::info!(volume = name, epoch = %attachment.epoch, "attached on first open");
                Ok::<_, ClientError>(Held { attachment, read_only: false })
            })
            .await;
        match r {
            Ok(h) => Ok(Some(h.clone())),
            Err(ClientError::Api(e)) if e.code == ErrorCode::NoSuchVolume => Ok(None),
            Err(ClientError::Api(e)) if e.code == ErrorCode::Conflict => Err(DeviceError::new(
                DeviceErrorKind::NotPermitted,
                format!("volume {name:?} has another writer; detach it there or attach with force ({e})"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    fn device(&self, held: &Held, map: &PlacementMap) -> Arc<RemoteVolume> {
        let volume = current(&held.attachment.volume, map);
        let spec = VolumeSpec {
            id: volume.id,
            size: volume.size,
            epoch: held.attachment.epoch,
            geometry: volume.geometry(),
            read_only: held.read_only,
        };
        let placement: Arc<dyn Placement> = self.placement.clone();
        Arc::new(RemoteVolume::new(spec, placement, self.pool.clone()))
    }

    fn check_open(&self) -> Result<(), DeviceError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(DeviceError::new(DeviceErrorKind::Shutdown, "volumes were detached: shutting down"));
        }
        Ok(())
    }
}

/// The newest view of an attached volume: the attach reply or the map,
/// whichever is larger (sizes only grow, so that one is newer).
fn current(attached: &VolumeInfo, map: &PlacementMap) -> VolumeInfo {
    let mut v = attached.clone();
    if let Some(m) = map.volumes.get(&attached.id) {
        v.size = v.size.max(m.size);
    }
    v
}

fn describe(v: &VolumeInfo) -> String {
    format!("ballast replicated volume, {} ({} bytes)", format_size(v.size), v.size)
}

impl ExportProvider for ClusterExports {
    type Device = RemoteVolume;

    async fn list(&self) -> Result<Vec<(String, String)>, DeviceError> {
        let map = self.fresh_map().await;
        let mut out: Vec<(String, String)> = match &self.mode {
            Mode::One { name } => {
                let held = self.cell(name).get().cloned();
                held.map(|h| (name.clone(), describe(&current(&h.attachment.volume, &map)))).into_iter().collect()
            }
            Mode::Gateway => map.volumes.values().map(|v| (v.name.clone(), describe(v))).collect(),
        };
        out.sort();
        Ok(out)
    }

    async fn open(&self, name: &str) -> Result<Option<Arc<RemoteVolume>>, DeviceError> {
        self.check_open()?;
        let held = match &self.mode {
            Mode::One { name: ours } => {
                if !name.is_empty() && name != ours {
                    return Ok(None);
                }
                match self.cell(ours).get().cloned() {
                    Some(h) => h,
                    None => return Err(DeviceError::new(DeviceErrorKind::Shutdown, "volume was detached")),
                }
            }
            Mode::Gateway => {
                if validate_name(name).is_err() {
                    return Ok(None);
                }
                match self.gateway_attachment(name).await? {
                    Some(h) => h,
                    None => return Ok(None),
                }
            }
        };
        if self.closed.load(Ordering::SeqCst) {
            // detach_all ran while we attached and may have missed this one.
            self.release(name).await;
            return Err(DeviceError::new(DeviceErrorKind::Shutdown, "volumes were detached: shutting down"));
        }
        let map = self.fresh_map().await;
        Ok(Some(self.device(&held, &map)))
    }
}

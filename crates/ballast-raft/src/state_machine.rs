//! openraft adapter: the shard state machine over any [`BlockStore`].
//!
//! Applying an entry writes its block changes, the last-applied log id, the
//! membership (when it changes) and any new fencing epoch in ONE batch, with
//! `Durability::Buffered`: the Raft log is the durable source, and after a
//! crash openraft re-applies from the persisted last-applied id. On a node
//! the block store keeps no write-ahead log (`RocksConfig::wal`), so a crash
//! loses the applied batches since the last flush; the store keeps a prefix
//! of them, each batch whole with its applied id, so the replay starts from
//! exactly the state those entries were first applied to. Building a
//! snapshot syncs (flushes) the store first, so the log is only ever purged
//! below a durable applied state. Snapshots: see [`crate::snapshot`].

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ballast_storage::{BlockStore, Durability, StorageError, WriteBatch};
use ballast_types::ShardId;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};

/// An openraft snapshot of a shard.
pub type RaftSnapshot = openraft::alias::SnapshotOf<TypeConfig, ShardSnapshot>;
use openraft::EntryPayload;
use serde::{Deserialize, Serialize};

use crate::apply::{self, keys};
use crate::codec;
use crate::divergence::Touched;
use crate::error::io_err;
use crate::meta::state::{self as meta_state, MetaState, SnapshotRecord as MetaSnapshotRecord, META_SHARD};
use crate::snapshot::{self, shard_range, ShardSnapshot, SnapshotHeader};
use crate::types::{LogId, NodeId, RangeDigest, ShardResponse, SnapshotMeta, StoredMembership, TypeConfig};

/// The persisted record of the current snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta,
    epochs: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
struct SmState {
    applied: Option<LogId>,
    membership: StoredMembership,
    /// Fencing epochs, the `kept_corrupt` mark, and the in-memory digests and
    /// touch record (see [`crate::apply`], [`crate::divergence`]).
    apply: apply::ApplyState,
    snapshot: Option<SnapshotRecord>,
}

/// The state machine of one shard replica — or, when opened with
/// [`ShardStateMachine::open_meta`], of the meta group: one type for both so
/// every group shares one `Raft` type, one transport and one router.
pub struct ShardStateMachine<S: BlockStore> {
    store: Arc<S>,
    shard: ShardId,
    /// Where received snapshots are spilled (one directory per shard).
    snapshot_dir: PathBuf,
    state: Arc<Mutex<SmState>>,
    /// `Some` for the meta group: every method delegates to [`crate::meta`].
    meta: Option<Arc<Mutex<MetaState>>>,
}

fn lock(state: &Mutex<SmState>) -> MutexGuard<'_, SmState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

fn storage(e: StorageError) -> io::Error {
    io_err(e)
}

const INSTALL_FILE: &str = "install.snap";

/// Where the replica of `shard` keeps received snapshots, under the node's
/// snapshot directory `base`. A transport receiving a snapshot for the shard
/// spills it here ([`crate::SnapshotReceiver::create`]) so installing it moves
/// no data.
pub fn shard_snapshot_dir(base: &Path, shard: ShardId) -> PathBuf {
    base.join(format!("shard-{}", shard.0))
}

impl<S: BlockStore> ShardStateMachine<S> {
    /// Open the state machine of `shard` on `store`: loads the applied state,
    /// and finishes a snapshot install that a crash interrupted. Blocking.
    pub fn open(store: Arc<S>, shard: ShardId, snapshot_dir: &Path) -> io::Result<Self> {
        let snapshot_dir = shard_snapshot_dir(snapshot_dir, shard);
        std::fs::create_dir_all(&snapshot_dir)?;
        if let Some(meta) = store.get_meta(&keys::installing(shard)).map_err(storage)? {
            let meta: SnapshotMeta = codec::decode(&meta)?;
            let path = snapshot_dir.join(INSTALL_FILE);
            tracing::warn!(%shard, "finishing a snapshot install interrupted by a crash");
            let snap = ShardSnapshot::from_file(&path)?;
            load_snapshot(&*store, shard, &meta, snap)?;
            std::fs::remove_file(&path)?;
        }
        let state = load_state(&*store, shard)?;
        Ok(Self { store, shard, snapshot_dir, state: Arc::new(Mutex::new(state)), meta: None })
    }

    /// Open the meta group's state machine on `store` (see [`crate::meta`]).
    /// Blocking.
    pub fn open_meta(store: Arc<S>, snapshot_dir: &Path) -> io::Result<Self> {
        let snapshot_dir = crate::meta::meta_snapshot_dir(snapshot_dir);
        std::fs::create_dir_all(&snapshot_dir)?;
        let meta = meta_state::load(&*store)?;
        Ok(Self {
            store,
            shard: META_SHARD,
            snapshot_dir,
            state: Arc::new(Mutex::new(SmState::default())),
            meta: Some(Arc::new(Mutex::new(meta))),
        })
    }

    pub(crate) fn meta_state(&self) -> Option<Arc<Mutex<MetaState>>> {
        self.meta.clone()
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Realign entries naming `node` are this replica's (see
    /// [`crate::ShardGroup::enable_realign`]).
    pub(crate) fn set_node(&self, node: NodeId) {
        lock(&self.state).apply.node = Some(node);
    }

    /// The digest recorded when the entry at `index` applied, if still kept.
    pub(crate) fn kept_digest(&self, index: u64) -> Option<RangeDigest> {
        lock(&self.state).apply.digests.get(index).cloned()
    }

    fn live_snapshot(&self, record: &SnapshotRecord) -> RaftSnapshot {
        let header = SnapshotHeader { shard: self.shard.0, epochs: record.epochs.clone() };
        Snapshot { meta: record.meta.clone(), snapshot: ShardSnapshot::live(self.store.clone(), header) }
    }
}

fn load_state<S: BlockStore>(store: &S, shard: ShardId) -> io::Result<SmState> {
    let get = |k: Vec<u8>| store.get_meta(&k).map_err(storage);
    let applied = get(keys::applied(shard))?.map(|v| codec::decode(&v)).transpose()?;
    let membership = get(keys::membership(shard))?.map(|v| codec::decode(&v)).transpose()?.unwrap_or_default();
    let snapshot = get(keys::snapshot(shard))?.map(|v| codec::decode(&v)).transpose()?;
    let mut epochs = BTreeMap::new();
    for (k, v) in store.scan_meta(&keys::epoch_prefix(shard)).map_err(storage)? {
        let volume = keys::epoch_volume(shard, &k).ok_or_else(|| io_err("malformed epoch key"))?;
        let epoch = <[u8; 8]>::try_from(v.as_slice()).map_err(|_| io_err("malformed epoch value"))?;
        epochs.insert(volume, u64::from_be_bytes(epoch));
    }
    let kept_corrupt = match get(keys::kept_corrupt(shard))? {
        Some(v) => u64::from_be_bytes(<[u8; 8]>::try_from(v.as_slice()).map_err(|_| io_err("malformed mark"))?),
        None => 0,
    };
    // Realigns can only be checked against entries applied from here on.
    let touched = Touched::starting_at(applied.as_ref().map_or(0, |l: &LogId| l.index));
    let apply = apply::ApplyState { epochs, kept_corrupt, touched, ..apply::ApplyState::default() };
    Ok(SmState { applied, membership, apply, snapshot })
}

/// Replace the shard's data and state with `snap` (file-backed), in bounded
/// batches. Crash-safe: the `installing` marker is set first and removed in
/// the final, synced batch; [`ShardStateMachine::open`] redoes an install
/// that did not finish.
fn load_snapshot<S: BlockStore>(
    store: &S,
    shard: ShardId,
    meta: &SnapshotMeta,
    mut snap: ShardSnapshot,
) -> io::Result<()> {
    if snap.header().shard() != shard {
        return Err(io_err(format!("snapshot of {} offered to {shard}", snap.header().shard())));
    }
    let mut first = WriteBatch::new();
    first.put_meta(keys::installing(shard), codec::encode(meta)?.to_vec());
    first.delete_range(shard_range(shard));
    for (k, _) in store.scan_meta(&keys::epoch_prefix(shard)).map_err(storage)? {
        first.delete_meta(k);
    }
    store.write(first, Durability::Sync).map_err(storage)?;
    while let Some(page) = snap.next_page()? {
        let mut b = WriteBatch::new();
        for (k, v) in page.decoded(shard)? {
            b.put(k, v);
        }
        store.write(b, Durability::Buffered).map_err(storage)?;
    }
    let mut last = WriteBatch::new();
    match &meta.last_log_id {
        Some(id) => last.put_meta(keys::applied(shard), codec::encode(id)?.to_vec()),
        None => last.delete_meta(keys::applied(shard)),
    }
    last.put_meta(keys::membership(shard), codec::encode(&meta.last_membership)?.to_vec());
    for (v, e) in snap.header().epochs() {
        last.put_meta(keys::epoch(shard, v), e.to_be_bytes().to_vec());
    }
    let record = SnapshotRecord { meta: meta.clone(), epochs: snap.header().epochs.clone() };
    last.put_meta(keys::snapshot(shard), codec::encode(&record)?.to_vec());
    last.delete_meta(keys::installing(shard));
    store.write(last, Durability::Sync).map_err(storage)
}

/// Delete everything a replica of `shard` keeps in `store`: its blocks, its
/// apply state, epochs and snapshot record, in one synced batch. For a
/// replica the group has removed; the replica must be stopped first. The
/// group's log is the log store's to delete
/// ([`LogStore::delete_group`](ballast_storage::LogStore::delete_group)).
pub fn destroy_replica<S: BlockStore>(store: &S, shard: ShardId) -> Result<(), StorageError> {
    let mut b = WriteBatch::new();
    b.delete_range(shard_range(shard));
    for (k, _) in store.scan_meta(&keys::prefix(shard))? {
        b.delete_meta(k);
    }
    store.write(b, Durability::Sync)
}

/// Apply committed entries; returns one answer per entry (`None` for entries
/// that carry no request). Blocking.
fn apply_entries<S: BlockStore>(
    store: &S,
    shard: ShardId,
    state: &Mutex<SmState>,
    entries: Vec<crate::types::Entry>,
) -> io::Result<Vec<Option<ShardResponse>>> {
    let mut st = lock(state);
    let mut out = Vec::with_capacity(entries.len());
    let mut batch = WriteBatch::new();
    let mut membership_changed = false;
    let flush = |batch: &mut WriteBatch, st: &SmState, membership_changed: &mut bool| -> io::Result<()> {
        if let Some(id) = &st.applied {
            batch.put_meta(keys::applied(shard), codec::encode(id)?.to_vec());
        }
        if std::mem::take(membership_changed) {
            batch.put_meta(keys::membership(shard), codec::encode(&st.membership)?.to_vec());
        }
        store.write(std::mem::take(batch), Durability::Buffered).map_err(storage)
    };
    for entry in entries {
        let answer = match &entry.payload {
            EntryPayload::Blank => None,
            EntryPayload::Membership(m) => {
                st.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                membership_changed = true;
                None
            }
            EntryPayload::Normal(req) => {
                // A read-modify-write must see every earlier change.
                if apply::reads_store(req) && !batch.is_empty() {
                    flush(&mut batch, &st, &mut membership_changed)?;
                }
                let index = entry.log_id.index;
                Some(apply::plan(store, shard, &mut st.apply, index, req, &mut batch).map_err(storage)?)
            }
        };
        st.applied = Some(entry.log_id);
        out.push(answer);
    }
    flush(&mut batch, &st, &mut membership_changed)?;
    Ok(out)
}

impl<S: BlockStore> RaftStateMachine<TypeConfig> for ShardStateMachine<S> {
    type SnapshotData = ShardSnapshot;
    type SnapshotBuilder = ShardSnapshotBuilder<S>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        if let Some(meta) = &self.meta {
            let st = meta_state::lock(meta);
            return Ok((st.applied, st.membership.clone()));
        }
        let st = lock(&self.state);
        Ok((st.applied, st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let items: Vec<EntryResponder<TypeConfig>> = entries.try_collect().await?;
        let mut responders = Vec::with_capacity(items.len());
        let mut batch = Vec::with_capacity(items.len());
        for (entry, responder) in items {
            batch.push(entry);
            responders.push(responder);
        }
        if let Some(meta) = self.meta.clone() {
            let local: Vec<bool> = responders.iter().map(Option::is_some).collect();
            let store = self.store.clone();
            let answers = blocking(move || meta_state::apply_entries(&*store, &meta, batch, &local)).await?;
            for (responder, answer) in responders.into_iter().zip(answers) {
                if let Some(r) = responder {
                    r.send(answer);
                }
            }
            return Ok(());
        }
        let (store, shard, state) = (self.store.clone(), self.shard, self.state.clone());
        let (start, entries) = (std::time::Instant::now(), batch.len() as u64);
        let answers = blocking(move || apply_entries(&*store, shard, &state, batch)).await?;
        let m = crate::metrics::metrics();
        m.apply_seconds.observe_since(start);
        m.applied_entries.add(entries);
        for (responder, answer) in responders.into_iter().zip(answers) {
            if let Some(r) = responder {
                r.send(answer.unwrap_or(ShardResponse::Done));
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let meta_record = self.meta.as_ref().map(|m| {
            let st = meta_state::lock(m);
            let meta = SnapshotMeta { last_log_id: st.applied, last_membership: st.membership.clone() };
            (m.clone(), MetaSnapshotRecord { meta, map: st.map.clone() })
        });
        let st = lock(&self.state);
        let meta = SnapshotMeta { last_log_id: st.applied, last_membership: st.membership.clone() };
        let epochs = st.apply.epochs.iter().map(|(v, e)| (v.0, *e)).collect();
        ShardSnapshotBuilder {
            store: self.store.clone(),
            shard: self.shard,
            record: SnapshotRecord { meta, epochs },
            state: self.state.clone(),
            meta: meta_record,
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: ShardSnapshot) -> Result<(), io::Error> {
        if let Some(state) = self.meta.clone() {
            let (store, meta) = (self.store.clone(), meta.clone());
            blocking(move || meta_state::install(&*store, &state, &meta, snapshot)).await?;
            tracing::info!("meta group installed a snapshot");
            return Ok(());
        }
        let (store, shard, dir, meta) = (self.store.clone(), self.shard, self.snapshot_dir.clone(), meta.clone());
        let state = blocking(move || {
            let spilled = match snapshot.file() {
                Some(p) if p.parent() == Some(dir.as_path()) => snapshot,
                _ => snapshot::spill(snapshot, &dir)?,
            };
            let src = spilled.file().map(Path::to_path_buf).ok_or_else(|| io_err("spilled snapshot has no file"))?;
            let target = dir.join(INSTALL_FILE);
            drop(spilled);
            std::fs::rename(&src, &target)?;
            snapshot::sync_dir(&dir)?;
            load_snapshot(&*store, shard, &meta, ShardSnapshot::from_file(&target)?)?;
            std::fs::remove_file(&target)?;
            load_state(&*store, shard)
        })
        .await?;
        {
            // The data changed wholesale: digests and the touch record start
            // afresh at the snapshot (`load_state`); the node stays.
            let mut st = lock(&self.state);
            let node = st.apply.node;
            *st = state;
            st.apply.node = node;
        }
        tracing::info!(shard = %self.shard, last = ?meta_last(&self.state), "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<RaftSnapshot>, io::Error> {
        if let Some(meta) = &self.meta {
            let record = meta_state::lock(meta).snapshot.clone();
            return record.map(|r| Ok(Snapshot { snapshot: meta_state::snapshot_data(&r)?, meta: r.meta })).transpose();
        }
        let record = lock(&self.state).snapshot.clone();
        Ok(record.map(|r| self.live_snapshot(&r)))
    }
}

fn meta_last(state: &Mutex<SmState>) -> Option<LogId> {
    lock(state).snapshot.as_ref().and_then(|r| r.meta.last_log_id)
}

/// Builds a snapshot as of the applied state captured when it was created.
pub struct ShardSnapshotBuilder<S: BlockStore> {
    store: Arc<S>,
    shard: ShardId,
    record: SnapshotRecord,
    state: Arc<Mutex<SmState>>,
    /// The meta group's state and the record to snapshot, for the meta group.
    meta: Option<(Arc<Mutex<MetaState>>, MetaSnapshotRecord)>,
}

impl<S: BlockStore> RaftSnapshotBuilder<TypeConfig> for ShardSnapshotBuilder<S> {
    type SnapshotData = ShardSnapshot;

    async fn build_snapshot(&mut self) -> Result<RaftSnapshot, io::Error> {
        if let Some((state, record)) = self.meta.clone() {
            let store = self.store.clone();
            let r = blocking(move || meta_state::build_snapshot(&*store, &state, record)).await?;
            return Ok(Snapshot { snapshot: meta_state::snapshot_data(&r)?, meta: r.meta });
        }
        let (store, shard, state, record) = (self.store.clone(), self.shard, self.state.clone(), self.record.clone());
        let record = blocking(move || {
            // Everything applied so far becomes durable: the log below
            // `record.meta.last_log_id` may now be purged.
            store.sync().map_err(storage)?;
            let mut st = lock(&state);
            let newer = st.snapshot.as_ref().map(|r| &r.meta.last_log_id) < Some(&record.meta.last_log_id);
            if !newer {
                // An install or another build got further meanwhile: keep it.
                return st.snapshot.clone().ok_or_else(|| io_err("snapshot record vanished"));
            }
            let mut b = WriteBatch::new();
            b.put_meta(keys::snapshot(shard), codec::encode(&record)?.to_vec());
            store.write(b, Durability::Sync).map_err(storage)?;
            st.snapshot = Some(record.clone());
            Ok(record)
        })
        .await?;
        let header = SnapshotHeader { shard: self.shard.0, epochs: record.epochs.clone() };
        Ok(Snapshot { meta: record.meta, snapshot: ShardSnapshot::live(self.store.clone(), header) })
    }
}

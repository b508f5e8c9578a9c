//! The meta group's replicated state on disk: the whole [`ClusterMap`] with
//! the last-applied log id and membership, as ONE catalog record written in
//! ONE batch per apply. The map is small (thousands of entries), so writing
//! it whole keeps "the map is exactly as of `applied`" trivially true, which
//! matters because meta commands, unlike block writes, are not idempotent:
//! after a crash openraft re-applies exactly the entries after `applied`.
//!
//! Durability: applies are written `Logged` (the Raft log is the durable
//! source; a lost apply is redone from it, but a process crash does not
//! roll the map back even on a node whose block writes skip the WAL: the
//! reconciler acts on the map it finds after a restart); a snapshot record and an
//! installed snapshot are written `Sync`, so the log is purged only below a
//! durable map. A snapshot is the serialized map as a single in-memory page
//! of a [`ShardSnapshot`] (header shard [`META_SHARD`]), so transports carry
//! it like any shard snapshot.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use ballast_storage::{BlockStore, Durability, StorageError, WriteBatch};
use ballast_types::{BlockKey, ShardId, VolumeId};
use openraft::EntryPayload;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::map::{ClusterMap, ClusterMapV1, MetaFailure, MetaReply};
use crate::codec;
use crate::error::io_err;
use crate::snapshot::{ShardSnapshot, SnapshotHeader, SnapshotPage};
use crate::types::{Entry, LogId, ShardRequest, ShardResponse, SnapshotMeta, StoredMembership};

/// The pseudo-shard naming the meta group in snapshot headers and spill
/// directories. No data lives under it.
pub const META_SHARD: ShardId = ShardId(u32::MAX);

const STATE_KEY: &[u8] = b"meta/state";
const SNAPSHOT_KEY: &[u8] = b"meta/snapshot";
/// Replies kept for local proposers that never picked theirs up.
const MAX_REPLIES: usize = 4096;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StateRecord {
    applied: Option<LogId>,
    membership: StoredMembership,
    map: ClusterMap,
}

/// The persisted current snapshot: the map as of `meta.last_log_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub meta: SnapshotMeta,
    pub map: ClusterMap,
}

/// [`StateRecord`] and [`SnapshotRecord`] as stored before
/// `ClusterMap::last_node`: read when the current layout does not decode.
#[derive(Deserialize)]
struct StateRecordV1 {
    applied: Option<LogId>,
    membership: StoredMembership,
    map: ClusterMapV1,
}

#[derive(Deserialize)]
struct SnapshotRecordV1 {
    meta: SnapshotMeta,
    map: ClusterMapV1,
}

impl From<StateRecordV1> for StateRecord {
    fn from(old: StateRecordV1) -> Self {
        Self { applied: old.applied, membership: old.membership, map: old.map.into() }
    }
}

impl From<SnapshotRecordV1> for SnapshotRecord {
    fn from(old: SnapshotRecordV1) -> Self {
        Self { meta: old.meta, map: old.map.into() }
    }
}

/// Decode `v` in the current layout `T`, else in the layout `V1` it had
/// before `ClusterMap::last_node` (converted). The error is the current
/// layout's.
fn decode_either<T: DeserializeOwned, V1: DeserializeOwned + Into<T>>(v: &[u8]) -> io::Result<T> {
    codec::decode::<T>(v).or_else(|e| Ok(codec::decode::<V1>(v).map_err(|_| e)?.into()))
}

/// In-memory state of the meta state machine, shared with [`super::MetaGroup`].
#[derive(Debug, Default)]
pub(crate) struct MetaState {
    pub applied: Option<LogId>,
    pub membership: StoredMembership,
    pub map: ClusterMap,
    pub snapshot: Option<SnapshotRecord>,
    /// Replies to entries proposed through this replica, by log index.
    pub replies: BTreeMap<u64, MetaReply>,
}

pub(crate) fn lock(state: &Mutex<MetaState>) -> MutexGuard<'_, MetaState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn storage(e: StorageError) -> io::Error {
    io_err(e)
}

/// Load the state from `store` (empty on a fresh disk). Blocking.
pub(crate) fn load<S: BlockStore>(store: &S) -> io::Result<MetaState> {
    let rec: StateRecord = match store.get_meta(STATE_KEY).map_err(storage)? {
        Some(v) => decode_either::<StateRecord, StateRecordV1>(&v)?,
        None => StateRecord::default(),
    };
    let snapshot = store
        .get_meta(SNAPSHOT_KEY)
        .map_err(storage)?
        .map(|v| decode_either::<SnapshotRecord, SnapshotRecordV1>(&v))
        .transpose()?;
    Ok(MetaState { applied: rec.applied, membership: rec.membership, map: rec.map, snapshot, replies: BTreeMap::new() })
}

fn put_state(b: &mut WriteBatch, st: &MetaState) -> io::Result<()> {
    let rec = StateRecord { applied: st.applied, membership: st.membership.clone(), map: st.map.clone() };
    b.put_meta(STATE_KEY.to_vec(), codec::encode(&rec)?.to_vec());
    Ok(())
}

/// Apply committed entries: meta commands change the map; `local[i]` says
/// whether entry `i` has a waiting proposer here (its reply is kept in
/// `replies`). One batch for the whole call. Blocking.
pub(crate) fn apply_entries<S: BlockStore>(
    store: &S,
    state: &Mutex<MetaState>,
    entries: Vec<Entry>,
    local: &[bool],
) -> io::Result<Vec<ShardResponse>> {
    let mut st = lock(state);
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let answer = match &entry.payload {
            EntryPayload::Blank => ShardResponse::Done,
            EntryPayload::Membership(m) => {
                st.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                ShardResponse::Done
            }
            EntryPayload::Normal(ShardRequest::Meta(cmd)) => {
                let result = st.map.apply(cmd);
                let reply =
                    MetaReply { version: st.map.version, result: result.map_err(|e| MetaFailure::from_api(&e)) };
                if local.get(i).copied().unwrap_or(false) {
                    st.replies.insert(entry.log_id.index, reply);
                    while st.replies.len() > MAX_REPLIES {
                        st.replies.pop_first();
                    }
                }
                ShardResponse::Done
            }
            EntryPayload::Normal(ShardRequest::Noop) => ShardResponse::Done,
            EntryPayload::Normal(_) => {
                ShardResponse::Invalid { reason: "a block request sent to the meta group".into() }
            }
        };
        st.applied = Some(entry.log_id);
        out.push(answer);
    }
    let mut b = WriteBatch::new();
    put_state(&mut b, &st)?;
    store.write(b, Durability::Logged).map_err(storage)?;
    Ok(out)
}

fn map_key() -> [u8; ballast_types::BLOCK_KEY_LEN] {
    BlockKey { shard: META_SHARD, volume: VolumeId(0), chunk: 0, block: 0 }.encode()
}

/// The transportable form of a snapshot record.
pub(crate) fn snapshot_data(record: &SnapshotRecord) -> io::Result<ShardSnapshot> {
    let header = SnapshotHeader { shard: META_SHARD.0, epochs: Vec::new() };
    let page = SnapshotPage { blocks: vec![(map_key(), codec::encode(&record.map)?)] };
    Ok(ShardSnapshot::in_memory(header, vec![page]))
}

/// Make everything applied durable and record `record` as the current
/// snapshot (unless a newer one exists). Blocking.
pub(crate) fn build_snapshot<S: BlockStore>(
    store: &S,
    state: &Mutex<MetaState>,
    record: SnapshotRecord,
) -> io::Result<SnapshotRecord> {
    store.sync().map_err(storage)?;
    let mut st = lock(state);
    let newer = st.snapshot.as_ref().map(|r| &r.meta.last_log_id) < Some(&record.meta.last_log_id);
    if !newer {
        return st.snapshot.clone().ok_or_else(|| io_err("snapshot record vanished"));
    }
    let mut b = WriteBatch::new();
    b.put_meta(SNAPSHOT_KEY.to_vec(), codec::encode(&record)?.to_vec());
    store.write(b, Durability::Sync).map_err(storage)?;
    st.snapshot = Some(record.clone());
    Ok(record)
}

/// Replace the state with the snapshot's map, in one synced batch. Blocking.
pub(crate) fn install<S: BlockStore>(
    store: &S,
    state: &Mutex<MetaState>,
    meta: &SnapshotMeta,
    mut snapshot: ShardSnapshot,
) -> io::Result<()> {
    if snapshot.header().shard() != META_SHARD {
        return Err(io_err(format!("snapshot of {} offered to the meta group", snapshot.header().shard())));
    }
    let mut map = None;
    while let Some(page) = snapshot.next_page()? {
        for (_, v) in page.decoded(META_SHARD)? {
            map = Some(decode_either::<ClusterMap, ClusterMapV1>(&v)?);
        }
    }
    let map = map.ok_or_else(|| io_err("meta snapshot without a map"))?;
    let record = SnapshotRecord { meta: meta.clone(), map: map.clone() };
    let rec = StateRecord { applied: meta.last_log_id, membership: meta.last_membership.clone(), map };
    let mut b = WriteBatch::new();
    b.put_meta(STATE_KEY.to_vec(), codec::encode(&rec)?.to_vec());
    b.put_meta(SNAPSHOT_KEY.to_vec(), codec::encode(&record)?.to_vec());
    let mut st = lock(state);
    store.write(b, Durability::Sync).map_err(storage)?;
    st.applied = rec.applied;
    st.membership = rec.membership;
    st.map = rec.map;
    st.snapshot = Some(record);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::map::{MetaCommand, MetaNode, MetaOutcome};
    use ballast_storage::MemStore;
    use openraft::entry::RaftEntry;

    fn entry(index: u64, cmd: MetaCommand) -> Entry {
        let log_id = LogId::new(
            <openraft::impls::leader_id_adv::LeaderId<u64, u64> as openraft::vote::RaftLeaderId>::new(1, 1),
            index,
        );
        Entry::new_normal(log_id, ShardRequest::Meta(cmd))
    }

    fn node(id: u64) -> MetaNode {
        MetaNode {
            id,
            addr: format!("n{id}:7000"),
            zone: None,
            up: true,
            disks: vec![("/d".into(), 1, 0)],
            draining: false,
        }
    }

    #[test]
    fn applied_map_reloads_and_travels_as_a_snapshot() {
        let store = MemStore::new();
        let state = Mutex::new(load(&store).expect("load empty"));
        let init = MetaCommand::InitCluster { cluster_id: 9, default_pool: None, nodes: vec![node(1), node(2)] };
        let refused = MetaCommand::SetNodeState { node: 7, up: false };
        let answers =
            apply_entries(&store, &state, vec![entry(1, init), entry(2, refused)], &[true, false]).expect("apply");
        assert_eq!(answers, vec![ShardResponse::Done, ShardResponse::Done]);
        {
            let st = lock(&state);
            assert_eq!(st.replies.len(), 1, "only local proposals keep a reply");
            assert_eq!(st.replies[&1].clone().into_result(), Ok(MetaOutcome::Cluster { cluster_id: 9 }));
        }
        // The map and the applied id were written together.
        let reloaded = load(&store).expect("reload");
        assert_eq!(reloaded.map, lock(&state).map);
        assert_eq!(reloaded.applied.map(|l| l.index), Some(2));

        // Build a snapshot and install it on a fresh replica.
        let record = {
            let st = lock(&state);
            let meta = SnapshotMeta { last_log_id: st.applied, last_membership: st.membership.clone() };
            SnapshotRecord { meta, map: st.map.clone() }
        };
        let built = build_snapshot(&store, &state, record.clone()).expect("build");
        assert_eq!(built, record);
        let other = MemStore::new();
        let fresh = Mutex::new(load(&other).expect("load empty"));
        install(&other, &fresh, &record.meta, snapshot_data(&record).expect("data")).expect("install");
        let installed = load(&other).expect("reload");
        assert_eq!((installed.map, installed.applied), (record.map.clone(), record.meta.last_log_id));
        assert_eq!(installed.snapshot, Some(record));
    }
}

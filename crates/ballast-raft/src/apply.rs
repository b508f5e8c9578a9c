//! How a shard request becomes block changes: fencing, validation, and the
//! [`VolumeView`] mapping. Deterministic given the store and the epochs, so
//! every replica computes the same batch and the same answer.
//!
//! **Damaged blocks.** A block whose stored value fails its checksum is
//! damaged on this replica only; its peers hold good copies. Applying must
//! neither stop the replica nor ever turn the damage into data a reader
//! would take for good:
//! - A write or zero covering a whole damaged block replaces it (no read).
//! - A piece smaller than a block over a damaged block cannot be merged: the
//!   block is left as it is (it keeps failing its checksum, so reads of it
//!   are answered from a peer and repaired), the entry's index is recorded as
//!   the shard's `kept_corrupt` mark (persisted with the batch), and
//!   `ballast_apply_kept_corrupt_total` counts it. Writing the piece over
//!   zeros instead would hand out made-up bytes as data.
//! - [`ShardRequest::Repair`] writes its copy only where the stored value
//!   fails its checksum, and only when its copy (read at `as_of` on a
//!   healthy replica) is not older than the `kept_corrupt` mark. Why that is
//!   enough: any entry after `as_of` that touched the block either replaced
//!   it whole (the value is good now: the repair skips it), deleted it (a
//!   hole is not damaged: skipped), or was a partial piece over the damage
//!   (the mark is now above `as_of`: skipped; a later repair with a fresher
//!   copy succeeds). So a repair never puts back a value older than the
//!   replica's log says the block has. (Left open: a block that was written
//!   after `as_of` while still good and then damaged before the repair
//!   applied — a window of one round trip — would get the older copy.)
//!
//! **Divergent replicas.** [`ShardRequest::Digest`] and
//! [`ShardRequest::Realign`] are planned in [`crate::divergence`]: a digest
//! reads the store and changes nothing; a realign writes on its target
//! only, and only blocks no entry after its digest touched. Every `Write`,
//! `Zero`, `DeleteVolume` and `Repair` records the chunks it touched in
//! [`ApplyState::touched`] for that check (refused writes change nothing
//! and are not recorded).

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use ballast_metrics::Counter;
use ballast_storage::{BlockStore, KeyRange, StorageError, VolumeView, WriteBatch};
use ballast_types::{BlockKey, Geometry, ShardId, VolumeId, BLOCK_SIZE};

use crate::divergence::{self, Digests, RealignGuard, Touched};
use crate::types::{NodeId, RepairCause, ShardRequest, ShardResponse};

/// Largest byte span one request may touch (the client splits at chunk
/// boundaries, so real requests are far smaller).
pub const MAX_REQUEST_SPAN: u64 = 64 << 20;

/// Catalog keys of a shard's replicated state, next to its blocks.
pub(crate) mod keys {
    use ballast_types::{ShardId, VolumeId};

    pub fn prefix(shard: ShardId) -> Vec<u8> {
        let mut k = b"shard/".to_vec();
        k.extend_from_slice(&shard.0.to_be_bytes());
        k.push(b'/');
        k
    }
    fn named(shard: ShardId, name: &str) -> Vec<u8> {
        let mut k = prefix(shard);
        k.extend_from_slice(name.as_bytes());
        k
    }
    /// Last applied log id.
    pub fn applied(shard: ShardId) -> Vec<u8> {
        named(shard, "applied")
    }
    /// Log index of the last entry that left a damaged block as it was
    /// (a partial write over it): u64 BE. See the module docs.
    pub fn kept_corrupt(shard: ShardId) -> Vec<u8> {
        named(shard, "kept_corrupt")
    }
    /// Last applied membership.
    pub fn membership(shard: ShardId) -> Vec<u8> {
        named(shard, "membership")
    }
    /// The current snapshot's meta and epochs.
    pub fn snapshot(shard: ShardId) -> Vec<u8> {
        named(shard, "snapshot")
    }
    /// Present while a snapshot install is under way (crash recovery).
    pub fn installing(shard: ShardId) -> Vec<u8> {
        named(shard, "installing")
    }
    pub fn epoch_prefix(shard: ShardId) -> Vec<u8> {
        named(shard, "epoch/")
    }
    /// Highest writer epoch seen for `volume`: u64 BE.
    pub fn epoch(shard: ShardId, volume: VolumeId) -> Vec<u8> {
        let mut k = epoch_prefix(shard);
        k.extend_from_slice(&volume.0.to_be_bytes());
        k
    }
    pub fn epoch_volume(shard: ShardId, key: &[u8]) -> Option<VolumeId> {
        let p = epoch_prefix(shard);
        let rest = key.strip_prefix(p.as_slice())?;
        Some(VolumeId(u64::from_be_bytes(rest.try_into().ok()?)))
    }
}

/// Whether planning `req` reads the store (read-modify-write of partial
/// blocks). Requests that do not can be batched with earlier ones unflushed.
// `is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.85.
#[allow(clippy::manual_is_multiple_of)]
pub(crate) fn reads_store(req: &ShardRequest) -> bool {
    let bs = BLOCK_SIZE as u64;
    match req {
        ShardRequest::Write { offset, data, .. } => offset % bs != 0 || data.len() as u64 % bs != 0,
        ShardRequest::Zero { offset, len, .. } => offset % bs != 0 || len % bs != 0,
        // Reads each block's stored value to decide.
        ShardRequest::Repair { .. } | ShardRequest::Digest { .. } | ShardRequest::Realign { .. } => true,
        ShardRequest::DeleteVolume { .. } | ShardRequest::Noop | ShardRequest::Meta(_) => false,
    }
}

struct IntegrityMetrics {
    repaired: [Arc<Counter>; 2],
    kept_corrupt: Arc<Counter>,
}

static INTEGRITY: LazyLock<IntegrityMetrics> = LazyLock::new(|| {
    let r = ballast_metrics::global();
    let help = "Damaged blocks this replica replaced with a healthy copy through a repair entry, by cause \
                (`read`: a client read met the damage on the leader; `scrub`: a scrub pass found it).";
    IntegrityMetrics {
        repaired: [
            r.counter("ballast_blocks_repaired_total", help, &[("cause", "read")]),
            r.counter("ballast_blocks_repaired_total", help, &[("cause", "scrub")]),
        ],
        kept_corrupt: r.counter(
            "ballast_apply_kept_corrupt_total",
            "Partial-block writes or zeroes this replica could not merge because the stored block failed \
             its checksum (the block stays damaged until repaired from a peer).",
            &[],
        ),
    }
});

/// Register the repair series (at zero) so a scrape lists them before the
/// first repair.
pub fn register_metrics() {
    LazyLock::force(&INTEGRITY);
    divergence::register_metrics();
}

/// The shard's apply state that [`plan`] reads and updates: the replicated
/// part (epochs, the mark) is persisted with the batches; the rest lives in
/// memory and starts afresh when the state machine opens.
#[derive(Debug, Default)]
pub(crate) struct ApplyState {
    pub epochs: BTreeMap<VolumeId, u64>,
    /// The `kept_corrupt` mark (0: never).
    pub kept_corrupt: u64,
    /// The node this replica runs on, once told
    /// ([`crate::ShardGroup::enable_realign`]): realigns naming it are its own.
    pub node: Option<NodeId>,
    /// The digests this replica recorded (in memory, bounded).
    pub digests: Digests,
    /// The last entry that touched each chunk, from the floor on (in memory, bounded).
    pub touched: Touched,
}

/// Record that the entry at `index` left damaged blocks as they were.
fn keep_corrupt(shard: ShardId, st: &mut ApplyState, batch: &mut WriteBatch, index: u64, kept: &[BlockKey]) {
    if kept.is_empty() {
        return;
    }
    tracing::warn!(%shard, index, blocks = kept.len(), first = ?kept[0], "a partial write met a damaged block; it stays damaged until repaired from a peer");
    INTEGRITY.kept_corrupt.add(kept.len() as u64);
    if index > st.kept_corrupt {
        st.kept_corrupt = index;
        batch.put_meta(keys::kept_corrupt(shard), index.to_be_bytes().to_vec());
    }
}

/// The changes of a [`ShardRequest::Repair`]: a block is written only where
/// the stored value is damaged, and only when the copy is not older than the
/// `kept_corrupt` mark. Returns how many blocks it replaces.
fn plan_repair<S: BlockStore>(
    store: &S,
    shard: ShardId,
    st: &ApplyState,
    volume: VolumeId,
    as_of: u64,
    blocks: &[crate::types::RepairBlock],
    batch: &mut WriteBatch,
) -> Result<u64, StorageError> {
    let geometry = Geometry::default();
    let mut replaced = 0;
    for b in blocks {
        let key = geometry.key(shard, volume, b.block);
        match store.get(&key) {
            Ok(_) => continue,
            Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => {}
            Err(e) => return Err(e),
        }
        if as_of < st.kept_corrupt {
            tracing::info!(%shard, ?key, as_of, kept_corrupt = st.kept_corrupt, "repair copy older than a partial write that met the damage; left for a fresher repair");
            continue;
        }
        match &b.data {
            Some(d) if d.len() == BLOCK_SIZE as usize => batch.put(key, d.clone()),
            Some(_) => continue,
            None => batch.delete(key),
        }
        replaced += 1;
    }
    Ok(replaced)
}

fn volume_range(shard: ShardId, volume: VolumeId) -> KeyRange {
    let start = BlockKey { shard, volume, chunk: 0, block: 0 };
    let end = match volume.0.checked_add(1) {
        Some(v) => Some(BlockKey { shard, volume: VolumeId(v), chunk: 0, block: 0 }),
        None => shard.0.checked_add(1).map(|s| BlockKey { shard: ShardId(s), volume: VolumeId(0), chunk: 0, block: 0 }),
    };
    KeyRange { start, end }
}

/// Admit a writer of `volume` at `epoch`: `Err(response)` if fenced; records a
/// newer epoch in `epochs` and in `batch`.
fn admit(
    shard: ShardId,
    epochs: &mut BTreeMap<VolumeId, u64>,
    batch: &mut WriteBatch,
    volume: VolumeId,
    epoch: u64,
) -> Result<(), ShardResponse> {
    let current = epochs.get(&volume).copied().unwrap_or(0);
    if epoch < current {
        return Err(ShardResponse::Fenced { current });
    }
    if epoch > current {
        epochs.insert(volume, epoch);
        batch.put_meta(keys::epoch(shard, volume), epoch.to_be_bytes().to_vec());
    }
    Ok(())
}

fn check_span(offset: u64, len: u64) -> Result<(), ShardResponse> {
    if len > MAX_REQUEST_SPAN {
        return Err(ShardResponse::Invalid { reason: format!("request spans {len} bytes (max {MAX_REQUEST_SPAN})") });
    }
    if offset.checked_add(len).is_none() {
        return Err(ShardResponse::Invalid { reason: format!("range {offset}+{len} overflows") });
    }
    Ok(())
}

/// Append the changes of `req`, the entry at log `index`, to `batch`
/// (reading `store` for partial blocks) and return the answer. Storage
/// errors other than a damaged block are not answers: they stop the replica
/// (its state would otherwise diverge from its peers').
pub(crate) fn plan<S: BlockStore>(
    store: &S,
    shard: ShardId,
    st: &mut ApplyState,
    index: u64,
    req: &ShardRequest,
    batch: &mut WriteBatch,
) -> Result<ShardResponse, StorageError> {
    let view = |volume| VolumeView::new(store, shard, volume, Geometry::default());
    let outcome = match req {
        ShardRequest::Write { volume, epoch, offset, data } => {
            match check_span(*offset, data.len() as u64)
                .and_then(|_| admit(shard, &mut st.epochs, batch, *volume, *epoch))
            {
                Err(refusal) => refusal,
                Ok(()) => {
                    let (changes, kept) = view(*volume).write_keeping_corrupt(*offset, data)?;
                    batch.ops.extend(changes.ops);
                    keep_corrupt(shard, st, batch, index, &kept);
                    st.touched.range(*volume, *offset, data.len() as u64, index);
                    ShardResponse::Done
                }
            }
        }
        ShardRequest::Zero { volume, epoch, offset, len, punch } => {
            match check_span(*offset, *len).and_then(|_| admit(shard, &mut st.epochs, batch, *volume, *epoch)) {
                Err(refusal) => refusal,
                Ok(()) => {
                    let (changes, kept) = view(*volume).zero_keeping_corrupt(*offset, *len, *punch)?;
                    batch.ops.extend(changes.ops);
                    keep_corrupt(shard, st, batch, index, &kept);
                    st.touched.range(*volume, *offset, *len, index);
                    ShardResponse::Done
                }
            }
        }
        ShardRequest::Repair { volume, as_of, cause, blocks } => {
            let replaced = plan_repair(store, shard, st, *volume, *as_of, blocks, batch)?;
            st.touched.blocks(*volume, blocks.iter().map(|b| b.block), index);
            if replaced > 0 {
                let i = match cause {
                    RepairCause::Read => 0,
                    RepairCause::Scrub => 1,
                };
                INTEGRITY.repaired[i].add(replaced);
                tracing::info!(%shard, %volume, index, blocks = replaced, cause = cause.as_str(), "damaged blocks repaired from a healthy replica");
            }
            ShardResponse::Done
        }
        ShardRequest::DeleteVolume { volume } => {
            // The epoch stays: a fenced writer of a deleted volume stays fenced.
            batch.delete_range(volume_range(shard, *volume));
            st.touched.volume(*volume, index);
            ShardResponse::Done
        }
        ShardRequest::Noop => ShardResponse::Done,
        ShardRequest::Meta(_) => ShardResponse::Invalid { reason: "a meta command sent to a shard group".into() },
        ShardRequest::Digest { from, max_blocks } => {
            divergence::digest(store, shard, index, *from, *max_blocks, &mut st.digests)?;
            ShardResponse::Done
        }
        ShardRequest::Realign { volume, target, since, blocks } => {
            let guard = RealignGuard { node: st.node, touched: &st.touched };
            divergence::plan_realign(store, shard, guard, index, *volume, *target, *since, blocks, batch)?
        }
    };
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_storage::{Durability, MemStore, Segment};
    use bytes::Bytes;

    fn apply(store: &MemStore, st: &mut ApplyState, req: ShardRequest) -> ShardResponse {
        apply_at(store, st, 0, req)
    }

    fn apply_at(store: &MemStore, st: &mut ApplyState, index: u64, req: ShardRequest) -> ShardResponse {
        let mut b = WriteBatch::new();
        let r = plan(store, ShardId(1), st, index, &req, &mut b).expect("plan");
        store.write(b, Durability::Buffered).expect("write");
        r
    }

    #[test]
    fn fencing_refuses_older_epochs_and_remembers_the_newest() {
        let store = MemStore::new();
        let mut epochs = ApplyState::default();
        let w = |epoch, byte| ShardRequest::Write {
            volume: VolumeId(5),
            epoch,
            offset: 0,
            data: Bytes::from(vec![byte; 4096]),
        };
        assert_eq!(apply(&store, &mut epochs, w(2, 1)), ShardResponse::Done);
        assert_eq!(apply(&store, &mut epochs, w(3, 2)), ShardResponse::Done);
        assert_eq!(apply(&store, &mut epochs, w(2, 9)), ShardResponse::Fenced { current: 3 });
        let view = VolumeView::new(&store, ShardId(1), VolumeId(5), Geometry::default());
        assert_eq!(view.read(0, 4096).expect("read"), vec![Segment::Data(Bytes::from(vec![2u8; 4096]))]);
        assert_eq!(
            store.get_meta(&keys::epoch(ShardId(1), VolumeId(5))).expect("meta"),
            Some(3u64.to_be_bytes().to_vec())
        );
        let z = ShardRequest::Zero { volume: VolumeId(5), epoch: 1, offset: 0, len: 4096, punch: true };
        assert_eq!(apply(&store, &mut epochs, z), ShardResponse::Fenced { current: 3 });
        // Other volumes are unaffected.
        let other = ShardRequest::Write { volume: VolumeId(6), epoch: 0, offset: 10, data: Bytes::from_static(b"x") };
        assert_eq!(apply(&store, &mut epochs, other), ShardResponse::Done);
    }

    #[test]
    fn delete_volume_drops_only_that_volume_and_bad_ranges_are_invalid() {
        let store = MemStore::new();
        let mut epochs = ApplyState::default();
        for v in [4, 5, u64::MAX] {
            let w =
                ShardRequest::Write { volume: VolumeId(v), epoch: 0, offset: 8192, data: Bytes::from(vec![7u8; 8192]) };
            apply(&store, &mut epochs, w);
        }
        apply(&store, &mut epochs, ShardRequest::DeleteVolume { volume: VolumeId(5) });
        apply(&store, &mut epochs, ShardRequest::DeleteVolume { volume: VolumeId(u64::MAX) });
        let all = store.scan(&crate::snapshot::shard_range(ShardId(1)), 100).expect("scan");
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|(k, _)| k.volume == VolumeId(4)));
        let bad = ShardRequest::Zero { volume: VolumeId(4), epoch: 0, offset: u64::MAX - 1, len: 10, punch: false };
        assert!(matches!(apply(&store, &mut epochs, bad), ShardResponse::Invalid { .. }));
        let huge = ShardRequest::Zero { volume: VolumeId(4), epoch: 0, offset: 0, len: 1 << 40, punch: true };
        assert!(matches!(apply(&store, &mut epochs, huge), ShardResponse::Invalid { .. }));
    }

    fn block_of(byte: u8) -> Bytes {
        Bytes::from(vec![byte; BLOCK_SIZE as usize])
    }

    fn stored(store: &MemStore, block: u64) -> Result<Option<Bytes>, StorageError> {
        store.get(&Geometry::default().key(ShardId(1), VolumeId(5), block))
    }

    fn repair(as_of: u64, blocks: Vec<(u64, Option<Bytes>)>) -> ShardRequest {
        ShardRequest::Repair {
            volume: VolumeId(5),
            as_of,
            cause: RepairCause::Scrub,
            blocks: blocks.into_iter().map(|(block, data)| crate::types::RepairBlock { block, data }).collect(),
        }
    }

    #[test]
    fn repair_replaces_only_damaged_blocks_and_leaves_good_ones() {
        let store = MemStore::new();
        let mut st = ApplyState::default();
        let w =
            ShardRequest::Write { volume: VolumeId(5), epoch: 1, offset: 0, data: Bytes::from(vec![1u8; 4 * 4096]) };
        apply_at(&store, &mut st, 1, w);
        store.corrupt(&Geometry::default().key(ShardId(1), VolumeId(5), 1));
        store.corrupt(&Geometry::default().key(ShardId(1), VolumeId(5), 3));
        assert!(matches!(stored(&store, 1), Err(StorageError::Corrupt { .. })));
        // Block 0 is good here: the repair's (different) copy must not replace it.
        // Block 1 is damaged: replaced. Block 3 is damaged and the healthy copy is a hole.
        let r = repair(1, vec![(0, Some(block_of(9))), (1, Some(block_of(1))), (3, None)]);
        assert_eq!(apply_at(&store, &mut st, 2, r), ShardResponse::Done);
        assert_eq!(stored(&store, 0).expect("good"), Some(block_of(1)));
        assert_eq!(stored(&store, 1).expect("repaired"), Some(block_of(1)));
        assert_eq!(stored(&store, 2).expect("untouched"), Some(block_of(1)));
        assert_eq!(stored(&store, 3).expect("deleted"), None);
        // A repair of a block that is a hole here changes nothing.
        apply_at(&store, &mut st, 3, repair(2, vec![(7, Some(block_of(4)))]));
        assert_eq!(stored(&store, 7).expect("hole"), None);
    }

    #[test]
    fn a_partial_write_over_a_damaged_block_keeps_it_damaged_and_fences_older_repairs() {
        let store = MemStore::new();
        let mut st = ApplyState::default();
        let w =
            ShardRequest::Write { volume: VolumeId(5), epoch: 1, offset: 0, data: Bytes::from(vec![1u8; 2 * 4096]) };
        apply_at(&store, &mut st, 1, w);
        store.corrupt(&Geometry::default().key(ShardId(1), VolumeId(5), 0));
        store.corrupt(&Geometry::default().key(ShardId(1), VolumeId(5), 1));
        // Partial over block 0 (damaged) and a whole block 1: the replica must not stop.
        let partial =
            ShardRequest::Write { volume: VolumeId(5), epoch: 1, offset: 100, data: Bytes::from(vec![2u8; 8000]) };
        assert_eq!(apply_at(&store, &mut st, 5, partial), ShardResponse::Done);
        assert!(matches!(stored(&store, 0), Err(StorageError::Corrupt { .. })), "never made-up data");
        // The write ends at 8100: block 1 is a partial piece too.
        assert!(matches!(stored(&store, 1), Err(StorageError::Corrupt { .. })));
        assert_eq!(st.kept_corrupt, 5);
        assert_eq!(store.get_meta(&keys::kept_corrupt(ShardId(1))).expect("meta"), Some(5u64.to_be_bytes().to_vec()));
        // A copy read before the partial write (as_of 4) would lose it: refused.
        apply_at(&store, &mut st, 6, repair(4, vec![(0, Some(block_of(1)))]));
        assert!(matches!(stored(&store, 0), Err(StorageError::Corrupt { .. })));
        // A copy read after it is taken.
        let mut merged = vec![1u8; 4096];
        merged[100..].fill(2);
        apply_at(&store, &mut st, 7, repair(5, vec![(0, Some(Bytes::from(merged.clone())))]));
        assert_eq!(stored(&store, 0).expect("repaired"), Some(Bytes::from(merged)));
        // Partial zero over a damaged block: also kept, never zero-filled.
        apply_at(
            &store,
            &mut st,
            8,
            ShardRequest::Zero { volume: VolumeId(5), epoch: 1, offset: 4096 + 10, len: 10, punch: false },
        );
        assert!(matches!(stored(&store, 1), Err(StorageError::Corrupt { .. })));
        assert_eq!(st.kept_corrupt, 8);
        // A whole-block write replaces the damage.
        apply_at(
            &store,
            &mut st,
            9,
            ShardRequest::Write { volume: VolumeId(5), epoch: 1, offset: 4096, data: block_of(3) },
        );
        assert_eq!(stored(&store, 1).expect("rewritten"), Some(block_of(3)));
    }

    fn put_raw(store: &MemStore, block: u64, data: Option<Bytes>) {
        let mut b = WriteBatch::new();
        let key = Geometry::default().key(ShardId(1), VolumeId(5), block);
        match data {
            Some(d) => b.put(key, d),
            None => b.delete(key),
        }
        store.write(b, Durability::Buffered).expect("write");
    }

    fn realign(target: u64, since: u64, blocks: Vec<(u64, Option<Bytes>)>) -> ShardRequest {
        ShardRequest::Realign {
            volume: VolumeId(5),
            target,
            since,
            blocks: blocks
                .into_iter()
                .map(|(block, data)| {
                    let crc = data.as_deref().map_or(0, ballast_types::crc32c);
                    crate::types::RealignBlock { block, data, crc }
                })
                .collect(),
        }
    }

    fn write_block(block: u64, byte: u8) -> ShardRequest {
        ShardRequest::Write { volume: VolumeId(5), epoch: 1, offset: block * 4096, data: block_of(byte) }
    }

    #[test]
    fn a_digest_lists_each_present_blocks_crc_marks_damage_and_stops_at_its_limit() {
        use crate::types::{BlockRef, BlockSum};
        let store = MemStore::new();
        let mut st = ApplyState::default();
        let w =
            ShardRequest::Write { volume: VolumeId(5), epoch: 1, offset: 0, data: Bytes::from(vec![1u8; 300 * 4096]) };
        apply_at(&store, &mut st, 1, w);
        let trim = ShardRequest::Zero { volume: VolumeId(5), epoch: 1, offset: 5 * 4096, len: 4096, punch: true };
        apply_at(&store, &mut st, 2, trim);
        store.corrupt(&Geometry::default().key(ShardId(1), VolumeId(5), 7));
        let before = store.allocated(&crate::snapshot::shard_range(ShardId(1)), 1000).expect("keys");
        let from = BlockRef { volume: 0, block: 0 };
        assert_eq!(
            apply_at(&store, &mut st, 3, ShardRequest::Digest { from, max_blocks: 100_000 }),
            ShardResponse::Done
        );
        let d = st.digests.get(3).expect("kept").clone();
        assert_eq!(d.blocks.len(), crate::divergence::DIGEST_MAX_BLOCKS, "capped");
        let r = |block| BlockRef { volume: 5, block };
        assert_eq!(d.cut, Some(r(256)), "block 5 is a hole, so the 256th block listed is 256");
        assert!(!d.blocks.iter().any(|(b, _)| *b == r(5)));
        assert_eq!(d.blocks[6], (r(7), BlockSum::Damaged));
        assert_eq!(d.blocks[0], (r(0), BlockSum::Crc(ballast_types::crc32c(&block_of(1)))));
        let next = crate::divergence::successor(r(256)).expect("next");
        apply_at(&store, &mut st, 4, ShardRequest::Digest { from: next, max_blocks: 256 });
        let rest = st.digests.get(4).expect("kept");
        assert_eq!((rest.blocks.len(), rest.cut), (43, None));
        assert!(st.digests.get(3).is_some(), "older digests stay while there is room");
        let after = store.allocated(&crate::snapshot::shard_range(ShardId(1)), 1000).expect("keys");
        assert_eq!(before, after, "a digest changes nothing stored");
    }

    #[test]
    fn a_realign_writes_only_on_its_target_and_only_blocks_untouched_since_its_digest() {
        let store = MemStore::new();
        let mut st = ApplyState { node: Some(2), ..ApplyState::default() };
        // Blocks 0..4 in chunk 0 and 1024, 1025 in chunk 1.
        let w =
            ShardRequest::Write { volume: VolumeId(5), epoch: 1, offset: 0, data: Bytes::from(vec![1u8; 4 * 4096]) };
        apply_at(&store, &mut st, 1, w);
        apply_at(&store, &mut st, 2, write_block(1024, 1));
        // This replica diverges (intact values that differ, and a hole).
        put_raw(&store, 1, Some(block_of(7)));
        put_raw(&store, 2, None);
        put_raw(&store, 1024, Some(block_of(7)));
        // The digest at 3; then a client write to chunk 1 (block 1025) at 4.
        let from = crate::types::BlockRef { volume: 0, block: 0 };
        apply_at(&store, &mut st, 3, ShardRequest::Digest { from, max_blocks: 256 });
        apply_at(&store, &mut st, 4, write_block(1025, 3));
        // Realign since 3: blocks 1 and 2 (chunk 0, untouched) get the
        // majority's value; block 1024 is skipped (its chunk was written at 4).
        let r = realign(2, 3, vec![(1, Some(block_of(1))), (2, Some(block_of(1))), (1024, Some(block_of(1)))]);
        assert_eq!(apply_at(&store, &mut st, 5, r), ShardResponse::Done);
        assert_eq!(stored(&store, 1).expect("realigned"), Some(block_of(1)));
        assert_eq!(stored(&store, 2).expect("realigned hole"), Some(block_of(1)));
        assert_eq!(stored(&store, 1024).expect("skipped"), Some(block_of(7)), "a write after the digest wins");
        assert_eq!(stored(&store, 1025).expect("client write"), Some(block_of(3)));

        // Another target: this replica writes nothing.
        put_raw(&store, 3, Some(block_of(7)));
        apply_at(&store, &mut st, 6, realign(3, 5, vec![(3, Some(block_of(1)))]));
        assert_eq!(stored(&store, 3).expect("not the target"), Some(block_of(7)));
        // Data that does not match its CRC is never written.
        let mut bad = realign(2, 5, vec![(3, Some(block_of(1)))]);
        if let ShardRequest::Realign { blocks, .. } = &mut bad {
            blocks[0].crc ^= 1;
        }
        apply_at(&store, &mut st, 7, bad);
        assert_eq!(stored(&store, 3).expect("bad crc"), Some(block_of(7)));
        // A hole as the majority's value deletes; a digest index not before
        // the entry is refused on every replica alike.
        apply_at(&store, &mut st, 8, realign(2, 7, vec![(3, None)]));
        assert_eq!(stored(&store, 3).expect("deleted"), None);
        assert!(matches!(apply_at(&store, &mut st, 9, realign(2, 9, vec![])), ShardResponse::Invalid { .. }));
        // Zero, DeleteVolume and Repair touch too.
        put_raw(&store, 0, Some(block_of(7)));
        let z = ShardRequest::Zero { volume: VolumeId(5), epoch: 1, offset: 3 * 4096, len: 10, punch: false };
        apply_at(&store, &mut st, 10, z);
        apply_at(&store, &mut st, 11, realign(2, 9, vec![(0, Some(block_of(1)))]));
        assert_eq!(stored(&store, 0).expect("zeroed after"), Some(block_of(7)));
        apply_at(&store, &mut st, 12, repair(1, vec![(0, Some(block_of(9)))]));
        apply_at(&store, &mut st, 13, realign(2, 11, vec![(0, Some(block_of(1)))]));
        assert_eq!(stored(&store, 0).expect("repair after"), Some(block_of(7)));
        apply_at(&store, &mut st, 14, ShardRequest::DeleteVolume { volume: VolumeId(5) });
        apply_at(&store, &mut st, 15, realign(2, 13, vec![(0, Some(block_of(1)))]));
        assert_eq!(stored(&store, 0).expect("deleted after"), None, "never puts back a deleted volume");
    }

    #[test]
    fn a_realign_from_before_the_touch_records_floor_is_skipped() {
        let store = MemStore::new();
        // As when the state machine opens at applied index 10: nothing is
        // known about entries up to 10.
        let mut st = ApplyState { node: Some(2), touched: Touched::starting_at(10), ..ApplyState::default() };
        put_raw(&store, 0, Some(block_of(7)));
        apply_at(&store, &mut st, 11, realign(2, 9, vec![(0, Some(block_of(1)))]));
        assert_eq!(stored(&store, 0).expect("skipped"), Some(block_of(7)));
        apply_at(&store, &mut st, 12, realign(2, 10, vec![(0, Some(block_of(1)))]));
        assert_eq!(stored(&store, 0).expect("applied"), Some(block_of(1)));
        // A replica that was never told its node is never a target.
        let mut anon = ApplyState::default();
        put_raw(&store, 0, Some(block_of(7)));
        apply_at(&store, &mut anon, 13, realign(2, 12, vec![(0, Some(block_of(1)))]));
        assert_eq!(stored(&store, 0).expect("unknown node"), Some(block_of(7)));
    }
}

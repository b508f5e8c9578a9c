//! Comparing replicas with each other: digests at a log position, the
//! majority vote, and realigning a divergent replica without ever undoing a
//! client write.
//!
//! **Digest at a log position.** The shard leader's scrub proposes
//! [`ShardRequest::Digest`]`{from}`. Every replica, when it applies that
//! entry at index `I`, lists its present blocks from `from` on (at most
//! [`DIGEST_MAX_BLOCKS`]) with the CRC32C of each stored value, a block
//! failing its own checksum marked [`BlockSum::Damaged`], and keeps the
//! list in memory ([`Digests`]: the last [`DIGESTS_KEPT`]). Apply is
//! deterministic, so every replica that is not divergent computes the same
//! digest at `I`, however many writes come before or after it: replicas
//! are compared at the same state, not at the same time. The entry changes
//! nothing stored.
//!
//! **Majority.** The leader gathers the voters' digests at `I`
//! (`Raft.FetchDigest`) and [`compare`]s them: per block, the value (a CRC
//! or a hole) a strict majority of the group's voters hold is the block's
//! value; an intact copy that differs is divergent. Damaged copies are left
//! out (the checksum walk repairs them); with no majority nothing is
//! decided (reported, not repaired).
//!
//! **Realign.** The leader proposes [`ShardRequest::Realign`]`{target,
//! since: I, blocks}` with the majority's values (read from a replica of
//! the majority, kept only when its CRC still equals the majority's at
//! `I`). Only `target` writes, and only blocks whose chunk no entry after
//! `I` touched. Why that never undoes a client write: every change to a
//! block's value goes through an entry that touches its chunk (`Write`,
//! `Zero`, `DeleteVolume`, `Repair`), and apply is deterministic, so if none
//! did in `(I, now]`, the value the log gives the block now is the value it
//! gave at `I` — which the majority's digest records. The record of touched
//! chunks ([`Touched`]) is in memory and bounded; it starts at its `floor`
//! (the applied index when the state machine opened or installed a
//! snapshot, raised when old records are pruned), and a replica whose record
//! does not reach back to `since` skips the whole entry. Skipping is always
//! safe, and only the target would write, so replicas may differ in it.
//! (Left open: two copies of a block that CRC32C cannot tell apart, one in
//! 2^32 for random damage.)

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ballast_metrics::Counter;
use ballast_storage::{BlockStore, KeyRange, StorageError, WriteBatch};
use ballast_types::{crc32c, BlockKey, Geometry, ShardId, VolumeId, BLOCK_SIZE};
use futures::future::BoxFuture;

use crate::error::ShardError;
use crate::shard::ShardGroup;
use crate::snapshot::shard_range;
use crate::state_machine::ShardStateMachine;
use crate::types::{BlockRef, BlockSum, FetchedDigest, NodeId, RangeDigest, RealignBlock, ShardRequest, ShardResponse};

/// Most present blocks one digest lists (1 MiB of data read per replica).
pub const DIGEST_MAX_BLOCKS: usize = 256;
/// Digests a replica keeps in memory (the leader asks for one right after
/// it applied; ≤ 16 × 256 × 24 bytes ≈ 100 KiB per scrubbed replica).
pub const DIGESTS_KEPT: usize = 16;
/// Chunks (and deleted volumes) whose last touching entry a replica
/// remembers; past that the older half is dropped and the floor raised.
pub const TOUCHED_MAX: usize = 8192;

struct DivergenceMetrics {
    realigned: Arc<Counter>,
    skipped: Arc<Counter>,
}

static METRICS: LazyLock<DivergenceMetrics> = LazyLock::new(|| {
    let r = ballast_metrics::global();
    DivergenceMetrics {
        realigned: r.counter(
            "ballast_blocks_realigned_total",
            "Blocks this replica replaced with the majority's value through a realign entry (its intact copy \
             differed from a strict majority of the shard's voters).",
            &[],
        ),
        skipped: r.counter(
            "ballast_apply_realign_skipped_total",
            "Blocks of realign entries targeting this replica that it did not write because an entry after the \
             digest touched their chunk, or its record of touched chunks does not reach back to the digest.",
            &[],
        ),
    }
});

/// Register the realign series (at zero) so a scrape lists them at once.
pub fn register_metrics() {
    LazyLock::force(&METRICS);
}

/// The digests this replica recorded, newest last.
#[derive(Debug, Default)]
pub(crate) struct Digests {
    kept: VecDeque<RangeDigest>,
}

impl Digests {
    fn push(&mut self, d: RangeDigest) {
        // Re-applying an entry (after a restart) replaces its digest.
        self.kept.retain(|k| k.index != d.index);
        self.kept.push_back(d);
        while self.kept.len() > DIGESTS_KEPT {
            self.kept.pop_front();
        }
    }

    pub(crate) fn get(&self, index: u64) -> Option<&RangeDigest> {
        self.kept.iter().find(|d| d.index == index)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scope {
    Volume(u64),
    Chunk(u64, u64),
}

/// The last log index that touched each chunk (or deleted each volume),
/// from `floor` on. In memory: a restart starts a new record.
#[derive(Debug, Default)]
pub(crate) struct Touched {
    floor: u64,
    last: HashMap<Scope, u64>,
}

impl Touched {
    /// An empty record that reaches back to `floor` (the applied index now).
    pub(crate) fn starting_at(floor: u64) -> Self {
        Self { floor, last: HashMap::new() }
    }

    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    fn touch(&mut self, scope: Scope, index: u64) {
        let e = self.last.entry(scope).or_insert(index);
        *e = (*e).max(index);
        if self.last.len() > TOUCHED_MAX {
            self.prune();
        }
    }

    /// Drop the older half; the floor rises to the newest index dropped.
    fn prune(&mut self) {
        let mut indices: Vec<u64> = self.last.values().copied().collect();
        let mid = indices.len() / 2;
        let (_, cut, _) = indices.select_nth_unstable(mid);
        let cut = *cut;
        self.last.retain(|_, i| *i > cut);
        self.floor = self.floor.max(cut);
    }

    /// An entry at `index` changed (or may have changed) `[offset, offset+len)` of `volume`.
    pub(crate) fn range(&mut self, volume: VolumeId, offset: u64, len: u64, index: u64) {
        for (chunk, _, _) in Geometry::default().chunk_spans(offset, len) {
            self.touch(Scope::Chunk(volume.0, chunk), index);
        }
    }

    /// An entry at `index` named these blocks of `volume`.
    pub(crate) fn blocks(&mut self, volume: VolumeId, blocks: impl Iterator<Item = u64>, index: u64) {
        let g = Geometry::default();
        for b in blocks {
            self.touch(Scope::Chunk(volume.0, g.chunk_of_block(b)), index);
        }
    }

    /// An entry at `index` deleted every block of `volume`.
    pub(crate) fn volume(&mut self, volume: VolumeId, index: u64) {
        self.touch(Scope::Volume(volume.0), index);
    }

    /// The last recorded index that touched `chunk` of `volume` (0: none since the floor).
    fn last(&self, volume: u64, chunk: u64) -> u64 {
        let c = self.last.get(&Scope::Chunk(volume, chunk)).copied().unwrap_or(0);
        let v = self.last.get(&Scope::Volume(volume)).copied().unwrap_or(0);
        c.max(v)
    }
}

fn key_of(shard: ShardId, b: BlockRef) -> BlockKey {
    Geometry::default().key(shard, VolumeId(b.volume), b.block)
}

fn ref_of(k: &BlockKey) -> BlockRef {
    BlockRef { volume: k.volume.0, block: Geometry::default().block_no(k) }
}

/// The block right after `b` in key order (`None` past the last one).
pub fn successor(b: BlockRef) -> Option<BlockRef> {
    match b.block.checked_add(1) {
        Some(block) => Some(BlockRef { block, ..b }),
        None => b.volume.checked_add(1).map(|volume| BlockRef { volume, block: 0 }),
    }
}

/// Apply a [`ShardRequest::Digest`] at `index`: this replica's digest of
/// its blocks from `from` on.
pub(crate) fn digest<S: BlockStore>(
    store: &S,
    shard: ShardId,
    index: u64,
    from: BlockRef,
    max_blocks: u32,
    digests: &mut Digests,
) -> Result<(), StorageError> {
    let limit = (max_blocks as usize).clamp(1, DIGEST_MAX_BLOCKS);
    let range = KeyRange { start: key_of(shard, from), end: shard_range(shard).end };
    let keys = store.allocated(&range, limit)?;
    let mut blocks = Vec::with_capacity(keys.len());
    for key in &keys {
        let sum = match store.get(key) {
            Ok(Some(data)) => BlockSum::Crc(crc32c(&data)),
            Ok(None) => continue,
            Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => BlockSum::Damaged,
            Err(e) => return Err(e),
        };
        blocks.push((ref_of(key), sum));
    }
    let cut = if keys.len() == limit { keys.last().map(ref_of) } else { None };
    digests.push(RangeDigest { index, from, blocks, cut });
    Ok(())
}

/// What [`plan_realign`] reads of the apply state.
pub(crate) struct RealignGuard<'a> {
    pub node: Option<NodeId>,
    pub touched: &'a Touched,
}

/// Apply a [`ShardRequest::Realign`] at `index` (see the module docs and
/// the variant's contract): on `target` only, blocks untouched since
/// `since` that differ from the majority's value get it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_realign<S: BlockStore>(
    store: &S,
    shard: ShardId,
    guard: RealignGuard<'_>,
    index: u64,
    volume: VolumeId,
    target: NodeId,
    since: u64,
    blocks: &[RealignBlock],
    batch: &mut WriteBatch,
) -> Result<ShardResponse, StorageError> {
    if since >= index {
        return Ok(ShardResponse::Invalid { reason: format!("realign at {index} names a later digest {since}") });
    }
    if guard.node != Some(target) {
        return Ok(ShardResponse::Done);
    }
    if since < guard.touched.floor() {
        tracing::info!(%shard, %volume, index, since, floor = guard.touched.floor(), blocks = blocks.len(), "realign skipped: this replica's record of touched chunks starts after the digest");
        METRICS.skipped.add(blocks.len() as u64);
        return Ok(ShardResponse::Done);
    }
    let g = Geometry::default();
    let (mut written, mut skipped) = (0u64, 0u64);
    for b in blocks {
        if guard.touched.last(volume.0, g.chunk_of_block(b.block)) > since {
            skipped += 1;
            continue;
        }
        if let Some(d) = &b.data {
            if d.len() != BLOCK_SIZE as usize || crc32c(d) != b.crc {
                tracing::warn!(%shard, %volume, index, block = b.block, "realign block does not match its CRC; skipped");
                skipped += 1;
                continue;
            }
        }
        let key = g.key(shard, volume, b.block);
        let current = match store.get(&key) {
            Ok(v) => Some(v),
            Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => None,
            Err(e) => return Err(e),
        };
        let same = match (&current, &b.data) {
            (Some(Some(cur)), Some(d)) => cur == d,
            (Some(None), None) => true,
            _ => false,
        };
        if same {
            continue;
        }
        match &b.data {
            Some(d) => batch.put(key, d.clone()),
            None => batch.delete(key),
        }
        written += 1;
    }
    METRICS.realigned.add(written);
    METRICS.skipped.add(skipped);
    if written > 0 || skipped > 0 {
        tracing::info!(%shard, %volume, index, since, written, skipped, "realign: divergent blocks given the majority's value");
    }
    Ok(ShardResponse::Done)
}

/// A block whose intact copies differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub block: BlockRef,
    /// The value a strict majority of the voters hold: its CRC32C, or
    /// `None` for a hole.
    pub majority: Option<u32>,
    /// The voters holding it.
    pub holders: Vec<NodeId>,
    /// The voters whose intact copy differs from it.
    pub targets: Vec<NodeId>,
}

/// What [`compare`] found in one range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Comparison {
    pub divergent: Vec<Divergence>,
    /// Blocks whose intact copies differ with no value held by a strict
    /// majority: nothing is decided for them.
    pub no_majority: Vec<BlockRef>,
    /// The last block every digest covers (`None`: to the shard's end).
    pub covered_to: Option<BlockRef>,
}

impl Comparison {
    /// Divergent copies: one per (target, block).
    pub fn divergent_copies(&self) -> u64 {
        self.divergent.iter().map(|d| d.targets.len() as u64).sum()
    }

    /// Where the next range starts (`None`: the shard is done).
    pub fn next(&self) -> Option<BlockRef> {
        self.covered_to.and_then(successor)
    }

    /// Whether `target`'s copy of `block` is divergent here.
    pub fn diverges(&self, target: NodeId, block: BlockRef) -> bool {
        self.divergent.iter().any(|d| d.block == block && d.targets.contains(&target))
    }

    /// Whether every digest compared covers `block`.
    pub fn covers(&self, block: BlockRef) -> bool {
        self.covered_to.is_none_or(|c| block <= c)
    }
}

/// Compare the digests (taken at one log index) of some of a group's
/// `voters` voters. Pure: the leader's scrub acts on the answer.
pub fn compare(voters: usize, digests: &BTreeMap<NodeId, RangeDigest>) -> Comparison {
    let need = voters / 2 + 1;
    let covered_to = digests.values().filter_map(|d| d.cut).min();
    let within = |b: &BlockRef| covered_to.is_none_or(|c| *b <= c);
    let mut seen: BTreeMap<BlockRef, BTreeMap<NodeId, BlockSum>> = BTreeMap::new();
    for (node, d) in digests {
        for (b, sum) in d.blocks.iter().filter(|(b, _)| within(b)) {
            seen.entry(*b).or_default().insert(*node, *sum);
        }
    }
    let mut out = Comparison { covered_to, ..Comparison::default() };
    for (block, sums) in seen {
        let mut votes: BTreeMap<Option<u32>, Vec<NodeId>> = BTreeMap::new();
        for node in digests.keys() {
            match sums.get(node) {
                None => votes.entry(None).or_default().push(*node),
                Some(BlockSum::Crc(c)) => votes.entry(Some(*c)).or_default().push(*node),
                Some(BlockSum::Damaged) => {}
            }
        }
        if votes.len() <= 1 {
            continue;
        }
        match votes.iter().find(|(_, holders)| holders.len() >= need) {
            Some((value, holders)) => {
                let targets = votes.iter().filter(|(v, _)| *v != value).flat_map(|(_, n)| n.iter().copied()).collect();
                out.divergent.push(Divergence { block, majority: *value, holders: holders.clone(), targets });
            }
            None => out.no_majority.push(block),
        }
    }
    out
}

fn stopped(group: u64, e: impl std::fmt::Display) -> ShardError {
    ShardError::Unavailable { group, reason: e.to_string() }
}

/// Replica comparison on a running replica (see the module docs).
impl<S: BlockStore> ShardGroup<S> {
    /// Tell this replica's state machine which node it runs on, so it
    /// applies the [`ShardRequest::Realign`] entries that target it. Call
    /// once after [`crate::start_shard`]; until then (and for entries
    /// applied before), the replica is never a target: it skips them, which
    /// is safe.
    pub async fn enable_realign(&self) -> Result<(), ShardError> {
        let node = self.spec().node;
        let set = self.raft().with_state_machine(move |sm: &mut ShardStateMachine<S>| {
            sm.set_node(node);
            let done: BoxFuture<'_, ()> = Box::pin(std::future::ready(()));
            done
        });
        set.await.map_err(|e| stopped(self.spec().group, e))
    }

    /// Commit a [`ShardRequest::Digest`] from `from` (leader only) and return
    /// this replica's digest at it.
    pub async fn propose_digest(&self, from: BlockRef) -> Result<RangeDigest, ShardError> {
        let req = ShardRequest::Digest { from, max_blocks: DIGEST_MAX_BLOCKS as u32 };
        let (index, resp) = self.write_at(req).await?;
        let group = self.spec().group;
        if resp != ShardResponse::Done {
            return Err(ShardError::Rejected { group, reason: format!("digest refused: {resp:?}") });
        }
        self.kept_digest(index).await?.ok_or_else(|| stopped(group, format!("digest at {index} not kept")))
    }

    /// The digest this replica recorded at `index`, once it applied it
    /// (waiting at most `timeout`: `Unavailable` when it lags further).
    pub async fn digest_at(&self, index: u64, timeout: Duration) -> Result<FetchedDigest, ShardError> {
        let applied = self.wait_applied(index, timeout).await?;
        Ok(FetchedDigest { applied, digest: self.kept_digest(index).await? })
    }

    async fn kept_digest(&self, index: u64) -> Result<Option<RangeDigest>, ShardError> {
        let get = self.raft().with_state_machine(move |sm: &mut ShardStateMachine<S>| {
            let kept: BoxFuture<'_, Option<RangeDigest>> = Box::pin(std::future::ready(sm.kept_digest(index)));
            kept
        });
        get.await.map_err(|e| stopped(self.spec().group, e))
    }

    /// Propose a [`ShardRequest::Realign`] (leader only); returns its log
    /// index once applied here.
    pub async fn realign(
        &self,
        volume: VolumeId,
        target: NodeId,
        since: u64,
        blocks: Vec<RealignBlock>,
    ) -> Result<u64, ShardError> {
        let (index, resp) = self.write_at(ShardRequest::Realign { volume, target, since, blocks }).await?;
        match resp {
            ShardResponse::Done => Ok(index),
            other => {
                Err(ShardError::Rejected { group: self.spec().group, reason: format!("realign refused: {other:?}") })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(block: u64) -> BlockRef {
        BlockRef { volume: 5, block }
    }

    fn d(index: u64, blocks: &[(u64, BlockSum)], cut: Option<u64>) -> RangeDigest {
        RangeDigest { index, from: r(0), blocks: blocks.iter().map(|(b, s)| (r(*b), *s)).collect(), cut: cut.map(r) }
    }

    #[test]
    fn a_strict_majority_decides_and_damage_or_no_majority_decides_nothing() {
        use BlockSum::{Crc, Damaged};
        let digests = BTreeMap::from([
            (1, d(9, &[(0, Crc(10)), (1, Crc(11)), (2, Crc(12)), (4, Damaged), (5, Crc(15))], None)),
            (2, d(9, &[(0, Crc(10)), (1, Crc(99)), (3, Crc(13)), (4, Crc(14)), (5, Crc(16))], None)),
            (3, d(9, &[(0, Crc(10)), (1, Crc(11)), (2, Crc(12)), (4, Crc(14))], None)),
        ]);
        let c = compare(3, &digests);
        // 1: node 2 holds another value; 2: node 2 has a hole; 3: only node 2 has it;
        // 4: node 1's copy is damaged, the others agree; 5: three values, none a majority.
        assert_eq!(
            c.divergent,
            vec![
                Divergence { block: r(1), majority: Some(11), holders: vec![1, 3], targets: vec![2] },
                Divergence { block: r(2), majority: Some(12), holders: vec![1, 3], targets: vec![2] },
                Divergence { block: r(3), majority: None, holders: vec![1, 3], targets: vec![2] },
            ]
        );
        assert_eq!(c.no_majority, vec![r(5)]);
        assert_eq!(c.divergent_copies(), 3);
        assert_eq!(c.next(), None);
        // Two digests of three voters: a majority needs both.
        let two: BTreeMap<_, _> = digests.into_iter().filter(|(n, _)| *n != 3).collect();
        let c = compare(3, &two);
        assert!(c.divergent.is_empty());
        assert_eq!(c.no_majority, vec![r(1), r(2), r(3), r(5)]);
    }

    #[test]
    fn blocks_past_the_shortest_digest_are_left_for_the_next_range() {
        use BlockSum::Crc;
        let digests = BTreeMap::from([
            (1, d(4, &[(0, Crc(1)), (7, Crc(7))], None)),
            (2, d(4, &[(0, Crc(1)), (3, Crc(3))], Some(3))),
            (3, d(4, &[(0, Crc(1)), (7, Crc(7))], None)),
        ]);
        let c = compare(3, &digests);
        // Node 2 listed up to block 3: block 3 is compared (a minority has it),
        // block 7 is not (node 2 did not look that far).
        assert_eq!(c.covered_to, Some(r(3)));
        assert_eq!(c.divergent.len(), 1);
        assert_eq!(c.divergent[0].block, r(3));
        assert_eq!(c.divergent[0].majority, None);
        assert_eq!(c.next(), Some(r(4)));
        assert!(c.covers(r(3)) && !c.covers(r(7)));
    }

    #[test]
    fn the_touch_record_prunes_its_older_half_and_raises_the_floor() {
        let mut t = Touched::starting_at(10);
        for i in 0..TOUCHED_MAX as u64 {
            t.range(VolumeId(1), i * Geometry::default().chunk_size, 1, 11 + i);
        }
        assert_eq!(t.floor(), 10);
        assert_eq!(t.last(1, 0), 11);
        t.range(VolumeId(1), TOUCHED_MAX as u64 * Geometry::default().chunk_size, 1, 20_000);
        assert!(t.floor() > 10 && t.last.len() <= TOUCHED_MAX / 2 + 1, "floor {}", t.floor());
        assert_eq!(t.last(1, 0), 0, "pruned");
        assert_eq!(t.last(1, TOUCHED_MAX as u64), 20_000);
        t.volume(VolumeId(1), 20_001);
        assert_eq!(t.last(1, 5), 20_001, "a deleted volume touches every chunk");
    }

    #[test]
    fn well_formed_digests_are_ordered_within_range_and_limit() {
        let ok = d(3, &[(1, BlockSum::Crc(1)), (2, BlockSum::Damaged)], Some(2));
        assert!(ok.is_well_formed(3, r(0)));
        assert!(!ok.is_well_formed(4, r(0)), "another index");
        assert!(!ok.is_well_formed(3, r(2)), "before `from`");
        let unordered = d(3, &[(2, BlockSum::Crc(1)), (1, BlockSum::Crc(1))], None);
        assert!(!unordered.is_well_formed(3, r(0)));
        let bad_cut = d(3, &[(1, BlockSum::Crc(1))], Some(7));
        assert!(!bad_cut.is_well_formed(3, r(0)));
        assert_eq!(successor(BlockRef { volume: 1, block: u64::MAX }), Some(BlockRef { volume: 2, block: 0 }));
    }
}

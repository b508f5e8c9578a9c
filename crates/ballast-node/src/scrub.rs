//! Scrub: a background task per node that reads every block of every shard
//! replica the node holds, verifies its CRC32C, and has damaged blocks
//! repaired from a healthy replica through the shard's leader
//! (`Raft.RepairBlocks`, see [`crate::integrity`]).
//!
//! **Pacing.** Reads go through one [`Pacer`] at `--scrub-rate` bytes per
//! second, in batches of at most [`BATCH_BLOCKS`] blocks, so a pass never
//! takes the disk from client I/O. A pass starts `--scrub-interval` after
//! the previous one ended (the first one an interval after the node
//! started), or at once when asked (`ballast scrub` → `Admin.ScrubNode`).
//!
//! **Comparing replicas.** On every shard this node leads, the pass then
//! compares the voters' replicas with each other ([`crate::realign`]):
//! digests taken at the same log position, a strict majority's value per
//! block, and `Realign` entries for intact copies that differ from it (a
//! replica whose blocks each pass their checksum yet differ from its
//! peers'). Digests are read on every replica when they apply the entry;
//! the leader paces them with the same rate.
//!
//! **What a pass reports.** Blocks and bytes checked, damaged blocks found,
//! and of those how many were repaired (the local copy verified good again
//! after the leader's repair entry applied here) or not; on the shards this
//! node leads, divergent copies found, realigned (equal to the majority
//! when the range was digested again) or not, and blocks whose copies
//! differ with no majority. The figures of the last finished pass travel in
//! `NodeStats` to `ballast cluster status`; the running totals are the
//! `ballast_scrub_*` metrics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ballast_raft::snapshot::shard_range;
use ballast_raft::types::{BlockCopy, BlockRef, RepairCause};
use ballast_storage::{BlockStore, KeyRange, RocksStore, StorageError};
use ballast_types::{BlockKey, Geometry, GroupId, NodeId, ScrubReport, BLOCK_SIZE};
use tokio::sync::Notify;

use crate::integrity::{self, Peers};
use crate::metrics::SCRUB;
use crate::node::NodeInner;
use crate::router::Replica;
use crate::transport::Pacer;

/// Blocks read per batch (1 MiB): the unit of pacing and of repair requests.
pub const BATCH_BLOCKS: usize = 256;
/// Default `--scrub-rate`: 8 MiB/s.
pub const DEFAULT_RATE: u64 = 8 << 20;
/// Default `--scrub-interval`: a day between passes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// How long a pass waits for a repair entry to apply on this replica.
const APPLY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, Default)]
struct PassCounts {
    blocks: u64,
    bytes: u64,
    corrupt: u64,
    repaired: u64,
    unrepaired: u64,
    compared: crate::realign::Compared,
}

#[derive(Debug, Default)]
struct State {
    passes: u64,
    running: bool,
    last_finished_unix_ms: Option<u64>,
    last: PassCounts,
}

/// One node's scrub settings and state; the task is [`run`].
pub struct Scrubber {
    pacer: Option<Pacer>,
    interval: Duration,
    now: Notify,
    state: Mutex<State>,
}

impl Scrubber {
    /// `rate`: bytes per second (`None` or 0: unpaced); `interval`: between
    /// the end of a pass and the start of the next.
    pub fn new(rate: Option<u64>, interval: Duration) -> Self {
        Self {
            pacer: rate.filter(|r| *r > 0).map(Pacer::new),
            interval,
            now: Notify::new(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start a pass now; a pass already running finishes first, then the
    /// asked one runs (so it sees everything as of the request). Returns the
    /// figures as of the request, taken under the same lock as the request:
    /// the pass that serves it is number `passes + 1`, or `passes + 2` when
    /// `running` (the task marks a pass running under this lock, so a pass
    /// that starts after this call never shows as running here).
    pub fn start_now(&self, node: NodeId) -> ScrubReport {
        let st = self.state();
        self.now.notify_one();
        Self::report_of(&st, node)
    }

    /// This node's figures (`node` is its id).
    pub fn report(&self, node: NodeId) -> ScrubReport {
        Self::report_of(&self.state(), node)
    }

    fn report_of(st: &State, node: NodeId) -> ScrubReport {
        ScrubReport {
            node,
            passes: st.passes,
            running: st.running,
            last_finished_unix_ms: st.last_finished_unix_ms,
            blocks_checked: st.last.blocks,
            bytes_checked: st.last.bytes,
            corrupt_found: st.last.corrupt,
            repaired: st.last.repaired,
            unrepaired: st.last.unrepaired,
            divergent_found: st.last.compared.divergent,
            realigned: st.last.compared.realigned,
            unrealigned: st.last.compared.unrealigned,
            no_majority: st.last.compared.no_majority,
        }
    }
}

/// The scrub task of a node: waits for the interval or a request, then
/// runs a pass over every shard replica. Ends with the node's tasks.
pub(crate) async fn run(inner: Arc<NodeInner>, peers: Arc<Peers>) {
    let scrub = inner.scrub.clone();
    let mut next = Instant::now() + scrub.interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = scrub.now.notified() => {}
        }
        if inner.identity.get().is_none() || inner.running().is_err() {
            next = Instant::now() + scrub.interval;
            continue;
        }
        scrub.state().running = true;
        let started = Instant::now();
        let counts = pass(&inner, &peers, &scrub).await;
        let finished = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        {
            let mut st = scrub.state();
            st.running = false;
            st.passes += 1;
            st.last_finished_unix_ms = Some(finished);
            st.last = counts;
        }
        SCRUB.passes.inc();
        let took = started.elapsed();
        let c = counts.compared;
        if c.divergent > 0 || c.no_majority > 0 {
            tracing::warn!(
                node = inner.id(),
                divergent = c.divergent,
                realigned = c.realigned,
                unrealigned = c.unrealigned,
                no_majority = c.no_majority,
                "scrub pass finished: replicas differed from their majority"
            );
        }
        if counts.corrupt > 0 {
            tracing::warn!(
                node = inner.id(),
                blocks = counts.blocks,
                corrupt = counts.corrupt,
                repaired = counts.repaired,
                unrepaired = counts.unrepaired,
                ?took,
                "scrub pass finished: damaged blocks found"
            );
        } else {
            tracing::info!(node = inner.id(), blocks = counts.blocks, ?took, "scrub pass finished: every block intact");
        }
        next = Instant::now() + scrub.interval;
    }
}

/// One pass over every shard replica of the node.
async fn pass(inner: &Arc<NodeInner>, peers: &Peers, scrub: &Scrubber) -> PassCounts {
    let mut counts = PassCounts::default();
    for group in inner.groups.groups().into_iter().filter(|g| g.shard().is_some()) {
        if inner.running().is_err() {
            break;
        }
        let Some(replica) = inner.groups.get(group) else { continue };
        let mut cursor = Some(shard_range(replica.group.spec().shard).start);
        while let Some(start) = cursor {
            if inner.running().is_err() || inner.groups.get(group).is_none() {
                break;
            }
            let store = replica.group.store().clone();
            let end = shard_range(replica.group.spec().shard).end;
            let checked = tokio::task::spawn_blocking(move || check_batch(&store, KeyRange { start, end }))
                .await
                .map_err(|e| StorageError::Engine(e.to_string()))
                .and_then(|r| r);
            let batch = match checked {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(%group, "scrub read failed; the replica is skipped this pass: {e}");
                    break;
                }
            };
            let bytes = batch.checked * u64::from(BLOCK_SIZE);
            if let Some(p) = &scrub.pacer {
                p.take(bytes).await;
            }
            counts.blocks += batch.checked;
            counts.bytes += bytes;
            SCRUB.blocks.add(batch.checked);
            SCRUB.bytes.add(bytes);
            if !batch.damaged.is_empty() {
                let found = batch.damaged.len() as u64;
                counts.corrupt += found;
                SCRUB.errors.add(found);
                tracing::warn!(%group, blocks = found, first = ?batch.damaged[0], "scrub found blocks failing their checksum; asking the leader to repair them");
                let repaired = repair(peers, &replica, group, &batch.damaged).await;
                counts.repaired += repaired;
                counts.unrepaired += found - repaired;
                SCRUB.repaired.add(repaired);
                SCRUB.unrepaired.add(found - repaired);
            }
            cursor = if batch.full { batch.last.and_then(successor) } else { None };
        }
        if replica.group.membership().leading {
            let go_on = || inner.running().is_ok() && inner.groups.get(group).is_some();
            let c = crate::realign::compare_shard(peers, &replica.group, scrub.pacer.as_ref(), go_on).await;
            counts.compared.divergent += c.divergent;
            counts.compared.realigned += c.realigned;
            counts.compared.unrealigned += c.unrealigned;
            counts.compared.no_majority += c.no_majority;
        }
    }
    counts
}

struct Batch {
    checked: u64,
    damaged: Vec<BlockKey>,
    last: Option<BlockKey>,
    /// As many blocks as asked: there may be more.
    full: bool,
}

/// Verify up to [`BATCH_BLOCKS`] allocated blocks from `range.start`.
fn check_batch(store: &RocksStore, range: KeyRange) -> Result<Batch, StorageError> {
    let keys = store.allocated(&range, BATCH_BLOCKS)?;
    let mut damaged = Vec::new();
    for key in &keys {
        match store.get(key) {
            Ok(_) => {}
            Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => damaged.push(*key),
            Err(e) => return Err(e),
        }
    }
    Ok(Batch { checked: keys.len() as u64, damaged, last: keys.last().copied(), full: keys.len() == BATCH_BLOCKS })
}

/// The key right after `k` in key order.
fn successor(k: BlockKey) -> Option<BlockKey> {
    if let Some(block) = k.block.checked_add(1) {
        return Some(BlockKey { block, ..k });
    }
    if let Some(chunk) = k.chunk.checked_add(1) {
        return Some(BlockKey { chunk, block: 0, ..k });
    }
    k.volume.0.checked_add(1).map(|v| BlockKey { volume: ballast_types::VolumeId(v), chunk: 0, block: 0, ..k })
}

/// Have `damaged` (blocks of this node's replica of `group`) repaired by
/// the shard's leader; returns how many verify good here afterwards.
async fn repair(peers: &Peers, replica: &Arc<Replica<RocksStore>>, group: GroupId, damaged: &[BlockKey]) -> u64 {
    let geometry = Geometry::default();
    let refs: Vec<BlockRef> =
        damaged.iter().map(|k| BlockRef { volume: k.volume.0, block: geometry.block_no(k) }).collect();
    let g = &replica.group;
    let index = match g.leader() {
        Some((leader, _)) if leader == g.spec().node => {
            let copies = integrity::healthy_copies(peers, g, &refs, g.applied_index(), false).await;
            if copies.found.is_empty() {
                Ok(0)
            } else {
                integrity::propose_repair(g, &copies, RepairCause::Scrub).await.map_err(|e| e.to_string())
            }
        }
        Some((leader, node)) => peers
            .ask_repair(NodeId(leader), &node.addr, group, refs.clone())
            .await
            .map(|r| r.index)
            .map_err(|e| e.to_string()),
        None => Err("the shard has no leader now".to_string()),
    };
    let index = match index {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(%group, "repair of damaged blocks failed (the next pass retries): {e}");
            return 0;
        }
    };
    if index > 0 {
        if let Err(e) = g.wait_applied(index, APPLY_WAIT).await {
            tracing::warn!(%group, "the repair did not apply here in time: {e}");
        }
    }
    match g.copies(refs).await {
        Ok(f) => f.copies.iter().filter(|c| !matches!(c, BlockCopy::Corrupt)).count() as u64,
        Err(e) => {
            tracing::warn!(%group, "re-reading repaired blocks: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_types::{ShardId, VolumeId};

    #[test]
    fn successor_is_the_next_key_in_order() {
        let k = BlockKey { shard: ShardId(3), volume: VolumeId(7), chunk: 2, block: 9 };
        let next = successor(k).expect("next");
        assert!(next > k);
        assert_eq!(next.block, 10);
        let last = BlockKey { block: u32::MAX, ..k };
        assert_eq!(successor(last), Some(BlockKey { chunk: 3, block: 0, ..k }));
        let end = BlockKey { volume: VolumeId(u64::MAX), chunk: u64::MAX, block: u32::MAX, ..k };
        assert_eq!(successor(end), None);
    }
}

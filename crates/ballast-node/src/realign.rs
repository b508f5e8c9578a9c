//! Comparing replicas with each other: the part of a scrub pass a node runs
//! for each shard it leads ([`ballast_raft::divergence`] has the entries,
//! the majority rule and why a realign is safe).
//!
//! For each range of the shard, in key order: commit a `Digest` entry
//! (every replica records its digest when it applies it, at index `I`),
//! gather the other voters' digests at `I` (`Raft.FetchDigest`), and
//! [`compare`]. Copies that differ from a strict majority get the
//! majority's value through `Realign` entries (one per target and volume;
//! the data read from this leader when it holds the majority's value, else
//! from a voter that does, and used only when its CRC32C still equals the
//! majority's at `I`). The range is then digested again: a copy counts as
//! realigned when it is no longer divergent. The next range starts after
//! the last block every digest covered.

use std::collections::BTreeMap;

use ballast_raft::divergence::{compare, Comparison, DIGEST_MAX_BLOCKS};
use ballast_raft::types::{BlockCopy, BlockRef, BlockSum, NodeId as RaftNodeId, RangeDigest, RealignBlock};
use ballast_raft::{ShardError, ShardGroup};
use ballast_storage::RocksStore;
use ballast_types::{crc32c, GroupId, NodeId, VolumeId, BLOCK_SIZE};
use bytes::Bytes;

use crate::integrity::Peers;
use crate::metrics::SCRUB;
use crate::transport::Pacer;

/// What comparing one shard found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Compared {
    pub divergent: u64,
    pub realigned: u64,
    pub unrealigned: u64,
    pub no_majority: u64,
}

/// One range compared at one log index.
struct Round {
    index: u64,
    digests: BTreeMap<RaftNodeId, RangeDigest>,
    cmp: Comparison,
}

/// Compare this leader's shard `g` with its voters' replicas, range by
/// range, and realign divergent copies. Stops early (the next pass goes on)
/// when this replica stops leading, the group's voters are changing, or
/// `go_on` says so.
pub(crate) async fn compare_shard(
    peers: &Peers,
    g: &ShardGroup<RocksStore>,
    pacer: Option<&Pacer>,
    go_on: impl Fn() -> bool,
) -> Compared {
    let group = GroupId(g.spec().group);
    let mut out = Compared::default();
    let mut cursor = Some(BlockRef { volume: 0, block: 0 });
    while let Some(from) = cursor {
        let m = g.membership();
        if !go_on() || !m.leading || m.joint || !m.voters.contains(&g.spec().node) {
            break;
        }
        let first = match round(peers, g, from).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(%group, "replica comparison stopped for this pass: {e}");
                break;
            }
        };
        if let Some(p) = pacer {
            let own = first.digests.get(&g.spec().node).map_or(0, |d| d.blocks.len() as u64);
            p.take(own * u64::from(BLOCK_SIZE)).await;
        }
        let found = first.cmp.divergent_copies();
        let no_majority = first.cmp.no_majority.len() as u64;
        out.divergent += found;
        out.no_majority += no_majority;
        SCRUB.divergent.add(found);
        SCRUB.no_majority.add(no_majority);
        if no_majority > 0 {
            tracing::error!(%group, blocks = no_majority, first = ?first.cmp.no_majority[0], index = first.index, "replicas hold different intact values with no strict majority: left as they are");
        }
        if found > 0 {
            let targets: std::collections::BTreeSet<RaftNodeId> =
                first.cmp.divergent.iter().flat_map(|d| d.targets.iter().copied()).collect();
            tracing::warn!(%group, copies = found, first = ?first.cmp.divergent[0].block, ?targets, index = first.index, "replicas differ from their majority; realigning them");
            let realigned = match realign(peers, g, &first).await {
                Ok(()) => verify(peers, g, from, &first).await,
                Err(e) => {
                    tracing::warn!(%group, "realign not committed (the next pass retries): {e}");
                    0
                }
            };
            out.realigned += realigned;
            out.unrealigned += found - realigned;
            SCRUB.realigned.add(realigned);
            SCRUB.unrealigned.add(found - realigned);
        }
        cursor = first.cmp.next();
    }
    out
}

/// Commit a digest of the range from `from` and gather the voters' digests
/// at it. A voter that does not answer, or no longer keeps the digest, is
/// left out (its copies are not judged this time).
async fn round(peers: &Peers, g: &ShardGroup<RocksStore>, from: BlockRef) -> Result<Round, ShardError> {
    let own = g.propose_digest(from).await?;
    let index = own.index;
    let me = g.spec().node;
    let group = GroupId(g.spec().group);
    let voters = g.membership().voters;
    let addrs = g.voter_addrs();
    let asks = voters
        .iter()
        .filter(|v| **v != me)
        .filter_map(|v| addrs.get(v).map(|a| (*v, a.clone())))
        .map(|(v, addr)| async move { (v, peers.fetch_digest(NodeId(v), &addr, group, index).await) });
    let mut digests = BTreeMap::from([(me, own)]);
    for (v, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(f) => match f.digest {
                Some(d) if d.is_well_formed(index, from) => {
                    digests.insert(v, d);
                }
                Some(_) => tracing::warn!(%group, node = v, index, "malformed digest; left out"),
                None => tracing::info!(%group, node = v, index, "digest not kept there; left out this time"),
            },
            Err(e) => tracing::info!(%group, node = v, index, "no digest from this voter: {e}"),
        }
    }
    let cmp = compare(voters.len(), &digests);
    Ok(Round { index, digests, cmp })
}

/// Propose the realign entries of `r`: for each divergent block the
/// majority's value, read from a holder and checked against the majority's
/// CRC; blocks without such a copy now are left for the next pass.
async fn realign(peers: &Peers, g: &ShardGroup<RocksStore>, r: &Round) -> Result<(), ShardError> {
    let me = g.spec().node;
    let group = GroupId(g.spec().group);
    let mut values: BTreeMap<BlockRef, (u32, Option<Bytes>)> = BTreeMap::new();
    // Blocks whose majority value is data, by who holds it (this node first).
    let mut wanted: BTreeMap<BlockRef, (u32, Vec<RaftNodeId>)> = BTreeMap::new();
    for d in &r.cmp.divergent {
        match d.majority {
            None => {
                values.insert(d.block, (0, None));
            }
            Some(crc) => {
                wanted.insert(d.block, (crc, d.holders.clone()));
            }
        }
    }
    let addrs = g.voter_addrs();
    let holders: std::collections::BTreeSet<RaftNodeId> =
        wanted.values().flat_map(|(_, h)| h.iter().copied()).collect();
    let mut sources: Vec<RaftNodeId> = holders.into_iter().collect();
    sources.sort_by_key(|h| *h != me);
    for source in sources {
        let refs: Vec<BlockRef> = wanted.iter().filter(|(_, (_, h))| h.contains(&source)).map(|(b, _)| *b).collect();
        if refs.is_empty() {
            continue;
        }
        for part in refs.chunks(DIGEST_MAX_BLOCKS) {
            let fetched = if source == me {
                g.copies(part.to_vec()).await.map_err(|e| e.to_string())
            } else {
                match addrs.get(&source) {
                    Some(addr) => peers
                        .fetch(NodeId(source), addr, group, part.to_vec(), r.index)
                        .await
                        .map_err(|e| e.to_string()),
                    None => Err("no address".to_string()),
                }
            };
            let copies = match fetched {
                Ok(f) if f.copies.len() == part.len() => f.copies,
                Ok(_) => {
                    tracing::warn!(%group, node = source, "malformed copies answer; skipped");
                    continue;
                }
                Err(e) => {
                    tracing::info!(%group, node = source, "no copies for a realign from this voter: {e}");
                    continue;
                }
            };
            for (b, copy) in part.iter().zip(copies) {
                let Some((crc, _)) = wanted.get(b) else { continue };
                match copy {
                    BlockCopy::Data(data) if crc32c(&data) == *crc => {
                        values.insert(*b, (*crc, Some(data)));
                        wanted.remove(b);
                    }
                    // Rewritten since the digest, or damaged: another holder may still have it.
                    _ => {}
                }
            }
        }
    }
    if !wanted.is_empty() {
        tracing::info!(%group, blocks = wanted.len(), "no copy of the majority's value as of the digest; those blocks wait for the next pass");
    }
    let mut entries: BTreeMap<(RaftNodeId, u64), Vec<RealignBlock>> = BTreeMap::new();
    for d in &r.cmp.divergent {
        let Some((crc, data)) = values.get(&d.block) else { continue };
        for t in &d.targets {
            let b = RealignBlock { block: d.block.block, data: data.clone(), crc: *crc };
            entries.entry((*t, d.block.volume)).or_default().push(b);
        }
    }
    for ((target, volume), blocks) in entries {
        for part in blocks.chunks(DIGEST_MAX_BLOCKS) {
            g.realign(VolumeId(volume), target, r.index, part.to_vec()).await?;
        }
    }
    Ok(())
}

/// Digest the range again (after the realign entries, in log order) and
/// count the copies of `before` that are no longer divergent.
async fn verify(peers: &Peers, g: &ShardGroup<RocksStore>, from: BlockRef, before: &Round) -> u64 {
    let after = match round(peers, g, from).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(group = g.spec().group, "realign not verified: {e}");
            return 0;
        }
    };
    let mut realigned = 0;
    for d in &before.cmp.divergent {
        for t in &d.targets {
            let intact = after
                .digests
                .get(t)
                .is_some_and(|dg| !dg.blocks.iter().any(|(b, s)| *b == d.block && *s == BlockSum::Damaged));
            let seen = intact && after.cmp.covers(d.block);
            if seen && !after.cmp.diverges(*t, d.block) && !after.cmp.no_majority.contains(&d.block) {
                realigned += 1;
            }
        }
    }
    realigned
}

//! Self-healing: node liveness, rebuilding the replicas of a lost node, and
//! converging each shard's Raft group to the voters the cluster map names.
//!
//! The map is the one source of intent; three roles act on it, each from the
//! reconciler's pass ([`crate::reconcile`]):
//!
//! - **The meta leader** ([`Healer::lead`]) probes every node. A node that
//!   has not answered for `down_after` is marked down (`SetNodeState`); each
//!   shard with a voter there gets new voters from the placement rules
//!   (`ClusterMap::repair_moves`, respecting the pool's failure domain) through
//!   `MoveShard`, which lists the replacements as *joining*. A node that
//!   answers again is marked up; it gets no replicas back by itself.
//! - **A shard's leader** ([`Healer::converge`]) sees its group's voters
//!   differ from the map's and runs one move at a time per shard: it re-reads
//!   the map from the meta leader (never acting on a stale copy), adds the new
//!   voters as learners, waits until they are within [`CAUGHT_UP`] entries of
//!   its log (openraft streams a snapshot in pages when the log no longer
//!   reaches back far enough, so a shard is never held in memory), changes
//!   the voters with one joint-consensus step, and reports `ShardMoved`,
//!   which settles the joining replicas in the map.
//! - **Every node** deletes its replica of a shard whose map voters no longer
//!   include it once that shard has no joining replicas (the group has
//!   dropped it), and starts replicas the map assigns to it (the reconciler).
//!
//! A node back within `down_after` is still a voter of its groups and
//! catches up from their logs; nothing moves.
//!
//! Once nothing is left to repair, the meta leader also keeps the cluster
//! even, gently: it moves replicas onto nodes holding fewer (a node that
//! joined or came back empty; `ClusterMap::rebalance_moves`, at most
//! [`MAX_REBALANCE_IN_FLIGHT`] moves under way) with the same `MoveShard`
//! machinery, and every [`LEADERS_EVERY`] asks shard leaders on nodes that
//! lead two or more shards more than another to hand one leadership over
//! (`Admin.TransferLeader`, [`transfer_leader`]).
//!
//! Progress: each move opens a [`Rebuilds`] entry per new replica with the
//! shard's data size on the leader; the transport adds the snapshot bytes it
//! streams to the target, the move adds how many log entries the target
//! still lacks, and `NodeStats` reports them for `ballast status`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_proto::pb;
use ballast_proto::pb::admin_client::AdminClient;
use ballast_proto::{ProtoError, MAX_MESSAGE_SIZE};
use ballast_raft::snapshot::shard_range;
use ballast_raft::{codec, BallastNode, ClusterMap, MetaCommand, MetaGroup, TypeConfig};
use ballast_storage::{BlockStore, KeyRange, RocksStore};
use ballast_types::{
    ApiError, BlockKey, ClusterId, ErrorCode, GroupId, MapVersion, NodeId, PlacementMap, PlacementReply,
    RebuildProgress, RebuildStream, ShardId, VolumeId, BLOCK_SIZE, PROTOCOL_VERSION,
};
use openraft::raft::TransferLeaderRequest;

use crate::data_service::api_error;
use crate::node::NodeInner;
use crate::router::Replica;

/// How long a liveness probe (a Raft hello) may take.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How often the meta leader probes the nodes.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A learner this close to the leader's log is promoted.
const CAUGHT_UP: u64 = 64;
/// How often a move checks its learners' progress.
const POLL: Duration = Duration::from_millis(200);
/// How often a move re-reads the map (the intent may have changed) and logs progress.
const RECHECK: Duration = Duration::from_secs(5);
/// Moves one node leads at once; the rest wait for a later pass.
const MAX_MOVES: usize = 4;
/// Moves of any kind under way in the cluster above which no rebalancing
/// move starts: rebalancing is never urgent.
pub(crate) const MAX_REBALANCE_IN_FLIGHT: usize = 2;
/// How often the meta leader looks at leaders per node.
pub(crate) const LEADERS_EVERY: Duration = Duration::from_secs(10);
/// Leadership transfers asked per look.
const LEADER_MOVES: usize = 1;
/// Keys per step when counting a shard's blocks.
const COUNT_STEP: usize = 16_384;

/// Replicas this node's shard leaders are building, by `(shard, target)`:
/// what `NodeStats` reports for `ballast status`. A move opens an entry per
/// new replica with the shard's data size on the leader ([`Self::open`]);
/// the transport adds the snapshot bytes it streams to the target
/// ([`Self::sent`]); the move records how far behind the target's log is
/// and closes the entries when it ends (whatever way it ends).
#[derive(Debug, Default)]
pub struct Rebuilds {
    builds: Mutex<BTreeMap<(u32, u64), Build>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Build {
    total: u64,
    sent: u64,
    snapshot: bool,
    behind: u64,
}

/// Closes a move's [`Rebuilds`] entries when dropped.
struct Building {
    rebuilds: Arc<Rebuilds>,
    shard: ShardId,
}

impl Drop for Building {
    fn drop(&mut self) {
        self.rebuilds.lock().retain(|(s, _), _| *s != self.shard.0);
    }
}

impl Rebuilds {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u32, u64), Build>> {
        self.builds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `targets` start being built as replicas of `shard`, whose data on
    /// this leader is `total` bytes.
    fn open(self: &Arc<Self>, shard: ShardId, targets: impl Iterator<Item = u64>, total: u64) -> Building {
        let mut builds = self.lock();
        for t in targets {
            builds.insert((shard.0, t), Build { total, ..Build::default() });
        }
        Building { rebuilds: self.clone(), shard }
    }

    fn lag(&self, shard: ShardId, target: u64, behind: u64) {
        if let Some(b) = self.lock().get_mut(&(shard.0, target)) {
            b.behind = behind;
        }
    }

    /// A snapshot stream of `group` to `target` starts (again): its bytes count from zero.
    pub(crate) fn stream_started(&self, group: u64, target: u64) {
        let Some(shard) = GroupId(group).shard() else { return };
        if let Some(b) = self.lock().get_mut(&(shard.0, target)) {
            b.snapshot = true;
            b.sent = 0;
        }
    }

    /// `bytes` more of a snapshot of `group` went to `target`.
    pub(crate) fn sent(&self, group: u64, target: u64, bytes: u64) {
        crate::metrics::heal().rebuild_sent_bytes.add(bytes);
        let Some(shard) = GroupId(group).shard() else { return };
        if let Some(b) = self.lock().get_mut(&(shard.0, target)) {
            b.snapshot = true;
            b.sent = b.sent.saturating_add(bytes);
        }
    }

    /// Every replica being built now. Bytes sent are capped at the total
    /// (frames carry keys too, and the shard may have grown since).
    pub(crate) fn streams(&self) -> Vec<RebuildStream> {
        self.lock()
            .iter()
            .map(|((shard, target), b)| RebuildStream {
                shard: ShardId(*shard),
                target: NodeId(*target),
                progress: RebuildProgress { done_bytes: b.sent.min(b.total), total_bytes: b.total },
                entries_behind: b.behind,
                snapshot: b.snapshot,
            })
            .collect()
    }
}

/// The replicas this node's shard leaders are building now.
pub(crate) fn rebuild_streams(inner: &NodeInner) -> Vec<RebuildStream> {
    inner.transport.get().map(|t| t.rebuilds().streams()).unwrap_or_default()
}

/// The shards whose group this node leads now.
pub(crate) fn leading(inner: &NodeInner) -> Vec<u32> {
    inner
        .groups
        .groups()
        .into_iter()
        .filter_map(|g| {
            let shard = g.shard()?;
            inner.groups.get(g).filter(|r| r.group.membership().leading).map(|_| shard.0)
        })
        .collect()
}

/// The key right after `k` in a shard's key order.
fn next_key(k: &BlockKey) -> Option<BlockKey> {
    if let Some(block) = k.block.checked_add(1) {
        return Some(BlockKey { block, ..*k });
    }
    if let Some(chunk) = k.chunk.checked_add(1) {
        return Some(BlockKey { chunk, block: 0, ..*k });
    }
    k.volume.0.checked_add(1).map(|v| BlockKey { volume: VolumeId(v), chunk: 0, block: 0, ..*k })
}

/// Bytes of data `shard` holds in `store` (allocated blocks × block size),
/// counted by a key-only range scan on a blocking thread. 0 when the scan fails.
async fn shard_bytes(store: Arc<RocksStore>, shard: ShardId) -> u64 {
    let count = tokio::task::spawn_blocking(move || {
        let whole = shard_range(shard);
        let mut range = whole;
        let mut blocks = 0u64;
        loop {
            let keys = match store.allocated(&range, COUNT_STEP) {
                Ok(k) => k,
                Err(e) => {
                    tracing::debug!(%shard, "counting the shard's blocks: {e}");
                    return blocks;
                }
            };
            blocks += keys.len() as u64;
            match keys.last().and_then(next_key) {
                Some(start) if keys.len() == COUNT_STEP && whole.contains(&start) => {
                    range = KeyRange { start, end: whole.end };
                }
                _ => return blocks,
            }
        }
    });
    count.await.unwrap_or(0).saturating_mul(u64::from(BLOCK_SIZE))
}

/// Whether the node at `addr` answers a Raft hello for `cluster`.
pub(crate) async fn probe(inner: &NodeInner, cluster: ClusterId, addr: &str) -> bool {
    let Ok(mut client) = inner.peer_client(addr) else { return false };
    let hello = pb::NodeHello {
        cluster_id: cluster.0,
        node_id: inner.id(),
        addr: inner.advertise.clone(),
        protocol_version: PROTOCOL_VERSION,
    };
    let call = client.hello(hello);
    matches!(tokio::time::timeout(PROBE_TIMEOUT, call).await, Ok(Ok(r)) if r.get_ref().error.is_none())
}

/// The healing state of one node's reconciler.
#[derive(Default)]
pub(crate) struct Healer {
    /// Meta leader only: when each node last answered (since this node leads).
    last_seen: HashMap<u64, Instant>,
    last_probe: Option<Instant>,
    /// Stuck shards already logged, so each is logged once.
    stuck: BTreeSet<(u32, String)>,
    /// Shards this node is moving now.
    moving: Arc<Mutex<HashSet<ShardId>>>,
    /// Meta leader only: when leaders per node were last looked at.
    last_leaders: Option<Instant>,
    /// A lost meta member already logged as not replaceable.
    meta_stuck: Option<u64>,
}

impl Healer {
    /// This node does not lead the meta group: forget what liveness it knew,
    /// so a later term starts with a full grace period for every node.
    pub(crate) fn not_leading(&mut self) {
        self.last_seen.clear();
        self.last_probe = None;
        self.last_leaders = None;
    }

    /// The meta leader's part: liveness and repair proposals.
    pub(crate) async fn lead(&mut self, inner: &Arc<NodeInner>, meta: &MetaGroup<RocksStore>) -> Result<(), String> {
        let now = Instant::now();
        if self.last_probe.is_some_and(|t| now.duration_since(t) < PROBE_EVERY) {
            return Ok(());
        }
        self.last_probe = Some(now);
        let map = meta.local_map();
        let me = inner.id();
        let cluster = ClusterId(map.cluster_id);
        let probes = map.nodes.values().filter(|n| n.id != me).map(|n| async move {
            let alive = probe(inner, cluster, &n.addr).await;
            (n.id, n.up, alive)
        });
        let mut problems = Vec::new();
        for (id, up, alive) in futures::future::join_all(probes).await {
            let seen = *self.last_seen.entry(id).or_insert(now);
            if alive {
                self.last_seen.insert(id, now);
                if !up {
                    match meta.propose(MetaCommand::SetNodeState { node: id, up: true }).await {
                        Ok(Ok(_)) => tracing::info!(node = id, "node answers again: marked up"),
                        Ok(Err(e)) => problems.push(format!("marking {} up: {e}", NodeId(id))),
                        Err(e) => problems.push(format!("marking {} up: {e}", NodeId(id))),
                    }
                }
            } else if up && now.duration_since(seen) >= inner.config.down_after {
                match meta.propose(MetaCommand::SetNodeState { node: id, up: false }).await {
                    Ok(Ok(_)) => tracing::warn!(
                        node = id,
                        after = ?inner.config.down_after,
                        "node has not answered: marked down; its shard replicas will be rebuilt elsewhere"
                    ),
                    Ok(Err(e)) => problems.push(format!("marking {} down: {e}", NodeId(id))),
                    Err(e) => problems.push(format!("marking {} down: {e}", NodeId(id))),
                }
            }
        }
        let map = meta.local_map();
        let ballast_raft::meta::RepairPlan { moves, stuck } = map.repair_moves();
        for (shard, voters) in moves {
            let from = map.shards.get(&shard).map(|s| s.voters.clone()).unwrap_or_default();
            match meta.propose(MetaCommand::MoveShard { shard, voters: voters.clone() }).await {
                Ok(Ok(_)) => {
                    tracing::info!(shard = %ShardId(shard), ?from, to = ?voters, "rebuilding the shard's lost replicas")
                }
                Ok(Err(e)) => problems.push(format!("moving {}: {e}", ShardId(shard))),
                Err(e) => problems.push(format!("moving {}: {e}", ShardId(shard))),
            }
        }
        let stuck: BTreeSet<(u32, String)> = stuck.into_iter().collect();
        for (shard, reason) in stuck.difference(&self.stuck) {
            tracing::warn!(shard = %ShardId(*shard), "cannot rebuild the shard's lost replicas yet: {reason}");
        }
        self.stuck = stuck;
        let map = meta.local_map();
        let mut rebalance = map.rebalance_moves(MAX_REBALANCE_IN_FLIGHT);
        if !rebalance.is_empty() {
            // Only a shard whose group runs (has a leader) moves: a group not
            // formed yet is formed by the map's first voter, and only while
            // nothing joins, so moving it would leave it never formed.
            let led = shard_leaders(inner, &map).await.unwrap_or_default();
            rebalance.retain(|(shard, _)| led.contains_key(shard));
        }
        for (shard, voters) in rebalance {
            let from = map.shards.get(&shard).map(|s| s.voters.clone()).unwrap_or_default();
            match meta.propose(MetaCommand::MoveShard { shard, voters: voters.clone() }).await {
                Ok(Ok(_)) => {
                    crate::metrics::heal().rebalance_moves.inc();
                    tracing::info!(shard = %ShardId(shard), ?from, to = ?voters, "rebalancing: moving a replica to a node holding fewer");
                }
                Ok(Err(e)) => problems.push(format!("rebalancing {}: {e}", ShardId(shard))),
                Err(e) => problems.push(format!("rebalancing {}: {e}", ShardId(shard))),
            }
        }
        if let Err(e) = self.replace_meta_member(inner, meta, &map).await {
            problems.push(format!("replacing a lost meta member: {e}"));
        }
        let map = meta.local_map();
        if map.moves_in_flight() == 0 && self.last_leaders.is_none_or(|t| now.duration_since(t) >= LEADERS_EVERY) {
            self.last_leaders = Some(now);
            if let Err(e) = balance_leaders(inner, &map).await {
                problems.push(format!("balancing leaders: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Meta leader: a meta voter whose node is marked down (silent past
    /// `down_after`) is replaced by a live node holding no meta replica, one
    /// step per pass: that node starts an empty meta replica
    /// (`Admin.JoinMeta`), joins as a learner, and once caught up the
    /// voters change in one joint-consensus step (the group keeps its size).
    /// Needs a majority of the old voters, which the leader's being here
    /// shows. Nothing happens while no live node is free to take the place.
    async fn replace_meta_member(
        &mut self,
        inner: &Arc<NodeInner>,
        meta: &MetaGroup<RocksStore>,
        map: &ClusterMap,
    ) -> Result<(), String> {
        let group = meta.group();
        let now = group.membership();
        if !now.leading || now.joint {
            return Ok(());
        }
        let down = |id: &u64| map.nodes.get(id).is_some_and(|n| !n.up);
        let Some(lost) = now.voters.iter().copied().find(down) else { return Ok(()) };
        let free = |n: &&ballast_raft::meta::MetaNode| n.up && !n.draining && !now.voters.contains(&n.id);
        // A learner already on its way first; else the live non-member with
        // the fewest replicas (ties: lowest id).
        let load = |id: u64| map.shards.values().filter(|s| s.voters.contains(&id)).count();
        let pick = now
            .learners
            .iter()
            .filter_map(|l| map.nodes.get(l))
            .find(|n| free(n))
            .or_else(|| map.nodes.values().filter(free).min_by_key(|n| (load(n.id), n.id)));
        let Some(new) = pick else {
            if self.meta_stuck != Some(lost) {
                tracing::warn!(lost, "a meta member is down and no live node is free to replace it");
                self.meta_stuck = Some(lost);
            }
            return Ok(());
        };
        self.meta_stuck = None;
        if !now.learners.contains(&new.id) {
            let cluster = map.cluster_id;
            let mut client = AdminClient::new(inner.channel(&new.addr)?);
            client
                .join_meta(pb::JoinMetaRequest { cluster_id: cluster })
                .await
                .map_err(|s| format!("{}: {}", NodeId(new.id), ProtoError::from(s)))?;
            let learner = BTreeMap::from([(new.id, BallastNode::new(new.addr.clone()))]);
            group.add_learners(&learner).await.map_err(|e| e.to_string())?;
            tracing::info!(lost, new = new.id, "replacing a lost meta member: the new one is catching up");
            return Ok(());
        }
        if group.learner_lag(new.id).is_none_or(|l| l > CAUGHT_UP) {
            return Ok(());
        }
        let voters: BTreeSet<u64> = now.voters.iter().copied().filter(|v| *v != lost).chain([new.id]).collect();
        group.set_voters(voters.clone()).await.map_err(|e| e.to_string())?;
        crate::metrics::heal().meta_replacements.inc();
        tracing::warn!(lost, new = new.id, ?voters, "replaced a lost meta member");
        Ok(())
    }

    /// Every node's part: move the groups it leads to the map's voters, and
    /// delete its replicas the map has moved away. Returns the problems met.
    pub(crate) async fn converge(&mut self, inner: &Arc<NodeInner>, map: &PlacementMap) -> Vec<String> {
        let me = NodeId(inner.id());
        let mut problems = Vec::new();
        for group in inner.groups.groups() {
            let Some(shard) = group.shard() else { continue };
            let (Some(replica), Some(info)) = (inner.groups.get(group), map.shards.get(&shard)) else { continue };
            let membership = replica.group.membership();
            // A replica whose own group config no longer lists it may still
            // believe it leads (a leader that moved itself out hears from
            // no one): once the map has settled the move, it goes too.
            let left = !membership.voters.contains(&me.0) && info.joining.is_empty();
            if !info.voters.contains(&me) && (!membership.leading || left) {
                if info.joining.is_empty() {
                    if let Err(e) = inner.destroy_shard_replica(shard).await {
                        problems.push(format!("deleting the replica of {shard}: {e}"));
                    }
                }
                continue;
            }
            // A leader the map moves away (a rebalance or a drain taking this
            // node's replica) still converges the group, and steps down when
            // the new voters are committed.
            if !membership.leading {
                continue;
            }
            let want: BTreeSet<u64> = info.voters.iter().map(|v| v.0).collect();
            let settled = membership.voters == want && !membership.joint;
            if settled && info.joining.is_empty() {
                continue;
            }
            {
                let mut moving = self.moving.lock().unwrap_or_else(|e| e.into_inner());
                if moving.contains(&shard) || (!settled && moving.len() >= MAX_MOVES) {
                    continue;
                }
                moving.insert(shard);
            }
            let (inner2, moving) = (inner.clone(), self.moving.clone());
            inner.spawn(async move {
                if let Err(e) = move_shard(&inner2, &replica, shard).await {
                    tracing::warn!(%shard, "moving the shard's replicas: {e}; retrying on a later pass");
                }
                moving.lock().unwrap_or_else(|e| e.into_inner()).remove(&shard);
            });
        }
        problems
    }
}

/// Converge `shard`'s group (led by this node) to the voters the meta
/// leader's map names, then report it.
async fn move_shard(inner: &Arc<NodeInner>, replica: &Replica<RocksStore>, shard: ShardId) -> Result<(), String> {
    let group = &replica.group;
    let (want, nodes) = wanted(inner, shard).await?;
    let voters_now = group.membership().voters;
    let new: BTreeMap<u64, BallastNode> = nodes.into_iter().filter(|(id, _)| !voters_now.contains(id)).collect();
    let rebuilds = inner.transport.get().map(|t| t.rebuilds().clone());
    let mut _building = None;
    if !new.is_empty() {
        if let Some(r) = &rebuilds {
            let total = shard_bytes(group.store().clone(), shard).await;
            _building = Some(r.open(shard, new.keys().copied(), total));
        }
        group.add_learners(&new).await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut last_check = Instant::now();
        loop {
            if !group.membership().leading {
                return Err("no longer the shard's leader".into());
            }
            let lags: Vec<(u64, Option<u64>)> = new.keys().map(|id| (*id, group.learner_lag(*id))).collect();
            if let Some(r) = &rebuilds {
                for (id, lag) in &lags {
                    r.lag(shard, *id, lag.unwrap_or(0));
                }
            }
            if lags.iter().all(|(_, lag)| lag.is_some_and(|l| l <= CAUGHT_UP)) {
                break;
            }
            if last_check.elapsed() >= RECHECK {
                last_check = Instant::now();
                if wanted(inner, shard).await?.0 != want {
                    return Ok(()); // the map changed: a later pass starts over
                }
                tracing::info!(%shard, ?lags, elapsed = ?started.elapsed(), "rebuilding: new replicas catching up");
            }
            tokio::time::sleep(POLL).await;
        }
        tracing::info!(%shard, elapsed = ?started.elapsed(), "rebuilding: new replicas caught up");
    }
    group.set_voters(want.clone()).await.map_err(|e| e.to_string())?;
    let mut client = admin(inner)?;
    let req = pb::ShardMovedRequest { shard: shard.0, voters: want.iter().copied().collect() };
    client.shard_moved(req).await.map_err(|s| ProtoError::from(s).to_string())?;
    crate::metrics::heal().moves_done.inc();
    inner.map.want_refresh();
    // This leader moved itself out of the group (a rebalance or a drain took
    // its replica): openraft lets it go on leading the new voters, so hand
    // the leadership to one of them; then this replica is deleted.
    let me = inner.id();
    if let (false, Some(to), Some(id)) = (want.contains(&me), want.iter().copied().next(), inner.identity.get()) {
        let req =
            pb::TransferLeaderRequest { cluster_id: id.cluster.0, shard: shard.0, to, request: Default::default() };
        if let Err(e) = transfer_leader(inner, req).await {
            // Its lease is dropped either way: the voters elect a leader.
            tracing::warn!(%shard, to, "handing the leadership to a remaining voter: {e}");
        }
    }
    Ok(())
}

/// Meta leader: who leads each shard, as every node marked up (and not
/// draining) says in its `NodeStats`; `None` when one did not answer.
async fn shard_leaders(inner: &Arc<NodeInner>, map: &ClusterMap) -> Option<BTreeMap<u32, u64>> {
    let me = inner.id();
    let cluster = map.cluster_id;
    let asks = map.nodes.values().filter(|n| n.up && !n.draining).map(|n| async move {
        if n.id == me {
            return Some((n.id, leading(inner)));
        }
        let mut client = AdminClient::new(inner.channel(&n.addr).ok()?);
        let call = client.node_stats(pb::NodeStatsRequest { cluster_id: cluster });
        match tokio::time::timeout(PROBE_TIMEOUT, call).await {
            Ok(Ok(r)) => Some((n.id, r.into_inner().leading)),
            _ => None,
        }
    });
    let answers: Vec<(u64, Vec<u32>)> = futures::future::join_all(asks).await.into_iter().flatten().collect();
    if answers.len() < map.nodes.values().filter(|n| n.up && !n.draining).count() {
        return None;
    }
    let mut leaders = BTreeMap::new();
    for (node, shards) in answers {
        for s in shards {
            leaders.insert(s, node);
        }
    }
    Some(leaders)
}

/// Meta leader: have the shard leaders on nodes leading too many hand one over.
async fn balance_leaders(inner: &Arc<NodeInner>, map: &ClusterMap) -> Result<(), String> {
    let me = inner.id();
    let cluster = map.cluster_id;
    // Someone did not answer: counts would be wrong; next time.
    let Some(leaders) = shard_leaders(inner, map).await else { return Ok(()) };
    for mv in map.leader_moves(&leaders, LEADER_MOVES) {
        let req = pb::TransferLeaderRequest {
            cluster_id: cluster,
            shard: mv.shard.0,
            to: mv.to.0,
            request: Default::default(),
        };
        let result = if mv.from.0 == me {
            transfer_leader(inner, req).await
        } else {
            let addr = map.nodes.get(&mv.from.0).map(|n| n.addr.clone()).unwrap_or_default();
            match inner.channel(&addr) {
                Ok(c) => AdminClient::new(c)
                    .transfer_leader(req)
                    .await
                    .map(|_| ())
                    .map_err(|s| ProtoError::from(s).into_api()),
                Err(e) => Err(ApiError::new(ErrorCode::Unavailable, e)),
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(shard = %mv.shard, from = %mv.from, to = %mv.to, "leader balancing: leadership handed over")
            }
            Err(e) => return Err(format!("{} from {} to {}: {e}", mv.shard, mv.from, mv.to)),
        }
    }
    Ok(())
}

/// `Admin.TransferLeader` on this node. Without `request`: this node leads
/// the shard and hands the leadership to `to` (stops proposing, then passes
/// the call on to `to` with openraft's transfer request). With it: this
/// node is `to` and campaigns at once.
pub(crate) async fn transfer_leader(inner: &Arc<NodeInner>, req: pb::TransferLeaderRequest) -> Result<(), ApiError> {
    let invalid = |m: String| ApiError::new(ErrorCode::Invalid, m);
    let id = inner
        .identity
        .get()
        .ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "this node is not part of a cluster yet"))?;
    if req.cluster_id != id.cluster.0 {
        return Err(ApiError::new(ErrorCode::Conflict, format!("this node belongs to {}", id.cluster)));
    }
    if req.to == 0 {
        return Err(invalid("TransferLeaderRequest.to: node id 0".into()));
    }
    let shard = ShardId(req.shard);
    let replica = inner
        .groups
        .get(GroupId::for_shard(shard))
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("{shard} has no replica on {}", id.node)))?;
    if !req.request.is_empty() {
        let offer: TransferLeaderRequest<TypeConfig> =
            codec::decode(&req.request).map_err(|e| invalid(format!("TransferLeaderRequest.request: {e}")))?;
        return replica.group.take_leadership(offer).await.map_err(api_error);
    }
    let addr = inner
        .map
        .map()
        .nodes
        .get(&NodeId(req.to))
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("{} is not in the map", NodeId(req.to))))?;
    let offer = replica.group.transfer_leadership(req.to).await.map_err(api_error)?;
    let request = codec::encode(&offer).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    crate::metrics::heal().leader_transfers.inc();
    let channel = inner.channel(&addr).map_err(|e| ApiError::new(ErrorCode::Unavailable, e))?;
    // If `to` cannot be told, the old leader's lease is gone anyway: the
    // group elects someone after its election timeout.
    AdminClient::new(channel)
        .transfer_leader(pb::TransferLeaderRequest { request, ..req })
        .await
        .map(|_| ())
        .map_err(|s| ProtoError::from(s).into_api())
}

/// The voters (Raft ids, with addresses) the meta leader's map names for `shard`.
async fn wanted(inner: &NodeInner, shard: ShardId) -> Result<(BTreeSet<u64>, BTreeMap<u64, BallastNode>), String> {
    let map = fresh_map(inner).await?;
    let info = map.shards.get(&shard).ok_or_else(|| format!("{shard} is not in the map"))?;
    let mut nodes = BTreeMap::new();
    for v in &info.voters {
        let addr = map.nodes.get(v).ok_or_else(|| format!("{v} has no address in the map"))?;
        nodes.insert(v.0, BallastNode::new(addr.clone()));
    }
    inner.map.update(map);
    Ok((nodes.keys().copied().collect(), nodes))
}

/// The meta leader's current map, through this node's own Admin service
/// (which forwards to the leader and reads linearizably there).
async fn fresh_map(inner: &NodeInner) -> Result<PlacementMap, String> {
    let mut client = admin(inner)?;
    let reply = client
        .get_placement(pb::GetPlacementRequest::from(MapVersion(0)))
        .await
        .map_err(|s| ProtoError::from(s).to_string())?;
    let reply = PlacementReply::try_from(reply.into_inner()).map_err(|e| e.to_string())?;
    reply.map.ok_or_else(|| "the meta leader sent no map".to_string())
}

/// An Admin client of this node itself.
fn admin(inner: &NodeInner) -> Result<AdminClient<tonic::transport::Channel>, String> {
    let a = inner.local_addr;
    let ip = match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let channel = inner.channel(&SocketAddr::new(ip, a.port()).to_string())?;
    Ok(AdminClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE))
}

/// `Admin.JoinMeta` on this node: start an empty meta replica for the meta
/// leader to add (see [`Healer`]'s meta member replacement).
pub(crate) async fn join_meta(inner: &Arc<NodeInner>, req: pb::JoinMetaRequest) -> Result<(), ApiError> {
    let id = inner
        .identity
        .get()
        .ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "this node is not part of a cluster yet"))?;
    if req.cluster_id != id.cluster.0 {
        return Err(ApiError::new(ErrorCode::Conflict, format!("this node belongs to {}", id.cluster)));
    }
    inner.join_meta().await.map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))
}

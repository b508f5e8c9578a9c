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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_proto::pb;
use ballast_proto::pb::admin_client::AdminClient;
use ballast_proto::pb::raft_client::RaftClient;
use ballast_proto::{ProtoError, MAX_MESSAGE_SIZE};
use ballast_raft::{BallastNode, MetaCommand, MetaGroup};
use ballast_storage::RocksStore;
use ballast_types::{ClusterId, MapVersion, NodeId, PlacementMap, PlacementReply, ShardId, PROTOCOL_VERSION};

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

/// Whether the node at `addr` answers a Raft hello for `cluster`.
pub(crate) async fn probe(inner: &NodeInner, cluster: ClusterId, addr: &str) -> bool {
    let Ok(channel) = inner.channel(addr) else { return false };
    let hello = pb::NodeHello {
        cluster_id: cluster.0,
        node_id: inner.id(),
        addr: inner.advertise.clone(),
        protocol_version: PROTOCOL_VERSION,
    };
    let call = async { RaftClient::new(channel).hello(hello).await };
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
}

impl Healer {
    /// This node does not lead the meta group: forget what liveness it knew,
    /// so a later term starts with a full grace period for every node.
    pub(crate) fn not_leading(&mut self) {
        self.last_seen.clear();
        self.last_probe = None;
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
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
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
            if !info.voters.contains(&me) {
                if info.joining.is_empty() && !membership.leading {
                    if let Err(e) = inner.destroy_shard_replica(shard).await {
                        problems.push(format!("deleting the replica of {shard}: {e}"));
                    }
                }
                continue;
            }
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
    if !new.is_empty() {
        group.add_learners(&new).await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut last_check = Instant::now();
        loop {
            if !group.membership().leading {
                return Err("no longer the shard's leader".into());
            }
            let lags: Vec<(u64, Option<u64>)> = new.keys().map(|id| (*id, group.learner_lag(*id))).collect();
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
    inner.map.want_refresh();
    Ok(())
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

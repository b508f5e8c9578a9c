//! Background work of a member node, driven by the cluster map.
//!
//! [`run`] keeps the node's copy of the placement map current (the meta
//! replica's applied map on a meta member; `GetPlacement` from a seed
//! otherwise), every `reconcile_every` or at once when a request named a
//! volume the node's map does not know. From the map it:
//! - starts a replica of every shard that lists this node as a voter;
//! - forms each new shard's group on its first voter: only a replica that
//!   was never initialized (no vote, no log) initializes, so a restart or a
//!   second pass never forms a group twice;
//! - heals ([`crate::repair`]): on the meta leader, marks silent nodes down
//!   and gives their shards new voters; on every node, moves the groups it
//!   leads to the map's voters and deletes replicas the map moved away;
//! - on the meta leader only, frees deleted volumes: every shard of the
//!   volume's pool drops its blocks through its own log (`Data.Purge` to the
//!   shard's leader), then the volume's tombstone is removed from the map.
//!
//! [`join`] is how a node without an identity enters an existing cluster.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::pb;
use ballast_proto::pb::admin_client::AdminClient;
use ballast_proto::pb::data_client::DataClient;
use ballast_proto::{ProtoError, Reply};
use ballast_raft::{BallastNode, MetaCommand};
use ballast_types::{
    ErrorCode, GroupId, JoinNode, JoinNodeReply, NodeId, PlacementMap, PlacementReply, ShardId, VolumeId,
    PROTOCOL_VERSION,
};

use crate::identity::Identity;
use crate::node::NodeInner;

/// The reconciler of a member node; runs until the node stops.
pub(crate) async fn run(inner: Arc<NodeInner>) {
    let mut state = State::default();
    let mut last_problem = String::new();
    loop {
        match tick(&inner, &mut state).await {
            Ok(()) => last_problem.clear(),
            Err(problem) => {
                // Logged once per distinct problem, not once per pass.
                if problem != last_problem {
                    tracing::warn!(node = inner.id(), "reconcile: {problem}");
                    last_problem = problem;
                }
            }
        }
        tokio::select! {
            _ = inner.map.wanted() => {}
            _ = tokio::time::sleep(inner.config.reconcile_every) => {}
        }
    }
}

#[derive(Default)]
struct State {
    /// Shards whose group this node saw initialized (no need to ask again).
    formed: HashSet<ShardId>,
    /// `(volume, shard)` pairs purged since this node became meta leader.
    purged: HashSet<(u64, u32)>,
    /// Seed rotation for map fetches.
    next_seed: usize,
    /// Liveness, rebuilds and moves ([`crate::repair`]).
    healer: crate::repair::Healer,
}

async fn tick(inner: &Arc<NodeInner>, state: &mut State) -> Result<(), String> {
    let me = NodeId(inner.id());
    match inner.meta.get() {
        // The meta leader's map is the map.
        Some(meta) if meta.leader().is_some_and(|(id, _)| id == me.0) => {
            let m = meta.local_map();
            if !m.is_initialized() {
                return Ok(());
            }
            inner.map.update(m.placement());
        }
        Some(meta) => {
            // A follower's map is the map as committed, perhaps a little
            // behind. But a meta replica replaced in the group while this
            // node was away or cut off may not know it: it hears from no
            // leader, or still names its last one, and its map never moves
            // again. So a follower also asks the meta leader (through any
            // node) for anything newer; the newest version wins.
            let m = meta.local_map();
            let local = meta.leader().is_some() && m.is_initialized();
            if local {
                inner.map.update(m.placement());
            } else if !m.is_initialized() && meta.leader().is_none() {
                return Ok(());
            }
            if let Err(e) = fetch_map(inner, state).await {
                if !local {
                    return Err(e);
                }
                tracing::debug!("checking the map with the meta leader: {e}");
            }
        }
        None => fetch_map(inner, state).await?,
    }
    let map = inner.map.map();
    let mut problems = Vec::new();
    for (shard, info) in &map.shards {
        if !info.voters.contains(&me) {
            continue;
        }
        let group = GroupId::for_shard(*shard);
        if !inner.groups.contains(group) {
            if let Err(e) = inner.create_shard_replica(*shard).await {
                problems.push(format!("starting {shard}: {e}"));
                continue;
            }
        }
        // Only a shard that never had a group is formed; one with joining
        // replicas has a group that is changing its voters.
        if info.voters[0] != me || !info.joining.is_empty() || state.formed.contains(shard) {
            continue;
        }
        let Some(replica) = inner.groups.get(group) else { continue };
        match replica.group.raft().is_initialized().await {
            Ok(true) => {
                state.formed.insert(*shard);
            }
            Ok(false) => {
                let members: BTreeMap<u64, BallastNode> = info
                    .voters
                    .iter()
                    .map(|v| (v.0, BallastNode::new(map.nodes.get(v).cloned().unwrap_or_default())))
                    .collect();
                match replica.group.initialize(members).await {
                    Ok(()) => {
                        tracing::info!(node = me.0, %shard, "formed the shard's group");
                        state.formed.insert(*shard);
                    }
                    Err(e) => problems.push(format!("forming {shard}: {e}")),
                }
            }
            Err(e) => problems.push(format!("{shard}: {e}")),
        }
    }
    problems.extend(state.healer.converge(inner, &map).await);
    if let Some(meta) = inner.meta.get() {
        if meta.leader().map(|(id, _)| id) == Some(me.0) {
            purge_deleted(inner, state, &map).await.unwrap_or_else(|e| problems.push(e));
            state.healer.lead(inner, meta).await.unwrap_or_else(|e| problems.push(e));
        } else {
            state.purged.clear();
            state.healer.not_leading();
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Where a node without a meta replica asks for the map: its seeds, then
/// every node the map it holds names.
fn map_sources(identity: Option<&Identity>, map: &PlacementMap) -> Vec<String> {
    let mut out: Vec<String> = identity.map(|i| i.seeds.clone()).unwrap_or_default();
    for addr in map.nodes.values() {
        if !out.contains(addr) {
            out.push(addr.clone());
        }
    }
    out
}

async fn fetch_map(inner: &Arc<NodeInner>, state: &mut State) -> Result<(), String> {
    let held = inner.map.map();
    let me = [inner.advertise.clone(), inner.local_addr.to_string()];
    let sources: Vec<String> =
        map_sources(inner.identity.get(), &held).into_iter().filter(|a| !me.contains(a)).collect();
    if sources.is_empty() {
        return Err("no seed to fetch the cluster map from".into());
    }
    let mut last = String::new();
    for _ in 0..sources.len() {
        let addr = &sources[state.next_seed % sources.len()];
        state.next_seed += 1;
        let mut client =
            AdminClient::new(inner.channel(addr)?).max_decoding_message_size(ballast_proto::MAX_MESSAGE_SIZE);
        let req = pb::GetPlacementRequest::from(held.version);
        match client.get_placement(req).await {
            Ok(reply) => {
                let reply = PlacementReply::try_from(reply.into_inner()).map_err(|e| format!("{addr}: {e}"))?;
                if let Some(map) = reply.map {
                    inner.map.update(map);
                }
                state.next_seed -= 1; // stay with a source that answers
                return Ok(());
            }
            Err(s) => last = format!("{addr}: {}", ProtoError::from(s)),
        }
    }
    Err(format!("fetching the cluster map: {last}"))
}

/// Free the blocks of deleted volumes in every shard of their pool, then
/// forget the tombstones. Meta leader only.
async fn purge_deleted(inner: &Arc<NodeInner>, state: &mut State, map: &PlacementMap) -> Result<(), String> {
    let Some(meta) = inner.meta.get() else { return Ok(()) };
    let deleted = meta.local_map().deleted;
    let mut problems = Vec::new();
    for (volume, pool) in deleted {
        let Some(pool) = map.pools.get(&ballast_types::PoolId(pool)) else { continue };
        let mut done = true;
        for shard in pool.shard_ids() {
            if state.purged.contains(&(volume, shard.0)) {
                continue;
            }
            match purge_shard(inner, map, VolumeId(volume), shard).await {
                Ok(()) => {
                    state.purged.insert((volume, shard.0));
                }
                Err(e) => {
                    done = false;
                    problems.push(format!("purging {} from {shard}: {e}", VolumeId(volume)));
                }
            }
        }
        if done {
            match meta.propose(MetaCommand::ForgetVolume { id: volume }).await {
                Ok(_) => tracing::info!(volume = %VolumeId(volume), "deleted volume freed in every shard"),
                Err(e) => problems.push(format!("forgetting {}: {e}", VolumeId(volume))),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

async fn purge_shard(inner: &NodeInner, map: &PlacementMap, volume: VolumeId, shard: ShardId) -> Result<(), String> {
    let info = map.shards.get(&shard).ok_or("shard not in the map")?;
    let mut targets: Vec<String> = map.leader_of(shard).map(|l| l.addr).into_iter().collect();
    targets.extend(info.voters.iter().filter_map(|v| map.nodes.get(v).cloned()));
    let mut last = String::from("no voter");
    let mut tried = BTreeSet::new();
    while let Some(addr) = targets.first().cloned() {
        targets.remove(0);
        if !tried.insert(addr.clone()) {
            continue;
        }
        let mut client = DataClient::new(inner.channel(&addr)?);
        let req = pb::PurgeRequest { volume_id: volume.0, shard: shard.0 };
        match client.purge(req).await.map_err(ProtoError::from).and_then(|r| r.into_inner().into_result()) {
            Ok(()) => return Ok(()),
            Err(ProtoError::Api(e)) if e.code == ErrorCode::NotLeader => {
                if let Some(h) = e.leader_hint.filter(|h| !h.addr.is_empty()) {
                    targets.insert(0, h.addr);
                }
                last = format!("{addr}: {}", e.message);
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// Join the cluster through `config.join`, then take up the identity the
/// meta leader assigned. Retries (with backoff) until it succeeds or the
/// node stops.
pub(crate) async fn join(inner: Arc<NodeInner>) {
    let request = JoinNode {
        node: None,
        addr: inner.advertise.clone(),
        zone: inner.config.zone.clone(),
        disks: inner.disk_infos(),
        token: inner.config.join_token.clone().unwrap_or_else(|| crate::node::NO_JOIN_TOKEN.into()),
        protocol_version: PROTOCOL_VERSION,
    };
    let endpoints = inner.config.join.clone();
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 0usize;
    let mut last_problem = String::new();
    loop {
        let addr = &endpoints[attempt % endpoints.len()];
        attempt += 1;
        let mut refused = false;
        let result = async {
            let mut client = AdminClient::new(inner.channel(addr)?);
            let reply = client.join_node(pb::JoinNodeRequest::from(request.clone())).await.map_err(|s| {
                if let Some(f) = ballast_proto::tls::connect_failure(&s, inner.config.tls.is_some()) {
                    return f.at(addr);
                }
                let e = ProtoError::from(s);
                refused = e.code() == ErrorCode::Unauthenticated;
                e.to_string()
            })?;
            JoinNodeReply::try_from(reply.into_inner()).map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(reply) => {
                let id = Identity { cluster: reply.cluster, node: reply.node, meta: false, seeds: endpoints.clone() };
                match inner.activate(id).await {
                    Ok(()) => {
                        tracing::info!(node = reply.node.0, cluster = %reply.cluster, via = %addr, "joined the cluster");
                        return;
                    }
                    Err(e) => {
                        tracing::error!("joined as {} but could not take the identity up: {e}", reply.node);
                        return;
                    }
                }
            }
            Err(problem) if refused => {
                // Retrying cannot fix a wrong token: the node must be restarted with the right one.
                tracing::error!(
                    "joining through {addr} refused: {problem}; restart this node with the cluster's --join-token"
                );
                return;
            }
            Err(problem) => {
                if problem != last_problem {
                    tracing::warn!("joining through {addr}: {problem}; retrying");
                    last_problem = problem;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

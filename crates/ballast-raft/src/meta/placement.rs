//! Where shard replicas go: pure decisions, no I/O (Style habit 2).
//!
//! [`place_shards`] chooses the voters of a new pool's shards;
//! [`plan_repair`] turns "these nodes are down" into the [`Action`]s that
//! restore every affected shard's replica count. The meta leader calls them
//! and the node crate executes the actions; tests assert on the output only.
//!
//! Rules, for both:
//! - a node is *eligible* when it is up, not listed as down, and has a disk;
//! - a shard's voters are distinct nodes, and with [`FailureDomain::Zone`]
//!   distinct zones (a node without a zone label is a domain of its own);
//! - among the nodes allowed, the one holding the fewest replicas wins, ties
//!   broken by a rotation of the node order that advances with the shard, so
//!   the result is deterministic and spread;
//! - the first voter of a new shard is its intended leader, chosen as the
//!   voter that leads the fewest shards so far.

use std::collections::{BTreeMap, BTreeSet};

use ballast_types::{FailureDomain, NodeId, PoolId, PoolInfo, ShardId, ShardInfo};

/// What placement needs to know about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSlot {
    pub id: NodeId,
    pub zone: Option<String>,
    pub up: bool,
    /// Disks the node offers; a node with none takes no replicas.
    pub disks: u32,
}

impl NodeSlot {
    fn domain(&self, fd: FailureDomain) -> Domain<'_> {
        match (fd, &self.zone) {
            (FailureDomain::Zone, Some(z)) => Domain::Zone(z),
            _ => Domain::Node(self.id),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Domain<'a> {
    Zone(&'a str),
    Node(NodeId),
}

/// What to place: the replication rules of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementRule {
    pub replicas: u32,
    pub failure_domain: FailureDomain,
}

/// Why no valid placement exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{replicas} replicas need {replicas} eligible nodes; {eligible} are up with a disk")]
    NotEnoughNodes { replicas: u32, eligible: usize },
    #[error("{replicas} replicas need {replicas} distinct zones; eligible nodes span {zones}")]
    NotEnoughZones { replicas: u32, zones: usize },
}

/// The voters of one new shard; `voters[0]` is the intended leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub shard: ShardId,
    pub voters: Vec<NodeId>,
}

/// Replica and leader counts per node, carried across decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    pub replicas: BTreeMap<NodeId, u32>,
    pub leaders: BTreeMap<NodeId, u32>,
}

impl Load {
    /// The load of the shards already placed.
    pub fn of<'a>(shards: impl IntoIterator<Item = &'a ShardInfo>) -> Self {
        let mut load = Load::default();
        for s in shards {
            for v in &s.voters {
                *load.replicas.entry(*v).or_default() += 1;
            }
            if let Some(l) = s.leader.or_else(|| s.voters.first().copied()) {
                *load.leaders.entry(l).or_default() += 1;
            }
        }
        load
    }

    fn replicas(&self, n: NodeId) -> u32 {
        self.replicas.get(&n).copied().unwrap_or(0)
    }

    fn leaders(&self, n: NodeId) -> u32 {
        self.leaders.get(&n).copied().unwrap_or(0)
    }
}

fn eligible<'a>(nodes: &'a [NodeSlot], down: &BTreeSet<NodeId>) -> Vec<&'a NodeSlot> {
    let mut v: Vec<_> = nodes.iter().filter(|n| n.up && n.disks > 0 && !down.contains(&n.id)).collect();
    v.sort_by_key(|n| n.id);
    v.dedup_by_key(|n| n.id);
    v
}

/// Check that `rule` can be met by `nodes` at all.
fn check(nodes: &[&NodeSlot], rule: PlacementRule) -> Result<(), PlacementError> {
    let replicas = rule.replicas;
    if nodes.len() < replicas as usize {
        return Err(PlacementError::NotEnoughNodes { replicas, eligible: nodes.len() });
    }
    let zones: BTreeSet<_> = nodes.iter().map(|n| n.domain(rule.failure_domain)).collect();
    if zones.len() < replicas as usize {
        return Err(PlacementError::NotEnoughZones { replicas, zones: zones.len() });
    }
    Ok(())
}

/// The best node for one more replica: allowed (not `taken`, domain not in
/// `used`), fewest replicas, ties by rotation `turn`.
fn pick<'a>(
    nodes: &[&'a NodeSlot],
    rule: PlacementRule,
    load: &Load,
    taken: &[NodeId],
    used: &BTreeSet<Domain<'_>>,
    turn: usize,
) -> Option<&'a NodeSlot> {
    let n = nodes.len();
    (0..n)
        .map(|i| (i, nodes[i]))
        .filter(|(_, s)| !taken.contains(&s.id) && !used.contains(&s.domain(rule.failure_domain)))
        .min_by_key(|(i, s)| (load.replicas(s.id), (i + n - turn % n) % n))
        .map(|(_, s)| s)
}

/// Choose voters for `count` new shards starting at `first`, given the load
/// of the shards already placed (updated in place). Deterministic.
pub fn place_shards(
    nodes: &[NodeSlot],
    rule: PlacementRule,
    first: ShardId,
    count: u32,
    load: &mut Load,
) -> Result<Vec<Placement>, PlacementError> {
    let nodes = eligible(nodes, &BTreeSet::new());
    check(&nodes, rule)?;
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let shard = ShardId(first.0 + i);
        let mut voters: Vec<NodeId> = Vec::with_capacity(rule.replicas as usize);
        let mut used = BTreeSet::new();
        for _ in 0..rule.replicas {
            // `check` guarantees enough distinct domains, so a pick exists.
            let Some(s) = pick(&nodes, rule, load, &voters, &used, shard.0 as usize) else {
                return Err(PlacementError::NotEnoughZones { replicas: rule.replicas, zones: used.len() });
            };
            used.insert(s.domain(rule.failure_domain));
            voters.push(s.id);
            *load.replicas.entry(s.id).or_default() += 1;
        }
        // The intended leader: the voter leading the fewest shards (stable on ties).
        if let Some(pos) = (0..voters.len()).min_by_key(|&j| (load.leaders(voters[j]), j)) {
            voters.swap(0, pos);
        }
        *load.leaders.entry(voters[0]).or_default() += 1;
        out.push(Placement { shard, voters });
    }
    Ok(out)
}

/// One step of a repair, for the node crate to execute in order per shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a replica of `shard` on `node` and add it as a learner
    /// (`add_learner(.., blocking = true)`: returns once it caught up).
    AddLearner { shard: ShardId, node: NodeId },
    /// Change the shard's voters to `voters` (which includes `node`, the
    /// caught-up learner), then record them with `UpdateShardVoters`.
    Promote { shard: ShardId, node: NodeId, voters: Vec<NodeId> },
    /// `node` is no longer a voter: stop and delete its replica of `shard`
    /// (when the node comes back).
    RemoveReplica { shard: ShardId, node: NodeId },
    /// No eligible node can take a replacement replica: the shard stays
    /// under-replicated until one joins.
    Stuck { shard: ShardId, reason: PlacementError },
}

/// The actions that replace every replica on a `down` node. For each
/// affected shard, per lost voter: `AddLearner`, then `Promote` (voters
/// minus the lost ones, plus the replacements), then `RemoveReplica` for
/// each lost voter. Shards are visited in id order and the load is updated as
/// replacements are chosen, so replacements spread. A shard whose voters are
/// mostly down cannot commit the change; the executor finds out and retries.
pub fn plan_repair(
    nodes: &[NodeSlot],
    pools: &BTreeMap<PoolId, PoolInfo>,
    shards: &BTreeMap<ShardId, ShardInfo>,
    down: &BTreeSet<NodeId>,
) -> Vec<Action> {
    let mut load = Load::of(shards.values());
    let candidates = eligible(nodes, down);
    let by_id: BTreeMap<NodeId, &NodeSlot> = nodes.iter().map(|n| (n.id, n)).collect();
    let mut out = Vec::new();
    for (id, shard) in shards {
        let lost: Vec<NodeId> = shard.voters.iter().copied().filter(|v| down.contains(v)).collect();
        if lost.is_empty() {
            continue;
        }
        let fd = pools.get(&shard.pool).map_or(FailureDomain::Node, |p| p.spec.failure_domain);
        let rule = PlacementRule { replicas: lost.len() as u32, failure_domain: fd };
        let kept: Vec<NodeId> = shard.voters.iter().copied().filter(|v| !down.contains(v)).collect();
        let used: BTreeSet<Domain<'_>> = kept.iter().filter_map(|v| by_id.get(v)).map(|n| n.domain(fd)).collect();
        let mut used = used;
        let mut taken = shard.voters.clone();
        let mut added = Vec::new();
        for _ in &lost {
            match pick(&candidates, rule, &load, &taken, &used, id.0 as usize) {
                Some(s) => {
                    used.insert(s.domain(fd));
                    taken.push(s.id);
                    added.push(s.id);
                    *load.replicas.entry(s.id).or_default() += 1;
                }
                None => {
                    let zones = candidates.iter().map(|n| n.domain(fd)).collect::<BTreeSet<_>>().len();
                    let reason = if fd == FailureDomain::Zone {
                        PlacementError::NotEnoughZones { replicas: shard.voters.len() as u32, zones }
                    } else {
                        let eligible = candidates.len();
                        PlacementError::NotEnoughNodes { replicas: shard.voters.len() as u32, eligible }
                    };
                    out.push(Action::Stuck { shard: *id, reason });
                    break;
                }
            }
        }
        if added.len() < lost.len() {
            for n in added {
                *load.replicas.entry(n).or_default() -= 1;
            }
            continue;
        }
        let mut voters = kept.clone();
        for n in &added {
            out.push(Action::AddLearner { shard: *id, node: *n });
        }
        for n in &added {
            voters.push(*n);
            out.push(Action::Promote { shard: *id, node: *n, voters: with_lost(&voters, &lost, n, &added) });
        }
        for n in lost {
            out.push(Action::RemoveReplica { shard: *id, node: n });
        }
    }
    out
}

/// The voter set after promoting `n`: the kept voters, the replacements
/// promoted so far, and the lost voters not yet replaced (a membership change
/// adds one voter at a time and keeps the size until the last promotion).
fn with_lost(promoted: &[NodeId], lost: &[NodeId], n: &NodeId, added: &[NodeId]) -> Vec<NodeId> {
    let done = added.iter().position(|a| a == n).map_or(0, |p| p + 1);
    let mut v = promoted.to_vec();
    if done < added.len() {
        v.extend_from_slice(&lost[done..]);
    }
    v
}

/// One rebalancing step: `shard`'s voters become `voters` (through
/// `MetaCommand::MoveShard`, like a repair).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebalance {
    pub shard: ShardId,
    pub voters: Vec<NodeId>,
}

/// Replica moves that even out replica counts across the eligible nodes
/// (up, not draining, with a disk), at most `budget` of them, each shard at
/// most once. A move takes a replica from a node holding at least two more
/// than another and gives it to that node, keeping voters distinct and the
/// pool's failure domain; the widest gap goes first, and once no such move
/// exists the plan ends (with node failure domains that means max − min ≤ 1).
/// Shards with joining voters or a voter on a node that is not eligible are
/// left alone (a repair or another move owns them). A one-replica shard
/// moves in two steps: it gains the new voter first, and a later plan drops
/// the old one (any shard with more voters than its pool's replicas loses
/// the voter on its most loaded node, before anything else moves).
/// Deterministic.
pub fn plan_rebalance(
    nodes: &[NodeSlot],
    pools: &BTreeMap<PoolId, PoolInfo>,
    shards: &BTreeMap<ShardId, ShardInfo>,
    budget: usize,
) -> Vec<Rebalance> {
    let candidates = eligible(nodes, &BTreeSet::new());
    let by_id: BTreeMap<NodeId, &NodeSlot> = candidates.iter().map(|n| (n.id, *n)).collect();
    let mut load: BTreeMap<NodeId, u32> = by_id.keys().map(|id| (*id, 0)).collect();
    for s in shards.values() {
        for v in &s.voters {
            if let Some(c) = load.get_mut(v) {
                *c += 1;
            }
        }
    }
    let movable = |s: &ShardInfo| s.joining.is_empty() && s.voters.iter().all(|v| by_id.contains_key(v));
    let mut out = Vec::new();
    let mut touched = BTreeSet::new();
    // Finish two-step moves first: drop the surplus voter.
    for (id, s) in shards {
        let replicas = pools.get(&s.pool).map_or(s.voters.len(), |p| p.spec.replicas as usize).max(1);
        if out.len() >= budget || s.voters.len() <= replicas || !movable(s) {
            continue;
        }
        let Some(drop) = s.voters.iter().copied().max_by_key(|v| (load[v], *v)) else { continue };
        *load.entry(drop).or_default() -= 1;
        touched.insert(*id);
        out.push(Rebalance { shard: *id, voters: s.voters.iter().copied().filter(|v| *v != drop).collect() });
    }
    while out.len() < budget {
        let mut pairs: Vec<(u32, NodeId, NodeId)> = Vec::new();
        for (d, dl) in &load {
            for (r, rl) in &load {
                if *dl >= rl + 2 {
                    pairs.push((dl - rl, *d, *r));
                }
            }
        }
        pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let found = pairs.iter().find_map(|(_, d, r)| {
            shards
                .iter()
                .filter(|(id, s)| !touched.contains(*id) && movable(s))
                .filter(|(_, s)| s.voters.contains(d) && !s.voters.contains(r))
                .find(|(_, s)| {
                    let fd = pools.get(&s.pool).map_or(FailureDomain::Node, |p| p.spec.failure_domain);
                    let others: BTreeSet<Domain<'_>> = s
                        .voters
                        .iter()
                        .filter(|v| *v != d)
                        .filter_map(|v| by_id.get(v))
                        .map(|n| n.domain(fd))
                        .collect();
                    !others.contains(&by_id[r].domain(fd))
                })
                .map(|(id, s)| (*id, s, *d, *r))
        });
        let Some((id, s, d, r)) = found else { break };
        let voters: Vec<NodeId> = if s.voters.len() == 1 {
            vec![d, r]
        } else {
            *load.entry(d).or_default() -= 1;
            s.voters.iter().map(|v| if *v == d { r } else { *v }).collect()
        };
        *load.entry(r).or_default() += 1;
        touched.insert(id);
        out.push(Rebalance { shard: id, voters });
    }
    out
}

/// One leader-balancing step: ask `shard`'s leader on `from` to hand its
/// leadership to the voter on `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderMove {
    pub shard: ShardId,
    pub from: NodeId,
    pub to: NodeId,
}

/// Leadership transfers that even out how many shards each eligible node
/// leads, at most `budget`, given who leads each shard now (`leaders`;
/// shards missing from it are not counted). Only a gap of two or more is
/// acted on, so a balanced cluster (max − min ≤ 1) is left alone and a
/// transfer never undoes the previous one. The new leader must be a voter
/// (never a joining one) of the shard. Deterministic.
pub fn plan_leader_moves(
    nodes: &[NodeSlot],
    shards: &BTreeMap<ShardId, ShardInfo>,
    leaders: &BTreeMap<ShardId, NodeId>,
    budget: usize,
) -> Vec<LeaderMove> {
    let candidates = eligible(nodes, &BTreeSet::new());
    let mut count: BTreeMap<NodeId, u32> = candidates.iter().map(|n| (n.id, 0)).collect();
    for l in leaders.values() {
        if let Some(c) = count.get_mut(l) {
            *c += 1;
        }
    }
    let mut out = Vec::new();
    let mut moved = BTreeSet::new();
    while out.len() < budget {
        let mut pairs: Vec<(u32, NodeId, NodeId)> = Vec::new();
        for (f, fc) in &count {
            for (t, tc) in &count {
                if *fc >= tc + 2 {
                    pairs.push((fc - tc, *f, *t));
                }
            }
        }
        pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let found = pairs.iter().find_map(|(_, f, t)| {
            leaders
                .iter()
                .filter(|(id, l)| *l == f && !moved.contains(*id))
                .find(|(id, _)| shards.get(id).is_some_and(|s| s.voters.contains(t) && !s.joining.contains(t)))
                .map(|(id, _)| (*id, *f, *t))
        });
        let Some((shard, from, to)) = found else { break };
        *count.entry(from).or_default() -= 1;
        *count.entry(to).or_default() += 1;
        moved.insert(shard);
        out.push(LeaderMove { shard, from, to });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_types::PoolSpec;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn node(id: u64, zone: Option<&str>) -> NodeSlot {
        NodeSlot { id: NodeId(id), zone: zone.map(str::to_string), up: true, disks: 1 }
    }

    fn rule(replicas: u32, fd: FailureDomain) -> PlacementRule {
        PlacementRule { replicas, failure_domain: fd }
    }

    fn counts(p: &[Placement]) -> BTreeMap<NodeId, u32> {
        let mut c = BTreeMap::new();
        for s in p {
            for v in &s.voters {
                *c.entry(*v).or_default() += 1;
            }
        }
        c
    }

    #[test]
    fn three_replicas_on_five_nodes_are_distinct_balanced_and_leaders_spread() {
        let nodes: Vec<_> = (1..=5).map(|i| node(i, None)).collect();
        let p = place_shards(&nodes, rule(3, FailureDomain::Node), ShardId(10), 10, &mut Load::default()).unwrap();
        assert_eq!(p.len(), 10);
        assert_eq!(p[0].shard, ShardId(10));
        for s in &p {
            let set: BTreeSet<_> = s.voters.iter().collect();
            assert_eq!(set.len(), 3, "{s:?}");
        }
        let c = counts(&p);
        assert_eq!(c.values().sum::<u32>(), 30);
        assert!(c.values().all(|&n| n == 6), "{c:?}");
        let mut leaders = BTreeMap::<NodeId, u32>::new();
        for s in &p {
            *leaders.entry(s.voters[0]).or_default() += 1;
        }
        assert!(leaders.values().all(|&n| n == 2), "{leaders:?}");
        // Deterministic.
        let again = place_shards(&nodes, rule(3, FailureDomain::Node), ShardId(10), 10, &mut Load::default()).unwrap();
        assert_eq!(p, again);
    }

    #[test]
    fn zones_are_distinct_and_impossible_rules_are_errors() {
        let nodes = vec![node(1, Some("a")), node(2, Some("a")), node(3, Some("b")), node(4, Some("c"))];
        let p = place_shards(&nodes, rule(3, FailureDomain::Zone), ShardId(0), 8, &mut Load::default()).unwrap();
        for s in &p {
            let zones: BTreeSet<_> = s.voters.iter().map(|v| nodes[v.0 as usize - 1].zone.clone()).collect();
            assert_eq!(zones.len(), 3, "{s:?}");
        }
        let two_zones = vec![node(1, Some("a")), node(2, Some("a")), node(3, Some("b"))];
        assert_eq!(
            place_shards(&two_zones, rule(3, FailureDomain::Zone), ShardId(0), 1, &mut Load::default()),
            Err(PlacementError::NotEnoughZones { replicas: 3, zones: 2 })
        );
        // The same nodes satisfy a node failure domain.
        assert!(place_shards(&two_zones, rule(3, FailureDomain::Node), ShardId(0), 1, &mut Load::default()).is_ok());
        // Unlabelled nodes are their own domain.
        let mixed = vec![node(1, Some("a")), node(2, Some("a")), node(3, None)];
        assert_eq!(
            place_shards(&mixed, rule(3, FailureDomain::Zone), ShardId(0), 1, &mut Load::default()),
            Err(PlacementError::NotEnoughZones { replicas: 3, zones: 2 })
        );
        let mut down = nodes.clone();
        down[3].up = false;
        down[2].disks = 0;
        assert_eq!(
            place_shards(&down, rule(3, FailureDomain::Node), ShardId(0), 1, &mut Load::default()),
            Err(PlacementError::NotEnoughNodes { replicas: 3, eligible: 2 })
        );
    }

    #[test]
    fn new_pools_fill_the_least_loaded_nodes_first() {
        let nodes: Vec<_> = (1..=4).map(|i| node(i, None)).collect();
        let mut load = Load::default();
        load.replicas.insert(NodeId(1), 5);
        load.replicas.insert(NodeId(2), 5);
        let p = place_shards(&nodes, rule(2, FailureDomain::Node), ShardId(0), 5, &mut load).unwrap();
        let c = counts(&p);
        assert_eq!(c.get(&NodeId(3)), Some(&5));
        assert_eq!(c.get(&NodeId(4)), Some(&5));
        assert!(!c.contains_key(&NodeId(1)));
    }

    fn pool(id: u32, first: u32, shards: u32, replicas: u32, fd: FailureDomain) -> PoolInfo {
        let spec = PoolSpec { name: format!("p{id}"), replicas, shards, failure_domain: fd };
        PoolInfo { id: PoolId(id), spec, first_shard: ShardId(first) }
    }

    fn shard_map(p: &[Placement], pool: PoolId) -> BTreeMap<ShardId, ShardInfo> {
        p.iter()
            .map(|s| {
                (
                    s.shard,
                    ShardInfo {
                        id: s.shard,
                        pool,
                        voters: s.voters.clone(),
                        leader: Some(s.voters[0]),
                        joining: vec![],
                    },
                )
            })
            .collect()
    }

    #[test]
    fn repair_replaces_replicas_of_a_down_node_in_order() {
        let mut nodes: Vec<_> = (1..=5).map(|i| node(i, None)).collect();
        let p = place_shards(&nodes, rule(3, FailureDomain::Node), ShardId(0), 5, &mut Load::default()).unwrap();
        let shards = shard_map(&p, PoolId(1));
        let pools = BTreeMap::from([(PoolId(1), pool(1, 0, 5, 3, FailureDomain::Node))]);
        nodes[1].up = false;
        let down = BTreeSet::from([NodeId(2)]);
        let actions = plan_repair(&nodes, &pools, &shards, &down);
        let affected: Vec<_> = shards.values().filter(|s| s.voters.contains(&NodeId(2))).collect();
        assert_eq!(actions.len(), affected.len() * 3, "{actions:?}");
        for (s, a) in affected.iter().zip(actions.chunks(3)) {
            let Action::AddLearner { shard, node } = a[0] else { panic!("{a:?}") };
            assert_eq!(shard, s.id);
            assert!(!s.voters.contains(&node) && node != NodeId(2));
            let Action::Promote { voters, .. } = &a[1] else { panic!("{a:?}") };
            assert_eq!(voters.len(), 3);
            assert!(voters.contains(&node) && !voters.contains(&NodeId(2)));
            assert_eq!(a[2], Action::RemoveReplica { shard: s.id, node: NodeId(2) });
        }
        // Nothing down, nothing to do; nowhere to go, stuck.
        assert!(plan_repair(&nodes, &pools, &shards, &BTreeSet::new()).is_empty());
        // Only nodes 1 and 3 left: shards holding both cannot be repaired.
        let few: Vec<_> = nodes.iter().filter(|n| n.id.0 <= 3).cloned().collect();
        let plan = plan_repair(&few, &pools, &shards, &down);
        for s in &affected {
            let stuck = plan.contains(&Action::Stuck {
                shard: s.id,
                reason: PlacementError::NotEnoughNodes { replicas: 3, eligible: 2 },
            });
            let spare = [NodeId(1), NodeId(3)].into_iter().any(|n| !s.voters.contains(&n));
            assert_eq!(stuck, !spare, "{s:?}: {plan:?}");
        }
        assert!(plan.iter().all(|a| !matches!(a, Action::AddLearner { node, .. } if node.0 > 3)), "{plan:?}");
    }

    #[test]
    fn repair_of_two_lost_voters_keeps_the_group_size_per_step() {
        let nodes: Vec<_> = (1..=6).map(|i| node(i, None)).collect();
        let info = ShardInfo {
            id: ShardId(0),
            pool: PoolId(1),
            voters: vec![NodeId(1), NodeId(2), NodeId(3)],
            leader: None,
            joining: vec![],
        };
        let shards = BTreeMap::from([(ShardId(0), info)]);
        let pools = BTreeMap::from([(PoolId(1), pool(1, 0, 1, 3, FailureDomain::Node))]);
        let a = plan_repair(&nodes, &pools, &shards, &BTreeSet::from([NodeId(2), NodeId(3)]));
        let promotes: Vec<_> =
            a.iter().filter_map(|a| if let Action::Promote { voters, .. } = a { Some(voters) } else { None }).collect();
        assert_eq!(promotes.len(), 2);
        assert_eq!(promotes[0].len(), 3, "{a:?}");
        assert!(promotes[1].iter().all(|v| v.0 == 1 || v.0 >= 4), "{a:?}");
    }

    fn seed() -> u64 {
        let seed = std::env::var("BALLAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        println!("placement property seed: {seed} (replay with BALLAST_SEED={seed})");
        seed
    }

    #[test]
    fn random_clusters_get_valid_balanced_placements() {
        let seed = seed();
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..300 {
            let n = rng.gen_range(1..=12u64);
            let zones = rng.gen_range(1..=5u32);
            let labelled = rng.gen_bool(0.7);
            let nodes: Vec<_> = (1..=n)
                .map(|i| NodeSlot {
                    id: NodeId(i * 3),
                    zone: labelled.then(|| format!("z{}", rng.gen_range(0..zones))),
                    up: rng.gen_bool(0.9),
                    disks: rng.gen_range(0..=2u32).max(u32::from(rng.gen_bool(0.9))),
                })
                .collect();
            let replicas = rng.gen_range(1..=5u32);
            let fd = if rng.gen_bool(0.5) { FailureDomain::Zone } else { FailureDomain::Node };
            let shards = rng.gen_range(1..=64u32);
            let ctx = format!("seed {seed} round {round}: {nodes:?} replicas {replicas} {fd:?}");
            let ok: Vec<_> = nodes.iter().filter(|s| s.up && s.disks > 0).collect();
            let domains: BTreeSet<_> = ok.iter().map(|s| s.domain(fd)).collect();
            let got = place_shards(&nodes, rule(replicas, fd), ShardId(7), shards, &mut Load::default());
            if ok.len() < replicas as usize || domains.len() < replicas as usize {
                assert!(got.is_err(), "{ctx}");
                continue;
            }
            let p = got.unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(p.len(), shards as usize, "{ctx}");
            for s in &p {
                let distinct: BTreeSet<_> = s.voters.iter().collect();
                assert_eq!(distinct.len(), replicas as usize, "{ctx}");
                let d: BTreeSet<_> =
                    s.voters.iter().map(|v| ok.iter().find(|n| n.id == *v).expect("eligible").domain(fd)).collect();
                assert_eq!(d.len(), replicas as usize, "zone constraint, {ctx}");
            }
            // Balance is always possible without zone constraints.
            let unconstrained = fd == FailureDomain::Node || domains.len() == ok.len();
            if unconstrained {
                let c = counts(&p);
                let max = ok.iter().map(|s| c.get(&s.id).copied().unwrap_or(0)).max().unwrap_or(0);
                let min = ok.iter().map(|s| c.get(&s.id).copied().unwrap_or(0)).min().unwrap_or(0);
                assert!(max - min <= 1, "max {max} min {min}, {ctx}");
            }
            let again = place_shards(&nodes, rule(replicas, fd), ShardId(7), shards, &mut Load::default());
            assert_eq!(Ok(p), again, "deterministic, {ctx}");
        }
    }

    /// Apply rebalance plans (each move completing at once) until none is left.
    fn rebalance_until_done(
        nodes: &[NodeSlot],
        pools: &BTreeMap<PoolId, PoolInfo>,
        shards: &mut BTreeMap<ShardId, ShardInfo>,
        budget: usize,
        ctx: &str,
    ) -> usize {
        let mut moves = 0;
        for _ in 0..10_000 {
            let plan = plan_rebalance(nodes, pools, shards, budget);
            assert!(plan.len() <= budget, "{ctx}");
            if plan.is_empty() {
                return moves;
            }
            let ids: BTreeSet<_> = plan.iter().map(|m| m.shard).collect();
            assert_eq!(ids.len(), plan.len(), "a shard moves once per plan, {ctx}");
            for m in plan {
                let s = shards.get_mut(&m.shard).expect("planned shard exists");
                let kept = m.voters.iter().filter(|v| s.voters.contains(v)).count();
                assert!(kept >= 1, "a move keeps a complete replica: {m:?}, {ctx}");
                s.voters = m.voters;
                moves += 1;
            }
        }
        panic!("rebalancing never settles, {ctx}");
    }

    fn replica_counts(shards: &BTreeMap<ShardId, ShardInfo>) -> BTreeMap<NodeId, u32> {
        let mut c = BTreeMap::new();
        for s in shards.values() {
            for v in &s.voters {
                *c.entry(*v).or_default() += 1;
            }
        }
        c
    }

    #[test]
    fn a_joining_node_gets_replicas_until_counts_are_even() {
        let mut nodes: Vec<_> = (1..=3).map(|i| node(i, None)).collect();
        let p = place_shards(&nodes, rule(3, FailureDomain::Node), ShardId(0), 8, &mut Load::default()).unwrap();
        let mut shards = shard_map(&p, PoolId(1));
        let pools = BTreeMap::from([(PoolId(1), pool(1, 0, 8, 3, FailureDomain::Node))]);
        assert!(plan_rebalance(&nodes, &pools, &shards, 4).is_empty(), "3 nodes, 8 each: balanced");
        nodes.push(node(4, None));
        let first = plan_rebalance(&nodes, &pools, &shards, 2);
        assert_eq!(first.len(), 2, "bounded by the budget: {first:?}");
        assert!(first.iter().all(|m| m.voters.contains(&NodeId(4)) && m.voters.len() == 3), "{first:?}");
        let moves = rebalance_until_done(&nodes, &pools, &mut shards, 2, "4 nodes");
        let c = replica_counts(&shards);
        assert_eq!(c.values().sum::<u32>(), 24);
        assert!(c.values().all(|n| *n == 6), "{c:?}");
        assert_eq!(moves, 6, "each move takes one replica to the new node");
        // A down or draining node never receives.
        let mut later = nodes.clone();
        later.push(NodeSlot { up: false, ..node(5, None) });
        later.push(NodeSlot { disks: 0, ..node(6, None) });
        assert!(plan_rebalance(&later, &pools, &shards, 4).is_empty());
    }

    #[test]
    fn a_single_replica_shard_moves_in_two_steps() {
        let nodes: Vec<_> = (1..=2).map(|i| node(i, None)).collect();
        let info = |id: u32| ShardInfo {
            id: ShardId(id),
            pool: PoolId(1),
            voters: vec![NodeId(1)],
            leader: Some(NodeId(1)),
            joining: vec![],
        };
        let mut shards: BTreeMap<_, _> = (0..2).map(|i| (ShardId(i), info(i))).collect();
        let pools = BTreeMap::from([(PoolId(1), pool(1, 0, 2, 1, FailureDomain::Node))]);
        let grow = plan_rebalance(&nodes, &pools, &shards, 1);
        assert_eq!(grow, vec![Rebalance { shard: ShardId(0), voters: vec![NodeId(1), NodeId(2)] }]);
        shards.get_mut(&ShardId(0)).unwrap().voters = grow[0].voters.clone();
        let shrink = plan_rebalance(&nodes, &pools, &shards, 1);
        assert_eq!(shrink, vec![Rebalance { shard: ShardId(0), voters: vec![NodeId(2)] }]);
        shards.get_mut(&ShardId(0)).unwrap().voters = shrink[0].voters.clone();
        assert!(plan_rebalance(&nodes, &pools, &shards, 1).is_empty());
        // Shards being moved are left alone.
        let mut busy: BTreeMap<_, _> = (0..2).map(|i| (ShardId(i), info(i))).collect();
        assert_eq!(plan_rebalance(&nodes, &pools, &busy, 1).len(), 1);
        for s in busy.values_mut() {
            s.joining = vec![NodeId(1)];
        }
        assert!(plan_rebalance(&nodes, &pools, &busy, 1).is_empty());
    }

    #[test]
    fn random_clusters_rebalance_evenly_without_breaking_placement_rules() {
        let seed = seed();
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..200 {
            let zones = rng.gen_range(1..=4u32);
            let n = rng.gen_range(2..=8u64);
            let mut nodes: Vec<_> = (1..=n)
                .map(|i| NodeSlot {
                    id: NodeId(i * 2),
                    zone: Some(format!("z{}", rng.gen_range(0..zones))),
                    up: true,
                    disks: 1,
                })
                .collect();
            // Some nodes join after the pools were placed: they start empty.
            let joined = rng.gen_range(1..=n as usize);
            let (mut pools, mut shards) = (BTreeMap::new(), BTreeMap::new());
            let mut load = Load::default();
            let mut first = 0;
            for pid in 1..=rng.gen_range(1..=2u32) {
                let replicas = rng.gen_range(1..=3u32);
                let fd = if rng.gen_bool(0.5) { FailureDomain::Zone } else { FailureDomain::Node };
                let count = rng.gen_range(1..=24u32);
                let Ok(p) = place_shards(&nodes[..joined], rule(replicas, fd), ShardId(first), count, &mut load) else {
                    continue;
                };
                pools.insert(PoolId(pid), pool(pid, first, count, replicas, fd));
                shards.extend(shard_map(&p, PoolId(pid)));
                first += count;
            }
            if rng.gen_bool(0.2) {
                let i = rng.gen_range(0..nodes.len());
                nodes[i].up = false;
            }
            let before = shards.clone();
            let budget = rng.gen_range(1..=3usize);
            let ctx = format!("seed {seed} round {round}: {nodes:?} {pools:?}");
            rebalance_until_done(&nodes, &pools, &mut shards, budget, &ctx);
            let domain_of = |id: &NodeId, fd| nodes.iter().find(|n| n.id == *id).expect("known node").domain(fd);
            for (id, s) in &shards {
                let spec = &pools[&s.pool].spec;
                let distinct: BTreeSet<_> = s.voters.iter().collect();
                assert_eq!(distinct.len(), s.voters.len(), "two replicas on one node: {s:?}, {ctx}");
                assert_eq!(s.voters.len(), spec.replicas as usize, "replica count kept: {s:?}, {ctx}");
                let domains: BTreeSet<_> = s.voters.iter().map(|v| domain_of(v, spec.failure_domain)).collect();
                assert_eq!(domains.len(), s.voters.len(), "failure domain kept: {s:?}, {ctx}");
                for v in s.voters.iter().filter(|v| !before[id].voters.contains(v)) {
                    assert!(nodes.iter().any(|n| n.id == *v && n.up), "{v} is down and received {id}, {ctx}");
                }
            }
            let all_up = nodes.iter().all(|n| n.up);
            let unconstrained = pools.values().all(|p| p.spec.failure_domain == FailureDomain::Node);
            if all_up && unconstrained && !shards.is_empty() {
                let c = replica_counts(&shards);
                let get = |n: &NodeSlot| c.get(&n.id).copied().unwrap_or(0);
                let max = nodes.iter().map(get).max().unwrap_or(0);
                let min = nodes.iter().map(get).min().unwrap_or(0);
                assert!(max - min <= 1, "max {max} min {min}: {c:?}, {ctx}");
            }
        }
    }

    #[test]
    fn leaders_even_out_with_hysteresis_and_only_onto_voters() {
        let nodes: Vec<_> = (1..=3).map(|i| node(i, None)).collect();
        let p = place_shards(&nodes, rule(3, FailureDomain::Node), ShardId(0), 6, &mut Load::default()).unwrap();
        let shards = shard_map(&p, PoolId(1));
        // Node 1 leads everything (say, it was the only node up for a while).
        let mut leaders: BTreeMap<ShardId, NodeId> = shards.keys().map(|s| (*s, NodeId(1))).collect();
        let first = plan_leader_moves(&nodes, &shards, &leaders, 1);
        assert_eq!(first.len(), 1, "bounded: {first:?}");
        for _ in 0..20 {
            let plan = plan_leader_moves(&nodes, &shards, &leaders, 2);
            if plan.is_empty() {
                break;
            }
            for m in plan {
                assert_eq!(leaders[&m.shard], m.from);
                assert!(shards[&m.shard].voters.contains(&m.to), "{m:?}");
                leaders.insert(m.shard, m.to);
            }
        }
        let mut c = BTreeMap::<NodeId, u32>::new();
        for l in leaders.values() {
            *c.entry(*l).or_default() += 1;
        }
        assert!(c.values().all(|n| *n == 2), "{c:?}");
        assert!(plan_leader_moves(&nodes, &shards, &leaders, 2).is_empty(), "balanced: nothing moves");
        // Off by one is balanced enough (2/2/1): nothing moves.
        let mut fewer = leaders.clone();
        let one = *fewer.keys().next().unwrap();
        fewer.remove(&one);
        assert!(plan_leader_moves(&nodes, &shards, &fewer, 2).is_empty());
    }

    #[test]
    fn random_leader_plans_converge_and_never_flap() {
        let seed = seed();
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..200 {
            let n = rng.gen_range(2..=6u64);
            let nodes: Vec<_> = (1..=n).map(|i| node(i, None)).collect();
            let replicas = rng.gen_range(1..=n.min(3) as u32);
            let count = rng.gen_range(1..=30u32);
            let p = place_shards(&nodes, rule(replicas, FailureDomain::Node), ShardId(0), count, &mut Load::default())
                .unwrap();
            let shards = shard_map(&p, PoolId(1));
            let mut leaders: BTreeMap<ShardId, NodeId> =
                shards.values().map(|s| (s.id, s.voters[rng.gen_range(0..s.voters.len())])).collect();
            let ctx = format!("seed {seed} round {round}");
            let mut seen = BTreeSet::new();
            let mut settled = false;
            for _ in 0..1000 {
                let plan = plan_leader_moves(&nodes, &shards, &leaders, 2);
                if plan.is_empty() {
                    settled = true;
                    break;
                }
                for m in plan {
                    assert!(shards[&m.shard].voters.contains(&m.to), "{ctx}");
                    assert!(seen.insert((m.shard, m.from, m.to)), "a transfer repeats (flapping): {m:?}, {ctx}");
                    leaders.insert(m.shard, m.to);
                }
            }
            assert!(settled, "{ctx}");
            if replicas == n as u32 {
                let mut c: BTreeMap<NodeId, u32> = nodes.iter().map(|n| (n.id, 0)).collect();
                for l in leaders.values() {
                    *c.entry(*l).or_default() += 1;
                }
                let (max, min) = (c.values().max().unwrap(), c.values().min().unwrap());
                assert!(max - min <= 1, "every node a voter of every shard: even leaders; {c:?}, {ctx}");
            }
        }
    }
}

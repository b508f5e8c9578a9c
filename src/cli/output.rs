//! What the admin commands print. `ballast_types` has no serde (it is the
//! domain vocabulary, not a format), so each answer is mirrored here in a
//! serialisable view; the JSON output is that view, and the table is
//! rendered from it, so both outputs always carry the same facts.
//!
//! JSON ids are plain numbers (`"pool": 1`); the tables use the ids' display
//! forms (`node-1`, `shard-3`) and human sizes.

use std::collections::BTreeMap;

use ballast_types::{
    format_size, ClusterStatus, FailureDomain, InitClusterReply, PoolId, PoolInfo, ScrubReport, ShardId, ShardStatus,
    VolumeInfo,
};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Print `view` as JSON, or as the table `table` renders.
pub fn print<T: Serialize>(output: Output, view: &T, table: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(view)?),
        Output::Table => print!("{}", table(view)),
    }
    Ok(())
}

// ----- views -----

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StatusView {
    pub cluster: u64,
    pub protocol_version: u32,
    pub map_version: u64,
    pub meta_leader: Option<u64>,
    pub nodes: Vec<NodeView>,
    pub shards: Vec<ShardView>,
    /// Ids of the shards with fewer healthy replicas than their pool asks for.
    pub under_replicated: Vec<u32>,
    /// Each answering node's scrub figures (its last finished pass).
    pub scrub: Vec<ScrubView>,
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct ScrubView {
    pub node: u64,
    /// Passes finished since the node started.
    pub passes: u64,
    pub running: bool,
    /// When the last pass finished (ms since the Unix epoch); `null`: never.
    pub last_finished_unix_ms: Option<u64>,
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    /// Blocks that failed their checksum in the last pass.
    pub corrupt_found: u64,
    pub repaired: u64,
    pub unrepaired: u64,
    /// Intact copies that differed from their shard's majority (counted by
    /// the node leading the shard).
    pub divergent_found: u64,
    pub realigned: u64,
    pub unrealigned: u64,
    /// Blocks whose copies differed with no majority (left as they are).
    pub no_majority: u64,
}

pub fn scrub_view(r: &ScrubReport) -> ScrubView {
    ScrubView {
        node: r.node.0,
        passes: r.passes,
        running: r.running,
        last_finished_unix_ms: r.last_finished_unix_ms,
        blocks_checked: r.blocks_checked,
        bytes_checked: r.bytes_checked,
        corrupt_found: r.corrupt_found,
        repaired: r.repaired,
        unrepaired: r.unrepaired,
        divergent_found: r.divergent_found,
        realigned: r.realigned,
        unrealigned: r.unrealigned,
        no_majority: r.no_majority,
    }
}

/// How long ago `unix_ms` was, e.g. `5m ago`; `never` for `None`.
pub fn age(unix_ms: Option<u64>, now_unix_ms: u64) -> String {
    let Some(t) = unix_ms else { return "never".into() };
    let s = now_unix_ms.saturating_sub(t) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// One row per node: the last scrub pass's figures.
pub fn scrub_table(rows_in: &[ScrubView], now_unix_ms: u64) -> String {
    let mut rows = vec![[
        "NODE",
        "LAST PASS",
        "PASSES",
        "CHECKED",
        "CORRUPT",
        "REPAIRED",
        "UNREPAIRED",
        "DIVERGENT",
        "REALIGNED",
        "UNREALIGNED",
        "NO-MAJORITY",
    ]
    .map(String::from)
    .to_vec()];
    for v in rows_in {
        let last = age(v.last_finished_unix_ms, now_unix_ms);
        rows.push(vec![
            node_name(v.node),
            if v.running { format!("{last} (running)") } else { last },
            v.passes.to_string(),
            format_size(v.bytes_checked),
            v.corrupt_found.to_string(),
            v.repaired.to_string(),
            v.unrepaired.to_string(),
            v.divergent_found.to_string(),
            v.realigned.to_string(),
            v.unrealigned.to_string(),
            v.no_majority.to_string(),
        ]);
    }
    table(&rows)
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct NodeView {
    pub id: u64,
    pub addr: String,
    pub zone: Option<String>,
    pub up: bool,
    pub disks: Vec<DiskView>,
    pub capacity: u64,
    pub used: u64,
    /// Shards that list this node as a voter.
    pub shards: usize,
    /// Shards this node leads (as far as the map knows).
    pub leaders: usize,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DiskView {
    pub path: String,
    pub capacity: u64,
    pub used: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ShardView {
    pub id: u32,
    pub pool: u32,
    pub voters: Vec<u64>,
    pub leader: Option<u64>,
    pub under_replicated: bool,
    /// `healthy`, `degraded` (fewer live replicas than asked for),
    /// `rebuilding` (a replica is being copied: see `rebuilding`) or
    /// `unavailable` (no majority of its voters is up: its I/O stalls).
    pub state: &'static str,
    pub rebuilding: Option<RebuildView>,
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct RebuildView {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// A shard's state as `ballast status` names it, worst first.
pub fn shard_state(sh: &ShardStatus, up: impl Fn(u64) -> bool) -> &'static str {
    // A joining voter holds no complete copy yet: it does not count.
    let live = sh.shard.settled().filter(|v| up(v.0)).count();
    if live < sh.shard.voters.len() / 2 + 1 {
        "unavailable"
    } else if sh.rebuilding.is_some() || !sh.shard.joining.is_empty() {
        "rebuilding"
    } else if sh.under_replicated {
        "degraded"
    } else {
        "healthy"
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PoolView {
    pub id: u32,
    pub name: String,
    pub replicas: u32,
    pub shards: u32,
    pub failure_domain: &'static str,
    pub first_shard: u32,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct VolumeView {
    pub id: u64,
    pub name: String,
    pub size: u64,
    /// The pool's name (its id when the pool is unknown to the caller).
    pub pool: String,
    pub pool_id: u32,
    pub chunk_size: u64,
    pub epoch: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct InitView {
    pub cluster: u64,
    pub members: Vec<MemberView>,
    pub default_pool: Option<PoolSpecView>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub addr: String,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PoolSpecView {
    pub name: String,
    pub replicas: u32,
    pub shards: u32,
    pub failure_domain: &'static str,
}

pub fn failure_domain_name(d: FailureDomain) -> &'static str {
    match d {
        FailureDomain::Node => "node",
        FailureDomain::Zone => "zone",
    }
}

/// The status with per-node shard and leader counts worked out.
pub fn status_view(s: &ClusterStatus) -> StatusView {
    let mut shards_of: BTreeMap<u64, usize> = BTreeMap::new();
    let mut leaders_of: BTreeMap<u64, usize> = BTreeMap::new();
    for sh in &s.shards {
        for v in &sh.shard.voters {
            *shards_of.entry(v.0).or_default() += 1;
        }
        if let Some(l) = sh.shard.leader {
            *leaders_of.entry(l.0).or_default() += 1;
        }
    }
    let mut nodes: Vec<NodeView> = s
        .nodes
        .iter()
        .map(|n| NodeView {
            id: n.id.0,
            addr: n.addr.clone(),
            zone: n.zone.clone(),
            up: n.up,
            disks: n
                .disks
                .iter()
                .map(|d| DiskView { path: d.path.clone(), capacity: d.capacity, used: d.used })
                .collect(),
            capacity: n.disks.iter().map(|d| d.capacity).fold(0, u64::saturating_add),
            used: n.disks.iter().map(|d| d.used).fold(0, u64::saturating_add),
            shards: shards_of.get(&n.id.0).copied().unwrap_or(0),
            leaders: leaders_of.get(&n.id.0).copied().unwrap_or(0),
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    let up: BTreeMap<u64, bool> = s.nodes.iter().map(|n| (n.id.0, n.up)).collect();
    let mut shards: Vec<ShardView> = s
        .shards
        .iter()
        .map(|sh| ShardView {
            id: sh.shard.id.0,
            pool: sh.shard.pool.0,
            voters: sh.shard.voters.iter().map(|v| v.0).collect(),
            leader: sh.shard.leader.map(|l| l.0),
            under_replicated: sh.under_replicated,
            state: shard_state(sh, |n| up.get(&n).copied().unwrap_or(false)),
            rebuilding: sh.rebuilding.map(|r| RebuildView { done_bytes: r.done_bytes, total_bytes: r.total_bytes }),
        })
        .collect();
    shards.sort_by_key(|s| s.id);
    StatusView {
        cluster: s.cluster.0,
        protocol_version: s.protocol_version,
        map_version: s.map_version.0,
        meta_leader: s.meta_leader.map(|l| l.0),
        under_replicated: shards.iter().filter(|s| s.under_replicated).map(|s| s.id).collect(),
        nodes,
        shards,
        scrub: s.scrub.iter().map(scrub_view).collect(),
    }
}

pub fn pool_view(p: &PoolInfo) -> PoolView {
    PoolView {
        id: p.id.0,
        name: p.spec.name.clone(),
        replicas: p.spec.replicas,
        shards: p.spec.shards,
        failure_domain: failure_domain_name(p.spec.failure_domain),
        first_shard: p.first_shard.0,
    }
}

/// `pools` names the volume's pool when it is known.
pub fn volume_view(v: &VolumeInfo, pools: &BTreeMap<PoolId, String>) -> VolumeView {
    VolumeView {
        id: v.id.0,
        name: v.name.clone(),
        size: v.size,
        pool: pools.get(&v.pool).cloned().unwrap_or_else(|| v.pool.to_string()),
        pool_id: v.pool.0,
        chunk_size: v.chunk_size,
        epoch: v.epoch.0,
    }
}

pub fn init_view(r: &InitClusterReply, pool: Option<PoolSpecView>) -> InitView {
    InitView {
        cluster: r.cluster.0,
        members: r.members.iter().map(|m| MemberView { id: m.id.0, addr: m.addr.clone() }).collect(),
        default_pool: pool,
    }
}

// ----- tables -----

/// Left-aligned columns separated by two spaces; the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn node_name(id: u64) -> String {
    format!("node-{id}")
}

pub fn status_table(s: &StatusView) -> String {
    let leader = s.meta_leader.map_or_else(|| "none".to_string(), node_name);
    let up = s.nodes.iter().filter(|n| n.up).count();
    let mut out = format!(
        "cluster-{}  map v{}  protocol {}  meta leader {leader}  nodes {up}/{} up  shards {}\n\n",
        s.cluster,
        s.map_version,
        s.protocol_version,
        s.nodes.len(),
        s.shards.len()
    );
    let mut rows = vec![["NODE", "ADDRESS", "ZONE", "STATE", "DISKS", "USED", "CAPACITY", "SHARDS", "LEADERS"]
        .map(String::from)
        .to_vec()];
    for n in &s.nodes {
        rows.push(vec![
            node_name(n.id),
            n.addr.clone(),
            n.zone.clone().unwrap_or_else(|| "-".into()),
            if n.up { "up" } else { "DOWN" }.into(),
            n.disks.len().to_string(),
            format_size(n.used),
            format_size(n.capacity),
            n.shards.to_string(),
            n.leaders.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    if s.under_replicated.is_empty() {
        out.push_str("\nunder-replicated shards: none\n");
    } else {
        out.push_str(&format!("\nunder-replicated shards ({}):\n", s.under_replicated.len()));
        let mut rows = vec![["SHARD", "POOL", "VOTERS", "LEADER"].map(String::from).to_vec()];
        for sh in s.shards.iter().filter(|s| s.under_replicated) {
            rows.push(vec![
                ShardId(sh.id).to_string(),
                PoolId(sh.pool).to_string(),
                sh.voters.iter().map(|v| node_name(*v)).collect::<Vec<_>>().join(","),
                sh.leader.map_or_else(|| "none".into(), node_name),
            ]);
        }
        out.push_str(&table(&rows));
    }
    if !s.scrub.is_empty() {
        out.push_str("\nscrub (last finished pass per node):\n");
        out.push_str(&scrub_table(&s.scrub, now_unix_ms()));
    }
    out
}

pub fn pools_table(pools: &[PoolView]) -> String {
    let mut rows = vec![["POOL", "ID", "REPLICAS", "SHARDS", "FAILURE-DOMAIN"].map(String::from).to_vec()];
    for p in pools {
        rows.push(vec![
            p.name.clone(),
            PoolId(p.id).to_string(),
            p.replicas.to_string(),
            p.shards.to_string(),
            p.failure_domain.to_string(),
        ]);
    }
    table(&rows)
}

pub fn volumes_table(volumes: &[VolumeView]) -> String {
    let mut rows = vec![["VOLUME", "SIZE", "POOL", "ID", "EPOCH"].map(String::from).to_vec()];
    for v in volumes {
        rows.push(vec![
            v.name.clone(),
            format_size(v.size),
            v.pool.clone(),
            format!("vol-{}", v.id),
            v.epoch.to_string(),
        ]);
    }
    table(&rows)
}

pub fn volume_details(v: &VolumeView) -> String {
    table(&[
        vec!["name:".into(), v.name.clone()],
        vec!["id:".into(), format!("vol-{}", v.id)],
        vec!["size:".into(), format!("{} ({} bytes)", format_size(v.size), v.size)],
        vec!["pool:".into(), v.pool.clone()],
        vec!["chunk size:".into(), format_size(v.chunk_size)],
        vec!["epoch:".into(), v.epoch.to_string()],
    ])
}

pub fn init_table(v: &InitView) -> String {
    let members = v.members.iter().map(|m| format!("{} {}", node_name(m.id), m.addr)).collect::<Vec<_>>().join(", ");
    let mut out = format!("initialised cluster-{} with meta members {members}\n", v.cluster);
    if let Some(p) = &v.default_pool {
        out.push_str(&format!(
            "pool {}: {} replicas, {} shards, failure domain {}\n",
            p.name, p.replicas, p.shards, p.failure_domain
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_types::{ClusterId, DiskInfo, MapVersion, NodeId, NodeInfo, ShardInfo, ShardStatus};

    fn node(id: u64, up: bool) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            addr: format!("127.0.0.1:710{id}"),
            zone: (id == 1).then(|| "a".to_string()),
            up,
            disks: vec![
                DiskInfo { path: "/d1".into(), capacity: 10 << 30, used: 1 << 30 },
                DiskInfo { path: "/d2".into(), capacity: 10 << 30, used: 0 },
            ],
        }
    }

    fn shard(id: u32, voters: &[u64], leader: Option<u64>, under: bool) -> ShardStatus {
        ShardStatus {
            shard: ShardInfo {
                id: ShardId(id),
                pool: PoolId(1),
                voters: voters.iter().map(|v| NodeId(*v)).collect(),
                leader: leader.map(NodeId),
                joining: vec![],
            },
            under_replicated: under,
            rebuilding: None,
        }
    }

    fn status() -> ClusterStatus {
        ClusterStatus {
            cluster: ClusterId(77),
            protocol_version: 1,
            map_version: MapVersion(9),
            meta_leader: Some(NodeId(2)),
            nodes: vec![node(3, false), node(1, true), node(2, true)],
            shards: vec![
                shard(1, &[1, 2, 3], Some(1), false),
                shard(0, &[1, 2, 3], Some(2), false),
                shard(2, &[1, 2], Some(1), true),
            ],
            volume_io: vec![],
            scrub: vec![],
        }
    }

    #[test]
    fn status_counts_voters_and_leaders_per_node() {
        let v = status_view(&status());
        let counts: Vec<(u64, usize, usize)> = v.nodes.iter().map(|n| (n.id, n.shards, n.leaders)).collect();
        assert_eq!(counts, vec![(1, 3, 2), (2, 3, 1), (3, 2, 0)]);
        assert_eq!(v.nodes[0].capacity, 20 << 30);
        assert_eq!(v.nodes[0].used, 1 << 30);
        assert_eq!(v.under_replicated, vec![2]);
        // Node 3 is down: shard 2 (voters 1, 2) keeps its majority but is
        // short of replicas; the others have two of three voters up.
        let states: Vec<&str> = v.shards.iter().map(|s| s.state).collect();
        assert_eq!(states, ["healthy", "healthy", "degraded"]);
        assert_eq!(v.shards.iter().map(|s| s.id).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn the_status_table_shows_down_nodes_and_under_replicated_shards() {
        let t = status_table(&status_view(&status()));
        assert!(t.starts_with("cluster-77  map v9  protocol 1  meta leader node-2  nodes 2/3 up  shards 3\n"), "{t}");
        let down = t.lines().find(|l| l.starts_with("node-3")).unwrap();
        let cells: Vec<&str> = down.split_whitespace().collect();
        assert!(down.contains("DOWN") && cells[cells.len() - 2..] == ["2", "0"], "{down}");
        assert!(t.contains("under-replicated shards (1):"), "{t}");
        assert!(t.contains("shard-2  pool-1  node-1,node-2  node-1"), "{t}");
        let json = serde_json::to_value(status_view(&status())).unwrap();
        assert_eq!(json["nodes"][0]["leaders"], 2);
        assert_eq!(json["meta_leader"], 2);
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&[vec!["A".into(), "BB".into(), "C".into()], vec!["long".into(), "x".into(), "y".into()]]);
        assert_eq!(t, "A     BB  C\nlong  x   y\n");
    }
}

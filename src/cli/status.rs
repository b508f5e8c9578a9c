//! `ballast status`: is the cluster healthy? One screen: a verdict and what
//! is wrong, nodes up or down with their disks' use, shards by state
//! (healthy, degraded, rebuilding with progress, unavailable) and each
//! volume's IOPS and throughput.
//!
//! Rates are deltas of the per-volume request counters the nodes keep
//! (`ClusterStatus.volume_io`) between two samples: a single `ballast
//! status` samples twice, one second apart; `--watch SECS` redraws every
//! SECS seconds from the previous sample until Ctrl-C. A counter that went
//! down (a node restarted or stopped answering) counts as no I/O for that
//! interval. Counters count Data requests per chunk piece, so an NBD request
//! that crosses a 4 MiB chunk boundary counts twice.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Result;
use ballast_client::{AdminClient, ClientConfig};
use ballast_types::{format_size, ClusterStatus, VolumeId, VolumeInfo, VolumeIo};
use serde::Serialize;

use super::admin::{ConnArgs, OutArgs};
use super::output::{self, node_name, Output, ShardView, StatusView};
use super::signals::Signals;

/// Sampling window of a one-shot `ballast status`.
const ONE_SHOT_WINDOW: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Redraw every SECS seconds (default 2) until Ctrl-C; with `--output
    /// json`, one JSON document per line per sample.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub watch: Option<u64>,
    #[command(flatten)]
    pub out: OutArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// What `ballast status` prints (the JSON output is this view).
#[derive(Debug, Serialize)]
pub struct HealthView {
    /// `healthy`, `degraded` (something is down or short of replicas, I/O
    /// still flows) or `unavailable` (some shard has no majority up).
    pub health: &'static str,
    /// One line per thing an operator should look at; empty when healthy.
    pub problems: Vec<String>,
    pub cluster: u64,
    pub map_version: u64,
    pub meta_leader: Option<u64>,
    pub nodes_up: usize,
    pub capacity: u64,
    pub used: u64,
    pub shard_states: ShardCounts,
    pub nodes: Vec<output::NodeView>,
    /// Shards that are not healthy (all of them are in `cluster status`).
    pub shards: Vec<ShardView>,
    pub volumes: Vec<VolumeRate>,
    /// Rebuild speed per shard being rebuilt (snapshot bytes per second
    /// between the two samples), by shard id.
    pub rebuild_bytes_per_sec: BTreeMap<u32, f64>,
    /// Seconds between the two samples the rates come from.
    pub interval_secs: f64,
}

#[derive(Debug, Serialize, Default, PartialEq, Eq)]
pub struct ShardCounts {
    pub total: usize,
    pub healthy: usize,
    pub degraded: usize,
    pub rebuilding: usize,
    pub unavailable: usize,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct VolumeRate {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_bytes_per_sec: f64,
    pub write_bytes_per_sec: f64,
    /// The counters since the serving nodes started.
    pub reads: u64,
    pub writes: u64,
}

/// One look at the cluster.
struct Sample {
    at: Instant,
    status: ClusterStatus,
    volumes: Vec<VolumeInfo>,
}

async fn sample(admin: &AdminClient) -> Result<Sample> {
    let (status, volumes) = tokio::try_join!(admin.status(), admin.list_volumes())?;
    Ok(Sample { at: Instant::now(), status, volumes })
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let Some(every) = args.watch else {
        let admin = args.conn.admin(ClientConfig::default())?;
        let first = sample(&admin).await?;
        tokio::time::sleep(ONE_SHOT_WINDOW).await;
        let second = sample(&admin).await?;
        let view = health_view(&second, &first);
        return output::print(args.out.output, &view, health_table);
    };
    let every = Duration::from_secs(every);
    // A watch keeps going through an outage: each sample gives up sooner.
    let config = ClientConfig { request_deadline: every.max(Duration::from_secs(5)), ..ClientConfig::default() };
    let admin = args.conn.admin(config)?;
    let mut signals = Signals::install()?;
    let clear = args.out.output == Output::Table && std::io::stdout().is_terminal();
    let mut previous: Option<Sample> = None;
    loop {
        let text = match sample(&admin).await {
            Ok(now) => {
                let view = health_view(&now, previous.as_ref().unwrap_or(&now));
                previous = Some(now);
                match args.out.output {
                    Output::Json => format!("{}\n", serde_json::to_string(&view)?),
                    Output::Table => health_table(&view),
                }
            }
            Err(e) => match args.out.output {
                Output::Json => format!("{}\n", serde_json::json!({ "error": format!("{e:#}") })),
                Output::Table => format!("cannot reach the cluster: {}\n", one_line(&format!("{e:#}"))),
            },
        };
        if clear {
            // Home and clear, then the screen: no flicker of a scrolled terminal.
            println!("\x1b[H\x1b[2J{text}(every {}s; Ctrl-C to stop)", every.as_secs());
        } else if args.out.output == Output::Table {
            println!("{text}");
        } else {
            print!("{text}");
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = signals.recv() => return Ok(()),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Per-second rates of the counters from `before` to `now`.
fn rates(now: &[VolumeIo], before: &[VolumeIo], secs: f64) -> BTreeMap<VolumeId, (f64, f64, f64, f64)> {
    let before: BTreeMap<VolumeId, &VolumeIo> = before.iter().map(|v| (v.volume, v)).collect();
    now.iter()
        .map(|v| {
            let r = match (before.get(&v.volume), secs > 0.0) {
                (Some(b), true) => {
                    let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                    (
                        d(v.reads, b.reads),
                        d(v.writes, b.writes),
                        d(v.read_bytes, b.read_bytes),
                        d(v.write_bytes, b.write_bytes),
                    )
                }
                _ => (0.0, 0.0, 0.0, 0.0),
            };
            (v.volume, r)
        })
        .collect()
}

/// The health of `now`, with rates since `before` (zero when they are the
/// same sample).
fn health_view(now: &Sample, before: &Sample) -> HealthView {
    let status = output::status_view(&now.status);
    let secs = now.at.saturating_duration_since(before.at).as_secs_f64();
    let rates = rates(&now.status.volume_io, &before.status.volume_io, secs);
    let counters: BTreeMap<VolumeId, &VolumeIo> = now.status.volume_io.iter().map(|v| (v.volume, v)).collect();
    let mut volumes: Vec<VolumeRate> = now
        .volumes
        .iter()
        .map(|v| {
            let (ri, wi, rb, wb) = rates.get(&v.id).copied().unwrap_or_default();
            let c = counters.get(&v.id);
            VolumeRate {
                id: v.id.0,
                name: v.name.clone(),
                size: v.size,
                read_iops: ri,
                write_iops: wi,
                read_bytes_per_sec: rb,
                write_bytes_per_sec: wb,
                reads: c.map_or(0, |c| c.reads),
                writes: c.map_or(0, |c| c.writes),
            }
        })
        .collect();
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    let rebuilds = rebuild_rates(&now.status, &before.status, secs);
    summarize(status, volumes, secs, rebuilds)
}

/// Bytes per second each rebuilding shard's copy advanced from `before` to
/// `now` (0 when it was not rebuilding before, or went backwards: a new
/// stream started).
pub(crate) fn rebuild_rates(now: &ClusterStatus, before: &ClusterStatus, secs: f64) -> BTreeMap<u32, f64> {
    let before: BTreeMap<u32, u64> =
        before.shards.iter().filter_map(|s| s.rebuilding.map(|r| (s.shard.id.0, r.done_bytes))).collect();
    now.shards
        .iter()
        .filter_map(|s| {
            let r = s.rebuilding?;
            let rate = match before.get(&s.shard.id.0) {
                Some(b) if secs > 0.0 => r.done_bytes.saturating_sub(*b) as f64 / secs,
                _ => 0.0,
            };
            Some((s.shard.id.0, rate))
        })
        .collect()
}

/// How far a shard's rebuild has come, for a line or a cell: bytes with the
/// rate when known, "catching up" while a new replica replays the log only.
fn rebuild_cell(sh: &ShardView, rates: &BTreeMap<u32, f64>) -> Option<String> {
    match sh.rebuilding {
        Some(r) => {
            let mut cell = rebuild_progress(r.done_bytes, r.total_bytes);
            if let Some(bps) = rates.get(&sh.id).filter(|b| **b > 0.0) {
                cell.push_str(&format!(" at {}", rate(*bps)));
            }
            Some(cell)
        }
        None if sh.state == "rebuilding" => Some("catching up from the log".to_string()),
        None => None,
    }
}

fn summarize(status: StatusView, volumes: Vec<VolumeRate>, secs: f64, rebuilds: BTreeMap<u32, f64>) -> HealthView {
    let mut counts = ShardCounts { total: status.shards.len(), ..ShardCounts::default() };
    for sh in &status.shards {
        match sh.state {
            "unavailable" => counts.unavailable += 1,
            "rebuilding" => counts.rebuilding += 1,
            "degraded" => counts.degraded += 1,
            _ => counts.healthy += 1,
        }
    }
    let mut problems = Vec::new();
    if status.meta_leader.is_none() {
        problems.push("the meta group has no leader".to_string());
    }
    for n in status.nodes.iter().filter(|n| !n.up) {
        problems.push(format!("{} ({}) is down", node_name(n.id), n.addr));
    }
    for n in &status.nodes {
        for d in n.disks.iter().filter(|d| d.capacity > 0 && d.used.saturating_mul(10) >= d.capacity.saturating_mul(9))
        {
            problems.push(format!("{} disk {} is {}% full", node_name(n.id), d.path, percent(d.used, d.capacity)));
        }
    }
    for sh in status.shards.iter().filter(|s| s.state != "healthy") {
        let up = sh.voters.iter().filter(|v| status.nodes.iter().any(|n| n.id == **v && n.up)).count();
        let mut line = format!("shard-{} is {}: {up} of {} replicas up", sh.id, sh.state, sh.voters.len());
        match (sh.rebuilding, rebuild_cell(sh, &rebuilds)) {
            (Some(_), Some(cell)) => line.push_str(&format!(", rebuild {cell}")),
            (None, Some(cell)) => line.push_str(&format!(", {cell}")),
            _ => {}
        }
        problems.push(line);
    }
    let health = if counts.unavailable > 0 || status.meta_leader.is_none() {
        "unavailable"
    } else if problems.is_empty() {
        "healthy"
    } else {
        "degraded"
    };
    HealthView {
        health,
        problems,
        cluster: status.cluster,
        map_version: status.map_version,
        meta_leader: status.meta_leader,
        nodes_up: status.nodes.iter().filter(|n| n.up).count(),
        capacity: status.nodes.iter().map(|n| n.capacity).fold(0, u64::saturating_add),
        used: status.nodes.iter().map(|n| n.used).fold(0, u64::saturating_add),
        shard_states: counts,
        shards: status.shards.into_iter().filter(|s| s.state != "healthy").collect(),
        nodes: status.nodes,
        volumes,
        rebuild_bytes_per_sec: rebuilds,
        interval_secs: secs,
    }
}

fn percent(used: u64, capacity: u64) -> u64 {
    if capacity == 0 {
        0
    } else {
        (used as u128 * 100 / capacity as u128) as u64
    }
}

fn rebuild_progress(done: u64, total: u64) -> String {
    format!("{}% ({} of {})", percent(done, total), format_size(done), format_size(total))
}

fn rate(bytes_per_sec: f64) -> String {
    format!("{}/s", format_size(bytes_per_sec.round() as u64))
}

pub fn health_table(v: &HealthView) -> String {
    let mut out = format!(
        "cluster-{}  {}  map v{}  meta leader {}\n",
        v.cluster,
        v.health.to_uppercase(),
        v.map_version,
        v.meta_leader.map_or_else(|| "none".to_string(), node_name)
    );
    let c = &v.shard_states;
    out.push_str(&format!(
        "nodes {}/{} up  used {} of {} ({}%)  shards {}: {} healthy, {} degraded, {} rebuilding, {} unavailable\n",
        v.nodes_up,
        v.nodes.len(),
        format_size(v.used),
        format_size(v.capacity),
        percent(v.used, v.capacity),
        c.total,
        c.healthy,
        c.degraded,
        c.rebuilding,
        c.unavailable
    ));
    for p in &v.problems {
        out.push_str(&format!("  ! {p}\n"));
    }
    out.push('\n');
    let mut rows = vec![["NODE", "ADDRESS", "ZONE", "STATE", "DISK", "USED", "CAPACITY", "USE%", "SHARDS", "LEADERS"]
        .map(String::from)
        .to_vec()];
    for n in &v.nodes {
        let state = if n.up { "up" } else { "DOWN" };
        let zone = n.zone.clone().unwrap_or_else(|| "-".into());
        let disks: Vec<(String, u64, u64)> = if n.disks.is_empty() {
            vec![("-".into(), n.used, n.capacity)]
        } else {
            n.disks.iter().map(|d| (d.path.clone(), d.used, d.capacity)).collect()
        };
        for (i, (path, used, capacity)) in disks.into_iter().enumerate() {
            let first = i == 0;
            let cell = |s: String| if first { s } else { String::new() };
            rows.push(vec![
                cell(node_name(n.id)),
                cell(n.addr.clone()),
                cell(zone.clone()),
                cell(state.into()),
                path,
                format_size(used),
                format_size(capacity),
                format!("{}%", percent(used, capacity)),
                cell(n.shards.to_string()),
                cell(n.leaders.to_string()),
            ]);
        }
    }
    out.push_str(&output::table(&rows));
    if !v.shards.is_empty() {
        out.push('\n');
        let mut rows = vec![["SHARD", "POOL", "STATE", "VOTERS", "LEADER", "REBUILD"].map(String::from).to_vec()];
        for sh in &v.shards {
            rows.push(vec![
                format!("shard-{}", sh.id),
                format!("pool-{}", sh.pool),
                sh.state.to_string(),
                sh.voters.iter().map(|n| node_name(*n)).collect::<Vec<_>>().join(","),
                sh.leader.map_or_else(|| "none".into(), node_name),
                rebuild_cell(sh, &v.rebuild_bytes_per_sec).unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&output::table(&rows));
    }
    out.push('\n');
    if v.volumes.is_empty() {
        out.push_str("no volumes\n");
    } else {
        let mut rows = vec![["VOLUME", "SIZE", "READ IOPS", "WRITE IOPS", "READ", "WRITE"].map(String::from).to_vec()];
        for vol in &v.volumes {
            rows.push(vec![
                vol.name.clone(),
                format_size(vol.size),
                format!("{:.0}", vol.read_iops),
                format!("{:.0}", vol.write_iops),
                rate(vol.read_bytes_per_sec),
                rate(vol.write_bytes_per_sec),
            ]);
        }
        out.push_str(&output::table(&rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_types::{ClusterId, DiskInfo, Epoch, MapVersion, NodeId, NodeInfo, PoolId};
    use output::{DiskView, NodeView, RebuildView};

    fn node(id: u64, up: bool) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            addr: format!("10.0.0.{id}:7100"),
            zone: None,
            up,
            disks: vec![DiskInfo { path: "/data".into(), capacity: 100 << 30, used: 1 << 30 }],
        }
    }

    fn io(volume: u64, reads: u64, writes: u64) -> VolumeIo {
        VolumeIo { volume: VolumeId(volume), reads, read_bytes: reads * 4096, writes, write_bytes: writes << 20 }
    }

    fn sample(at: Instant, volume_io: Vec<VolumeIo>) -> Sample {
        let volume = |id: u64, name: &str| VolumeInfo {
            id: VolumeId(id),
            name: name.into(),
            size: 1 << 30,
            pool: PoolId(1),
            chunk_size: 4 << 20,
            epoch: Epoch(0),
        };
        Sample {
            at,
            status: ClusterStatus {
                cluster: ClusterId(7),
                protocol_version: 1,
                map_version: MapVersion(3),
                meta_leader: Some(NodeId(1)),
                nodes: vec![node(1, true), node(2, true), node(3, true)],
                shards: vec![],
                volume_io,
                scrub: vec![],
            },
            volumes: vec![volume(2, "logs"), volume(1, "db")],
        }
    }

    #[test]
    fn rates_are_counter_deltas_over_the_interval_and_never_negative() {
        let t0 = Instant::now();
        let before = sample(t0, vec![io(1, 100, 10), io(2, 50, 0)]);
        // Volume 2's counters went down (a node restarted): no I/O, not negative.
        let now = sample(t0 + Duration::from_secs(2), vec![io(1, 300, 30), io(2, 10, 0)]);
        let v = health_view(&now, &before);
        assert_eq!(v.health, "healthy");
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.interval_secs, 2.0);
        let db = &v.volumes[0];
        assert_eq!((db.name.as_str(), db.read_iops, db.write_iops), ("db", 100.0, 10.0));
        assert_eq!((db.read_bytes_per_sec, db.write_bytes_per_sec), (100.0 * 4096.0, 10.0 * (1 << 20) as f64));
        assert_eq!((v.volumes[1].read_iops, v.volumes[1].reads), (0.0, 10));
        let t = health_table(&v);
        assert!(t.starts_with("cluster-7  HEALTHY  map v3  meta leader node-1\n"), "{t}");
        assert!(t.contains("nodes 3/3 up  used 3 GiB of 300 GiB (1%)"), "{t}");
        let db_row = t.lines().find(|l| l.starts_with("db ")).expect("db row");
        assert_eq!(db_row.split_whitespace().collect::<Vec<_>>()[3..5], ["100", "10"], "{t}");
        // The same sample twice (the first screen of a watch): zero rates.
        let v = health_view(&now, &now);
        assert!(v.volumes.iter().all(|v| v.read_iops == 0.0 && v.write_iops == 0.0));
    }

    fn node_view(id: u64, up: bool, used: u64) -> NodeView {
        let capacity = 100 << 30;
        NodeView {
            id,
            addr: format!("10.0.0.{id}:7100"),
            zone: None,
            up,
            disks: vec![DiskView { path: "/data".into(), capacity, used }],
            capacity,
            used,
            shards: 1,
            leaders: 0,
        }
    }

    fn shard_view(id: u32, voters: &[u64], state: &'static str, rebuilding: Option<RebuildView>) -> ShardView {
        ShardView {
            id,
            pool: 1,
            voters: voters.to_vec(),
            leader: Some(voters[0]),
            under_replicated: state != "healthy",
            state,
            rebuilding,
        }
    }

    #[test]
    fn down_nodes_full_disks_and_sick_shards_are_named_worst_first() {
        let rebuild = Some(RebuildView { done_bytes: 1 << 30, total_bytes: 4 << 30 });
        let status = StatusView {
            cluster: 7,
            protocol_version: 1,
            map_version: 3,
            meta_leader: Some(1),
            nodes: vec![node_view(1, true, 95 << 30), node_view(2, false, 0), node_view(3, false, 0)],
            shards: vec![
                shard_view(0, &[1, 2, 3], "unavailable", None),
                shard_view(1, &[1, 2], "rebuilding", rebuild),
                shard_view(2, &[1], "healthy", None),
            ],
            under_replicated: vec![0, 1],
            scrub: vec![],
        };
        let v = summarize(status, vec![], 1.0, BTreeMap::new());
        assert_eq!(v.health, "unavailable");
        assert_eq!(v.shard_states, ShardCounts { total: 3, healthy: 1, degraded: 0, rebuilding: 1, unavailable: 1 });
        assert!(v.problems.contains(&"node-2 (10.0.0.2:7100) is down".to_string()), "{:?}", v.problems);
        assert!(v.problems.contains(&"node-1 disk /data is 95% full".to_string()), "{:?}", v.problems);
        let rebuilding = "shard-1 is rebuilding: 1 of 2 replicas up, rebuild 25% (1 GiB of 4 GiB)";
        assert!(v.problems.contains(&rebuilding.to_string()), "{:?}", v.problems);
        assert_eq!(v.shards.iter().map(|s| s.id).collect::<Vec<_>>(), [0, 1], "only shards that are not healthy");
        let t = health_table(&v);
        let row = t.lines().find(|l| l.starts_with("shard-1 ")).expect("shard-1 row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["shard-1", "pool-1", "rebuilding", "node-1,node-2", "node-1", "25%", "(1", "GiB", "of", "4", "GiB)"]
        );
        assert!(t.contains("node-2  10.0.0.2:7100  -     DOWN"), "{t}");
        let json = serde_json::to_value(&v).expect("json");
        assert_eq!(json["shards"][1]["rebuilding"]["total_bytes"], 4u64 << 30);
        assert_eq!(json["health"], "unavailable");

        let status = StatusView {
            cluster: 7,
            protocol_version: 1,
            map_version: 3,
            meta_leader: Some(1),
            nodes: vec![node_view(1, true, 0), node_view(2, true, 0), node_view(3, false, 0)],
            shards: vec![shard_view(0, &[1, 2, 3], "degraded", None)],
            under_replicated: vec![0],
            scrub: vec![],
        };
        let v = summarize(status, vec![], 1.0, BTreeMap::new());
        assert_eq!((v.health, v.shard_states.degraded), ("degraded", 1));
    }

    #[test]
    fn rebuilds_show_their_rate_or_that_they_replay_the_log() {
        let rebuild = |done| Some(RebuildView { done_bytes: done, total_bytes: 4 << 30 });
        let status = |done| StatusView {
            cluster: 7,
            protocol_version: 1,
            map_version: 3,
            meta_leader: Some(1),
            nodes: vec![node_view(1, true, 0), node_view(2, true, 0), node_view(3, true, 0)],
            shards: vec![
                shard_view(0, &[1, 2, 3], "rebuilding", rebuild(done)),
                shard_view(1, &[1, 2, 3], "rebuilding", None),
            ],
            under_replicated: vec![],
            scrub: vec![],
        };
        let v = summarize(status(1 << 30), vec![], 2.0, BTreeMap::from([(0, 8.0 * 1048576.0)]));
        let line = "shard-0 is rebuilding: 3 of 3 replicas up, rebuild 25% (1 GiB of 4 GiB) at 8 MiB/s";
        assert!(v.problems.contains(&line.to_string()), "{:?}", v.problems);
        let line = "shard-1 is rebuilding: 3 of 3 replicas up, catching up from the log";
        assert!(v.problems.contains(&line.to_string()), "{:?}", v.problems);
        let t = health_table(&v);
        assert!(t.lines().any(|l| l.starts_with("shard-0 ") && l.ends_with("at 8 MiB/s")), "{t}");
        assert!(t.lines().any(|l| l.starts_with("shard-1 ") && l.ends_with("catching up from the log")), "{t}");
    }
}

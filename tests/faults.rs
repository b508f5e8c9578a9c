//! The fault suite: separate `ballast node` processes on this machine, a
//! workload of concurrent clients writing self-describing values to
//! overlapping blocks (every request's invocation, completion and result
//! recorded), one fault per round, and the history checker
//! (`ballast::verify`): every read returned the latest acknowledged write or
//! a concurrent one, and no acknowledged write was lost. The client must
//! also hide every fault: a failed request fails the round.
//!
//! One test per fault type, each on its own 4-node cluster (meta group on
//! nodes 1-3, node 4 joined; pool of 3 replicas over 8 shards), each
//! [`rounds`] rounds (20 unless `BALLAST_FAULT_ROUNDS` says otherwise).
//! A round uses blocks no earlier round used (a failed write may land
//! late), and its fault and heal happen after seeded numbers of completed
//! operations: fault timing follows the workload, never a sleep.
//!
//! Faults: `kill -9` of a shard leader, of a follower, of the meta leader; a
//! clean restart; a partition isolating a shard leader (Raft traffic
//! dropped both ways by the `faults` feature); a slow disk (every log batch
//! of one node delayed); power loss (every node killed at once, restarted);
//! node loss (a node gone for good: the meta leader marks it down, rebuilds
//! its replicas elsewhere; a new node takes its place); bit rot (a node
//! stopped, every block of the round it holds damaged on its disk,
//! restarted: reads must never return the damage, and `ballast scrub`
//! afterwards must find and repair what reads did not, leaving nothing).
//!
//! Seeded: the seed is printed; `BALLAST_SEED=<seed> cargo test --features
//! faults --test faults <fault>` replays a run.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast::verify::{read_back, round_blocks, run as run_workload, Recorder, Report, Workload};
use ballast_client::{AdminClient, ClientConfig, ClusterExports, RemoteVolume};
use ballast_nbd::ExportProvider;
use ballast_storage::{RocksConfig, RocksStore};
use ballast_types::{ClusterStatus, CreateVolume, Geometry, ShardId, VolumeId};
use common::procs::{NodeProc, BIN};
use common::{cmd, free_port, run_capture};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHORT: Duration = Duration::from_secs(60);
/// Longest a round may go without a completed operation.
const STALL: Duration = Duration::from_secs(90);
const WORKERS: u32 = 4;
const HOT_CHUNKS: u64 = 16;
const HOT_PER_CHUNK: u64 = 4;

/// One cluster at a time: the machine is small.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rounds() -> u64 {
    std::env::var("BALLAST_FAULT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillLeader,
    KillFollower,
    KillMetaLeader,
    Restart,
    Partition,
    SlowDisk,
    PowerLoss,
    NodeLoss,
    BitRot,
}

struct Node {
    proc: NodeProc,
    metrics: String,
    id: u64,
}

struct Suite {
    root: tempfile::TempDir,
    nodes: Vec<Node>,
    /// Nodes ever created (names the next data dir).
    created: usize,
    /// When the node of a node-loss round was killed, and the shards it held.
    lost: Option<(Instant, usize)>,
    admin: AdminClient,
    volume: VolumeId,
    exports: Arc<ClusterExports>,
    dev: Arc<RemoteVolume>,
}

fn node_proc(root: &Path, i: usize, join: Option<&str>) -> (NodeProc, String) {
    let mut p = NodeProc::new(root, i);
    let metrics = format!("127.0.0.1:{}", free_port());
    p.extra = vec!["--metrics".into(), metrics.clone(), "--down-after".into(), "3s".into()];
    if let Some(j) = join {
        p.extra.extend(["--join".into(), j.into()]);
    }
    (p, metrics)
}

impl Suite {
    async fn start() -> Self {
        let mut root = tempfile::Builder::new().prefix("ballast-faults-").tempdir().expect("tempdir");
        if std::env::var_os("BALLAST_KEEP_LOGS").is_some() {
            root.disable_cleanup(true);
            eprintln!("[faults] data and logs kept in {}", root.path().display());
        }
        let mut procs: Vec<(NodeProc, String)> = (1..=3).map(|i| node_proc(root.path(), i, None)).collect();
        for (p, _) in &mut procs {
            p.start();
        }
        let meta: Vec<String> = procs.iter().map(|(p, _)| p.addr.clone()).collect();
        let endpoints = meta.join(",");
        let out = run_capture(
            &mut cmd(BIN, ["cluster", "init", "--replicas", "3", "--shards", "8", "--endpoints", &endpoints]),
            SHORT,
        );
        assert!(out.status.success(), "cluster init: {}", out.describe());
        let (mut p4, m4) = node_proc(root.path(), 4, Some(&endpoints));
        p4.start();
        procs.push((p4, m4));
        let admin = AdminClient::new(meta, ClientConfig::default()).expect("admin client");
        let mut nodes: Vec<Node> = procs.into_iter().map(|(proc, metrics)| Node { proc, metrics, id: 0 }).collect();
        let status = wait_healthy(&admin, &nodes_addrs(&nodes)).await;
        for n in &mut nodes {
            n.id = status.nodes.iter().find(|i| i.addr == n.proc.addr).expect("node in the map").id.0;
        }
        let req = CreateVolume { name: "faults".into(), size: 1 << 30, pool: "default".into() };
        let volume = admin.create_volume(&req).await.expect("create volume").id;
        let exports = ClusterExports::attach_one(admin.clone(), "faults", false, false, ClientConfig::default())
            .await
            .expect("attach");
        let dev = exports.open("").await.expect("open").expect("served");
        Self { root, nodes, created: 4, lost: None, admin, volume, exports, dev }
    }

    fn logs(&self) -> String {
        let short = |l: &str| l.chars().take(300).collect::<String>();
        let tail = |n: &Node| n.proc.log_tail(12).lines().map(short).collect::<Vec<_>>().join("\n");
        self.nodes.iter().map(|n| format!("--- node {} ({}) ---\n{}\n", n.id, n.proc.addr, tail(n))).collect()
    }

    /// `ballast scrub` on every node, waited for; the damaged blocks it found
    /// (all repaired, or it fails).
    fn scrub(&self) -> u64 {
        let endpoints = nodes_addrs(&self.nodes).join(",");
        let out = run_capture(
            &mut cmd(BIN, ["scrub", "--timeout", "5m", "--output", "json", "--endpoints", &endpoints]),
            SHORT * 5,
        );
        assert!(out.status.success(), "ballast scrub: {}\n{}", out.describe(), self.logs());
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("scrub json");
        assert_eq!(v["unrepaired"].as_u64(), Some(0), "{}", out.stdout);
        v["corrupt_found"].as_u64().expect("corrupt_found")
    }

    /// The shards as the meta leader sees them, one line each.
    async fn shards(&self) -> String {
        match self.admin.status().await {
            Ok(s) => s
                .shards
                .iter()
                .map(|s| {
                    let v: Vec<u64> = s.shard.voters.iter().map(|v| v.0).collect();
                    let j: Vec<u64> = s.shard.joining.iter().map(|v| v.0).collect();
                    format!("{}: voters {v:?} joining {j:?} leader {:?}\n", s.shard.id, s.shard.leader.map(|l| l.0))
                })
                .collect(),
            Err(e) => format!("no status: {e}"),
        }
    }

    async fn status(&self) -> ClusterStatus {
        self.admin.status().await.expect("cluster status")
    }

    fn index_of(&self, id: u64) -> usize {
        self.nodes.iter().position(|n| n.id == id).unwrap_or_else(|| panic!("node {id} is not in the suite"))
    }

    /// A shard's leader and one of its followers (by the map's hint).
    async fn leader_and_follower(&self, rng: &mut StdRng) -> (usize, usize) {
        let status = self.status().await;
        let led: Vec<_> = status.shards.iter().filter(|s| s.shard.leader.is_some()).collect();
        let s = &led[rng.gen_range(0..led.len())].shard;
        let leader = s.leader.expect("led").0;
        let followers: Vec<u64> = s.voters.iter().map(|v| v.0).filter(|v| *v != leader).collect();
        let follower = followers[rng.gen_range(0..followers.len())];
        (self.index_of(leader), self.index_of(follower))
    }

    async fn meta_leader(&self) -> usize {
        let id = self.status().await.meta_leader.expect("a meta leader").0;
        self.index_of(id)
    }

    /// Nodes that are not meta members (may be lost for good).
    fn data_only(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| *i >= 3).collect()
    }

    async fn isolate(&self, victim: usize, on: bool) {
        for (i, n) in self.nodes.iter().enumerate() {
            let peers: Vec<String> = if !on {
                Vec::new()
            } else if i == victim {
                self.nodes.iter().filter(|o| o.id != n.id).map(|o| o.id.to_string()).collect()
            } else {
                vec![self.nodes[victim].id.to_string()]
            };
            post_fault(&n.metrics, &format!("isolate={}", peers.join(","))).await;
        }
    }

    /// Inject `fault`; returns what the heal needs to know.
    async fn inject(&mut self, fault: Fault, rng: &mut StdRng, blocks: &[u64]) -> Option<usize> {
        match fault {
            Fault::KillLeader | Fault::KillFollower | Fault::Restart | Fault::Partition => {
                let (leader, follower) = self.leader_and_follower(rng).await;
                let victim = if fault == Fault::KillFollower { follower } else { leader };
                match fault {
                    Fault::Restart => {
                        self.nodes[victim].proc.stop();
                        self.nodes[victim].proc.start();
                    }
                    Fault::Partition => self.isolate(victim, true).await,
                    _ => self.nodes[victim].proc.kill9(),
                }
                Some(victim)
            }
            Fault::KillMetaLeader => {
                let victim = self.meta_leader().await;
                self.nodes[victim].proc.kill9();
                Some(victim)
            }
            Fault::SlowDisk => {
                let victim = rng.gen_range(0..self.nodes.len());
                let ms = rng.gen_range(20..=80);
                post_fault(&self.nodes[victim].metrics, &format!("disk_delay_ms={ms}")).await;
                Some(victim)
            }
            Fault::PowerLoss => {
                for n in &mut self.nodes {
                    n.proc.kill9();
                }
                for n in &mut self.nodes {
                    n.proc.start();
                }
                None
            }
            Fault::BitRot => {
                // Stop a node, damage every block of this round it holds, restart it.
                let victim = rng.gen_range(0..self.nodes.len());
                self.nodes[victim].proc.stop();
                let damaged = corrupt(&self.nodes[victim].proc.dir, self.volume, blocks);
                eprintln!("  node {}: {damaged} stored blocks damaged", self.nodes[victim].id);
                self.nodes[victim].proc.start();
                Some(victim)
            }
            Fault::NodeLoss => {
                let pick = self.data_only();
                let victim = pick[rng.gen_range(0..pick.len())];
                let id = self.nodes[victim].id;
                let held =
                    self.status().await.shards.iter().filter(|s| s.shard.voters.iter().any(|v| v.0 == id)).count();
                self.nodes[victim].proc.kill9();
                self.lost = Some((Instant::now(), held));
                Some(victim)
            }
        }
    }

    /// Undo `fault` (node loss: wait for the rebuild, forget the lost node,
    /// bring a new one in its place).
    async fn heal(&mut self, fault: Fault, victim: Option<usize>) {
        match (fault, victim) {
            (Fault::KillLeader | Fault::KillFollower | Fault::KillMetaLeader, Some(v)) => self.nodes[v].proc.start(),
            (Fault::Partition, Some(v)) => self.isolate(v, false).await,
            (Fault::SlowDisk, Some(v)) => post_fault(&self.nodes[v].metrics, "disk_delay_ms=0").await,
            (Fault::NodeLoss, Some(v)) => {
                let lost = self.nodes.remove(v);
                let (at, held) = self.lost.take().expect("the loss was recorded");
                let healed = wait_healthy(&self.admin, &nodes_addrs(&self.nodes)).await;
                let took = at.elapsed();
                assert!(healed.shards.iter().all(|s| s.shard.voters.len() == 3), "replication factor restored");
                self.admin.remove_node(ballast_types::NodeId(lost.id)).await.expect("remove the lost node");
                eprintln!(
                    "  node {} lost: its {held} shard replicas rebuilt on the others {:.1} s after the kill \
                     (marked down after 3 s)",
                    lost.id,
                    took.as_secs_f64()
                );
                self.created += 1;
                let join = self.nodes.iter().take(3).map(|n| n.proc.addr.clone()).collect::<Vec<_>>().join(",");
                let (mut p, metrics) = node_proc(self.root.path(), self.created, Some(&join));
                p.start();
                self.nodes.push(Node { proc: p, metrics, id: 0 });
                let status = wait_healthy(&self.admin, &nodes_addrs(&self.nodes)).await;
                let n = self.nodes.last_mut().expect("new node");
                n.id = status.nodes.iter().find(|i| i.addr == n.proc.addr).expect("new node in the map").id.0;
                // The newcomer gets replicas until counts are even: wait for
                // its share, so the next loss takes replicas with it.
                let id = n.id;
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let s = wait_healthy(&self.admin, &nodes_addrs(&self.nodes)).await;
                    let held = s.shards.iter().filter(|s| s.shard.voters.iter().any(|v| v.0 == id)).count();
                    if held * self.nodes.len() + 3 >= s.shards.len() * 3 {
                        break;
                    }
                    assert!(Instant::now() < deadline, "node {id} got {held} replicas only\n{}", self.logs());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            _ => {}
        }
    }
}

fn nodes_addrs(nodes: &[Node]) -> Vec<String> {
    nodes.iter().map(|n| n.proc.addr.clone()).collect()
}

/// Damage the stored value of every block of `blocks` (of `volume`) in the
/// stopped node's store at `dir`, in whichever shard holds it; how many.
fn corrupt(dir: &Path, volume: VolumeId, blocks: &[u64]) -> usize {
    let store = {
        let mut opened = None;
        common::wait_until("the stopped node's store", SHORT, || {
            opened = RocksStore::open(
                dir,
                &RocksConfig { block_cache_bytes: 8 << 20, write_buffer_bytes: 4 << 20, ..RocksConfig::default() },
            )
            .ok();
            opened.is_some()
        });
        opened.expect("opened")
    };
    let g = Geometry::default();
    let mut n = 0;
    for &b in blocks {
        for shard in 0..64 {
            if store.corrupt(&g.key(ShardId(shard), volume, b)).expect("corrupt") {
                n += 1;
            }
        }
    }
    n
}

/// `POST /faults?QUERY` to a node's metrics listener (feature `faults`).
async fn post_fault(metrics: &str, query: &str) {
    let mut s =
        tokio::net::TcpStream::connect(metrics).await.unwrap_or_else(|e| panic!("fault control {metrics}: {e}"));
    s.write_all(format!("POST /faults?{query} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.expect("reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "fault {query} on {metrics}: {reply}");
}

/// Wait until exactly the nodes at `addrs` are up, every shard has a leader,
/// none is under-replicated or still taking in a replica.
async fn wait_healthy(admin: &AdminClient, addrs: &[String]) -> ClusterStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = match admin.status().await {
            Ok(s) => {
                let up: Vec<&str> = s.nodes.iter().filter(|n| n.up).map(|n| n.addr.as_str()).collect();
                let all_up = addrs.iter().all(|a| up.contains(&a.as_str()));
                let settled = s.shards.iter().all(|sh| {
                    sh.shard.leader.is_some()
                        && !sh.under_replicated
                        && sh.shard.joining.is_empty()
                        && sh.shard.voters.iter().all(|v| s.nodes.iter().any(|n| n.id == *v && addrs.contains(&n.addr)))
                });
                if all_up && settled && s.meta_leader.is_some() && !s.shards.is_empty() {
                    return s;
                }
                format!(
                    "up {up:?}, shards {:?}",
                    s.shards.iter().map(|s| (&s.shard, s.under_replicated)).collect::<Vec<_>>()
                )
            }
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "cluster not healthy within 120 s: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until `rec` has completed `n` operations (the workload's clock).
async fn wait_ops(rec: &Recorder, n: u64, suite: &Suite, what: &str) {
    let mut last = (rec.completed(), Instant::now());
    while rec.completed() < n {
        let now = rec.completed();
        if now != last.0 {
            last = (now, Instant::now());
        }
        assert!(last.1.elapsed() < STALL, "no operation completed for {STALL:?} ({what}, {now}/{n})\n{}", suite.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn suite_seed(fault: Fault) -> u64 {
    common::seed(&format!("faults::{fault:?}"))
}

async fn run_suite(fault: Fault) {
    let _one = ONE_AT_A_TIME.lock().await;
    let seed = suite_seed(fault);
    let mut suite = Suite::start().await;
    let blocks_per_chunk = Geometry::default().blocks_per_chunk();
    let mut totals = (0u64, 0u64);
    let started = Instant::now();
    for round in 0..rounds() {
        let round_seed = seed ^ (round + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = StdRng::seed_from_u64(round_seed);
        let blocks = round_blocks(round, HOT_CHUNKS, HOT_PER_CHUNK, blocks_per_chunk);
        let w = Workload { seed: round_seed, workers: WORKERS, blocks, write_ratio: 0.5 };
        let rec = Recorder::new();
        let running = {
            let (w, dev, rec) = (w.clone(), suite.dev.clone(), rec.clone());
            tokio::spawn(async move { run_workload(&w, dev, rec).await })
        };
        let at_fault = rng.gen_range(40..160);
        wait_ops(&rec, at_fault, &suite, "before the fault").await;
        let victim = suite.inject(fault, &mut rng, &w.blocks).await;
        let at_heal = rec.completed() + if fault == Fault::PowerLoss { 0 } else { rng.gen_range(40..200) };
        wait_ops(&rec, at_heal, &suite, "during the fault").await;
        suite.heal(fault, victim).await;
        let at_end = rec.completed() + rng.gen_range(60..200);
        wait_ops(&rec, at_end, &suite, "after the heal").await;
        rec.stop();
        running.await.expect("workload");
        read_back(&w.blocks, &*suite.dev, &rec).await;
        let report = Report::of(round_seed, &rec.history());
        totals.0 += report.writes_acked;
        totals.1 += report.reads;
        eprintln!(
            "[faults] {fault:?} round {round} seed {round_seed}: {} writes acked, {} reads, {} failed, {} violations",
            report.writes_acked,
            report.reads,
            report.writes_failed + report.reads_failed,
            report.violations.len()
        );
        assert!(
            report.clean(),
            "{fault:?} round {round} (suite seed {seed}; BALLAST_SEED={seed} replays; BALLAST_KEEP_LOGS=1 keeps the logs):\n{report}\nfault on {:?}\n{}\n{}",
            victim.map(|v| suite.nodes.get(v).map(|n| n.id)),
            suite.shards().await,
            suite.logs()
        );
        wait_healthy(&suite.admin, &nodes_addrs(&suite.nodes)).await;
        if fault == Fault::BitRot {
            // Reads repaired what they met; a scrub finds and repairs the
            // rest (it fails on anything it could not repair), and a second
            // one finds nothing left.
            let first = suite.scrub();
            let second = suite.scrub();
            eprintln!("  scrub: {} damaged blocks found and repaired; then {}", first, second);
            assert_eq!(second, 0, "damage left after a scrub\n{}", suite.logs());
        }
    }
    eprintln!(
        "[faults] {fault:?}: {} rounds, {} acknowledged writes and {} reads checked in {:.0} s, nothing lost",
        rounds(),
        totals.0,
        totals.1,
        started.elapsed().as_secs_f64()
    );
    suite.exports.detach_all().await.expect("detach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_shard_leader() {
    run_suite(Fault::KillLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_follower() {
    run_suite(Fault::KillFollower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_meta_leader() {
    run_suite(Fault::KillMetaLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clean_restart() {
    run_suite(Fault::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_a_leader() {
    run_suite(Fault::Partition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_disk() {
    run_suite(Fault::SlowDisk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_loss() {
    run_suite(Fault::PowerLoss).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bit_rot() {
    run_suite(Fault::BitRot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_loss() {
    run_suite(Fault::NodeLoss).await;
}

/// `ballast verify`, the same workload and checker as a command, against
/// this suite's cluster: a clean run on a volume it creates and deletes,
/// and a refusal to overwrite an existing volume without `--overwrite`.
/// Then `ballast node drain` and `ballast node remove` retire the node
/// outside the meta group while the attached volume stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_command_checks_a_live_cluster_then_a_node_is_drained_and_removed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let suite = Suite::start().await;
    let endpoints = nodes_addrs(&suite.nodes).join(",");
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--endpoints", &endpoints, "--duration", "3s", "--workers", "3"];
        args.extend_from_slice(extra);
        run_capture(&mut cmd(BIN, args), SHORT * 2)
    };
    let out = verify(&["--seed", "7", "--strict", "--output", "json"]);
    assert!(out.status.success(), "{}\n{}", out.describe(), suite.logs());
    assert!(out.stderr.contains("seed 7 (replay with --seed 7)"), "{}", out.describe());
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("verify json");
    assert!(report["writes_acked"].as_u64().unwrap_or(0) > 0, "{report:#}");
    assert!(report["reads"].as_u64().unwrap_or(0) > 0, "{report:#}");
    assert_eq!(report["violations"].as_array().map(Vec::len), Some(0), "{report:#}");
    let volumes = suite.admin.list_volumes().await.expect("volumes");
    assert!(volumes.iter().all(|v| v.name != "ballast-verify"), "the volume verify created is deleted");
    let refused = verify(&["faults"]);
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--overwrite") && refused.stderr.trim().lines().count() == 1,
        "{}",
        refused.describe()
    );

    let retired = suite.nodes[3].id;
    let node = retired.to_string();
    let drained =
        run_capture(&mut cmd(BIN, ["node", "drain", &node, "--timeout", "3m", "--endpoints", &endpoints]), SHORT * 4);
    assert!(drained.status.success(), "{}\n{}", drained.describe(), suite.logs());
    assert!(drained.stdout.contains(&format!("node-{retired} drained")), "{}", drained.describe());
    let status = suite.status().await;
    assert!(status.shards.iter().all(|s| s.shard.voters.iter().all(|v| v.0 != retired)), "{:#?}", status.shards);
    let removed = run_capture(&mut cmd(BIN, ["node", "remove", &node, "--endpoints", &endpoints]), SHORT);
    assert!(removed.status.success(), "{}", removed.describe());
    assert!(suite.status().await.nodes.iter().all(|n| n.id.0 != retired), "node {retired} forgotten");
    // The attached volume still reads, through the remaining replicas.
    let blocks = round_blocks(0, HOT_CHUNKS, HOT_PER_CHUNK, Geometry::default().blocks_per_chunk());
    let rec = Recorder::new();
    read_back(&blocks, &*suite.dev, &rec).await;
    let report = Report::of(7, &rec.history());
    assert!(report.clean() && report.reads > 0, "reads after the drain: {report}");
    suite.exports.detach_all().await.expect("detach");
}

//! Bit rot against three `ballast node` processes, through the CLI only
//! (plus opening a stopped node's RocksDB to damage and then check blocks):
//! - a 3-replica volume gets seeded random data; each node in turn — the
//!   shard's leader first — is stopped, a few of its stored blocks (a set
//!   no other node shares) get their bytes flipped on disk, and it is
//!   started again. Whichever node then leads holds damaged blocks, and
//!   every follower does too;
//! - reading the whole volume back (`volume export`) gives exactly the
//!   written bytes, no error: the leader answered its damaged blocks from a
//!   follower's copy; its `/metrics` counted the checksum failures and the
//!   read repairs, and once stopped its RocksDB holds every block intact;
//! - `ballast scrub` then finds the followers' damaged blocks and repairs
//!   them (it reports as many repaired as found, none left); `cluster
//!   status` shows each node's pass, and every node's RocksDB, checked
//!   stopped, holds every block intact and equal to the written data.
//!
//! Divergence against three processes: a stopped follower's RocksDB gets
//! other intact values (valid checksums) for a few blocks and loses one
//! block (a hole where its peers have data); after it restarts, `ballast
//! scrub` finds exactly those copies by comparing the replicas' digests and
//! realigns them, the follower's disk then holds the majority's values, a
//! second scrub finds nothing, and the volume reads back as written.
//!
//! Seeded: the seed is printed; `BALLAST_SEED=<seed>` replays the run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use ballast_storage::{BlockStore, Durability, RocksConfig, RocksStore, StorageError, WriteBatch};
use ballast_types::{Geometry, ShardId, VolumeId, BLOCK_SIZE};
use common::procs::{NodeProc, BIN};
use common::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const SHORT: Duration = Duration::from_secs(60);
const SIZE: u64 = 8 << 20;
const BLOCKS: u64 = SIZE / BLOCK_SIZE as u64;
/// Blocks damaged on each node.
const DAMAGED_PER_NODE: usize = 6;

struct Cluster {
    nodes: Vec<NodeProc>,
    metrics: Vec<String>,
    endpoints: String,
}

impl Cluster {
    fn start(root: &Path) -> Self {
        let mut nodes = Vec::new();
        let mut metrics = Vec::new();
        for i in 1..=3 {
            let mut n = NodeProc::new(root, i);
            let m = format!("127.0.0.1:{}", free_port());
            n.extra = vec!["--metrics".into(), m.clone()];
            n.start();
            nodes.push(n);
            metrics.push(m);
        }
        let endpoints = nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
        Self { nodes, metrics, endpoints }
    }

    /// The endpoints of the nodes that run.
    fn live(&self) -> String {
        let live: Vec<String> = self.nodes.iter().filter(|n| n.running()).map(|n| n.addr.clone()).collect();
        if live.is_empty() {
            self.endpoints.clone()
        } else {
            live.join(",")
        }
    }

    fn cli(&self, args: &[&str], timeout: Duration) -> Output {
        let mut c = cmd(BIN, args);
        c.args(["--endpoints", &self.live()]);
        let out = run_capture(&mut c, timeout);
        assert!(out.status.success(), "{}\n{}", out.describe(), self.logs());
        out
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args, SHORT);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{args:?} JSON: {e}\n{}", out.stdout))
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("--- {} ---\n{}\n", n.addr, n.log_tail(30))).collect()
    }

    /// The node index (0-based) whose node id is `id` (ids follow the init order).
    fn index_of(&self, id: u64) -> usize {
        id as usize - 1
    }

    /// The shard's leader as the cluster reports it, once it has one.
    fn leader(&self) -> u64 {
        let mut leader = 0;
        wait_until("a shard leader", SHORT, || {
            let mut c = cmd(BIN, ["cluster", "status", "--output", "json"]);
            c.args(["--endpoints", &self.live()]);
            let out = run_capture(&mut c, SHORT);
            let Ok(s) = serde_json::from_str::<serde_json::Value>(&out.stdout) else { return false };
            leader = s["shards"][0]["leader"].as_u64().unwrap_or(0);
            leader != 0 && self.nodes[self.index_of(leader)].running()
        });
        leader
    }

    /// Every node up, running its shard replica, and the shard led (after a
    /// node restarted: a scrub pass must find the replica).
    fn wait_up(&self) {
        wait_until("three nodes up", SHORT, || {
            let mut c = cmd(BIN, ["cluster", "status", "--output", "json"]);
            c.args(["--endpoints", &self.endpoints]);
            let out = run_capture(&mut c, SHORT);
            serde_json::from_str::<serde_json::Value>(&out.stdout).is_ok_and(|s| {
                s["nodes"].as_array().is_some_and(|n| n.iter().all(|n| n["up"] == true))
                    && s["shards"][0]["leader"].as_u64().unwrap_or(0) != 0
            }) && (0..3).all(|i| self.try_scrape(i).is_some_and(|m| sample(&m, "ballast_node_shard_replicas") >= 1.0))
        });
    }

    /// `ballast scrub --output json`, waited for.
    fn scrub(&self) -> serde_json::Value {
        let out = self.cli(&["scrub", "--output", "json", "--timeout", "90s"], Duration::from_secs(120));
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("scrub JSON: {e}\n{}", out.stdout))
    }

    fn scrape(&self, i: usize) -> String {
        let addr = &self.metrics[i];
        self.try_scrape(i).unwrap_or_else(|| panic!("no metrics from {addr}"))
    }

    fn try_scrape(&self, i: usize) -> Option<String> {
        let mut s = TcpStream::connect(&self.metrics[i]).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }
}

/// The value of the sample `name` (with its labels, as written) in `text`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Open a stopped node's block store (retrying while its lock is released).
fn open(dir: &Path) -> RocksStore {
    let mut opened = None;
    wait_until("the data dir's lock", SHORT, || {
        opened = RocksStore::open(
            dir,
            &RocksConfig { block_cache_bytes: 8 << 20, write_buffer_bytes: 4 << 20, ..RocksConfig::default() },
        )
        .ok();
        opened.is_some()
    });
    opened.expect("opened")
}

/// Check every block of the volume in a stopped node's store: intact and
/// equal to `data`. Returns the damaged block numbers.
fn damaged_blocks(dir: &Path, shard: ShardId, volume: VolumeId, data: &[u8]) -> Vec<u64> {
    let store = open(dir);
    let g = Geometry::default();
    let mut bad = Vec::new();
    for b in 0..BLOCKS {
        match store.get(&g.key(shard, volume, b)) {
            Ok(Some(v)) => {
                let want = &data[(b * BLOCK_SIZE as u64) as usize..((b + 1) * BLOCK_SIZE as u64) as usize];
                assert!(&v[..] == want, "{}: block {b} is intact but holds other bytes", dir.display());
            }
            Ok(None) => panic!("{}: block {b} is missing", dir.display()),
            Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => bad.push(b),
            Err(e) => panic!("{}: block {b}: {e}", dir.display()),
        }
    }
    bad
}

/// Form a 3-replica, 1-shard cluster with an 8 MiB volume `v` filled with
/// seeded data (every block); its id, its shard and the data.
fn seeded_volume(cluster: &Cluster, root: &Path, seed: u64) -> (VolumeId, ShardId, Vec<u8>) {
    cluster.cli(&["cluster", "init", "--replicas", "3", "--shards", "1"], SHORT);
    cluster.cli(&["volume", "create", "v", "--size", "8MiB"], SHORT);
    let info = cluster.json(&["volume", "info", "v", "--output", "json"]);
    let volume = VolumeId(info["id"].as_u64().expect("volume id"));
    let status = cluster.json(&["cluster", "status", "--output", "json"]);
    let shard = ShardId(status["shards"][0]["id"].as_u64().expect("shard id") as u32);
    let data = random_bytes(seed, SIZE as usize);
    let image = root.join("image.raw");
    std::fs::write(&image, &data).expect("image");
    cluster.cli(&["volume", "import", "v", image.to_str().expect("path")], SHORT);
    (volume, shard, data)
}

#[test]
fn damaged_blocks_are_read_from_healthy_replicas_and_repaired_by_read_and_scrub() {
    let seed = seed("integrity");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::Builder::new().prefix("ballast-integrity-").tempdir().expect("tempdir");
    let mut cluster = Cluster::start(root.path());
    let (volume, shard, data) = seeded_volume(&cluster, root.path(), seed);
    let exported = root.path().join("first.raw");
    cluster.cli(&["volume", "export", "v", exported.to_str().expect("path")], SHORT);
    assert_same_bytes("data before any damage", &std::fs::read(&exported).expect("export"), &data);

    // Disjoint sets of blocks, one per node, damaged on that node's disk:
    // the leader first, then the others.
    let mut all: Vec<u64> = (0..BLOCKS).collect();
    all.shuffle(&mut rng);
    let first = cluster.index_of(cluster.leader());
    let order = [first, (first + 1) % 3, (first + 2) % 3];
    let mut damaged: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
    for (k, i) in order.into_iter().enumerate() {
        let set: BTreeSet<u64> = all[k * DAMAGED_PER_NODE..(k + 1) * DAMAGED_PER_NODE].iter().copied().collect();
        cluster.nodes[i].stop();
        {
            let store = open(&cluster.nodes[i].dir);
            let g = Geometry::default();
            for b in &set {
                assert!(store.corrupt(&g.key(shard, volume, *b)).expect("corrupt"), "block {b} not stored");
            }
        }
        eprintln!("[ballast-test] node {} ({}): damaged blocks {set:?}", i + 1, cluster.nodes[i].addr);
        damaged.insert(i, set);
        cluster.nodes[i].start();
        // Every node up and the shard led again before the next one stops.
        cluster.wait_up();
    }

    // Read everything back: right bytes, no error, though the leader's copy
    // of some blocks is damaged.
    let leader = cluster.index_of(cluster.leader());
    eprintln!("[ballast-test] reading through node {} (leader)", leader + 1);
    let exported = root.path().join("second.raw");
    cluster.cli(&["volume", "export", "v", exported.to_str().expect("path")], SHORT);
    assert_same_bytes("data read back over damaged blocks", &std::fs::read(&exported).expect("export"), &data);
    let leader_damage = damaged[&leader].len() as f64;
    let mut metrics = String::new();
    wait_until("the leader's read repairs to apply", SHORT, || {
        metrics = cluster.scrape(leader);
        sample(&metrics, "ballast_blocks_repaired_total{cause=\"read\"}") >= leader_damage
    });
    let checksum = sample(&metrics, "ballast_checksum_errors_total{kind=\"stored\"}");
    assert!(checksum >= leader_damage, "stored checksum errors counted: {checksum} < {leader_damage}\n{metrics}");
    // Every replica applied the repair entries; only the leader's copies were bad.
    for (i, n) in cluster.nodes.iter().enumerate() {
        let m = cluster.scrape(i);
        let read = sample(&m, "ballast_blocks_repaired_total{cause=\"read\"}");
        assert_eq!(read > 0.0, i == leader, "node {}: {read} read repairs", n.addr);
    }

    // Scrub: the followers' damaged blocks are found and repaired.
    let out = cluster.cli(&["scrub", "--output", "json", "--timeout", "90s"], Duration::from_secs(120));
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("scrub JSON");
    eprintln!("[ballast-test] scrub: {report}");
    let followers_damage: usize = damaged.iter().filter(|(i, _)| **i != leader).map(|(_, s)| s.len()).sum();
    assert_eq!(report["nodes"].as_array().map(Vec::len), Some(3), "{report:#}");
    assert_eq!(report["corrupt_found"].as_u64(), Some(followers_damage as u64), "{report:#}");
    assert_eq!(report["repaired"].as_u64(), Some(followers_damage as u64), "{report:#}");
    assert_eq!(report["unrepaired"].as_u64(), Some(0), "{report:#}");
    assert_eq!(report["blocks_checked"].as_u64(), Some(3 * BLOCKS), "{report:#}");
    let table = cluster.cli(&["scrub"], Duration::from_secs(330));
    assert!(table.stdout.contains(&format!("{} blocks", 3 * BLOCKS)), "{}", table.stdout);
    assert!(table.stdout.contains("0 corrupt found"), "a second pass finds nothing: {}", table.stdout);
    let status = cluster.json(&["cluster", "status", "--output", "json"]);
    let scrub = status["scrub"].as_array().expect("scrub in cluster status");
    assert_eq!(scrub.len(), 3, "{status:#}");
    assert!(scrub.iter().all(|s| s["passes"].as_u64() >= Some(2) && s["last_finished_unix_ms"].as_u64().is_some()));
    let text = cluster.cli(&["cluster", "status"], SHORT);
    assert!(text.stdout.contains("scrub (last finished pass per node)"), "{}", text.stdout);
    for (i, _) in cluster.nodes.iter().enumerate() {
        let m = cluster.scrape(i);
        let found = sample(&m, "ballast_scrub_errors_total");
        let want = if i == leader { 0.0 } else { damaged[&i].len() as f64 };
        assert_eq!(found, want, "node {}: scrub errors", i + 1);
        assert_eq!(sample(&m, "ballast_scrub_repaired_total"), want, "node {}", i + 1);
        assert!(sample(&m, "ballast_scrub_bytes_total") >= SIZE as f64, "node {}", i + 1);
    }

    // Every node's disk now holds every block intact, with the written bytes.
    for i in 0..3 {
        cluster.nodes[i].stop();
        let bad = damaged_blocks(&cluster.nodes[i].dir, shard, volume, &data);
        assert!(bad.is_empty(), "node {}: blocks {bad:?} still damaged (BALLAST_SEED={seed})", i + 1);
        cluster.nodes[i].start();
    }
}

/// Blocks given other intact values on the stopped follower.
const DIVERGED: usize = 5;

#[test]
fn intact_blocks_that_differ_from_their_peers_are_found_by_comparing_replicas_and_realigned() {
    let seed = seed("divergence");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::Builder::new().prefix("ballast-divergence-").tempdir().expect("tempdir");
    let mut cluster = Cluster::start(root.path());
    let (volume, shard, data) = seeded_volume(&cluster, root.path(), seed);

    // A follower, stopped: other intact values for some blocks, one block gone.
    let follower = (cluster.index_of(cluster.leader()) + 1) % 3;
    let mut blocks: Vec<u64> = (0..BLOCKS).collect();
    blocks.shuffle(&mut rng);
    let (changed, hole) = (&blocks[..DIVERGED], blocks[DIVERGED]);
    cluster.nodes[follower].stop();
    {
        let store = open(&cluster.nodes[follower].dir);
        let g = Geometry::default();
        let mut batch = WriteBatch::new();
        for b in changed {
            let other: Vec<u8> = (0..BLOCK_SIZE).map(|_| rng.gen()).collect();
            batch.put(g.key(shard, volume, *b), bytes::Bytes::from(other));
        }
        batch.delete(g.key(shard, volume, hole));
        store.write(batch, Durability::Sync).expect("diverge");
        for b in changed {
            assert!(store.get(&g.key(shard, volume, *b)).expect("intact").is_some(), "block {b} checks out");
        }
    }
    eprintln!("[ballast-test] node {}: blocks {changed:?} changed, block {hole} deleted", follower + 1);
    cluster.nodes[follower].start();
    cluster.wait_up();

    // Scrub compares the replicas: exactly those copies differ, and are realigned.
    let report = cluster.scrub();
    eprintln!("[ballast-test] scrub: {report}");
    let diverged = DIVERGED as u64 + 1;
    assert_eq!(report["corrupt_found"].as_u64(), Some(0), "every copy is intact: {report:#}");
    assert_eq!(report["divergent_found"].as_u64(), Some(diverged), "{report:#}\n{}", cluster.logs());
    assert_eq!(report["realigned"].as_u64(), Some(diverged), "{report:#}\n{}", cluster.logs());
    assert_eq!(report["unrealigned"].as_u64(), Some(0), "{report:#}");
    assert_eq!(report["no_majority"].as_u64(), Some(0), "{report:#}");
    let found: f64 = (0..3).map(|i| sample(&cluster.scrape(i), "ballast_scrub_divergent_total")).sum();
    assert_eq!(found, diverged as f64, "counted once, by the shard's leader");
    let written = sample(&cluster.scrape(follower), "ballast_blocks_realigned_total");
    assert_eq!(written, diverged as f64, "the follower wrote the majority's values");

    // The follower's disk holds the majority's values (every block intact and as written).
    cluster.nodes[follower].stop();
    let bad = damaged_blocks(&cluster.nodes[follower].dir, shard, volume, &data);
    assert!(bad.is_empty(), "blocks {bad:?} damaged (BALLAST_SEED={seed})");
    cluster.nodes[follower].start();
    cluster.wait_up();

    // A second scrub finds nothing; reads return the written data.
    let again = cluster.scrub();
    assert_eq!(again["divergent_found"].as_u64(), Some(0), "{again:#}");
    assert_eq!(again["corrupt_found"].as_u64(), Some(0), "{again:#}");
    let table = cluster.cli(&["scrub"], Duration::from_secs(120));
    assert!(table.stdout.contains("replicas compared: 0 divergent found"), "{}", table.stdout);
    let exported = root.path().join("back.raw");
    cluster.cli(&["volume", "export", "v", exported.to_str().expect("path")], SHORT);
    assert_same_bytes("data read back after realigning", &std::fs::read(&exported).expect("export"), &data);
}

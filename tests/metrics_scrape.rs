//! `/metrics` of real processes: three `ballast node`s and a `ballast attach`,
//! each started with `--metrics`, scraped over HTTP before and after qemu-io
//! writes and reads through NBD. The text must be valid Prometheus exposition
//! format, and the counters of the I/O path must move: NBD requests and bytes
//! on the attach process; Data requests and bytes, Raft log fsyncs, append,
//! commit and apply latency on the nodes. The Grafana dashboard in `deploy/`
//! may name only families these processes export.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SHORT: Duration = Duration::from_secs(60);
const BIN: &str = env!("CARGO_BIN_EXE_ballast");

/// A child process killed on drop, with its log in the test's directory.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn ballast");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /metrics` over a plain socket; the body, or `None` while nothing listens.
fn scrape(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    Some(body.to_string())
}

/// One parsed exposition: families by name (their type) and samples keyed
/// by `name{labels}` exactly as written.
#[derive(Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

impl Exposition {
    fn get(&self, key: &str) -> f64 {
        *self.samples.get(key).unwrap_or_else(|| panic!("no sample {key}"))
    }
}

/// Parse `text`, panicking on anything the Prometheus text format forbids
/// or a scraper would misread: a sample before its family's TYPE, a bad
/// name, label or value, histogram buckets that are not cumulative or do
/// not end with `+Inf` equal to `_count`.
fn parse(text: &str, what: &str) -> Exposition {
    let mut e = Exposition::default();
    // Per histogram series (name + labels without le): bucket counts in order.
    let mut buckets: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, tail) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(valid_name(name), "{what}: bad family name in {line:?}");
            if kw == Some("TYPE") {
                assert!(["counter", "gauge", "histogram"].contains(&tail), "{what}: {line:?}");
                assert!(
                    e.types.insert(name.to_string(), tail.to_string()).is_none(),
                    "{what}: two TYPE lines for {name}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{what}: no value in {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{what}: bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.strip_suffix('}').unwrap_or_else(|| panic!("{what}: {line:?}")))),
            None => (series, Vec::new()),
        };
        assert!(valid_name(name), "{what}: bad metric name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|base| e.types.get(*base).is_some_and(|t| t == "histogram"))
            .unwrap_or(name);
        let kind = e.types.get(family).unwrap_or_else(|| panic!("{what}: sample {line:?} has no TYPE line before it"));
        if kind == "counter" || name.ends_with("_count") || name.ends_with("_bucket") {
            assert!(value >= 0.0, "{what}: negative count in {line:?}");
        }
        if kind == "histogram" {
            let key = |labels: &[(String, String)]| {
                let rest: Vec<String> =
                    labels.iter().filter(|(k, _)| k != "le").map(|(k, v)| format!("{k}={v}")).collect();
                format!("{family}{{{}}}", rest.join(","))
            };
            if name.ends_with("_bucket") {
                let le = labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v.clone());
                let le = le.unwrap_or_else(|| panic!("{what}: bucket without le: {line:?}"));
                buckets.entry(key(&labels)).or_default().push((le, value));
            } else if name.ends_with("_count") {
                let series =
                    buckets.get(&key(&labels)).unwrap_or_else(|| panic!("{what}: _count before buckets: {line:?}"));
                let (le, last) = series.last().expect("buckets");
                assert_eq!(le, "+Inf", "{what}: {family} buckets must end with +Inf");
                assert_eq!(*last, value, "{what}: {family} +Inf bucket differs from _count");
            }
        }
        assert!(e.samples.insert(series.to_string(), value).is_none(), "{what}: sample {series} twice");
    }
    for (series, b) in &buckets {
        let mut prev_le = f64::NEG_INFINITY;
        let mut prev = 0.0;
        for (le, count) in b {
            let bound: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le is a number") };
            assert!(bound > prev_le, "{what}: {series} bucket bounds not increasing at le={le}");
            assert!(*count >= prev, "{what}: {series} buckets not cumulative at le={le}");
            (prev_le, prev) = (bound, *count);
        }
    }
    e
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `a="x",b="y\"z"` → pairs, unescaping `\\`, `\"` and `\n`.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert!(valid_name(&key), "bad label name {key:?} in {s:?}");
        assert_eq!(chars.next(), Some('"'), "label value not quoted in {s:?}");
        let mut value = String::new();
        loop {
            match chars.next().unwrap_or_else(|| panic!("unterminated label value in {s:?}")) {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => panic!("bad escape {other:?} in {s:?}"),
                },
                c => value.push(c),
            }
        }
        out.push((key, value));
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(c) => panic!("unexpected {c:?} after a label in {s:?}"),
        }
    }
    out
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("expected: {what}"))
    }
}

/// The sum of `key` over several expositions (a counter summed over nodes).
fn total(all: &[Exposition], key: &str) -> f64 {
    all.iter().map(|e| e.samples.get(key).copied().unwrap_or(0.0)).sum()
}

/// `ballast_…` names used in the dashboard's query expressions, with the
/// histogram suffixes taken off.
fn dashboard_metrics(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).expect("read the dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(!exprs.is_empty(), "no expressions in the dashboard");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find("ballast_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn metrics_of_nodes_and_attach_move_when_io_happens() {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let root = tempfile::Builder::new().prefix("ballast-metrics-").tempdir().expect("tempdir");
    let mut nodes = Vec::new();
    let mut node_metrics = Vec::new();
    for i in 1..=3 {
        let (addr, metrics) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let dir = root.path().join(format!("node{i}"));
        std::fs::create_dir_all(&dir).expect("data dir");
        let mut c = Command::new(BIN);
        c.args(["node", "--listen", &addr, "--advertise", &addr, "--metrics", &metrics, "--data-dir"]).arg(&dir);
        nodes.push((addr, Proc::spawn(c, root.path().join(format!("node{i}.log")))));
        node_metrics.push(metrics);
    }
    let endpoints = nodes.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>().join(",");
    let logs = || nodes.iter().map(|(a, p)| format!("--- {a} ---\n{}\n", p.log())).collect::<String>();
    let cli = |args: &[&str]| {
        let out = run_capture(cmd(BIN, args).args(["--endpoints", &endpoints]), SHORT);
        assert!(out.status.success(), "{}\n{}", out.describe(), logs());
        out
    };
    for m in &node_metrics {
        wait_until("a node's /metrics", SHORT, || scrape(m).is_some());
    }
    cli(&["cluster", "init", "--replicas", "3", "--shards", "2"]);
    cli(&["volume", "create", "m", "--size", "64MiB"]);

    let (nbd_port, attach_metrics) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let mut attach_cmd = cmd(BIN, ["attach", "m", "--listen", &format!("127.0.0.1:{nbd_port}")]);
    attach_cmd.args(["--metrics", &attach_metrics, "--endpoints", &endpoints]);
    let attach = Proc::spawn(attach_cmd, root.path().join("attach.log"));
    let uri = format!("nbd://127.0.0.1:{nbd_port}/m");
    wait_until("ballast attach to serve NBD", SHORT, || {
        Command::new(&nbdinfo).arg("--size").arg(&uri).output().is_ok_and(|o| o.status.success())
    });

    let scrape_all = |label: &str| {
        let nodes: Vec<Exposition> = node_metrics
            .iter()
            .map(|m| {
                parse(&scrape(m).unwrap_or_else(|| panic!("scrape {m}\n{}", logs())), &format!("{label} node {m}"))
            })
            .collect();
        let text = scrape(&attach_metrics).unwrap_or_else(|| panic!("scrape attach\n{}", attach.log()));
        (nodes, parse(&text, &format!("{label} attach")))
    };
    let (nodes_before, attach_before) = scrape_all("before");

    // 1 MiB + 256 KiB written (FUA, qemu-io's default), read back, flushed.
    let io = |script: &str| {
        let out = run(&mut cmd(&qemu_io, ["-f", "raw", "-c", script, &uri]), SHORT);
        assert!(!out.all().contains("failed"), "qemu-io {script}: {}", out.describe());
    };
    io("write -P 0x5a 0 1M");
    io("write -P 0x33 8M 256k");
    io("read -P 0x5a 0 1M");
    io("flush");
    let written = f64::from((1 << 20) + (256 << 10));
    let (_, attach_after) = scrape_all("after");

    // The attach process: NBD requests and bytes by op, latency, client RPCs.
    let moved = |key: &str| attach_after.get(key) - attach_before.get(key);
    assert!(moved("ballast_nbd_requests_total{op=\"write\"}") >= 2.0, "NBD writes counted");
    assert!(moved("ballast_nbd_bytes_total{op=\"write\"}") >= written, "NBD write bytes counted");
    assert!(moved("ballast_nbd_requests_total{op=\"read\"}") >= 1.0, "NBD reads counted");
    assert!(moved("ballast_nbd_bytes_total{op=\"read\"}") >= f64::from(1 << 20), "NBD read bytes counted");
    assert!(moved("ballast_nbd_requests_total{op=\"flush\"}") >= 1.0, "NBD flush counted");
    assert!(moved("ballast_nbd_request_duration_seconds_count{op=\"write\"}") >= 2.0, "NBD write latency observed");
    assert!(moved("ballast_nbd_request_duration_seconds_sum{op=\"write\"}") > 0.0, "NBD write latency summed");
    assert!(moved("ballast_client_rpcs_total") >= 3.0, "client Data RPCs counted");
    assert_eq!(attach_after.get("ballast_nbd_errors_total{op=\"write\"}"), 0.0, "no NBD write errors");

    // The nodes. Followers fsync and apply a moment after the leader has
    // answered, and leadership settles after init: scrape until it all holds.
    let node_checks = |nodes_after: &[Exposition]| -> Result<(), String> {
        let node_moved = |key: &str| total(nodes_after, key) - total(&nodes_before, key);
        check(node_moved("ballast_data_requests_total{op=\"write\"}") >= 2.0, "Data writes counted")?;
        check(node_moved("ballast_data_bytes_total{op=\"write\"}") >= written, "Data write bytes counted")?;
        check(node_moved("ballast_data_requests_total{op=\"read\"}") >= 1.0, "Data reads counted")?;
        check(node_moved("ballast_raft_commit_seconds_count") >= 2.0, "commit latency observed on the leaders")?;
        for key in [
            "ballast_raft_log_fsync_seconds_count",
            "ballast_raft_append_seconds_count",
            "ballast_raft_apply_seconds_count",
            "ballast_raft_log_batch_appends_count",
        ] {
            // Three replicas: every node fsyncs and applies the writes.
            for (i, (before, after)) in nodes_before.iter().zip(nodes_after).enumerate() {
                check(after.get(key) > before.get(key), &format!("{key} moved on node {}", i + 1))?;
            }
        }
        check(node_moved("ballast_raft_log_written_bytes_total") >= written, "Raft log bytes counted")?;
        for key in [
            "ballast_checksum_errors_total{kind=\"wire\"}",
            "ballast_checksum_errors_total{kind=\"stored\"}",
            "ballast_scrub_bytes_total",
        ] {
            check(total(nodes_after, key) == 0.0, &format!("{key} is 0"))?;
        }
        // 2 shards × 3 replicas, 2 leaders, one meta leader, which alone
        // reports under-replicated shards (none).
        check(total(nodes_after, "ballast_node_shard_replicas") == 6.0, "6 shard replicas")?;
        check(total(nodes_after, "ballast_node_shard_leaders") == 2.0, "2 shard leaders")?;
        check(total(nodes_after, "ballast_node_meta_leader") == 1.0, "1 meta leader")?;
        let reporting: Vec<f64> =
            nodes_after.iter().filter_map(|e| e.samples.get("ballast_shards_under_replicated").copied()).collect();
        check(reporting == vec![0.0], "the meta leader alone reports 0 under-replicated shards")
    };
    let deadline = Instant::now() + SHORT;
    let nodes_after = loop {
        let (nodes_after, _) = scrape_all("settled");
        match node_checks(&nodes_after) {
            Ok(()) => break nodes_after,
            Err(e) if Instant::now() < deadline => {
                eprintln!("[ballast-test] not yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("node metrics: {e}\n{}", logs()),
        }
    };

    // Every family the dashboard queries is exported by a node or the attach process.
    let mut exported: BTreeSet<String> = attach_after.types.keys().cloned().collect();
    for e in &nodes_after {
        exported.extend(e.types.keys().cloned());
    }
    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/ballast-dashboard.json");
    for name in dashboard_metrics(&dashboard) {
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        assert!(
            exported.contains(&name) || exported.contains(family),
            "the dashboard queries {name}, which no process exports"
        );
    }
}

//! A cluster of separate `ballast node` processes on this machine, driven
//! only through the CLI and real NBD clients:
//! - bootstrap (`cluster init`), `cluster status`, pool and volume lifecycle
//!   (create, list, info, resize seen by a new NBD connection, delete refused
//!   while attached, delete after detach);
//! - `ballast attach` serving a 3-replica volume to qemu-io and fio;
//! - each node in turn killed with SIGKILL in the middle of a fio run with
//!   crc32c verification (no I/O error, nothing corrupt), then restarted;
//! - every node killed at once (power loss), restarted, and everything fio
//!   wrote verified again.
//!
//! Seeded: the seed is printed; `BALLAST_SEED=<seed>` replays the run.

mod common;

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::{NodeProc, BIN};
use common::*;

const MIB: u64 = 1 << 20;
const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(300);

struct Cluster {
    nodes: Vec<NodeProc>,
    endpoints: String,
    _root: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize) -> Self {
        let root = tempfile::Builder::new().prefix("ballast-procs-").tempdir().expect("tempdir");
        let mut nodes: Vec<NodeProc> = (1..=n).map(|i| NodeProc::new(root.path(), i)).collect();
        for node in &mut nodes {
            node.start();
        }
        let endpoints = nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
        Self { nodes, endpoints, _root: root }
    }

    fn root(&self) -> &Path {
        self._root.path()
    }

    /// `ballast <args> --endpoints …`, expecting success.
    fn cli(&self, args: &[&str]) -> Output {
        let out = run_capture(&mut self.cli_cmd(args), SHORT);
        assert!(out.status.success(), "{}\n{}", out.describe(), self.logs());
        out
    }

    fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = cmd(BIN, args);
        c.args(["--endpoints", &self.endpoints]);
        c
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("--- {} ---\n{}\n", n.addr, n.log_tail(30))).collect()
    }
}

/// `ballast attach` as a process.
struct AttachProc {
    child: Child,
    uri: String,
}

impl AttachProc {
    fn start(cluster: &Cluster, volume: &str) -> Self {
        let port = free_port();
        let log =
            OpenOptions::new().create(true).append(true).open(cluster.root().join("attach.log")).expect("attach log");
        let child = cluster
            .cli_cmd(&["attach", volume, "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ballast attach");
        let uri = format!("nbd://127.0.0.1:{port}/{volume}");
        let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
        wait_until("ballast attach to serve NBD", SHORT, || {
            Command::new(&nbdinfo).arg("--size").arg(&uri).output().is_ok_and(|o| o.status.success())
        });
        Self { child, uri }
    }

    /// SIGTERM, then wait: the attach process detaches on the way out.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + SHORT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "ballast attach exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ballast attach did not stop within {SHORT:?} of SIGTERM");
    }
}

impl Drop for AttachProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn size_of(uri: &str) -> u64 {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    run(&mut cmd(&nbdinfo, ["--size", uri]), SHORT).stdout.trim().parse().expect("nbdinfo --size")
}

/// fio arguments for one verified random-write pass over `size` bytes.
fn fio_args(name: &str, seed: u64, size: u64, verify_only: bool) -> Vec<String> {
    let mut a = vec![
        format!("--name={name}"),
        "--rw=randwrite".into(),
        "--bssplit=4k/50:16k/25:64k/25".into(),
        "--iodepth=16".into(),
        format!("--size={size}"),
        "--verify=crc32c".into(),
        // No verify-state file in the working directory.
        "--verify_state_save=0".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        format!("--randseed={}", seed & (i64::MAX as u64)),
    ];
    if verify_only {
        a.push("--verify_only=1".into());
    }
    a
}

#[test]
fn separate_node_processes_bootstrap_serve_nbd_and_survive_losing_any_one() {
    let fio = require_tool("fio", "fio");
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let seed = seed("cluster_processes");
    let mut cluster = Cluster::start(3);

    cluster.cli(&["cluster", "init", "--replicas", "3", "--shards", "4"]);
    let status = cluster.cli(&["cluster", "status", "--output", "json"]);
    let flat = flatten_json(&status.stdout);
    let up = flat.iter().filter(|(k, v)| k.ends_with(".up") && *v == "true").count();
    assert_eq!(up, 3, "three nodes up: {}", status.stdout);

    // Pools and volumes.
    cluster.cli(&["pool", "create", "pair", "--replicas", "2", "--shards", "2"]);
    let pools = cluster.cli(&["pool", "list"]);
    assert!(pools.stdout.contains("pair") && pools.stdout.contains("default"), "{}", pools.stdout);
    cluster.cli(&["volume", "create", "scratch", "--size", "64MiB", "--pool", "pair"]);
    cluster.cli(&["volume", "create", "vol", "--size", "256MiB"]);
    let list = cluster.cli(&["volume", "list"]);
    assert!(list.stdout.contains("vol") && list.stdout.contains("scratch"), "{}", list.stdout);
    let dup = run_capture(&mut cluster.cli_cmd(&["volume", "create", "vol", "--size", "1GiB"]), SHORT);
    assert!(!dup.status.success() && dup.stderr.lines().count() == 1, "duplicate volume: {}", dup.describe());

    let attach = AttachProc::start(&cluster, "vol");
    assert_eq!(size_of(&attach.uri), 256 * MIB);
    // Grow online: a new connection sees the new size.
    cluster.cli(&["volume", "resize", "vol", "--size", "320MiB"]);
    let info = cluster.cli(&["volume", "info", "vol", "--output", "json"]);
    assert!(info.stdout.contains(&(320 * MIB).to_string()), "{}", info.stdout);
    assert_eq!(size_of(&attach.uri), 320 * MIB);

    // qemu-io patterns across chunk boundaries (4 MiB chunks).
    let io = |script: &str| {
        let out = run(&mut cmd(&qemu_io, ["-f", "raw", "-c", script, &attach.uri]), SHORT);
        assert!(!out.all().contains("failed"), "qemu-io {script}: {}", out.describe());
    };
    io("write -P 0xa5 327151616 12288");
    io("read -P 0xa5 327151616 12288");
    io("write -z 300M 1M");
    io("read -P 0 300M 1M");

    // Lose each node in turn, with SIGKILL, while fio writes and verifies.
    for victim in 0..cluster.nodes.len() {
        let pass_seed = seed.wrapping_add(victim as u64);
        let uri = attach.uri.clone();
        let fio_path = fio.clone();
        let args = fio_args(&format!("loss-{victim}"), pass_seed, 192 * MIB, false);
        let run = std::thread::spawn(move || run_fio(&fio_path, &uri, &args, LONG));
        std::thread::sleep(Duration::from_millis(1000 + pass_seed % 2000));
        eprintln!("[ballast-test] killing node {} ({}) during fio", victim + 1, cluster.nodes[victim].addr);
        cluster.nodes[victim].kill9();
        let r =
            run.join().unwrap_or_else(|_| panic!("fio failed while node {} was down\n{}", victim + 1, cluster.logs()));
        eprintln!(
            "[ballast-test] fio with node {} killed: {} MiB written and verified",
            victim + 1,
            r.write_bytes / MIB
        );
        cluster.nodes[victim].start();
    }

    // Deleting an attached volume is refused with one line.
    let refused = run_capture(&mut cluster.cli_cmd(&["volume", "delete", "vol"]), SHORT);
    assert!(!refused.status.success(), "delete of an attached volume must fail");
    assert_eq!(refused.stderr.trim().lines().count(), 1, "{}", refused.describe());

    // Power loss: every node at once, then all back; what fio wrote last is intact.
    let last = cluster.nodes.len() as u64 - 1;
    for n in &mut cluster.nodes {
        n.kill9();
    }
    for n in &mut cluster.nodes {
        n.start();
    }
    let args = fio_args(&format!("loss-{last}"), seed.wrapping_add(last), 192 * MIB, true);
    let r = run_fio(&fio, &attach.uri, &args, LONG);
    eprintln!("[ballast-test] after restarting every node: {} MiB verified", r.read_bytes / MIB);
    io("read -P 0xa5 327151616 12288");

    attach.stop();
    cluster.cli(&["volume", "delete", "vol"]);
    let list = cluster.cli(&["volume", "list", "--output", "json"]);
    assert!(!list.stdout.contains("\"vol\""), "deleted volume still listed: {}", list.stdout);
}

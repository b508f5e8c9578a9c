//! `ballast volume import|export` and `ballast status` against three
//! `ballast node` processes, through the CLI only:
//! - a 1 GiB raw image with seeded data regions (some not block-aligned) and
//!   holes is imported into a new volume (`--size`) and exported again: the
//!   export is byte-identical and keeps the holes (few allocated blocks);
//! - a second, smaller image imported over the start of that volume (no
//!   `--size`): its zero blocks are trimmed, the rest of the volume is kept;
//!   stdin → volume → stdout gives the same bytes;
//! - bad input gets one line: a missing file or a `--size` smaller than the
//!   image exit 2; an image larger than an existing volume, or a volume that
//!   does not exist, exit 1;
//! - `ballast status` sees the I/O in its per-volume counters, calls the
//!   cluster healthy, and degraded once a node is killed; `--watch` redraws
//!   until SIGINT and exits 0.
//!
//! Seeded: the seed is printed; `BALLAST_SEED=<seed>` replays the run.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::procs::{NodeProc, BIN};
use common::*;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(600);

struct Cluster {
    nodes: Vec<NodeProc>,
    endpoints: String,
    root: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize) -> Self {
        let root = tempfile::Builder::new().prefix("ballast-transfer-").tempdir().expect("tempdir");
        let nodes: Vec<NodeProc> = (1..=n).map(|i| NodeProc::started(root.path(), i)).collect();
        let endpoints = nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
        Self { nodes, endpoints, root }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = cmd(BIN, args);
        c.args(["--endpoints", &self.endpoints]);
        c
    }

    /// `ballast <args>`, expecting success.
    fn cli(&self, args: &[&str], timeout: Duration) -> Output {
        let out = run_capture(&mut self.cmd(args), timeout);
        assert!(out.status.success(), "{}\n{}", out.describe(), self.logs());
        out
    }

    /// `ballast <args>`, expecting exit code `code` and one line on stderr.
    fn refused(&self, args: &[&str], code: i32) -> String {
        let out = run_capture(&mut self.cmd(args), SHORT);
        assert_eq!(out.status.code(), Some(code), "{}", out.describe());
        assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {}", out.describe());
        out.stderr
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--output", "json"], SHORT);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}\n{}", out.stdout))
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("--- {} ---\n{}\n", n.addr, n.log_tail(20))).collect()
    }
}

/// A sparse image of `size` bytes: seeded regions of random data (offsets
/// and lengths not always block-aligned, one at the very end), the rest
/// holes. Returns the bytes of data written.
fn make_image(path: &Path, size: u64, seed: u64, regions: usize) -> u64 {
    let file = File::create(path).expect("image");
    file.set_len(size).expect("image size");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = 0;
    for i in 0..regions {
        let len = rng.gen_range(1..=4 * MIB);
        let offset = if i == 0 { size - len } else { rng.gen_range(0..size - len) };
        // Half the regions start and end off a 4 KiB boundary.
        let (offset, len) = if i % 2 == 0 { (offset & !4095, (len + 4095) & !4095) } else { (offset, len) };
        let len = len.min(size - offset);
        let bytes = random_bytes(rng.gen(), len as usize);
        file.write_all_at(&bytes, offset).expect("write image");
        data += len;
    }
    data
}

/// Panic at the first difference between the files `a` and `b`.
fn assert_same_files(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (File::open(a).expect("open a"), File::open(b).expect("open b"));
    let (la, lb) = (fa.metadata().expect("meta").len(), fb.metadata().expect("meta").len());
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap_or(0);
            panic!("{} and {} differ at offset {}", a.display(), b.display(), at + i as u64);
        }
        at += n as u64;
    }
}

/// `ballast <args>` with stdin and stdout connected to files.
fn run_with_files(cluster: &Cluster, args: &[&str], stdin: &Path, stdout: &Path) {
    let mut c = cluster.cmd(args);
    c.stdin(File::open(stdin).expect("stdin file"))
        .stdout(File::create(stdout).expect("stdout file"))
        .stderr(Stdio::piped());
    let out = c.output().expect("run ballast");
    assert!(out.status.success(), "{args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), cluster.logs());
}

#[test]
fn a_sparse_image_survives_import_and_export_and_status_sees_the_io() {
    let seed = seed("import_export");
    let mut cluster = Cluster::start(3);
    cluster.cli(&["cluster", "init", "--replicas", "3", "--shards", "4"], SHORT);

    // 1 GiB with holes: new volume, import, export, compare.
    let image = cluster.path("image.raw");
    let data = make_image(&image, GIB, seed, 48);
    eprintln!("[ballast-test] image: 1 GiB, {} MiB of data regions", data / MIB);
    let started = Instant::now();
    let out = cluster.cli(&["volume", "import", "big", image.to_str().expect("path"), "--size", "1GiB"], LONG);
    eprintln!("[ballast-test] import took {:.1?}: {}", started.elapsed(), out.stderr.trim());
    assert!(out.stderr.contains("imported 1 GiB (1073741824 bytes) into volume \"big\""), "{}", out.stderr);
    assert!(out.stderr.contains("MiB/s") && out.stderr.contains("of zero blocks skipped"), "{}", out.stderr);
    let exported = cluster.path("exported.raw");
    let out = cluster.cli(&["volume", "export", "big", exported.to_str().expect("path")], LONG);
    eprintln!("[ballast-test] export: {}", out.stderr.trim());
    assert!(out.stderr.contains("of holes skipped"), "{}", out.stderr);
    assert_same_files(&image, &exported);
    let allocated = std::fs::metadata(&exported).expect("meta").blocks() * 512;
    eprintln!("[ballast-test] exported file: {} MiB allocated of 1024", allocated / MIB);
    assert!(allocated <= data + 64 * MIB && allocated < GIB / 4, "holes kept: {allocated} bytes allocated");
    // Both transfers detached: a writer can attach again.
    let info = cluster.cli(&["volume", "info", "big", "--output", "json"], SHORT);
    assert!(info.stdout.contains("\"epoch\": 1"), "one read-write attach so far: {}", info.stdout);

    // A smaller image over the start of the volume: zero blocks are trimmed
    // (the volume had data there), the rest of the volume keeps its data.
    let small = cluster.path("small.raw");
    make_image(&small, 16 * MIB, seed ^ 1, 4);
    cluster.cli(&["volume", "import", "big", small.to_str().expect("path")], LONG);
    let again = cluster.path("again.raw");
    cluster.cli(&["volume", "export", "big", again.to_str().expect("path")], LONG);
    let expected = cluster.path("expected.raw");
    std::fs::copy(&image, &expected).expect("copy image");
    let patch = std::fs::read(&small).expect("small image");
    File::options().write(true).open(&expected).expect("expected").write_all_at(&patch, 0).expect("patch");
    assert_same_files(&expected, &again);

    // Through stdin and stdout.
    let via_pipe = cluster.path("pipe.raw");
    run_with_files(&cluster, &["volume", "import", "piped", "-", "--size", "16MiB"], &small, Path::new("/dev/null"));
    run_with_files(&cluster, &["volume", "export", "piped", "-"], Path::new("/dev/null"), &via_pipe);
    assert_same_files(&small, &via_pipe);

    // Bad input: one line each.
    let missing = cluster.path("no-such-image");
    let e = cluster.refused(&["volume", "import", "x", missing.to_str().expect("path"), "--size", "1GiB"], 2);
    assert!(e.contains("cannot read") && e.contains("no-such-image"), "{e}");
    let e = cluster.refused(&["volume", "import", "x", image.to_str().expect("path"), "--size", "512MiB"], 2);
    assert!(e.contains("smaller than the image"), "{e}");
    let e = cluster.refused(&["volume", "import", "piped", image.to_str().expect("path")], 1);
    assert!(e.contains("larger than volume"), "{e}");
    let e = cluster.refused(&["volume", "export", "nothing-here", exported.to_str().expect("path")], 1);
    assert!(e.contains("no volume \"nothing-here\""), "{e}");
    let e = cluster.refused(&["volume", "import", "x", image.to_str().expect("path"), "--pool", "default"], 2);
    assert!(e.contains("--size"), "--pool needs --size: {e}");

    // Status: the counters saw the transfers; healthy; then one node down.
    let s = cluster.status_json();
    assert_eq!(s["health"], "healthy", "{s:#}");
    assert_eq!(s["nodes_up"], 3, "{s:#}");
    let big = s["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "big").expect("big").clone();
    assert!(big["writes"].as_u64().unwrap_or(0) > 0 && big["reads"].as_u64().unwrap_or(0) > 0, "{big:#}");
    assert!(s["nodes"][0]["disks"][0]["capacity"].as_u64().unwrap_or(0) > 0, "{s:#}");

    // --watch redraws until SIGINT, then exits 0.
    let mut watch = cluster
        .cmd(&["status", "--watch", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn status --watch");
    std::thread::sleep(Duration::from_millis(2500));
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let mut text = String::new();
    watch.stdout.take().expect("stdout").read_to_string(&mut text).expect("watch output");
    let status = watch.wait().expect("wait watch");
    assert!(status.success(), "status --watch after SIGINT: {status}\n{text}");
    assert!(text.matches("HEALTHY").count() >= 2, "two screens at least:\n{text}");

    cluster.nodes[2].kill9();
    let s = cluster.status_json();
    assert_eq!(s["health"], "degraded", "{s:#}");
    assert_eq!(s["nodes_up"], 2, "{s:#}");
    let down = format!("node-3 ({}) is down", cluster.nodes[2].addr);
    assert!(s["problems"].as_array().expect("problems").iter().any(|p| p == &serde_json::json!(down)), "{s:#}");
    let table = cluster.cli(&["status"], SHORT).stdout;
    assert!(table.contains("DEGRADED") && table.contains("DOWN") && table.contains("big"), "{table}");
}

//! Shared harness for the end-to-end tests that drive Ballast's NBD server with
//! real clients (libnbd tools, qemu, fio, nbdfuse + the loop driver).
//!
//! [`TestServer`] serves a fresh RocksDB-backed [`LocalVolumes`] store from a
//! temporary directory on a background multi-thread tokio runtime, over TCP
//! (127.0.0.1, ephemeral port) and a unix socket, and stops it on drop.
//! [`run`] and friends run external commands with a timeout and, on failure,
//! panic with the command line, exit status, stdout and stderr.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ballast::local::LocalVolumes;

mod clients;
/// In-process clusters (node configs, NBD in front of a volume).
pub mod cluster;
/// `ballast node` processes.
pub mod procs;
#[allow(unused_imports)]
pub use clients::*;

/// Size of the default read-write export `disk`.
pub const DISK_SIZE: u64 = 1 << 30;
/// Size of the read-only export `ro`.
pub const RO_SIZE: u64 = 64 << 20;

/// An in-process Ballast NBD server over a temporary store.
pub struct TestServer {
    port: u16,
    socket: PathBuf,
    disk_size: u64,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
    // Dropped last (after the server thread has stopped).
    dir: tempfile::TempDir,
}

impl TestServer {
    /// A server with `disk` (1 GiB, the default export) and `ro` (64 MiB, read-only).
    pub fn start() -> Self {
        Self::start_with(DISK_SIZE)
    }

    /// Like [`TestServer::start`] with `disk` of `disk_size` bytes.
    pub fn start_with(disk_size: u64) -> Self {
        init_logging();
        let dir = tempfile::Builder::new().prefix("ballast-nbd-e2e-").tempdir().expect("create temp dir");
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).expect("create store dir");
        std::fs::create_dir_all(dir.path().join("work")).expect("create work dir");
        let socket = dir.path().join("nbd.sock");

        let vols = LocalVolumes::open(&store).expect("open LocalVolumes");
        vols.create("disk", disk_size, false).expect("create volume disk");
        vols.create("ro", RO_SIZE, true).expect("create volume ro");
        vols.set_default_export("disk");
        let server = ballast_nbd::NbdServer::new(Arc::new(vols), ballast_nbd::ServerConfig::default());

        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<u16>();
        let sock = socket.clone();
        let thread = std::thread::Builder::new()
            .name("ballast-nbd-test-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("build tokio runtime");
                rt.block_on(async move {
                    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
                    let port = tcp.local_addr().expect("local addr").port();
                    let unix = tokio::net::UnixListener::bind(&sock).expect("bind unix socket");
                    ready_tx.send(port).expect("report port");

                    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    let serve = async {
                        let s2 = server.clone();
                        let _ = tokio::join!(
                            server.serve_tcp(tcp, stop(shutdown_rx.clone())),
                            s2.serve_unix(unix, stop(shutdown_rx.clone())),
                        );
                    };
                    // If the accept loops wait for open connections to drain,
                    // do not let a leaked client hang the test: give them 5 s.
                    let grace = async {
                        stop(shutdown_rx.clone()).await;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = grace => eprintln!("[ballast-test] server did not stop within 5 s of shutdown; dropping it"),
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawn server thread");
        let port = ready_rx.recv_timeout(Duration::from_secs(60)).expect("server did not start listening");
        eprintln!("[ballast-test] NBD server on 127.0.0.1:{port} and {}", socket.display());
        TestServer { port, socket, disk_size, shutdown: Some(shutdown_tx), thread: Some(thread), dir }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `nbd://127.0.0.1:PORT/disk`
    pub fn uri(&self) -> String {
        self.uri_for("disk")
    }

    /// `nbd://127.0.0.1:PORT/NAME`
    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, export)
    }

    /// `nbd+unix:///disk?socket=PATH`
    pub fn unix_uri(&self) -> String {
        self.unix_uri_for("disk")
    }

    pub fn unix_uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.socket.display())
    }

    /// A scratch directory inside this server's temp dir, for client files.
    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() && !std::thread::panicking() {
                panic!("NBD server thread panicked");
            }
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(EnvFilter::from_default_env()).with_test_writer().try_init();
    }
}

// ---- external tools ------------------------------------------------------------

/// The Debian interpreter that has `python3-libnbd` (not a pyenv shim).
pub const PYTHON: &str = "/usr/bin/python3";

/// A TCP port on 127.0.0.1 that was free a moment ago (bind, note, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Panic (never skip) when `tool` is not installed, naming the Debian package.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let found = if tool.contains('/') {
        Some(PathBuf::from(tool)).filter(|p| p.is_file())
    } else {
        let mut dirs: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        // Root's tools (losetup, mkfs.ext4, e2fsck) live in sbin, which a CI
        // PATH may leave out.
        for d in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
            dirs.push(PathBuf::from(d));
        }
        dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
    };
    match found {
        Some(p) => p,
        None => panic!("required tool `{tool}` is not installed: `apt-get install {package}`"),
    }
}

/// Panic unless `/usr/bin/python3` can `import nbd`.
pub fn require_python_nbd() {
    require_tool(PYTHON, "python3");
    let out = Command::new(PYTHON).args(["-c", "import nbd"]).output().expect("run /usr/bin/python3");
    assert!(
        out.status.success(),
        "/usr/bin/python3 cannot `import nbd`: `apt-get install python3-libnbd`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The finished output of a command.
pub struct Output {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {} (after {:.1?})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.cmdline, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
    /// stdout and stderr together, for searching.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$;&|*?".contains(c)) {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Run `cmd` to completion (killing it after `timeout`), capturing its output.
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> Output {
    let line = cmdline(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to spawn `{line}`: {e}"));
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out_t = reader(Box::new(child.stdout.take().expect("stdout")));
    let err_t = reader(Box::new(child.stderr.take().expect("stderr")));
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for child") {
            break st;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for killed child");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap_or_default();
    let mut stderr = err_t.join().unwrap_or_default();
    if timed_out {
        stderr.push_str(&format!("\n[ballast-test] KILLED after timeout of {timeout:?}"));
    }
    Output { cmdline: line, status, stdout, stderr, elapsed: start.elapsed() }
}

/// Run `cmd` and panic (with everything it printed) unless it exits 0.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run_capture(cmd, timeout);
    assert!(out.status.success(), "command failed\n{}", out.describe());
    out
}

/// Run `cmd` and panic unless it exits with a non-zero status (not a timeout kill).
pub fn run_expect_failure(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run_capture(cmd, timeout);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "command was expected to fail with an exit code\n{}",
        out.describe()
    );
    out
}

/// `Command::new(program)` with `args`.
pub fn cmd<I, S>(program: impl AsRef<std::ffi::OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// This crate's `tests/clients` directory.
pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("clients")
}

/// Parse JSON text into flat `path = value` pairs (`exports.0.export-size` →
/// `67108864`; strings unquoted, `true`/`false`/`null` as written) using the
/// Debian python, so the tests need no JSON crate.
pub fn flatten_json(json: &str) -> BTreeMap<String, String> {
    require_tool(PYTHON, "python3");
    let script = clients_dir().join("json_flatten.py");
    let mut child = Command::new(PYTHON)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn json_flatten.py");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(json.as_bytes()).expect("write json");
    }
    let out = child.wait_with_output().expect("json_flatten.py");
    assert!(
        out.status.success(),
        "could not parse JSON: {}\n--- json ---\n{json}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .filter_map(|l| l.split_once('\t').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

// ---- deterministic data -----------------------------------------------------------

/// The seed for random test data: `BALLAST_SEED` if set, else fresh; printed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("BALLAST_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("BALLAST_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("[ballast-test] {test}: seed {seed} (rerun with BALLAST_SEED={seed})");
    seed
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Panic with the first differing offset unless `a == b`.
pub fn assert_same_bytes(what: &str, a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if a != b {
        let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
        let bad = a.iter().zip(b).filter(|(x, y)| x != y).count();
        panic!(
            "{what}: contents differ: first difference at offset {first} ({:#04x} vs {:#04x}), {bad} differing bytes",
            a[first], b[first]
        );
    }
}

/// Wait until `cond` holds, polling, or panic with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

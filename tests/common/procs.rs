//! `ballast node` as a separate process: its own data dir, a free port on
//! 127.0.0.1, its log in a file; killed (`kill -9`) when dropped.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::free_port;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ballast");

/// One `ballast node` process with its own data dir and port.
pub struct NodeProc {
    pub dir: PathBuf,
    pub addr: String,
    pub log: PathBuf,
    /// More `ballast node` arguments, appended at every start.
    pub extra: Vec<String>,
    child: Option<Child>,
}

impl NodeProc {
    /// Node `i` under `root` (`root/node{i}`, `root/node{i}.log`), not started.
    pub fn new(root: &Path, i: usize) -> Self {
        let dir = root.join(format!("node{i}"));
        std::fs::create_dir_all(&dir).expect("data dir");
        Self {
            addr: format!("127.0.0.1:{}", free_port()),
            log: root.join(format!("node{i}.log")),
            dir,
            extra: Vec::new(),
            child: None,
        }
    }

    /// [`new`](Self::new), then [`start`](Self::start).
    pub fn started(root: &Path, i: usize) -> Self {
        let mut n = Self::new(root, i);
        n.start();
        n
    }

    /// Start the process (again, after [`kill9`](Self::kill9)) on the same
    /// data dir and port; its output is appended to the log file.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.addr);
        let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(BIN)
            .args(["node", "--listen", &self.addr, "--advertise", &self.addr, "--data-dir"])
            .arg(&self.dir)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ballast node");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the process to exit (a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Whether the process runs (was started and not stopped or killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

//! `ballast demo`: a whole cluster on this machine in one command. Three
//! `ballast node` child processes (this same executable) on consecutive
//! ports, `cluster init` the first time, the volume created if missing, then
//! served over NBD exactly as `ballast attach` serves it.
//!
//! The children live in their own process group, so a terminal's Ctrl-C
//! reaches only the demo, which detaches the volume *before* stopping the
//! nodes; they also get SIGTERM from the kernel if the demo dies
//! (`--exit-with-parent`). On a second run the nodes reopen their data dirs
//! and come back as the same cluster.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ballast_client::{AdminClient, ClientConfig, ClusterExports};
use ballast_types::{CreateVolume, FailureDomain, InitCluster};
use tokio::process::{Child, Command};

use super::admin::{default_pool, DEFAULT_ENDPOINTS, DEFAULT_POOL};
use super::node_config::ENV_ALL;
use super::serve::{print_volume_usage, serve_nbd, NbdListen};
use super::signals::Signals;
use super::{parse_name, parse_volume_size};

const NODES: u16 = 3;
const REPLICAS: u32 = 3;
const SHARDS: u32 = 8;
/// From spawning the nodes to their gRPC ports accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// From the nodes listening to a cluster that answers, with the volume attached.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long stopped nodes get to exit before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a node of an earlier demo, still exiting, may hold its ports and disks.
const PREVIOUS_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(250);

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the nodes keep their data (`node1`..`node3`) and logs (`node1.log`..).
    #[arg(long, default_value = "./ballast-data")]
    pub data_dir: PathBuf,
    /// Name of the volume (and NBD export).
    #[arg(long, default_value = "demo", value_parser = parse_name)]
    pub volume: String,
    /// Size of the volume when it is created, e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_volume_size)]
    pub size: u64,
    #[command(flatten)]
    pub nbd: NbdListen,
    /// gRPC port of the first node; the others take the next ones.
    #[arg(long, default_value_t = 7101, value_parser = clap::value_parser!(u16).range(1..=65533))]
    pub base_port: u16,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let mut signals = Signals::install()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    // Fail before starting anything when the NBD port is taken.
    TcpListener::bind(args.nbd.listen)
        .with_context(|| format!("cannot listen on {} (is another ballast running?)", args.nbd.listen))?;

    let mut nodes = Nodes { children: Vec::new(), data_dir: args.data_dir.clone() };
    let result = run_with_nodes(&args, &mut nodes, &mut signals).await;
    let stopped = nodes.stop().await;
    result.and(stopped)
}

async fn run_with_nodes(args: &DemoArgs, nodes: &mut Nodes, signals: &mut Signals) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the ballast executable")?;
    let addrs: Vec<String> = (0..NODES).map(|i| format!("127.0.0.1:{}", args.base_port + i)).collect();

    let started = async {
        for i in 1..=NODES {
            nodes.spawn(&exe, i, args.base_port + i - 1).await?;
        }
        nodes.wait_listening(START_TIMEOUT).await?;
        ready(args, &addrs, nodes).await
    };
    let (admin_size, exports) = tokio::select! {
        r = started => r?,
        () = signals.recv() => return Ok(()),
    };

    let data_dir = args.data_dir.display().to_string();
    let watch = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = signals.recv() => return,
                _ = tick.tick() => nodes.report_exits(),
            }
        }
    };
    let served = serve_nbd(exports.clone(), &args.nbd, watch, |bound| {
        print_volume_usage(&args.volume, admin_size, false, bound);
        println!("  nodes:      {} (data and logs in {data_dir}/node1..{NODES})", addrs.join(" "));
        if addrs.iter().map(String::as_str).eq(DEFAULT_ENDPOINTS) {
            println!("  admin:      ballast cluster status | ballast volume list");
        } else {
            println!("  admin:      ballast cluster status --endpoints {}", addrs.join(","));
        }
        println!("Press Ctrl-C to stop; data stays in {data_dir} for the next run.");
    })
    .await;
    let detached = exports.detach_all().await.context("detaching");
    served.and(detached)
}

/// Until the cluster answers: init it if it never was, create the volume if
/// missing, attach it. Each step is retried until [`READY_TIMEOUT`]: after a
/// restart the meta group first elects a leader, after init the pool's
/// shards do. Returns the volume's size and its exports.
async fn ready(args: &DemoArgs, addrs: &[String], nodes: &mut Nodes) -> Result<(u64, Arc<ClusterExports>)> {
    // Questions get a short deadline (an uninitialised node answers
    // UNAVAILABLE, which the client retries until it): this loop does the
    // waiting. Changes keep the default one, so init is not cut short.
    let quick = ClientConfig { request_deadline: Duration::from_secs(3), ..ClientConfig::default() };
    let init = InitCluster {
        endpoints: addrs.to_vec(),
        default_pool: Some(default_pool(REPLICAS, SHARDS, FailureDomain::Node)),
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut step = Step::Init;
    let mut size = args.size;
    let ask = AdminClient::new(addrs.to_vec(), quick).context("connecting to the demo nodes")?;
    let admin = AdminClient::new(addrs.to_vec(), ClientConfig::default()).context("connecting to the demo nodes")?;
    loop {
        nodes.check_running()?;
        let outcome: Result<Option<Arc<ClusterExports>>> = match step {
            Step::Init => match ask.status().await {
                Ok(status) if status.cluster.0 != 0 => {
                    tracing::info!(cluster = %status.cluster, "cluster already initialised");
                    step = Step::Volume;
                    Ok(None)
                }
                _ => admin.init_cluster(&init).await.map(|reply| {
                    tracing::info!(cluster = %reply.cluster, "cluster initialised");
                    step = Step::Volume;
                    None
                }),
            },
            Step::Volume => match ask.list_volumes().await {
                Ok(vols) => match vols.into_iter().find(|v| v.name == args.volume) {
                    Some(v) => {
                        if v.size != args.size {
                            tracing::info!(volume = %v.name, size = v.size, "volume exists; keeping its size");
                        }
                        size = v.size;
                        step = Step::Attach;
                        Ok(None)
                    }
                    None => admin
                        .create_volume(&CreateVolume {
                            name: args.volume.clone(),
                            size: args.size,
                            pool: DEFAULT_POOL.to_string(),
                        })
                        .await
                        .map(|v| {
                            tracing::info!(volume = %v.name, size = v.size, "volume created");
                            step = Step::Attach;
                            None
                        }),
                },
                Err(e) => Err(e),
            },
            // The demo is the volume's only user, and the writer of an earlier
            // run that was killed never detached: take over.
            Step::Attach => {
                ClusterExports::attach_one(admin.clone(), &args.volume, false, true, ClientConfig::default())
                    .await
                    .map(Some)
            }
        }
        .map_err(anyhow::Error::from);
        match outcome {
            Ok(Some(exports)) => return Ok((size, exports)),
            Ok(None) => continue,
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!(
                    "the demo cluster was not ready within {} s ({}; node logs in {})",
                    READY_TIMEOUT.as_secs(),
                    step.doing(),
                    nodes.data_dir.display()
                )))
            }
            Err(e) => {
                tracing::debug!(step = step.doing(), error = %e, "cluster not ready yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Init,
    Volume,
    Attach,
}

impl Step {
    fn doing(self) -> &'static str {
        match self {
            Step::Init => "initialising the cluster",
            Step::Volume => "creating the volume",
            Step::Attach => "attaching the volume",
        }
    }
}

struct NodeProc {
    index: u16,
    port: u16,
    child: Child,
    log: PathBuf,
    pid_file: PathBuf,
    exited: Option<ExitStatus>,
}

struct Nodes {
    children: Vec<NodeProc>,
    data_dir: PathBuf,
}

impl Nodes {
    /// Start `ballast node` number `index` on `port`. Must run on the main
    /// thread (see `main`): the child's parent-death signal follows the
    /// thread that spawned it.
    async fn spawn(&mut self, exe: &Path, index: u16, port: u16) -> Result<()> {
        let dir = self.data_dir.join(format!("node{index}"));
        let log = self.data_dir.join(format!("node{index}.log"));
        let pid_file = self.data_dir.join(format!("node{index}.pid"));
        wait_for_previous(&pid_file, port).await?;

        let addr = format!("127.0.0.1:{port}");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(exe);
        cmd.arg("node")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", &addr, "--advertise", &addr, "--exit-with-parent"])
            .args(["--worker-threads", &node_worker_threads().to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true);
        // The demo's own settings are its flags; a node's environment must not
        // add to them (a BALLAST_METRICS port cannot serve three nodes).
        for var in ENV_ALL.iter().chain(&["BALLAST_CONFIG"]) {
            cmd.env_remove(var);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {}", exe.display()))?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(&pid_file, format!("{pid}\n"));
        }
        tracing::info!(node = index, %addr, log = %log.display(), "node started");
        self.children.push(NodeProc { index, port, child, log, pid_file, exited: None });
        Ok(())
    }

    /// Until every node accepts TCP connections on its port.
    async fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let all = self.children.iter().all(|n| {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, n.port));
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the nodes did not listen within {} s; see {}", timeout.as_secs(), self.logs());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// An error naming the first node that has exited.
    fn check_running(&mut self) -> Result<()> {
        for n in &mut self.children {
            if let Some(status) = n.child.try_wait()? {
                n.exited = Some(status);
                return Err(anyhow!(
                    "node {} exited ({status}): {} (log {})",
                    n.index,
                    last_line(&n.log).unwrap_or_else(|| "no output".into()),
                    n.log.display()
                ));
            }
        }
        Ok(())
    }

    /// While serving: say once when a node exits (the others keep serving).
    fn report_exits(&mut self) {
        for n in &mut self.children {
            if n.exited.is_none() {
                if let Ok(Some(status)) = n.child.try_wait() {
                    n.exited = Some(status);
                    tracing::warn!(node = n.index, %status, log = %n.log.display(), "a demo node exited");
                }
            }
        }
    }

    fn logs(&self) -> String {
        self.children.iter().map(|n| n.log.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// SIGTERM every node, wait for all of them up to [`STOP_TIMEOUT`], then
    /// SIGKILL the rest.
    async fn stop(&mut self) -> Result<()> {
        for n in &self.children {
            if let (None, Some(pid)) = (n.exited, n.child.id()) {
                // SAFETY: kill(2) on our own child's pid; it has not been reaped
                // (`exited` is None), so the pid still names it.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        let mut killed = Vec::new();
        for n in &mut self.children {
            if n.exited.is_none() {
                match tokio::time::timeout_at(deadline, n.child.wait()).await {
                    Ok(status) => n.exited = Some(status?),
                    Err(_) => {
                        tracing::warn!(node = n.index, "node did not stop in time; killing it");
                        n.child.kill().await?;
                        killed.push(n.index);
                    }
                }
            }
            let _ = std::fs::remove_file(&n.pid_file);
        }
        if !killed.is_empty() {
            bail!("nodes {killed:?} did not stop within {} s and were killed", STOP_TIMEOUT.as_secs());
        }
        Ok(())
    }
}

/// A node of an earlier demo may still be exiting (its parent was killed and
/// it got SIGTERM a moment ago): wait for it to release its disk and port.
async fn wait_for_previous(pid_file: &Path, port: u16) -> Result<()> {
    let deadline = Instant::now() + PREVIOUS_TIMEOUT;
    if let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
        while is_demo_node(pid) {
            if Instant::now() >= deadline {
                bail!("a node of an earlier demo (pid {pid}) is still running; stop it first");
            }
            tokio::time::sleep(POLL).await;
        }
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while TcpListener::bind(addr).is_err() {
        if Instant::now() >= deadline {
            bail!("port {port} is in use (another ballast demo? try --base-port)");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Whether `pid` is a live `ballast node … --exit-with-parent` (a pid file can
/// outlive its process, and pids are reused).
fn is_demo_node(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        args.contains(&b"node".as_slice()) && args.contains(&b"--exit-with-parent".as_slice())
    })
}

/// The last non-empty line of a log, to say why a node stopped.
fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().chars().take(300).collect())
}

/// Runtime threads for each demo node: the three nodes and the demo's own
/// NBD server share this machine's cores, and on a small machine threads
/// beyond that only add context switches (measured on 2 cores: 4k writes
/// at QD32 ran about 1.4× faster with one thread per process than with two).
fn node_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1))
}

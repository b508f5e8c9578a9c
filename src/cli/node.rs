//! `ballast node`: one storage node, until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use ballast_node::{Node, NodeConfig};

use super::metrics;
use super::node_config::{env_layer, load_file, merge, Layer, NodeSettings};
use super::signals::Signals;
use super::{parse_addr, parse_name, parse_socket_addr, UsageError};

/// Settings come from flags, then `BALLAST_*` variables, then `--config`, then defaults.
#[derive(clap::Args)]
#[command(after_help = "Every option may also come from the environment (BALLAST_DATA_DIR as a comma-separated \
    list, BALLAST_LISTEN, BALLAST_ADVERTISE, BALLAST_ZONE, BALLAST_METRICS, BALLAST_JOIN, BALLAST_DOWN_AFTER, \
    BALLAST_REBUILD_RATE, BALLAST_TLS_CA, BALLAST_TLS_CERT, BALLAST_TLS_KEY, BALLAST_JOIN_TOKEN, BALLAST_SCRUB_RATE, \
    BALLAST_SCRUB_INTERVAL) or from the TOML file of --config (keys data_dirs, listen, advertise, zone, metrics, join, \
    down_after, rebuild_rate, tls_ca, tls_cert, tls_key, join_token, scrub_rate, scrub_interval). A flag beats the environment, which beats the file.")]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    /// Without an action: run the node.
    #[command(subcommand)]
    pub action: Option<Box<NodeAction>>,
    /// A disk for this node's data, one RocksDB each; repeat for several disks.
    #[arg(long = "data-dir", value_name = "DIR")]
    pub data_dirs: Vec<PathBuf>,
    /// Address for peers and clients (gRPC) [default: 0.0.0.0:7100].
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub listen: Option<SocketAddr>,
    /// Address others reach this node at, host:port [default: derived from --listen].
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub advertise: Option<String>,
    /// Failure-domain label (rack, room, ...) for pools that spread over zones.
    #[arg(long, value_name = "LABEL", value_parser = parse_name)]
    pub zone: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub metrics: Option<SocketAddr>,
    /// Join the cluster through these nodes (comma-separated); without it the
    /// node waits for `ballast cluster init` (or rejoins from its data dirs).
    #[arg(long, value_name = "ADDR,...", value_delimiter = ',', value_parser = parse_addr)]
    pub join: Vec<String>,
    /// While this node leads the meta group: mark a node down after it has
    /// not answered for this long (e.g. 30s, 5m) and rebuild its replicas
    /// on other nodes [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_down_after)]
    pub down_after: Option<String>,
    /// Bytes per second for all rebuild streams this node sends (e.g. 200MiB;
    /// `unlimited`) [default: unlimited].
    #[arg(long, value_name = "RATE", value_parser = parse_rebuild_rate)]
    pub rebuild_rate: Option<String>,
    /// The cluster CA certificate (PEM): with --tls-cert and --tls-key, every
    /// connection to and from this node is mutual TLS (`ballast cluster certs`).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the CA; it must name the
    /// address others reach this node at.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Nodes joining through this one (and `cluster init` naming it) must
    /// present this token; this node presents it when it joins. Prefer
    /// BALLAST_JOIN_TOKEN or the config file: a flag shows in `ps`.
    #[arg(long, value_name = "TOKEN")]
    pub join_token: Option<String>,
    /// Bytes per second scrub reads this node's blocks at to verify their
    /// checksums (e.g. 8MiB; `unlimited`) [default: 8MiB].
    #[arg(long, value_name = "RATE", value_parser = parse_rebuild_rate)]
    pub scrub_rate: Option<String>,
    /// Time between scrub passes (e.g. 12h; `ballast scrub` runs one now) [default: 24h].
    #[arg(long, value_name = "DURATION", value_parser = parse_down_after)]
    pub scrub_interval: Option<String>,
    /// TOML file with the same settings.
    #[arg(long, value_name = "FILE", env = "BALLAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stop (SIGTERM) when the parent process dies; used by `ballast demo`.
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
}

impl NodeArgs {
    fn flag_layer(&self) -> Layer {
        Layer {
            data_dirs: Some(self.data_dirs.clone()),
            listen: self.listen.map(|a| a.to_string()),
            advertise: self.advertise.clone(),
            zone: self.zone.clone(),
            metrics: self.metrics.map(|a| a.to_string()),
            join: Some(self.join.clone()),
            down_after: self.down_after.clone(),
            rebuild_rate: self.rebuild_rate.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            join_token: self.join_token.clone(),
            scrub_rate: self.scrub_rate.clone(),
            scrub_interval: self.scrub_interval.clone(),
        }
    }
}

fn parse_rebuild_rate(s: &str) -> Result<String, String> {
    super::node_config::parse_rate(s).map(|_| s.to_string())
}

fn parse_down_after(s: &str) -> Result<String, String> {
    super::node_config::parse_duration(s).map(|_| s.to_string())
}

/// The settings this invocation means: flags, environment and file merged.
pub fn settings(args: &NodeArgs) -> Result<NodeSettings, UsageError> {
    let file = match &args.config {
        Some(path) => load_file(path).map_err(UsageError)?,
        None => Layer::default(),
    };
    let env = env_layer(|k| std::env::var(k).ok());
    merge(&args.flag_layer(), &env, &file).map_err(UsageError)
}

/// What `ballast node ACTION` does to a node of a running cluster (instead
/// of running one).
#[derive(clap::Subcommand)]
pub enum NodeAction {
    /// Move every replica off a node (e.g. before retiring it); it then takes
    /// no new ones. I/O continues throughout; waits until it holds none.
    Drain(super::admin::DrainArgs),
    /// Forget a node that holds no replicas (drained, or down and rebuilt
    /// elsewhere). Members of the meta group cannot be removed yet.
    Remove(super::admin::RemoveArgs),
}

/// Carry out `ballast node ACTION`.
pub async fn act(action: NodeAction) -> Result<()> {
    match action {
        NodeAction::Drain(args) => super::admin::drain(args).await,
        NodeAction::Remove(args) => super::admin::remove(args).await,
    }
}

pub async fn run(args: NodeArgs) -> Result<()> {
    let settings = settings(&args)?;
    // Read and check the TLS files before anything else: a wrong file is a usage error.
    let tls = settings.tls.as_ref().map(|f| f.load()).transpose().map_err(|e| UsageError(e.to_string()))?;
    if args.exit_with_parent {
        exit_with_parent()?;
    }
    let mut signals = Signals::install()?;
    // Bind metrics first: a taken port fails before the node opens its disks.
    let metrics_listener = match settings.metrics {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?)
        }
        None => None,
    };

    let mut config = NodeConfig::daemon(settings.listen, settings.advertise.clone(), settings.data_dirs.clone());
    config.zone = settings.zone.clone();
    config.join = settings.join.clone();
    config.down_after = settings.down_after;
    config.rebuild_rate = settings.rebuild_rate;
    config.tls = tls;
    config.join_token = settings.join_token.clone();
    config.scrub_rate = settings.scrub_rate;
    config.scrub_interval = settings.scrub_interval;
    let handle = tokio::select! {
        started = Node::start(config) => Arc::new(started.context("starting the node")?),
        () = signals.recv() => return Ok(()),
    };
    tracing::info!(
        listen = %handle.local_addr(),
        advertise = handle.advertise(),
        data_dirs = ?settings.data_dirs,
        zone = settings.zone.as_deref().unwrap_or("-"),
        join = ?settings.join,
        tls = settings.tls.is_some(),
        join_token = settings.join_token.is_some(),
        "node running"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = metrics_listener.map(|listener| {
        tracing::info!(addr = %settings.metrics.map(|a| a.to_string()).unwrap_or_default(), "serving /metrics");
        let node = handle.clone();
        let render: metrics::Render = Arc::new(move || node.metrics_text());
        tokio::spawn(metrics::serve(listener, render, async move {
            let _ = stop_rx.await;
        }))
    });

    signals.recv().await;
    let _ = stop_tx.send(());
    if let Some(task) = metrics_task {
        task.await.context("metrics responder")?;
    }
    let handle =
        Arc::try_unwrap(handle).map_err(|_| anyhow!("internal: the node handle is still shared at shutdown"))?;
    handle.shutdown().await.context("stopping the node")?;
    tracing::info!("node stopped");
    Ok(())
}

/// Ask the kernel for SIGTERM when our parent dies, so a demo's nodes never
/// outlive it (even after `kill -9`). The signal follows the parent *thread*
/// that forked us; `ballast demo` forks from its main thread.
fn exit_with_parent() -> Result<()> {
    // SAFETY: PR_SET_PDEATHSIG only sets a per-process attribute; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        bail!("prctl(PR_SET_PDEATHSIG): {}", std::io::Error::last_os_error());
    }
    // The parent may have died before the prctl: we were then re-parented.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        bail!("the parent process exited before this node started");
    }
    Ok(())
}

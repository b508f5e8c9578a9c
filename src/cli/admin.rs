//! `ballast cluster|pool|volume …`: one `AdminClient` call each, printed by
//! [`super::output`]. A refusal from the cluster is returned as it came (its
//! display is `<code>: <message>`), so `main` prints `ballast: <code>: <message>`
//! and exits 1.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use ballast_client::{AdminClient, ClientConfig};
use ballast_types::{
    CreateVolume, FailureDomain, InitCluster, PoolId, PoolSpec, ResizeVolume, MAX_META_MEMBERS, MAX_REPLICAS,
    MAX_SHARDS,
};
use clap::Subcommand;
use serde::Serialize;

use super::node_config::incomplete_tls;
use super::output::{self, Output, PoolSpecView};
use super::{parse_addr, parse_name, parse_volume_size, UsageError};

/// Where admin commands go when neither `--endpoints` nor `BALLAST_ENDPOINTS` says
/// (the nodes `ballast demo` starts).
pub const DEFAULT_ENDPOINTS: [&str; 3] = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"];
/// The pool `cluster init` creates.
pub const DEFAULT_POOL: &str = "default";

#[derive(clap::Args, Clone)]
pub struct ConnArgs {
    /// Nodes to ask, comma-separated: any members of the cluster.
    #[arg(
        long,
        value_name = "ADDR,...",
        env = "BALLAST_ENDPOINTS",
        value_delimiter = ',',
        value_parser = parse_addr,
        default_values = DEFAULT_ENDPOINTS
    )]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl ConnArgs {
    /// The Admin client of these endpoints, over TLS when `--tls-*` say so.
    /// Data channels built on it (attach, gateway, import/export) use the
    /// same TLS settings.
    pub fn admin(&self, config: ClientConfig) -> Result<AdminClient> {
        let tls = self.tls.load()?;
        AdminClient::with_tls(self.endpoints.clone(), config, tls)
            .with_context(|| format!("cannot use endpoints {}", self.endpoints.join(",")))
    }
}

/// Mutual TLS towards the cluster, shared by every command that talks to
/// nodes: all three files, or none (plain HTTP/2).
#[derive(clap::Args, Clone, Default)]
pub struct TlsArgs {
    /// The cluster CA certificate (PEM). With --tls-cert and --tls-key, talk
    /// to the nodes over mutual TLS (`ballast cluster certs` makes them).
    #[arg(long, value_name = "FILE", env = "BALLAST_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), signed by the cluster CA.
    #[arg(long, value_name = "FILE", env = "BALLAST_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", env = "BALLAST_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// Read and check the files; an incomplete set or a bad file is a usage error.
    pub fn load(&self) -> Result<Option<ballast_client::TlsConfig>, UsageError> {
        let files =
            ballast_client::TlsFiles::from_parts(self.tls_ca.clone(), self.tls_cert.clone(), self.tls_key.clone())
                .map_err(|e| match e {
                    ballast_client::TlsError::Incomplete { missing } => UsageError(incomplete_tls(&missing)),
                    other => UsageError(other.to_string()),
                })?;
        files.map(|f| f.load()).transpose().map_err(|e| UsageError(e.to_string()))
    }
}

#[derive(clap::Args)]
pub struct OutArgs {
    /// How to print the answer.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureDomainArg {
    /// Replicas of a shard on distinct nodes.
    Node,
    /// Replicas on distinct zone labels (`ballast node --zone`).
    Zone,
}

impl From<FailureDomainArg> for FailureDomain {
    fn from(d: FailureDomainArg) -> Self {
        match d {
            FailureDomainArg::Node => FailureDomain::Node,
            FailureDomainArg::Zone => FailureDomain::Zone,
        }
    }
}

/// How a pool is laid out; shared by `cluster init` and `pool create`.
#[derive(clap::Args)]
pub struct LayoutArgs {
    /// Copies of every block (1..=5).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REPLICAS)))]
    pub replicas: u32,
    /// Raft groups the pool's data is spread over; fixed for the pool's life.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SHARDS)))]
    pub shards: u32,
    /// Never two replicas of a shard on the same node, or in the same zone.
    #[arg(long, value_enum, default_value_t = FailureDomainArg::Node)]
    pub failure_domain: FailureDomainArg,
}

#[derive(clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Replicas of the `default` pool (1..=5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_REPLICAS)))]
    pub replicas: u32,
    /// Shards of the `default` pool.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SHARDS)))]
    pub shards: u32,
    /// Failure domain of the `default` pool.
    #[arg(long, value_enum, default_value_t = FailureDomainArg::Node)]
    pub failure_domain: FailureDomainArg,
    #[command(flatten)]
    pub out: OutArgs,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Make the --endpoints nodes the first members (meta group) of a new
    /// cluster, with the pool `default`.
    Init(InitArgs),
    /// Generate a cluster CA and certificates for mutual TLS (ca, node and
    /// client .crt/.key) into --out; no node is contacted.
    Certs(super::certs::CertsArgs),
    /// Nodes (up/down, zone, disks), the meta leader, shards and leaders per
    /// node, under-replicated shards.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Move every replica off a node (e.g. before retiring it); it then takes
    /// no new ones. I/O continues throughout. Also `ballast node drain`.
    Drain(DrainArgs),
    /// Forget a node that holds no replicas (drained, or down and rebuilt
    /// elsewhere). Members of the meta group cannot be removed yet. Also
    /// `ballast node remove`.
    Remove(RemoveArgs),
    /// Wait until every shard has all its replicas complete (after a node
    /// loss, a drain or a restart), showing progress; exit 1 on timeout.
    WaitHealthy {
        /// Give up after this long (e.g. 10m).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_wait)]
        timeout: std::time::Duration,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// A node id: `3` or `node-3`.
fn parse_node(s: &str) -> Result<u64, String> {
    let digits = s.strip_prefix("node-").unwrap_or(s);
    match digits.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("invalid node {s:?}: expected a node id such as node-3 or 3")),
    }
}

fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    super::node_config::parse_duration(s)
}

/// Shards not yet whole: under-replicated or with joining voters, and those
/// that list `node` as a voter when one is given.
fn pending(status: &ballast_types::ClusterStatus, node: Option<u64>) -> usize {
    status
        .shards
        .iter()
        .filter(|s| {
            s.under_replicated
                || !s.shard.joining.is_empty()
                || node.is_some_and(|n| s.shard.voters.contains(&ballast_types::NodeId(n)))
        })
        .count()
}

/// Snapshot bytes copied and to copy, summed over the shards being rebuilt.
fn rebuild_bytes(status: &ballast_types::ClusterStatus) -> (u64, u64) {
    status
        .shards
        .iter()
        .filter_map(|s| s.rebuilding)
        .fold((0, 0), |(d, t), r| (d.saturating_add(r.done_bytes), t.saturating_add(r.total_bytes)))
}

/// "1 GiB of 4 GiB copied at 8 MiB/s" (or that new replicas replay the log).
fn bytes_line(done: u64, total: u64, bytes_per_sec: f64) -> String {
    use ballast_types::format_size;
    if total == 0 {
        return "new replicas catching up from the log".to_string();
    }
    let mut line = format!("{} of {} copied", format_size(done), format_size(total));
    if bytes_per_sec > 0.0 {
        line.push_str(&format!(" at {}/s", format_size(bytes_per_sec.round() as u64)));
    }
    line
}

/// Poll `status` until no shard is pending; a progress bar on a terminal
/// (shards done, with the bytes copied and the rate), a line per change
/// otherwise.
async fn wait_until_whole(admin: &AdminClient, node: Option<u64>, timeout: std::time::Duration) -> Result<()> {
    use std::io::IsTerminal;
    let deadline = std::time::Instant::now() + timeout;
    let first = pending(&admin.status().await?, node);
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(first as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} shards whole  {msg}") {
            b.set_style(style);
        }
        b
    });
    let mut last = usize::MAX;
    let mut last_line = String::new();
    let mut previous: Option<(std::time::Instant, u64)> = None;
    loop {
        let (left, bytes) = match admin.status().await {
            Ok(s) => (pending(&s, node), Some(rebuild_bytes(&s))),
            // The meta leader may be changing: keep waiting.
            Err(e) if ballast_types::Retryable::is_retryable(&e) => (last, None),
            Err(e) => return Err(e.into()),
        };
        let now = std::time::Instant::now();
        let line = match bytes {
            Some((done, total)) if left > 0 => {
                let rate = match previous {
                    Some((at, before)) if done >= before => {
                        (done - before) as f64 / now.duration_since(at).as_secs_f64().max(1e-3)
                    }
                    _ => 0.0,
                };
                previous = Some((now, done));
                bytes_line(done, total, rate)
            }
            _ => String::new(),
        };
        if let Some(b) = &bar {
            b.set_message(line.clone());
        }
        if left != last || (bar.is_none() && !line.is_empty() && line != last_line) {
            match &bar {
                Some(b) => b.set_position(first.saturating_sub(left) as u64),
                None if line.is_empty() => eprintln!("{left} shard(s) still to rebuild or move"),
                None => eprintln!("{left} shard(s) still to rebuild or move; {line}"),
            }
            last = left;
            last_line = line;
        }
        if left == 0 {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("{left} shard(s) still not whole after {timeout:?}");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create a pool: a replication factor, a shard count and a failure domain.
    Create {
        #[arg(value_parser = parse_name)]
        name: String,
        #[command(flatten)]
        layout: LayoutArgs,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// List the pools.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        out: OutArgs,
    },
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a thin-provisioned volume.
    Create {
        #[arg(value_parser = parse_name)]
        name: String,
        /// Size, e.g. 10GiB (whole 4 KiB blocks).
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
        /// Pool to place it in.
        #[arg(long, default_value = DEFAULT_POOL, value_parser = parse_name)]
        pool: String,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// List the volumes.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Show one volume.
    Info {
        #[arg(value_parser = parse_name)]
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Grow a volume (online).
    Resize {
        #[arg(value_parser = parse_name)]
        name: String,
        /// New size, e.g. 20GiB.
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Delete a volume and its data.
    Delete {
        #[arg(value_parser = parse_name)]
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Write a raw image (a file or `-` for stdin) into a volume, sparse:
    /// all-zero 4 KiB blocks are not sent.
    Import(super::transfer::ImportArgs),
    /// Copy a volume out to a raw image (a file or `-` for stdout); holes
    /// stay holes in a regular file.
    Export(super::transfer::ExportArgs),
}

/// The `default` pool `cluster init` (and the demo) create.
pub fn default_pool(replicas: u32, shards: u32, failure_domain: FailureDomain) -> PoolSpec {
    PoolSpec { name: DEFAULT_POOL.to_string(), replicas, shards, failure_domain }
}

fn spec_view(p: &PoolSpec) -> PoolSpecView {
    PoolSpecView {
        name: p.name.clone(),
        replicas: p.replicas,
        shards: p.shards,
        failure_domain: output::failure_domain_name(p.failure_domain),
    }
}

pub async fn cluster(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Certs(a) => super::certs::run(a),
        ClusterCmd::Init(a) => {
            if a.conn.endpoints.len() > MAX_META_MEMBERS {
                return Err(super::UsageError(format!(
                    "cluster init takes at most {MAX_META_MEMBERS} endpoints (the first meta group)"
                ))
                .into());
            }
            let admin = a.conn.admin(ClientConfig::default())?;
            let pool = default_pool(a.replicas, a.shards, a.failure_domain.into());
            let init = InitCluster { endpoints: a.conn.endpoints.clone(), default_pool: Some(pool.clone()) };
            let reply = admin.init_cluster(&init).await?;
            output::print(a.out.output, &output::init_view(&reply, Some(spec_view(&pool))), output::init_table)
        }
        ClusterCmd::Status { conn, out } => {
            let admin = conn.admin(ClientConfig::default())?;
            let status = admin.status().await?;
            output::print(out.output, &output::status_view(&status), output::status_table)?;
            if out.output == output::Output::Table && status.shards.iter().any(|s| !s.shard.joining.is_empty()) {
                // A second look a second later gives each rebuild's rate.
                let window = std::time::Duration::from_secs(1);
                tokio::time::sleep(window).await;
                let again = admin.status().await?;
                let rates = super::status::rebuild_rates(&again, &status, window.as_secs_f64());
                println!();
                for s in again.shards.iter().filter(|s| !s.shard.joining.is_empty()) {
                    let (done, total) = s.rebuilding.map_or((0, 0), |r| (r.done_bytes, r.total_bytes));
                    let rate = rates.get(&s.shard.id.0).copied().unwrap_or(0.0);
                    println!("rebuilding {}: {}", s.shard.id, bytes_line(done, total, rate));
                }
            }
            Ok(())
        }
        ClusterCmd::Drain(args) => drain(args).await,
        ClusterCmd::Remove(args) => remove(args).await,
        ClusterCmd::WaitHealthy { timeout, conn } => {
            let admin = conn.admin(ClientConfig::default())?;
            wait_until_whole(&admin, None, timeout).await?;
            println!("every shard has all its replicas");
            Ok(())
        }
    }
}

/// A node to drain (`ballast node drain`, `ballast cluster drain`).
#[derive(clap::Args)]
pub struct DrainArgs {
    /// The node, as `cluster status` names it (`node-3` or `3`).
    #[arg(value_parser = parse_node)]
    pub node: u64,
    /// Return once the drain is recorded instead of waiting for the moves.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this long (e.g. 30m).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_wait)]
    pub timeout: std::time::Duration,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// A node to forget (`ballast node remove`, `ballast cluster remove`).
#[derive(clap::Args)]
pub struct RemoveArgs {
    /// The node, as `cluster status` names it (`node-3` or `3`).
    #[arg(value_parser = parse_node)]
    pub node: u64,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Move every replica off the node and (unless `--no-wait`) wait until it holds none.
pub async fn drain(args: DrainArgs) -> Result<()> {
    let DrainArgs { node, no_wait, timeout, conn } = args;
    let admin = conn.admin(ClientConfig::default())?;
    admin.drain_node(ballast_types::NodeId(node)).await?;
    if no_wait {
        println!("draining node-{node}: its replicas are moving to other nodes");
        return Ok(());
    }
    wait_until_whole(&admin, Some(node), timeout).await?;
    println!("node-{node} drained: it holds no replicas; `ballast node remove node-{node}` forgets it");
    Ok(())
}

/// Forget a node that holds no replicas.
pub async fn remove(args: RemoveArgs) -> Result<()> {
    let RemoveArgs { node, conn } = args;
    conn.admin(ClientConfig::default())?.remove_node(ballast_types::NodeId(node)).await?;
    println!("node-{node} removed from the cluster");
    Ok(())
}

pub async fn pool(cmd: PoolCmd) -> Result<()> {
    match cmd {
        PoolCmd::Create { name, layout, conn, out } => {
            let spec = PoolSpec {
                name,
                replicas: layout.replicas,
                shards: layout.shards,
                failure_domain: layout.failure_domain.into(),
            };
            let pool = conn.admin(ClientConfig::default())?.create_pool(&spec).await?;
            output::print(out.output, &output::pool_view(&pool), |p| output::pools_table(std::slice::from_ref(p)))
        }
        PoolCmd::List { conn, out } => {
            let mut pools: Vec<_> =
                conn.admin(ClientConfig::default())?.list_pools().await?.iter().map(output::pool_view).collect();
            pools.sort_by(|a, b| a.name.cmp(&b.name));
            output::print(out.output, &pools, |p| output::pools_table(p))
        }
    }
}

/// Pool names by id, to show volumes by pool name.
async fn pool_names(admin: &AdminClient) -> Result<BTreeMap<PoolId, String>> {
    Ok(admin.list_pools().await?.into_iter().map(|p| (p.id, p.spec.name)).collect())
}

#[derive(Serialize)]
struct Deleted {
    deleted: String,
}

pub async fn volume(cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create { name, size, pool, conn, out } => {
            let admin = conn.admin(ClientConfig::default())?;
            let v = admin.create_volume(&CreateVolume { name, size, pool: pool.clone() }).await?;
            let pools = BTreeMap::from([(v.pool, pool)]);
            output::print(out.output, &output::volume_view(&v, &pools), output::volume_details)
        }
        VolumeCmd::List { conn, out } => {
            let admin = conn.admin(ClientConfig::default())?;
            let pools = pool_names(&admin).await?;
            let mut vols: Vec<_> = admin.list_volumes().await?.iter().map(|v| output::volume_view(v, &pools)).collect();
            vols.sort_by(|a, b| a.name.cmp(&b.name));
            output::print(out.output, &vols, |v| output::volumes_table(v))
        }
        VolumeCmd::Info { name, conn, out } => {
            let admin = conn.admin(ClientConfig::default())?;
            let v = admin.volume(&name).await?;
            let pools = pool_names(&admin).await?;
            output::print(out.output, &output::volume_view(&v, &pools), output::volume_details)
        }
        VolumeCmd::Resize { name, size, conn, out } => {
            let admin = conn.admin(ClientConfig::default())?;
            let v = admin.resize_volume(&ResizeVolume { name, size }).await?;
            let pools = pool_names(&admin).await?;
            output::print(out.output, &output::volume_view(&v, &pools), output::volume_details)
        }
        VolumeCmd::Delete { name, conn, out } => {
            conn.admin(ClientConfig::default())?.delete_volume(&name).await?;
            output::print(out.output, &Deleted { deleted: name }, |d| format!("deleted volume {}\n", d.deleted))
        }
        VolumeCmd::Import(args) => super::transfer::import(args).await,
        VolumeCmd::Export(args) => super::transfer::export(args).await,
    }
}

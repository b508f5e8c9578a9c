//! The command line: one module per command family.
//!
//! - [`node`]: `ballast node`, with its settings merged from flags, `BALLAST_*`
//!   variables and a TOML file by the pure [`node_config::merge`]; [`metrics`]
//!   is its `/metrics` responder.
//! - [`admin`]: `cluster`, `pool` and `volume`, thin calls of `AdminClient`
//!   rendered by [`output`] as a table or JSON; [`certs`] is `cluster certs`
//!   (a CA and mutual-TLS certificates, no node contacted); [`transfer`] is `volume
//!   import|export` (sparse raw images, a progress bar).
//! - [`status`]: `ballast status`, the cluster's health on one screen, once
//!   or redrawn (`--watch`), with per-volume IOPS from counter deltas.
//! - [`serve`]: `attach` and `gateway`, NBD in front of `ClusterExports`.
//! - [`demo`]: three node processes, cluster init, one volume, `attach`.
//! - [`bench`]: a fixed NBD benchmark suite against any export(s).
//! - [`docker_plugin`]: the Docker volume plugin (mounts volumes for containers).
//! - [`scrub`]: `ballast scrub`, a scrub pass on every node now, waited for.
//! - [`verify`]: the fault suite's workload and checker against a live cluster.
//!
//! Errors: a [`UsageError`] (bad flag value, environment or config file)
//! exits with [`EXIT_USAGE`]; anything else, including a refusal from the
//! cluster, exits with 1. Either way `main` prints one line.

use std::net::SocketAddr;

use anyhow::Result;
use ballast_types::{parse_size, validate_addr, validate_name, validate_volume_size};
use clap::{Parser, Subcommand};

pub mod admin;
pub mod bench;
pub mod certs;
pub mod demo;
pub mod docker_plugin;
pub mod http;
pub mod metrics;
pub mod node;
pub mod node_config;
pub mod output;
pub mod scrub;
pub mod serve;
pub mod signals;
pub mod status;
pub mod transfer;
pub mod verify;

/// Exit code of bad arguments or configuration (clap uses the same).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(name = "ballast", version, about = "Replicated block volumes for containers, served over NBD")]
pub struct Cli {
    /// Log filter (also RUST_LOG), e.g. `info` or `ballast_nbd=debug`.
    #[arg(long, global = true, env = "BALLAST_LOG", default_value = "info")]
    pub log: String,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Threads of the async runtime (default: one per core). Lower it where
    /// several Ballast processes share few cores: `ballast demo` gives each
    /// of its nodes one per four cores.
    #[arg(long, global = true, env = "BALLAST_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a storage node (until SIGINT/SIGTERM); `node drain` and `node remove` act on one.
    Node(node::NodeArgs),
    /// Is the cluster healthy: nodes, disks, shards, per-volume IOPS (`--watch` redraws).
    Status(status::StatusArgs),
    /// Initialise a cluster, or show its nodes, disks and shards.
    #[command(subcommand)]
    Cluster(admin::ClusterCmd),
    /// Create and list pools (replication factor, shards, failure domain).
    #[command(subcommand)]
    Pool(admin::PoolCmd),
    /// Create, list, inspect, resize and delete volumes; import and export raw images.
    #[command(subcommand)]
    Volume(admin::VolumeCmd),
    /// Serve one volume over NBD on this machine (one writer: takes the volume's epoch).
    Attach(serve::AttachArgs),
    /// Serve every volume over NBD, each under its name as the export name.
    Gateway(serve::GatewayArgs),
    /// Start three nodes on this machine, create a volume and serve it over NBD.
    Demo(demo::DemoArgs),
    /// Measure any NBD export with a fixed suite (random/sequential I/O, QD1-32), or compare two.
    Bench(bench::BenchArgs),
    /// Serve Docker's volume plugin protocol: `docker volume create -d ballast`, `docker run -v`.
    DockerPlugin(docker_plugin::DockerPluginArgs),
    /// Verify every stored block on every node now, repairing damaged ones from healthy replicas.
    Scrub(scrub::ScrubArgs),
    /// Check a live cluster: concurrent writers and readers, then prove no acknowledged write was lost.
    Verify(verify::VerifyArgs),
}

pub async fn run(command: Command) -> Result<()> {
    match command {
        Command::Node(mut args) => match args.action.take() {
            Some(action) => node::act(*action).await,
            None => node::run(args).await,
        },
        Command::Status(args) => status::run(args).await,
        Command::Cluster(cmd) => admin::cluster(cmd).await,
        Command::Pool(cmd) => admin::pool(cmd).await,
        Command::Volume(cmd) => admin::volume(cmd).await,
        Command::Attach(args) => serve::attach(args).await,
        Command::Gateway(args) => serve::gateway(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::DockerPlugin(args) => docker_plugin::run(args).await,
        Command::Scrub(args) => scrub::run(args).await,
        Command::Verify(args) => verify::run(args).await,
    }
}

/// Bad arguments, environment or configuration: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for a failed command.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        EXIT_USAGE
    } else {
        1
    }
}

// ----- value parsers shared by the commands (clap reports their errors as usage errors) -----

/// A volume, pool or zone name.
pub fn parse_name(s: &str) -> Result<String, String> {
    validate_name(s).map_err(|e| format!("invalid name {s:?}: {e}"))?;
    Ok(s.to_string())
}

/// A node address `host:port` (not resolved here).
pub fn parse_addr(s: &str) -> Result<String, String> {
    validate_addr(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// A socket address `IP:PORT` to listen on.
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("invalid address {s:?}: expected IP:PORT, e.g. 127.0.0.1:7100"))
}

/// A volume size: a human size (`10GiB`) that is a valid volume size.
pub fn parse_volume_size(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    validate_volume_size(size).map_err(|e| format!("invalid size {s:?}: {e}"))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors_exit_2_and_others_exit_1() {
        let usage: anyhow::Error = UsageError("bad".into()).into();
        assert_eq!(exit_code(&usage), 2);
        assert_eq!(exit_code(&usage.context("reading the config")), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("refused")), 1);
    }

    #[test]
    fn volume_sizes_are_checked_before_any_call() {
        assert_eq!(parse_volume_size("1GiB"), Ok(1 << 30));
        assert!(parse_volume_size("0").is_err());
        assert!(parse_volume_size("1000").is_err(), "not whole 4 KiB blocks");
        assert!(parse_volume_size("3parsecs").is_err());
    }
}

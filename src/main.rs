//! `ballast`: the one binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ballast::local::LocalVolumes;
use ballast_nbd::{NbdServer, ServerConfig};
use ballast_types::{format_size, parse_size};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ballast", version, about = "Replicated block volumes for containers, served over NBD")]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. `info` or `ballast_nbd=debug`.
    #[arg(long, global = true, env = "BALLAST_LOG", default_value = "info")]
    log: String,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a volume on this machine over NBD, created on first run.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Where the volume data lives (a RocksDB store).
    #[arg(long, default_value = "./ballast-data", env = "BALLAST_DATA_DIR")]
    data_dir: PathBuf,
    /// Name of the volume (and NBD export).
    #[arg(long, default_value = "demo")]
    volume: String,
    /// Size of the volume when it is created, e.g. 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// TCP address for NBD.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Also serve NBD on this unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One readable line: clap's first line, without its "error: " prefix.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("ballast: {first} (see `ballast --help`)");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = init_logging(&cli.log, &cli.log_format) {
        eprintln!("ballast: {e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ballast: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, format: &str) -> Result<()> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let filter =
        tracing_subscriber::EnvFilter::try_new(&filter).with_context(|| format!("invalid log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn demo(args: DemoArgs) -> Result<()> {
    ballast::local::validate_name(&args.volume)?;
    let data_dir = args.data_dir.clone();
    let volumes = tokio::task::spawn_blocking(move || LocalVolumes::open(&data_dir))
        .await?
        .with_context(|| format!("opening the data directory {}", args.data_dir.display()))?;
    let info = volumes.ensure(&args.volume, args.size)?;
    if info.size != args.size {
        tracing::info!(volume = %info.name, size = info.size, "volume exists; keeping its size");
    }
    volumes.set_default_export(&info.name);
    let volumes = Arc::new(volumes);
    let server = NbdServer::new(volumes.clone(), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another ballast running?)", args.listen))?;
    let unix = match &args.socket {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    print_usage(&info.name, info.size, &args.listen, args.socket.as_deref(), &args.data_dir);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp = tokio::spawn({
        let server = server.clone();
        let stop = stopped(stop_rx.clone());
        async move { server.serve_tcp(listener, stop).await }
    });
    let unix_task = unix.map(|l| {
        let server = server.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move { server.serve_unix(l, stop).await })
    });
    shutdown_signal().await;
    tracing::info!("stopping: no new connections; syncing the store");
    let _ = stop_tx.send(true);
    tcp.await?.context("NBD listener failed")?;
    if let Some(t) = unix_task {
        t.await?.context("NBD unix listener failed")?;
    }
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    tokio::task::spawn_blocking(move || volumes.sync()).await?.context("syncing the store at shutdown")?;
    Ok(())
}

fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    if path.exists() {
        // A stale socket from an earlier run; refuse anything else.
        let meta = std::fs::symlink_metadata(path)?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path)?;
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

fn print_usage(name: &str, size: u64, listen: &SocketAddr, socket: Option<&Path>, data_dir: &Path) {
    let uri = format!("nbd://{listen}/{name}");
    println!("ballast: serving volume {name:?} ({}) at {uri}", format_size(size));
    println!("  data:       {}", data_dir.display());
    if let Some(s) = socket {
        println!("  unix:       nbd+unix:///{name}?socket={}", s.display());
    }
    println!("  inspect:    nbdinfo {uri}");
    println!("  read/write: qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}");
    println!("  kernel:     nbd-client {} {} /dev/nbd0 -N {name}", listen.ip(), listen.port());
    println!("  no module:  mkdir -p /tmp/b && nbdfuse /tmp/b/disk {uri} &  then  losetup --find --show /tmp/b/disk");
    println!("Press Ctrl-C to stop; data stays in {} for the next run.", data_dir.display());
}

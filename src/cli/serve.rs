//! `ballast attach` and `ballast gateway`: the NBD server in front of
//! `ClusterExports`. `ballast demo` serves through [`serve_nbd`] too.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ballast_client::{ClientConfig, ClusterExports};
use ballast_nbd::{ExportProvider, NbdServer, ServerConfig};
use ballast_types::format_size;

use super::admin::ConnArgs;
use super::metrics::ProcessMetrics;
use super::signals::Signals;
use super::{parse_name, parse_socket_addr};

/// Where NBD clients connect.
#[derive(clap::Args, Clone)]
pub struct NbdListen {
    /// TCP address for NBD.
    #[arg(long, default_value = "127.0.0.1:10809", value_parser = parse_socket_addr)]
    pub listen: SocketAddr,
    /// Also serve NBD on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    /// The volume to serve (also its NBD export name).
    #[arg(value_parser = parse_name)]
    pub volume: String,
    #[command(flatten)]
    pub nbd: NbdListen,
    /// Attach read-only: any number of readers, no epoch taken.
    #[arg(long)]
    pub read_only: bool,
    /// Take the volume over from a live writer, which gets fenced.
    #[arg(long, conflicts_with = "read_only")]
    pub force: bool,
    /// Serve Prometheus metrics (NBD and client) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub nbd: NbdListen,
    /// Serve Prometheus metrics (NBD and client) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub async fn attach(args: AttachArgs) -> Result<()> {
    let mut signals = Signals::install()?;
    let _metrics = ProcessMetrics::start(args.metrics).await?;
    let config = ClientConfig::default();
    let admin = args.conn.admin(config)?;
    let info = admin.volume(&args.volume).await?;
    let exports = ClusterExports::attach_one(admin, &args.volume, args.read_only, args.force, config).await?;
    let served = serve_nbd(exports.clone(), &args.nbd, signals.recv(), |bound| {
        print_volume_usage(&args.volume, info.size, args.read_only, bound);
        println!("Press Ctrl-C to stop (the volume is detached).");
    })
    .await;
    let detached = exports.detach_all().await.context("detaching");
    served.and(detached)
}

pub async fn gateway(args: GatewayArgs) -> Result<()> {
    let mut signals = Signals::install()?;
    let _metrics = ProcessMetrics::start(args.metrics).await?;
    let config = ClientConfig::default();
    let admin = args.conn.admin(config)?;
    let exports = ClusterExports::gateway(admin, config).await?;
    let served = serve_nbd(exports.clone(), &args.nbd, signals.recv(), |bound| {
        let uri = bound.uri("VOLUME");
        println!("ballast: serving every volume of the cluster at {}", bound.uri("<volume>"));
        println!("  list:       nbdinfo --list {}", bound.uri(""));
        println!("  inspect:    nbdinfo {uri}");
        println!("  kernel:     sudo nbd-client -N VOLUME {} {} /dev/nbd0", bound.host(), bound.port());
        if let Some(s) = &bound.socket {
            println!("  unix:       sudo nbd-client -unix {} -N VOLUME /dev/nbd0", s.display());
        }
        println!("Press Ctrl-C to stop (every volume is detached).");
    })
    .await;
    let detached = exports.detach_all().await.context("detaching");
    served.and(detached)
}

/// The addresses NBD is served at, for the printed instructions.
pub struct Bound {
    pub tcp: SocketAddr,
    pub socket: Option<PathBuf>,
}

impl Bound {
    /// Host to print: a wildcard listen address is reached through loopback.
    pub fn host(&self) -> IpAddr {
        match self.tcp.ip() {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        }
    }

    pub fn port(&self) -> u16 {
        self.tcp.port()
    }

    pub fn uri(&self, export: &str) -> String {
        match self.host() {
            IpAddr::V6(ip) => format!("nbd://[{ip}]:{}/{export}", self.port()),
            IpAddr::V4(ip) => format!("nbd://{ip}:{}/{export}", self.port()),
        }
    }
}

/// Serve `provider` on TCP (and the unix socket, if any) until `stop`
/// resolves; `announce` runs once both listen. Stops accepting at `stop`;
/// the caller detaches afterwards.
pub async fn serve_nbd<P: ExportProvider>(
    provider: Arc<P>,
    nbd: &NbdListen,
    stop: impl Future<Output = ()>,
    announce: impl FnOnce(&Bound),
) -> Result<()> {
    let server = NbdServer::new(provider, ServerConfig::default());
    let listener = tokio::net::TcpListener::bind(nbd.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another ballast running?)", nbd.listen))?;
    let unix = nbd.socket.as_deref().map(bind_unix).transpose()?;
    announce(&Bound { tcp: listener.local_addr().unwrap_or(nbd.listen), socket: nbd.socket.clone() });

    let mut listeners = Listeners::new(server);
    listeners.tcp(listener);
    if let (Some(l), Some(path)) = (unix, &nbd.socket) {
        listeners.unix(l, path.clone());
    }
    stop.await;
    tracing::info!("stopping: no new NBD connections");
    listeners.stop().await
}

/// NBD listeners of one server, each accepting on its own task until
/// [`Listeners::stop`]. Connections already open are not closed by it: they
/// end when their client leaves.
pub struct Listeners<P: ExportProvider> {
    server: NbdServer<P>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<std::io::Result<()>>)>,
    sockets: Vec<PathBuf>,
}

impl<P: ExportProvider> Listeners<P> {
    pub fn new(server: NbdServer<P>) -> Self {
        Self { server, stop: tokio::sync::watch::channel(false).0, tasks: Vec::new(), sockets: Vec::new() }
    }

    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    pub fn tcp(&mut self, listener: tokio::net::TcpListener) {
        let (server, stop) = (self.server.clone(), self.stopped());
        self.tasks.push(("NBD listener", tokio::spawn(async move { server.serve_tcp(listener, stop).await })));
    }

    /// Accept on `listener`, bound at `path` (see [`bind_unix`]); the socket
    /// file is removed at [`Listeners::stop`].
    pub fn unix(&mut self, listener: tokio::net::UnixListener, path: PathBuf) {
        let (server, stop) = (self.server.clone(), self.stopped());
        self.tasks.push(("NBD unix listener", tokio::spawn(async move { server.serve_unix(listener, stop).await })));
        self.sockets.push(path);
    }

    /// Stop accepting, wait for every listener task, remove the socket files;
    /// reports the first listener's failure.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        let mut first: Option<anyhow::Error> = None;
        for (what, task) in self.tasks {
            let r = match task.await {
                Ok(r) => r.with_context(|| format!("{what} failed")),
                Err(e) => Err(anyhow::Error::new(e).context(format!("{what} task"))),
            };
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        for path in &self.sockets {
            let _ = std::fs::remove_file(path);
        }
        first.map_or(Ok(()), Err)
    }
}

/// Listen on the unix socket `path`, replacing a stale socket file left by
/// an earlier run (anything else at `path` is refused).
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
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

/// How to use one served volume, printed on stdout.
pub fn print_volume_usage(name: &str, size: u64, read_only: bool, bound: &Bound) {
    let uri = bound.uri(name);
    let mode = if read_only { ", read-only" } else { "" };
    println!("ballast: serving volume {name:?} ({}{mode}) at {uri}", format_size(size));
    println!("  inspect:    nbdinfo {uri}");
    println!("  read/write: qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}");
    println!("  kernel:     sudo nbd-client -N {name} {} {} /dev/nbd0", bound.host(), bound.port());
    if let Some(s) = &bound.socket {
        println!("  unix:       nbdinfo 'nbd+unix:///{name}?socket={}'", s.display());
        println!("              sudo nbd-client -unix {} -N {name} /dev/nbd0", s.display());
    }
    println!("  no module:  mkdir -p /tmp/ballast && nbdfuse /tmp/ballast/{name} {uri} &");
}

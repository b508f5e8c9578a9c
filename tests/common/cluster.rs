//! In-process clusters for the end-to-end tests: node configurations with
//! short Raft timings on 127.0.0.1, and a volume served over NBD by
//! `ClusterExports` (what `ballast attach` does) for real clients.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ballast_client::{AdminClient, ClientConfig, ClusterExports};
use ballast_nbd::{NbdServer, ServerConfig};
use ballast_node::{NodeConfig, ShardConfig};
use ballast_storage::RocksConfig;

use super::{cmd, require_tool, run};

const SHORT: Duration = Duration::from_secs(60);

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

pub fn config(listen: SocketAddr, dir: &Path, join: Vec<String>) -> NodeConfig {
    let mut c = NodeConfig::daemon(listen, listen.to_string(), vec![dir.to_path_buf()]);
    c.join = join;
    c.shard = ShardConfig {
        heartbeat_interval: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(500),
        election_timeout_max: Duration::from_millis(1000),
        ..ShardConfig::default()
    };
    c.rocks = RocksConfig { block_cache_bytes: 16 << 20, write_buffer_bytes: 8 << 20, ..RocksConfig::default() };
    c.reconcile_every = Duration::from_millis(200);
    c
}

pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

pub fn qemu_io(uri: &str, script: &str) {
    qemu_io_each(uri, &[script.to_string()]);
}

/// One qemu-io run (one NBD connection) for several commands.
pub fn qemu_io_each(uri: &str, commands: &[String]) {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(uri);
    let out = run(&mut cmd(&qemu_io, args), SHORT);
    assert!(!out.all().contains("failed"), "qemu-io {commands:?}: {}", out.describe());
}

pub struct Nbd {
    pub uri: String,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub exports: Arc<ClusterExports>,
}

pub async fn serve(admin: AdminClient, volume: &str) -> Nbd {
    let exports =
        ClusterExports::attach_one(admin, volume, false, false, ClientConfig::default()).await.expect("attach");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind nbd");
    let uri = format!("nbd://{}/{volume}", listener.local_addr().expect("addr"));
    let server = NbdServer::new(exports.clone(), ServerConfig::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server
            .serve_tcp(listener, async {
                let _ = stopped.await;
            })
            .await;
    });
    Nbd { uri, stop, exports }
}

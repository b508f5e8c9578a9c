//! `ballast docker-plugin`: a Docker volume plugin (a "legacy", socket-
//! discovered plugin) on `/run/docker/plugins/ballast.sock`, so that
//!
//! ```text
//! docker volume create -d ballast --opt size=1GiB --opt replicas=3 pgdata
//! docker run -v pgdata:/data …
//! ```
//!
//! work on any Docker host that runs it. [`driver`] holds the protocol and
//! the mount reference counts, [`cluster`] maps volumes to the Admin API,
//! [`mount`] attaches and mounts them on this host. This file is the HTTP/1.1
//! responder on the unix socket: one request per connection, answered with
//! `Connection: close` (Docker's client opens a new connection when needed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ballast_client::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

use super::admin::ConnArgs;
use super::http::{self, read_head};
use super::serve::bind_unix;
use super::signals::Signals;

pub mod cluster;
pub mod driver;
pub mod mount;

use cluster::AdminCluster;
use driver::{Cluster, Driver, Mounter};
use mount::{DevicePath, HostMounter};

/// Where Docker looks for the plugin named `ballast`.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/ballast.sock";
pub const DEFAULT_ROOT: &str = "/var/lib/ballast/docker-plugin";
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";
const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;
/// A client that has not sent its whole request by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct DockerPluginArgs {
    /// Unix socket Docker finds the plugin at (its file name is the driver name).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Directory of the mounts (ROOT/VOLUME/data). When the plugin runs in a
    /// container, bind-mount it at the same path with rshared propagation.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub async fn run(args: DockerPluginArgs) -> Result<()> {
    let mut signals = Signals::install()?;
    let config = ClientConfig::default();
    let admin = args.conn.admin(config)?;
    std::fs::create_dir_all(&args.root).with_context(|| format!("creating {}", args.root.display()))?;
    let root = args.root.canonicalize().with_context(|| format!("resolving {}", args.root.display()))?;
    let cleaned = mount::recover(&root, &admin).await;
    if !cleaned.is_empty() {
        tracing::warn!(volumes = ?cleaned, "tore down mounts an earlier run left behind");
    }
    let device = DevicePath::detect();
    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = bind_unix(&args.socket)?;
    let driver = Arc::new(Driver::new(
        AdminCluster { admin: admin.clone() },
        HostMounter { admin, config, root: root.clone(), device },
    ));
    println!(
        "ballast: Docker volume plugin on {} (mounts under {}, block devices through {})",
        args.socket.display(),
        root.display(),
        match device {
            DevicePath::Kernel => "the kernel nbd module",
            DevicePath::Fuse => "nbdfuse and loop devices",
        }
    );
    let name = args.socket.file_stem().map_or("ballast".into(), |s| s.to_string_lossy());
    println!("  docker volume create -d {name} --opt size=10GiB --opt replicas=3 NAME");
    serve(listener, driver.clone(), signals.recv()).await;
    let _ = std::fs::remove_file(&args.socket);
    driver.unmount_all().await
}

/// Answer protocol calls on `listener` until `stop` resolves; returns after
/// every connection task has ended.
pub async fn serve<C: Cluster, M: Mounter>(
    listener: UnixListener,
    driver: Arc<Driver<C, M>>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut stop => break,
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    let driver = driver.clone();
                    conns.spawn(async move {
                        if let Err(e) = respond(stream, &driver).await {
                            tracing::debug!(error = %e, "plugin request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "plugin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Let calls under way finish (a mount half done would be left behind).
    while conns.join_next().await.is_some() {}
}

async fn respond<C: Cluster, M: Mounter>(mut stream: UnixStream, driver: &Driver<C, M>) -> std::io::Result<()> {
    let req = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let (status, body) = match req {
        Err(why) => (400, serde_json::json!({ "Err": why })),
        Ok((method, _, _)) if method != "POST" => {
            (405, serde_json::json!({ "Err": format!("method {method}: the plugin protocol uses POST") }))
        }
        Ok((_, path, body)) => {
            let method = path.trim_start_matches('/');
            tracing::debug!(method, body = %String::from_utf8_lossy(&body), "plugin call");
            driver.handle(method, &body).await
        }
    };
    stream.write_all(&reply(status, &body.to_string())).await?;
    stream.shutdown().await
}

/// `(method, path, body)`, or why the request cannot be read.
type Request = std::result::Result<(String, String, Vec<u8>), String>;

async fn read_request(stream: &mut UnixStream) -> std::io::Result<Request> {
    let mut chunk = [0u8; 4096];
    let (head, mut rest) = match read_head(stream, MAX_HEAD).await? {
        Ok(h) => h,
        Err(why) => return Ok(Err(why.into())),
    };
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or("").to_owned(), first.next().unwrap_or("").to_owned());
    let (mut length, mut chunked) = (None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            match v.parse::<usize>() {
                Ok(n) if n <= MAX_BODY => length = Some(n),
                _ => return Ok(Err(format!("bad Content-Length {v:?}"))),
            }
        } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        return read_chunked(stream, rest).await.map(|b| b.map(|b| (method, path, b)));
    }
    let want = length.unwrap_or(0);
    while rest.len() < want {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err("connection closed inside the request body".into()));
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    rest.truncate(want);
    Ok(Ok((method, path, rest)))
}

/// A `Transfer-Encoding: chunked` body; `buf` holds what was read past the head.
async fn read_chunked(stream: &mut UnixStream, mut buf: Vec<u8>) -> std::io::Result<Result<Vec<u8>, String>> {
    let mut body = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // A size line, then that many bytes and CRLF; size 0 ends it.
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 || buf.len() > MAX_HEAD {
                return Ok(Err("bad chunked body".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let hex = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(hex, 16) else { return Ok(Err(format!("bad chunk size {hex:?}"))) };
        if size == 0 {
            return Ok(Ok(body));
        }
        if body.len() + size > MAX_BODY {
            return Ok(Err("request body too large".into()));
        }
        let need = line_end + 2 + size + 2;
        while buf.len() < need {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Err("connection closed inside a chunk".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..need);
    }
}

fn reply(status: u16, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    http::reply(&format!("{status} {reason}"), CONTENT_TYPE, body, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver::tests::{driver, Log, Volumes};

    async fn request(path: &std::path::Path, raw: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(raw).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    fn body_of(reply: &str) -> serde_json::Value {
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {reply:?}"));
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{reply}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {reply}"))
    }

    fn post(method: &str, body: &str) -> Vec<u8> {
        format!(
            "POST /{method} HTTP/1.1\r\nHost: plugin\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn calls_over_the_socket_get_json_with_err_and_bad_http_gets_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ballast.sock");
        let (d, _, log): (_, Arc<Volumes>, Arc<Log>) = driver();
        let d = Arc::new(d);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(bind_unix(&sock).unwrap(), d.clone(), async move {
            let _ = rx.await;
        }));

        let act = request(&sock, &post("Plugin.Activate", "")).await;
        assert!(act.starts_with("HTTP/1.1 200 OK\r\n"), "{act}");
        assert!(act.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")), "{act}");
        assert_eq!(body_of(&act), serde_json::json!({"Implements": ["VolumeDriver"], "Err": ""}));

        let create = request(&sock, &post("VolumeDriver.Create", r#"{"Name":"pg","Opts":{"size":"1GiB"}}"#)).await;
        assert_eq!(body_of(&create), serde_json::json!({"Err": ""}), "{create}");
        // Chunked bodies, as a Go client sends them when it does not know the length.
        let body = r#"{"Name":"pg","ID":"c1"}"#;
        let chunked = format!(
            "POST /VolumeDriver.Mount HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            5,
            &body[..5],
            body.len() - 5,
            &body[5..]
        );
        let mount = request(&sock, chunked.as_bytes()).await;
        assert_eq!(body_of(&mount), serde_json::json!({"Mountpoint": "/plugin/pg/data", "Err": ""}), "{mount}");
        assert_eq!(log.events.lock().unwrap().clone(), ["mount pg"]);

        let get = request(&sock, b"GET /VolumeDriver.List HTTP/1.1\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 405"), "{get}");
        let short = request(&sock, b"POST /VolumeDriver.Get HTTP/1.1\r\nContent-Length: 40\r\n\r\n{}").await;
        assert!(short.starts_with("HTTP/1.1 400") && short.contains("inside the request body"), "{short}");
        let huge = request(&sock, b"POST /VolumeDriver.Get HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n").await;
        assert!(huge.starts_with("HTTP/1.1 400") && huge.contains("Content-Length"), "{huge}");

        tx.send(()).unwrap();
        server.await.unwrap();
        assert_eq!(Arc::strong_count(&d), 1, "the server released the driver");
    }
}

//! `GET /metrics` in the Prometheus text format, over a minimal HTTP/1.1
//! responder: one request per connection, `Connection: close`. Scrapes are
//! rare and small, so a web framework would be all cost. `ballast node`
//! renders its node's state and the process registry; `attach` and
//! `gateway` render the process registry ([`ProcessMetrics`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::http::{read_head, reply};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Produces the metrics text at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// `/metrics` of an `attach` or `gateway` process: the NBD server's and the
/// thin client's series. Dropping it stops the responder.
pub struct ProcessMetrics {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ProcessMetrics {
    /// Bind `addr` (so a taken port fails before anything else starts) and
    /// answer scrapes on it; `None` serves nothing.
    pub async fn start(addr: Option<std::net::SocketAddr>) -> anyhow::Result<Option<Self>> {
        use anyhow::Context as _;
        let Some(addr) = addr else { return Ok(None) };
        let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?;
        ballast_nbd::metrics::register();
        ballast_client::metrics::register();
        tracing::info!(%addr, "serving /metrics");
        let render: Render = Arc::new(|| ballast_metrics::global().render());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, render, async move {
            let _ = rx.await;
        }));
        Ok(Some(Self { stop: Some(tx) }))
    }
}

impl Drop for ProcessMetrics {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Longest request head read; anything longer is refused.
const MAX_HEAD: usize = 8 << 10;
/// A client that has not sent its request head by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answer scrapes on `listener` until `stop` resolves. Returns after every
/// connection task has ended, so `render` (and what it holds) is released.
pub async fn serve(listener: TcpListener, render: Render, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut stop => break,
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let render = render.clone();
                    conns.spawn(async move {
                        if let Err(e) = respond(stream, &render).await {
                            tracing::debug!(%peer, error = %e, "metrics request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

async fn respond(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, MAX_HEAD)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let reply = match head {
        Err(_) => reply("400 Bad Request", "text/plain", "bad request\n", &[]),
        Ok((head, _)) => {
            let mut parts = head.lines().next().unwrap_or("").split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = target.split('?').next().unwrap_or("");
            match (method, path) {
                ("GET", "/metrics") => reply("200 OK", CONTENT_TYPE, &render(), &[]),
                #[cfg(feature = "faults")]
                ("POST", "/faults") => match faults(target.split_once('?').map_or("", |(_, q)| q)) {
                    Ok(state) => reply("200 OK", "text/plain", &state, &[]),
                    Err(e) => reply("400 Bad Request", "text/plain", &format!("{e}\n"), &[]),
                },
                ("GET", _) => reply("404 Not Found", "text/plain", "not found; try /metrics\n", &[]),
                _ => reply("405 Method Not Allowed", "text/plain", "only GET\n", &["Allow: GET"]),
            }
        }
    };
    stream.write_all(&reply).await?;
    stream.shutdown().await
}

/// `POST /faults?isolate=2,3&disk_delay_ms=20` (feature `faults`): set the
/// partition and the slow disk of this process's node; a key left out keeps
/// its setting, `isolate=` heals. Answers the state now in effect.
#[cfg(feature = "faults")]
fn faults(query: &str) -> Result<String, String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "isolate" => {
                let peers = value
                    .split(',')
                    .filter(|v| !v.is_empty())
                    .map(|v| v.parse::<u64>().map_err(|_| format!("isolate: {v:?} is not a node id")))
                    .collect::<Result<Vec<_>, _>>()?;
                ballast_node::faults::isolate(peers);
            }
            "disk_delay_ms" => {
                let ms: u64 = value.parse().map_err(|_| format!("disk_delay_ms: {value:?} is not a number"))?;
                ballast_node::faults::set_disk_delay(Duration::from_millis(ms));
            }
            other => return Err(format!("unknown fault {other:?}: use isolate or disk_delay_ms")),
        }
    }
    Ok(format!(
        "isolate={:?} disk_delay_ms={}\n",
        ballast_node::faults::isolated(),
        ballast_node::faults::disk_delay().as_millis()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn request(addr: std::net::SocketAddr, raw: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn scrapes_get_the_text_and_other_requests_get_http_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| "ballast_up 1\n".to_string());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, render.clone(), async move {
            let _ = rx.await;
        }));

        let ok = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nballast_up 1\n"), "{ok}");
        assert!(ok.contains("Content-Length: 13\r\n"), "{ok}");
        let missing = request(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = request(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET"), "{post}");
        let garbage = request(addr, "\u{1}\u{2}").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

        tx.send(()).unwrap();
        server.await.unwrap();
        assert_eq!(Arc::strong_count(&render), 1, "the server released the renderer");
    }
}

//! [`NbdServer`]: accept loops and the per-connection pipeline
//! (handshake, then transmission).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::device::ExportProvider;
use crate::{handshake, transmission, NbdError, ServerConfig};

/// Socket buffer sizes on our side: large enough to batch many small replies
/// and request headers per syscall, small next to a maximum payload.
const IO_BUFFER: usize = 64 * 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An NBD server over the exports of one [`ExportProvider`].
///
/// Cheap to clone (one `Arc`), so each connection task holds its own handle.
pub struct NbdServer<P: ExportProvider> {
    inner: Arc<Inner<P>>,
}

struct Inner<P> {
    provider: Arc<P>,
    config: ServerConfig,
}

impl<P: ExportProvider> Clone for NbdServer<P> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<P: ExportProvider> NbdServer<P> {
    /// A server that looks exports up in `provider` and applies `config` to
    /// every connection.
    pub fn new(provider: Arc<P>, config: ServerConfig) -> Self {
        Self { inner: Arc::new(Inner { provider, config }) }
    }

    /// The configuration every connection uses.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Accept TCP connections until `shutdown` resolves, serving each on its
    /// own task (with `TCP_NODELAY`: replies are small and latency-bound).
    ///
    /// After `shutdown` no new connection is accepted; open connections are
    /// told nothing and end when their peer leaves or the process exits.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                res = listener.accept() => match res {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        let server = self.clone();
                        let span = info_span!("nbd", peer = %peer);
                        tokio::spawn(
                            async move {
                                // serve_connection logs how it ended.
                                let _ = server.serve_connection(stream).await;
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => {
                        warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
    }

    /// Accept Unix-socket connections until `shutdown` resolves; otherwise
    /// as [`NbdServer::serve_tcp`].
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        let mut next_id: u64 = 0;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                res = listener.accept() => match res {
                    Ok((stream, _addr)) => {
                        next_id = next_id.wrapping_add(1);
                        let server = self.clone();
                        let span = info_span!("nbd", unix_conn = next_id);
                        tokio::spawn(
                            async move {
                                let _ = server.serve_connection(stream).await;
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => {
                        warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
    }

    /// Serve one connection: handshake, then transmission until the client
    /// disconnects. Logs how the connection ended exactly once (protocol
    /// violations at warn) and returns the same outcome to the caller.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _open = crate::metrics::ConnectionGuard::open();
        let res = self.run(stream).await;
        match &res {
            Ok(()) => debug!("NBD connection closed"),
            Err(e) if e.is_protocol_violation() => {
                warn!(error = %e, "NBD connection closed after a protocol violation");
            }
            Err(e) => info!(error = %e, "NBD connection ended with an error"),
        }
        res
    }

    async fn run<S>(&self, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut r = BufReader::with_capacity(IO_BUFFER, r);
        let mut w = BufWriter::with_capacity(IO_BUFFER, w);
        let config = &self.inner.config;
        let Some(neg) = handshake::negotiate(&*self.inner.provider, config, &mut r, &mut w).await? else {
            debug!("NBD client left during the handshake");
            return Ok(());
        };
        debug!(
            size = neg.size,
            read_only = neg.read_only,
            structured = neg.structured,
            base_allocation = neg.base_allocation,
            "NBD transmission starts"
        );
        transmission::run(neg, config, r, w).await
    }
}

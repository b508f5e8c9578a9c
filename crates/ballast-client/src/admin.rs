//! [`AdminClient`]: the cluster's Admin service (pools, volumes, attachments,
//! the placement map) through any of a list of nodes.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ballast_proto::pb::admin_client::AdminClient as PbAdmin;
use ballast_proto::{code_from_grpc, pb, ConvertError, ProtoError};
use ballast_types::{
    validate_addr, validate_name, ApiError, AttachVolume, Attachment, ClusterStatus, CreateVolume, DetachVolume,
    ErrorCode, InitCluster, InitClusterReply, JoinNode, JoinNodeReply, MapVersion, NodeId, PlacementReply, PoolInfo,
    PoolSpec, ResizeVolume, Retryable, ScrubReport, ValidationError, VolumeInfo,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

use crate::{Backoff, ClientConfig, ClientError, TlsConfig};

/// A client of the cluster's Admin service. Every node serves Admin and
/// forwards to the meta leader, so any node will do: give a few.
///
/// Cheap to clone (one `Arc`); clones share channels and the endpoint that
/// last answered. Usable from any task of a Tokio runtime.
///
/// **Routing and retries.** Each call starts at the endpoint that last
/// answered. A failure that may go away (a transport error, `UNAVAILABLE`,
/// `NOT_LEADER`, `STALE_MAP`, `TIMEOUT`, `BUSY`, no answer within
/// [`ClientConfig::rpc_timeout`]) moves the call to the next endpoint after
/// a growing backoff, as for Data calls, until
/// [`ClientConfig::request_deadline`]; then it fails with
/// [`ClientError::Unreachable`] naming the last endpoint and error. A typed
/// refusal that retrying cannot fix is returned at once as
/// [`ClientError::Api`]. Arguments that have a `validate` rule are checked
/// before anything is sent ([`ClientError::Invalid`]).
///
/// **Idempotency.** Reads (`status`, `list_*`, `volume`, `placement`) and
/// `resize_volume`, `delete_volume`, `detach` can be retried freely (a
/// repeated delete or detach may answer `NO_SUCH_VOLUME`/`FENCED` though the
/// first attempt did the work). `init_cluster`, `join_node`, `create_pool`,
/// `create_volume` and `attach` are **not** idempotent: when an attempt's
/// reply is lost (the node failed or the RPC timed out after the meta group
/// committed it), the retry may answer `ALREADY_EXISTS` or `CONFLICT` although
/// the operation succeeded. This client does not hide that: the caller sees
/// the error and can look (`volume`, `list_pools`, `status`) to find out. A
/// read-write `attach` whose first attempt succeeded unseen leaves the volume
/// attached under an epoch nobody holds; only `force` or a detach by an
/// operator clears it.
#[derive(Clone)]
pub struct AdminClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    /// Parsed in `new` (so a bad endpoint fails there); the channel is
    /// created on first use, inside the runtime, and connects lazily.
    targets: Vec<Endpoint>,
    channels: Vec<OnceLock<PbAdmin<Channel>>>,
    config: ClientConfig,
    /// Mutual TLS towards every endpoint (and the Data channels of
    /// [`crate::ClusterExports`] built on this client); `None`: plain.
    tls: Option<TlsConfig>,
    /// Index of the endpoint that last answered.
    current: AtomicUsize,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient").field("endpoints", &self.inner.endpoints).finish()
    }
}

/// What one failed attempt means for the call.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Try the next endpoint.
    Retry,
    /// Return this to the caller.
    Fail(ApiError),
}

/// Decide after a failed attempt at `addr`. A `Status` without our typed
/// details came from below gRPC (connect, reset, h2) or from a proxy: it is
/// retried when its code means "transient", and `UNKNOWN`/`CANCELLED`, which
/// is what a connection dropped mid-call turns into.
fn outcome(addr: &str, err: ProtoError) -> Outcome {
    match err {
        ProtoError::Api(e) if e.is_retryable() => Outcome::Retry,
        ProtoError::Api(e) => Outcome::Fail(e),
        ProtoError::Transport(s) => {
            let code = code_from_grpc(s.code());
            if code.is_retryable() || matches!(s.code(), Code::Unknown | Code::Cancelled) {
                Outcome::Retry
            } else {
                Outcome::Fail(ApiError::new(code, format!("{addr}: {}", s.message())))
            }
        }
        ProtoError::Convert(e) => Outcome::Fail(malformed(addr, &e)),
    }
}

fn malformed(addr: &str, e: &ConvertError) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("malformed reply from {addr}: {e}"))
}

/// The endpoints a call tries, in order: from the one that last answered,
/// round the list, again and again (the deadline ends it).
fn rotation(start: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).cycle().skip(start % n.max(1))
}

fn invalid(what: &str, e: ValidationError) -> ClientError {
    ClientError::Invalid(format!("{what}: {e}"))
}

impl AdminClient {
    /// A client of the nodes at `endpoints` (`host:port` each, at least one).
    /// Connects nothing yet: a node that is down costs time only when a call
    /// gets to it.
    pub fn new(endpoints: Vec<String>, config: ClientConfig) -> Result<Self, ClientError> {
        Self::with_tls(endpoints, config, None)
    }

    /// [`AdminClient::new`] over mutual TLS (`None`: plain HTTP/2). A TLS
    /// failure is never retried: the call fails at once with
    /// [`ClientError::Tls`] naming the endpoint and the problem.
    pub fn with_tls(endpoints: Vec<String>, config: ClientConfig, tls: Option<TlsConfig>) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::Invalid("at least one endpoint is needed".into()));
        }
        let mut targets = Vec::with_capacity(endpoints.len());
        for e in &endpoints {
            validate_addr(e).map_err(|err| invalid("endpoint", err))?;
            let target = ballast_proto::tls::endpoint(e, tls.as_ref())
                .map_err(|err| ClientError::Invalid(format!("endpoint {e:?}: {err}")))?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true);
            targets.push(target);
        }
        let channels = endpoints.iter().map(|_| OnceLock::new()).collect();
        let inner = Inner { endpoints, targets, channels, config, tls, current: AtomicUsize::new(0) };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The TLS settings the client was made with.
    pub fn tls(&self) -> Option<&TlsConfig> {
        self.inner.tls.as_ref()
    }

    /// The endpoints as given to [`AdminClient::new`].
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// Create the cluster with the nodes of `req.endpoints` as its first meta
    /// group. Not idempotent: see the type's documentation.
    pub async fn init_cluster(&self, req: &InitCluster) -> Result<InitClusterReply, ClientError> {
        req.validate().map_err(|e| invalid("init", e))?;
        let msg = pb::InitClusterRequest::from(req.clone());
        self.decoded("init cluster", move |mut c| {
            let msg = msg.clone();
            async move { c.init_cluster(msg).await }
        })
        .await
    }

    /// Register a node. Not idempotent: see the type's documentation.
    pub async fn join_node(&self, req: &JoinNode) -> Result<JoinNodeReply, ClientError> {
        req.validate().map_err(|e| invalid("join", e))?;
        let msg = pb::JoinNodeRequest::from(req.clone());
        self.decoded("join node", move |mut c| {
            let msg = msg.clone();
            async move { c.join_node(msg).await }
        })
        .await
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.decoded("cluster status", |mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await }).await
    }

    /// Start a scrub pass now on every node that is up; returns each node's
    /// report as of the start (its `passes` tell when the new one is done:
    /// watch [`AdminClient::status`]). Idempotent: a node already scrubbing
    /// keeps its pass.
    pub async fn scrub(&self) -> Result<Vec<ScrubReport>, ClientError> {
        self.decoded("scrub", |mut c| async move { c.scrub(pb::ScrubRequest { cluster_id: 0 }).await }).await
    }

    /// Not idempotent: see the type's documentation.
    pub async fn create_pool(&self, spec: &PoolSpec) -> Result<PoolInfo, ClientError> {
        spec.validate().map_err(|e| invalid("pool", e))?;
        let msg = pb::CreatePoolRequest::from(spec.clone());
        self.decoded("create pool", move |mut c| {
            let msg = msg.clone();
            async move { c.create_pool(msg).await }
        })
        .await
    }

    pub async fn list_pools(&self) -> Result<Vec<PoolInfo>, ClientError> {
        self.decoded("list pools", |mut c| async move { c.list_pools(pb::ListPoolsRequest {}).await }).await
    }

    /// Not idempotent: see the type's documentation.
    pub async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo, ClientError> {
        req.validate().map_err(|e| invalid("volume", e))?;
        let msg = pb::CreateVolumeRequest::from(req.clone());
        self.decoded("create volume", move |mut c| {
            let msg = msg.clone();
            async move { c.create_volume(msg).await }
        })
        .await
    }

    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ClientError> {
        self.decoded("list volumes", |mut c| async move { c.list_volumes(pb::ListVolumesRequest {}).await }).await
    }

    /// The volume named `name`; `NO_SUCH_VOLUME` when there is none.
    pub async fn volume(&self, name: &str) -> Result<VolumeInfo, ClientError> {
        validate_name(name).map_err(|e| invalid("volume name", e))?;
        let msg = pb::VolumeByName::from(name);
        self.decoded("get volume", move |mut c| {
            let msg = msg.clone();
            async move { c.get_volume(msg).await }
        })
        .await
    }

    /// Grow a volume (shrinking is refused with `CONFLICT`). Attached clients
    /// see the new size on their next connection.
    pub async fn resize_volume(&self, req: &ResizeVolume) -> Result<VolumeInfo, ClientError> {
        validate_name(&req.name).map_err(|e| invalid("volume name", e))?;
        let msg = pb::ResizeVolumeRequest::from(req.clone());
        self.decoded("resize volume", move |mut c| {
            let msg = msg.clone();
            async move { c.resize_volume(msg).await }
        })
        .await
    }

    /// Refused with `CONFLICT` while the volume is attached read-write.
    pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        validate_name(name).map_err(|e| invalid("volume name", e))?;
        let msg = pb::VolumeByName::from(name);
        self.call("delete volume", move |mut c| {
            let msg = msg.clone();
            async move { c.delete_volume(msg).await }
        })
        .await
        .map(|_| ())
    }

    /// Attach a volume. Read-write bumps the volume's epoch: send the
    /// returned epoch on every write. Refused with `CONFLICT` while another
    /// read-write attachment exists, unless `force` (which fences it). Not
    /// idempotent: see the type's documentation.
    pub async fn attach(&self, req: &AttachVolume) -> Result<Attachment, ClientError> {
        validate_name(&req.name).map_err(|e| invalid("volume name", e))?;
        let msg = pb::AttachVolumeRequest::from(req.clone());
        self.decoded("attach volume", move |mut c| {
            let msg = msg.clone();
            async move { c.attach_volume(msg).await }
        })
        .await
    }

    /// Move every replica off `node`; it then takes no new ones. Returns once
    /// recorded: the moves happen in the background (watch `status`).
    pub async fn drain_node(&self, node: NodeId) -> Result<(), ClientError> {
        let msg = pb::NodeRef { node_id: node.0 };
        self.call("drain node", move |mut c| async move { c.drain_node(msg).await }).await.map(|_| ())
    }

    /// Forget `node`. `CONFLICT` while it still holds replicas or is a meta
    /// group member.
    pub async fn remove_node(&self, node: NodeId) -> Result<(), ClientError> {
        let msg = pb::NodeRef { node_id: node.0 };
        self.call("remove node", move |mut c| async move { c.remove_node(msg).await }).await.map(|_| ())
    }

    /// Release an attachment (`epoch: None` for a read-only one). `FENCED`
    /// when a newer writer has replaced this one.
    pub async fn detach(&self, req: &DetachVolume) -> Result<(), ClientError> {
        validate_name(&req.name).map_err(|e| invalid("volume name", e))?;
        let msg = pb::DetachVolumeRequest::from(req.clone());
        self.call("detach volume", move |mut c| {
            let msg = msg.clone();
            async move { c.detach_volume(msg).await }
        })
        .await
        .map(|_| ())
    }

    /// The placement map, unless `have` is already current (`map: None`).
    /// `MapVersion(0)` always gets the map.
    pub async fn placement(&self, have: MapVersion) -> Result<PlacementReply, ClientError> {
        self.decoded(
            "get placement",
            move |mut c| async move { c.get_placement(pb::GetPlacementRequest::from(have)).await },
        )
        .await
    }

    /// [`AdminClient::call`], then the validated conversion of the reply.
    async fn decoded<P, D, F, Fut>(&self, what: &'static str, f: F) -> Result<D, ClientError>
    where
        D: TryFrom<P, Error = ConvertError>,
        F: Fn(PbAdmin<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<P>, Status>>,
    {
        let (addr, reply) = self.call(what, f).await?;
        D::try_from(reply).map_err(|e| ClientError::Api(malformed(&addr, &e)))
    }

    /// Run `f` on one endpoint after another until one answers, a refusal
    /// that retrying cannot fix arrives, or the deadline passes. Returns the
    /// reply and the endpoint that gave it.
    async fn call<P, F, Fut>(&self, what: &'static str, f: F) -> Result<(String, P), ClientError>
    where
        F: Fn(PbAdmin<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<P>, Status>>,
    {
        let inner = &*self.inner;
        let cfg = inner.config;
        let deadline = Instant::now() + cfg.request_deadline;
        let mut backoff = Backoff::new(&cfg);
        let mut last = String::from("no attempt");
        for at in rotation(inner.current.load(Ordering::Relaxed), inner.endpoints.len()) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let addr = &inner.endpoints[at];
            let timeout = cfg.rpc_timeout.min(deadline - now);
            let err = match tokio::time::timeout(timeout, f(inner.client(at))).await {
                Ok(Ok(reply)) => {
                    inner.current.store(at, Ordering::Relaxed);
                    return Ok((addr.clone(), reply.into_inner()));
                }
                Ok(Err(status)) => {
                    match ballast_proto::tls::connect_failure(&status, inner.tls.is_some()) {
                        // A node that died mid-call looks the same: ask the node.
                        Some(ballast_proto::tls::ConnectFailure::PlainRefused)
                            if !ballast_proto::tls::requires_tls(addr).await => {}
                        Some(f) => return Err(ClientError::Tls(f.at(addr))),
                        None => {}
                    }
                    ProtoError::from(status)
                }
                Err(_) => ProtoError::Api(ApiError::new(ErrorCode::Timeout, format!("no answer in {timeout:?}"))),
            };
            last = format!("{addr}: {err}");
            match outcome(addr, err) {
                Outcome::Fail(e) => {
                    // It answered: start there next time.
                    inner.current.store(at, Ordering::Relaxed);
                    return Err(ClientError::Api(e));
                }
                Outcome::Retry => tracing::debug!("{what} retrying: {last}"),
            }
            backoff.wait().await;
        }
        tracing::warn!("{what} gave up: {last}");
        Err(ClientError::Unreachable(format!(
            "{what}: no endpoint of {:?} answered within {:?}; last: {last}",
            inner.endpoints, cfg.request_deadline
        )))
    }
}

impl Inner {
    fn client(&self, at: usize) -> PbAdmin<Channel> {
        self.channels[at]
            .get_or_init(|| {
                PbAdmin::new(self.targets[at].connect_lazy())
                    .max_decoding_message_size(ballast_proto::MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(ballast_proto::MAX_MESSAGE_SIZE)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ballast_types::{LeaderHint, NodeId};

    use super::*;

    #[test]
    fn rotation_starts_at_the_last_endpoint_that_answered_and_wraps() {
        assert_eq!(rotation(2, 3).take(7).collect::<Vec<_>>(), [2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(rotation(0, 1).take(3).collect::<Vec<_>>(), [0, 0, 0]);
        // A stale index (never happens: the list is fixed) still stays in range.
        assert_eq!(rotation(5, 3).take(2).collect::<Vec<_>>(), [2, 0]);
    }

    #[test]
    fn transient_failures_move_on_and_refusals_return_at_once() {
        let api = |code| ProtoError::Api(ApiError::new(code, "x"));
        for code in [ErrorCode::Unavailable, ErrorCode::NotLeader, ErrorCode::Timeout, ErrorCode::Busy] {
            assert_eq!(outcome("a:1", api(code)), Outcome::Retry, "{code}");
        }
        assert_eq!(outcome("a:1", api(ErrorCode::StaleMap)), Outcome::Retry);
        let hinted = ApiError::not_leader(Some(LeaderHint { node: NodeId(2), addr: "b:1".into() }));
        assert_eq!(outcome("a:1", ProtoError::Api(hinted)), Outcome::Retry);
        for code in [ErrorCode::NoSuchVolume, ErrorCode::AlreadyExists, ErrorCode::Conflict, ErrorCode::Fenced] {
            assert_eq!(outcome("a:1", api(code)), Outcome::Fail(ApiError::new(code, "x")), "{code}");
        }
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::ResourceExhausted, Code::Unknown, Code::Cancelled]
        {
            assert_eq!(outcome("a:1", ProtoError::Transport(Status::new(code, "x"))), Outcome::Retry, "{code:?}");
        }
        let Outcome::Fail(e) = outcome("a:1", ProtoError::Transport(Status::unimplemented("no Admin here"))) else {
            panic!("an untyped refusal is final");
        };
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.message.contains("a:1"), "{e}");
    }

    #[test]
    fn a_malformed_reply_is_internal() {
        let e = ConvertError::missing("VolumeReply.volume");
        let Outcome::Fail(e) = outcome("a:1", ProtoError::Convert(e)) else { panic!("final") };
        assert_eq!(e.code, ErrorCode::Internal);
    }

    #[test]
    fn endpoints_are_validated_before_anything_is_sent() {
        let cfg = ClientConfig::default();
        assert!(matches!(AdminClient::new(vec![], cfg), Err(ClientError::Invalid(_))));
        for bad in ["node1", "node1:0", ":7000", "node 1:7000", "n1:99999"] {
            assert!(matches!(AdminClient::new(vec![bad.into()], cfg), Err(ClientError::Invalid(_))), "{bad}");
        }
        let c = AdminClient::new(vec!["n1:7000".into(), "[::1]:7000".into()], cfg).expect("valid");
        assert_eq!(c.endpoints(), ["n1:7000", "[::1]:7000"]);
    }

    /// Loopback ports nobody listens on: every attempt is refused at once.
    fn unreachable_client() -> AdminClient {
        let cfg = ClientConfig {
            request_deadline: Duration::from_millis(300),
            rpc_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(100),
            min_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        };
        AdminClient::new(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()], cfg).expect("admin")
    }

    #[tokio::test]
    async fn no_answer_before_the_deadline_is_unreachable_and_names_the_last_error() {
        let c = unreachable_client();
        let started = Instant::now();
        let e = c.status().await.expect_err("nobody listens");
        assert!(started.elapsed() >= Duration::from_millis(300), "kept trying until the deadline");
        let ClientError::Unreachable(m) = &e else { panic!("{e}") };
        assert!(m.contains("last: 127.0.0.1:"), "{m}");
        assert!(e.is_retryable());
    }
}

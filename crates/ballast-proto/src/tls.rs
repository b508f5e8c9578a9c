//! Mutual TLS for every gRPC connection: node↔node (Raft, Admin forwarding,
//! map fetches) and client↔node (Data, Admin).
//!
//! **One cluster CA.** Each side holds three PEM files ([`TlsFiles`]): the
//! cluster's CA certificate, its own certificate signed by that CA, and the
//! certificate's private key. A server (every node) requires a client
//! certificate signed by the CA; a client (a node calling a peer, or the CLI)
//! checks that the server's certificate is signed by the CA and names the
//! host it dialled. `ballast cluster certs` writes such a set.
//!
//! **All or nothing.** Without TLS configured every channel is plain
//! `http://` and the server accepts plain HTTP/2, exactly as before; with it,
//! every channel is `https://` and the server accepts only TLS. The two never
//! mix on one node: a plain peer is refused, and [`connect_failure`] turns
//! the resulting transport error into one readable line.
//!
//! **Checked at load.** [`TlsFiles::load`] reads and parses the three files,
//! checks that the key belongs to the certificate and that the certificate
//! chains to the CA, so a wrong file fails at start with the file's name
//! rather than at the first handshake. Rotation is a restart with new files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::{AlertDescription, CertificateError};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The three PEM files of one side of mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate: peers must present a certificate it signed.
    pub ca: PathBuf,
    /// This side's certificate (the chain, leaf first), signed by the CA.
    pub cert: PathBuf,
    /// The private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why TLS cannot be set up. Never retryable: the files must be fixed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TlsError {
    /// Some but not all of CA, certificate and key were given.
    #[error("TLS needs a CA, a certificate and a key together; missing: {}", .missing.join(", "))]
    Incomplete { missing: Vec<&'static str> },
    #[error("cannot read {what} {}: {reason}", .path.display())]
    Read { what: &'static str, path: PathBuf, reason: String },
    #[error("{what} {}: {reason}", .path.display())]
    Invalid { what: &'static str, path: PathBuf, reason: String },
    #[error("bad node address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
}

impl ballast_types::Retryable for TlsError {
    fn is_retryable(&self) -> bool {
        false
    }
}

impl TlsFiles {
    /// The files from three optional settings (flags, environment, config
    /// file): all three is TLS, none is plain, anything else an error naming
    /// what is missing (`ca`, `cert`, `key`).
    pub fn from_parts(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(Self { ca, cert, key })),
            (ca, cert, key) => {
                let missing = [("ca", ca.is_none()), ("cert", cert.is_none()), ("key", key.is_none())]
                    .into_iter()
                    .filter_map(|(name, absent)| absent.then_some(name))
                    .collect();
                Err(TlsError::Incomplete { missing })
            }
        }
    }

    /// Read and check the files (see the module documentation).
    pub fn load(&self) -> Result<TlsConfig, TlsError> {
        let ca_pem = read(&self.ca, "CA certificate")?;
        let cert_pem = read(&self.cert, "certificate")?;
        let key_pem = read(&self.key, "private key")?;
        let invalid = |what, path: &Path, reason: String| TlsError::Invalid { what, path: path.to_path_buf(), reason };

        let ca_certs = certificates(&ca_pem).map_err(|r| invalid("CA certificate", &self.ca, r))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in &ca_certs {
            roots.add(c.clone()).map_err(|e| invalid("CA certificate", &self.ca, e.to_string()))?;
        }
        let chain = certificates(&cert_pem).map_err(|r| invalid("certificate", &self.cert, r))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| invalid("private key", &self.key, format!("no PEM private key found ({e})")))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
            invalid("private key", &self.key, format!("does not belong to {}: {e}", self.cert.display()))
        })?;
        // A node's certificate serves both ends (nodes call each other), a
        // client's only the client end: the client check covers both.
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| invalid("CA certificate", &self.ca, e.to_string()))?;
        verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map_err(|e| {
            invalid("certificate", &self.cert, format!("not usable with CA {}: {}", self.ca.display(), explain(&e)))
        })?;

        Ok(TlsConfig {
            inner: Arc::new(Loaded {
                files: self.clone(),
                ca: Certificate::from_pem(&ca_pem),
                identity: Identity::from_pem(&cert_pem, &key_pem),
            }),
        })
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { what, path: path.to_path_buf(), reason: e.to_string() })
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// Loaded TLS settings, ready to build channels and the server. Cheap to
/// clone (one `Arc`).
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<Loaded>,
}

struct Loaded {
    files: TlsFiles,
    ca: Certificate,
    identity: Identity,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("files", &self.inner.files).finish()
    }
}

/// Two configurations are the same when they were loaded from the same files.
impl PartialEq for TlsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.inner.files == other.inner.files
    }
}

impl Eq for TlsConfig {}

impl TlsConfig {
    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    /// The server side: only TLS, and only clients with a certificate the
    /// cluster CA signed.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.inner.identity.clone())
            .client_ca_root(self.inner.ca.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The client side towards `addr`: the CA as the only trust root, this
    /// side's certificate as the client identity, and the host of `addr` as
    /// the name the server's certificate must carry.
    pub fn client(&self, addr: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.inner.ca.clone())
            .identity(self.inner.identity.clone())
            .domain_name(host_of(addr))
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// How long a TLS handshake may take on either side before the connection
/// is dropped (a peer that is not speaking TLS must not hold a call).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The host part of `host:port` / `[v6]:port`, brackets removed.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// The endpoint for the node at `addr` (`host:port`): `https://` with
/// `tls`, plain `http://` without. Timeouts and other settings are the
/// caller's.
pub fn endpoint(addr: &str, tls: Option<&TlsConfig>) -> Result<Endpoint, TlsError> {
    let bad = |e: &dyn fmt::Display| TlsError::Address { addr: addr.to_string(), reason: e.to_string() };
    match tls {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(|e| bad(&e)),
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| bad(&e))?
            .tls_config(tls.client(addr))
            .map_err(|e| bad(&e)),
    }
}

/// A connection failure that retrying cannot fix: the two ends do not agree
/// on TLS or do not trust each other. [`ConnectFailure::at`] makes the line
/// ("TLS handshake with ADDR failed: certificate signed by unknown authority").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The server's certificate is not signed by our CA.
    UnknownAuthority,
    /// The server refused our certificate (another CA, or none).
    CertificateRefused(String),
    /// The server's certificate does not name the host we dialled.
    WrongName,
    /// A certificate is expired or not yet valid.
    Expired,
    /// We speak TLS, the node does not (or the other way round).
    NotTls,
    /// We speak plain HTTP/2 and the node closed the connection at once:
    /// it most likely requires TLS.
    PlainRefused,
    /// Another TLS problem, as rustls names it.
    Other(String),
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownAuthority => write!(f, "certificate signed by unknown authority"),
            Self::CertificateRefused(why) => {
                write!(f, "the node refused this side's certificate ({why}): is it signed by the cluster CA?")
            }
            Self::WrongName => write!(f, "the node's certificate does not name this address"),
            Self::Expired => write!(f, "certificate expired or not yet valid"),
            Self::NotTls => write!(f, "the node does not speak TLS (is it running without --tls-cert?)"),
            Self::PlainRefused => {
                write!(
                    f,
                    "the node closed a plain connection: it requires TLS (give --tls-ca, --tls-cert and --tls-key)"
                )
            }
            Self::Other(why) => write!(f, "{why}"),
        }
    }
}

impl ConnectFailure {
    /// The one line for a call to `addr` that failed with this.
    pub fn at(&self, addr: &str) -> String {
        match self {
            Self::PlainRefused => format!("cannot talk to {addr}: {self}"),
            _ => format!("TLS handshake with {addr} failed: {self}"),
        }
    }
}

/// Classify a failed call: `Some` when it failed because of TLS (a handshake
/// error on our side, an alert from the peer, or — without TLS on our side —
/// a peer that closed the connection before HTTP/2 started), `None` for
/// anything else (refused connection, timeout, an answer from the node).
pub fn connect_failure(status: &tonic::Status, tls: bool) -> Option<ConnectFailure> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut plain_closed = false;
    while let Some(e) = next {
        if let Some(f) = from_error(e) {
            return Some(f);
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if let Some(f) = h2.get_io().and_then(from_io) {
                return Some(f);
            }
            // A plain client reads a TLS alert or an EOF where the HTTP/2
            // settings frame should be.
            plain_closed |= h2.is_io() || h2.is_go_away() || h2.reason() == Some(h2::Reason::FRAME_SIZE_ERROR);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            plain_closed |= matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        plain_closed |= is_closed_early(e);
        next = e.source();
    }
    (!tls && plain_closed).then_some(ConnectFailure::PlainRefused)
}

/// Whether the node at `addr` refuses plain HTTP/2, i.e. requires TLS:
/// confirms a [`ConnectFailure::PlainRefused`], which a node that died in
/// the middle of a call also produces. Opens one fresh connection and sends
/// the HTTP/2 preface with an empty SETTINGS frame: a plain server answers
/// with a SETTINGS frame, a TLS server with a TLS alert record. A node that
/// cannot be reached, closes or stays silent (down, restarting) is not
/// taken for TLS.
pub async fn requires_tls(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const WAIT: std::time::Duration = std::time::Duration::from_secs(1);
    let Ok(Ok(mut s)) = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await else {
        return false;
    };
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // A write that fails means the node went away after accepting (a
    // node dying or restarting), not that it speaks TLS.
    if s.write_all(&hello).await.is_err() {
        return false;
    }
    let mut head = [0u8; 9];
    match tokio::time::timeout(WAIT, s.read(&mut head)).await {
        // A TLS record (an alert, 0x15, or a handshake, 0x16) where an
        // HTTP/2 frame should be: the node speaks TLS.
        Ok(Ok(n)) if n > 0 => matches!(head[0], 0x15 | 0x16),
        // Closed or silent: a node going down or coming up, not a verdict.
        _ => false,
    }
}

/// hyper's "connection closed before message completed" and the like.
fn is_closed_early(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_incomplete_message() || h.is_closed())
}

fn from_error(e: &(dyn std::error::Error + 'static)) -> Option<ConnectFailure> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(from_rustls(r));
    }
    e.downcast_ref::<std::io::Error>().and_then(from_io)
}

fn from_io(io: &std::io::Error) -> Option<ConnectFailure> {
    io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).map(from_rustls)
}

fn from_rustls(e: &rustls::Error) -> ConnectFailure {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => ConnectFailure::UnknownAuthority,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                ConnectFailure::WrongName
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => ConnectFailure::Expired,
            other => ConnectFailure::Other(format!("invalid certificate: {other:?}")),
        },
        E::AlertReceived(a) => match a {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::DecryptError
            | AlertDescription::AccessDenied => ConnectFailure::CertificateRefused(format!("{a:?}")),
            AlertDescription::CertificateExpired => ConnectFailure::Expired,
            other => ConnectFailure::Other(format!("the node sent TLS alert {other:?}")),
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            ConnectFailure::NotTls
        }
        other => ConnectFailure::Other(other.to_string()),
    }
}

/// Why a certificate was refused at load, in words.
fn explain(e: &rustls::Error) -> String {
    match from_rustls(e) {
        ConnectFailure::Other(s) => s,
        f => f.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_cut_from_addresses() {
        assert_eq!(host_of("node-1:7100"), "node-1");
        assert_eq!(host_of("127.0.0.1:7100"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7100"), "::1");
    }

    #[test]
    fn all_three_files_or_none() {
        assert_eq!(TlsFiles::from_parts(None, None, None), Ok(None));
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            TlsFiles::from_parts(p("ca"), p("c"), p("k")),
            Ok(Some(TlsFiles { ca: "ca".into(), cert: "c".into(), key: "k".into() }))
        );
        let err = TlsFiles::from_parts(p("ca"), None, None).expect_err("incomplete");
        assert_eq!(err, TlsError::Incomplete { missing: vec!["cert", "key"] });
        assert!(err.to_string().contains("missing: cert, key"), "{err}");
        let err = TlsFiles::from_parts(None, p("c"), p("k")).expect_err("incomplete");
        assert_eq!(err, TlsError::Incomplete { missing: vec!["ca"] });
    }

    #[test]
    fn without_tls_endpoints_stay_plain() {
        let ep = endpoint("127.0.0.1:7100", None).expect("endpoint");
        assert_eq!(ep.uri().scheme_str(), Some("http"));
        assert!(matches!(endpoint("not an address", None), Err(TlsError::Address { .. })));
    }

    /// A CA and a leaf it signed, as PEM.
    struct Pki {
        ca_cert: String,
        leaf_cert: String,
        leaf_key: String,
    }

    fn pki(name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        leaf.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
        Pki { ca_cert: ca_cert.pem(), leaf_cert: leaf_cert.pem(), leaf_key: leaf_key.serialize_pem() }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn files(dir: &Path, ca: &str, cert: &str, key: &str) -> TlsFiles {
        TlsFiles { ca: write(dir, "ca.crt", ca), cert: write(dir, "node.crt", cert), key: write(dir, "node.key", key) }
    }

    #[test]
    fn a_matching_set_loads_and_builds_https_endpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = pki("a");
        let tls = files(dir.path(), &a.ca_cert, &a.leaf_cert, &a.leaf_key).load().expect("loads");
        let ep = endpoint("127.0.0.1:7100", Some(&tls)).expect("endpoint");
        assert_eq!(ep.uri().scheme_str(), Some("https"));
        let _ = tls.server();
        assert_eq!(tls.clone(), tls);
    }

    #[test]
    fn each_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (pki("a"), pki("b"));

        let missing = TlsFiles { ca: dir.path().join("nope.crt"), cert: "c".into(), key: "k".into() };
        let err = missing.load().expect_err("missing file");
        assert!(matches!(err, TlsError::Read { what: "CA certificate", .. }), "{err}");
        assert!(err.to_string().contains("nope.crt"), "{err}");

        let err = files(dir.path(), "garbage", &a.leaf_cert, &a.leaf_key).load().expect_err("not PEM");
        assert!(matches!(err, TlsError::Invalid { what: "CA certificate", .. }), "{err}");

        let err = files(dir.path(), &a.ca_cert, &a.leaf_key, &a.leaf_key).load().expect_err("a key as cert");
        assert!(matches!(err, TlsError::Invalid { what: "certificate", .. }), "{err}");

        let err = files(dir.path(), &a.ca_cert, &a.leaf_cert, &a.leaf_cert).load().expect_err("a cert as key");
        assert!(matches!(err, TlsError::Invalid { what: "private key", .. }), "{err}");

        let err = files(dir.path(), &a.ca_cert, &a.leaf_cert, &b.leaf_key).load().expect_err("another key");
        assert!(matches!(err, TlsError::Invalid { what: "private key", .. }), "{err}");
        assert!(err.to_string().contains("does not belong to"), "{err}");

        let err = files(dir.path(), &a.ca_cert, &b.leaf_cert, &b.leaf_key).load().expect_err("another CA");
        assert!(matches!(err, TlsError::Invalid { what: "certificate", .. }), "{err}");
        assert!(err.to_string().contains("unknown authority"), "{err}");
    }

    #[test]
    fn handshake_errors_are_named() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let unknown = io(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert_eq!(from_io(&unknown), Some(ConnectFailure::UnknownAuthority));
        assert_eq!(
            ConnectFailure::UnknownAuthority.at("n1:7100"),
            "TLS handshake with n1:7100 failed: certificate signed by unknown authority"
        );
        assert!(ConnectFailure::PlainRefused.at("n1:7100").starts_with("cannot talk to n1:7100: "));
        let refused = io(rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert!(matches!(from_io(&refused), Some(ConnectFailure::CertificateRefused(_))));
        assert_eq!(from_io(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused)), None);
        // A refused connection is not a TLS problem, with or without TLS.
        let status = tonic::Status::unavailable("tcp connect error");
        assert_eq!(connect_failure(&status, false), None);
        assert_eq!(connect_failure(&status, true), None);
    }
}

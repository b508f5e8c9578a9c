//! What a cluster call ([`crate::AdminClient`], [`crate::MapPlacement`],
//! [`crate::ClusterExports`]) fails with. Device calls keep failing with
//! `ballast_nbd::DeviceError`, which is what the NBD server needs.

use ballast_nbd::{DeviceError, DeviceErrorKind};
use ballast_types::{ApiError, Retryable};
use thiserror::Error;

/// Why a cluster call failed. Matchable: a CLI prints it, a program decides
/// with [`Retryable`] whether trying again later can help.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    /// The cluster answered and refused with a typed error (`NO_SUCH_VOLUME`,
    /// `CONFLICT`, …). A reply that broke the wire rules is
    /// `INTERNAL`. Retryable only when its code is.
    #[error(transparent)]
    Api(ApiError),
    /// No endpoint answered usefully before the request deadline; the message
    /// names the endpoint tried last and its error. Retryable.
    #[error("cluster unreachable: {0}")]
    Unreachable(String),
    /// The caller's argument is wrong (a malformed endpoint, an invalid
    /// name); nothing was sent. Never retryable.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A TLS handshake failed ("TLS handshake with ADDR failed: certificate
    /// signed by unknown authority"), or one side speaks TLS and the other
    /// does not. Never retryable: the certificates or flags must change.
    #[error("{0}")]
    Tls(String),
}

impl Retryable for ClientError {
    fn is_retryable(&self) -> bool {
        match self {
            Self::Api(e) => e.code.is_retryable(),
            Self::Unreachable(_) => true,
            Self::Invalid(_) | Self::Tls(_) => false,
        }
    }
}

impl From<ApiError> for ClientError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<ClientError> for DeviceError {
    /// For the NBD layer, which reports it to the client and its log.
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api(e) => crate::volume::device_error(&e),
            ClientError::Unreachable(m) => DeviceError::new(DeviceErrorKind::Io, format!("cluster unreachable: {m}")),
            ClientError::Invalid(m) => DeviceError::new(DeviceErrorKind::Invalid, m),
            ClientError::Tls(m) => DeviceError::new(DeviceErrorKind::Io, m),
        }
    }
}

#[cfg(test)]
mod tests {
    use ballast_types::ErrorCode;

    use super::*;

    #[test]
    fn retry_classification_follows_the_error_code() {
        for code in ErrorCode::ALL {
            let e = ClientError::Api(ApiError::new(code, "x"));
            assert_eq!(e.is_retryable(), code.is_retryable(), "{code}");
        }
        assert!(ClientError::Api(ApiError::new(ErrorCode::StaleMap, "x")).is_retryable());
        assert!(!ClientError::Api(ApiError::new(ErrorCode::Conflict, "x")).is_retryable());
        assert!(!ClientError::Api(ApiError::new(ErrorCode::Fenced, "x")).is_retryable());
        assert!(ClientError::Unreachable("a:1: connection refused".into()).is_retryable());
        assert!(!ClientError::Invalid("bad endpoint".into()).is_retryable());
    }

    #[test]
    fn device_errors_keep_their_kind() {
        let d = DeviceError::from(ClientError::Api(ApiError::new(ErrorCode::Fenced, "x")));
        assert_eq!(d.kind, DeviceErrorKind::NotPermitted);
        assert_eq!(DeviceError::from(ClientError::Unreachable("x".into())).kind, DeviceErrorKind::Io);
        assert_eq!(DeviceError::from(ClientError::Invalid("x".into())).kind, DeviceErrorKind::Invalid);
    }
}

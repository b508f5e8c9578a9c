//! Errors at the wire boundary: what is wrong with a received message
//! ([`ConvertError`]), what a call as a whole failed with ([`ProtoError`]), and
//! how typed errors travel inside a `tonic::Status`.
//!
//! Data and Raft replies carry an [`ApiError`] in-band (their `error` field),
//! so the hot path never builds a `Status`. Admin calls fail with a `Status`
//! whose `details` bytes are an encoded `pb::Error`: the gRPC code keeps
//! generic tools (grpcurl, load balancers) informed, the details keep the
//! typed code, leader hint and map version for our own clients.

use bytes::Bytes;
use prost::Message;
use thiserror::Error;
use tonic::{Code, Status};

use ballast_types::{ApiError, ErrorCode, LeaderHint, MapVersion, NodeId, Retryable, ValidationError};

use crate::pb;

/// A received message broke a rule. `field` names the message and field
/// (`"WriteRequest.data"`), so the log line says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("field `{field}`: {problem}")]
pub struct ConvertError {
    pub field: &'static str,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Problem {
    /// Required and absent, or zero where zero means "absent".
    #[error("required but missing")]
    Missing,
    #[error("unknown enum value {0}")]
    UnknownEnum(i32),
    /// Present where this message must not carry it.
    #[error("not allowed here")]
    Unexpected,
    #[error(transparent)]
    Invalid(ValidationError),
}

impl ConvertError {
    pub fn new(field: &'static str, problem: Problem) -> Self {
        Self { field, problem }
    }

    pub fn missing(field: &'static str) -> Self {
        Self::new(field, Problem::Missing)
    }

    pub fn invalid(field: &'static str, e: ValidationError) -> Self {
        Self::new(field, Problem::Invalid(e))
    }

    /// The error code a server answers this with: `BadChecksum` for a CRC
    /// mismatch (the bytes were damaged in transit), `Invalid` for the rest.
    pub fn code(&self) -> ErrorCode {
        match self.problem {
            Problem::Invalid(ValidationError::CrcMismatch { .. }) => ErrorCode::BadChecksum,
            _ => ErrorCode::Invalid,
        }
    }
}

impl Retryable for ConvertError {
    /// Only a checksum mismatch: resending the same bytes can succeed.
    fn is_retryable(&self) -> bool {
        self.code().is_retryable()
    }
}

impl From<ConvertError> for ApiError {
    fn from(e: ConvertError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<ConvertError> for Status {
    fn from(e: ConvertError) -> Self {
        status_from_api_error(&ApiError::from(e))
    }
}

/// Attach a field name to a domain validation result.
pub(crate) trait Field<T> {
    fn field(self, name: &'static str) -> Result<T, ConvertError>;
}

impl<T> Field<T> for Result<T, ValidationError> {
    fn field(self, name: &'static str) -> Result<T, ConvertError> {
        self.map_err(|e| ConvertError::invalid(name, e))
    }
}

/// `Some` or `Missing`.
pub(crate) fn required<T>(v: Option<T>, field: &'static str) -> Result<T, ConvertError> {
    v.ok_or(ConvertError::missing(field))
}

/// Non-zero or `Missing`: proto3 cannot tell 0 from absent, so ids start at 1.
pub(crate) fn nonzero(v: u64, field: &'static str) -> Result<u64, ConvertError> {
    if v == 0 {
        Err(ConvertError::missing(field))
    } else {
        Ok(v)
    }
}

/// Everything a call can fail with, as a client sees it.
#[derive(Debug, Error)]
pub enum ProtoError {
    /// The peer answered with a typed error.
    #[error(transparent)]
    Api(ApiError),
    /// The peer's message broke a rule (a bug, a version skew or damage in transit).
    #[error("malformed reply: {0}")]
    Convert(#[from] ConvertError),
    /// The call failed below us (connect, deadline, h2 reset) or the peer sent
    /// a `Status` without typed details.
    #[error("rpc failed: {0}")]
    Transport(Status),
}

impl ProtoError {
    /// The best typed code for this failure, for metrics and retry decisions.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Api(e) => e.code,
            Self::Convert(e) => e.code(),
            Self::Transport(s) => code_from_grpc(s.code()),
        }
    }
}

impl ProtoError {
    /// This failure as a typed error (a transport failure keeps its best code).
    pub fn into_api(self) -> ApiError {
        match self {
            Self::Api(e) => e,
            Self::Convert(e) => e.into(),
            Self::Transport(s) => ApiError::new(code_from_grpc(s.code()), s.message().to_string()),
        }
    }
}

impl Retryable for ProtoError {
    fn is_retryable(&self) -> bool {
        self.code().is_retryable()
    }
}

impl From<ApiError> for ProtoError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

/// A `Status` with typed details becomes `Api`; anything else stays `Transport`.
impl From<Status> for ProtoError {
    fn from(s: Status) -> Self {
        match api_error_from_status(&s) {
            Some(e) => Self::Api(e),
            None => Self::Transport(s),
        }
    }
}

impl From<ProtoError> for Status {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Api(e) => status_from_api_error(&e),
            ProtoError::Convert(e) => e.into(),
            ProtoError::Transport(s) => s,
        }
    }
}

/// The `Status` an Admin handler returns for `e`: a matching gRPC code, the
/// message, and `e` encoded as `pb::Error` in the details.
pub fn status_from_api_error(e: &ApiError) -> Status {
    let details = Bytes::from(pb::Error::from(e.clone()).encode_to_vec());
    Status::with_details(grpc_code(e.code), e.message.clone(), details)
}

/// The typed error inside a `Status` built by [`status_from_api_error`];
/// `None` when the details are absent or not ours.
pub fn api_error_from_status(s: &Status) -> Option<ApiError> {
    let e = pb::Error::decode(s.details()).ok()?;
    (e.code != pb::ErrorCode::Unspecified as i32).then(|| e.into())
}

/// gRPC code used for each error code in a `Status`. Retryable codes map to
/// codes generic gRPC clients also treat as transient where one fits.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::NotLeader | ErrorCode::StaleMap | ErrorCode::BadChecksum => Code::Aborted,
        ErrorCode::Fenced | ErrorCode::Conflict | ErrorCode::WrongCluster | ErrorCode::VersionMismatch => {
            Code::FailedPrecondition
        }
        ErrorCode::NoSuchVolume | ErrorCode::NotFound => Code::NotFound,
        ErrorCode::OutOfRange => Code::OutOfRange,
        ErrorCode::Corrupt => Code::DataLoss,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Invalid => Code::InvalidArgument,
        ErrorCode::Timeout => Code::DeadlineExceeded,
        ErrorCode::Busy | ErrorCode::NoSpace => Code::ResourceExhausted,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::Internal | ErrorCode::Unknown => Code::Internal,
    }
}

/// Best guess for a `Status` without typed details (from tonic/hyper or a
/// proxy). Only codes that mean "try again" map to retryable error codes.
pub fn code_from_grpc(code: Code) -> ErrorCode {
    match code {
        Code::Unavailable => ErrorCode::Unavailable,
        Code::DeadlineExceeded => ErrorCode::Timeout,
        Code::ResourceExhausted => ErrorCode::Busy,
        Code::InvalidArgument => ErrorCode::Invalid,
        Code::NotFound => ErrorCode::NotFound,
        Code::AlreadyExists => ErrorCode::AlreadyExists,
        Code::FailedPrecondition => ErrorCode::Conflict,
        Code::OutOfRange => ErrorCode::OutOfRange,
        Code::DataLoss => ErrorCode::Corrupt,
        Code::Unauthenticated | Code::PermissionDenied => ErrorCode::Unauthenticated,
        _ => ErrorCode::Internal,
    }
}

impl From<ErrorCode> for pb::ErrorCode {
    fn from(c: ErrorCode) -> Self {
        use pb::ErrorCode as P;
        match c {
            ErrorCode::NotLeader => P::NotLeader,
            ErrorCode::StaleMap => P::StaleMap,
            ErrorCode::Fenced => P::Fenced,
            ErrorCode::NoSuchVolume => P::NoSuchVolume,
            ErrorCode::OutOfRange => P::OutOfRange,
            ErrorCode::Corrupt => P::Corrupt,
            ErrorCode::Unavailable => P::Unavailable,
            ErrorCode::Invalid => P::Invalid,
            ErrorCode::Timeout => P::Timeout,
            ErrorCode::Busy => P::Busy,
            ErrorCode::NotFound => P::NotFound,
            ErrorCode::AlreadyExists => P::AlreadyExists,
            ErrorCode::Conflict => P::Conflict,
            ErrorCode::NoSpace => P::NoSpace,
            ErrorCode::Unauthenticated => P::Unauthenticated,
            ErrorCode::WrongCluster => P::WrongCluster,
            ErrorCode::VersionMismatch => P::VersionMismatch,
            ErrorCode::BadChecksum => P::BadChecksum,
            // Only a peer can produce Unknown; passing it on says nothing more.
            ErrorCode::Internal | ErrorCode::Unknown => P::Internal,
        }
    }
}

/// Decoding never fails: an unknown value is [`ErrorCode::Unknown`] (a newer
/// peer), `UNSPECIFIED` is `Internal` (a peer bug).
pub fn error_code_from_wire(v: i32) -> ErrorCode {
    use pb::ErrorCode as P;
    match P::try_from(v) {
        Err(_) => ErrorCode::Unknown,
        Ok(p) => match p {
            P::Unspecified | P::Internal => ErrorCode::Internal,
            P::NotLeader => ErrorCode::NotLeader,
            P::StaleMap => ErrorCode::StaleMap,
            P::Fenced => ErrorCode::Fenced,
            P::NoSuchVolume => ErrorCode::NoSuchVolume,
            P::OutOfRange => ErrorCode::OutOfRange,
            P::Corrupt => ErrorCode::Corrupt,
            P::Unavailable => ErrorCode::Unavailable,
            P::Invalid => ErrorCode::Invalid,
            P::Timeout => ErrorCode::Timeout,
            P::Busy => ErrorCode::Busy,
            P::NotFound => ErrorCode::NotFound,
            P::AlreadyExists => ErrorCode::AlreadyExists,
            P::Conflict => ErrorCode::Conflict,
            P::NoSpace => ErrorCode::NoSpace,
            P::Unauthenticated => ErrorCode::Unauthenticated,
            P::WrongCluster => ErrorCode::WrongCluster,
            P::VersionMismatch => ErrorCode::VersionMismatch,
            P::BadChecksum => ErrorCode::BadChecksum,
        },
    }
}

impl From<ApiError> for pb::Error {
    fn from(e: ApiError) -> Self {
        pb::Error {
            code: pb::ErrorCode::from(e.code) as i32,
            message: e.message,
            leader_hint: e.leader_hint.map(|h| pb::LeaderHint { node_id: h.node.0, addr: h.addr }),
            map_version: e.map_version.map_or(0, |v| v.0),
        }
    }
}

/// Lenient on purpose: an error reply is decoded even when its optional parts
/// are malformed (a hint without a node is dropped), so the code gets through.
impl From<pb::Error> for ApiError {
    fn from(e: pb::Error) -> Self {
        ApiError {
            code: error_code_from_wire(e.code),
            message: e.message,
            leader_hint: e
                .leader_hint
                .filter(|h| h.node_id != 0)
                .map(|h| LeaderHint { node: NodeId(h.node_id), addr: h.addr }),
            map_version: (e.map_version != 0).then_some(MapVersion(e.map_version)),
        }
    }
}

/// A reply message that may carry an in-band error (Data and Raft replies).
/// Clients call `into_result` right after the RPC returns: the error field
/// becomes `ProtoError::Api`, the body is validated into domain types.
pub trait Reply {
    type Ok;
    fn into_result(self) -> Result<Self::Ok, ProtoError>;
}

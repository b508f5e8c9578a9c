//! The join token on node-to-node traffic.
//!
//! A cluster started with a join token gates two things with it: who may join
//! (the token travels in `JoinNode`), and who may speak Raft to its nodes.
//! Every call of the `Raft` service (hello, votes, appends, snapshots, block
//! fetches and repairs) carries the token in the [`TOKEN_HEADER`] metadata;
//! a node with a token refuses a call without it, or with another one, with
//! `UNAUTHENTICATED` "join token missing or wrong" before the handler runs.
//!
//! Without TLS the token crosses the network in clear, like everything else;
//! with TLS it is one more gate after the certificate check. Clients of the
//! `Data` and `Admin` services do not present it: they are gated by client
//! certificates when TLS is configured.

use std::sync::Arc;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::pb::raft_client::RaftClient;

/// The metadata key that carries the join token on `Raft` calls.
pub const TOKEN_HEADER: &str = "ballast-join-token";

/// What a node without the right token is told.
pub const REFUSED: &str = "join token missing or wrong";

/// A join token that cannot travel as gRPC metadata (it must be visible ASCII).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the join token must be visible ASCII without spaces")]
pub struct InvalidToken;

/// Adds this node's join token (if it has one) to every outgoing call.
#[derive(Clone, Default)]
pub struct PresentToken(Option<AsciiMetadataValue>);

impl PresentToken {
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        token.map(parse).transpose().map(Self)
    }
}

impl std::fmt::Debug for PresentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "PresentToken(<redacted>)" } else { "PresentToken(none)" })
    }
}

impl Interceptor for PresentToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert(TOKEN_HEADER, v.clone());
        }
        Ok(request)
    }
}

/// Refuses every incoming call that does not carry this node's join token;
/// lets everything through when the node has none.
#[derive(Clone, Default)]
pub struct RequireToken(Option<Arc<[u8]>>);

impl RequireToken {
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        token.map(|t| parse(t).map(|_| Arc::from(t.as_bytes()))).transpose().map(Self)
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else { return Ok(request) };
        let presented = request.metadata().get(TOKEN_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if tokens_match(expected, presented) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(REFUSED))
        }
    }
}

fn parse(token: &str) -> Result<AsciiMetadataValue, InvalidToken> {
    if token.is_empty() || token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(InvalidToken);
    }
    MetadataValue::try_from(token).map_err(|_| InvalidToken)
}

/// Equality whose time depends only on the lengths, never on where the
/// first differing byte is.
pub fn tokens_match(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != presented.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ presented.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

/// A `Raft` client that presents the join token, with the message limits of
/// [`crate::MAX_MESSAGE_SIZE`].
pub type PeerClient = RaftClient<InterceptedService<Channel, PresentToken>>;

/// The [`PeerClient`] over `channel`.
pub fn peer_client(channel: Channel, token: &PresentToken) -> PeerClient {
    RaftClient::with_interceptor(channel, token.clone())
        .max_decoding_message_size(crate::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(crate::MAX_MESSAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut().insert(TOKEN_HEADER, t.parse().expect("ascii"));
        }
        r
    }

    #[test]
    fn a_node_with_a_token_refuses_calls_without_it() {
        let mut gate = RequireToken::new(Some("s3cret")).expect("token");
        assert!(gate.call(with(Some("s3cret"))).is_ok());
        for wrong in [None, Some("s3cre"), Some("s3cret2"), Some("other")] {
            let e = gate.call(with(wrong)).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert_eq!(e.message(), REFUSED);
        }
        let mut open = RequireToken::new(None).expect("no token");
        assert!(open.call(with(None)).is_ok());
        assert!(open.call(with(Some("anything"))).is_ok());
    }

    #[test]
    fn the_presented_token_passes_the_gate() {
        let mut present = PresentToken::new(Some("s3cret")).expect("token");
        let mut gate = RequireToken::new(Some("s3cret")).expect("token");
        assert!(gate.call(present.call(Request::new(())).expect("present")).is_ok());
        let mut none = PresentToken::new(None).expect("none");
        assert!(gate.call(none.call(Request::new(())).expect("present")).is_err());
        assert_eq!(format!("{present:?}"), "PresentToken(<redacted>)");
    }

    #[test]
    fn tokens_that_cannot_travel_are_refused() {
        for bad in ["", "has space", "tab\t", "é"] {
            assert!(PresentToken::new(Some(bad)).is_err(), "{bad:?}");
            assert!(RequireToken::new(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn comparison_needs_equal_length_and_bytes() {
        assert!(tokens_match(b"", b""));
        assert!(!tokens_match(b"", b"a"));
        assert!(!tokens_match(b"ab", b"a"));
        assert!(tokens_match(b"ab", b"ab"));
    }
}

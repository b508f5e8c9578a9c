//! Ballast's gRPC wire protocol: the tonic/prost code generated from
//! `proto/ballast/v1/ballast.proto`, and the conversions that turn its
//! messages into `ballast_types` domain values.
//!
//! **Protobuf stops here.** Handlers convert every request with `TryFrom`
//! before doing anything with it; conversion validates (required fields,
//! ranges, names, the CRC32C of write payloads, the references inside a
//! placement map) and fails with a [`ConvertError`] naming the field. Replies
//! are built with `From<domain>` and, on the client, checked the same way
//! (Data/Raft replies through [`Reply::into_result`]). Nothing past the RPC
//! layer should hold a `pb::` type.
//!
//! Errors: Data and Raft replies carry a typed `ApiError` in-band; Admin calls
//! fail with a `tonic::Status` built by [`status_from_api_error`], which
//! [`ProtoError::from`] turns back into the typed error on the client.
//!
//! Read first: `docs/wire-format.md`, then `error.rs`, `data.rs`, `admin.rs`.

mod admin;
pub mod auth;
mod data;
mod error;
pub mod tls;

pub use auth::{peer_client, PeerClient, PresentToken, RequireToken};
pub use data::SnapshotSequencer;
pub use error::{
    api_error_from_status, code_from_grpc, error_code_from_wire, grpc_code, status_from_api_error, ConvertError,
    Problem, ProtoError, Reply,
};
pub use tls::{ConnectFailure, TlsConfig, TlsError, TlsFiles};

/// Generated messages, clients (`pb::data_client::DataClient`, …) and server
/// traits (`pb::data_server::Data`, …). Use them only inside RPC glue.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("ballast.v1");
}

/// Set as `max_decoding_message_size`/`max_encoding_message_size` on every
/// Data client and server: tonic's 4 MiB default is below a 32 MiB write
/// ([`ballast_types::MAX_IO_LEN`]) plus its envelope.
pub const MAX_MESSAGE_SIZE: usize = ballast_types::MAX_IO_LEN as usize + (1 << 20);

impl std::fmt::Debug for pb::JoinNodeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinNodeRequest")
            .field("node_id", &self.node_id)
            .field("addr", &self.addr)
            .field("zone", &self.zone)
            .field("disks", &self.disks)
            .field("token", &"<redacted>")
            .field("protocol_version", &self.protocol_version)
            .finish()
    }
}

impl std::fmt::Debug for pb::AssignIdentityRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssignIdentityRequest")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field("meta_members", &self.meta_members)
            .field("join_token", &"<redacted>")
            .finish()
    }
}

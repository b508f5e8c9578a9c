//! The Ballast storage node process: gRPC services, the multi-raft router and
//! node assembly.
//!
//! Read first: [`node`] (what a node owns and how it starts and stops), then
//! the three RPC modules, which are the only places that see `pb::` types:
//!
//! - [`transport`]: `ballast_raft::Transport` over tonic — one lazily
//!   connected channel per peer, shared by every group; snapshots as a
//!   client-streaming call of `ShardSnapshot` frames.
//! - [`raft_service`]: the receiving side, routing peer messages by group.
//! - [`data_service`]: client reads and writes, routed through a
//!   [`ShardLocator`] to the local replica of the owning shard; leaders only.
//! - [`manifest`]: which replicas live on each disk, reopened at start.
//! - [`router`]: the registry of running replicas ([`MultiRaft`]).
//!
//! Invariants: nothing is proposed or answered before the request passed
//! validation (CRC32C included); a read never returns bytes whose stored
//! checksum failed (`CORRUPT` instead); every refusal is a typed, in-band
//! error with a leader hint when one is known.

pub mod admin_service;
pub mod data_service;
mod error;
pub mod faults;
pub mod identity;
pub mod integrity;
pub mod manifest;
pub mod metrics;
pub mod node;
pub mod raft_service;
mod realign;
mod reconcile;
mod repair;
pub mod router;
pub mod scrub;
pub mod transport;

pub use ballast_raft::ShardConfig;
pub use data_service::{DataService, HashPlacement, MapLocator, ShardLocator};
pub use error::NodeError;
pub use identity::Identity;
pub use node::{Node, NodeConfig, NodeHandle};
pub use raft_service::RaftService;
pub use router::{MultiRaft, Replica};
pub use transport::GrpcTransport;

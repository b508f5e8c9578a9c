//! The Ballast thin client: the Admin API of a cluster, and a volume of the
//! replicated store as a [`ballast_nbd::BlockDevice`].
//!
//! Read first: [`RemoteVolume`] (how one NBD request becomes per-chunk Data
//! RPCs), then [`ClientPool`] (channels and the leader cache shared by every
//! volume) and [`Placement`] (which shard holds a chunk, and which nodes may
//! serve it). [`AdminClient`] talks to the meta group through any node;
//! [`MapPlacement`] routes with the cluster's placement map and
//! [`ClusterExports`] serves the cluster's volumes to an NBD server.
//!
//! Routing: a request is cut at chunk boundaries ([`Geometry::chunk_spans`]);
//! every piece goes to the cached leader of its shard, all pieces concurrently.
//! `NOT_LEADER` with a hint moves the cache to the hinted address; without
//! one, and on `UNAVAILABLE`, `STALE_MAP`, transport failures or a per-RPC
//! timeout, the client forgets the leader and rotates through the shard's
//! nodes with a short, growing backoff, until the per-request deadline
//! ([`ClientConfig::request_deadline`], 30 s by default). So a leader failover
//! stalls I/O for a few seconds and returns no error. Whenever a node's answer
//! suggests the placement is out of date, the client tells the [`Placement`]
//! ([`Placement::stale`]), which may refetch the map in the background.
//!
//! Errors that retrying cannot fix are returned at once: `FENCED` (another
//! writer attached: `NotPermitted`), `CORRUPT` (`Io`), `OUT_OF_RANGE` and
//! `INVALID` (`Invalid`). Writes are blind overwrites, so resending one whose
//! outcome is unknown is safe. Admin calls are not all idempotent: see
//! [`AdminClient`].
//!
//! Protobuf stops inside this crate: every public type speaks
//! `ballast_types`.
//!
//! [`Geometry::chunk_spans`]: ballast_types::Geometry::chunk_spans

use std::time::Duration;

use ballast_types::{shard_index, ApiError, ShardId, VolumeId};

mod admin;
mod error;
mod exports;
mod map;
pub mod metrics;
mod volume;

pub use admin::AdminClient;
/// TLS settings, re-exported so users of this crate need not name the RPC crate.
pub use ballast_proto::tls::{TlsConfig, TlsError, TlsFiles};
pub use error::ClientError;
pub use exports::ClusterExports;
pub use map::MapPlacement;
pub use volume::{ClientPool, RemoteExports, RemoteVolume, VolumeSpec};

/// Where the chunks of a volume live, as far as the client knows.
///
/// Called on the I/O path of every request, so implementations answer from
/// memory and never block on the network: [`MapPlacement`] serves the
/// cluster's placement map, [`HashPlacement`] a fixed pool (the same hash as
/// `ballast_node::HashPlacement`).
pub trait Placement: Send + Sync + 'static {
    /// The shard holding `chunk` of `volume`.
    fn shard_of(&self, volume: VolumeId, chunk: u64) -> Result<ShardId, ApiError>;

    /// Addresses (`host:port`) of the nodes that may serve `shard`, the most
    /// likely leader first; the client tries the first one when it does not
    /// know the leader, then the others in turn.
    fn nodes(&self, shard: ShardId) -> Vec<String>;

    /// The caller saw evidence the map is out of date for this shard (a node
    /// answered `NOT_LEADER` without a usable hint, `STALE_MAP` or
    /// `NO_SUCH_VOLUME`, or did not answer). Must return at once; an
    /// implementation may start a refresh in the background. A fixed
    /// placement ignores it.
    fn stale(&self, shard: ShardId) {
        let _ = shard;
    }
}

/// Every volume spread over shards `first_shard .. first_shard + shards` by
/// `ballast_types::shard_index`, each shard replicated on all of `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPlacement {
    pub first_shard: u32,
    pub shards: u32,
    pub nodes: Vec<String>,
}

impl Placement for HashPlacement {
    fn shard_of(&self, volume: VolumeId, chunk: u64) -> Result<ShardId, ApiError> {
        Ok(ShardId(self.first_shard + shard_index(volume, chunk, self.shards)))
    }

    fn nodes(&self, _shard: ShardId) -> Vec<String> {
        self.nodes.clone()
    }
}

/// Timeouts and retry pacing of the client, for Data and Admin calls alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// How long one device call or Admin call may keep retrying before it
    /// fails (`Io` for a device, [`ClientError::Unreachable`] for Admin).
    pub request_deadline: Duration,
    /// Longest wait for one RPC; a node that does not answer in time is
    /// treated like an unreachable one.
    pub rpc_timeout: Duration,
    /// Connect timeout of each channel.
    pub connect_timeout: Duration,
    /// First backoff after a failed attempt; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            request_deadline: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
        }
    }
}

/// The pause between attempts: `min_backoff`, doubling up to `max_backoff`.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(config: &ClientConfig) -> Self {
        Self { next: config.min_backoff, max: config.max_backoff }
    }

    /// The next pause, advancing the sequence.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_placement_matches_the_shard_hash() {
        let p = HashPlacement { first_shard: 3, shards: 4, nodes: vec!["a:1".into()] };
        for chunk in 0..64 {
            assert_eq!(p.shard_of(VolumeId(9), chunk).expect("shard").0, 3 + shard_index(VolumeId(9), chunk, 4));
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let cfg = ClientConfig {
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            ..ClientConfig::default()
        };
        let mut b = Backoff::new(&cfg);
        let got: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(got, [20, 40, 80, 100, 100]);
    }
}

//! The node's `/metrics`: gauges computed from the node's state at each
//! scrape (identity, replicas, leaders, map version, under-replicated
//! shards), then every series of the process-wide registry (Raft log writer,
//! commit and apply latency, rebuild bytes, the Data service's requests).
//!
//! [`MeteredData`] wraps the `Data` service and counts at the RPC boundary:
//! requests, bytes, latency and errors by op, and checksum failures (a write
//! payload that arrived damaged, `BAD_CHECKSUM`; a stored block that failed
//! its CRC32C, `CORRUPT`).

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use ballast_metrics::{global, latency_buckets, Counter, Histogram, Registry, Unit};
use ballast_proto::pb;
use ballast_proto::pb::data_server::Data;
use tonic::{Request, Response, Status};

use crate::node::NodeInner;

/// The node's state gauges: name and help. Rendered at each scrape.
pub const STATE_GAUGES: [(&str, &str); 6] = [
    ("ballast_node_info", "This node's identity (0 before it joins a cluster); the value is 1."),
    ("ballast_node_shard_replicas", "Shard replicas running on this node."),
    ("ballast_node_shard_leaders", "Shards this node leads."),
    ("ballast_node_meta_leader", "1 when this node leads the meta group."),
    ("ballast_node_map_version", "Version of the placement map this node holds."),
    (
        "ballast_shards_under_replicated",
        "Shards with fewer voters on nodes the map marks up than their pool's replication factor \
         (reported by the meta leader only).",
    ),
];

/// What scrub ([`crate::scrub`]) counts.
pub(crate) struct ScrubMetrics {
    pub bytes: Arc<Counter>,
    pub blocks: Arc<Counter>,
    pub errors: Arc<Counter>,
    pub repaired: Arc<Counter>,
    pub unrepaired: Arc<Counter>,
    pub passes: Arc<Counter>,
    pub divergent: Arc<Counter>,
    pub realigned: Arc<Counter>,
    pub unrealigned: Arc<Counter>,
    pub no_majority: Arc<Counter>,
}

pub(crate) static SCRUB: LazyLock<ScrubMetrics> = LazyLock::new(|| {
    let r = global();
    ScrubMetrics {
        bytes: r.counter(
            "ballast_scrub_bytes_total",
            "Stored block bytes read and verified by scrub on this node.",
            &[],
        ),
        blocks: r.counter("ballast_scrub_blocks_total", "Stored blocks read and verified by scrub on this node.", &[]),
        errors: r.counter(
            "ballast_scrub_errors_total",
            "Blocks that scrub found failing their CRC32C on this node's replicas.",
            &[],
        ),
        repaired: r.counter(
            "ballast_scrub_repaired_total",
            "Damaged blocks scrub found on this node that were then repaired from a healthy replica.",
            &[],
        ),
        unrepaired: r.counter(
            "ballast_scrub_unrepaired_total",
            "Damaged blocks scrub found on this node that could not be repaired (no healthy copy, or the repair \
             failed; the next pass retries).",
            &[],
        ),
        passes: r.counter("ballast_scrub_passes_total", "Scrub passes finished on this node.", &[]),
        divergent: r.counter(
            "ballast_scrub_divergent_total",
            "Intact block copies that differed from a strict majority of their shard's voters, found by scrub on \
             the shards this node leads (one per replica and block).",
            &[],
        ),
        realigned: r.counter(
            "ballast_scrub_realigned_total",
            "Divergent copies scrub found on the shards this node leads that equal the majority after a realign.",
            &[],
        ),
        unrealigned: r.counter(
            "ballast_scrub_unrealigned_total",
            "Divergent copies scrub found on the shards this node leads that were not realigned (written \
             meanwhile, or no majority copy to send; the next pass retries).",
            &[],
        ),
        no_majority: r.counter(
            "ballast_scrub_no_majority_total",
            "Blocks whose intact copies differed with no value held by a strict majority of the voters (left as \
             they are; needs an operator).",
            &[],
        ),
    }
});

/// Count `n` stored blocks that failed their checksum on a read this node
/// then answered from a healthy replica (read repair).
pub(crate) fn count_stored_checksum_errors(n: u64) {
    DATA.checksum_stored.add(n);
}

/// What self-healing and balancing did on this node (`crate::repair`).
pub(crate) struct HealMetrics {
    /// Snapshot bytes this node streamed to replicas being built.
    pub rebuild_sent_bytes: Arc<Counter>,
    /// Moves this node's shard leaders completed (repairs, drains, rebalancing).
    pub moves_done: Arc<Counter>,
    /// Rebalancing moves proposed while this node led the meta group.
    pub rebalance_moves: Arc<Counter>,
    /// Leaderships this node's shard leaders handed over for leader balancing.
    pub leader_transfers: Arc<Counter>,
    /// Lost meta members replaced while this node led the meta group.
    pub meta_replacements: Arc<Counter>,
}

static HEAL: LazyLock<HealMetrics> = LazyLock::new(|| {
    let r = global();
    HealMetrics {
        rebuild_sent_bytes: r.counter(
            "ballast_rebuild_sent_bytes_total",
            "Snapshot bytes this node streamed to shard replicas being built.",
            &[],
        ),
        moves_done: r.counter(
            "ballast_rebuild_moves_total",
            "Replica moves (rebuilds, drains, rebalancing) completed by shard leaders on this node.",
            &[],
        ),
        rebalance_moves: r.counter(
            "ballast_rebalance_moves_total",
            "Rebalancing moves proposed by this node as meta leader.",
            &[],
        ),
        leader_transfers: r.counter(
            "ballast_leader_transfers_total",
            "Shard leaderships this node handed to another voter for leader balancing.",
            &[],
        ),
        meta_replacements: r.counter(
            "ballast_meta_replacements_total",
            "Meta group voters replaced (lost member out, live node in) by this node as meta leader.",
            &[],
        ),
    }
});

pub(crate) fn heal() -> &'static HealMetrics {
    &HEAL
}

/// Register every series a node exports (at zero) before the first scrape.
pub(crate) fn register() {
    ballast_raft::metrics::register();
    ballast_raft::apply::register_metrics();
    LazyLock::force(&DATA);
    LazyLock::force(&SCRUB);
    LazyLock::force(&HEAL);
}

/// Names of every family a node's `/metrics` shows.
pub fn family_names() -> Vec<String> {
    register();
    let mut names: Vec<String> = STATE_GAUGES.iter().map(|(n, _)| n.to_string()).collect();
    names.extend(global().names());
    names
}

/// The node's state and the process's series in the Prometheus text format.
pub(crate) fn render(inner: &NodeInner) -> String {
    register();
    let me = inner.id();
    let groups = inner.groups.groups();
    let shards = groups.iter().filter(|g| g.shard().is_some()).count();
    let leaders = groups
        .iter()
        .filter(|g| g.shard().is_some())
        .filter(|g| inner.groups.get(**g).and_then(|r| r.group.leader()).is_some_and(|(l, _)| l == me))
        .count();
    let meta = inner.meta.get().filter(|m| m.leader().is_some_and(|(l, _)| l == me));
    let cluster = inner.identity.get().map_or(0, |i| i.cluster.0);

    let state = Registry::new();
    let gauge = |i: usize, labels: &[(&str, &str)], v: i64| {
        let (name, help) = STATE_GAUGES[i];
        state.gauge(name, help, labels).set(v);
    };
    let (node, cluster, addr) = (me.to_string(), cluster.to_string(), inner.advertise.to_string());
    gauge(0, &[("node", &node), ("cluster", &cluster), ("addr", &addr)], 1);
    gauge(1, &[], count(shards));
    gauge(2, &[], count(leaders));
    gauge(3, &[], i64::from(meta.is_some()));
    gauge(4, &[], i64::try_from(inner.map.map().version.0).unwrap_or(i64::MAX));
    if let Some(meta) = meta {
        gauge(5, &[], count(under_replicated(&meta.local_map())));
    }
    let mut out = state.render();
    global().render_into(&mut out);
    out
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Shards whose voters on nodes marked up are fewer than the pool's
/// replication factor (or than the voters the map lists, while a move adds one).
fn under_replicated(map: &ballast_raft::ClusterMap) -> usize {
    map.shards
        .values()
        .filter(|s| {
            let replicas = map.pools.get(&s.pool).map_or(0, |p| p.spec.replicas as usize);
            let live = s.voters.iter().filter(|v| map.nodes.get(v).is_some_and(|n| n.up)).count();
            live < replicas.max(s.voters.len())
        })
        .count()
}

/// The Data service's ops (the `op` label).
const OPS: [&str; 6] = ["write", "zero", "read", "block_status", "flush", "purge"];

struct DataOp {
    requests: Arc<Counter>,
    bytes: Arc<Counter>,
    errors: Arc<Counter>,
    seconds: Arc<Histogram>,
}

struct DataMetrics {
    ops: Vec<DataOp>,
    /// `BAD_CHECKSUM` (damaged on the wire) and `CORRUPT` (damaged at rest).
    checksum_wire: Arc<Counter>,
    checksum_stored: Arc<Counter>,
}

static DATA: LazyLock<DataMetrics> = LazyLock::new(|| {
    let r = global();
    let ops = OPS
        .iter()
        .map(|op| {
            let l = [("op", *op)];
            DataOp {
                requests: r.counter("ballast_data_requests_total", "Data RPCs served by this node, by op.", &l),
                bytes: r.counter(
                    "ballast_data_bytes_total",
                    "Bytes asked for by Data RPCs (write payload, read/zero/block-status range), by op.",
                    &l,
                ),
                errors: r.counter(
                    "ballast_data_errors_total",
                    "Data RPCs answered with an error (redirects to the leader included), by op.",
                    &l,
                ),
                seconds: r.histogram(
                    "ballast_data_request_duration_seconds",
                    "Time to serve a Data RPC on this node, by op.",
                    &l,
                    Unit::Seconds,
                    &latency_buckets(),
                ),
            }
        })
        .collect();
    let help = "Checksum failures: `wire` = a write payload whose CRC32C did not match, \
                `stored` = a stored block that failed its CRC32C on read (one per block answered from a \
                healthy replica, one per read that failed with CORRUPT).";
    DataMetrics {
        ops,
        checksum_wire: r.counter("ballast_checksum_errors_total", help, &[("kind", "wire")]),
        checksum_stored: r.counter("ballast_checksum_errors_total", help, &[("kind", "stored")]),
    }
});

/// A `Data` service that counts what the inner one answers.
pub struct MeteredData<D>(pub D);

/// Record one request of op `i` covering `bytes`, answered with `error`.
fn record(i: usize, bytes: u64, start: Instant, error: Option<&pb::Error>) {
    let m = &*DATA;
    let op = &m.ops[i];
    op.requests.inc();
    op.bytes.add(bytes);
    op.seconds.observe_since(start);
    let Some(e) = error else { return };
    op.errors.inc();
    if e.code == pb::ErrorCode::BadChecksum as i32 {
        m.checksum_wire.inc();
    } else if e.code == pb::ErrorCode::Corrupt as i32 {
        m.checksum_stored.inc();
    }
}

/// Run `call`, record it as op `i`, pass its answer on.
async fn metered<T>(
    i: usize,
    bytes: u64,
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
    error: impl Fn(&T) -> Option<&pb::Error>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let r = call.await;
    let failed = pb::Error { code: pb::ErrorCode::Internal as i32, ..Default::default() };
    match &r {
        Ok(reply) => record(i, bytes, start, error(reply.get_ref())),
        Err(_) => record(i, bytes, start, Some(&failed)),
    }
    r
}

#[tonic::async_trait]
impl<D: Data> Data for MeteredData<D> {
    async fn write(&self, request: Request<pb::WriteRequest>) -> Result<Response<pb::WriteReply>, Status> {
        let bytes = request.get_ref().data.len() as u64;
        metered(0, bytes, self.0.write(request), |r| r.error.as_ref()).await
    }

    async fn zero(&self, request: Request<pb::ZeroRequest>) -> Result<Response<pb::ZeroReply>, Status> {
        let bytes = request.get_ref().length;
        metered(1, bytes, self.0.zero(request), |r| r.error.as_ref()).await
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let bytes = request.get_ref().length;
        metered(2, bytes, self.0.read(request), |r| r.error.as_ref()).await
    }

    async fn block_status(
        &self,
        request: Request<pb::BlockStatusRequest>,
    ) -> Result<Response<pb::BlockStatusReply>, Status> {
        let bytes = request.get_ref().length;
        metered(3, bytes, self.0.block_status(request), |r| r.error.as_ref()).await
    }

    async fn flush(&self, request: Request<pb::FlushRequest>) -> Result<Response<pb::FlushReply>, Status> {
        metered(4, 0, self.0.flush(request), |r| r.error.as_ref()).await
    }

    async fn purge(&self, request: Request<pb::PurgeRequest>) -> Result<Response<pb::PurgeReply>, Status> {
        metered(5, 0, self.0.purge(request), |r| r.error.as_ref()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_name_is_valid_and_listed_once() {
        let names = family_names();
        for n in &names {
            assert!(ballast_metrics::valid_name(n), "{n}");
            assert_eq!(names.iter().filter(|m| *m == n).count(), 1, "{n} listed twice");
        }
        for want in ["ballast_checksum_errors_total", "ballast_raft_commit_seconds", "ballast_scrub_bytes_total"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    }
}

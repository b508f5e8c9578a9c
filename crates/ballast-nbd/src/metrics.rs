//! What the NBD server counts, in the process-wide registry
//! ([`ballast_metrics::global`]): requests, payload bytes, errors and
//! latency per command, and connections. Handles are resolved once, per
//! command type, so recording is a few relaxed atomic adds.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use ballast_metrics::{global, latency_buckets, Counter, Gauge, Histogram, Unit};

use crate::proto::*;

/// The `op` label values, indexed by [`op_index`].
pub const OPS: [&str; 8] = ["read", "write", "flush", "trim", "cache", "write_zeroes", "block_status", "other"];

pub(crate) struct Op {
    pub requests: Arc<Counter>,
    pub bytes: Arc<Counter>,
    pub errors: Arc<Counter>,
    pub seconds: Arc<Histogram>,
}

pub(crate) struct NbdMetrics {
    pub ops: Vec<Op>,
    pub connections: Arc<Gauge>,
    pub connections_total: Arc<Counter>,
}

static METRICS: LazyLock<NbdMetrics> = LazyLock::new(|| {
    let r = global();
    let ops = OPS
        .iter()
        .map(|op| {
            let l = [("op", *op)];
            Op {
                requests: r.counter("ballast_nbd_requests_total", "NBD requests run against a device, by command.", &l),
                bytes: r.counter(
                    "ballast_nbd_bytes_total",
                    "Bytes covered by NBD requests (payload of reads and writes, range of trim, zero and cache), by command.",
                    &l,
                ),
                errors: r.counter(
                    "ballast_nbd_errors_total",
                    "NBD requests answered with an error (refused or failed by the device), by command.",
                    &l,
                ),
                seconds: r.histogram(
                    "ballast_nbd_request_duration_seconds",
                    "Time from a request's arrival to its reply being queued, by command.",
                    &l,
                    Unit::Seconds,
                    &latency_buckets(),
                ),
            }
        })
        .collect();
    NbdMetrics {
        ops,
        connections: r.gauge("ballast_nbd_connections", "NBD connections open.", &[]),
        connections_total: r.counter("ballast_nbd_connections_total", "NBD connections accepted.", &[]),
    }
});

pub(crate) fn metrics() -> &'static NbdMetrics {
    &METRICS
}

/// Register the NBD server's series (at zero) so a scrape lists them before
/// the first request.
pub fn register() {
    LazyLock::force(&METRICS);
}

pub(crate) fn op_index(typ: u16) -> usize {
    match typ {
        CMD_READ => 0,
        CMD_WRITE => 1,
        CMD_FLUSH => 2,
        CMD_TRIM => 3,
        CMD_CACHE => 4,
        CMD_WRITE_ZEROES => 5,
        CMD_BLOCK_STATUS => 6,
        _ => 7,
    }
}

/// Count one request of type `typ` covering `bytes`, finished now.
pub(crate) fn finished(typ: u16, bytes: u64, start: Instant) {
    let op = &metrics().ops[op_index(typ)];
    op.requests.inc();
    op.bytes.add(bytes);
    op.seconds.observe_since(start);
}

/// Count one error reply for a request of type `typ`.
pub(crate) fn failed(typ: u16) {
    metrics().ops[op_index(typ)].errors.inc();
}

/// Counts an open connection until dropped.
pub(crate) struct ConnectionGuard;

impl ConnectionGuard {
    pub fn open() -> Self {
        let m = metrics();
        m.connections_total.inc();
        m.connections.add(1);
        ConnectionGuard
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics().connections.add(-1);
    }
}

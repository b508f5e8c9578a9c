//! What the thin client counts, in the process-wide registry
//! ([`ballast_metrics::global`]): Data RPC attempts, leader redirects,
//! retries by reason and requests that failed for good.

use std::sync::{Arc, LazyLock};

use ballast_metrics::{global, Counter};

/// Why an attempt is retried (the `reason` label), indexed by [`Retry`].
const REASONS: [&str; 5] = ["timeout", "not_leader", "stale_map", "unreachable", "other"];

#[derive(Debug, Clone, Copy)]
pub(crate) enum Retry {
    /// The node did not answer within the RPC timeout.
    Timeout = 0,
    /// `NOT_LEADER` without a usable hint.
    NotLeader = 1,
    /// `STALE_MAP`: the node's map does not know the volume yet.
    StaleMap = 2,
    /// Transport failure below gRPC.
    Unreachable = 3,
    /// Another retryable typed error.
    Other = 4,
}

pub(crate) struct ClientMetrics {
    pub attempts: Arc<Counter>,
    pub redirects: Arc<Counter>,
    retries: Vec<Arc<Counter>>,
    pub failures: Arc<Counter>,
}

impl ClientMetrics {
    pub fn retry(&self, why: Retry) {
        self.retries[why as usize].inc();
    }
}

static METRICS: LazyLock<ClientMetrics> = LazyLock::new(|| {
    let r = global();
    ClientMetrics {
        attempts: r.counter("ballast_client_rpcs_total", "Data RPC attempts sent to nodes (retries included).", &[]),
        redirects: r.counter(
            "ballast_client_leader_redirects_total",
            "Data RPCs re-sent to the leader a NOT_LEADER answer named.",
            &[],
        ),
        retries: REASONS
            .iter()
            .map(|reason| {
                r.counter(
                    "ballast_client_rpc_retries_total",
                    "Data RPC attempts retried after a retryable failure, by reason.",
                    &[("reason", reason)],
                )
            })
            .collect(),
        failures: r.counter(
            "ballast_client_rpc_failures_total",
            "Data requests that failed for good (not retryable, or past their deadline).",
            &[],
        ),
    }
});

pub(crate) fn metrics() -> &'static ClientMetrics {
    &METRICS
}

/// Register the client's series (at zero) so a scrape lists them before the
/// first request.
pub fn register() {
    LazyLock::force(&METRICS);
}

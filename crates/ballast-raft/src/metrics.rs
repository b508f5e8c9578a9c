//! What the Raft layer counts, in the process-wide registry
//! ([`ballast_metrics::global`]): the log writer's batches, fsyncs and bytes,
//! append/commit/apply latency of shard groups, and snapshot data received
//! for rebuilds. Summed over every disk and group of the process.

use std::sync::{Arc, LazyLock};

use ballast_metrics::{global, latency_buckets, size_buckets, Counter, Histogram, Unit};

pub(crate) struct RaftMetrics {
    /// Submission to completion of one group's log append (queue + batch write + fsync).
    pub append_seconds: Arc<Histogram>,
    /// Write and fsync of one synced batch.
    pub fsync_seconds: Arc<Histogram>,
    /// Submissions (group appends) in one written batch.
    pub batch_appends: Arc<Histogram>,
    pub log_bytes: Arc<Counter>,
    /// `client_write` on a shard leader: replicated to a majority, committed and applied.
    pub commit_seconds: Arc<Histogram>,
    /// One `apply` call of a shard state machine.
    pub apply_seconds: Arc<Histogram>,
    pub applied_entries: Arc<Counter>,
    pub rebuild_bytes: Arc<Counter>,
}

static METRICS: LazyLock<RaftMetrics> = LazyLock::new(|| {
    let r = global();
    let secs = |name: &str, help: &str| r.histogram(name, help, &[], Unit::Seconds, &latency_buckets());
    RaftMetrics {
        append_seconds: secs(
            "ballast_raft_append_seconds",
            "Time from a Raft group handing entries to its disk's log writer to them being durable.",
        ),
        fsync_seconds: secs("ballast_raft_log_fsync_seconds", "Write and fsync of one synced Raft log batch."),
        batch_appends: r.histogram(
            "ballast_raft_log_batch_appends",
            "Group appends written together in one Raft log batch (group commit).",
            &[],
            Unit::Count,
            &size_buckets(),
        ),
        log_bytes: r.counter(
            "ballast_raft_log_written_bytes_total",
            "Payload bytes (entries and state) written to the Raft logs.",
            &[],
        ),
        commit_seconds: secs(
            "ballast_raft_commit_seconds",
            "Shard writes on the leader, from proposal to committed on a majority and applied.",
        ),
        apply_seconds: secs("ballast_raft_apply_seconds", "One apply of committed entries to a shard's block store."),
        applied_entries: r.counter(
            "ballast_raft_applied_entries_total",
            "Log entries applied to shard state machines.",
            &[],
        ),
        rebuild_bytes: r.counter(
            "ballast_rebuild_bytes_total",
            "Snapshot data received to build or catch up a shard replica.",
            &[],
        ),
    }
});

pub(crate) fn metrics() -> &'static RaftMetrics {
    &METRICS
}

/// Register the Raft layer's series (at zero) so a scrape lists them before
/// the first write.
pub fn register() {
    LazyLock::force(&METRICS);
}

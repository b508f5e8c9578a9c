//! Fault injection for the fault suite (cargo feature `faults`).
//!
//! - **Partition**: [`isolate`] names the peers this process's node no
//!   longer hears: their Raft messages (append, vote, snapshot, hello
//!   probes) are refused on receipt as if the network dropped them, and this
//!   node's own messages to them fail at once as unreachable. Partitioning
//!   node 1 from nodes 2 and 3 means isolating {2,3} on node 1 and {1} on
//!   each of 2 and 3. Clients still reach every node, so a deposed leader on
//!   the minority side is exactly what the fault suite probes.
//! - **Slow disk**: [`set_disk_delay`] (from `ballast_raft::faults`).
//!
//! Both are process-wide: the fault suite runs one node per process, and
//! `ballast node` built with the feature takes them over its metrics
//! listener (`POST /faults?isolate=2,3&disk_delay_ms=20`). Without the
//! feature, [`blocked`] is always false and nothing else exists.

#[cfg(feature = "faults")]
mod on {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    static ISOLATED: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

    /// From now on, traffic with exactly these peers is dropped (empty: none).
    pub fn isolate(peers: impl IntoIterator<Item = u64>) {
        *ISOLATED.lock().unwrap_or_else(|e| e.into_inner()) = peers.into_iter().collect();
    }

    /// The peers traffic is dropped with now.
    pub fn isolated() -> Vec<u64> {
        ISOLATED.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }

    pub(crate) fn blocked(peer: u64) -> bool {
        ISOLATED.lock().unwrap_or_else(|e| e.into_inner()).contains(&peer)
    }

    pub use ballast_raft::faults::{disk_delay, set_disk_delay};
}

#[cfg(feature = "faults")]
pub use on::{disk_delay, isolate, isolated, set_disk_delay};

/// Whether Raft traffic with `peer` is dropped (partition fault).
#[inline]
pub(crate) fn blocked(peer: u64) -> bool {
    #[cfg(feature = "faults")]
    {
        on::blocked(peer)
    }
    #[cfg(not(feature = "faults"))]
    {
        let _ = peer;
        false
    }
}

#[cfg(all(test, feature = "faults"))]
mod tests {
    use super::*;

    #[test]
    fn isolation_names_exactly_the_dropped_peers() {
        isolate([2, 3]);
        assert!(blocked(2) && blocked(3) && !blocked(1));
        assert_eq!(isolated(), vec![2, 3]);
        isolate([]);
        assert!(!blocked(2));
    }
}

//! Fault injection for the fault suite (cargo feature `faults`): a slow
//! disk. Every Raft log batch of this process waits [`disk_delay`] before
//! its write and sync, on the writer thread, as a disk with that much extra
//! latency would. Process-wide: the fault suite runs one node per process.
//! Without the feature nothing here exists and the writer never waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static DISK_DELAY_MICROS: AtomicU64 = AtomicU64::new(0);

/// Make every following log batch of this process take `delay` longer
/// (`Duration::ZERO`: a healthy disk again).
pub fn set_disk_delay(delay: Duration) {
    DISK_DELAY_MICROS.store(delay.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
}

/// The extra latency each log batch has now.
pub fn disk_delay() -> Duration {
    Duration::from_micros(DISK_DELAY_MICROS.load(Ordering::Relaxed))
}

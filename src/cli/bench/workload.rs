//! The fixed suite and the load generator that runs one test of it.
//!
//! A test is `queue_depth` workers, each a task that issues one request,
//! waits for its reply and issues the next — so exactly `queue_depth`
//! requests are in flight, like fio's `iodepth` with its nbd engine. Workers
//! are spread round-robin over the target's connections. Each worker owns its
//! counters and histograms (no shared state on the I/O path but the sequential
//! cursor); they are merged when the test ends.
//!
//! Measured like fio: latency is submit → complete of each request; requests
//! submitted during the ramp are not counted; IOPS are requests completed per
//! second of the measured window. In `rw4k_qd1_flush` every write is followed
//! by a FLUSH (fio `--fsync=1`): IOPS and latency count the writes, flush
//! latency is reported on its own, as bench-nbd.sh does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_nbd::client::{ClientError, NbdClient};
use bytes::Bytes;

use super::histogram::Histogram;

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;

/// What the requests of a test look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    RandWrite,
    RandRead,
    SeqWrite,
    SeqRead,
    /// Random writes, each followed by a FLUSH.
    RandWriteFlush,
    /// Random reads and writes; `read_percent` of requests are reads.
    RandMix {
        read_percent: u32,
    },
}

/// One test of the suite. Names and parameters match
/// `../shared/tools/bench-nbd.sh` so results compare line by line with fio's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestSpec {
    pub name: &'static str,
    pub title: &'static str,
    pub pattern: Pattern,
    pub block_size: u32,
    pub queue_depth: usize,
}

pub const SUITE: [TestSpec; 8] = [
    TestSpec {
        name: "rw4k_qd1",
        title: "4k rand write QD1",
        pattern: Pattern::RandWrite,
        block_size: 4 * KIB,
        queue_depth: 1,
    },
    TestSpec {
        name: "rw4k_qd32",
        title: "4k rand write QD32",
        pattern: Pattern::RandWrite,
        block_size: 4 * KIB,
        queue_depth: 32,
    },
    TestSpec {
        name: "rr4k_qd1",
        title: "4k rand read QD1",
        pattern: Pattern::RandRead,
        block_size: 4 * KIB,
        queue_depth: 1,
    },
    TestSpec {
        name: "rr4k_qd32",
        title: "4k rand read QD32",
        pattern: Pattern::RandRead,
        block_size: 4 * KIB,
        queue_depth: 32,
    },
    TestSpec {
        name: "sw1m_qd8",
        title: "1M seq write QD8",
        pattern: Pattern::SeqWrite,
        block_size: MIB,
        queue_depth: 8,
    },
    TestSpec { name: "sr1m_qd8", title: "1M seq read QD8", pattern: Pattern::SeqRead, block_size: MIB, queue_depth: 8 },
    TestSpec {
        name: "rw4k_qd1_flush",
        title: "4k rand write QD1 + FLUSH each",
        pattern: Pattern::RandWriteFlush,
        block_size: 4 * KIB,
        queue_depth: 1,
    },
    TestSpec {
        name: "mix4k_qd32",
        title: "4k rand 70% read / 30% write QD32",
        pattern: Pattern::RandMix { read_percent: 70 },
        block_size: 4 * KIB,
        queue_depth: 32,
    },
];

impl TestSpec {
    /// fio's `--rw` for this pattern.
    pub fn fio_rw(&self) -> &'static str {
        match self.pattern {
            Pattern::RandWrite | Pattern::RandWriteFlush => "randwrite",
            Pattern::RandRead => "randread",
            Pattern::SeqWrite => "write",
            Pattern::SeqRead => "read",
            Pattern::RandMix { .. } => "randrw",
        }
    }

    pub fn find(name: &str) -> Option<&'static TestSpec> {
        SUITE.iter().find(|t| t.name == name)
    }
}

/// What one test measured on one target.
#[derive(Clone, Default)]
pub struct Measured {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    /// The measured window: end of the ramp to the last counted completion.
    pub elapsed: Duration,
    /// Every counted request (the writes only, in the flush test).
    pub latency: Histogram,
    pub flush_latency: Histogram,
}

impl Measured {
    pub fn ops(&self) -> u64 {
        self.reads + self.writes
    }

    fn merge(&mut self, o: &Measured) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.bytes += o.bytes;
        self.elapsed = self.elapsed.max(o.elapsed);
        self.latency.merge(&o.latency);
        self.flush_latency.merge(&o.flush_latency);
    }
}

/// A small, fast, seeded generator for offsets and read/write choices: the
/// load generator must not spend its time in the RNG.
#[derive(Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is negligible for our `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Write payloads: one buffer of random bytes (incompressible, and not zeros,
/// which some servers store as holes), sliced without copying at 4 KiB steps
/// so consecutive writes carry different data.
#[derive(Clone)]
pub struct Payload(Bytes);

impl Payload {
    pub fn new(seed: u64) -> Self {
        let mut rng = SplitMix::new(seed);
        let mut v = Vec::with_capacity((MIB + 64 * KIB) as usize);
        while v.len() < v.capacity() {
            v.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        Self(Bytes::from(v))
    }

    fn slice(&self, len: u32, rng: &mut SplitMix) -> Bytes {
        let len = len as usize;
        // Callers ask for at most 1 MiB; the buffer has 64 KiB to spare.
        let starts = (self.0.len().saturating_sub(len) / 4096) as u64 + 1;
        let start = rng.below(starts) as usize * 4096;
        self.0.slice(start..start + len)
    }
}

/// Timing of one test run.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub ramp: Duration,
    pub runtime: Duration,
}

/// Run `spec` against the target behind `clients` over the first `region`
/// bytes (a multiple of the block size). The first request error stops the
/// test and is returned.
pub async fn run_test(
    clients: &[NbdClient],
    spec: &TestSpec,
    region: u64,
    window: Window,
    payload: &Payload,
    seed: u64,
) -> Result<Measured, ClientError> {
    let start = Instant::now();
    let measure_from = start + window.ramp;
    let end = measure_from + window.runtime;
    let cursor = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..spec.queue_depth {
        let worker = Worker {
            client: clients[w % clients.len()].clone(),
            spec: *spec,
            region,
            payload: payload.clone(),
            rng: SplitMix::new(seed ^ (w as u64).wrapping_mul(0xA24B_AED4_963E_E407)),
            cursor: cursor.clone(),
            stop: stop.clone(),
        };
        workers.spawn(worker.run(measure_from, end));
    }
    let mut total = Measured::default();
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        match joined.unwrap_or_else(|e| Err(worker_lost(e))) {
            Ok(m) => total.merge(&m),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                if first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

struct Worker {
    client: NbdClient,
    spec: TestSpec,
    region: u64,
    payload: Payload,
    rng: SplitMix,
    cursor: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    async fn run(mut self, measure_from: Instant, end: Instant) -> Result<Measured, ClientError> {
        let bs = self.spec.block_size;
        let blocks = self.region / u64::from(bs);
        let mut m = Measured::default();
        let mut last = measure_from;
        while !self.stop.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            if t0 >= end {
                break;
            }
            let offset = match self.spec.pattern {
                Pattern::SeqRead | Pattern::SeqWrite => {
                    self.cursor.fetch_add(u64::from(bs), Ordering::Relaxed) % (blocks * u64::from(bs))
                }
                _ => self.rng.below(blocks) * u64::from(bs),
            };
            let read = match self.spec.pattern {
                Pattern::RandRead | Pattern::SeqRead => true,
                Pattern::RandMix { read_percent } => self.rng.below(100) < u64::from(read_percent),
                _ => false,
            };
            if read {
                self.client.read(offset, bs).await?;
            } else {
                let data = self.payload.slice(bs, &mut self.rng);
                self.client.write(offset, data, false).await?;
            }
            let t1 = Instant::now();
            let counted = t0 >= measure_from;
            if counted {
                m.latency.record(nanos(t1 - t0));
                m.bytes += u64::from(bs);
                if read {
                    m.reads += 1;
                } else {
                    m.writes += 1;
                }
                last = t1;
            }
            if self.spec.pattern == Pattern::RandWriteFlush {
                self.client.flush().await?;
                let t2 = Instant::now();
                if counted {
                    m.flush_latency.record(nanos(t2 - t1));
                    last = t2;
                }
            }
        }
        m.elapsed = last.saturating_duration_since(measure_from);
        Ok(m)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Write the whole region once, sequentially, 1 MiB at a time, 8 in flight,
/// then flush — so reads hit data, not holes (bench-nbd.sh's prefill).
pub async fn prefill(clients: &[NbdClient], region: u64, payload: &Payload) -> Result<(), ClientError> {
    let cursor = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..8usize {
        let client = clients[w % clients.len()].clone();
        let (cursor, payload) = (cursor.clone(), payload.clone());
        let mut rng = SplitMix::new(w as u64);
        workers.spawn(async move {
            loop {
                let offset = cursor.fetch_add(u64::from(MIB), Ordering::Relaxed);
                if offset >= region {
                    return Ok::<(), ClientError>(());
                }
                // The region is whole MiB (see `bench::region`), but be exact anyway.
                let len = (region - offset).min(u64::from(MIB)) as u32;
                client.write(offset, payload.slice(len, &mut rng), false).await?;
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.unwrap_or_else(|e| Err(worker_lost(e)))?;
    }
    clients[0].flush().await
}

/// A worker task that panicked is a bug here, not a property of the target:
/// re-raise it. One that was cancelled (the runtime is shutting down) just
/// ends the test.
fn worker_lost(e: tokio::task::JoinError) -> ClientError {
    if e.is_panic() {
        std::panic::resume_unwind(e.into_panic());
    }
    ClientError::Disconnected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suite_matches_bench_nbd_names_and_is_unique() {
        let names: Vec<_> = SUITE.iter().map(|t| t.name).collect();
        for fio_name in ["rw4k_qd1", "rw4k_qd32", "rr4k_qd1", "rr4k_qd32", "sw1m_qd8", "sr1m_qd8", "rw4k_qd1_flush"] {
            assert!(names.contains(&fio_name), "{fio_name} missing");
        }
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }

    #[test]
    fn payload_slices_stay_in_bounds_and_vary() {
        let p = Payload::new(1);
        let mut rng = SplitMix::new(2);
        let a = p.slice(MIB, &mut rng);
        assert_eq!(a.len(), MIB as usize);
        let slices: Vec<Bytes> = (0..16).map(|_| p.slice(4096, &mut rng)).collect();
        assert!(slices.iter().any(|s| s != &slices[0]), "every write would carry the same bytes");
        assert!(slices.iter().all(|s| s.iter().any(|&b| b != 0)));
    }
}

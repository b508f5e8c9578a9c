//! The workload: `workers` concurrent clients of one attached volume, each
//! writing unique self-describing values to, and reading from, a small set
//! of hot blocks that the others use too, recording every request's
//! invocation, completion and result. Randomness comes from one seed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ballast_nbd::{BlockDevice, ReadSegment};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::checker::{Op, OpKind, NEVER};
use super::value::{decode, encode, Observed, BLOCK};

/// What to run.
#[derive(Debug, Clone)]
pub struct Workload {
    pub seed: u64,
    /// Concurrent clients.
    pub workers: u32,
    /// The blocks they share (block numbers in the volume).
    pub blocks: Vec<u64>,
    /// Share of writes among operations, 0..=1.
    pub write_ratio: f64,
}

/// The blocks of `round` of a volume: `per_chunk` blocks in each of the
/// first `chunks` chunks (so every shard of the pool gets some), at block
/// offsets no earlier round used. A write that failed may still land later,
/// so each round gets blocks of its own.
pub fn round_blocks(round: u64, chunks: u64, per_chunk: u64, blocks_per_chunk: u64) -> Vec<u64> {
    let first = (round * per_chunk) % blocks_per_chunk;
    (0..chunks)
        .flat_map(|c| (0..per_chunk).map(move |i| c * blocks_per_chunk + (first + i) % blocks_per_chunk))
        .collect()
}

/// A running workload's shared state: the clock, the history, the stop flag.
pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    done: AtomicU64,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            done: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Operations completed so far (failed ones included).
    pub fn completed(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Ask every worker to stop after its current operation.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// The history so far.
    pub fn history(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Write a fresh value to `block`, recorded.
    pub async fn write<D: BlockDevice>(&self, dev: &D, worker: u32, block: u64) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let data = Bytes::from(encode(id, block));
        let invoke = self.now();
        let r = dev.write(block * BLOCK as u64, data, false).await;
        let complete = self.now();
        let error = r.err().map(|e| e.message);
        let complete = if error.is_some() { NEVER } else { complete };
        self.record(Op { worker, block, kind: OpKind::Write(id), invoke, complete, error });
    }

    /// Read `block`, recorded; returns what it found.
    pub async fn read<D: BlockDevice>(&self, dev: &D, worker: u32, block: u64) -> Option<Observed> {
        let invoke = self.now();
        let r = dev.read(block * BLOCK as u64, BLOCK as u32).await;
        let complete = self.now();
        let (kind, error) = match r {
            Ok(segments) => (OpKind::Read(decode(&flatten(&segments), block)), None),
            Err(e) => (OpKind::Read(Observed::Garbage(String::new())), Some(e.message)),
        };
        let seen = match (&kind, &error) {
            (OpKind::Read(o), None) => Some(o.clone()),
            _ => None,
        };
        self.record(Op { worker, block, kind, invoke, complete, error });
        seen
    }
}

/// The bytes of a read reply, holes as zeros.
fn flatten(segments: &[ReadSegment]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK);
    for s in segments {
        match s {
            ReadSegment::Data(data) => out.extend_from_slice(data),
            ReadSegment::Hole(n) => out.resize(out.len() + *n as usize, 0),
        }
    }
    out
}

/// Run `w` on `dev` until `rec` is stopped; every worker's choices come
/// from `seed` and its number.
pub async fn run<D: BlockDevice + 'static>(w: &Workload, dev: Arc<D>, rec: Arc<Recorder>) {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..w.workers {
        let (dev, rec, blocks, ratio) = (dev.clone(), rec.clone(), w.blocks.clone(), w.write_ratio);
        let mut rng = StdRng::seed_from_u64(w.seed ^ (u64::from(worker) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        tasks.spawn(async move {
            while !rec.stopped() {
                let block = blocks[rng.gen_range(0..blocks.len())];
                if rng.gen_bool(ratio) {
                    rec.write(&*dev, worker, block).await;
                } else {
                    rec.read(&*dev, worker, block).await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Write every block once, one at a time, before the concurrent workload:
/// whatever the blocks held before (an earlier run's values) is then
/// superseded by writes of this history. Fails on the first error.
pub async fn baseline<D: BlockDevice>(blocks: &[u64], dev: &D, rec: &Recorder) -> Result<(), String> {
    for &b in blocks {
        rec.write(dev, u32::MAX, b).await;
        let ops = rec.ops.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = ops.last().and_then(|o| o.error.clone()) {
            return Err(format!("baseline write of block {b}: {e}"));
        }
    }
    Ok(())
}

/// Read every block once more, after the workload has stopped: the
/// read-back the checker uses to prove no acknowledged write was lost.
pub async fn read_back<D: BlockDevice>(blocks: &[u64], dev: &D, rec: &Recorder) {
    for &b in blocks {
        rec.read(dev, u32::MAX, b).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_use_disjoint_blocks_in_every_chunk() {
        let a = round_blocks(0, 4, 8, 1024);
        let b = round_blocks(1, 4, 8, 1024);
        assert_eq!(a.len(), 32);
        assert!(a.iter().all(|x| !b.contains(x)));
        for c in 0..4 {
            assert_eq!(a.iter().filter(|x| **x / 1024 == c).count(), 8);
        }
    }
}

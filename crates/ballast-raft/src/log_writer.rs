//! The per-disk group-commit writer: one thread per [`LogStore`] gathers the
//! pending log writes of every Raft group on that disk into one batch with one
//! sync, then completes each of them.
//!
//! This is the main performance lever of the write path: with hundreds of
//! shards on a disk, the cost of an fsync is paid once per batch, not once per
//! group. Batches form naturally: while one write-and-sync is in flight, new
//! submissions queue up and go together in the next one. Nothing here knows
//! of openraft; the log-store adapter turns completions into its callbacks.
//!
//! The writer is a dedicated OS thread rather than an async task because every
//! call it makes blocks on the disk; a thread keeps that off the async runtime
//! and makes the loop a single owner (STYLE #1).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use ballast_storage::{LogBatch, LogStore, StorageError};

/// At most this many submissions go into one batch.
const MAX_OPS_PER_BATCH: usize = 4096;
/// A batch stops growing past this many payload bytes.
const MAX_BYTES_PER_BATCH: usize = 32 << 20;

/// A failed batch: every submission in it gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("raft log write failed: {0}")]
pub struct WriteFailed(pub Arc<StorageError>);

/// Called once the submission's batch is written (and synced, if it asked),
/// on the writer thread: keep it short and non-blocking.
pub type Completion = Box<dyn FnOnce(Result<(), WriteFailed>) + Send>;

struct Op {
    batch: LogBatch,
    sync: bool,
    done: Completion,
    submitted: Instant,
}

/// Counters of one writer, for tests and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Submissions received.
    pub submitted: AtomicU64,
    /// Batches written to the store.
    pub batches: AtomicU64,
    /// Batches written with a sync (one fsync each).
    pub syncs: AtomicU64,
}

/// A point-in-time copy of [`WriterStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterCounts {
    pub submitted: u64,
    pub batches: u64,
    pub syncs: u64,
}

struct Shared<L> {
    store: Arc<L>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<WriterStats>,
}

impl<L> Drop for Shared<L> {
    fn drop(&mut self) {
        // Closing the channel ends the loop once it has written what is queued.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if t.join().is_err() {
                tracing::error!("raft log writer thread panicked");
            }
        }
    }
}

/// Handle to the writer of one disk; cheap to clone. The thread stops (after
/// writing everything queued) when the last handle is dropped.
pub struct LogWriter<L: LogStore> {
    shared: Arc<Shared<L>>,
}

impl<L: LogStore> Clone for LogWriter<L> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<L: LogStore> LogWriter<L> {
    /// Start the writer thread for `store`.
    pub fn spawn(store: Arc<L>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Op>();
        let stats = Arc::new(WriterStats::default());
        let thread = {
            let store = store.clone();
            let stats = stats.clone();
            std::thread::Builder::new().name("ballast-log-writer".into()).spawn(move || run(&*store, rx, &stats))?
        };
        Ok(Self {
            shared: Arc::new(Shared { store, tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)), stats }),
        })
    }

    pub fn store(&self) -> &Arc<L> {
        &self.shared.store
    }

    pub fn counts(&self) -> WriterCounts {
        let s = &self.shared.stats;
        WriterCounts {
            submitted: s.submitted.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
        }
    }

    /// Queue `batch`; `done` runs once it is written — durable if `sync`.
    /// Submissions are written in the order they are submitted.
    pub fn submit(&self, batch: LogBatch, sync: bool, done: Completion) {
        self.shared.stats.submitted.fetch_add(1, Ordering::Relaxed);
        let tx = self.shared.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let op = Op { batch, sync, done, submitted: Instant::now() };
        let undelivered = match tx {
            Some(tx) => tx.send(op).err().map(|e| e.0),
            None => Some(op),
        };
        if let Some(op) = undelivered {
            (op.done)(Err(WriteFailed(Arc::new(StorageError::Engine("raft log writer has stopped".into())))));
        }
    }

    /// Queue `batch` and wait until it is written (durable if `sync`).
    pub async fn write(&self, batch: LogBatch, sync: bool) -> Result<(), WriteFailed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            batch,
            sync,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.unwrap_or_else(|_| Err(WriteFailed(Arc::new(StorageError::Engine("raft log writer dropped".into())))))
    }
}

fn run<L: LogStore>(store: &L, rx: mpsc::Receiver<Op>, stats: &WriterStats) {
    while let Ok(first) = rx.recv() {
        let mut bytes = first.batch.payload_bytes();
        let mut ops = vec![first];
        while ops.len() < MAX_OPS_PER_BATCH && bytes < MAX_BYTES_PER_BATCH {
            match rx.try_recv() {
                Ok(op) => {
                    bytes += op.batch.payload_bytes();
                    ops.push(op);
                }
                Err(_) => break,
            }
        }
        let sync = ops.iter().any(|o| o.sync);
        let m = crate::metrics::metrics();
        m.batch_appends.observe(ops.len() as u64);
        m.log_bytes.add(bytes as u64);
        let mut batch = LogBatch::new();
        let mut dones = Vec::with_capacity(ops.len());
        for op in ops {
            batch.extend(op.batch);
            dones.push((op.done, op.submitted));
        }
        let started = Instant::now();
        #[cfg(feature = "faults")]
        {
            let slow = crate::faults::disk_delay();
            if !slow.is_zero() {
                std::thread::sleep(slow);
            }
        }
        let result = store.write(batch, sync).map_err(|e| {
            tracing::error!(error = %e, "raft log batch failed");
            WriteFailed(Arc::new(e))
        });
        stats.batches.fetch_add(1, Ordering::Relaxed);
        if sync {
            stats.syncs.fetch_add(1, Ordering::Relaxed);
            m.fsync_seconds.observe_since(started);
        }
        for (done, submitted) in dones {
            m.append_seconds.observe_since(submitted);
            done(result.clone());
        }
    }
}

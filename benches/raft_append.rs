//! The Raft log append path: synced 4 KiB entries through the per-disk
//! group-commit `LogWriter` into RocksDB (`RocksStore` as the `LogStore`).
//!
//! Each group is one thread that appends an entry, waits until it is durable
//! and appends the next — what one shard leader does at QD1. With one group
//! every append pays a whole fsync; with 64 groups appending at once the
//! writer folds the queued appends into one batch and one fsync, so appends/s
//! grow far faster than fsyncs/s. Criterion reports appends/s (elements/s);
//! after each case the bench prints how many appends shared one fsync.
//!
//! The entry is a real encoded `ShardRequest::Write` of 4 KiB (encoded once
//! and shared: the bench measures the writer and the disk, not postcard).
//! The store lives in a temporary directory (`TMPDIR`): put it on the disk
//! you mean to measure — fsync on tmpfs costs nothing.
//!
//! `cargo bench --bench raft_append -- --warm-up-time 1 --measurement-time 2`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use ballast_raft::{codec, LogWriter, ShardRequest};
use ballast_storage::{LogBatch, RocksConfig, RocksStore};
use ballast_types::VolumeId;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const GROUPS: [usize; 2] = [1, 64];

/// Append one synced entry for `group` and wait until it is durable.
fn append_synced(writer: &LogWriter<RocksStore>, group: u64, index: u64, entry: &Bytes) {
    let (tx, rx) = mpsc::sync_channel(1);
    let mut batch = LogBatch::new();
    batch.append(group, index, entry.clone());
    writer.submit(
        batch,
        true,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv().expect("writer dropped the completion").expect("log write failed");
}

/// Run `groups` appenders, `iters` synced appends each, concurrently; return
/// the wall time from the moment all have started to the last completion.
fn run_groups(writer: &LogWriter<RocksStore>, next_index: &Arc<Vec<AtomicU64>>, entry: &Bytes, iters: u64) -> Duration {
    let groups = next_index.len();
    // Thread start-up is excluded: everyone (this thread too) meets at the barrier first.
    let start = Arc::new(Barrier::new(groups + 1));
    let handles: Vec<_> = (0..groups)
        .map(|g| {
            let (writer, next_index, entry, start) = (writer.clone(), next_index.clone(), entry.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..iters {
                    // Raft indexes of a group are contiguous across criterion's calls.
                    let index = next_index[g].fetch_add(1, Ordering::Relaxed);
                    append_synced(&writer, g as u64 + 1, index, &entry);
                }
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    for h in handles {
        h.join().expect("appender thread panicked");
    }
    t0.elapsed()
}

fn raft_append(c: &mut Criterion) {
    let dir = tempfile::Builder::new().prefix("ballast-bench-raft-").tempdir().expect("temp dir");
    let store = RocksStore::open(dir.path(), &RocksConfig::default()).expect("open RocksStore");
    let writer = LogWriter::spawn(Arc::new(store)).expect("spawn log writer");
    let entry = codec::encode(&ShardRequest::Write {
        volume: VolumeId(1),
        epoch: 1,
        offset: 0,
        data: Bytes::from(vec![0x5a; 4096]),
    })
    .expect("encode entry");

    let mut group = c.benchmark_group("raft_append");
    for groups in GROUPS {
        let next_index: Arc<Vec<AtomicU64>> = Arc::new((0..groups).map(|_| AtomicU64::new(1)).collect());
        let before = writer.counts();
        // One iteration = one synced append by every group.
        group.throughput(Throughput::Elements(groups as u64));
        group.bench_function(BenchmarkId::new("synced_4k_groups", groups), |b| {
            b.iter_custom(|iters| run_groups(&writer, &next_index, &entry, iters));
        });
        let after = writer.counts();
        let appends = after.submitted - before.submitted;
        let syncs = (after.syncs - before.syncs).max(1);
        eprintln!(
            "raft_append/{groups} groups: {appends} appends in {syncs} fsyncs ({:.1} appends per fsync)",
            appends as f64 / syncs as f64
        );
    }
    group.finish();
    // The writer thread stops (after draining) with its last handle; then the directory goes.
    drop(writer);
}

criterion_group! {
    name = benches;
    // Every sample waits for fsyncs: fewer, longer samples keep the run short.
    config = Criterion::default().sample_size(10);
    targets = raft_append
}
criterion_main!(benches);

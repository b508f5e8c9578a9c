//! The block-store contract on both engines: 4 KiB blocks written in batches
//! of 1 and 64 (the NBD path builds one batch per request: a 4 KiB write is
//! one block, a 256 KiB write 64), read back one at a time (`get`) and 64 at
//! a time (`scan`, one iterator, as `VolumeView::read` does).
//!
//! `RocksStore` lives in a temporary directory (`TMPDIR`, so point it at the
//! disk you mean to measure). Writes are `Buffered` — the path of every write
//! without FUA — plus `Sync` batches on RocksDB to show what one fsync costs
//! and how a bigger batch spreads it.
//!
//! `cargo bench --bench block_store -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use ballast_storage::{BlockStore, Durability, KeyRange, MemStore, RocksConfig, RocksStore, WriteBatch};
use ballast_types::{BlockKey, ShardId, VolumeId, BLOCK_SIZE};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Blocks the benchmarks cycle over (64 MiB): overwrites keep the in-memory
/// engine's footprint bounded however many iterations criterion picks.
const WORKING_SET: u64 = 16 * 1024;
/// Blocks per chunk at the default 4 MiB chunk size.
const BLOCKS_PER_CHUNK: u64 = 1024;
const BATCHES: [usize; 2] = [1, 64];

/// The `i`-th block of the test volume (callers keep `i` in the working set).
fn key(i: u64) -> BlockKey {
    // i % BLOCKS_PER_CHUNK < 1024, so the narrowing is lossless.
    BlockKey {
        shard: ShardId(0),
        volume: VolumeId(1),
        chunk: i / BLOCKS_PER_CHUNK,
        block: (i % BLOCKS_PER_CHUNK) as u32,
    }
}

/// One block of non-repeating bytes (engines may compress; real data mostly does not).
fn payload(seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(BLOCK_SIZE as usize);
    while v.len() < BLOCK_SIZE as usize {
        // xorshift64: cheap, good enough to defeat compression.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

fn prefill<S: BlockStore>(store: &S, blocks: &[Bytes]) {
    for start in (0..WORKING_SET).step_by(256) {
        let mut b = WriteBatch::new();
        for i in start..start + 256 {
            b.put(key(i), blocks[(i as usize) % blocks.len()].clone());
        }
        store.write(b, Durability::Buffered).expect("prefill");
    }
    store.sync().expect("sync after prefill");
}

fn bench_engine<S: BlockStore>(c: &mut Criterion, engine: &str, store: &S, sync_writes: bool) {
    // A few distinct payloads, cloned (refcounted) into batches, so the
    // benchmark measures the store, not the generation of data.
    let blocks: Vec<Bytes> = (0..64).map(payload).collect();
    prefill(store, &blocks);

    let mut group = c.benchmark_group(format!("block_store/{engine}"));
    let mut modes = vec![("put", Durability::Buffered)];
    if sync_writes {
        modes.push(("put_sync", Durability::Sync));
    }
    for (name, durability) in modes {
        for n in BATCHES {
            group.throughput(Throughput::Bytes(n as u64 * u64::from(BLOCK_SIZE)));
            let mut next = 0u64;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    let mut batch = WriteBatch::new();
                    for j in 0..n {
                        batch.put(key(next), blocks[j % blocks.len()].clone());
                        next = (next + 1) % WORKING_SET;
                    }
                    store.write(batch, durability).expect("write");
                });
            });
        }
    }

    group.throughput(Throughput::Bytes(u64::from(BLOCK_SIZE)));
    let mut next = 0u64;
    group.bench_function(BenchmarkId::new("get", 1), |b| {
        b.iter(|| {
            // A stride that is not a power of two walks the whole working set.
            next = (next + 7919) % WORKING_SET;
            black_box(store.get(&key(next)).expect("get").expect("block was prefilled"));
        });
    });

    group.throughput(Throughput::Bytes(64 * u64::from(BLOCK_SIZE)));
    let mut next = 0u64;
    group.bench_function(BenchmarkId::new("scan", 64), |b| {
        b.iter(|| {
            // 64 consecutive blocks; the half-open end may be the next chunk's first block.
            next = (next + 64) % WORKING_SET;
            let range = KeyRange::new(key(next), key(next + 64));
            let got = store.scan(&range, 64).expect("scan");
            assert_eq!(got.len(), 64, "prefilled range came back short");
            black_box(got);
        });
    });
    group.finish();
}

fn mem(c: &mut Criterion) {
    bench_engine(c, "mem", &MemStore::new(), false);
}

fn rocks(c: &mut Criterion) {
    let dir = tempfile::Builder::new().prefix("ballast-bench-store-").tempdir().expect("temp dir");
    let store = RocksStore::open(dir.path(), &RocksConfig::default()).expect("open RocksStore");
    bench_engine(c, "rocks", &store, true);
    drop(store);
}

criterion_group!(benches, mem, rocks);
criterion_main!(benches);

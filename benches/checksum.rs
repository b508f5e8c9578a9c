//! CRC32C of one block (4 KiB, what every stored block carries) and of one
//! large write (1 MiB, what the client checksums per piece), in bytes/s.
//!
//! `cargo bench --bench checksum -- --warm-up-time 1 --measurement-time 2`

use ballast_types::crc32c;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn crc32c_sizes(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for (name, len) in [("4KiB", 4096usize), ("1MiB", 1 << 20)] {
        // Not zeros: a checksum is data-independent, but the buffer should
        // look like real payload to the caches and the prefetcher.
        let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &data, |b, data| {
            b.iter(|| crc32c(black_box(data)));
        });
    }
    group.finish();
}

criterion_group!(benches, crc32c_sizes);
criterion_main!(benches);

//! The NBD wire codec, per message: what the server spends decoding a request
//! header and encoding each kind of reply (`ballast_nbd::proto`). These run
//! once per request on every connection's reader and writer tasks, so they
//! must stay far below the cost of the I/O they frame.
//!
//! `cargo bench --bench nbd_codec -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use ballast_nbd::proto::{self, RequestHeader, REQUEST_HEADER_LEN};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// A request header as a client puts it on the wire (big-endian, compact).
fn wire_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.typ.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.len.to_be_bytes());
    b
}

fn server_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_codec/server");
    g.throughput(Throughput::Elements(1));

    let write = wire_request(&RequestHeader {
        flags: proto::CMD_FLAG_FUA,
        typ: proto::CMD_WRITE,
        cookie: 0x0123_4567_89ab_cdef,
        offset: 1 << 30,
        len: 4096,
    });
    g.bench_function("decode_request", |b| b.iter(|| proto::decode_request(black_box(&write))));
    let mut bad = write;
    bad[0] ^= 0xff;
    g.bench_function("decode_request_bad_magic", |b| b.iter(|| proto::decode_request(black_box(&bad))));

    g.bench_function("simple_reply", |b| b.iter(|| proto::simple_reply(black_box(42), black_box(0))));
    g.bench_function("offset_data_header", |b| {
        b.iter(|| proto::offset_data_header(black_box(42), true, black_box(1 << 30), black_box(4096)))
    });
    g.bench_function("offset_hole_chunk", |b| {
        b.iter(|| proto::offset_hole_chunk(black_box(42), true, black_box(1 << 30), black_box(4096)))
    });
    g.bench_function("none_chunk", |b| b.iter(|| proto::none_chunk(black_box(42))));
    g.bench_function("error_chunk", |b| {
        b.iter(|| proto::error_chunk(black_box(42), proto::EIO, black_box("read failed: block checksum mismatch")))
    });
    // A fragmented 1 MiB range: 128 extents alternating data and holes.
    let extents: Vec<(u32, u32)> =
        (0..128).map(|i| (8192, if i % 2 == 0 { 0 } else { proto::STATE_HOLE | proto::STATE_ZERO })).collect();
    g.bench_function("block_status_chunk_128", |b| {
        b.iter(|| proto::block_status_chunk(black_box(42), true, proto::META_BASE_ALLOCATION_ID, black_box(&extents)))
    });
    g.finish();
}

criterion_group!(benches, server_side);
criterion_main!(benches);

//! The NBD wire codec, per message: what the server spends decoding a request
//! header and encoding each kind of reply (`ballast_nbd::proto`), and what the
//! client (`ballast_nbd::client`, the `ballast bench` load generator) spends
//! encoding requests and decoding reply headers. These run once per request
//! on every connection's reader and writer tasks, so they must stay far below
//! the cost of the I/O they frame.
//!
//! `cargo bench --bench nbd_codec -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use ballast_nbd::client;
use ballast_nbd::proto::{self, RequestHeader, CHUNK_HEADER_LEN, SIMPLE_REPLY_LEN};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const WRITE_4K: RequestHeader = RequestHeader {
    flags: proto::CMD_FLAG_FUA,
    typ: proto::CMD_WRITE,
    cookie: 0x0123_4567_89ab_cdef,
    offset: 1 << 30,
    len: 4096,
};

fn server_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_codec/server");
    g.throughput(Throughput::Elements(1));

    let write = client::encode_request(&WRITE_4K);
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

fn client_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_codec/client");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_request", |b| b.iter(|| client::encode_request(black_box(&WRITE_4K))));

    let simple: [u8; SIMPLE_REPLY_LEN] = proto::simple_reply(42, 0)[..].try_into().expect("16-byte simple reply");
    g.bench_function("decode_simple_reply", |b| b.iter(|| client::decode_simple_reply(black_box(&simple))));
    let data = proto::offset_data_header(42, true, 1 << 30, 4096).expect("4 KiB fits a chunk");
    let chunk: [u8; CHUNK_HEADER_LEN] = data[..CHUNK_HEADER_LEN].try_into().expect("20-byte chunk header");
    g.bench_function("decode_chunk_header", |b| b.iter(|| client::decode_chunk_header(black_box(&chunk))));
    g.finish();
}

criterion_group!(benches, server_side, client_side);
criterion_main!(benches);

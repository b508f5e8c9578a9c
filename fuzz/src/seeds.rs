//! The seed corpora: a handful of small, valid (and a few deliberately
//! broken) inputs per target, so fuzzing starts from inputs that reach deep
//! into each parser. `tests/smoke.rs` checks that `corpus/<target>/seed-*`
//! equals what this module builds, and rewrites it with
//! `BALLAST_WRITE_SEEDS=1`.

use bytes::Bytes;
use prost::Message;

use ballast_nbd::proto::*;
use ballast_proto::pb;
use ballast_types::{
    ApiError, CreateVolume, Epoch, Extent, MapVersion, NodeHello, NodeId, RangeRequest, ReadData, ReadSegment,
    VolumeId, WriteRequest, ZeroRequest,
};

use crate::proto_conversions::MESSAGES;

/// One seed: its file name and its bytes.
pub type Seed = (String, Vec<u8>);

/// Every target's name and seeds.
pub fn all() -> Vec<(&'static str, Vec<Seed>)> {
    vec![
        ("nbd_request", nbd_request()),
        ("nbd_option", nbd_option()),
        ("nbd_client_reply", nbd_client_reply()),
        ("proto_conversions", proto_conversions()),
    ]
}

fn request(out: &mut Vec<u8>, flags: u16, typ: u16, offset: u64, len: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

fn write(out: &mut Vec<u8>, flags: u16, offset: u64, len: u32) {
    request(out, flags, CMD_WRITE, offset, len);
    out.extend((0..len).map(|i| i as u8));
}

/// Setup bits: 1 structured, 2 base:allocation, 4 read-only, 8/16 size class.
fn nbd_request() -> Vec<(String, Vec<u8>)> {
    let every_command = |out: &mut Vec<u8>| {
        write(out, CMD_FLAG_FUA, 0, 512);
        request(out, 0, CMD_READ, 0, 8192);
        request(out, 0, CMD_FLUSH, 0, 0);
        request(out, 0, CMD_TRIM, 4096, 4096);
        request(out, CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 100, 1000);
        request(out, CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 512);
        request(out, 0, CMD_CACHE, 0, 4096);
        request(out, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 65536);
        request(out, 0, CMD_BLOCK_STATUS, 0, 8192);
        request(out, CMD_FLAG_DF, CMD_READ, 0, 4096);
        request(out, 0, CMD_READ, 0xbad, 16);
    };
    let mut seeds = Vec::new();
    for (name, setup) in [("simple", 0u8), ("structured", 3), ("read-only", 7), ("unaligned-size", 8 | 3)] {
        let mut s = vec![setup];
        every_command(&mut s);
        request(&mut s, 0, CMD_DISC, 0, 0);
        seeds.push((format!("seed-{name}"), s));
    }
    let mut bad = vec![1u8];
    request(&mut bad, 0, CMD_READ, 1 << 20, 1);
    request(&mut bad, 0, CMD_READ, 0, 0);
    request(&mut bad, 0, 99, 0, 1);
    request(&mut bad, 1 << 12, CMD_READ, 0, 1);
    request(&mut bad, 0, CMD_READ, 0, 1 << 20);
    write(&mut bad, 0, (1 << 20) - 1, 2);
    write(&mut bad, 0, 0, 0);
    bad.extend_from_slice(b"not a request header, a broken stream");
    seeds.push(("seed-invalid".into(), bad));
    let mut huge = vec![16 | 3];
    request(&mut huge, 0, CMD_READ, u64::MAX - 4095, 4096);
    request(&mut huge, 0, CMD_READ, (!0xfffu64) - 4096, 4096);
    write(&mut huge, 0, (!0xfffu64) - 512, 512);
    request(&mut huge, 0, CMD_WRITE, 0, 100);
    seeds.push(("seed-end-of-u64-and-truncated-write".into(), huge));
    seeds
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        string(&mut d, q);
    }
    d
}

fn nbd_option() -> Vec<(String, Vec<u8>)> {
    let flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes();
    let mut full = flags.to_vec();
    option(&mut full, OPT_LIST, &[]);
    option(&mut full, OPT_STRUCTURED_REPLY, &[]);
    option(&mut full, OPT_LIST_META_CONTEXT, &meta_data("vol", &[]));
    option(&mut full, OPT_SET_META_CONTEXT, &meta_data("", &["base:allocation", "qemu:dirty-bitmap:x"]));
    option(&mut full, OPT_INFO, &info_data("vol", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]));
    option(&mut full, OPT_GO, &info_data("", &[INFO_BLOCK_SIZE]));
    let mut odd = flags.to_vec();
    option(&mut odd, OPT_STRUCTURED_REPLY, &[1]);
    option(&mut odd, OPT_STARTTLS, &[]);
    option(&mut odd, OPT_EXTENDED_HEADERS, &[]);
    option(&mut odd, 42, &[1, 2, 3]);
    option(&mut odd, OPT_LIST, &[0]);
    option(&mut odd, OPT_SET_META_CONTEXT, &meta_data("", &["base:"]));
    option(&mut odd, OPT_INFO, &info_data("nope", &[]));
    option(&mut odd, OPT_GO, &info_data("down", &[]));
    option(&mut odd, OPT_GO, &[0, 0, 0, 9, b'x']);
    option(&mut odd, OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    option(&mut odd, OPT_ABORT, &[]);
    let mut export_name = 0u32.to_be_bytes().to_vec();
    option(&mut export_name, OPT_EXPORT_NAME, b"vol");
    let mut too_big = flags.to_vec();
    too_big.extend_from_slice(&IHAVEOPT.to_be_bytes());
    too_big.extend_from_slice(&OPT_INFO.to_be_bytes());
    too_big.extend_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
    too_big.extend_from_slice(&[0; 64]);
    vec![
        ("seed-full-haggle".into(), full),
        ("seed-refusals-then-abort".into(), odd),
        ("seed-export-name-with-zeroes".into(), export_name),
        ("seed-oversized-truncated".into(), too_big),
    ]
}

fn opt_reply(out: &mut Vec<u8>, opt: u32, typ: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Client options byte, handshake length, then the handshake itself.
fn client_seed(options: u8, handshake: &[u8]) -> Vec<u8> {
    let mut s = vec![options];
    s.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    s.extend_from_slice(handshake);
    s
}

fn greeting_and_go(structured: bool) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    if structured {
        opt_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    }
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&(1u64 << 20).to_be_bytes());
    export.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA).to_be_bytes());
    opt_reply(&mut s, OPT_GO, REP_INFO, &export);
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [512u32, 4096, 65536] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    opt_reply(&mut s, OPT_GO, REP_INFO, &bs);
    opt_reply(&mut s, OPT_GO, REP_ACK, &[]);
    client_seed(u8::from(structured), &s)
}

fn simple(out: &mut Vec<u8>, cookie: u64, error: u32, data: usize) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend((0..data).map(|i| i as u8));
}

fn chunk(out: &mut Vec<u8>, cookie: u64, flags: u16, typ: u16, payload: &[u8]) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

fn nbd_client_reply() -> Vec<(String, Vec<u8>)> {
    // Cookies 1..=5: read 512@0, read 4096@4096, write, flush, read 100@1000.
    let mut plain = greeting_and_go(false);
    simple(&mut plain, 1, 0, 512);
    simple(&mut plain, 3, 0, 0);
    simple(&mut plain, 2, 0, 4096);
    simple(&mut plain, 4, EIO, 0);
    simple(&mut plain, 5, 0, 100);

    let mut structured = greeting_and_go(true);
    let mut data = 0u64.to_be_bytes().to_vec();
    data.extend_from_slice(&[7; 256]);
    chunk(&mut structured, 1, 0, REPLY_TYPE_OFFSET_DATA, &data);
    let mut hole = 256u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&256u32.to_be_bytes());
    chunk(&mut structured, 1, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, &hole);
    let mut hole = 4096u64.to_be_bytes().to_vec();
    hole.extend_from_slice(&4096u32.to_be_bytes());
    chunk(&mut structured, 2, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, &hole);
    simple(&mut structured, 3, 0, 0);
    simple(&mut structured, 4, 0, 0);
    let mut err = EIO.to_be_bytes().to_vec();
    err.extend_from_slice(&4u16.to_be_bytes());
    err.extend_from_slice(b"boom");
    chunk(&mut structured, 5, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &err);

    let mut old = Vec::new();
    old.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    old.extend_from_slice(&IHAVEOPT.to_be_bytes());
    old.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
    opt_reply(&mut old, OPT_GO, REP_ERR_UNSUP, b"no GO here");
    old.extend_from_slice(&(1u64 << 20).to_be_bytes());
    old.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
    old.extend_from_slice(&[0; 124]);
    let mut old = client_seed(0, &old);
    simple(&mut old, 1, 0, 512);
    simple(&mut old, 1, 0, 512);
    simple(&mut old, 99, 0, 0);

    vec![
        ("seed-simple-replies".into(), plain),
        ("seed-structured-replies".into(), structured),
        ("seed-export-name-fallback-and-bad-cookies".into(), old),
    ]
}

/// A seed named `seed-<label>` for the message `label` names (up to a `-`).
fn message<M: Message>(label: &str, m: M) -> (String, Vec<u8>) {
    let name = label.split('-').next().unwrap_or(label);
    let selector = MESSAGES.iter().position(|n| *n == name).expect("a known message") as u8;
    let mut b = vec![selector];
    m.encode(&mut b).expect("a Vec grows");
    (format!("seed-{label}"), b)
}

fn proto_conversions() -> Vec<(String, Vec<u8>)> {
    let data = Bytes::from((0..4096u32).map(|i| i as u8).collect::<Vec<u8>>());
    let read = ReadData {
        segments: vec![
            ReadSegment::data(4096, data.slice(..1024)),
            ReadSegment { offset: 5120, body: ballast_types::SegmentBody::Hole(3072) },
        ],
    };
    vec![
        message("WriteRequest", pb::WriteRequest::from(WriteRequest::new(VolumeId(3), Epoch(2), 4096, data.clone()))),
        message(
            "ZeroRequest",
            pb::ZeroRequest::from(ZeroRequest {
                volume: VolumeId(3),
                epoch: Epoch(2),
                offset: 0,
                length: 1 << 20,
                punch: true,
            }),
        ),
        message("ReadRequest", pb::ReadRequest::from(RangeRequest { volume: VolumeId(3), offset: 512, length: 8192 })),
        message("ReadReply", pb::ReadReply::from(Ok(read))),
        message(
            "ReadReply-error",
            pb::ReadReply::from(Err(ApiError { map_version: Some(MapVersion(9)), ..ApiError::not_leader(None) })),
        ),
        message(
            "BlockStatusReply",
            pb::BlockStatusReply::from(Ok(vec![
                Extent { offset: 0, length: 4096, hole: false },
                Extent { offset: 4096, length: 1 << 20, hole: true },
            ])),
        ),
        message(
            "NodeHello",
            pb::NodeHello::from(NodeHello {
                cluster: ballast_types::ClusterId(7),
                node: NodeId(2),
                addr: "node2:7000".into(),
                protocol_version: ballast_types::PROTOCOL_VERSION,
            }),
        ),
        message(
            "CreateVolumeRequest",
            pb::CreateVolumeRequest::from(CreateVolume { name: "db".into(), size: 10 << 30, pool: "fast".into() }),
        ),
        message(
            "PlacementMap",
            pb::PlacementMap {
                map_version: 3,
                pools: vec![pb::Pool {
                    id: 1,
                    spec: Some(pb::PoolSpec { name: "fast".into(), replicas: 1, shards: 1, ..Default::default() }),
                    first_shard: 0,
                }],
                volumes: vec![pb::Volume {
                    id: 5,
                    name: "db".into(),
                    size: 1 << 30,
                    pool_id: 1,
                    chunk_size: 4 << 20,
                    epoch: 1,
                }],
                shards: vec![pb::Shard { id: 0, pool_id: 1, voters: vec![1], leader: 1, joining: vec![] }],
                nodes: vec![pb::NodeAddr { id: 1, addr: "node1:7000".into() }],
            },
        ),
    ]
}

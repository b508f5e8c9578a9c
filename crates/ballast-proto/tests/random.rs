//! Seeded random round trips: random valid domain values survive the wire
//! unchanged, random damage to a write payload is always caught, and random
//! bytes never make a conversion panic.
//!
//! The seed is printed; `BALLAST_SEED=<n> cargo test -p ballast-proto --test random`
//! replays a failure.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;

use ballast_proto::{pb, Reply};
use ballast_types::{
    ClusterId, ClusterStatus, DiskInfo, Epoch, Extent, FailureDomain, GroupId, JoinNode, MapVersion, NodeHello, NodeId,
    NodeInfo, PlacementMap, RaftEnvelope, RaftRequest, RangeRequest, ReadData, ReadSegment, RebuildProgress,
    SegmentBody, ShardInfo, ShardStatus, SnapshotChunk, SnapshotStart, VolumeId, VolumeInfo, VolumeIo, WriteRequest,
    ZeroRequest, PROTOCOL_VERSION,
};
use common::{pool, roundtrip, wire};

/// SplitMix64: tiny, seedable, and identical on every platform and version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
    /// Random bytes, between `lo` and `hi` of them.
    fn bytes(&mut self, lo: u64, hi: u64) -> Bytes {
        let n = self.range(lo, hi);
        (0..n).map(|_| self.next() as u8).collect::<Vec<u8>>().into()
    }
    fn name(&mut self) -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
        let n = self.range(1, 128) as usize;
        (0..n).map(|_| CHARS[self.below(CHARS.len() as u64) as usize] as char).collect()
    }
    fn addr(&mut self) -> String {
        format!("{}:{}", self.name(), self.range(1, 65535))
    }
}

fn seed() -> u64 {
    let seed = match std::env::var("BALLAST_SEED") {
        Ok(s) => s.parse().expect("BALLAST_SEED must be a u64"),
        Err(_) => SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    };
    println!("seed: {seed} (replay with BALLAST_SEED={seed})");
    seed
}

fn envelope(r: &mut Rng) -> RaftEnvelope {
    RaftEnvelope {
        cluster: ClusterId(r.range(1, u64::MAX)),
        from: NodeId(r.range(1, 100)),
        target: NodeId(r.range(1, 100)),
        group: GroupId(r.below(10_000)),
    }
}

fn node(r: &mut Rng, id: u64) -> NodeInfo {
    let disks =
        (0..r.below(4)).map(|i| DiskInfo { path: format!("/d{i}"), capacity: r.next(), used: r.next() }).collect();
    NodeInfo { id: NodeId(id), addr: r.addr(), zone: r.coin().then(|| r.name()), up: r.coin(), disks }
}

/// A random consistent placement map.
fn map(r: &mut Rng) -> PlacementMap {
    let mut m = PlacementMap { version: MapVersion(r.range(1, u64::MAX)), ..Default::default() };
    let n_nodes = r.range(1, 9);
    for id in 1..=n_nodes {
        m.nodes.insert(NodeId(id), r.addr());
    }
    let mut first = 0;
    for pid in 1..=r.range(1, 4) as u32 {
        let mut p = pool(pid, &r.name(), r.range(1, 64) as u32, first);
        p.spec.replicas = r.range(1, 5) as u32;
        p.spec.failure_domain = if r.coin() { FailureDomain::Node } else { FailureDomain::Zone };
        first += p.spec.shards;
        for s in p.shard_ids() {
            let mut voters: Vec<NodeId> = (1..=n_nodes).map(NodeId).collect();
            voters.truncate(r.range(1, n_nodes.min(5)) as usize);
            let leader = r.coin().then(|| voters[r.below(voters.len() as u64) as usize]);
            m.shards.insert(s, ShardInfo { id: s, pool: p.id, voters, leader, joining: vec![] });
        }
        m.pools.insert(p.id, p);
    }
    for _ in 0..r.below(20) {
        let id = VolumeId(r.range(1, u64::MAX));
        let v = VolumeInfo {
            id,
            name: r.name(),
            size: r.range(1, 1 << 30) * 4096,
            pool: ballast_types::PoolId(r.range(1, m.pools.len() as u64) as u32),
            chunk_size: 1 << r.range(16, 30),
            epoch: Epoch(r.next()),
        };
        m.volumes.insert(id, v);
    }
    m
}

#[test]
fn random_values_round_trip() {
    let mut r = Rng(seed());
    for _ in 0..300 {
        let data = r.bytes(1, 20_000);
        let offset = r.below(1 << 50);
        roundtrip::<_, pb::WriteRequest>(WriteRequest::new(
            VolumeId(r.range(1, u64::MAX)),
            Epoch(r.range(1, 9)),
            offset,
            data,
        ));
        let z = ZeroRequest {
            volume: VolumeId(r.range(1, 99)),
            epoch: Epoch(1),
            offset,
            length: r.range(1, 1 << 30),
            punch: r.coin(),
        };
        roundtrip::<_, pb::ZeroRequest>(z);
        roundtrip::<_, pb::ReadRequest>(RangeRequest { volume: VolumeId(7), offset, length: r.range(1, 32 << 20) });

        let mut at = offset;
        let segments = (0..r.below(6))
            .map(|_| {
                let s = if r.coin() {
                    ReadSegment::data(at, r.bytes(1, 9000))
                } else {
                    ReadSegment { offset: at, body: SegmentBody::Hole(r.range(1, 1 << 24)) }
                };
                at += s.len();
                s
            })
            .collect();
        let read = ReadData { segments };
        assert_eq!(wire(pb::ReadReply::from(Ok(read.clone()))).into_result().ok(), Some(read));
        let mut at = offset;
        let extents: Vec<Extent> = (0..r.below(6))
            .map(|_| {
                let e = Extent { offset: at, length: r.range(1, 1 << 24), hole: r.coin() };
                at += e.length;
                e
            })
            .collect();
        assert_eq!(wire(pb::BlockStatusReply::from(Ok(extents.clone()))).into_result().ok(), Some(extents));

        roundtrip::<_, pb::RaftRequest>(RaftRequest { envelope: envelope(&mut r), payload: r.bytes(1, 500) });
        let start = r.coin().then(|| SnapshotStart { vote: r.bytes(1, 40), meta: r.bytes(1, 90) });
        let offset = if start.is_some() { 0 } else { r.range(1, 1 << 40) };
        let data = r.bytes(0, 2999);
        roundtrip::<_, pb::SnapshotChunk>(SnapshotChunk {
            envelope: envelope(&mut r),
            offset,
            start,
            data,
            done: r.coin(),
        });
        let hello = NodeHello {
            cluster: ClusterId(r.range(1, u64::MAX)),
            node: NodeId(r.range(1, 99)),
            addr: r.addr(),
            protocol_version: PROTOCOL_VERSION,
        };
        roundtrip::<_, pb::NodeHello>(hello);

        let m = map(&mut r);
        roundtrip::<_, pb::PlacementMap>(m.clone());
        let nodes = (1..=r.range(0, 5)).map(|id| node(&mut r, id)).collect();
        let shards = m
            .shards
            .values()
            .take(10)
            .map(|s| {
                let total = r.range(0, 1 << 30);
                let rebuilding =
                    r.coin().then(|| RebuildProgress { done_bytes: r.range(0, total), total_bytes: total });
                ShardStatus { shard: s.clone(), under_replicated: r.coin(), rebuilding }
            })
            .collect();
        let volume_io = m
            .volumes
            .keys()
            .map(|v| VolumeIo {
                volume: *v,
                reads: r.range(0, 1 << 40),
                read_bytes: r.range(0, 1 << 50),
                writes: r.range(0, 1 << 40),
                write_bytes: r.range(0, 1 << 50),
            })
            .collect();
        let status = ClusterStatus {
            cluster: ClusterId(r.range(1, 99)),
            protocol_version: PROTOCOL_VERSION,
            map_version: m.version,
            meta_leader: r.coin().then(|| NodeId(r.range(1, 9))),
            nodes,
            shards,
            volume_io,
            scrub: vec![],
        };
        roundtrip::<_, pb::ClusterStatusReply>(status);
        let n = node(&mut r, 1);
        let join = JoinNode {
            node: r.coin().then_some(NodeId(3)),
            addr: n.addr,
            zone: n.zone,
            disks: n.disks,
            token: r.name(),
            protocol_version: 1,
        };
        roundtrip::<_, pb::JoinNodeRequest>(join);
    }
}

#[test]
fn random_damage_to_a_write_is_always_caught() {
    let mut r = Rng(seed());
    for _ in 0..2000 {
        let w = WriteRequest::new(VolumeId(1), Epoch(1), 0, r.bytes(1, 8192));
        let mut m = pb::WriteRequest::from(w);
        let mut v = m.data.to_vec();
        let i = r.below(v.len() as u64) as usize;
        v[i] ^= 1 << r.below(8);
        m.data = v.into();
        assert!(WriteRequest::try_from(m).is_err(), "a flipped bit at {i} went through");
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut r = Rng(seed());
    for _ in 0..3000 {
        let buf = r.bytes(0, 199);
        // Whatever decodes must convert to a value or a ConvertError, never panic.
        if let Ok(m) = pb::WriteRequest::decode(buf.clone()) {
            let _ = WriteRequest::try_from(m);
        }
        if let Ok(m) = pb::SnapshotChunk::decode(buf.clone()) {
            let _ = SnapshotChunk::try_from(m);
        }
        if let Ok(m) = pb::ReadReply::decode(buf.clone()) {
            let _ = m.into_result();
        }
        if let Ok(m) = pb::BlockStatusReply::decode(buf.clone()) {
            let _ = m.into_result();
        }
        if let Ok(m) = pb::PlacementMap::decode(buf.clone()) {
            let _ = PlacementMap::try_from(m);
        }
        if let Ok(m) = pb::ClusterStatusReply::decode(buf) {
            let _ = ClusterStatus::try_from(m);
        }
    }
}

//! Shared fixtures and the wire round-trip helper for the ballast-proto tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Debug;

use bytes::Bytes;
use prost::Message;

use ballast_proto::ConvertError;
use ballast_types::{
    Epoch, FailureDomain, MapVersion, NodeId, PlacementMap, PoolId, PoolInfo, PoolSpec, ShardId, ShardInfo, VolumeId,
    VolumeInfo, DEFAULT_CHUNK_SIZE,
};

/// Encode and decode through protobuf bytes, as a peer would see the message.
pub fn wire<P: Message + Default>(p: P) -> P {
    P::decode(p.encode_to_vec().as_slice()).expect("a message we encoded decodes")
}

/// domain → pb → bytes → pb → domain, which must give back the same value.
pub fn roundtrip<D, P>(d: D)
where
    D: Clone + PartialEq + Debug + Into<P> + TryFrom<P, Error = ConvertError>,
    P: Message + Default,
{
    let back = D::try_from(wire(d.clone().into()));
    assert_eq!(back.as_ref(), Ok(&d), "round trip of {d:?}");
}

pub fn pool(id: u32, name: &str, shards: u32, first: u32) -> PoolInfo {
    PoolInfo {
        id: PoolId(id),
        spec: PoolSpec { name: name.into(), replicas: 3, shards, failure_domain: FailureDomain::Zone },
        first_shard: ShardId(first),
    }
}

pub fn volume(id: u64, name: &str, pool: u32) -> VolumeInfo {
    VolumeInfo {
        id: VolumeId(id),
        name: name.into(),
        size: 10 << 30,
        pool: PoolId(pool),
        chunk_size: DEFAULT_CHUNK_SIZE,
        epoch: Epoch(3),
    }
}

/// A consistent map: two pools (4 and 2 shards), three nodes, two volumes.
pub fn sample_map() -> PlacementMap {
    let nodes: BTreeMap<NodeId, String> = (1..=3).map(|i| (NodeId(i), format!("node{i}:7000"))).collect();
    let pools = [pool(1, "fast", 4, 0), pool(2, "cache", 2, 4)];
    let mut shards = BTreeMap::new();
    for p in &pools {
        for (i, s) in p.shard_ids().enumerate() {
            let leader = (i % 2 == 0).then_some(NodeId(1 + i as u64 % 3));
            shards.insert(
                s,
                ShardInfo { id: s, pool: p.id, voters: vec![NodeId(1), NodeId(2), NodeId(3)], leader, joining: vec![] },
            );
        }
    }
    PlacementMap {
        version: MapVersion(7),
        pools: pools.into_iter().map(|p| (p.id, p)).collect(),
        volumes: [volume(10, "db", 1), volume(11, "scratch", 2)].into_iter().map(|v| (v.id, v)).collect(),
        shards,
        nodes,
    }
}

pub fn bytes(n: usize, seed: u8) -> Bytes {
    Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

//! Shared pieces of the multi-node tests: node start-up with fast timers,
//! a minimal thin client that follows NOT_LEADER hints, and waiting helpers.
#![allow(dead_code)]

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_node::{HashPlacement, Node, NodeConfig, NodeHandle, ShardLocator};
use ballast_proto::pb::data_client::DataClient;
use ballast_proto::{pb, ProtoError, Reply};
use ballast_raft::snapshot::shard_range;
use ballast_raft::{NodeId, ShardConfig};
use ballast_storage::{BlockStore, RocksConfig};
use ballast_types::{
    validate_extents, ApiError, ClusterId, Epoch, ErrorCode, Extent, GroupId, RangeRequest, Retryable, ShardId,
    VolumeId, WriteRequest, ZeroRequest, DEFAULT_CHUNK_SIZE,
};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::Rng;
use tonic::transport::{Channel, Endpoint};

pub const CLUSTER: ClusterId = ClusterId(7);
pub const VOLUME: VolumeId = VolumeId(5);
pub const VOLUME_SIZE: u64 = 4 * DEFAULT_CHUNK_SIZE;
pub const SHARDS: [ShardId; 2] = [ShardId(0), ShardId(1)];
pub const PLACEMENT: HashPlacement = HashPlacement { first_shard: 0, shards: 2 };
/// Every client call, leader change included, must finish within this.
pub const CALL_DEADLINE: Duration = Duration::from_secs(20);

pub fn seed() -> u64 {
    let seed =
        std::env::var("BALLAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("seed: BALLAST_SEED={seed}");
    seed
}

/// Start a node with fast timers; replicas come only from its manifests.
pub async fn start_node_bare(
    id: NodeId,
    dir: &Path,
    listen: SocketAddr,
    tweak: impl FnOnce(&mut ShardConfig),
) -> NodeHandle {
    start_node_with(id, dir, listen, |c| tweak(&mut c.shard)).await
}

/// [`start_node_bare`], with the whole node configuration to tweak.
pub async fn start_node_with(
    id: NodeId,
    dir: &Path,
    listen: SocketAddr,
    tweak: impl FnOnce(&mut NodeConfig),
) -> NodeHandle {
    let mut config = NodeConfig::new(id, listen, "", vec![dir.to_path_buf()]);
    if let Some(identity) = config.identity.as_mut() {
        identity.cluster = CLUSTER;
    }
    config.shard = ShardConfig {
        heartbeat_interval: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(300),
        election_timeout_max: Duration::from_millis(600),
        ..ShardConfig::default()
    };
    config.rocks = RocksConfig { block_cache_bytes: 8 << 20, write_buffer_bytes: 4 << 20, ..RocksConfig::default() };
    config.locator = Some(Arc::new(PLACEMENT));
    tweak(&mut config);
    Node::start(config).await.expect("start node")
}

/// Start a node and a replica of every shard in [`SHARDS`].
pub async fn start_node(
    id: NodeId,
    dir: &Path,
    listen: SocketAddr,
    tweak: impl FnOnce(&mut ShardConfig),
) -> NodeHandle {
    let node = start_node_bare(id, dir, listen, tweak).await;
    for shard in SHARDS {
        node.create_shard_replica(shard).await.expect("start replica");
    }
    node
}

pub async fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn last_applied(node: &NodeHandle, group: GroupId) -> u64 {
    let replica = node.replica(group).expect("replica");
    let m = replica.group.raft().metrics().borrow_watched().clone();
    m.last_applied.map_or(0, |l| l.index)
}

/// A minimal thin client: a channel per node, the last known leader per shard.
pub struct Client {
    addrs: Vec<String>,
    channels: HashMap<String, DataClient<Channel>>,
    leaders: HashMap<ShardId, String>,
    next: usize,
}

impl Client {
    pub fn new(addrs: Vec<String>) -> Self {
        Self { addrs, channels: HashMap::new(), leaders: HashMap::new(), next: 0 }
    }

    pub fn channel(&mut self, addr: &str) -> DataClient<Channel> {
        self.channels
            .entry(addr.to_string())
            .or_insert_with(|| {
                let ep = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
                DataClient::new(ep.connect_timeout(Duration::from_secs(1)).connect_lazy())
                    .max_decoding_message_size(ballast_proto::MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(ballast_proto::MAX_MESSAGE_SIZE)
            })
            .clone()
    }

    /// Call the leader of the shard holding `offset`, following hints and
    /// retrying what is retryable until [`CALL_DEADLINE`].
    pub async fn call<T, F, Fut>(&mut self, offset: u64, mut f: F) -> Result<T, ApiError>
    where
        F: FnMut(DataClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, ProtoError>>,
    {
        let shard = PLACEMENT.locate(VOLUME, offset / DEFAULT_CHUNK_SIZE).expect("placement");
        let deadline = Instant::now() + CALL_DEADLINE;
        loop {
            let addr = match self.leaders.get(&shard) {
                Some(a) => a.clone(),
                None => {
                    self.next += 1;
                    self.addrs[self.next % self.addrs.len()].clone()
                }
            };
            let client = self.channel(&addr);
            let err = match f(client).await {
                Ok(v) => {
                    self.leaders.insert(shard, addr);
                    return Ok(v);
                }
                Err(e) => e,
            };
            match &err {
                ProtoError::Api(e) if e.code == ErrorCode::NotLeader => {
                    match e.leader_hint.as_ref().filter(|h| !h.addr.is_empty() && h.addr != addr) {
                        Some(h) => {
                            self.leaders.insert(shard, h.addr.clone());
                            continue;
                        }
                        None => self.leaders.remove(&shard),
                    };
                }
                ProtoError::Api(e) if !e.is_retryable() => return Err(e.clone()),
                ProtoError::Api(_) | ProtoError::Transport(_) => {
                    self.leaders.remove(&shard);
                }
                ProtoError::Convert(e) => panic!("malformed reply from {addr}: {e}"),
            }
            assert!(Instant::now() < deadline, "call to {shard} did not succeed in {CALL_DEADLINE:?}: {err}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn write(&mut self, epoch: u64, offset: u64, data: Vec<u8>) -> Result<(), ApiError> {
        let req = pb::WriteRequest::from(WriteRequest::new(VOLUME, Epoch(epoch), offset, Bytes::from(data)));
        self.call(offset, |mut c| {
            let req = req.clone();
            async move { c.write(req).await?.into_inner().into_result() }
        })
        .await
    }

    pub async fn zero(&mut self, epoch: u64, offset: u64, length: u64, punch: bool) -> Result<(), ApiError> {
        let z = ZeroRequest { volume: VOLUME, epoch: Epoch(epoch), offset, length, punch };
        self.call(offset, |mut c| async move { c.zero(pb::ZeroRequest::from(z)).await?.into_inner().into_result() })
            .await
    }

    pub async fn block_status(&mut self, offset: u64, length: u64) -> Vec<Extent> {
        let range = RangeRequest { volume: VOLUME, offset, length };
        let x = self
            .call(offset, |mut c| async move {
                c.block_status(pb::BlockStatusRequest::from(range)).await?.into_inner().into_result()
            })
            .await
            .expect("block status");
        validate_extents(&x, Some(&range)).expect("extents answer the request");
        x
    }

    pub async fn read(&mut self, offset: u64, length: u64) -> Vec<u8> {
        let range = RangeRequest { volume: VOLUME, offset, length };
        let data = self
            .call(offset, |mut c| async move { c.read(pb::ReadRequest::from(range)).await?.into_inner().into_result() })
            .await
            .expect("read");
        data.check_covers(&range).expect("read covers the request");
        let mut buf = vec![0u8; length as usize];
        data.copy_into(&mut buf);
        buf
    }
}

/// A random write inside one chunk, mirrored in `model`.
pub async fn random_write(client: &mut Client, rng: &mut StdRng, model: &mut [u8], epoch: u64) {
    let chunk = rng.gen_range(0..VOLUME_SIZE / DEFAULT_CHUNK_SIZE);
    let start = chunk * DEFAULT_CHUNK_SIZE;
    let offset = start + if rng.gen_bool(0.5) { rng.gen_range(0..256) * 4096 } else { rng.gen_range(0..1 << 20) };
    let len = rng.gen_range(1..=40_000u64).min(start + DEFAULT_CHUNK_SIZE - offset);
    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    client.write(epoch, offset, data).await.expect("write");
}

pub async fn check_reads(client: &mut Client, rng: &mut StdRng, model: &[u8], seed: u64) {
    for _ in 0..20 {
        let chunk = rng.gen_range(0..VOLUME_SIZE / DEFAULT_CHUNK_SIZE);
        let offset = chunk * DEFAULT_CHUNK_SIZE + rng.gen_range(0..(1 << 20));
        let len = rng.gen_range(1..100_000u64);
        let got = client.read(offset, len).await;
        assert!(
            got == model[offset as usize..(offset + len) as usize],
            "read {offset}+{len} differs from the model (BALLAST_SEED={seed})"
        );
    }
}

/// Wait until every node has applied what `group`'s leader has, then check
/// that all hold the same blocks of the shard.
pub async fn assert_replicas_identical(nodes: &BTreeMap<NodeId, NodeHandle>, shard: ShardId, seed: u64) {
    let group = GroupId::for_shard(shard);
    let leader = wait_for("a leader", Duration::from_secs(15), || {
        nodes.values().find(|n| n.replica(group).is_some_and(|r| r.group.raft().is_leader())).map(|n| n.id())
    })
    .await;
    let target = last_applied(&nodes[&leader], group);
    for n in nodes.values() {
        wait_for(&format!("node {} to apply {target} of {group}", n.id()), Duration::from_secs(20), || {
            (last_applied(n, group) >= target).then_some(())
        })
        .await;
    }
    let blocks = |n: &NodeHandle| {
        let r = n.replica(group).expect("replica");
        r.group.store().scan(&shard_range(shard), usize::MAX).expect("scan")
    };
    let want = blocks(&nodes[&leader]);
    assert!(!want.is_empty(), "{shard} holds data");
    for n in nodes.values() {
        assert!(blocks(n) == want, "node {} differs from leader {leader} on {shard} (BALLAST_SEED={seed})", n.id());
    }
}

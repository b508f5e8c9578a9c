//! Damaged blocks: read repair and the node-to-node calls behind it and
//! behind scrub ([`crate::scrub`]).
//!
//! **Read repair (leader).** A linearizable read on the shard leader that
//! meets blocks failing their CRC32C ([`ShardGroup::read_checked`]) notes the
//! leader's applied index `A`, asks the group's other voters for those
//! blocks (`Raft.FetchBlocks` with `min_applied = A`: a voter answers only
//! once it has applied `A`, so its copy reflects every write the read must
//! see, and only committed ones), answers the read from the first healthy
//! copy of each block, and then proposes a `Repair` entry
//! ([`ballast_raft::apply`] says why it is safe) in the background. No
//! healthy copy anywhere: the read fails with `CORRUPT`, as before.
//!
//! **Scrub repair (any replica).** A replica whose scrub finds damaged
//! blocks asks the shard's leader (`Raft.RepairBlocks`); the leader takes
//! healthy copies from itself or the other voters ([`healthy_copies`]) and
//! proposes the same `Repair` entry.
//!
//! **Replica comparison (leader).** `Raft.FetchDigest` gives the leader a
//! voter's digest at a log index ([`crate::realign`]).
//!
//! The calls reuse the `Raft` service's envelope (`RaftRequest`: cluster,
//! sender, target, group) with a ballast-raft codec payload, like
//! `AppendEntries`; see docs/decisions.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use ballast_proto::pb;
use ballast_proto::PeerClient;
use ballast_proto::{ProtoError, Reply};
use ballast_raft::types::{
    BlockCopy, BlockRef, FetchBlocks, FetchDigest, FetchedBlocks, FetchedDigest, RepairBlock, RepairBlocks,
    RepairCause, RepairedBlocks,
};
use ballast_raft::{codec, ShardGroup};
use ballast_storage::BlockStore;
use ballast_types::{ApiError, ErrorCode, GroupId, NodeId, RaftEnvelope, RaftRequest, VolumeId};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::raft_service::WhoAmI;

/// How long a peer's `FetchBlocks` may take (its wait for `min_applied`
/// included).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a voter waits to reach `min_applied` before refusing.
pub const APPLIED_WAIT: Duration = Duration::from_secs(2);
/// How long a `RepairBlocks` call may take (fetching copies and one commit).
pub const REPAIR_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a voter waits to apply a `Digest` entry before refusing.
pub const DIGEST_WAIT: Duration = Duration::from_secs(5);
/// How long a `FetchDigest` call may take (its wait included).
pub const DIGEST_TIMEOUT: Duration = Duration::from_secs(6);

/// A `Raft` client for a node address, over a reused channel; TLS, timeouts
/// and the join token are the node's (see `NodeInner::peer_client`).
pub type Connect = Box<dyn Fn(&str) -> Result<PeerClient, String> + Send + Sync>;

/// This node's client side of `FetchBlocks` and `RepairBlocks`.
pub struct Peers {
    who: WhoAmI,
    connect: Connect,
    clients: Mutex<HashMap<String, PeerClient>>,
}

impl Peers {
    pub fn new(who: WhoAmI, connect: Connect) -> Self {
        Self { who, connect, clients: Mutex::new(HashMap::new()) }
    }

    fn client(&self, addr: &str) -> Result<PeerClient, ApiError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let c = (self.connect)(addr).map_err(|e| ApiError::new(ErrorCode::Unavailable, e))?;
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn request<Q: Serialize>(&self, target: NodeId, group: GroupId, q: &Q) -> Result<pb::RaftRequest, ApiError> {
        let (cluster, me) = self
            .who
            .get()
            .copied()
            .ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "this node is not part of a cluster yet"))?;
        let payload = codec::encode(q).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        Ok(pb::RaftRequest::from(RaftRequest { envelope: RaftEnvelope { cluster, from: me, target, group }, payload }))
    }

    async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        rpc: Rpc,
        target: NodeId,
        addr: &str,
        group: GroupId,
        q: &Q,
        timeout: Duration,
    ) -> Result<R, ApiError> {
        let mut client = self.client(addr)?;
        let mut req = tonic::Request::new(self.request(target, group, q)?);
        req.set_timeout(timeout);
        let call = async {
            match rpc {
                Rpc::Fetch => client.fetch_blocks(req).await,
                Rpc::Repair => client.repair_blocks(req).await,
                Rpc::Digest => client.fetch_digest(req).await,
            }
        };
        let reply = match tokio::time::timeout(timeout, call).await {
            Err(_) => return Err(ApiError::new(ErrorCode::Timeout, format!("{addr}: no answer in {timeout:?}"))),
            Ok(Err(status)) => return Err(ProtoError::from(status).into_api()),
            Ok(Ok(r)) => r.into_inner(),
        };
        let payload = reply.into_result().map_err(|e| e.into_api())?;
        codec::decode(&payload).map_err(|e| ApiError::new(ErrorCode::Internal, format!("{addr}: {e}")))
    }

    /// `target`'s copies of `blocks` of `group`, once it has applied `min_applied`.
    pub async fn fetch(
        &self,
        target: NodeId,
        addr: &str,
        group: GroupId,
        blocks: Vec<BlockRef>,
        min_applied: u64,
    ) -> Result<FetchedBlocks, ApiError> {
        let q = FetchBlocks { blocks, min_applied };
        self.call(Rpc::Fetch, target, addr, group, &q, FETCH_TIMEOUT).await
    }

    /// Ask `group`'s leader `target` to repair `blocks` (damaged here).
    pub async fn ask_repair(
        &self,
        target: NodeId,
        addr: &str,
        group: GroupId,
        blocks: Vec<BlockRef>,
    ) -> Result<RepairedBlocks, ApiError> {
        self.call(Rpc::Repair, target, addr, group, &RepairBlocks { blocks }, REPAIR_TIMEOUT).await
    }

    /// `target`'s digest of `group` at the `Digest` entry `index`, once it
    /// applied it (`digest: None`: it no longer keeps it).
    pub async fn fetch_digest(
        &self,
        target: NodeId,
        addr: &str,
        group: GroupId,
        index: u64,
    ) -> Result<FetchedDigest, ApiError> {
        self.call(Rpc::Digest, target, addr, group, &FetchDigest { index }, DIGEST_TIMEOUT).await
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Fetch,
    Repair,
    Digest,
}

/// Healthy copies of blocks, each with the applied index it was read at.
#[derive(Debug, Default)]
pub struct Copies {
    pub found: BTreeMap<BlockRef, Option<Bytes>>,
    /// The lowest applied index of the answers used (the repair's `as_of`).
    pub as_of: u64,
    /// Blocks no asked replica holds a healthy copy of.
    pub missing: Vec<BlockRef>,
}

/// Record the healthy copies of `fetched` (answers for `asked`, in order);
/// returns the blocks it had no healthy copy of.
fn take(fetched: FetchedBlocks, asked: &[BlockRef], out: &mut Copies) -> Vec<BlockRef> {
    let mut still = Vec::new();
    let mut used = false;
    for (b, copy) in asked.iter().zip(fetched.copies) {
        match copy {
            BlockCopy::Data(d) => {
                out.found.insert(*b, Some(d));
                used = true;
            }
            BlockCopy::Absent => {
                out.found.insert(*b, None);
                used = true;
            }
            BlockCopy::Corrupt => still.push(*b),
        }
    }
    if used {
        out.as_of = out.as_of.min(fetched.applied);
    }
    still
}

/// Healthy copies of `blocks` of `group`'s replica `local`: from `local`
/// itself when `include_local` (a leader repairing a follower's copy), then
/// from the other voters in turn, each asked once it has applied
/// `min_applied`. A peer that fails is logged and skipped.
pub async fn healthy_copies<S: BlockStore>(
    peers: &Peers,
    local: &ShardGroup<S>,
    blocks: &[BlockRef],
    min_applied: u64,
    include_local: bool,
) -> Copies {
    let me = local.spec().node;
    let group = GroupId(local.spec().group);
    let mut wanted: Vec<BlockRef> = blocks.to_vec();
    let mut out = Copies { as_of: u64::MAX, ..Copies::default() };
    if include_local {
        match local.copies(wanted.clone()).await {
            Ok(f) => wanted = take(f, &wanted, &mut out),
            Err(e) => tracing::warn!(group = %group, "reading local copies for a repair: {e}"),
        }
    }
    let voters = local.membership().voters;
    let addrs = local.voter_addrs();
    for v in voters.into_iter().filter(|v| *v != me) {
        if wanted.is_empty() {
            break;
        }
        let Some(addr) = addrs.get(&v) else { continue };
        match peers.fetch(NodeId(v), addr, group, wanted.clone(), min_applied).await {
            Ok(f) if f.copies.len() == wanted.len() && f.applied >= min_applied => wanted = take(f, &wanted, &mut out),
            Ok(_) => tracing::warn!(group = %group, node = v, "malformed FetchBlocks answer; skipped"),
            Err(e) => tracing::info!(group = %group, node = v, "no copies from this voter: {e}"),
        }
    }
    if out.as_of == u64::MAX {
        out.as_of = 0;
    }
    out.missing = wanted;
    out
}

/// Propose repair entries (one per volume) putting `copies` back; returns
/// the last entry's log index. Leader only.
pub async fn propose_repair<S: BlockStore>(
    group: &ShardGroup<S>,
    copies: &Copies,
    cause: RepairCause,
) -> Result<u64, ballast_raft::ShardError> {
    let mut by_volume: BTreeMap<u64, Vec<RepairBlock>> = BTreeMap::new();
    for (b, data) in &copies.found {
        by_volume.entry(b.volume).or_default().push(RepairBlock { block: b.block, data: data.clone() });
    }
    let mut index = 0;
    for (volume, blocks) in by_volume {
        // Bounded entries: a Repair carries at most 256 blocks (1 MiB).
        for part in blocks.chunks(256) {
            index = group.repair(VolumeId(volume), copies.as_of, cause, part.to_vec()).await?;
        }
    }
    Ok(index)
}

//! The tonic `Raft` service: peer messages routed by group to this node's
//! replicas. Every message is validated (`ballast-proto`) and its envelope
//! checked — our cluster, addressed to this node, a group running here —
//! before its payload is decoded. Refusals are typed errors in the reply
//! (`WRONG_CLUSTER`, `INVALID`, `NOT_FOUND` for an unknown group,
//! `UNAVAILABLE` when the replica's Raft stopped); the sender's openraft
//! treats any of them as "no answer" and retries.

use std::sync::{Arc, OnceLock};

use ballast_proto::pb::raft_server::Raft;
use ballast_proto::{pb, SnapshotSequencer};
use ballast_raft::types::{FetchBlocks, FetchDigest, RepairBlocks, RepairCause, RepairedBlocks, SnapshotMeta, Vote};
use ballast_raft::{codec, ShardError, ShardSnapshot, SnapshotReceiver};
use ballast_storage::BlockStore;
use ballast_types::{ApiError, ClusterId, ErrorCode, GroupId, NodeHello, RaftEnvelope, RaftRequest, SnapshotChunk};
use bytes::Bytes;
use openraft::Snapshot;
use tonic::{Request, Response, Status, Streaming};

use crate::data_service::api_error;

use crate::integrity::{self, Peers, APPLIED_WAIT, DIGEST_WAIT};
use crate::router::{MultiRaft, Replica};

/// Most blocks one `FetchBlocks` or `RepairBlocks` may name (4 MiB of copies).
pub const MAX_BLOCKS_PER_CALL: usize = 1024;

/// Who this node is, once it belongs to a cluster (set once, by `cluster
/// init` or a join, or at start from the data dir).
pub type WhoAmI = Arc<OnceLock<(ClusterId, ballast_types::NodeId)>>;

/// Serves node-to-node Raft traffic for one node.
pub struct RaftService<S: BlockStore> {
    who: WhoAmI,
    groups: Arc<MultiRaft<S>>,
    /// For `RepairBlocks` (a leader fetching healthy copies from its
    /// voters); `None`: this node refuses it.
    peers: Option<Arc<Peers>>,
}

impl<S: BlockStore> RaftService<S> {
    pub fn new(who: WhoAmI, groups: Arc<MultiRaft<S>>) -> Self {
        Self { who, groups, peers: None }
    }

    /// Serve `RepairBlocks` through `peers`.
    pub fn with_peers(mut self, peers: Arc<Peers>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// This node's cluster and id; `UNAVAILABLE` before it has joined one.
    fn me(&self) -> Result<(ClusterId, ballast_types::NodeId), ApiError> {
        self.who.get().copied().ok_or_else(|| unavailable("this node is not part of a cluster yet"))
    }

    /// The replica an envelope is for, or why this node refuses it.
    fn route(&self, e: &RaftEnvelope) -> Result<Arc<Replica<S>>, ApiError> {
        let (cluster, me) = self.me()?;
        if e.cluster != cluster {
            return Err(ApiError::new(
                ErrorCode::WrongCluster,
                format!("this node is in {cluster}, not {}", e.cluster),
            ));
        }
        if e.target != me {
            return Err(ApiError::new(ErrorCode::Invalid, format!("message for {} reached {me}", e.target)));
        }
        if crate::faults::blocked(e.from.0) {
            return Err(unavailable(format!("traffic from {} is dropped (partition fault)", e.from)));
        }
        self.groups
            .get(e.group)
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("{} does not run on {me}", e.group)))
    }
}

fn invalid(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Invalid, e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, e.to_string())
}

/// The next validated chunk of a snapshot stream.
async fn next(stream: &mut Streaming<pb::SnapshotChunk>) -> Result<Option<SnapshotChunk>, ApiError> {
    match stream.message().await {
        Ok(Some(m)) => SnapshotChunk::try_from(m).map(Some).map_err(ApiError::from),
        Ok(None) => Ok(None),
        Err(s) => Err(unavailable(format!("snapshot stream broken: {}", s.message()))),
    }
}

fn encoded<T: serde::Serialize>(v: &T) -> Result<Bytes, ApiError> {
    codec::encode(v).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

fn reply(r: Result<Bytes, ApiError>) -> Result<Response<pb::RaftReply>, Status> {
    if let Err(e) = &r {
        tracing::debug!("raft call refused: {e}");
    }
    Ok(Response::new(pb::RaftReply::from(r)))
}

impl<S: BlockStore> RaftService<S> {
    async fn append_entries(&self, m: pb::RaftRequest) -> Result<Bytes, ApiError> {
        let req = RaftRequest::try_from(m).map_err(ApiError::from)?;
        let replica = self.route(&req.envelope)?;
        let rpc = codec::decode(&req.payload).map_err(invalid)?;
        let resp = replica.group.raft().append_entries(rpc).await.map_err(unavailable)?;
        encoded(&resp)
    }

    /// A vote request, or with `pre` a Pre-Vote.
    async fn vote(&self, m: pb::RaftRequest, pre: bool) -> Result<Bytes, ApiError> {
        let req = RaftRequest::try_from(m).map_err(ApiError::from)?;
        let replica = self.route(&req.envelope)?;
        let rpc = codec::decode(&req.payload).map_err(invalid)?;
        let resp = replica.group.answer_vote(rpc, pre).await.map_err(unavailable)?;
        encoded(&resp)
    }

    /// The shard replica a block call is for (never the meta group) and its
    /// decoded payload.
    fn block_call<Q: serde::de::DeserializeOwned>(&self, m: pb::RaftRequest) -> Result<(Arc<Replica<S>>, Q), ApiError> {
        let req = RaftRequest::try_from(m).map_err(ApiError::from)?;
        if req.envelope.group == GroupId::META {
            return Err(invalid("block calls are for shard groups"));
        }
        let replica = self.route(&req.envelope)?;
        Ok((replica, codec::decode(&req.payload).map_err(invalid)?))
    }

    /// Verified copies of blocks, once this replica has applied `min_applied`.
    async fn fetch_blocks(&self, m: pb::RaftRequest) -> Result<Bytes, ApiError> {
        let (replica, q): (_, FetchBlocks) = self.block_call(m)?;
        if q.blocks.len() > MAX_BLOCKS_PER_CALL {
            return Err(invalid(format!("{} blocks asked (max {MAX_BLOCKS_PER_CALL})", q.blocks.len())));
        }
        replica.group.wait_applied(q.min_applied, APPLIED_WAIT).await.map_err(api_error)?;
        encoded(&replica.group.copies(q.blocks).await.map_err(api_error)?)
    }

    /// On the shard's leader: repair blocks damaged on the caller.
    async fn repair_blocks(&self, m: pb::RaftRequest) -> Result<Bytes, ApiError> {
        let (replica, q): (_, RepairBlocks) = self.block_call(m)?;
        let peers = self.peers.as_ref().ok_or_else(|| unavailable("this node does not repair blocks"))?;
        if q.blocks.len() > MAX_BLOCKS_PER_CALL {
            return Err(invalid(format!("{} blocks asked (max {MAX_BLOCKS_PER_CALL})", q.blocks.len())));
        }
        let group = &replica.group;
        if !group.membership().leading {
            let leader = group.leader();
            return Err(api_error(ShardError::NotLeader {
                group: group.spec().group,
                leader: leader.as_ref().map(|l| l.0),
                addr: leader.map(|l| l.1.addr),
            }));
        }
        let copies = integrity::healthy_copies(peers, group, &q.blocks, group.applied_index(), true).await;
        let index = if copies.found.is_empty() {
            0
        } else {
            integrity::propose_repair(group, &copies, RepairCause::Scrub).await.map_err(api_error)?
        };
        if !copies.missing.is_empty() {
            tracing::error!(shard = %group.spec().shard, blocks = copies.missing.len(), first = ?copies.missing[0], "no voter holds a healthy copy of damaged blocks: they stay damaged");
        }
        encoded(&RepairedBlocks { index, unrepairable: copies.missing })
    }

    /// The digest this replica recorded at a `Digest` entry, once applied.
    async fn fetch_digest(&self, m: pb::RaftRequest) -> Result<Bytes, ApiError> {
        let (replica, q): (_, FetchDigest) = self.block_call(m)?;
        encoded(&replica.group.digest_at(q.index, DIGEST_WAIT).await.map_err(api_error)?)
    }

    /// Spill the stream's frames to a file (on a blocking thread, two frames
    /// of buffer), then install the file-backed snapshot.
    async fn install_snapshot(&self, mut stream: Streaming<pb::SnapshotChunk>) -> Result<Bytes, ApiError> {
        let mut seq = SnapshotSequencer::default();
        let first = next(&mut stream).await?.ok_or_else(|| invalid("empty snapshot stream"))?;
        seq.accept(&first).map_err(ApiError::from)?;
        let replica = self.route(&first.envelope)?;
        let start = first.start.clone().ok_or_else(|| invalid("first snapshot chunk without vote and meta"))?;
        let vote: Vote = codec::decode(&start.vote).map_err(invalid)?;
        let meta: SnapshotMeta = codec::decode(&start.meta).map_err(invalid)?;

        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let dir = replica.snapshot_dir.clone();
        let spill = tokio::task::spawn_blocking(move || {
            let mut receiver = SnapshotReceiver::create(&dir)?;
            while let Some(frame) = rx.blocking_recv() {
                receiver.push(&frame)?;
            }
            Ok::<_, ballast_raft::SnapshotError>(receiver)
        });
        let mut chunk = Some(first);
        let fed: Result<(), ApiError> = async {
            while let Some(c) = chunk.take() {
                if !c.data.is_empty() && tx.send(c.data).await.is_err() {
                    // The spill thread failed; its error is reported below.
                    break;
                }
                if c.done {
                    break;
                }
                let c = next(&mut stream).await?.ok_or_else(|| unavailable("snapshot stream ended before `done`"))?;
                seq.accept(&c).map_err(ApiError::from)?;
                chunk = Some(c);
            }
            Ok(())
        }
        .await;
        drop(tx);
        let receiver = spill.await.map_err(unavailable)?.map_err(invalid);
        let receiver = match (fed, receiver) {
            (Ok(()), Ok(r)) if seq.is_complete() => r,
            (fed, receiver) => {
                if let Ok(r) = &receiver {
                    let _ = std::fs::remove_file(r.path());
                }
                return Err(fed.err().or(receiver.err()).unwrap_or_else(|| invalid("snapshot stream incomplete")));
            }
        };
        let snapshot: ShardSnapshot =
            tokio::task::spawn_blocking(move || receiver.finish()).await.map_err(unavailable)?.map_err(invalid)?;
        let resp =
            replica.group.raft().install_full_snapshot(vote, Snapshot { meta, snapshot }).await.map_err(unavailable)?;
        encoded(&resp)
    }
}

#[tonic::async_trait]
impl<S: BlockStore> Raft for RaftService<S> {
    async fn hello(&self, request: Request<pb::NodeHello>) -> Result<Response<pb::NodeHelloReply>, Status> {
        let r = NodeHello::try_from(request.into_inner()).map_err(ApiError::from).and_then(|h| {
            h.check_version()?;
            let (cluster, me) = self.me()?;
            if h.cluster != cluster {
                return Err(ApiError::new(ErrorCode::WrongCluster, format!("this node is in {cluster}")));
            }
            if crate::faults::blocked(h.node.0) {
                return Err(unavailable(format!("traffic from {} is dropped (partition fault)", h.node)));
            }
            Ok(NodeHello { cluster, node: me, addr: String::new(), protocol_version: ballast_types::PROTOCOL_VERSION })
        });
        Ok(Response::new(pb::NodeHelloReply::from(r)))
    }

    async fn append_entries(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(RaftService::append_entries(self, request.into_inner()).await)
    }

    async fn vote(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(RaftService::vote(self, request.into_inner(), false).await)
    }

    async fn pre_vote(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(RaftService::vote(self, request.into_inner(), true).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        reply(RaftService::install_snapshot(self, request.into_inner()).await)
    }

    async fn fetch_blocks(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(RaftService::fetch_blocks(self, request.into_inner()).await)
    }

    async fn repair_blocks(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(RaftService::repair_blocks(self, request.into_inner()).await)
    }

    async fn fetch_digest(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        reply(RaftService::fetch_digest(self, request.into_inner()).await)
    }
}

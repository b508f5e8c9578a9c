//! An in-process [`Transport`] for tests: routes by `(node, group)` to local
//! `Raft` handles, with a fault switch that isolates a node (every message to
//! or from it is dropped as unreachable). Behind the `testing` feature.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ballast_storage::BlockStore;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::Snapshot;

use crate::network::{FullSnapshot, Transport, TransportError};
use crate::shard::ShardRaft;
use crate::snapshot::SnapshotReceiver;
use crate::types::{BallastNode, GroupId, NodeId, TypeConfig, Vote};

struct Target<S: BlockStore> {
    raft: ShardRaft<S>,
    snapshot_dir: PathBuf,
}

struct Inner<S: BlockStore> {
    groups: HashMap<(NodeId, GroupId), Target<S>>,
    isolated: HashSet<NodeId>,
}

/// The switchboard of an in-process cluster.
pub struct LocalRouter<S: BlockStore> {
    inner: Mutex<Inner<S>>,
}

impl<S: BlockStore> LocalRouter<S> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { inner: Mutex::new(Inner { groups: HashMap::new(), isolated: HashSet::new() }) })
    }

    fn inner(&self) -> MutexGuard<'_, Inner<S>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Route `(node, group)` to `raft`; received snapshots are spilled to
    /// `snapshot_dir` (see [`crate::state_machine::shard_snapshot_dir`]).
    pub fn register(&self, node: NodeId, group: GroupId, raft: ShardRaft<S>, snapshot_dir: PathBuf) {
        self.inner().groups.insert((node, group), Target { raft, snapshot_dir });
    }

    pub fn unregister(&self, node: NodeId, group: GroupId) {
        self.inner().groups.remove(&(node, group));
    }

    /// Cut `node` off from every other node (or reconnect it).
    pub fn isolate(&self, node: NodeId, isolated: bool) {
        if isolated {
            self.inner().isolated.insert(node);
        } else {
            self.inner().isolated.remove(&node);
        }
    }

    /// The transport node `from` uses.
    pub fn transport(self: &Arc<Self>, from: NodeId) -> Arc<LocalTransport<S>> {
        Arc::new(LocalTransport { router: self.clone(), from })
    }
}

/// One node's view of the [`LocalRouter`].
pub struct LocalTransport<S: BlockStore> {
    router: Arc<LocalRouter<S>>,
    from: NodeId,
}

impl<S: BlockStore> LocalTransport<S> {
    fn target(&self, target: NodeId, group: GroupId) -> Result<(ShardRaft<S>, PathBuf), TransportError> {
        let inner = self.router.inner();
        if inner.isolated.contains(&self.from) || inner.isolated.contains(&target) {
            return Err(TransportError::Unreachable { target, reason: "isolated".into() });
        }
        let t = inner
            .groups
            .get(&(target, group))
            .ok_or_else(|| TransportError::Unreachable { target, reason: format!("group {group} not running") })?;
        Ok((t.raft.clone(), t.snapshot_dir.clone()))
    }
}

async fn within<T, E: std::fmt::Display>(
    target: NodeId,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(timeout, f).await {
        Err(_) => Err(TransportError::Timeout { target, after: timeout }),
        Ok(Err(e)) => Err(TransportError::Remote { target, reason: e.to_string() }),
        Ok(Ok(v)) => Ok(v),
    }
}

impl<S: BlockStore> Transport for LocalTransport<S> {
    async fn append_entries(
        &self,
        target: NodeId,
        _node: &BallastNode,
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> Result<AppendEntriesResponse<TypeConfig>, TransportError> {
        let (raft, _) = self.target(target, group)?;
        within(target, timeout, raft.append_entries(rpc)).await
    }

    async fn vote(
        &self,
        target: NodeId,
        _node: &BallastNode,
        group: GroupId,
        rpc: VoteRequest<TypeConfig>,
        pre: bool,
        timeout: Duration,
    ) -> Result<VoteResponse<TypeConfig>, TransportError> {
        let (raft, _) = self.target(target, group)?;
        if pre {
            within(target, timeout, raft.pre_vote(rpc)).await
        } else {
            within(target, timeout, raft.vote(rpc)).await
        }
    }

    async fn full_snapshot(
        &self,
        target: NodeId,
        _node: &BallastNode,
        group: GroupId,
        vote: Vote,
        snapshot: FullSnapshot,
    ) -> Result<SnapshotResponse<TypeConfig>, TransportError> {
        let (raft, dir) = self.target(target, group)?;
        let remote = |e: &dyn std::fmt::Display| TransportError::Remote { target, reason: e.to_string() };
        // Exactly what a network transport does: frames out, frames in.
        let mut frames = snapshot.snapshot.into_frames();
        let received = tokio::task::spawn_blocking(move || {
            let mut rx = SnapshotReceiver::create(&dir)?;
            while let Some(frame) = frames.blocking_recv() {
                let frame = frame?;
                rx.push(&frame)?;
            }
            rx.finish()
        })
        .await
        .map_err(|e| remote(&e))?
        .map_err(|e| remote(&e))?;
        self.target(target, group)?;
        let snap = Snapshot { meta: snapshot.meta, snapshot: received };
        raft.install_full_snapshot(vote, snap).await.map_err(|e| remote(&e))
    }
}

//! Starting a shard replica and talking to it: [`start_shard`] wires a
//! group's log (on the disk's [`LogWriter`]), its state machine (on the
//! disk's [`BlockStore`]) and the [`Transport`] into an openraft instance;
//! [`ShardGroup`] wraps it with Ballast-typed writes and linearizable reads.

use openraft::async_runtime::watch::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ballast_storage::{BlockStore, LogStore, Segment, StorageError, VolumeView};
use ballast_types::{Geometry, ShardId, VolumeId};
use bytes::Bytes;
use openraft::errors::{ClientWriteError, ForwardToLeader, LinearizableReadError, RaftError};
use openraft::raft::{TransferLeaderRequest, VoteRequest, VoteResponse};
use openraft::{Raft, ReadPolicy, SnapshotPolicy};

use crate::error::ShardError;
use crate::log_store::ShardLogStore;
use crate::log_writer::LogWriter;
use crate::network::{ShardNetworkFactory, Transport};
use crate::state_machine::ShardStateMachine;
use crate::types::{
    BallastNode, BlockCopy, BlockRef, FetchedBlocks, GroupId, NodeId, RepairBlock, RepairCause, ShardRequest,
    ShardResponse, TypeConfig,
};

/// What [`ShardGroup::read_checked`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRead {
    /// Every stored block passed its checksum.
    Data(Vec<Segment>),
    /// These blocks (by block number in the volume) fail their checksum on
    /// this replica; it had applied `applied` when it saw them.
    Damaged { applied: u64, blocks: Vec<u64> },
}

/// A group's membership as one replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// This replica is the leader it knows of.
    pub leading: bool,
    /// A joint configuration (a change half-way).
    pub joint: bool,
}

/// The openraft handle of a shard replica.
pub type ShardRaft<S> = Raft<TypeConfig, ShardStateMachine<S>>;

/// Timing and compaction of shard groups. The defaults suit hundreds of groups
/// per process (see DEPENDENCY-NOTES: idle cost grows with groups × followers
/// ÷ heartbeat interval).
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot (cheap: a sync and a metadata record) after this many
    /// applied entries; the log below it is then purged.
    pub snapshot_every: u64,
    /// Entries kept below the snapshot so slightly lagging followers catch up
    /// from the log rather than by a snapshot.
    pub logs_to_keep: u64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(250),
            election_timeout_min: Duration::from_millis(750),
            election_timeout_max: Duration::from_millis(1500),
            snapshot_every: 20_000,
            logs_to_keep: 2_000,
        }
    }
}

impl ShardConfig {
    /// The openraft configuration of group `group`.
    pub fn openraft(&self, group: GroupId) -> Result<openraft::Config, ShardError> {
        let ms = |d: Duration| d.as_millis() as u64;
        let c = openraft::Config {
            cluster_name: format!("ballast-group-{group}"),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.logs_to_keep,
            // Replicate an entry as soon as it is handed to the log writer,
            // not after the leader's own fsync: the leader's and the
            // followers' syncs then overlap, which is most of a QD1 write.
            broadcast_submitted_on_append: Some(true),
            // A candidate first asks whether a quorum would vote for it: a
            // replica that cannot win (cut off, back from a restart, or
            // moved out of the group) never raises its term and deposes a
            // healthy leader.
            enable_pre_vote: Some(true),
            // A restarted leader must win an election again, whose blank
            // entry its reads then wait for. Restored at once, it would
            // serve reads as of its applied state, which a crash rolls back
            // to the last flush of the block store (its writes have no WAL),
            // while entries it had committed and acknowledged wait in its
            // log to be applied again: a stale read (found by the fault
            // suite's power loss).
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        c.validate().map_err(|e| ShardError::Rejected { group, reason: e.to_string() })
    }
}

/// Which replica to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// The Raft group (the node crate maps shards to groups; group 0 is meta).
    pub group: GroupId,
    /// The shard whose key range the group owns.
    pub shard: ShardId,
    /// This node.
    pub node: NodeId,
}

/// A running shard replica.
pub struct ShardGroup<S: BlockStore> {
    spec: ShardSpec,
    raft: ShardRaft<S>,
    store: Arc<S>,
    /// Until when reads must confirm leadership with a quorum round instead
    /// of trusting the lease: set when this replica hands its leadership
    /// away (see [`Self::linearize`]).
    /// Shared by every handle on the replica.
    lease_off_until: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// How long a lease lasts (openraft's is `election_timeout_max`).
    lease: Duration,
    /// This node deleted an earlier replica of the group (see [`Self::answer_vote`]).
    remade: bool,
}

/// Start (or restart, from what `log` and `store` hold) the replica `spec`.
/// Received snapshots are spilled under `snapshot_dir/shard-<id>/`.
pub async fn start_shard<L: LogStore, S: BlockStore, T: Transport>(
    spec: ShardSpec,
    config: &ShardConfig,
    log: &LogWriter<L>,
    store: Arc<S>,
    snapshot_dir: &Path,
    transport: Arc<T>,
) -> Result<ShardGroup<S>, ShardError> {
    let raft_config = Arc::new(config.openraft(spec.group)?);
    let remade = log.store().get_state(spec.group, crate::log_store::REMADE_KEY)?.is_some();
    let log_store = ShardLogStore::open(spec.group, log.clone())?;
    let sm = ShardStateMachine::open(store.clone(), spec.shard, snapshot_dir)
        .map_err(|e| ShardError::Unavailable { group: spec.group, reason: e.to_string() })?;
    let network = ShardNetworkFactory::new(transport, spec.group);
    let raft = Raft::new(spec.node, raft_config, network, log_store, sm)
        .await
        .map_err(|e| ShardError::Unavailable { group: spec.group, reason: e.to_string() })?;
    tokio::spawn(log_role_changes(spec, raft.metrics()));
    Ok(ShardGroup::from_parts(spec, raft, store, config, remade))
}

/// Log, once per change, who this replica thinks leads its group, in which
/// term, and the group's voters (committed and latest): openraft's own lines
/// do not name the group, and a replica's view of its group is what
/// explains a stalled move or a failover. Ends when the replica stops.
pub(crate) async fn log_role_changes(
    spec: ShardSpec,
    mut rx: openraft::type_config::alias::WatchReceiverOf<TypeConfig, openraft::RaftMetrics<TypeConfig>>,
) {
    let mut last = None;
    loop {
        let now = {
            let m = rx.borrow_watched();
            let ids = |c: &openraft::type_config::alias::StoredMembershipOf<TypeConfig>| {
                c.membership()
                    .get_joint_config()
                    .iter()
                    .map(|s| s.iter().copied().collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            };
            (m.current_term, m.current_leader, ids(&m.membership_config), ids(&m.committed_membership_config))
        };
        if last.as_ref() != Some(&now) {
            let (term, leader, latest, committed) = &now;
            tracing::info!(group = %spec.group, node = spec.node, term = ?term, leader = ?leader, ?latest, ?committed, "group view");
            last = Some(now);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn leader_of(group: GroupId, f: &ForwardToLeader<TypeConfig>) -> (GroupId, Option<NodeId>, Option<String>) {
    (group, f.leader_id, f.leader_node.as_ref().map(|n| n.addr.clone()))
}

impl<S: BlockStore> ShardGroup<S> {
    pub(crate) fn from_parts(
        spec: ShardSpec,
        raft: ShardRaft<S>,
        store: Arc<S>,
        config: &ShardConfig,
        remade: bool,
    ) -> Self {
        let lease_off_until = Arc::default();
        Self { spec, raft, store, lease_off_until, lease: config.election_timeout_max, remade }
    }

    /// Answer a vote request (with `pre`, a Pre-Vote: would this replica
    /// vote?).
    ///
    /// A replica made again on a node that deleted it earlier (marked with
    /// [`REMADE_KEY`](crate::log_store::REMADE_KEY); the node kept its
    /// vote) remembers nothing its group committed. Until a leader has sent
    /// it the log (an entry or a snapshot) it grants no vote: otherwise a
    /// member cut off since before a move, whose stale configuration still
    /// names this node, could win an election with its help and overwrite
    /// committed entries on the others. A replica that was never deleted
    /// votes with an empty log (a group being formed needs that).
    pub async fn answer_vote(
        &self,
        rpc: VoteRequest<TypeConfig>,
        pre: bool,
    ) -> Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>> {
        if self.remade {
            let (vote, last) = self.raft.with_raft_state(|st| (*st.vote_ref(), st.log_ids.last().cloned())).await?;
            if last.is_none() {
                tracing::info!(group = %self.spec.group, candidate = %rpc.vote, pre, "vote refused: this replica was made again and holds no log yet");
                return Ok(VoteResponse::new(vote, None, false));
            }
        }
        if pre {
            self.raft.pre_vote(rpc).await
        } else {
            self.raft.vote(rpc).await
        }
    }

    /// A second handle on the same replica (shutting either down stops it).
    pub(crate) fn handle(&self) -> Self {
        Self {
            spec: self.spec,
            raft: self.raft.clone(),
            store: self.store.clone(),
            lease_off_until: self.lease_off_until.clone(),
            lease: self.lease,
            remade: self.remade,
        }
    }

    pub fn spec(&self) -> ShardSpec {
        self.spec
    }

    pub fn raft(&self) -> &ShardRaft<S> {
        &self.raft
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Make this replica the first member of a new group of `members`
    /// (call on one node only; the others start empty and are told by the leader).
    pub async fn initialize(&self, members: BTreeMap<NodeId, BallastNode>) -> Result<(), ShardError> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| ShardError::Rejected { group: self.spec.group, reason: e.to_string() })
    }

    /// The leader this replica knows of, with its address.
    ///
    /// `None` also when the leader it last knew is not a voter of its
    /// latest configuration, or is this replica and it no longer leads: a
    /// leader that removed itself from the group keeps its vote, and would
    /// otherwise go on naming itself, so its node would never look for
    /// the group's real leader.
    pub fn leader(&self) -> Option<(NodeId, BallastNode)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let id = m.current_leader?;
        let config = m.membership_config.membership();
        if !config.voter_ids().any(|v| v == id) || (id == self.spec.node && m.state != openraft::ServerState::Leader) {
            return None;
        }
        let node = config.get_node(&id).cloned().unwrap_or_default();
        Some((id, node))
    }

    /// The group's voters and learners as this replica last saw them (the
    /// latest membership in its log, committed or not), and whether this
    /// replica leads.
    pub fn membership(&self) -> Membership {
        let m = self.raft.metrics().borrow_watched().clone();
        let config = m.membership_config.membership();
        Membership {
            voters: config.voter_ids().collect(),
            learners: config.learner_ids().collect(),
            leading: m.current_leader == Some(self.spec.node),
            joint: config.get_joint_config().len() > 1,
        }
    }

    /// The address of every voter, as this replica's membership records it.
    pub fn voter_addrs(&self) -> BTreeMap<NodeId, String> {
        let m = self.raft.metrics().borrow_watched().clone();
        let config = m.membership_config.membership();
        config.voter_ids().filter_map(|id| config.get_node(&id).map(|n| (id, n.addr.clone()))).collect()
    }

    /// Add each of `nodes` that is neither a voter nor a learner as a learner
    /// (leader only). Returns at once; the leader then brings each up to date
    /// through the log or a snapshot streamed in pages. Watch
    /// [`learner_lag`](Self::learner_lag) for progress.
    ///
    /// A learner the group already lists at another address (left from an
    /// earlier move that did not finish) gets the new address: a learner
    /// does not vote, so its address may change.
    pub async fn add_learners(&self, nodes: &BTreeMap<NodeId, BallastNode>) -> Result<(), ShardError> {
        let m = self.raft.metrics().borrow_watched().clone();
        let config = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = config.voter_ids().collect();
        let learners: BTreeMap<NodeId, String> =
            config.learner_ids().filter_map(|id| config.get_node(&id).map(|n| (id, n.addr.clone()))).collect();
        let moved: BTreeMap<NodeId, BallastNode> = nodes
            .iter()
            .filter(|(id, node)| learners.get(id).is_some_and(|addr| *addr != node.addr))
            .map(|(id, node)| (*id, node.clone()))
            .collect();
        if !moved.is_empty() {
            let change = openraft::ChangeMembers::SetNodes(moved);
            self.raft.change_membership(change, false).await.map_err(|e| self.management(e))?;
        }
        for (id, node) in nodes {
            if !voters.contains(id) && !learners.contains_key(id) {
                self.raft.add_learner(*id, node.clone(), false).await.map_err(|e| self.management(e))?;
            }
        }
        Ok(())
    }

    /// How many log entries `node` is behind this leader (`None`: this
    /// replica does not lead, is not replicating to `node`, or `node` has
    /// acknowledged nothing yet).
    pub fn learner_lag(&self, node: NodeId) -> Option<u64> {
        let m = self.raft.metrics().borrow_watched().clone();
        let matched = m.replication.as_ref()?.get(&node)?.as_ref()?.index;
        Some(m.last_log_index.unwrap_or(0).saturating_sub(matched))
    }

    /// Make the group's voters exactly `voters` and drop every other member,
    /// learners included (leader only; every new voter must be a learner
    /// already). One joint-consensus change; openraft refuses it while
    /// another is under way. Returns once `voters` is the group's committed
    /// configuration, so a caller may report the move as done.
    ///
    /// A learner left from a move that did not finish (its node died, or the
    /// map chose another) is dropped here too: otherwise the leader would
    /// go on sending to it, and a later move naming the same node would
    /// find it listed already.
    pub async fn set_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), ShardError> {
        let now = self.membership();
        if now.voters != voters || now.joint {
            self.raft.change_membership(voters.clone(), false).await.map_err(|e| self.management(e))?;
        }
        let stale: BTreeSet<NodeId> = self.membership().learners.into_iter().filter(|l| !voters.contains(l)).collect();
        if !stale.is_empty() {
            // Commits a configuration entry: a barrier as well.
            let change = openraft::ChangeMembers::RemoveNodes(stale);
            self.raft.change_membership(change, false).await.map_err(|e| self.management(e))?;
        } else if now.voters == voters && !now.joint {
            // Already the latest configuration in this replica's log, but
            // maybe not committed (a leader that began the change lost its
            // quorum, or this one was just elected): a barrier entry commits
            // it, or fails if this replica cannot reach a quorum.
            self.write(ShardRequest::Noop).await?;
        }
        Ok(())
    }

    /// Hand this group's leadership to the voter `to` (leader only): the
    /// leader stops proposing and drops its lease, and returns the request
    /// to deliver to `to` ([`Self::take_leadership`] there), which then
    /// campaigns at once. Until `to` wins (or the old leader's election
    /// timeout passes) writes get `NotLeader` and are retried by clients.
    pub async fn transfer_leadership(&self, to: NodeId) -> Result<TransferLeaderRequest<TypeConfig>, ShardError> {
        let group = self.spec.group;
        let now = self.membership();
        if !now.leading {
            let leader = self.leader();
            return Err(ShardError::NotLeader {
                group,
                leader: leader.as_ref().map(|(id, _)| *id),
                addr: leader.map(|(_, n)| n.addr),
            });
        }
        if to == self.spec.node || !now.voters.contains(&to) || now.joint {
            return Err(ShardError::Rejected { group, reason: format!("node {to} is not another settled voter") });
        }
        let fatal = |e: &dyn std::fmt::Display| ShardError::Unavailable { group, reason: e.to_string() };
        let (vote, last) = self
            .raft
            .with_raft_state(|st| (*st.vote_ref(), st.log_ids.last().cloned()))
            .await
            .map_err(|e| fatal(&e))?;
        // The voters grant `to` their vote at once, lease or not (that is
        // what a transfer is), so this replica's lease no longer proves it
        // leads: until any vote it could still win is long gone, reads ask
        // a quorum (a voter that voted for `to` refuses to confirm).
        let until = std::time::Instant::now() + self.lease * 4;
        *self.lease_off_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
        self.raft.trigger().transfer_leader(to).await.map_err(|e| fatal(&e))?;
        Ok(TransferLeaderRequest::new(vote, to, last))
    }

    /// Take the leadership the current leader offers with `req` (made by
    /// [`Self::transfer_leadership`] on it): campaign at once if this
    /// replica's log holds the leader's last entry (it waits for its own
    /// flush of it).
    pub async fn take_leadership(&self, req: TransferLeaderRequest<TypeConfig>) -> Result<(), ShardError> {
        let group = self.spec.group;
        match self.raft.handle_transfer_leader(req).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ShardError::Rejected { group, reason: e.to_string() }),
            Err(e) => Err(ShardError::Unavailable { group, reason: e.to_string() }),
        }
    }

    fn management(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> ShardError {
        let group = self.spec.group;
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                let (group, leader, addr) = leader_of(group, &f);
                ShardError::NotLeader { group, leader, addr }
            }
            RaftError::Fatal(f) => ShardError::Unavailable { group, reason: f.to_string() },
            other => ShardError::Rejected { group, reason: other.to_string() },
        }
    }

    /// Replicate and apply `req`; answers once a majority has it durable and
    /// this leader has applied it.
    pub async fn write(&self, req: ShardRequest) -> Result<ShardResponse, ShardError> {
        self.write_at(req).await.map(|(_, resp)| resp)
    }

    /// [`Self::write`], also returning the log index the request was applied at.
    pub(crate) async fn write_at(&self, req: ShardRequest) -> Result<(u64, ShardResponse), ShardError> {
        let group = self.spec.group;
        let start = std::time::Instant::now();
        match self.raft.client_write(req).await {
            Ok(resp) => {
                crate::metrics::metrics().commit_seconds.observe_since(start);
                Ok((resp.log_id.index, resp.data))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let (group, leader, addr) = leader_of(group, &f);
                Err(ShardError::NotLeader { group, leader, addr })
            }
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => {
                let (group, leader, addr) = leader_of(group, &f);
                Err(ShardError::OutcomeUnknown { group, leader, addr })
            }
            Err(RaftError::APIError(e)) => Err(ShardError::Rejected { group, reason: e.to_string() }),
            Err(RaftError::Fatal(f)) => Err(ShardError::Unavailable { group, reason: f.to_string() }),
        }
    }

    /// Wait until this replica may serve a linearizable read: it is the leader
    /// with a valid lease (or, shortly after it offered its leadership to
    /// another voter, a quorum confirms it still leads) and has applied
    /// everything committed before the call.
    pub async fn linearize(&self) -> Result<(), ShardError> {
        let group = self.spec.group;
        let policy = {
            let mut off = self.lease_off_until.lock().unwrap_or_else(|e| e.into_inner());
            match *off {
                Some(until) if std::time::Instant::now() < until => ReadPolicy::ReadIndex,
                Some(_) => {
                    *off = None;
                    ReadPolicy::LeaseRead
                }
                None => ReadPolicy::LeaseRead,
            }
        };
        match self.raft.ensure_linearizable(policy).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                let (group, leader, addr) = leader_of(group, &f);
                Err(ShardError::NotLeader { group, leader, addr })
            }
            Err(RaftError::APIError(e)) => Err(ShardError::Unavailable { group, reason: e.to_string() }),
            Err(RaftError::Fatal(f)) => Err(ShardError::Unavailable { group, reason: f.to_string() }),
        }
    }

    /// A linearizable read of `[offset, offset+len)` of `volume` in this shard.
    pub async fn read(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<Segment>, ShardError> {
        self.linearize().await?;
        let (store, shard) = (self.store.clone(), self.spec.shard);
        let read = tokio::task::spawn_blocking(move || {
            VolumeView::new(&*store, shard, volume, Geometry::default()).read(offset, len)
        });
        let group = self.spec.group;
        Ok(read.await.map_err(|e| ShardError::Unavailable { group, reason: e.to_string() })??)
    }

    /// This replica's last applied log index (0 before anything was applied).
    pub fn applied_index(&self) -> u64 {
        self.raft.metrics().borrow_watched().last_applied.map_or(0, |l| l.index)
    }

    /// Wait at most `timeout` until this replica has applied `index`;
    /// returns the applied index then. Not there in time: `Unavailable`
    /// (retryable: the replica is behind, it may catch up).
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<u64, ShardError> {
        let group = self.spec.group;
        match self.raft.wait(Some(timeout)).applied_index_at_least(Some(index), "wait applied").await {
            Ok(m) => Ok(m.last_applied.map_or(0, |l| l.index)),
            Err(e) => Err(ShardError::Unavailable {
                group,
                reason: format!("replica has applied {} of {index} ({e})", self.applied_index()),
            }),
        }
    }

    /// A linearizable read like [`Self::read`] that names the blocks whose
    /// stored value fails its checksum instead of failing on them, with the
    /// applied index the damage was seen at (a healthy copy from a replica
    /// that has applied at least that much answers the read linearizably).
    pub async fn read_checked(&self, volume: VolumeId, offset: u64, len: u64) -> Result<RangeRead, ShardError> {
        self.linearize().await?;
        let (store, shard, group) = (self.store.clone(), self.spec.shard, self.spec.group);
        let join = |e: tokio::task::JoinError| ShardError::Unavailable { group, reason: e.to_string() };
        for _ in 0..2 {
            let s = store.clone();
            let read = tokio::task::spawn_blocking(move || {
                VolumeView::new(&*s, shard, volume, Geometry::default()).read(offset, len)
            });
            match read.await.map_err(join)? {
                Ok(segments) => return Ok(RangeRead::Data(segments)),
                Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let applied = self.applied_index();
            let s = store.clone();
            let find = tokio::task::spawn_blocking(move || {
                VolumeView::new(&*s, shard, volume, Geometry::default()).corrupt_blocks(offset, len)
            });
            let damaged = find.await.map_err(join)??;
            if !damaged.is_empty() {
                let geometry = Geometry::default();
                let blocks = damaged.iter().map(|k| geometry.block_no(k)).collect();
                return Ok(RangeRead::Damaged { applied, blocks });
            }
            // Rewritten meanwhile: read again.
        }
        Err(ShardError::Unavailable { group, reason: "damaged blocks kept changing under a read".into() })
    }

    /// Read `[offset, offset+len)` with `patch` (block number → healthy copy,
    /// `None`: a hole) standing in for this replica's damaged blocks, after a
    /// [`Self::read_checked`] that reported them. Blocks rewritten since are
    /// read from the store (see `VolumeView::read_patched`).
    pub async fn read_patched(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u64,
        patch: BTreeMap<u64, Option<Bytes>>,
    ) -> Result<Vec<Segment>, ShardError> {
        let (store, shard, group) = (self.store.clone(), self.spec.shard, self.spec.group);
        let read = tokio::task::spawn_blocking(move || {
            VolumeView::new(&*store, shard, volume, Geometry::default()).read_patched(offset, len, &patch)
        });
        Ok(read.await.map_err(|e| ShardError::Unavailable { group, reason: e.to_string() })??)
    }

    /// This replica's copies of `blocks`, each verified, read after it had
    /// applied the returned index (for a peer's `FetchBlocks`; any replica).
    pub async fn copies(&self, blocks: Vec<BlockRef>) -> Result<FetchedBlocks, ShardError> {
        let applied = self.applied_index();
        let (store, shard, group) = (self.store.clone(), self.spec.shard, self.spec.group);
        let read = tokio::task::spawn_blocking(move || -> Result<Vec<BlockCopy>, StorageError> {
            let geometry = Geometry::default();
            let mut out = Vec::with_capacity(blocks.len());
            for b in blocks {
                let key = geometry.key(shard, VolumeId(b.volume), b.block);
                out.push(match store.get(&key) {
                    Ok(Some(data)) => BlockCopy::Data(data),
                    Ok(None) => BlockCopy::Absent,
                    Err(StorageError::Corrupt { .. } | StorageError::Malformed { .. }) => BlockCopy::Corrupt,
                    Err(e) => return Err(e),
                });
            }
            Ok(out)
        });
        let copies = read.await.map_err(|e| ShardError::Unavailable { group, reason: e.to_string() })??;
        Ok(FetchedBlocks { applied, copies })
    }

    /// Propose a [`ShardRequest::Repair`] of `blocks` of `volume` (leader
    /// only); returns the entry's log index once it is applied here.
    pub async fn repair(
        &self,
        volume: VolumeId,
        as_of: u64,
        cause: RepairCause,
        blocks: Vec<RepairBlock>,
    ) -> Result<u64, ShardError> {
        let (index, resp) = self.write_at(ShardRequest::Repair { volume, as_of, cause, blocks }).await?;
        match resp {
            ShardResponse::Done => Ok(index),
            other => Err(ShardError::Rejected { group: self.spec.group, reason: format!("repair refused: {other:?}") }),
        }
    }

    /// Linearizable allocation map of `[offset, offset+len)` (`(length, allocated)` runs).
    pub async fn extents(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ShardError> {
        self.linearize().await?;
        let (store, shard) = (self.store.clone(), self.spec.shard);
        let read = tokio::task::spawn_blocking(move || {
            VolumeView::new(&*store, shard, volume, Geometry::default()).extents(offset, len)
        });
        let group = self.spec.group;
        Ok(read.await.map_err(|e| ShardError::Unavailable { group, reason: e.to_string() })??)
    }

    /// Stop the replica's Raft tasks. Its storage stays as it is.
    pub async fn shutdown(&self) -> Result<(), ShardError> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| ShardError::Unavailable { group: self.spec.group, reason: e.to_string() })
    }
}

//! The openraft type configuration and the requests a shard applies.

use std::fmt;

use ballast_types::VolumeId;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use ballast_storage::GroupId;

/// A storage node, as Raft knows it.
pub type NodeId = u64;

/// How to reach a node: what a membership entry records for each member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BallastNode {
    /// The node's gRPC address (`host:port`).
    pub addr: String,
}

impl BallastNode {
    pub fn new(addr: impl Into<String>) -> Self {
        Self { addr: addr.into() }
    }
}

impl fmt::Display for BallastNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// One change to a shard, as replicated through its Raft log. Offsets and
/// lengths are bytes within the volume; the shard applies the part of the
/// range whose chunks it holds (the client splits requests at chunk bounds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardRequest {
    /// Write `data` at `offset`, by the writer holding `epoch`.
    Write {
        #[serde(with = "volume_id")]
        volume: VolumeId,
        epoch: u64,
        offset: u64,
        data: Bytes,
    },
    /// Make `[offset, offset+len)` read as zeros; with `punch`, whole blocks
    /// are deallocated (trim), otherwise they stay allocated.
    Zero {
        #[serde(with = "volume_id")]
        volume: VolumeId,
        epoch: u64,
        offset: u64,
        len: u64,
        punch: bool,
    },
    /// Drop every block of `volume` in this shard (one range delete).
    DeleteVolume {
        #[serde(with = "volume_id")]
        volume: VolumeId,
    },
    /// Changes nothing; commits a barrier.
    Noop,
    /// Put back blocks of `volume` that failed their checksum on some
    /// replica, with copies read from a healthy replica at applied index
    /// `as_of` or later (see [`crate::apply`] for why this is safe). Each
    /// replica writes a block only where its own stored value fails its
    /// checksum; replicas holding a good value leave it alone. `data: None`
    /// means the healthy copy is a hole (the damaged value is deleted).
    Repair {
        #[serde(with = "volume_id")]
        volume: VolumeId,
        as_of: u64,
        cause: RepairCause,
        blocks: Vec<RepairBlock>,
    },
    /// A change to the cluster map: meta group (group 0) only; a shard
    /// answers `Invalid`. The meta state machine answers `Done` and hands
    /// the command's [`crate::meta::MetaReply`] to the local proposer (see
    /// [`crate::meta::MetaGroup::propose`]).
    Meta(crate::meta::MetaCommand),
    /// Scrub, proposed by the shard's leader: every replica, when it applies
    /// this entry, records in memory the digest of its own blocks from
    /// `from` on (at most `max_blocks` present blocks, capped at
    /// [`crate::divergence::DIGEST_MAX_BLOCKS`]) as of this log position, so
    /// replicas can be compared while writes go on. Changes nothing stored.
    /// See [`crate::divergence`].
    Digest { from: BlockRef, max_blocks: u32 },
    /// Put the majority's value of `blocks` of `volume` on the replica
    /// `target`, whose digest at log index `since` differed from a strict
    /// majority of the voters'.
    ///
    /// **Contract: a realign never undoes a client write.** Only `target`
    /// writes, and only blocks that no entry after `since` touched (a
    /// `Write`, `Zero`, `DeleteVolume` or `Repair` of their chunk): for
    /// those, the value a majority held at `since` is still the value the
    /// log gives the block. A replica that cannot prove that (its record of
    /// touched chunks starts after `since`: it restarted, installed a
    /// snapshot or pruned the record) writes nothing; a no-op is always
    /// safe, and only the target would write, so replicas may differ in
    /// skipping. See [`crate::divergence`].
    Realign {
        #[serde(with = "volume_id")]
        volume: VolumeId,
        target: NodeId,
        since: u64,
        blocks: Vec<RealignBlock>,
    },
}

/// One block of a [`ShardRequest::Realign`], by block number in the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealignBlock {
    pub block: u64,
    /// The majority's value; `None`: a hole (the target's value is deleted).
    pub data: Option<Bytes>,
    /// CRC32C of `data`, the majority's digest value at `since` (ignored for
    /// a hole). The target writes nothing for a block whose data does not
    /// match it.
    pub crc: u32,
}

/// One present block in a [`RangeDigest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockSum {
    /// CRC32C of the stored block.
    Crc(u32),
    /// The stored value fails its own checksum: scrub's checksum walk and
    /// repair handle it; comparisons leave it out.
    Damaged,
}

/// One replica's digest of its blocks, recorded when it applied the
/// [`ShardRequest::Digest`] at log index `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeDigest {
    pub index: u64,
    pub from: BlockRef,
    /// Present blocks from `from` on, in order; a block not listed (up to
    /// `cut`) is a hole on this replica.
    pub blocks: Vec<(BlockRef, BlockSum)>,
    /// `Some(b)`: the digest stopped at its block limit, `b` being the last
    /// block listed; blocks after `b` are not covered. `None`: it covers
    /// the shard to its end.
    pub cut: Option<BlockRef>,
}

impl RangeDigest {
    /// Whether a peer's answer is one this leader can compare: the asked
    /// entry, blocks in order from `from`, within the limit and the cut.
    pub fn is_well_formed(&self, index: u64, from: BlockRef) -> bool {
        let ordered = self.blocks.windows(2).all(|w| w[0].0 < w[1].0);
        let in_range = self.blocks.first().is_none_or(|(b, _)| *b >= from);
        let cut_ok = match self.cut {
            Some(c) => self.blocks.last().is_some_and(|(b, _)| *b == c),
            None => true,
        };
        self.index == index
            && self.from == from
            && ordered
            && in_range
            && cut_ok
            && self.blocks.len() <= crate::divergence::DIGEST_MAX_BLOCKS
    }
}

/// Node to node (`Raft.FetchDigest`, leader to voter): the digest this
/// replica recorded when it applied the `Digest` entry at `index`, once it
/// has applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchDigest {
    pub index: u64,
}

/// The answer to [`FetchDigest`]: `digest` is `None` when the replica no
/// longer keeps it (it restarted, installed a snapshot, or newer digests
/// pushed it out): that range is not compared with it this pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedDigest {
    pub applied: u64,
    pub digest: Option<RangeDigest>,
}

/// Why a [`ShardRequest::Repair`] was proposed (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepairCause {
    /// A client read on the leader met a damaged block.
    Read,
    /// A scrub pass on some replica found a damaged block.
    Scrub,
}

impl RepairCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairCause::Read => "read",
            RepairCause::Scrub => "scrub",
        }
    }
}

/// One block of a [`ShardRequest::Repair`], by block number in the volume
/// (shard replicas use the default geometry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairBlock {
    pub block: u64,
    pub data: Option<Bytes>,
}

/// A block of a shard, named by volume and block number (node to node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockRef {
    pub volume: u64,
    pub block: u64,
}

/// Node to node (`Raft.FetchBlocks`): verified copies of blocks, from a
/// replica that has applied at least `min_applied`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchBlocks {
    pub blocks: Vec<BlockRef>,
    pub min_applied: u64,
}

/// One replica's copy of a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockCopy {
    Data(Bytes),
    /// A hole: the block is not allocated.
    Absent,
    /// This replica's copy fails its checksum too.
    Corrupt,
}

/// The answer to [`FetchBlocks`]: one copy per asked block, in order, read
/// after the replica had applied `applied` (≥ `min_applied`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedBlocks {
    pub applied: u64,
    pub copies: Vec<BlockCopy>,
}

/// Node to node (`Raft.RepairBlocks`, to a shard's leader): these blocks
/// failed their checksum on the asking replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairBlocks {
    pub blocks: Vec<BlockRef>,
}

/// The leader's answer to [`RepairBlocks`]: `index` is the log index of the
/// last repair entry it committed (0: none was needed); `unrepairable`
/// lists blocks no voter holds a healthy copy of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairedBlocks {
    pub index: u64,
    pub unrepairable: Vec<BlockRef>,
}

/// `VolumeId` lives in `ballast-types`, which has no serde: encode it as its u64.
mod volume_id {
    use ballast_types::VolumeId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &VolumeId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.0)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VolumeId, D::Error> {
        u64::deserialize(d).map(VolumeId)
    }
}

impl fmt::Display for ShardRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Write { volume, epoch, offset, data } => {
                write!(f, "Write({volume}@{epoch}, off={offset}, len={})", data.len())
            }
            Self::Zero { volume, epoch, offset, len, punch } => {
                write!(f, "Zero({volume}@{epoch}, off={offset}, len={len}, punch={punch})")
            }
            Self::DeleteVolume { volume } => write!(f, "DeleteVolume({volume})"),
            Self::Noop => f.write_str("Noop"),
            Self::Repair { volume, as_of, cause, blocks } => {
                write!(f, "Repair({volume}, as_of={as_of}, {}, blocks={})", cause.as_str(), blocks.len())
            }
            Self::Meta(cmd) => write!(f, "Meta({cmd:?})"),
            Self::Digest { from, max_blocks } => {
                write!(f, "Digest(from={}/{}, max={max_blocks})", from.volume, from.block)
            }
            Self::Realign { volume, target, since, blocks } => {
                write!(f, "Realign({volume}, target={target}, since={since}, blocks={})", blocks.len())
            }
        }
    }
}

/// What applying a [`ShardRequest`] did. Every replica computes the same
/// answer for the same entry: the answer is part of the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardResponse {
    /// Applied.
    Done,
    /// Refused: the volume's writer was fenced by a newer attach. `current`
    /// is the highest epoch this shard has seen for the volume.
    Fenced { current: u64 },
    /// Refused: the request is malformed (e.g. its range overflows). Not retryable.
    Invalid { reason: String },
}

openraft::declare_raft_types!(
    /// Ballast's openraft configuration: one for every shard group and the meta group.
    pub TypeConfig:
        D = ShardRequest,
        R = ShardResponse,
        NodeId = NodeId,
        Node = BallastNode,
);

/// Shorthands for openraft's generic types under [`TypeConfig`].
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

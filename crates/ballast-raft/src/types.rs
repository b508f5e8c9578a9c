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
    /// A change to the cluster map: meta group (group 0) only; a shard
    /// answers `Invalid`. The meta state machine answers `Done` and hands
    /// the command's [`crate::meta::MetaReply`] to the local proposer (see
    /// [`crate::meta::MetaGroup::propose`]).
    Meta(crate::meta::MetaCommand),
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
            Self::Meta(cmd) => write!(f, "Meta({cmd:?})"),
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

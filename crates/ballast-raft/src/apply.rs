//! How a shard request becomes block changes: fencing, validation, and the
//! [`VolumeView`] mapping. Deterministic given the store and the epochs, so
//! every replica computes the same batch and the same answer.

use std::collections::BTreeMap;

use ballast_storage::{BlockStore, KeyRange, StorageError, VolumeView, WriteBatch};
use ballast_types::{BlockKey, Geometry, ShardId, VolumeId, BLOCK_SIZE};

use crate::types::{ShardRequest, ShardResponse};

/// Largest byte span one request may touch (the client splits at chunk
/// boundaries, so real requests are far smaller).
pub const MAX_REQUEST_SPAN: u64 = 64 << 20;

/// Catalog keys of a shard's replicated state, next to its blocks.
pub(crate) mod keys {
    use ballast_types::{ShardId, VolumeId};

    pub fn prefix(shard: ShardId) -> Vec<u8> {
        let mut k = b"shard/".to_vec();
        k.extend_from_slice(&shard.0.to_be_bytes());
        k.push(b'/');
        k
    }
    fn named(shard: ShardId, name: &str) -> Vec<u8> {
        let mut k = prefix(shard);
        k.extend_from_slice(name.as_bytes());
        k
    }
    /// Last applied log id.
    pub fn applied(shard: ShardId) -> Vec<u8> {
        named(shard, "applied")
    }
    /// Last applied membership.
    pub fn membership(shard: ShardId) -> Vec<u8> {
        named(shard, "membership")
    }
    /// The current snapshot's meta and epochs.
    pub fn snapshot(shard: ShardId) -> Vec<u8> {
        named(shard, "snapshot")
    }
    /// Present while a snapshot install is under way (crash recovery).
    pub fn installing(shard: ShardId) -> Vec<u8> {
        named(shard, "installing")
    }
    pub fn epoch_prefix(shard: ShardId) -> Vec<u8> {
        named(shard, "epoch/")
    }
    /// Highest writer epoch seen for `volume`: u64 BE.
    pub fn epoch(shard: ShardId, volume: VolumeId) -> Vec<u8> {
        let mut k = epoch_prefix(shard);
        k.extend_from_slice(&volume.0.to_be_bytes());
        k
    }
    pub fn epoch_volume(shard: ShardId, key: &[u8]) -> Option<VolumeId> {
        let p = epoch_prefix(shard);
        let rest = key.strip_prefix(p.as_slice())?;
        Some(VolumeId(u64::from_be_bytes(rest.try_into().ok()?)))
    }
}

/// Whether planning `req` reads the store (read-modify-write of partial
/// blocks). Requests that do not can be batched with earlier ones unflushed.
// `is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.85.
#[allow(clippy::manual_is_multiple_of)]
pub(crate) fn reads_store(req: &ShardRequest) -> bool {
    let bs = BLOCK_SIZE as u64;
    match req {
        ShardRequest::Write { offset, data, .. } => offset % bs != 0 || data.len() as u64 % bs != 0,
        ShardRequest::Zero { offset, len, .. } => offset % bs != 0 || len % bs != 0,
        ShardRequest::DeleteVolume { .. } | ShardRequest::Noop | ShardRequest::Meta(_) => false,
    }
}

fn volume_range(shard: ShardId, volume: VolumeId) -> KeyRange {
    let start = BlockKey { shard, volume, chunk: 0, block: 0 };
    let end = match volume.0.checked_add(1) {
        Some(v) => Some(BlockKey { shard, volume: VolumeId(v), chunk: 0, block: 0 }),
        None => shard.0.checked_add(1).map(|s| BlockKey { shard: ShardId(s), volume: VolumeId(0), chunk: 0, block: 0 }),
    };
    KeyRange { start, end }
}

/// Admit a writer of `volume` at `epoch`: `Err(response)` if fenced; records a
/// newer epoch in `epochs` and in `batch`.
fn admit(
    shard: ShardId,
    epochs: &mut BTreeMap<VolumeId, u64>,
    batch: &mut WriteBatch,
    volume: VolumeId,
    epoch: u64,
) -> Result<(), ShardResponse> {
    let current = epochs.get(&volume).copied().unwrap_or(0);
    if epoch < current {
        return Err(ShardResponse::Fenced { current });
    }
    if epoch > current {
        epochs.insert(volume, epoch);
        batch.put_meta(keys::epoch(shard, volume), epoch.to_be_bytes().to_vec());
    }
    Ok(())
}

fn check_span(offset: u64, len: u64) -> Result<(), ShardResponse> {
    if len > MAX_REQUEST_SPAN {
        return Err(ShardResponse::Invalid { reason: format!("request spans {len} bytes (max {MAX_REQUEST_SPAN})") });
    }
    if offset.checked_add(len).is_none() {
        return Err(ShardResponse::Invalid { reason: format!("range {offset}+{len} overflows") });
    }
    Ok(())
}

/// Append the changes of `req` to `batch` (reading `store` for partial
/// blocks) and return the answer. Storage errors are not answers: they stop
/// the replica (its state would otherwise diverge from its peers').
pub(crate) fn plan<S: BlockStore>(
    store: &S,
    shard: ShardId,
    epochs: &mut BTreeMap<VolumeId, u64>,
    req: &ShardRequest,
    batch: &mut WriteBatch,
) -> Result<ShardResponse, StorageError> {
    let view = |volume| VolumeView::new(store, shard, volume, Geometry::default());
    let outcome = match req {
        ShardRequest::Write { volume, epoch, offset, data } => {
            match check_span(*offset, data.len() as u64).and_then(|_| admit(shard, epochs, batch, *volume, *epoch)) {
                Err(refusal) => refusal,
                Ok(()) => {
                    batch.ops.extend(view(*volume).write(*offset, data)?.ops);
                    ShardResponse::Done
                }
            }
        }
        ShardRequest::Zero { volume, epoch, offset, len, punch } => {
            match check_span(*offset, *len).and_then(|_| admit(shard, epochs, batch, *volume, *epoch)) {
                Err(refusal) => refusal,
                Ok(()) => {
                    batch.ops.extend(view(*volume).zero(*offset, *len, *punch)?.ops);
                    ShardResponse::Done
                }
            }
        }
        ShardRequest::DeleteVolume { volume } => {
            // The epoch stays: a fenced writer of a deleted volume stays fenced.
            batch.delete_range(volume_range(shard, *volume));
            ShardResponse::Done
        }
        ShardRequest::Noop => ShardResponse::Done,
        ShardRequest::Meta(_) => ShardResponse::Invalid { reason: "a meta command sent to a shard group".into() },
    };
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_storage::{Durability, MemStore, Segment};
    use bytes::Bytes;

    fn apply(store: &MemStore, epochs: &mut BTreeMap<VolumeId, u64>, req: ShardRequest) -> ShardResponse {
        let mut b = WriteBatch::new();
        let r = plan(store, ShardId(1), epochs, &req, &mut b).expect("plan");
        store.write(b, Durability::Buffered).expect("write");
        r
    }

    #[test]
    fn fencing_refuses_older_epochs_and_remembers_the_newest() {
        let store = MemStore::new();
        let mut epochs = BTreeMap::new();
        let w = |epoch, byte| ShardRequest::Write {
            volume: VolumeId(5),
            epoch,
            offset: 0,
            data: Bytes::from(vec![byte; 4096]),
        };
        assert_eq!(apply(&store, &mut epochs, w(2, 1)), ShardResponse::Done);
        assert_eq!(apply(&store, &mut epochs, w(3, 2)), ShardResponse::Done);
        assert_eq!(apply(&store, &mut epochs, w(2, 9)), ShardResponse::Fenced { current: 3 });
        let view = VolumeView::new(&store, ShardId(1), VolumeId(5), Geometry::default());
        assert_eq!(view.read(0, 4096).expect("read"), vec![Segment::Data(Bytes::from(vec![2u8; 4096]))]);
        assert_eq!(
            store.get_meta(&keys::epoch(ShardId(1), VolumeId(5))).expect("meta"),
            Some(3u64.to_be_bytes().to_vec())
        );
        let z = ShardRequest::Zero { volume: VolumeId(5), epoch: 1, offset: 0, len: 4096, punch: true };
        assert_eq!(apply(&store, &mut epochs, z), ShardResponse::Fenced { current: 3 });
        // Other volumes are unaffected.
        let other = ShardRequest::Write { volume: VolumeId(6), epoch: 0, offset: 10, data: Bytes::from_static(b"x") };
        assert_eq!(apply(&store, &mut epochs, other), ShardResponse::Done);
    }

    #[test]
    fn delete_volume_drops_only_that_volume_and_bad_ranges_are_invalid() {
        let store = MemStore::new();
        let mut epochs = BTreeMap::new();
        for v in [4, 5, u64::MAX] {
            let w =
                ShardRequest::Write { volume: VolumeId(v), epoch: 0, offset: 8192, data: Bytes::from(vec![7u8; 8192]) };
            apply(&store, &mut epochs, w);
        }
        apply(&store, &mut epochs, ShardRequest::DeleteVolume { volume: VolumeId(5) });
        apply(&store, &mut epochs, ShardRequest::DeleteVolume { volume: VolumeId(u64::MAX) });
        let all = store.scan(&crate::snapshot::shard_range(ShardId(1)), 100).expect("scan");
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|(k, _)| k.volume == VolumeId(4)));
        let bad = ShardRequest::Zero { volume: VolumeId(4), epoch: 0, offset: u64::MAX - 1, len: 10, punch: false };
        assert!(matches!(apply(&store, &mut epochs, bad), ShardResponse::Invalid { .. }));
        let huge = ShardRequest::Zero { volume: VolumeId(4), epoch: 0, offset: 0, len: 1 << 40, punch: true };
        assert!(matches!(apply(&store, &mut epochs, huge), ShardResponse::Invalid { .. }));
    }
}

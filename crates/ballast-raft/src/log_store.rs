//! openraft adapter: `RaftLogStorage` / `RaftLogReader` for one group over
//! any [`LogStore`], writing through the disk's [`LogWriter`].
//!
//! `append` returns as soon as the entries are encoded and readable (they sit
//! in a per-group *pending* map until written) and hands them to the writer;
//! the writer commits them with the other groups' writes under one sync and
//! then fires openraft's callback. Votes go through the same writer, synced,
//! and `save_vote` returns only once durable. Truncate and purge are ordered
//! behind every earlier append by the same queue and awaited.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use ballast_storage::{GroupId, LogBatch, LogStore};
use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};

use crate::codec;
use crate::error::{io_err, ShardError};
use crate::log_writer::LogWriter;
use crate::types::{Entry, LogId, TypeConfig, Vote};

/// The state value holding a group's vote (kept when its replica is deleted).
pub const VOTE_KEY: &str = "vote";
/// Present for a group whose replica on this disk was deleted (its vote
/// kept): a replica made again there refuses votes until it holds a log
/// (see [`crate::shard::ShardGroup::answer_vote`]).
pub const REMADE_KEY: &str = "remade";
const PURGED_KEY: &str = "purged";

#[derive(Default)]
struct Shared {
    /// Encoded entries handed to the writer but not yet written.
    pending: Mutex<BTreeMap<u64, Bytes>>,
    /// The last durable vote.
    vote: Mutex<Option<Vote>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Raft log of one group. Clones share state; a clone is the log reader.
pub struct ShardLogStore<L: LogStore> {
    group: GroupId,
    writer: LogWriter<L>,
    shared: Arc<Shared>,
}

impl<L: LogStore> Clone for ShardLogStore<L> {
    fn clone(&self) -> Self {
        Self { group: self.group, writer: self.writer.clone(), shared: self.shared.clone() }
    }
}

impl<L: LogStore> ShardLogStore<L> {
    /// The log of `group` on the writer's disk. Reads the saved vote (blocking).
    pub fn open(group: GroupId, writer: LogWriter<L>) -> Result<Self, ShardError> {
        let vote = writer.store().get_state(group, VOTE_KEY)?.map(|v| codec::decode::<Vote>(&v)).transpose()?;
        let shared = Arc::new(Shared { pending: Mutex::default(), vote: Mutex::new(vote) });
        Ok(Self { group, writer, shared })
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    fn store(&self) -> &L {
        self.writer.store()
    }

    fn decode(bytes: &[u8]) -> io::Result<Entry> {
        Ok(codec::decode(bytes)?)
    }

    fn last_stored(&self) -> io::Result<Option<LogId>> {
        if let Some((_, b)) = guard(&self.shared.pending).last_key_value() {
            return Ok(Some(Self::decode(b)?.log_id()));
        }
        match self.store().last(self.group).map_err(io_err)? {
            Some((_, b)) => Ok(Some(Self::decode(&b)?.log_id())),
            None => Ok(None),
        }
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.saturating_add(1),
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl<L: LogStore> RaftLogReader<TypeConfig> for ShardLogStore<L> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        if start >= end {
            return Ok(Vec::new());
        }
        // Pending first, then the store: an entry leaves `pending` only after
        // it is in the store, so reading in this order never misses one.
        let pending: Vec<(u64, Bytes)> =
            guard(&self.shared.pending).range(start..end).map(|(i, b)| (*i, b.clone())).collect();
        let covered = pending.first().is_some_and(|(i, _)| *i == start);
        let mut merged: BTreeMap<u64, Bytes> = BTreeMap::new();
        if !covered {
            merged.extend(self.store().read(self.group, start..end).map_err(io_err)?);
        }
        merged.extend(pending);
        merged.values().map(|b| Self::decode(b)).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(*guard(&self.shared.vote))
    }
}

impl<L: LogStore> RaftLogStorage<TypeConfig> for ShardLogStore<L> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogId> =
            self.store().get_state(self.group, PURGED_KEY).map_err(io_err)?.map(|b| codec::decode(&b)).transpose()?;
        let last = self.last_stored()?.or(purged);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut b = LogBatch::new();
        b.put_state(self.group, VOTE_KEY, codec::encode(vote)?);
        self.writer.write(b, true).await.map_err(io_err)?;
        *guard(&self.shared.vote) = Some(*vote);
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = LogBatch::new();
        let mut written = Vec::new();
        {
            let mut pending = guard(&self.shared.pending);
            for entry in entries {
                let index = entry.index();
                let bytes = codec::encode(&entry)?;
                pending.insert(index, bytes.clone());
                written.push((index, bytes.clone()));
                batch.append(self.group, index, bytes);
            }
        }
        if batch.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        let shared = self.shared.clone();
        self.writer.submit(
            batch,
            true,
            Box::new(move |result| {
                if result.is_ok() {
                    let mut pending = guard(&shared.pending);
                    for (index, bytes) in written {
                        // Only if it is still the same entry (not replaced meanwhile).
                        if pending.get(&index).is_some_and(|b| b.as_ptr() == bytes.as_ptr()) {
                            pending.remove(&index);
                        }
                    }
                }
                callback.io_completed(result.map_err(io_err));
            }),
        );
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index + 1);
        let mut b = LogBatch::new();
        b.truncate_from(self.group, from);
        // Not synced: losing a truncation in a crash leaves the log as it was
        // before, which this node had already acknowledged anyway; the next
        // synced append makes it durable (one write-ahead log, in order).
        self.writer.write(b, false).await.map_err(io_err)?;
        guard(&self.shared.pending).retain(|i, _| *i < from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut b = LogBatch::new();
        b.put_state(self.group, PURGED_KEY, codec::encode(&log_id)?);
        b.purge_upto(self.group, log_id.index);
        self.writer.write(b, false).await.map_err(io_err)?;
        Ok(())
    }
}

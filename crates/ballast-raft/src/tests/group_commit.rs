//! The per-disk writer commits the appends of many groups with fewer syncs
//! than appends, and appended entries are readable before they are durable.

use std::sync::Arc;
use std::time::Duration;

use ballast_storage::{GroupId, LogBatch, LogStore, MemLogStore, StorageError};
use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};

use crate::log_store::ShardLogStore;
use crate::log_writer::LogWriter;
use crate::types::{Entry, LogId, ShardRequest, TypeConfig};

/// A log store whose syncs take as long as a slow disk's fsync.
struct SlowSync {
    inner: MemLogStore,
}

impl LogStore for SlowSync {
    fn write(&self, batch: LogBatch, sync: bool) -> Result<(), StorageError> {
        if sync {
            std::thread::sleep(Duration::from_millis(3));
        }
        self.inner.write(batch, sync)
    }
    fn read(&self, g: GroupId, r: std::ops::Range<u64>) -> Result<Vec<(u64, Bytes)>, StorageError> {
        self.inner.read(g, r)
    }
    fn first(&self, g: GroupId) -> Result<Option<u64>, StorageError> {
        self.inner.first(g)
    }
    fn last(&self, g: GroupId) -> Result<Option<(u64, Bytes)>, StorageError> {
        self.inner.last(g)
    }
    fn get_state(&self, g: GroupId, k: &str) -> Result<Option<Bytes>, StorageError> {
        self.inner.get_state(g, k)
    }
    fn sync(&self) -> Result<(), StorageError> {
        self.inner.sync()
    }
    fn delete_group(&self, g: GroupId, keep: &[&str]) -> Result<(), StorageError> {
        self.inner.delete_group(g, keep)
    }
}

fn entry(index: u64) -> Entry {
    let log_id = LogId::new(
        <openraft::impls::leader_id_adv::LeaderId<u64, u64> as openraft::vote::RaftLeaderId>::new(1, 1),
        index,
    );
    Entry::new_normal(log_id, ShardRequest::Noop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_groups_share_one_sync() {
    const GROUPS: u64 = 8;
    const APPENDS: u64 = 40;
    let store = Arc::new(SlowSync { inner: MemLogStore::new() });
    let writer = LogWriter::spawn(store.clone()).expect("writer");
    let mut tasks = Vec::new();
    for g in 0..GROUPS {
        let mut log = ShardLogStore::open(g, writer.clone()).expect("open");
        tasks.push(tokio::spawn(async move {
            for i in 1..=APPENDS {
                let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
                log.append([entry(i)], IOFlushed::signal(tx)).await.expect("append");
                // Readable as soon as append returns, durable or not.
                let got = log.try_get_log_entries(i..=i).await.expect("read");
                assert_eq!(got.len(), 1, "entry {i} of group {g} readable after append");
                rx.await.expect("callback").expect("flushed");
            }
            log
        }));
    }
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.expect("task"));
    }
    let counts = writer.counts();
    let appends = GROUPS * APPENDS;
    eprintln!("group commit: {appends} appends, {} batches, {} syncs", counts.batches, counts.syncs);
    assert_eq!(counts.submitted, appends);
    assert!(counts.syncs * 2 <= appends, "expected group commit, got {counts:?}");
    for (g, log) in logs.iter_mut().enumerate() {
        let all = log.try_get_log_entries(0..).await.expect("read");
        assert_eq!(all.iter().map(|e| e.index()).collect::<Vec<_>>(), (1..=APPENDS).collect::<Vec<_>>(), "group {g}");
        assert_eq!(store.inner.read(g as u64, 0..u64::MAX).expect("stored").len() as u64, APPENDS, "all written");
    }
}

#[tokio::test]
async fn vote_is_durable_on_return_and_truncate_follows_appends() {
    let store = Arc::new(MemLogStore::new());
    let writer = LogWriter::spawn(store.clone()).expect("writer");
    let mut log = ShardLogStore::open(5, writer.clone()).expect("open");
    let vote = openraft::impls::Vote::new(3, 2);
    log.save_vote(&vote).await.expect("vote");
    assert!(store.get_state(5, "vote").expect("state").is_some(), "vote written before save_vote returns");
    assert!(store.sync_count() >= 1, "and synced");
    let reopened = ShardLogStore::open(5, writer.clone()).expect("reopen");
    assert_eq!(reopened.clone().read_vote().await.expect("read vote"), Some(vote));

    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
    log.append((1..=10).map(entry), IOFlushed::signal(tx)).await.expect("append");
    log.truncate_after(Some(entry(6).log_id())).await.expect("truncate");
    rx.await.expect("cb").expect("flushed");
    let idx: Vec<_> = log.try_get_log_entries(0..).await.expect("read").iter().map(|e| e.index()).collect();
    assert_eq!(idx, (1..=6).collect::<Vec<_>>());
    log.purge(entry(3).log_id()).await.expect("purge");
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(3));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(6));
    assert_eq!(store.first(5).expect("first"), Some(4));
}

//! openraft's own storage test suite, against the log adapter and the shard
//! state machine, in memory and on RocksDB.

use std::sync::Arc;

use ballast_storage::{MemLogStore, MemStore, RocksConfig, RocksStore};
use ballast_types::ShardId;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

use crate::log_store::ShardLogStore;
use crate::log_writer::LogWriter;
use crate::state_machine::ShardStateMachine;
use crate::types::TypeConfig;

struct MemBuilder;

impl StoreBuilder<TypeConfig, ShardLogStore<MemLogStore>, ShardStateMachine<MemStore>, tempfile::TempDir>
    for MemBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, ShardLogStore<MemLogStore>, ShardStateMachine<MemStore>), StorageError<TypeConfig>>
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = LogWriter::spawn(Arc::new(MemLogStore::new())).expect("writer");
        let log = ShardLogStore::open(1, writer).expect("log");
        let sm = ShardStateMachine::open(Arc::new(MemStore::new()), ShardId(1), dir.path()).expect("sm");
        Ok((dir, log, sm))
    }
}

struct RocksBuilder;

impl StoreBuilder<TypeConfig, ShardLogStore<RocksStore>, ShardStateMachine<RocksStore>, tempfile::TempDir>
    for RocksBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, ShardLogStore<RocksStore>, ShardStateMachine<RocksStore>), StorageError<TypeConfig>>
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = RocksConfig { block_cache_bytes: 8 << 20, write_buffer_bytes: 4 << 20, wal: false };
        let store = Arc::new(RocksStore::open(&dir.path().join("db"), &config).expect("rocks"));
        let writer = LogWriter::spawn(store.clone()).expect("writer");
        let log = ShardLogStore::open(1, writer).expect("log");
        let sm = ShardStateMachine::open(store, ShardId(1), &dir.path().join("snapshots")).expect("sm");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_in_memory() {
    Suite::test_all(MemBuilder).await.expect("openraft storage suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_on_rocksdb() {
    Suite::test_all(RocksBuilder).await.expect("openraft storage suite");
}

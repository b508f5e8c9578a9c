//! The multi-raft router: which shard replicas run on this node.
//!
//! One registry per node, shared by the Raft service (routes peer messages by
//! group), the Data service (routes client requests to the shard's replica)
//! and the node (adds and removes replicas). Critical sections only clone an
//! `Arc` out of the map: no lock is held across an `.await`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ballast_raft::ShardGroup;
use ballast_storage::BlockStore;
use ballast_types::GroupId;

/// A running replica and where it spills received snapshots.
pub struct Replica<S: BlockStore> {
    pub group: ShardGroup<S>,
    /// `shard_snapshot_dir(<disk>/snapshots, shard)`: the directory the
    /// replica's state machine expects installed snapshots in.
    pub snapshot_dir: PathBuf,
}

/// `GroupId → Replica` for every group of this node.
pub struct MultiRaft<S: BlockStore> {
    groups: RwLock<HashMap<GroupId, Arc<Replica<S>>>>,
}

impl<S: BlockStore> Default for MultiRaft<S> {
    fn default() -> Self {
        Self { groups: RwLock::new(HashMap::new()) }
    }
}

impl<S: BlockStore> MultiRaft<S> {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<GroupId, Arc<Replica<S>>>> {
        self.groups.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<GroupId, Arc<Replica<S>>>> {
        self.groups.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, group: GroupId) -> Option<Arc<Replica<S>>> {
        self.read().get(&group).cloned()
    }

    pub fn contains(&self, group: GroupId) -> bool {
        self.read().contains_key(&group)
    }

    /// Register `replica`; returns it back if `group` is taken.
    pub fn insert(&self, group: GroupId, replica: Replica<S>) -> Result<Arc<Replica<S>>, Replica<S>> {
        let mut map = self.write();
        if map.contains_key(&group) {
            return Err(replica);
        }
        let r = Arc::new(replica);
        map.insert(group, r.clone());
        Ok(r)
    }

    pub fn remove(&self, group: GroupId) -> Option<Arc<Replica<S>>> {
        self.write().remove(&group)
    }

    /// Remove and return every replica (for shutdown).
    pub fn drain(&self) -> Vec<(GroupId, Arc<Replica<S>>)> {
        self.write().drain().collect()
    }

    /// The groups running here, in order.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut g: Vec<_> = self.read().keys().copied().collect();
        g.sort();
        g
    }
}

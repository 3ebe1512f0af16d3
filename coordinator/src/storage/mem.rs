//! An in-memory [`LogStore`] for the simulation and tests. Nothing survives the process.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use raft::eraftpb::{Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};

use super::cache::LogCache;
use super::{LogStore, Persist, StoreError};

/// An in-memory Raft log. Clones share the same log.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    cache: Arc<RwLock<LogCache>>,
}

impl MemStore {
    /// An empty store (a node that has not joined or bootstrapped yet).
    pub fn new() -> Self {
        MemStore::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, LogCache> {
        // A poisoned lock only means another thread panicked mid-read; the data is still whole
        // because every write goes through `LogCache::apply` after `check`.
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A deep copy that no longer shares state with `self` (a "disk image" for crash tests).
    pub fn deep_clone(&self) -> Self {
        MemStore { cache: Arc::new(RwLock::new(self.read().clone())) }
    }
}

impl LogStore for MemStore {
    fn persist(&self, batch: &Persist) -> Result<(), StoreError> {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        cache.check(batch)?;
        cache.apply(batch);
        Ok(())
    }
}

impl Storage for MemStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(self.read().initial_state())
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.read().entries(low, high, max_size.into())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.read().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.read().snapshot(request_index, to)
    }
}

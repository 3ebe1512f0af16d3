//! An in-memory [`LogStore`] for the simulation and tests. Nothing survives the process.

use std::sync::{Arc, RwLock, RwLockReadGuard};

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

storage_over_cache!(MemStore);

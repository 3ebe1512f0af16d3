//! Raft log storage: what the driver persists, and the two stores that implement raft-rs's `Storage`.
//!
//! The core never writes: it hands the driver a [`Persist`] batch in every
//! [`Effects`](crate::Effects), and the driver writes it with [`LogStore::persist`] before telling the
//! core [`persisted`](crate::CoordinatorCore::persisted). Both stores are cheap handles over shared
//! state (clone one for the core, keep one for the driver), so the reads raft-rs makes through
//! `Storage` see exactly what the driver persisted.
//!
//! - [`MemStore`]: in memory, for the simulation and unit tests.
//! - [`DiskStore`]: TiKV's raft-engine (an append-only log with checksummed batches) plus an
//!   in-memory mirror of the live log for reads.
//!
//! What is stored: entries after the compaction point, the hard state, and the latest snapshot,
//! whose metadata carries the configuration (`ConfState`) as of the snapshot's index. The
//! configuration is deliberately *not* stored on every conf change: on restart raft-rs starts from the
//! snapshot's configuration and the core re-applies the committed entries after it (conf changes
//! included), the way etcd does. So storage and state machine always agree on one applied index.

/// Implements raft-rs's `Storage` for a store whose `read()` locks its [`cache::LogCache`]: both
/// stores answer every read from that mirror of the live log.
macro_rules! storage_over_cache {
    ($store:ty) => {
        impl raft::Storage for $store {
            fn initial_state(&self) -> raft::Result<raft::RaftState> {
                Ok(self.read().initial_state())
            }

            fn entries(
                &self,
                low: u64,
                high: u64,
                max_size: impl Into<Option<u64>>,
                _context: raft::GetEntriesContext,
            ) -> raft::Result<Vec<raft::eraftpb::Entry>> {
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

            fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<raft::eraftpb::Snapshot> {
                self.read().snapshot(request_index, to)
            }
        }
    };
}

mod cache;
mod disk;
mod mem;

pub use disk::{DiskStore, DiskStoreConfig};
pub use mem::MemStore;

use raft::eraftpb::{Entry, HardState, Snapshot};

/// One turn's worth of writes, produced by the core, carried out by the driver.
///
/// Apply the fields in this order: `snapshot`, `entries`, `hard_state`, `checkpoint`. The stores do
/// this in one atomic, fsynced write when [`sync`](Persist::sync) is set.
#[derive(Debug, Clone, Default)]
pub struct Persist {
    /// A snapshot received from the leader: replaces the whole log.
    pub snapshot: Option<Snapshot>,
    /// New entries; they overwrite any stored entries at the same or higher index.
    pub entries: Vec<Entry>,
    /// The new hard state (term, vote, commit).
    pub hard_state: Option<HardState>,
    /// A snapshot the core took of its own state machine: store it and compact the log up to
    /// [`compact_to`](Persist::compact_to).
    pub checkpoint: Option<Snapshot>,
    /// Last log index that may be dropped with `checkpoint` (at most its index).
    pub compact_to: u64,
    /// Whether the write must be fsynced before the driver continues (raft-rs's `must_sync`; true
    /// whenever entries, a snapshot, the term or the vote changed).
    pub sync: bool,
}

impl Persist {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state.is_none() && self.checkpoint.is_none()
    }
}

/// A raft-rs `Storage` that the driver can also write to.
pub trait LogStore: raft::Storage + Clone {
    /// Writes the batch durably (fsync when `batch.sync`) and makes it visible to `Storage` reads.
    ///
    /// An error means the disk state is unknown: the driver must stop this node and restart it
    /// from disk rather than retry (a failed fsync cannot be retried safely).
    fn persist(&self, batch: &Persist) -> Result<(), StoreError>;
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded log engine failed.
    #[error("raft log engine at {dir}: {source}")]
    Engine {
        /// The engine's directory.
        dir: String,
        /// What failed.
        #[source]
        source: raft_engine::Error,
    },
    /// The log's directory could not be created.
    #[error("raft log at {dir}: {source}")]
    Io {
        /// The engine's directory.
        dir: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A stored record did not decode.
    #[error("raft log at {dir}: stored {what} is corrupt: {reason}")]
    Corrupt {
        /// The engine's directory.
        dir: String,
        /// Which record.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// An earlier write failed; the node must restart from disk.
    #[error("raft log at {dir}: an earlier write failed, restart the node to recover from disk")]
    Failed {
        /// The engine's directory.
        dir: String,
    },
    /// The batch does not fit the log (a hole, or entries before the compaction point).
    #[error("raft log: {0}")]
    Inconsistent(String),
}

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}

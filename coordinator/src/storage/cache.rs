//! The in-memory image of a Raft log: the whole log for [`MemStore`](super::MemStore), the read
//! mirror for [`DiskStore`](super::DiskStore). Serves raft-rs's `Storage` reads.

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot};
use raft::{RaftState, StorageError};

use super::{Persist, StoreError};

/// Where the live log starts and ends; stored next to every write of the disk store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct LogBounds {
    /// Last index dropped from the log (its term is kept for matching).
    pub compacted_index: u64,
    /// Term of `compacted_index`.
    pub compacted_term: u64,
    /// Last index in the log (equals `compacted_index` when the log is empty).
    pub last_index: u64,
}

impl LogBounds {
    pub(super) const ENCODED_LEN: usize = 24;

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::ENCODED_LEN);
        out.extend_from_slice(&self.compacted_index.to_le_bytes());
        out.extend_from_slice(&self.compacted_term.to_le_bytes());
        out.extend_from_slice(&self.last_index.to_le_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::ENCODED_LEN {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let bounds = LogBounds { compacted_index: word(0), compacted_term: word(1), last_index: word(2) };
        (bounds.last_index >= bounds.compacted_index).then_some(bounds)
    }
}

/// The log, hard state and latest snapshot.
#[derive(Debug, Clone, Default)]
pub(super) struct LogCache {
    pub hard_state: HardState,
    pub snapshot: Snapshot,
    pub compacted_index: u64,
    pub compacted_term: u64,
    /// `entries[i].index == compacted_index + 1 + i`.
    pub entries: VecDeque<Entry>,
}

impl LogCache {
    pub fn bounds(&self) -> LogBounds {
        LogBounds {
            compacted_index: self.compacted_index,
            compacted_term: self.compacted_term,
            last_index: self.last_index(),
        }
    }

    pub fn first_index(&self) -> u64 {
        self.compacted_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.compacted_index + self.entries.len() as u64
    }

    /// Checks that `batch` fits this log without changing anything.
    pub fn check(&self, batch: &Persist) -> Result<(), StoreError> {
        let (mut compacted, mut last) = (self.compacted_index, self.last_index());
        if let Some(snap) = &batch.snapshot {
            let index = snap.get_metadata().index;
            if index > compacted {
                (compacted, last) = (index, index);
            }
        }
        if let Some(first) = batch.entries.first() {
            if first.index <= compacted || first.index > last + 1 {
                return Err(StoreError::Inconsistent(format!(
                    "entries starting at {} do not follow a log holding ({compacted}, {last}]",
                    first.index
                )));
            }
            let contiguous = batch.entries.windows(2).all(|w| w[1].index == w[0].index + 1);
            if !contiguous {
                return Err(StoreError::Inconsistent("entries in one batch are not contiguous".into()));
            }
            last = batch.entries.last().map_or(last, |e| e.index);
        }
        if batch.checkpoint.is_some() && batch.compact_to > last {
            return Err(StoreError::Inconsistent(format!(
                "cannot compact to {} beyond the last index {last}",
                batch.compact_to
            )));
        }
        Ok(())
    }

    /// Applies a batch that passed [`check`](Self::check).
    pub fn apply(&mut self, batch: &Persist) {
        if let Some(snap) = &batch.snapshot {
            let meta = snap.get_metadata();
            if meta.index > self.compacted_index {
                self.compacted_index = meta.index;
                self.compacted_term = meta.term;
                self.entries.clear();
                self.snapshot = snap.clone();
                self.hard_state.commit = self.hard_state.commit.max(meta.index);
                self.hard_state.term = self.hard_state.term.max(meta.term);
            }
        }
        if let Some(first) = batch.entries.first() {
            let keep = (first.index - self.compacted_index - 1) as usize;
            self.entries.truncate(keep);
            self.entries.extend(batch.entries.iter().cloned());
        }
        if let Some(hs) = &batch.hard_state {
            self.hard_state = hs.clone();
        }
        if let Some(snap) = &batch.checkpoint {
            if snap.get_metadata().index > self.snapshot.get_metadata().index {
                self.snapshot = snap.clone();
            }
            let to = batch.compact_to.min(self.snapshot.get_metadata().index);
            if to > self.compacted_index {
                let term = self.term_of(to).unwrap_or(self.compacted_term);
                let drop = (to - self.compacted_index) as usize;
                self.entries.drain(..drop.min(self.entries.len()));
                self.compacted_index = to;
                self.compacted_term = term;
            }
        }
    }

    fn term_of(&self, idx: u64) -> Option<u64> {
        if idx == self.compacted_index {
            return Some(self.compacted_term);
        }
        let offset = idx.checked_sub(self.compacted_index + 1)?;
        self.entries.get(offset as usize).map(|e| e.term)
    }

    pub fn initial_state(&self) -> RaftState {
        RaftState::new(self.hard_state.clone(), self.snapshot.get_metadata().get_conf_state().clone())
    }

    pub fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        if low <= self.compacted_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let from = (low - self.compacted_index - 1) as usize;
        let to = (high - self.compacted_index - 1) as usize;
        let mut out = Vec::with_capacity(to - from);
        let mut size = 0u64;
        for e in self.entries.range(from..to) {
            size += u64::from(e.compute_size());
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    pub fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.compacted_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(idx).ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    /// The latest snapshot, for sending to node `to`. Unavailable when it is older than
    /// `request_index`, or when its configuration does not include `to` (a node added after the
    /// snapshot would refuse it); the core snapshots after every configuration change, so a
    /// usable one follows shortly.
    pub fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = self.snapshot.get_metadata();
        let cs = meta.get_conf_state();
        let includes =
            |id: u64| cs.voters.contains(&id) || cs.learners.contains(&id) || cs.voters_outgoing.contains(&id);
        if meta.index == 0 || meta.index < request_index || (to != 0 && !includes(to)) {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

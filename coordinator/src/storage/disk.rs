//! The durable [`LogStore`]: TiKV's raft-engine underneath, an in-memory mirror on top.
//!
//! # Why raft-engine (and not redb)
//!
//! Measured on this machine (2,000 single-entry commits of 200 bytes plus the hard state, each
//! fsynced, then reopen and read back): raft-engine median 0.34 ms per commit, reopen 3.5 ms;
//! redb 4.6 median 3.0 ms per commit, reopen 4.0 ms. A Raft log is an append-only sequence, which is
//! what raft-engine is (one `fdatasync` of a preallocated file per write), whereas redb's
//! copy-on-write B-tree rewrites pages and its commit slot on every transaction. The commit target
//! (≤ 1 ms with three replicas) rules redb out. raft-engine also recovers the way a log should:
//! every batch is checksummed, and a torn batch at the tail of the last file is cut off on open
//! (`RecoveryMode::TolerateTailCorruption`), leaving the log as of the last complete write.
//!
//! # Layout
//!
//! One raft group (id 1) in the engine's directory: the entries, and three keys written in the same
//! atomic batch as the entries they describe: `bounds` (compaction point and last index, because
//! raft-engine keeps entries past a received snapshot until they are overwritten), `hs` (hard
//! state) and `snap` (latest snapshot, data included; its metadata holds the configuration).
//!
//! Every [`persist`](super::LogStore::persist) is one engine write, fsynced when the batch asks
//! for it, and only then mirrored in memory, so nothing unsynced is ever acknowledged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot};
use raft_engine::{Engine, LogBatch, MessageExt, ReadableSize, RecoveryMode};

use super::cache::{LogBounds, LogCache};
use super::{LogStore, Persist, StoreError};

const GROUP: u64 = 1;
const KEY_BOUNDS: &[u8] = b"bounds";
const KEY_HARD_STATE: &[u8] = b"hs";
const KEY_SNAPSHOT: &[u8] = b"snap";

#[derive(Clone)]
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// Settings for [`DiskStore::open`].
#[derive(Debug, Clone)]
pub struct DiskStoreConfig {
    /// Directory of the log files (the daemon uses `<data-dir>/raft`).
    pub dir: PathBuf,
    /// Size at which a log file is rotated.
    pub target_file_size: u64,
    /// Total size of log files above which compacted files are purged.
    pub purge_threshold: u64,
}

impl DiskStoreConfig {
    /// Defaults for a coordinator log: small files, purged early (the state is small).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DiskStoreConfig { dir: dir.into(), target_file_size: 32 << 20, purge_threshold: 128 << 20 }
    }
}

struct Inner {
    engine: Engine,
    dir: String,
    cache: RwLock<LogCache>,
    /// Set when a write failed: the disk state is unknown from then on.
    failed: AtomicBool,
}

/// A durable Raft log. Clones share the same engine.
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

impl DiskStore {
    /// Opens (or creates) the log in `config.dir` and loads the live log into memory.
    /// A torn write at the tail is cut off; corruption anywhere else is an error.
    pub fn open(config: &DiskStoreConfig) -> Result<Self, StoreError> {
        let dir = config.dir.display().to_string();
        let engine_err = |source| StoreError::Engine { dir: dir.clone(), source };
        let engine_config = raft_engine::Config {
            dir: dir.clone(),
            recovery_mode: RecoveryMode::TolerateTailCorruption,
            recovery_threads: 1,
            target_file_size: ReadableSize(config.target_file_size),
            purge_threshold: ReadableSize(config.purge_threshold),
            // Compression costs latency on the tiny entries the coordinator writes.
            batch_compression_threshold: ReadableSize(0),
            ..Default::default()
        };
        std::fs::create_dir_all(&config.dir).map_err(|source| StoreError::Io { dir: dir.clone(), source })?;
        let engine = Engine::open(engine_config).map_err(engine_err)?;
        let cache = load(&engine, &dir)?;
        Ok(DiskStore {
            inner: Arc::new(Inner { engine, dir, cache: RwLock::new(cache), failed: AtomicBool::new(false) }),
        })
    }

    /// The directory holding the log files.
    pub fn dir(&self) -> &Path {
        Path::new(&self.inner.dir)
    }

    fn read(&self) -> RwLockReadGuard<'_, LogCache> {
        // See `MemStore::read`: the mirror is only changed after a successful check and write.
        self.inner.cache.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn corrupt(dir: &str, what: &'static str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt { dir: dir.to_owned(), what, reason: reason.to_string() }
}

fn load(engine: &Engine, dir: &str) -> Result<LogCache, StoreError> {
    let mut cache = LogCache::default();
    let Some(raw) = engine.get(GROUP, KEY_BOUNDS) else {
        return Ok(cache);
    };
    let bounds = LogBounds::decode(&raw).ok_or_else(|| corrupt(dir, "log bounds", "bad length or order"))?;
    if let Some(raw) = engine.get(GROUP, KEY_HARD_STATE) {
        cache.hard_state = HardState::parse_from_bytes(&raw).map_err(|e| corrupt(dir, "hard state", e))?;
    }
    if let Some(raw) = engine.get(GROUP, KEY_SNAPSHOT) {
        cache.snapshot = Snapshot::parse_from_bytes(&raw).map_err(|e| corrupt(dir, "snapshot", e))?;
    }
    cache.compacted_index = bounds.compacted_index;
    cache.compacted_term = bounds.compacted_term;
    if bounds.last_index > bounds.compacted_index {
        let mut entries = Vec::with_capacity((bounds.last_index - bounds.compacted_index) as usize);
        engine
            .fetch_entries_to::<EntryExt>(GROUP, bounds.compacted_index + 1, bounds.last_index + 1, None, &mut entries)
            .map_err(|e| corrupt(dir, "entries", e))?;
        let expected = bounds.last_index - bounds.compacted_index;
        if entries.len() as u64 != expected {
            return Err(corrupt(dir, "entries", format!("expected {expected}, found {}", entries.len())));
        }
        cache.entries = entries.into();
    }
    Ok(cache)
}

impl LogStore for DiskStore {
    fn persist(&self, batch: &Persist) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let dir = &self.inner.dir;
        let engine_err = |source| StoreError::Engine { dir: dir.clone(), source };
        let mut cache = self.inner.cache.write().unwrap_or_else(|p| p.into_inner());
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(StoreError::Failed { dir: dir.clone() });
        }
        cache.check(batch)?;
        let encode = |snap: &Snapshot| snap.write_to_bytes().map_err(|e| engine_err(e.into()));
        let mut lb = LogBatch::default();
        if let Some(snap) = &batch.snapshot {
            lb.put(GROUP, KEY_SNAPSHOT.to_vec(), encode(snap)?).map_err(engine_err)?;
        }
        if !batch.entries.is_empty() {
            lb.add_entries::<EntryExt>(GROUP, &batch.entries).map_err(engine_err)?;
        }
        if let Some(hs) = &batch.hard_state {
            lb.put_message(GROUP, KEY_HARD_STATE.to_vec(), hs).map_err(engine_err)?;
        }
        if let Some(snap) = &batch.checkpoint {
            lb.put(GROUP, KEY_SNAPSHOT.to_vec(), encode(snap)?).map_err(engine_err)?;
        }
        if batch.snapshot.is_some() || batch.checkpoint.is_some() {
            // Chaos drills: a fault with the snapshot encoded but not yet written.
            fail::fail_point!(crate::failpoints::RAFT_SNAPSHOT, |_| Err(StoreError::Failed { dir: dir.clone() }));
        }
        // The mirror learns the new bounds by applying the batch; should the write then fail, the
        // store refuses all further writes (the driver must restart the node from disk).
        let old_bounds = cache.bounds();
        cache.apply(batch);
        let bounds = cache.bounds();
        if bounds.compacted_index > old_bounds.compacted_index {
            lb.add_command(GROUP, raft_engine::Command::Compact { index: bounds.compacted_index + 1 });
        }
        lb.put(GROUP, KEY_BOUNDS.to_vec(), bounds.encode()).map_err(engine_err)?;
        if let Err(source) = self.inner.engine.write(&mut lb, batch.sync) {
            self.inner.failed.store(true, Ordering::Release);
            return Err(StoreError::Engine { dir: dir.clone(), source });
        }
        if bounds.compacted_index > old_bounds.compacted_index {
            // Reclaims whole files below the compaction point; cheap when there is nothing to do.
            self.inner.engine.purge_expired_files().map_err(engine_err)?;
        }
        Ok(())
    }
}

storage_over_cache!(DiskStore);

#[cfg(test)]
mod tests {
    use std::process::Command as Process;
    use std::time::Duration;

    use raft::{GetEntriesContext, Storage};

    use super::*;
    use crate::core::{CoordinatorCore, CoreConfig, bootstrap};
    use crate::state::{Command, MemberInfo, Op, RequestId};

    const CHILD_DIR: &str = "QUIVER_TEST_CRASH_DIR";
    const WRITES: u64 = 60;

    fn logger() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    fn config() -> CoreConfig {
        let mut cfg = CoreConfig::new(1);
        cfg.snapshot_every = 16;
        cfg.compact_lag = 4;
        cfg
    }

    fn settle(core: &mut CoordinatorCore<DiskStore>, store: &DiskStore) {
        while let Some(fx) = core.ready() {
            store.persist(&fx.persist).expect("persist");
            core.persisted(fx.ticket);
        }
    }

    /// Runs in a child process: a single-node cluster on disk commits `WRITES` commands, then the
    /// process aborts without dropping anything.
    #[test]
    #[ignore = "the child half of `state_survives_abort`, which runs it (with --ignored) in a process that aborts: cargo test -p quiver-coordinator state_survives_abort"]
    fn child_commits_then_aborts() {
        let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
        let store = DiskStore::open(&DiskStoreConfig::new(dir)).expect("open");
        let me = MemberInfo { id: 1, peer_addr: "a".into(), control_addr: "b".into(), cores: 1, memory_bytes: 1 };
        bootstrap(&store, &[me]).expect("bootstrap");
        let mut core = CoordinatorCore::open(config(), store.clone(), &logger()).expect("core");
        let mut now = Duration::ZERO;
        while !core.is_leader() {
            now += Duration::from_millis(20);
            core.tick(now);
            settle(&mut core, &store);
        }
        for seq in 1..=WRITES {
            let op = Op::SetServingSlots { node: 1, slots: seq as u32 };
            core.propose(&Command { request: RequestId { client: 3, seq }, op }).expect("propose");
            settle(&mut core, &store);
        }
        assert_eq!(core.state().members[&1].serving_slots, WRITES as u32);
        std::process::abort();
    }

    #[test]
    fn state_survives_abort() {
        let dir = tempfile::tempdir().unwrap();
        let status = Process::new(std::env::current_exe().unwrap())
            .args(["--exact", "storage::disk::tests::child_commits_then_aborts", "--ignored", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .status()
            .unwrap();
        assert!(!status.success(), "the child must die by abort, not exit cleanly");
        let store = DiskStore::open(&DiskStoreConfig::new(dir.path())).expect("reopen after abort");
        assert!(store.first_index().unwrap() > 1, "the log was compacted after snapshots");
        let mut core = CoordinatorCore::open(config(), store.clone(), &logger()).unwrap();
        settle(&mut core, &store);
        assert_eq!(core.state().members[&1].serving_slots, WRITES as u32);
        // The dedup table survived too: a retry of the last request is recognised.
        let retry =
            Command { request: RequestId { client: 3, seq: WRITES }, op: Op::SetServingSlots { node: 1, slots: 0 } };
        let mut s = core.state().clone();
        assert!(s.apply(s.applied_index + 1, &retry).duplicate);
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 64].into(), ..Default::default() }
    }

    #[test]
    fn torn_last_write_is_cut_off_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DiskStore::open(&DiskStoreConfig::new(dir.path())).unwrap();
            for batch in 0..10u64 {
                let entries: Vec<Entry> = (1..=10).map(|i| entry(batch * 10 + i, 1)).collect();
                let hs = HardState { term: 1, commit: batch * 10 + 10, ..Default::default() };
                store.persist(&Persist { entries, hard_state: Some(hs), sync: true, ..Default::default() }).unwrap();
            }
        }
        let mut logs: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
            .collect();
        logs.sort();
        let last = logs.last().expect("a log file");
        let len = std::fs::metadata(last).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(last).unwrap().set_len(len - 3).unwrap();

        let store = DiskStore::open(&DiskStoreConfig::new(dir.path())).expect("reopen with a torn tail");
        assert_eq!(store.last_index().unwrap(), 90, "the torn batch is gone, the ones before it intact");
        assert_eq!(store.initial_state().unwrap().hard_state.commit, 90);
        let entries = store.entries(1, 91, None, GetEntriesContext::empty(false)).unwrap();
        assert!(entries.iter().enumerate().all(|(i, e)| e.index == i as u64 + 1 && e.data[0] == e.index as u8));
        // The log keeps working after the repair.
        store.persist(&Persist { entries: vec![entry(91, 2)], sync: true, ..Default::default() }).unwrap();
        drop(store);
        let store = DiskStore::open(&DiskStoreConfig::new(dir.path())).unwrap();
        assert_eq!(store.term(91).unwrap(), 2);
    }

    #[test]
    fn received_snapshot_replaces_a_longer_stale_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(&DiskStoreConfig::new(dir.path())).unwrap();
        let entries: Vec<Entry> = (1..=20).map(|i| entry(i, 1)).collect();
        store.persist(&Persist { entries, sync: true, ..Default::default() }).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        store.persist(&Persist { snapshot: Some(snap), sync: true, ..Default::default() }).unwrap();
        drop(store);
        let store = DiskStore::open(&DiskStoreConfig::new(dir.path())).unwrap();
        assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (11, 10));
        assert_eq!(store.term(10).unwrap(), 3);
        assert_eq!(store.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }
}

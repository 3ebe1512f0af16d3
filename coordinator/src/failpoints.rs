//! Failpoint names evaluated inside the coordinator (compiled in only with the `failpoints`
//! feature). The complete list, with how to configure them, is
//! `quiver_node_agent::failpoints`; the coordinator cannot depend on that crate, so its own names
//! live here and a daemon test checks that both lists agree.

/// The log store, while a batch carrying a snapshot is being written: the snapshot is encoded
/// but not yet on disk.
pub const RAFT_SNAPSHOT: &str = "raft::snapshot";

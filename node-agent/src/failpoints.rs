//! The names of every failpoint in Quiver, in one place, so drills, docs and the code that
//! evaluates them agree. A failpoint is compiled in only with the `failpoints` feature (of the
//! `quiver` binary, which turns it on here and in the coordinator); otherwise
//! `fail::fail_point!` expands to nothing.
//!
//! Configure them at start with `FAILPOINTS="name=action;name=action"` (TiKV `fail` syntax:
//! `return`, `return(arg)`, `panic`, `sleep(ms)`, `pause`, `off`, with `N%` and `N*` prefixes),
//! or at run time on the agent's HTTP port: `PUT /chaos/failpoints/NAME` with the action as the
//! body, `DELETE /chaos/failpoints/NAME`, `GET /chaos/failpoints`.
//!
//! The code marks a failpoint with `fail::fail_point!`; while none is configured (and always in a
//! build without the feature) the mark does nothing:
//!
//! ```
//! fn write_checkpoint() -> Result<(), String> {
//!     fail::fail_point!(quiver_node_agent::failpoints::JOB_CHECKPOINT, |_| Err("injected".to_string()));
//!     Ok(())
//! }
//! assert_eq!(write_checkpoint(), Ok(()));
//! ```

/// Daemon event loop, just before the Raft log batch is written and fsynced. `return` makes
/// the write fail (the node stops, as on a real fsync error).
pub const RAFT_PERSIST_BEFORE: &str = "raft::persist::before";
/// Daemon event loop, just after the Raft log batch is durable and before anything that
/// depended on it is sent or acknowledged. `panic` is a crash right after fsync.
pub const RAFT_PERSIST_AFTER: &str = "raft::persist::after";
/// Coordinator log store, while a batch carrying a snapshot is being written: the snapshot is
/// encoded but not yet on disk (`return` fails the write, `panic` crashes mid-snapshot).
/// The same string as `quiver_coordinator::failpoints::RAFT_SNAPSHOT`.
pub const RAFT_SNAPSHOT: &str = "raft::snapshot";
/// Jobs: a checkpoint of a job's diffusion state is being made durable on the master's disk.
/// `return` fails the write (the job goes on without that checkpoint).
pub const JOB_CHECKPOINT: &str = "job::checkpoint";
/// Jobs: a job's file (its graph, or a checkpoint's part) is about to be copied to another
/// holder. `return` fails that copy (the holder is skipped, as when it cannot be reached).
pub const JOB_TRANSFER: &str = "job::transfer";

/// Every failpoint name.
pub const ALL: [&str; 5] = [RAFT_PERSIST_BEFORE, RAFT_PERSIST_AFTER, RAFT_SNAPSHOT, JOB_CHECKPOINT, JOB_TRANSFER];

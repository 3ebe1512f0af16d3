//! # quiver-tests — simulated cluster and integration tests
//!
//! The library half holds test harnesses (the deterministic simulated cluster, helpers that run
//! the real `quiver` binary in a temporary directory); `tests/it/` is the one integration-test binary.
//!
//! - [`agents`]: real `quiver agent` processes on loopback (start, SIGKILL, SIGTERM, restart).
//! - [`bin`]: runs the real `quiver` binary in a temporary directory.
//! - [`raft_bench`]: the measurements behind `quiver bench raft`.
//! - [`raft_sim`]: coordinator cores over in-memory lossy links on virtual time, with the Raft
//!   safety invariants checked on every run.

pub mod agents;
pub mod bin;
pub mod raft_bench;
pub mod raft_sim;

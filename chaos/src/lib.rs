//! # quiver-chaos — failover drills with verdicts
//!
//! `quiver chaos run --drill NAME|all --nodes N --seed S [--json]` lands here: each drill starts
//! its own local cluster of real `quiver agent` processes on loopback (through
//! `quiver_tests::agents`), runs a job or a stream of control-plane writes, injects one fault,
//! and ends with a [`DrillReport`] whose checks decide pass or fail.
//!
//! The faults themselves live where they act: the fault-injecting UDP socket in
//! `quiver_node_agent::transport::fault` (steered over the agent's HTTP port with
//! `--fault-injection`), failpoints named in `quiver_node_agent::failpoints` (compiled in with
//! the `failpoints` feature of `quiver`), and process signals in the harness (SIGKILL,
//! SIGSTOP/SIGCONT, SIGTERM, restart from the same data directory).
//!
//! What it is not: a test of one component. It only talks to agents the way an operator would
//! (gRPC, the CLI, HTTP), and every wait has a deadline, so a drill always ends by itself.
//!
//! - [`verdict`]: the checks, pure functions of what the drill recorded (unit-tested).
//! - [`drills`]: the drill catalogue and the driver.
//! - [`client`]: the small gRPC client the driver uses.

pub mod client;
pub mod drills;
pub mod verdict;

pub use drills::{Drill, Options, RunReport, run};
pub use verdict::{Check, DrillReport};

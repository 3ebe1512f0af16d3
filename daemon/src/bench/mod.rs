//! `quiver bench …`: one submodule per benchmark, each with its own `Args` and `run`.
//! The measuring code lives in `quiver-benches` (or the crate it measures); these modules only
//! parse flags and print.

mod failover;
mod job;
mod raft;
mod serve;
mod transport;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// A local 3-agent cluster: join latency, leader failover to an acknowledged submit, idle RSS.
    Failover(failover::Args),
    /// A distributed job on a local cluster against `quiver run` on the same graph (time, digest, RSS).
    Job(job::Args),
    /// Raft coordinator: disk-backed commit latency, simulated failover, placement, snapshot + restart.
    Raft(raft::Args),
    /// Serving path: an open-loop `Diffuse` load generator (HDR latency histogram, cached and distinct graphs).
    Serve(serve::Args),
    /// QUIC peer transport: partition push vs bare quinn, heartbeat RTT under load, handshake time.
    Transport(transport::Args),
}

/// Runs one benchmark.
pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Failover(args) => failover::run(args),
        Bench::Job(args) => job::run(args),
        Bench::Raft(args) => raft::run(args),
        Bench::Serve(args) => serve::run(args),
        Bench::Transport(args) => transport::run(args),
    }
}

//! `quiver bench raft`: the coordinator's numbers — disk-backed commit latency (3 replicas, one
//! process, in-memory links), simulated failover over seeds (real-time tick settings), placement
//! and re-placement time of the load balancer, snapshot + restart of a large state. The measuring
//! code is `quiver_tests::raft_bench`; this module parses flags and prints.

use std::path::PathBuf;

use anyhow::Context;
use quiver_tests::raft_bench::{RaftBenchOptions, RaftBenchReport, run as measure};

/// Flags of `quiver bench raft`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seeds of the simulated leader failover.
    #[arg(long, default_value_t = 500)]
    pub seeds: u64,
    /// Commits timed on the disk-backed 3-replica cluster.
    #[arg(long, default_value_t = 2000)]
    pub commits: usize,
    /// Directory for the replicas' raft logs (a scratch directory inside it is removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints the result.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut opts = RaftBenchOptions { seeds: args.seeds, commits: args.commits, ..RaftBenchOptions::default() };
    if let Some(dir) = args.dir {
        opts.dir = dir;
    }
    let report = measure(&opts).context("raft benchmark")?;
    print_human(&report);
    if args.json {
        println!("{}", report.to_json());
    }
    Ok(())
}

fn print_human(r: &RaftBenchReport) {
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!("raft coordinator benchmark");
    println!(
        "  commit (disk, 3 replicas):   median {:.3} ms, p99 {:.3} ms over {} commits   [target median <= 1 ms: {}]",
        r.commit_median_ms,
        r.commit_p99_ms,
        r.commits,
        verdict(r.commit_median_ms <= 1.0)
    );
    println!(
        "  failover (simulated):        median {:.0} ms, worst {:.0} ms over {} seeds   [targets 300 / 600 ms: {}]",
        r.sim_failover_median_ms,
        r.sim_failover_max_ms,
        r.seeds,
        verdict(r.sim_failover_median_ms <= 300.0 && r.sim_failover_max_ms <= 600.0)
    );
    println!(
        "  placement:                   {:.2} ms for {} partitions on {} nodes   [target 50 ms: {}]",
        r.placement_ms,
        r.partitions,
        r.nodes,
        verdict(r.placement_ms <= 50.0)
    );
    println!(
        "  re-placement (1 node lost):  {:.3} ms, {} partitions moved   [target 5 ms: {}]",
        r.replacement_ms,
        r.replacement_moved,
        verdict(r.replacement_ms <= 5.0)
    );
    println!(
        "  snapshot + restart:          {:.1} ms ({:.1} ms snapshot of {} bytes) for {} jobs   [target 200 ms: {}]",
        r.restart_ms,
        r.snapshot_ms,
        r.snapshot_bytes,
        r.jobs,
        verdict(r.restart_ms <= 200.0)
    );
}

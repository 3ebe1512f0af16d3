//! `quiver chaos run`: the failover drills (the `quiver-chaos` crate) against a local cluster of
//! this very binary on loopback. Exits non-zero, with the evidence, when any check fails.

use anyhow::{Context, Result, bail};
use quiver_chaos::{Drill, Options};

/// `quiver chaos …`.
#[derive(Debug, clap::Subcommand)]
pub enum ChaosCmd {
    /// Run drills: each starts its own cluster, injects one fault and checks the verdicts
    /// (result digest equal to `quiver run`'s, acknowledged writes exactly once, at most one
    /// leader per term, membership converged) and reports recovery times.
    Run(RunArgs),
    /// List the drills.
    List,
}

/// Flags of `quiver chaos run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A drill name (`quiver chaos list`) or `all`.
    #[arg(long, default_value = "all")]
    pub drill: String,
    /// Agents per cluster (a drill that needs more, such as two-nodes-lost, uses its minimum).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// The seed: which follower is hit, when, and the fault socket's random stream.
    #[arg(long, default_value_t = 1, conflicts_with = "seeds")]
    pub seed: u64,
    /// A range of seeds, each run in turn: `1..=20` or `1..21`.
    #[arg(long)]
    pub seeds: Option<String>,
    /// Kronecker scale of the jobs' graph.
    #[arg(long, default_value_t = 18)]
    pub scale: u32,
    /// PageRank iterations of the jobs (enough that a fault lands mid-job).
    #[arg(long, default_value_t = 200)]
    pub iterations: u32,
    /// Print one JSON object (every drill's report) as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: ChaosCmd) -> Result<()> {
    let args = match cmd {
        ChaosCmd::List => {
            for d in Drill::ALL {
                println!("{}", d.name());
            }
            return Ok(());
        }
        ChaosCmd::Run(a) => a,
    };
    let drills =
        if args.drill == "all" {
            Drill::ALL.to_vec()
        } else {
            let names: Vec<&str> = Drill::ALL.iter().map(|d| d.name()).collect();
            vec![Drill::parse(&args.drill).with_context(|| {
                format!("--drill {}: no such drill (drills: all, {})", args.drill, names.join(", "))
            })?]
        };
    if args.nodes < 3 {
        bail!("--nodes {}: a drill needs at least 3 agents", args.nodes);
    }
    let seeds = match &args.seeds {
        Some(r) => parse_seeds(r)?,
        None => vec![args.seed],
    };
    let opts = Options {
        bin: std::env::current_exe().context("locating the quiver binary")?,
        drills,
        seeds,
        nodes: args.nodes,
        scale: args.scale,
        iterations: args.iterations,
    };
    let report = quiver_chaos::run(&opts, args.json);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    let failed: Vec<String> =
        report.drills.iter().filter(|r| !r.passed).map(|r| format!("{} seed {}", r.drill, r.seed)).collect();
    if !failed.is_empty() {
        bail!("{} of {} drills failed: {}", failed.len(), report.drills.len(), failed.join(", "));
    }
    Ok(())
}

/// `A..=B`, `A..B` or `A`.
fn parse_seeds(text: &str) -> Result<Vec<u64>> {
    let bad = || format!("--seeds {text:?}: expected A..=B, A..B or A");
    let (range, inclusive) = match text.split_once("..=") {
        Some(r) => (r, true),
        None => match text.split_once("..") {
            Some(r) => (r, false),
            None => {
                let one: u64 = text.trim().parse().with_context(bad)?;
                return Ok(vec![one]);
            }
        },
    };
    let a: u64 = range.0.trim().parse().with_context(bad)?;
    let b: u64 = range.1.trim().parse().with_context(bad)?;
    let seeds: Vec<u64> = if inclusive { (a..=b).collect() } else { (a..b).collect() };
    if seeds.is_empty() {
        bail!("--seeds {text:?}: the range is empty");
    }
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::parse_seeds;

    #[test]
    fn seed_ranges() {
        assert_eq!(parse_seeds("1..=3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_seeds("1..3").unwrap(), vec![1, 2]);
        assert_eq!(parse_seeds("7").unwrap(), vec![7]);
        assert!(parse_seeds("3..1").is_err());
        assert!(parse_seeds("x..=2").is_err());
    }
}

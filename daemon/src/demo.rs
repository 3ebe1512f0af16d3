//! `quiver demo`: the README's main command. It needs no set-up and no files.
//!
//! Today it shows the single-process path end to end: a generated Kronecker graph written to and
//! loaded back from the binary CSR format, PageRank and APPNP run whole and split into
//! partitions with in-memory halo exchange, and a check that every partitioning gives the same
//! bits. The distributed-jobs issue turns it into a three-agent cluster on loopback.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use quiver_compute::formats::{ReadOptions, read_graph, write_graph};
use quiver_compute::generate;
use quiver_compute::kernels::{self, Algorithm, Normalization, Params, Stop};

use crate::run::digest;

/// `quiver demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Kronecker scale of the generated graph (2^scale vertices).
    #[arg(long, default_value_t = 16)]
    scale: u32,
    /// Partition counts to compare against the whole-graph run.
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 3, 7])]
    partitions: Vec<usize>,
}

/// Runs the demo; fails if any partitioning changes a bit of any result.
pub fn run(a: DemoArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(format!("kronecker-{}.qcsr", a.scale));
    let t = Instant::now();
    let g = generate::kronecker(a.scale, 16, 1)?;
    write_graph(&path, &g)?;
    let g = read_graph(&path, &ReadOptions::default())?;
    println!(
        "graph      Kronecker scale {} (seed 1): {} vertices, {} edges, generated and reloaded from .qcsr in {:.2} s",
        a.scale,
        g.vertices(),
        g.edges(),
        t.elapsed().as_secs_f64()
    );
    let features = generate::features(g.vertices(), 16, 1);
    let runs = [
        ("pagerank", Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::iterations(20) }),
        (
            "appnp d=16",
            Params {
                algorithm: Algorithm::Appnp {
                    alpha: 0.1,
                    normalization: Normalization::Symmetric,
                    features: &features,
                    dim: 16,
                },
                stop: Stop::iterations(10),
            },
        ),
    ];
    let mut mismatches = 0;
    for (name, params) in &runs {
        let t = Instant::now();
        let whole = kernels::run(&g, params, 1)?;
        let secs = t.elapsed().as_secs_f64();
        let reference = digest(&whole.values);
        let rate = g.edges() as f64 * f64::from(whole.iterations) / secs / 1e6;
        println!(
            "{name:<10} {} iterations in {secs:.3} s ({rate:.0} M edges/s), digest {}",
            whole.iterations,
            &reference[..16]
        );
        for &p in &a.partitions {
            let t = Instant::now();
            let split = kernels::run(&g, params, p)?;
            let same = digest(&split.values) == reference;
            mismatches += usize::from(!same);
            println!(
                "           {p:>2} partitions: {:.3} s, {}",
                t.elapsed().as_secs_f64(),
                if same { "bit-identical" } else { "DIFFERENT" }
            );
        }
    }
    if mismatches > 0 {
        bail!("{mismatches} partitioned run(s) differ from the whole-graph result");
    }
    println!("ok         every partitioning matched the single-partition result bit for bit");
    Ok(())
}

//! `quiver run`: one diffusion in this process, no cluster. This is the COST baseline every
//! distributed run is compared against, and the reference its results must equal bit for bit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use quiver_compute::formats::{ReadOptions, read_npy, write_npy};
use quiver_compute::generate;
use quiver_compute::kernels::{self, Algorithm, Normalization, Params, Stop};
use quiver_compute::read_graph;
use serde_json::json;

use crate::sys::{Progress, peak_rss_bytes};

/// The diffusion algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Algo {
    /// PageRank.
    Pagerank,
    /// Personalized PageRank from --seeds.
    Ppr,
    /// Heat kernel from --seeds.
    Heat,
    /// APPNP feature propagation of --features or generated --feature-dim features.
    Appnp,
}

/// APPNP normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Norm {
    /// D^-1/2 (A + I) D^-1/2.
    Sym,
    /// Random walk.
    Rw,
}

/// Diffusion parameters shared by `quiver run` and `quiver submit`.
#[derive(Debug, Clone, Args)]
pub struct DiffusionArgs {
    /// Algorithm.
    #[arg(long, value_enum)]
    pub algo: Algo,
    /// Run exactly N iterations (Taylor terms for heat).
    #[arg(long, conflicts_with = "tolerance")]
    pub iterations: Option<u32>,
    /// Stop when the L∞ change of an iteration is at most T.
    #[arg(long)]
    pub tolerance: Option<f32>,
    /// Upper bound on iterations with --tolerance.
    #[arg(long, default_value_t = 100)]
    pub max_iterations: u32,
    /// Seed vertices for ppr and heat (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u32>,
    /// Damping factor for pagerank and ppr.
    #[arg(long, default_value_t = 0.85)]
    pub damping: f32,
    /// Heat kernel time t.
    #[arg(long, default_value_t = 1.0)]
    pub t: f32,
    /// APPNP teleport probability α.
    #[arg(long, default_value_t = 0.1)]
    pub alpha: f32,
    /// APPNP normalisation.
    #[arg(long, value_enum, default_value_t = Norm::Sym)]
    pub normalization: Norm,
    /// APPNP input features: an f32 .npy matrix with one row per vertex.
    #[arg(long, conflicts_with = "feature_dim")]
    pub features: Option<PathBuf>,
    /// APPNP: generate seeded uniform features of this width instead of reading a file.
    #[arg(long)]
    pub feature_dim: Option<usize>,
    /// Seed for generated features.
    #[arg(long, default_value_t = 1)]
    pub feature_seed: u64,
}

impl DiffusionArgs {
    /// The stop rule.
    pub fn stop(&self) -> Stop {
        match (self.iterations, self.tolerance) {
            (_, Some(t)) => Stop::tolerance(t, self.max_iterations),
            (Some(n), None) => Stop::iterations(n),
            (None, None) => Stop::iterations(20),
        }
    }

    /// Loads or generates the APPNP features for `vertices` rows, as `(values, dim)`.
    pub fn load_features(&self, vertices: usize) -> Result<(Vec<f32>, usize)> {
        match (&self.features, self.feature_dim) {
            (Some(path), _) => {
                let a = read_npy::<f32>(path)?;
                if a.shape.len() != 2 || a.rows() != vertices {
                    bail!(
                        "{}: features must be a {vertices} × d f32 matrix (one row per vertex), found shape {:?}",
                        path.display(),
                        a.shape
                    );
                }
                Ok((a.data.to_vec(), a.cols()))
            }
            (None, Some(d)) => Ok((generate::features(vertices, d, self.feature_seed), d)),
            (None, None) => bail!("appnp needs --features F.npy or --feature-dim D"),
        }
    }

    /// The kernel parameters, borrowing seeds and features.
    pub fn params<'a>(&'a self, features: &'a [f32], dim: usize) -> Params<'a> {
        let algorithm = match self.algo {
            Algo::Pagerank => Algorithm::PageRank { damping: self.damping },
            Algo::Ppr => Algorithm::PersonalizedPageRank { damping: self.damping, seeds: &self.seeds },
            Algo::Heat => Algorithm::HeatKernel { t: self.t, seeds: &self.seeds },
            Algo::Appnp => Algorithm::Appnp {
                alpha: self.alpha,
                normalization: match self.normalization {
                    Norm::Sym => Normalization::Symmetric,
                    Norm::Rw => Normalization::RandomWalk,
                },
                features,
                dim,
            },
        };
        Params { algorithm, stop: self.stop() }
    }
}

/// `quiver run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The graph file (.el, .mtx, .qcsr).
    #[arg(long)]
    graph: PathBuf,
    #[command(flatten)]
    diffusion: DiffusionArgs,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Split the graph into P partitions with in-memory halo exchange (the result is identical).
    #[arg(long, default_value_t = 1)]
    partitions: usize,
    /// Write the result here (.npy: a vector, or a matrix for appnp).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object with timings instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Runs `quiver run`.
pub fn run(a: RunArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    if a.partitions == 0 {
        bail!("--partitions must be at least 1");
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("starting worker threads")?;
    pool.install(|| run_in_pool(&a, threads))
}

fn run_in_pool(a: &RunArgs, threads: usize) -> Result<()> {
    let progress = Progress::new(a.json);
    progress.step(format!("loading {}", a.graph.display()));
    let t = Instant::now();
    let g = read_graph(&a.graph, &ReadOptions::default())?;
    let load_seconds = t.elapsed().as_secs_f64();
    let (features, dim) =
        if a.diffusion.algo == Algo::Appnp { a.diffusion.load_features(g.vertices())? } else { (Vec::new(), 1) };
    let params = a.diffusion.params(&features, dim);
    progress.step(format!("running {} on {} vertices, {} edges", params.algorithm.name(), g.vertices(), g.edges()));
    let t = Instant::now();
    // When each iteration ended: separates the set-up (partitioning, the kernel's layout, first
    // touches of fresh memory) from the steady iterations that the peers' timings compare to.
    let mut ends = Vec::new();
    let out = kernels::run_observed(&g, &params, a.partitions, &mut |_| ends.push(t.elapsed().as_secs_f64()))?;
    let compute_seconds = t.elapsed().as_secs_f64();
    let first_iteration = ends.first().copied();
    let steady_per_iteration = (ends.len() > 1).then(|| (ends[ends.len() - 1] - ends[0]) / (ends.len() - 1) as f64);
    progress.finish();
    if let Some(path) = &a.out {
        let shape: Vec<usize> = if out.width == 1 { vec![g.vertices()] } else { vec![g.vertices(), out.width] };
        write_npy(path, &shape, &out.values)?;
    }
    let per_iteration = compute_seconds / f64::from(out.iterations.max(1));
    let report = json!({
        "graph": a.graph,
        "algorithm": params.algorithm.name(),
        "vertices": g.vertices(),
        "edges": g.edges(),
        "threads": threads,
        "partitions": a.partitions,
        "load_seconds": load_seconds,
        "compute_seconds": compute_seconds,
        "iterations": out.iterations,
        "seconds_per_iteration": per_iteration,
        "first_iteration_seconds": first_iteration,
        "steady_seconds_per_iteration": steady_per_iteration,
        "residual": out.residual,
        "result_digest": digest(&out.values),
        "peak_rss_bytes": peak_rss_bytes(),
        "out": a.out,
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "{} on {} vertices / {} edges: {} iterations in {:.3} s ({:.4} s/iteration, residual {:.3e}); load {:.3} s; threads {}, partitions {}",
            params.algorithm.name(),
            g.vertices(),
            g.edges(),
            out.iterations,
            compute_seconds,
            per_iteration,
            out.residual,
            load_seconds,
            threads,
            a.partitions
        );
        if let Some(path) = &a.out {
            println!("result written to {}", path.display());
        }
    }
    Ok(())
}

/// A content digest of a result vector (hex SHA-256 of its little-endian bytes): two runs match
/// bit for bit exactly when their digests are equal.
pub fn digest(values: &[f32]) -> String {
    hex(&digest_bytes(values))
}

/// The SHA-256 of a result vector's little-endian bytes (what [`digest`] prints).
pub fn digest_bytes(values: &[f32]) -> [u8; 32] {
    digest_parts(&[values])
}

/// [`digest_bytes`] of the concatenation of `parts`, without assembling it.
pub fn digest_parts(parts: &[&[f32]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for chunk in parts.iter().flat_map(|p| p.chunks(1 << 16)) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        ctx.update(&bytes);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 of the file at `path`, read in 4 MiB pieces (its bytes never sit in this process's
/// memory at once: a memory map would count the whole file, an APPNP checkpoint part or a graph,
/// in the agent's resident set while it is hashed); refuses an empty file.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], String> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("{}: not readable on this node: {e}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                ctx.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    if total == 0 {
        return Err(format!("{}: the file is empty", path.display()));
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 32 bytes a 64-digit hex string spells (as [`hex`] writes a digest), if it is one.
pub fn digest_from_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_parts_is_the_digest_of_their_concatenation() {
        let v: Vec<f32> = (0..200_000).map(|i| i as f32 * 0.5).collect();
        let (a, rest) = v.split_at(70_000);
        let (b, c) = rest.split_at(65_537);
        assert_eq!(digest_parts(&[a, b, &[], c]), digest_bytes(&v));
        assert_ne!(digest_parts(&[b, a, c]), digest_bytes(&v));
    }
}

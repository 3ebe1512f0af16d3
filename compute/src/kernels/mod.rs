//! Diffusion kernels: PageRank, personalized PageRank, the heat kernel and APPNP feature
//! propagation, all on `f32` state.
//!
//! The entry point for a single process is [`run`]: pick an [`Algorithm`], a [`Stop`] rule and a
//! partition count, get an [`Output`].
//!
//! ```
//! use quiver_compute::{generate, kernels::{self, Algorithm, Params, Stop}};
//! let g = generate::grid(4, 4, true).unwrap();
//! let params = Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::tolerance(1e-7, 100) };
//! let out = kernels::run(&g, &params, 1).unwrap();
//! // A torus is regular: PageRank is uniform.
//! assert!(out.values.iter().all(|&x| (x - 1.0 / 16.0).abs() < 1e-6));
//! ```
//!
//! # Determinism
//!
//! Each kernel's module documents its arithmetic exactly. Every output value is a function of its
//! row's in-neighbour list in CSR order, the previous iterate and global scalars only, and global
//! scalars are reduced exactly ([`superstep::ExactSum`]), so results are bit-identical for any
//! rayon thread count and any partition count: [`run`] with one partition and with sixteen run
//! the same per-row code on the same inputs. The thread count is that of the current rayon pool
//! (`ThreadPool::install` to choose it).
//!
//! The kernels treat the graph as unweighted: edge weights, if the graph has any, are ignored.
//!
//! # Distributed use
//!
//! [`superstep`] is the machinery under [`run`]: the [`superstep::Kernel`] trait, per-partition
//! state with halo pack/unpack, and the exact combination of partials. The distributed executor
//! runs the same steps and ships the same halo buffers between hosts.

mod appnp;
mod heat;
mod pagerank;
pub(crate) mod pull;
pub mod superstep;

pub use appnp::{Appnp, Normalization};
pub use heat::Heat;
pub use pagerank::{PageRank, Teleport};
pub use superstep::{Kernel, Progress, RunOutput, Stop, run_partitioned, run_partitioned_observed};

use rayon::prelude::*;

use crate::buf::Segment;
use crate::csr::Csr;
use crate::partition::{self, LocalGraph, PartitionError, Partitioning};

/// Which diffusion to run, with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Algorithm<'a> {
    /// PageRank with damping `d` in `[0, 1]` (typically 0.85); dangling mass is spread uniformly.
    PageRank { damping: f32 },
    /// Personalized PageRank: teleport and dangling mass go uniformly to `seeds` (duplicates ignored).
    PersonalizedPageRank { damping: f32, seeds: &'a [u32] },
    /// Heat kernel `exp(−t(I − P)) s`, `s` uniform on `seeds`; iterations are Taylor terms.
    HeatKernel { t: f32, seeds: &'a [u32] },
    /// APPNP over `features` (`vertices × dim`, row-major) with teleport `alpha` in `[0, 1]`.
    Appnp { alpha: f32, normalization: Normalization, features: &'a [f32], dim: usize },
}

impl Algorithm<'_> {
    /// Short lowercase name (`pagerank`, `ppr`, `heat`, `appnp`).
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::PageRank { .. } => "pagerank",
            Algorithm::PersonalizedPageRank { .. } => "ppr",
            Algorithm::HeatKernel { .. } => "heat",
            Algorithm::Appnp { .. } => "appnp",
        }
    }
}

/// A kernel and when to stop it.
#[derive(Clone, Debug, PartialEq)]
pub struct Params<'a> {
    pub algorithm: Algorithm<'a>,
    pub stop: Stop,
}

/// The result of [`run`].
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// One row per vertex in vertex order, `width` values each (row-major).
    pub values: Segment<f32>,
    /// Values per vertex: 1, or the feature dimension for APPNP.
    pub width: usize,
    /// Steps run.
    pub iterations: u32,
    /// L∞ change made by the last step (`f32::INFINITY` if none ran).
    pub residual: f32,
}

/// Why a kernel refused its parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KernelError {
    #[error("damping {0} is out of range: it must be a number in [0, 1]")]
    Damping(f32),
    #[error("alpha {0} is out of range: it must be a number in [0, 1]")]
    Alpha(f32),
    #[error("heat kernel time t = {0} must be a finite number ≥ 0")]
    Time(f32),
    #[error("tolerance {0} must be a finite number ≥ 0")]
    Tolerance(f32),
    #[error("{algorithm} needs at least one seed vertex")]
    NoSeeds { algorithm: &'static str },
    #[error("seed vertex {seed} does not exist: the graph has {vertices} vertices")]
    UnknownSeed { seed: u32, vertices: usize },
    #[error("feature dimension must be at least 1")]
    ZeroDimension,
    #[error("features hold {len} values, expected {vertices} vertices × {dim} = {expected}")]
    FeatureShape { len: usize, vertices: usize, dim: usize, expected: usize },
    #[error(transparent)]
    Partition(#[from] PartitionError),
}

/// Runs a kernel on `graph` split into `partitions` partitions (1 for a plain single-process
/// run), with halos exchanged in memory. The result does not depend on `partitions` or on the
/// rayon pool's thread count, bit for bit.
pub fn run(graph: &Csr, params: &Params<'_>, partitions: usize) -> Result<Output, KernelError> {
    run_observed(graph, params, partitions, &mut |_| {})
}

/// [`run`], calling `observer` with the iteration count and residual after every step (from a
/// rayon worker thread), e.g. to drive a progress bar. Parameters are checked before any work.
pub fn run_observed(
    graph: &Csr,
    params: &Params<'_>,
    partitions: usize,
    observer: &mut (dyn FnMut(Progress) + Send),
) -> Result<Output, KernelError> {
    let kernel = build(graph.vertices(), params)?;
    let width = kernel.width();
    if let Built::Appnp(k) = &kernel
        && partitions == 1
        && renames_for(graph.vertices(), graph.edges(), k.dim, params.stop, crate::buf::available_memory)
    {
        let out = appnp_renamed(graph, k, params.stop, observer);
        return Ok(Output { values: out.values, width, iterations: out.iterations, residual: out.residual });
    }
    // Partitioning comes after the parameter checks, so bad input costs nothing.
    let parts = partition::partition(graph, partitions)?;
    let out = match &kernel {
        Built::PageRank(k) => run_partitioned_observed(k, &parts, params.stop, observer),
        Built::Heat(k) => run_partitioned_observed(k, &parts, params.stop, observer),
        Built::Appnp(k) => run_partitioned_observed(k, &parts, params.stop, observer),
    };
    Ok(Output { values: out.values, width, iterations: out.iterations, residual: out.residual })
}

/// Feature matrices at least this large (bytes) are read through a renamed graph on one
/// partition: below it they sit in the last-level cache, where the order of rows hardly matters.
const RENAME_FEATURE_BYTES: usize = 32 << 20;

/// Steps a run must allow for renaming: on Kronecker scale 20, d = 64 (Zen 4 VM) the renaming
/// and the way back cost about 0.2–0.3 s and save 0.07–0.1 s per step, so from about the
/// fourth step on it gains.
const RENAME_MIN_STEPS: u32 = 4;

/// Whether a one-partition APPNP run over a graph of `vertices` and `edges` renames its vertices
/// first: the feature matrix is large, the run long enough to repay the renaming, and the memory
/// it adds ([`rename_bytes`]) is at most half of what `available` reports (unknown: assumed
/// there). Near the host's or the container's limit the run stays in the given order, slower
/// per step, rather than be killed for the copy.
fn renames_for(vertices: usize, edges: usize, dim: usize, stop: Stop, available: impl FnOnce() -> Option<u64>) -> bool {
    vertices.saturating_mul(dim).saturating_mul(4) >= RENAME_FEATURE_BYTES
        && stop.max_iterations >= RENAME_MIN_STEPS
        && available().is_none_or(|a| rename_bytes(vertices, edges, dim) <= a / 2)
}

/// The most memory renaming adds to a plain run: the renamed graph (offsets, sources and both
/// degree arrays), the renaming and its inverse, and a second result matrix while the rows go
/// back into vertex order.
fn rename_bytes(vertices: usize, edges: usize, dim: usize) -> u64 {
    let (v, e, d) = (vertices as u64, edges as u64, dim as u64);
    4 * e + 8 * (v + 1) + 16 * v + 4 * v * d
}

/// APPNP on one partition over the graph renamed by descending out-degree
/// ([`LocalGraph::by_out_degree`]): the feature rows that most rows read are then together at
/// the front of the iterate, where the caches keep them, instead of scattered over it. Each row
/// keeps its in-neighbour list in CSR order, so every value has the bits of the plain run; the
/// result is put back in the original vertex order.
fn appnp_renamed(
    graph: &Csr,
    k: &Appnp<'_>,
    stop: Stop,
    observer: &mut (dyn FnMut(Progress) + Send),
) -> superstep::RunOutput {
    let (renamed, renaming) = LocalGraph::by_out_degree(graph);
    let kernel = Appnp { rows: Some(&renaming.order), ..k.clone() };
    let mut out = run_partitioned_observed(&kernel, &Partitioning::single(renamed), stop, observer);
    let d = k.dim;
    out.values = Segment::build(out.values.len(), |values| {
        values.par_chunks_mut(d).zip(renaming.rank.par_iter()).for_each(|(row, &new)| {
            row.copy_from_slice(&out.values[new as usize * d..][..d]);
        });
    });
    out
}

/// A checked kernel, ready to run on a graph of the vertex count it was built for.
#[derive(Clone, Debug)]
pub enum Built<'a> {
    /// PageRank and personalized PageRank.
    PageRank(PageRank),
    /// The heat kernel.
    Heat(Heat),
    /// APPNP over the whole feature matrix (`base` 0).
    Appnp(Appnp<'a>),
}

impl Built<'_> {
    /// `f32` values per vertex.
    pub fn width(&self) -> usize {
        match self {
            Built::PageRank(_) | Built::Heat(_) => 1,
            Built::Appnp(k) => k.dim,
        }
    }
}

/// Checks `params` against a graph of `vertices` vertices and builds the kernel they describe:
/// what [`run`] does before any work, and what a distributed job master does before it hands
/// the kernel to partition owners. Seeds come out sorted and without duplicates.
pub fn build<'a>(vertices: usize, params: &Params<'a>) -> Result<Built<'a>, KernelError> {
    if let Some(t) = params.stop.tolerance.filter(|t| !(t.is_finite() && *t >= 0.0)) {
        return Err(KernelError::Tolerance(t));
    }
    let n = vertices;
    let unit = |x: f32| (0.0..=1.0).contains(&x);
    let seeds = |s: &[u32], algorithm| -> Result<Vec<u32>, KernelError> {
        if s.is_empty() {
            return Err(KernelError::NoSeeds { algorithm });
        }
        if let Some(&seed) = s.iter().find(|&&x| x as usize >= n) {
            return Err(KernelError::UnknownSeed { seed, vertices: n });
        }
        let mut s = s.to_vec();
        s.sort_unstable();
        s.dedup();
        Ok(s)
    };
    Ok(match &params.algorithm {
        Algorithm::PageRank { damping } => {
            if !unit(*damping) {
                return Err(KernelError::Damping(*damping));
            }
            Built::PageRank(PageRank { damping: *damping as f64, teleport: Teleport::Uniform { vertices: n as u64 } })
        }
        Algorithm::PersonalizedPageRank { damping, seeds: s } => {
            if !unit(*damping) {
                return Err(KernelError::Damping(*damping));
            }
            Built::PageRank(PageRank { damping: *damping as f64, teleport: Teleport::Seeds(seeds(s, "ppr")?) })
        }
        Algorithm::HeatKernel { t, seeds: s } => {
            if !(t.is_finite() && *t >= 0.0) {
                return Err(KernelError::Time(*t));
            }
            Built::Heat(Heat { t: *t as f64, seeds: seeds(s, "heat")?, vertices: n as u64 })
        }
        Algorithm::Appnp { alpha, normalization, features, dim } => {
            if !unit(*alpha) {
                return Err(KernelError::Alpha(*alpha));
            }
            if *dim == 0 {
                return Err(KernelError::ZeroDimension);
            }
            let expected = n.checked_mul(*dim).filter(|&e| e == features.len());
            if expected.is_none() {
                let expected = n.saturating_mul(*dim);
                return Err(KernelError::FeatureShape { len: features.len(), vertices: n, dim: *dim, expected });
            }
            Built::Appnp(Appnp {
                alpha: *alpha,
                normalization: *normalization,
                features,
                dim: *dim,
                base: 0,
                rows: None,
            })
        }
    })
}

#[cfg(test)]
mod tests;

//! Seeded graph generators: Graph500 Kronecker, Erdős–Rényi and 2-D grids, plus seeded feature
//! matrices for APPNP.
//!
//! Every generator is a pure function of its parameters and seed, documented here bit for bit so
//! another implementation can reproduce the exact same graph. Work is parallel (rayon), yet the
//! output never depends on the thread count: item `i` (an edge, a vertex key, a feature value) is
//! drawn from its own counter-based random stream keyed by `(seed, purpose, i)`, and results are
//! collected in index order.
//!
//! # The random numbers
//!
//! All randomness comes from [`SplitMix64`] (Steele, Lea & Flood 2014; the `splitmix64.c`
//! reference of Vigna), which this module implements in a few lines:
//!
//! ```text
//! mix64(z):  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//!            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//!            return z ^ (z >> 31)                       (wrapping u64 arithmetic)
//! next():    state += 0x9E3779B97F4A7C15; return mix64(state)
//! ```
//!
//! The stream for item `i` of a given purpose starts at
//! `state = mix64(mix64(seed ^ purpose).wrapping_add(i * 0x9E3779B97F4A7C15))` and is then
//! advanced with `next()`. (The outer `mix64` scatters the streams' starting points over the whole
//! 2^64 cycle; without it stream `i + 1` would be stream `i` shifted by one draw.) Purposes are the constants in [`purpose`]. A uniform integer below `n` is
//! `(next() as u128 * n as u128) >> 64` (Lemire's multiply-shift without rejection; its bias is
//! below `n / 2^64`, irrelevant at graph sizes). A uniform `f32` in `[0, 1)` is
//! `(next() >> 40) as f32 * 2^-24`.
//!
//! # Graph policy
//!
//! Generated edge lists go through [`CsrBuilder`]: duplicate edges are
//! merged and, for Kronecker and Erdős–Rényi, self loops are dropped and the graph is symmetrised
//! by default (each undirected edge becomes two arcs), as Graph500 does.
//!
//! # Vertex order
//!
//! Graph500 scrambles Kronecker vertex ids, which spreads the hubs' values over the whole vector.
//! [`reorder::by_degree`] relabels any graph by descending degree, a load-time transformation that
//! makes pull kernels markedly faster on power-law graphs (PageRank at scale 20: ≈40% less CPU
//! time per step, see `benches/RESULTS.md`). Kernels never reorder on their own.

mod er;
mod grid;
mod kronecker;
pub mod reorder;

pub use er::{ErdosRenyi, erdos_renyi};
pub use grid::grid;
pub use kronecker::{Kronecker, kronecker};

use rayon::prelude::*;

use crate::csr::{BuildError, Csr, CsrBuilder, SelfLoops};

/// The increment of the SplitMix64 sequence (2^64 / φ, odd).
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The purposes that key independent random streams; part of the bit-exact specification.
pub mod purpose {
    /// Edge `i` of a Kronecker graph.
    pub const KRONECKER_EDGE: u64 = 1;
    /// The sort key of vertex `v` in the Kronecker vertex permutation.
    pub const KRONECKER_PERMUTATION: u64 = 2;
    /// Edge `i` of an Erdős–Rényi graph.
    pub const ER_EDGE: u64 = 3;
    /// Value `i` (row-major) of a feature matrix.
    pub const FEATURES: u64 = 4;
}

/// The SplitMix64 output function (a bijection on `u64`).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: a tiny, fast generator that passes BigCrush and is trivially seekable, which is
/// what counter-based per-item streams need.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `state`.
    pub fn new(state: u64) -> Self {
        Self { state }
    }

    /// The stream of item `index` for `purpose` under `seed` (see the module docs).
    #[inline]
    pub fn stream(seed: u64, purpose: u64, index: u64) -> Self {
        Self { state: mix64(mix64(seed ^ purpose).wrapping_add(index.wrapping_mul(GOLDEN_GAMMA))) }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// A uniform integer in `0..n` (multiply-shift; `n = 0` gives 0).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A uniform `f32` in `[0, 1)` with 24 random bits.
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

/// Why a generator refused its parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GenError {
    #[error("kronecker scale {0} is out of range: vertex ids are u32, so the scale must be 1..=31")]
    Scale(u32),
    #[error("kronecker edge factor must be at least 1, got {0}")]
    EdgeFactor(u32),
    #[error("kronecker probabilities a={a}, b={b}, c={c} must be non-negative with a+b+c ≤ 1")]
    Probabilities { a: f64, b: f64, c: f64 },
    #[error("graph of {vertices} vertices is too large: vertex ids are u32")]
    TooManyVertices { vertices: u64 },
    #[error("{edges} edges is too many to generate in memory")]
    TooManyEdges { edges: u64 },
    #[error("an Erdős–Rényi graph with edges needs at least one vertex")]
    NoVertices,
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Edges are drawn and handed to the builder in blocks of this many, so the temporary edge
/// arrays never hold the whole graph twice.
const EDGE_BLOCK: u64 = 1 << 21;

/// The graph on `vertices` vertices of the `m` edges `draw(0), …, draw(m - 1)`, drawn in parallel
/// blocks of [`EDGE_BLOCK`] and added in index order; self loops dropped, duplicates merged, the
/// reverse of each edge added when `symmetrize`. `draw` (and whatever it owns) is dropped before the
/// builder sorts.
pub(crate) fn build_drawn(
    vertices: u64,
    m: u64,
    symmetrize: bool,
    draw: impl Fn(u64) -> (u32, u32) + Sync,
) -> Result<Csr, GenError> {
    let mut builder = CsrBuilder::new().vertices(vertices).symmetrize(symmetrize).self_loops(SelfLoops::Drop);
    builder.reserve(m as usize);
    let (mut src, mut dst) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < m {
        let end = (start + EDGE_BLOCK).min(m);
        (0..(end - start) as usize).into_par_iter().map(|j| draw(start + j as u64)).unzip_into_vecs(&mut src, &mut dst);
        builder.extend(&src, &dst);
        start = end;
    }
    drop((src, dst, draw));
    Ok(builder.build()?)
}

/// A seeded `rows × dim` row-major feature matrix with values uniform in `[0, 1)`: value `i`
/// (row-major) is the first `f32` of stream `(seed, FEATURES, i)`.
pub fn features(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
    feature_rows(0..rows, dim, seed)
}

/// Rows `rows` of the matrix [`features`] generates, without generating the others: a job's owner
/// makes the rows of its own vertices, bit-identical to the same rows of the whole matrix.
pub fn feature_rows(rows: std::ops::Range<usize>, dim: usize, seed: u64) -> Vec<f32> {
    let first = (rows.start * dim) as u64;
    let mut out = crate::kernels::superstep::huge_zeroed(rows.len() * dim);
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let base = first + (c << 16) as u64;
        for (j, x) in chunk.iter_mut().enumerate() {
            *x = SplitMix64::stream(seed, purpose::FEATURES, base + j as u64).next_f32();
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of splitmix64.c seeded with 1234567 (Vigna's published test vector).
        let mut r = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn below_and_f32_stay_in_range() {
        let mut r = SplitMix64::stream(7, 9, 11);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
            let x = r.next_f32();
            assert!((0.0..1.0).contains(&x));
        }
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn feature_rows_are_the_same_rows_of_the_whole_matrix() {
        let (rows, dim) = (1500, 70);
        let whole = features(rows, dim, 42);
        for r in [0..0, 0..1, 3..1000, 999..1500, 1499..1500] {
            assert_eq!(feature_rows(r.clone(), dim, 42), whole[r.start * dim..r.end * dim], "rows {r:?}");
        }
    }

    #[test]
    fn features_are_seeded_and_thread_independent() {
        let a = features(100, 3, 5);
        let b = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| features(100, 3, 5));
        assert_eq!(a, b);
        assert_ne!(a, features(100, 3, 6));
    }
}

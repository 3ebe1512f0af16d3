//! Graph500 Kronecker (R-MAT) graphs.
//!
//! # Exact definition
//!
//! A graph of scale `S` has `n = 2^S` vertices and `m = edge_factor · n` generated edges.
//! Edge `i` (for `i` in `0..m`) is drawn from the stream `(seed, KRONECKER_EDGE, i)`:
//! starting from `u = v = 0`, for each of the `S` levels (most significant bit first) one
//! `r = next_u64()` picks a quadrant by comparing against the cumulative thresholds
//! `T1 = ⌊A·2^64⌋`, `T2 = ⌊(A+B)·2^64⌋`, `T3 = ⌊(A+B+C)·2^64⌋` (each computed in `f64` and
//! converted with `as u64`):
//!
//! | `r`            | quadrant | `u` bit | `v` bit |
//! |----------------|----------|---------|---------|
//! | `r < T1`       | A        | 0       | 0       |
//! | `T1 ≤ r < T2`  | B        | 0       | 1       |
//! | `T2 ≤ r < T3`  | C        | 1       | 0       |
//! | `r ≥ T3`       | D        | 1       | 1       |
//!
//! and sets `u = 2u + u_bit`, `v = 2v + v_bit`. The defaults are Graph500's
//! `A = 0.57, B = C = 0.19` (so `D = 0.05`), edge factor 16.
//!
//! **Vertex permutation.** Like Graph500, the vertex labels are then scrambled so that vertex id
//! carries no information about degree: vertex `w` gets the key `(next_u64() of stream
//! (seed, KRONECKER_PERMUTATION, w), w)`, vertices are sorted by key, and `w`'s new id is its rank.
//! Edge `u → v` becomes `rank(u) → rank(v)`. [`Kronecker::permute`] turns this off (hubs then
//! sit at ids with many zero bits).
//!
//! **Policy.** By default the edges are symmetrised, self loops dropped and duplicates merged (the
//! Graph500 BFS graph). At scale 20 that is about 31M arcs over 2^20 vertices, some isolated.
//!
//! This draws the same distribution as the Graph500 reference generator but not the same bits
//! (the reference uses its own MRG random streams and per-level noise).

use rayon::prelude::*;

use super::{GenError, SplitMix64, build_drawn, purpose};
use crate::csr::Csr;

/// Parameters of a Kronecker graph; [`Kronecker::new`] fills in Graph500's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Kronecker {
    /// `log2` of the vertex count.
    pub scale: u32,
    /// Generated edges per vertex.
    pub edge_factor: u32,
    /// Seed of every random stream.
    pub seed: u64,
    /// Quadrant probabilities; `D = 1 - A - B - C`.
    pub a: f64,
    pub b: f64,
    pub c: f64,
    /// Scramble vertex ids (Graph500 does).
    pub permute: bool,
    /// Add the reverse of every edge (an undirected graph).
    pub symmetrize: bool,
}

/// The Graph500 graph of `scale` with the default probabilities, permuted and symmetrised.
pub fn kronecker(scale: u32, edge_factor: u32, seed: u64) -> Result<Csr, GenError> {
    Kronecker::new(scale, edge_factor, seed).generate()
}

impl Kronecker {
    /// Graph500's defaults for the given size and seed.
    pub fn new(scale: u32, edge_factor: u32, seed: u64) -> Self {
        Self { scale, edge_factor, seed, a: 0.57, b: 0.19, c: 0.19, permute: true, symmetrize: true }
    }

    /// Keeps or scrambles vertex ids.
    pub fn permute(mut self, yes: bool) -> Self {
        self.permute = yes;
        self
    }

    /// Keeps the edges directed (`false`) or symmetrises them (`true`, the default).
    pub fn symmetrize(mut self, yes: bool) -> Self {
        self.symmetrize = yes;
        self
    }

    /// Draws the graph.
    pub fn generate(&self) -> Result<Csr, GenError> {
        let (scale, a, b, c) = (self.scale, self.a, self.b, self.c);
        if !(1..=31).contains(&scale) {
            return Err(GenError::Scale(scale));
        }
        if self.edge_factor == 0 {
            return Err(GenError::EdgeFactor(self.edge_factor));
        }
        let ok = |p: f64| p.is_finite() && p >= 0.0;
        if !(ok(a) && ok(b) && ok(c) && a + b + c <= 1.0) {
            return Err(GenError::Probabilities { a, b, c });
        }
        let n = 1u64 << scale;
        let m = n.checked_mul(self.edge_factor as u64).filter(|&m| m <= u32::MAX as u64 * 4);
        let m = m.ok_or(GenError::TooManyEdges { edges: n.saturating_mul(self.edge_factor as u64) })?;
        const TWO64: f64 = 18_446_744_073_709_551_616.0;
        let t = [(a * TWO64) as u64, ((a + b) * TWO64) as u64, ((a + b + c) * TWO64) as u64];
        let rank = self.permute.then(|| permutation(n, self.seed));

        let seed = self.seed;
        build_drawn(n, m, self.symmetrize, move |i| {
            let (u, v) = draw_edge(seed, i, scale, &t);
            match &rank {
                Some(r) => (r[u as usize], r[v as usize]),
                None => (u, v),
            }
        })
    }
}

/// Edge `i`: one quadrant choice per level, most significant bit first.
#[inline]
fn draw_edge(seed: u64, i: u64, scale: u32, t: &[u64; 3]) -> (u32, u32) {
    let mut rng = SplitMix64::stream(seed, purpose::KRONECKER_EDGE, i);
    let (mut u, mut v) = (0u32, 0u32);
    for _ in 0..scale {
        let r = rng.next_u64();
        let (ub, vb) = if r < t[0] {
            (0, 0)
        } else if r < t[1] {
            (0, 1)
        } else if r < t[2] {
            (1, 0)
        } else {
            (1, 1)
        };
        u = (u << 1) | ub;
        v = (v << 1) | vb;
    }
    (u, v)
}

/// `rank[w]`: the new id of vertex `w` (its position when sorted by `(key(w), w)`).
fn permutation(n: u64, seed: u64) -> Vec<u32> {
    let mut keyed: Vec<(u64, u32)> = (0..n as u32)
        .into_par_iter()
        .map(|w| (SplitMix64::stream(seed, purpose::KRONECKER_PERMUTATION, w as u64).next_u64(), w))
        .collect();
    keyed.par_sort_unstable();
    let mut rank = vec![0u32; n as usize];
    for (new, &(_, w)) in keyed.iter().enumerate() {
        rank[w as usize] = new as u32;
    }
    rank
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_graph_is_symmetric_loop_free_and_seeded() {
        let g = kronecker(8, 16, 42).unwrap();
        assert_eq!(g.vertices(), 256);
        // Skewed quadrants draw many duplicates at this small scale; merged, about half remain.
        assert!((2 * 256 * 16 / 3..2 * 256 * 16 * 2 / 3).contains(&g.edges()), "{} arcs", g.edges());
        for (u, v, _) in g.edges_iter() {
            assert_ne!(u, v);
            assert!(g.in_neighbours(u).binary_search(&v).is_ok(), "{u}->{v} has no reverse");
        }
        assert_eq!(g, kronecker(8, 16, 42).unwrap());
        assert_ne!(g, kronecker(8, 16, 43).unwrap());
    }

    #[test]
    fn thread_count_does_not_matter() {
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let k = Kronecker::new(9, 8, 3);
        assert_eq!(one.install(|| k.generate()).unwrap(), three.install(|| k.generate()).unwrap());
    }

    #[test]
    fn unpermuted_hub_is_vertex_zero() {
        // With A the heaviest quadrant, vertex 0 collects the most edges before permutation.
        let g = Kronecker::new(10, 16, 1).permute(false).generate().unwrap();
        let deg = |v: u32| g.in_neighbours(v).len();
        assert!((1..g.vertices() as u32).all(|v| deg(v) <= deg(0)));
    }

    #[test]
    fn pinned_edges() {
        // Guards the bit-exact specification: changing the RNG or the drawing order breaks this.
        let t = [
            (0.57 * 18_446_744_073_709_551_616.0) as u64,
            (0.76 * 18_446_744_073_709_551_616.0) as u64,
            (0.95 * 18_446_744_073_709_551_616.0) as u64,
        ];
        let edges: Vec<(u32, u32)> = (0..4).map(|i| draw_edge(1, i, 10, &t)).collect();
        assert_eq!(edges, PINNED);
    }
    const PINNED: [(u32, u32); 4] = [(581, 65), (40, 832), (128, 0), (784, 4)];

    #[test]
    fn bad_parameters_are_errors() {
        assert_eq!(kronecker(0, 16, 1), Err(GenError::Scale(0)));
        assert_eq!(kronecker(32, 16, 1), Err(GenError::Scale(32)));
        assert_eq!(kronecker(4, 0, 1), Err(GenError::EdgeFactor(0)));
        let k = Kronecker { a: 0.9, b: 0.2, ..Kronecker::new(4, 1, 1) };
        assert!(matches!(k.generate(), Err(GenError::Probabilities { .. })));
    }
}

//! Erdős–Rényi random graphs in the G(n, m) model.
//!
//! # Exact definition
//!
//! `m` endpoint pairs are drawn with replacement: pair `i` (for `i` in `0..m`) takes
//! `u = below(n)` then `v = below(n)` from the stream `(seed, ER_EDGE, i)` and adds edge `u → v`.
//! Self loops are then dropped and duplicates merged, so the graph has slightly fewer than `m`
//! distinct edges (about `m/n + m²/(2n²)` fewer) — G(n, m) "with replacement", which for sparse
//! graphs is indistinguishable from the exact model and, unlike it, parallel and seekable.
//! By default the edges are symmetrised (an undirected graph); [`ErdosRenyi::symmetrize`]
//! keeps them directed.

use super::{GenError, SplitMix64, build_drawn, purpose};
use crate::csr::{Csr, MAX_VERTICES};

/// Parameters of an Erdős–Rényi G(n, m) graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErdosRenyi {
    /// Vertex count.
    pub vertices: u64,
    /// Endpoint pairs drawn.
    pub edges: u64,
    /// Seed of the random streams.
    pub seed: u64,
    /// Add the reverse of every edge.
    pub symmetrize: bool,
}

/// An undirected G(n, m) graph (see the module docs).
pub fn erdos_renyi(vertices: u64, edges: u64, seed: u64) -> Result<Csr, GenError> {
    ErdosRenyi { vertices, edges, seed, symmetrize: true }.generate()
}

impl ErdosRenyi {
    /// Keeps the edges directed (`false`) or symmetrises them (`true`).
    pub fn symmetrize(mut self, yes: bool) -> Self {
        self.symmetrize = yes;
        self
    }

    /// Draws the graph.
    pub fn generate(&self) -> Result<Csr, GenError> {
        let (n, m) = (self.vertices, self.edges);
        if n > MAX_VERTICES {
            return Err(GenError::TooManyVertices { vertices: n });
        }
        if m > u32::MAX as u64 * 4 {
            return Err(GenError::TooManyEdges { edges: m });
        }
        if n == 0 && m > 0 {
            return Err(GenError::NoVertices);
        }
        build_drawn(n, m, self.symmetrize, |i| {
            let mut rng = SplitMix64::stream(self.seed, purpose::ER_EDGE, i);
            let u = rng.below(n) as u32;
            (u, rng.below(n) as u32)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_symmetry() {
        let g = erdos_renyi(1000, 5000, 9).unwrap();
        assert_eq!(g.vertices(), 1000);
        // 5000 pairs, ~5 loops and ~12 duplicates removed, then doubled.
        assert!((9900..=10000).contains(&g.edges()), "{}", g.edges());
        for (u, v, _) in g.edges_iter() {
            assert!(u != v && g.in_neighbours(u).binary_search(&v).is_ok());
        }
        assert_eq!(g, erdos_renyi(1000, 5000, 9).unwrap());
    }

    #[test]
    fn directed_keeps_direction() {
        let g = ErdosRenyi { vertices: 100, edges: 300, seed: 1, symmetrize: false }.generate().unwrap();
        assert!(g.edges() <= 300 && g.edges() > 280);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert_eq!(erdos_renyi(0, 1, 1), Err(GenError::NoVertices));
        assert_eq!(erdos_renyi(1 << 33, 1, 1), Err(GenError::TooManyVertices { vertices: 1 << 33 }));
        assert_eq!(erdos_renyi(0, 0, 1).unwrap().vertices(), 0);
    }
}

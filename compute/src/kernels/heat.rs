//! The heat kernel `h = exp(−t (I − P)) s`, by a truncated Taylor series.
//!
//! `P` is the random-walk operator with dangling mass spread uniformly over all `n` vertices
//! (the PageRank walk without teleport), `s` is uniform on the seed set. Since
//! `exp(−t(I − P)) = e^{−t} Σ_k t^k/k! P^k`, the kernel keeps the current term and the sum:
//!
//! ```text
//! term_0 = e^{−t} s                  h_0 = term_0
//! term_k = (t/k) · (P term_{k−1} + m_{k−1}/n)     h_k = h_{k−1} + term_k
//! ```
//!
//! where `m` is the [`ExactSum`] dangling mass of the term. Step `k` adds term `k`; `K` steps use
//! the terms `0..=K`. Only the term is exchanged between partitions; `h` stays with its owner.
//!
//! **Arithmetic, exactly:** `term_0[v] = (e^{−t} / |S|) as f32` on seeds (computed in `f64`);
//! `term_k[v] = ((t / k) · (row_sum(v) + m/n)) as f32` in `f64`; `h[v] += term_k[v]` in `f32`.
//! The residual is `max_v |h_k[v] − h_{k−1}[v]|` in `f32`.

use rayon::prelude::*;

use super::pagerank::{Prepared, Teleport, dangling_mass};
use super::pull::{PullScratch, WINDOW, dangling_sum};
use super::superstep::{Globals, Kernel, Partials};
use crate::buf::Segment;
use crate::partition::LocalGraph;

/// The heat kernel started from the uniform distribution on `seeds` (sorted, unique, in range).
#[derive(Clone, Debug, PartialEq)]
pub struct Heat {
    pub t: f64,
    pub seeds: Vec<u32>,
    pub vertices: u64,
}

impl Kernel for Heat {
    type Prepared = Prepared;

    fn width(&self) -> usize {
        1
    }

    fn aux_len(&self, g: &LocalGraph) -> usize {
        g.owned()
    }

    fn prepare(&self, g: &LocalGraph) -> Prepared {
        Prepared::new(&Teleport::Seeds(self.seeds.clone()), g)
    }

    fn init(&self, g: &LocalGraph, prep: &Prepared, x: &mut [f32], aux: &mut Vec<f32>) -> Partials {
        let w = (-self.t).exp() / self.seeds.len() as f64;
        x.par_iter_mut().enumerate().for_each(|(row, x)| *x = prep.mask.at(row, w) as f32);
        aux.clear();
        aux.extend_from_slice(x);
        Partials { mass: dangling_mass(g, x), residual: 0.0 }
    }

    fn step(
        &self,
        g: &LocalGraph,
        prep: &Prepared,
        globals: &Globals,
        x: &[f32],
        next: &mut [f32],
        h: &mut [f32],
        scratch: &mut PullScratch,
    ) -> Partials {
        let factor = self.t / globals.step as f64;
        let spread = globals.mass / self.vertices as f64;
        let outdeg = g.out_degree();
        let windows = next.par_chunks_mut(WINDOW).zip(h.par_chunks_mut(WINDOW));
        prep.pull.pull(g, x, scratch, windows, |first, sums, (out, h)| {
            let mut residual = 0f32;
            for ((out, h), &sum) in out.iter_mut().zip(h).zip(sums) {
                let term = (factor * (sum + spread)) as f32;
                *out = term;
                let old = *h;
                *h += term;
                residual = residual.max((*h - old).abs());
            }
            Partials { mass: dangling_sum(out, &outdeg[first..first + out.len()]), residual }
        })
    }

    fn finish(&self, _x: Segment<f32>, h: Vec<f32>) -> Segment<f32> {
        Segment::from_floats(h)
    }
}

//! PageRank and personalized PageRank.
//!
//! With damping `d`, teleport distribution `s` (uniform `1/n` for PageRank, `1/|S|` on each seed
//! of the set `S` for personalized PageRank) and dangling mass `m_k = Σ_{outdeg(u)=0} x_k[u]`:
//!
//! ```text
//! x_0     = s
//! x_{k+1} = d · P x_k + (1 − d + d · m_k) · s
//! ```
//!
//! i.e. a walker follows a random out-edge with probability `d` and otherwise jumps to `s`; a
//! walker on a dangling vertex always jumps to `s` (for PageRank: uniformly, the usual
//! redistribution). The total mass stays 1.
//!
//! **Arithmetic, exactly:** `m_k` is the [`ExactSum`] of the dangling `x_k[u]` as `f64`;
//! `coef = (1 − d) + d · m_k` in `f64`; row `v` is `(d · row_sum(v) + coef · s[v]) as f32` with
//! `d`, `s[v]` widened to `f64` (`s[v] = 1/n` or `1/|S|` computed in `f64`). The residual is
//! `max_v |x_{k+1}[v] − x_k[v]|` in `f32`.

use rayon::prelude::*;

use super::pull::{PullPlan, PullScratch, WINDOW, dangling_sum, max_change};
use super::superstep::{ExactSum, Globals, Kernel, Partials};
use crate::buf::Segment;
use crate::partition::LocalGraph;

/// Where the teleporting walker lands.
#[derive(Clone, Debug, PartialEq)]
pub enum Teleport {
    /// Uniformly on all `n` vertices.
    Uniform { vertices: u64 },
    /// Uniformly on a seed set (sorted, no duplicates, all below the vertex count).
    Seeds(Vec<u32>),
}

impl Teleport {
    fn weight(&self) -> f64 {
        match self {
            Teleport::Uniform { vertices } => 1.0 / *vertices as f64,
            Teleport::Seeds(s) => 1.0 / s.len() as f64,
        }
    }
}

/// Per-partition teleport mask: which owned rows are seeds (`None`: all are).
#[derive(Debug)]
pub struct TeleportMask(Option<Vec<bool>>);

impl TeleportMask {
    pub(crate) fn new(t: &Teleport, g: &LocalGraph) -> Self {
        match t {
            Teleport::Uniform { .. } => Self(None),
            Teleport::Seeds(seeds) => {
                let mut mask = vec![false; g.owned()];
                let r = g.owned_range();
                for &s in seeds.iter().filter(|s| r.contains(s)) {
                    mask[(s - r.start) as usize] = true;
                }
                Self(Some(mask))
            }
        }
    }

    /// `s[row]` given the teleport weight `w`.
    #[inline]
    pub(crate) fn at(&self, row: usize, w: f64) -> f64 {
        match &self.0 {
            None => w,
            Some(m) if m[row] => w,
            Some(_) => 0.0,
        }
    }
}

/// What the pull-sum kernels derive once per partition: the teleport mask and the row layout.
#[derive(Debug)]
pub struct Prepared {
    pub(crate) mask: TeleportMask,
    pub(crate) pull: std::sync::Arc<PullPlan>,
}

impl Prepared {
    pub(crate) fn new(t: &Teleport, g: &LocalGraph) -> Self {
        Self { mask: TeleportMask::new(t, g), pull: g.pull_plan() }
    }
}

/// PageRank (uniform teleport) or personalized PageRank (seed teleport).
#[derive(Clone, Debug, PartialEq)]
pub struct PageRank {
    pub damping: f64,
    pub teleport: Teleport,
}

/// The mass on dangling owned rows of `x`.
pub(crate) fn dangling_mass(g: &LocalGraph, x: &[f32]) -> ExactSum {
    x.par_chunks(WINDOW)
        .zip(g.out_degree()[..g.owned()].par_chunks(WINDOW))
        .map(|(x, d)| dangling_sum(x, d))
        .reduce(ExactSum::default, |a, b| a + b)
}

impl Kernel for PageRank {
    type Prepared = Prepared;

    fn width(&self) -> usize {
        1
    }

    fn prepare(&self, g: &LocalGraph) -> Prepared {
        Prepared::new(&self.teleport, g)
    }

    fn init(&self, g: &LocalGraph, prep: &Prepared, x: &mut [f32], _aux: &mut Vec<f32>) -> Partials {
        let w = self.teleport.weight();
        x.par_iter_mut().enumerate().for_each(|(row, x)| *x = prep.mask.at(row, w) as f32);
        Partials { mass: dangling_mass(g, x), residual: 0.0 }
    }

    fn step(
        &self,
        g: &LocalGraph,
        prep: &Prepared,
        globals: &Globals,
        x: &[f32],
        next: &mut [f32],
        _aux: &mut [f32],
        scratch: &mut PullScratch,
    ) -> Partials {
        let (d, w) = (self.damping, self.teleport.weight());
        let coef = (1.0 - d) + d * globals.mass;
        let (mask, outdeg) = (&prep.mask, g.out_degree());
        prep.pull.pull(g, x, scratch, next.par_chunks_mut(WINDOW), |first, sums, out| {
            for (i, (out, &sum)) in out.iter_mut().zip(sums).enumerate() {
                *out = (d * sum + coef * mask.at(first + i, w)) as f32;
            }
            let rows = first..first + out.len();
            Partials { mass: dangling_sum(out, &outdeg[rows.clone()]), residual: max_change(out, &x[rows]) }
        })
    }

    fn finish(&self, x: Segment<f32>, _aux: Vec<f32>) -> Segment<f32> {
        x
    }
}

//! The scalar pull sum shared by PageRank, personalized PageRank and the heat kernel.
//!
//! The random-walk operator `P` moves a vertex's value evenly along its out-edges; in pull form,
//! `(P y)[v] = Σ_{u ∈ in(v)} y[u] / outdeg(u)`. Each step first computes the *contribution*
//! `c[u] = y[u] / outdeg(u)` (an `f32` division; 0 for dangling `u`) for every local vertex, then
//! sums `c` over each row.
//!
//! **Row sum, exactly:** four `f64` accumulators; the row's `i`-th in-neighbour (CSR order) is
//! added to accumulator `i mod 4` after widening `c[u]` to `f64`; the result is
//! `(a0 + a1) + (a2 + a3)`. Independent accumulators keep four cache misses in flight, and the
//! order is a function of the row alone (the determinism contract). Plain scalar code: on this
//! machine hardware gathers with an in-order reduction were slower (DESIGN.md).

use rayon::prelude::*;

use crate::partition::LocalGraph;

/// Rows per parallel work item.
pub(crate) const ROW_CHUNK: usize = 2048;

/// Writes `c[u] = y[u] / outdeg(u)` (0 when `outdeg(u) = 0`) for every local vertex.
pub(crate) fn contributions(g: &LocalGraph, y: &[f32], c: &mut Vec<f32>) {
    assert_eq!(y.len(), g.locals(), "local vector does not match the partition");
    if c.len() != g.locals() {
        *c = super::superstep::huge_zeroed(g.locals());
    }
    c.par_chunks_mut(1 << 14).zip(y.par_chunks(1 << 14)).zip(g.out_degree().par_chunks(1 << 14)).for_each(
        |((c, y), d)| {
            for ((c, &y), &d) in c.iter_mut().zip(y).zip(d) {
                *c = if d == 0 { 0.0 } else { y / d as f32 };
            }
        },
    );
}

/// `Σ c[u]` over one row, in the order documented above.
///
/// Every id in `row` must be below `c.len()`: callers pass rows of a [`LocalGraph`] (whose
/// sources are all below `locals()`) and `c` of length `locals()`, asserted once per step.
#[inline(always)]
pub(crate) fn row_sum(row: &[u32], c: &[f32]) -> f64 {
    debug_assert!(row.iter().all(|&u| (u as usize) < c.len()));
    // SAFETY: every id is below `c.len()` (the contract above). Bounds checks here cost a
    // compare and branch per edge in the hottest loop of PageRank.
    let at = |u: u32| unsafe { *c.get_unchecked(u as usize) } as f64;
    let mut a = [0f64; 4];
    let mut quads = row.chunks_exact(4);
    for q in &mut quads {
        a[0] += at(q[0]);
        a[1] += at(q[1]);
        a[2] += at(q[2]);
        a[3] += at(q[3]);
    }
    for (k, &u) in quads.remainder().iter().enumerate() {
        a[k] += at(u);
    }
    (a[0] + a[1]) + (a[2] + a[3])
}

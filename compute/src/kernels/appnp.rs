//! APPNP feature propagation: `X_{k+1} = (1 − α) · Â X_k + α · X_0`, `X_0` the input features.
//!
//! Features are `d`-wide `f32` rows, row-major. `Â` is built on `Ã = A + I` — a self loop is
//! added to every vertex, as in GCN and the APPNP paper (a loop already present in `A` then counts
//! twice). With `d̃(v) = indeg(v) + 1` (PyG's `gcn_norm` convention, degree of the target):
//!
//! - [`Normalization::Symmetric`]: `Â[v,u] = d̃(v)^{-1/2} · d̃(u)^{-1/2}`;
//! - [`Normalization::RandomWalk`]: `Â[v,u] = 1 / d̃(v)` (the mean over in-neighbours and self).
//!
//! Both factor as `Â[v,u] = scale(v) · w(u)` with `w(u) = d̃(u)^{-1/2}` or 1 and
//! `scale(v) = (1 − α) · d̃(v)^{-1/2}` or `(1 − α) / d̃(v)` (the `1 − α` folded in). Every `w` and
//! `scale` is computed in `f64` from the integer degree and rounded once to `f32`.
//!
//! **Arithmetic, exactly (per feature column `j`, all `f32`, `fma` = fused multiply-add):**
//!
//! ```text
//! acc = 0
//! for u in in(v), in CSR order:  acc = fma(w(u), X[u][j], acc)
//! acc = fma(w(v), X[v][j], acc)                       (the self loop, last)
//! X'[v][j] = fma(scale(v), acc, α · X_0[v][j])
//! ```
//!
//! Lanes are independent, so the AVX-512 path (16 columns per register, four registers: 64
//! columns per pass over the row), the AVX2+FMA path (8 per register, eight registers: 64 columns
//! per pass, then passes of 32 for what is left) and the portable path (`f32::mul_add`, correctly
//! rounded everywhere) compute identical bits; which one runs is detected at run time and can
//! never change a result. The accumulators stay in registers and each edge costs one broadcast of
//! `w(u)` and one FMA per register (DESIGN.md: an accumulator array on the stack made the
//! compiler gather across edges, 5–9× slower). One pass per 64 columns asks for a feature row's
//! four cache lines together; the AVX2 path's earlier two passes of 32 were 1.4–1.6× slower.
//! Software prefetching of the feature rows 8–32 edges ahead was measured and made steps
//! 40% slower in CPU time (scale 20, d = 64) with the earlier 32-column passes; with the
//! 64-column passes, 8 or 16 edges ahead within a row, it was no better than without (AVX2,
//! Zen 3 VM). Asked for 32 edges ahead across row ends, in the renamed order, it makes the
//! AVX-512 step 15–20 % faster on an Intel VM ([`EDGES_AHEAD`]); the AVX2 path, measured only
//! on AMD machines, does not prefetch.
//! Column blocking (one pass over the graph per 16 or 32 columns, so each pass touches one cache
//! line per feature row) was 2–4× slower: re-streaming the edges costs more than it saves.
//! What does help where the feature matrix outgrows the last-level cache is the order of the
//! rows in memory: `kernels::run` steps a large one-partition APPNP over the graph renamed by
//! descending out-degree ([`LocalGraph::by_out_degree`]; [`Appnp::rows`] then maps each row to
//! its input features), which packs the most-read rows together (0.42–0.47 → 0.34–0.39 s per
//! step on scale 20, d = 64, Zen 4 VM with 32 MiB L3). Lists keep their CSR order, so the bits
//! are the same. The input features stay in vertex order, so a renamed row's `X_0` row is one
//! more scattered read, at the row's end; it cost 10–25 % of the step until the step asked for
//! it [`AHEAD`] rows early ([`prefetch`]; scale 20, d = 64, Zen 3 VM). Large iterates live in
//! [`crate::buf::AlignedFloats`], so a 64-wide row is four whole cache lines; in a `Vec<f32>`
//! (16 bytes past a boundary) it was five, and the same steps took about 13 % longer (Intel VM,
//! scale 20, d = 64).

use rayon::prelude::*;

use super::superstep::{Globals, Kernel, Partials, PullScratch};
use crate::buf::Segment;
use crate::partition::LocalGraph;

/// How `Ã = A + I` is normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Normalization {
    /// `D̃^{-1/2} Ã D̃^{-1/2}` (GCN).
    #[default]
    Symmetric,
    /// `D̃^{-1} Ã` (mean aggregation).
    RandomWalk,
}

/// APPNP over features `features` (`rows × dim`, row `r` belonging to global vertex `base + r`).
#[derive(Clone, Debug, PartialEq)]
pub struct Appnp<'a> {
    pub alpha: f32,
    pub normalization: Normalization,
    pub features: &'a [f32],
    pub dim: usize,
    pub base: u32,
    /// The feature row of each graph row when the graph's vertices were renamed
    /// (the `order` of [`LocalGraph::by_out_degree`]'s renaming); `None`: row `v` is feature row `v − base`.
    pub rows: Option<&'a [u32]>,
}

/// Per-partition weights: `w` for every local vertex, `scale` for every owned row.
#[derive(Debug)]
pub struct AppnpWeights {
    w: Vec<f32>,
    scale: Vec<f32>,
}

/// Rows per parallel work item.
const ROWS: usize = 64;

impl Appnp<'_> {
    /// The input features of owned row `v` (a local id).
    #[inline]
    fn x0(&self, g: &LocalGraph, v: usize) -> &[f32] {
        let row = match self.rows {
            Some(rows) => rows[v] as usize,
            None => (g.owned_range().start - self.base) as usize + v,
        };
        &self.features[row * self.dim..(row + 1) * self.dim]
    }
}

impl Kernel for Appnp<'_> {
    type Prepared = AppnpWeights;

    fn width(&self) -> usize {
        self.dim
    }

    fn prepare(&self, g: &LocalGraph) -> AppnpWeights {
        let one_minus = 1.0 - self.alpha as f64;
        let deg = |l: usize| g.in_degree()[l] as f64 + 1.0;
        let (w, scale) = match self.normalization {
            Normalization::Symmetric => (
                (0..g.locals()).into_par_iter().map(|l| (1.0 / deg(l).sqrt()) as f32).collect(),
                (0..g.owned()).into_par_iter().map(|l| (one_minus / deg(l).sqrt()) as f32).collect(),
            ),
            Normalization::RandomWalk => {
                (vec![1.0; g.locals()], (0..g.owned()).into_par_iter().map(|l| (one_minus / deg(l)) as f32).collect())
            }
        };
        AppnpWeights { w, scale }
    }

    fn init(&self, g: &LocalGraph, _w: &AppnpWeights, x: &mut [f32], _aux: &mut Vec<f32>) -> Partials {
        x[..g.owned() * self.dim]
            .par_chunks_mut(self.dim)
            .enumerate()
            .for_each(|(v, x)| x.copy_from_slice(self.x0(g, v)));
        Partials::default()
    }

    fn step(
        &self,
        g: &LocalGraph,
        wts: &AppnpWeights,
        _globals: &Globals,
        x: &[f32],
        next: &mut [f32],
        _aux: &mut [f32],
        _scratch: &mut PullScratch,
    ) -> Partials {
        let d = self.dim;
        assert_eq!(x.len(), g.locals() * d, "local vector does not match the partition");
        assert_eq!(next.len(), g.owned() * d, "output does not match the partition");
        let simd = Simd::detect();
        let alpha = self.alpha;
        // At most 16 work items of ROWS rows per rayon leaf, so every part stays stealable: rows
        // differ widely in cost (a renamed graph puts all the high-degree rows first), and rayon
        // otherwise splits a range into only about two leaves per thread unless a steal happens
        // while it splits (a renamed Kronecker graph then ran one thread 40 % of the step alone).
        let residual = next
            .par_chunks_mut(ROWS * d)
            .with_max_len(16)
            .enumerate()
            .map(|(chunk, out)| {
                let mut res = 0f32;
                let offsets = g.offsets();
                let end = offsets[chunk * ROWS + out.len() / d] as usize;
                for (i, out) in out.chunks_exact_mut(d).enumerate() {
                    let v = chunk * ROWS + i;
                    if self.rows.is_some() && v + AHEAD < g.owned() {
                        prefetch(self.x0(g, v + AHEAD));
                    }
                    let row = Row {
                        list: g.row(v),
                        ahead: &g.sources()[offsets[v] as usize..end],
                        this: v as u32,
                        w: &wts.w,
                        x,
                        d,
                        scale: wts.scale[v],
                        alpha,
                        x0: self.x0(g, v),
                    };
                    res = res.max(simd.row(&row, out));
                }
                res
            })
            .reduce(|| 0.0, f32::max);
        Partials { residual, ..Partials::default() }
    }

    fn finish(&self, x: Segment<f32>, _aux: Vec<f32>) -> Segment<f32> {
        x
    }
}

/// Rows ahead whose input features a renamed graph's step asks for (see [`prefetch`]).
const AHEAD: usize = 8;

/// Asks for `x`'s cache lines (at most 16) ahead of their use. A renamed graph's rows read
/// their input features (`X_0`, in vertex order) scattered over the whole matrix, one row per
/// output row, and each such read missed the caches at the row's end; asked for [`AHEAD`]
/// rows earlier it arrives while the edges are summed. Changes no value.
#[inline]
fn prefetch(x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks(16).take(16) {
        // SAFETY: a prefetch is only a hint; the address is inside `x`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// How many edges ahead the AVX-512 path asks for a feature row's cache lines (all four of a
/// 64-column pass, into L1), counting on through the next rows' lists of the same work item.
/// Intel Xeon VM (family 6 model 167, 2 MiB L2), scale 20, d = 64, renamed order, median step:
/// 0.274–0.281 s without; 16 / 24 / 32 / 48 ahead within the row only 0.245–0.254 / 0.235–0.247 /
/// 0.234–0.247 / 0.244–0.252 s; across row ends 24 / 32 / 48: 0.228–0.234 / **0.221–0.230** /
/// 0.227–0.238 s (benches/RESULTS.md, 2026-12-07 afternoon). The feature rows are random reads
/// that the out-of-order window alone reaches only about a row ahead. Changes no value.
const EDGES_AHEAD: usize = 32;

/// Everything one output row needs. Invariant (checked by [`LocalGraph`]'s constructors and the
/// asserts in `step`): every id in `list` and `this` is below `w.len()`, `x.len() == w.len() * d`
/// and `x0.len() == d` (the last checked again by [`Simd::row`], with the output's length).
struct Row<'a> {
    list: &'a [u32],
    /// `list` followed by the lists of the rows after it in the same work item: the AVX-512
    /// path asks for the feature row [`EDGES_AHEAD`] edges on, across row ends.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    ahead: &'a [u32],
    this: u32,
    w: &'a [f32],
    x: &'a [f32],
    d: usize,
    scale: f32,
    alpha: f32,
    x0: &'a [f32],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// Computes one row into `out`; returns its L∞ change.
    #[inline]
    fn row(self, r: &Row<'_>, out: &mut [f32]) -> f32 {
        // The SIMD paths read `x0` and write `out` by raw pointer, `d` values each.
        assert!(out.len() == r.d && r.x0.len() == r.d, "APPNP row: output or x0 is not {} wide", r.d);
        match self {
            // SAFETY: the CPU supports AVX-512F (detected above); `Row`'s invariant holds.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { x86::row_avx512(r, out) },
            // SAFETY: the CPU supports AVX2 and FMA (detected above); `Row`'s invariant holds.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { x86::row_avx2(r, out) },
            Simd::Portable => row_portable(r, out),
        }
    }
}

/// The reference implementation of the row arithmetic (module docs), column by column.
fn row_portable(r: &Row<'_>, out: &mut [f32]) -> f32 {
    let d = r.d;
    let mut res = 0f32;
    let old = &r.x[r.this as usize * d..][..d];
    for j in 0..d {
        let mut acc = 0f32;
        for &u in r.list.iter().chain(std::iter::once(&r.this)) {
            acc = r.w[u as usize].mul_add(r.x[u as usize * d + j], acc);
        }
        let new = r.scale.mul_add(acc, r.alpha * r.x0[j]);
        out[j] = new;
        res = res.max((new - old[j]).abs());
    }
    res
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Row;

    /// AVX-512: 64 columns per pass in four `zmm` accumulators; partial blocks use masked loads
    /// (masked-off lanes are never read, so the tail of `x` is never overrun).
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and `r` must satisfy `Row`'s invariant.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_avx512(r: &Row<'_>, out: &mut [f32]) -> f32 {
        let d = r.d;
        let xp = r.x.as_ptr();
        let mut res = _mm512_setzero_ps();
        let mut c0 = 0;
        while c0 < d {
            let width = (d - c0).min(64);
            let m = |k: usize| -> __mmask16 {
                let bits = width.saturating_sub(16 * k).min(16);
                ((1u32 << bits) - 1) as __mmask16
            };
            let (m0, m1, m2, m3) = (m(0), m(1), m(2), m(3));
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
            let mut edge = |u: u32| {
                // SAFETY: `u < w.len()` and row `u` of `x` spans `d` values (Row's invariant);
                // masked lanes beyond column `d` are not accessed.
                unsafe {
                    let wu = _mm512_set1_ps(*r.w.get_unchecked(u as usize));
                    let p = xp.add(u as usize * d + c0);
                    a0 = _mm512_fmadd_ps(wu, _mm512_maskz_loadu_ps(m0, p), a0);
                    a1 = _mm512_fmadd_ps(wu, _mm512_maskz_loadu_ps(m1, p.add(16)), a1);
                    a2 = _mm512_fmadd_ps(wu, _mm512_maskz_loadu_ps(m2, p.add(32)), a2);
                    a3 = _mm512_fmadd_ps(wu, _mm512_maskz_loadu_ps(m3, p.add(48)), a3);
                }
            };
            for (i, &u) in r.list.iter().enumerate() {
                if let Some(&next) = r.ahead.get(i + super::EDGES_AHEAD) {
                    let q = xp.wrapping_add(next as usize * d + c0);
                    for k in 0..4 {
                        if 16 * k < width {
                            // A prefetch is only a hint and never faults.
                            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(16 * k).cast());
                        }
                    }
                }
                edge(u);
            }
            edge(r.this);
            let scale = _mm512_set1_ps(r.scale);
            let alpha = _mm512_set1_ps(r.alpha);
            let old = xp.wrapping_add(r.this as usize * d + c0);
            for (k, (acc, mk)) in [(a0, m0), (a1, m1), (a2, m2), (a3, m3)].into_iter().enumerate() {
                // SAFETY: lanes enabled by `mk` lie within columns `c0..c0 + width` of rows that
                // exist in `x0`, `out` and `x`; disabled lanes are neither read nor written.
                unsafe {
                    let x0 = _mm512_maskz_loadu_ps(mk, r.x0.as_ptr().add(c0 + 16 * k));
                    let new = _mm512_fmadd_ps(scale, acc, _mm512_mul_ps(alpha, x0));
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(c0 + 16 * k), mk, new);
                    let diff = _mm512_maskz_sub_ps(mk, new, _mm512_maskz_loadu_ps(mk, old.add(16 * k)));
                    res = _mm512_max_ps(res, _mm512_abs_ps(diff));
                }
            }
            c0 += 64;
        }
        _mm512_reduce_max_ps(res)
    }

    /// AVX2 + FMA: whole blocks of 64 columns in eight `ymm` accumulators (one pass over the
    /// row per block: each edge asks for its feature row's four cache lines at once), then what
    /// is left in passes of 32 columns in four accumulators with masked loads.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and `r` must satisfy `Row`'s invariant.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_avx2(r: &Row<'_>, out: &mut [f32]) -> f32 {
        let d = r.d;
        let xp = r.x.as_ptr();
        let mut res = _mm256_setzero_ps();
        let sign = _mm256_set1_ps(-0.0);
        let mut c0 = 0;
        while d - c0 >= 64 {
            let mut a = [_mm256_setzero_ps(); 8];
            let mut edge = |u: u32| {
                // SAFETY: `u` is below `w.len()` and row `u` of `x` holds `d ≥ c0 + 64` values
                // (`Row`'s invariant), so the eight loads stay inside it.
                unsafe {
                    let wu = _mm256_set1_ps(*r.w.get_unchecked(u as usize));
                    let p = xp.add(u as usize * d + c0);
                    for (k, acc) in a.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(wu, _mm256_loadu_ps(p.add(8 * k)), *acc);
                    }
                }
            };
            for &u in r.list {
                edge(u);
            }
            edge(r.this);
            let (scale, alpha) = (_mm256_set1_ps(r.scale), _mm256_set1_ps(r.alpha));
            for (k, acc) in a.into_iter().enumerate() {
                let at = c0 + 8 * k;
                // SAFETY: `x0` and `out` hold `d` values (`Row`'s invariant, asserted in
                // `Simd::row`) and so does row `this` of `x`, and `at + 8 ≤ d`.
                unsafe {
                    let new = _mm256_fmadd_ps(scale, acc, _mm256_mul_ps(alpha, _mm256_loadu_ps(r.x0.as_ptr().add(at))));
                    _mm256_storeu_ps(out.as_mut_ptr().add(at), new);
                    let old = _mm256_loadu_ps(xp.add(r.this as usize * d + at));
                    res = _mm256_max_ps(res, _mm256_andnot_ps(sign, _mm256_sub_ps(new, old)));
                }
            }
            c0 += 64;
        }
        while c0 < d {
            let width = (d - c0).min(32);
            let m = |k: usize| -> __m256i {
                let bits = width.saturating_sub(8 * k).min(8) as i32;
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_cmpgt_epi32(_mm256_set1_epi32(bits), lanes)
            };
            let (m0, m1, m2, m3) = (m(0), m(1), m(2), m(3));
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let mut edge = |u: u32| {
                // SAFETY: as in `row_avx512`; masked-off lanes are not accessed by `maskload`.
                unsafe {
                    let wu = _mm256_set1_ps(*r.w.get_unchecked(u as usize));
                    let p = xp.add(u as usize * d + c0);
                    a0 = _mm256_fmadd_ps(wu, _mm256_maskload_ps(p, m0), a0);
                    a1 = _mm256_fmadd_ps(wu, _mm256_maskload_ps(p.add(8), m1), a1);
                    a2 = _mm256_fmadd_ps(wu, _mm256_maskload_ps(p.add(16), m2), a2);
                    a3 = _mm256_fmadd_ps(wu, _mm256_maskload_ps(p.add(24), m3), a3);
                }
            };
            for &u in r.list {
                edge(u);
            }
            edge(r.this);
            let scale = _mm256_set1_ps(r.scale);
            let alpha = _mm256_set1_ps(r.alpha);
            let old = xp.wrapping_add(r.this as usize * d + c0);
            for (k, (acc, mk)) in [(a0, m0), (a1, m1), (a2, m2), (a3, m3)].into_iter().enumerate() {
                // SAFETY: as in `row_avx512`.
                unsafe {
                    let x0 = _mm256_maskload_ps(r.x0.as_ptr().add(c0 + 8 * k), mk);
                    let new = _mm256_fmadd_ps(scale, acc, _mm256_mul_ps(alpha, x0));
                    _mm256_maskstore_ps(out.as_mut_ptr().add(c0 + 8 * k), mk, new);
                    let diff = _mm256_sub_ps(new, _mm256_maskload_ps(old.add(8 * k), mk));
                    let diff = _mm256_and_ps(_mm256_castsi256_ps(mk), _mm256_andnot_ps(sign, diff));
                    res = _mm256_max_ps(res, diff);
                }
            }
            c0 += 32;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), res) };
        lanes.into_iter().fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate;
    use crate::partition::LocalGraph;

    /// Every SIMD path computes the portable path's bits, for widths that exercise partial blocks.
    #[test]
    fn simd_paths_agree_with_portable() {
        let g = generate::kronecker(7, 8, 5).unwrap();
        let lg = LocalGraph::whole(&g);
        for d in [1, 3, 16, 17, 40, 64, 100, 130] {
            let feats = generate::features(g.vertices(), d, 9);
            let x = generate::features(g.vertices(), d, 10);
            for norm in [Normalization::Symmetric, Normalization::RandomWalk] {
                let k = Appnp { alpha: 0.1, normalization: norm, features: &feats, dim: d, base: 0, rows: None };
                let wts = k.prepare(&lg);
                let mut paths = vec![Simd::Portable];
                #[cfg(target_arch = "x86_64")]
                {
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        paths.push(Simd::Avx512);
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        paths.push(Simd::Avx2);
                    }
                }
                for v in 0..g.vertices() {
                    let row = Row {
                        list: lg.row(v),
                        ahead: lg.row(v),
                        this: v as u32,
                        w: &wts.w,
                        x: &x,
                        d,
                        scale: wts.scale[v],
                        alpha: 0.1,
                        x0: &feats[v * d..(v + 1) * d],
                    };
                    let mut want = vec![0f32; d];
                    let want_res = Simd::Portable.row(&row, &mut want);
                    for &p in &paths[1..] {
                        let mut got = vec![0f32; d];
                        let res = p.row(&row, &mut got);
                        assert_eq!(
                            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            "{p:?} d={d} v={v}"
                        );
                        assert_eq!(res.to_bits(), want_res.to_bits());
                    }
                }
            }
        }
    }
}

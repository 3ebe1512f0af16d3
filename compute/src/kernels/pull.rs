//! The pull sum shared by PageRank, personalized PageRank and the heat kernel.
//!
//! The random-walk operator `P` moves a vertex's value evenly along its out-edges; in pull form,
//! `(P y)[v] = Σ_{u ∈ in(v)} y[u] / outdeg(u)`. Each step first computes the *contribution*
//! `c[u] = y[u] / outdeg(u)` (an `f32` division) of every local vertex that has out-edges, then
//! sums `c` over each row.
//!
//! **Row sum, exactly:** four `f64` accumulators; the row's `i`-th in-neighbour (CSR order) is
//! added to accumulator `i mod 4` after widening `c[u]` to `f64`; the result is
//! `(a0 + a1) + (a2 + a3)`. The order is a function of the row alone (the determinism
//! contract), whatever layout or instruction set computes it.
//!
//! **Layout ([`PullPlan`]).** The sum is bound by its random reads of `c`, so a partition's rows
//! are laid out once, when the kernel is prepared, for locality and for SIMD across rows:
//!
//! - *Columns* are renumbered by out-degree, descending: the contributions that most rows read sit
//!   together at the head of a compact array (vertices without out-edges are never read and get no
//!   slot). On Kronecker graphs this keeps the hot head in L2 where the given order scatters it.
//! - *Rows* are cut into slices of eight ("SELL-8"): within windows of [`WINDOW`] consecutive rows,
//!   rows are sorted by length and taken eight at a time; rows longer than [`LONG`] are sliced
//!   together across the partition, so the eight rows of a slice have similar lengths. A slice
//!   stores its rows' renumbered sources column-major (the `j`-th source of its eight rows are
//!   adjacent), so one 8-wide gather serves eight rows, and the eight rows' `i mod 4` accumulators
//!   are four 8-lane vectors. Lanes past a row's end are masked, never added.
//!
//! With AVX-512 a step is one hardware gather; with AVX2 only, eight scalar loads filling one
//! vector (on the Zen 3 cores measured, `vgatherdps` was slower than the loads it replaces).
//! Small partitions (fewer than [`SLICED_EDGES`] in-edges, the serving path's requests) and CPUs
//! without AVX2 skip the layout and sum rows straight from the CSR, with the same arithmetic.
//!
//! Rows without in-edges are in no slice; their sum is 0. Renumbering changes which memory holds
//! a value, never which values a row adds or in which order, so the result is bit-identical to a
//! plain loop over the CSR (a test compares them on every instruction set this CPU has).

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use rayon::prelude::*;

use super::superstep::{ExactSum, Partials};
use crate::buf::AlignedFloats;
use crate::partition::LocalGraph;

/// Consecutive rows sorted together by length: small enough that a window's sums land in a few
/// cache lines, large enough that its slices are nearly full and similar in length.
pub(crate) const WINDOW: usize = 512;

/// Rows longer than this are sliced across the whole partition (a window holds too few of them to
/// make slices of similar length).
const LONG: u32 = 64;

/// Lanes of a slice: eight `f64` accumulators fill a 512-bit vector.
const LANES: usize = 8;

/// Zero bytes after the last slice: a step's indices are read as 16 bytes at offsets 0 and 12,
/// which for 3-byte columns reaches 4 bytes past its 24; 32-byte loads of 4-byte columns fit.
const COLS_TAIL: usize = 8;

/// Slices of long rows with at least this many edges (in total) make one parallel work item.
const ITEM_EDGES: u64 = 1 << 15;

/// Partitions with fewer in-edges than this are summed straight from the CSR: the layout pays
/// for itself once the contributions outgrow the caches (scale-14 Kronecker steps were already
/// faster with it), while the serving path's small requests, a few steps over a graph that fits
/// in L2, would mostly pay for building it.
const SLICED_EDGES: usize = 1 << 16;

/// A partition's in-edges laid out for the pull sum (module docs).
#[derive(Debug, Default)]
pub struct PullPlan {
    /// Whether rows are sliced; if not, every other field is empty and rows are summed from the
    /// CSR.
    sliced: bool,
    /// The code that sums slices, chosen when the plan is built.
    simd: Simd,
    /// Compact column → local vertex, by out-degree descending, ties by id.
    columns: Vec<u32>,
    /// Compact column → its vertex's out-degree as `f32`.
    column_degree: Vec<f32>,
    /// Bytes per stored column: 3 while the columns fit in 24 bits, else 4.
    width: usize,
    /// Per slice: where its sources start in `cols`, in entries (`width` bytes each).
    slice_start: Vec<u64>,
    /// Per slice: its longest row's length (lane 0, rows are sorted).
    slice_len: Vec<u32>,
    /// Per slice and lane: the owned row (`u32::MAX` for an empty lane).
    lane_row: Vec<u32>,
    /// Per slice and lane: the row's length (0 for an empty lane).
    lane_len: Vec<u32>,
    /// The slices' sources as compact columns, little-endian in `width` bytes, column-major per
    /// slice, padding 0; [`COLS_TAIL`] more zero bytes at the end.
    cols: Vec<u8>,
    /// Window `w`'s slices are `window_slices[w]..window_slices[w + 1]`.
    window_slices: Vec<u32>,
    /// Ranges of the long rows' slices (after every window's) making parallel work items.
    long_items: Vec<Range<u32>>,
    /// Per lane of the long rows' slices: the row's rank among the long rows in row order
    /// (`u32::MAX` for an empty lane), where its sum is kept between the two passes.
    long_rank: Vec<u32>,
    /// Long rows before window `w`: `window_long[w]` (one more entry than windows).
    window_long: Vec<u32>,
    /// The long rows in row order (indexed by rank).
    long_rows: Vec<u32>,
}

/// Reusable memory of the pull sum.
#[derive(Debug, Default)]
pub struct PullScratch {
    /// Contributions by compact column (by local vertex when rows are summed from the CSR). The
    /// step's gathers read it at random: from 2 MiB up it sits in transparent huge pages, so they
    /// do not miss the TLB.
    contrib: AlignedFloats,
    /// `f64` bits per long row, in row order.
    long_sums: Vec<AtomicU64>,
}

impl PullScratch {
    /// The contributions array, `len` long (its old values, when it had that length).
    fn contributions(&mut self, len: usize) -> &mut [f32] {
        if self.contrib.len() != len {
            self.contrib = AlignedFloats::zeroed(len);
        }
        &mut self.contrib
    }
}

impl PullPlan {
    /// Bytes the plan holds.
    pub(crate) fn bytes(&self) -> usize {
        fn b<T>(v: &[T]) -> usize {
            std::mem::size_of_val(v)
        }
        b(&self.columns)
            + b(&self.column_degree)
            + b(&self.slice_start)
            + b(&self.slice_len)
            + b(&self.lane_row)
            + b(&self.lane_len)
            + b(&self.cols)
            + b(&self.window_slices)
            + b(&self.long_items)
            + b(&self.long_rank)
            + b(&self.window_long)
            + b(&self.long_rows)
    }

    /// Lays out `g`'s owned rows (module docs).
    ///
    /// Rows are sliced when the partition has at least [`SLICED_EDGES`] in-edges and the CPU has
    /// a vector slice code (AVX-512 or AVX2); otherwise (the portable slice code is the layout's
    /// reference, not a fast path) they are summed from the CSR. Either way the bits are the same.
    pub(crate) fn new(g: &LocalGraph) -> Self {
        let simd = Simd::detect();
        // The AVX-512 gathers take `i32` indices: every compact column is below `locals`.
        if g.edges() >= SLICED_EDGES && simd != Simd::Portable && g.locals() <= i32::MAX as usize {
            return Self::sliced(g, None, simd);
        }
        PullPlan::default()
    }

    /// The sliced layout with `width`-byte columns (`None`: the narrowest that fits) summed by
    /// `simd`, which must be available (tests force either on small graphs).
    fn sliced(g: &LocalGraph, width: Option<usize>, simd: Simd) -> Self {
        let columns = by_out_degree(g.out_degree(), false);
        let column_degree = columns.par_iter().map(|&u| g.out_degree()[u as usize] as f32).collect();
        let compact: Vec<AtomicU32> = (0..g.locals()).into_par_iter().map(|_| AtomicU32::new(u32::MAX)).collect();
        columns.par_iter().enumerate().for_each(|(i, &u)| compact[u as usize].store(i as u32, Relaxed));
        let compact: Vec<u32> = compact.into_par_iter().map(AtomicU32::into_inner).collect();
        let offsets = g.offsets();
        let len = |r: usize| (offsets[r + 1] - offsets[r]) as u32;
        // Groups of rows, each sliced on its own: one per window, then the long rows.
        let windows: Vec<Vec<u32>> = (0..g.owned().div_ceil(WINDOW))
            .into_par_iter()
            .map(|w| {
                // A counting sort: lengths are at most LONG.
                let rows = w * WINDOW..((w + 1) * WINDOW).min(g.owned());
                let mut at = [0u32; LONG as usize + 2];
                rows.clone().map(len).filter(|l| (1..=LONG).contains(l)).for_each(|l| at[(LONG - l) as usize + 1] += 1);
                for i in 1..at.len() {
                    at[i] += at[i - 1];
                }
                let mut sorted = vec![0u32; at[LONG as usize + 1] as usize];
                for r in rows {
                    let l = len(r);
                    if (1..=LONG).contains(&l) {
                        sorted[at[(LONG - l) as usize] as usize] = r as u32;
                        at[(LONG - l) as usize] += 1;
                    }
                }
                sorted
            })
            .collect();
        let by_row: Vec<u32> = (0..g.owned() as u32).into_par_iter().filter(|&r| len(r as usize) > LONG).collect();
        let mut long = by_row.clone();
        long.sort_unstable_by_key(|&r| (std::cmp::Reverse(len(r as usize)), r));

        let mut plan = PullPlan { sliced: true, simd, columns, column_degree, ..PullPlan::default() };
        let mut total = 0u64;
        let mut add_slice = |plan: &mut PullPlan, rows: &[u32]| {
            let longest = len(rows[0] as usize);
            plan.slice_start.push(total);
            plan.slice_len.push(longest);
            total += (LANES as u64) * longest as u64;
            for lane in 0..LANES {
                plan.lane_row.push(rows.get(lane).copied().unwrap_or(u32::MAX));
                plan.lane_len.push(rows.get(lane).map_or(0, |&r| len(r as usize)));
            }
        };
        plan.window_slices.push(0);
        for rows in &windows {
            rows.chunks(LANES).for_each(|rows| add_slice(&mut plan, rows));
            plan.window_slices.push(plan.slice_len.len() as u32);
        }
        let (mut first, mut edges) = (plan.slice_len.len() as u32, 0u64);
        for rows in long.chunks(LANES) {
            add_slice(&mut plan, rows);
            plan.long_rank.extend(
                (0..LANES)
                    .map(|k| rows.get(k).map_or(u32::MAX, |r| by_row.binary_search(r).expect("a long row") as u32)),
            );
            edges += rows.iter().map(|&r| len(r as usize) as u64).sum::<u64>();
            if edges >= ITEM_EDGES {
                let end = plan.slice_len.len() as u32;
                plan.long_items.push(first..end);
                (first, edges) = (end, 0);
            }
        }
        if (first as usize) < plan.slice_len.len() {
            plan.long_items.push(first..plan.slice_len.len() as u32);
        }

        plan.window_long.push(0);
        let mut at = 0;
        for w in 0..windows.len() {
            at += by_row[at..].iter().take_while(|&&r| (r as usize) < (w + 1) * WINDOW).count();
            plan.window_long.push(at as u32);
        }
        plan.long_rows = by_row;

        // Fill the work items' disjoint ranges of `cols` in parallel.
        let width = width.unwrap_or(if plan.columns.len() <= 1 << 24 { 3 } else { 4 });
        plan.width = width;
        let mut cols = vec![0u8; total as usize * width + COLS_TAIL];
        super::superstep::advise_huge(&cols);
        let items: Vec<Range<u32>> =
            plan.window_slices.windows(2).map(|w| w[0]..w[1]).chain(plan.long_items.iter().cloned()).collect();
        let mut parts = Vec::with_capacity(items.len());
        let mut rest = &mut cols[..total as usize * width];
        for it in &items {
            let end = plan.slice_start.get(it.end as usize).copied().unwrap_or(total);
            let entries = end - plan.slice_start.get(it.start as usize).map_or(end, |&s| s);
            let (part, tail) = rest.split_at_mut(entries as usize * width);
            parts.push(part);
            rest = tail;
        }
        let sources = g.sources();
        let (starts, lane_row) = (&plan.slice_start, &plan.lane_row);
        parts.into_par_iter().zip(items.par_iter()).for_each(|(part, it)| {
            let Some(&base) = starts.get(it.start as usize) else { return };
            for s in it.start as usize..it.end as usize {
                let out = &mut part[(starts[s] - base) as usize * width..];
                let rows: [&[u32]; LANES] = std::array::from_fn(|lane| match lane_row[s * LANES + lane] {
                    u32::MAX => &[][..],
                    r => &sources[offsets[r as usize] as usize..offsets[r as usize + 1] as usize],
                });
                match width {
                    3 => fill_slice::<3>(out, &rows, &compact),
                    _ => fill_slice::<4>(out, &rows, &compact),
                }
            }
        });
        plan.cols = cols;
        plan
    }

    /// One pull: the sum over each owned row of `y[u] / outdeg(u)` (module docs), handed to `f`
    /// a window of [`WINDOW`] rows at a time, in parallel, together with the caller's data for
    /// that window: `windows` yields one item per window, in order (for instance
    /// `next.par_chunks_mut(WINDOW)`). `f(first_row, sums, item)` returns the window's partials;
    /// their combination is returned.
    pub(crate) fn pull<T, F>(
        &self,
        g: &LocalGraph,
        y: &[f32],
        scratch: &mut PullScratch,
        windows: impl IndexedParallelIterator<Item = T>,
        f: F,
    ) -> Partials
    where
        F: Fn(usize, &[f64], T) -> Partials + Sync + Send,
    {
        assert_eq!(y.len(), g.locals(), "local vector does not match the partition");
        assert_eq!(windows.len(), g.owned().div_ceil(WINDOW), "one item per window of rows");
        if !self.sliced {
            return pull_direct(g, y, scratch, windows, f);
        }
        scratch.contributions(self.columns.len()).par_chunks_mut(1 << 14).enumerate().for_each(|(k, c)| {
            let at = k << 14;
            let (cols, deg) = (&self.columns[at..at + c.len()], &self.column_degree[at..at + c.len()]);
            for ((c, &u), &d) in c.iter_mut().zip(cols).zip(deg) {
                *c = y[u as usize] / d;
            }
        });
        let longs = *self.window_long.last().expect("at least one entry") as usize;
        if scratch.long_sums.len() != longs {
            scratch.long_sums = (0..longs).map(|_| AtomicU64::new(0)).collect();
        }
        let (c, long_sums) = (&scratch.contrib[..], &scratch.long_sums[..]);
        let first_long = *self.window_slices.last().expect("at least one entry") as usize;
        self.long_items.par_iter().for_each(|it| {
            for s in it.start as usize..it.end as usize {
                let ranks = &self.long_rank[(s - first_long) * LANES..][..LANES];
                self.each_lane(s, c, ranks, |rank, sum| long_sums[rank as usize].store(sum.to_bits(), Relaxed));
            }
        });
        windows
            .enumerate()
            .map_init(Vec::new, |buf: &mut Vec<f64>, (w, item)| {
                let rows = w * WINDOW..((w + 1) * WINDOW).min(g.owned());
                buf.clear();
                buf.resize(rows.len(), 0.0);
                for s in self.window_slices[w] as usize..self.window_slices[w + 1] as usize {
                    let lane_rows = &self.lane_row[s * LANES..][..LANES];
                    self.each_lane(s, c, lane_rows, |r, sum| buf[r as usize - rows.start] = sum);
                }
                for rank in self.window_long[w] as usize..self.window_long[w + 1] as usize {
                    buf[self.long_rows[rank] as usize - rows.start] = f64::from_bits(long_sums[rank].load(Relaxed));
                }
                f(rows.start, buf, item)
            })
            .reduce(Partials::default, Partials::combine)
    }

    /// Hands the sum of each non-empty lane of slice `s` to `put`, with that lane's entry of
    /// `keys` (its row, or its rank among the long rows; `u32::MAX` marks an empty lane).
    #[inline]
    fn each_lane(&self, s: usize, c: &[f32], keys: &[u32], mut put: impl FnMut(u32, f64)) {
        for (&key, sum) in keys.iter().zip(self.slice(s, c)) {
            if key != u32::MAX {
                put(key, sum);
            }
        }
    }

    /// The eight row sums of slice `s`.
    #[inline]
    fn slice(&self, s: usize, c: &[f32]) -> [f64; LANES] {
        let start = self.slice_start[s] as usize * self.width;
        let lens: &[u32; LANES] = self.lane_len[s * LANES..][..LANES].try_into().expect("eight lanes");
        // The slice's entries and the bytes after them that its last step's loads may read.
        let cols = &self.cols[start..start + LANES * self.width * self.slice_len[s] as usize + COLS_TAIL];
        match (self.simd, self.width) {
            // SAFETY: the slice code's CPU features are available (`sliced`'s contract); `cols`
            // holds the slice's steps plus COLS_TAIL bytes; every entry is a compact column, below
            // `columns.len() = c.len()` ≤ `locals` ≤ `i32::MAX` (`new` checks it).
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx512, 3) => unsafe { x86::slice_avx512::<3>(cols, lens, c) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx512, _) => unsafe { x86::slice_avx512::<4>(cols, lens, c) },
            // SAFETY: as above, with AVX2.
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx2, 3) => unsafe { x86::slice_avx2::<3>(cols, lens, c) },
            // SAFETY: as above, with AVX2.
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx2, _) => unsafe { x86::slice_avx2::<4>(cols, lens, c) },
            (Simd::Portable, 3) => slice_portable::<3>(cols, lens, c),
            (Simd::Portable, _) => slice_portable::<4>(cols, lens, c),
        }
    }
}

/// [`PullPlan::pull`] straight from the CSR: contributions by local vertex, rows one by one.
fn pull_direct<T, F>(
    g: &LocalGraph,
    y: &[f32],
    scratch: &mut PullScratch,
    windows: impl IndexedParallelIterator<Item = T>,
    f: F,
) -> Partials
where
    F: Fn(usize, &[f64], T) -> Partials + Sync + Send,
{
    let deg = g.out_degree();
    for ((c, &y), &d) in scratch.contributions(y.len()).iter_mut().zip(y).zip(deg) {
        *c = if d == 0 { 0.0 } else { y / d as f32 };
    }
    let c = &scratch.contrib[..];
    windows
        .enumerate()
        .map_init(Vec::new, |buf: &mut Vec<f64>, (w, item)| {
            let rows = w * WINDOW..((w + 1) * WINDOW).min(g.owned());
            buf.clear();
            let (offsets, sources) = (g.offsets(), g.sources());
            buf.extend(rows.clone().map(|r| row_sum(&sources[offsets[r] as usize..offsets[r + 1] as usize], c)));
            f(rows.start, buf, item)
        })
        .reduce(Partials::default, Partials::combine)
}

/// `Σ c[u]` over one row, in the order of the module docs. Four named accumulators, quads then
/// the remainder: indexing an accumulator array by `i mod 4` kept it in memory, one
/// store-to-load dependency per edge (twice as slow on small graphs).
#[inline]
fn row_sum(row: &[u32], c: &[f32]) -> f64 {
    let (mut a0, mut a1, mut a2, mut a3) = (0f64, 0f64, 0f64, 0f64);
    let mut quads = row.chunks_exact(4);
    for q in &mut quads {
        a0 += c[q[0] as usize] as f64;
        a1 += c[q[1] as usize] as f64;
        a2 += c[q[2] as usize] as f64;
        a3 += c[q[3] as usize] as f64;
    }
    let rest = quads.remainder();
    if let Some(&u) = rest.first() {
        a0 += c[u as usize] as f64;
    }
    if let Some(&u) = rest.get(1) {
        a1 += c[u as usize] as f64;
    }
    if let Some(&u) = rest.get(2) {
        a2 += c[u as usize] as f64;
    }
    (a0 + a1) + (a2 + a3)
}

/// Writes one slice's columns, step-major (the slice is written front to back once), as
/// `W`-byte little-endian entries; `rows` are its lanes' source lists, the longest first.
fn fill_slice<const W: usize>(out: &mut [u8], rows: &[&[u32]; LANES], compact: &[u32]) {
    for (j, step) in out[..LANES * W * rows[0].len()].chunks_exact_mut(LANES * W).enumerate() {
        for (slot, row) in step.chunks_exact_mut(W).zip(rows) {
            if let Some(&u) = row.get(j) {
                let bytes: [u8; 4] = compact[u as usize].to_le_bytes();
                slot.copy_from_slice(&bytes[..W]);
            }
        }
    }
}

/// The [`ExactSum`] of the `values` of rows whose out-degree is 0 (at most a window of rows).
///
/// Dangling rows sit at random positions, so the values are first gathered without a branch:
/// testing each row cost a mispredicted branch for a large share of the rows.
pub(crate) fn dangling_sum(values: &[f32], outdeg: &[u32]) -> ExactSum {
    assert!(values.len() <= WINDOW && outdeg.len() == values.len(), "a window of rows");
    let mut picked = [0f32; WINDOW];
    let mut n = 0;
    for (&v, &d) in values.iter().zip(outdeg) {
        picked[n] = v;
        n += usize::from(d == 0);
    }
    // Runs of equal values (isolated vertices all hold the teleport value) are converted once
    // and multiplied: k copies of an exact integer sum to k times it, bit for bit.
    let (mut total, mut rest) = (ExactSum::default(), &picked[..n]);
    while let Some(&v) = rest.first() {
        let run = rest.iter().take_while(|x| x.to_bits() == v.to_bits()).count();
        total = total + ExactSum(ExactSum::of(v).0.wrapping_mul(run as i128));
        rest = &rest[run..];
    }
    total
}

/// `max_i |new[i] − old[i]|` (0 for no rows), in eight independent lanes: `max` ignores NaN
/// and is otherwise associative, so the result equals the sequential maximum.
pub(crate) fn max_change(new: &[f32], old: &[f32]) -> f32 {
    assert_eq!(new.len(), old.len(), "rows of one window");
    let mut lanes = [0f32; 8];
    let (a, b) = (new.chunks_exact(8), old.chunks_exact(8));
    let (ra, rb) = (a.remainder(), b.remainder());
    for (a, b) in a.zip(b) {
        for k in 0..8 {
            lanes[k] = lanes[k].max((a[k] - b[k]).abs());
        }
    }
    for (a, b) in ra.iter().zip(rb) {
        lanes[0] = lanes[0].max((a - b).abs());
    }
    lanes.iter().fold(0f32, |m, &l| m.max(l))
}

/// Vertices by out-degree descending, ties by id (a stable counting sort); those without
/// out-edges come last, and only when `with_sinks`.
pub(crate) fn by_out_degree(deg: &[u32], with_sinks: bool) -> Vec<u32> {
    let keep = |d: u32| with_sinks || d > 0;
    let max = deg.iter().copied().max().unwrap_or(0) as usize;
    // Degree `d` is bucket `max − d`; `start[k]` becomes where bucket `k` begins.
    let mut start = vec![0u32; max + 2];
    for &d in deg.iter().filter(|&&d| keep(d)) {
        start[max - d as usize + 1] += 1;
    }
    for i in 1..start.len() {
        start[i] += start[i - 1];
    }
    let mut out = vec![0u32; start[max + 1] as usize];
    for (u, &d) in deg.iter().enumerate().filter(|(_, d)| keep(**d)) {
        let at = &mut start[max - d as usize];
        out[*at as usize] = u as u32;
        *at += 1;
    }
    out
}

/// Which code computes slices; all give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[default]
    Portable,
}

impl Simd {
    /// Every slice code this CPU runs, fastest first (the portable code always).
    fn available() -> Vec<Self> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512vl") && has!("avx2") {
                all.push(Simd::Avx512);
            }
            if has!("avx2") {
                all.push(Simd::Avx2);
            }
        }
        all.push(Simd::Portable);
        all
    }

    /// The fastest slice code this CPU runs.
    fn detect() -> Self {
        Self::available()[0]
    }
}

/// The reference arithmetic (module docs), lane by lane, for `W`-byte columns.
fn slice_portable<const W: usize>(cols: &[u8], lens: &[u32; LANES], c: &[f32]) -> [f64; LANES] {
    std::array::from_fn(|lane| {
        let mut a = [0f64; 4];
        for j in 0..lens[lane] as usize {
            let mut bytes = [0u8; 4];
            bytes[..W].copy_from_slice(&cols[(j * LANES + lane) * W..][..W]);
            a[j % 4] += c[u32::from_le_bytes(bytes) as usize] as f64;
        }
        (a[0] + a[1]) + (a[2] + a[3])
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// The eight column indices of one step, widened to `u32` lanes.
    ///
    /// # Safety
    /// AVX2 must be available; `p` must be readable for 32 bytes (4-byte columns) or 28 bytes
    /// (3-byte columns: 16 at `p` and 16 at `p + 12`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn indices<const W: usize>(p: *const u8) -> __m256i {
        if W == 4 {
            // SAFETY: 32 readable bytes (the caller's contract).
            unsafe { _mm256_loadu_si256(p.cast()) }
        } else {
            // Columns 0–3 are bytes 0..12 of the low half, columns 4–7 bytes 12..24, loaded as
            // the high half from `p + 12`; each 3-byte column gets a zero high byte.
            const Z: i8 = -128;
            let spread = _mm256_setr_epi8(
                0, 1, 2, Z, 3, 4, 5, Z, 6, 7, 8, Z, 9, 10, 11, Z, 0, 1, 2, Z, 3, 4, 5, Z, 6, 7, 8, Z, 9, 10, 11, Z,
            );
            // SAFETY: 28 readable bytes (the caller's contract).
            let v = unsafe { _mm256_loadu2_m128i(p.add(12).cast(), p.cast()) };
            _mm256_shuffle_epi8(v, spread)
        }
    }

    /// AVX-512: per step one 8-wide gather of `c` widened to `f64` and added to accumulator
    /// `j mod 4`; steps where some lane's row has ended use a mask (those lanes neither load
    /// nor add).
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512VL; `lens` must be sorted descending with
    /// `cols.len() = 8 · W · lens[0] + COLS_TAIL`, and every `W`-byte entry of a lane below its
    /// length must be below `c.len()`, which must fit in `i32`.
    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    pub(super) unsafe fn slice_avx512<const W: usize>(cols: &[u8], lens: &[u32; LANES], c: &[f32]) -> [f64; LANES] {
        debug_assert_eq!(cols.len(), LANES * W * lens[0] as usize + super::COLS_TAIL);
        let base = c.as_ptr();
        // SAFETY: `lens` is eight `u32`s (an unaligned 256-bit load).
        let lens_v = unsafe { _mm256_loadu_si256(lens.as_ptr().cast()) };
        let (longest, full) = (lens[0] as usize, lens[LANES - 1] as usize & !3);
        let mut a = [_mm512_setzero_pd(); 4];
        let mut p = cols.as_ptr();
        let mut j = 0;
        while j < full {
            for acc in &mut a {
                // SAFETY: step `j < longest` starts inside `cols` and its loads end within the
                // COLS_TAIL bytes after the last step; every lane is within its row (j < the
                // shortest length), so every index is a valid position of `c`.
                let v = unsafe { _mm256_i32gather_ps::<4>(base, indices::<W>(p)) };
                *acc = _mm512_add_pd(*acc, _mm512_cvtps_pd(v));
                // SAFETY: stays within `cols`.
                p = unsafe { p.add(LANES * W) };
            }
            j += 4;
        }
        while j < longest {
            let live = _mm256_cmpgt_epu32_mask(lens_v, _mm256_set1_epi32(j as i32));
            // SAFETY: as above; lanes past their row's end are masked off and not loaded.
            let v = unsafe { _mm256_mmask_i32gather_ps::<4>(_mm256_setzero_ps(), live, indices::<W>(p), base) };
            let acc = &mut a[j % 4];
            *acc = _mm512_mask_add_pd(*acc, live, *acc, _mm512_cvtps_pd(v));
            // SAFETY: stays within `cols`.
            p = unsafe { p.add(LANES * W) };
            j += 1;
        }
        let sum = _mm512_add_pd(_mm512_add_pd(a[0], a[1]), _mm512_add_pd(a[2], a[3]));
        let mut out = [0f64; LANES];
        // SAFETY: `out` is eight `f64`s.
        unsafe { _mm512_storeu_pd(out.as_mut_ptr(), sum) };
        out
    }

    /// The eight values of `c` at one step's columns, by eight scalar loads: on the AMD cores
    /// measured (Zen 3), these beat `vgatherdps` (benches/RESULTS.md).
    ///
    /// # Safety
    /// `p` must be readable for `7 · W + 4` bytes; every `W`-byte entry must be below `c.len()`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8<const W: usize>(p: *const u8, base: *const f32) -> __m256 {
        let at = |k: usize| {
            // SAFETY: entry `k` and the bytes after it that a 4-byte read reaches are readable;
            // the entry is a valid position of `c` (the caller's contract).
            unsafe {
                let raw = p.add(k * W).cast::<u32>().read_unaligned();
                *base.add((if W == 3 { raw & 0xFF_FFFF } else { raw }) as usize)
            }
        };
        _mm256_setr_ps(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7))
    }

    /// AVX2: [`slice_avx512`]'s steps with scalar loads ([`load8`]) and each 8-lane accumulator
    /// split into two 4-lane halves; in steps where some lane's row has ended, that lane loads
    /// its padding column (0, a valid position) and a blend keeps its accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX2; `lens` must be sorted descending with
    /// `cols.len() = 8 · W · lens[0] + COLS_TAIL`, padding entries 0, and every `W`-byte entry
    /// below `c.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn slice_avx2<const W: usize>(cols: &[u8], lens: &[u32; LANES], c: &[f32]) -> [f64; LANES] {
        debug_assert_eq!(cols.len(), LANES * W * lens[0] as usize + super::COLS_TAIL);
        let base = c.as_ptr();
        // Unsigned comparison: a signed compare of values with the top bit flipped.
        let flip = _mm256_set1_epi32(i32::MIN);
        // SAFETY: `lens` is eight `u32`s (an unaligned 256-bit load).
        let lens_v = _mm256_xor_si256(unsafe { _mm256_loadu_si256(lens.as_ptr().cast()) }, flip);
        let (longest, full) = (lens[0] as usize, lens[LANES - 1] as usize & !3);
        let (mut lo, mut hi) = ([_mm256_setzero_pd(); 4], [_mm256_setzero_pd(); 4]);
        let mut p = cols.as_ptr();
        let mut j = 0;
        while j < full {
            for (lo, hi) in lo.iter_mut().zip(&mut hi) {
                // SAFETY: step `j < longest` is inside `cols`, its reads end within COLS_TAIL
                // bytes after the last step; every lane is within its row.
                let v = unsafe { load8::<W>(p, base) };
                *lo = _mm256_add_pd(*lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
                *hi = _mm256_add_pd(*hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)));
                // SAFETY: stays within `cols`.
                p = unsafe { p.add(LANES * W) };
            }
            j += 4;
        }
        while j < longest {
            let live = _mm256_cmpgt_epi32(lens_v, _mm256_xor_si256(_mm256_set1_epi32(j as i32), flip));
            // SAFETY: as above; lanes past their row's end hold the padding column 0.
            let v = unsafe { load8::<W>(p, base) };
            let live_lo = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(live)));
            let live_hi = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(live)));
            let (l, h) = (&mut lo[j % 4], &mut hi[j % 4]);
            *l = _mm256_blendv_pd(*l, _mm256_add_pd(*l, _mm256_cvtps_pd(_mm256_castps256_ps128(v))), live_lo);
            *h = _mm256_blendv_pd(*h, _mm256_add_pd(*h, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v))), live_hi);
            // SAFETY: stays within `cols`.
            p = unsafe { p.add(LANES * W) };
            j += 1;
        }
        let sum = |a: &[__m256d; 4]| _mm256_add_pd(_mm256_add_pd(a[0], a[1]), _mm256_add_pd(a[2], a[3]));
        let mut out = [0f64; LANES];
        // SAFETY: `out` is eight `f64`s: two stores of four.
        unsafe {
            _mm256_storeu_pd(out.as_mut_ptr(), sum(&lo));
            _mm256_storeu_pd(out.as_mut_ptr().add(4), sum(&hi));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate;
    use crate::partition::partition;

    /// The plain loop over CSR rows that the layout must reproduce bit for bit.
    fn reference(g: &LocalGraph, y: &[f32]) -> Vec<u64> {
        let deg = g.out_degree();
        (0..g.owned())
            .map(|r| {
                let mut a = [0f64; 4];
                for (i, &u) in g.row(r).iter().enumerate() {
                    a[i % 4] += (y[u as usize] / deg[u as usize] as f32) as f64;
                }
                ((a[0] + a[1]) + (a[2] + a[3])).to_bits()
            })
            .collect()
    }

    fn check(g: &LocalGraph) {
        let y: Vec<f32> = (0..g.locals()).map(|i| ((i * 7919) % 1000) as f32 / 997.0).collect();
        let want = reference(g, &y);
        // The direct path, then each width with each slice code.
        let mut plans = vec![PullPlan::default()];
        for width in [3, 4] {
            plans.extend(Simd::available().into_iter().map(|simd| PullPlan::sliced(g, Some(width), simd)));
        }
        for plan in &plans {
            let mut got = vec![0f64; g.owned()];
            plan.pull(g, &y, &mut PullScratch::default(), got.par_chunks_mut(WINDOW), |_, sums, out| {
                out.copy_from_slice(sums);
                Partials::default()
            });
            let got: Vec<u64> = got.iter().map(|s| s.to_bits()).collect();
            assert!(
                got == want,
                "{:?}, sliced {}, {}-byte columns: differs from the CSR loop",
                plan.simd,
                plan.sliced,
                plan.width
            );
        }
    }

    #[test]
    fn layout_sums_equal_the_csr_loop() {
        // Long and short rows, windows with fewer than eight rows, isolated rows.
        let g = generate::kronecker(12, 16, 3).unwrap();
        check(&LocalGraph::whole(&g));
        for p in partition(&g, 3).unwrap().parts {
            check(&p.graph);
        }
        check(&LocalGraph::whole(&generate::grid(5, 7, false).unwrap()));
        check(&LocalGraph::whole(&generate::erdos_renyi(100, 40, 1).unwrap()));
    }

    #[test]
    fn dangling_sum_is_the_exact_sum_of_dangling_values() {
        let values = [0.25f32, 0.5, 0.5, 0.5, 1e-9, 0.5, 3.0, 3.0, -2.0, 0.0];
        let outdeg = [0u32, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let want = values
            .iter()
            .zip(&outdeg)
            .filter(|(_, d)| **d == 0)
            .fold(ExactSum::default(), |a, (&v, _)| a + ExactSum::of(v));
        assert_eq!(dangling_sum(&values, &outdeg), want);
        assert_eq!(dangling_sum(&[], &[]), ExactSum::default());
    }

    #[test]
    fn columns_sort_by_out_degree_then_id() {
        assert_eq!(by_out_degree(&[2, 0, 5, 2, 1, 5], false), vec![2, 5, 0, 3, 4]);
        assert!(by_out_degree(&[], false).is_empty());
        assert_eq!(by_out_degree(&[2, 0, 5, 2, 1, 5], true), vec![2, 5, 0, 3, 4, 1]);
        assert_eq!(by_out_degree(&[0, 0], true), vec![0, 1]);
        assert!(by_out_degree(&[0, 0], false).is_empty());
    }
}

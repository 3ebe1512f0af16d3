//! The superstep machinery every kernel runs on, in one process or across hosts.
//!
//! A [`Kernel`] computes the owned rows of one partition from a *local vector*: the values of the
//! partition's owned vertices followed by those of its halo vertices, in the partition's local
//! numbering ([`LocalGraph`]), each vertex `width` consecutive `f32`s. A step returns
//! [`Partials`]: the partition's share of the global scalars of the new iterate, which combine
//! exactly (integer addition and `max`), so the combined value is the same for every
//! partitioning and every order in which partials arrive.
//!
//! One superstep of a job, on every partition, is:
//!
//! 1. `partials = state.step(kernel, graph, &globals)` — compute the owned rows of the next
//!    iterate (rows in parallel on the current rayon pool);
//! 2. for every [`Mirror`] of the partition: `state.pack_mirror(..)` and send the buffer to the
//!    reader, which calls `state.unpack_halo(..)` for the matching [`HaloSource`];
//! 3. combine every partition's partials with [`Partials::combine`], turn them into the next
//!    step's [`Globals`], and stop on the iteration count or the L∞ residual ([`Stop`]).
//!
//! [`run_partitioned`] is that loop with the exchange done in memory. The single-process run
//! of [`crate::kernels::run`] is this same loop with one partition, so there is only one code
//! path to trust. The distributed executor calls the same [`PartitionState`] methods and ships the
//! packed buffers over QUIC.
//!
//! Checkpoints: [`PartitionState::snapshot`] gives the owned values and private state of the
//! current iterate; store them with the iterate's combined [`Partials`] (an exact integer and a
//! float). [`PartitionState::restore`] plus one halo exchange resumes the run bit for bit.

pub use super::pull::PullScratch;
use crate::buf::{AlignedFloats, Segment};
use crate::partition::{HaloSource, LocalGraph, Mirror, Partitioning};

/// A zeroed `f32` vector whose pages the kernel is asked to back with transparent huge pages.
pub(crate) fn huge_zeroed(len: usize) -> Vec<f32> {
    let v = vec![0f32; len];
    advise_huge(&v);
    v
}

/// Asks the kernel to back the whole 2 MiB pages inside `v` with transparent huge pages.
///
/// Large zeroed allocations come straight from `mmap` and are untouched until written, so
/// advising them before the first write is enough. Huge pages cut TLB misses of the random row
/// accesses by 15–30% on propagation (DESIGN.md); `AlignedBytes` does the same for graph arrays.
pub(crate) fn advise_huge<T>(v: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (ptr, bytes) = (v.as_ptr() as usize, std::mem::size_of_val(v));
        let (start, end) = (ptr.next_multiple_of(HUGE), (ptr + bytes) & !(HUGE - 1));
        if end > start {
            // SAFETY: the range lies inside `v`'s allocation; madvise only changes paging hints.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// Number of fractional bits of the fixed-point global sums.
pub const FIXED_FRACTION_BITS: i32 = 80;

/// An exactly associative sum of `f32` values: each value is converted to fixed point in units of
/// `2^-80` (exact for magnitudes down to about `2^-56`, deterministically truncated below) and
/// added as an `i128`. Integer addition is associative, so the total does not depend on how the
/// values were grouped — unlike a float sum. Totals must stay below `2^47` in magnitude, ample for
/// probability mass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactSum(pub i128);

impl std::ops::Add for ExactSum {
    type Output = Self;

    /// The sum of two partial sums.
    #[inline]
    fn add(self, other: Self) -> Self {
        // Wrapping addition is associative and commutative, and cannot wrap within the documented range.
        Self(self.0.wrapping_add(other.0))
    }
}

impl ExactSum {
    /// The fixed-point image of `x`: `x · 2^80` truncated toward zero, saturating at the `i128`
    /// range, NaN mapping to 0 — exactly `(x as f64 * 2^80) as i128`.
    ///
    /// Computed from the bits: the compiler's `f64 → i128` conversion is a software routine that
    /// cost ~1 ms per PageRank step at scale 20, where hundreds of thousands of vertices dangle.
    #[inline]
    pub fn of(x: f32) -> Self {
        let bits = x.to_bits();
        let exp = ((bits >> 23) & 0xff) as i32;
        let frac = (bits & 0x7f_ffff) as i128;
        let negative = bits >> 31 == 1;
        if exp == 0xff {
            return Self(match (frac != 0, negative) {
                (true, _) => 0,
                (false, false) => i128::MAX,
                (false, true) => i128::MIN,
            });
        }
        // x = m · 2^(e − 150) with e = max(exp, 1); times 2^80 that is m · 2^(e − 70).
        let (m, shift) = if exp == 0 { (frac, 1 - 70) } else { (frac | 1 << 23, exp - 70) };
        let magnitude = if shift > 103 {
            // m · 2^shift ≥ 2^127: saturate like `as`.
            return Self(if negative { i128::MIN } else { i128::MAX });
        } else if shift >= 0 {
            m << shift
        } else if shift > -128 {
            m >> -shift
        } else {
            0
        };
        Self(if negative { -magnitude } else { magnitude })
    }

    /// The total as the nearest `f64`.
    pub fn to_f64(self) -> f64 {
        self.0 as f64 * (-FIXED_FRACTION_BITS as f64).exp2()
    }
}

/// A partition's share of the global scalars of one iterate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Partials {
    /// A kernel-defined mass (for the diffusions: the mass sitting on dangling vertices).
    pub mass: ExactSum,
    /// L∞ change of the owned values in this step (0 for an initial state).
    pub residual: f32,
}

impl Default for Partials {
    fn default() -> Self {
        Self { mass: ExactSum::default(), residual: 0.0 }
    }
}

impl Partials {
    /// Combines two partials; associative and commutative, bit for bit.
    #[inline]
    pub fn combine(self, other: Self) -> Self {
        Self { mass: self.mass + other.mass, residual: self.residual.max(other.residual) }
    }
}

/// What every partition knows at the start of a step: the combined scalars of the current
/// iterate, and which step this is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Globals {
    /// The combined [`Partials::mass`] of the current iterate.
    pub mass: f64,
    /// The step being computed, counting from 1.
    pub step: u32,
}

impl Globals {
    /// The globals for computing step `step` from an iterate whose combined partials are `p`.
    pub fn new(p: Partials, step: u32) -> Self {
        Self { mass: p.mass.to_f64(), step }
    }
}

/// When to stop iterating.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stop {
    /// Upper bound on steps (for the heat kernel: Taylor terms after the first).
    pub max_iterations: u32,
    /// Stop as soon as a step's L∞ residual is at or below this.
    pub tolerance: Option<f32>,
}

impl Stop {
    /// Exactly `n` steps.
    pub fn iterations(n: u32) -> Self {
        Self { max_iterations: n, tolerance: None }
    }

    /// Until the L∞ residual is at most `tolerance`, or `max_iterations` steps.
    pub fn tolerance(tolerance: f32, max_iterations: u32) -> Self {
        Self { max_iterations, tolerance: Some(tolerance) }
    }
}

/// A diffusion kernel split into supersteps. Implementations compute each owned row from that
/// row's in-neighbour list (in CSR order), the current local vector and [`Globals`] only.
pub trait Kernel: Sync {
    /// Per-partition data derived once from the local graph (normalisation weights, seed masks).
    type Prepared: Send + Sync;

    /// `f32` values per vertex (1 for vectors, `d` for feature matrices).
    fn width(&self) -> usize;

    /// Derives the per-partition data.
    fn prepare(&self, g: &LocalGraph) -> Self::Prepared;

    /// Length of the kernel's private per-partition state (`aux`); 0 unless the kernel keeps some.
    fn aux_len(&self, _g: &LocalGraph) -> usize {
        0
    }

    /// Writes the initial owned values (`owned × width`) and the kernel's private per-row state;
    /// returns the partials of the initial iterate.
    fn init(&self, g: &LocalGraph, prep: &Self::Prepared, x: &mut [f32], aux: &mut Vec<f32>) -> Partials;

    /// One step: reads the local vector `x` (`locals × width`), writes the owned rows of the next
    /// iterate into `next` (`owned × width`), may update `aux`; `scratch` is reusable memory.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        g: &LocalGraph,
        prep: &Self::Prepared,
        globals: &Globals,
        x: &[f32],
        next: &mut [f32],
        aux: &mut [f32],
        scratch: &mut PullScratch,
    ) -> Partials;

    /// The result rows of the owned vertices, given the owned part of the current iterate and
    /// the private state (both moved, so a result is returned without a copy).
    fn finish(&self, x: Segment<f32>, aux: Vec<f32>) -> Segment<f32>;
}

/// One partition's iterate and scratch memory between supersteps.
#[derive(Debug)]
pub struct PartitionState<P> {
    prep: P,
    width: usize,
    owned: usize,
    /// Current local vector: owned rows, then halo rows.
    cur: AlignedFloats,
    /// The next iterate's owned rows are written here (`owned × width`), then swapped with `cur`
    /// when the partition has no halo, or copied over `cur`'s owned rows when it has one (so a
    /// partition never holds its halo twice: at APPNP widths that is hundreds of megabytes).
    next: AlignedFloats,
    aux: Vec<f32>,
    scratch: PullScratch,
}

impl<P> PartitionState<P> {
    /// Prepares the kernel on this partition and writes the initial iterate (halo slots not yet filled).
    pub fn new<K: Kernel<Prepared = P>>(kernel: &K, g: &LocalGraph) -> (Self, Partials) {
        let width = kernel.width();
        let prep = kernel.prepare(g);
        let mut cur = AlignedFloats::zeroed(g.locals() * width);
        let mut aux = Vec::new();
        let partials = kernel.init(g, &prep, &mut cur[..g.owned() * width], &mut aux);
        let next = AlignedFloats::zeroed(g.owned() * width);
        (Self { prep, width, owned: g.owned(), cur, next, aux, scratch: PullScratch::default() }, partials)
    }

    /// Computes the next iterate's owned rows and makes it current (its halo is then stale until
    /// every [`HaloSource`] has been unpacked).
    pub fn step<K: Kernel<Prepared = P>>(&mut self, kernel: &K, g: &LocalGraph, globals: &Globals) -> Partials {
        let w = self.width;
        if self.next.is_empty() && self.owned > 0 {
            // Handed to a snapshot by `take_owned_values`.
            self.next = AlignedFloats::zeroed(self.owned * w);
        }
        let partials = kernel.step(
            g,
            &self.prep,
            globals,
            &self.cur,
            &mut self.next[..self.owned * w],
            &mut self.aux,
            &mut self.scratch,
        );
        if self.cur.len() == self.next.len() {
            std::mem::swap(&mut self.cur, &mut self.next);
        } else {
            self.cur[..self.owned * w].copy_from_slice(&self.next);
        }
        partials
    }

    /// Appends the values a reader needs (its halo order) to `out`.
    pub fn pack_mirror(&self, mirror: &Mirror, out: &mut Vec<f32>) {
        let w = self.width;
        out.reserve(mirror.vertices.len() * w);
        for &v in &mirror.vertices {
            out.extend_from_slice(&self.cur[v as usize * w..(v as usize + 1) * w]);
        }
    }

    /// The values a reader needs (its halo order), packed into a fresh aligned segment that can
    /// go on the wire without a further copy.
    pub fn pack_mirror_segment(&self, mirror: &Mirror) -> Segment<f32> {
        self.pack_mirror_rows(mirror, 0..mirror.vertices.len())
    }

    /// Entries `rows` of a reader's mirror list, packed like [`Self::pack_mirror_segment`]: a
    /// large halo goes out as several such pieces, each landing at `rows.start × width` of the
    /// reader's buffer ([`Self::unpack_halo_at`]).
    pub fn pack_mirror_rows(&self, mirror: &Mirror, rows: std::ops::Range<usize>) -> Segment<f32> {
        let w = self.width;
        let vertices = &mirror.vertices[rows];
        Segment::build(vertices.len() * w, |out: &mut [f32]| {
            for (dst, &v) in out.chunks_exact_mut(w.max(1)).zip(vertices) {
                dst.copy_from_slice(&self.cur[v as usize * w..(v as usize + 1) * w]);
            }
        })
    }

    /// The number of `f32` values an owner's packed buffer for `source` must hold.
    pub fn halo_len(&self, source: &HaloSource) -> usize {
        (source.slots.end - source.slots.start) as usize * self.width
    }

    /// Copies an owner's packed values into the halo slots they belong to.
    pub fn unpack_halo(&mut self, source: &HaloSource, values: &[f32]) {
        let w = self.width;
        self.cur[source.slots.start as usize * w..source.slots.end as usize * w].copy_from_slice(values);
    }

    /// Copies a piece of an owner's packed values, starting `first` values into that owner's
    /// buffer, into the halo slots it belongs to. The caller checks `first + values.len() ≤
    /// self.halo_len(source)`.
    pub fn unpack_halo_at(&mut self, source: &HaloSource, first: usize, values: &[f32]) {
        let at = source.slots.start as usize * self.width + first;
        self.cur[at..at + values.len()].copy_from_slice(values);
    }

    /// The current iterate's owned values (`owned × width`) and the kernel's private state: what
    /// a checkpoint stores, together with the iterate's combined [`Partials`].
    pub fn snapshot(&self) -> (&[f32], &[f32]) {
        (&self.cur[..self.owned * self.width], &self.aux)
    }

    /// Gives a buffer taken by [`Self::take_owned_values`] back, once its snapshot is stored, for
    /// the next step to write into instead of allocating (and first-touching) a fresh one: an
    /// APPNP owner otherwise held two owned-rows buffers (89 MB each at d = 64 on a third of
    /// scale 20) while its snapshot waited to be stored. A buffer of another size, or one given
    /// when the state has its own, is dropped.
    pub fn reuse_next(&mut self, buf: AlignedFloats) {
        if self.next.is_empty() && buf.len() == self.owned * self.width {
            self.next = buf;
        }
    }

    /// The current iterate's owned values (`owned × width`) as a segment of their own, for a
    /// checkpoint. With a halo the step has just copied them from `next`, which is handed over
    /// without a copy (the next step allocates a fresh one, unless [`Self::reuse_next`] gave it
    /// back); without one they are copied.
    pub fn take_owned_values(&mut self) -> Segment<f32> {
        let n = self.owned * self.width;
        if self.cur.len() != self.next.len() && self.next.len() == n {
            std::mem::take(&mut self.next).into_segment()
        } else {
            Segment::from_slice(&self.cur[..n])
        }
    }

    /// Rebuilds a partition's state from a [`PartitionState::snapshot`] taken with the same
    /// kernel on the same partition. The halo slots are empty until the next exchange; stepping
    /// on from there with the checkpoint's combined partials reproduces the uninterrupted run
    /// bit for bit.
    pub fn restore<K: Kernel<Prepared = P>>(
        kernel: &K,
        g: &LocalGraph,
        values: &[f32],
        aux: &[f32],
    ) -> Result<Self, SnapshotError> {
        let width = kernel.width();
        let (want_values, want_aux) = (g.owned() * width, kernel.aux_len(g));
        if values.len() != want_values || aux.len() != want_aux {
            return Err(SnapshotError { values: values.len(), aux: aux.len(), want_values, want_aux });
        }
        let mut cur = AlignedFloats::zeroed(g.locals() * width);
        cur[..want_values].copy_from_slice(values);
        let next = AlignedFloats::zeroed(g.owned() * width);
        let prep = kernel.prepare(g);
        Ok(Self { prep, width, owned: g.owned(), cur, next, aux: aux.to_vec(), scratch: PullScratch::default() })
    }

    /// The result rows of the owned vertices (`owned × width`), consuming the state: the
    /// iterate itself (or the kernel's own state), not a copy. The other iterate and the scratch
    /// are freed first and the halo rows after the owned ones are given back, so a result held
    /// while a job's parts are gathered takes no more memory than its own rows (a third of an
    /// APPNP d = 64 job's halo is tens of megabytes).
    pub fn into_result<K: Kernel<Prepared = P>>(self, kernel: &K) -> Segment<f32> {
        let Self { mut cur, next, scratch, aux, owned, width, .. } = self;
        drop((next, scratch));
        cur.truncate(owned * width);
        kernel.finish(cur.into_segment(), aux)
    }
}

/// A snapshot does not fit the partition it is restored on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("snapshot has {values} values and {aux} state entries; this partition needs {want_values} and {want_aux}")]
pub struct SnapshotError {
    pub values: usize,
    pub aux: usize,
    pub want_values: usize,
    pub want_aux: usize,
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutput {
    /// Result rows of all vertices in global order (`vertices × width`, row-major).
    pub values: Segment<f32>,
    /// Steps run.
    pub iterations: u32,
    /// L∞ residual of the last step (`f32::INFINITY` if no step ran).
    pub residual: f32,
}

/// Runs `kernel` over every partition of `parts`, exchanging halos in memory between supersteps.
///
/// Runs on the current rayon pool; called from outside any pool it moves itself onto the global
/// pool's workers once, rather than paying a cross-thread hand-off for every parallel loop (tens
/// of microseconds per step, which dominates on the small graphs of the serving path).
pub fn run_partitioned<K: Kernel>(kernel: &K, parts: &Partitioning, stop: Stop) -> RunOutput {
    run_partitioned_observed(kernel, parts, stop, &mut |_| {})
}

/// What a run reports after each superstep (for progress bars and `Watch` streams).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Steps completed so far.
    pub iteration: u32,
    /// L∞ residual of that step.
    pub residual: f32,
}

/// [`run_partitioned`], calling `observer` after every superstep (on a pool thread).
pub fn run_partitioned_observed<K: Kernel>(
    kernel: &K,
    parts: &Partitioning,
    stop: Stop,
    observer: &mut (dyn FnMut(Progress) + Send),
) -> RunOutput {
    if rayon::current_thread_index().is_none() {
        let mut out = None;
        rayon::scope(|_| out = Some(run_partitioned_observed(kernel, parts, stop, observer)));
        return out.expect("the scope ran the job");
    }
    let mut states = Vec::with_capacity(parts.parts.len());
    let mut partials = Partials::default();
    for p in &parts.parts {
        let (state, init) = PartitionState::new(kernel, &p.graph);
        states.push(state);
        partials = partials.combine(init);
    }
    exchange(parts, &mut states);
    let (mut iterations, mut residual) = (0, f32::INFINITY);
    while iterations < stop.max_iterations && !stop.tolerance.is_some_and(|t| residual <= t) {
        let globals = Globals::new(partials, iterations + 1);
        partials = Partials::default();
        for (p, state) in parts.parts.iter().zip(&mut states) {
            partials = partials.combine(state.step(kernel, &p.graph, &globals));
        }
        exchange(parts, &mut states);
        iterations += 1;
        residual = partials.residual;
        observer(Progress { iteration: iterations, residual });
    }
    let values = if states.len() == 1 {
        states.pop().expect("one state").into_result(kernel)
    } else {
        let parts: Vec<Segment<f32>> = states.into_iter().map(|s| s.into_result(kernel)).collect();
        Segment::build(parts.iter().map(|p| p.len()).sum(), |values| {
            let mut rest = values;
            for p in &parts {
                let (here, after) = rest.split_at_mut(p.len());
                here.copy_from_slice(p);
                rest = after;
            }
        })
    };
    RunOutput { values, iterations, residual }
}

/// Fills every partition's halo from its owners, as the network would: pack, then unpack.
fn exchange<P>(parts: &Partitioning, states: &mut [PartitionState<P>]) {
    let mut buf = Vec::new();
    for (reader, p) in parts.parts.iter().enumerate() {
        for source in &p.halo_sources {
            let mirror = parts.parts[source.owner]
                .mirrors
                .iter()
                .find(|m| m.reader == reader)
                .expect("every halo source has a mirror at its owner");
            buf.clear();
            states[source.owner].pack_mirror(mirror, &mut buf);
            states[reader].unpack_halo(source, &buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stopping after 3 steps, restoring every partition from its snapshot and stepping on gives
    /// the uninterrupted run's bits (what recovery from a checkpoint relies on).
    #[test]
    fn restore_from_snapshot_continues_bit_for_bit() {
        use crate::kernels::{Heat, Kernel};
        let g = crate::generate::kronecker(8, 8, 3).unwrap();
        let parts = crate::partition::partition(&g, 3).unwrap();
        let kernel = Heat { t: 2.0, seeds: vec![1, 50], vertices: g.vertices() as u64 };
        let straight = run_partitioned(&kernel, &parts, Stop::iterations(7)).values;

        fn steps<K: Kernel>(
            k: &K,
            parts: &Partitioning,
            states: &mut [PartitionState<K::Prepared>],
            mut partials: Partials,
            from: u32,
            to: u32,
        ) -> Partials {
            for i in from..to {
                let globals = Globals::new(partials, i + 1);
                partials = Partials::default();
                for (p, s) in parts.parts.iter().zip(states.iter_mut()) {
                    partials = partials.combine(s.step(k, &p.graph, &globals));
                }
                exchange(parts, states);
            }
            partials
        }
        let (mut states, mut partials) = (Vec::new(), Partials::default());
        for p in &parts.parts {
            let (s, init) = PartitionState::new(&kernel, &p.graph);
            states.push(s);
            partials = partials.combine(init);
        }
        exchange(&parts, &mut states);
        let partials = steps(&kernel, &parts, &mut states, partials, 0, 3);
        // Values taken for a checkpoint (a buffer handed over, not copied) are the snapshot's.
        let mut restored: Vec<_> = parts
            .parts
            .iter()
            .zip(states.iter_mut())
            .map(|(p, s)| {
                let values = s.take_owned_values();
                assert_eq!(&values[..], s.snapshot().0);
                let aux = s.snapshot().1.to_vec();
                let restored = PartitionState::restore(&kernel, &p.graph, &values, &aux).unwrap();
                // Once stored, the snapshot's buffer goes back to the state it came from; while
                // anything still shares it, it cannot.
                let shared = values.clone();
                let values = crate::buf::AlignedFloats::reclaim(values).unwrap_err();
                drop(shared);
                let buf = crate::buf::AlignedFloats::reclaim(values).expect("the whole buffer, unshared");
                assert!(s.next.is_empty(), "a partition with a halo hands its next buffer over");
                s.reuse_next(buf);
                assert_eq!(s.next.len(), s.owned * s.width);
                restored
            })
            .collect();
        exchange(&parts, &mut restored);
        steps(&kernel, &parts, &mut restored, partials, 3, 7);
        // The states the values were taken from step on just as well.
        steps(&kernel, &parts, &mut states, partials, 3, 7);
        let bits = |s: Vec<PartitionState<_>>| -> Vec<u32> {
            s.into_iter().flat_map(|s| s.into_result(&kernel).iter().map(|x| x.to_bits()).collect::<Vec<_>>()).collect()
        };
        let want: Vec<u32> = straight.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits(restored), want);
        assert_eq!(bits(states), want);
        let p0 = &parts.parts[0].graph;
        let err = PartitionState::restore(&kernel, p0, &[1.0], &[]).unwrap_err();
        assert_eq!(err.want_values, p0.owned());
    }

    /// A large iterate starts on a cache line, so a 64-wide row is four whole lines, before and
    /// after steps and after a restore.
    #[test]
    fn iterates_are_cache_line_aligned() {
        use crate::kernels::{Appnp, Normalization};
        let g = crate::generate::kronecker(14, 8, 3).unwrap();
        let lg = LocalGraph::whole(&g);
        let feats = crate::generate::features(g.vertices(), 64, 1);
        let k = Appnp {
            alpha: 0.1,
            normalization: Normalization::Symmetric,
            features: &feats,
            dim: 64,
            base: 0,
            rows: None,
        };
        let (mut s, p) = PartitionState::new(&k, &lg);
        let aligned = |s: &PartitionState<_>, at: usize| assert_eq!(s.snapshot().0.as_ptr() as usize % at, 0);
        aligned(&s, 64);
        for step in 1..=2 {
            s.step(&k, &lg, &Globals::new(p, step));
            aligned(&s, 64);
        }
        let values = s.take_owned_values();
        assert_eq!(values.as_ptr() as usize % 64, 0);
        aligned(&PartitionState::restore(&k, &lg, &values, &[]).unwrap(), 64);
    }

    #[test]
    fn fixed_point_conversion_matches_the_float_cast() {
        let reference = |x: f32| (x as f64 * 80f64.exp2()) as i128;
        let mut rng = crate::generate::SplitMix64::new(3);
        let specials = [0.0, -0.0, 1.0, -1.0, f32::MIN_POSITIVE, 1e-45, -1e-45, f32::MAX, f32::MIN, f32::INFINITY];
        let specials = specials.into_iter().chain([f32::NEG_INFINITY, f32::NAN, 2f32.powi(47), -2f32.powi(47)]);
        let randoms = (0..200_000).map(|_| f32::from_bits(rng.next_u64() as u32));
        for x in specials.chain(randoms) {
            assert_eq!(ExactSum::of(x).0, reference(x), "{x:e} ({:#x})", x.to_bits());
        }
    }

    #[test]
    fn exact_sum_is_order_independent() {
        let xs: Vec<f32> = (1..1000).map(|i| 1.0 / i as f32).collect();
        let fwd = xs.iter().fold(ExactSum::default(), |a, &x| a + ExactSum::of(x));
        let rev = xs.iter().rev().fold(ExactSum::default(), |a, &x| a + ExactSum::of(x));
        let sum = |xs: &[f32]| xs.iter().fold(ExactSum::default(), |a, &x| a + ExactSum::of(x));
        let halves = sum(&xs[..400]) + sum(&xs[400..]);
        assert_eq!(fwd, rev);
        assert_eq!(fwd, halves);
        let exact: f64 = xs.iter().map(|&x| x as f64).sum();
        assert!((fwd.to_f64() - exact).abs() < 1e-12);
        assert_eq!(ExactSum::of(0.5).to_f64(), 0.5);
    }
}

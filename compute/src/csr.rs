//! The graph: a compressed sparse row (CSR) matrix of in-edges.
//!
//! Diffusion pulls values along in-edges, so row `v` lists the *sources* `u` of every edge
//! `u → v`, sorted ascending by `u`. That order is the CSR order of the determinism contract:
//! every kernel computes row `v` from exactly this list, in this order, and nothing else.
//!
//! Arrays are plain little-endian [`Segment`]s (`u64` offsets, `u32` vertex ids, optional `f32`
//! weights, `u32` out-degrees), so a graph or a partition of it is a handful of contiguous buffers
//! that can be memory-mapped from a `.qcsr` file or received from a peer without decoding.
//!
//! # How edge lists become a CSR
//!
//! [`CsrBuilder`] documents and applies one policy for every loader and generator:
//! - **Duplicate edges** `u → v` appearing more than once are merged into one edge; their weights
//!   are summed (the Matrix Market and SciPy convention for repeated coordinates).
//! - **Self loops** `v → v` are kept by default (they are legitimate in PageRank and random walks);
//!   [`SelfLoops::Drop`] removes them (the Kronecker generator does, as Graph500 does).
//! - **Isolated vertices** (no edges at all) exist when the declared vertex count exceeds the
//!   largest id; they keep an empty row.
//! - **Dangling vertices** (out-degree 0) are kept; kernels redistribute their mass (PageRank) as
//!   each kernel documents.
//! - **Symmetrisation** (optional) adds `v → u` for every `u → v` before merging.

use rayon::prelude::*;

use crate::buf::{AlignedBytes, Pod, Segment};

/// Largest vertex count a graph may have: vertex ids are `u32`.
pub const MAX_VERTICES: u64 = u32::MAX as u64;

/// A directed graph stored as the CSR of its in-edges. Cheap to clone (arrays are shared).
#[derive(Clone, Debug, PartialEq)]
pub struct Csr {
    offsets: Segment<u64>,
    sources: Segment<u32>,
    weights: Option<Segment<f32>>,
    out_degree: Segment<u32>,
}

/// Why a set of arrays is not a valid CSR.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CsrError {
    #[error("offsets must have vertices + 1 = {expected} entries, found {found}")]
    OffsetsLength { expected: usize, found: usize },
    #[error("offsets must start at 0, found {0}")]
    OffsetsStart(u64),
    #[error("offsets decrease at row {row}")]
    OffsetsDecrease { row: usize },
    #[error("last offset {last} does not equal the edge count {edges}")]
    OffsetsEnd { last: u64, edges: usize },
    #[error("edge {edge}: source {source_id} is not below the vertex count {vertices}")]
    SourceOutOfRange { edge: usize, source_id: u32, vertices: usize },
    #[error("row {row} is not sorted ascending by source")]
    RowUnsorted { row: usize },
    #[error("weights has {found} entries for {edges} edges")]
    WeightsLength { found: usize, edges: usize },
    #[error("edge {edge}: weight {weight} is not a finite non-negative number")]
    BadWeight { edge: usize, weight: f32 },
    #[error("out-degree has {found} entries for {vertices} vertices")]
    OutDegreeLength { found: usize, vertices: usize },
    #[error("out-degrees do not match the edges (vertex {vertex})")]
    OutDegreeMismatch { vertex: usize },
    #[error("graph has {0} vertices, more than the {MAX_VERTICES} that u32 ids allow")]
    TooManyVertices(u64),
}

impl Csr {
    /// Assembles a CSR from its arrays after checking every structural invariant:
    /// offsets monotone from 0 to `|E|`, sources in range and sorted within each row, weights
    /// finite and non-negative, out-degrees consistent with the edges.
    ///
    /// This is the only way arrays from untrusted bytes (files, peers) become a graph.
    pub fn from_parts(
        offsets: Segment<u64>,
        sources: Segment<u32>,
        weights: Option<Segment<f32>>,
        out_degree: Segment<u32>,
    ) -> Result<Self, CsrError> {
        let csr = Self { offsets, sources, weights, out_degree };
        csr.validate()?;
        Ok(csr)
    }

    fn validate(&self) -> Result<(), CsrError> {
        let (offsets, sources) = (&*self.offsets, &*self.sources);
        if offsets.is_empty() {
            return Err(CsrError::OffsetsLength { expected: 1, found: 0 });
        }
        let n = offsets.len() - 1;
        if n as u64 > MAX_VERTICES {
            return Err(CsrError::TooManyVertices(n as u64));
        }
        if offsets[0] != 0 {
            return Err(CsrError::OffsetsStart(offsets[0]));
        }
        if let Some(row) = offsets.par_windows(2).with_min_len(1 << 16).position_first(|w| w[0] > w[1]) {
            return Err(CsrError::OffsetsDecrease { row });
        }
        if offsets[n] != sources.len() as u64 {
            return Err(CsrError::OffsetsEnd { last: offsets[n], edges: sources.len() });
        }
        if self.out_degree.len() != n {
            return Err(CsrError::OutDegreeLength { found: self.out_degree.len(), vertices: n });
        }
        // One pass over the rows checks them and counts out-degrees at the same time, in a few
        // shards of rows each with its own histogram (see `shard_rows`); a second parallel pass
        // sums the histograms and compares them with the stored out-degrees.
        let shards = shard_rows(offsets);
        let counts: Vec<Result<DegreeCount, CsrError>> = shards
            .par_iter()
            .map(|&(a, b)| {
                let mut count = DegreeCount::new(n);
                for row in a..b {
                    let base = offsets[row] as usize;
                    let list = &sources[base..offsets[row + 1] as usize];
                    check_row(row, base, list, n)?;
                    count.add(list);
                }
                Ok(count.finish())
            })
            .collect();
        // Report the error of the earliest failing shard, as a sequential scan would.
        let counts = counts.into_iter().collect::<Result<Vec<_>, _>>()?;
        if let Some(w) = &self.weights {
            if w.len() != sources.len() {
                return Err(CsrError::WeightsLength { found: w.len(), edges: sources.len() });
            }
            if let Some(edge) = w.par_iter().with_min_len(1 << 16).position_first(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err(CsrError::BadWeight { edge, weight: w[edge] });
            }
        }
        let out = &*self.out_degree;
        let mismatch = DegreeCount::blocks(n)
            .into_par_iter()
            .filter_map(|(a, b)| {
                let mut total = vec![0u32; b - a];
                DegreeCount::sum(&counts, a, &mut total);
                total.iter().zip(&out[a..b]).position(|(x, y)| x != y).map(|i| a + i)
            })
            .min();
        if let Some(vertex) = mismatch {
            return Err(CsrError::OutDegreeMismatch { vertex });
        }
        Ok(())
    }

    /// Drops this process's resident pages of the arrays that are file mappings (a `.qcsr` read
    /// by mapping); see [`crate::buf::Storage::release_resident`]. Heap arrays are untouched.
    pub fn release_resident(&self) {
        let arrays = [self.offsets.storage(), self.sources.storage(), self.out_degree.storage()];
        for s in arrays.into_iter().chain(self.weights.as_ref().map(Segment::storage)) {
            s.release_resident();
        }
    }

    /// Number of vertices.
    pub fn vertices(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Number of (directed) edges.
    pub fn edges(&self) -> usize {
        self.sources.len()
    }

    /// Row offsets into [`Csr::sources`], `vertices + 1` entries.
    pub fn offsets(&self) -> &Segment<u64> {
        &self.offsets
    }

    /// Concatenated in-neighbour lists, each sorted ascending.
    pub fn sources(&self) -> &Segment<u32> {
        &self.sources
    }

    /// Edge weights parallel to [`Csr::sources`], if the graph is weighted.
    pub fn weights(&self) -> Option<&Segment<f32>> {
        self.weights.as_ref()
    }

    /// Out-degree of every vertex (number of out-edges after merging duplicates).
    pub fn out_degree(&self) -> &Segment<u32> {
        &self.out_degree
    }

    /// The in-neighbours of `v`, in CSR order.
    pub fn in_neighbours(&self, v: u32) -> &[u32] {
        let (a, b) = (self.offsets[v as usize] as usize, self.offsets[v as usize + 1] as usize);
        &self.sources[a..b]
    }

    /// The weights of `v`'s in-edges, parallel to [`Csr::in_neighbours`].
    pub fn in_weights(&self, v: u32) -> Option<&[f32]> {
        let (a, b) = (self.offsets[v as usize] as usize, self.offsets[v as usize + 1] as usize);
        self.weights.as_ref().map(|w| &w[a..b])
    }

    /// Iterates over all edges as `(source, target, weight)` in CSR order (by target, then source).
    pub fn edges_iter(&self) -> impl Iterator<Item = (u32, u32, Option<f32>)> + '_ {
        (0..self.vertices() as u32).flat_map(move |v| {
            let a = self.offsets[v as usize] as usize;
            self.in_neighbours(v).iter().enumerate().map(move |(i, &u)| (u, v, self.weights.as_ref().map(|w| w[a + i])))
        })
    }
}

/// Checks one row: sources below `n` and strictly ascending. A sorted row is in range exactly
/// when its last source is, so the common case is one pass of comparisons; the slower scans
/// below only run to name the offending edge, preferring an out-of-range source as the error.
#[inline]
fn check_row(row: usize, base: usize, list: &[u32], n: usize) -> Result<(), CsrError> {
    // A branch-free fold over adjacent pairs (no early exit) compiles to SIMD compares; rows
    // are short, and a failing row is the rare case.
    let sorted = list.iter().zip(list.iter().skip(1)).fold(true, |ok, (a, b)| ok & (a < b));
    if sorted && list.last().is_none_or(|&s| (s as usize) < n) {
        return Ok(());
    }
    if let Some(i) = list.iter().position(|&s| s as usize >= n) {
        return Err(CsrError::SourceOutOfRange { edge: base + i, source_id: list[i], vertices: n });
    }
    Err(CsrError::RowUnsorted { row })
}

/// Splits the rows into a few contiguous ranges of about equal edge counts, one per histogram.
///
/// Per-shard histograms make out-degree counting parallel without atomics, but each costs
/// `4·n` bytes, so there are at most as many shards as threads and never more than one per
/// four edges per vertex (a very sparse graph is counted by fewer threads rather than with
/// mostly empty histograms). Each shard holds well under 2^32 edges, so `u32` counts are exact.
fn shard_rows(offsets: &[u64]) -> Vec<(usize, usize)> {
    let n = offsets.len() - 1;
    let m = offsets[n];
    let by_density = (m / (4 * n.max(1) as u64)).max(1);
    let by_size = m.div_ceil(1 << 31).max(1);
    let shards = (rayon::current_num_threads() as u64).min(by_density).max(by_size);
    let mut out = Vec::with_capacity(shards as usize);
    let mut a = 0;
    for k in 1..=shards {
        let b = if k == shards { n } else { offsets.partition_point(|&o| o < m / shards * k).clamp(a, n) };
        out.push((a, b));
        a = b;
    }
    out
}

/// Out-degree counts of one shard of rows, in byte counters with carries.
///
/// Counting is a random increment per edge, and its cost is where the counters live: one byte
/// per vertex keeps a shard's histogram four times smaller than `u32` counters (1 MiB for a
/// million vertices, inside L2 on the machines we measure). A counter that wraps records a
/// carry of 256, which happens at most once per 256 edges into one vertex.
struct DegreeCount {
    low: Vec<u8>,
    /// Vertices whose counter wrapped, once per wrap; sorted by `finish`.
    carries: Vec<u32>,
}

impl DegreeCount {
    fn new(n: usize) -> Self {
        Self { low: vec![0u8; n], carries: Vec::new() }
    }

    /// Counts every source in `list` (all below `n`, checked by the caller).
    #[inline]
    fn add(&mut self, list: &[u32]) {
        for &s in list {
            let c = &mut self.low[s as usize];
            *c = c.wrapping_add(1);
            if *c == 0 {
                self.carries.push(s);
            }
        }
    }

    /// Sorts the carries so `sum` can find a block's carries by binary search.
    fn finish(mut self) -> Self {
        self.carries.sort_unstable();
        self
    }

    /// Vertex blocks for summing in parallel.
    fn blocks(n: usize) -> Vec<(usize, usize)> {
        (0..n).step_by(1 << 14).map(|a| (a, (a + (1 << 14)).min(n))).collect()
    }

    /// Writes the total out-degree of vertices `a..a + out.len()` over all shards into `out`.
    /// Totals fit in `u32`: rows are strictly ascending, so a vertex appears at most once per row.
    fn sum(counts: &[DegreeCount], a: usize, out: &mut [u32]) {
        for c in counts {
            for (t, &x) in out.iter_mut().zip(&c.low[a..]) {
                *t = t.wrapping_add(u32::from(x));
            }
            let lo = c.carries.partition_point(|&v| (v as usize) < a);
            let hi = c.carries.partition_point(|&v| (v as usize) < a + out.len());
            for &v in &c.carries[lo..hi] {
                out[v as usize - a] = out[v as usize - a].wrapping_add(256);
            }
        }
    }
}

fn count_out_degrees(n: usize, offsets: &[u64], sources: &[u32]) -> Vec<u32> {
    let counts: Vec<DegreeCount> = shard_rows(offsets)
        .par_iter()
        .map(|&(a, b)| {
            let mut count = DegreeCount::new(n);
            count.add(&sources[offsets[a] as usize..offsets[b] as usize]);
            count.finish()
        })
        .collect();
    let mut total = vec![0u32; n];
    total.par_chunks_mut(1 << 14).enumerate().for_each(|(i, chunk)| DegreeCount::sum(&counts, i << 14, chunk));
    total
}

/// What to do with edges `v → v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SelfLoops {
    /// Keep them as ordinary edges.
    #[default]
    Keep,
    /// Remove them.
    Drop,
}

/// Collects edges and builds a [`Csr`] with the policy described in the module docs.
#[derive(Clone, Debug, Default)]
pub struct CsrBuilder {
    vertices: Option<u64>,
    src: Vec<u32>,
    dst: Vec<u32>,
    weights: Option<Vec<f32>>,
    symmetrize: bool,
    self_loops: SelfLoops,
}

impl CsrBuilder {
    /// A builder for an unweighted graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder for a weighted graph: every edge must then come with a weight.
    pub fn weighted() -> Self {
        Self { weights: Some(Vec::new()), ..Self::default() }
    }

    /// Starts from edge arrays already in memory (`src[i] → dst[i]`, weighted if `weights` is
    /// given), for loaders and generators that produce edges in bulk; no copy is made.
    ///
    /// # Panics
    ///
    /// If the arrays differ in length (a bug in the caller, never a property of input data).
    pub fn from_edges(src: Vec<u32>, dst: Vec<u32>, weights: Option<Vec<f32>>) -> Self {
        assert_eq!(src.len(), dst.len(), "edge arrays differ in length");
        if let Some(w) = &weights {
            assert_eq!(w.len(), src.len(), "weights differ in length from the edges");
        }
        Self { src, dst, weights, ..Self::default() }
    }

    /// Fixes the vertex count (otherwise it is one more than the largest id seen).
    pub fn vertices(mut self, n: u64) -> Self {
        self.vertices = Some(n);
        self
    }

    /// Adds the reverse of every edge before merging duplicates.
    pub fn symmetrize(mut self, yes: bool) -> Self {
        self.symmetrize = yes;
        self
    }

    /// Chooses what happens to self loops.
    pub fn self_loops(mut self, policy: SelfLoops) -> Self {
        self.self_loops = policy;
        self
    }

    /// Reserves room for `edges` more edges.
    pub fn reserve(&mut self, edges: usize) {
        self.src.reserve(edges);
        self.dst.reserve(edges);
        if let Some(w) = &mut self.weights {
            w.reserve(edges);
        }
    }

    /// Whether this builder expects weights.
    pub fn is_weighted(&self) -> bool {
        self.weights.is_some()
    }

    /// Number of edges added so far.
    pub fn len(&self) -> usize {
        self.src.len()
    }

    /// Whether no edge was added.
    pub fn is_empty(&self) -> bool {
        self.src.is_empty()
    }

    /// Adds edge `u → v`. For a weighted builder the weight is required (1.0 is used if `None`);
    /// for an unweighted one it is ignored. Callers validate weights (loaders name the line).
    pub fn push(&mut self, u: u32, v: u32, weight: Option<f32>) {
        self.src.push(u);
        self.dst.push(v);
        if let Some(w) = &mut self.weights {
            w.push(weight.unwrap_or(1.0));
        }
    }

    /// Adds many unweighted edges at once.
    pub fn extend(&mut self, src: &[u32], dst: &[u32]) {
        assert_eq!(src.len(), dst.len());
        self.src.extend_from_slice(src);
        self.dst.extend_from_slice(dst);
        if let Some(w) = &mut self.weights {
            w.resize(self.src.len(), 1.0);
        }
    }

    /// Builds the CSR. Fails only if an id is not below a declared vertex count or the count
    /// exceeds what `u32` ids allow.
    pub fn build(self) -> Result<Csr, BuildError> {
        self.build_from(SMALL_EDGES)
    }

    /// [`Self::build`], with edge lists up to `small` long built by [`build_small`] (tests
    /// compare both paths).
    fn build_from(self, small: usize) -> Result<Csr, BuildError> {
        let CsrBuilder { vertices, src, dst, weights, symmetrize, self_loops } = self;
        let max_id = src.par_iter().chain(dst.par_iter()).copied().max();
        let n = match (vertices, max_id) {
            (Some(n), Some(m)) if m as u64 >= n => return Err(BuildError::IdOutOfRange { id: m, vertices: n }),
            (Some(n), _) => n,
            (None, Some(m)) => m as u64 + 1,
            (None, None) => 0,
        };
        if n > MAX_VERTICES {
            return Err(BuildError::TooManyVertices(n));
        }
        let n = n as usize;
        let edges = Edges { src: &src, dst: &dst, weights: weights.as_deref(), symmetrize };
        if edges.len() <= small {
            return Ok(build_small(n, edges, self_loops));
        }
        let (offsets, sources, weights) = sort_by_target(n, edges, self_loops);
        drop((src, dst));
        let out_degree = Segment::from_slice(&count_out_degrees(n, &offsets, &sources));
        Ok(Csr { offsets, sources, weights, out_degree })
    }
}

/// The builder's input as the sort sees it: with `symmetrize`, a virtual list of twice the
/// length whose second half is the first half reversed, so the reverse edges are never
/// materialised (that copy used to cost two array reallocations).
#[derive(Clone, Copy)]
struct Edges<'a> {
    src: &'a [u32],
    dst: &'a [u32],
    weights: Option<&'a [f32]>,
    symmetrize: bool,
}

impl Edges<'_> {
    fn len(&self) -> usize {
        self.src.len() * if self.symmetrize { 2 } else { 1 }
    }

    /// Edge `i` of the (virtual) list as `(source, target)`.
    #[inline]
    fn get(&self, i: usize) -> (u32, u32) {
        let m = self.src.len();
        if i < m { (self.src[i], self.dst[i]) } else { (self.dst[i - m], self.src[i - m]) }
    }

    #[inline]
    fn weight(&self, i: usize) -> f32 {
        self.weights.map_or(1.0, |w| w[i % self.src.len()])
    }
}

/// Edge lists up to this long are built by [`build_small`] on the calling thread.
const SMALL_EDGES: usize = 1 << 14;

/// [`CsrBuilder::build`] for short edge lists (the serving path's graphs of hundreds of edges):
/// one stable counting sort by target, then [`merge_row`] on each row, then the out-degrees,
/// all on the calling thread in exact-size buffers. The parallel [`sort_by_target`] is stable
/// too and merges rows with the same function, so both produce the same graph to the bit
/// (the proptest `build_matches_reference` builds every case both ways); this one skips its chunk histograms, regions and
/// rayon splits, which cost more than the sort itself on a few hundred edges.
fn build_small(n: usize, edges: Edges<'_>, self_loops: SelfLoops) -> Csr {
    let keep = |u: u32, v: u32| self_loops == SelfLoops::Keep || u != v;
    let mut start = vec![0usize; n + 1];
    for i in 0..edges.len() {
        let (u, v) = edges.get(i);
        if keep(u, v) {
            start[v as usize + 1] += 1;
        }
    }
    for v in 0..n {
        start[v + 1] += start[v];
    }
    let total = start[n];
    let mut sources = vec![0u32; total];
    let mut weights = edges.weights.map(|_| vec![0f32; total]);
    let mut cursor = start.clone();
    for i in 0..edges.len() {
        let (u, v) = edges.get(i);
        if keep(u, v) {
            let at = &mut cursor[v as usize];
            sources[*at] = u;
            if let Some(w) = weights.as_deref_mut() {
                w[*at] = edges.weight(i);
            }
            *at += 1;
        }
    }
    let mut scratch = Vec::new();
    let mut out_degree = vec![0u32; n];
    let offsets = Segment::build(n + 1, |o: &mut [u64]| {
        let mut write = 0;
        for v in 0..n {
            let (a, b) = (start[v], start[v + 1]);
            let merged = merge_row(&mut sources[a..b], weights.as_deref_mut().map(|w| &mut w[a..b]), &mut scratch);
            sources.copy_within(a..a + merged, write);
            if let Some(w) = weights.as_deref_mut() {
                w.copy_within(a..a + merged, write);
            }
            write += merged;
            o[v + 1] = write as u64;
        }
    });
    let edges = offsets[n] as usize;
    for &u in &sources[..edges] {
        out_degree[u as usize] += 1;
    }
    Csr {
        offsets,
        sources: Segment::from_slice(&sources[..edges]),
        weights: weights.map(|w| Segment::from_slice(&w[..edges])),
        out_degree: Segment::from_slice(&out_degree),
    }
}

/// Splits `s` into consecutive pieces of the given lengths.
fn split_lengths<T>(mut s: &mut [T], lens: impl IntoIterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for len in lens {
        let (head, tail) = std::mem::take(&mut s).split_at_mut(len);
        out.push(head);
        s = tail;
    }
    out
}

/// The heart of [`CsrBuilder::build`]: a parallel, stable two-level counting sort of the edges
/// by target, then per-row sorting by source with duplicates merged.
///
/// 1. The edges are cut into chunks; each chunk counts its edges per *bucket* of `2^shift`
///    consecutive targets, then scatters them (packed as `target << 32 | source`) into its own
///    region of each bucket. Regions are disjoint slices, so this runs in parallel without
///    atomics or `unsafe`, and with at most ~1024 buckets the scatter streams through memory.
/// 2. Each bucket is then sorted by target with a small local counting sort (its histogram fits
///    in cache), each row sorted by source and merged, and the bucket compacted in place — all
///    while the bucket is hot in cache, buckets in parallel.
/// 3. Offsets are a prefix sum of the merged row lengths; if nothing was merged, the sorted
///    buffer becomes the sources array as it is, else buckets are copied into place in parallel.
///
/// Both passes are stable (chunks keep input order within a bucket, the local sort keeps it
/// within a row), so duplicate weights are summed in input order, exactly as a sequential
/// counting sort would: the result does not depend on the thread count.
fn sort_by_target(
    n: usize,
    edges: Edges<'_>,
    self_loops: SelfLoops,
) -> (Segment<u64>, Segment<u32>, Option<Segment<f32>>) {
    let keep = |u: u32, v: u32| self_loops == SelfLoops::Keep || u != v;
    let weights = edges.weights;
    let m_in = edges.len();
    let shift = (usize::BITS - n.leading_zeros()).saturating_sub(10).max(12);
    let buckets = (n >> shift) + 1;
    let chunk = m_in.div_ceil(rayon::current_num_threads() * 4).max(1 << 16);
    let ranges: Vec<(usize, usize)> = (0..m_in).step_by(chunk).map(|a| (a, (a + chunk).min(m_in))).collect();

    // Pass 1: per-chunk bucket counts, then a scatter into (bucket, chunk) regions.
    let counts: Vec<Vec<usize>> = ranges
        .par_iter()
        .map(|&(a, b)| {
            let mut c = vec![0usize; buckets];
            for i in a..b {
                let (u, v) = edges.get(i);
                if keep(u, v) {
                    c[v as usize >> shift] += 1;
                }
            }
            c
        })
        .collect();
    let bucket_len: Vec<usize> = (0..buckets).map(|k| counts.iter().map(|c| c[k]).sum()).collect();
    let total: usize = bucket_len.iter().sum();
    // Aligned buffers rather than `Vec`s: they ask for transparent huge pages, which cuts the
    // page faults of these short-lived arrays (hundreds of MB at scale 20) by 512×.
    let mut keys_buf = AlignedBytes::zeroed(total * 8);
    let mut key_w_buf = AlignedBytes::zeroed(if weights.is_some() { total * 4 } else { 0 });
    let (keys, key_w) = (keys_buf.as_mut_typed::<u64>(), key_w_buf.as_mut_typed::<f32>());
    {
        let region_lens = || (0..buckets).flat_map(|k| counts.iter().map(move |c| c[k]));
        let mut key_regions: Vec<Vec<&mut [u64]>> = (0..ranges.len()).map(|_| Vec::with_capacity(buckets)).collect();
        for (i, r) in split_lengths(&mut *keys, region_lens()).into_iter().enumerate() {
            key_regions[i % ranges.len()].push(r);
        }
        let mut w_regions: Vec<Vec<&mut [f32]>> = (0..ranges.len()).map(|_| Vec::new()).collect();
        if weights.is_some() {
            for (i, r) in split_lengths(&mut *key_w, region_lens()).into_iter().enumerate() {
                w_regions[i % ranges.len()].push(r);
            }
        }
        ranges.par_iter().zip(key_regions).zip(w_regions).for_each(|((&(a, b), mut kr), mut wr)| {
            let mut cursor = vec![0usize; buckets];
            for i in a..b {
                let (u, v) = edges.get(i);
                if keep(u, v) {
                    let k = v as usize >> shift;
                    kr[k][cursor[k]] = (u64::from(v) << 32) | u64::from(u);
                    if weights.is_some() {
                        wr[k][cursor[k]] = edges.weight(i);
                    }
                    cursor[k] += 1;
                }
            }
        });
    }

    // Pass 2: per bucket, counting sort by target, sort and merge rows, compact in place.
    let mut sorted = AlignedBytes::zeroed(total * 4);
    let mut sorted_w = weights.map(|_| AlignedBytes::zeroed(total * 4));
    let mut lengths = vec![0u64; n];
    let mut kept = vec![0usize; buckets];
    {
        let out_s = split_lengths(sorted.as_mut_typed::<u32>(), bucket_len.iter().copied());
        let mut out_w: Vec<Option<&mut [f32]>> = match &mut sorted_w {
            Some(buf) => {
                split_lengths(buf.as_mut_typed::<f32>(), bucket_len.iter().copied()).into_iter().map(Some).collect()
            }
            None => (0..buckets).map(|_| None).collect(),
        };
        let in_w: Vec<&[f32]> = if weights.is_some() {
            let mut rest = &key_w[..];
            bucket_len
                .iter()
                .map(|&l| {
                    let (h, t) = rest.split_at(l);
                    rest = t;
                    h
                })
                .collect()
        } else {
            vec![&[]; buckets]
        };
        let in_keys: Vec<&[u64]> = {
            let mut rest = &keys[..];
            bucket_len
                .iter()
                .map(|&l| {
                    let (h, t) = rest.split_at(l);
                    rest = t;
                    h
                })
                .collect()
        };
        let rows_per_bucket = (0..buckets).map(|k| ((k + 1) << shift).min(n).saturating_sub(k << shift));
        let lens = split_lengths(&mut lengths, rows_per_bucket);
        in_keys
            .into_par_iter()
            .zip(in_w)
            .zip(out_s)
            .zip(out_w.par_drain(..))
            .zip(lens)
            .zip(kept.par_iter_mut())
            .enumerate()
            .for_each_init(Vec::new, |scratch, (k, (((((keys, w_in), out), mut w_out), lens), kept))| {
                let base = k << shift;
                let mut start = vec![0usize; lens.len() + 1];
                for &key in keys {
                    start[(key >> 32) as usize - base + 1] += 1;
                }
                for r in 0..lens.len() {
                    start[r + 1] += start[r];
                }
                let mut cursor = start.clone();
                for (i, &key) in keys.iter().enumerate() {
                    let r = (key >> 32) as usize - base;
                    out[cursor[r]] = key as u32;
                    if let Some(w) = w_out.as_deref_mut() {
                        w[cursor[r]] = w_in[i];
                    }
                    cursor[r] += 1;
                }
                let mut write = 0;
                for (r, len) in lens.iter_mut().enumerate() {
                    let (a, b) = (start[r], start[r + 1]);
                    let merged = merge_row(&mut out[a..b], w_out.as_deref_mut().map(|w| &mut w[a..b]), scratch);
                    if write != a {
                        out.copy_within(a..a + merged, write);
                        if let Some(w) = w_out.as_deref_mut() {
                            w.copy_within(a..a + merged, write);
                        }
                    }
                    *len = merged as u64;
                    write += merged;
                }
                *kept = write;
            });
    }
    drop((keys_buf, key_w_buf));

    let offsets = Segment::build(n + 1, |o: &mut [u64]| {
        for v in 0..n {
            o[v + 1] = o[v] + lengths[v];
        }
    });
    let edges = offsets[n] as usize;
    // Gathers each bucket's kept prefix into an exact-size buffer (only when rows were merged).
    fn compact<T: Pod + Default>(buf: AlignedBytes, bucket_len: &[usize], kept: &[usize], edges: usize) -> Segment<T> {
        if edges * std::mem::size_of::<T>() == buf.len() {
            return Segment::from_aligned(buf);
        }
        let all = Segment::<T>::from_aligned(buf);
        Segment::build(edges, |out: &mut [T]| {
            let mut from = Vec::with_capacity(kept.len());
            let mut at = 0;
            for (&len, &k) in bucket_len.iter().zip(kept) {
                from.push(&all[at..at + k]);
                at += len;
            }
            split_lengths(out, kept.iter().copied()).into_par_iter().zip(from).for_each(|(o, f)| o.copy_from_slice(f));
        })
    }
    let sources = compact::<u32>(sorted, &bucket_len, &kept, edges);
    let weights = sorted_w.map(|w| compact::<f32>(w, &bucket_len, &kept, edges));
    (offsets, sources, weights)
}

/// Sorts one row by source and merges duplicates (summing weights); returns the new length.
/// `scratch` is reused across rows for the (source, weight) pairs of weighted rows.
fn merge_row(s: &mut [u32], w: Option<&mut [f32]>, scratch: &mut Vec<(u32, f32)>) -> usize {
    if s.is_empty() {
        return 0;
    }
    match w {
        None => {
            s.sort_unstable();
            let mut k = 0;
            for i in 1..s.len() {
                if s[i] != s[k] {
                    k += 1;
                    s[k] = s[i];
                }
            }
            k + 1
        }
        Some(w) => {
            // Stable sort keeps duplicate weights in input order, so their sum is deterministic.
            scratch.clear();
            scratch.extend(s.iter().copied().zip(w.iter().copied()));
            scratch.sort_by_key(|p| p.0);
            let mut k = 0;
            s[0] = scratch[0].0;
            w[0] = scratch[0].1;
            for &(u, x) in &scratch[1..] {
                if u == s[k] {
                    w[k] += x;
                } else {
                    k += 1;
                    s[k] = u;
                    w[k] = x;
                }
            }
            k + 1
        }
    }
}

/// Why edges could not be built into a graph.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("vertex id {id} is not below the declared vertex count {vertices}")]
    IdOutOfRange { id: u32, vertices: u64 },
    #[error("graph has {0} vertices, more than the {MAX_VERTICES} that u32 ids allow")]
    TooManyVertices(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(edges: &[(u32, u32)], f: impl FnOnce(CsrBuilder) -> CsrBuilder) -> Csr {
        let mut b = f(CsrBuilder::new());
        for &(u, v) in edges {
            b.push(u, v, None);
        }
        b.build().unwrap()
    }

    #[test]
    fn rows_are_in_edges_sorted_and_merged() {
        let g = build(&[(2, 0), (1, 0), (2, 0), (0, 1), (1, 1)], |b| b);
        assert_eq!(g.vertices(), 3);
        assert_eq!(g.in_neighbours(0), &[1, 2]);
        assert_eq!(g.in_neighbours(1), &[0, 1]);
        assert_eq!(g.in_neighbours(2), &[] as &[u32]);
        assert_eq!(&**g.out_degree(), &[1, 2, 1]);
    }

    #[test]
    fn self_loops_dropped_and_symmetrized() {
        let g = build(&[(0, 1), (1, 1), (1, 2)], |b| b.symmetrize(true).self_loops(SelfLoops::Drop));
        assert_eq!(g.in_neighbours(1), &[0, 2]);
        assert_eq!(g.edges(), 4);
    }

    #[test]
    fn weighted_duplicates_sum() {
        let mut b = CsrBuilder::weighted();
        b.push(0, 1, Some(0.5));
        b.push(0, 1, Some(0.25));
        b.push(2, 1, Some(1.0));
        let g = b.build().unwrap();
        assert_eq!(g.in_weights(1), Some(&[0.75f32, 1.0][..]));
    }

    #[test]
    fn isolated_vertices_from_declared_count() {
        let g = build(&[(0, 1)], |b| b.vertices(5));
        assert_eq!(g.vertices(), 5);
        assert_eq!(g.edges(), 1);
    }

    #[test]
    fn declared_count_too_small_is_an_error() {
        let mut b = CsrBuilder::new().vertices(2);
        b.push(0, 7, None);
        assert_eq!(b.build(), Err(BuildError::IdOutOfRange { id: 7, vertices: 2 }));
    }

    #[test]
    fn from_parts_rejects_bad_arrays() {
        let ok = build(&[(0, 1), (1, 0)], |b| b);
        let bad_src = Segment::from_slice(&[5u32, 0]);
        let err = Csr::from_parts(ok.offsets().clone(), bad_src, None, ok.out_degree().clone());
        assert!(matches!(err, Err(CsrError::SourceOutOfRange { .. })));
        let bad_off = Segment::from_slice(&[0u64, 2, 1]);
        let err = Csr::from_parts(bad_off, ok.sources().clone(), None, ok.out_degree().clone());
        assert!(matches!(err, Err(CsrError::OffsetsDecrease { row: 1 })));
        assert!(Csr::from_parts(ok.offsets().clone(), ok.sources().clone(), None, ok.out_degree().clone()).is_ok());
    }

    /// The builder against a straightforward reference: a sorted map of (target, source) to
    /// the weights summed in input order.
    fn reference(edges: &[(u32, u32, f32)], n: u64, symmetrize: bool, loops: SelfLoops) -> Vec<(u32, u32, f32)> {
        let mut all: Vec<(u32, u32, f32)> = edges.to_vec();
        if symmetrize {
            all.extend(edges.iter().map(|&(u, v, w)| (v, u, w)));
        }
        let mut map = std::collections::BTreeMap::<(u32, u32), f32>::new();
        for (u, v, w) in all {
            if loops == SelfLoops::Keep || u != v {
                *map.entry((v, u)).or_insert(0.0) += w;
            }
        }
        assert!(map.keys().all(|&(v, u)| u64::from(v.max(u)) < n));
        map.into_iter().map(|((v, u), w)| (u, v, w)).collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn build_matches_reference(
            edges in proptest::collection::vec((0u32..20_000, 0u32..20_000, 0u32..8), 0..3000),
            hub in 0u32..20_000,
            symmetrize: bool,
            drop_loops: bool,
            weighted: bool,
        ) {
            // Many edges into one hub and repeated pairs exercise long rows and merging.
            let mut edges: Vec<(u32, u32, f32)> = edges.into_iter().map(|(u, v, w)| (u, v, w as f32 * 0.1)).collect();
            let extra: Vec<_> = edges.iter().take(500).map(|&(u, _, w)| (u % 50, hub, w)).collect();
            edges.extend(extra);
            // And one vertex with an out-degree past the 256 of a byte counter.
            edges.extend((0..edges.len().min(700) as u32).map(|t| (hub / 2, (t * 31) % 20_000, 0.5)));
            let loops = if drop_loops { SelfLoops::Drop } else { SelfLoops::Keep };
            let mut b = if weighted { CsrBuilder::weighted() } else { CsrBuilder::new() };
            b = b.vertices(20_000).symmetrize(symmetrize).self_loops(loops);
            for &(u, v, w) in &edges {
                b.push(u, v, Some(w));
            }
            // The serial path for short lists and the parallel one build the same graph.
            let g = b.clone().build_from(usize::MAX).unwrap();
            let parallel = b.build_from(0).unwrap();
            proptest::prop_assert_eq!(&g, &parallel);
            let bits = |w: Option<&Segment<f32>>| w.map(|w| w.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            proptest::prop_assert_eq!(bits(g.weights()), bits(parallel.weights()));
            let expect = reference(&edges, 20_000, symmetrize, loops);
            let got: Vec<(u32, u32, f32)> = g.edges_iter().map(|(u, v, w)| (u, v, w.unwrap_or(0.0))).collect();
            proptest::prop_assert_eq!(got.len(), expect.len());
            for (a, e) in got.iter().zip(&expect) {
                proptest::prop_assert_eq!((a.0, a.1), (e.0, e.1));
                if weighted {
                    proptest::prop_assert_eq!(a.2.to_bits(), e.2.to_bits());
                }
            }
            // The graph passes its own validation (out-degrees, sortedness).
            let again = Csr::from_parts(g.offsets().clone(), g.sources().clone(), g.weights().cloned(), g.out_degree().clone());
            proptest::prop_assert!(again.is_ok());
        }
    }

    #[test]
    fn out_degree_check_sees_past_byte_counters() {
        // Vertex 0 points at 600 others: its counter wraps twice.
        let edges: Vec<(u32, u32)> = (1..=600).map(|v| (0, v)).collect();
        let g = build(&edges, |b| b);
        assert_eq!(g.out_degree()[0], 600);
        let mut wrong = g.out_degree().to_vec();
        wrong[0] = 600 - 256;
        let err = Csr::from_parts(g.offsets().clone(), g.sources().clone(), None, Segment::from_slice(&wrong));
        assert_eq!(err, Err(CsrError::OutDegreeMismatch { vertex: 0 }));
    }

    #[test]
    fn empty_graph() {
        let g = CsrBuilder::new().build().unwrap();
        assert_eq!((g.vertices(), g.edges()), (0, 0));
    }
}

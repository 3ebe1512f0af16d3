//! The partitioner: contiguous vertex ranges, local renumbering, halos and mirrors.
//!
//! A graph is cut into `P` contiguous ranges of vertices balanced on `α·|V| + |E|` (Gemini's
//! chunking, Zhu et al., OSDI 2016): the cost of a range is `α` per owned vertex plus one per
//! in-edge of its rows, and boundary `p` is the first vertex where the running cost reaches
//! `⌊p · total / P⌋`. The default `α = 8·(P − 1)` is Gemini's; it only matters when degrees are
//! very uneven. Ranges may be empty when `P` exceeds what the graph can fill.
//!
//! Each [`Partition`] renumbers the vertices it touches: its owned vertices first (local id
//! `g − first`, in global order), then its *halo* — the other partitions' vertices that appear
//! in its rows — sorted by global id. Because ranges are contiguous, the halo values coming from
//! one owner occupy one contiguous run of halo slots ([`HaloSource`]). Each owner keeps, for every
//! partition that reads from it, a [`Mirror`] list: which of its owned vertices that partition
//! needs, in the reader's halo order. A superstep's exchange is therefore: every owner packs
//! `values[mirror.vertices]` into one buffer per reader, and the reader copies that buffer
//! verbatim into `halo slots`. The in-process runner in [`crate::kernels`] does exactly that; the
//! distributed executor sends the same buffers over QUIC.
//!
//! **Row order is preserved.** A local row lists its in-neighbours in the *global* CSR order (by
//! ascending global id), merely translated to local ids. Local ids are not monotone in global id
//! (halo vertices below the owned range come after the owned ones), so local rows are generally
//! not sorted by local id — and must not be re-sorted, or the determinism contract (a row's value
//! is a function of its in-neighbour list in CSR order) would break across partitionings.
//!
//! With `P = 1` the single partition shares the graph's arrays (no copy) and has no halo.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use crate::buf::Segment;
use crate::csr::Csr;
use crate::generate::reorder::Renaming;
use crate::kernels::pull::PullPlan;

/// Why a graph could not be partitioned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    #[error("partition count must be at least 1")]
    ZeroParts,
    #[error("local graph is inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// A graph cut into partitions, in order of their vertex ranges.
#[derive(Debug)]
pub struct Partitioning {
    /// `P + 1` boundaries: partition `p` owns global vertices `bounds[p]..bounds[p + 1]`.
    pub bounds: Vec<u32>,
    /// The partitions.
    pub parts: Vec<Partition>,
}

/// One partition: its owned range, its local graph, and its halo and mirror lists.
#[derive(Debug)]
pub struct Partition {
    /// Position in [`Partitioning::parts`].
    pub index: usize,
    /// The rows (local graph) with local ids.
    pub graph: LocalGraph,
    /// Global ids of the halo vertices, ascending; halo vertex `i` has local id `owned + i`.
    pub halo: Vec<u32>,
    /// Where each owner's values land among my halo slots, ordered by owner.
    pub halo_sources: Vec<HaloSource>,
    /// For each partition that reads my values, which owned (local) vertices it needs, ordered by reader.
    pub mirrors: Vec<Mirror>,
}

/// The halo values partition `owner` sends me: local slots `slots` (all in the halo part).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaloSource {
    pub owner: usize,
    pub slots: Range<u32>,
}

/// The owned vertices (local ids, ascending) whose values partition `reader` needs, in the order
/// of `reader`'s halo slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub reader: usize,
    pub vertices: Vec<u32>,
}

/// A partition's rows in local numbering: owned vertices `0..owned`, halo vertices
/// `owned..locals`.
///
/// Sources are local ids, each row in global CSR order (see the module docs). Degrees are the
/// *global* degrees of every local vertex (owned and halo), which kernels need to normalise
/// values they pull from the halo.
///
/// Invariant (kernels index without bounds checks on it): every source is below `locals`, and
/// the offsets run monotonically from 0 to the number of sources. Every constructor guarantees
/// it: [`LocalGraph::whole`] inherits it from a validated [`Csr`], the partitioner builds it, and
/// [`LocalGraph::from_parts`] checks it.
#[derive(Clone, Debug)]
pub struct LocalGraph {
    first: u32,
    owned: usize,
    locals: usize,
    offsets: Segment<u64>,
    sources: Segment<u32>,
    out_degree: Segment<u32>,
    in_degree: Segment<u32>,
    /// The pull sum's layout of these rows, built on first use and shared by every clone (a
    /// partition kept for later jobs keeps its plan too).
    pull: Arc<OnceLock<Arc<PullPlan>>>,
}

impl LocalGraph {
    /// The whole graph as one partition, sharing its arrays.
    pub fn whole(g: &Csr) -> Self {
        let in_degree = Segment::build(g.vertices(), |d: &mut [u32]| {
            d.par_iter_mut().enumerate().for_each(|(v, d)| *d = (g.offsets()[v + 1] - g.offsets()[v]) as u32)
        });
        Self {
            first: 0,
            owned: g.vertices(),
            locals: g.vertices(),
            offsets: g.offsets().clone(),
            sources: g.sources().clone(),
            out_degree: g.out_degree().clone(),
            in_degree,
            pull: Arc::default(),
        }
    }

    /// The whole graph with its vertices renamed by descending out-degree (ties by ascending
    /// id), and that renaming. Each row keeps its in-neighbour list in the original CSR order,
    /// only translated to the new names, so a kernel computes every row's bits exactly as on the
    /// original graph (the determinism contract), while the values most rows read sit together
    /// at the front of its vectors.
    pub fn by_out_degree(g: &Csr) -> (Self, Renaming) {
        let n = g.vertices();
        let out = g.out_degree();
        let renaming = Renaming::by_out_degree(out);
        let (order, rank) = (&renaming.order, &renaming.rank);
        let old_off = g.offsets();
        let len = |new: usize| {
            let old = order[new] as usize;
            (old_off[old + 1] - old_off[old]) as u32
        };
        let in_degree = Segment::build(n, |d: &mut [u32]| d.par_iter_mut().enumerate().for_each(|(v, d)| *d = len(v)));
        let out_degree = Segment::build(n, |d: &mut [u32]| {
            d.par_iter_mut().enumerate().for_each(|(v, d)| *d = out[order[v] as usize])
        });
        let offsets = Segment::build(n + 1, |o: &mut [u64]| {
            for v in 0..n {
                o[v + 1] = o[v] + in_degree[v] as u64;
            }
        });
        // Rows in blocks filled in parallel, each block a disjoint run of the sources.
        const BLOCK: usize = 1 << 12;
        let sources = Segment::build(g.edges(), |s: &mut [u32]| {
            let mut blocks = Vec::with_capacity(n.div_ceil(BLOCK));
            let mut rest = s;
            for b in (0..n).step_by(BLOCK) {
                let end = (b + BLOCK).min(n);
                let (block, tail) = rest.split_at_mut((offsets[end] - offsets[b]) as usize);
                blocks.push((b..end, block));
                rest = tail;
            }
            blocks.into_par_iter().for_each(|(rows, block)| {
                let base = offsets[rows.start];
                for v in rows {
                    let old = order[v] as usize;
                    let list = &g.sources()[old_off[old] as usize..old_off[old + 1] as usize];
                    let at = (offsets[v] - base) as usize;
                    for (o, &u) in block[at..at + list.len()].iter_mut().zip(list) {
                        *o = rank[u as usize];
                    }
                }
            });
        });
        let graph =
            Self { first: 0, owned: n, locals: n, offsets, sources, out_degree, in_degree, pull: Arc::default() };
        (graph, renaming)
    }

    /// Assembles a local graph from arrays (for instance received from a peer), checking the
    /// invariant the kernels rely on: `offsets` has `owned + 1` entries rising from 0 to
    /// `sources.len()`, every source is below `locals`, both degree arrays have `locals` entries,
    /// `owned ≤ locals` and the owned range fits in `u32` ids.
    pub fn from_parts(
        first: u32,
        owned: usize,
        offsets: Segment<u64>,
        sources: Segment<u32>,
        out_degree: Segment<u32>,
        in_degree: Segment<u32>,
    ) -> Result<Self, PartitionError> {
        let bad = |why| Err(PartitionError::Inconsistent(why));
        let locals = out_degree.len();
        if in_degree.len() != locals {
            return bad("out- and in-degree arrays differ in length");
        }
        if owned > locals || first as u64 + owned as u64 > u32::MAX as u64 {
            return bad("owned range does not fit");
        }
        if offsets.len() != owned + 1 || offsets[0] != 0 || offsets[owned] != sources.len() as u64 {
            return bad("offsets do not span the sources");
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) {
            return bad("offsets decrease");
        }
        if sources.par_iter().any(|&u| u as usize >= locals) {
            return bad("a source is not a local vertex");
        }
        Ok(Self { first, owned, locals, offsets, sources, out_degree, in_degree, pull: Arc::default() })
    }

    /// The pull sum's layout of these rows ([`PullPlan`]), built on the calling thread the first
    /// time any clone of this graph asks, then shared.
    pub(crate) fn pull_plan(&self) -> Arc<PullPlan> {
        self.pull.get_or_init(|| Arc::new(PullPlan::new(self))).clone()
    }

    /// Bytes of the pull plan, if it has been built.
    pub fn pull_plan_bytes(&self) -> usize {
        self.pull.get().map_or(0, |p| p.bytes())
    }

    /// The arrays, as shared segments (for sending a partition without copying it):
    /// offsets, sources, out-degrees, in-degrees.
    pub fn segments(&self) -> (&Segment<u64>, &Segment<u32>, &Segment<u32>, &Segment<u32>) {
        (&self.offsets, &self.sources, &self.out_degree, &self.in_degree)
    }

    /// Global id of owned vertex 0.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// Global ids of the owned vertices.
    pub fn owned_range(&self) -> Range<u32> {
        self.first..self.first + self.owned as u32
    }

    /// Number of owned vertices (rows).
    pub fn owned(&self) -> usize {
        self.owned
    }

    /// Number of local vertices: owned plus halo.
    pub fn locals(&self) -> usize {
        self.locals
    }

    /// Number of in-edges of the owned rows.
    pub fn edges(&self) -> usize {
        self.sources.len()
    }

    /// Row offsets, `owned + 1` entries starting at 0.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// Concatenated rows of local source ids, every id below [`LocalGraph::locals`].
    pub fn sources(&self) -> &[u32] {
        &self.sources
    }

    /// Global out-degree of every local vertex.
    pub fn out_degree(&self) -> &[u32] {
        &self.out_degree
    }

    /// Global in-degree of every local vertex.
    pub fn in_degree(&self) -> &[u32] {
        &self.in_degree
    }

    /// The local sources of owned row `row`.
    pub fn row(&self, row: usize) -> &[u32] {
        &self.sources[self.offsets[row] as usize..self.offsets[row + 1] as usize]
    }
}

/// Gemini's default vertex weight for `parts` partitions.
pub fn default_alpha(parts: usize) -> u64 {
    8 * (parts as u64).saturating_sub(1)
}

/// The `parts + 1` boundaries of contiguous ranges balanced on `alpha·|V| + |E|`.
pub fn boundaries(g: &Csr, parts: usize, alpha: u64) -> Result<Vec<u32>, PartitionError> {
    if parts == 0 {
        return Err(PartitionError::ZeroParts);
    }
    let n = g.vertices();
    let offsets = g.offsets();
    let cost = |v: usize| alpha as u128 * v as u128 + offsets[v] as u128;
    let total = cost(n);
    let mut bounds = Vec::with_capacity(parts + 1);
    for p in 0..=parts {
        let target = total * p as u128 / parts as u128;
        // First vertex whose prefix cost reaches the target (cost is non-decreasing).
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if cost(mid) < target { lo = mid + 1 } else { hi = mid }
        }
        bounds.push(lo as u32);
    }
    bounds[parts] = n as u32;
    Ok(bounds)
}

/// Cuts `g` into `parts` partitions with Gemini's default `α`.
pub fn partition(g: &Csr, parts: usize) -> Result<Partitioning, PartitionError> {
    partition_with_alpha(g, parts, default_alpha(parts))
}

/// Cuts `g` into `parts` partitions balanced on `alpha·|V| + |E|`.
pub fn partition_with_alpha(g: &Csr, parts: usize, alpha: u64) -> Result<Partitioning, PartitionError> {
    Ok(partition_at(g, boundaries(g, parts, alpha)?))
}

impl Partitioning {
    /// One partition holding `graph` whole (no halo).
    pub fn single(graph: LocalGraph) -> Self {
        let bounds = vec![0, graph.owned as u32];
        let part = Partition { index: 0, graph, halo: Vec::new(), halo_sources: Vec::new(), mirrors: Vec::new() };
        Partitioning { bounds, parts: vec![part] }
    }
}

/// Cuts `g` at `bounds` (`P + 1` ascending vertex ids from 0 to the vertex count, as
/// [`boundaries`] gives them).
pub fn partition_at(g: &Csr, bounds: Vec<u32>) -> Partitioning {
    assert!(
        bounds.len() >= 2 && bounds[0] == 0 && bounds.last() == Some(&(g.vertices() as u32)),
        "partition boundaries must run from 0 to the vertex count"
    );
    let parts = bounds.len() - 1;
    if parts == 1 {
        return Partitioning::single(LocalGraph::whole(g));
    }
    let mut built: Vec<Partition> =
        (0..parts).map(|p| build_partition(g, p, bounds[p]..bounds[p + 1], &bounds)).collect();
    // Mirrors are the transpose of halo sources: what reader p takes from owner q.
    for p in 0..parts {
        for k in 0..built[p].halo_sources.len() {
            let HaloSource { owner, slots } = built[p].halo_sources[k].clone();
            let owned = built[p].graph.owned as u32;
            let first = built[owner].graph.first;
            let vertices = built[p].halo[(slots.start - owned) as usize..(slots.end - owned) as usize]
                .iter()
                .map(|&g| g - first)
                .collect();
            built[owner].mirrors.push(Mirror { reader: p, vertices });
        }
    }
    Partitioning { bounds, parts: built }
}

fn build_partition(g: &Csr, index: usize, range: Range<u32>, bounds: &[u32]) -> Partition {
    let (first, end) = (range.start as usize, range.end as usize);
    let owned = end - first;
    let all = g.offsets();
    let base = all[first];
    let global_rows = &g.sources()[base as usize..all[end] as usize];
    // Halo: every source outside the owned range, ascending and once each. A bitmap over all
    // vertices marks them (one pass over the rows, in parallel); reading it in order yields the
    // sorted, deduplicated list without sorting the tens of millions of raw sources.
    let seen: Vec<AtomicU64> = (0..g.vertices().div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    global_rows.par_chunks(1 << 16).for_each(|chunk| {
        for &u in chunk {
            if !range.contains(&u) {
                let (word, bit) = (&seen[(u >> 6) as usize], 1u64 << (u & 63));
                if word.load(Ordering::Relaxed) & bit == 0 {
                    word.fetch_or(bit, Ordering::Relaxed);
                }
            }
        }
    });
    let mut halo: Vec<u32> = Vec::new();
    for (w, word) in seen.iter().enumerate() {
        let mut bits = word.load(Ordering::Relaxed);
        while bits != 0 {
            halo.push((w as u32) << 6 | bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    drop(seen);
    // Local id of each halo vertex, indexed by global id (only halo entries are ever read).
    let mut slot = vec![0u32; g.vertices()];
    for (i, &u) in halo.iter().enumerate() {
        slot[u as usize] = (owned + i) as u32;
    }
    let local_of = |u: u32| -> u32 { if range.contains(&u) { u - range.start } else { slot[u as usize] } };
    let sources = Segment::build(global_rows.len(), |out: &mut [u32]| {
        out.par_chunks_mut(1 << 16).zip(global_rows.par_chunks(1 << 16)).for_each(|(o, s)| {
            for (o, &u) in o.iter_mut().zip(s) {
                *o = local_of(u);
            }
        })
    });
    drop(slot);
    let offsets = Segment::build(owned + 1, |o: &mut [u64]| {
        for (o, &x) in o.iter_mut().zip(&all[first..=end]) {
            *o = x - base;
        }
    });
    let locals = owned + halo.len();
    let global_of = |l: usize| if l < owned { (first + l) as u32 } else { halo[l - owned] };
    let out_degree = Segment::build(locals, |d: &mut [u32]| {
        d.iter_mut().enumerate().for_each(|(l, d)| *d = g.out_degree()[global_of(l) as usize])
    });
    let in_degree = Segment::build(locals, |d: &mut [u32]| {
        d.iter_mut().enumerate().for_each(|(l, d)| {
            let v = global_of(l) as usize;
            *d = (all[v + 1] - all[v]) as u32
        })
    });
    // Halo vertices grouped by owner: contiguous because halo is sorted and ranges are contiguous.
    let mut halo_sources = Vec::new();
    let mut i = 0;
    while i < halo.len() {
        let owner = bounds.partition_point(|&b| b <= halo[i]) - 1;
        let end = i + halo[i..].partition_point(|&u| u < bounds[owner + 1]);
        halo_sources.push(HaloSource { owner, slots: (owned + i) as u32..(owned + end) as u32 });
        i = end;
    }
    Partition {
        index,
        graph: LocalGraph {
            first: range.start,
            owned,
            locals,
            offsets,
            sources,
            out_degree,
            in_degree,
            pull: Arc::default(),
        },
        halo,
        halo_sources,
        mirrors: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate;

    #[test]
    fn ranges_cover_and_balance() {
        let g = generate::kronecker(10, 16, 1).unwrap();
        for parts in [1, 2, 3, 7, 16] {
            let b = boundaries(&g, parts, default_alpha(parts)).unwrap();
            assert_eq!((b[0], b[parts]), (0, g.vertices() as u32));
            assert!(b.windows(2).all(|w| w[0] <= w[1]));
            let alpha = default_alpha(parts) as f64;
            let cost = |p: usize| {
                let (a, z) = (b[p] as usize, b[p + 1] as usize);
                alpha * (z - a) as f64 + (g.offsets()[z] - g.offsets()[a]) as f64
            };
            let ideal = (0..parts).map(cost).sum::<f64>() / parts as f64;
            // One row's cost at most beyond the ideal share.
            let max_row = (0..g.vertices()).map(|v| g.in_neighbours(v as u32).len()).max().unwrap() as f64 + alpha;
            assert!((0..parts).all(|p| cost(p) <= ideal + max_row), "parts={parts}");
        }
    }

    #[test]
    fn local_rows_translate_global_rows() {
        let g = generate::grid(7, 9, true).unwrap();
        let ps = partition(&g, 4).unwrap();
        for p in &ps.parts {
            let lg = &p.graph;
            let global_of =
                |l: u32| if (l as usize) < lg.owned() { lg.first() + l } else { p.halo[l as usize - lg.owned()] };
            for row in 0..lg.owned() {
                let v = lg.first() + row as u32;
                let back: Vec<u32> = lg.row(row).iter().map(|&l| global_of(l)).collect();
                assert_eq!(back, g.in_neighbours(v));
                for &l in lg.row(row) {
                    assert_eq!(lg.out_degree()[l as usize], g.out_degree()[global_of(l) as usize]);
                }
            }
            // Mirrors of the owner match my halo slots.
            for hs in &p.halo_sources {
                let owner = &ps.parts[hs.owner];
                let m = owner.mirrors.iter().find(|m| m.reader == p.index).unwrap();
                let want: Vec<u32> = hs.slots.clone().map(global_of).collect();
                let got: Vec<u32> = m.vertices.iter().map(|&l| owner.graph.first() + l).collect();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn from_parts_checks_the_invariant() {
        let g = generate::grid(3, 3, false).unwrap();
        let ps = partition(&g, 2).unwrap();
        let lg = &ps.parts[1].graph;
        let (o, s, od, id) = lg.segments();
        let ok = LocalGraph::from_parts(lg.first(), lg.owned(), o.clone(), s.clone(), od.clone(), id.clone());
        assert_eq!(ok.unwrap().sources(), lg.sources());
        let short = Segment::from_slice(&od[..od.len() - 1]);
        let err = LocalGraph::from_parts(lg.first(), lg.owned(), o.clone(), s.clone(), short.clone(), short);
        assert!(matches!(err, Err(PartitionError::Inconsistent(_))));
        let mut bad: Vec<u32> = s.to_vec();
        bad[0] = lg.locals() as u32;
        let err = LocalGraph::from_parts(
            lg.first(),
            lg.owned(),
            o.clone(),
            Segment::from_slice(&bad),
            od.clone(),
            id.clone(),
        );
        assert_eq!(err.unwrap_err(), PartitionError::Inconsistent("a source is not a local vertex"));
    }

    proptest::proptest! {
        /// Any graph, any partition count: local rows are the global rows renamed, halos and
        /// mirrors agree, and PageRank is bit-identical to the single-partition run.
        #[test]
        fn partitions_preserve_rows_and_results(
            edges in proptest::collection::vec((0u32..40, 0u32..40), 0..200),
            parts in 1usize..9,
            alpha in 0u64..20,
        ) {
            let mut b = crate::csr::CsrBuilder::new().vertices(40);
            for &(u, v) in &edges {
                b.push(u, v, None);
            }
            let g = b.build().unwrap();
            let ps = partition_with_alpha(&g, parts, alpha).unwrap();
            for p in &ps.parts {
                let lg = &p.graph;
                let global_of = |l: u32| if (l as usize) < lg.owned() { lg.first() + l } else { p.halo[l as usize - lg.owned()] };
                for row in 0..lg.owned() {
                    let back: Vec<u32> = lg.row(row).iter().map(|&l| global_of(l)).collect();
                    proptest::prop_assert_eq!(&back[..], g.in_neighbours(lg.first() + row as u32));
                }
                for hs in &p.halo_sources {
                    let m = ps.parts[hs.owner].mirrors.iter().find(|m| m.reader == p.index).unwrap();
                    proptest::prop_assert_eq!(m.vertices.len(), hs.slots.len());
                }
            }
            let k = crate::kernels::PageRank {
                damping: 0.85,
                teleport: crate::kernels::Teleport::Uniform { vertices: 40 },
            };
            let stop = crate::kernels::Stop::iterations(5);
            let one = crate::kernels::run_partitioned(&k, &partition(&g, 1).unwrap(), stop);
            let many = crate::kernels::run_partitioned(&k, &ps, stop);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            proptest::prop_assert_eq!(bits(&one.values), bits(&many.values));
        }
    }

    #[test]
    fn more_parts_than_rows_gives_empty_partitions() {
        let g = generate::grid(1, 3, false).unwrap();
        let ps = partition(&g, 4).unwrap();
        assert_eq!(ps.parts.iter().map(|p| p.graph.owned()).sum::<usize>(), 3);
        assert_eq!(partition(&g, 0).unwrap_err(), PartitionError::ZeroParts);
    }
}

//! What a job puts on the wire, and the checks on what comes off it.
//!
//! A partition travels as one zero-copy frame ([`OwnedPart::to_frame`]): the local graph's four
//! arrays as they are, then its halo and mirror lists and (APPNP) the owned feature rows. The
//! receiver views every array in place ([`OwnedPart::from_frame`]) and checks everything the
//! kernels index with before a worker touches it: a hostile or corrupt frame is an error naming
//! the array and the reason, never a panic or an out-of-bounds read.

use quiver_compute::kernels::superstep::{ExactSum, Partials};
use quiver_compute::kernels::{Heat, Normalization, PageRank, Teleport};
use quiver_compute::partition::{HaloSource, LocalGraph, Mirror, Partition};
use quiver_compute::{Pod, Segment};
use quiver_proto::peer::{JobPlan, PartitionMeta, StepPartials, frame_header};

use crate::transport::{InFrame, NodeId, OutFrame};

/// The kernel of a job, owning everything it needs (features travel with the partition).
#[derive(Clone, Debug)]
pub enum KernelSpec {
    /// PageRank or personalized PageRank.
    PageRank(PageRank),
    /// The heat kernel.
    Heat(Heat),
    /// APPNP. With `feature_seed`, each owner generates the feature rows of its own vertices
    /// (`generate::feature_rows`); without, they travel with the partition ([`OwnedPart::features`]).
    Appnp { alpha: f32, normalization: Normalization, dim: usize, feature_seed: Option<u64> },
}

impl KernelSpec {
    /// `f32` values per vertex.
    pub fn width(&self) -> usize {
        match self {
            KernelSpec::Appnp { dim, .. } => *dim,
            _ => 1,
        }
    }

    /// Whether each partition frame must carry feature rows.
    pub fn ships_features(&self) -> bool {
        matches!(self, KernelSpec::Appnp { feature_seed: None, .. })
    }

    /// The plan an owner receives.
    pub fn to_plan(&self, vertices: u64, owners: &[NodeId]) -> JobPlan {
        let owners = owners.iter().map(|n| n.0).collect();
        let (kernel, coefficient, seeds, symmetric, feature_seed) = match self {
            KernelSpec::PageRank(k) => match &k.teleport {
                Teleport::Uniform { .. } => ("pagerank", k.damping, vec![], false, None),
                Teleport::Seeds(s) => ("ppr", k.damping, s.clone(), false, None),
            },
            KernelSpec::Heat(k) => ("heat", k.t, k.seeds.clone(), false, None),
            KernelSpec::Appnp { alpha, normalization, feature_seed, .. } => {
                let symmetric = *normalization == Normalization::Symmetric;
                ("appnp", f64::from(*alpha), vec![], symmetric, *feature_seed)
            }
        };
        JobPlan {
            feature_seed,
            kernel: kernel.into(),
            coefficient,
            seeds,
            vertices,
            width: self.width() as u32,
            symmetric,
            owners,
            ..Default::default()
        }
    }

    /// Reads a plan back, checking what the kernels rely on (seeds sorted, unique and in range).
    pub fn from_plan(plan: &JobPlan) -> Result<Self, String> {
        let seeds = || -> Result<Vec<u32>, String> {
            if plan.seeds.is_empty() {
                return Err(format!("plan: {} needs seeds", plan.kernel));
            }
            if plan.seeds.windows(2).any(|w| w[0] >= w[1]) {
                return Err("plan: seeds are not sorted and unique".into());
            }
            if plan.seeds.last().is_some_and(|&s| u64::from(s) >= plan.vertices) {
                return Err(format!("plan: a seed is not below the vertex count {}", plan.vertices));
            }
            Ok(plan.seeds.clone())
        };
        let c = plan.coefficient;
        if !c.is_finite() {
            return Err(format!("plan: coefficient {c} is not a number"));
        }
        Ok(match plan.kernel.as_str() {
            "pagerank" => {
                KernelSpec::PageRank(PageRank { damping: c, teleport: Teleport::Uniform { vertices: plan.vertices } })
            }
            "ppr" => KernelSpec::PageRank(PageRank { damping: c, teleport: Teleport::Seeds(seeds()?) }),
            "heat" => KernelSpec::Heat(Heat { t: c, seeds: seeds()?, vertices: plan.vertices }),
            "appnp" => {
                if plan.width == 0 {
                    return Err("plan: appnp width is 0".into());
                }
                KernelSpec::Appnp {
                    alpha: c as f32,
                    normalization: if plan.symmetric { Normalization::Symmetric } else { Normalization::RandomWalk },
                    dim: plan.width as usize,
                    feature_seed: plan.feature_seed,
                }
            }
            other => return Err(format!("plan: unknown kernel {other:?}")),
        })
    }
}

/// One partition as its owner holds it: the local graph, where its halo comes from, who reads
/// its values, and (APPNP) the feature rows of its owned vertices.
#[derive(Clone, Debug)]
pub struct OwnedPart {
    pub index: u32,
    pub graph: LocalGraph,
    pub halo_sources: Vec<HaloSource>,
    pub mirrors: Vec<Mirror>,
    pub features: Option<Segment<f32>>,
}

impl OwnedPart {
    /// A partition cut in this process (no copy of the graph arrays).
    pub fn from_partition(p: &Partition, features: Option<Segment<f32>>) -> Self {
        Self {
            index: p.index as u32,
            graph: p.graph.clone(),
            halo_sources: p.halo_sources.clone(),
            mirrors: p.mirrors.clone(),
            features,
        }
    }

    /// Whether this partition owns exactly the vertices `range`.
    pub fn owns(&self, range: &std::ops::Range<u32>) -> bool {
        self.graph.first() == range.start && self.graph.owned() == range.len()
    }

    /// The partition as one frame: graph arrays shared, not copied.
    pub fn to_frame(&self, graph_digest: &[u8]) -> OutFrame {
        let g = &self.graph;
        let meta = PartitionMeta {
            partition: self.index,
            first_vertex: u64::from(g.first()),
            local_vertices: g.owned() as u64,
            halo_vertices: (g.locals() - g.owned()) as u64,
            edges: g.edges() as u64,
            graph_digest: graph_digest.to_vec(),
        };
        let halo: Vec<u32> =
            self.halo_sources.iter().flat_map(|s| [s.owner as u32, s.slots.start, s.slots.end]).collect();
        let mirrors: Vec<u32> = self.mirrors.iter().flat_map(|m| [m.reader as u32, m.vertices.len() as u32]).collect();
        let mirror_vertices: Vec<u32> = self.mirrors.iter().flat_map(|m| m.vertices.iter().copied()).collect();
        let (offsets, sources, out_degree, in_degree) = g.segments();
        let mut f = OutFrame::new(Some(frame_header::Meta::Partition(meta)));
        f.push("offsets", offsets)
            .push("sources", sources)
            .push("out_degree", out_degree)
            .push("in_degree", in_degree)
            .push("halo_sources", &Segment::from_slice(&halo))
            .push("mirrors", &Segment::from_slice(&mirrors))
            .push("mirror_vertices", &Segment::from_slice(&mirror_vertices));
        if let Some(x) = &self.features {
            f.push("features", x);
        }
        f.set_last(true);
        f
    }

    /// Reads a partition frame, viewing the arrays in place. Structural checks happen here;
    /// [`OwnedPart::check`] finishes them against the plan.
    pub fn from_frame(frame: &InFrame) -> Result<Self, String> {
        let Some(frame_header::Meta::Partition(meta)) = &frame.header.meta else {
            return Err("partition frame: no partition metadata".into());
        };
        let n = frame.segment_count();
        if !(7..=8).contains(&n) {
            return Err(format!("partition frame: {n} segments, expected 7 or 8"));
        }
        fn seg<T: Pod>(frame: &InFrame, i: usize, name: &str) -> Result<Segment<T>, String> {
            if frame.segment_name(i) != Some(name) {
                return Err(format!("partition frame: segment {i} is {:?}, expected {name:?}", frame.segment_name(i)));
            }
            frame.segment::<T>(i).map_err(|e| format!("partition frame: {name}: {e}"))
        }
        let owned = usize::try_from(meta.local_vertices).map_err(|_| "partition frame: owned count too large")?;
        let first = u32::try_from(meta.first_vertex).map_err(|_| "partition frame: first vertex beyond u32")?;
        let graph = LocalGraph::from_parts(
            first,
            owned,
            seg::<u64>(frame, 0, "offsets")?,
            seg::<u32>(frame, 1, "sources")?,
            seg::<u32>(frame, 2, "out_degree")?,
            seg::<u32>(frame, 3, "in_degree")?,
        )
        .map_err(|e| format!("partition frame: {e}"))?;
        let halo = seg::<u32>(frame, 4, "halo_sources")?;
        let mirrors = seg::<u32>(frame, 5, "mirrors")?;
        let mirror_vertices = seg::<u32>(frame, 6, "mirror_vertices")?;
        let features = if n == 8 { Some(seg::<f32>(frame, 7, "features")?) } else { None };
        if halo.len() % 3 != 0 || mirrors.len() % 2 != 0 {
            return Err("partition frame: halo or mirror list is not whole records".into());
        }
        let halo_sources =
            halo.chunks_exact(3).map(|h| HaloSource { owner: h[0] as usize, slots: h[1]..h[2] }).collect::<Vec<_>>();
        let mut at = 0usize;
        let mut list = Vec::with_capacity(mirrors.len() / 2);
        for m in mirrors.chunks_exact(2) {
            let end = at.checked_add(m[1] as usize).filter(|&e| e <= mirror_vertices.len());
            let Some(end) = end else {
                return Err("partition frame: mirror lists run past their vertices".into());
            };
            list.push(Mirror { reader: m[0] as usize, vertices: mirror_vertices[at..end].to_vec() });
            at = end;
        }
        if at != mirror_vertices.len() {
            return Err("partition frame: mirror vertices left over".into());
        }
        Ok(Self { index: meta.partition, graph, halo_sources, mirrors: list, features })
    }

    /// Checks the halo and mirror lists and the features against the plan: every index the
    /// executor will use is in range, halo runs are disjoint and inside the halo part.
    /// `features`: whether the kernel needs feature rows in the frame.
    pub fn check(&self, parts: usize, width: usize, features: bool) -> Result<(), String> {
        let g = &self.graph;
        let (owned, locals) = (g.owned() as u32, g.locals() as u32);
        if self.index as usize >= parts {
            return Err(format!("partition {} of a {parts}-partition job", self.index));
        }
        let mut next = owned;
        for s in &self.halo_sources {
            if s.owner >= parts || s.owner == self.index as usize {
                return Err(format!("halo source names partition {}", s.owner));
            }
            if s.slots.start < next || s.slots.end < s.slots.start || s.slots.end > locals {
                return Err(format!("halo slots {:?} are not ordered inside {owned}..{locals}", s.slots));
            }
            next = s.slots.end;
        }
        for m in &self.mirrors {
            if m.reader >= parts || m.reader == self.index as usize {
                return Err(format!("mirror names partition {}", m.reader));
            }
            if m.vertices.iter().any(|&v| v >= owned) {
                return Err(format!("mirror for partition {} names a vertex that is not owned", m.reader));
            }
        }
        match (&self.features, features) {
            (Some(x), true) if x.len() == g.owned() * width => Ok(()),
            (Some(x), true) => Err(format!("features hold {} values, expected {} rows × {width}", x.len(), g.owned())),
            (None, true) => Err("appnp partition without features".into()),
            (Some(_), false) => Err("features sent for a kernel that takes none from the frame".into()),
            (None, false) => Ok(()),
        }
    }
}

/// Partials on the wire.
pub fn partials_to_wire(step: u32, p: Partials, compute_seconds: f64) -> StepPartials {
    StepPartials { step, mass: p.mass.0.to_le_bytes().to_vec(), residual: p.residual, compute_seconds }
}

/// Partials off the wire.
pub fn partials_from_wire(p: &StepPartials) -> Result<(u32, Partials, f64), String> {
    let mass: [u8; 16] =
        p.mass.as_slice().try_into().map_err(|_| format!("partials: mass is {} bytes, not 16", p.mass.len()))?;
    Ok((p.step, Partials { mass: ExactSum(i128::from_le_bytes(mass)), residual: p.residual }, p.compute_seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_round_trips_and_refuses_unsorted_seeds() {
        let k = KernelSpec::PageRank(PageRank { damping: 0.85, teleport: Teleport::Seeds(vec![1, 5]) });
        let plan = k.to_plan(10, &[NodeId(1), NodeId(2)]);
        let back = KernelSpec::from_plan(&plan).unwrap();
        assert_eq!(back.to_plan(10, &[NodeId(1), NodeId(2)]), plan);
        let mut bad = plan.clone();
        bad.seeds = vec![5, 1];
        assert!(KernelSpec::from_plan(&bad).unwrap_err().contains("sorted"));
        bad.seeds = vec![1, 10];
        assert!(KernelSpec::from_plan(&bad).unwrap_err().contains("vertex count"));
        bad.kernel = "nope".into();
        assert!(KernelSpec::from_plan(&bad).is_err());
    }

    #[test]
    fn partials_round_trip_exactly() {
        let p = Partials { mass: ExactSum(-(1i128 << 100) + 7), residual: 0.25 };
        let (step, back, secs) = partials_from_wire(&partials_to_wire(3, p, 1.5)).unwrap();
        assert_eq!((step, back, secs), (3, p, 1.5));
        let short = StepPartials { mass: vec![1, 2], ..Default::default() };
        assert!(partials_from_wire(&short).is_err());
    }
}

//! Vertex relabelling for locality: a graph transformation applied when a graph is generated or
//! loaded, never inside a kernel.
//!
//! Pull kernels read the value of every in-neighbour `u` of a row, so vertex `u` is read
//! `outdeg(u)` times per step. [`by_degree`] numbers vertices by descending out-degree (ties by
//! ascending old id), which packs the values of the most-read vertices into the fewest cache
//! lines: on power-law graphs such as Kronecker ones the hot part of the vector then stays in L2.
//! It is the same graph with other names, so results are the same up to that renaming (and, since
//! row order changes, up to float rounding).

use rayon::prelude::*;

use crate::buf::Segment;
use crate::csr::{Csr, CsrError};

/// A renaming of vertices: `order[new] = old` and its inverse, `rank[old] = new`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renaming {
    pub order: Vec<u32>,
    pub rank: Vec<u32>,
}

impl Renaming {
    /// The renaming that lists vertices in `order` (a permutation of `0..order.len()`).
    pub fn from_order(order: Vec<u32>) -> Self {
        let mut rank = vec![0u32; order.len()];
        for (new, &old) in order.iter().enumerate() {
            rank[old as usize] = new as u32;
        }
        Self { order, rank }
    }

    /// Vertices by descending out-degree, ties by ascending id.
    pub fn by_out_degree(out_degree: &[u32]) -> Self {
        Self::from_order(crate::kernels::pull::by_out_degree(out_degree, true))
    }
}

/// The graph relabelled by descending out-degree, and `order` with `order[new] = old`.
pub fn by_degree(g: &Csr) -> Result<(Csr, Vec<u32>), CsrError> {
    let renaming = Renaming::by_out_degree(g.out_degree());
    Ok((relabel(g, &renaming)?, renaming.order))
}

/// The graph with every vertex `old` renamed `renaming.rank[old]` (`renaming` must cover `0..n`).
pub fn relabel(g: &Csr, renaming: &Renaming) -> Result<Csr, CsrError> {
    let n = g.vertices();
    assert_eq!(renaming.order.len(), n, "order must list every vertex once");
    let (order, rank) = (&renaming.order, &renaming.rank);
    let old_off = g.offsets();
    let mut offsets = vec![0u64; n + 1];
    for (new, &old) in order.iter().enumerate() {
        offsets[new + 1] = offsets[new] + (old_off[old as usize + 1] - old_off[old as usize]);
    }
    let rows = |new: usize| offsets[new] as usize..offsets[new + 1] as usize;
    let mut sources = vec![0u32; g.edges()];
    let mut weights = g.weights().map(|_| vec![0f32; g.edges()]);
    // Split the output into rows so every row is filled and sorted by one task.
    let mut src_rows: Vec<&mut [u32]> = Vec::with_capacity(n);
    let mut rest = &mut sources[..];
    for new in 0..n {
        let (row, tail) = rest.split_at_mut(rows(new).len());
        src_rows.push(row);
        rest = tail;
    }
    match (&mut weights, g.weights()) {
        (Some(w_out), Some(w_in)) => {
            let mut w_rows: Vec<&mut [f32]> = Vec::with_capacity(n);
            let mut rest = &mut w_out[..];
            for new in 0..n {
                let (row, tail) = rest.split_at_mut(rows(new).len());
                w_rows.push(row);
                rest = tail;
            }
            src_rows.into_par_iter().zip(w_rows).enumerate().for_each(|(new, (s, w))| {
                let old = order[new] as usize;
                let range = old_off[old] as usize..old_off[old + 1] as usize;
                let mut pairs: Vec<(u32, f32)> = g.sources()[range.clone()]
                    .iter()
                    .map(|&u| rank[u as usize])
                    .zip(w_in[range].iter().copied())
                    .collect();
                pairs.sort_unstable_by_key(|p| p.0);
                for (i, (u, x)) in pairs.into_iter().enumerate() {
                    s[i] = u;
                    w[i] = x;
                }
            });
        }
        _ => src_rows.into_par_iter().enumerate().for_each(|(new, s)| {
            let old = order[new] as usize;
            for (o, &u) in s.iter_mut().zip(&g.sources()[old_off[old] as usize..old_off[old + 1] as usize]) {
                *o = rank[u as usize];
            }
            s.sort_unstable();
        }),
    }
    let out_degree: Vec<u32> = order.iter().map(|&old| g.out_degree()[old as usize]).collect();
    Csr::from_parts(
        Segment::from_slice(&offsets),
        Segment::from_slice(&sources),
        weights.map(|w| Segment::from_slice(&w)),
        Segment::from_slice(&out_degree),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::CsrBuilder;

    #[test]
    fn hubs_first_and_same_graph() {
        let g = crate::generate::kronecker(9, 8, 4).unwrap();
        let (h, order) = by_degree(&g).unwrap();
        assert!(h.out_degree().windows(2).all(|w| w[0] >= w[1]));
        let mut back: Vec<(u32, u32)> =
            h.edges_iter().map(|(u, v, _)| (order[u as usize], order[v as usize])).collect();
        back.sort_unstable();
        let mut orig: Vec<(u32, u32)> = g.edges_iter().map(|(u, v, _)| (u, v)).collect();
        orig.sort_unstable();
        assert_eq!(back, orig);
    }

    #[test]
    fn weights_follow_their_edges() {
        let mut b = CsrBuilder::weighted();
        b.push(0, 1, Some(0.5));
        b.push(2, 1, Some(2.0));
        b.push(2, 0, Some(3.0));
        let g = b.build().unwrap();
        // Old 2 (out-degree 2) becomes 0, old 0 becomes 1, old 1 becomes 2.
        let (h, order) = by_degree(&g).unwrap();
        assert_eq!(order, [2, 0, 1]);
        assert_eq!(h.in_neighbours(2), &[0, 1]);
        assert_eq!(h.in_weights(2), Some(&[2.0f32, 0.5][..]));
        assert_eq!(h.in_weights(1), Some(&[3.0f32][..]));
    }
}

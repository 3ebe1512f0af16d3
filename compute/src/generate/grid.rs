//! 2-D grids with 4-neighbour connectivity.
//!
//! Vertex `(r, c)` (row `r < rows`, column `c < cols`) has id `r · cols + c`. Each vertex is
//! joined in both directions to its right `(r, c+1)` and lower `(r+1, c)` neighbour; on a torus
//! the last column wraps to the first and the last row to the first. Self loops (a torus of width
//! or height 1) are dropped and duplicates (width or height 2 on a torus) merged, so every vertex
//! has at most 4 distinct in- and out-neighbours. No randomness is involved.

use super::GenError;
use crate::csr::{Csr, CsrBuilder, MAX_VERTICES, SelfLoops};

/// The `rows × cols` grid, wrapped into a torus if `torus`.
pub fn grid(rows: u32, cols: u32, torus: bool) -> Result<Csr, GenError> {
    let n = rows as u64 * cols as u64;
    if n > MAX_VERTICES {
        return Err(GenError::TooManyVertices { vertices: n });
    }
    let mut b = CsrBuilder::new().vertices(n).symmetrize(true).self_loops(SelfLoops::Drop);
    b.reserve(2 * n as usize);
    let id = |r: u32, c: u32| r * cols + c;
    for r in 0..rows {
        for c in 0..cols {
            if c + 1 < cols {
                b.push(id(r, c), id(r, c + 1), None);
            } else if torus {
                b.push(id(r, c), id(r, 0), None);
            }
            if r + 1 < rows {
                b.push(id(r, c), id(r + 1, c), None);
            } else if torus {
                b.push(id(r, c), id(0, c), None);
            }
        }
    }
    Ok(b.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_grid() {
        let g = grid(2, 3, false).unwrap();
        // 0 1 2
        // 3 4 5
        assert_eq!(g.in_neighbours(0), &[1, 3]);
        assert_eq!(g.in_neighbours(4), &[1, 3, 5]);
        assert_eq!(g.edges(), 2 * 7);
    }

    #[test]
    fn torus_wraps_and_merges() {
        let g = grid(3, 3, true).unwrap();
        assert!((0..9).all(|v| g.in_neighbours(v).len() == 4));
        assert_eq!(g.in_neighbours(0), &[1, 2, 3, 6]);
        let thin = grid(1, 2, true).unwrap();
        assert_eq!(thin.in_neighbours(0), &[1]);
    }

    #[test]
    fn empty_grid() {
        assert_eq!(grid(0, 5, true).unwrap().vertices(), 0);
    }
}

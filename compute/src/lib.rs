//! # quiver-compute — the shared compute core
//!
//! Everything a Quiver node computes, and nothing else: CSR graphs, the file formats they are
//! read from and written to, seeded generators, the partitioner, and the diffusion kernels
//! (PageRank, personalized PageRank, heat kernel, APPNP feature propagation).
//!
//! What it is not: it opens no socket, spawns no async task and reads no clock. The node agent
//! and the `quiver` binary call into it; it depends on no other Quiver crate.
//!
//! ## Determinism contract
//!
//! Every output value of a kernel is a function of its row's in-neighbour list in CSR order (and
//! the previous iterate) only. Results are therefore bit-identical for any thread count, any
//! partitioning and any cluster size.
//!
//! ```
//! use quiver_compute::csr::CsrBuilder;
//! let mut b = CsrBuilder::new();
//! b.push(0, 1, None);
//! b.push(1, 0, None);
//! let g = b.build().unwrap();
//! assert_eq!(g.in_neighbours(0), &[1]);
//! ```

pub mod buf;
pub mod csr;
pub mod formats;
pub mod generate;
pub mod kernels;
pub mod partition;

pub use buf::{AlignedBytes, Pod, Prefault, SEGMENT_ALIGN, Segment};
pub use csr::{Csr, CsrBuilder, SelfLoops};
pub use formats::{Format, LoadError, ReadOptions, read_graph, read_graph_as, write_graph};

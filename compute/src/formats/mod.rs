//! Graph and vector file formats: what a [`Csr`] is read from and written to.
//!
//! | format | extensions | reader | writer | notes |
//! |---|---|---|---|---|
//! | SNAP edge list | `.el`, `.txt`, `.edges` | [`edgelist`] | [`edgelist`] | text, `u v [weight]`, 0-based ids |
//! | Matrix Market coordinate | `.mtx` | [`mtx`] | [`mtx`] | text, 1-based ids, entry `(i, j)` is edge `i → j` |
//! | Quiver binary CSR | `.qcsr` | [`qcsr`] | [`qcsr`] | memory-mapped, zero copy, checksummed |
//! | NumPy array | `.npy` | [`npy`] | [`npy`] | `f32`/`f64` vectors and row-major matrices (results, features) |
//!
//! [`read_graph`] and [`write_graph`] pick the format from the file extension ([`Format::from_path`]).
//! Every text format goes through the same [`CsrBuilder`] policy (duplicates merged with weights
//! summed, self loops kept unless [`ReadOptions::self_loops`] drops them, optional symmetrisation),
//! so the same edges give the same graph whichever file they came from.
//!
//! What this module owns: turning bytes in files into validated graphs and back. What it must not
//! do: panic, or allocate in proportion to a size that a file merely *claims*. Every count read from
//! a file is bounded by the file's length before it sizes anything, and every failure is a
//! [`LoadError`] naming the file, the line where there is one, and the reason.
//!
//! Text files are also bounded: the vertex count a text file declares or implies may not
//! exceed 16 per byte of the file (or 2^24, whichever is larger), see [`check_text_vertices`];
//! otherwise a one-line file naming vertex 4,000,000,000 would allocate tens of gigabytes.
//!
//! **Empty graphs are valid.** An edge list with no edges, a Matrix Market file declaring `0 0 0`,
//! and a `.qcsr` file with zero vertices all load as a graph with 0 vertices (or with the declared
//! number of isolated vertices). Callers that cannot run on an empty graph check [`Csr::vertices`].
//!
//! ```
//! # fn main() -> Result<(), quiver_compute::formats::LoadError> {
//! use quiver_compute::formats::{read_graph, write_graph, ReadOptions};
//! use quiver_compute::CsrBuilder;
//! let dir = tempfile::tempdir().unwrap();
//! let mut b = CsrBuilder::new();
//! b.push(0, 1, None);
//! b.push(1, 2, None);
//! let g = b.build().unwrap();
//! for name in ["g.el", "g.mtx", "g.qcsr"] {
//!     let path = dir.path().join(name);
//!     write_graph(&path, &g)?;
//!     assert_eq!(read_graph(&path, &ReadOptions::default())?, g);
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::csr::{BuildError, Csr, CsrBuilder, CsrError, SelfLoops};

pub mod edgelist;
pub mod mtx;
pub mod npy;
pub mod qcsr;
mod text;

pub use npy::{NpyArray, NpyElement, NpyWriter, read_npy, write_npy, write_npy_parts};

impl Format {
    /// Guesses the format of a file from its first bytes: the `.qcsr` magic, a Matrix Market
    /// banner, or else an edge list (whose parser names the first line it cannot read).
    pub fn sniff(head: &[u8]) -> Format {
        if head.starts_with(&qcsr::MAGIC) {
            Format::Qcsr
        } else if head.starts_with(b"%%MatrixMarket") {
            Format::MatrixMarket
        } else {
            Format::EdgeList
        }
    }
}

/// A graph file format, chosen by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// SNAP-style edge list text (`.el`, `.txt`, `.edges`).
    EdgeList,
    /// Matrix Market coordinate text (`.mtx`).
    MatrixMarket,
    /// Quiver's binary CSR (`.qcsr`).
    Qcsr,
}

impl Format {
    /// The format of `path`, from its extension (case-insensitive).
    pub fn from_path(path: &Path) -> Result<Self, LoadError> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        match ext.as_str() {
            "el" | "txt" | "edges" => Ok(Format::EdgeList),
            "mtx" => Ok(Format::MatrixMarket),
            "qcsr" => Ok(Format::Qcsr),
            _ => Err(LoadError::UnknownFormat { path: path.to_path_buf(), ext }),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::EdgeList => "edge list",
            Format::MatrixMarket => "matrix market",
            Format::Qcsr => "qcsr",
        })
    }
}

/// How a graph file becomes a [`Csr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    /// Add the reverse of every edge (an undirected view of a directed file).
    pub symmetrize: bool,
    /// Keep or drop edges `v → v`.
    pub self_loops: SelfLoops,
    /// Verify the `.qcsr` payload checksum (default `true`). Structural validation of the arrays
    /// always runs, so a file that skips the checksum can still not produce an invalid graph;
    /// it can only go unnoticed that, say, a weight was flipped to another valid value.
    pub verify_checksum: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self { symmetrize: false, self_loops: SelfLoops::Keep, verify_checksum: true }
    }
}

impl ReadOptions {
    /// Whether the options change the graph a file describes (so a stored CSR must be rebuilt).
    fn transforms(&self) -> bool {
        self.symmetrize || self.self_loops == SelfLoops::Drop
    }

    pub(crate) fn builder(&self, weighted: bool) -> CsrBuilder {
        let b = if weighted { CsrBuilder::weighted() } else { CsrBuilder::new() };
        b.symmetrize(self.symmetrize).self_loops(self.self_loops)
    }
}

/// Why a file could not be read or written. Messages name the file, the line where there is one,
/// and the reason.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The operating system refused (missing file, permissions, disk full).
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The extension names no known format.
    #[error("{}: unknown format {ext:?} (expected .el, .txt, .edges, .mtx or .qcsr)", .path.display())]
    UnknownFormat { path: PathBuf, ext: String },
    /// A text line that does not parse.
    #[error("{} line {line}: {reason}", .path.display())]
    Syntax { path: PathBuf, line: u64, reason: String },
    /// A vertex id outside the declared size (or outside `u32` ids).
    #[error("{} line {line}: vertex id {id} exceeds declared size {declared}", .path.display())]
    IdOutOfRange { path: PathBuf, line: u64, id: u64, declared: u64 },
    /// A weight that is negative, NaN or infinite.
    #[error("{} line {line}: weight {weight} is not a finite non-negative number", .path.display())]
    BadWeight { path: PathBuf, line: u64, weight: String },
    /// A binary file that does not start with the format's magic bytes.
    #[error("{}: not a {format} file (wrong magic bytes)", .path.display())]
    BadMagic { path: PathBuf, format: &'static str },
    /// A binary file of a version this build does not read.
    #[error("{}: unsupported {format} version {found} (this build reads {supported})", .path.display())]
    UnsupportedVersion { path: PathBuf, format: &'static str, found: String, supported: &'static str },
    /// A file shorter (or longer) than its header says.
    #[error("{}: truncated or corrupt: header describes {expected} bytes, file has {actual}", .path.display())]
    SizeMismatch { path: PathBuf, expected: u64, actual: u64 },
    /// A header field that is inconsistent or out of range.
    #[error("{}: bad header: {reason}", .path.display())]
    BadHeader { path: PathBuf, reason: String },
    /// The payload checksum does not match.
    #[error("{}: checksum mismatch (header {expected:#010x}, payload {actual:#010x}): the file is corrupt", .path.display())]
    Checksum { path: PathBuf, expected: u32, actual: u32 },
    /// Stored arrays that are not a valid CSR.
    #[error("{}: invalid graph: {source}", .path.display())]
    InvalidGraph { path: PathBuf, source: CsrError },
    /// Edges that could not be built into a graph.
    #[error("{}: {source}", .path.display())]
    Build { path: PathBuf, source: BuildError },
    /// A text file whose vertex count (declared, or implied by its largest id) is out of all
    /// proportion to its length; see [`check_text_vertices`].
    #[error(
        "{}: {vertices} vertices in a text file of {bytes} bytes is implausible (at most {TEXT_VERTICES_PER_BYTE} per byte); most would be isolated",
        .path.display()
    )]
    ImplausibleSize { path: PathBuf, vertices: u64, bytes: u64 },
    /// A `.npy` file whose dtype, order or shape is not what the caller asked for.
    #[error("{}: {reason}", .path.display())]
    Npy { path: PathBuf, reason: String },
}

/// How many vertices a text file may describe per byte of its length (beyond a floor of
/// [`TEXT_VERTICES_FLOOR`]).
pub const TEXT_VERTICES_PER_BYTE: u64 = 16;
/// Vertex count every text file may describe, whatever its length.
pub const TEXT_VERTICES_FLOOR: u64 = 1 << 24;

/// Refuses a vertex count that a text file of `bytes` bytes cannot plausibly mean.
///
/// A graph costs 12 bytes per vertex (offset and out-degree) even when the vertex is isolated,
/// so one line such as `0 4000000000`, or a Matrix Market size line declaring four billion rows,
/// would otherwise make a 20-byte file allocate 48 GB. Text graphs are therefore limited to
/// 16 vertices per byte of file (at least 2^24), which bounds their memory to a few hundred
/// times the file length; no real edge list comes near it.
pub fn check_text_vertices(path: &Path, vertices: u64, bytes: usize) -> Result<(), LoadError> {
    let bytes = bytes as u64;
    if vertices > TEXT_VERTICES_FLOOR.max(bytes.saturating_mul(TEXT_VERTICES_PER_BYTE)) {
        return Err(LoadError::ImplausibleSize { path: path.to_path_buf(), vertices, bytes });
    }
    Ok(())
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        LoadError::Io { path: path.to_path_buf(), source }
    }
}

/// Reads a graph, choosing the format from the extension.
///
/// Text formats are parsed in parallel (rayon) and built with [`CsrBuilder`]; `.qcsr` files are
/// memory-mapped and validated in place (rebuilt only if `opts` asks to symmetrise or drop loops).
pub fn read_graph(path: impl AsRef<Path>, opts: &ReadOptions) -> Result<Csr, LoadError> {
    let path = path.as_ref();
    read_graph_as(path, Format::from_path(path)?, opts)
}

/// Reads a graph in a given format, whatever the file is called (uploads, blobs).
pub fn read_graph_as(path: impl AsRef<Path>, format: Format, opts: &ReadOptions) -> Result<Csr, LoadError> {
    let path = path.as_ref();
    match format {
        Format::EdgeList => edgelist::read(path, opts),
        Format::MatrixMarket => mtx::read(path, opts),
        Format::Qcsr => {
            let g = qcsr::read(path, opts)?;
            if opts.transforms() { rebuild(path, &g, opts) } else { Ok(g) }
        }
    }
}

/// Writes a graph, choosing the format from the extension.
pub fn write_graph(path: impl AsRef<Path>, graph: &Csr) -> Result<(), LoadError> {
    let path = path.as_ref();
    match Format::from_path(path)? {
        Format::EdgeList => edgelist::write(path, graph),
        Format::MatrixMarket => mtx::write(path, graph),
        Format::Qcsr => qcsr::write(path, graph),
    }
}

/// A summary of a graph, for `quiver graph info`.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphInfo {
    pub vertices: usize,
    pub edges: usize,
    pub weighted: bool,
    pub self_loops: usize,
    /// Vertices with no in-edges and no out-edges.
    pub isolated: usize,
    /// Vertices with no out-edges (PageRank's dangling vertices).
    pub dangling: usize,
    pub max_in_degree: u64,
    pub max_out_degree: u32,
}

impl GraphInfo {
    /// Summarises `g` (one parallel pass over the rows).
    pub fn of(g: &Csr) -> Self {
        use rayon::prelude::*;
        let (offsets, out) = (&**g.offsets(), &**g.out_degree());
        let n = g.vertices();
        let (self_loops, isolated, max_in) = (0..n)
            .into_par_iter()
            .map(|v| {
                let row = g.in_neighbours(v as u32);
                let in_deg = offsets[v + 1] - offsets[v];
                let looped = row.binary_search(&(v as u32)).is_ok() as usize;
                (looped, (in_deg == 0 && out[v] == 0) as usize, in_deg)
            })
            .reduce(|| (0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2.max(b.2)));
        GraphInfo {
            vertices: n,
            edges: g.edges(),
            weighted: g.weights().is_some(),
            self_loops,
            isolated,
            dangling: out.par_iter().filter(|&&d| d == 0).count(),
            max_in_degree: max_in,
            max_out_degree: out.par_iter().copied().max().unwrap_or(0),
        }
    }
}

/// Reads just enough of a graph file to summarise it (the whole graph, for text formats).
pub fn graph_info(path: impl AsRef<Path>) -> Result<GraphInfo, LoadError> {
    Ok(GraphInfo::of(&read_graph(path, &ReadOptions::default())?))
}

/// Re-applies the builder policy of `opts` to an already built graph.
fn rebuild(path: &Path, g: &Csr, opts: &ReadOptions) -> Result<Csr, LoadError> {
    let mut b = opts.builder(g.weights().is_some()).vertices(g.vertices() as u64);
    b.reserve(g.edges());
    for (u, v, w) in g.edges_iter() {
        b.push(u, v, w);
    }
    b.build().map_err(|source| LoadError::Build { path: path.to_path_buf(), source })
}

/// Memory-maps a whole file read-only.
///
/// Every reader maps rather than reads: text parsers work on the page cache directly (no copy,
/// no allocation proportional to a claimed size), and `.qcsr` arrays become segments in place.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
    // `populate` faults the whole file in with one call (MAP_POPULATE) instead of one page fault
    // per 4 KiB as the parsers advance; every reader touches every byte anyway.
    // SAFETY: the map is read-only and private to this process. Like every memory-mapped reader,
    // we rely on no other process truncating or rewriting the file while it is mapped (Quiver
    // writes graph files once, to a temporary name, then renames them into place).
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) };
    map.map_err(|e| LoadError::io(path, e))
}

/// Creates `path` for writing through a temporary file renamed into place on success, so a
/// crashed writer never leaves a half-written graph under the final name.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
) -> Result<(), LoadError> {
    let mut file = AtomicFile::create(path)?;
    write(file.writer()).map_err(|e| LoadError::io(path, e))?;
    file.commit(true)
}

/// A file written under a temporary name beside `path` and renamed into place by
/// [`AtomicFile::commit`]; dropped uncommitted, it removes the temporary file.
pub(crate) struct AtomicFile {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    w: Option<io::BufWriter<File>>,
}

impl AtomicFile {
    pub(crate) fn create(path: &Path) -> Result<Self, LoadError> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Unique per writer, so two writers of one path in this process never share a temporary.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        let file = File::create(&tmp).map_err(|e| LoadError::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), tmp, w: Some(io::BufWriter::with_capacity(1 << 20, file)) })
    }

    /// The final name.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn writer(&mut self) -> &mut io::BufWriter<File> {
        self.w.as_mut().expect("an uncommitted file has its writer")
    }

    /// Flushes, syncs the data when `sync` (otherwise the caller syncs the file later, before
    /// anything relies on it being on disk), and renames the file into place.
    pub(crate) fn commit(mut self, sync: bool) -> Result<(), LoadError> {
        let w = self.w.take().expect("an uncommitted file has its writer");
        let result = (|| {
            let file = w.into_inner().map_err(|e| e.into_error())?;
            if sync {
                file.sync_data()?;
            }
            std::fs::rename(&self.tmp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result.map_err(|e| LoadError::io(&self.path, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Committed files were renamed away; anything else is an abandoned temporary.
        if self.w.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

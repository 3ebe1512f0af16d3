//! Quiver's binary CSR (`.qcsr`): the arrays of a [`Csr`] exactly as they sit in memory, behind a
//! small header, so that loading is a memory map plus validation, with no parsing and no copy.
//!
//! # Layout, byte for byte
//!
//! All integers are little-endian. The file is a 64-byte header followed by the payload.
//!
//! | offset | size | field | value |
//! |---:|---:|---|---|
//! | 0 | 8 | magic | the bytes `QUIVCSR` then `0x00` |
//! | 8 | 4 | version | `u32`, currently `1` |
//! | 12 | 4 | flags | `u32`; bit 0 set = weighted; every other bit must be 0 |
//! | 16 | 8 | vertices `n` | `u64`, at most `u32::MAX` |
//! | 24 | 8 | edges `m` | `u64` |
//! | 32 | 4 | checksum | `u32`, CRC-32 (IEEE 802.3, as `crc32fast` computes it) of every byte from offset 64 to the end of the file |
//! | 36 | 28 | reserved | must be 0 |
//!
//! The payload is a sequence of arrays, each starting at a multiple of 64 bytes and followed by
//! zero bytes up to the next multiple of 64 (so every array is aligned for SIMD loads and the
//! file length is a multiple of 64):
//!
//! 1. `offsets`: `u64` × (`n` + 1), starting at byte 64;
//! 2. `sources`: `u32` × `m`;
//! 3. `weights`: `f32` × `m`, present only if the weighted flag is set;
//! 4. `out_degree`: `u32` × `n`.
//!
//! The file length must equal exactly `64 + Σ pad64(array bytes)`. These are the arrays of
//! [`Csr`] (row `v` lists the sources of `v`'s in-edges, ascending).
//!
//! # Loading
//!
//! The reader checks the header and computes the exact file length the header implies (with
//! overflow checks) *before touching the payload*: a header claiming 10^12 edges in a 1 KB file
//! is refused at once, and nothing is ever allocated from a header's numbers. The file is then
//! memory-mapped, its checksum verified (CRC-32 of chunks in parallel, combined), and the mapped
//! arrays become [`Segment`]s in place ([`Storage::Mapped`]) that [`Csr::from_parts`] validates in
//! parallel. A loaded graph therefore costs no heap memory for its arrays, and every invariant of
//! [`Csr`] holds for it exactly as for a graph built in memory.
//!
//! [`ReadOptions::verify_checksum`] can skip the checksum (not the structural validation) for
//! files that were just written by the same process; it is on by default.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use super::{LoadError, ReadOptions, map_file, write_atomically};
use crate::buf::{SEGMENT_ALIGN, Segment, Storage};
use crate::csr::{Csr, MAX_VERTICES};

/// The first eight bytes of every `.qcsr` file.
pub const MAGIC: [u8; 8] = *b"QUIVCSR\0";
/// The version this build writes and reads.
pub const VERSION: u32 = 1;
/// Header length; the payload starts here.
pub const HEADER_LEN: usize = 64;
/// Flag bit: the file holds a weights array.
pub const FLAG_WEIGHTED: u32 = 1;

/// The decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub vertices: u64,
    pub edges: u64,
    pub weighted: bool,
    pub checksum: u32,
}

/// Where each array lives in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    offsets: u64,
    sources: u64,
    weights: Option<u64>,
    out_degree: u64,
    file_len: u64,
}

fn pad64(bytes: u64) -> Option<u64> {
    bytes.checked_next_multiple_of(SEGMENT_ALIGN as u64)
}

impl Header {
    /// The array positions and file length this header implies, or `None` if they overflow.
    fn layout(&self) -> Option<Layout> {
        let offsets = HEADER_LEN as u64;
        let sources = offsets.checked_add(pad64(self.vertices.checked_add(1)?.checked_mul(8)?)?)?;
        let edge_bytes = pad64(self.edges.checked_mul(4)?)?;
        let after_sources = sources.checked_add(edge_bytes)?;
        let (weights, out_degree) = if self.weighted {
            (Some(after_sources), after_sources.checked_add(edge_bytes)?)
        } else {
            (None, after_sources)
        };
        let file_len = out_degree.checked_add(pad64(self.vertices.checked_mul(4)?)?)?;
        Some(Layout { offsets, sources, weights, out_degree, file_len })
    }

    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(if self.weighted { FLAG_WEIGHTED } else { 0 }).to_le_bytes());
        h[16..24].copy_from_slice(&self.vertices.to_le_bytes());
        h[24..32].copy_from_slice(&self.edges.to_le_bytes());
        h[32..36].copy_from_slice(&self.checksum.to_le_bytes());
        h
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Decodes and checks a header against the length of the file it came from. `file` holds at
/// least the first [`HEADER_LEN`] bytes of the file (all of them if it is shorter); `actual` is
/// the file's length.
fn check_header(path: &Path, file: &[u8], actual: u64) -> Result<(Header, Layout), LoadError> {
    let bad = |reason: String| LoadError::BadHeader { path: path.to_path_buf(), reason };
    if actual < HEADER_LEN as u64 || file.len() < HEADER_LEN {
        // Too short even for the magic: say "wrong magic" if the bytes we have already differ.
        if !MAGIC.starts_with(&file[..file.len().min(MAGIC.len())]) {
            return Err(LoadError::BadMagic { path: path.to_path_buf(), format: "qcsr" });
        }
        return Err(LoadError::SizeMismatch { path: path.to_path_buf(), expected: HEADER_LEN as u64, actual });
    }
    if file[..8] != MAGIC {
        return Err(LoadError::BadMagic { path: path.to_path_buf(), format: "qcsr" });
    }
    let version = le_u32(file, 8);
    if version != VERSION {
        return Err(LoadError::UnsupportedVersion {
            path: path.to_path_buf(),
            format: "qcsr",
            found: version.to_string(),
            supported: "1",
        });
    }
    let flags = le_u32(file, 12);
    if flags & !FLAG_WEIGHTED != 0 {
        return Err(bad(format!("unknown flags {flags:#x}")));
    }
    if file[36..HEADER_LEN].iter().any(|&b| b != 0) {
        return Err(bad("reserved header bytes are not zero".into()));
    }
    let header = Header {
        vertices: le_u64(file, 16),
        edges: le_u64(file, 24),
        weighted: flags & FLAG_WEIGHTED != 0,
        checksum: le_u32(file, 32),
    };
    if header.vertices > MAX_VERTICES {
        return Err(bad(format!("{} vertices exceed the {MAX_VERTICES} that u32 ids allow", header.vertices)));
    }
    let Some(layout) = header.layout() else {
        return Err(bad(format!("{} vertices and {} edges overflow any file size", header.vertices, header.edges)));
    };
    if layout.file_len != actual {
        return Err(LoadError::SizeMismatch { path: path.to_path_buf(), expected: layout.file_len, actual });
    }
    Ok((header, layout))
}

/// Reads and checks only the header of a `.qcsr` file (64 bytes and the file length), for
/// `quiver graph info` on files too large to load.
pub fn read_header(path: &Path) -> Result<Header, LoadError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let len = file.metadata().map_err(|e| LoadError::io(path, e))?.len();
    let mut head = Vec::with_capacity(HEADER_LEN);
    Read::by_ref(&mut file).take(HEADER_LEN as u64).read_to_end(&mut head).map_err(|e| LoadError::io(path, e))?;
    check_header(path, &head, len).map(|(h, _)| h)
}

/// CRC-32 of `bytes`, computed over chunks in parallel and combined in order.
pub fn checksum(bytes: &[u8]) -> u32 {
    hasher_of(bytes).finalize()
}

/// Memory-maps and validates a `.qcsr` file. The graph's arrays point into the map.
pub fn read(path: &Path, opts: &ReadOptions) -> Result<Csr, LoadError> {
    if cfg!(target_endian = "big") {
        return Err(LoadError::BadHeader {
            path: path.to_path_buf(),
            reason: "qcsr needs a little-endian host".into(),
        });
    }
    let map = map_file(path)?;
    let (header, layout) = check_header(path, &map, map.len() as u64)?;
    if opts.verify_checksum {
        let actual = checksum(&map[HEADER_LEN..]);
        if actual != header.checksum {
            return Err(LoadError::Checksum { path: path.to_path_buf(), expected: header.checksum, actual });
        }
    }
    let (n, m) = (header.vertices as usize, header.edges as usize);
    let storage = Arc::new(Storage::Mapped(map));
    let corrupt =
        |e: crate::buf::SegmentError| LoadError::BadHeader { path: path.to_path_buf(), reason: e.to_string() };
    let offsets = Segment::<u64>::view(storage.clone(), layout.offsets as usize, n + 1).map_err(corrupt)?;
    let sources = Segment::<u32>::view(storage.clone(), layout.sources as usize, m).map_err(corrupt)?;
    let weights = match layout.weights {
        Some(at) => Some(Segment::<f32>::view(storage.clone(), at as usize, m).map_err(corrupt)?),
        None => None,
    };
    let out_degree = Segment::<u32>::view(storage, layout.out_degree as usize, n).map_err(corrupt)?;
    Csr::from_parts(offsets, sources, weights, out_degree)
        .map_err(|source| LoadError::InvalidGraph { path: path.to_path_buf(), source })
}

/// Writes `g` as a `.qcsr` file.
pub fn write(path: &Path, g: &Csr) -> Result<(), LoadError> {
    if cfg!(target_endian = "big") {
        return Err(LoadError::BadHeader {
            path: path.to_path_buf(),
            reason: "qcsr needs a little-endian host".into(),
        });
    }
    write_atomically(path, |w| write_to(w, g))
}

/// The arrays of `g` in file order, each with its zero padding.
fn payload(g: &Csr) -> Vec<(&[u8], usize)> {
    let mut parts: Vec<&[u8]> = vec![g.offsets().as_bytes(), g.sources().as_bytes()];
    if let Some(w) = g.weights() {
        parts.push(w.as_bytes());
    }
    parts.push(g.out_degree().as_bytes());
    parts.into_iter().map(|p| (p, p.len().next_multiple_of(SEGMENT_ALIGN) - p.len())).collect()
}

/// Writes `g` in `.qcsr` layout to any writer.
pub fn write_to(w: &mut impl Write, g: &Csr) -> std::io::Result<()> {
    const ZEROS: [u8; SEGMENT_ALIGN] = [0; SEGMENT_ALIGN];
    let parts = payload(g);
    // The checksum covers the payload as written, padding included; chunks are hashed in
    // parallel and combined, so writing costs about one pass over memory.
    let mut crc = crc32fast::Hasher::new();
    for &(bytes, pad) in &parts {
        crc.combine(&hasher_of(bytes));
        crc.update(&ZEROS[..pad]);
    }
    let header = Header {
        vertices: g.vertices() as u64,
        edges: g.edges() as u64,
        weighted: g.weights().is_some(),
        checksum: crc.finalize(),
    };
    w.write_all(&header.to_bytes())?;
    for (bytes, pad) in parts {
        w.write_all(bytes)?;
        w.write_all(&ZEROS[..pad])?;
    }
    Ok(())
}

fn hasher_of(bytes: &[u8]) -> crc32fast::Hasher {
    // Chunks of a few MiB keep both cores busy; `combine` stitches the CRCs together exactly.
    bytes
        .par_chunks(4 << 20)
        .map(|c| {
            let mut h = crc32fast::Hasher::new();
            h.update(c);
            h
        })
        .reduce(crc32fast::Hasher::new, |mut a, b| {
            a.combine(&b);
            a
        })
}

//! NumPy `.npy` files (format versions 1.0 and 2.0) for result vectors and feature matrices.
//!
//! Only what Quiver exchanges is supported: little-endian `f32` (`<f4`) and `f64` (`<f8`) arrays
//! of one dimension (a vector: one value per vertex) or two (a row-major matrix: one row of
//! features per vertex). The reader refuses anything else with a clear error: another dtype or
//! byte order, Fortran (column-major) order for a matrix, more dimensions, or a data section whose
//! length does not match the shape (truncated or padded files).
//!
//! The layout (numpy's `format.py`, "NPY format"): the magic `\x93NUMPY`, a major and a minor
//! version byte, the header length (`u16` in version 1.0, `u32` in 2.0, little-endian), then the
//! header, an ASCII Python dict literal such as `{'descr': '<f4', 'fortran_order': False,
//! 'shape': (1000, 64), }` padded with spaces and a final `\n`, then the raw data. The writer pads
//! the header so the data starts at a multiple of 64 bytes and uses version 1.0 unless the header
//! does not fit in 65535 bytes. Arrays are read into 64-byte-aligned memory (one copy).

use std::io::Write;
use std::path::Path;

use super::{AtomicFile, LoadError, map_file};
use crate::buf::{AlignedBytes, Pod, SEGMENT_ALIGN, Segment};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// An element type `.npy` files may hold.
pub trait NpyElement: Pod {
    /// The numpy dtype descriptor (`<f4`, `<f8`).
    const DESCR: &'static str;
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
}

impl NpyElement for f64 {
    const DESCR: &'static str = "<f8";
}

/// A vector (`shape = [n]`) or row-major matrix (`shape = [rows, cols]`) read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray<T: Pod> {
    pub shape: Vec<usize>,
    pub data: Segment<T>,
}

impl<T: Pod> NpyArray<T> {
    /// Number of rows (the length of a vector).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Number of columns (1 for a vector).
    pub fn cols(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1)
    }

    /// Row `r` of a matrix (the single value `r` of a vector).
    pub fn row(&self, r: usize) -> &[T] {
        let c = self.cols();
        &self.data[r * c..(r + 1) * c]
    }
}

fn npy_err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Npy { path: path.to_path_buf(), reason: reason.into() }
}

/// Writes `data` with the given shape (one or two dimensions, row-major).
pub fn write_npy<T: NpyElement>(path: impl AsRef<Path>, shape: &[usize], data: &[T]) -> Result<(), LoadError> {
    write_npy_parts(path, shape, &[data])
}

/// Writes the concatenation of `parts` with the given shape, without assembling it in memory
/// (a distributed job's result arrives as one piece per partition).
pub fn write_npy_parts<T: NpyElement>(
    path: impl AsRef<Path>,
    shape: &[usize],
    parts: &[&[T]],
) -> Result<(), LoadError> {
    let path = path.as_ref();
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(len) {
        return Err(npy_err(path, format!("shape {shape:?} does not hold {len} values")));
    }
    let mut w = NpyWriter::create(path, shape)?;
    for p in parts {
        w.write(p)?;
    }
    w.finish(true)
}

/// Writes a `.npy` image to any writer (the shape must hold exactly `data.len()` values).
pub fn write_npy_to<T: NpyElement>(w: &mut impl Write, shape: &[usize], data: &[T]) -> std::io::Result<()> {
    write_header::<T>(w, shape)?;
    write_values(w, data)
}

/// A `.npy` file written piece by piece, so its values never need to be in memory at once (a
/// checkpoint part arriving from the network): the header when created, the values as they come,
/// and the file appears under its name only once [`NpyWriter::finish`] finds exactly the shape's
/// count written. Dropped unfinished, it leaves nothing behind.
pub struct NpyWriter<T> {
    file: AtomicFile,
    want: usize,
    written: usize,
    _element: std::marker::PhantomData<T>,
}

impl<T: NpyElement> NpyWriter<T> {
    /// Creates the file (under a temporary name) and writes the header of `shape`.
    pub fn create(path: impl AsRef<Path>, shape: &[usize]) -> Result<Self, LoadError> {
        let path = path.as_ref();
        if cfg!(target_endian = "big") {
            return Err(npy_err(path, "writing .npy needs a little-endian host"));
        }
        if !(1..=2).contains(&shape.len()) {
            return Err(npy_err(path, format!("shape {shape:?} has {} dimensions; expected 1 or 2", shape.len())));
        }
        let want = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| npy_err(path, format!("shape {shape:?} holds more values than this host can count")))?;
        let mut file = AtomicFile::create(path)?;
        write_header::<T>(file.writer(), shape).map_err(|e| LoadError::io(path, e))?;
        Ok(Self { file, want, written: 0, _element: std::marker::PhantomData })
    }

    /// Appends values; refuses any beyond the shape's count.
    pub fn write(&mut self, values: &[T]) -> Result<(), LoadError> {
        if self.written + values.len() > self.want {
            let path = self.file.path().to_path_buf();
            return Err(npy_err(&path, format!("more than the shape's {} values written", self.want)));
        }
        write_values(self.file.writer(), values).map_err(|e| LoadError::io(self.file.path(), e))?;
        self.written += values.len();
        Ok(())
    }

    /// Values still to come.
    pub fn remaining(&self) -> usize {
        self.want - self.written
    }

    /// Puts the file in place once every value is written; with `sync`, on disk first (without,
    /// the caller must sync it before relying on it).
    pub fn finish(self, sync: bool) -> Result<(), LoadError> {
        if self.written != self.want {
            let path = self.file.path().to_path_buf();
            return Err(npy_err(&path, format!("{} of the shape's {} values written", self.written, self.want)));
        }
        self.file.commit(sync)
    }
}

fn write_header<T: NpyElement>(w: &mut impl Write, shape: &[usize]) -> std::io::Result<()> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {dims}, }}", T::DESCR);
    // Version 1.0 has a u16 length after 8 bytes; 2.0 a u32. Pad so data starts 64-aligned.
    let (version, prefix) = if dict.len() + 1 + 10 <= u16::MAX as usize { (1u8, 10) } else { (2u8, 12) };
    let total = (prefix + dict.len() + 1).next_multiple_of(SEGMENT_ALIGN);
    dict.extend(std::iter::repeat_n(' ', total - prefix - dict.len() - 1));
    dict.push('\n');
    w.write_all(MAGIC)?;
    w.write_all(&[version, 0])?;
    if version == 1 {
        w.write_all(&(dict.len() as u16).to_le_bytes())?;
    } else {
        w.write_all(&(dict.len() as u32).to_le_bytes())?;
    }
    w.write_all(dict.as_bytes())
}

/// Values as little-endian bytes, through a small aligned buffer at a time, so writing a large
/// feature matrix never holds a second copy of it.
fn write_values<T: NpyElement>(w: &mut impl Write, values: &[T]) -> std::io::Result<()> {
    for chunk in values.chunks(1 << 16) {
        w.write_all(Segment::from_slice(chunk).as_bytes())?;
    }
    Ok(())
}

/// Reads a `.npy` file of element type `T`.
pub fn read_npy<T: NpyElement>(path: impl AsRef<Path>) -> Result<NpyArray<T>, LoadError> {
    let path = path.as_ref();
    let map = map_file(path)?;
    parse_npy(path, &map)
}

/// Parses a `.npy` image already in memory (`path` names it in errors).
pub fn parse_npy<T: NpyElement>(path: &Path, file: &[u8]) -> Result<NpyArray<T>, LoadError> {
    if cfg!(target_endian = "big") {
        return Err(npy_err(path, "reading .npy needs a little-endian host"));
    }
    if file.len() < 8 || &file[..6] != MAGIC {
        return Err(LoadError::BadMagic { path: path.to_path_buf(), format: "npy" });
    }
    let (major, minor) = (file[6], file[7]);
    let (len_bytes, start) = match major {
        1 => (2, 10),
        2 | 3 => (4, 12),
        _ => {
            return Err(LoadError::UnsupportedVersion {
                path: path.to_path_buf(),
                format: "npy",
                found: format!("{major}.{minor}"),
                supported: "1.0, 2.0 and 3.0",
            });
        }
    };
    if file.len() < start {
        return Err(LoadError::SizeMismatch {
            path: path.to_path_buf(),
            expected: start as u64,
            actual: file.len() as u64,
        });
    }
    let header_len = if len_bytes == 2 {
        usize::from(u16::from_le_bytes([file[8], file[9]]))
    } else {
        u32::from_le_bytes([file[8], file[9], file[10], file[11]]) as usize
    };
    let data_at = start + header_len;
    if file.len() < data_at {
        return Err(LoadError::SizeMismatch {
            path: path.to_path_buf(),
            expected: data_at as u64,
            actual: file.len() as u64,
        });
    }
    let header = parse_header(&file[start..data_at]).map_err(|r| npy_err(path, format!("bad header: {r}")))?;
    if header.descr != T::DESCR {
        return Err(npy_err(path, format!("dtype {:?}, but {} ({:?}) was expected", header.descr, T::NAME, T::DESCR)));
    }
    if !(1..=2).contains(&header.shape.len()) {
        return Err(npy_err(path, format!("shape {:?}: expected a vector or a matrix", header.shape)));
    }
    // A vector or a one-row/one-column matrix has the same bytes in either order.
    if header.fortran_order && header.shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(npy_err(path, "fortran_order (column-major) matrices are not supported; save with C order"));
    }
    let size = std::mem::size_of::<T>() as u64;
    let expected = header
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .and_then(|c| c.checked_mul(size))
        .and_then(|b| b.checked_add(data_at as u64));
    let Some(expected) = expected else {
        return Err(npy_err(path, format!("shape {:?} overflows any file size", header.shape)));
    };
    if expected != file.len() as u64 {
        return Err(LoadError::SizeMismatch { path: path.to_path_buf(), expected, actual: file.len() as u64 });
    }
    // The length now equals the file's, so the copy below is bounded by bytes that exist.
    let data = &file[data_at..];
    let mut buf = AlignedBytes::zeroed(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    let shape = header.shape.iter().map(|&d| d as usize).collect();
    Ok(NpyArray { shape, data: Segment::from_aligned(buf) })
}

#[derive(Debug, Default)]
struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<u64>,
}

/// Parses the header dict: `{'descr': …, 'fortran_order': …, 'shape': (…), }`.
fn parse_header(bytes: &[u8]) -> Result<NpyHeader, String> {
    let mut p = Lit { b: bytes, i: 0 };
    let mut h = NpyHeader::default();
    let (mut descr, mut order, mut shape) = (false, false, false);
    p.expect(b'{')?;
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        match key.as_str() {
            "descr" => {
                h.descr = p.string()?;
                descr = true;
            }
            "fortran_order" => {
                h.fortran_order = p.boolean()?;
                order = true;
            }
            "shape" => {
                h.shape = p.tuple()?;
                shape = true;
            }
            other => return Err(format!("unexpected key {other:?}")),
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    if !(descr && order && shape) {
        return Err("missing 'descr', 'fortran_order' or 'shape'".into());
    }
    Ok(h)
}

/// A cursor over a Python literal.
struct Lit<'a> {
    b: &'a [u8],
    i: usize,
}

impl Lit<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.b.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) { Ok(()) } else { Err(format!("expected {:?} at byte {}", c as char, self.i)) }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = match self.b.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a string at byte {}", self.i)),
        };
        self.i += 1;
        let len = self.b[self.i..].iter().position(|&c| c == quote).ok_or("unterminated string")?;
        let s = String::from_utf8_lossy(&self.b[self.i..self.i + len]).into_owned();
        self.i += len + 1;
        Ok(s)
    }

    fn boolean(&mut self) -> Result<bool, String> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.b[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(v);
            }
        }
        Err(format!("expected True or False at byte {}", self.i))
    }

    fn tuple(&mut self) -> Result<Vec<u64>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            if dims.len() >= 32 {
                return Err("too many dimensions".into());
            }
            let start = self.i;
            let mut d: u64 = 0;
            while let Some(&c) = self.b.get(self.i).filter(|c| c.is_ascii_digit()) {
                d = d.checked_mul(10).and_then(|d| d.checked_add(u64::from(c - b'0'))).ok_or("dimension too large")?;
                self.i += 1;
            }
            if self.i == start {
                return Err(format!("expected a dimension at byte {}", self.i));
            }
            self.eat(b'L'); // Python 2 long literals
            dims.push(d);
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

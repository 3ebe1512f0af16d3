//! Matrix Market coordinate text (`.mtx`).
//!
//! ```text
//! %%MatrixMarket matrix coordinate <field> <symmetry>
//! % comments
//! <rows> <cols> <entries>
//! <i> <j> [<value>]
//! …
//! ```
//!
//! - **Entry `(i, j)` is the edge `i → j`**: the row is the source, the column the target (the
//!   convention of SciPy, NetworkX and SuiteSparse graphs, where `A[i, j] ≠ 0` is an edge from `i`
//!   to `j`). Indices are 1-based in the file and become ids `i - 1`, `j - 1`.
//! - `<field>` is `pattern` (unweighted), `real` or `integer` (weighted: the value is the edge
//!   weight, which must be finite and non-negative). `complex` is refused.
//! - `<symmetry>` is `general` or `symmetric`. A symmetric entry `(i, j)` with `i ≠ j` stands for
//!   both `i → j` and `j → i` (same weight); `(i, i)` is one self loop. Files are expected to store
//!   one triangle, as the standard says, but either triangle is accepted. `skew-symmetric` and
//!   `hermitian` are refused.
//! - The graph has `max(rows, cols)` vertices. An index above its declared dimension is an error
//!   naming the line, and the number of entries must equal the declared count.
//! - Repeated entries are merged by summing their values ([`crate::CsrBuilder`]'s policy, as SciPy does).
//! - The writer emits `coordinate pattern general` (or `real general` for a weighted graph), one
//!   entry per edge in CSR order, values in their shortest exact decimal form.

use std::io::Write;
use std::path::Path;

use super::text::{self, Cursor, LineFault, LineParser, ParsedEdges};
use super::{LoadError, ReadOptions, check_text_vertices, map_file, write_atomically};
use crate::csr::{Csr, CsrBuilder, MAX_VERTICES};

/// The banner's description of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Banner {
    weighted: bool,
    symmetric: bool,
}

/// The header: banner, comments, size line.
struct Header {
    banner: Banner,
    rows: u64,
    cols: u64,
    entries: u64,
    /// Line number of the size line (for a wrong entry count).
    size_line: u64,
    /// Byte offset where the entries begin.
    body: usize,
}

fn syntax(path: &Path, line: u64, reason: impl Into<String>) -> LoadError {
    LoadError::Syntax { path: path.to_path_buf(), line, reason: reason.into() }
}

fn parse_banner(path: &Path, line: &[u8]) -> Result<Banner, LoadError> {
    let words: Vec<String> = String::from_utf8_lossy(line).split_whitespace().map(str::to_ascii_lowercase).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["%%matrixmarket", "matrix", "coordinate", field, symmetry] => {
            let weighted = match *field {
                "pattern" => false,
                "real" | "integer" | "double" => true,
                other => {
                    return Err(syntax(
                        path,
                        1,
                        format!("unsupported field {other:?} (expected pattern, real or integer)"),
                    ));
                }
            };
            let symmetric = match *symmetry {
                "general" => false,
                "symmetric" => true,
                other => {
                    return Err(syntax(
                        path,
                        1,
                        format!("unsupported symmetry {other:?} (expected general or symmetric)"),
                    ));
                }
            };
            Ok(Banner { weighted, symmetric })
        }
        ["%%matrixmarket", "matrix", "array", ..] => {
            Err(syntax(path, 1, "dense \"array\" matrices are not graphs; expected \"coordinate\""))
        }
        _ => Err(syntax(
            path,
            1,
            "expected the banner \"%%MatrixMarket matrix coordinate <pattern|real|integer> <general|symmetric>\"",
        )),
    }
}

fn parse_header(path: &Path, file: &[u8]) -> Result<Header, LoadError> {
    let mut pos = 0usize;
    let mut line_no = 0u64;
    let mut banner = None;
    while pos < file.len() {
        let end = file[pos..].iter().position(|&b| b == b'\n').map_or(file.len(), |i| pos + i);
        let line = &file[pos..end];
        line_no += 1;
        let next = (end + 1).min(file.len());
        let Some(b) = banner else {
            banner = Some(parse_banner(path, line)?);
            pos = next;
            continue;
        };
        let t = line.trim_ascii();
        if t.is_empty() || t[0] == b'%' {
            pos = next;
            continue;
        }
        let mut c = Cursor::new(t);
        let fault = |f: LineFault| match f {
            LineFault::Syntax(r) => syntax(path, line_no, format!("size line: {r}")),
            other => syntax(path, line_no, format!("size line: {other:?}")),
        };
        let rows = c.uint("row count").map_err(fault)?;
        let cols = c.uint("column count").map_err(fault)?;
        let entries = c.uint("entry count").map_err(fault)?;
        c.end_of_line("the entry count").map_err(fault)?;
        if rows.max(cols) > MAX_VERTICES {
            return Err(syntax(
                path,
                line_no,
                format!("declared size {rows} x {cols} exceeds the {MAX_VERTICES} vertices that u32 ids allow"),
            ));
        }
        return Ok(Header { banner: b, rows, cols, entries, size_line: line_no, body: next });
    }
    Err(syntax(
        path,
        line_no.max(1),
        if banner.is_none() { "empty file: no Matrix Market banner" } else { "missing size line" },
    ))
}

struct EntryLine {
    rows: u64,
    cols: u64,
    banner: Banner,
}

impl LineParser for EntryLine {
    const COMMENTS: &'static [u8] = b"%";

    #[inline]
    fn parse_line(&self, c: &mut Cursor<'_>, out: &mut ParsedEdges) -> Result<(), LineFault> {
        let i = c.uint("row index")?;
        let j = c.uint("column index")?;
        if i == 0 || j == 0 {
            return Err(LineFault::Syntax("index 0 (Matrix Market indices start at 1)".into()));
        }
        if i > self.rows {
            return Err(LineFault::IdOutOfRange { id: i, declared: self.rows });
        }
        if j > self.cols {
            return Err(LineFault::IdOutOfRange { id: j, declared: self.cols });
        }
        let w = if self.banner.weighted { c.weight()? } else { 1.0 };
        c.end_of_line(if self.banner.weighted { "the value" } else { "the column index (field is pattern)" })?;
        let (u, v) = ((i - 1) as u32, (j - 1) as u32);
        out.push(u, v, w);
        if self.banner.symmetric && u != v {
            out.push(v, u, w);
        }
        Ok(())
    }
}

/// Reads a Matrix Market file.
pub fn read(path: &Path, opts: &ReadOptions) -> Result<Csr, LoadError> {
    let map = map_file(path)?;
    parse(path, &map, opts)
}

/// Parses Matrix Market text already in memory (`path` names it in errors).
pub fn parse(path: &Path, file: &[u8], opts: &ReadOptions) -> Result<Csr, LoadError> {
    let h = parse_header(path, file)?;
    check_text_vertices(path, h.rows.max(h.cols), file.len())?;
    let parser = EntryLine { rows: h.rows, cols: h.cols, banner: h.banner };
    let parsed = text::parse_body(file, h.body, &parser, h.banner.weighted).map_err(|f| f.into_error(path, file))?;
    if parsed.lines != h.entries {
        return Err(syntax(
            path,
            h.size_line,
            format!("size line declares {} entries, the file has {}", h.entries, parsed.lines),
        ));
    }
    let b = CsrBuilder::from_edges(parsed.src, parsed.dst, parsed.weights)
        .vertices(h.rows.max(h.cols))
        .symmetrize(opts.symmetrize)
        .self_loops(opts.self_loops);
    b.build().map_err(|source| LoadError::Build { path: path.to_path_buf(), source })
}

/// Writes `g` as a general coordinate Matrix Market file.
pub fn write(path: &Path, g: &Csr) -> Result<(), LoadError> {
    write_atomically(path, |w| write_to(w, g))
}

/// Writes `g` as Matrix Market text to any writer.
pub fn write_to(w: &mut impl Write, g: &Csr) -> std::io::Result<()> {
    let field = if g.weights().is_some() { "real" } else { "pattern" };
    writeln!(w, "%%MatrixMarket matrix coordinate {field} general")?;
    writeln!(w, "% written by quiver: entry (i, j) is the edge i -> j")?;
    writeln!(w, "{} {} {}", g.vertices(), g.vertices(), g.edges())?;
    text::write_edges(w, g, |buf, u, v, weight| {
        text::push_uint(buf, u64::from(u) + 1);
        buf.push(b' ');
        text::push_uint(buf, u64::from(v) + 1);
        if let Some(x) = weight {
            buf.push(b' ');
            text::push_weight(buf, x);
        }
        buf.push(b'\n');
    })
}

//! SNAP edge list text (`.el`, `.txt`, `.edges`).
//!
//! One edge per line, `source target` or `source target weight`, fields separated by spaces or
//! tabs, 0-based `u32` vertex ids, optional trailing `\r`. Lines starting with `#` or `%` are
//! comments; blank lines are ignored.
//!
//! - **Weighted or not** is decided by the first edge line: two fields make an unweighted graph,
//!   three a weighted one, and every other line must then have the same number of fields.
//!   Weights are decimal floats, finite and non-negative.
//! - **Vertex count** is one more than the largest id. A SNAP header comment of the form
//!   `# Nodes: N Edges: M` before the first edge raises it to at least `N`, so trailing isolated
//!   vertices survive a round trip (SNAP files with sparse ids have `N` below the largest id, and
//!   then the ids win).
//! - The writer emits that header and a comment naming the fields (`source target weight,` for
//!   a weighted graph, which keeps a weighted graph without edges weighted), then the edges in CSR order (grouped by target, sources
//!   ascending), tab-separated, weights in their shortest exact decimal form.

use std::io::Write;
use std::path::Path;

use super::text::{self, Cursor, LineFault, LineParser, ParsedEdges};
use super::{LoadError, ReadOptions, check_text_vertices, map_file, write_atomically};
use crate::csr::{Csr, CsrBuilder, MAX_VERTICES};

struct EdgeListLine {
    weighted: bool,
}

impl LineParser for EdgeListLine {
    const COMMENTS: &'static [u8] = b"#%";

    #[inline]
    fn parse_line(&self, c: &mut Cursor<'_>, out: &mut ParsedEdges) -> Result<(), LineFault> {
        let u = id(c.uint("source vertex id")?)?;
        let v = id(c.uint("target vertex id")?)?;
        let w = if self.weighted { c.weight()? } else { 1.0 };
        c.end_of_line(if self.weighted {
            "the weight"
        } else {
            "the target vertex id (the first edge line has 2 fields)"
        })?;
        out.push(u, v, w);
        Ok(())
    }
}

#[inline]
fn id(x: u64) -> Result<u32, LineFault> {
    if x < MAX_VERTICES {
        Ok(x as u32)
    } else {
        Err(LineFault::Syntax(format!("vertex id {x} is beyond the largest u32 id {}", MAX_VERTICES - 1)))
    }
}

/// What the lines before the first edge say.
struct Prelude {
    weighted: bool,
    nodes: Option<u64>,
}

/// Reads comments up to the first edge line: the SNAP `# Nodes:` count, and the field count of
/// that first line.
fn prelude(file: &[u8]) -> Prelude {
    let mut nodes = None;
    let mut declared_weighted = false;
    for line in file.split(|&b| b == b'\n') {
        let t = line.trim_ascii();
        match t.first() {
            None => continue,
            Some(b'#' | b'%') => {
                let words: Vec<&[u8]> = t[1..].split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()).collect();
                if let Some(i) = words.iter().position(|w| w.eq_ignore_ascii_case(b"nodes:")) {
                    nodes = words.get(i + 1).and_then(|w| std::str::from_utf8(w).ok()?.parse().ok());
                }
                // Our own writer names the fields, which keeps an edgeless weighted graph weighted.
                declared_weighted |= words.windows(3).any(|w| w == [&b"source"[..], b"target", b"weight,"]);
            }
            Some(_) => {
                let fields = t.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()).count();
                return Prelude { weighted: fields >= 3, nodes };
            }
        }
    }
    Prelude { weighted: declared_weighted, nodes }
}

/// Reads an edge list file.
pub fn read(path: &Path, opts: &ReadOptions) -> Result<Csr, LoadError> {
    let map = map_file(path)?;
    parse(path, &map, opts)
}

/// Parses edge list text already in memory (`path` names it in errors).
pub fn parse(path: &Path, file: &[u8], opts: &ReadOptions) -> Result<Csr, LoadError> {
    let Prelude { weighted, nodes } = prelude(file);
    let parsed =
        text::parse_body(file, 0, &EdgeListLine { weighted }, weighted).map_err(|f| f.into_error(path, file))?;
    let from_ids = parsed.max_id.map_or(0, |m| u64::from(m) + 1);
    // A `# Nodes:` count only ever adds isolated vertices, and never past what u32 ids allow.
    let n = from_ids.max(nodes.unwrap_or(0).min(MAX_VERTICES));
    check_text_vertices(path, n, file.len())?;
    let b = CsrBuilder::from_edges(parsed.src, parsed.dst, parsed.weights)
        .vertices(n)
        .symmetrize(opts.symmetrize)
        .self_loops(opts.self_loops);
    b.build().map_err(|source| LoadError::Build { path: path.to_path_buf(), source })
}

/// Writes `g` as a SNAP edge list.
pub fn write(path: &Path, g: &Csr) -> Result<(), LoadError> {
    write_atomically(path, |w| write_to(w, g))
}

/// Writes `g` as edge list text to any writer.
pub fn write_to(w: &mut impl Write, g: &Csr) -> std::io::Result<()> {
    let fields = if g.weights().is_some() { "source target weight" } else { "source target" };
    writeln!(w, "# quiver edge list: {fields}, 0-based ids, one edge per line")?;
    writeln!(w, "# Nodes: {} Edges: {}", g.vertices(), g.edges())?;
    text::write_edges(w, g, |buf, u, v, weight| {
        text::push_uint(buf, u64::from(u));
        buf.push(b'\t');
        text::push_uint(buf, u64::from(v));
        if let Some(x) = weight {
            buf.push(b'\t');
            text::push_weight(buf, x);
        }
        buf.push(b'\n');
    })
}

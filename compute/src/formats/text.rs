//! The parallel line parser shared by the text formats (edge list, Matrix Market).
//!
//! The body of a file (everything after its header) is cut into chunks of about [`CHUNK`] bytes
//! that end at line boundaries; rayon parses the chunks in parallel into per-chunk edge arrays,
//! which are then concatenated in input order. Nothing is allocated per line and numbers are
//! parsed by hand from the bytes.
//!
//! Line numbers are not tracked while parsing (that would serialise the chunks). A failing line
//! reports its byte offset, and only then are the newlines before it counted; the earliest
//! failing line in file order is the one reported, so errors are deterministic.

use std::io::{self, Write};
use std::path::Path;

use rayon::prelude::*;

use super::LoadError;
use crate::csr::Csr;

/// Bytes per parallel work unit: large enough to amortise scheduling, small enough to balance
/// two cores on files of a few megabytes.
const CHUNK: usize = 1 << 20;

/// Edges parsed from (part of) a text file, in file order.
#[derive(Debug, Default)]
pub(crate) struct ParsedEdges {
    pub src: Vec<u32>,
    pub dst: Vec<u32>,
    pub weights: Option<Vec<f32>>,
    /// Data lines seen (a symmetric Matrix Market entry is one line but up to two edges).
    pub lines: u64,
    /// The largest vertex id pushed, if any.
    pub max_id: Option<u32>,
}

impl ParsedEdges {
    fn with_capacity(edges: usize, weighted: bool) -> Self {
        Self {
            src: Vec::with_capacity(edges),
            dst: Vec::with_capacity(edges),
            weights: weighted.then(|| Vec::with_capacity(edges)),
            lines: 0,
            max_id: None,
        }
    }

    /// Appends edge `u → v` (the weight is ignored for an unweighted parse).
    #[inline]
    pub fn push(&mut self, u: u32, v: u32, w: f32) {
        self.src.push(u);
        self.dst.push(v);
        self.max_id = self.max_id.max(Some(u.max(v)));
        if let Some(ws) = &mut self.weights {
            ws.push(w);
        }
    }
}

/// What is wrong with one line.
#[derive(Debug)]
pub(crate) enum LineFault {
    Syntax(String),
    IdOutOfRange { id: u64, declared: u64 },
    BadWeight(String),
}

/// A fault at a byte offset of the file.
#[derive(Debug)]
pub(crate) struct Fault {
    pub at: usize,
    pub kind: LineFault,
}

impl Fault {
    /// Turns the fault into an error naming the line (counted now, on the error path only).
    pub fn into_error(self, path: &Path, file: &[u8]) -> LoadError {
        let line = line_of(file, self.at);
        let path = path.to_path_buf();
        match self.kind {
            LineFault::Syntax(reason) => LoadError::Syntax { path, line, reason },
            LineFault::IdOutOfRange { id, declared } => LoadError::IdOutOfRange { path, line, id, declared },
            LineFault::BadWeight(weight) => LoadError::BadWeight { path, line, weight },
        }
    }
}

/// The 1-based line number of byte offset `at`.
pub(crate) fn line_of(file: &[u8], at: usize) -> u64 {
    1 + file[..at.min(file.len())].iter().filter(|&&b| b == b'\n').count() as u64
}

/// Parses the data lines of one format. Implementations see a cursor at the first non-blank
/// byte of a line that is neither empty nor a comment, and must consume the line up to (not
/// including) its `\n`, usually by ending with [`Cursor::end_of_line`].
pub(crate) trait LineParser: Sync {
    /// Bytes that start a comment line.
    const COMMENTS: &'static [u8];
    fn parse_line(&self, c: &mut Cursor<'_>, out: &mut ParsedEdges) -> Result<(), LineFault>;
}

/// A read position inside a chunk of text.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

#[inline]
fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t' || b == b'\r'
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    #[inline]
    pub fn skip_blanks(&mut self) {
        while self.peek().is_some_and(is_blank) {
            self.pos += 1;
        }
    }

    /// Skips to the `\n` ending the current line (or the end of the chunk).
    #[inline]
    fn skip_line(&mut self) {
        match self.bytes[self.pos..].iter().position(|&b| b == b'\n') {
            Some(i) => self.pos += i,
            None => self.pos = self.bytes.len(),
        }
    }

    /// The next whitespace-delimited token, without consuming it.
    fn token(&self) -> &'a [u8] {
        let rest = &self.bytes[self.pos..];
        let end = rest.iter().position(|&b| is_blank(b) || b == b'\n').unwrap_or(rest.len());
        &rest[..end]
    }

    /// Whether the line has another field.
    #[inline]
    pub fn at_field(&mut self) -> bool {
        self.skip_blanks();
        self.peek().is_some_and(|b| b != b'\n')
    }

    /// Parses an unsigned decimal integer field (leading blanks allowed).
    #[inline]
    pub fn uint(&mut self, what: &str) -> Result<u64, LineFault> {
        self.skip_blanks();
        let (bytes, start) = (self.bytes, self.pos);
        let mut i = start;
        let mut value: u64 = 0;
        // Up to 19 digits cannot overflow a u64, so the hot loop has no overflow check; a
        // longer run goes to the checked path.
        while let Some(&b) = bytes.get(i) {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            if i - start == 19 {
                return Err(self.uint_error(start, what));
            }
            value = value * 10 + u64::from(d);
            i += 1;
        }
        self.pos = i;
        if i == start || bytes.get(i).is_some_and(|&b| !is_blank(b) && b != b'\n') {
            return Err(self.uint_error(start, what));
        }
        Ok(value)
    }

    /// The error for a field at `start` that is not a `u64`: missing, malformed or too large.
    #[cold]
    #[inline(never)]
    fn uint_error(&self, start: usize, what: &str) -> LineFault {
        let tok = self.token_at(start);
        if tok.is_empty() {
            LineFault::Syntax(format!("missing {what}"))
        } else if tok.iter().all(u8::is_ascii_digit) {
            // More than 19 digits: beyond any vertex id or count Quiver can represent.
            LineFault::Syntax(format!("{what} {} is too large", show(tok)))
        } else {
            LineFault::Syntax(format!("expected {what}, found {}", show(tok)))
        }
    }

    fn token_at(&self, start: usize) -> &'a [u8] {
        Cursor { bytes: self.bytes, pos: start }.token()
    }

    /// Parses a weight field: a decimal float that must be finite and non-negative.
    #[inline]
    pub fn weight(&mut self) -> Result<f32, LineFault> {
        self.skip_blanks();
        let tok = self.token();
        if tok.is_empty() {
            return Err(LineFault::Syntax("missing weight".into()));
        }
        self.pos += tok.len();
        let w = parse_f32(tok).ok_or_else(|| LineFault::Syntax(format!("expected a weight, found {}", show(tok))))?;
        if !(w.is_finite() && w >= 0.0) {
            return Err(LineFault::BadWeight(show(tok)));
        }
        Ok(w)
    }

    /// Accepts only trailing blanks before the end of the line.
    #[inline]
    pub fn end_of_line(&mut self, expected: &str) -> Result<(), LineFault> {
        if self.at_field() {
            return Err(LineFault::Syntax(format!("unexpected {} after {expected}", show(self.token()))));
        }
        Ok(())
    }
}

/// A token for an error message, as text, shortened if long.
fn show(tok: &[u8]) -> String {
    let s = String::from_utf8_lossy(&tok[..tok.len().min(40)]);
    if tok.len() > 40 { format!("\"{s}…\"") } else { format!("\"{s}\"") }
}

/// Exact powers of ten in `f32` (all of 10^0..=10^10 are representable).
const POW10: [f32; 11] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

/// Parses a decimal float. The common case (at most 7 significant digits and a small exponent,
/// e.g. `1`, `0.5`, `3.25e-2`) is computed exactly with one `f32` multiply or divide of two exactly
/// representable values, which is correctly rounded (Clinger's fast path); anything else falls
/// back to the standard library's correctly rounded parser. Both paths agree bit for bit.
pub(crate) fn parse_f32(tok: &[u8]) -> Option<f32> {
    fast_f32(tok).or_else(|| std::str::from_utf8(tok).ok()?.parse::<f32>().ok())
}

#[inline]
fn fast_f32(tok: &[u8]) -> Option<f32> {
    let (neg, mut i) = match tok.first()? {
        b'-' => (true, 1),
        b'+' => (false, 1),
        _ => (false, 0),
    };
    let mut mant: u32 = 0;
    let mut digits = 0u32;
    let mut exp: i32 = 0;
    let mut seen = false;
    while let Some(&d) = tok.get(i).filter(|d| d.is_ascii_digit()) {
        seen = true;
        if mant != 0 || d != b'0' {
            digits += 1;
        }
        mant = mant.wrapping_mul(10).wrapping_add(u32::from(d - b'0'));
        i += 1;
    }
    if tok.get(i) == Some(&b'.') {
        i += 1;
        while let Some(&d) = tok.get(i).filter(|d| d.is_ascii_digit()) {
            seen = true;
            if mant != 0 || d != b'0' {
                digits += 1;
            }
            mant = mant.wrapping_mul(10).wrapping_add(u32::from(d - b'0'));
            exp -= 1;
            i += 1;
        }
    }
    if !seen || digits > 7 {
        return None;
    }
    if matches!(tok.get(i), Some(b'e' | b'E')) {
        i += 1;
        let eneg = match tok.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = i;
        let mut e: i32 = 0;
        while let Some(&d) = tok.get(i).filter(|d| d.is_ascii_digit()) {
            e = (e * 10 + i32::from(d - b'0')).min(1000);
            i += 1;
        }
        if i == start {
            return None;
        }
        exp += if eneg { -e } else { e };
    }
    if i != tok.len() || !(-10..=10).contains(&exp) {
        return None;
    }
    let m = mant as f32; // exact: at most 7 digits < 2^24
    let v = if exp >= 0 { m * POW10[exp as usize] } else { m / POW10[(-exp) as usize] };
    Some(if neg { -v } else { v })
}

/// Parses the body `file[start..]` in parallel with `parser`.
pub(crate) fn parse_body<P: LineParser>(
    file: &[u8],
    start: usize,
    parser: &P,
    weighted: bool,
) -> Result<ParsedEdges, Fault> {
    let chunks = split_lines(file, start, CHUNK);
    let parts: Vec<Result<ParsedEdges, Fault>> =
        chunks.par_iter().map(|&(a, b)| parse_chunk(&file[a..b], a, parser, weighted)).collect();
    let mut ok = Vec::with_capacity(parts.len());
    for p in parts {
        ok.push(p?); // the first error in file order wins
    }
    Ok(concat(ok, weighted))
}

/// Cuts `file[start..]` into ranges of about `target` bytes, each ending just after a `\n`
/// (or at the end of the file).
fn split_lines(file: &[u8], start: usize, target: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity((file.len() - start) / target + 1);
    let mut a = start;
    while a < file.len() {
        let want = (a + target).min(file.len());
        let b = match file[want..].iter().position(|&x| x == b'\n') {
            Some(i) => want + i + 1,
            None => file.len(),
        };
        out.push((a, b));
        a = b;
    }
    out
}

fn parse_chunk<P: LineParser>(chunk: &[u8], base: usize, parser: &P, weighted: bool) -> Result<ParsedEdges, Fault> {
    // A data line is at least 4 bytes ("0 1\n"); typical graph lines are 10–20.
    let mut out = ParsedEdges::with_capacity(chunk.len() / 12, weighted);
    let mut c = Cursor::new(chunk);
    while c.pos < chunk.len() {
        let line_start = c.pos;
        c.skip_blanks();
        match c.peek() {
            None => break,
            Some(b'\n') => {}
            Some(b) if P::COMMENTS.contains(&b) => c.skip_line(),
            Some(_) => {
                out.lines += 1;
                parser.parse_line(&mut c, &mut out).map_err(|kind| Fault { at: base + line_start, kind })?;
                c.skip_line(); // the parser stops at the newline; this is a no-op unless it did not
            }
        }
        c.pos += 1; // past the '\n'
    }
    Ok(out)
}

/// Concatenates per-chunk results in order, copying in parallel.
fn concat(parts: Vec<ParsedEdges>, weighted: bool) -> ParsedEdges {
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let total: usize = parts.iter().map(|p| p.src.len()).sum();
    let lines = parts.iter().map(|p| p.lines).sum();
    let max_id = parts.iter().filter_map(|p| p.max_id).max();
    let gather = |pick: &(dyn Fn(&ParsedEdges) -> &[u32] + Sync)| -> Vec<u32> {
        let mut out = vec![0u32; total];
        let mut slots = Vec::with_capacity(parts.len());
        let mut rest = &mut out[..];
        for p in &parts {
            let (head, tail) = rest.split_at_mut(pick(p).len());
            slots.push(head);
            rest = tail;
        }
        slots.into_par_iter().zip(parts.par_iter()).for_each(|(dst, p)| dst.copy_from_slice(pick(p)));
        out
    };
    let src = gather(&|p| &p.src);
    let dst = gather(&|p| &p.dst);
    let weights = weighted.then(|| {
        let mut out = Vec::with_capacity(total);
        for p in &parts {
            out.extend_from_slice(p.weights.as_deref().unwrap_or(&[]));
        }
        out
    });
    ParsedEdges { src, dst, weights, lines, max_id }
}

/// Writes every edge of `g` in CSR order, formatting blocks of rows in parallel (`line` appends
/// one edge's text) and writing them in order, a bounded number of blocks at a time.
pub(crate) fn write_edges(
    w: &mut impl Write,
    g: &Csr,
    line: impl Fn(&mut Vec<u8>, u32, u32, Option<f32>) + Sync,
) -> io::Result<()> {
    const BLOCK_EDGES: u64 = 1 << 18;
    let offsets = &**g.offsets();
    let n = g.vertices();
    let mut blocks = Vec::new();
    let mut start = 0usize;
    while start < n {
        let goal = offsets[start] + BLOCK_EDGES;
        let end = offsets.partition_point(|&o| o < goal).clamp(start + 1, n);
        blocks.push((start, end));
        start = end;
    }
    for batch in blocks.chunks(rayon::current_num_threads() * 4) {
        let texts: Vec<Vec<u8>> = batch
            .par_iter()
            .map(|&(a, b)| {
                let mut buf = Vec::with_capacity(((offsets[b] - offsets[a]) * 16) as usize);
                for (v, &base) in offsets.iter().enumerate().take(b).skip(a) {
                    for (i, &u) in g.in_neighbours(v as u32).iter().enumerate() {
                        line(&mut buf, u, v as u32, g.weights().map(|ws| ws[base as usize + i]));
                    }
                }
                buf
            })
            .collect();
        for t in texts {
            w.write_all(&t)?;
        }
    }
    Ok(())
}

/// Appends the decimal digits of `x`.
#[inline]
pub(crate) fn push_uint(buf: &mut Vec<u8>, mut x: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

/// Appends the shortest decimal text that reads back as exactly `w`.
#[inline]
pub(crate) fn push_weight(buf: &mut Vec<u8>, w: f32) {
    // `Display` for floats prints the shortest round-tripping representation.
    let _ = write!(buf, "{w}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_float_path_agrees_with_std() {
        for s in [
            "0",
            "1",
            "0.5",
            "3.25e-2",
            "1e10",
            "1234567",
            "0.1",
            "7.0",
            "-0",
            "2.5E+3",
            "9999999e-10",
            "0.0000001",
            "123.4567",
            "1.",
            ".5",
        ] {
            let std: f32 = s.parse().unwrap();
            assert_eq!(parse_f32(s.as_bytes()).map(f32::to_bits), Some(std.to_bits()), "{s}");
        }
        for s in ["12345678.9", "1e-30", "3.4028235e38", "inf", "NaN", "1.17549435e-38"] {
            let std: f32 = s.parse().unwrap();
            assert_eq!(parse_f32(s.as_bytes()).map(f32::to_bits), Some(std.to_bits()), "{s}");
        }
        for s in ["", "-", "e5", "1e", "1x", "1.2.3", "0x10"] {
            assert_eq!(parse_f32(s.as_bytes()), None, "{s}");
        }
    }

    #[test]
    fn chunks_end_at_newlines_and_cover_everything() {
        let text = b"1 2\n3 4\n55 66\n7 8";
        for target in 1..6 {
            let ch = split_lines(text, 0, target);
            assert_eq!(ch.first().map(|c| c.0), Some(0));
            assert_eq!(ch.last().map(|c| c.1), Some(text.len()));
            for w in ch.windows(2) {
                assert_eq!(w[0].1, w[1].0);
                assert_eq!(text[w[0].1 - 1], b'\n');
            }
        }
    }

    #[test]
    fn line_numbers_count_from_one() {
        assert_eq!(line_of(b"a\nb\nc", 0), 1);
        assert_eq!(line_of(b"a\nb\nc", 2), 2);
        assert_eq!(line_of(b"a\nb\nc", 4), 3);
    }
}

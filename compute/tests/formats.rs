//! Graph and vector file formats at their boundary: golden files, round trips, and every kind of
//! bad input from issue 2 (each its own test), plus property tests that no input panics a reader.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use quiver_compute::buf::Storage;
use quiver_compute::formats::{
    self, Format, GraphInfo, LoadError, ReadOptions, npy, qcsr, read_graph, read_npy, write_graph, write_npy,
};
use quiver_compute::{Csr, CsrBuilder, SelfLoops};

/// A temporary directory plus helpers to put files in it.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().expect("temp dir"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write fixture");
        p
    }
}

fn read(path: &Path) -> Result<Csr, LoadError> {
    read_graph(path, &ReadOptions::default())
}

fn graph(edges: &[(u32, u32)], n: Option<u64>) -> Csr {
    let mut b = CsrBuilder::new();
    if let Some(n) = n {
        b = b.vertices(n);
    }
    for &(u, v) in edges {
        b.push(u, v, None);
    }
    b.build().expect("valid edges")
}

fn weighted(edges: &[(u32, u32, f32)], n: Option<u64>) -> Csr {
    let mut b = CsrBuilder::weighted();
    if let Some(n) = n {
        b = b.vertices(n);
    }
    for &(u, v, w) in edges {
        b.push(u, v, Some(w));
    }
    b.build().expect("valid edges")
}

/// The graph as `(source, target, weight)` triples, for readable golden comparisons.
fn triples(g: &Csr) -> Vec<(u32, u32, Option<f32>)> {
    g.edges_iter().collect()
}

/// Asserts that reading `text` as file `name` fails with a message equal to `expect` once the
/// temporary directory is stripped from it.
fn check_err(name: &str, text: impl AsRef<[u8]>, expect: &str) {
    let dir = Dir::new();
    let path = dir.file(name, text);
    let err = read(&path).expect_err("input must be refused");
    let msg = err.to_string().replace(&format!("{}/", dir.0.path().display()), "");
    assert_eq!(msg, expect, "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Golden files

#[test]
fn golden_edge_list() {
    let dir = Dir::new();
    let p = dir
        .file("g.el", "# Directed graph: toy\n# Nodes: 5 Edges: 4\n0\t1\n2 1\r\n\n% also a comment\n  1 0  \n2\t1\n");
    let g = read(&p).unwrap();
    assert_eq!(g.vertices(), 5, "the Nodes header keeps isolated vertices 3 and 4");
    assert_eq!(triples(&g), vec![(1, 0, None), (0, 1, None), (2, 1, None)], "the duplicate 2 -> 1 is merged");
    assert_eq!(&**g.out_degree(), &[1, 1, 1, 0, 0]);
}

#[test]
fn golden_weighted_edge_list_sums_duplicates() {
    let dir = Dir::new();
    let p = dir.file("g.txt", "0 1 0.5\n0 1 0.25\n1 0 2e0\n");
    let g = read(&p).unwrap();
    assert_eq!(triples(&g), vec![(1, 0, Some(2.0)), (0, 1, Some(0.75))]);
}

#[test]
fn golden_matrix_market_general_pattern() {
    let dir = Dir::new();
    let p =
        dir.file("g.mtx", "%%MatrixMarket matrix coordinate pattern general\n% a comment\n%\n4 4 3\n1 2\n2 3\n4 1\n");
    let g = read(&p).unwrap();
    assert_eq!(g.vertices(), 4);
    // Entry (i, j) is the edge i -> j, ids shifted to 0-based.
    assert_eq!(triples(&g), vec![(3, 0, None), (0, 1, None), (1, 2, None)]);
}

#[test]
fn golden_matrix_market_symmetric_real() {
    let dir = Dir::new();
    let p = dir.file("g.mtx", "%%MatrixMarket matrix coordinate real symmetric\n3 3 3\n2 1 1.5\n3 3 4\n3 1 0.25\n");
    let g = read(&p).unwrap();
    assert_eq!(
        triples(&g),
        vec![(1, 0, Some(1.5)), (2, 0, Some(0.25)), (0, 1, Some(1.5)), (0, 2, Some(0.25)), (2, 2, Some(4.0))],
        "off-diagonal entries stand for both directions, the diagonal for one self loop"
    );
}

#[test]
fn golden_matrix_market_integer_field_is_weighted() {
    let dir = Dir::new();
    let p = dir.file("g.mtx", "%%MatrixMarket matrix coordinate integer general\n2 2 1\n1 2 7\n");
    assert_eq!(triples(&read(&p).unwrap()), vec![(0, 1, Some(7.0))]);
}

#[test]
fn golden_written_text() {
    let g = weighted(&[(0, 1, 0.5), (2, 1, 1.0), (1, 0, 3.25)], Some(4));
    let mut el = Vec::new();
    formats::edgelist::write_to(&mut el, &g).unwrap();
    assert_eq!(
        String::from_utf8(el).unwrap(),
        "# quiver edge list: source target weight, 0-based ids, one edge per line\n# Nodes: 4 Edges: 3\n1\t0\t3.25\n0\t1\t0.5\n2\t1\t1\n"
    );
    let mut mtx = Vec::new();
    formats::mtx::write_to(&mut mtx, &graph(&[(0, 1), (2, 1)], None)).unwrap();
    assert_eq!(
        String::from_utf8(mtx).unwrap(),
        "%%MatrixMarket matrix coordinate pattern general\n% written by quiver: entry (i, j) is the edge i -> j\n3 3 2\n1 2\n3 2\n"
    );
}

#[test]
fn read_options_symmetrize_and_drop_loops_apply_to_every_format() {
    let dir = Dir::new();
    let g = graph(&[(0, 1), (1, 1), (1, 2)], None);
    let opts = ReadOptions { symmetrize: true, self_loops: SelfLoops::Drop, ..ReadOptions::default() };
    for name in ["g.el", "g.mtx", "g.qcsr"] {
        let p = dir.path(name);
        write_graph(&p, &g).unwrap();
        let h = read_graph(&p, &opts).unwrap();
        assert_eq!(triples(&h), vec![(1, 0, None), (0, 1, None), (2, 1, None), (1, 2, None)], "{name}");
    }
}

#[test]
fn graph_info_summarises() {
    let g = graph(&[(0, 1), (1, 1), (2, 1)], Some(5));
    let info = GraphInfo::of(&g);
    assert_eq!((info.vertices, info.edges, info.self_loops, info.isolated, info.dangling), (5, 3, 1, 2, 2));
    assert_eq!((info.max_in_degree, info.max_out_degree, info.weighted), (3, 1, false));
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_every_graph_format() {
    let dir = Dir::new();
    let graphs = [
        graph(&[(0, 1), (1, 2), (2, 0), (2, 2), (5, 3)], Some(9)),
        weighted(&[(0, 1, 0.1), (1, 0, 1e-7), (3, 3, 123456.79), (2, 0, 0.0)], Some(6)),
        graph(&[], Some(3)),
    ];
    for (i, g) in graphs.iter().enumerate() {
        for ext in ["el", "txt", "edges", "mtx", "qcsr"] {
            let p = dir.path(&format!("g{i}.{ext}"));
            write_graph(&p, g).unwrap();
            assert_eq!(&read(&p).unwrap(), g, "graph {i} through .{ext}");
        }
    }
}

#[test]
fn qcsr_load_is_zero_copy() {
    let dir = Dir::new();
    let p = dir.path("g.qcsr");
    write_graph(&p, &weighted(&[(0, 1, 1.0), (1, 0, 2.0)], None)).unwrap();
    let g = read(&p).unwrap();
    assert!(matches!(**g.sources().storage(), Storage::Mapped(_)));
    assert!(matches!(**g.weights().unwrap().storage(), Storage::Mapped(_)));
    assert_eq!(g.sources().as_bytes().as_ptr() as usize % 64, 0);
}

#[test]
fn qcsr_file_layout_is_as_documented() {
    let dir = Dir::new();
    let p = dir.path("g.qcsr");
    write_graph(&p, &graph(&[(0, 1), (2, 1)], None)).unwrap();
    let b = std::fs::read(&p).unwrap();
    assert_eq!(&b[..8], b"QUIVCSR\0");
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 0);
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 3);
    assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 2);
    assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), crc32fast::hash(&b[64..]));
    // offsets (4 × u64 = 32 → 64), sources (2 × u32 → 64), out-degree (3 × u32 → 64).
    assert_eq!(b.len(), 64 + 64 + 64 + 64);
    assert_eq!(&b[64..96], [0u64, 0, 2, 2].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>().as_slice());
    assert_eq!(&b[128..136], [0u32, 2].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>().as_slice());
    assert_eq!(&b[192..204], [1u32, 0, 1].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>().as_slice());
}

#[test]
fn npy_round_trips_vectors_and_matrices() {
    let dir = Dir::new();
    let v: Vec<f32> = vec![0.5, -1.0, f32::MAX, 0.0];
    write_npy(dir.path("v.npy"), &[4], &v).unwrap();
    let r = read_npy::<f32>(dir.path("v.npy")).unwrap();
    assert_eq!((r.shape.as_slice(), &*r.data), (&[4usize][..], &v[..]));

    let m: Vec<f64> = (0..12).map(|x| f64::from(x) * 0.25).collect();
    write_npy(dir.path("m.npy"), &[3, 4], &m).unwrap();
    let r = read_npy::<f64>(dir.path("m.npy")).unwrap();
    assert_eq!((r.rows(), r.cols(), r.row(2)), (3, 4, &m[8..12]));

    let big: Vec<f32> = (0..200_003).map(|i| i as f32 * 0.5).collect();
    write_npy(dir.path("big.npy"), &[200_003], &big).unwrap();
    assert_eq!(&*read_npy::<f32>(dir.path("big.npy")).unwrap().data, &big[..]);

    write_npy::<f32>(dir.path("e.npy"), &[0, 8], &[]).unwrap();
    assert_eq!(read_npy::<f32>(dir.path("e.npy")).unwrap().shape, vec![0, 8]);
}

#[test]
fn npy_written_in_parts_equals_npy_written_whole() {
    let dir = Dir::new();
    let m: Vec<f32> = (0..3 * 70_001).map(|i| i as f32 * 0.25).collect();
    write_npy(dir.path("whole.npy"), &[70_001, 3], &m).unwrap();
    let (a, rest) = m.split_at(3 * 1_000);
    let (b, c) = rest.split_at(3 * 65_536);
    npy::write_npy_parts(dir.path("parts.npy"), &[70_001, 3], &[a, b, &[], c]).unwrap();
    assert_eq!(std::fs::read(dir.path("parts.npy")).unwrap(), std::fs::read(dir.path("whole.npy")).unwrap());
    let err = npy::write_npy_parts(dir.path("short.npy"), &[70_001, 3], &[a, b]).unwrap_err().to_string();
    assert!(err.contains("does not hold"), "{err}");
}

/// A file written piece by piece is the one written whole, appears only when finished with every
/// value, refuses values beyond its shape, and leaves nothing behind when abandoned.
#[test]
fn npy_writer_in_pieces_equals_npy_written_whole() {
    let dir = Dir::new();
    let m: Vec<f32> = (0..3 * 70_001).map(|i| i as f32 * 0.25).collect();
    write_npy(dir.path("whole.npy"), &[70_001, 3], &m).unwrap();
    let mut w = npy::NpyWriter::<f32>::create(dir.path("pieces.npy"), &[70_001, 3]).unwrap();
    for piece in m.chunks(50_000) {
        w.write(piece).unwrap();
        assert!(!dir.path("pieces.npy").exists(), "the file appears only when finished");
    }
    assert_eq!(w.remaining(), 0);
    let err = w.write(&[1.0]).unwrap_err().to_string();
    assert!(err.contains("more than the shape's 210003 values"), "{err}");
    w.finish(false).unwrap();
    assert_eq!(std::fs::read(dir.path("pieces.npy")).unwrap(), std::fs::read(dir.path("whole.npy")).unwrap());

    let mut short = npy::NpyWriter::<f32>::create(dir.path("short.npy"), &[4]).unwrap();
    short.write(&[1.0, 2.0]).unwrap();
    let err = short.finish(true).unwrap_err().to_string();
    assert!(err.contains("2 of the shape's 4 values written"), "{err}");
    drop(npy::NpyWriter::<f32>::create(dir.path("dropped.npy"), &[4]).unwrap());
    let left: Vec<_> = std::fs::read_dir(dir.path("")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only whole.npy and pieces.npy remain: {left:?}");
}

#[test]
fn npy_golden_bytes_match_numpy() {
    // `np.save(f, np.array([1.0, 2.0], dtype='<f4'))` with numpy >= 1.21 (64-byte aligned header).
    let mut b = Vec::new();
    npy::write_npy_to(&mut b, &[2], &[1.0f32, 2.0]).unwrap();
    let mut expect = b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }".to_vec();
    expect.resize(127, b' ');
    expect.push(b'\n');
    expect.extend_from_slice(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40]);
    assert_eq!(b, expect);
}

#[test]
fn npy_reads_numpy_v2_and_old_16_byte_headers() {
    let dir = Dir::new();
    let dict = b"{'descr': '<f8', 'fortran_order': False, 'shape': (1L,), }     \n";
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    v2.extend_from_slice(dict);
    v2.extend_from_slice(&2.5f64.to_le_bytes());
    let r = read_npy::<f64>(dir.file("v2.npy", &v2)).unwrap();
    assert_eq!((&*r.shape, &*r.data), (&[1usize][..], &[2.5][..]));
}

// ---------------------------------------------------------------------------------------------
// Bad input: each a test, each a clear error.

#[test]
fn malformed_edge_list_line_names_file_and_line() {
    check_err("g.el", "# header\n0 1\n1 2\n1 x\n", "g.el line 4: expected target vertex id, found \"x\"");
}

#[test]
fn malformed_edge_list_extra_field() {
    check_err(
        "g.el",
        "0 1\n1 2 7\n",
        "g.el line 2: unexpected \"7\" after the target vertex id (the first edge line has 2 fields)",
    );
}

#[test]
fn malformed_edge_list_missing_weight() {
    check_err("g.el", "0 1 1.0\n1 2\n", "g.el line 2: missing weight");
}

#[test]
fn malformed_matrix_market_line_names_file_and_line() {
    check_err(
        "graph.mtx",
        "%%MatrixMarket matrix coordinate pattern general\n3 3 2\n1 2\n2 three\n",
        "graph.mtx line 4: expected column index, found \"three\"",
    );
}

#[test]
fn malformed_matrix_market_banner() {
    check_err(
        "graph.mtx",
        "1 2\n",
        "graph.mtx line 1: expected the banner \"%%MatrixMarket matrix coordinate <pattern|real|integer> <general|symmetric>\"",
    );
    check_err(
        "graph.mtx",
        "%%MatrixMarket matrix coordinate complex general\n1 1 0\n",
        "graph.mtx line 1: unsupported field \"complex\" (expected pattern, real or integer)",
    );
}

#[test]
fn matrix_market_entry_count_must_match() {
    check_err(
        "graph.mtx",
        "%%MatrixMarket matrix coordinate pattern general\n%\n3 3 3\n1 2\n",
        "graph.mtx line 3: size line declares 3 entries, the file has 1",
    );
}

#[test]
fn matrix_market_index_zero() {
    check_err(
        "graph.mtx",
        "%%MatrixMarket matrix coordinate pattern general\n3 3 1\n0 2\n",
        "graph.mtx line 3: index 0 (Matrix Market indices start at 1)",
    );
}

#[test]
fn vertex_id_beyond_declared_size() {
    let mut text = String::from("%%MatrixMarket matrix coordinate pattern general\n");
    text.push_str("% line 2\n% line 3\n65536 65536 10\n");
    for i in 1..=7 {
        text.push_str(&format!("{i} {}\n", i + 1)); // lines 5..=11
    }
    text.push_str("70000 1\n1 1\n2 2\n"); // line 12
    check_err("graph.mtx", text, "graph.mtx line 12: vertex id 70000 exceeds declared size 65536");
}

#[test]
fn edge_list_vertex_id_beyond_u32() {
    check_err(
        "g.el",
        "0 1\n4294967295 0\n",
        "g.el line 2: vertex id 4294967295 is beyond the largest u32 id 4294967294",
    );
    check_err(
        "g.el",
        "0 99999999999999999999999\n",
        "g.el line 1: target vertex id \"99999999999999999999999\" is too large",
    );
}

#[test]
fn text_claiming_billions_of_vertices_is_refused_before_allocating() {
    check_err(
        "g.mtx",
        "%%MatrixMarket matrix coordinate pattern general\n4000000000 4000000000 0\n",
        "g.mtx: 4000000000 vertices in a text file of 73 bytes is implausible (at most 16 per byte); most would be isolated",
    );
    check_err(
        "g.el",
        "0 4000000000\n",
        "g.el: 4000000001 vertices in a text file of 13 bytes is implausible (at most 16 per byte); most would be isolated",
    );
    // Up to 2^24 vertices are always fine, however short the file.
    let dir = Dir::new();
    assert_eq!(read(&dir.file("ok.el", "0 16777215\n")).unwrap().vertices(), 1 << 24);
}

#[test]
fn negative_weight_names_line() {
    check_err("g.el", "0 1 1\n1 2 -0.5\n", "g.el line 2: weight \"-0.5\" is not a finite non-negative number");
    check_err(
        "g.mtx",
        "%%MatrixMarket matrix coordinate real general\n2 2 1\n1 2 -3\n",
        "g.mtx line 3: weight \"-3\" is not a finite non-negative number",
    );
}

#[test]
fn nan_weight_names_line() {
    check_err("g.el", "0 1 NaN\n", "g.el line 1: weight \"NaN\" is not a finite non-negative number");
    check_err(
        "g.mtx",
        "%%MatrixMarket matrix coordinate real general\n2 2 2\n1 2 1\n2 1 nan\n",
        "g.mtx line 4: weight \"nan\" is not a finite non-negative number",
    );
}

#[test]
fn infinite_weight_names_line() {
    check_err("g.el", "0 1 1\n1 0 inf\n", "g.el line 2: weight \"inf\" is not a finite non-negative number");
    // A literal too large for f32 rounds to infinity and is refused the same way.
    check_err("g.el", "0 1 1e39\n", "g.el line 1: weight \"1e39\" is not a finite non-negative number");
}

#[test]
fn error_line_is_exact_across_parallel_chunks() {
    // Several MiB of valid lines, so the bad one sits in a later chunk than the first.
    let mut text = String::with_capacity(8 << 20);
    let lines = 600_000;
    for i in 0..lines {
        text.push_str(&format!("{} {}\n", i % 1000, (i * 7) % 1000));
    }
    text.push_str("5 oops\n");
    for i in 0..1000 {
        text.push_str(&format!("{i} 0\n"));
    }
    check_err("big.el", text, &format!("big.el line {}: expected target vertex id, found \"oops\"", lines + 1));
}

fn qcsr_bytes() -> Vec<u8> {
    let mut b = Vec::new();
    qcsr::write_to(&mut b, &weighted(&[(0, 1, 1.0), (1, 2, 2.0), (2, 0, 3.0)], None)).unwrap();
    b
}

#[test]
fn truncated_qcsr_is_refused() {
    let b = qcsr_bytes();
    for len in [0, 7, 40, 64, b.len() - 64, b.len() - 1] {
        let dir = Dir::new();
        let err = read(&dir.file("g.qcsr", &b[..len])).unwrap_err();
        assert!(matches!(err, LoadError::SizeMismatch { actual, .. } if actual == len as u64), "{len}: {err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}

#[test]
fn qcsr_with_wrong_magic() {
    let mut b = qcsr_bytes();
    b[0] = b'X';
    check_err("g.qcsr", &b, "g.qcsr: not a qcsr file (wrong magic bytes)");
    check_err("g.qcsr", b"%%MatrixMarket", "g.qcsr: not a qcsr file (wrong magic bytes)");
}

#[test]
fn qcsr_with_wrong_version() {
    let mut b = qcsr_bytes();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    check_err("g.qcsr", &b, "g.qcsr: unsupported qcsr version 2 (this build reads 1)");
}

#[test]
fn qcsr_header_claiming_10_to_the_12_edges_in_1_kb() {
    let mut b = qcsr_bytes();
    b.resize(1024, 0);
    b[24..32].copy_from_slice(&1_000_000_000_000u64.to_le_bytes());
    // Refused from the header and the file length alone, before the payload is touched.
    check_err("g.qcsr", &b, "g.qcsr: truncated or corrupt: header describes 8000000000192 bytes, file has 1024");
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    check_err("g.qcsr", &b, "g.qcsr: bad header: 3 vertices and 18446744073709551615 edges overflow any file size");
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    check_err("g.qcsr", &b, "g.qcsr: bad header: 1099511627776 vertices exceed the 4294967295 that u32 ids allow");
}

#[test]
fn qcsr_header_alone_reads_and_checks() {
    let dir = Dir::new();
    let p = dir.file("g.qcsr", qcsr_bytes());
    let h = qcsr::read_header(&p).unwrap();
    assert_eq!((h.vertices, h.edges, h.weighted), (3, 3, true));
    let b = qcsr_bytes();
    let t = dir.file("t.qcsr", &b[..100]);
    assert!(matches!(qcsr::read_header(&t), Err(LoadError::SizeMismatch { expected: 320, actual: 100, .. })));
    let s = dir.file("s.qcsr", &b[..10]);
    assert!(matches!(qcsr::read_header(&s), Err(LoadError::SizeMismatch { expected: 64, actual: 10, .. })));
}

#[test]
fn qcsr_checksum_mismatch() {
    let mut b = qcsr_bytes();
    let last_weight = 64 + 64 + 64 + 8; // third f32 of the weights array
    b[last_weight..last_weight + 4].copy_from_slice(&5.0f32.to_le_bytes());
    let dir = Dir::new();
    let p = dir.file("g.qcsr", &b);
    assert!(matches!(read(&p), Err(LoadError::Checksum { .. })));
    // Skipping the checksum still validates structure; this corruption is structurally valid.
    let opts = ReadOptions { verify_checksum: false, ..ReadOptions::default() };
    assert_eq!(read_graph(&p, &opts).unwrap().weights().unwrap()[2], 5.0);
}

#[test]
fn qcsr_with_valid_checksum_but_invalid_arrays() {
    let mut b = qcsr_bytes();
    b[128..132].copy_from_slice(&9u32.to_le_bytes()); // a source id beyond 3 vertices
    let crc = crc32fast::hash(&b[64..]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    check_err("g.qcsr", &b, "g.qcsr: invalid graph: edge 0: source 9 is not below the vertex count 3");
    let mut b = qcsr_bytes();
    b[200..204].copy_from_slice(&f32::NAN.to_le_bytes()); // the weights array starts at 192
    let crc = crc32fast::hash(&b[64..]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    check_err("g.qcsr", &b, "g.qcsr: invalid graph: edge 2: weight NaN is not a finite non-negative number");
}

#[test]
fn qcsr_unknown_flags_and_reserved_bytes() {
    let mut b = qcsr_bytes();
    b[12] |= 0x80;
    check_err("g.qcsr", &b, "g.qcsr: bad header: unknown flags 0x81");
    let mut b = qcsr_bytes();
    b[50] = 1;
    check_err("g.qcsr", &b, "g.qcsr: bad header: reserved header bytes are not zero");
}

#[test]
fn empty_graphs_are_valid() {
    let dir = Dir::new();
    let g = read(&dir.file("e.el", "")).unwrap();
    assert_eq!((g.vertices(), g.edges()), (0, 0));
    let g = read(&dir.file("c.el", "# only comments\n\n")).unwrap();
    assert_eq!((g.vertices(), g.edges()), (0, 0));
    let g = read(&dir.file("e.mtx", "%%MatrixMarket matrix coordinate pattern general\n0 0 0\n")).unwrap();
    assert_eq!((g.vertices(), g.edges()), (0, 0));
    let empty = CsrBuilder::new().build().unwrap();
    for name in ["e2.el", "e2.mtx", "e2.qcsr"] {
        write_graph(dir.path(name), &empty).unwrap();
        assert_eq!(read(&dir.path(name)).unwrap(), empty, "{name}");
    }
}

#[test]
fn empty_matrix_market_file_is_an_error() {
    check_err("g.mtx", "", "g.mtx line 1: empty file: no Matrix Market banner");
    check_err(
        "g.mtx",
        "%%MatrixMarket matrix coordinate pattern general\n% nothing else\n",
        "g.mtx line 2: missing size line",
    );
}

#[test]
fn unknown_format() {
    check_err("graph.csv", "0,1\n", "graph.csv: unknown format \"csv\" (expected .el, .txt, .edges, .mtx or .qcsr)");
    check_err("graph", "0 1\n", "graph: unknown format \"\" (expected .el, .txt, .edges, .mtx or .qcsr)");
    assert_eq!(Format::from_path(Path::new("x/Y.MTX")).unwrap(), Format::MatrixMarket);
}

#[test]
fn missing_file_names_it() {
    let err = read(Path::new("/nonexistent/quiver/g.el")).unwrap_err();
    assert!(err.to_string().starts_with("/nonexistent/quiver/g.el: "), "{err}");
}

#[test]
fn npy_wrong_dtype() {
    let dir = Dir::new();
    write_npy(dir.path("v.npy"), &[2], &[1.0f64, 2.0]).unwrap();
    let err = read_npy::<f32>(dir.path("v.npy")).unwrap_err();
    assert!(err.to_string().ends_with("v.npy: dtype \"<f8\", but f32 (\"<f4\") was expected"), "{err}");
}

fn npy_with_dict(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    b.extend_from_slice(dict.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn npy_big_endian_and_fortran_order_are_refused() {
    let dir = Dir::new();
    let be = npy_with_dict("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }\n", &[0; 4]);
    assert!(read_npy::<f32>(dir.file("be.npy", be)).unwrap_err().to_string().contains("dtype \">f4\""));
    let f = npy_with_dict("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }\n", &[0; 16]);
    let err = read_npy::<f32>(dir.file("f.npy", f)).unwrap_err();
    assert!(err.to_string().contains("fortran_order (column-major) matrices are not supported"), "{err}");
    // A column-major vector has the same bytes as a row-major one.
    let v = npy_with_dict("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }\n", &[0; 8]);
    assert!(read_npy::<f32>(dir.file("v.npy", v)).is_ok());
}

#[test]
fn npy_truncated_data() {
    let dir = Dir::new();
    write_npy(dir.path("m.npy"), &[4, 4], &[0.5f32; 16]).unwrap();
    let full = std::fs::read(dir.path("m.npy")).unwrap();
    let err = read_npy::<f32>(dir.file("t.npy", &full[..full.len() - 3])).unwrap_err();
    assert!(matches!(err, LoadError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    let err = read_npy::<f32>(dir.file("h.npy", &full[..20])).unwrap_err();
    assert!(matches!(err, LoadError::SizeMismatch { .. }), "{err}");
}

#[test]
fn npy_wrong_magic_version_and_shape() {
    let dir = Dir::new();
    assert!(matches!(read_npy::<f32>(dir.file("a.npy", b"PK\x03\x04 zip")), Err(LoadError::BadMagic { .. })));
    let mut b = npy_with_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }\n", &[0; 4]);
    b[6] = 9;
    assert!(matches!(read_npy::<f32>(dir.file("b.npy", &b)), Err(LoadError::UnsupportedVersion { .. })));
    let b = npy_with_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1), }\n", &[0; 4]);
    assert!(read_npy::<f32>(dir.file("c.npy", &b)).unwrap_err().to_string().contains("expected a vector or a matrix"));
    let b = npy_with_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }\n", &[]);
    assert!(read_npy::<f32>(dir.file("d.npy", &b)).unwrap_err().to_string().contains("overflows"));
    assert!(write_npy(dir.path("e.npy"), &[3], &[1.0f32]).is_err());
}

// ---------------------------------------------------------------------------------------------
// Properties

fn arb_graph() -> impl Strategy<Value = Csr> {
    (1u32..40, proptest::collection::vec((0u32..40, 0u32..40, 0u32..1000), 0..120), any::<bool>()).prop_map(
        |(extra, edges, is_weighted)| {
            let n = edges.iter().map(|e| e.0.max(e.1) + 1).max().unwrap_or(0) + extra;
            let mut b = if is_weighted { CsrBuilder::weighted() } else { CsrBuilder::new() }.vertices(u64::from(n));
            for (u, v, w) in edges {
                // Weights with few and many significant digits exercise both float parsing paths.
                b.push(u, v, Some(w as f32 / 7.0));
            }
            b.build().expect("in range")
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_graphs_survive_every_format(g in arb_graph()) {
        let dir = Dir::new();
        for ext in ["el", "mtx", "qcsr"] {
            let p = dir.path(&format!("g.{ext}"));
            write_graph(&p, &g).unwrap();
            prop_assert_eq!(&read(&p).unwrap(), &g, "through .{}", ext);
        }
    }

    #[test]
    fn arbitrary_vectors_survive_npy(v in proptest::collection::vec(any::<f32>(), 0..200), cols in 1usize..5) {
        let dir = Dir::new();
        let rows = v.len() / cols;
        let m = &v[..rows * cols];
        write_npy(dir.path("m.npy"), &[rows, cols], m).unwrap();
        let r = read_npy::<f32>(dir.path("m.npy")).unwrap();
        prop_assert_eq!(r.shape, vec![rows, cols]);
        prop_assert_eq!(r.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), m.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn random_bytes_never_panic_a_reader(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let dir = Dir::new();
        for name in ["r.el", "r.mtx", "r.qcsr"] {
            let _ = read(&dir.file(name, &bytes));
        }
        let _ = read_npy::<f32>(dir.file("r.npy", &bytes));
        let _ = read_npy::<f64>(dir.file("r.npy", &bytes));
    }

    #[test]
    fn random_text_never_panics_a_text_reader(
        lines in proptest::collection::vec("[0-9 \t%#.eE+-]{0,14}|nan|inf|-1|4294967296", 0..30),
        banner in prop::sample::select(vec![
            "%%MatrixMarket matrix coordinate pattern general\n5 5 3\n",
            "%%MatrixMarket matrix coordinate real symmetric\n4 6 2\n",
            "%%MatrixMarket matrix coordinate integer general\n",
            "",
        ]),
    ) {
        let dir = Dir::new();
        let body = lines.join("\n");
        let _ = read(&dir.file("t.el", &body));
        let _ = read(&dir.file("t.mtx", format!("{banner}{body}")));
    }

    #[test]
    fn corrupted_binary_files_never_panic(flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..6), cut in 0usize..400) {
        let dir = Dir::new();
        let mut q = qcsr_bytes();
        for &(at, x) in &flips {
            if let Some(b) = q.get_mut(at) { *b ^= x; }
        }
        let _ = read_graph(dir.file("c.qcsr", &q), &ReadOptions { verify_checksum: false, ..ReadOptions::default() });
        q.truncate(cut);
        let _ = read(&dir.file("d.qcsr", &q));
        let mut n = Vec::new();
        npy::write_npy_to(&mut n, &[3, 2], &[1.0f32; 6]).unwrap();
        for &(at, x) in &flips {
            if let Some(b) = n.get_mut(at % 160) { *b ^= x; }
        }
        let _ = read_npy::<f32>(dir.file("c.npy", &n));
    }
}

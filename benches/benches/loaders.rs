//! Criterion benches of the graph loaders, in MB/s of file read (criterion's `Throughput::Bytes`).
//!
//! One Graph500 Kronecker graph (scale `QUIVER_LOADER_SCALE`, default 18: ≈262K vertices and
//! ≈7.6M arcs symmetrised, a few million edges) is generated once and written as `.mtx`, `.el`
//! and `.qcsr` into a temporary directory; each bench then reads one file back into a [`Csr`]
//! from the page cache, with `QUIVER_BENCH_THREADS` rayon threads (default 2):
//!
//! - `mtx` / `el`: the whole text load — parallel parse, then [`CsrBuilder`] (sort, merge,
//!   out-degrees) — the time a user waits for `read_graph`;
//! - `qcsr` / `qcsr_no_checksum`: memory map, CRC-32, and full structural validation (the
//!   second skips only the CRC);
//! - `build`: `CsrBuilder::build` alone on the generator's symmetrised arc list, reported in
//!   input arcs per second.
//!
//! ```text
//! CARGO_TARGET_DIR=target/h-formats cargo bench -p quiver-benches --bench loaders
//! QUIVER_LOADER_SCALE=20 CARGO_TARGET_DIR=target/h-formats cargo bench -p quiver-benches --bench loaders
//! ```

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quiver_compute::formats::{ReadOptions, read_graph, write_graph};
use quiver_compute::{Csr, CsrBuilder, SelfLoops, generate};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Files {
    _dir: tempfile::TempDir,
    graph: Csr,
    paths: Vec<(&'static str, PathBuf)>,
}

fn files() -> &'static Files {
    static F: OnceLock<Files> = OnceLock::new();
    F.get_or_init(|| {
        let scale = env("QUIVER_LOADER_SCALE", 18) as u32;
        let graph = generate::kronecker(scale, 16, 1).expect("valid kronecker parameters");
        let dir = tempfile::tempdir().expect("temp dir");
        let paths: Vec<(&'static str, PathBuf)> =
            ["mtx", "el", "qcsr"].into_iter().map(|ext| (ext, dir.path().join(format!("g.{ext}")))).collect();
        for (_, p) in &paths {
            write_graph(p, &graph).expect("write bench graph");
        }
        eprintln!("kronecker scale {scale}: {} vertices, {} arcs", graph.vertices(), graph.edges());
        Files { _dir: dir, graph, paths }
    })
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(env("QUIVER_BENCH_THREADS", 2)).build().expect("thread pool")
}

fn loaders(c: &mut Criterion) {
    let f = files();
    let pool = pool();
    let mut group = c.benchmark_group("load");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8));
    let with_crc = ReadOptions::default();
    let no_crc = ReadOptions { verify_checksum: false, ..ReadOptions::default() };
    let runs = [
        ("mtx", "mtx", with_crc),
        ("el", "el", with_crc),
        ("qcsr", "qcsr", with_crc),
        ("qcsr", "qcsr_no_checksum", no_crc),
    ];
    for (ext, name, opts) in runs {
        let path = &f.paths.iter().find(|(e, _)| *e == ext).expect("written").1;
        let bytes = std::fs::metadata(path).expect("bench file").len();
        // Warm the page cache: the benches measure parsing and validation, not the disk.
        let _ = std::fs::read(path);
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(name, |b| {
            b.iter(|| {
                let g = pool.install(|| read_graph(path, &opts)).expect("bench file loads");
                assert_eq!(g.edges(), f.graph.edges());
                g
            })
        });
    }
    group.finish();
}

fn build(c: &mut Criterion) {
    let f = files();
    let pool = pool();
    // The generator's graph is already symmetric and simple; rebuilding it from its own arcs
    // exercises the same sort and merge that a loader's edge list does.
    let (src, dst): (Vec<u32>, Vec<u32>) = f.graph.edges_iter().map(|(u, v, _)| (u, v)).unzip();
    let mut group = c.benchmark_group("build");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(src.len() as u64));
    group.bench_function("csr_builder", |b| {
        b.iter_batched(
            || CsrBuilder::from_edges(src.clone(), dst.clone(), None).self_loops(SelfLoops::Drop),
            |builder| pool.install(|| builder.build()).expect("valid edges"),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, loaders, build);
criterion_main!(benches);

//! Criterion benches of one superstep of each diffusion kernel on a Graph500 Kronecker graph.
//!
//! Defaults follow the issue's targets: scale 20 (≈1M vertices, ≈31M arcs symmetrised), 2 rayon
//! threads, APPNP with d = 64. Override with `QUIVER_BENCH_SCALE` and `QUIVER_BENCH_THREADS`;
//! `QUIVER_BENCH_ORDER=degree` relabels the graph by descending degree first
//! (`generate::reorder::by_degree`) instead of keeping Graph500's random vertex permutation.
//! The graph is generated once per bench run (it takes a few seconds at scale 20).
//!
//! Each measured iteration is exactly one kernel step on the whole graph as one partition (the
//! single-process path of `kernels::run`; with one partition there is no halo exchange), so the
//! reported time is seconds per iteration.
//!
//! ```text
//! CARGO_TARGET_DIR=target/h-kernels cargo bench -p quiver-benches --bench kernels
//! ```

use std::sync::OnceLock;

use criterion::{Criterion, criterion_group, criterion_main};
use quiver_compute::Csr;
use quiver_compute::generate;
use quiver_compute::kernels::superstep::{Globals, Kernel, PartitionState};
use quiver_compute::kernels::{Appnp, Heat, Normalization, PageRank, Teleport};
use quiver_compute::partition::LocalGraph;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn graph() -> &'static Csr {
    static G: OnceLock<Csr> = OnceLock::new();
    G.get_or_init(|| {
        let scale = env("QUIVER_BENCH_SCALE", 20) as u32;
        let t = std::time::Instant::now();
        let mut g = generate::kronecker(scale, 16, 1).expect("valid kronecker parameters");
        let order = std::env::var("QUIVER_BENCH_ORDER").unwrap_or_else(|_| "graph500".into());
        if order == "degree" {
            g = generate::reorder::by_degree(&g).expect("relabelling keeps a valid graph").0;
        }
        eprintln!(
            "kronecker scale {scale} ({order} order): {} vertices, {} arcs in {:.1?}",
            g.vertices(),
            g.edges(),
            t.elapsed()
        );
        g
    })
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(env("QUIVER_BENCH_THREADS", 2)).build().expect("thread pool")
}

/// Times one step of `kernel` on the whole graph.
fn bench_step<K: Kernel>(c: &mut Criterion, name: &str, kernel: &K) {
    let pool = pool();
    let lg = LocalGraph::whole(graph());
    let (mut state, partials) = pool.install(|| PartitionState::new(kernel, &lg));
    let globals = Globals::new(partials, 1);
    // `install` costs microseconds against a step of milliseconds.
    c.bench_function(name, |b| b.iter(|| pool.install(|| state.step(kernel, &lg, &globals))));
}

fn kernels(c: &mut Criterion) {
    let g = graph();
    let n = g.vertices() as u64;
    let seeds: Vec<u32> =
        (0..64).map(|i| (i * 16_381) % n as u32).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    bench_step(c, "pagerank", &PageRank { damping: 0.85, teleport: Teleport::Uniform { vertices: n } });
    bench_step(c, "ppr", &PageRank { damping: 0.85, teleport: Teleport::Seeds(seeds.clone()) });
    bench_step(c, "heat", &Heat { t: 5.0, seeds, vertices: n });
    let dim = 64;
    let features = generate::features(g.vertices(), dim, 7);
    let appnp =
        Appnp { alpha: 0.1, normalization: Normalization::Symmetric, features: &features, dim, base: 0, rows: None };
    bench_step(c, "appnp_d64", &appnp);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(8));
    targets = kernels
}
criterion_main!(benches);

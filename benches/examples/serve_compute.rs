//! Times the serving path's compute for one request, as a worker runs it: build the CSR from
//! the edge arrays, then personalized PageRank with one partition on a one-thread pool.
//!
//! ```text
//! cargo run --release -p quiver-benches --example serve_compute -- [vertices] [edges] [iterations] [repeats]
//! ```
//! Defaults are the `small` serving graph (100 vertices, 500 edges, 10 iterations).

use std::time::Instant;

use quiver_compute::CsrBuilder;
use quiver_compute::kernels::{self, Algorithm, Params, Stop};

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (n, m, iterations, repeats) = (arg(1, 100) as u32, arg(2, 500), arg(3, 10) as u32, arg(4, 20_000));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (((x >> 32) * u64::from(n)) >> 32) as u32
    };
    let sources: Vec<u32> = (0..m).map(|_| next()).collect();
    let targets: Vec<u32> = (0..m).map(|_| next()).collect();
    let seeds = [next()];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("thread pool");
    pool.install(|| {
        let (mut build, mut run) = (0.0f64, 0.0f64);
        for _ in 0..repeats {
            let t = Instant::now();
            let g = CsrBuilder::from_edges(sources.clone(), targets.clone(), None)
                .vertices(u64::from(n))
                .build()
                .expect("csr");
            let b = t.elapsed().as_secs_f64();
            let params = Params {
                algorithm: Algorithm::PersonalizedPageRank { damping: 0.85, seeds: &seeds },
                stop: Stop::iterations(iterations),
            };
            let out = kernels::run(&g, &params, 1).expect("run");
            std::hint::black_box(out);
            build += b;
            run += t.elapsed().as_secs_f64() - b;
        }
        let per = |s: f64| s / repeats as f64 * 1e6;
        println!(
            "{n} vertices, {m} edges, {iterations} iterations: build {:.1} µs, run {:.1} µs per request ({repeats} repeats)",
            per(build),
            per(run)
        );
    });
}

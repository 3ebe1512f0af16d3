//! Times the partitioner on a Kronecker graph: `partition(g, P)` as the job master runs it
//! before shipping partitions (the setup step `quiver bench job` pays once per epoch).
//!
//! ```text
//! cargo run --release -p quiver-benches --example partition_run -- [scale] [parts] [threads] [repeats]
//! ```

use std::time::Instant;

use quiver_compute::{generate, partition};

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (scale, parts, threads, repeats) = (arg(1, 20), arg(2, 3), arg(3, 2), arg(4, 5));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    pool.install(|| {
        let t = Instant::now();
        let g = generate::kronecker(scale as u32, 16, 1).expect("kronecker");
        eprintln!(
            "generated scale {scale} ({} vertices, {} edges) in {:.2} s",
            g.vertices(),
            g.edges(),
            t.elapsed().as_secs_f64()
        );
        let mut times: Vec<f64> = (0..repeats)
            .map(|_| {
                let t = Instant::now();
                let p = partition::partition(&g, parts).expect("partition");
                let s = t.elapsed().as_secs_f64();
                drop(p);
                s
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "partition into {parts}, {threads} threads: best {:.3} s, median {:.3} s",
            times[0],
            times[times.len() / 2]
        );
    });
}

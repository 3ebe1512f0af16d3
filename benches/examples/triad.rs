//! STREAM's triad, `a[i] = b[i] + 3·c[i]` over three arrays of `f64`, on a rayon pool of the
//! given size: the memory bandwidth a kernel is held to ("≥ 70 % of STREAM triad" for APPNP).
//!
//! ```text
//! cargo run --release -p quiver-benches --example triad -- [threads] [mib_per_array] [repeats]
//! ```
//!
//! Counted as STREAM counts it: 24 bytes per element (two reads, one write; the write's
//! allocation read is not counted), best of `repeats` passes. Each array is first written by the
//! pool that later reads it (first touch), so pages sit where the threads run. Prints one JSON
//! object.

use std::time::Instant;

use rayon::prelude::*;

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (threads, mib, repeats) = (arg(1, 2), arg(2, 640), arg(3, 10).max(1));
    let n = mib * (1 << 20) / 8;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    const CHUNK: usize = 1 << 16;
    let best = pool.install(|| {
        let fill = |v: f64| -> Vec<f64> {
            let mut a = Vec::with_capacity(n);
            a.spare_capacity_mut().par_chunks_mut(CHUNK).for_each(|c| {
                for x in c {
                    x.write(v);
                }
            });
            // SAFETY: every element was written just above.
            unsafe { a.set_len(n) };
            a
        };
        let (mut a, b, c) = (fill(0.0), fill(1.0), fill(2.0));
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            a.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).zip(c.par_chunks(CHUNK)).for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + 3.0 * c;
                }
            });
            best = best.min(t.elapsed().as_secs_f64());
        }
        assert!(a.iter().step_by(4099).all(|&x| x == 7.0), "the triad computed a wrong value");
        best
    });
    let bytes = 24.0 * n as f64;
    println!(
        "{{\"threads\":{threads},\"elements\":{n},\"best_seconds\":{best:.6},\"gb_per_s\":{:.2}}}",
        bytes / best / 1e9
    );
}

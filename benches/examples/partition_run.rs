//! Times the partitioner on a Kronecker graph: `partition(g, P)` as the job master runs it
//! before shipping partitions (the setup step `quiver bench job` pays once per epoch).
//!
//! ```text
//! cargo run --release -p quiver-benches --example partition_run -- [scale] [parts] [threads] [repeats]
//! QUIVER_GRAPH=FILE.qcsr cargo run --release -p quiver-benches --example partition_run -- 0 [parts] …
//! ```
//!
//! With `QUIVER_GRAPH` the graph is read from that file (a `.qcsr` is mapped, as a job's is)
//! instead of generated, and each repeat reads it again, so the cut pays for first touching
//! the mapping as a job's master does.
//!
//! It also prints what a distributed job must move for this cut: each partition's arrays (what
//! a remote owner receives) and the halo values every superstep exchanges, and the CPU seconds
//! (all threads, from `/proc/self/stat`) each cut took, the inputs of the floor a job's time
//! cannot go under on a given number of cores.

use std::time::Instant;

use quiver_compute::{formats, generate, partition};

#[path = "common/cpu.rs"]
mod cpu;
use cpu::cpu_seconds;

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (scale, parts, threads, repeats) = (arg(1, 20), arg(2, 3), arg(3, 2), arg(4, 5));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    pool.install(|| {
        let file = std::env::var_os("QUIVER_GRAPH").map(std::path::PathBuf::from);
        let read = |path: &std::path::Path| {
            let t = Instant::now();
            let g = formats::read_graph(path, &formats::ReadOptions::default()).expect("reading the graph");
            eprintln!("read {} in {:.3} s", path.display(), t.elapsed().as_secs_f64());
            g
        };
        let t = Instant::now();
        let generated = match &file {
            Some(_) => None,
            None => Some(generate::kronecker(scale as u32, 16, 1).expect("kronecker")),
        };
        if let Some(g) = &generated {
            eprintln!(
                "generated scale {scale} ({} vertices, {} edges) in {:.2} s",
                g.vertices(),
                g.edges(),
                t.elapsed().as_secs_f64()
            );
        }
        let printed = std::cell::Cell::new(false);
        let mut times: Vec<f64> = (0..repeats)
            .map(|_| {
                let loaded = file.as_deref().map(read);
                let g = loaded.as_ref().or(generated.as_ref()).expect("a graph");
                let (t, cpu) = (Instant::now(), cpu_seconds());
                let p = partition::partition(g, parts).expect("partition");
                let s = t.elapsed().as_secs_f64();
                eprintln!("cut in {s:.3} s, {:.2} CPU-s", cpu_seconds() - cpu);
                if !printed.replace(true) {
                    report(&p);
                }
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

/// Each partition's bytes as a job ships them (its graph arrays, halo list and mirror lists) and
/// the halo values one superstep exchanges.
fn report(p: &partition::Partitioning) {
    let mut halo_total = 0;
    for part in &p.parts {
        let g = &part.graph;
        let mirrors: usize = part.mirrors.iter().map(|m| m.vertices.len()).sum();
        let bytes = (g.owned() + 1) * 8 + g.edges() * 4 + g.locals() * 8 + (part.halo.len() + mirrors) * 4;
        halo_total += part.halo.len();
        eprintln!(
            "partition {}: {} owned, {} edges, {} halo values read per step, {} sent; {:.1} MB of arrays",
            part.index,
            g.owned(),
            g.edges(),
            part.halo.len(),
            mirrors,
            bytes as f64 / 1e6
        );
    }
    eprintln!("halo exchange: {halo_total} values = {:.2} MB per superstep", halo_total as f64 * 4.0 / 1e6);
}

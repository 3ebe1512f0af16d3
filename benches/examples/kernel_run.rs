//! One full `kernels::run` on a Kronecker graph, printing seconds per iteration and peak RSS —
//! the numbers `benches/RESULTS.md` records next to the criterion benches.
//!
//! Besides the mean over the full run, it times `iterations` more single steps and prints the
//! fastest and the median, and the process CPU time per step: on a machine shared with other
//! work the best step is the closest estimate of the unloaded time.
//!
//! ```text
//! cargo run --release -p quiver-benches --example kernel_run -- <pagerank|appnp> [scale] [threads] [iterations] [dim] [graph500|degree|renamed|renamed-x0]
//! ```
//!
//! The last argument picks the vertex order of the timed steps: Graph500's random permutation
//! (default); the same graph relabelled by descending out-degree with every list re-sorted
//! (`generate::reorder::by_degree`); or renamed as `kernels::run` renames a large APPNP
//! (`LocalGraph::by_out_degree`, lists in their CSR order), with the input features read in
//! vertex order through the renaming as `kernels::run` reads them (`renamed-x0`) or, to time
//! the step without that read, row by row (`renamed`).

use std::time::Instant;

use quiver_compute::generate;
use quiver_compute::kernels::superstep::{Globals, Kernel, PartitionState};
use quiver_compute::kernels::{self, Algorithm, Appnp, Normalization, PageRank, Params, Stop, Teleport};
use quiver_compute::partition::LocalGraph;

#[path = "common/cpu.rs"]
mod cpu;
use cpu::cpu_seconds;

/// Times `steps` single steps: (best, median, CPU seconds per step).
fn time_steps<K: Kernel>(kernel: &K, lg: &LocalGraph, steps: u32) -> (f64, f64, f64) {
    let (mut state, partials) = PartitionState::new(kernel, lg);
    let globals = Globals::new(partials, 1);
    let cpu = cpu_seconds();
    let mut times: Vec<f64> = (0..steps)
        .map(|_| {
            let t = Instant::now();
            state.step(kernel, lg, &globals);
            t.elapsed().as_secs_f64()
        })
        .collect();
    let cpu = (cpu_seconds() - cpu) / steps as f64;
    times.sort_by(f64::total_cmp);
    (times[0], times[times.len() / 2], cpu)
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    kb.unwrap_or(0) * 1024
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default);
    let algo = args.first().map(String::as_str).unwrap_or("pagerank").to_owned();
    let (scale, threads, iterations, dim) = (arg(1, 20) as u32, arg(2, 2), arg(3, 10) as u32, arg(4, 64));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    pool.install(|| {
        let t = Instant::now();
        let mut g = generate::kronecker(scale, 16, 1).expect("valid kronecker parameters");
        let order = args.get(5).map(String::as_str).unwrap_or("graph500").to_owned();
        if order == "degree" {
            g = generate::reorder::by_degree(&g).expect("relabelling keeps a valid graph").0;
        }
        let gen_s = t.elapsed().as_secs_f64();
        let features;
        let algorithm = match algo.as_str() {
            "pagerank" => Algorithm::PageRank { damping: 0.85 },
            "appnp" => {
                features = generate::features(g.vertices(), dim, 7);
                Algorithm::Appnp { alpha: 0.1, normalization: Normalization::Symmetric, features: &features, dim }
            }
            other => panic!("unknown algorithm {other}"),
        };
        let t = Instant::now();
        let out = kernels::run(&g, &Params { algorithm, stop: Stop::iterations(iterations) }, 1).expect("valid parameters");
        let run_s = t.elapsed().as_secs_f64();
        let out_iterations = out.iterations;
        let rss = peak_rss_bytes();
        drop(out);
        let (lg, renaming) = if order == "renamed" || order == "renamed-x0" {
            let (lg, r) = LocalGraph::by_out_degree(&g);
            (lg, Some(r))
        } else {
            (LocalGraph::whole(&g), None)
        };
        let rows = renaming.as_ref().filter(|_| order == "renamed-x0").map(|r| &r.order[..]);
        let (best, median, cpu) = match algo.as_str() {
            "pagerank" => {
                let k = PageRank { damping: 0.85, teleport: Teleport::Uniform { vertices: g.vertices() as u64 } };
                time_steps(&k, &lg, iterations)
            }
            _ => {
                let features = generate::features(g.vertices(), dim, 7);
                let k = Appnp { alpha: 0.1, normalization: Normalization::Symmetric, features: &features, dim, base: 0, rows };
                time_steps(&k, &lg, iterations)
            }
        };
        println!(
            "{{\"algo\":\"{algo}\",\"order\":\"{order}\",\"scale\":{scale},\"threads\":{threads},\"vertices\":{},\"edges\":{},\"generate_seconds\":{gen_s:.2},\"iterations\":{},\"seconds_per_iteration\":{:.4},\"best_step_seconds\":{best:.4},\"median_step_seconds\":{median:.4},\"cpu_seconds_per_step\":{cpu:.4},\"peak_rss_bytes\":{rss}}}",
            g.vertices(),
            g.edges(),
            out_iterations,
            run_s / out_iterations as f64,
        );
    });
}

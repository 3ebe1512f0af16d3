//! `quiver bench job`: a distributed job on a local cluster of this very binary against
//! `quiver run` on the same graph, in the same run.
//!
//! It generates a Kronecker graph (or takes `--graph`), times `quiver run --threads T` in its own
//! process (the COST baseline), starts `--nodes` agents on loopback, submits the same job by path
//! with one partition per node, follows it with `Watch`, and reports: the whole job (the submit
//! call → succeeded: loading and hashing the graph, cutting and shipping the partitions,
//! supersteps, the result stored) as a ratio to `quiver run`'s compute (its load excluded: the
//! stricter ratio) and to its whole command (process start to exit, load and result write
//! included, as `time` would show it), the steady superstep time (first to last superstep report)
//! as a ratio to `quiver run`'s iteration, whether the result digests match, and every agent's
//! peak RSS (the first agent takes the submit, so it is the job's holder and master: it keeps the
//! graph file mapped and its checkpoints besides its own third). With `--repeat N` the same job
//! is submitted N times on the same cluster; the later ones are reported apart as warm jobs, whose
//! owners kept their partitions from the first (no cut, no partition transfer). For each job it
//! also reports the UDP datagrams the kernel dropped for full receive buffers meanwhile (a host-wide
//! counter: on a quiet host, the agents' own drops), the losses that stall a halo exchange in QUIC
//! recovery (`quiver agent --udp-buffer`).
//!
//! It also counts CPU: `quiver run`'s (its process, from `getrusage` of waited-for children) and
//! the agents' during each job (`/proc/PID/stat` before and after, all agents summed, so their
//! idle chatter in those seconds too). The agents' CPU spread over every core this host has is
//! the least time the job's work could take here (`floor_seconds`), and its ratio to `quiver
//! run`'s whole command (`ratio_floor_to_run_wall`) the best ratio any scheduling of that work
//! could reach: when the job is CPU-bound, less work, not better overlap, is what lowers it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use quiver_proto::control::jobs_client::JobsClient;
use quiver_proto::control::{
    GetJobRequest, GraphFormat, Job, JobSpec, JobState, Kernel, KernelParams, SubmitRequest, WatchJobRequest,
    submit_request,
};
use quiver_tests::agents::LocalCluster;
use serde_json::{Value, json};

use crate::client::{Conn, Output, connect};

/// Flags of `quiver bench job`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kronecker scale of the generated graph.
    #[arg(long, default_value_t = 20)]
    pub scale: u32,
    /// Use this graph file instead of generating one.
    #[arg(long)]
    pub graph: Option<PathBuf>,
    /// Agents (and partitions).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// pagerank or appnp.
    #[arg(long, default_value = "pagerank")]
    pub algo: String,
    #[arg(long, default_value_t = 20)]
    pub iterations: u32,
    /// APPNP feature width.
    #[arg(long, default_value_t = 64)]
    pub feature_dim: u32,
    /// Threads of the `quiver run` baseline.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Submit the same job this many times, one after another on the same cluster: the first
    /// runs cold; the later ones find their partitions kept by their owners from the first
    /// (`quiver agent --partition-cache`) and are reported apart as warm jobs.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Keep every agent's log in this directory (as `job-NAME.log`).
    #[arg(long)]
    pub keep_logs: Option<PathBuf>,
}

const NAMES: [&str; 7] = ["w1", "w2", "w3", "w4", "w5", "w6", "w7"];
const DEADLINE: Duration = Duration::from_secs(600);

pub fn run(a: Args) -> Result<()> {
    ensure!((1..=NAMES.len()).contains(&a.nodes), "--nodes must be between 1 and {}", NAMES.len());
    ensure!(a.repeat >= 1, "--repeat must be at least 1");
    let exe = std::env::current_exe().context("locating the quiver binary")?;
    let mut c = LocalCluster::with_bin(&NAMES[..a.nodes], exe.clone());
    let dir = c.dir.path().to_path_buf();
    let graph = match &a.graph {
        Some(g) => std::path::absolute(g)?,
        None => {
            let g = dir.join(format!("kronecker-{}.qcsr", a.scale));
            let scale = a.scale.to_string();
            let path = g.to_str().context("temp path")?;
            quiver(&exe, &dir, &["graph", "generate", "kronecker", "--scale", &scale, "--out", path])?;
            g
        }
    };
    let gpath = graph.to_str().context("graph path is not UTF-8")?.to_string();
    let iterations = a.iterations.to_string();
    let dim = a.feature_dim.to_string();
    let threads = a.threads.to_string();
    let mut algo: Vec<&str> = vec!["--algo", &a.algo, "--iterations", &iterations];
    let (kernel, alpha, width) = match a.algo.as_str() {
        "pagerank" => (Kernel::Pagerank, 0.85f32, 0),
        "appnp" => {
            algo.extend(["--feature-dim", &dim]);
            (Kernel::Appnp, 0.1f32, a.feature_dim)
        }
        other => bail!("--algo {other}: expected pagerank or appnp"),
    };
    if !a.json {
        eprintln!("running quiver run --threads {} …", a.threads);
    }
    let mut run_args = vec!["run", "--graph", gpath.as_str(), "--json", "--threads", &threads];
    run_args.extend(&algo);
    let (t, cpu) = (Instant::now(), crate::sys::children_cpu_seconds());
    let printed = quiver(&exe, &dir, &run_args)?;
    // The whole command as a user times it: process start, load, compute, writing the result.
    let run_wall = t.elapsed().as_secs_f64();
    let run_cpu = cpu.zip(crate::sys::children_cpu_seconds()).map(|(b, a)| a - b);
    let reference: Value = serde_json::from_str(printed.lines().last().context("quiver run printed nothing")?)?;

    if !a.json {
        eprintln!("starting {} agents …", a.nodes);
    }
    c.form(Duration::from_secs(30));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let conn = Conn { addr: c.agents[0].addr(), tls_dir: Some(c.client_tls.clone()), output: Output::Json };
    let spec = JobSpec {
        name: format!("bench-{}", a.algo),
        params: Some(KernelParams {
            kernel: kernel as i32,
            alpha: f64::from(alpha),
            max_iterations: a.iterations,
            width,
            feature_seed: 1,
            ..Default::default()
        }),
        format: GraphFormat::QuiverCsr as i32,
        graph_path: gpath.clone(),
        partitions: a.nodes as u32,
        ..Default::default()
    };
    if !a.json {
        eprintln!("submitting the job …");
    }
    let (mut runs, mut drops, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    let agents_cpu = |c: &LocalCluster| -> Option<f64> {
        c.agents.iter().map(|ag| ag.pid().and_then(|p| crate::sys::cpu_seconds(Some(p)))).sum()
    };
    for _ in 0..a.repeat {
        let (before, cpu_before) = (crate::sys::udp_receive_buffer_errors(), agents_cpu(&c));
        runs.push(rt.block_on(submit_and_watch(&conn, spec.clone()))?);
        drops.push(before.zip(crate::sys::udp_receive_buffer_errors()).map(|(b, a)| a.saturating_sub(b)));
        cpu.push(cpu_before.zip(agents_cpu(&c)).map(|(b, a)| a - b));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let floor: Vec<Option<f64>> = cpu.iter().map(|c| c.map(|c| c / cores)).collect();
    if let Some(dir) = &a.keep_logs {
        c.keep_logs(dir, "job");
    }
    for (_, _, job) in &runs {
        ensure!(job.state == JobState::Succeeded as i32, "job {} did not succeed: {}", job.job_id, job.error);
    }
    let warm: Vec<f64> = runs.iter().skip(1).map(|(secs, _, _)| *secs).collect();
    let warm_digests_match = runs.iter().all(|(_, _, j)| j.result_digest == runs[0].2.result_digest);
    let (job_seconds, steps, job) = runs.swap_remove(0);
    let rss: Vec<u64> = c.agents.iter().map(|ag| ag.pid().map_or(0, peak_rss)).collect();
    let digest = crate::run::hex(&job.result_digest);
    let matches = reference["result_digest"].as_str() == Some(digest.as_str()) && warm_digests_match;
    let warm_median = median(&warm);
    let run_compute = reference["compute_seconds"].as_f64().unwrap_or(f64::NAN);
    let run_per_iter = reference["seconds_per_iteration"].as_f64().unwrap_or(f64::NAN);
    let per_step = match (steps.first(), steps.last()) {
        (Some((s0, t0)), Some((s1, t1))) if s1 > s0 => (t1 - t0) / (s1 - s0) as f64,
        _ => f64::NAN,
    };
    let out = json!({
        "algo": a.algo,
        "nodes": a.nodes,
        "graph": gpath,
        "vertices": reference["vertices"],
        "edges": reference["edges"],
        "iterations": a.iterations,
        "run_threads": a.threads,
        "run_compute_seconds": run_compute,
        "run_seconds_per_iteration": run_per_iter,
        "run_wall_seconds": run_wall,
        "job_seconds": job_seconds,
        "job_seconds_per_superstep": per_step,
        "ratio_job_to_run": job_seconds / run_compute,
        "ratio_job_to_run_wall": job_seconds / run_wall,
        "ratio_superstep_to_iteration": per_step / run_per_iter,
        "warm_job_seconds": warm,
        "ratio_warm_job_to_run": warm_median.map(|w| w / run_compute),
        "ratio_warm_job_to_run_wall": warm_median.map(|w| w / run_wall),
        "result_digest": digest,
        "digest_matches_quiver_run": matches,
        "agent_peak_rss_bytes": rss,
        "udp_receive_buffer_errors": drops,
        "run_peak_rss_bytes": reference["peak_rss_bytes"],
        "run_cpu_seconds": run_cpu,
        "job_agent_cpu_seconds": cpu,
        "cores": cores,
        "floor_seconds": floor,
        "ratio_floor_to_run_wall": floor.iter().map(|f| f.map(|f| f / run_wall)).collect::<Vec<_>>(),
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "{} on {} vertices / {} edges, {} iterations\n  quiver run ({} threads): compute {run_compute:.3} s ({run_per_iter:.4} s/iteration), \
             whole command {run_wall:.3} s\n  \
             {} agents: job {job_seconds:.3} s ({:.2}× quiver run's compute, {:.2}× its whole command), superstep {per_step:.4} s ({:.2}×)\n  \
             digest {} {}; agent peak RSS (the first is the job's holder and master) {} MiB ({} MB)",
            a.algo,
            reference["vertices"],
            reference["edges"],
            a.iterations,
            a.threads,
            a.nodes,
            job_seconds / run_compute,
            job_seconds / run_wall,
            per_step / run_per_iter,
            &digest[..16.min(digest.len())],
            if matches { "matches quiver run" } else { "DIFFERS from quiver run" },
            rss.iter().map(|b| (b >> 20).to_string()).collect::<Vec<_>>().join(" / "),
            rss.iter().map(|b| (b / 1_000_000).to_string()).collect::<Vec<_>>().join(" / ")
        );
        let drops: Vec<String> = drops.iter().map(|d| d.map_or("?".into(), |d| d.to_string())).collect();
        println!(
            "  UDP datagrams the kernel dropped for full receive buffers (the whole host), per job: {}",
            drops.join(", ")
        );
        let secs = |x: &Option<f64>| x.map_or("?".into(), |x| format!("{x:.2}"));
        println!(
            "  CPU: quiver run {} s; the agents per job {} s, which on {cores} cores take at least {} s = {}× quiver run's whole command",
            secs(&run_cpu),
            cpu.iter().map(secs).collect::<Vec<_>>().join(", "),
            floor.iter().map(secs).collect::<Vec<_>>().join(", "),
            floor.iter().map(|f| secs(&f.map(|f| f / run_wall))).collect::<Vec<_>>().join(", ")
        );
        if let Some(w) = warm_median {
            println!(
                "  warm jobs (partitions kept from the first): {} s, median {w:.3} s = {:.2}× quiver run's compute, {:.2}× its whole command",
                warm.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(", "),
                w / run_compute,
                w / run_wall
            );
        }
    }
    ensure!(matches, "the distributed result differs from quiver run's");
    Ok(())
}

/// Submits one job by path, follows it with `Watch` to the end: its seconds (submit call to the
/// watch's end), each superstep's first report `(superstep, seconds)`, and the finished job.
async fn submit_and_watch(conn: &Conn, spec: JobSpec) -> Result<(f64, Vec<(u64, f64)>, Job)> {
    let mut jobs = JobsClient::new(connect(conn, None).await?);
    let t = Instant::now();
    let msgs = vec![SubmitRequest { body: Some(submit_request::Body::Spec(spec)) }];
    let id = jobs.submit(tonic::codegen::tokio_stream::iter(msgs)).await?.into_inner().job_id;
    let mut watch = jobs.watch(WatchJobRequest { job_id: id }).await?.into_inner();
    let mut steps: Vec<(u64, f64)> = Vec::new();
    while let Some(p) = tokio::time::timeout(DEADLINE, watch.message()).await.context("the job stalled")?? {
        if steps.last().is_none_or(|(s, _)| *s != p.superstep) && p.superstep > 0 {
            steps.push((p.superstep, t.elapsed().as_secs_f64()));
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let job = jobs.get(GetJobRequest { job_id: id }).await?.into_inner();
    Ok((secs, steps, job))
}

/// The median of `xs` (the mean of the middle two for an even count); `None` when empty.
fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn quiver(exe: &Path, dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(exe).args(args).current_dir(dir).output().context("running quiver")?;
    if !out.status.success() {
        bail!("quiver {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process's peak resident set (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

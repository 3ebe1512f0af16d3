//! `quiver bench serve`: an open-loop load generator for `Diffusion.Diffuse`.
//!
//! Request `i` is scheduled at `start + i / rate`, whatever happened to earlier requests, and its
//! latency is measured from that scheduled time to the answer: a slow server makes later requests
//! late, and their lateness counts (no coordinated omission). A pacer thread (`thread::sleep`,
//! tens of microseconds of precision instead of the async timer's millisecond) hands each request
//! to an async runtime as it falls due; latencies go into an HDR histogram.
//!
//! Graphs are generated from a seed (`--graph-size small`: 100 vertices, 500 edges, personalized
//! PageRank 10 iterations; `medium`: 1,000 vertices, 8,000 edges, 20 iterations). Request `i` uses
//! variant `i mod --distinct`; each variant is its own random graph and seed vertex, so
//! `--distinct 1` measures the cache and a `--distinct` above the request count measures compute.
//! Edge lists go packed (`sources_le`, `targets_le`), as a client minding its CPU would send them.
//! Without `--addr` it starts a one-node agent of this binary on loopback (TLS on, as always).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use quiver_proto::control::diffusion_client::DiffusionClient;
use quiver_proto::control::{DiffuseRequest, Kernel, KernelParams};
use quiver_tests::agents::LocalCluster;
use serde_json::json;
use tonic::transport::Channel;

use crate::client::{Conn, Output};

/// Graph sizes of the serving targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphSize {
    /// 100 vertices, 500 edges, personalized PageRank 10 iterations.
    Small,
    /// 1,000 vertices, 8,000 edges, personalized PageRank 20 iterations.
    Medium,
}

impl GraphSize {
    fn shape(self) -> (u32, usize, u32) {
        match self {
            GraphSize::Small => (100, 500, 10),
            GraphSize::Medium => (1_000, 8_000, 20),
        }
    }
}

/// Flags of `quiver bench serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// An agent's gRPC address; without it a one-node agent is started on loopback.
    #[arg(long)]
    pub addr: Option<String>,
    /// Client TLS directory for --addr (ca.pem and a client or node certificate).
    #[arg(long, env = "QUIVER_TLS_DIR")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Graph size.
    #[arg(long, value_enum, default_value_t = GraphSize::Small)]
    pub graph_size: GraphSize,
    /// Requests per second, scheduled at fixed intervals.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Length of the measured run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// HTTP/2 connections, used round-robin.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Different requests (graph and seed vertex), used round-robin.
    #[arg(long, default_value_t = 1)]
    pub distinct: u64,
    /// Seed of the generated graphs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Async threads of the generator.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// The pacer wakes at most every this many microseconds and sends every request that fell
    /// due (0: one wake per request). Latency still counts from each request's scheduled time,
    /// so the wait for the tick is part of it; the default spares the generator thousands of
    /// wake-ups a second that it would otherwise take from the agent on a shared machine.
    #[arg(long, default_value_t = 500)]
    pub tick_us: u64,
    /// Worker threads of the agent this command starts (no --addr); default: every CPU.
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// SplitMix64: the generator's only source of randomness.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u32) -> u32 {
        (((self.next() >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// Variant `v` of the benchmark's request: a random graph of the size's shape and one seed
/// vertex, both from `(seed, v)`.
pub fn request(size: GraphSize, seed: u64, v: u64) -> DiffuseRequest {
    let (n, m, iterations) = size.shape();
    let mut rng = SplitMix(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ v);
    let mut sources = Vec::with_capacity(m);
    let mut targets = Vec::with_capacity(m);
    for _ in 0..m {
        sources.push(rng.below(n));
        targets.push(rng.below(n));
    }
    let mut req = DiffuseRequest {
        vertices: n,
        sources,
        targets,
        params: Some(KernelParams {
            kernel: Kernel::PersonalizedPagerank as i32,
            alpha: 0.85,
            max_iterations: iterations,
            seeds: vec![rng.below(n)],
            ..Default::default()
        }),
        ..Default::default()
    };
    // Packed ids: the form a client that cares about CPU sends.
    req.pack_edges();
    req
}

/// Requests built ahead of the run when few enough, else built as they fall due.
struct Requests {
    size: GraphSize,
    seed: u64,
    distinct: u64,
    built: Vec<DiffuseRequest>,
}

impl Requests {
    fn new(size: GraphSize, seed: u64, distinct: u64) -> Self {
        let built = if distinct <= 4096 { (0..distinct).map(|v| request(size, seed, v)).collect() } else { vec![] };
        Requests { size, seed, distinct, built }
    }

    fn get(&self, i: u64) -> DiffuseRequest {
        let v = i % self.distinct;
        match self.built.get(v as usize) {
            Some(r) => r.clone(),
            None => request(self.size, self.seed, v),
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
    cached: AtomicU64,
    rejected: AtomicU64,
}

/// Runs the benchmark and prints the result.
pub fn run(args: Args) -> Result<()> {
    ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be a positive number");
    ensure!(args.seconds > 0.0 && args.seconds.is_finite(), "--seconds must be a positive number");
    ensure!(args.connections >= 1, "--connections must be at least 1");
    ensure!(args.distinct >= 1, "--distinct must be at least 1");
    ensure!(args.client_threads >= 1, "--client-threads must be at least 1");
    let mut local = None;
    let conn = match &args.addr {
        Some(addr) => Conn { addr: addr.clone(), tls_dir: args.tls_dir.clone(), output: Output::Json },
        None => {
            let exe = std::env::current_exe().context("locating the quiver binary")?;
            let mut c = LocalCluster::with_bin(&["serve1"], exe);
            let threads = args.worker_threads.map(|t| t.to_string());
            let mut flags = vec!["--bootstrap"];
            if let Some(t) = &threads {
                flags.extend(["--worker-threads", t]);
            }
            c.agents[0].start(&flags);
            c.agents[0].wait_ready(Duration::from_secs(30));
            let conn = Conn { addr: c.agents[0].addr(), tls_dir: Some(c.client_tls.clone()), output: Output::Json };
            local = Some(c);
            conn
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .thread_name("quiver-bench-serve")
        .build()?;
    let agent_pid = local.as_ref().and_then(|c| c.agents[0].pid());
    let report = match measure(&rt, &conn, &args, agent_pid) {
        Ok(r) => r,
        Err(e) => match &local {
            Some(c) => bail!("{e:#}\n{}", c.logs()),
            None => return Err(e),
        },
    };
    if let Some(c) = &local
        && let Some(pid) = c.agents[0].pid()
    {
        eprintln!("agent pid {pid} served the run");
    }
    println!(
        "{:?} graphs, {} distinct: {:.0} req/s achieved of {:.0} offered over {:.1} s; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms; {} errors ({} rejected), {:.1}% cache hits",
        args.graph_size,
        args.distinct,
        report["achieved_rps"].as_f64().unwrap_or(f64::NAN),
        args.rate,
        report["duration_s"].as_f64().unwrap_or(f64::NAN),
        report["p50_ms"].as_f64().unwrap_or(f64::NAN),
        report["p99_ms"].as_f64().unwrap_or(f64::NAN),
        report["p999_ms"].as_f64().unwrap_or(f64::NAN),
        report["max_ms"].as_f64().unwrap_or(f64::NAN),
        report["errors"],
        report["rejected"],
        report["cache_hit_ratio"].as_f64().unwrap_or(0.0) * 100.0,
    );
    let field =
        |k: &str, scale: f64| report[k].as_f64().map_or_else(|| "?".to_owned(), |v| format!("{:.1}", v * scale));
    println!(
        "CPU per request: agent {} µs, generator {} µs; host {}% idle, {}% stolen",
        field("agent_cpu_us_per_request", 1.0),
        field("client_cpu_us_per_request", 1.0),
        field("host_idle_share", 100.0),
        field("host_steal_share", 100.0),
    );
    if args.json {
        println!("{report}");
    }
    drop(local);
    Ok(())
}

/// CPU use over the measured run: this generator's, the local agent's and the machine's.
struct CpuMark {
    client: Option<f64>,
    agent: Option<f64>,
    host: Option<(f64, f64, f64)>,
}

impl CpuMark {
    fn now(agent_pid: Option<u32>) -> Self {
        CpuMark {
            client: crate::sys::cpu_seconds(None),
            agent: agent_pid.and_then(|p| crate::sys::cpu_seconds(Some(p))),
            host: crate::sys::host_cpu_seconds(),
        }
    }

    /// The report's CPU fields for the `requests` sent since `start`, each answered or refused
    /// (absent where unknown): microseconds of CPU per request for the generator and the agent
    /// (refusals are cheap, so a run with many counts low), and the machine's idle
    /// and stolen shares of its CPU time, which say how busy the host was during the run.
    fn report(&self, start: &CpuMark, requests: u64) -> serde_json::Map<String, serde_json::Value> {
        let per_request =
            |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (a - b) * 1e6 / requests.max(1) as f64);
        let mut m = serde_json::Map::new();
        if let Some(us) = per_request(self.client, start.client) {
            m.insert("client_cpu_us_per_request".into(), json!(us));
        }
        if let Some(us) = per_request(self.agent, start.agent) {
            m.insert("agent_cpu_us_per_request".into(), json!(us));
        }
        if let Some(((all, idle, steal), (all0, idle0, steal0))) = self.host.zip(start.host) {
            let all = (all - all0).max(1e-9);
            m.insert("host_idle_share".into(), json!((idle - idle0) / all));
            m.insert("host_steal_share".into(), json!((steal - steal0) / all));
        }
        m
    }
}

fn measure(
    rt: &tokio::runtime::Runtime,
    conn: &Conn,
    args: &Args,
    agent_pid: Option<u32>,
) -> Result<serde_json::Value> {
    let channels: Vec<Channel> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..args.connections {
            v.push(crate::client::connect(conn, None).await?);
        }
        Ok::<_, anyhow::Error>(v)
    })?;
    let requests = Arc::new(Requests::new(args.graph_size, args.seed, args.distinct));
    // Warm-up: every connection carries a few requests (and the cache sees the first variants).
    rt.block_on(async {
        for (i, ch) in channels.iter().enumerate() {
            for j in 0..4u64 {
                let mut c = DiffusionClient::new(ch.clone()).max_decoding_message_size(64 << 20);
                c.diffuse(requests.get(i as u64 * 4 + j)).await.context("warm-up request")?;
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;

    let total = (args.rate * args.seconds).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let tick = Duration::from_micros(args.tick_us);
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let tally = Arc::new(Tally::default());
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let start = Instant::now() + Duration::from_millis(20);
    let mut last_done = start;
    let cpu_start = CpuMark::now(agent_pid);
    let handle = rt.handle().clone();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).max(tick));
        }
        let mut client =
            DiffusionClient::new(channels[i as usize % channels.len()].clone()).max_decoding_message_size(64 << 20);
        let (requests, histogram, tally, done) = (requests.clone(), histogram.clone(), tally.clone(), done_tx.clone());
        handle.spawn(async move {
            let mut req = tonic::Request::new(requests.get(i));
            req.set_timeout(Duration::from_secs(10));
            let result = client.diffuse(req).await;
            let micros = due.elapsed().as_micros().max(1) as u64;
            match result {
                Ok(r) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    if r.get_ref().cached {
                        tally.cached.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(s) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    if s.code() == tonic::Code::ResourceExhausted {
                        tally.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let _ = histogram.lock().expect("histogram lock").record(micros.min(60_000_000));
            let _ = done.send(());
        });
    }
    drop(done_tx);
    rt.block_on(async {
        let mut n = 0;
        while n < total {
            match tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await {
                Ok(Some(())) => {
                    n += 1;
                    last_done = Instant::now();
                }
                Ok(None) => break,
                Err(_) => bail!("{} of {total} requests still unanswered 30 s after the last answer", total - n),
            }
        }
        Ok(())
    })?;
    let cpu = CpuMark::now(agent_pid).report(&cpu_start, total);
    let h = histogram.lock().expect("histogram lock");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let duration = last_done.duration_since(start).as_secs_f64();
    let ok = tally.ok.load(Ordering::Relaxed);
    let (n, m, iterations) = args.graph_size.shape();
    let mut report = json!({
        "graph_size": format!("{:?}", args.graph_size).to_lowercase(),
        "vertices": n,
        "edges": m,
        "iterations": iterations,
        "distinct": args.distinct,
        "offered_rps": args.rate,
        "seconds": args.seconds,
        "connections": args.connections,
        "requests": total,
        "ok": ok,
        "errors": tally.errors.load(Ordering::Relaxed),
        "rejected": tally.rejected.load(Ordering::Relaxed),
        "cache_hit_ratio": tally.cached.load(Ordering::Relaxed) as f64 / ok.max(1) as f64,
        "duration_s": duration,
        "achieved_rps": ok as f64 / duration.max(1e-9),
        "mean_ms": h.mean() / 1000.0,
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": h.max() as f64 / 1000.0,
    });
    if let Some(fields) = report.as_object_mut() {
        fields.extend(cpu);
    }
    Ok(report)
}

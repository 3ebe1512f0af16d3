//! `quiver bench failover`: a local 3-agent cluster of this very binary on loopback. Measures
//! join latency (agent process start → `/readyz` OK and listed by `Members` on every node; the two
//! joins that form the cluster, then `--joins` more by extra agents that join and leave again),
//! failover (SIGKILL of the leader → a `Submit` acknowledged by a survivor) over N trials, checks
//! that no acknowledged submit is lost or duplicated, and reports each agent's idle RSS.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use quiver_proto::control::cluster_client::ClusterClient;
use quiver_proto::control::jobs_client::JobsClient;
use quiver_proto::control::{
    JobSpec, Kernel, KernelParams, LeaveRequest, ListJobsRequest, MembersRequest, StatusRequest, SubmitRequest,
    submit_request,
};
use quiver_tests::agents::LocalCluster;
use serde_json::json;
use tonic::transport::Channel;

use crate::client::{Conn, Output, channel};

/// Flags of `quiver bench failover`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Leader failovers to time.
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
    /// Extra agents that each join the formed cluster (timed) and leave it again, before the
    /// failovers; with the two joins that form the cluster these are the join samples.
    #[arg(long, default_value_t = 10)]
    pub joins: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

const NAMES: [&str; 3] = ["b1", "b2", "b3"];
const DEADLINE: Duration = Duration::from_secs(30);

fn conn(c: &LocalCluster, i: usize) -> Conn {
    Conn { addr: c.agents[i].addr(), tls_dir: Some(c.client_tls.clone()), output: Output::Json }
}

async fn until<T, F: Future<Output = Result<T>>>(what: &str, mut f: impl FnMut() -> F) -> Result<T> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => bail!("timed out waiting for {what}: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn ready(c: &LocalCluster, i: usize) -> Result<()> {
    match c.agents[i].http_get("/readyz") {
        Ok((200, _)) => Ok(()),
        other => bail!("{}: {other:?}", c.agents[i].name),
    }
}

/// Names listed by `Members` on node `i`, and how many are alive voters.
async fn members(ch: &Channel) -> Result<(Vec<String>, usize)> {
    let ms = ClusterClient::new(ch.clone()).members(MembersRequest {}).await?.into_inner().members;
    let alive_voters = ms.iter().filter(|m| m.role == 1 && m.liveness == 1).count();
    Ok((ms.into_iter().map(|m| m.name).collect(), alive_voters))
}

async fn leader(ch: &Channel) -> Result<String> {
    let s = ClusterClient::new(ch.clone()).status(StatusRequest {}).await?.into_inner();
    ensure!(!s.leader_name.is_empty(), "no leader");
    Ok(s.leader_name)
}

async fn submit(ch: &Channel, client: u64, seq: u64) -> Result<u64> {
    let spec = JobSpec {
        params: Some(KernelParams {
            kernel: Kernel::Pagerank as i32,
            alpha: 0.85,
            max_iterations: 5,
            ..Default::default()
        }),
        client_id: client,
        client_seq: seq,
        ..Default::default()
    };
    let msgs = vec![
        SubmitRequest { body: Some(submit_request::Body::Spec(spec)) },
        SubmitRequest { body: Some(submit_request::Body::GraphChunk(b"0 1\n1 2\n2 0\n".to_vec())) },
    ];
    Ok(JobsClient::new(ch.clone()).submit(tonic::codegen::tokio_stream::iter(msgs)).await?.into_inner().job_id)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let median = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
    json!({ "n": v.len(), "median_ms": median, "min_ms": v.first(), "max_ms": v.last(), "all_ms": v })
}

/// Runs the benchmark and prints the result.
pub fn run(args: Args) -> Result<()> {
    let exe = std::env::current_exe().context("locating the quiver binary")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let joiners: Vec<String> = (1..=args.joins).map(|i| format!("j{i}")).collect();
    let names: Vec<&str> = NAMES.iter().copied().chain(joiners.iter().map(String::as_str)).collect();
    let mut c = LocalCluster::with_bin(&names, exe);
    let report = rt.block_on(measure(&mut c, args.trials));
    let report = match report {
        Ok(r) => r,
        Err(e) => bail!("{e:#}\n{}", c.logs()),
    };
    println!(
        "join: median {:.0} ms over {} joins; failover (SIGKILL leader → submit acknowledged): median {:.0} ms, worst {:.0} ms over {} trials; idle RSS {:.1} MB max",
        report["join"]["median_ms"].as_f64().unwrap_or(f64::NAN),
        report["join"]["n"],
        report["failover"]["median_ms"].as_f64().unwrap_or(f64::NAN),
        report["failover"]["max_ms"].as_f64().unwrap_or(f64::NAN),
        report["failover"]["n"],
        report["idle_rss_max_mb"].as_f64().unwrap_or(f64::NAN),
    );
    if args.json {
        println!("{report}");
    }
    Ok(())
}

async fn measure(c: &mut LocalCluster, trials: usize) -> Result<serde_json::Value> {
    c.agents[0].start(&["--bootstrap"]);
    until("b1 ready", || ready(c, 0)).await?;
    let seed = c.agents[0].peer_addr();
    let mut channels = vec![channel(&conn(c, 0)).await?];
    let mut joins = Vec::new();
    for (i, joiner) in NAMES.iter().enumerate().skip(1) {
        let t0 = Instant::now();
        c.agents[i].start(&["--join", &seed]);
        until("the joiner ready", || ready(c, i)).await?;
        let cn = conn(c, i);
        channels.push(until("the joiner's gRPC port", || channel(&cn)).await?);
        for ch in &channels {
            until("the joiner listed everywhere", || async {
                let (names, _) = members(ch).await?;
                ensure!(names.iter().any(|n| n == joiner), "{names:?}");
                Ok(())
            })
            .await?;
        }
        joins.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    // More join samples: each extra agent joins (timed as above), then leaves and stops.
    for j in NAMES.len()..c.agents.len() {
        let t0 = Instant::now();
        c.agents[j].start(&["--join", &seed]);
        until("the joiner ready", || ready(c, j)).await?;
        let joiner = c.agents[j].name.clone();
        let cn = conn(c, j);
        let mut all = channels.clone();
        all.push(until("the joiner's gRPC port", || channel(&cn)).await?);
        for ch in &all {
            until("the joiner listed everywhere", || async {
                let (names, _) = members(ch).await?;
                ensure!(names.contains(&joiner), "{names:?}");
                Ok(())
            })
            .await?;
        }
        joins.push(t0.elapsed().as_secs_f64() * 1e3);
        let ms = ClusterClient::new(channels[0].clone()).members(MembersRequest {}).await?.into_inner().members;
        let id = ms.iter().find(|m| m.name == joiner).map(|m| m.node_id).context("the joiner's node id")?;
        ClusterClient::new(channels[0].clone()).leave(LeaveRequest { node_id: id }).await?;
        c.agents[j].kill9();
        until("the joiner gone", || async {
            let (names, _) = members(&channels[0]).await?;
            ensure!(!names.contains(&joiner), "{names:?}");
            Ok(())
        })
        .await?;
    }
    let client = u64::from(std::process::id()) << 20;
    let mut acked = Vec::new();
    let mut seq = 0;
    let mut failovers = Vec::new();
    for _ in 0..trials {
        // Steady state: three alive voters, a leader known everywhere.
        until("three alive voters", || async {
            let (_, voters) = members(&channels[0]).await?;
            ensure!(voters == 3, "{voters} alive voters");
            Ok(())
        })
        .await?;
        let name = until("a leader", || leader(&channels[0])).await?;
        let li = NAMES.iter().position(|n| *n == name).context("leader name")?;
        let survivor = (li + 1) % 3;
        seq += 1;
        acked.push(submit(&channels[survivor], client, seq).await?);
        let t0 = Instant::now();
        c.agents[li].kill9();
        seq += 1;
        let id = submit(&channels[survivor], client, seq).await.context("submit after the leader was killed")?;
        failovers.push(t0.elapsed().as_secs_f64() * 1e3);
        acked.push(id);
        c.agents[li].start(&[]);
        until("the old leader ready again", || ready(c, li)).await?;
        let cn = conn(c, li);
        channels[li] = until("the old leader's gRPC port", || channel(&cn)).await?;
    }
    let jobs = JobsClient::new(channels[0].clone()).list(ListJobsRequest {}).await?.into_inner().jobs;
    let mut listed: Vec<u64> = jobs.iter().map(|j| j.job_id).collect();
    listed.sort_unstable();
    let mut want = acked.clone();
    want.sort_unstable();
    want.dedup();
    ensure!(want.len() == acked.len(), "an acknowledged submit was given a duplicate id");
    ensure!(listed == want, "acknowledged {want:?} but the cluster lists {listed:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss: Vec<u64> = c.agents.iter().filter_map(|a| a.pid().and_then(rss_bytes)).collect();
    let rss_max = rss.iter().copied().max().unwrap_or(0) as f64 / 1e6;
    for a in &mut c.agents {
        a.kill9();
    }
    Ok(json!({
        "join": stats(joins),
        "failover": stats(failovers),
        "acknowledged_submits": acked.len(),
        "lost_or_duplicated": 0,
        "idle_rss_bytes": rss,
        "idle_rss_max_mb": rss_max,
    }))
}

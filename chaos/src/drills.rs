//! The drill catalogue and the driver: form a cluster, start the write stream (and a job), inject
//! the fault, recover, and collect the verdicts.
//!
//! Every wait polls with a deadline; the only fixed sleeps are the length of a fault itself (a
//! 5 s SIGSTOP, a partition held for a few seconds), which is the drill's definition, not a wait
//! for a state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use quiver_node_agent::failpoints;
use quiver_proto::control::{JobState, MemberRole};
use quiver_tests::agents::{LocalCluster, poll};
use serde::Serialize;
use tonic::transport::Channel;

use crate::client;
use crate::verdict::{self, Check, DrillReport};

/// One drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drill {
    /// Control-plane writes; SIGKILL the leader; restart it.
    LeaderKill,
    /// A job; SIGKILL the leader mid-job.
    LeaderKillJob,
    /// A job; SIGKILL a worker (a follower that owns partitions) mid-job.
    WorkerKillJob,
    /// A job; SIGKILL the node it was submitted to (its first holder and master) mid-job, kept
    /// down until the job ends: the job's second holder takes it over.
    HolderKillJob,
    /// Control-plane writes; SIGSTOP the leader for 5 s, then SIGCONT.
    LeaderStop,
    /// Control-plane writes; cut one follower off from everyone for 5 s, then heal.
    MinorityPartition,
    /// Control-plane writes; cut the leader off from the majority for 5 s, then heal.
    LeaderIsolated,
    /// A job under 10% packet loss and 20 ms delay on every link for its whole run.
    LossyLinksJob,
    /// A job; restart every node in turn (SIGTERM, start again) while it runs.
    RollingRestartJob,
    /// Control-plane writes; SIGKILL every node, restart all from disk.
    FullRestart,
    /// 5 nodes, a job and writes; SIGKILL the leader and a learner at once.
    TwoNodesLost,
    /// Control-plane writes; the raft-log fsync fails on a follower (failpoint), which stops;
    /// restart it from disk.
    FsyncFailFollower,
    /// A job whose master cannot write its checkpoints (failpoint `job::checkpoint`); SIGKILL a
    /// worker past the first checkpoint's superstep: the job starts over, from no checkpoint.
    CheckpointFailJob,
    /// A job whose master cannot copy any file to another node (failpoint `job::transfer`), so
    /// it stays the only holder; SIGKILL a worker past the first checkpoint: the job resumes from
    /// the checkpoint the master kept on its own disk.
    TransferFailJob,
}

impl Drill {
    pub const ALL: [Drill; 14] = [
        Drill::LeaderKill,
        Drill::LeaderKillJob,
        Drill::WorkerKillJob,
        Drill::HolderKillJob,
        Drill::LeaderStop,
        Drill::MinorityPartition,
        Drill::LeaderIsolated,
        Drill::LossyLinksJob,
        Drill::RollingRestartJob,
        Drill::FullRestart,
        Drill::TwoNodesLost,
        Drill::FsyncFailFollower,
        Drill::CheckpointFailJob,
        Drill::TransferFailJob,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Drill::LeaderKill => "leader-kill",
            Drill::LeaderKillJob => "leader-kill-job",
            Drill::WorkerKillJob => "worker-kill-job",
            Drill::HolderKillJob => "holder-kill-job",
            Drill::LeaderStop => "leader-stop",
            Drill::MinorityPartition => "minority-partition",
            Drill::LeaderIsolated => "leader-isolated",
            Drill::LossyLinksJob => "lossy-links-job",
            Drill::RollingRestartJob => "rolling-restart-job",
            Drill::FullRestart => "full-restart",
            Drill::TwoNodesLost => "two-nodes-lost",
            Drill::FsyncFailFollower => "fsync-fail-follower",
            Drill::CheckpointFailJob => "checkpoint-fail-job",
            Drill::TransferFailJob => "transfer-fail-job",
        }
    }

    /// The drill named `name`, or `None`.
    pub fn parse(name: &str) -> Option<Drill> {
        Drill::ALL.into_iter().find(|d| d.name() == name)
    }

    fn runs_job(self) -> bool {
        matches!(
            self,
            Drill::LeaderKillJob
                | Drill::WorkerKillJob
                | Drill::HolderKillJob
                | Drill::LossyLinksJob
                | Drill::RollingRestartJob
                | Drill::TwoNodesLost
                | Drill::CheckpointFailJob
                | Drill::TransferFailJob
        )
    }

    fn needs_network_faults(self) -> bool {
        matches!(self, Drill::MinorityPartition | Drill::LeaderIsolated | Drill::LossyLinksJob)
    }

    /// The Kronecker scale and PageRank supersteps of the drill's job. Under 10% loss with 20 ms
    /// delay every superstep waits out retransmission timeouts (measured 2026-11-29: about 0.5 s
    /// a superstep at scale 14, and 1.9 s at scale 16, with quinn's default Cubic congestion
    /// control), so the lossy drill caps its job at scale 14 and 50 supersteps to end within
    /// its deadline; the faults of the other drills last a moment, and their jobs are sized
    /// by `--scale` and `--iterations` so the fault lands mid-job.
    fn job_size(self, opts: &Options) -> (u32, u32) {
        match self {
            Drill::LossyLinksJob => (opts.scale.min(14), opts.iterations.min(50)),
            _ => (opts.scale, opts.iterations),
        }
    }

    fn min_nodes(self) -> usize {
        if self == Drill::TwoNodesLost { 5 } else { 3 }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `quiver` binary the agents run (`quiver chaos` passes itself).
    pub bin: PathBuf,
    pub drills: Vec<Drill>,
    pub seeds: Vec<u64>,
    /// Cluster size (raised to a drill's minimum).
    pub nodes: usize,
    /// Kronecker scale of the job's graph.
    pub scale: u32,
    /// PageRank iterations of the job.
    pub iterations: u32,
}

/// Every drill's report.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub passed: bool,
    pub drills: Vec<DrillReport>,
}

/// Runs every drill with every seed; prints one line per drill as it ends (to stderr when
/// `quiet_stdout`, so stdout can end with the JSON).
pub fn run(opts: &Options, quiet_stdout: bool) -> RunReport {
    let mut reports = Vec::new();
    for &drill in &opts.drills {
        for &seed in &opts.seeds {
            let r = run_one(opts, drill, seed);
            let line = summary(&r);
            if quiet_stdout {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            reports.push(r);
        }
    }
    RunReport { passed: reports.iter().all(|r| r.passed), drills: reports }
}

fn summary(r: &DrillReport) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} ms"));
    let mut s = format!(
        "{} {} seed {} ({} nodes, {:.1} s): serving again after {}, job finished after {} ({} after submit), {} writes acknowledged",
        if r.passed { "PASS" } else { "FAIL" },
        r.drill,
        r.seed,
        r.nodes,
        r.duration_ms / 1e3,
        ms(r.recovery_serving_ms),
        ms(r.recovery_job_ms),
        ms(r.job_total_ms),
        r.acknowledged_writes
    );
    for c in r.checks.iter().filter(|c| !c.ok) {
        s += &format!("\n  FAILED {}: {}", c.name, c.evidence);
    }
    if !r.passed && !r.logs.is_empty() {
        s += &format!("\n{}", r.logs);
    }
    s
}

const READY: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(30);
/// A job must finish within this long after its fault.
const JOB_DEADLINE: Duration = Duration::from_secs(180);
/// How long a stop or a network partition lasts, from the fault's start: a drill parameter,
/// not a wait for an event (the drill checks service resumed before this runs out).
const FAULT_HOLD: Duration = Duration::from_secs(5);
/// The writer's pace: one control-plane write every so often, retried after a short pause
/// until some node acknowledges it (a load generator's rate, not a wait for an event).
const WRITE_EVERY: Duration = Duration::from_millis(40);
const WRITE_RETRY_AFTER: Duration = Duration::from_millis(10);

/// Keeps a fault in place until [`FAULT_HOLD`] after it began.
fn hold_fault(fault_at: Instant) {
    std::thread::sleep(FAULT_HOLD.saturating_sub(fault_at.elapsed()));
}

fn run_one(opts: &Options, drill: Drill, seed: u64) -> DrillReport {
    let t0 = Instant::now();
    let nodes = opts.nodes.max(drill.min_nodes());
    let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut cx = Ctx {
        c: LocalCluster::with_bin(&refs, opts.bin.clone()),
        flags: if drill.needs_network_faults() { vec!["--fault-injection"] } else { vec![] },
        client: 0xC4A0_5000_0000 ^ (seed << 8) ^ u64::from(std::process::id()),
        rt: tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime"),
        seed,
        checks: Vec::new(),
        serving_ms: None,
        job_ms: None,
        job_total_ms: None,
    };
    let outcome = cx.drive(opts, drill);
    let mut acked = 0;
    match outcome {
        Ok(n) => acked = n,
        Err(e) => cx.checks.push(Check::new("drill_ran", false, format!("{e:#}"))),
    }
    let passed = cx.checks.iter().all(|c| c.ok) && !cx.checks.is_empty();
    let logs = if passed { String::new() } else { cx.c.logs() };
    // QUIVER_CHAOS_LOGS=DIR keeps every agent's whole log as DIR/DRILL-SEED-NODE.log.
    if let Some(keep) = std::env::var_os("QUIVER_CHAOS_LOGS") {
        cx.c.keep_logs(Path::new(&keep), &format!("{}-{seed}", drill.name()));
    }
    for a in &mut cx.c.agents {
        a.kill9();
    }
    DrillReport {
        drill: drill.name(),
        seed,
        nodes,
        passed,
        checks: cx.checks,
        recovery_serving_ms: cx.serving_ms,
        recovery_job_ms: cx.job_ms,
        job_total_ms: cx.job_total_ms,
        acknowledged_writes: acked,
        duration_ms: t0.elapsed().as_secs_f64() * 1e3,
        logs,
    }
}

/// One drill's cluster and what it has recorded.
struct Ctx {
    c: LocalCluster,
    flags: Vec<&'static str>,
    client: u64,
    rt: tokio::runtime::Runtime,
    seed: u64,
    checks: Vec<Check>,
    serving_ms: Option<f64>,
    job_ms: Option<f64>,
    job_total_ms: Option<f64>,
}

/// The job a drill runs and the digest `quiver run` computes for it.
struct JobRun {
    id: u64,
    want: String,
    submitted: Instant,
}

/// A drill job's input: the graph, its supersteps, and `quiver run`'s digest for it.
struct JobInput {
    graph: String,
    iterations: u32,
    want: String,
}

impl Ctx {
    fn ch(&self, i: usize) -> Result<Channel> {
        // A lazy channel spawns its connection task on the current runtime.
        let _rt = self.rt.enter();
        client::channel(&self.c.agents[i].addr(), &self.c.client_tls, Duration::from_secs(2))
    }

    fn until<T>(&self, what: &str, within: Duration, mut f: impl FnMut(&Self) -> Result<T>) -> Result<T> {
        poll(what, within, || f(self).map_err(|e| format!("{e:#}"))).map_err(anyhow::Error::msg)
    }

    fn start(&mut self, i: usize, membership: &[&str]) {
        let mut args: Vec<&str> = membership.to_vec();
        args.extend(self.flags.iter().copied());
        self.c.agents[i].start(&args);
    }

    fn ready(&self, i: usize) -> Result<()> {
        match self.c.agents[i].http_get("/readyz") {
            Ok((200, _)) => Ok(()),
            other => bail!("{}: {other:?}", self.c.agents[i].name),
        }
    }

    fn form(&mut self) -> Result<()> {
        self.start(0, &["--bootstrap"]);
        self.until("the first node ready", READY, |s| s.ready(0))?;
        let seed = self.c.agents[0].peer_addr();
        for i in 1..self.c.agents.len() {
            self.start(i, &["--join", &seed]);
            self.until("a joiner ready", READY, |s| s.ready(i))?;
        }
        self.converged(CONVERGE)
    }

    /// Every node lists every node as alive and names the same leader.
    fn converged(&self, within: Duration) -> Result<()> {
        let n = self.c.agents.len();
        self.until("membership to converge", within, |s| {
            let mut leaders = Vec::new();
            for i in 0..n {
                let ch = s.ch(i)?;
                let ms = s.rt.block_on(client::members(&ch))?;
                let alive = ms.iter().filter(|m| m.liveness == 1).count();
                ensure!(
                    ms.len() == n && alive == n,
                    "{} sees {} members, {alive} alive: {:?}",
                    s.c.agents[i].name,
                    ms.len(),
                    ms.iter().map(|m| (&m.name, m.liveness)).collect::<Vec<_>>()
                );
                leaders.push(s.rt.block_on(client::leader_name(&ch))?);
            }
            ensure!(leaders.windows(2).all(|w| w[0] == w[1]), "nodes name different leaders: {leaders:?}");
            Ok(())
        })
    }

    fn leader(&self) -> Result<usize> {
        let n = self.c.agents.len();
        self.until("a leader", READY, |s| {
            for i in (0..n).filter(|&i| s.c.agents[i].pid().is_some()) {
                if let Ok(name) = s.rt.block_on(async { client::leader_name(&s.ch(i)?).await }) {
                    return s.c.agents.iter().position(|a| a.name == name).context("leader name not in the cluster");
                }
            }
            bail!("no running node names a leader")
        })
    }

    /// A learner (non-voting member) chosen by the seed, other than `not`.
    fn learner(&self, leader: usize, not: &[usize]) -> Result<usize> {
        let ms = self.rt.block_on(async { client::members(&self.ch(leader)?).await })?;
        let learners: Vec<usize> = (0..self.c.agents.len())
            .filter(|i| *i != leader && !not.contains(i))
            .filter(|&i| ms.iter().any(|m| m.name == self.c.agents[i].name && m.role == MemberRole::Learner as i32))
            .collect();
        ensure!(!learners.is_empty(), "no learner to lose besides the leader: {ms:?}");
        Ok(learners[(self.seed as usize) % learners.len()])
    }

    /// A follower chosen by the seed, other than `not`.
    fn follower(&self, leader: usize, not: &[usize]) -> usize {
        let n = self.c.agents.len();
        let candidates: Vec<usize> = (0..n).filter(|i| *i != leader && !not.contains(i)).collect();
        candidates[(self.seed as usize) % candidates.len()]
    }

    fn writer(&self, first_seq: u64) -> Writer {
        Writer::start(
            self.c.agents.iter().map(|a| a.addr()).collect(),
            self.c.client_tls.clone(),
            self.client,
            first_seq,
        )
    }

    fn prepare_job(&self, opts: &Options, drill: Drill) -> Result<JobInput> {
        let dir = self.c.dir.path();
        let g = dir.join("graph.qcsr").display().to_string();
        let (scale, iterations) = drill.job_size(opts);
        let scale = scale.to_string();
        let gen_ =
            quiver(&opts.bin, dir, &["graph", "generate", "kronecker", "--scale", &scale, "--seed", "1", "--out", &g])?;
        ensure!(gen_.0, "quiver graph generate failed: {}", gen_.2);
        let iters = iterations.to_string();
        let run =
            quiver(&opts.bin, dir, &["run", "--graph", &g, "--algo", "pagerank", "--iterations", &iters, "--json"])?;
        ensure!(run.0, "quiver run failed: {}", run.2);
        let v: serde_json::Value = serde_json::from_str(run.1.lines().last().unwrap_or_default())
            .with_context(|| format!("quiver run --json printed {:?}", run.1))?;
        let want = v["result_digest"].as_str().context("quiver run --json has no result_digest")?.to_string();
        Ok(JobInput { graph: g, iterations, want })
    }

    fn submit_job(&self, input: JobInput, via: usize) -> Result<JobRun> {
        let iters = input.iterations.to_string();
        let parts = self.c.agents.len().to_string();
        let r = self.c.cli(
            via,
            &[
                "submit",
                &input.graph,
                "--by-path",
                "--algo",
                "pagerank",
                "--iterations",
                &iters,
                "--partitions",
                &parts,
                // Checkpoints every 20 supersteps, so recoveries resume from one, not from the start.
                "--checkpoint-every",
                "20",
            ],
        );
        ensure!(r.status.success(), "quiver submit failed: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap_or_default())?;
        Ok(JobRun {
            id: v["id"].as_u64().context("submit printed no id")?,
            want: input.want,
            submitted: Instant::now(),
        })
    }

    /// Waits until the job has done `steps` supersteps; an already finished job is an error
    /// (the fault would not land mid-job).
    /// Waits until the job runs past superstep `steps` with at least `holders` holders recorded.
    fn job_mid_run(&self, job: &JobRun, steps: u64, holders: usize) -> Result<()> {
        let n = self.c.agents.len();
        // Ok(Err(_)): the job ended before the fault, which no amount of waiting mends.
        self.until(&format!("the job to reach superstep {steps}"), Duration::from_secs(120), |s| {
            let mut last = String::from("no node answers");
            // Only the job's holder knows the live superstep (others report the last checkpoint's),
            // so every node is asked.
            for i in (0..n).filter(|&i| s.c.agents[i].pid().is_some()) {
                let Ok(j) = s.rt.block_on(async { client::job(&s.ch(i)?, job.id).await }) else { continue };
                if j.state == JobState::Running as i32 && j.superstep >= steps && j.holders.len() >= holders {
                    return Ok(Ok(()));
                }
                if j.state >= JobState::Succeeded as i32 {
                    return Ok(Err(anyhow::anyhow!(
                        "job {} ended (state {}, superstep {}: {}) before the fault; raise --iterations or --scale",
                        job.id,
                        j.state,
                        j.superstep,
                        j.error
                    )));
                }
                last =
                    format!("job {} at superstep {} (state {}, holders {:?})", job.id, j.superstep, j.state, j.holders);
            }
            bail!("{last}")
        })?
    }

    /// Follows the job to its end; records fault → finished and the result check.
    fn job_verdict(&mut self, job: &JobRun, fault_at: Instant) {
        let n = self.c.agents.len();
        let end = self.until("the job to end", JOB_DEADLINE, |s| {
            for i in (0..n).filter(|&i| s.c.agents[i].pid().is_some()) {
                let Ok(j) = s.rt.block_on(async { client::job(&s.ch(i)?, job.id).await }) else { continue };
                if j.state >= JobState::Succeeded as i32 {
                    return Ok(j);
                }
            }
            bail!("job {} still running or no node answers", job.id)
        });
        let check = match end {
            Ok(j) => {
                self.job_ms = Some(fault_at.elapsed().as_secs_f64() * 1e3);
                self.job_total_ms = Some(job.submitted.elapsed().as_secs_f64() * 1e3);
                let got: String = j.result_digest.iter().map(|b| format!("{b:02x}")).collect();
                let ok = j.state == JobState::Succeeded as i32 && got == job.want;
                Check::new(
                    "job_result_equals_quiver_run",
                    ok,
                    if j.state == JobState::Succeeded as i32 {
                        format!("digest {got}, quiver run {}", job.want)
                    } else {
                        format!("job {} ended in state {} at superstep {}: {}", job.id, j.state, j.superstep, j.error)
                    },
                )
            }
            Err(e) => Check::new("job_result_equals_quiver_run", false, format!("{e:#}")),
        };
        self.checks.push(check);
    }

    /// Cuts `group` off from every other node, in both directions, on both sides.
    fn partition(&self, group: &[usize]) -> Result<()> {
        let n = self.c.agents.len();
        for i in 0..n {
            let others: Vec<String> = (0..n)
                .filter(|j| group.contains(&i) != group.contains(j))
                .map(|j| self.c.agents[j].peer_addr())
                .collect();
            self.net(i, &serde_json::json!({ "partition": others, "seed": self.seed }).to_string())?;
        }
        Ok(())
    }

    fn net(&self, i: usize, rules: &str) -> Result<()> {
        match self.c.agents[i].http("POST", "/chaos/net", rules) {
            Ok((200, _)) => Ok(()),
            other => bail!("{}: POST /chaos/net {rules}: {other:?}", self.c.agents[i].name),
        }
    }

    fn heal(&self) -> Result<()> {
        (0..self.c.agents.len()).try_for_each(|i| self.net(i, "{}"))
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        self.start(i, &[]);
        self.until("a restarted node ready", READY, |s| s.ready(i))
    }

    /// The drill itself; returns the number of acknowledged writes.
    fn drive(&mut self, opts: &Options, drill: Drill) -> Result<usize> {
        let job_input = if drill.runs_job() { Some(self.prepare_job(opts, drill)?) } else { None };
        self.form()?;
        let writer = self.writer(1);
        writer.wait_acks(3, READY).context("writes before the fault")?;
        let leader = self.leader()?;
        let mut job = None;
        if let Some(input) = job_input {
            // Submitted to a follower that survives every drill's fault: it holds the graph.
            let via = self.follower(leader, &[]);
            match drill {
                // The master (the node the job is submitted to) fails every checkpoint's write.
                Drill::CheckpointFailJob => self.failpoint(via, failpoints::JOB_CHECKPOINT, "return")?,
                // The master fails every copy to another node: the graph's, the checkpoints'.
                Drill::TransferFailJob => self.failpoint(via, failpoints::JOB_TRANSFER, "return")?,
                _ => {}
            }
            let j = self.submit_job(input, via)?;
            match drill {
                Drill::LossyLinksJob => {}
                // Past the first checkpoint (every 20 supersteps), which the second holder resumes from.
                // With its second holder recorded (the copy runs beside the job).
                Drill::HolderKillJob => self.job_mid_run(&j, 25 + self.seed % 10, 2)?,
                // Past the first checkpoint's superstep, whose write (or copy) failed.
                Drill::CheckpointFailJob | Drill::TransferFailJob => self.job_mid_run(&j, 25 + self.seed % 10, 1)?,
                _ => self.job_mid_run(&j, 2 + self.seed % 3, 1)?,
            }
            job = Some((j, via));
        }
        let fault_at;
        match drill {
            Drill::LeaderKill
            | Drill::LeaderKillJob
            | Drill::WorkerKillJob
            | Drill::HolderKillJob
            | Drill::CheckpointFailJob
            | Drill::TransferFailJob => {
                let via = job.as_ref().map_or(leader, |(_, v)| *v);
                let victim = match drill {
                    // A follower that owns partitions but is not the job's holder.
                    Drill::WorkerKillJob | Drill::CheckpointFailJob | Drill::TransferFailJob => {
                        self.follower(leader, &[via])
                    }
                    // The node the job was submitted to: its first holder and master.
                    Drill::HolderKillJob => via,
                    _ => leader,
                };
                fault_at = Instant::now();
                self.c.agents[victim].kill9();
                self.serving(&writer, fault_at)?;
                if let Some((j, _)) = &job {
                    self.job_verdict(j, fault_at);
                    self.failpoint_verdicts(drill, via, j.id);
                }
                self.restart(victim)?;
            }
            Drill::LeaderStop => {
                fault_at = Instant::now();
                self.c.agents[leader].stop();
                self.serving(&writer, fault_at)?;
                hold_fault(fault_at);
                self.c.agents[leader].cont();
            }
            Drill::MinorityPartition | Drill::LeaderIsolated => {
                let cut = if drill == Drill::LeaderIsolated { leader } else { self.follower(leader, &[]) };
                fault_at = Instant::now();
                self.partition(&[cut])?;
                self.serving(&writer, fault_at)?;
                hold_fault(fault_at);
                self.heal()?;
            }
            Drill::LossyLinksJob => {
                fault_at = Instant::now();
                let rules = serde_json::json!({ "drop": 0.1, "delay_ms": 20, "seed": self.seed }).to_string();
                (0..self.c.agents.len()).try_for_each(|i| self.net(i, &rules))?;
                self.serving(&writer, fault_at)?;
                if let Some((j, _)) = &job {
                    self.job_verdict(j, fault_at);
                }
                self.heal()?;
            }
            Drill::RollingRestartJob => {
                fault_at = Instant::now();
                for i in 0..self.c.agents.len() {
                    self.c.agents[i].sigterm(Duration::from_secs(15));
                    self.restart(i)?;
                    self.until("the restarted node back in the cluster", CONVERGE, |s| {
                        let ms = s.rt.block_on(async { client::members(&s.ch(i)?).await })?;
                        ensure!(ms.iter().all(|m| m.liveness == 1), "not all alive yet");
                        Ok(())
                    })?;
                }
                self.serving(&writer, fault_at)?;
                if let Some((j, _)) = &job {
                    self.job_verdict(j, fault_at);
                }
            }
            Drill::FullRestart => {
                let before = writer.stop();
                for a in &mut self.c.agents {
                    a.kill9();
                }
                for i in 0..self.c.agents.len() {
                    self.start(i, &[]);
                }
                // Measured from the last process start (the target: serving ≤ 2 s after it).
                fault_at = Instant::now();
                let writer = self.writer(1_000_000);
                self.serving(&writer, fault_at)?;
                writer.wait_acks(3, READY)?;
                let after = writer.stop();
                let mut all = before;
                all.acked.extend(after.acked);
                return self.finish(all, None);
            }
            Drill::TwoNodesLost => {
                // Five nodes keep three voters (two learners): the leader and a learner die at once,
                // so the surviving voters keep a quorum, elect, and promote a learner to replace the
                // dead voter. Losing two of three voters would be quorum loss, which no Raft survives.
                let via = job.as_ref().map_or(leader, |(_, v)| *v);
                let other = self.learner(leader, &[via])?;
                fault_at = Instant::now();
                self.c.agents[leader].kill9();
                self.c.agents[other].kill9();
                self.serving(&writer, fault_at)?;
                if let Some((j, _)) = &job {
                    self.job_verdict(j, fault_at);
                }
                self.restart(leader)?;
                self.restart(other)?;
            }
            Drill::FsyncFailFollower => {
                let f = self.follower(leader, &[]);
                fault_at = Instant::now();
                self.failpoint(f, failpoints::RAFT_PERSIST_BEFORE, "return")?;
                let agent = &mut self.c.agents[f];
                poll("the follower to stop after its fsync failed", Duration::from_secs(20), || {
                    if agent.is_running() { Err("still running".into()) } else { Ok(()) }
                })
                .map_err(anyhow::Error::msg)?;
                let log = std::fs::read_to_string(&self.c.agents[f].log).unwrap_or_default();
                self.checks.push(Check::new(
                    "follower_stopped_on_fsync_failure",
                    log.contains("injected fsync failure"),
                    format!(
                        "{} exited; its log names the injected failure: {}",
                        self.c.agents[f].name,
                        log.contains("injected fsync failure")
                    ),
                ));
                self.serving(&writer, fault_at)?;
                self.c.agents[f].kill9();
                self.restart(f)?;
            }
        }
        writer.wait_acks(writer.acked() + 3, READY).context("writes after recovery")?;
        let log = writer.stop();
        self.finish(log, job.map(|(j, _)| j.id))
    }

    /// Configures failpoint `name` with `action` on node `i`, or says how to build a `quiver`
    /// that has failpoints.
    fn failpoint(&self, i: usize, name: &str, action: &str) -> Result<()> {
        match self.c.agents[i].http_get("/chaos/failpoints") {
            Ok((200, _)) => {}
            other => bail!(
                "this quiver was built without the `failpoints` feature (GET /chaos/failpoints: {other:?}); \
                 build with `cargo build --release -p quiver --features failpoints` (`cargo xtask chaos` does)"
            ),
        }
        match self.c.agents[i].http("PUT", &format!("/chaos/failpoints/{name}"), action) {
            Ok((200, _)) => Ok(()),
            other => bail!("PUT failpoint {name}={action} on {}: {other:?}", self.c.agents[i].name),
        }
    }

    /// The checks of the failpoint drills, from the master's log and the job's record.
    /// [`Drill::CheckpointFailJob`]: the job's checkpoint writes failed, and every epoch after
    /// the worker's loss was mastered from no checkpoint (a failed write is never resumed from).
    /// [`Drill::TransferFailJob`]: copies to other nodes failed, the master stayed the job's only
    /// holder, and the later epochs resumed from its own checkpoint.
    fn failpoint_verdicts(&mut self, drill: Drill, master: usize, job: u64) {
        let name = self.c.agents[master].name.clone();
        let log = std::fs::read_to_string(&self.c.agents[master].log).unwrap_or_default();
        let tag = format!("job={job} ");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&tag)).collect();
        let later: Vec<&str> =
            lines.iter().copied().filter(|l| l.contains("mastering job") && !l.contains("epoch=1 ")).collect();
        let resumed = |l: &&str| l.contains("resume_from");
        match drill {
            Drill::CheckpointFailJob => {
                let failed = lines.iter().filter(|l| l.contains("checkpoint not written")).count();
                self.checks.push(Check::new(
                    "checkpoint_writes_failed",
                    failed > 0,
                    format!("{name}'s log: {failed} checkpoint writes of job {job} failed"),
                ));
                self.checks.push(Check::new(
                    "later_epochs_start_over",
                    !later.is_empty() && !later.iter().any(resumed),
                    format!("{name}'s later epochs: {later:?}"),
                ));
            }
            Drill::TransferFailJob => {
                let failed = log.lines().filter(|l| l.contains(failpoints::JOB_TRANSFER)).count();
                self.checks.push(Check::new(
                    "copies_failed",
                    failed > 0,
                    format!("{name}'s log: {failed} lines name a failed copy"),
                ));
                let holders = self.rt.block_on(async { client::job(&self.ch(master)?, job).await }).map(|j| j.holders);
                self.checks.push(Check::new(
                    "master_only_holder",
                    holders.as_ref().is_ok_and(|h| h.len() == 1),
                    format!("job {job}'s holders: {holders:?}"),
                ));
                self.checks.push(Check::new(
                    "later_epochs_resume_from_checkpoint",
                    !later.is_empty() && later.iter().all(resumed),
                    format!("{name}'s later epochs: {later:?}"),
                ));
            }
            _ => {}
        }
    }

    /// Records fault → first acknowledgement of a write issued after the fault.
    fn serving(&mut self, writer: &Writer, fault_at: Instant) -> Result<()> {
        let t = writer.first_ack_issued_after(fault_at, Duration::from_secs(60))?;
        self.serving_ms = Some(t.duration_since(fault_at).as_secs_f64() * 1e3);
        Ok(())
    }

    /// The common verdicts: writes exactly once, one leader per term, membership converged.
    fn finish(&mut self, log: WriterLog, job: Option<u64>) -> Result<usize> {
        let conv = self.converged(CONVERGE);
        self.checks.push(Check::new(
            "membership_converged",
            conv.is_ok(),
            conv.as_ref()
                .map_or_else(|e| format!("{e:#}"), |()| format!("{} members alive, one leader", self.c.agents.len())),
        ));
        // Every node must list every acknowledged write exactly once. A node's list is its own
        // applied state, so one that was stalled or cut off may still be catching up: allow it
        // a bounded time, then report the first node that still disagrees.
        let client = self.client;
        // The disagreement seen last, with a node's full listing if one agreed.
        let mut last: Option<(Check, Vec<_>)> = None;
        let agreed = poll("every node to list every acknowledged write once", Duration::from_secs(15), || {
            let mut bad: Option<Check> = None;
            let mut good: Option<(Check, Vec<_>)> = None;
            for i in 0..self.c.agents.len() {
                let name = &self.c.agents[i].name;
                match self.rt.block_on(async { client::jobs(&self.ch(i)?).await }) {
                    Err(e) => {
                        bad.get_or_insert(Check::new(
                            "acknowledged_writes_exactly_once",
                            false,
                            format!("{name}: listing jobs: {e:#}"),
                        ));
                    }
                    Ok(jobs) => {
                        let mine: Vec<(u64, u64)> = jobs
                            .iter()
                            .filter_map(|j| {
                                j.spec.as_ref().filter(|s| s.client_id == client).map(|s| (s.client_seq, j.job_id))
                            })
                            .collect();
                        let mut c = verdict::acknowledged_exactly_once(&log.acked, &mine);
                        if c.ok {
                            c.evidence = format!("every node: {}", c.evidence);
                            good.get_or_insert((c, jobs));
                        } else {
                            c.evidence = format!("{name}: {}", c.evidence);
                            bad.get_or_insert(c);
                        }
                    }
                }
            }
            match (bad, good) {
                (Some(b), g) => {
                    let evidence = b.evidence.clone();
                    last = Some((b, g.map(|(_, j)| j).unwrap_or_default()));
                    Err(evidence)
                }
                (None, agreed) => Ok(agreed),
            }
        });
        let (check, listed) = match agreed {
            Ok(Some(agreed)) => agreed,
            Ok(None) => bail!("no node to list jobs from"),
            Err(_) => last.expect("every timed-out attempt recorded its disagreement"),
        };
        self.checks.push(check);
        if let Some(id) = job {
            let n = listed.iter().filter(|j| j.job_id == id).count();
            self.checks.push(Check::new("job_listed_once", n == 1, format!("job {id} listed {n} times")));
        }
        let leaders: Vec<(String, String)> = self
            .c
            .agents
            .iter()
            .map(|a| (a.name.clone(), std::fs::read_to_string(a.data_dir.join("leaders.log")).unwrap_or_default()))
            .collect();
        self.checks.push(verdict::one_leader_per_term(&leaders));
        Ok(log.acked.len())
    }
}

/// Runs `quiver ARGS` in `dir`: (success, stdout, stderr).
fn quiver(bin: &Path, dir: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = std::process::Command::new(bin).args(args).current_dir(dir).output().context("spawning quiver")?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into()))
}

/// What the write stream recorded.
#[derive(Debug, Default, Clone)]
struct WriterLog {
    /// seq → acknowledged job id.
    acked: BTreeMap<u64, u64>,
    /// (issued, acknowledged) per acknowledged write.
    times: Vec<(Instant, Instant)>,
}

/// A stream of control-plane writes (tiny job submits with client-chosen request ids), one at a
/// time, on its own thread: each write goes to every node at once and is retried with the same id
/// until one acknowledges it or 30 s pass.
struct Writer {
    log: Arc<Mutex<WriterLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(addrs: Vec<String>, tls: PathBuf, client: u64, first_seq: u64) -> Writer {
        let log = Arc::new(Mutex::new(WriterLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            let _rt = rt.enter();
            let chans: Vec<Channel> =
                addrs.iter().filter_map(|a| client::channel(a, &tls, Duration::from_secs(2)).ok()).collect();
            let mut seq = first_seq;
            while !s.load(Ordering::Relaxed) {
                let issued = Instant::now();
                let give_up = issued + Duration::from_secs(30);
                loop {
                    if s.load(Ordering::Relaxed) || Instant::now() > give_up {
                        break;
                    }
                    // Hedged: the same request id to every node at once, the first answer wins.
                    // A dead or stalled node cannot delay the write, and the duplicates exercise
                    // the idempotence that "exactly once" relies on.
                    let acked = rt.block_on(async {
                        let mut set = tokio::task::JoinSet::new();
                        for ch in &chans {
                            let ch = ch.clone();
                            set.spawn(async move { client::submit_tiny(&ch, client, seq).await });
                        }
                        while let Some(r) = set.join_next().await {
                            if let Ok(Ok(id)) = r {
                                return Some(id);
                            }
                        }
                        None
                    });
                    if let Some(id) = acked {
                        let mut g = l.lock().unwrap_or_else(|e| e.into_inner());
                        g.acked.insert(seq, id);
                        g.times.push((issued, Instant::now()));
                        break;
                    }
                    std::thread::sleep(WRITE_RETRY_AFTER);
                }
                seq += 1;
                std::thread::sleep(WRITE_EVERY);
            }
        });
        Writer { log, stop, thread: Some(thread) }
    }

    fn acked(&self) -> usize {
        self.log.lock().map_or(0, |g| g.acked.len())
    }

    fn wait_acks(&self, n: usize, within: Duration) -> Result<()> {
        poll(&format!("{n} acknowledged writes"), within, || {
            let got = self.acked();
            if got >= n { Ok(()) } else { Err(format!("{got} so far")) }
        })
        .map_err(anyhow::Error::msg)
    }

    /// When the first write issued at or after `t` was acknowledged (the writer records the
    /// acknowledgement's own time, so the polling interval does not blur it).
    fn first_ack_issued_after(&self, t: Instant, within: Duration) -> Result<Instant> {
        poll("the acknowledgement of a write issued after the fault", within, || {
            self.log
                .lock()
                .ok()
                .and_then(|g| g.times.iter().filter(|(i, _)| *i >= t).map(|(_, a)| *a).min())
                .ok_or_else(|| "none yet".to_string())
        })
        .map_err(anyhow::Error::msg)
    }

    fn stop(mut self) -> WriterLog {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.log.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

//! The measuring code behind `quiver bench raft`: disk-backed commit latency of a 3-replica
//! cluster in one process, simulated failover times over seeds, placement and re-placement time of
//! the load balancer, and snapshot + restart time of a large state.
//!
//! This is a driver, so unlike the core it reads the clock: each replica runs on its own thread
//! (as it would on its own machine) with in-memory links between them, and its own raft-engine
//! directory, fsynced on every write.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use quiver_coordinator::scheduler::{self, Node, Part, PlaceOptions};
use quiver_coordinator::state::{JobSpec, PartitionShape};
use quiver_coordinator::{
    Command, CoordinatorCore, CoreConfig, DetRng, DiskStore, DiskStoreConfig, LogStore, MemberInfo, NodeId, Op,
    RequestId, bootstrap,
};

use crate::raft_sim::failover_time;

/// What to measure.
#[derive(Debug, Clone)]
pub struct RaftBenchOptions {
    /// Seeds for the simulated failover.
    pub seeds: u64,
    /// Commits timed (after a warm-up).
    pub commits: usize,
    /// Directory for the replicas' logs (a fresh temporary one under it is used and removed).
    pub dir: PathBuf,
    /// Partitions and nodes for the placement measurement.
    pub partitions: usize,
    /// Nodes for the placement measurement.
    pub nodes: usize,
    /// Jobs in the state that is snapshotted and restarted.
    pub jobs: usize,
}

impl Default for RaftBenchOptions {
    fn default() -> Self {
        RaftBenchOptions {
            seeds: 500,
            commits: 2000,
            dir: std::env::temp_dir(),
            partitions: 10_000,
            nodes: 1_000,
            jobs: 10_000,
        }
    }
}

/// The results, all times in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct RaftBenchReport {
    /// Median propose-to-applied latency on the leader, 3 replicas, fsync on every write.
    pub commit_median_ms: f64,
    /// 99th percentile of the same.
    pub commit_p99_ms: f64,
    /// Commits timed.
    pub commits: usize,
    /// Median simulated time from the leader's crash to a new leader.
    pub sim_failover_median_ms: f64,
    /// Worst of the same.
    pub sim_failover_max_ms: f64,
    /// Seeds simulated.
    pub seeds: u64,
    /// Placing `partitions` partitions on `nodes` nodes.
    pub placement_ms: f64,
    /// Re-placing after one node's loss.
    pub replacement_ms: f64,
    /// Partitions that moved in the re-placement.
    pub replacement_moved: usize,
    /// Taking and persisting a snapshot of `jobs` jobs, then reopening the store and the core.
    pub restart_ms: f64,
    /// Of which: the snapshot (encode + fsynced write + compaction).
    pub snapshot_ms: f64,
    /// Size of that snapshot.
    pub snapshot_bytes: usize,
    /// Jobs in the restarted state.
    pub jobs: usize,
    /// Partitions placed.
    pub partitions: usize,
    /// Nodes placed onto.
    pub nodes: usize,
}

impl RaftBenchReport {
    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        format!(
            concat!(
                "{{\"commit_median_ms\":{:.4},\"commit_p99_ms\":{:.4},\"commits\":{},",
                "\"sim_failover_median_ms\":{:.1},\"sim_failover_max_ms\":{:.1},\"seeds\":{},",
                "\"placement_ms\":{:.3},\"replacement_ms\":{:.4},\"replacement_moved\":{},",
                "\"restart_ms\":{:.3},\"snapshot_ms\":{:.3},\"snapshot_bytes\":{},\"jobs\":{},",
                "\"partitions\":{},\"nodes\":{}}}"
            ),
            self.commit_median_ms,
            self.commit_p99_ms,
            self.commits,
            self.sim_failover_median_ms,
            self.sim_failover_max_ms,
            self.seeds,
            self.placement_ms,
            self.replacement_ms,
            self.replacement_moved,
            self.restart_ms,
            self.snapshot_ms,
            self.snapshot_bytes,
            self.jobs,
            self.partitions,
            self.nodes,
        )
    }
}

/// A benchmark step that failed.
#[derive(Debug, thiserror::Error)]
pub enum RaftBenchError {
    /// Setting up or using a log store failed.
    #[error("raft bench: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> RaftBenchError + '_ {
    move |e| RaftBenchError::Setup(format!("{what}: {e}"))
}

/// Runs every measurement.
pub fn run(opts: &RaftBenchOptions) -> Result<RaftBenchReport, RaftBenchError> {
    let base = scratch_dir(&opts.dir)?;
    let commits = commit_latencies(&base.join("commit"), opts.commits);
    let restart = restart_time(&base.join("restart"), opts.jobs);
    let _ = std::fs::remove_dir_all(&base);
    let mut commits = commits?;
    let (snapshot_ms, restart_ms, snapshot_bytes) = restart?;
    commits.sort_by(f64::total_cmp);
    let mut failovers: Vec<f64> =
        (0..opts.seeds).map(|seed| failover_time(seed).map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e3)).collect();
    failovers.sort_by(f64::total_cmp);
    let (placement_ms, replacement_ms, replacement_moved) = placement_times(opts.partitions, opts.nodes);
    Ok(RaftBenchReport {
        commit_median_ms: percentile(&commits, 0.5),
        commit_p99_ms: percentile(&commits, 0.99),
        commits: commits.len(),
        sim_failover_median_ms: percentile(&failovers, 0.5),
        sim_failover_max_ms: failovers.last().copied().unwrap_or(0.0),
        seeds: opts.seeds,
        placement_ms,
        replacement_ms,
        replacement_moved,
        restart_ms,
        snapshot_ms,
        snapshot_bytes,
        jobs: opts.jobs,
        partitions: opts.partitions,
        nodes: opts.nodes,
    })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn scratch_dir(parent: &Path) -> Result<PathBuf, RaftBenchError> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = parent.join(format!("quiver-bench-raft-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(setup("creating the scratch directory"))?;
    Ok(dir)
}

fn member(id: NodeId) -> MemberInfo {
    MemberInfo {
        id,
        peer_addr: format!("127.0.0.{id}:7400"),
        control_addr: format!("127.0.0.{id}:7401"),
        cores: 2,
        memory_bytes: 8 << 30,
    }
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

enum Input {
    Peer { from: NodeId, bytes: Vec<u8> },
    Propose { command: Command, reply: Sender<()> },
    Stop,
}

/// One replica's event loop: the shape of the daemon's driver, minus QUIC.
fn replica(
    core: &mut CoordinatorCore<DiskStore>,
    store: &DiskStore,
    inbox: &Receiver<Input>,
    peers: &[(NodeId, Sender<Input>)],
    leader: &AtomicU64,
) {
    let start = Instant::now();
    let tick = Duration::from_millis(10);
    let mut next_tick = start;
    let mut waiting: Vec<(RequestId, Sender<()>)> = Vec::new();
    loop {
        let timeout = next_tick.saturating_duration_since(Instant::now());
        let mut inputs = Vec::new();
        match inbox.recv_timeout(timeout) {
            Ok(input) => inputs.push(input),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        inputs.extend(inbox.try_iter());
        for input in inputs {
            match input {
                Input::Peer { from, bytes } => {
                    let _ = core.step(from, &bytes);
                }
                Input::Propose { command, reply } => {
                    if core.propose(&command).is_ok() {
                        waiting.push((command.request, reply));
                    }
                }
                Input::Stop => return,
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            core.tick(now - start);
            for &(id, _) in peers {
                core.heartbeat(id, now - start);
            }
            next_tick = now + tick;
        }
        let me = core.id();
        let send = |msgs: Vec<quiver_coordinator::Outbound>| {
            for m in msgs {
                if let Some((_, tx)) = peers.iter().find(|(id, _)| *id == m.to) {
                    let _ = tx.send(Input::Peer { from: me, bytes: m.bytes });
                }
            }
        };
        while let Some(fx) = core.ready() {
            send(fx.messages);
            if store.persist(&fx.persist).is_err() {
                return;
            }
            send(fx.messages_after_persist);
            core.persisted(fx.ticket);
            for a in fx.applied {
                if let Some(i) = waiting.iter().position(|(r, _)| *r == a.command.request) {
                    let (_, reply) = waiting.swap_remove(i);
                    let _ = reply.send(());
                }
            }
        }
        if core.is_leader() {
            leader.store(core.id(), Ordering::Release);
        }
    }
}

/// Propose-to-applied latency on the leader of a 3-replica disk-backed cluster.
fn commit_latencies(dir: &Path, commits: usize) -> Result<Vec<f64>, RaftBenchError> {
    let members: Vec<MemberInfo> = (1..=3).map(member).collect();
    let leader = Arc::new(AtomicU64::new(0));
    let channels: Vec<(NodeId, Sender<Input>, Receiver<Input>)> = members
        .iter()
        .map(|m| {
            let (tx, rx) = mpsc::channel();
            (m.id, tx, rx)
        })
        .collect();
    let senders: Vec<(NodeId, Sender<Input>)> = channels.iter().map(|(id, tx, _)| (*id, tx.clone())).collect();
    let mut handles = Vec::new();
    for (id, _, rx) in channels {
        let store =
            DiskStore::open(&DiskStoreConfig::new(dir.join(format!("n{id}")))).map_err(setup("opening a log"))?;
        bootstrap(&store, &members).map_err(setup("bootstrapping"))?;
        let mut core =
            CoordinatorCore::open(CoreConfig::new(id), store.clone(), &logger()).map_err(setup("opening a core"))?;
        let peers: Vec<(NodeId, Sender<Input>)> = senders.iter().filter(|(p, _)| *p != id).cloned().collect();
        let leader = Arc::clone(&leader);
        handles.push(thread::spawn(move || replica(&mut core, &store, &rx, &peers, &leader)));
    }
    // No leader within the time is reported just below.
    let _ = crate::agents::poll("a leader", Duration::from_secs(10), || {
        if leader.load(Ordering::Acquire) == 0 { Err("none yet".into()) } else { Ok(()) }
    });
    let result = (|| {
        let id = leader.load(Ordering::Acquire);
        let tx = senders
            .iter()
            .find(|(p, _)| *p == id)
            .map(|(_, tx)| tx.clone())
            .ok_or_else(|| RaftBenchError::Setup("no leader elected within 10 s".into()))?;
        let warmup = 100;
        let mut latencies = Vec::with_capacity(commits);
        for seq in 1..=(warmup + commits) as u64 {
            let (reply, done) = mpsc::channel();
            let command = Command {
                request: RequestId { client: 1, seq },
                op: Op::SetServingSlots { node: 1, slots: seq as u32 },
            };
            let t0 = Instant::now();
            tx.send(Input::Propose { command, reply }).map_err(setup("proposing"))?;
            done.recv_timeout(Duration::from_secs(5)).map_err(setup("waiting for a commit"))?;
            if seq > warmup as u64 {
                latencies.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(latencies)
    })();
    for (_, tx) in &senders {
        let _ = tx.send(Input::Stop);
    }
    for h in handles {
        let _ = h.join();
    }
    result
}

/// Snapshot of a state with `jobs` jobs (fsynced, log compacted), then reopen store and core.
/// Returns (snapshot ms, snapshot + restart ms, snapshot bytes).
fn restart_time(dir: &Path, jobs: usize) -> Result<(f64, f64, usize), RaftBenchError> {
    let config = DiskStoreConfig::new(dir);
    let store = DiskStore::open(&config).map_err(setup("opening a log"))?;
    bootstrap(&store, &[member(1)]).map_err(setup("bootstrapping"))?;
    let mut cfg = CoreConfig::new(1);
    cfg.snapshot_every = u64::MAX / 2;
    let mut core = CoordinatorCore::open(cfg.clone(), store.clone(), &logger()).map_err(setup("opening a core"))?;
    let settle = |core: &mut CoordinatorCore<DiskStore>| -> Result<(), RaftBenchError> {
        while let Some(fx) = core.ready() {
            store.persist(&fx.persist).map_err(setup("persisting"))?;
            core.persisted(fx.ticket);
        }
        Ok(())
    };
    let mut now = Duration::ZERO;
    while !core.is_leader() && now < Duration::from_secs(10) {
        now += Duration::from_millis(10);
        core.tick(now);
        settle(&mut core)?;
    }
    for batch in 0..jobs.div_ceil(500) {
        for i in batch * 500..((batch + 1) * 500).min(jobs) {
            let spec = JobSpec {
                name: format!("job-{i}"),
                kernel: "pagerank".into(),
                params: vec![],
                iterations: 20,
                feature_width: 1,
                partitions: vec![PartitionShape { vertices: 1 << 16, edges: 1 << 20 }; 8],
                holders: vec![],
            };
            let command = Command {
                request: RequestId { client: 7, seq: i as u64 + 1 },
                op: Op::Submit { spec, graph_digest: [i as u8; 32] },
            };
            core.propose(&command).map_err(setup("proposing"))?;
        }
        settle(&mut core)?;
    }
    let t0 = Instant::now();
    let snap = core.snapshot_now();
    let bytes = snap.data.len();
    let applied = core.state().applied_index;
    let batch =
        quiver_coordinator::Persist { checkpoint: Some(snap), compact_to: applied, sync: true, ..Default::default() };
    store.persist(&batch).map_err(setup("writing the snapshot"))?;
    let snapshot_ms = t0.elapsed().as_secs_f64() * 1e3;
    let expected = core.state().jobs.len();
    drop(core);
    drop(store);
    let store = DiskStore::open(&config).map_err(setup("reopening the log"))?;
    let mut core = CoordinatorCore::open(cfg, store.clone(), &logger()).map_err(setup("reopening the core"))?;
    while let Some(fx) = core.ready() {
        store.persist(&fx.persist).map_err(setup("persisting"))?;
        core.persisted(fx.ticket);
    }
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    if core.state().jobs.len() != expected {
        return Err(RaftBenchError::Setup(format!("restart lost jobs: {} of {expected}", core.state().jobs.len())));
    }
    Ok((snapshot_ms, total_ms, bytes))
}

/// (placement ms, re-placement ms after one node's loss, partitions moved).
fn placement_times(partitions: usize, nodes: usize) -> (f64, f64, usize) {
    let mut rng = DetRng::new(42);
    let mut cluster: Vec<Node> = (0..nodes as NodeId)
        .map(|i| Node { id: i + 1, speed: 1e8 * (1.0 + rng.below(8) as f64), memory: 64 << 30, alive: true, busy: 0.0 })
        .collect();
    let parts: Vec<Part> = (0..partitions)
        .map(|_| Part {
            work: 1e6 * (1.0 + rng.below(1000) as f64),
            memory: (1 << 20) * (1 + rng.below(64)),
            holders: vec![rng.below(nodes as u64) + 1],
        })
        .collect();
    let opts = PlaceOptions::default();
    let t0 = Instant::now();
    let placement = scheduler::place(&parts, &cluster, &opts).unwrap_or_default();
    let placement_ms = t0.elapsed().as_secs_f64() * 1e3;
    let victim = placement.first().copied().unwrap_or(1);
    if let Some(n) = cluster.iter_mut().find(|n| n.id == victim) {
        n.alive = false;
    }
    let t0 = Instant::now();
    let replaced = scheduler::replace(&placement, &parts, &cluster, &opts).unwrap_or_default();
    let replacement_ms = t0.elapsed().as_secs_f64() * 1e3;
    let moved = placement.iter().zip(&replaced).filter(|(a, b)| a != b).count();
    (placement_ms, replacement_ms, moved)
}

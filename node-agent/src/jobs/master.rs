//! The job master: cuts the graph, hands partitions to their owners, runs the superstep barrier,
//! takes checkpoints and assembles the result.
//!
//! # Checkpoints and resuming
//!
//! Every so many supersteps (a fixed `K`, or by default whenever about
//! [`MasterJob::checkpoint_seconds`] of supersteps have passed since the last one) the master
//! asks every owner for a snapshot of the iterate it just computed, and hands the set — one
//! snapshot per partition plus the iterate's exact combined partials — to the caller's
//! checkpoint channel, which stores it and records it in Raft. A master started with
//! [`MasterJob::resume`] sends each owner its partition *and* its snapshot; owners restore it,
//! exchange halos once, and the barrier continues from that superstep with the stored partials.
//! Because the snapshot holds the exact iterate and the partials are exact, the resumed run
//! produces the undisturbed run's bits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use quiver_compute::kernels::Stop;
use quiver_compute::kernels::superstep::{Globals, Partials};
use quiver_compute::{AlignedBytes, Csr, Segment};
use quiver_proto::peer::{JobMessage, JobPlan, StepGo, StreamHeader, StreamKind, job_message};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::owner::{Snapshot, ToMaster, ToOwner, run_owner};
use super::wire::{OwnedPart, partials_from_wire};
use super::{JobKey, JobRuntime, KernelSpec, PartKey};
use crate::transport::{NodeId, PeerRecvStream, PeerSendStream};

/// Everything a master needs to run one epoch of a job.
#[derive(Debug, Clone)]
pub struct MasterJob {
    pub key: JobKey,
    pub graph: Arc<Csr>,
    pub graph_digest: [u8; 32],
    pub kernel: KernelSpec,
    /// APPNP: the whole feature matrix (`vertices × width`); owners get views of their rows.
    pub features: Option<Segment<f32>>,
    pub stop: Stop,
    /// The owner of each partition; its length is the partition count.
    pub owners: Vec<NodeId>,
    /// Checkpoint after every `K` supersteps; `None` chooses by time ([`Self::checkpoint_seconds`]).
    pub checkpoint_every: Option<u32>,
    /// With `checkpoint_every` unset: take a checkpoint once this much superstep time has passed
    /// since the last one (0 disables checkpoints).
    pub checkpoint_seconds: f64,
    /// Start from this checkpoint instead of the initial iterate.
    pub resume: Option<Checkpoint>,
}

/// A consistent cut of a job: every partition's state after `step`, and that iterate's combined
/// partials.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub step: u32,
    pub partials: Partials,
    /// By partition index.
    pub parts: Vec<Snapshot>,
}

/// A checkpoint whose every part is in the [`CheckpointSink`]: the iterate after `step` and its
/// combined partials (the parts themselves are the sink's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointTaken {
    pub step: u32,
    pub partials: Partials,
}

/// Where a master's checkpoints go: each part into `sink` as it arrives, then a note on `taken`.
#[derive(Clone)]
pub struct CheckpointOut {
    pub sink: Arc<dyn CheckpointSink>,
    pub taken: mpsc::UnboundedSender<CheckpointTaken>,
}

/// Where a master puts each partition's part of a checkpoint as it arrives, so that no part sits
/// whole in the master's memory: a remote owner's part comes in pieces, each stored before the
/// next is read (QUIC flow control holds the owner back meanwhile). The agent writes files in its
/// data directory; [`MemorySink`] keeps parts in memory. The methods may block (file I/O): the
/// master calls them on tokio's blocking pool.
pub trait CheckpointSink: Send + Sync + 'static {
    /// Starts partition `partition`'s part of the checkpoint after `step`: `values` owned values
    /// follow, in order.
    fn begin(&self, step: u32, partition: u32, values: usize) -> Result<Box<dyn PartSink>, String>;
}

/// One partition's part of a checkpoint on its way into a [`CheckpointSink`].
pub trait PartSink: Send {
    /// The next owned values, in order.
    fn values(&mut self, values: &[f32]) -> Result<(), String>;
    /// The kernel's private state, after the last value; completes the part.
    fn finish(self: Box<Self>, aux: &[f32]) -> Result<(), String>;
}

/// A [`CheckpointSink`] that keeps every part in memory, for tests and for embedders without a
/// disk; [`MemorySink::checkpoint`] turns a taken checkpoint back into one a master can resume.
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    parts: Arc<Mutex<HashMap<(u32, u32), Snapshot>>>,
}

impl MemorySink {
    /// The checkpoint `taken` describes, if all its `partitions` parts are here.
    pub fn checkpoint(&self, taken: &CheckpointTaken, partitions: usize) -> Option<Checkpoint> {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let parts = (0..partitions as u32).map(|p| parts.get(&(taken.step, p)).cloned()).collect::<Option<_>>()?;
        Some(Checkpoint { step: taken.step, partials: taken.partials, parts })
    }
}

impl CheckpointSink for MemorySink {
    fn begin(&self, step: u32, partition: u32, values: usize) -> Result<Box<dyn PartSink>, String> {
        let part = MemoryPart { parts: self.parts.clone(), key: (step, partition), values: Vec::with_capacity(values) };
        Ok(Box::new(part))
    }
}

struct MemoryPart {
    parts: Arc<Mutex<HashMap<(u32, u32), Snapshot>>>,
    key: (u32, u32),
    values: Vec<f32>,
}

impl PartSink for MemoryPart {
    fn values(&mut self, values: &[f32]) -> Result<(), String> {
        self.values.extend_from_slice(values);
        Ok(())
    }

    fn finish(self: Box<Self>, aux: &[f32]) -> Result<(), String> {
        let snapshot = Snapshot { values: Segment::from_floats(self.values), aux: Segment::from_slice(aux) };
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).insert(self.key, snapshot);
        Ok(())
    }
}

/// Stores a snapshot held in memory (the master's own partition) through `sink`, off the async
/// threads; the snapshot's memory is freed once stored.
async fn store_snapshot(
    sink: &Arc<dyn CheckpointSink>,
    step: u32,
    partition: u32,
    snapshot: Snapshot,
) -> Result<(), String> {
    let sink = sink.clone();
    tokio::task::spawn_blocking(move || {
        let mut part = sink.begin(step, partition, snapshot.values.len())?;
        part.values(&snapshot.values)?;
        part.finish(&snapshot.aux)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Receives a remote owner's snapshot of `step` in pieces (the owner's side is in `owner.rs`:
/// frames of one `values` segment each, in order, then one `aux` frame marked last) and stores
/// each piece through `sink` before reading the next, so at most one piece is in memory.
/// `values` is the partition's owned value count; private state may hold at most as many.
async fn receive_snapshot(
    recv: &mut PeerRecvStream,
    sink: &Arc<dyn CheckpointSink>,
    step: u32,
    partition: u32,
    values: usize,
) -> Result<(), ToMaster> {
    let failed = |e: String| ToMaster::Failed(format!("snapshot of superstep {step}: {e}"));
    let sink2 = sink.clone();
    let mut part = tokio::task::spawn_blocking(move || sink2.begin(step, partition, values))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(failed)?;
    let (mut received, mut reuse): (usize, Option<AlignedBytes>) = (0, None);
    loop {
        let frame = recv
            .recv_frame_into(reuse.take())
            .await
            .map_err(|e| ToMaster::Lost(e.to_string()))?
            .ok_or_else(|| ToMaster::Lost(format!("the stream ended inside superstep {step}'s snapshot")))?;
        if frame.segment_count() != 1 {
            return Err(failed(format!("a piece with {} segments, expected one", frame.segment_count())));
        }
        let name = frame.segment_name(0).unwrap_or_default().to_string();
        let piece = frame.segment::<f32>(0).map_err(|e| failed(e.to_string()))?;
        let last = frame.header.last;
        match (name.as_str(), last) {
            ("values", false) if received + piece.len() <= values => received += piece.len(),
            ("values", _) => {
                return Err(failed(format!("more than the partition's {values} values, or values marked last")));
            }
            ("aux", true) if received == values && piece.len() <= values => {}
            ("aux", _) => {
                return Err(failed(format!("private state after {received} of {values} values, or too long")));
            }
            _ => return Err(failed(format!("a piece named {name:?}"))),
        }
        let (back, frame) = tokio::task::spawn_blocking(move || {
            let done = if last { part.finish(&piece).map(|()| None) } else { part.values(&piece).map(|()| Some(part)) };
            drop(piece);
            (done, frame)
        })
        .await
        .map_err(|e| failed(e.to_string()))?;
        match back.map_err(failed)? {
            Some(p) => part = p,
            None => return Ok(()),
        }
        reuse = frame.reclaim();
    }
}

/// Progress after one superstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub step: u32,
    pub residual: f32,
    /// Since the master started.
    pub elapsed_seconds: f64,
    /// The slowest owner's compute time in this step.
    pub compute_seconds: f64,
}

/// A finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterOutput {
    /// Each partition's `rows × width` values, in partition order: the result (`vertices × width`
    /// values in vertex order) is their concatenation. They stay apart so the master never holds
    /// an assembled second copy of a result as large as the graph's feature matrix.
    pub parts: Vec<Segment<f32>>,
    pub width: usize,
    pub iterations: u32,
    pub residual: f32,
}

impl MasterOutput {
    /// The parts as slices, in vertex order.
    pub fn slices(&self) -> Vec<&[f32]> {
        self.parts.iter().map(|p| &p[..]).collect()
    }

    /// The whole result in one vector (a copy; for small results and tests).
    pub fn to_vec(&self) -> Vec<f32> {
        self.slices().concat()
    }
}

/// Why a run stopped short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct MasterError {
    pub reason: String,
    /// A node or link was lost: the same job at a new epoch (from the last checkpoint) can
    /// succeed. Otherwise the input itself failed and a retry would fail again.
    pub retryable: bool,
}

impl MasterError {
    fn fatal(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), retryable: false }
    }
}

/// Runs the job to the end. Dropping the future (cancellation) stops every local owner and
/// closes every job stream, which stops the remote owners. Checkpoints go to `checkpoints`.
pub async fn run_master(
    rt: Arc<JobRuntime>,
    mut job: MasterJob,
    checkpoints: Option<CheckpointOut>,
    mut report: impl FnMut(StepReport) + Send,
) -> Result<MasterOutput, MasterError> {
    let started = Instant::now();
    let count = job.owners.len();
    if count == 0 {
        return Err(MasterError::fatal("the assignment has no partitions"));
    }
    if let Some(r) = &job.resume
        && r.parts.len() != count
    {
        return Err(MasterError::fatal(format!("the checkpoint has {} partitions, the job {count}", r.parts.len())));
    }
    let width = job.kernel.width();
    let alpha = quiver_compute::partition::default_alpha(count);
    let bounds = quiver_compute::partition::boundaries(&job.graph, count, alpha)
        .map_err(|e| MasterError::fatal(e.to_string()))?;
    let mut plan = job.kernel.to_plan(job.graph.vertices() as u64, &job.owners);
    if let Some(r) = &job.resume {
        plan.resume = true;
        plan.resume_step = r.step;
    }
    // A partition is a function of the graph and the boundaries, so an owner may still hold it
    // from an earlier job on this graph; one with feature rows belongs to this job alone.
    let keep = !job.kernel.ships_features();
    if keep {
        plan.graph_digest = job.graph_digest.to_vec();
    }
    plan.bounds = bounds.clone();
    let key_of = |index: usize| {
        keep.then_some(PartKey { graph: job.graph_digest, partitions: count as u32, index: index as u32 })
    };
    let me = rt.node();

    // Ask every remote owner at once whether it holds its partition; look in our own cache.
    let mut asking = JoinSet::new();
    for (p, &node) in job.owners.iter().enumerate() {
        if node != me {
            let link = RemoteLink {
                rt: rt.clone(),
                key: job.key,
                node,
                partition: p as u32,
                digest: job.graph_digest,
                plan: plan.clone(),
                sink: checkpoints.as_ref().map(|c| c.sink.clone()),
                values: (bounds[p + 1] - bounds[p]) as usize * width,
            };
            asking.spawn(async move {
                let opened = link.open().await;
                (link, opened)
            });
        }
    }
    let mut remote: Vec<Option<(RemoteLink, Result<Opened, ToMaster>)>> = (0..count).map(|_| None).collect();
    while let Some(done) = asking.join_next().await {
        let (link, opened) = done.map_err(|e| MasterError::fatal(e.to_string()))?;
        let p = link.partition as usize;
        remote[p] = Some((link, opened));
    }
    let mut kept: Vec<Option<Arc<OwnedPart>>> = (0..count)
        .map(|p| match (job.owners[p] == me, key_of(p)) {
            (true, Some(k)) => rt.partition_cache().get(&k),
            _ => None,
        })
        .collect();
    // A link that failed to open needs no frame: it reports its failure once running.
    let needs: Vec<bool> = (0..count)
        .map(|p| match &remote[p] {
            Some((_, Ok(o))) => !o.held,
            Some((_, Err(_))) => false,
            None => kept[p].is_none(),
        })
        .collect();
    let shipped = needs.iter().filter(|&&n| n).count();
    let asked_seconds = started.elapsed().as_secs_f64();
    let parts = if shipped > 0 {
        let (g, at) = (job.graph.clone(), bounds.clone());
        let cut = rt.workers().run(0, move || quiver_compute::partition::partition_at(&g, at)).await;
        Some(cut.map_err(|e| MasterError::fatal(e.to_string()))?)
    } else {
        None
    };
    let cut_seconds = started.elapsed().as_secs_f64();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, ToMaster)>();
    let mut links = JoinSet::new();
    let mut to_owner = Vec::with_capacity(count);
    // A features file's matrix (seeded features are generated by the owners instead) lives only
    // until every partition has its rows: remote owners' rows are views shipped and dropped by
    // their links, and the local owner gets its own copy (made on its workers), so no view pins
    // the matrix for the rest of the job.
    let all_features = job.features.take();
    for (p, link) in remote.iter_mut().enumerate() {
        let node = job.owners[p];
        let cut = parts.as_ref().filter(|_| needs[p]).map(|c| &c.parts[p]);
        let mut features = all_features.as_ref().map(|f| {
            let r = bounds[p] as usize..bounds[p + 1] as usize;
            f.slice(r.start * width..r.end * width)
        });
        if node == me
            && let Some(view) = features.take()
        {
            let copy = rt.workers().run(p, move || Segment::from_slice(&view)).await;
            features = Some(copy.map_err(|e| MasterError::fatal(e.to_string()))?);
        }
        let part = match (cut, kept[p].take()) {
            (Some(c), _) => Some(Arc::new(OwnedPart::from_partition(c, features))),
            (None, k) => k,
        };
        let resume = job.resume.as_ref().map(|r| (r.step, r.parts[p].clone()));
        let (otx, orx) = mpsc::unbounded_channel();
        to_owner.push(otx);
        let (owners, kernel) = (job.owners.clone(), job.kernel.clone());
        match (link.take(), part) {
            (None, Some(part)) => {
                let keep = key_of(p);
                links.spawn(run_owner(rt.clone(), job.key, part, kernel, owners, resume, orx, tx.clone(), keep));
            }
            (Some((link, opened)), part) => {
                links.spawn(link.run(opened, part, resume, orx, tx.clone()));
            }
            (None, None) => return Err(MasterError::fatal(format!("partition {p}: neither cut nor held"))),
        }
    }
    drop((parts, all_features));
    // Every partition is cut: the holder needs the whole graph again only to recover from a lost
    // node, so a mapped graph file leaves this process's memory until then.
    job.graph.release_resident();
    drop(tx);

    // Every owner reports once it holds its state: the iterate it starts from (resuming, empty
    // partials, the checkpoint's combined ones being the master's already).
    let got = collect(&mut rx, job.resume.as_ref().map_or(0, |r| r.step), &job.owners, None).await?;
    let init_seconds = got.slowest;
    let (mut iterations, mut residual, mut partials) = match &job.resume {
        Some(r) => (r.step, r.partials.residual, r.partials),
        None => (0, f32::INFINITY, got.partials),
    };
    tracing::info!(
        job = job.key.job,
        epoch = job.key.epoch,
        asked_seconds,
        cut_seconds,
        shipped,
        init_seconds,
        ready_seconds = started.elapsed().as_secs_f64(),
        "every owner holds its partition (asked: every owner answered whether it holds its partition; cut: that and the cut; shipped: partitions cut and sent, the others were kept from an earlier job; init: the slowest owner's state and kernel set-up)"
    );
    let mut since_checkpoint = 0f64;
    let (steps_started, mut slowest_sum) = (Instant::now(), 0f64);
    while iterations < job.stop.max_iterations && !job.stop.tolerance.is_some_and(|t| residual <= t) {
        let step = iterations + 1;
        let checkpoint = checkpoints.is_some()
            && match job.checkpoint_every {
                Some(k) => k > 0 && step % k == 0,
                None => job.checkpoint_seconds > 0.0 && since_checkpoint >= job.checkpoint_seconds,
            };
        let globals = Globals::new(partials, step);
        for o in &to_owner {
            let _ = o.send(ToOwner::Go { step, mass: globals.mass, checkpoint, last: step == job.stop.max_iterations });
        }
        let t = Instant::now();
        let sink = checkpoints.as_ref().filter(|_| checkpoint).map(|c| &c.sink);
        let got = collect(&mut rx, step, &job.owners, sink).await?;
        since_checkpoint += t.elapsed().as_secs_f64();
        slowest_sum += got.slowest;
        partials = got.partials;
        iterations = step;
        residual = partials.residual;
        if checkpoint && let Some(c) = &checkpoints {
            since_checkpoint = 0.0;
            let _ = c.taken.send(CheckpointTaken { step, partials });
        }
        report(StepReport {
            step,
            residual,
            elapsed_seconds: started.elapsed().as_secs_f64(),
            compute_seconds: got.slowest,
        });
    }
    tracing::info!(
        job = job.key.job,
        epoch = job.key.epoch,
        iterations,
        superstep_seconds = steps_started.elapsed().as_secs_f64(),
        slowest_compute_seconds = slowest_sum,
        "supersteps done"
    );

    // The owners on this node finish first, and the others only once those have reported their
    // results: a local owner frees its state (iterates, features) before it reports, so here the
    // remote results, each as large as an owner's iterate, arrive in its place instead of on top
    // of it (their receive buffers fill far faster than the network delivers).
    let mut rows: Vec<Option<Segment<f32>>> = (0..count).map(|_| None).collect();
    for local in [true, false] {
        let finishing: Vec<usize> = (0..count).filter(|&p| (job.owners[p] == me) == local).collect();
        for &p in &finishing {
            let _ = to_owner[p].send(ToOwner::Finish);
        }
        let mut missing = finishing.len();
        while missing > 0 {
            let Some((p, msg)) = rx.recv().await else {
                return Err(lost("every partition link closed before the results arrived"));
            };
            let pi = p as usize;
            match msg {
                ToMaster::Result(r) if finishing.contains(&pi) => {
                    let want = (bounds[pi + 1] - bounds[pi]) as usize * width;
                    if r.len() != want {
                        return Err(MasterError::fatal(format!(
                            "partition {p} sent {} result values, expected {want}",
                            r.len()
                        )));
                    }
                    if rows[pi].replace(r).is_none() {
                        missing -= 1;
                    }
                }
                other => return Err(unexpected(p, other, &job.owners, "waiting for results")),
            }
        }
    }
    let parts = rows.into_iter().flatten().collect();
    links.shutdown().await;
    Ok(MasterOutput { parts, width, iterations, residual })
}

fn lost(reason: impl Into<String>) -> MasterError {
    MasterError { reason: reason.into(), retryable: true }
}

/// A message the barrier did not expect, as the error it means.
fn unexpected(p: u32, msg: ToMaster, owners: &[NodeId], when: &str) -> MasterError {
    let at = match owners.get(p as usize) {
        Some(node) => format!("partition {p} on {node}"),
        None => format!("partition {p}"),
    };
    match msg {
        ToMaster::Failed(reason) => MasterError::fatal(format!("{at}: {reason}")),
        ToMaster::Lost(reason) => lost(format!("{at}: {reason}")),
        ToMaster::Partials { step, .. } => MasterError::fatal(format!("{at} reported superstep {step} {when}")),
        ToMaster::Snapshot { step, .. } | ToMaster::SnapshotStored { step } => {
            MasterError::fatal(format!("{at} sent a snapshot of superstep {step} {when}"))
        }
        ToMaster::Result(_) => MasterError::fatal(format!("{at} sent its result {when}")),
    }
}

/// What the owners reported for one superstep.
struct Collected {
    partials: Partials,
    slowest: f64,
}

/// Waits for every partition's partials of `step` and, when `sink` is given (a checkpoint), for
/// its snapshot to be stored there: the local owner's arrives in memory and is stored here,
/// remote owners' are stored by their links as they arrive.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(u32, ToMaster)>,
    step: u32,
    owners: &[NodeId],
    sink: Option<&Arc<dyn CheckpointSink>>,
) -> Result<Collected, MasterError> {
    let count = owners.len();
    let mut seen = vec![false; count];
    let mut stored = vec![false; count];
    let (mut combined, mut slowest) = (Partials::default(), 0f64);
    let mut missing = if sink.is_some() { 2 * count } else { count };
    while missing > 0 {
        let Some((p, msg)) = rx.recv().await else {
            return Err(lost("every partition link closed mid-job"));
        };
        let mut snapshot_stored = |p: u32| match stored.get_mut(p as usize).filter(|s| !**s) {
            Some(slot) => {
                *slot = true;
                missing -= 1;
                Ok(())
            }
            None => Err(MasterError::fatal(format!("partition {p} sent superstep {step}'s snapshot twice"))),
        };
        match msg {
            ToMaster::Partials { step: s, partials, compute_seconds } if s == step => {
                let Some(slot) = seen.get_mut(p as usize).filter(|s| !**s) else {
                    return Err(MasterError::fatal(format!("partition {p} reported superstep {step} twice")));
                };
                *slot = true;
                missing -= 1;
                combined = combined.combine(partials);
                slowest = slowest.max(compute_seconds);
            }
            ToMaster::Snapshot { step: s, snapshot }
                if s == step
                    && let Some(sink) = sink =>
            {
                snapshot_stored(p)?;
                store_snapshot(sink, step, p, snapshot).await.map_err(|e| {
                    MasterError::fatal(format!("storing partition {p}'s snapshot of superstep {step}: {e}"))
                })?;
            }
            ToMaster::SnapshotStored { step: s } if s == step && sink.is_some() => snapshot_stored(p)?,
            other => return Err(unexpected(p, other, owners, &format!("while the job is at superstep {step}"))),
        }
    }
    Ok(Collected { partials: combined, slowest })
}

/// Carries one partition to a remote owner and relays messages both ways. Anything that goes
/// wrong is reported to the master as the partition's failure.
struct RemoteLink {
    rt: Arc<JobRuntime>,
    key: JobKey,
    node: NodeId,
    partition: u32,
    digest: [u8; 32],
    plan: JobPlan,
    /// Where checkpoint snapshots go (none: the job takes no checkpoints).
    sink: Option<Arc<dyn CheckpointSink>>,
    /// The partition's owned value count (rows × width), what a snapshot holds.
    values: usize,
}

/// A remote owner's job stream with the plan sent, and whether the owner holds its partition.
struct Opened {
    send: PeerSendStream,
    recv: PeerRecvStream,
    held: bool,
}

impl RemoteLink {
    /// Opens the job stream and sends the plan; when the plan names the graph's digest, waits
    /// for the owner's answer whether it holds the partition. Errors are what the link reports.
    async fn open(&self) -> Result<Opened, ToMaster> {
        let header = StreamHeader {
            kind: StreamKind::Job as i32,
            job_id: self.key.job,
            epoch: self.key.epoch,
            partition: self.partition,
            ..Default::default()
        };
        let lost = |e: String| ToMaster::Lost(format!("sending the plan to {}: {e}", self.node));
        let conn = self.rt.transport.connection(self.node).await.map_err(|e| lost(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi(header).await.map_err(|e| lost(e.to_string()))?;
        let plan = JobMessage { body: Some(job_message::Body::Plan(self.plan.clone())) };
        send.send_message(&plan).await.map_err(|e| lost(e.to_string()))?;
        if self.plan.graph_digest.is_empty() {
            return Ok(Opened { send, recv, held: false });
        }
        let held = match recv.recv_message::<JobMessage>().await.map_err(|e| lost(e.to_string()))? {
            Some(JobMessage { body: Some(job_message::Body::PartitionHeld(held)) }) => held,
            Some(JobMessage { body: Some(job_message::Body::Abort(reason)) }) => return Err(ToMaster::Failed(reason)),
            Some(_) => return Err(ToMaster::Failed("the owner answered the plan with something else".into())),
            None => return Err(lost("the owner closed the job stream".into())),
        };
        Ok(Opened { send, recv, held })
    }

    /// Sends the partition (unless the owner holds it) and the snapshot to resume from, then
    /// relays messages both ways until the result arrives or either side gives up.
    async fn run(
        self,
        opened: Result<Opened, ToMaster>,
        part: Option<Arc<OwnedPart>>,
        resume: Option<(u32, Snapshot)>,
        mut orx: mpsc::UnboundedReceiver<ToOwner>,
        tx: mpsc::UnboundedSender<(u32, ToMaster)>,
    ) {
        let p = self.partition;
        let node = self.node;
        let digest = self.digest;
        let sent = async {
            let Opened { mut send, recv, held } = opened?;
            let lost = |e: String| ToMaster::Lost(format!("sending the partition to {node}: {e}"));
            match (held, &part) {
                (true, _) => {}
                (false, Some(part)) => {
                    send.send_frame(&part.to_frame(&digest)).await.map_err(|e| lost(e.to_string()))?
                }
                (false, None) => return Err(ToMaster::Failed(format!("partition {p} was neither cut nor held"))),
            }
            if let Some((_, snapshot)) = &resume {
                send.send_frame(&snapshot.to_frame()).await.map_err(|e| lost(e.to_string()))?;
            }
            Ok::<_, ToMaster>((send, recv))
        };
        let (mut send, mut recv) = match sent.await {
            Ok(x) => x,
            Err(msg) => {
                let _ = tx.send((p, msg));
                return;
            }
        };
        drop((part, resume));
        let (sink, values) = (self.sink.clone(), self.values);
        let reader = {
            let tx = tx.clone();
            async move {
                loop {
                    let m = match recv.recv_message::<JobMessage>().await {
                        Ok(Some(m)) => m.body,
                        Ok(None) => return Err(ToMaster::Lost("the owner closed the job stream".into())),
                        Err(e) => return Err(ToMaster::Lost(e.to_string())),
                    };
                    let out = match m {
                        Some(job_message::Body::Partials(w)) => {
                            let (step, partials, compute_seconds) = partials_from_wire(&w).map_err(ToMaster::Failed)?;
                            ToMaster::Partials { step, partials, compute_seconds }
                        }
                        Some(job_message::Body::SnapshotFollows(step)) => {
                            let Some(sink) = &sink else {
                                return Err(ToMaster::Failed("a snapshot of a job without checkpoints".into()));
                            };
                            receive_snapshot(&mut recv, sink, step, p, values).await?;
                            ToMaster::SnapshotStored { step }
                        }
                        Some(job_message::Body::ResultFollows(_)) => {
                            let frame = recv
                                .recv_frame()
                                .await
                                .map_err(|e| ToMaster::Lost(e.to_string()))?
                                .ok_or_else(|| ToMaster::Lost("no result frame".into()))?;
                            let values =
                                frame.segment::<f32>(0).map_err(|e| ToMaster::Failed(format!("result frame: {e}")))?;
                            let _ = tx.send((p, ToMaster::Result(values)));
                            return Ok(());
                        }
                        Some(job_message::Body::Abort(reason)) => return Err(ToMaster::Failed(reason)),
                        Some(job_message::Body::Lost(reason)) => return Err(ToMaster::Lost(reason)),
                        _ => return Err(ToMaster::Failed("unexpected message from the owner".into())),
                    };
                    let _ = tx.send((p, out));
                }
            }
        };
        let writer = async move {
            while let Some(m) = orx.recv().await {
                let body = match m {
                    ToOwner::Go { step, mass, checkpoint, last } => {
                        job_message::Body::Go(StepGo { step, mass, checkpoint, last })
                    }
                    ToOwner::Finish => job_message::Body::Finish(true),
                };
                if let Err(e) = send.send_message(&JobMessage { body: Some(body) }).await {
                    return Err(ToMaster::Lost(e.to_string()));
                }
            }
            // The master is done with this partition (or gone): close our half.
            let _ = send.finish();
            std::future::pending::<Result<(), ToMaster>>().await
        };
        tokio::pin!(reader, writer);
        let outcome = tokio::select! {
            r = &mut reader => r,
            w = &mut writer => w,
        };
        if let Err(msg) = outcome {
            let _ = tx.send((p, msg));
        }
    }
}

//! A partition owner: steps its rows on the workers, exchanges halos, reports partials.

use std::sync::Arc;
use std::time::Instant;

use quiver_compute::buf::AlignedFloats;
use quiver_compute::kernels::superstep::{Globals, Kernel, Partials, PartitionState, PullScratch};
use quiver_compute::kernels::{Appnp, Normalization};
use quiver_compute::partition::LocalGraph;
use quiver_compute::{Segment, generate};
use quiver_proto::peer::{JobMessage, JobPlan, job_message};
use tokio::sync::mpsc;

use super::wire::{OwnedPart, partials_to_wire};
use super::{HaloSender, JobKey, JobRuntime, KernelSpec, PartKey};
use crate::transport::{InboundStream, NodeId, OutFrame};

/// What the master tells an owner.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ToOwner {
    /// Compute superstep `step` from the current iterate, whose combined mass is `mass`; with
    /// `checkpoint`, send a snapshot of the new iterate after the partials; `last`: no superstep
    /// follows, so no halo exchange either.
    Go { step: u32, mass: f64, checkpoint: bool, last: bool },
    /// Stop and send the result rows.
    Finish,
}

/// What an owner tells the master.
#[derive(Debug)]
pub(crate) enum ToMaster {
    Partials {
        step: u32,
        partials: Partials,
        compute_seconds: f64,
    },
    /// The partition's state after `step`, for a checkpoint.
    Snapshot {
        step: u32,
        snapshot: Snapshot,
    },
    /// A remote owner's snapshot of `step` is in the master's checkpoint sink (sent by the
    /// master's link, which stored it piece by piece).
    SnapshotStored {
        step: u32,
    },
    Result(Segment<f32>),
    /// The owner gave up (a compute or protocol error: retrying the same input fails again).
    Failed(String),
    /// The link to the owner broke (a node or connection was lost: another epoch may succeed).
    Lost(String),
}

/// One partition's state between supersteps: its owned values and the kernel's private state.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub values: Segment<f32>,
    pub aux: Segment<f32>,
}

/// Values per piece of a snapshot sent to the master (2 MiB): the master stores each piece
/// before it reads the next, so a checkpoint costs it about one piece of memory per remote owner
/// (8 MiB pieces left ~20 MiB more in the master's peak while checkpoints arrived and the
/// graph's copy went out; 2 MiB frames cost nothing measurable in throughput).
const SNAPSHOT_PIECE_VALUES: usize = 1 << 19;

impl Snapshot {
    /// The frames a snapshot travels to the master in (no copy): `values` in pieces of at most
    /// [`SNAPSHOT_PIECE_VALUES`], then `aux` in one frame marked last.
    pub(crate) fn to_pieces(&self) -> Vec<OutFrame> {
        let n = self.values.len();
        let mut frames: Vec<OutFrame> = (0..n)
            .step_by(SNAPSHOT_PIECE_VALUES)
            .map(|a| {
                let mut f = OutFrame::new(None);
                f.push("values", &self.values.slice(a..(a + SNAPSHOT_PIECE_VALUES).min(n)));
                f
            })
            .collect();
        let mut aux = OutFrame::new(None);
        aux.push("aux", &self.aux).set_last(true);
        frames.push(aux);
        frames
    }

    /// As a frame with segments `values` and `aux` (no copy).
    pub(crate) fn to_frame(&self) -> OutFrame {
        let mut f = OutFrame::new(None);
        f.push("values", &self.values).push("aux", &self.aux).set_last(true);
        f
    }

    /// From a frame of [`Snapshot::to_frame`].
    pub(crate) fn from_frame(frame: &crate::transport::InFrame) -> Result<Self, String> {
        if frame.segment_count() != 2 || frame.segment_name(0) != Some("values") || frame.segment_name(1) != Some("aux")
        {
            return Err("a snapshot frame holds exactly the segments values and aux".into());
        }
        let values = frame.segment::<f32>(0).map_err(|e| format!("snapshot: {e}"))?;
        let aux = frame.segment::<f32>(1).map_err(|e| format!("snapshot: {e}"))?;
        Ok(Self { values, aux })
    }
}

/// APPNP owning its partition's feature rows, so an owner task can hold it across awaits.
struct OwnedAppnp {
    alpha: f32,
    normalization: Normalization,
    dim: usize,
    base: u32,
    features: Segment<f32>,
}

impl OwnedAppnp {
    fn view(&self) -> Appnp<'_> {
        Appnp {
            alpha: self.alpha,
            normalization: self.normalization,
            features: &self.features,
            dim: self.dim,
            base: self.base,
            rows: None,
        }
    }
}

type AppnpPrepared = <Appnp<'static> as Kernel>::Prepared;

impl Kernel for OwnedAppnp {
    type Prepared = AppnpPrepared;

    fn width(&self) -> usize {
        self.dim
    }

    fn prepare(&self, g: &LocalGraph) -> AppnpPrepared {
        self.view().prepare(g)
    }

    fn aux_len(&self, g: &LocalGraph) -> usize {
        self.view().aux_len(g)
    }

    fn init(&self, g: &LocalGraph, prep: &AppnpPrepared, x: &mut [f32], aux: &mut Vec<f32>) -> Partials {
        self.view().init(g, prep, x, aux)
    }

    fn step(
        &self,
        g: &LocalGraph,
        prep: &AppnpPrepared,
        globals: &Globals,
        x: &[f32],
        next: &mut [f32],
        aux: &mut [f32],
        scratch: &mut PullScratch,
    ) -> Partials {
        self.view().step(g, prep, globals, x, next, aux, scratch)
    }

    fn finish(&self, x: Segment<f32>, aux: Vec<f32>) -> Segment<f32> {
        self.view().finish(x, aux)
    }
}

/// Runs one partition until the master says `Finish` (Ok) or something fails (reported to the
/// master as `Failed`). Ends quietly when the master goes away.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_owner(
    rt: Arc<JobRuntime>,
    key: JobKey,
    part: Arc<OwnedPart>,
    spec: KernelSpec,
    owners: Vec<NodeId>,
    resume: Option<(u32, Snapshot)>,
    rx: mpsc::UnboundedReceiver<ToOwner>,
    tx: mpsc::UnboundedSender<(u32, ToMaster)>,
    keep: Option<PartKey>,
) {
    let p = part.index;
    let kept = keep.map(|k| (k, part.clone()));
    let _active = super::ActiveOwner::new(&rt, spec.width());
    let result = match spec {
        KernelSpec::PageRank(k) => owner_loop(rt.clone(), key, Arc::new(k), part, owners, resume, rx, &tx).await,
        KernelSpec::Heat(k) => owner_loop(rt.clone(), key, Arc::new(k), part, owners, resume, rx, &tx).await,
        KernelSpec::Appnp { alpha, normalization, dim, feature_seed } => {
            match owned_features(&rt, &part, dim, feature_seed).await {
                Ok(features) => {
                    let k = OwnedAppnp { alpha, normalization, dim, base: part.graph.first(), features };
                    owner_loop(rt.clone(), key, Arc::new(k), part, owners, resume, rx, &tx).await
                }
                Err(e) => Err(e),
            }
        }
    };
    // Only a partition that saw its job through is kept: a cancelled or failed job's is freed.
    if result.is_ok()
        && let Some((k, part)) = kept
    {
        rt.partition_cache().insert(k, part);
    }
    if let Err(reason) = result {
        let msg = match reason.strip_prefix(LOST) {
            Some(r) => ToMaster::Lost(r.to_string()),
            None => ToMaster::Failed(reason),
        };
        let _ = tx.send((p, msg));
    }
}

/// The feature rows of the partition's own vertices: from the frame, or generated from the seed
/// on the partition's worker (which thereby first-touches them) — the master never holds the
/// whole matrix for a seeded job.
async fn owned_features(
    rt: &JobRuntime,
    part: &OwnedPart,
    dim: usize,
    seed: Option<u64>,
) -> Result<Segment<f32>, String> {
    match (&part.features, seed) {
        (Some(features), _) => Ok(features.clone()),
        (None, Some(seed)) => {
            let r = part.graph.owned_range();
            let rows = r.start as usize..r.end as usize;
            rt.workers()
                .run(part.index as usize, move || Segment::from_floats(generate::feature_rows(rows, dim, seed)))
                .await
                .map_err(|e| e.to_string())
        }
        (None, None) => Err("appnp partition without features".to_string()),
    }
}

/// Marks an owner error as a lost link (retryable in a new epoch) inside this module.
const LOST: &str = "\u{0}lost:";

/// How an exchange ended.
enum Exchanged<P> {
    /// Every halo of the iterate is sent and every one this partition reads is in place.
    Done(PartitionState<P>),
    /// The master said `Finish` (or went away) meanwhile: the halos are not needed any more.
    Stopped(PartitionState<P>, Option<ToOwner>),
    /// Sending to a reader failed. After the last superstep that is only a reader that got
    /// `Finish` first and stopped reading, so what it means waits for the master's next message.
    Broken(PartitionState<P>, String),
}

/// Exchanges the halos of iterate `superstep`, which this partition has just computed: packs
/// each reader's mirror values piece by piece on the workers and sends them, while unpacking the
/// pieces that arrive straight into `state`'s halo slots (this partition has finished reading
/// the previous iterate's halo values, so they may be overwritten). A reader still computing
/// `superstep` does not read its mailbox for this partition yet, so the pieces wait there, then
/// in QUIC flow control. Receiving goes on while a send waits, so two owners sending to each
/// other never wait on each other; messages from the master are taken meanwhile: a `Go` is kept
/// in `pending` for after the exchange, a `Finish` stops it.
#[allow(clippy::too_many_arguments)]
async fn exchange<P: Send + Sync + 'static>(
    workers: &crate::workers::Workers,
    numa: usize,
    part: &Arc<OwnedPart>,
    state: PartitionState<P>,
    halos: &mut HaloSender,
    inbox: &mut Inbox,
    superstep: u64,
    width: usize,
    rx: &mut mpsc::UnboundedReceiver<ToOwner>,
    pending: &mut Option<ToOwner>,
) -> Result<Exchanged<P>, String> {
    let p = part.index;
    let mut state = Some(state);
    inbox.begin(superstep);
    // A message from the master while exchanging: `Some` ends the exchange (Finish, or gone).
    let on_message = |m: Option<ToOwner>, pending: &mut Option<ToOwner>| -> Option<Option<ToOwner>> {
        match m {
            Some(go @ ToOwner::Go { .. }) => {
                *pending = Some(go);
                None
            }
            other => Some(other),
        }
    };
    let rows_per_piece = (halos.piece_values() / width.max(1)).max(1);
    for (mi, m) in part.mirrors.iter().enumerate() {
        for start in (0..m.vertices.len()).step_by(rows_per_piece) {
            let end = (start + rows_per_piece).min(m.vertices.len());
            let (st, pt) = (state.take().expect("state is back after every task"), part.clone());
            let (st, piece) = workers
                .run(numa, move || {
                    let piece = st.pack_mirror_rows(&pt.mirrors[mi], start..end);
                    (st, piece)
                })
                .await
                .map_err(|e| format!("partition {p}: {e}"))?;
            state = Some(st);
            let send = halos.send(m.reader as u32, superstep, (start * width) as u64, width as u32, piece);
            tokio::pin!(send);
            loop {
                tokio::select! {
                    sent = &mut send => {
                        if let Err(e) = sent {
                            return Ok(Exchanged::Broken(state.take().expect("state is back after every task"), e));
                        }
                        break;
                    }
                    got = inbox.next(), if !inbox.complete() => {
                        let st = state.take().expect("state is back after every task");
                        state = Some(unpack(workers, numa, part, st, got?).await?);
                    }
                    m = rx.recv(), if pending.is_none() => {
                        if let Some(stop) = on_message(m, pending) {
                            return Ok(Exchanged::Stopped(state.take().expect("state is back after every task"), stop));
                        }
                    }
                }
            }
        }
    }
    let mut st = state.take().expect("state is back after every task");
    while !inbox.complete() {
        tokio::select! {
            got = inbox.next() => st = unpack(workers, numa, part, st, got?).await?,
            m = rx.recv(), if pending.is_none() => {
                if let Some(stop) = on_message(m, pending) {
                    return Ok(Exchanged::Stopped(st, stop));
                }
            }
        }
    }
    Ok(Exchanged::Done(st))
}

/// Copies one received halo piece into its slots, on the workers.
async fn unpack<P: Send + Sync + 'static>(
    workers: &crate::workers::Workers,
    numa: usize,
    part: &Arc<OwnedPart>,
    mut state: PartitionState<P>,
    (source, first, values): (usize, usize, Segment<f32>),
) -> Result<PartitionState<P>, String> {
    let pt = part.clone();
    workers
        .run(numa, move || {
            state.unpack_halo_at(&pt.halo_sources[source], first, &values);
            state
        })
        .await
        .map_err(|e| format!("partition {}: {e}", part.index))
}

#[allow(clippy::too_many_arguments)]
async fn owner_loop<K>(
    rt: Arc<JobRuntime>,
    key: JobKey,
    kernel: Arc<K>,
    part: Arc<OwnedPart>,
    owners: Vec<NodeId>,
    resume: Option<(u32, Snapshot)>,
    mut rx: mpsc::UnboundedReceiver<ToOwner>,
    tx: &mpsc::UnboundedSender<(u32, ToMaster)>,
) -> Result<(), String>
where
    K: Kernel + Send + Sync + 'static,
    K::Prepared: 'static,
{
    let p = part.index;
    let numa = p as usize;
    let width = kernel.width();
    let sources: Vec<u32> = part.halo_sources.iter().map(|s| s.owner as u32).collect();
    let mailboxes =
        rt.take_mailboxes(key, p, &sources).ok_or_else(|| format!("partition {p} is already running here"))?;
    let mut inbox = Inbox::new(mailboxes, &part, width);
    let mut halos = HaloSender::new(rt.clone(), key, p, owners);
    let workers = rt.workers().clone();

    // The state is created on the worker that will step it, so its memory is first touched there.
    // Resuming, it is restored from the checkpoint; the master already holds that iterate's
    // combined partials, so the owner only acknowledges with empty ones.
    let (k, pt, t) = (kernel.clone(), part.clone(), Instant::now());
    let first = resume.as_ref().map_or(0, |(step, _)| *step);
    let (mut state, init) = workers
        .run(numa, move || {
            let (state, init) = match resume {
                None => PartitionState::new(&*k, &pt.graph),
                Some((_, snap)) => {
                    let state = PartitionState::restore(&*k, &pt.graph, &snap.values, &snap.aux)
                        .map_err(|e| format!("partition {p}: restoring the checkpoint: {e}"))?;
                    (state, Partials::default())
                }
            };
            Ok::<_, String>((state, init))
        })
        .await
        .map_err(|e| format!("partition {p}: {e}"))??;
    let secs = t.elapsed().as_secs_f64();
    tx.send((p, ToMaster::Partials { step: first, partials: init, compute_seconds: secs }))
        .map_err(|_| "master gone".to_string())?;

    // Where this partition's supersteps spent their time, for the summary logged at the end.
    let (mut exchange_seconds, mut compute_seconds, mut waited_seconds) = (0f64, 0f64, 0f64);
    // The iterate just computed, whose halos go out next (while the master gathers partials).
    let mut computed = u64::from(first);
    let mut pending: Option<ToOwner> = None;
    let mut last = false;
    // The iterate just computed went into a checkpoint: its halos wait for the next Go, so the
    // exchange does not overlap the snapshot's transfer to the master (memory at the master).
    let mut deferred = false;
    // The buffer of the last snapshot, taken back for the next step once the master is done with
    // it (`PartitionState::reuse_next`).
    let mut snapshot_buffer: Option<Segment<f32>> = None;
    loop {
        let t = Instant::now();
        let exchanged = if last || deferred {
            // After the last superstep the master says Finish (the final halos are nobody's);
            // a checkpointed iterate's exchange runs once its Go has come.
            Exchanged::Done(state)
        } else {
            exchange(&workers, numa, &part, state, &mut halos, &mut inbox, computed, width, &mut rx, &mut pending)
                .await?
        };
        let exchanged_in = t.elapsed().as_secs_f64();
        exchange_seconds += exchanged_in;
        metrics::histogram!("quiver_job_halo_exchange_seconds").record(exchanged_in);
        let (st, message) = match exchanged {
            Exchanged::Done(st) => {
                let t = Instant::now();
                let m = match pending.take() {
                    Some(m) => Some(m),
                    None => rx.recv().await,
                };
                waited_seconds += t.elapsed().as_secs_f64();
                (st, m)
            }
            Exchanged::Stopped(st, m) => (st, m),
            Exchanged::Broken(st, reason) => match pending.take() {
                // The master had already moved on: the link is lost.
                Some(_) => return Err(format!("{LOST}{reason}")),
                None => match rx.recv().await {
                    Some(ToOwner::Finish) => (st, Some(ToOwner::Finish)),
                    Some(ToOwner::Go { .. }) => return Err(format!("{LOST}{reason}")),
                    None => return Err("the job master went away".into()),
                },
            },
        };
        state = st;
        match message {
            Some(ToOwner::Go { step, mass, checkpoint, last: no_more }) => {
                last = no_more;
                if u64::from(step) != computed + 1 {
                    return Err(format!("partition {p} was told to compute superstep {step} after {computed}"));
                }
                if std::mem::take(&mut deferred) {
                    // The master sends nothing more before this step's partials.
                    let t = Instant::now();
                    let mut unexpected = None;
                    state = match exchange(
                        &workers,
                        numa,
                        &part,
                        state,
                        &mut halos,
                        &mut inbox,
                        computed,
                        width,
                        &mut rx,
                        &mut unexpected,
                    )
                    .await?
                    {
                        Exchanged::Done(st) if unexpected.is_none() => st,
                        Exchanged::Broken(_, reason) => return Err(format!("{LOST}{reason}")),
                        _ => {
                            return Err(format!("partition {p}: the master spoke out of turn during superstep {step}"));
                        }
                    };
                    exchange_seconds += t.elapsed().as_secs_f64();
                }
                // The master has the last snapshot stored or sent by now, as a rule; if anything
                // still shares its buffer, the step allocates as before.
                if let Some(seg) = snapshot_buffer.take()
                    && let Ok(buf) = AlignedFloats::reclaim(seg)
                {
                    state.reuse_next(buf);
                }
                let (k, pt, t) = (kernel.clone(), part.clone(), Instant::now());
                let (next, partials, snapshot) = workers
                    .run(numa, move || {
                        let mut state = state;
                        let partials = state.step(&*k, &pt.graph, &Globals { mass, step });
                        let snapshot = checkpoint.then(|| {
                            let aux = Segment::from_slice(state.snapshot().1);
                            Snapshot { values: state.take_owned_values(), aux }
                        });
                        (state, partials, snapshot)
                    })
                    .await
                    .map_err(|e| format!("partition {p}, superstep {step}: {e}"))?;
                state = next;
                computed = u64::from(step);
                deferred = snapshot.is_some();
                let secs = t.elapsed().as_secs_f64();
                compute_seconds += secs;
                metrics::histogram!("quiver_job_superstep_seconds").record(secs);
                tx.send((p, ToMaster::Partials { step, partials, compute_seconds: secs }))
                    .map_err(|_| "master gone".to_string())?;
                if let Some(snapshot) = snapshot {
                    snapshot_buffer = Some(snapshot.values.clone());
                    tx.send((p, ToMaster::Snapshot { step, snapshot })).map_err(|_| "master gone".to_string())?;
                }
            }
            Some(ToOwner::Finish) => {
                tracing::info!(
                    job = key.job,
                    epoch = key.epoch,
                    partition = p,
                    compute_seconds,
                    exchange_seconds,
                    waited_seconds,
                    "partition's supersteps done (waited: after its halos were exchanged, for the next Go)"
                );
                halos.finish();
                let k = kernel.clone();
                let values = workers
                    .run(numa, move || state.into_result(&*k))
                    .await
                    .map_err(|e| format!("partition {p}: {e}"))?;
                // Everything else this partition holds for the job (the kernel's features, the
                // last snapshot's buffer) is freed before the result is reported: the master asks
                // the remote owners for theirs only then (`run_master`).
                drop((kernel, part, snapshot_buffer, halos, inbox));
                tracing::debug!(
                    job = key.job,
                    epoch = key.epoch,
                    partition = p,
                    "partition's state freed, result reported"
                );
                let _ = tx.send((p, ToMaster::Result(values)));
                return Ok(());
            }
            None => return Err("the job master went away".into()),
        }
    }
}

/// Takes the halo pieces of one superstep from the partition's mailboxes (one per sender),
/// checking superstep, order and length before anything is unpacked. It reads only the mailboxes
/// of senders whose pieces of the current superstep are not all in, so a sender already a
/// superstep ahead waits in its own mailbox (and in QUIC flow control) until the next exchange.
struct Inbox {
    /// One mailbox per halo source, in source order.
    rxs: Vec<mpsc::Receiver<super::Halo>>,
    /// (owner partition, values expected) per halo source, in source order.
    sources: Vec<(u32, usize)>,
    /// Values received so far per source, in the current superstep.
    got: Vec<usize>,
    superstep: u64,
}

impl Inbox {
    fn new(rxs: Vec<mpsc::Receiver<super::Halo>>, part: &OwnedPart, width: usize) -> Self {
        let sources: Vec<(u32, usize)> = part
            .halo_sources
            .iter()
            .map(|s| (s.owner as u32, (s.slots.end - s.slots.start) as usize * width))
            .collect();
        let got = vec![0; sources.len()];
        Self { rxs, sources, got, superstep: 0 }
    }

    /// Starts collecting iterate `superstep`.
    fn begin(&mut self, superstep: u64) {
        self.superstep = superstep;
        self.got.fill(0);
    }

    /// Whether every source's values of the current superstep are in.
    fn complete(&self) -> bool {
        self.sources.iter().zip(&self.got).all(|((_, want), got)| got == want)
    }

    /// The next piece of the current superstep: (source index, first value, values). Pieces of
    /// an older superstep (a retried epoch's leftovers) are skipped; anything else out of place
    /// is an error naming the sender. Cancel-safe: a piece is taken only when it is returned or
    /// skipped.
    async fn next(&mut self) -> Result<(usize, usize, Segment<f32>), String> {
        loop {
            let (i, h) = std::future::poll_fn(|cx| {
                for (i, rx) in self.rxs.iter_mut().enumerate() {
                    if self.got[i] >= self.sources[i].1 {
                        continue;
                    }
                    match rx.poll_recv(cx) {
                        std::task::Poll::Ready(Some(h)) => return std::task::Poll::Ready(Ok((i, h))),
                        std::task::Poll::Ready(None) => {
                            return std::task::Poll::Ready(Err("the job was dropped on this node".to_string()));
                        }
                        std::task::Poll::Pending => {}
                    }
                }
                std::task::Poll::Pending
            })
            .await?;
            if h.superstep < self.superstep {
                continue;
            }
            let from = self.sources[i].0;
            if h.from != from {
                return Err(format!("partition {from}'s mailbox held a halo from partition {}", h.from));
            }
            if h.superstep > self.superstep {
                return Err(format!(
                    "partition {} sent superstep {} while the exchange is at {}",
                    h.from, h.superstep, self.superstep
                ));
            }
            let (want, got) = (self.sources[i].1, self.got[i]);
            if h.first != got as u64 || got + h.values.len() > want {
                return Err(format!(
                    "the halo piece from partition {} covers values {}..{} of {want}, expected the next from {got}",
                    h.from,
                    h.first,
                    h.first.saturating_add(h.values.len() as u64)
                ));
            }
            self.got[i] += h.values.len();
            return Ok((i, got, h.values));
        }
    }
}

/// Serves a job stream the master opened: receive and check the partition and plan, run the
/// owner, and relay messages both ways until the result is sent or either side gives up.
pub(crate) async fn serve_remote(rt: Arc<JobRuntime>, mut s: InboundStream) {
    let key = JobKey { job: s.header.job_id, epoch: s.header.epoch };
    let Some(mut send) = s.send.take() else { return };
    if rt.stale(key) {
        let reason = format!("job {} epoch {} is stale: the job has moved on to a newer epoch", key.job, key.epoch);
        tracing::info!(peer = %s.peer, %reason, "refused a job stream");
        metrics::counter!("quiver_job_stale_messages_total").increment(1);
        let _ = send.send_message(&abort(&reason)).await;
        let _ = send.finish();
        return;
    }
    let peer = s.peer;
    let setup = async {
        // The plan first; when it names the graph's digest, say whether this node holds the
        // partition from an earlier job on that graph (then no partition frame follows).
        let plan = match s.recv.recv_message::<JobMessage>().await.map_err(|e| e.to_string())? {
            Some(JobMessage { body: Some(job_message::Body::Plan(plan)) }) => plan,
            _ => return Err("expected the job plan first".to_string()),
        };
        let spec = KernelSpec::from_plan(&plan)?;
        let owners: Vec<NodeId> = plan.owners.iter().map(|&n| NodeId(n)).collect();
        let index = s.header.partition;
        if owners.get(index as usize) != Some(&rt.node()) {
            return Err(format!("partition {index} is not assigned to this node ({})", rt.node()));
        }
        let keep = keep_key(&plan, index)?;
        let held = keep.as_ref().and_then(|(k, range)| rt.partition_cache().get(k).filter(|p| p.owns(range)));
        if keep.is_some() {
            let answer = JobMessage { body: Some(job_message::Body::PartitionHeld(held.is_some())) };
            send.send_message(&answer).await.map_err(|e| e.to_string())?;
        }
        let part = match held {
            Some(part) => part,
            None => {
                let t = Instant::now();
                let frame = s
                    .recv
                    .recv_frame()
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the stream ended before the partition")?;
                let received = t.elapsed().as_secs_f64();
                let part = OwnedPart::from_frame(&frame)?;
                tracing::info!(
                    peer = %s.peer,
                    job = key.job,
                    epoch = key.epoch,
                    partition = part.index,
                    bytes = frame.payload_len(),
                    receive_seconds = received,
                    check_seconds = t.elapsed().as_secs_f64() - received,
                    "partition received"
                );
                if keep.as_ref().is_some_and(|(_, r)| !part.owns(r)) {
                    return Err(format!("partition {}'s frame does not cover the plan's range", part.index));
                }
                Arc::new(part)
            }
        };
        part.check(owners.len(), spec.width(), spec.ships_features())?;
        if part.index != index {
            return Err(format!("the stream is for partition {index}, the frame for {}", part.index));
        }
        let resume = if plan.resume {
            let frame =
                s.recv.recv_frame().await.map_err(|e| e.to_string())?.ok_or("the stream ended before the snapshot")?;
            Some((plan.resume_step, Snapshot::from_frame(&frame)?))
        } else {
            None
        };
        Ok((part, spec, owners, resume, keep.map(|(k, _)| k)))
    };
    let (part, spec, owners, resume, keep) = match setup.await {
        Ok(x) => x,
        Err(reason) => {
            tracing::warn!(%peer, job = key.job, epoch = key.epoch, %reason, "refused a partition");
            let _ = send.send_message(&JobMessage { body: Some(job_message::Body::Abort(reason)) }).await;
            let _ = send.finish();
            return;
        }
    };
    let p = part.index;
    tracing::debug!(%peer, job = key.job, epoch = key.epoch, partition = p, "running a partition");
    let (to_owner, owner_rx) = mpsc::unbounded_channel();
    let (owner_tx, mut from_owner) = mpsc::unbounded_channel();
    let owner = tokio::spawn(run_owner(rt.clone(), key, part, spec, owners, resume, owner_rx, owner_tx, keep));
    rt.owners.insert((key, p), owner.abort_handle());

    // Reads are not cancel-safe, so the reader is its own task feeding a channel.
    let (msg_tx, mut msgs) = mpsc::unbounded_channel();
    let mut recv = s.recv;
    let reader = tokio::spawn(async move {
        loop {
            match recv.recv_message::<JobMessage>().await {
                Ok(Some(m)) => {
                    if msg_tx.send(m).is_err() {
                        return;
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
    });
    loop {
        tokio::select! {
            m = msgs.recv() => match m.and_then(|m| m.body) {
                Some(job_message::Body::Go(g)) => {
                    let _ = to_owner.send(ToOwner::Go {
                        step: g.step,
                        mass: g.mass,
                        checkpoint: g.checkpoint,
                        last: g.last,
                    });
                }
                Some(job_message::Body::Finish(_)) => {
                    let _ = to_owner.send(ToOwner::Finish);
                }
                Some(job_message::Body::Abort(reason)) => {
                    tracing::info!(%peer, job = key.job, partition = p, %reason, "job master aborted");
                    owner.abort();
                    break;
                }
                Some(_) => {
                    let _ = send.send_message(&abort("unexpected message from the master")).await;
                    owner.abort();
                    break;
                }
                None => {
                    // The master closed the stream or vanished: stop computing.
                    owner.abort();
                    break;
                }
            },
            out = from_owner.recv() => match out {
                Some((_, ToMaster::Partials { step, partials, compute_seconds })) => {
                    let m = JobMessage { body: Some(job_message::Body::Partials(partials_to_wire(step, partials, compute_seconds))) };
                    if send.send_message(&m).await.is_err() {
                        owner.abort();
                        break;
                    }
                }
                Some((_, ToMaster::Result(values))) => {
                    let mut frame = OutFrame::new(None);
                    frame.push("result", &values).set_last(true);
                    let follows = JobMessage { body: Some(job_message::Body::ResultFollows(true)) };
                    if send.send_message(&follows).await.is_ok() && send.send_frame(&frame).await.is_ok() {
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                    break;
                }
                Some((_, ToMaster::Snapshot { step, snapshot })) => {
                    let follows = JobMessage { body: Some(job_message::Body::SnapshotFollows(step)) };
                    let mut sent = send.send_message(&follows).await.is_ok();
                    for piece in snapshot.to_pieces() {
                        sent = sent && send.send_frame(&piece).await.is_ok();
                    }
                    if !sent {
                        owner.abort();
                        break;
                    }
                }
                Some((_, ToMaster::SnapshotStored { .. })) => {}
                Some((_, ToMaster::Lost(reason))) => {
                    tracing::warn!(job = key.job, partition = p, %reason, "partition lost a link");
                    let _ = send.send_message(&JobMessage { body: Some(job_message::Body::Lost(reason)) }).await;
                    let _ = send.finish();
                    break;
                }
                Some((_, ToMaster::Failed(reason))) => {
                    tracing::warn!(job = key.job, partition = p, %reason, "partition failed");
                    let _ = send.send_message(&abort(&reason)).await;
                    let _ = send.finish();
                    break;
                }
                None => break,
            },
        }
    }
    reader.abort();
    rt.owners.remove(&(key, p));
}

/// The cache key and owned range of partition `index` when the plan offers a kept partition
/// (names the graph's digest), checking the plan's boundaries.
fn keep_key(plan: &JobPlan, index: u32) -> Result<Option<(PartKey, std::ops::Range<u32>)>, String> {
    if plan.graph_digest.is_empty() {
        return Ok(None);
    }
    let graph: [u8; 32] = plan
        .graph_digest
        .as_slice()
        .try_into()
        .map_err(|_| format!("plan: graph digest of {} bytes, expected 32", plan.graph_digest.len()))?;
    let parts = plan.owners.len();
    let b = &plan.bounds;
    if b.len() != parts + 1
        || b.windows(2).any(|w| w[0] > w[1])
        || b.last().is_some_and(|&e| u64::from(e) != plan.vertices)
    {
        return Err(format!(
            "plan: {} boundaries for {parts} partitions, or not ascending to the vertex count",
            b.len()
        ));
    }
    let i = index as usize;
    Ok(Some((PartKey { graph, partitions: parts as u32, index }, b[i]..b[i + 1])))
}

fn abort(reason: &str) -> JobMessage {
    JobMessage { body: Some(job_message::Body::Abort(reason.to_string())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot travels as its values in order, in pieces of at most the piece size, then its
    /// private state in one frame marked last; nothing else is marked last.
    #[test]
    fn snapshot_pieces_cover_the_values_in_order_then_aux() {
        for n in [0, 5, SNAPSHOT_PIECE_VALUES, 2 * SNAPSHOT_PIECE_VALUES + 3] {
            let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let snapshot = Snapshot { values: Segment::from_slice(&values), aux: Segment::from_slice(&[7.0, 8.0]) };
            let pieces = snapshot.to_pieces();
            assert_eq!(pieces.len(), n.div_ceil(SNAPSHOT_PIECE_VALUES) + 1);
            let limits = crate::transport::Limits::default();
            let (body, aux) = pieces.split_at(pieces.len() - 1);
            let mut total = 0u64;
            for p in body {
                assert!(!p.header().last);
                assert_eq!(p.header().segments.len(), 1);
                assert_eq!(p.header().segments[0].name, "values");
                let len = p.payload_len(&limits).unwrap();
                assert!(len <= (SNAPSHOT_PIECE_VALUES * 4) as u64);
                total += len;
            }
            assert_eq!(total, n as u64 * 4);
            assert!(aux[0].header().last);
            assert_eq!(aux[0].header().segments[0].name, "aux");
        }
    }
}

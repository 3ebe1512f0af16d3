//! The distributed job executor: a job master drives supersteps over partition owners on
//! several nodes, with halos exchanged directly between owners over QUIC.
//!
//! # Roles and streams
//!
//! - The **master** ([`master::run_master`]) runs on the node that accepted the submit (it holds
//!   the graph). It opens one `STREAM_KIND_JOB` stream per partition to the partition's owner
//!   and sends a [`JobPlan`](quiver_proto::peer::JobPlan) naming the graph's digest; each owner
//!   answers whether it still holds its partition from an earlier job on that graph
//!   ([`cache`]). Unless every owner does, the master cuts the graph with the same partitioner
//!   as `quiver run --partitions` and sends each owner that lacks its partition one zero-copy
//!   frame of it. Then it runs the superstep barrier: it waits for every owner's partials of iterate `s`, combines them exactly, decides
//!   whether to stop exactly as [`run_partitioned`](quiver_compute::kernels::run_partitioned) does,
//!   and sends `Go(s + 1)` or `Finish`. After `Finish` each owner frees its state and sends its
//!   result rows, which the master returns as one part per partition, in vertex order (never
//!   assembled into a copy); the master's own node's owners finish before the others are told. A
//!   partition whose owner is the master's own node runs in the same process over channels: no
//!   stream, no copy of the partition.
//! - An **owner** ([`owner`]) computes its rows on the pinned [`Workers`] (never on an async
//!   thread) and reports its partials to the master. Then, while the master gathers the other
//!   partials, it exchanges iterate `s`'s halos: it sends each reader exactly the values it
//!   needs on a `STREAM_KIND_HALO_EXCHANGE` stream (one long-lived stream per reader and epoch),
//!   packed and sent in pieces of [`DEFAULT_HALO_PIECE_VALUES`], while it unpacks the pieces it
//!   receives straight into its halo slots (it has finished reading iterate `s − 1`'s). On
//!   `Go(s + 1)` it computes `s + 1`. Two exceptions wait for `Go` instead: the iterate of a
//!   checkpoint (so its halos do not overlap the snapshot's transfer) and the last one (`Go`
//!   marked `last`: nobody reads its halos).
//!
//! Because every owner runs the same [`PartitionState`](quiver_compute::kernels::superstep::PartitionState)
//! steps as the single-process run and the master combines partials in exact arithmetic, the
//! result is bit-identical to `quiver run` for any number of nodes and any placement.
//!
//! # Invariants
//!
//! - Everything is keyed by `(job, epoch)`: halo frames and job streams of another epoch never
//!   reach a running owner (their mailbox is a different one, dropped with [`JobRuntime::drop_job`]).
//! - Halo memory is bounded by the protocol: a reader takes pieces of iterate `s` only once it
//!   has computed `s` (its slots hold iterate `s − 1`, which it no longer needs), so pieces are
//!   unpacked into place as they arrive and no whole halo is ever buffered on either side. Each
//!   sender has its own small mailbox at each reader, read only while that sender's pieces of
//!   the current iterate are incomplete: a sender already an iterate ahead waits there and in
//!   QUIC flow control (a sender keeps at most a few pieces per reader queued). A piece out of
//!   order, of another superstep, too long, or from a partition the reader does not read is
//!   refused.
//! - Checkpoint memory is bounded the same way: an owner sends its snapshot to the master in
//!   pieces and the master stores each in its [`CheckpointSink`] before reading the next, so a
//!   checkpoint never sits whole in the master's memory.
//! - Every array index a kernel uses on a received partition is checked first ([`wire`]).

pub mod cache;
pub mod master;
mod owner;
pub mod wire;

use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use quiver_compute::Segment;
use quiver_proto::peer::{HaloMeta, StreamHeader, StreamKind, frame_header};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::transport::{ErrorCode, InboundStream, NodeId, OutFrame, PeerSendStream, Transport};
use crate::workers::Workers;

pub use cache::{DEFAULT_PARTITION_CACHE_BYTES, PartKey, PartitionCache};
pub use master::{
    Checkpoint, CheckpointOut, CheckpointSink, CheckpointTaken, MasterError, MasterJob, MasterOutput, MemorySink,
    PartSink, StepReport, run_master,
};
pub use owner::Snapshot;
pub use wire::{KernelSpec, OwnedPart};

/// A job's identity on the wire: the job id and the epoch of its assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey {
    pub job: u64,
    pub epoch: u64,
}

/// A piece of one owner partition's halo values of one superstep: `values` start `first`
/// values into the owner's packed buffer for the reader.
#[derive(Debug)]
pub struct Halo {
    pub from: u32,
    pub superstep: u64,
    pub first: u64,
    pub values: Segment<f32>,
}

/// Halo pieces one sender's mailbox at a partition holds before that sender waits: the stream
/// reader stops reading, QUIC flow control stops the peer's writer, so arriving halos never pile
/// up in memory faster than the owner unpacks them (a whole APPNP halo is tens of MB). Each
/// sender has its own mailbox, so one that is a superstep ahead waits without holding up the
/// others' pieces the owner still needs.
const MAILBOX_PIECES: usize = 4;

/// How long a halo piece may wait for room in a mailbox before its stream is given up: owners
/// drain their mailbox throughout an exchange, and peers send only after every owner is ready,
/// so only a mailbox whose owner is gone stays full.
const MAILBOX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

struct Mailbox {
    tx: mpsc::Sender<Halo>,
    rx: Mutex<Option<mpsc::Receiver<Halo>>>,
}

impl Mailbox {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel(MAILBOX_PIECES);
        Self { tx, rx: Mutex::new(Some(rx)) }
    }
}

/// Values per halo frame by default (1 MiB of `f32`): a halo travels in pieces of this size, so
/// neither side ever holds a whole packed halo.
pub const DEFAULT_HALO_PIECE_VALUES: usize = 1 << 18;

/// The node's executor state: halo mailboxes, running owners, the transport and the workers.
pub struct JobRuntime {
    transport: Transport,
    workers: Workers,
    /// Keyed by (job, receiving partition, sending partition).
    mailboxes: DashMap<(JobKey, u32, u32), Mailbox>,
    /// The partitions each running owner reads halos from (registered when it starts).
    halo_sources: DashMap<(JobKey, u32), Vec<u32>>,
    owners: DashMap<(JobKey, u32), AbortHandle>,
    /// Owner tasks alive on this node (local and remote partitions).
    active: std::sync::atomic::AtomicUsize,
    /// The current epoch of each job, as the replicated state says: anything older is refused.
    epochs: DashMap<u64, u64>,
    halo_piece_values: std::sync::atomic::AtomicUsize,
    /// Partitions kept from finished jobs, for the next job on the same graph.
    partitions: PartitionCache,
}

/// Counts an owner task while it lives (also when it is aborted mid-await), and, for a kernel of
/// one value per vertex, holds the peer socket's receive buffer wide meanwhile
/// ([`crate::transport::TransportConfig::job_socket_buffer`]).
///
/// Such a superstep's halos are small bursts from every peer at once, and a drop costs a QUIC
/// recovery: widening cut the halo exchange by a quarter. Wide rows (APPNP) are the opposite: their
/// exchange is bound by bandwidth, not losses, and with fewer drops more of each step's halos are
/// in flight at once — the holder of an APPNP d = 64 job peaked at 481–508 MB widened against
/// 470–478 MB not (benches/RESULTS.md, 2026-12-07 night), at the 0.5 GB line.
pub(crate) struct ActiveOwner {
    rt: Arc<JobRuntime>,
    _wide: Option<crate::transport::ReceiveBufferLease>,
}

impl ActiveOwner {
    pub(crate) fn new(rt: &Arc<JobRuntime>, width: usize) -> Self {
        rt.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self { rt: rt.clone(), _wide: (width == 1).then(|| rt.transport.widen_receive_buffer()) }
    }
}

impl Drop for ActiveOwner {
    fn drop(&mut self) {
        self.rt.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for JobRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRuntime").field("owners", &self.owners.len()).finish()
    }
}

/// Whether [`JobRuntime::drop_job`]`(job, keep)` stops the owner keyed `k`.
fn dropped_by(k: &JobKey, job: u64, keep: Option<u64>) -> bool {
    k.job == job && keep.is_none_or(|e| k.epoch < e)
}

impl JobRuntime {
    pub fn new(transport: Transport, workers: Workers) -> Arc<Self> {
        Arc::new(Self {
            transport,
            workers,
            mailboxes: DashMap::new(),
            halo_sources: DashMap::new(),
            owners: DashMap::new(),
            active: std::sync::atomic::AtomicUsize::new(0),
            epochs: DashMap::new(),
            halo_piece_values: std::sync::atomic::AtomicUsize::new(DEFAULT_HALO_PIECE_VALUES),
            partitions: PartitionCache::new(DEFAULT_PARTITION_CACHE_BYTES),
        })
    }

    /// Values per halo frame (at least one row's worth is always sent). Default
    /// [`DEFAULT_HALO_PIECE_VALUES`]; tests make it small to cut halos into many pieces.
    pub fn set_halo_piece_values(&self, values: usize) {
        self.halo_piece_values.store(values, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn halo_piece_values(&self) -> usize {
        self.halo_piece_values.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The partitions this node keeps from finished jobs ([`cache`]); its capacity is
    /// [`DEFAULT_PARTITION_CACHE_BYTES`] until set.
    pub fn partition_cache(&self) -> &PartitionCache {
        &self.partitions
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.transport.node_id()
    }

    /// The worker pools.
    pub fn workers(&self) -> &Workers {
        &self.workers
    }

    /// Partitions this node currently computes, over all jobs.
    pub fn running_partitions(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops every owner of `job` from an epoch older than `keep` and drops their halo mailboxes
    /// (all of them when `keep` is `None`): cancellation, completion, or a new epoch. An owner of
    /// a *newer* epoch stays: its plan came from a master whose state is ahead of this node's.
    /// Memory of a partition is freed when its owner's task ends (a step already on a worker
    /// finishes first).
    pub fn drop_job(&self, job: u64, keep: Option<u64>) {
        let stale = |k: &JobKey| dropped_by(k, job, keep);
        self.owners.retain(|(k, p), handle| {
            if stale(k) {
                tracing::info!(
                    job = k.job,
                    epoch = k.epoch,
                    partition = p,
                    ?keep,
                    "stopped a partition: its job ended or moved to a newer epoch"
                );
                handle.abort();
                false
            } else {
                true
            }
        });
        self.mailboxes.retain(|(k, _, _), _| !stale(k));
        self.halo_sources.retain(|(k, _), _| !stale(k));
    }

    /// Records job `job`'s current epoch: streams and halos of older epochs are refused from now
    /// on, and this node's partitions of older epochs are stopped.
    pub fn set_epoch(&self, job: u64, epoch: u64) {
        let newer = self.epochs.insert(job, epoch).is_none_or(|old| old < epoch);
        if newer {
            self.drop_job(job, Some(epoch));
        }
    }

    /// Forgets a finished job's epoch record (after [`JobRuntime::drop_job`]).
    pub fn forget(&self, job: u64) {
        self.epochs.remove(&job);
    }

    /// Whether `key` is older than the job's current epoch.
    fn stale(&self, key: JobKey) -> bool {
        self.epochs.get(&key.job).is_some_and(|e| key.epoch < *e)
    }

    /// Jobs with any state on this node (owners or mailboxes).
    pub fn jobs(&self) -> Vec<u64> {
        let mut j: Vec<u64> = self.owners.iter().map(|e| e.key().0.job).collect();
        j.extend(self.mailboxes.iter().map(|e| e.key().0.job));
        j.sort_unstable();
        j.dedup();
        j
    }

    /// Puts a halo piece in partition `to`'s mailbox for its sender (on this node), whether or not
    /// its owner has started yet, waiting while that mailbox is full. False when the piece cannot
    /// be delivered: its epoch is stale, its sender is not one the running owner reads from, the
    /// mailbox was dropped (the job ended here), or it stayed full for [`MAILBOX_WAIT`].
    async fn deliver(&self, key: JobKey, to: u32, halo: Halo) -> bool {
        if self.stale(key) {
            metrics::counter!("quiver_job_stale_messages_total").increment(1);
            return false;
        }
        if self.halo_sources.get(&(key, to)).is_some_and(|s| !s.contains(&halo.from)) {
            tracing::warn!(
                job = key.job,
                partition = to,
                from = halo.from,
                "refused a halo from a partition this partition does not read"
            );
            return false;
        }
        // Clone the sender out: no map shard lock may be held across the wait.
        let tx = self.mailboxes.entry((key, to, halo.from)).or_insert_with(Mailbox::new).tx.clone();
        matches!(tokio::time::timeout(MAILBOX_WAIT, tx.send(halo)).await, Ok(Ok(())))
    }

    /// The receiving ends of partition `part`'s mailboxes, one per partition in `sources` (in that
    /// order), once: `None` when an owner of `part` already took them.
    fn take_mailboxes(&self, key: JobKey, part: u32, sources: &[u32]) -> Option<Vec<mpsc::Receiver<Halo>>> {
        match self.halo_sources.entry((key, part)) {
            dashmap::Entry::Occupied(_) => return None,
            dashmap::Entry::Vacant(v) => {
                v.insert(sources.to_vec());
            }
        }
        sources
            .iter()
            .map(|&from| {
                let mb = self.mailboxes.entry((key, part, from)).or_insert_with(Mailbox::new);
                mb.rx.lock().expect("mailbox lock").take()
            })
            .collect()
    }

    /// Serves a `STREAM_KIND_JOB` or `STREAM_KIND_HALO_EXCHANGE` stream a peer opened. Returns
    /// when the stream ends; errors are logged and reported to the peer, never panics.
    pub async fn handle_stream(self: &Arc<Self>, s: InboundStream) {
        match s.kind {
            StreamKind::Job => owner::serve_remote(self.clone(), s).await,
            StreamKind::HaloExchange => self.receive_halos(s).await,
            other => {
                let mut s = s;
                s.recv.reject(ErrorCode::Refused, &format_args!("{other:?} is not a job stream"));
            }
        }
    }

    async fn receive_halos(&self, mut s: InboundStream) {
        let key = JobKey { job: s.header.job_id, epoch: s.header.epoch };
        let to = s.header.partition;
        loop {
            let frame = match s.recv.recv_frame().await {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(peer = %s.peer, job = key.job, error = %e, "halo stream ended");
                    return;
                }
            };
            let checked = match &frame.header.meta {
                Some(frame_header::Meta::Halo(m)) if m.to_partition == to && frame.segment_count() == 1 => frame
                    .segment::<f32>(0)
                    .map(|values| (m.from_partition, m.superstep, m.first_value, values))
                    .map_err(|e| e.to_string()),
                _ => Err(format!("a halo frame for partition {to} must carry halo metadata for it and one segment")),
            };
            match checked {
                Ok((from, superstep, first, values)) => {
                    if !self.deliver(key, to, Halo { from, superstep, first, values }).await {
                        s.recv.stop(ErrorCode::Refused);
                        return;
                    }
                }
                Err(reason) => {
                    s.recv.reject(ErrorCode::Malformed, &reason);
                    return;
                }
            }
        }
    }
}

/// Sends one owner's halos: in memory to partitions on this node; otherwise as frames on the
/// reader's long-lived halo stream (opened on first use), written by one task per reader that
/// takes at most [`HALO_QUEUE`] pieces ahead, so a reader that does not read holds its sender
/// back instead of piling packed values up in memory.
pub(crate) struct HaloSender {
    rt: Arc<JobRuntime>,
    key: JobKey,
    from: u32,
    owners: Vec<NodeId>,
    links: std::collections::HashMap<u32, HaloLink>,
}

/// Pieces queued per reader beyond the one being written.
const HALO_QUEUE: usize = 2;

struct HaloLink {
    tx: mpsc::Sender<(u64, u64, u32, Segment<f32>)>,
    writer: tokio::task::JoinHandle<Result<(), String>>,
}

impl HaloSender {
    pub(crate) fn new(rt: Arc<JobRuntime>, key: JobKey, from: u32, owners: Vec<NodeId>) -> Self {
        Self { rt, key, from, owners, links: Default::default() }
    }

    /// Sends one piece of partition `to`'s halo of `superstep` (values starting `first` into the
    /// packed buffer); returns once it is delivered (local) or queued for the reader's stream.
    /// Errors are lost links.
    pub(crate) async fn send(
        &mut self,
        to: u32,
        superstep: u64,
        first: u64,
        width: u32,
        values: Segment<f32>,
    ) -> Result<(), String> {
        let node = *self.owners.get(to as usize).ok_or_else(|| format!("no owner for partition {to}"))?;
        if node == self.rt.node() {
            self.rt.deliver(self.key, to, Halo { from: self.from, superstep, first, values }).await;
            return Ok(());
        }
        if !self.links.contains_key(&to) {
            let header = StreamHeader {
                kind: StreamKind::HaloExchange as i32,
                job_id: self.key.job,
                epoch: self.key.epoch,
                partition: to,
                superstep,
                ..Default::default()
            };
            let conn = self.rt.transport.connection(node).await.map_err(|e| format!("halo to {node}: {e}"))?;
            let stream = conn.open_uni(header).await.map_err(|e| format!("halo to {node}: {e}"))?;
            let (tx, rx) = mpsc::channel(HALO_QUEUE);
            let writer = tokio::spawn(write_halos(stream, rx, self.from, to, node));
            self.links.insert(to, HaloLink { tx, writer });
        }
        let link = self.links.get_mut(&to).expect("opened above");
        if link.tx.send((superstep, first, width, values)).await.is_ok() {
            return Ok(());
        }
        // The writer stopped: its error says why.
        let link = self.links.remove(&to).expect("present above");
        Err(match link.writer.await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => format!("halo to {node}: the stream closed"),
            Err(e) => format!("halo to {node}: {e}"),
        })
    }

    /// Values per piece, from the runtime's setting.
    pub(crate) fn piece_values(&self) -> usize {
        self.rt.halo_piece_values()
    }

    /// Ends every halo stream once its queued pieces are written.
    pub(crate) fn finish(&mut self) {
        self.links.clear();
    }
}

/// Writes one reader's halo pieces, in order, on its stream; finishes the stream when the
/// sender goes away.
async fn write_halos(
    mut stream: PeerSendStream,
    mut rx: mpsc::Receiver<(u64, u64, u32, Segment<f32>)>,
    from: u32,
    to: u32,
    node: NodeId,
) -> Result<(), String> {
    while let Some((superstep, first, width, values)) = rx.recv().await {
        let meta = HaloMeta { from_partition: from, to_partition: to, superstep, width, first_value: first };
        let mut frame = OutFrame::new(Some(frame_header::Meta::Halo(meta)));
        frame.push("halo", &values);
        stream.send_frame(&frame).await.map_err(|e| format!("halo to {node}: {e}"))?;
        metrics::counter!("quiver_job_halo_bytes_sent_total").increment(values.as_bytes().len() as u64);
    }
    let _ = stream.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{JobKey, dropped_by};

    /// A new epoch stops the older epochs' owners of that job only; an owner of a newer epoch
    /// than the state this node applied (its master is ahead) stays.
    #[test]
    fn drop_job_stops_older_epochs_only() {
        let k = |job, epoch| JobKey { job, epoch };
        assert!(dropped_by(&k(7, 1), 7, Some(2)));
        assert!(!dropped_by(&k(7, 2), 7, Some(2)));
        assert!(!dropped_by(&k(7, 3), 7, Some(2)), "newer than the applied state");
        assert!(!dropped_by(&k(8, 1), 7, Some(2)), "another job");
        assert!(dropped_by(&k(7, 3), 7, None), "the job ended: all of it");
    }
}

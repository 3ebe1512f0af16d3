//! Jobs on this agent: from a committed submit to a stored result.
//!
//! - **Admission** ([`JobsHost::prepare`]): the node that receives a submit loads and checks the
//!   graph and the parameters before anything is recorded (a malformed graph, an unknown seed or
//!   features of the wrong shape are `INVALID_ARGUMENT` naming the field), and cuts the graph's
//!   partition shapes for the cost model. It records itself as the job's *holder* and copies the
//!   graph to a second holder ([`super::replica`]) before the submit is recorded; both are the
//!   coordinator job's `holders`.
//! - **Placement** ([`spawn`]'s scheduler): on the leader, every job that needs placement gets
//!   an assignment from the cost-model load balancer, committed through Raft (`Assign`, which
//!   bumps the epoch).
//! - **Execution** ([`spawn`]'s reconciler): the job's `master` (a holder: the submitting one
//!   first; an assignment made while it is down hands the job to the other) masters the job
//!   ([`quiver_node_agent::jobs::run_master`]) at the committed epoch; owners are driven over QUIC.
//!   A master from an earlier epoch, or of a cancelled job, is stopped, and every node drops the
//!   job's partitions ([`JobRuntime::drop_job`]).
//! - **Checkpoints** go to the master's disk and to the other holders before `Checkpoint` is
//!   committed, so the holder that takes a job over resumes from the last recorded one.
//! - **Results**: the master writes `DATA_DIR/results/JOB.npy`, then commits `Complete` with the
//!   result's SHA-256 (the digest `quiver run --json` prints) or `Fail` with the reason.
//!   `FetchResult` and `Watch` are answered by the master; other nodes relay them.
//!
//! A holder that restarts finds its running jobs at an epoch whose owners it can no longer
//! reach consistently, so it asks for a fresh epoch (re-`Assign`) before it masters them again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use quiver_compute::formats::{NpyWriter, read_npy, write_npy_parts};
use quiver_compute::kernels::superstep::{ExactSum, Partials};
use quiver_compute::kernels::{self, Algorithm, Built, KernelError, Normalization, Params, Stop};
use quiver_compute::{Csr, Format, ReadOptions, Segment, read_graph_as};
use quiver_coordinator::scheduler::{SpeedModel, place_job};
use quiver_coordinator::state::{Job as CoreJob, JobState as CoreJobState, Liveness, PartitionShape};
use quiver_coordinator::{Command, Op, Outcome, RequestId};
use quiver_node_agent::jobs::{
    Checkpoint, CheckpointOut, CheckpointSink, CheckpointTaken, JobKey, JobRuntime, KernelSpec, MasterError, MasterJob,
    PartSink, Snapshot, run_master,
};
use quiver_node_agent::transport::NodeId;
use quiver_proto::control::{GraphFormat, JobProgress, JobSpec, JobState, Kernel, KernelParams};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::Status;

use super::Shared;
use super::peer;

/// How long a job's commands may wait for a leader before the next try.
const PROPOSE_WITHIN: Duration = Duration::from_secs(5);
/// Graphs kept in memory after admission (the next job on the same graph skips the load).
const GRAPH_CACHE: usize = 2;
/// Graph files whose digests are remembered (a by-path submit of an unchanged file skips
/// hashing it).
const FILE_DIGESTS: usize = 16;

/// What identifies one version of a file without reading it: device, inode, length, and the
/// modification and status-change times in nanoseconds. The status-change time cannot be set by
/// a program, so any write to the file changes the stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }

    /// Whether the file's last change is at least a second in the past: a write in the same
    /// timestamp tick as the change we saw would leave the stamp as it is (Git's "racy clean").
    fn settled(&self) -> bool {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        now - self.ctime_ns.max(self.mtime_ns) >= 1_000_000_000
    }
}

/// This node's part in running jobs.
pub struct JobsHost {
    pub runtime: Arc<JobRuntime>,
    results: PathBuf,
    tls_dir: PathBuf,
    graphs: Mutex<Vec<([u8; 32], Arc<Csr>)>>,
    /// Graph files hashed recently: path, what the file looked like, its digest.
    files: Mutex<Vec<(PathBuf, FileStamp, [u8; 32])>>,
    progress: dashmap::DashMap<u64, watch::Sender<JobProgress>>,
    masters: Mutex<HashMap<u64, (u64, AbortHandle)>>,
    /// New epochs taken per job after lost nodes (reset when it completes).
    retries: Mutex<HashMap<u64, u32>>,
}

impl JobsHost {
    pub fn new(runtime: Arc<JobRuntime>, data_dir: &Path, tls_dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            results: data_dir.join("results"),
            tls_dir: tls_dir.to_path_buf(),
            graphs: Mutex::new(Vec::new()),
            files: Mutex::new(Vec::new()),
            progress: dashmap::DashMap::new(),
            masters: Mutex::new(HashMap::new()),
            retries: Mutex::new(HashMap::new()),
        })
    }

    /// Where a job's result lives on its holder.
    pub fn result_path(&self, job: u64) -> PathBuf {
        self.results.join(format!("{job}.npy"))
    }

    /// The node's TLS directory (for relaying to a job's holder).
    pub fn tls_dir(&self) -> &Path {
        &self.tls_dir
    }

    /// Live progress of a job this node masters.
    pub fn progress(&self, job: u64) -> Option<watch::Receiver<JobProgress>> {
        self.progress.get(&job).map(|p| p.subscribe())
    }

    /// Loads and checks what a submit asks for, before it is recorded: the graph (at `path`, in
    /// the spec's format), the kernel parameters against it, and the partition shapes for the
    /// scheduler. `partitions` is the count to cut when the spec leaves it at 0. Without a known
    /// `digest` the file's SHA-256 is taken while it loads, unless this very file was hashed by a
    /// recent submit and has not changed since (its graph is then still in memory). Returns the
    /// digest and the shapes.
    pub async fn prepare(
        &self,
        shared: &Shared,
        spec: &JobSpec,
        path: &Path,
        digest: Option<[u8; 32]>,
        partitions: usize,
    ) -> Result<([u8; 32], Vec<PartitionShape>), Status> {
        let (digest, g) = match digest {
            Some(d) => (d, self.graph(shared, spec, path, d).await),
            None => {
                let before = FileStamp::of(path);
                match before.and_then(|stamp| self.known_file(path, stamp)) {
                    // The same file as a recent submit's, unchanged since: its graph is in memory.
                    Some((d, g)) => (d, Ok(g)),
                    None => self.hash_and_load(shared, spec, path).await?,
                }
            }
        };
        let g = g.map_err(|e| Status::invalid_argument(format!("graph: {e}")))?;
        let params = spec.params.clone().unwrap_or_default();
        let g2 = g.clone();
        // Checking features maps and checks a file: on the workers.
        let checked = shared
            .workers
            .run(0, move || kernel_of(&params, &g2).map(drop))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        checked.map_err(|(field, reason)| Status::invalid_argument(format!("{field}: {reason}")))?;
        // By default one partition per live member, but never more than the graph has vertices.
        let count = if spec.partitions > 0 { spec.partitions as usize } else { partitions.min(g.vertices()).max(1) };
        if count > g.vertices().max(1) {
            return Err(Status::invalid_argument(format!(
                "partitions: {count} partitions for a graph of {} vertices",
                g.vertices()
            )));
        }
        if count > 4096 {
            return Err(Status::invalid_argument(format!("partitions: {count} is more than 4096")));
        }
        let bounds = quiver_compute::partition::boundaries(&g, count, quiver_compute::partition::default_alpha(count))
            .map_err(|e| Status::invalid_argument(format!("partitions: {e}")))?;
        let offsets = g.offsets();
        let shapes = bounds
            .windows(2)
            .map(|w| PartitionShape {
                vertices: u64::from(w[1] - w[0]),
                edges: offsets[w[1] as usize] - offsets[w[0] as usize],
            })
            .collect();
        Ok((digest, shapes))
    }

    /// The graph with this digest: from memory, or loaded from `path` on the workers.
    ///
    /// A file outside this node's data directory is a user's by-path graph, which Quiver did not
    /// write and cannot keep from changing: rewritten in place (`cp` truncates the same inode), a
    /// mapping of it would read the new bytes, or fault past a shorter end. So it is used only
    /// while its stamp is the one it had when its digest was taken; otherwise it is hashed again
    /// (dropping any graph mapped from it), and a different digest fails the job with that
    /// reason. Files under the data directory (uploads, replicas) are written once and renamed
    /// into place, so they cannot change under a mapping.
    async fn graph(&self, shared: &Shared, spec: &JobSpec, path: &Path, digest: [u8; 32]) -> Result<Arc<Csr>, String> {
        if !self.unchanged_by_stamp(shared, path, digest) {
            self.graphs.lock().expect("graph cache").retain(|(d, _)| *d != digest);
            let (now, loaded) = self.hash_and_load(shared, spec, path).await.map_err(|e| e.message().to_string())?;
            changed(path, now, digest)?;
            return loaded;
        }
        if let Some(g) =
            self.graphs.lock().expect("graph cache").iter().find(|(d, _)| *d == digest).map(|(_, g)| g.clone())
        {
            return Ok(g);
        }
        Ok(self.remember(digest, self.load(shared, spec, path).await?))
    }

    /// Hashes the file at `path` (remembering its digest, [`Self::hash_named_file`]) while
    /// loading it.
    async fn hash_and_load(
        &self,
        shared: &Shared,
        spec: &JobSpec,
        path: &Path,
    ) -> Result<([u8; 32], Result<Arc<Csr>, String>), Status> {
        let (hashed, loaded) = tokio::join!(self.hash_named_file(path), self.load(shared, spec, path));
        let d = hashed.map_err(|e| Status::invalid_argument(format!("graph_path: {e}")))?;
        Ok((d, loaded.map(|g| self.remember(d, g))))
    }

    /// Loads the graph at `path` on the workers, in the spec's format (else by extension, else
    /// by its first bytes).
    async fn load(&self, shared: &Shared, spec: &JobSpec, path: &Path) -> Result<Csr, String> {
        let format = match GraphFormat::try_from(spec.format) {
            Ok(GraphFormat::Snap) => Some(Format::EdgeList),
            Ok(GraphFormat::MatrixMarket) => Some(Format::MatrixMarket),
            Ok(GraphFormat::QuiverCsr) => Some(Format::Qcsr),
            _ => None,
        };
        let path = path.to_path_buf();
        shared
            .workers
            .run(0, move || {
                let format = match format.or_else(|| Format::from_path(&path).ok()) {
                    Some(f) => f,
                    None => {
                        let mut head = [0u8; 16];
                        let n = std::io::Read::read(&mut std::fs::File::open(&path)?, &mut head)?;
                        Format::sniff(&head[..n])
                    }
                };
                read_graph_as(&path, format, &ReadOptions::default()).map_err(std::io::Error::other)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// The SHA-256 of a user's file named by a submit (a by-path graph, an APPNP features file),
    /// remembered against the file's stamp from before the hash began, so that a later reader can
    /// trust it unread while the stamp holds ([`Self::unchanged_by_stamp`]).
    pub async fn hash_named_file(&self, path: &Path) -> Result<[u8; 32], String> {
        let before = FileStamp::of(path);
        let owned = path.to_path_buf();
        let digest =
            tokio::task::spawn_blocking(move || crate::run::sha256_file(&owned)).await.map_err(|e| e.to_string())??;
        if let Some(stamp) = before {
            self.remember_file(path, stamp, digest);
        }
        Ok(digest)
    }

    /// Checks that a file a job names besides its graph (an APPNP features file) still has the
    /// digest the submit recorded, before an epoch maps it: by [`Self::unchanged_by_stamp`], else
    /// by hashing it again.
    async fn unchanged_since_submit(&self, shared: &Shared, path: &Path, digest: [u8; 32]) -> Result<(), String> {
        if self.unchanged_by_stamp(shared, path, digest) {
            return Ok(());
        }
        changed(path, self.hash_named_file(path).await?, digest)
    }

    /// Whether the file at `path` can be read as the one hashed to `digest` without hashing it
    /// again: it lies under the data directory (uploads and replicas are written once and renamed
    /// into place), or it still has the stamp it had when it was hashed (false when this node
    /// never recorded that, e.g. since a restart).
    fn unchanged_by_stamp(&self, shared: &Shared, path: &Path, digest: [u8; 32]) -> bool {
        path.starts_with(&shared.data_dir)
            || FileStamp::of(path).and_then(|now| self.recorded_digest(path, now)) == Some(digest)
    }

    /// The digest and graph of the file at `path`, now as `stamp` describes it, when a recent
    /// submit hashed that very file and it has not changed since (same device, inode, length,
    /// modification and change times) and its graph is still in memory.
    fn known_file(&self, path: &Path, stamp: FileStamp) -> Option<([u8; 32], Arc<Csr>)> {
        let digest = self.recorded_digest(path, stamp)?;
        let graphs = self.graphs.lock().expect("graph cache");
        graphs.iter().find(|(d, _)| *d == digest).map(|(d, g)| (*d, g.clone()))
    }

    /// The digest [`Self::remember_file`] recorded for the file at `path` as `stamp` describes
    /// it (one record per path: the latest).
    fn recorded_digest(&self, path: &Path, stamp: FileStamp) -> Option<[u8; 32]> {
        let files = self.files.lock().expect("file digests");
        files.iter().find(|(p, s, _)| p == path && *s == stamp).map(|(_, _, d)| *d)
    }

    /// Remembers that the file at `path`, as `stamp` describes it before it was hashed, has
    /// `digest` — if it still looks the same now, and its last change is old enough that a
    /// change within the file system's timestamp granularity cannot hide behind it.
    fn remember_file(&self, path: &Path, stamp: FileStamp, digest: [u8; 32]) {
        if FileStamp::of(path) != Some(stamp) || !stamp.settled() {
            return;
        }
        let mut files = self.files.lock().expect("file digests");
        files.retain(|(p, _, _)| p != path);
        files.push((path.to_path_buf(), stamp, digest));
        if files.len() > FILE_DIGESTS {
            files.remove(0);
        }
    }

    /// Keeps `g` in the cache of recently used graphs under `digest`.
    fn remember(&self, digest: [u8; 32], g: Csr) -> Arc<Csr> {
        let g = Arc::new(g);
        let mut cache = self.graphs.lock().expect("graph cache");
        cache.retain(|(d, _)| *d != digest);
        cache.push((digest, g.clone()));
        if cache.len() > GRAPH_CACHE {
            cache.remove(0);
        }
        g
    }
}

/// The error for a user's file whose SHA-256 is `now` where the job recorded `then`.
fn changed(path: &Path, now: [u8; 32], then: [u8; 32]) -> Result<(), String> {
    if now == then {
        return Ok(());
    }
    Err(format!(
        "{}: the file changed since the job was submitted (SHA-256 {} now, {} then); submit it again",
        path.display(),
        crate::run::hex(&now),
        crate::run::hex(&then)
    ))
}

/// The kernel, the APPNP features (the whole matrix from a features file; `None` for seeded
/// features, which each owner generates for its own rows) and the stop rule of a job.
pub type JobKernel = (KernelSpec, Option<Segment<f32>>, Stop);

/// The kernel, the APPNP features and the stop rule a spec asks for on graph `g`; errors name
/// the spec field and the reason. Reads a features file (mapped, not copied) but never generates
/// features, so submit checks a spec with it as cheaply as the master builds the job.
pub fn kernel_of(p: &KernelParams, g: &Csr) -> Result<JobKernel, (&'static str, String)> {
    let n = g.vertices();
    let stop = if p.tolerance > 0.0 {
        Stop::tolerance(p.tolerance as f32, p.max_iterations)
    } else {
        Stop::iterations(p.max_iterations)
    };
    let coefficient = p.alpha as f32;
    // The features, the rows they cover (the graph's vertices; none for seeded features, which
    // the owners generate) and their width.
    let (features, rows, width) = if Kernel::try_from(p.kernel) == Ok(Kernel::Appnp) {
        if p.features_path.is_empty() {
            if p.width == 0 {
                return Err(("params.width", "appnp needs a feature width of at least 1".into()));
            }
            (Segment::from_floats(Vec::new()), 0, p.width as usize)
        } else {
            let a =
                read_npy::<f32>(Path::new(&p.features_path)).map_err(|e| ("params.features_path", e.to_string()))?;
            if a.shape.len() != 2 || a.rows() != n {
                return Err((
                    "params.features_path",
                    format!(
                        "{}: features must be a {n} × d f32 matrix (one row per vertex), found shape {:?}",
                        p.features_path, a.shape
                    ),
                ));
            }
            if p.width != 0 && a.cols() != p.width as usize {
                return Err((
                    "params.width",
                    format!("{} does not match the {} columns of {}", p.width, a.cols(), p.features_path),
                ));
            }
            // The file's mapping itself: no copy of what may be the job's largest input.
            let width = a.cols();
            (a.data, n, width)
        }
    } else {
        (Segment::from_floats(Vec::new()), n, 1)
    };
    let algorithm = match Kernel::try_from(p.kernel) {
        Ok(Kernel::Pagerank) => Algorithm::PageRank { damping: coefficient },
        Ok(Kernel::PersonalizedPagerank) => Algorithm::PersonalizedPageRank { damping: coefficient, seeds: &p.seeds },
        Ok(Kernel::Heat) => Algorithm::HeatKernel { t: coefficient, seeds: &p.seeds },
        Ok(Kernel::Appnp) => Algorithm::Appnp {
            alpha: coefficient,
            normalization: if p.random_walk { Normalization::RandomWalk } else { Normalization::Symmetric },
            features: &features,
            dim: width,
        },
        _ => return Err(("params.kernel", format!("unknown algorithm {}", p.kernel))),
    };
    let built = kernels::build(rows, &Params { algorithm, stop }).map_err(|e| {
        let field = match e {
            KernelError::NoSeeds { .. } | KernelError::UnknownSeed { .. } => "params.seeds",
            KernelError::FeatureShape { .. } | KernelError::ZeroDimension => "params.features_path",
            KernelError::Tolerance(_) => "params.tolerance",
            _ => "params.alpha",
        };
        (field, e.to_string())
    })?;
    Ok(match built {
        Built::PageRank(k) => (KernelSpec::PageRank(k), None, stop),
        Built::Heat(k) => (KernelSpec::Heat(k), None, stop),
        Built::Appnp(k) => {
            let feature_seed = p.features_path.is_empty().then_some(p.feature_seed);
            let spec = KernelSpec::Appnp { alpha: k.alpha, normalization: k.normalization, dim: k.dim, feature_seed };
            (spec, feature_seed.is_none().then_some(features), stop)
        }
    })
}

/// The proto spec recorded with a job.
pub fn spec_of(job: &CoreJob) -> Option<JobSpec> {
    JobSpec::decode(&job.spec.params[..]).ok()
}

/// Starts the scheduler (acts while this node leads) and the reconciler (starts and stops this
/// node's masters and partitions as the replicated state changes).
pub fn spawn(shared: Shared) {
    tokio::spawn(async move {
        let mut view = shared.view.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut placing: HashSet<(u64, u64)> = HashSet::new();
        // Running jobs this process did not start: they need a new epoch before it masters them.
        let mut inherited: Option<HashSet<u64>> = None;
        let mut reassigning: HashSet<(u64, u64)> = HashSet::new();
        // Leader only: since when no holder of a job has been alive.
        let mut unreachable: HashMap<u64, std::time::Instant> = HashMap::new();
        let mut collected = std::time::Instant::now();
        loop {
            tokio::select! {
                changed = view.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            metrics::gauge!("quiver_job_partitions_running").set(shared.jobs.runtime.running_partitions() as f64);
            let v = view.borrow_and_update().clone();
            if !v.ready {
                continue;
            }
            let me = shared.node_id;
            let inherited = inherited.get_or_insert_with(|| {
                v.state
                    .jobs
                    .values()
                    .filter(|j| j.state == CoreJobState::Running && j.master == me)
                    .map(|j| j.id)
                    .collect()
            });
            if v.status.is_leader {
                schedule(&shared, &v.state, &mut placing);
                fail_unreachable(&shared, &v.state, &mut unreachable, std::time::Instant::now());
            } else {
                unreachable.clear();
            }
            reconcile(&shared, &v.state, inherited, &mut reassigning);
            if collected.elapsed() >= GARBAGE_EVERY {
                collected = std::time::Instant::now();
                let (dir, state) = (shared.data_dir.clone(), v.state.clone());
                tokio::task::spawn_blocking(move || {
                    let removed = super::replica::collect_garbage(&dir, &state, std::time::SystemTime::now());
                    if !removed.is_empty() {
                        tracing::info!(files = removed.len(), "removed blobs and checkpoints no unfinished job needs");
                    }
                });
            }
        }
    });
}

/// Leader only: commits an assignment for every job that needs one.
fn schedule(shared: &Shared, state: &quiver_coordinator::ClusterState, placing: &mut HashSet<(u64, u64)>) {
    placing.retain(|(job, epoch)| state.jobs.get(job).is_some_and(|j| j.epoch == *epoch && !j.state.is_terminal()));
    for job in state.jobs_needing_placement() {
        if !placing.insert((job.id, job.epoch)) {
            continue;
        }
        let op = if job.data_lost(&state.members) {
            let holders: Vec<String> = job.spec.holders.iter().map(|h| h.to_string()).collect();
            Op::Fail {
                job: job.id,
                epoch: job.epoch,
                reason: format!(
                    "every node that held the job's graph and checkpoints ({}) left the cluster: its data is lost",
                    holders.join(", ")
                ),
            }
        } else {
            match place_job(job, state, &SpeedModel::default()) {
                Ok(assignment) => Op::Assign { job: job.id, expected_epoch: job.epoch, assignment },
                Err(e) => Op::Fail { job: job.id, epoch: job.epoch, reason: format!("no placement: {e}") },
            }
        };
        let shared = shared.clone();
        let key = (job.id, job.epoch);
        tokio::spawn(async move {
            let cmd = Command { request: RequestId { client: shared.node_id, seq: unique_seq() }, op };
            if let Err(e) = peer::propose(&shared, cmd, PROPOSE_WITHIN).await {
                tracing::warn!(job = key.0, error = %e, "placing the job failed; retrying");
            }
        });
    }
}

/// How often the data directory is swept for blobs and checkpoints no unfinished job needs.
const GARBAGE_EVERY: Duration = Duration::from_secs(60);

/// How long every holder of a job may be down before the job fails as unreachable.
const HOLDERS_DOWN_GRACE: Duration = Duration::from_secs(60);

/// The unfinished jobs none of whose holders is alive, each with the time it was first seen so;
/// `since` keeps that time across calls and forgets jobs that have a holder again.
fn holders_down(
    state: &quiver_coordinator::ClusterState,
    since: &mut HashMap<u64, std::time::Instant>,
    now: std::time::Instant,
) -> Vec<(u64, Duration)> {
    let alive = |n: &u64| state.members.get(n).is_some_and(|m| m.liveness == Liveness::Alive);
    let down: HashSet<u64> = state
        .jobs
        .values()
        .filter(|j| !j.state.is_terminal() && !j.spec.holders.is_empty() && !j.spec.holders.iter().any(alive))
        .map(|j| j.id)
        .collect();
    since.retain(|job, _| down.contains(job));
    down.into_iter().map(|job| (job, now.saturating_duration_since(*since.entry(job).or_insert(now)))).collect()
}

/// Leader only: fails a job whose holders have all been down for [`HOLDERS_DOWN_GRACE`] (it
/// would otherwise wait for them for ever; a holder that has left fails it at once, in
/// [`schedule`]).
fn fail_unreachable(
    shared: &Shared,
    state: &quiver_coordinator::ClusterState,
    since: &mut HashMap<u64, std::time::Instant>,
    now: std::time::Instant,
) {
    for (id, down) in holders_down(state, since, now) {
        if down < HOLDERS_DOWN_GRACE {
            continue;
        }
        let Some(job) = state.jobs.get(&id) else { continue };
        let holders: Vec<String> = job.spec.holders.iter().map(|h| h.to_string()).collect();
        let op = Op::Fail {
            job: id,
            epoch: job.epoch,
            reason: format!(
                "every node that holds the job's graph and checkpoints ({}) has been down for {}s: its data is unreachable",
                holders.join(", "),
                down.as_secs()
            ),
        };
        since.remove(&id);
        let shared = shared.clone();
        tokio::spawn(async move {
            let cmd = Command { request: RequestId { client: shared.node_id, seq: unique_seq() }, op };
            if let Err(e) = peer::propose(&shared, cmd, PROPOSE_WITHIN).await {
                tracing::warn!(job = id, error = %e, "failing an unreachable job failed; retrying");
            }
        });
    }
}

/// Which of a job's partitions on this node the applied state still wants.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    /// The job runs: partitions of this epoch or a newer one (not applied here yet) stay.
    From(u64),
    /// The job's first assignment is not applied here yet: it was submitted in an entry this
    /// node has not applied (a job's id is its submit's log index), or it is still pending
    /// here. Its master, ahead of this node, may already run it; the owners it started here stay.
    NotYetApplied,
    /// The job ended, or there is no such job: every partition goes.
    None,
}

fn partitions_wanted(state: &quiver_coordinator::ClusterState, job: u64) -> Wanted {
    match state.jobs.get(&job) {
        Some(j) if j.state == CoreJobState::Running => Wanted::From(j.epoch),
        Some(j) if j.state == CoreJobState::Pending => Wanted::NotYetApplied,
        None if job > state.applied_index => Wanted::NotYetApplied,
        _ => Wanted::None,
    }
}

fn reconcile(
    shared: &Shared,
    state: &quiver_coordinator::ClusterState,
    inherited: &mut HashSet<u64>,
    reassigning: &mut HashSet<(u64, u64)>,
) {
    let host = &shared.jobs;
    let me = shared.node_id;
    // An inherited job stays so only until the epoch this node asked for (or any newer one) is
    // committed: that epoch's master starts fresh from the checkpoint.
    inherited.retain(|job| {
        state.jobs.get(job).is_some_and(|j| {
            j.state == CoreJobState::Running && !reassigning.iter().any(|(id, e)| *id == j.id && *e < j.epoch)
        })
    });
    // Stop what the state no longer wants.
    {
        let mut masters = host.masters.lock().expect("masters");
        masters.retain(|job, (epoch, handle)| {
            let keep = state.jobs.get(job).is_some_and(|j| j.state == CoreJobState::Running && j.epoch == *epoch);
            if !keep {
                handle.abort();
            }
            keep
        });
    }
    for j in state.jobs.values().filter(|j| j.state == CoreJobState::Running) {
        host.runtime.set_epoch(j.id, j.epoch);
    }
    for job in host.runtime.jobs() {
        match partitions_wanted(state, job) {
            Wanted::From(epoch) => host.runtime.drop_job(job, Some(epoch)),
            Wanted::NotYetApplied => {}
            Wanted::None => {
                host.runtime.drop_job(job, None);
                host.runtime.forget(job);
            }
        }
    }
    host.progress.retain(|job, _| state.jobs.get(job).is_some_and(|j| !j.state.is_terminal()));
    // Start what it wants here.
    for j in state.jobs.values() {
        if j.state != CoreJobState::Running || j.assignment.len() != j.spec.partitions.len() {
            continue;
        }
        let Some(spec) = spec_of(j) else { continue };
        if j.master != me {
            continue;
        }
        if inherited.contains(&j.id) {
            // Ask once per epoch for a fresh one; the new epoch is not inherited.
            if reassigning.insert((j.id, j.epoch)) {
                let assignment = place_job(j, state, &SpeedModel::default()).unwrap_or_else(|_| j.assignment.clone());
                let op = Op::Assign { job: j.id, expected_epoch: j.epoch, assignment };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let cmd = Command { request: RequestId { client: shared.node_id, seq: unique_seq() }, op };
                    let _ = peer::propose(&shared, cmd, PROPOSE_WITHIN).await;
                });
            }
            continue;
        }
        let mut masters = host.masters.lock().expect("masters");
        if masters.get(&j.id).is_some_and(|(e, _)| *e == j.epoch) {
            continue;
        }
        let handle = tokio::spawn(master(shared.clone(), j.clone(), spec)).abort_handle();
        masters.insert(j.id, (j.epoch, handle));
    }
}

fn progress_of(job: &CoreJob, state: JobState, superstep: u64, residual: f64) -> JobProgress {
    JobProgress { job_id: job.id, state: state as i32, superstep, residual, epoch: job.epoch }
}

/// Masters one epoch of a job and records how it ended: `Complete`, `Fail`, or — when a node or
/// link was lost — a new epoch (`Assign` with the lost partitions re-placed), whose master
/// resumes from the last checkpoint.
async fn master(shared: Shared, job: CoreJob, spec: JobSpec) {
    let host = shared.jobs.clone();
    let (ptx, _) = watch::channel(progress_of(&job, JobState::Running, 0, f64::INFINITY));
    host.progress.insert(job.id, ptx.clone());
    let started = std::time::Instant::now();
    let (ctx, crx) = tokio::sync::mpsc::unbounded_channel();
    let checkpoints = CheckpointOut {
        sink: Arc::new(CheckpointFiles { data_dir: shared.data_dir.clone(), job: job.id }),
        taken: ctx,
    };
    let files = JobFiles::of(&shared, &spec, &job.graph_digest).map(Arc::new);
    let parts = job.assignment.len();
    let store = tokio::spawn(store_checkpoints(shared.clone(), job.id, job.epoch, parts, files.clone().ok(), crx));
    let run = async {
        let files = files.map_err(fatal)?;
        let g = host.graph(&shared, &spec, &files.graph, job.graph_digest).await.map_err(fatal)?;
        let mut params = spec.params.clone().unwrap_or_default();
        if let Some((path, digest)) = &files.features {
            host.unchanged_since_submit(&shared, path, *digest).await.map_err(fatal)?;
            params.features_path = path.display().to_string();
        }
        let g2 = g.clone();
        let (kernel, features, stop) = shared
            .workers
            .run(0, move || kernel_of(&params, &g2))
            .await
            .map_err(|e| fatal(e.to_string()))?
            .map_err(|(field, reason)| fatal(format!("{field}: {reason}")))?;
        let owners: Vec<NodeId> = job.assignment.values().map(|&n| NodeId(n)).collect();
        let resume = match job.last_checkpoint {
            Some(c) => load_checkpoint(&shared, job.id, c.superstep, owners.len()).await,
            None => None,
        };
        tracing::info!(
            job = job.id,
            epoch = job.epoch,
            partitions = owners.len(),
            resume_from = resume.as_ref().map(|r| r.step),
            "mastering job"
        );
        if let Some(r) = &resume {
            ptx.send_replace(progress_of(&job, JobState::Running, u64::from(r.step), f64::from(r.partials.residual)));
        }
        let mj = MasterJob {
            key: JobKey { job: job.id, epoch: job.epoch },
            graph: g.clone(),
            graph_digest: job.graph_digest,
            kernel,
            features,
            stop,
            owners,
            checkpoint_every: (spec.checkpoint_every > 0).then_some(spec.checkpoint_every),
            checkpoint_seconds: CHECKPOINT_SECONDS,
            resume,
        };
        let out = run_master(host.runtime.clone(), mj, Some(checkpoints), |r| {
            metrics::counter!("quiver_job_supersteps_total").increment(1);
            ptx.send_replace(progress_of(&job, JobState::Running, u64::from(r.step), f64::from(r.residual)));
        })
        .await?;
        let path = host.result_path(job.id);
        let n = g.vertices();
        let iterations = out.iterations;
        let digest = shared
            .workers
            .run(0, move || -> Result<[u8; 32], String> {
                let shape = if out.width == 1 { vec![n] } else { vec![n, out.width] };
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                }
                let tmp = path.with_extension("npy.part");
                let parts = out.slices();
                write_npy_parts(&tmp, &shape, &parts).map_err(|e| e.to_string())?;
                std::fs::rename(&tmp, &path).map_err(|e| format!("storing {}: {e}", path.display()))?;
                Ok(crate::run::digest_parts(&parts))
            })
            .await
            .map_err(|e| fatal(e.to_string()))?
            .map_err(fatal)?;
        Ok::<_, MasterError>((digest, iterations))
    };
    let outcome = run.await;
    if outcome.is_ok() {
        // A finished job needs no more checkpoints.
        store.abort();
    } else {
        // Let the last checkpoint reach the disk and the log before deciding what comes next.
        let _ = store.await;
    }
    let op = match outcome {
        Ok((digest, iterations)) => {
            tracing::info!(job = job.id, iterations, seconds = started.elapsed().as_secs_f64(), "job finished");
            metrics::counter!("quiver_jobs_finished_total", "outcome" => "succeeded").increment(1);
            host.retries.lock().expect("retries").remove(&job.id);
            Op::Complete { job: job.id, epoch: job.epoch, result_digest: digest }
        }
        Err(e) if e.retryable => {
            let attempt = {
                let mut r = host.retries.lock().expect("retries");
                let a = r.entry(job.id).or_insert(0);
                *a += 1;
                *a
            };
            if attempt > MAX_EPOCH_RETRIES {
                metrics::counter!("quiver_jobs_finished_total", "outcome" => "failed").increment(1);
                Op::Fail {
                    job: job.id,
                    epoch: job.epoch,
                    reason: format!("{} (gave up after {MAX_EPOCH_RETRIES} new epochs)", e.reason),
                }
            } else {
                // Give liveness a moment to mark the lost node down, so the new placement avoids it.
                let wait = Duration::from_millis(250u64 << attempt.min(3));
                tracing::warn!(job = job.id, epoch = job.epoch, reason = %e.reason, attempt, "lost a partition; re-placing it in a new epoch");
                metrics::counter!("quiver_job_recoveries_total").increment(1);
                tokio::time::sleep(wait).await;
                let v = shared.view.borrow().clone();
                let Some(current) =
                    v.state.jobs.get(&job.id).filter(|j| j.epoch == job.epoch && !j.state.is_terminal())
                else {
                    return;
                };
                match place_job(current, &v.state, &SpeedModel::default()) {
                    Ok(assignment) => Op::Assign { job: job.id, expected_epoch: job.epoch, assignment },
                    Err(p) => Op::Fail {
                        job: job.id,
                        epoch: job.epoch,
                        reason: format!("{}; no new placement: {p}", e.reason),
                    },
                }
            }
        }
        Err(e) => {
            tracing::warn!(job = job.id, reason = %e.reason, "job failed");
            metrics::counter!("quiver_jobs_finished_total", "outcome" => "failed").increment(1);
            Op::Fail { job: job.id, epoch: job.epoch, reason: e.reason }
        }
    };
    let request = RequestId { client: shared.node_id, seq: unique_seq() };
    for _ in 0..20 {
        let cmd = Command { request, op: op.clone() };
        match peer::propose(&shared, cmd, PROPOSE_WITHIN).await {
            Ok(Outcome::Rejected(r)) => {
                tracing::info!(job = job.id, reason = %r, "the job's outcome was not recorded (it moved on)");
                return;
            }
            Ok(_) => return,
            Err(e) => tracing::warn!(job = job.id, error = %e, "recording the job's outcome; retrying"),
        }
    }
}

fn fatal(reason: impl Into<String>) -> MasterError {
    MasterError { reason: reason.into(), retryable: false }
}

/// Superstep time between checkpoints when the job does not fix `checkpoint_every`.
pub(crate) const CHECKPOINT_SECONDS: f64 = 5.0;
/// New epochs a job may take after losing nodes before it fails.
const MAX_EPOCH_RETRIES: u32 = 8;

/// Where this node finds a job's graph: the submitted path on the holder that took the submit,
/// the content-addressed copy (`DATA_DIR/blobs/<sha256>`) on any other holder.
/// Where a job's input files are on this node: the submitting holder has them where the submit
/// named them; every other holder keeps them by digest under `DATA_DIR/blobs/`.
pub(crate) struct JobFiles {
    pub graph: PathBuf,
    pub graph_digest: [u8; 32],
    /// The APPNP features file named by path, with its digest.
    pub features: Option<(PathBuf, [u8; 32])>,
}

impl JobFiles {
    fn of(shared: &Shared, spec: &JobSpec, graph_digest: &[u8; 32]) -> Result<Self, String> {
        let submitter = spec.holder == shared.node_id;
        let here = |given: &str, digest: &[u8; 32]| {
            if submitter { PathBuf::from(given) } else { shared.data_dir.join(super::replica::graph_name(digest)) }
        };
        let named = spec.params.as_ref().map(|p| p.features_path.as_str()).unwrap_or_default();
        let features = if named.is_empty() {
            None
        } else {
            let digest = <[u8; 32]>::try_from(spec.features_digest.as_slice())
                .map_err(|_| "params.features_path: the job recorded no digest for its features file".to_string())?;
            Some((here(named, &digest), digest))
        };
        Ok(Self { graph: here(&spec.graph_path, graph_digest), graph_digest: *graph_digest, features })
    }
}

fn checkpoint_dir(data_dir: &Path, job: u64, step: u32) -> PathBuf {
    data_dir.join("checkpoints").join(job.to_string()).join(step.to_string())
}

/// The master's checkpoint sink: each partition's part goes straight into
/// `DATA_DIR/checkpoints/JOB/STEP/pI.values.npy` and `pI.aux.npy` as it arrives (a remote
/// owner's in pieces), so a checkpoint never sits whole in the agent's memory. The files are not
/// synced here, on the job's critical path: [`store_checkpoints`] syncs them before it writes
/// `meta.json`, which alone makes the checkpoint complete.
struct CheckpointFiles {
    data_dir: PathBuf,
    job: u64,
}

impl CheckpointSink for CheckpointFiles {
    fn begin(&self, step: u32, partition: u32, values: usize) -> Result<Box<dyn PartSink>, String> {
        let dir = checkpoint_dir(&self.data_dir, self.job, step);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let writer =
            NpyWriter::create(dir.join(format!("p{partition}.values.npy")), &[values]).map_err(|e| e.to_string())?;
        Ok(Box::new(CheckpointPart { aux: dir.join(format!("p{partition}.aux.npy")), values: writer }))
    }
}

struct CheckpointPart {
    values: NpyWriter<f32>,
    aux: PathBuf,
}

impl PartSink for CheckpointPart {
    fn values(&mut self, values: &[f32]) -> Result<(), String> {
        self.values.write(values).map_err(|e| e.to_string())
    }

    fn finish(self: Box<Self>, aux: &[f32]) -> Result<(), String> {
        self.values.finish(false).map_err(|e| e.to_string())?;
        let mut w = NpyWriter::create(&self.aux, &[aux.len()]).map_err(|e| e.to_string())?;
        w.write(aux).map_err(|e| e.to_string())?;
        w.finish(false).map_err(|e| e.to_string())
    }
}

/// Completes each checkpoint whose parts the master has put in `DATA_DIR/checkpoints/JOB/STEP/`
/// ([`CheckpointFiles`]): syncs them, writes `meta.json` last, atomically (a directory without
/// it is incomplete), copies the checkpoint to the job's other holders (`meta.json` last there
/// too), records it through Raft, and removes the job's older checkpoints.
async fn store_checkpoints(
    shared: Shared,
    job: u64,
    epoch: u64,
    parts: usize,
    files: Option<Arc<JobFiles>>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<CheckpointTaken>,
) {
    // Whether a second holder was sought for a job that had one holder (once per epoch).
    let mut sought = false;
    // Whether the last checkpoint found no other holder (warned once, not every checkpoint).
    let mut alone = false;
    while let Some(c) = rx.recv().await {
        let dir = checkpoint_dir(&shared.data_dir, job, c.step);
        let step = c.step;
        let t = std::time::Instant::now();
        // File I/O on the blocking pool, not on a compute worker: syncing an APPNP checkpoint
        // (hundreds of MB at disk speed) there would stall the local partition's supersteps.
        let written = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let io = |e: std::io::Error| format!("{}: {e}", dir.display());
            fail::fail_point!(quiver_node_agent::failpoints::JOB_CHECKPOINT, |_| Err(format!(
                "{}: failpoint {}",
                dir.display(),
                quiver_node_agent::failpoints::JOB_CHECKPOINT
            )));
            for i in 0..parts {
                for f in [format!("p{i}.values.npy"), format!("p{i}.aux.npy")] {
                    let path = dir.join(f);
                    std::fs::File::open(&path)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            let meta = serde_json::json!({
                "step": c.step,
                "mass": c.partials.mass.0.to_string(),
                "residual_bits": c.partials.residual.to_bits(),
                "partitions": parts,
            });
            let tmp = dir.join("meta.json.part");
            std::fs::write(&tmp, meta.to_string()).map_err(io)?;
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
            std::fs::rename(&tmp, dir.join("meta.json")).map_err(io)?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(e) = written {
            tracing::warn!(job, step, error = %e, "checkpoint not written; the job goes on without it");
            continue;
        }
        // The holders as recorded now. A job gets its second holder with its first checkpoint:
        // a job that ends sooner never pays for the copy (nor would a restart lose more).
        let recorded = || shared.view.borrow().state.jobs.get(&job).map(|j| j.spec.holders.clone()).unwrap_or_default();
        let mut holders: Vec<u64> = recorded();
        if holders.len() < 2
            && !std::mem::replace(&mut sought, true)
            && let Some(files) = &files
        {
            super::replica::second_holder(&shared, job, files).await;
            holders = recorded();
        }
        let others: Vec<u64> = holders.iter().copied().filter(|&h| h != shared.node_id).collect();
        if !others.is_empty() {
            let mut files: Vec<String> =
                (0..parts).flat_map(|i| [format!("p{i}.values.npy"), format!("p{i}.aux.npy")]).collect();
            files.push("meta.json".into());
            let mut copied = others.clone();
            for f in files {
                let name = format!("checkpoints/{job}/{step}/{f}");
                let have = super::replica::push_all(&shared, &copied, &name).await;
                copied.retain(|n| have.contains(n));
            }
            if copied.is_empty() && !alone {
                tracing::warn!(job, step, "the job's checkpoints have no second copy (no other holder takes them)");
            }
            alone = copied.is_empty();
        }
        metrics::histogram!("quiver_job_checkpoint_seconds").record(t.elapsed().as_secs_f64());
        let cmd = Command {
            request: RequestId { client: shared.node_id, seq: unique_seq() },
            op: Op::Checkpoint { job, epoch, superstep: u64::from(step) },
        };
        if let Ok(Outcome::Done) = peer::propose(&shared, cmd, PROPOSE_WITHIN).await {
            super::replica::remove_checkpoints_before(&shared.data_dir, job, step);
        }
    }
}

/// The checkpoint after `step`, if it is complete on this node's disk.
async fn load_checkpoint(shared: &Shared, job: u64, step: u64, parts: usize) -> Option<Checkpoint> {
    let step = u32::try_from(step).ok()?;
    let dir = checkpoint_dir(&shared.data_dir, job, step);
    let loaded = shared
        .workers
        .run(0, move || -> Result<Checkpoint, String> {
            let meta: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.join("meta.json")).map_err(|e| format!("{}: {e}", dir.display()))?,
            )
            .map_err(|e| e.to_string())?;
            if meta["step"].as_u64() != Some(u64::from(step)) || meta["partitions"].as_u64() != Some(parts as u64) {
                return Err(format!("{}: the checkpoint does not match the job's {parts} partitions", dir.display()));
            }
            let mass: i128 = meta["mass"].as_str().and_then(|m| m.parse().ok()).ok_or("meta.json: mass")?;
            let residual = f32::from_bits(meta["residual_bits"].as_u64().ok_or("meta.json: residual")? as u32);
            let mut snaps = Vec::with_capacity(parts);
            for i in 0..parts {
                let values = read_npy::<f32>(dir.join(format!("p{i}.values.npy"))).map_err(|e| e.to_string())?.data;
                let aux = read_npy::<f32>(dir.join(format!("p{i}.aux.npy"))).map_err(|e| e.to_string())?.data;
                snaps.push(Snapshot { values, aux });
            }
            Ok(Checkpoint { step, partials: Partials { mass: ExactSum(mass), residual }, parts: snaps })
        })
        .await;
    match loaded {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) | Err(quiver_node_agent::workers::WorkerError::Panicked(e)) => {
            tracing::warn!(job, step, error = %e, "checkpoint unusable; starting the job over");
            None
        }
        Err(e) => {
            tracing::warn!(job, step, error = %e, "checkpoint unusable; starting the job over");
            None
        }
    }
}

/// A request sequence unique to this process's commands (time-based, strictly increasing).
pub(crate) fn unique_seq() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use quiver_coordinator::{ClusterState, Op};

    use super::super::fixtures::{apply, job_spec, member};
    use super::{FileStamp, Wanted, holders_down, partitions_wanted};

    /// Any write changes a file's stamp (its change time moves even when its length and
    /// modification time are put back), and a file changed just now is not yet trusted.
    #[test]
    fn a_file_stamp_changes_with_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.el");
        std::fs::write(&path, "0 1\n").unwrap();
        let first = FileStamp::of(&path).unwrap();
        assert_eq!(FileStamp::of(&path), Some(first), "nothing changed");
        assert!(!first.settled(), "written a moment ago");
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        // Same length, same modification time afterwards: only the change time tells.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut later = first;
        while later == first && Instant::now() < deadline {
            std::fs::write(&path, "1 0\n").unwrap();
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
            later = FileStamp::of(&path).unwrap();
        }
        assert_ne!(later, first, "rewriting the file changed its stamp");
        assert_eq!((later.len, later.mtime_ns), (first.len, first.mtime_ns));
        assert!(FileStamp::of(&dir.path().join("missing")).is_none());
        let old = FileStamp { ctime_ns: 0, mtime_ns: 0, ..first };
        assert!(old.settled());
    }

    /// A node whose state lags the master's keeps the owners that master started here: of a
    /// job it has not applied yet, and of an epoch newer than the one it has applied (stopping
    /// them cost a warm job a lost partition and a new epoch, 0.5 s).
    #[test]
    fn partitions_of_a_job_not_applied_here_yet_stay() {
        let mut s = ClusterState::bootstrap(&[member(1), member(2), member(3)], &[1, 2, 3]);
        let applied = s.applied_index;
        assert_eq!(partitions_wanted(&s, applied + 1), Wanted::NotYetApplied);
        assert_eq!(partitions_wanted(&s, applied), Wanted::None, "no job was submitted at that index");
        let job = applied + 1;
        apply(&mut s, job, Op::Submit { spec: job_spec(vec![2, 3]), graph_digest: [0; 32] });
        assert_eq!(partitions_wanted(&s, job), Wanted::NotYetApplied, "pending here, maybe assigned at the master");
        apply(&mut s, job + 1, Op::Assign { job, expected_epoch: 0, assignment: Default::default() });
        assert_eq!(partitions_wanted(&s, job), Wanted::From(1));
        apply(&mut s, job + 2, Op::Cancel { job });
        assert_eq!(partitions_wanted(&s, job), Wanted::None);
    }

    #[test]
    fn a_job_is_unreachable_only_while_every_holder_is_down() {
        let mut s = ClusterState::bootstrap(&[member(1), member(2), member(3)], &[1, 2, 3]);
        let spec = job_spec(vec![2, 3]);
        apply(&mut s, 4, Op::Submit { spec, graph_digest: [0; 32] });
        let (mut since, t0) = (HashMap::new(), Instant::now());
        assert!(holders_down(&s, &mut since, t0).is_empty());
        apply(&mut s, 5, Op::MarkDown { node: 2 });
        assert!(holders_down(&s, &mut since, t0).is_empty(), "one holder is still alive");
        apply(&mut s, 6, Op::MarkDown { node: 3 });
        assert_eq!(holders_down(&s, &mut since, t0), vec![(4, Duration::ZERO)]);
        let later = t0 + Duration::from_secs(61);
        assert_eq!(holders_down(&s, &mut since, later), vec![(4, Duration::from_secs(61))]);
        apply(&mut s, 7, Op::MarkUp { node: 3 });
        assert!(holders_down(&s, &mut since, later).is_empty());
        assert!(since.is_empty(), "a holder came back: the clock starts over");
    }
}

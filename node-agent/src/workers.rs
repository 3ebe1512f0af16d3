//! Pinned worker pools: where every kernel of this node runs.
//!
//! [`Topology`] reads the NUMA nodes and their CPUs from sysfs (`/sys/devices/system/node` and
//! `/sys/devices/system/cpu`), keeping only CPUs that are online and in this process's affinity
//! mask. [`Workers`] starts one rayon [`ThreadPool`] per NUMA node with one thread per CPU, each
//! thread pinned to its CPU before it runs anything and named `quiver-worker-N`.
//!
//! What it owns and what it must not do:
//! - Kernels never run on async (tokio) threads: callers hand a closure to [`Workers::run`],
//!   which runs it inside a pool (rayon fans out only within that pool) and returns its result
//!   on a tokio oneshot channel, so an async task awaits compute without blocking its thread.
//! - A panic in a closure is caught on the worker and comes back as [`WorkerError::Panicked`]
//!   naming the panic message; it never unwinds into the pool or the caller.
//! - [`Workers::run_solo`] is for tasks too small to split (the serving path's graphs): it runs
//!   them on one of the per-CPU solo threads (`quiver-worker-solo-N`, pinned like the others),
//!   where rayon's parallel loops run inline instead of waking and handing work to the other
//!   workers, which costs more than such a task computes. A solo thread is a plain thread that
//!   is itself the only thread of a rayon pool (`use_current_thread`) and takes its tasks from a
//!   channel: between tasks it sleeps at once, where a rayon worker would first spin through
//!   rounds of `sched_yield` (8 % of a serving agent's CPU samples at 6,000 requests/s on the
//!   Zen 3 VM). Such a thread runs rayon work only while a task waits on it (`join`, `scope`,
//!   parallel iterators): a detached `rayon::spawn` from a solo task would never run, and none
//!   is made (the kernels use `rayon::scope`).
//! - [`Workers::load`] counts tasks submitted and not yet finished (an atomic): the serving path
//!   uses it for admission and for power-of-two-choices between nodes.
//!
//! # Memory placement (first touch)
//!
//! Linux places a page on the NUMA node of the CPU that first writes it. Partition memory is
//! therefore first touched by the worker that computes it: the job executor creates a
//! partition's `PartitionState` (and copies received arrays into their final buffers) *inside*
//! [`Workers::run`] on the pool of the partition's NUMA node, never on an async thread, so its
//! pages land next to the cores that read them every superstep.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::ThreadPool;
use tokio::sync::oneshot;

/// The CPUs this process may use, grouped by NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// NUMA nodes with at least one usable CPU, by ascending id.
    pub nodes: Vec<NumaNode>,
}

/// One NUMA node and its usable CPUs (ascending).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    pub id: u32,
    pub cpus: Vec<usize>,
}

impl Topology {
    /// The topology of this machine as this process sees it. Never fails: without readable sysfs
    /// it is one node holding this process's affinity mask, or `available_parallelism` CPUs.
    pub fn from_os() -> Topology {
        match Topology::from_sysfs(Path::new("/sys/devices/system")) {
            Ok(t) if !t.nodes.is_empty() => t,
            other => {
                if let Err(e) = other {
                    tracing::warn!(error = %e, "cannot read the CPU topology from sysfs; using one node");
                }
                let cpus = process_affinity().map(|s| s.into_iter().collect()).unwrap_or_else(|| {
                    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect::<Vec<_>>()
                });
                Topology { nodes: vec![NumaNode { id: 0, cpus }] }
            }
        }
    }

    /// Reads `root/cpu/online` and `root/node/node*/cpulist` (`root` is normally
    /// `/sys/devices/system`), keeping online CPUs in this process's affinity mask. Without NUMA
    /// information (no `root/node`, or no node lists a usable CPU) it is one node with all of them.
    pub fn from_sysfs(root: &Path) -> std::io::Result<Topology> {
        Topology::read(root, process_affinity().as_ref())
    }

    /// [`Topology::from_sysfs`] with the affinity mask given (`None`: every CPU allowed).
    fn read(root: &Path, allowed: Option<&BTreeSet<usize>>) -> std::io::Result<Topology> {
        let online = read_online(&root.join("cpu"))?;
        let usable: BTreeSet<usize> = online.into_iter().filter(|c| allowed.is_none_or(|a| a.contains(c))).collect();
        let mut nodes = Vec::new();
        if let Ok(entries) = std::fs::read_dir(root.join("node")) {
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_prefix("node")).and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let list = std::fs::read_to_string(entry.path().join("cpulist"))?;
                let cpus: Vec<usize> =
                    parse_cpu_list(&list).map_err(|e| invalid_data(&entry.path().join("cpulist"), &e))?;
                let cpus: Vec<usize> = cpus.into_iter().filter(|c| usable.contains(c)).collect();
                if !cpus.is_empty() {
                    nodes.push(NumaNode { id, cpus });
                }
            }
        }
        nodes.sort_by_key(|n| n.id);
        if nodes.is_empty() && !usable.is_empty() {
            nodes.push(NumaNode { id: 0, cpus: usable.into_iter().collect() });
        }
        Ok(Topology { nodes })
    }

    /// Usable CPUs over all nodes.
    pub fn cpus(&self) -> usize {
        self.nodes.iter().map(|n| n.cpus.len()).sum()
    }
}

fn invalid_data(path: &Path, reason: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {reason}", path.display()))
}

/// Online CPUs from `cpu/online`, or every `cpu/cpuN` directory when that file is missing.
fn read_online(cpu_dir: &Path) -> std::io::Result<Vec<usize>> {
    let online = cpu_dir.join("online");
    match std::fs::read_to_string(&online) {
        Ok(text) => parse_cpu_list(&text).map_err(|e| invalid_data(&online, &e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut cpus: Vec<usize> = std::fs::read_dir(cpu_dir)?
                .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("cpu")?.parse().ok())
                .collect();
            cpus.sort_unstable();
            Ok(cpus)
        }
        Err(e) => Err(e),
    }
}

/// Parses a kernel CPU list such as `0-3,8,10-11` (empty or blank: no CPUs).
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("{part:?} is not a CPU number or range"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a > 1 << 16 {
                    return Err(format!("{part:?} is not an ascending CPU range"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// This process's CPU affinity mask (`Cpus_allowed_list` of `/proc/self/status`, the main
/// thread's), or `None` when unknown.
fn process_affinity() -> Option<BTreeSet<usize>> {
    allowed_cpus("/proc/self/status").map(|v| v.into_iter().collect())
}

/// The `Cpus_allowed_list` of a `/proc/…/status` file, or `None` when unknown.
fn allowed_cpus(status_file: &str) -> Option<Vec<usize>> {
    let status = std::fs::read_to_string(status_file).ok()?;
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(list).ok()
}

/// Why a task on the workers produced no result.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WorkerError {
    #[error("worker task panicked: {0}")]
    Panicked(String),
    #[error("the worker pool dropped the task (shutting down)")]
    Lost,
}

/// One rayon pool per NUMA node, one pinned thread per CPU. Cheap to clone (shared).
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    pools: Vec<ThreadPool>,
    /// One solo thread per worker CPU, for [`Workers::run_solo`]: the sending half of its queue.
    solo: Vec<std::sync::mpsc::Sender<Task>>,
    /// CPUs of each pool, in thread-index order.
    cpus: Vec<Vec<usize>>,
    threads: usize,
    load: AtomicUsize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("cpus", &self.inner.cpus).field("load", &self.load()).finish()
    }
}

impl Workers {
    /// Starts the pools for `topology`. `threads` caps the total thread count (CPUs are taken
    /// round-robin over the nodes so every node keeps workers); `None` uses every CPU.
    pub fn new(topology: &Topology, threads: Option<usize>) -> std::io::Result<Workers> {
        let total = topology.cpus();
        let want = threads.unwrap_or(total).min(total);
        if want == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                if total == 0 { "the topology has no usable CPU" } else { "worker threads must be at least 1" },
            ));
        }
        let mut chosen: Vec<Vec<usize>> = vec![Vec::new(); topology.nodes.len()];
        let mut taken = 0;
        'fill: for i in 0.. {
            for (node, cpus) in topology.nodes.iter().zip(&mut chosen) {
                if taken == want {
                    break 'fill;
                }
                if let Some(&cpu) = node.cpus.get(i) {
                    cpus.push(cpu);
                    taken += 1;
                }
            }
        }
        chosen.retain(|c| !c.is_empty());
        let mut pools = Vec::with_capacity(chosen.len());
        let mut first = 0;
        for cpus in &chosen {
            let pin_cpus = cpus.clone();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(cpus.len())
                .thread_name(move |i| format!("quiver-worker-{}", first + i))
                .start_handler(move |i| pin(pin_cpus[i]))
                .build()
                .map_err(std::io::Error::other)?;
            pools.push(pool);
            first += cpus.len();
        }
        let mut solo = Vec::with_capacity(want);
        for (i, &cpu) in chosen.iter().flatten().enumerate() {
            solo.push(solo_thread(i, cpu)?);
        }
        Ok(Workers { inner: Arc::new(Inner { pools, solo, cpus: chosen, threads: want, load: AtomicUsize::new(0) }) })
    }

    /// Number of pools (NUMA nodes in use).
    pub fn pools(&self) -> usize {
        self.inner.pools.len()
    }

    /// Worker threads over all pools.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// The CPU of each thread of each pool.
    pub fn cpus(&self) -> &[Vec<usize>] {
        &self.inner.cpus
    }

    /// Tasks submitted with [`Workers::run`] and not yet finished.
    pub fn load(&self) -> usize {
        self.inner.load.load(Ordering::Relaxed)
    }

    /// Runs `f` on pool `numa % pools` and waits for its result without blocking the caller's
    /// thread. A panic in `f` comes back as [`WorkerError::Panicked`]. The task counts towards
    /// [`Workers::load`] from this call until it finishes, even if the caller stops waiting.
    pub async fn run<R: Send + 'static>(
        &self,
        numa: usize,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, WorkerError> {
        let pool = &self.inner.pools[numa % self.inner.pools.len()];
        self.spawn_with(|task| pool.spawn(task), f).await
    }

    /// Like [`Workers::run`] for a task too small to split: runs `f` alone on the single-thread
    /// pool of worker CPU `slot % threads`, so its parallel loops run inline on that one thread.
    pub async fn run_solo<R: Send + 'static>(
        &self,
        slot: usize,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, WorkerError> {
        let queue = &self.inner.solo[slot % self.inner.solo.len()];
        // A send fails only if the thread is gone; the task is then dropped with its result
        // channel, which reads as `Lost`.
        self.spawn_with(|task| drop(queue.send(task)), f).await
    }

    /// Hands `f`, wrapped to catch its panic and send its result, to `submit`; awaits the result.
    async fn spawn_with<R: Send + 'static>(
        &self,
        submit: impl FnOnce(Task),
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, WorkerError> {
        let (tx, rx) = oneshot::channel();
        let ticket = LoadTicket::new(self.inner.clone());
        submit(Box::new(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p));
            drop(ticket);
            let _ = tx.send(result);
        }));
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(message)) => Err(WorkerError::Panicked(message)),
            Err(_) => Err(WorkerError::Lost),
        }
    }
}

/// A task for a pool or a solo thread (it catches its own panic).
type Task = Box<dyn FnOnce() + Send>;

/// Starts solo thread `i` pinned to `cpu` (module docs); returns its queue. The thread ends when
/// the queue's sender is dropped, with the last clone of its `Workers`.
fn solo_thread(i: usize, cpu: usize) -> std::io::Result<std::sync::mpsc::Sender<Task>> {
    let (tx, rx) = std::sync::mpsc::channel::<Task>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name(format!("quiver-worker-solo-{i}")).spawn(move || {
        pin(cpu);
        // This thread is the pool's only thread, so rayon's loops in a task run inline here.
        // rayon leaks the registry of such a pool when it is dropped: one per solo thread.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).use_current_thread().build();
        let failed = pool.as_ref().err().map(ToString::to_string);
        let _ = ready_tx.send(failed);
        let Ok(_pool) = pool else { return };
        while let Ok(task) = rx.recv() {
            task();
        }
    })?;
    match ready_rx.recv() {
        Ok(None) => Ok(tx),
        Ok(Some(e)) => Err(std::io::Error::other(format!("solo worker {i}: {e}"))),
        Err(_) => Err(std::io::Error::other(format!("solo worker {i} ended while starting"))),
    }
}

/// One unit of [`Workers::load`], released when the task is done (or dropped unrun).
struct LoadTicket(Arc<Inner>);

impl LoadTicket {
    fn new(inner: Arc<Inner>) -> Self {
        inner.load.fetch_add(1, Ordering::Relaxed);
        LoadTicket(inner)
    }
}

impl Drop for LoadTicket {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Pins the calling thread to `cpu`; a failure (a CPU taken away since the topology was read)
/// leaves the thread unpinned and says so.
fn pin(cpu: usize) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        tracing::warn!(cpu, "cannot pin a worker thread to its CPU; it runs unpinned");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(online: &str, nodes: &[(u32, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cpu")).unwrap();
        std::fs::write(dir.path().join("cpu/online"), online).unwrap();
        for (id, list) in nodes {
            let d = dir.path().join(format!("node/node{id}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cpulist"), list).unwrap();
        }
        // Files that are not node directories are ignored.
        if !nodes.is_empty() {
            std::fs::write(dir.path().join("node/online"), "0-1\n").unwrap();
        }
        dir
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<usize>::new());
        assert!(parse_cpu_list("3-1").unwrap_err().contains("3-1"));
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn numa_nodes_come_from_sysfs_intersected_with_online_and_affinity() {
        let dir = fake_sysfs("0-5,7\n", &[(1, "4-7\n"), (0, "0-3\n")]);
        let allowed: BTreeSet<usize> = [0, 1, 2, 4, 5, 6, 7].into();
        let t = Topology::read(dir.path(), Some(&allowed)).unwrap();
        assert_eq!(
            t,
            Topology { nodes: vec![NumaNode { id: 0, cpus: vec![0, 1, 2] }, NumaNode { id: 1, cpus: vec![4, 5, 7] }] }
        );
        // A node left without usable CPUs disappears.
        let t = Topology::read(dir.path(), Some(&[5].into())).unwrap();
        assert_eq!(t, Topology { nodes: vec![NumaNode { id: 1, cpus: vec![5] }] });
    }

    #[test]
    fn without_numa_information_all_cpus_form_one_node() {
        let dir = fake_sysfs("0-3\n", &[]);
        let t = Topology::read(dir.path(), None).unwrap();
        assert_eq!(t, Topology { nodes: vec![NumaNode { id: 0, cpus: vec![0, 1, 2, 3] }] });
        let bad = fake_sysfs("zero\n", &[]);
        let err = Topology::read(bad.path(), None).unwrap_err().to_string();
        assert!(err.contains("online") && err.contains("zero"), "{err}");
    }

    #[test]
    fn thread_cap_takes_cpus_round_robin_over_nodes() {
        let t = Topology { nodes: vec![NumaNode { id: 0, cpus: vec![0] }, NumaNode { id: 1, cpus: vec![0] }] };
        // Both "nodes" name CPU 0 so the test runs on any machine.
        let w = Workers::new(&t, Some(1)).unwrap();
        assert_eq!((w.pools(), w.threads()), (1, 1));
        let w = Workers::new(&t, None).unwrap();
        assert_eq!((w.pools(), w.threads()), (2, 2));
        assert!(Workers::new(&t, Some(0)).is_err());
    }

    /// Each worker's affinity, read back from the OS (`/proc/thread-self/status` on the worker),
    /// is exactly its CPU, and its name is `quiver-worker-N` (`quiver-worker-solo-N` for the
    /// single-thread pools).
    #[test]
    fn every_worker_is_pinned_to_exactly_its_cpu() {
        let topology = Topology::from_os();
        let w = Workers::new(&topology, None).unwrap();
        assert_eq!(w.threads(), topology.cpus());
        // The calling thread's name and the CPUs the OS lets it run on.
        let this_thread = || {
            let cpus = allowed_cpus("/proc/thread-self/status").unwrap();
            (std::thread::current().name().unwrap().to_string(), cpus)
        };
        let read_back = |pool: &ThreadPool| -> Vec<(String, Vec<usize>)> { pool.broadcast(|_| this_thread()) };
        let mut seen = Vec::new();
        for (p, pool) in w.inner.pools.iter().enumerate() {
            for (i, (name, cpus)) in read_back(pool).into_iter().enumerate() {
                assert_eq!(cpus, vec![w.cpus()[p][i]], "{name}");
                seen.push(name);
            }
        }
        let all_cpus: Vec<usize> = w.cpus().iter().flatten().copied().collect();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(w.inner.solo.len(), all_cpus.len());
        for (i, &cpu) in all_cpus.iter().enumerate() {
            let (name, cpus) = rt.block_on(w.run_solo(i, this_thread)).unwrap();
            assert_eq!((name.as_str(), cpus), (format!("quiver-worker-solo-{i}").as_str(), vec![cpu]));
        }
        let mut expected: Vec<String> = (0..w.threads()).map(|i| format!("quiver-worker-{i}")).collect();
        seen.sort();
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn run_returns_results_and_panics_as_errors() {
        let w = Workers::new(&Topology::from_os(), Some(2)).unwrap();
        let on_worker = w.run(7, || std::thread::current().name().unwrap_or_default().to_string()).await.unwrap();
        assert!(on_worker.starts_with("quiver-worker-"), "{on_worker}");
        let err = w.run(0, || -> u32 { panic!("kernel exploded at row 3") }).await.unwrap_err();
        assert_eq!(err, WorkerError::Panicked("kernel exploded at row 3".into()));
        // The pool survives the panic.
        assert_eq!(w.run(1, || 40 + 2).await.unwrap(), 42);
        let solo = w.run_solo(3, || (rayon::current_num_threads(), std::thread::current().name().map(String::from)));
        let (threads, name) = solo.await.unwrap();
        assert_eq!(threads, 1);
        assert!(name.unwrap().starts_with("quiver-worker-solo-"));
        // A solo thread survives a panic too, and its rayon loops run inline on it.
        let err = w.run_solo(3, || -> u32 { panic!("tiny graph exploded") }).await.unwrap_err();
        assert_eq!(err, WorkerError::Panicked("tiny graph exploded".into()));
        let names = w.run_solo(3, || {
            use rayon::prelude::*;
            (0..64).into_par_iter().map(|_| std::thread::current().name().map(String::from)).collect::<Vec<_>>()
        });
        let names = names.await.unwrap();
        assert!(
            names.windows(2).all(|p| p[0] == p[1]) && names[0].as_deref().unwrap().starts_with("quiver-worker-solo-")
        );
        assert_eq!(w.load(), 0);
    }

    #[tokio::test]
    async fn load_counts_tasks_until_they_finish() {
        let w = Workers::new(&Topology::from_os(), Some(1)).unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let task = tokio::spawn({
            let w = w.clone();
            async move {
                w.run(0, move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                })
                .await
            }
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap()).await.unwrap();
        assert_eq!(w.load(), 1);
        release_tx.send(()).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(w.load(), 0);
    }
}

//! The distributed executor on real QUIC transports over loopback: results are bit-identical to
//! the single-process run for every kernel and placement; bad partitions and lost owners fail the
//! job with a reason instead of hanging. Every wait has a deadline.

use std::sync::Arc;
use std::time::Duration;

use quiver_compute::kernels::{self, Algorithm, Normalization, Params, Stop};
use quiver_compute::{Csr, Segment, generate};
use quiver_node_agent::jobs::{
    Checkpoint, CheckpointOut, JobKey, JobRuntime, KernelSpec, MasterJob, MasterOutput, MemorySink, run_master,
};
use quiver_node_agent::transport::*;
use quiver_node_agent::workers::{Topology, Workers};

const DEADLINE: Duration = Duration::from_secs(60);

struct Node {
    transport: Transport,
    rt: Arc<JobRuntime>,
}

fn cluster(n: u64) -> Vec<Node> {
    let ca = CertificateAuthority::create("jobs test", Validity::days(1)).unwrap();
    let workers = Workers::new(&Topology::from_os(), Some(2)).unwrap();
    let nodes: Vec<Node> = (1..=n)
        .map(|id| {
            let ident = ca.node_identity(NodeId(id), Validity::days(1)).unwrap();
            let (transport, mut handles) = Transport::bind(TransportConfig::loopback(), &ident).unwrap();
            let rt = JobRuntime::new(transport.clone(), workers.clone());
            let serve = rt.clone();
            tokio::spawn(async move {
                while let Some(s) = handles.inbound.recv().await {
                    let rt = serve.clone();
                    tokio::spawn(async move { rt.handle_stream(s).await });
                }
            });
            Node { transport, rt }
        })
        .collect();
    for a in &nodes {
        for b in &nodes {
            if a.transport.node_id() != b.transport.node_id() {
                a.transport.add_peer(b.transport.node_id(), b.transport.local_addr());
            }
        }
    }
    nodes
}

/// Connects every pair once, lower id dialling, and waits until both ends see it: jobs then
/// never race a simultaneous dial (whose losing connection is closed with its streams).
async fn connected(nodes: &[Node]) {
    tokio::time::timeout(DEADLINE, async {
        for (i, a) in nodes.iter().enumerate() {
            for b in &nodes[i + 1..] {
                a.transport.connection(b.transport.node_id()).await.unwrap();
            }
        }
        while nodes.iter().any(|n| n.transport.connected_peers().len() != nodes.len() - 1) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the cluster connected in time");
}

fn spec_of(g: &Csr, params: &Params<'_>) -> (KernelSpec, Option<Segment<f32>>) {
    match kernels::build(g.vertices(), params).unwrap() {
        kernels::Built::PageRank(k) => (KernelSpec::PageRank(k), None),
        kernels::Built::Heat(k) => (KernelSpec::Heat(k), None),
        kernels::Built::Appnp(k) => (
            KernelSpec::Appnp { alpha: k.alpha, normalization: k.normalization, dim: k.dim, feature_seed: None },
            Some(Segment::from_slice(k.features)),
        ),
    }
}

async fn distributed(nodes: &[Node], g: &Arc<Csr>, params: &Params<'_>, owners: &[u64], job: u64) -> Vec<f32> {
    let mj = master_job(g, params, job, 1, owners);
    let (out, _, steps) = run_to_end(&nodes[0].rt, &mj, false).await;
    assert_eq!(steps, out.iterations);
    out.to_vec()
}

/// The job of `params` on `g` at (`job`, `epoch`), partition `i` owned by node `owners[i]`, no
/// checkpoints, starting fresh.
fn master_job(g: &Arc<Csr>, params: &Params<'_>, job: u64, epoch: u64, owners: &[u64]) -> MasterJob {
    let (kernel, features) = spec_of(g, params);
    MasterJob {
        key: JobKey { job, epoch },
        graph: g.clone(),
        graph_digest: digest_of(g),
        kernel,
        features,
        stop: params.stop,
        owners: owners.iter().map(|&o| NodeId(o)).collect(),
        checkpoint_every: None,
        checkpoint_seconds: 0.0,
        resume: None,
    }
}

/// A stand-in for the graph file's SHA-256 (what names a graph, and so its kept partitions): a
/// hash of its arrays, distinct for the graphs these tests use.
fn digest_of(g: &Csr) -> [u8; 32] {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&g.offsets()[..], &g.sources()[..]).hash(&mut h);
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&h.finish().to_le_bytes());
    d
}

/// Runs a master to its end the way the agent does: a lost link is a retryable error, answered by
/// running again in a new epoch (on a loaded machine a loopback connection has been seen to drop).
/// Returns the output, the checkpoints and the count of step reports of the attempt that finished.
async fn run_to_end(rt: &Arc<JobRuntime>, mj: &MasterJob, checkpoints: bool) -> (MasterOutput, Vec<Checkpoint>, u32) {
    let mut mj = mj.clone();
    let mut errors = Vec::new();
    for _ in 0..3 {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = MemorySink::default();
        let out = CheckpointOut { sink: Arc::new(sink.clone()), taken: tx };
        let mut steps = 0;
        let run = run_master(rt.clone(), mj.clone(), checkpoints.then_some(out), |_| steps += 1);
        match tokio::time::timeout(DEADLINE, run).await.expect("the job ends in time") {
            Ok(out) => {
                let mut taken = Vec::new();
                while let Ok(c) = rx.try_recv() {
                    taken.push(
                        sink.checkpoint(&c, mj.owners.len()).expect("every part of a taken checkpoint is stored"),
                    );
                }
                return (out, taken, steps);
            }
            Err(e) if e.retryable => {
                errors.push(e.reason);
                mj.key.epoch += 1000;
            }
            Err(e) => panic!("the job failed: {e:?}"),
        }
    }
    panic!("the job lost a link three times: {errors:?}")
}

/// APPNP (α = 0.1, symmetric) over 4-wide features for `iterations`.
fn appnp4(features: &[f32], iterations: u32) -> Params<'_> {
    let algorithm = Algorithm::Appnp { alpha: 0.1, normalization: Normalization::Symmetric, features, dim: 4 };
    Params { algorithm, stop: Stop::iterations(iterations) }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kernel_matches_the_single_process_run_on_any_placement() {
    let nodes = cluster(3);
    connected(&nodes).await;
    let g = Arc::new(generate::kronecker(9, 8, 5).unwrap());
    let features = generate::features(g.vertices(), 4, 3);
    let seeds = [3u32, 77, 200];
    let cases = [
        Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::iterations(12) },
        Params {
            algorithm: Algorithm::PersonalizedPageRank { damping: 0.85, seeds: &seeds },
            stop: Stop::tolerance(1e-6, 50),
        },
        Params { algorithm: Algorithm::HeatKernel { t: 2.0, seeds: &seeds }, stop: Stop::iterations(10) },
        appnp4(&features, 8),
    ];
    let placements: [&[u64]; 4] = [&[1], &[1, 2], &[2, 3, 1], &[3, 3, 2, 1, 2]];
    let mut job = 0;
    for params in &cases {
        let reference = kernels::run(&g, params, 1).unwrap().values;
        for owners in placements {
            job += 1;
            let got = distributed(&nodes, &g, params, owners, job).await;
            assert_eq!(bits(&got), bits(&reference), "{} on {owners:?}", params.algorithm.name());
        }
    }
    // Seeded APPNP features: no matrix leaves the master, each owner generates its own rows.
    let reference = kernels::run(&g, &cases[3], 1).unwrap().values;
    for owners in placements {
        job += 1;
        let mut mj = master_job(&g, &cases[3], job, 1, owners);
        let KernelSpec::Appnp { feature_seed, .. } = &mut mj.kernel else { unreachable!("case 3 is appnp") };
        *feature_seed = Some(3);
        mj.features = None;
        let (out, _, _) = run_to_end(&nodes[0].rt, &mj, false).await;
        assert_eq!(bits(&out.to_vec()), bits(&reference), "seeded appnp on {owners:?}");
    }
}

/// A second job on the same graph and partition count finds every partition kept by its owner
/// from the first (nothing is cut or sent), for any kernel, with the same bits; another graph, or
/// another partition count, is cut and shipped again; a zero capacity keeps nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_partitions_serve_the_next_job_on_the_same_graph() {
    let nodes = cluster(3);
    connected(&nodes).await;
    let g = Arc::new(generate::kronecker(9, 8, 11).unwrap());
    let other = Arc::new(generate::kronecker(9, 8, 12).unwrap());
    let seeds = [5u32, 9];
    let pagerank = Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::iterations(10) };
    let ppr = Params {
        algorithm: Algorithm::PersonalizedPageRank { damping: 0.85, seeds: &seeds },
        stop: Stop::iterations(10),
    };
    let lookups = || nodes.iter().map(|n| n.rt.partition_cache().lookups()).collect::<Vec<_>>();
    let buffers = || nodes.iter().map(|n| n.transport.receive_buffer_bytes()).collect::<Vec<_>>();
    let resting = buffers();
    // Owners keep their partition once they have sent their result; wait for the last of them.
    let nodes = &nodes;
    let kept = |want: usize| async move {
        tokio::time::timeout(DEADLINE, async {
            while nodes.iter().map(|n| n.rt.partition_cache().len()).sum::<usize>() < want {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the owners kept their partitions in time");
    };
    let owners = [1u64, 2, 3];
    let check = |got: Vec<f32>, params: &Params<'_>, g: &Csr, what: &str| {
        let reference = kernels::run(g, params, 1).unwrap().values;
        assert_eq!(bits(&got), bits(&reference), "{what}");
    };

    check(distributed(nodes, &g, &pagerank, &owners, 1).await, &pagerank, &g, "cold pagerank");
    kept(3).await;
    let before = lookups();
    check(distributed(nodes, &g, &ppr, &owners, 2).await, &ppr, &g, "ppr on kept partitions");
    let after = lookups();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!((a.0 - b.0, a.1 - b.1), (1, 0), "node {}: one hit, no miss", i + 1);
    }
    // Another graph: every owner misses, gets its partition, and the results are that graph's.
    check(distributed(nodes, &other, &pagerank, &owners, 3).await, &pagerank, &other, "another graph");
    let third = lookups();
    assert!(third.iter().zip(&after).all(|(t, a)| t.1 == a.1 + 1), "{third:?} after {after:?}");
    // Another partition count on the first graph: cut again.
    check(distributed(nodes, &g, &pagerank, &[2, 3], 4).await, &pagerank, &g, "two partitions");
    // Nothing kept with a zero capacity.
    for n in nodes {
        n.rt.partition_cache().set_capacity(0);
    }
    check(distributed(nodes, &g, &pagerank, &owners, 5).await, &pagerank, &g, "without a cache");
    assert!(nodes.iter().all(|n| n.rt.partition_cache().is_empty()));
    // The owners widened their sockets' receive buffers for the supersteps; once the last owner
    // is gone every buffer is back at its resting size.
    tokio::time::timeout(DEADLINE, async {
        while buffers() != resting {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("receive buffers {:?}, resting {resting:?}", buffers()));
}

/// The job these events belong to, and what they say: (epoch, partition, message).
type Seen = Arc<std::sync::Mutex<Vec<(u64, u64, String)>>>;

/// Records the job events of one job (the `job` field) from every node of this process.
struct Record {
    job: u64,
    seen: Seen,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Record {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            job: Option<u64>,
            epoch: u64,
            partition: u64,
            message: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                match field.name() {
                    "job" => self.job = Some(value),
                    "epoch" => self.epoch = value,
                    "partition" => self.partition = value,
                    _ => {}
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.message = format!("{value:?}");
                }
            }
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if f.job == Some(self.job) {
            self.seen.lock().unwrap().push((f.epoch, f.partition, f.message));
        }
    }
}

/// At a job's end the owners on the master's node free their state and report their results
/// before any other owner is told to finish, so the remote results (each as large as an owner's
/// iterate) arrive at the master's node in that memory's place, not on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_masters_own_owners_finish_before_the_others_are_told() {
    use tracing_subscriber::layer::SubscriberExt;
    const JOB: u64 = 4242;
    let seen = Seen::default();
    let subscriber = tracing_subscriber::registry()
        .with(Record { job: JOB, seen: seen.clone() })
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    tracing::subscriber::set_global_default(subscriber).expect("no other test of this binary sets a subscriber");
    let nodes = cluster(3);
    connected(&nodes).await;
    let g = Arc::new(generate::kronecker(9, 8, 11).unwrap());
    let features = generate::features(g.vertices(), 4, 7);
    let params = appnp4(&features, 6);
    // Node 1 masters the job and owns partitions 0, 2 and 3 (with the order not kept, a remote
    // owner was told before all three had reported in three of six runs).
    let (local, remote) = ([0u64, 2, 3], [1u64, 4]);
    let got = distributed(&nodes, &g, &params, &[1, 2, 1, 1, 3], JOB).await;
    assert_eq!(bits(&got), bits(&kernels::run(&g, &params, 1).unwrap().values));

    let seen = seen.lock().unwrap().clone();
    // The attempt that finished (a lost loopback link would have started another epoch).
    let epoch = seen.iter().map(|e| e.0).max().expect("the job logged its owners' ends");
    let at = |partitions: &[u64], message: &str| -> Vec<usize> {
        let found: Vec<usize> = seen
            .iter()
            .enumerate()
            .filter(|(_, (e, p, m))| *e == epoch && partitions.contains(p) && m.starts_with(message))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(found.len(), partitions.len(), "{message:?} once per partition of {partitions:?}: {seen:#?}");
        found
    };
    let reported = at(&local, "partition's state freed, result reported");
    let told = at(&remote, "partition's supersteps done");
    assert!(
        reported.iter().max() < told.iter().min(),
        "local owners reported at {reported:?}, remote owners told to finish at {told:?}: {seen:#?}"
    );
}

/// Halos cut into many small pieces (a piece is a few rows) arrive in order, land in the right
/// slots, and the result is still the single-process run's, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halos_sent_in_many_pieces_give_the_same_bits() {
    let nodes = cluster(3);
    for n in &nodes {
        n.rt.set_halo_piece_values(10);
    }
    connected(&nodes).await;
    let g = Arc::new(generate::kronecker(9, 8, 7).unwrap());
    let features = generate::features(g.vertices(), 4, 5);
    let cases =
        [Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::iterations(6) }, appnp4(&features, 5)];
    let mut job = 100;
    for params in &cases {
        let reference = kernels::run(&g, params, 1).unwrap().values;
        for owners in [&[1u64, 2, 3][..], &[2, 3, 1, 1]] {
            job += 1;
            let got = distributed(&nodes, &g, params, owners, job).await;
            assert_eq!(bits(&got), bits(&reference), "{} on {owners:?}", params.algorithm.name());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_is_gone_fails_the_job_with_a_reason() {
    let nodes = cluster(2);
    let g = Arc::new(generate::kronecker(7, 8, 1).unwrap());
    let params = Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::iterations(5) };
    nodes[1].transport.shutdown().await;
    let mj = master_job(&g, &params, 1, 1, &[1, 2]);
    let err = tokio::time::timeout(DEADLINE, run_master(nodes[0].rt.clone(), mj, None, |_| {}))
        .await
        .expect("the failure is reported in time")
        .unwrap_err();
    assert!(err.reason.contains("partition 1") && err.retryable, "{err:?}");
}

/// Checkpoints every 3 supersteps, then resumes from each of them on another placement (the
/// recovery path after losing a node): every resumed run ends with the undisturbed run's bits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_resumed_from_any_checkpoint_on_another_placement_is_bit_identical() {
    let nodes = cluster(3);
    connected(&nodes).await;
    let g = Arc::new(generate::kronecker(9, 8, 2).unwrap());
    let features = generate::features(g.vertices(), 3, 9);
    let seeds = [4u32, 40];
    let cases = [
        Params {
            algorithm: Algorithm::PersonalizedPageRank { damping: 0.85, seeds: &seeds },
            stop: Stop::iterations(10),
        },
        Params {
            algorithm: Algorithm::Appnp {
                alpha: 0.2,
                normalization: Normalization::RandomWalk,
                features: &features,
                dim: 3,
            },
            stop: Stop::iterations(8),
        },
    ];
    for (job, params) in cases.iter().enumerate() {
        let reference = kernels::run(&g, params, 1).unwrap().values;
        let mut base = master_job(&g, params, 100 + job as u64, 1, &[1, 2, 3]);
        base.checkpoint_every = Some(3);
        let (out, taken, _) = run_to_end(&nodes[0].rt, &base, true).await;
        assert_eq!(bits(&out.to_vec()), bits(&reference));
        let every_third: Vec<u32> = (3..=params.stop.max_iterations).step_by(3).collect();
        assert_eq!(taken.iter().map(|c| c.step).collect::<Vec<_>>(), every_third);
        for (i, c) in taken.into_iter().enumerate() {
            let mut resumed = base.clone();
            resumed.key.epoch = 2 + i as u64;
            resumed.owners = vec![NodeId(2), NodeId(2), NodeId(1)];
            resumed.resume = Some(c);
            let (out, _, _) = run_to_end(&nodes[0].rt, &resumed, false).await;
            assert_eq!(bits(&out.to_vec()), bits(&reference), "{} resumed (checkpoint {i})", params.algorithm.name());
            assert_eq!(out.iterations, params.stop.max_iterations);
        }
    }
}

/// A job stream or halo of an epoch older than the node's record is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_epoch_is_refused() {
    let nodes = cluster(2);
    connected(&nodes).await;
    let g = Arc::new(generate::kronecker(7, 8, 1).unwrap());
    let params = Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::iterations(3) };
    nodes[1].rt.set_epoch(5, 4);
    let mj = master_job(&g, &params, 5, 3, &[1, 2]);
    let err = tokio::time::timeout(DEADLINE, run_master(nodes[0].rt.clone(), mj.clone(), None, |_| {}))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.reason.contains("stale"), "{err:?}");
    let mut current = mj;
    current.key.epoch = 4;
    let (out, _, _) = run_to_end(&nodes[0].rt, &current, false).await;
    assert_eq!(bits(&out.to_vec()), bits(&kernels::run(&g, &params, 1).unwrap().values));
}

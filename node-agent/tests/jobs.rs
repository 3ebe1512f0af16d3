//! The distributed executor on real QUIC transports over loopback: results are bit-identical to
//! the single-process run for every kernel and placement; bad partitions and lost owners fail the
//! job with a reason instead of hanging. Every wait has a deadline.

use std::sync::Arc;
use std::time::Duration;

use quiver_compute::kernels::{self, Algorithm, Normalization, Params, Stop};
use quiver_compute::{Csr, Segment, generate};
use quiver_node_agent::jobs::{JobKey, JobRuntime, KernelSpec, MasterJob, run_master};
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

fn spec_of(g: &Csr, params: &Params<'_>) -> (KernelSpec, Option<Segment<f32>>) {
    match kernels::build(g.vertices(), params).unwrap() {
        kernels::Built::PageRank(k) => (KernelSpec::PageRank(k), None),
        kernels::Built::Heat(k) => (KernelSpec::Heat(k), None),
        kernels::Built::Appnp(k) => (
            KernelSpec::Appnp { alpha: k.alpha, normalization: k.normalization, dim: k.dim },
            Some(Segment::from_slice(k.features)),
        ),
    }
}

async fn distributed(nodes: &[Node], g: &Arc<Csr>, params: &Params<'_>, owners: &[u64], job: u64) -> Vec<f32> {
    let (kernel, features) = spec_of(g, params);
    let mj = MasterJob {
        key: JobKey { job, epoch: 1 },
        graph: g.clone(),
        graph_digest: [7; 32],
        kernel,
        features,
        stop: params.stop,
        owners: owners.iter().map(|&o| NodeId(o)).collect(),
    };
    let mut steps = 0;
    let out = tokio::time::timeout(DEADLINE, run_master(nodes[0].rt.clone(), mj, |_| steps += 1))
        .await
        .expect("job finished in time")
        .expect("job succeeded");
    assert_eq!(steps, out.iterations);
    out.values
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kernel_matches_the_single_process_run_on_any_placement() {
    let nodes = cluster(3);
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
        Params {
            algorithm: Algorithm::Appnp {
                alpha: 0.1,
                normalization: Normalization::Symmetric,
                features: &features,
                dim: 4,
            },
            stop: Stop::iterations(8),
        },
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_is_gone_fails_the_job_with_a_reason() {
    let nodes = cluster(2);
    let g = Arc::new(generate::kronecker(7, 8, 1).unwrap());
    let params = Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::iterations(5) };
    nodes[1].transport.shutdown().await;
    let (kernel, features) = spec_of(&g, &params);
    let mj = MasterJob {
        key: JobKey { job: 1, epoch: 1 },
        graph: g.clone(),
        graph_digest: [0; 32],
        kernel,
        features,
        stop: params.stop,
        owners: vec![NodeId(1), NodeId(2)],
    };
    let err = tokio::time::timeout(DEADLINE, run_master(nodes[0].rt.clone(), mj, |_| {}))
        .await
        .expect("the failure is reported in time")
        .unwrap_err();
    assert!(err.contains("partition 1"), "{err}");
}

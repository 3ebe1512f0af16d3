//! `quiver demo`: the README's main command. It needs no set-up and no files.
//!
//! It starts a three-agent cluster inside this process on 127.0.0.1 (ephemeral ports, an
//! ephemeral CA, mutual TLS on every link), generates a Kronecker graph, submits a PageRank and an
//! APPNP job through the gRPC control plane exactly as `quiver submit` does (the graph uploaded,
//! partitions placed by the leader, supersteps with halo exchange over QUIC), and checks each
//! distributed result against the single-process run, bit for bit. It prints a short summary and
//! exits 0, or exits non-zero naming what did not match.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use quiver_compute::formats::write_graph;
use quiver_compute::generate;
use quiver_compute::kernels::{self, Algorithm, Normalization, Params, Stop};
use quiver_node_agent::transport::{CertificateAuthority, Validity};
use quiver_proto::control::cluster_client::ClusterClient;
use quiver_proto::control::jobs_client::JobsClient;
use quiver_proto::control::{
    GetJobRequest, GraphFormat, JobSpec, JobState, Kernel, KernelParams, MembersRequest, StatusRequest, SubmitRequest,
    WatchJobRequest, submit_request,
};
use tokio::sync::{oneshot, watch};

use crate::agent::{Bound, Embedded, run_embedded};
use crate::client::{Conn, Output, connect};
use crate::config::AgentArgs;
use crate::run::{digest_bytes, hex};

/// `quiver demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Kronecker scale of the generated graph (2^scale vertices).
    #[arg(long, default_value_t = 16)]
    scale: u32,
    /// Agents in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// APPNP feature width.
    #[arg(long, default_value_t = 16)]
    feature_dim: u32,
}

const NAMES: [&str; 7] = ["n1", "n2", "n3", "n4", "n5", "n6", "n7"];
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs the demo; fails if a distributed result differs from the single-process one.
pub fn run(a: DemoArgs) -> Result<()> {
    if a.nodes == 0 || a.nodes > NAMES.len() {
        bail!("--nodes must be between 1 and {}", NAMES.len());
    }
    if a.feature_dim == 0 {
        bail!("--feature-dim must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("quiver-demo")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(demo(a))
}

async fn demo(a: DemoArgs) -> Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let root = dir.path();
    let started = Instant::now();
    let client_tls = make_pki(root, a.nodes)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = Vec::new();
    let mut bound: Vec<Bound> = Vec::new();
    for (i, name) in NAMES.iter().take(a.nodes).enumerate() {
        let membership = match bound.first() {
            None => (true, vec![]),
            Some(seed) => (false, vec![seed.peer.to_string()]),
        };
        let (tx, rx) = oneshot::channel();
        let cfg = agent_config(root, name, membership)?;
        let embedded = Embedded { shutdown: stop_rx.clone(), started: tx };
        agents.push(tokio::spawn(run_embedded(cfg, embedded)));
        let b = tokio::time::timeout(DEADLINE, rx)
            .await
            .with_context(|| format!("agent {name} did not start in time"))?
            .with_context(|| format!("agent {name} stopped while starting"))?;
        bound.push(b);
        if i == 0 {
            wait_members(&client_tls, &b, 1).await?;
        }
    }
    let conn = Conn { addr: bound[0].grpc.to_string(), tls_dir: Some(client_tls.clone()), output: Output::Json };
    wait_members(&client_tls, &bound[0], a.nodes).await?;
    let status = ClusterClient::new(connect(&conn, Some(DEADLINE)).await?).status(StatusRequest {}).await?.into_inner();
    println!(
        "cluster    {} agents on 127.0.0.1 (QUIC + mutual TLS, ephemeral CA), leader {}, formed in {:.2} s; \
         metrics of n1 at http://{}/metrics while the demo runs",
        a.nodes,
        status.leader_name,
        started.elapsed().as_secs_f64(),
        bound[0].http
    );

    let t = Instant::now();
    let scale = a.scale;
    let g = tokio::task::spawn_blocking(move || generate::kronecker(scale, 16, 1)).await??;
    let path = root.join(format!("kronecker-{scale}.qcsr"));
    write_graph(&path, &g)?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    println!(
        "graph      Kronecker scale {scale} (seed 1): {} vertices, {} edges, generated in {:.2} s",
        g.vertices(),
        g.edges(),
        t.elapsed().as_secs_f64()
    );

    let dim = a.feature_dim as usize;
    let features = generate::features(g.vertices(), dim, 1);
    let jobs = [
        (
            "pagerank".to_string(),
            KernelParams { kernel: Kernel::Pagerank as i32, alpha: 0.85, max_iterations: 20, ..Default::default() },
            Params { algorithm: Algorithm::PageRank { damping: 0.85 }, stop: Stop::iterations(20) },
        ),
        (
            format!("appnp d={dim}"),
            KernelParams {
                kernel: Kernel::Appnp as i32,
                alpha: f64::from(0.1f32),
                max_iterations: 10,
                width: a.feature_dim,
                feature_seed: 1,
                ..Default::default()
            },
            Params {
                algorithm: Algorithm::Appnp {
                    alpha: 0.1,
                    normalization: Normalization::Symmetric,
                    features: &features,
                    dim,
                },
                stop: Stop::iterations(10),
            },
        ),
    ];
    let mut jobs_client = JobsClient::new(connect(&conn, None).await?);
    let mut mismatches = Vec::new();
    for (i, (name, kp, params)) in jobs.iter().enumerate() {
        let t = Instant::now();
        let local = kernels::run(&g, params, 1)?;
        let local_secs = t.elapsed().as_secs_f64();
        let want = digest_bytes(&local.values);

        let t = Instant::now();
        let spec = JobSpec {
            name: name.clone(),
            params: Some(kp.clone()),
            format: GraphFormat::QuiverCsr as i32,
            partitions: a.nodes as u32,
            client_id: 1,
            client_seq: i as u64 + 1,
            ..Default::default()
        };
        let mut messages = vec![SubmitRequest { body: Some(submit_request::Body::Spec(spec)) }];
        for chunk in bytes.chunks(1 << 20) {
            messages.push(SubmitRequest { body: Some(submit_request::Body::GraphChunk(chunk.to_vec())) });
        }
        let id = jobs_client.submit(tonic::codegen::tokio_stream::iter(messages)).await?.into_inner().job_id;
        let mut progress = jobs_client.watch(WatchJobRequest { job_id: id }).await?.into_inner();
        while tokio::time::timeout(DEADLINE, progress.message()).await.context("the job stalled")??.is_some() {}
        let job = jobs_client.get(GetJobRequest { job_id: id }).await?.into_inner();
        let secs = t.elapsed().as_secs_f64();
        if job.state != JobState::Succeeded as i32 {
            bail!("{name}: job {id} did not succeed: {}", job.error);
        }
        let same = job.result_digest == want;
        if !same {
            mismatches.push(name.clone());
        }
        let work = g.edges() as f64 * f64::from(local.iterations) * local.width as f64;
        println!(
            "{name:<10} job {id}: {} supersteps on {} nodes in {secs:.2} s incl. upload ({:.0} M edge-values/s); \
             single process {local_secs:.2} s; digest {} {}",
            local.iterations,
            a.nodes,
            work / secs / 1e6,
            &hex(&want)[..16],
            if same { "bit-identical" } else { "DIFFERENT" }
        );
    }
    let _ = stop_tx.send(true);
    for agent in agents {
        match tokio::time::timeout(Duration::from_secs(10), agent).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => bail!("an agent failed: {e:#}"),
            Ok(Err(e)) => bail!("an agent panicked: {e}"),
            Err(_) => bail!("an agent did not stop within 10 s"),
        }
    }
    if !mismatches.is_empty() {
        bail!("distributed results differ from the single-process run: {}", mismatches.join(", "));
    }
    println!(
        "ok         every distributed result matched the single-process run bit for bit ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes an ephemeral CA, one node certificate per agent and a client certificate under `root`;
/// returns the client's TLS directory.
fn make_pki(root: &Path, nodes: usize) -> Result<std::path::PathBuf> {
    let ca = CertificateAuthority::create("quiver demo", Validity::days(1)).context("creating the demo CA")?;
    let write = |dir: &Path, files: &[(&str, &str)]| -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, text) in files {
            std::fs::write(dir.join(name), text).with_context(|| format!("writing {}", dir.join(name).display()))?;
        }
        Ok(())
    };
    use quiver_node_agent::transport::tls::{CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
    for name in NAMES.iter().take(nodes) {
        let (cert, key, _) = crate::tls::sign(ca.cert_pem(), ca.key_pem(), name, false, 1)?;
        write(
            &root.join(name).join("tls"),
            &[(CA_CERT_FILE, ca.cert_pem()), (NODE_CERT_FILE, &cert), (NODE_KEY_FILE, &key)],
        )?;
    }
    let (cert, key, _) = crate::tls::sign(ca.cert_pem(), ca.key_pem(), "demo", true, 1)?;
    let client = root.join("client");
    write(
        &client,
        &[(CA_CERT_FILE, ca.cert_pem()), (crate::tls::CLIENT_CERT_FILE, &cert), (crate::tls::CLIENT_KEY_FILE, &key)],
    )?;
    Ok(client)
}

/// An agent on ephemeral loopback ports with its data under `root/name`.
fn agent_config(root: &Path, name: &str, (bootstrap, join): (bool, Vec<String>)) -> Result<crate::config::AgentConfig> {
    let config = root.join("quiver.toml");
    std::fs::write(&config, "").with_context(|| format!("writing {}", config.display()))?;
    let args = AgentArgs {
        config: Some(config),
        data_dir: Some(root.join(name)),
        peer_addr: Some("127.0.0.1:0".into()),
        grpc_addr: Some("127.0.0.1:0".into()),
        http_addr: Some("127.0.0.1:0".into()),
        tls_dir: Some(root.join(name).join("tls")),
        node_name: Some(name.into()),
        bootstrap,
        join,
        ..AgentArgs::default()
    };
    Ok(args.resolve()?)
}

/// Waits until the agent lists `n` alive members and knows a leader.
async fn wait_members(client_tls: &Path, b: &Bound, n: usize) -> Result<()> {
    let conn = Conn { addr: b.grpc.to_string(), tls_dir: Some(client_tls.to_path_buf()), output: Output::Json };
    let deadline = Instant::now() + DEADLINE;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Ok(ch) = connect(&conn, Some(Duration::from_secs(2))).await {
            let mut c = ClusterClient::new(ch);
            match (c.members(MembersRequest {}).await, c.status(StatusRequest {}).await) {
                (Ok(m), Ok(s)) => {
                    let alive = m.into_inner().members.iter().filter(|m| m.liveness == 1).count();
                    if alive >= n && s.get_ref().ready {
                        return Ok(());
                    }
                    last = format!("{alive} of {n} members alive, ready {}", s.get_ref().ready);
                }
                (Err(e), _) | (_, Err(e)) => last = e.message().to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the demo cluster did not form within {} s: {last}", DEADLINE.as_secs())
}

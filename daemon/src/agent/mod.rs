//! `quiver agent`: the daemon. Start-up wires the pieces together in this order: config →
//! logging → metrics recorder → node identity → QUIC transport → Raft log in `DATA_DIR/raft` →
//! coordinator core → HTTP and gRPC servers → (join) → the event loop.
//!
//! Architecture invariant: the [`CoordinatorCore`] is owned by the event loop ([`event_loop`])
//! and touched nowhere else. Every other task (peer stream readers, gRPC handlers, the joiner)
//! talks to it through one channel of [`Event`]s and reads the cluster through a published
//! [`View`].
//!
//! - [`event_loop`]: `enum Event`, the loop, how `Effects` are carried out.
//! - [`peer`]: Raft batches and control requests over the QUIC transport, seed discovery.
//! - [`grpc`]: the `Cluster` and `Jobs` services, health and reflection.
//! - [`names`]: how a member's name travels in the replicated state.
//! - [`expect`]: `--bootstrap-expect N`: find the other nodes, agree, bootstrap one cluster.
//! - [`jobs`]: admission, placement and mastering of distributed jobs; results.
//! - [`serve`]: the serving path (`Diffusion.Diffuse`) on the pinned worker pools.
//! - [`auth`]: gRPC TLS and caller authentication (certificate or API token), SIGHUP reloads.
//! - [`ui`]: the operator's web view (`/ui` on the HTTP port) and the JSON it polls.
//! - [`chaos`]: fault-injection controls for the drills (only with `--fault-injection` / `failpoints`).

pub mod auth;
pub mod chaos;
mod event_loop;
pub mod expect;
#[cfg(test)]
mod fixtures;
pub mod grpc;
pub mod jobs;
pub mod names;
mod peer;
mod replica;
pub mod serve;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use quiver_coordinator::{
    BootstrapError, CoordinatorCore, CoreConfig, DiskStore, DiskStoreConfig, LogStore, MemberInfo, bootstrap,
};
use quiver_node_agent::transport::{NodeIdentity, Transport, TransportConfig};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{AgentArgs, AgentConfig, LogFormat, Membership};
use crate::http::{self, Health};
use crate::tls::node_id_for;

pub use event_loop::{Event, ProposeReply, View};

/// Records `cmd` through Raft (locally on the leader, forwarded otherwise, retried until
/// `within`); the error says why it could not be recorded.
pub async fn peer_propose(
    shared: &Shared,
    cmd: quiver_coordinator::Command,
    within: Duration,
) -> Result<quiver_coordinator::Outcome, String> {
    peer::propose(shared, cmd, within).await.map_err(|e| e.to_string())
}

/// Makes glibc serve every allocation of 1 MiB or more with its own mapping, returned to the OS
/// when freed. By default glibc raises that threshold after each large free (up to 32 MiB), and
/// an agent's many short-lived megabyte buffers (halo pieces, received frames) then come from
/// per-thread arenas whose freed memory stays resident: measured here, an APPNP owner's peak RSS
/// grew by ~150 MB that way.
fn return_large_frees_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called once, before the agent's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Runs the agent until SIGTERM/SIGINT (exit 0) or a fatal error.
pub fn main(args: AgentArgs) -> Result<()> {
    let cfg = args.resolve()?;
    init_logging(cfg.log_format);
    return_large_frees_to_the_os();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("quiver-agent")
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(run(cfg));
    // Connections and servers are closed by now; do not wait for stray tasks.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("QUIVER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The process's metrics recorder, installed by the first agent of the process (agents that
/// `quiver demo` runs side by side share it).
fn init_metrics() -> Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let latency = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
        .context("configuring metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// What an agent embedded in another command (`quiver demo`) is given instead of signals.
pub struct Embedded {
    /// Set to `true` to stop the agent gracefully (as SIGTERM does).
    pub shutdown: watch::Receiver<bool>,
    /// Receives the bound addresses once the agent listens.
    pub started: oneshot::Sender<Bound>,
}

/// The addresses an agent listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub peer: std::net::SocketAddr,
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
}

/// Runs an agent inside the current tokio runtime until `embedded.shutdown` turns true.
pub async fn run_embedded(cfg: AgentConfig, embedded: Embedded) -> Result<()> {
    run_with(cfg, Some(embedded)).await
}

/// Everything the non-loop tasks share: how to reach the loop, the latest view, the transport.
#[derive(Clone)]
pub struct Shared {
    pub node_id: u64,
    pub events: mpsc::Sender<Event>,
    pub view: watch::Receiver<Arc<View>>,
    pub transport: Transport,
    pub data_dir: std::path::PathBuf,
    /// `--bootstrap-expect` discovery, answering peers' hellos (see [`expect`]).
    pub expect: Option<Arc<expect::Discovery>>,
    /// The pinned worker pools every kernel of this node runs on.
    pub workers: quiver_node_agent::workers::Workers,
    /// The serving path's queue, cache and peers' live load.
    pub serving: Arc<serve::Serving>,
    /// Jobs: admission, the executor, masters and results.
    pub jobs: Arc<jobs::JobsHost>,
}

async fn run(cfg: AgentConfig) -> Result<()> {
    run_with(cfg, None).await
}

async fn run_with(cfg: AgentConfig, embedded: Option<Embedded>) -> Result<()> {
    let metrics = init_metrics()?;
    if !cfg.tls_dir.join(quiver_node_agent::transport::tls::NODE_CERT_FILE).exists()
        && cfg.tls_dir.join(crate::tls::CLIENT_CERT_FILE).exists()
    {
        bail!(
            "{} holds a client certificate, not a node certificate (QUIVER_TLS_DIR is read by the CLI too); \
             pass the node's directory with --tls-dir",
            cfg.tls_dir.display()
        );
    }
    if !cfg.tls_dir.join(quiver_node_agent::transport::tls::NODE_CERT_FILE).exists()
        && let (Some(token), Membership::Join { seeds }) = (&cfg.join_token, &cfg.membership)
    {
        crate::token::fetch_node_certificate(&cfg.tls_dir, &cfg.node_name, seeds, token, cfg.join_timeout)
            .await
            .context("joining with --token")?;
    } else if cfg.join_token.is_some() {
        tracing::info!(tls_dir = %cfg.tls_dir.display(), "a node certificate exists; --token is not needed and is ignored");
    }
    let identity = NodeIdentity::load_dir(&cfg.tls_dir).with_context(|| {
        format!(
            "loading the node identity from {} (make one with `quiver tls cert create --ca CA_DIR --name {} --out {}`)",
            cfg.tls_dir.display(),
            cfg.node_name,
            cfg.tls_dir.display()
        )
    })?;
    let node_id = node_id_for(&cfg.node_name);
    if identity.node_id.0 != node_id {
        bail!(
            "{}: the certificate is for node id {}, but --node-name {} is node id {node_id}; make the certificate with --name {}",
            cfg.tls_dir.display(),
            identity.node_id.0,
            cfg.node_name,
            cfg.node_name
        );
    }
    chaos::init_failpoints()?;
    let faults = cfg.fault_injection.then(|| {
        tracing::warn!("--fault-injection: the peer transport runs on the fault-injecting socket");
        quiver_node_agent::transport::fault::NetFaults::new(node_id)
    });
    let transport_cfg = TransportConfig {
        bind: cfg.peer_addr,
        congestion: cfg.congestion.into(),
        socket_buffer: cfg.udp_buffer,
        job_socket_buffer: cfg.job_udp_buffer,
        max_mtu: cfg.max_mtu,
        faults: faults.clone(),
        ..TransportConfig::default()
    };
    let (transport, handles) = Transport::bind(transport_cfg, &identity).context("binding the peer (QUIC) port")?;
    let peer_local = transport.local_addr();

    let raft_dir = cfg.data_dir.join("raft");
    let store = DiskStore::open(&DiskStoreConfig::new(&raft_dir))
        .with_context(|| format!("opening the raft log in {}", raft_dir.display()))?;
    let initialized =
        quiver_coordinator::raft::Storage::initial_state(&store).map(|s| s.initialized()).unwrap_or(false);

    let health = Arc::new(Health::default());
    health.set_ready(false, "starting");
    let ui_source = Arc::new(std::sync::OnceLock::new());
    let http_routes = chaos::routes(faults).merge(ui::routes(ui_source.clone()));
    let (http_local, http_server) = http::bind(cfg.http_addr, health.clone(), metrics, http_routes)
        .await
        .with_context(|| format!("binding --http-addr {}", cfg.http_addr))?;
    let grpc_listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .with_context(|| format!("binding --grpc-addr {}", cfg.grpc_addr))?;
    let grpc_local = grpc_listener.local_addr()?;
    let advertise_grpc = if grpc_local.ip().is_unspecified() {
        std::net::SocketAddr::new(cfg.advertise_addr.ip(), grpc_local.port())
    } else {
        grpc_local
    };
    let advertise_peer = if cfg.advertise_addr.port() == 0 { peer_local } else { cfg.advertise_addr };
    let me = MemberInfo {
        id: node_id,
        peer_addr: advertise_peer.to_string(),
        control_addr: names::encode_control_addr(&advertise_grpc.to_string(), &cfg.node_name),
        cores: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        memory_bytes: memory_bytes(),
    };

    let mut join_seeds = None;
    let mut expect_seeds = None;
    match (&cfg.membership, initialized) {
        (Membership::Bootstrap { .. }, false) => match bootstrap(&store, std::slice::from_ref(&me)) {
            Ok(()) => tracing::info!(node = %cfg.node_name, node_id, "bootstrapped a new single-node cluster"),
            Err(BootstrapError::AlreadyInitialized) => {}
            Err(e) => return Err(e).context("bootstrapping"),
        },
        (Membership::BootstrapExpect { expect, seeds }, false) => expect_seeds = Some((*expect, seeds.clone())),
        (Membership::Join { seeds }, false) => join_seeds = Some(seeds.clone()),
        (Membership::Restart, false) => bail!(
            "{} holds no cluster: start with --bootstrap (a new cluster) or --join SEED (an existing one)",
            raft_dir.display()
        ),
        (mode, true) => {
            if *mode != Membership::Restart {
                tracing::info!(
                    ?mode,
                    "the raft log already holds a cluster; resuming it and ignoring the membership flags"
                );
            }
        }
    }

    // Answers other nodes' bootstrap-expect hellos (also after this node has bootstrapped).
    let discovery = match &expect_seeds {
        Some((n, _)) => Some(expect::Discovery::open(*n, me.clone(), &cfg.data_dir)?),
        None => expect::Discovery::resume(me.clone(), &cfg.data_dir)?,
    };
    let (events_tx, events_rx) = mpsc::channel(4096);
    let (view_tx, view_rx) = watch::channel(Arc::new(View::empty(node_id, &cfg.node_name)));
    let topology = quiver_node_agent::workers::Topology::from_os();
    let workers = quiver_node_agent::workers::Workers::new(&topology, cfg.worker_threads)
        .context("starting the worker threads")?;
    tracing::info!(threads = workers.threads(), numa_nodes = workers.pools(), cpus = ?workers.cpus(), "worker pools pinned");
    let mut serve_cfg = serve::ServeConfig::defaults(workers.threads());
    serve_cfg.queue_limit = cfg.serve_queue_limit.unwrap_or(serve_cfg.queue_limit);
    serve_cfg.forward_threshold = cfg.serve_forward_threshold.unwrap_or(serve_cfg.forward_threshold);
    let serving = Arc::new(serve::Serving::new(node_id, workers.clone(), serve_cfg));
    let shared = Shared {
        node_id,
        events: events_tx.clone(),
        view: view_rx,
        transport: transport.clone(),
        data_dir: cfg.data_dir.clone(),
        expect: discovery.clone(),
        jobs: jobs::JobsHost::new(
            {
                let rt = quiver_node_agent::jobs::JobRuntime::new(transport.clone(), workers.clone());
                rt.partition_cache().set_capacity(cfg.partition_cache);
                rt
            },
            &cfg.data_dir,
            &cfg.tls_dir,
        ),
        workers,
        serving,
    };

    let _ = ui_source.set(shared.clone());
    peer::spawn_inbound(shared.clone(), handles);
    serve::spawn_load_reports(shared.clone());
    jobs::spawn(shared.clone());
    tokio::spawn(async move {
        if let Err(e) = http_server.await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grpc_tls = auth::GrpcTls::load(&cfg.tls_dir).context("loading the gRPC TLS configuration")?;
    let grpc_task = tokio::spawn(grpc::serve(shared.clone(), grpc_tls.clone(), grpc_listener, grpc_stop_rx)?);
    match embedded {
        None => {
            spawn_signals(events_tx.clone());
            auth::spawn_sighup(cfg.tls_dir.clone(), transport.clone(), grpc_tls);
        }
        Some(Embedded { mut shutdown, started }) => {
            let _ = started.send(Bound { peer: peer_local, grpc: grpc_local, http: http_local });
            let events = events_tx.clone();
            tokio::spawn(async move {
                while !*shutdown.borrow_and_update() {
                    if shutdown.changed().await.is_err() {
                        break;
                    }
                }
                let _ = events.send(Event::Shutdown).await;
            });
        }
    }
    if let Some(seeds) = join_seeds {
        let shared = shared.clone();
        let me = me.clone();
        let timeout = cfg.join_timeout;
        let identity = identity.clone();
        tokio::spawn(async move {
            if let Err(e) = peer::join(&shared, &identity, &seeds, me, timeout).await {
                let _ = shared.events.send(Event::Fatal(format!("{e:#}"))).await;
            }
        });
    }
    tracing::info!(
        node = %cfg.node_name, node_id, peer = %peer_local, grpc = %grpc_local, http = %http_local,
        data_dir = %cfg.data_dir.display(), "agent started"
    );

    // Raft messages from nodes that bootstrapped first wait in the event queue meanwhile.
    if let (Some((n, seeds)), Some(d)) = (&expect_seeds, &discovery) {
        health.set_ready(false, format!("waiting for {n} nodes (--bootstrap-expect)"));
        let members = tokio::select! {
            r = expect::discover(&shared, &identity, seeds, d) => r?,
            () = expect::stop_signal() => {
                tracing::info!("stopped while waiting for the other --bootstrap-expect nodes");
                let _ = grpc_stop_tx.send(());
                transport.shutdown().await;
                return Ok(());
            }
        };
        match bootstrap(&store, &members) {
            Ok(()) => tracing::info!(nodes = members.len(), "bootstrapped a new cluster (--bootstrap-expect)"),
            Err(BootstrapError::AlreadyInitialized) => {}
            Err(e) => return Err(e).context("bootstrapping"),
        }
    }
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let core =
        CoordinatorCore::open(CoreConfig::new(node_id), store.clone(), &logger).context("opening the coordinator")?;
    let loop_result = event_loop::EventLoop::new(core, store, transport.clone(), health, view_tx, me)
        .with_leaders_log(cfg.data_dir.join("leaders.log"))
        .run(events_rx)
        .await;
    let _ = grpc_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), grpc_task).await;
    transport.shutdown().await;
    loop_result
}

fn spawn_signals(events: mpsc::Sender<Event>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers; SIGTERM will not shut down gracefully");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        let _ = events.send(Event::Shutdown).await;
    });
}

/// Physical memory from `/proc/meminfo` (0 when unknown).
fn memory_bytes() -> u64 {
    quiver_compute::buf::meminfo("MemTotal").unwrap_or(0)
}

/// Compile-time check that the store type the loop uses is a [`LogStore`].
const _: fn() = || {
    fn is_store<S: LogStore>() {}
    is_store::<DiskStore>();
};

//! The operator's client commands: `quiver members`, `quiver status`, `quiver submit`,
//! `quiver job get|list|cancel`. Each talks gRPC over TLS to one agent (`--addr`), presenting a
//! certificate from `--tls-dir`, and prints a table or, with `--output json`, one JSON value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use quiver_node_agent::transport::tls::{CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
use quiver_proto::control::cluster_client::ClusterClient;
use quiver_proto::control::jobs_client::JobsClient;
use quiver_proto::control::{
    CancelJobRequest, FetchResultRequest, GetJobRequest, GraphFormat, Job, JobSpec, JobState, Kernel, KernelParams,
    LeaveRequest, ListJobsRequest, MemberRole, MembersRequest, StatusRequest, SubmitRequest, WatchJobRequest,
    submit_request,
};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::run::{Algo, DiffusionArgs};
use crate::tls::{CLIENT_CERT_FILE, CLIENT_KEY_FILE, CLUSTER_SERVER_NAME};

/// Output format of client commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A readable table.
    #[default]
    Table,
    /// One JSON value.
    Json,
}

/// Where the agent is and how to prove who we are.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// The agent's gRPC address (host:port).
    #[arg(long, env = "QUIVER_ADDR", default_value = "127.0.0.1:7401", global = true)]
    pub addr: String,
    /// Directory with ca.pem and client.pem/client.key (or node.pem/node.key).
    #[arg(long, env = "QUIVER_TLS_DIR", global = true)]
    pub tls_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// `quiver submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The graph file to upload (any format `quiver graph` reads).
    pub graph: PathBuf,
    #[command(flatten)]
    pub diffusion: DiffusionArgs,
    /// A name for the job.
    #[arg(long)]
    pub name: Option<String>,
    /// Partitions to split the graph into (0 = one per member).
    #[arg(long, default_value_t = 0)]
    pub partitions: u32,
    /// Upload chunk size in bytes (the server refuses messages above 4 MiB).
    #[arg(long, default_value_t = 1 << 20, hide = true)]
    pub chunk_bytes: usize,
    /// Checkpoint every K supersteps (0: about every 5 s of superstep time).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u32,
    /// Do not upload: the graph path is read by the node that takes the submit.
    #[arg(long)]
    pub by_path: bool,
    /// Wait for the job to finish, showing its progress; exit non-zero if it fails.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `quiver result`.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The job id.
    pub id: u64,
    /// Where to write the result (.npy).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
}

/// `quiver leave`.
#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The name of the member to remove from the cluster.
    pub name: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// `quiver job …`.
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Show one job.
    Get {
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the jobs.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a job.
    Cancel {
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow a job until it ends: exit 0 when it succeeds, non-zero with the reason otherwise.
    Watch {
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

pub async fn channel(conn: &Conn) -> Result<Channel> {
    connect(conn, Some(Duration::from_secs(15))).await
}

/// [`channel`] with a chosen per-request timeout (`None` for streams that last as long as a job).
pub async fn connect(conn: &Conn, timeout: Option<Duration>) -> Result<Channel> {
    let endpoint = match timeout {
        Some(t) => endpoint(conn)?.timeout(t),
        None => endpoint(conn)?,
    };
    endpoint
        .connect_with_connector(crate::coalesce::Connector)
        .await
        .with_context(|| format!("connecting to {}", conn.addr))
}

/// The agent at `conn.addr`, over TLS with the client certificate of `conn.tls_dir` (a node's
/// when the directory has no client certificate). HTTP/2 windows are well above the 64 KiB
/// default, so that requests of tens of KiB do not wait on WINDOW_UPDATE round trips. Connect
/// through [`crate::coalesce::Connector`]: one `writev` per HTTP/2 flush.
pub fn endpoint(conn: &Conn) -> Result<Endpoint> {
    let dir = conn
        .tls_dir
        .clone()
        .context("--tls-dir (or QUIVER_TLS_DIR) is required: a directory with ca.pem and a client certificate")?;
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let ca = read(&dir.join(CA_CERT_FILE))?;
    let (cert, key) = if dir.join(CLIENT_CERT_FILE).exists() {
        (read(&dir.join(CLIENT_CERT_FILE))?, read(&dir.join(CLIENT_KEY_FILE))?)
    } else {
        (read(&dir.join(NODE_CERT_FILE))?, read(&dir.join(NODE_KEY_FILE))?)
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(CLUSTER_SERVER_NAME);
    Ok(Channel::from_shared(format!("https://{}", conn.addr))
        .with_context(|| format!("--addr {}: not a host:port address", conn.addr))?
        .tls_config(tls)
        .context("configuring TLS")?
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .connect_timeout(Duration::from_secs(3)))
}

/// One line for a gRPC error: its code and message.
fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn print(conn: &Conn, value: &Value, table: impl FnOnce() -> String) {
    match conn.output {
        Output::Json => println!("{value}"),
        Output::Table => print!("{}", table()),
    }
}

/// Left-aligned columns.
fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s: String = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

pub fn members(conn: Conn) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = ClusterClient::new(channel(&conn).await?);
        let ms = c.members(MembersRequest {}).await.map_err(status_error)?.into_inner().members;
        let rows: Vec<Value> = ms
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "node_id": m.node_id,
                    "role": match MemberRole::try_from(m.role) { Ok(MemberRole::Voter) => "voter", Ok(MemberRole::Learner) => "learner", _ => "unknown" },
                    "state": liveness(m.liveness),
                    "leader": m.leader,
                    "peer_addr": m.peer_addr,
                    "rpc_addr": m.rpc_addr,
                    "cores": m.cores,
                    "memory_bytes": m.memory_bytes,
                })
            })
            .collect();
        print(&conn, &Value::Array(rows.clone()), || {
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        str_of(&r["name"]),
                        r["node_id"].to_string(),
                        str_of(&r["role"]) + if r["leader"] == json!(true) { " (leader)" } else { "" },
                        str_of(&r["state"]),
                        str_of(&r["peer_addr"]),
                        str_of(&r["rpc_addr"]),
                    ]
                })
                .collect();
            render(&["NAME", "ID", "ROLE", "STATE", "PEER", "GRPC"], &table)
        });
        Ok(())
    })
}

pub fn leave(args: LeaveArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = ClusterClient::new(channel(&args.conn).await?);
        let ms = c.members(MembersRequest {}).await.map_err(status_error)?.into_inner().members;
        let Some(m) = ms.iter().find(|m| m.name == args.name) else {
            let names: Vec<&str> = ms.iter().map(|m| m.name.as_str()).collect();
            bail!("{}: not a member (members: {})", args.name, names.join(", "));
        };
        c.leave(LeaveRequest { node_id: m.node_id }).await.map_err(status_error)?;
        let v = json!({ "name": args.name, "node_id": m.node_id, "left": true });
        print(&args.conn, &v, || format!("{} left the cluster\n", args.name));
        Ok(())
    })
}

fn liveness(v: i32) -> &'static str {
    use quiver_proto::control::Liveness;
    match Liveness::try_from(v) {
        Ok(Liveness::Alive) => "alive",
        Ok(Liveness::Suspect) => "suspect",
        Ok(Liveness::Down) => "down",
        Ok(Liveness::Left) => "left",
        _ => "unknown",
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

pub fn status(conn: Conn) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = ClusterClient::new(channel(&conn).await?);
        let s = c.status(StatusRequest {}).await.map_err(status_error)?.into_inner();
        let leader = if s.leader_name.is_empty() { Value::Null } else { json!(s.leader_name) };
        let v = json!({
            "node": s.node_name,
            "node_id": s.node_id,
            "leader": leader,
            "leader_id": s.leader_id,
            "leader_rpc_addr": s.leader_rpc_addr,
            "term": s.term,
            "commit_index": s.commit_index,
            "members": s.members,
            "ready": s.ready,
            "version": s.version,
        });
        print(&conn, &v, || {
            let rows: Vec<Vec<String>> =
                ["node", "node_id", "leader", "leader_rpc_addr", "term", "commit_index", "members", "ready", "version"]
                    .iter()
                    .map(|k| vec![k.to_string(), str_of(&v[*k])])
                    .collect();
            render(&["FIELD", "VALUE"], &rows)
        });
        Ok(())
    })
}

/// A client id for this invocation; retries inside it reuse the same request id.
fn client_id() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b).max(1)
}

pub fn submit(args: SubmitArgs) -> Result<()> {
    let d = &args.diffusion;
    let kernel = match d.algo {
        Algo::Pagerank => Kernel::Pagerank,
        Algo::Ppr => Kernel::PersonalizedPagerank,
        Algo::Heat => Kernel::Heat,
        Algo::Appnp => Kernel::Appnp,
    };
    let (max_iterations, tolerance) = match (d.iterations, d.tolerance) {
        (_, Some(t)) => (d.max_iterations, f64::from(t)),
        (Some(n), None) => (n, 0.0),
        (None, None) => (20, 0.0),
    };
    let alpha = match d.algo {
        Algo::Pagerank | Algo::Ppr => f64::from(d.damping),
        Algo::Heat => f64::from(d.t),
        Algo::Appnp => f64::from(d.alpha),
    };
    let width = match d.algo {
        Algo::Appnp => d.feature_dim.unwrap_or(0) as u32,
        _ => 1,
    };
    let format = match args.graph.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("el" | "txt" | "edges") => GraphFormat::Snap,
        Some("mtx") => GraphFormat::MatrixMarket,
        Some("qcsr") => GraphFormat::QuiverCsr,
        _ => GraphFormat::Unspecified,
    };
    let absolute = |p: &Path| -> Result<String> {
        let p = std::path::absolute(p).with_context(|| format!("{}: not a usable path", p.display()))?;
        Ok(p.display().to_string())
    };
    let features_path = match &d.features {
        Some(f) => absolute(f)?,
        None => String::new(),
    };
    let (bytes, graph_path) = if args.by_path {
        (Vec::new(), absolute(&args.graph)?)
    } else {
        let bytes =
            std::fs::read(&args.graph).with_context(|| format!("reading the graph {}", args.graph.display()))?;
        if bytes.is_empty() {
            bail!("{}: the graph file is empty", args.graph.display());
        }
        (bytes, String::new())
    };
    let spec = JobSpec {
        name: args.name.clone().unwrap_or_default(),
        params: Some(KernelParams {
            kernel: kernel as i32,
            alpha,
            max_iterations,
            tolerance,
            seeds: d.seeds.clone(),
            width,
            random_walk: d.normalization == crate::run::Norm::Rw,
            features_path,
            feature_seed: d.feature_seed,
        }),
        format: format as i32,
        graph_path,
        partitions: args.partitions,
        checkpoint_every: args.checkpoint_every,
        client_id: client_id(),
        client_seq: 1,
        holder: 0,
        features_digest: Vec::new(),
    };
    runtime()?.block_on(async {
        let mut c = JobsClient::new(channel(&args.conn).await?);
        let mut messages = vec![SubmitRequest { body: Some(submit_request::Body::Spec(spec)) }];
        for chunk in bytes.chunks(args.chunk_bytes.max(1)) {
            messages.push(SubmitRequest { body: Some(submit_request::Body::GraphChunk(chunk.to_vec())) });
        }
        let id = c.submit(tokio_stream_iter(messages)).await.map_err(status_error)?.into_inner().job_id;
        if args.wait {
            return watch(&args.conn, id).await;
        }
        let v = json!({ "id": id, "state": "queued" });
        print(&args.conn, &v, || format!("submitted job {id}\n"));
        Ok(())
    })
}

/// Follows job `id` to its end: a progress bar on a terminal, a line per superstep otherwise
/// (nothing but the final object with `--output json`). Errors when the job does not succeed.
async fn watch(conn: &Conn, id: u64) -> Result<()> {
    let mut c = JobsClient::new(connect(conn, None).await?);
    let first = c.get(GetJobRequest { job_id: id }).await.map_err(status_error)?.into_inner();
    let total = first.spec.as_ref().and_then(|s| s.params.as_ref()).map_or(0, |p| p.max_iterations);
    let tty = conn.output == Output::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = tty.then(|| {
        let bar = indicatif::ProgressBar::new(u64::from(total));
        bar.set_style(
            indicatif::ProgressStyle::with_template("job {prefix} {bar:30} {pos}/{len} supersteps {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(id.to_string());
        bar
    });
    let mut stream = c.watch(WatchJobRequest { job_id: id }).await.map_err(status_error)?.into_inner();
    let mut last_step = None;
    while let Some(p) = stream.message().await.map_err(status_error)? {
        match &bar {
            Some(b) => {
                b.set_position(p.superstep);
                b.set_message(format!("{} residual {:.3e}", state_name(p.state), p.residual));
            }
            None if conn.output == Output::Table && last_step != Some(p.superstep) => {
                eprintln!("job {id}: {} superstep {} residual {:.3e}", state_name(p.state), p.superstep, p.residual);
            }
            None => {}
        }
        last_step = Some(p.superstep);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let j = c.get(GetJobRequest { job_id: id }).await.map_err(status_error)?.into_inner();
    let v = job_json(&j);
    print(conn, &v, || jobs_table(std::slice::from_ref(&v)));
    match JobState::try_from(j.state) {
        Ok(JobState::Succeeded) => Ok(()),
        Ok(JobState::Failed) => bail!("job {id} failed: {}", j.error),
        Ok(JobState::Cancelled) => bail!("job {id} was cancelled"),
        _ => bail!("job {id}: the watch ended while the job is {}", state_name(j.state)),
    }
}

/// `quiver result JOB --out FILE.npy`.
pub fn result(args: ResultArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = JobsClient::new(connect(&args.conn, None).await?).max_decoding_message_size(64 << 20);
        let mut stream =
            c.fetch_result(FetchResultRequest { job_id: args.id }).await.map_err(status_error)?.into_inner();
        let tmp = args.out.with_extension("npy.part");
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await.map_err(status_error)? {
            std::io::Write::write_all(&mut file, &chunk.data).with_context(|| format!("writing {}", tmp.display()))?;
            bytes += chunk.data.len() as u64;
        }
        file.sync_all().with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &args.out).with_context(|| format!("storing {}", args.out.display()))?;
        let v = json!({ "id": args.id, "out": args.out, "bytes": bytes });
        print(&args.conn, &v, || format!("job {} result written to {} ({bytes} bytes)\n", args.id, args.out.display()));
        Ok(())
    })
}

fn tokio_stream_iter<T: Send + 'static>(
    items: Vec<T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::iter(items)
}

fn state_name(state: i32) -> &'static str {
    match JobState::try_from(state) {
        Ok(JobState::Pending) => "queued",
        Ok(JobState::Running) => "running",
        Ok(JobState::Succeeded) => "succeeded",
        Ok(JobState::Failed) => "failed",
        Ok(JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn job_json(j: &Job) -> Value {
    let p = j.spec.as_ref().and_then(|s| s.params.clone()).unwrap_or_default();
    let algo = match Kernel::try_from(p.kernel) {
        Ok(Kernel::Pagerank) => "pagerank",
        Ok(Kernel::PersonalizedPagerank) => "ppr",
        Ok(Kernel::Heat) => "heat",
        Ok(Kernel::Appnp) => "appnp",
        _ => "unknown",
    };
    let digest: String = j.graph_digest.iter().map(|b| format!("{b:02x}")).collect();
    json!({
        "id": j.job_id,
        "name": j.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        "state": state_name(j.state),
        "algo": algo,
        "max_iterations": p.max_iterations,
        "epoch": j.epoch,
        "superstep": j.superstep,
        "residual": j.residual,
        "graph_digest": digest,
        "result_digest": crate::run::hex(&j.result_digest),
        "error": j.error,
        "master": j.master,
        "holders": j.holders,
    })
}

fn jobs_table(jobs: &[Value]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j["id"].to_string(),
                str_of(&j["name"]),
                str_of(&j["state"]),
                str_of(&j["algo"]),
                str_of(&j["graph_digest"]).chars().take(16).collect(),
            ]
        })
        .collect();
    render(&["ID", "NAME", "STATE", "ALGO", "GRAPH"], &rows)
}

pub fn job(cmd: JobCmd) -> Result<()> {
    runtime()?.block_on(async {
        match cmd {
            JobCmd::Get { id, conn } => {
                let mut c = JobsClient::new(channel(&conn).await?);
                let j = c.get(GetJobRequest { job_id: id }).await.map_err(status_error)?.into_inner();
                let v = job_json(&j);
                print(&conn, &v, || jobs_table(std::slice::from_ref(&v)));
            }
            JobCmd::List { conn } => {
                let mut c = JobsClient::new(channel(&conn).await?);
                let jobs = c.list(ListJobsRequest {}).await.map_err(status_error)?.into_inner().jobs;
                let v: Vec<Value> = jobs.iter().map(job_json).collect();
                print(&conn, &Value::Array(v.clone()), || jobs_table(&v));
            }
            JobCmd::Watch { id, conn } => return watch(&conn, id).await,
            JobCmd::Cancel { id, conn } => {
                let mut c = JobsClient::new(channel(&conn).await?);
                c.cancel(CancelJobRequest { job_id: id }).await.map_err(status_error)?;
                let v = json!({ "id": id, "state": "cancelled" });
                print(&conn, &v, || format!("cancelled job {id}\n"));
            }
        }
        Ok(())
    })
}

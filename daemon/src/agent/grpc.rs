//! The gRPC control plane (default port 7401): `Cluster` and the control half of `Jobs`, plus
//! `grpc.health.v1` and server reflection.
//!
//! TLS with the node's certificate; callers must present a certificate from the cluster CA
//! (client or node) or an API token ([`super::auth`] checks every call). Reads are answered from this node's published [`View`]; writes go through
//! Raft ([`peer::propose`]: locally on the leader, forwarded over QUIC otherwise). Handlers never
//! touch the coordinator core.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, Result};
use prost::Message as _;
use quiver_coordinator::state::{Job as CoreJob, JobSpec as CoreSpec, JobState as CoreJobState, Liveness, Role};
use quiver_coordinator::{Command, MemberInfo, Op, Outcome, RequestId};
use quiver_node_agent::transport::tls::node_id_of;
use quiver_proto::control::cluster_server::{Cluster, ClusterServer};
use quiver_proto::control::jobs_server::{Jobs, JobsServer};
use quiver_proto::control::{
    CancelJobRequest, CancelJobResponse, FetchResultRequest, GetJobRequest, Job, JobProgress, JobSpec, JobState,
    JoinRequest, JoinResponse, Kernel, LeaveRequest, LeaveResponse, ListJobsRequest, ListJobsResponse, Member,
    MemberRole, MembersRequest, MembersResponse, PromoteRequest, PromoteResponse, ResultChunk, StatusRequest,
    StatusResponse, SubmitRequest, SubmitResponse, WatchJobRequest, submit_request,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

use super::names::decode_control_addr;
use super::peer::{self, ProposeFailure};
use super::{Shared, View};

/// Largest single gRPC message accepted (graph uploads come in chunks below this).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Largest graph a `Submit` may upload.
pub const MAX_GRAPH_BYTES: u64 = 1 << 30;
/// How long a write may wait for a leader.
const WRITE_WITHIN: Duration = Duration::from_secs(5);

/// Builds the server (TLS, services, limits) and returns the future that serves until `stop`.
pub fn serve(
    shared: Shared,
    tls: std::sync::Arc<super::auth::GrpcTls>,
    listener: TcpListener,
    stop: oneshot::Receiver<()>,
) -> Result<impl Future<Output = ()> + use<>> {
    let authenticate = super::auth::authenticate(shared.view.clone());
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(quiver_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let cluster = ClusterServer::new(ClusterSvc { shared: shared.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 << 20);
    let shared_serve = shared.clone();
    let jobs = JobsServer::new(JobsSvc { shared })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 << 20);
    // HTTP/2 windows well above the 64 KiB default: serving requests of tens of KiB each would
    // otherwise wait on WINDOW_UPDATE round trips, and every update is one more write.
    let router = Server::builder()
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .layer(tonic::service::InterceptorLayer::new(authenticate))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(cluster)
        .add_service(jobs)
        .add_service(super::serve::service(shared_serve));
    Ok(async move {
        health.set_serving::<ClusterServer<ClusterSvc>>().await;
        health.set_serving::<JobsServer<JobsSvc>>().await;
        health
            .set_serving::<quiver_proto::control::diffusion_server::DiffusionServer<super::serve::DiffusionSvc>>()
            .await;
        let incoming = super::auth::incoming(listener, tls);
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop.await;
            })
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
        }
    })
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

fn unavailable(e: ProposeFailure) -> Status {
    Status::unavailable(e.to_string())
}

fn view(shared: &Shared) -> std::sync::Arc<View> {
    shared.view.borrow().clone()
}

struct ClusterSvc {
    shared: Shared,
}

#[tonic::async_trait]
impl Cluster for ClusterSvc {
    async fn members(&self, _: Request<MembersRequest>) -> Result<Response<MembersResponse>, Status> {
        let v = view(&self.shared);
        let members = v
            .state
            .members
            .values()
            .map(|m| {
                let (rpc_addr, name) = decode_control_addr(m.info.id, &m.info.control_addr);
                Member {
                    node_id: m.info.id,
                    peer_addr: m.info.peer_addr.clone(),
                    rpc_addr,
                    cores: m.info.cores,
                    memory_bytes: m.info.memory_bytes,
                    role: match m.role {
                        Role::Voter => MemberRole::Voter,
                        Role::Learner => MemberRole::Learner,
                    } as i32,
                    liveness: match m.liveness {
                        Liveness::Alive => quiver_proto::control::Liveness::Alive,
                        Liveness::Down => quiver_proto::control::Liveness::Down,
                    } as i32,
                    leader: m.info.id == v.status.leader,
                    name,
                }
            })
            .collect();
        Ok(Response::new(MembersResponse { members }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let v = view(&self.shared);
        let leader = v.state.members.get(&v.status.leader);
        let (leader_rpc_addr, leader_name) =
            leader.map(|m| decode_control_addr(m.info.id, &m.info.control_addr)).unwrap_or_default();
        Ok(Response::new(StatusResponse {
            node_id: v.node_id,
            leader_id: v.status.leader,
            leader_rpc_addr,
            term: v.status.term,
            commit_index: v.status.commit,
            members: v.state.members.len() as u32,
            running_jobs: v.state.jobs.values().filter(|j| j.state == CoreJobState::Running).count() as u32,
            version: env!("CARGO_PKG_VERSION").into(),
            node_name: v.node_name.clone(),
            leader_name,
            ready: v.ready,
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // The joining node is whoever the caller's certificate names; a client certificate
        // cannot join.
        let id = req
            .peer_certs()
            .and_then(|c| c.first().and_then(|c| node_id_of(c).ok()))
            .ok_or_else(|| Status::permission_denied("join: the caller must present a node certificate"))?;
        let r = req.into_inner();
        if r.peer_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid("peer_addr", format!("{:?} is not a host:port address", r.peer_addr)));
        }
        let info = MemberInfo {
            id: id.0,
            peer_addr: r.peer_addr,
            control_addr: r.rpc_addr,
            cores: r.cores,
            memory_bytes: r.memory_bytes,
        };
        let cmd = Command { request: RequestId { client: id.0, seq: now_micros() }, op: Op::Join(info) };
        match peer::propose(&self.shared, cmd, WRITE_WITHIN).await.map_err(unavailable)? {
            Outcome::Rejected(r) => Err(Status::failed_precondition(format!("join: {r}"))),
            _ => Ok(Response::new(JoinResponse { node_id: id.0, ..Default::default() })),
        }
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let node = req.into_inner().node_id;
        if !view(&self.shared).state.members.contains_key(&node) {
            return Err(Status::not_found(format!("node {node} is not a member")));
        }
        let cmd = Command { request: RequestId { client: random_client(), seq: 1 }, op: Op::Leave { node } };
        match peer::propose(&self.shared, cmd, WRITE_WITHIN).await.map_err(unavailable)? {
            Outcome::Rejected(r) => Err(Status::failed_precondition(format!("leave: {r}"))),
            _ => Ok(Response::new(LeaveResponse {})),
        }
    }

    async fn promote(&self, _: Request<PromoteRequest>) -> Result<Response<PromoteResponse>, Status> {
        Err(Status::unimplemented("promote: voters are chosen by the autopilot; manual promotion is not supported"))
    }

    async fn create_token(
        &self,
        req: Request<quiver_proto::control::CreateTokenRequest>,
    ) -> Result<Response<quiver_proto::control::CreateTokenResponse>, Status> {
        // Tokens are minted by certificate holders only: an API token cannot mint more tokens.
        if req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::permission_denied("create token: the caller must present a client certificate"));
        }
        let r = req.into_inner();
        crate::token::create(&self.shared, r.ttl_secs, r.api).await.map(Response::new)
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64)
}

/// A client id for a request whose caller gave none (not idempotent across the caller's retries).
fn random_client() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b).max(1)
}

struct JobsSvc {
    shared: Shared,
}

type BoxStream<T> = Pin<Box<dyn tonic::codegen::tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// The kernel's name as the coordinator records it, or why the spec is refused.
fn validate(spec: &JobSpec) -> Result<&'static str, Status> {
    let p = spec.params.as_ref().ok_or_else(|| invalid("params", "missing: the job needs an algorithm"))?;
    let kernel = match Kernel::try_from(p.kernel) {
        Ok(Kernel::Pagerank) => "pagerank",
        Ok(Kernel::PersonalizedPagerank) => "ppr",
        Ok(Kernel::Heat) => "heat",
        Ok(Kernel::Appnp) => "appnp",
        _ => {
            return Err(invalid(
                "params.kernel",
                format!("unknown algorithm {}; expected pagerank, ppr, heat or appnp", p.kernel),
            ));
        }
    };
    if p.max_iterations == 0 {
        return Err(invalid("params.max_iterations", "must be at least 1"));
    }
    if !(p.tolerance.is_finite() && p.tolerance >= 0.0) {
        return Err(invalid("params.tolerance", format!("{} is not a non-negative number", p.tolerance)));
    }
    if kernel == "heat" {
        if !(p.alpha.is_finite() && p.alpha >= 0.0) {
            return Err(invalid(
                "params.alpha",
                format!("heat kernel time t = {} must be a finite number ≥ 0", p.alpha),
            ));
        }
    } else if !(p.alpha.is_finite() && (0.0..=1.0).contains(&p.alpha)) {
        return Err(invalid("params.alpha", format!("{} is outside [0, 1]", p.alpha)));
    }
    if matches!(kernel, "ppr" | "heat") && p.seeds.is_empty() {
        return Err(invalid("params.seeds", format!("{kernel} needs at least one seed vertex")));
    }
    if kernel == "appnp" && p.width == 0 && p.features_path.is_empty() {
        return Err(invalid(
            "params.width",
            "appnp needs features: a feature width of at least 1 (generated features) or features_path",
        ));
    }
    Ok(kernel)
}

/// Streams a job's progress as this node sees it until the job ends: live supersteps when this
/// node masters it, the replicated state's otherwise.
async fn watch_here(shared: Shared, id: u64, tx: tokio::sync::mpsc::Sender<Result<JobProgress, Status>>) {
    let mut view = shared.view.clone();
    let mut live = shared.jobs.progress(id);
    let mut last: Option<JobProgress> = None;
    loop {
        let v = view.borrow_and_update().clone();
        let Some(j) = v.state.jobs.get(&id) else { return };
        if live.is_none() {
            live = shared.jobs.progress(id);
        }
        let snapshot = live.as_mut().map(|l| *l.borrow_and_update());
        let jp = job_to_proto(j, snapshot.as_ref());
        let p = JobProgress {
            job_id: id,
            state: jp.state,
            superstep: jp.superstep,
            residual: jp.residual,
            epoch: jp.epoch,
        };
        if last.as_ref() != Some(&p) {
            if tx.send(Ok(p)).await.is_err() {
                return;
            }
            last = Some(p);
        }
        if j.state.is_terminal() {
            return;
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            r = async {
                match live.as_mut() {
                    Some(l) => l.changed().await,
                    // The master may start (and publish its progress) just after the view change
                    // that woke this loop: look for it again shortly rather than at the next change.
                    None => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(())
                    }
                }
            } => if r.is_err() { live = None },
            _ = tx.closed() => return,
        }
    }
}

fn job_to_proto(j: &CoreJob, live: Option<&JobProgress>) -> Job {
    let spec = JobSpec::decode(&j.spec.params[..]).ok();
    let (state, error) = match &j.state {
        CoreJobState::Pending => (JobState::Pending, String::new()),
        CoreJobState::Running => (JobState::Running, String::new()),
        CoreJobState::Completed => (JobState::Succeeded, String::new()),
        CoreJobState::Failed(reason) => (JobState::Failed, reason.clone()),
        CoreJobState::Cancelled => (JobState::Cancelled, String::new()),
    };
    Job {
        job_id: j.id,
        spec,
        state: state as i32,
        epoch: j.epoch,
        superstep: live
            .filter(|p| p.epoch == j.epoch)
            .map_or_else(|| j.last_checkpoint.as_ref().map_or(0, |c| c.superstep), |p| p.superstep),
        residual: live.filter(|p| p.epoch == j.epoch).map_or(0.0, |p| p.residual),
        graph_digest: j.graph_digest.to_vec(),
        result_digest: j.result_digest.map(|d| d.to_vec()).unwrap_or_default(),
        error,
        master: j.master,
        holders: j.spec.holders.clone(),
    }
}

#[tonic::async_trait]
impl Jobs for JobsSvc {
    async fn submit(&self, req: Request<Streaming<SubmitRequest>>) -> Result<Response<SubmitResponse>, Status> {
        let mut stream = req.into_inner();
        let mut spec = match stream.message().await? {
            Some(SubmitRequest { body: Some(submit_request::Body::Spec(s)) }) => s,
            _ => return Err(invalid("spec", "missing: the first message of a submit must carry the job spec")),
        };
        let kernel = validate(&spec)?;
        let started = std::time::Instant::now();
        let blobs = self.shared.data_dir.join("blobs");
        tokio::fs::create_dir_all(&blobs)
            .await
            .map_err(|e| Status::internal(format!("creating {}: {e}", blobs.display())))?;
        let part = blobs.join(format!("upload-{:016x}.part", random_client()));
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut total = 0u64;
        let mut file = None;
        let upload = async {
            while let Some(m) = stream.message().await? {
                match m.body {
                    Some(submit_request::Body::GraphChunk(b)) => {
                        total += b.len() as u64;
                        if total > MAX_GRAPH_BYTES {
                            return Err(Status::resource_exhausted(format!(
                                "graph_chunk: the graph exceeds the {MAX_GRAPH_BYTES}-byte upload limit"
                            )));
                        }
                        digest.update(&b);
                        if file.is_none() {
                            file = Some(
                                tokio::fs::File::create(&part)
                                    .await
                                    .map_err(|e| Status::internal(format!("creating {}: {e}", part.display())))?,
                            );
                        }
                        if let Some(f) = file.as_mut() {
                            f.write_all(&b)
                                .await
                                .map_err(|e| Status::internal(format!("writing {}: {e}", part.display())))?;
                        }
                    }
                    Some(submit_request::Body::Spec(_)) => return Err(invalid("spec", "sent twice in one submit")),
                    None => {}
                }
            }
            Ok(())
        };
        let uploaded = upload.await;
        if let Some(mut f) = file.take() {
            let _ = f.flush().await;
        }
        if let Err(e) = uploaded {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
        if total == 0 {
            let _ = tokio::fs::remove_file(&part).await;
            if spec.graph_path.is_empty() {
                return Err(invalid("graph", "missing: upload the graph (quiver submit GRAPH) or set graph_path"));
            }
        }
        // An upload's digest is known; a file named by path is hashed while it loads.
        let uploaded = if total > 0 {
            let digest: [u8; 32] =
                digest.finish().as_ref().try_into().map_err(|_| Status::internal("digest length"))?;
            let blob = blobs.join(crate::run::hex(&digest));
            tokio::fs::rename(&part, &blob)
                .await
                .map_err(|e| Status::internal(format!("storing {}: {e}", blob.display())))?;
            spec.graph_path = blob.display().to_string();
            Some(digest)
        } else {
            None
        };
        let read_seconds = started.elapsed().as_secs_f64();
        let alive = view(&self.shared).state.members.values().filter(|m| m.liveness == Liveness::Alive).count();
        let path = PathBuf::from(&spec.graph_path);
        let (digest, shapes) = match self.shared.jobs.prepare(&self.shared, &spec, &path, uploaded, alive).await {
            Ok(s) => s,
            Err(e) => {
                if total > 0 {
                    let _ = tokio::fs::remove_file(&spec.graph_path).await;
                }
                return Err(e);
            }
        };
        spec.holder = self.shared.node_id;
        if let Some(features) = spec.params.as_ref().map(|p| p.features_path.clone()).filter(|f| !f.is_empty()) {
            let hashed = self.shared.jobs.hash_named_file(Path::new(&features)).await;
            spec.features_digest = hashed.map_err(|e| invalid("params.features_path", e))?.to_vec();
        }
        let prepared_seconds = started.elapsed().as_secs_f64();
        let params = spec.params.clone().unwrap_or_default();
        let request = RequestId {
            client: if spec.client_id == 0 { random_client() } else { spec.client_id },
            seq: spec.client_seq.max(1),
        };
        let core_spec = CoreSpec {
            name: if spec.name.is_empty() { kernel.to_string() } else { spec.name.clone() },
            kernel: kernel.to_string(),
            params: spec.encode_to_vec(),
            iterations: params.max_iterations,
            feature_width: params.width.max(1),
            partitions: shapes,
            // The second holder is added once its copy is stored (`replica::second_holder`).
            holders: vec![self.shared.node_id],
        };
        let cmd = Command { request, op: Op::Submit { spec: core_spec, graph_digest: digest } };
        match peer::propose(&self.shared, cmd, WRITE_WITHIN).await.map_err(unavailable)? {
            Outcome::Submitted { job } => {
                metrics::counter!("quiver_jobs_submitted_total").increment(1);
                tracing::info!(
                    job,
                    read_seconds,
                    prepared_seconds,
                    recorded_seconds = started.elapsed().as_secs_f64(),
                    "job submitted"
                );
                Ok(Response::new(SubmitResponse { job_id: job }))
            }
            Outcome::Rejected(r) => Err(Status::failed_precondition(format!("submit: {r}"))),
            other => Err(Status::internal(format!("submit: unexpected outcome {other:?}"))),
        }
    }

    async fn get(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = req.into_inner().job_id;
        let v = self.view_with(id).await?;
        v.state
            .jobs
            .get(&id)
            .map(|j| Response::new(job_to_proto(j, self.live(id).as_ref())))
            .ok_or_else(|| Status::not_found(format!("job {id} does not exist")))
    }

    async fn list(&self, _: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let v = view(&self.shared);
        Ok(Response::new(ListJobsResponse {
            jobs: v.state.jobs.values().map(|j| job_to_proto(j, self.live(j.id).as_ref())).collect(),
        }))
    }

    type WatchStream = BoxStream<JobProgress>;

    async fn watch(&self, req: Request<WatchJobRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let id = req.into_inner().job_id;
        self.view_with(id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // The master streams live supersteps; when it is elsewhere the watch is relayed there,
        // and if that master is lost mid-job (the job moves to another holder) the watch goes on
        // from the replicated state here: states, epochs and checkpointed supersteps.
        let relayed = match self.holder_of(id)? {
            Some(addr) => match self.relay(&addr).await {
                Ok(mut c) => c.watch(WatchJobRequest { job_id: id }).await.ok().map(|r| r.into_inner()),
                Err(_) => None,
            },
            None => None,
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if let Some(mut stream) = relayed {
                while let Ok(Some(p)) = stream.message().await {
                    let done = JobState::try_from(p.state)
                        .is_ok_and(|s| matches!(s, JobState::Succeeded | JobState::Failed | JobState::Cancelled));
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                    if done {
                        // The master can report the end before this node applies it: the stream
                        // ends once the state here agrees, so a `Get` here right after the watch
                        // sees the end the watch saw.
                        view_until(&shared, CATCH_UP, |v| v.state.jobs.get(&id).is_none_or(|j| j.state.is_terminal()))
                            .await;
                        return;
                    }
                }
            }
            watch_here(shared, id, tx).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn cancel(&self, req: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        let job = req.into_inner().job_id;
        if !view(&self.shared).state.jobs.contains_key(&job) {
            return Err(Status::not_found(format!("job {job} does not exist")));
        }
        let cmd = Command { request: RequestId { client: random_client(), seq: 1 }, op: Op::Cancel { job } };
        match peer::propose(&self.shared, cmd, WRITE_WITHIN).await.map_err(unavailable)? {
            Outcome::Rejected(quiver_coordinator::state::Rejection::UnknownJob(_)) => {
                Err(Status::not_found(format!("job {job} does not exist")))
            }
            Outcome::Rejected(r) => Err(Status::failed_precondition(format!("cancel: {r}"))),
            _ => Ok(Response::new(CancelJobResponse {})),
        }
    }

    type FetchResultStream = BoxStream<ResultChunk>;

    async fn fetch_result(
        &self,
        req: Request<FetchResultRequest>,
    ) -> Result<Response<Self::FetchResultStream>, Status> {
        let id = req.into_inner().job_id;
        let v = self.view_with(id).await?;
        let job = v.state.jobs.get(&id).ok_or_else(|| Status::not_found(format!("job {id} does not exist")))?;
        match &job.state {
            CoreJobState::Completed => {}
            CoreJobState::Failed(reason) => {
                return Err(Status::failed_precondition(format!("job {id} failed ({reason}): it has no result")));
            }
            other => return Err(Status::failed_precondition(format!("job {id} is {other:?}: no result yet"))),
        }
        if let Some(addr) = self.holder_of(id)? {
            let mut c = self.relay(&addr).await?;
            let stream = c.fetch_result(FetchResultRequest { job_id: id }).await?.into_inner();
            return Ok(Response::new(Box::pin(stream)));
        }
        let path = self.shared.jobs.result_path(id);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::not_found(format!("job {id}: the result {} is not readable: {e}", path.display())))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            loop {
                let mut buf = vec![0u8; RESULT_CHUNK];
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(ResultChunk { data: buf })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("reading {}: {e}", path.display())))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// How long a read waits for this node to apply a job it has not seen yet.
const CATCH_UP: Duration = Duration::from_secs(3);

/// This node's view once `ready` holds for it, or the latest one when `within` runs out first:
/// each node applies the replicated state on its own schedule.
async fn view_until(shared: &Shared, within: Duration, ready: impl Fn(&View) -> bool) -> std::sync::Arc<View> {
    let mut rx = shared.view.clone();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = rx.borrow_and_update().clone();
        if ready(&v) {
            return v;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => return v,
        }
    }
}

/// Bytes per `ResultChunk`.
const RESULT_CHUNK: usize = 1 << 20;

impl JobsSvc {
    /// This node's view once it includes job `id`. A job id is the log index of its submit, so a
    /// node that has not applied that far yet (a client that submitted through another node and
    /// asks here at once) waits a moment for it instead of answering "does not exist".
    async fn view_with(&self, id: u64) -> Result<std::sync::Arc<View>, Status> {
        Ok(view_until(&self.shared, CATCH_UP, |v| v.state.jobs.contains_key(&id) || id <= v.state.applied_index).await)
    }

    /// Live progress of a job this node masters.
    fn live(&self, job: u64) -> Option<JobProgress> {
        self.shared.jobs.progress(job).map(|p| *p.borrow())
    }

    /// `None` when this node masters the job (or nobody else can answer); otherwise the master's
    /// gRPC address, to relay to (the master keeps the job's progress and result).
    fn holder_of(&self, id: u64) -> Result<Option<String>, Status> {
        let v = view(&self.shared);
        let job = v.state.jobs.get(&id).ok_or_else(|| Status::not_found(format!("job {id} does not exist")))?;
        let holder = job.master;
        if holder == 0 || holder == self.shared.node_id {
            return Ok(None);
        }
        let m = v.state.members.get(&holder).ok_or_else(|| {
            Status::unavailable(format!("job {id} is mastered by node {holder}, which is no longer a member"))
        })?;
        Ok(Some(decode_control_addr(m.info.id, &m.info.control_addr).0))
    }

    /// A client to another node's `Jobs` service, authenticated with this node's certificate.
    async fn relay(
        &self,
        addr: &str,
    ) -> Result<quiver_proto::control::jobs_client::JobsClient<tonic::transport::Channel>, Status> {
        let conn = crate::client::Conn {
            addr: addr.to_string(),
            tls_dir: Some(self.shared.jobs.tls_dir().to_path_buf()),
            output: crate::client::Output::Json,
        };
        let channel = crate::client::connect(&conn, None)
            .await
            .map_err(|e| Status::unavailable(format!("relaying to the job's holder at {addr}: {e:#}")))?;
        Ok(quiver_proto::control::jobs_client::JobsClient::new(channel).max_decoding_message_size(64 << 20))
    }
}

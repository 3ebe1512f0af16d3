//! The drill driver's gRPC client: mutual TLS with the cluster's client certificate, short
//! timeouts (a stopped agent must not stall the driver).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use quiver_proto::control::cluster_client::ClusterClient;
use quiver_proto::control::jobs_client::JobsClient;
use quiver_proto::control::{
    GetJobRequest, Job, JobSpec, Kernel, KernelParams, ListJobsRequest, Member, MembersRequest, StatusRequest,
    StatusResponse, SubmitRequest, submit_request,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The name every node certificate carries for gRPC (see `quiver tls`).
const SERVER_NAME: &str = "cluster.quiver";

/// A lazily connecting channel to `addr` (nothing is sent until the first request).
pub fn channel(addr: &str, tls_dir: &Path, timeout: Duration) -> Result<Channel> {
    let read =
        |f: &str| std::fs::read(tls_dir.join(f)).with_context(|| format!("reading {f} in {}", tls_dir.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("client.pem")?, read("client.key")?))
        .domain_name(SERVER_NAME);
    Ok(Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .connect_lazy())
}

/// A tiny write: a 3-vertex PageRank job uploaded inline, with a client-chosen request id.
pub async fn submit_tiny(ch: &Channel, client: u64, seq: u64) -> Result<u64> {
    let spec = JobSpec {
        params: Some(KernelParams {
            kernel: Kernel::Pagerank as i32,
            alpha: 0.85,
            max_iterations: 3,
            ..Default::default()
        }),
        client_id: client,
        client_seq: seq,
        partitions: 1,
        ..Default::default()
    };
    let msgs = vec![
        SubmitRequest { body: Some(submit_request::Body::Spec(spec)) },
        SubmitRequest { body: Some(submit_request::Body::GraphChunk(b"0 1\n1 2\n2 0\n".to_vec())) },
    ];
    Ok(JobsClient::new(ch.clone()).submit(tonic::codegen::tokio_stream::iter(msgs)).await?.into_inner().job_id)
}

pub async fn status(ch: &Channel) -> Result<StatusResponse> {
    Ok(ClusterClient::new(ch.clone()).status(StatusRequest {}).await?.into_inner())
}

/// The leader's name as `ch`'s node sees it.
pub async fn leader_name(ch: &Channel) -> Result<String> {
    let s = status(ch).await?;
    ensure!(!s.leader_name.is_empty(), "{} knows no leader", s.node_name);
    Ok(s.leader_name)
}

pub async fn members(ch: &Channel) -> Result<Vec<Member>> {
    Ok(ClusterClient::new(ch.clone()).members(MembersRequest {}).await?.into_inner().members)
}

pub async fn jobs(ch: &Channel) -> Result<Vec<Job>> {
    Ok(JobsClient::new(ch.clone()).list(ListJobsRequest {}).await?.into_inner().jobs)
}

pub async fn job(ch: &Channel, id: u64) -> Result<Job> {
    Ok(JobsClient::new(ch.clone()).get(GetJobRequest { job_id: id }).await?.into_inner())
}

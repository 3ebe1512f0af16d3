//! The one integration-test binary of the workspace; each area adds a module.

mod chaos;
mod cli;
mod cluster;
mod deploy;
mod jobs;
mod raft_sim;
mod security;
mod serve;
mod ui;

use std::time::Duration;

use quiver_tests::agents::LocalCluster;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A gRPC channel to `addr` over TLS trusting `ca`, with a client certificate when `identity` is
/// given (as any gRPC tool opens one); the connection error when it is refused.
async fn grpc_channel(addr: &str, ca: &[u8], identity: Option<(Vec<u8>, Vec<u8>)>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("cluster.quiver");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A gRPC channel to agent `i` with the cluster's client certificate.
async fn grpc(c: &LocalCluster, i: usize) -> Channel {
    let read = |f: &str| std::fs::read(c.client_tls.join(f)).unwrap_or_else(|e| panic!("reading {f}: {e}"));
    let identity = Some((read("client.pem"), read("client.key")));
    grpc_channel(&c.agents[i].addr(), &read("ca.pem"), identity).await.unwrap()
}

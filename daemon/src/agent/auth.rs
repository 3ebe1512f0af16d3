//! Who may talk to this agent, and with which certificate it answers.
//!
//! - gRPC TLS ([`GrpcTls`]): the node certificate from the TLS directory, swappable at run time;
//!   a client certificate is optional at the TLS layer but, when presented, must chain to the
//!   cluster CA.
//! - gRPC caller authentication ([`authenticate`], an interceptor on every service): a request
//!   passes with a verified client certificate (client or node) or with a valid API token
//!   (`authorization: Bearer quiver-api.…`, checked against the replicated state). Anything else
//!   is answered `UNAUTHENTICATED` with the reason, and nothing runs.
//! - SIGHUP ([`spawn_sighup`]): re-reads `ca.pem`, `node.pem` and `node.key` and swaps them into
//!   the peer transport and the gRPC server for new handshakes; established connections (and so
//!   the cluster) are left alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use quiver_coordinator::state::TokenPurpose;
use quiver_node_agent::transport::tls::{CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
use quiver_node_agent::transport::{NodeIdentity, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tonic::{Request, Status};

use super::View;
use crate::coalesce::Coalesced;

/// How long a gRPC client may take to finish its TLS handshake.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// The gRPC server's TLS configuration; [`GrpcTls::reload`] swaps it for new connections.
pub struct GrpcTls {
    dir: PathBuf,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl GrpcTls {
    /// Reads the TLS directory.
    pub fn load(dir: &Path) -> Result<Arc<Self>> {
        let cfg = server_config(dir)?;
        Ok(Arc::new(Self { dir: dir.to_path_buf(), current: RwLock::new(Arc::new(cfg)) }))
    }

    /// Re-reads the TLS directory; the old configuration stays if the new one does not load.
    pub fn reload(&self) -> Result<()> {
        let cfg = server_config(&self.dir)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cfg);
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn server_config(dir: &Path) -> Result<rustls::ServerConfig> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(CA_CERT_FILE)?) {
        roots.add(c.context("reading ca.pem")?).context("ca.pem")?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(NODE_CERT_FILE)?).collect::<Result<_, _>>().context("reading node.pem")?;
    if chain.is_empty() {
        bail!("{}: no certificate", dir.join(NODE_CERT_FILE).display());
    }
    let key = PrivateKeyDer::from_pem_slice(&read(NODE_KEY_FILE)?).context("reading node.key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("gRPC TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("the node certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow client delays only
/// itself); each handshake uses the configuration current when it started. Each stream's writes
/// are [`Coalesced`]: one TLS record and one `writev` per HTTP/2 flush.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<GrpcTls>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Coalesced<TlsStream<TcpStream>>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(Coalesced::new(s))).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!("quiver_grpc_auth_refused_total", "reason" => "tls").increment(1);
                        tracing::warn!(%remote, error = %e, "refused gRPC TLS handshake");
                    }
                    Err(_) => tracing::debug!(%remote, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The interceptor every gRPC service runs behind (see the module docs).
pub fn authenticate(
    view: watch::Receiver<Arc<View>>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |req: Request<()>| {
        if req.peer_certs().is_some_and(|c| !c.is_empty()) {
            return Ok(req);
        }
        let remote = req.remote_addr();
        let refuse = |reason: &'static str, message: String| {
            metrics::counter!("quiver_grpc_auth_refused_total", "reason" => reason).increment(1);
            tracing::warn!(?remote, %message, "refused gRPC call");
            Err(Status::unauthenticated(message))
        };
        let Some(value) = req.metadata().get("authorization") else {
            return refuse(
                "no_credentials",
                "no credentials: present a client certificate signed by the cluster CA \
                 (quiver tls cert create --client) or an API token (authorization: Bearer quiver-api.…)"
                    .into(),
            );
        };
        let Some(text) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
            return refuse("bad_token", "authorization: expected \"Bearer <token>\"".into());
        };
        let token = match crate::token::parse(text) {
            Ok(t) => t,
            Err(e) => return refuse("bad_token", format!("authorization: not a quiver token: {e}")),
        };
        if token.purpose != TokenPurpose::Api {
            return refuse("bad_token", format!("token {}: a join token is not an API credential", token.id));
        }
        let checked = view.borrow().state.check_api_token(&token.id, &token.secret_hash(), crate::token::now_unix());
        match checked {
            Ok(()) => Ok(req),
            Err(reason) => refuse("bad_token", format!("token {} refused: {reason}", token.id)),
        }
    }
}

/// On SIGHUP, reloads the node's certificates from `tls_dir` into the transport and gRPC.
pub fn spawn_sighup(tls_dir: PathBuf, transport: Transport, grpc: Arc<GrpcTls>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler; certificates will not reload");
            return;
        };
        while hup.recv().await.is_some() {
            match reload(&tls_dir, &transport, &grpc) {
                Ok(serial) => {
                    metrics::counter!("quiver_tls_reloads_total").increment(1);
                    tracing::info!(tls_dir = %tls_dir.display(), %serial, "SIGHUP: reloaded the node certificate for new connections");
                }
                Err(e) => {
                    metrics::counter!("quiver_tls_reload_failures_total").increment(1);
                    tracing::error!(tls_dir = %tls_dir.display(), error = %format!("{e:#}"), "SIGHUP: certificate reload failed; keeping the old certificates");
                }
            }
        }
    });
}

/// Loads and installs the TLS directory; returns the new certificate's serial (hex).
fn reload(dir: &Path, transport: &Transport, grpc: &GrpcTls) -> Result<String> {
    let identity = NodeIdentity::load_dir(dir).context("loading the node identity")?;
    // Check everything before installing anything, so a bad file changes nothing.
    let _ = server_config(dir)?;
    transport.reload_identity(&identity).context("the peer transport")?;
    grpc.reload()?;
    let serial = x509_parser::parse_x509_certificate(&identity.cert_chain[0])
        .map(|(_, c)| c.raw_serial_as_string())
        .unwrap_or_default();
    Ok(serial)
}

//! The agent's side of the QUIC peer transport: Raft batches out and in, control requests
//! (forwarded client commands and joins) between agents, seed discovery, and the QUIC gauges.
//!
//! Control requests ride a bidirectional `Control` stream: one `ControlRequest` with an `Opaque`
//! body, one `ControlResponse`. Kinds:
//! - `propose`: a postcard-encoded [`Command`] from a non-leader; the receiver proposes it
//!   locally only (never forwards again, so a request cannot loop) and answers `outcome`,
//!   `not-leader` or an error.
//! - `join`: a [`MemberInfo`] from a joining node to any member (its seed); the seed records it
//!   through Raft, forwarding once to the leader if it does not lead.
//!
//! Raft messages are parsed only by the core (`step`), and only for streams of an authenticated
//! connection, passing the node id its certificate proved (RUSTSEC-2024-0437, see the core).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use quiver_coordinator::{Command, MemberInfo, Op, Outcome, RequestId, decode_command, encode_command};
use quiver_node_agent::transport::tls::{ALPN, node_id_of, node_server_name};
use quiver_node_agent::transport::{
    ANONYMOUS, ErrorCode, InboundStream, NodeId, NodeIdentity, PeerEvent, StreamHeader, StreamKind, Transport,
    TransportHandles,
};
use quiver_proto::peer::{
    ControlRequest, ControlResponse, ErrorReply, Opaque, RaftBatch, control_request, control_response,
};
use tokio::sync::{mpsc, oneshot};

use super::{Event, ProposeReply, Shared};

/// How long one forwarded or local proposal may take before the caller retries.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Drains the transport's inbound streams and connection events.
pub fn spawn_inbound(shared: Shared, handles: TransportHandles) {
    let TransportHandles { mut events, mut inbound } = handles;
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                PeerEvent::Up { peer, addr, .. } => tracing::debug!(%peer, %addr, "peer connected"),
                PeerEvent::Down { peer, reason } => tracing::debug!(%peer, %reason, "peer disconnected"),
                PeerEvent::Rtt { rtt, .. } => metrics::histogram!("quiver_quic_rtt_seconds").record(rtt.as_secs_f64()),
            }
        }
    });
    let transport = shared.transport.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticker.tick().await;
            let peers = transport.connected_peers();
            metrics::gauge!("quiver_quic_connections").set(peers.len() as f64);
            for p in peers {
                if let Some(c) = transport.peer(p) {
                    let stats = c.quinn().stats();
                    let label = p.0.to_string();
                    metrics::counter!("quiver_quic_bytes_sent_total", "peer" => label.clone())
                        .absolute(stats.udp_tx.bytes);
                    metrics::counter!("quiver_quic_bytes_received_total", "peer" => label).absolute(stats.udp_rx.bytes);
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(stream) = inbound.recv().await {
            let shared = shared.clone();
            tokio::spawn(handle_stream(shared, stream));
        }
    });
}

async fn handle_stream(shared: Shared, mut s: InboundStream) {
    match s.kind {
        StreamKind::RaftBatch => loop {
            match s.recv.recv_message::<RaftBatch>().await {
                Ok(Some(batch)) => {
                    // The sender is the node the connection's certificate proved, not what the
                    // batch claims.
                    let ev = Event::Raft { from: s.peer.0, messages: batch.messages };
                    if shared.events.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(peer = %s.peer, error = %e, "raft stream ended");
                    return;
                }
            }
        },
        // A token join's streams (no certificate yet, see `crate::token`): nothing but the join.
        StreamKind::Control if s.peer == ANONYMOUS => {
            let Some(mut send) = s.send.take() else { return };
            let req = match s.recv.recv_message::<ControlRequest>().await {
                Ok(Some(r)) => r,
                _ => return,
            };
            let body = crate::token::answer_anonymous(&shared, req.body).await;
            let _ = send.send_message(&ControlResponse { request_id: req.request_id, body: Some(body) }).await;
            let _ = send.finish();
        }
        _ if s.peer == ANONYMOUS => {
            s.recv.reject(ErrorCode::Refused, &"a node without a certificate may only join with a token");
        }
        StreamKind::Control => {
            let Some(mut send) = s.send.take() else { return };
            let req = match s.recv.recv_message::<ControlRequest>().await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(peer = %s.peer, error = %e, "bad control request");
                    return;
                }
            };
            let body = answer_control(&shared, s.peer, req.body).await;
            let _ = send.send_message(&ControlResponse { request_id: req.request_id, body: Some(body) }).await;
            let _ = send.finish();
        }
        StreamKind::ServingForward => super::serve::handle_stream(shared, s).await,
        StreamKind::Job | StreamKind::HaloExchange => shared.jobs.runtime.handle_stream(s).await,
        StreamKind::Replica => super::replica::handle_stream(shared, s).await,
        other => {
            s.recv.reject(ErrorCode::Refused, &format_args!("{other:?} streams are not handled by this agent yet"));
        }
    }
}

fn error_body(message: impl Into<String>) -> control_response::Body {
    control_response::Body::Error(ErrorReply { code: 1, message: message.into() })
}

fn opaque(kind: &str, body: Vec<u8>) -> control_response::Body {
    control_response::Body::Opaque(Opaque { kind: kind.into(), body })
}

async fn answer_control(shared: &Shared, peer: NodeId, body: Option<control_request::Body>) -> control_response::Body {
    let Some(control_request::Body::Opaque(Opaque { kind, body })) = body else {
        return match body {
            Some(control_request::Body::Ping(_)) => control_response::Body::Pong(quiver_proto::peer::Pong {
                node_id: shared.node_id,
                version: env!("CARGO_PKG_VERSION").into(),
            }),
            _ => error_body("control request: missing body"),
        };
    };
    match kind.as_str() {
        "propose" => {
            let cmd = match decode_command(&body) {
                Ok(c) => c,
                Err(e) => return error_body(format!("propose: undecodable command: {e}")),
            };
            match propose_local(shared, cmd).await {
                ProposeReply::Applied(o) => match postcard::to_stdvec(&o) {
                    Ok(b) => opaque("outcome", b),
                    Err(e) => error_body(format!("propose: encoding the outcome: {e}")),
                },
                ProposeReply::NotLeader(_) => opaque("not-leader", vec![]),
                ProposeReply::Failed(reason) => error_body(reason),
            }
        }
        "join" => {
            let info: MemberInfo = match postcard::from_bytes(&body) {
                Ok(i) => i,
                Err(e) => return error_body(format!("join: undecodable member info: {e}")),
            };
            if info.id != peer.0 {
                return error_body(format!("join: node {} may not join on behalf of node {}", peer.0, info.id));
            }
            let cmd = Command { request: RequestId { client: info.id, seq: join_seq() }, op: Op::Join(info) };
            match propose(shared, cmd, PROPOSE_TIMEOUT).await {
                Ok(o) => match postcard::to_stdvec(&o) {
                    Ok(b) => opaque("outcome", b),
                    Err(e) => error_body(format!("join: encoding the outcome: {e}")),
                },
                Err(e) => error_body(format!("{e:#}")),
            }
        }
        super::expect::KIND => match &shared.expect {
            Some(d) => match super::expect::answer(d, peer, &body) {
                Ok(b) => opaque(super::expect::KIND, b),
                Err(e) => error_body(e),
            },
            None => error_body(
                "expect: this node is not bootstrapping (--bootstrap-expect); it already belongs to a cluster: --join it",
            ),
        },
        other => error_body(format!("control request: unknown kind {other:?}")),
    }
}

/// A request sequence for a join: a node that joins again (after losing its data) must not be
/// answered from the deduplication window with its earlier join.
fn join_seq() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64)
}

/// Proposes on this node only.
pub async fn propose_local(shared: &Shared, cmd: Command) -> ProposeReply {
    let (tx, rx) = oneshot::channel();
    if shared.events.send(Event::Propose { cmd, reply: tx }).await.is_err() {
        return ProposeReply::Failed("the node is shutting down".into());
    }
    match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => ProposeReply::Failed("the proposal was dropped".into()),
        Err(_) => ProposeReply::Failed("the proposal did not commit in time".into()),
    }
}

/// Why [`propose`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ProposeFailure {
    #[error("no leader could record the request within {within:?} (last known leader: {leader}; last error: {last})")]
    Unavailable { within: Duration, leader: String, last: String },
}

/// Records `cmd` through Raft: locally when this node leads, else forwarded over QUIC to the
/// leader; retried (same request id, so at most once) until `within` has passed.
pub async fn propose(shared: &Shared, cmd: Command, within: Duration) -> Result<Outcome, ProposeFailure> {
    let deadline = Instant::now() + within;
    let mut delay = Duration::from_millis(10);
    let mut leader = "none".to_string();
    let mut last: String;
    loop {
        match propose_local(shared, cmd.clone()).await {
            ProposeReply::Applied(o) => return Ok(o),
            ProposeReply::NotLeader(Some(hint)) if hint.id != shared.node_id => {
                leader = match &hint.control_addr {
                    Some(a) => {
                        let (addr, name) = super::names::decode_control_addr(hint.id, a);
                        format!("{name} at {addr}")
                    }
                    None => format!("node {}", hint.id),
                };
                // A leader that just died still looks connected until QUIC's idle timeout, so
                // the forward races this node learning of a new leader (and the deadline).
                let mut view = shared.view.clone();
                view.borrow_and_update();
                let old = hint.id;
                let moved = async move {
                    while view.changed().await.is_ok() {
                        if view.borrow().status.leader != old {
                            return;
                        }
                    }
                    std::future::pending::<()>().await;
                };
                let remaining = deadline.saturating_duration_since(Instant::now());
                tokio::select! {
                    r = tokio::time::timeout(remaining, forward(shared, NodeId(hint.id), &cmd)) => match r {
                        Ok(Ok(Some(o))) => return Ok(o),
                        Ok(Ok(None)) => last = format!("{leader} is no longer the leader"),
                        Ok(Err(e)) => last = format!("forwarding to {leader}: {e:#}"),
                        Err(_) => last = format!("{leader} did not answer in time"),
                    },
                    () = moved => {
                        last = format!("{leader} stopped leading");
                        delay = Duration::from_millis(5);
                    }
                }
            }
            ProposeReply::NotLeader(_) => last = "no leader known".into(),
            ProposeReply::Failed(reason) => last = reason,
        }
        if Instant::now() + delay > deadline {
            return Err(ProposeFailure::Unavailable { within, leader, last });
        }
        // Back off, but retry as soon as a (new) leader is known: during a failover that moment
        // is what the caller is waiting for, and the backoff must not add to it.
        let mut view = shared.view.clone();
        let known = view.borrow_and_update().status.leader;
        let elected = async move {
            while view.changed().await.is_ok() {
                let now = view.borrow().status.leader;
                if now != 0 && now != known {
                    return;
                }
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = elected => {}
        }
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Sends `cmd` to `leader`; `Ok(None)` when it answers that it does not lead.
async fn forward(shared: &Shared, leader: NodeId, cmd: &Command) -> Result<Option<Outcome>> {
    let reply = control_call(&shared.transport, leader, "propose", encode_command(cmd)).await?;
    match reply {
        Reply::Outcome(o) => Ok(Some(o)),
        Reply::NotLeader => Ok(None),
    }
}

enum Reply {
    Outcome(Outcome),
    NotLeader,
}

async fn control_call(transport: &Transport, to: NodeId, kind: &str, body: Vec<u8>) -> Result<Reply> {
    let call = async {
        let conn = transport.connection(to).await?;
        let header = StreamHeader { kind: StreamKind::Control as i32, ..Default::default() };
        let (mut send, mut recv) = conn.open_bi(header).await?;
        let req = ControlRequest {
            request_id: 1,
            body: Some(control_request::Body::Opaque(Opaque { kind: kind.into(), body })),
        };
        send.send_message(&req).await?;
        send.finish()?;
        let resp = recv
            .recv_message::<ControlResponse>()
            .await?
            .ok_or_else(|| anyhow!("{to} closed the stream without answering"))?;
        match resp.body {
            Some(control_response::Body::Opaque(o)) if o.kind == "outcome" => {
                Ok(Reply::Outcome(postcard::from_bytes(&o.body).context("undecodable outcome")?))
            }
            Some(control_response::Body::Opaque(o)) if o.kind == "not-leader" => Ok(Reply::NotLeader),
            Some(control_response::Body::Error(e)) => bail!("{to}: {}", e.message),
            _ => bail!("{to}: unexpected control response"),
        }
    };
    tokio::time::timeout(PROPOSE_TIMEOUT + Duration::from_secs(2), call)
        .await
        .map_err(|_| anyhow!("{to} did not answer in time"))?
}

/// Keeps one Raft stream open to `to` and writes each batch of queued messages as one
/// `RaftBatch`. Messages that cannot be sent are dropped: Raft retransmits.
pub async fn raft_sender(transport: Transport, me: u64, to: u64, mut rx: mpsc::Receiver<Vec<u8>>) {
    let peer = NodeId(to);
    let mut stream = None;
    let mut failed_at: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut messages = vec![first];
        while messages.len() < 256 {
            match rx.try_recv() {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        // While the peer is unreachable, do not wait on a dial for every batch.
        if stream.is_none() && failed_at.is_some_and(|t| t.elapsed() < Duration::from_millis(200)) {
            continue;
        }
        let batch = RaftBatch { from: me, messages };
        for _attempt in 0..2 {
            if stream.is_none() {
                let header = StreamHeader { kind: StreamKind::RaftBatch as i32, ..Default::default() };
                let open = async { transport.connection(peer).await?.open_uni(header).await };
                match tokio::time::timeout(Duration::from_secs(1), open).await {
                    Ok(Ok(s)) => stream = Some(s),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "cannot open a raft stream");
                        failed_at = Some(Instant::now());
                        break;
                    }
                    Err(_) => {
                        failed_at = Some(Instant::now());
                        break;
                    }
                }
            }
            let Some(s) = stream.as_mut() else { break };
            match s.send_message(&batch).await {
                Ok(()) => {
                    failed_at = None;
                    break;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "raft stream broke; reopening");
                    stream = None;
                }
            }
        }
    }
}

/// Joins through any of `seeds`, retrying with capped backoff until `timeout`.
pub async fn join(
    shared: &Shared,
    identity: &NodeIdentity,
    seeds: &[SocketAddr],
    me: MemberInfo,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let body = postcard::to_stdvec(&me).context("encoding the join request")?;
    let mut delay = Duration::from_millis(50);
    let mut last = String::new();
    loop {
        for seed in seeds {
            match join_once(shared, identity, *seed, &body).await {
                Ok(()) => {
                    tracing::info!(%seed, "joined the cluster");
                    return Ok(());
                }
                Err(e) => {
                    last = format!("{seed}: {e:#}");
                    tracing::info!(%seed, error = %last, "join attempt failed; retrying");
                }
            }
        }
        if Instant::now() + delay > deadline {
            bail!("could not join through {seeds:?} within {timeout:?}: last error: {last}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn join_once(shared: &Shared, identity: &NodeIdentity, seed: SocketAddr, body: &[u8]) -> Result<()> {
    let seed_id = discover(identity, seed).await.context("reaching the seed")?;
    if seed_id.0 == shared.node_id {
        bail!("the seed is this node itself");
    }
    shared.transport.connect(seed_id, seed).await?;
    match control_call(&shared.transport, seed_id, "join", body.to_vec()).await? {
        Reply::Outcome(Outcome::Rejected(r)) => bail!("refused: {r}"),
        Reply::Outcome(_) => Ok(()),
        Reply::NotLeader => bail!("the seed could not reach a leader"),
    }
}

/// Learns the node id of whoever listens at `seed`: a short QUIC handshake that checks the seed's
/// certificate against the cluster CA (and its name against the node id it carries), then closes.
/// The transport's own dial needs that id to check the peer's name.
pub async fn discover(identity: &NodeIdentity, seed: SocketAddr) -> Result<NodeId> {
    use rustls::client::WebPkiServerVerifier;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in &identity.roots {
        roots.add(c.clone())?;
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyNodeVerifier { inner }))
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| anyhow!("quic crypto: {e}"))?;
    let bind: SocketAddr = if seed.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let mut endpoint = quinn::Endpoint::client(bind).context("binding a discovery socket")?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let result = async {
        let conn = tokio::time::timeout(Duration::from_secs(2), endpoint.connect(seed, "seed.quiver")?)
            .await
            .map_err(|_| anyhow!("handshake timed out"))??;
        let certs = conn
            .peer_identity()
            .and_then(|i| i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
            .ok_or_else(|| anyhow!("the seed presented no certificate"))?;
        let id = node_id_of(certs.first().ok_or_else(|| anyhow!("the seed presented no certificate"))?)?;
        conn.close(quinn::VarInt::from_u32(ErrorCode::Ok as u32), b"discovered");
        Ok::<_, anyhow::Error>(id)
    }
    .await;
    endpoint.wait_idle().await;
    result
}

/// Checks a server certificate against the CA under the name its own node id implies.
#[derive(Debug)]
struct AnyNodeVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for AnyNodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let id = node_id_of(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))?;
        let name = rustls_pki_types::ServerName::try_from(node_server_name(id))
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

//! Join and API tokens: `quiver token create`, the token format, and both ends of a token join.
//!
//! A token is `quiver-join.<id>.<secret>.<ca-hash>` (join) or `quiver-api.<id>.<secret>` (API):
//! `id` is 8 hex digits, `secret` 32 hex digits (128 random bits) and `ca-hash` the SHA-256 of the
//! cluster CA certificate (DER) in hex, as kubeadm's `--discovery-token-ca-cert-hash`. Tokens are
//! minted by a running agent (`quiver token create --addr …`, over gRPC with a client
//! certificate) and recorded through Raft with only the SHA-256 of the secret, so every member
//! knows them and a replayed join token is refused by the replicated state (join tokens are
//! single-use). API tokens authenticate gRPC callers without a certificate
//! (`authorization: Bearer quiver-api.…`) until they expire.
//!
//! A token join (`quiver agent --join SEED --token T` with no `node.pem` yet): the new node dials
//! the seed's peer port with the join ALPN and no certificate, asks for the CA (`join-ca`), checks
//! its hash against the token and the seed's server certificate against that CA, and only then
//! sends the token with a CSR for its own key (`join-token`). The seed spends the token through
//! Raft, signs the CSR with the CA key and answers with the node certificate and the CA, which the
//! new node writes into its TLS directory before starting as usual.
//!
//! Where the CA key lives: the seed a token join names must hold `ca.key` next to `ca.pem` in its
//! TLS directory (the bootstrap node, made with `quiver tls ca create --out TLS_DIR` and
//! `quiver tls cert create --ca TLS_DIR --out TLS_DIR`). Other nodes never see the key; a seed
//! without it refuses token joins before spending the token.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use prost::Message as _;
use quiver_coordinator::state::{Token, TokenPurpose, TokenRefusal};
use quiver_coordinator::{Command, Op, Outcome, RequestId};
use quiver_node_agent::transport::tls::{
    CA_CERT_FILE, JOIN_ALPN, NODE_CERT_FILE, NODE_KEY_FILE, node_id_of, node_server_name,
};
use quiver_node_agent::transport::{ErrorCode, StreamHeader, StreamKind, codec};
use quiver_proto::control::cluster_client::ClusterClient;
use quiver_proto::control::{CreateTokenRequest, JoinRequest, JoinResponse};
use quiver_proto::peer::{ControlRequest, ControlResponse, ErrorReply, Opaque, control_request, control_response};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::json;
use tonic::Status;

use crate::agent::Shared;
use crate::client::{Conn, Output};
use crate::run::{hex, sha256};
use crate::tls::{CA_KEY_FILE, node_id_for};

/// Control request kinds on a join connection.
pub const KIND_CA: &str = "join-ca";
pub const KIND_JOIN: &str = "join-token";

/// Validity of a certificate signed for a joining node.
const NODE_CERT_DAYS: u64 = 365;
/// How long a token join may wait for the token to be spent through Raft.
const SPEND_WITHIN: Duration = Duration::from_secs(5);

/// `quiver token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Mint a token on a running agent: a single-use join token (default) or an API token.
    Create {
        /// Lifetime: seconds, or a number with s, m, h or d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// An API token (gRPC bearer credential, reusable until it expires) instead of a join token.
        #[arg(long)]
        api: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// A token split into its parts.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedToken {
    pub purpose: TokenPurpose,
    pub id: String,
    pub secret: String,
    /// SHA-256 of the CA certificate (join tokens only).
    pub ca_hash: Option<[u8; 32]>,
}

impl std::fmt::Debug for ParsedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedToken").field("purpose", &self.purpose).field("id", &self.id).finish_non_exhaustive()
    }
}

impl ParsedToken {
    /// SHA-256 of the secret: what the cluster stores and compares.
    pub fn secret_hash(&self) -> [u8; 32] {
        sha256(self.secret.as_bytes())
    }
}

/// Parses a token; the error says what is wrong without repeating the secret.
pub fn parse(text: &str) -> Result<ParsedToken, String> {
    let parts: Vec<&str> = text.trim().split('.').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let (purpose, ca_hash) = match parts.as_slice() {
        ["quiver-join", _, _, ca] => {
            let h = crate::run::digest_from_hex(ca).ok_or("the CA hash (4th part) must be 64 hex digits")?;
            (TokenPurpose::Join, Some(h))
        }
        ["quiver-api", _, _] => (TokenPurpose::Api, None),
        _ => return Err("expected quiver-join.<id>.<secret>.<ca-hash> or quiver-api.<id>.<secret>".into()),
    };
    if !hex(parts[1], 8) || !hex(parts[2], 32) {
        return Err("the id must be 8 and the secret 32 hex digits".into());
    }
    Ok(ParsedToken { purpose, id: parts[1].to_ascii_lowercase(), secret: parts[2].to_ascii_lowercase(), ca_hash })
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex(&b)
}

/// Wall-clock Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// SHA-256 (hex) of the first certificate in a PEM CA file.
pub fn ca_hash_of(ca_pem: &str) -> Result<String> {
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("reading the CA certificate")?;
    Ok(hex(&sha256(&der)))
}

/// Parses `90`, `90s`, `15m`, `1h`, `2d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 1h or 2d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err("must be at least 1s".into());
    }
    Ok(Duration::from_secs(secs))
}

/// `quiver token create`.
pub fn run(cmd: TokenCmd) -> Result<()> {
    let TokenCmd::Create { ttl, api, conn } = cmd;
    let ttl = parse_ttl(&ttl).map_err(|e| anyhow!("--ttl: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let r = rt.block_on(async {
        let channel = crate::client::connect(&conn, Some(Duration::from_secs(10))).await?;
        ClusterClient::new(channel)
            .create_token(CreateTokenRequest { ttl_secs: ttl.as_secs(), api })
            .await
            .map_err(|e| anyhow!("{:?}: {}", e.code(), e.message()))
    })?;
    let r = r.into_inner();
    match conn.output {
        Output::Json => println!(
            "{}",
            json!({
                "token": r.token, "id": r.id, "expires_unix": r.expires_unix, "ca_hash": r.ca_hash,
                "purpose": if api { "api" } else { "join" },
            })
        ),
        Output::Table => {
            println!("{}", r.token);
            let what = if api {
                "API token: send it as `authorization: Bearer <token>` on gRPC calls"
            } else {
                "single-use join token: quiver agent --join SEED --token <token>"
            };
            eprintln!("{what}; expires in {}s (unix {})", ttl.as_secs(), r.expires_unix);
        }
    }
    Ok(())
}

/// The agent's `Cluster.CreateToken`: mints and records a token. The caller must have
/// presented a certificate (checked by the handler).
pub async fn create(
    shared: &Shared,
    ttl_secs: u64,
    api: bool,
) -> Result<quiver_proto::control::CreateTokenResponse, Status> {
    if ttl_secs == 0 {
        return Err(Status::invalid_argument("ttl_secs: must be at least 1"));
    }
    let ca_path = shared.jobs.tls_dir().join(CA_CERT_FILE);
    let ca_pem = tokio::fs::read_to_string(&ca_path)
        .await
        .map_err(|e| Status::internal(format!("reading {}: {e}", ca_path.display())))?;
    let ca_hash = ca_hash_of(&ca_pem).map_err(|e| Status::internal(format!("{e:#}")))?;
    let (id, secret) = (random_hex(4), random_hex(16));
    let now = now_unix();
    let expires_unix = now.saturating_add(ttl_secs);
    let purpose = if api { TokenPurpose::Api } else { TokenPurpose::Join };
    let token = Token {
        purpose,
        secret_hash: sha256(secret.as_bytes()),
        expires_unix,
        uses_left: if api { None } else { Some(1) },
    };
    let cmd = Command {
        request: RequestId { client: random_u64(), seq: 1 },
        op: Op::AddToken { id: id.clone(), token, now_unix: now },
    };
    match crate::agent::peer_propose(shared, cmd, SPEND_WITHIN).await {
        Ok(Outcome::Done) => {}
        Ok(Outcome::Rejected(r)) => return Err(Status::aborted(format!("create token: {r}; try again"))),
        Ok(other) => return Err(Status::internal(format!("create token: unexpected outcome {other:?}"))),
        Err(e) => return Err(Status::unavailable(e)),
    }
    tracing::info!(token = %id, ?purpose, expires_unix, "token created");
    let text = if api { format!("quiver-api.{id}.{secret}") } else { format!("quiver-join.{id}.{secret}.{ca_hash}") };
    Ok(quiver_proto::control::CreateTokenResponse { token: text, id, expires_unix, ca_hash })
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b).max(1)
}

fn error_body(message: impl Into<String>) -> control_response::Body {
    control_response::Body::Error(ErrorReply { code: 1, message: message.into() })
}

/// Seed side: answers a control request that arrived on a join connection (no certificate).
/// Only [`KIND_CA`] and [`KIND_JOIN`] are served; anything else is refused.
pub async fn answer_anonymous(shared: &Shared, body: Option<control_request::Body>) -> control_response::Body {
    let Some(control_request::Body::Opaque(Opaque { kind, body })) = body else {
        return error_body("refused: a node without a certificate may only join with a token");
    };
    let tls_dir = shared.jobs.tls_dir().to_path_buf();
    match kind.as_str() {
        KIND_CA => match tokio::fs::read(tls_dir.join(CA_CERT_FILE)).await {
            Ok(ca) => control_response::Body::Opaque(Opaque { kind: KIND_CA.into(), body: ca }),
            Err(e) => error_body(format!("reading the CA certificate: {e}")),
        },
        KIND_JOIN => match sign_join(shared, &tls_dir, &body).await {
            Ok(resp) => control_response::Body::Opaque(Opaque { kind: KIND_JOIN.into(), body: resp.encode_to_vec() }),
            Err(e) => {
                tracing::warn!(error = %e, "refused a token join");
                metrics::counter!("quiver_token_join_refused_total").increment(1);
                error_body(format!("refused: {e}"))
            }
        },
        other => {
            tracing::warn!(kind = %other, "refused an anonymous control request");
            error_body(format!(
                "refused: {other:?} needs a node certificate; a node without one may only join with a token"
            ))
        }
    }
}

/// Checks a token join, spends the token through Raft, and signs the CSR.
async fn sign_join(shared: &Shared, tls_dir: &Path, body: &[u8]) -> Result<JoinResponse, String> {
    let req = JoinRequest::decode(body).map_err(|e| format!("undecodable join request: {e}"))?;
    let token = parse(&req.token).map_err(|e| format!("token: {e}"))?;
    if token.purpose != TokenPurpose::Join {
        return Err(format!("token {}: an API token cannot join a node", token.id));
    }
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem)
        .map_err(|e| format!("csr_pem: not a valid certificate signing request: {e}"))?;
    let name = csr
        .params
        .distinguished_name
        .get(&rcgen::DnType::CommonName)
        .and_then(dn_text)
        .ok_or("csr_pem: the request names no node (common name)")?;
    crate::tls::validate_name(&name).map_err(|e| format!("csr_pem: {e:#}"))?;
    let node_id = node_id_for(&name);
    if shared.view.borrow().state.members.contains_key(&node_id) {
        return Err(format!("node name {name:?} is already a member; a token cannot re-issue a member's certificate"));
    }
    let ca_pem = crate::tls::read(&tls_dir.join(CA_CERT_FILE)).map_err(|e| format!("{e:#}"))?;
    let key_path = tls_dir.join(CA_KEY_FILE);
    if !key_path.exists() {
        return Err(format!(
            "this seed holds no CA key ({}); join through a node that does (see `quiver token create --help`)",
            key_path.display()
        ));
    }
    let ca_key = crate::tls::read(&key_path).map_err(|e| format!("{e:#}"))?;
    let issuer = crate::tls::issuer(&ca_pem, &ca_key).map_err(|e| format!("{e:#}"))?;
    precheck(shared, &token).await?;
    let cmd = Command {
        request: RequestId { client: random_u64(), seq: 1 },
        op: Op::UseToken {
            id: token.id.clone(),
            secret_hash: token.secret_hash(),
            purpose: TokenPurpose::Join,
            now_unix: now_unix(),
        },
    };
    match crate::agent::peer_propose(shared, cmd, SPEND_WITHIN).await {
        Ok(Outcome::Done) => {}
        Ok(Outcome::Rejected(r)) => return Err(r.to_string()),
        Ok(other) => return Err(format!("unexpected outcome {other:?}")),
        Err(e) => return Err(e),
    }
    let (params, _) = crate::tls::cert_params(&name, false, NODE_CERT_DAYS).map_err(|e| format!("{e:#}"))?;
    let signed = rcgen::CertificateSigningRequestParams { params, public_key: csr.public_key };
    let cert = signed.signed_by(&issuer).map_err(|e| format!("signing: {e}"))?;
    tracing::info!(node = %name, node_id, token = %token.id, "signed a node certificate for a token join");
    Ok(JoinResponse { node_id, cert_pem: cert.pem(), ca_pem, members: vec![] })
}

/// Refuses, from this node's view and without proposing anything, a token the cluster would
/// refuse: guessed or spent tokens never reach the Raft log. A token this node has not seen yet
/// (created through another node a moment ago) gets a short wait for the view to catch up.
async fn precheck(shared: &Shared, token: &ParsedToken) -> Result<(), String> {
    let mut view = shared.view.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let known = view.borrow_and_update().state.tokens.get(&token.id).cloned();
        let refusal = match known {
            Some(t) if t.secret_hash != token.secret_hash() => Some(TokenRefusal::WrongSecret),
            Some(t) if t.purpose != TokenPurpose::Join => Some(TokenRefusal::WrongPurpose),
            Some(t) if now_unix() >= t.expires_unix => Some(TokenRefusal::Expired),
            Some(t) if t.uses_left == Some(0) => Some(TokenRefusal::AlreadyUsed),
            Some(_) => return Ok(()),
            None => match tokio::time::timeout_at(deadline, view.changed()).await {
                Ok(Ok(())) => continue,
                _ => Some(TokenRefusal::Unknown),
            },
        };
        if let Some(reason) = refusal {
            return Err(format!("token {} refused: {reason}", token.id));
        }
    }
}

fn dn_text(v: &rcgen::DnValue) -> Option<String> {
    match v {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Joining side: obtains a node certificate through any of `seeds` with `token`, retrying
/// unreachable seeds until `timeout`; a refusal (bad, expired or used token, wrong CA) ends it at
/// once. Writes `ca.pem`, `node.pem` and `node.key` into `tls_dir`.
pub async fn fetch_node_certificate(
    tls_dir: &Path,
    node_name: &str,
    seeds: &[SocketAddr],
    token_text: &str,
    timeout: Duration,
) -> Result<()> {
    let token = parse(token_text).map_err(|e| anyhow!("--token: {e}"))?;
    let Some(ca_hash) = token.ca_hash else { bail!("--token: an API token cannot join; use a join token") };
    let key = rcgen::KeyPair::generate().context("generating the node key")?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, node_name);
    let csr = params.serialize_request(&key).context("making the certificate signing request")?;
    let req = JoinRequest { token: token_text.trim().to_string(), csr_pem: csr.pem()?, ..Default::default() };
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    let mut last = String::new();
    loop {
        for seed in seeds {
            match join_via(*seed, &ca_hash, &req).await {
                Ok(resp) => {
                    let cert = CertificateDer::from_pem_slice(resp.cert_pem.as_bytes())
                        .context("the seed answered with an unreadable certificate")?;
                    let id = node_id_of(&cert)?;
                    if id.0 != node_id_for(node_name) {
                        bail!("the seed signed a certificate for {id}, not for --node-name {node_name}");
                    }
                    std::fs::create_dir_all(tls_dir).with_context(|| format!("creating {}", tls_dir.display()))?;
                    crate::tls::write(&tls_dir.join(CA_CERT_FILE), &resp.ca_pem, false)?;
                    crate::tls::write(&tls_dir.join(NODE_KEY_FILE), &key.serialize_pem(), true)?;
                    crate::tls::write(&tls_dir.join(NODE_CERT_FILE), &resp.cert_pem, false)?;
                    tracing::info!(%seed, tls_dir = %tls_dir.display(), "received a node certificate with the join token");
                    return Ok(());
                }
                Err(JoinError::Refused(e)) => bail!("token join through {seed} refused: {e}"),
                Err(JoinError::Unreachable(e)) => {
                    last = format!("{seed}: {e:#}");
                    tracing::info!(%seed, error = %last, "token join attempt failed; retrying");
                }
            }
        }
        if Instant::now() + delay > deadline {
            bail!("could not reach a seed of {seeds:?} for a token join within {timeout:?}: last error: {last}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

enum JoinError {
    /// The seed (or the check of its CA) said no: retrying will not help.
    Refused(String),
    /// The seed could not be reached or answered nonsense.
    Unreachable(anyhow::Error),
}

async fn join_via(seed: SocketAddr, ca_hash: &[u8; 32], req: &JoinRequest) -> Result<JoinResponse, JoinError> {
    let seen = Arc::new(Mutex::new(None));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let unreachable = |e: anyhow::Error| JoinError::Unreachable(e);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| unreachable(e.into()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RecordingVerifier { seen: seen.clone(), provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![JOIN_ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| unreachable(anyhow!("quic crypto: {e}")))?;
    let bind: SocketAddr =
        if seed.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| unreachable(anyhow!("binding a socket: {e}")))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let result = async {
        let connecting = endpoint.connect(seed, "seed.quiver").map_err(|e| unreachable(e.into()))?;
        let conn = tokio::time::timeout(Duration::from_secs(3), connecting)
            .await
            .map_err(|_| unreachable(anyhow!("handshake timed out")))?
            .map_err(|e| unreachable(e.into()))?;
        // 1. The CA, unauthenticated so far: it must hash to the token's pin, and the seed's
        //    certificate must chain to it, before the secret leaves this node.
        let ca = match call(&conn, KIND_CA, vec![]).await? {
            Ok(b) => String::from_utf8(b).map_err(|_| JoinError::Refused("the seed's CA is not PEM text".into()))?,
            Err(e) => return Err(JoinError::Refused(e)),
        };
        let ca_der = CertificateDer::from_pem_slice(ca.as_bytes())
            .map_err(|e| JoinError::Refused(format!("the seed's CA certificate is unreadable: {e}")))?;
        if sha256(&ca_der) != *ca_hash {
            return Err(JoinError::Refused(format!(
                "the seed's CA certificate has hash {}, the token pins {}: wrong cluster, or someone in between",
                hex(&sha256(&ca_der)),
                hex(ca_hash)
            )));
        }
        let server =
            seen.lock().expect("seen lock").clone().ok_or_else(|| unreachable(anyhow!("no server certificate")))?;
        verify_seed(&ca_der, &server).map_err(JoinError::Refused)?;
        // 2. The token and our CSR.
        let body = match call(&conn, KIND_JOIN, req.encode_to_vec()).await? {
            Ok(b) => b,
            Err(e) => return Err(JoinError::Refused(e)),
        };
        conn.close(quinn::VarInt::from_u32(ErrorCode::Ok as u32), b"joined");
        JoinResponse::decode(&body[..]).map_err(|e| unreachable(anyhow!("undecodable join response: {e}")))
    }
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

/// One control request on a fresh stream: `Ok(Ok(body))`, `Ok(Err(refusal))`, or unreachable.
async fn call(conn: &quinn::Connection, kind: &str, body: Vec<u8>) -> Result<Result<Vec<u8>, String>, JoinError> {
    let unreachable = |e: anyhow::Error| JoinError::Unreachable(e);
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let header = StreamHeader { kind: StreamKind::Control as i32, ..Default::default() };
        let req = ControlRequest {
            request_id: 1,
            body: Some(control_request::Body::Opaque(Opaque { kind: kind.into(), body })),
        };
        send.write_all(&codec::encode_stream_header(&header)).await?;
        send.write_all(&codec::encode_message(&req)).await?;
        send.finish()?;
        // One `u32le(len) message`, and nothing after it.
        let bytes = recv.read_to_end(1 << 20).await?;
        let (len, msg) =
            bytes.split_at_checked(codec::MESSAGE_PREFIX_LEN).ok_or_else(|| anyhow!("truncated answer"))?;
        let len = u32::from_le_bytes(len.try_into()?) as usize;
        if len != msg.len() {
            bail!("answer of {} bytes announced {len}", msg.len());
        }
        Ok::<_, anyhow::Error>(ControlResponse::decode(msg)?)
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| unreachable(anyhow!("the seed did not answer {kind} in time")))?
        .map_err(unreachable)?;
    Ok(match resp.body {
        Some(control_response::Body::Opaque(o)) if o.kind == kind => Ok(o.body),
        Some(control_response::Body::Error(e)) => Err(e.message),
        _ => Err(format!("unexpected answer to {kind}")),
    })
}

/// Checks the seed's certificate against the pinned CA under the name its node id implies.
fn verify_seed(ca_der: &CertificateDer<'static>, server: &[CertificateDer<'static>]) -> Result<(), String> {
    let (end, intermediates) = server.split_first().ok_or("the seed presented no certificate")?;
    let id = node_id_of(end).map_err(|e| format!("the seed's certificate: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone()).map_err(|e| format!("the pinned CA: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(node_server_name(id)).map_err(|e| e.to_string())?;
    let now = rustls_pki_types::UnixTime::now();
    use rustls::client::danger::ServerCertVerifier as _;
    verifier
        .verify_server_cert(end, intermediates, &name, &[], now)
        .map(|_| ())
        .map_err(|e| format!("the seed's certificate is not valid for the pinned CA: {e}"))
}

/// Accepts any server certificate during the handshake but records it (and checks the
/// handshake signature, so the connection is bound to that certificate's key); the chain is
/// checked against the pinned CA once the CA is known ([`verify_seed`]).
#[derive(Debug)]
struct RecordingVerifier {
    seen: Arc<Mutex<Option<Vec<CertificateDer<'static>>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.seen.lock().expect("seen lock") = Some(chain);
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_refuse_garbage() {
        let ca = "ab".repeat(32);
        let t = parse(&format!("quiver-join.0123abcd.{}.{ca}", "f".repeat(32))).unwrap();
        assert_eq!((t.purpose, t.id.as_str(), t.ca_hash), (TokenPurpose::Join, "0123abcd", Some([0xab; 32])));
        let a = parse(&format!("quiver-api.0123abcd.{}", "e".repeat(32))).unwrap();
        assert_eq!((a.purpose, a.ca_hash), (TokenPurpose::Api, None));
        for bad in
            ["", "quiver-join.x.y.z", "quiver-api.0123abcd.short", "other.0123abcd.ffffffffffffffffffffffffffffffff"]
        {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{t:?}").contains("ffff"), "Debug must not show the secret");
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_ttl("0s").is_err() && parse_ttl("1w").is_err() && parse_ttl("h").is_err());
    }
}

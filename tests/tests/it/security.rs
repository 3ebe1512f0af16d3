//! Security by default, on real agents: token joins (the joining node receives a signed
//! certificate), and the refusals of issue 8 — a peer whose certificate comes from another CA,
//! an expired token, a replayed token, a token pinning another CA, gRPC calls without (valid)
//! credentials — each refused with a clear error while the cluster keeps serving. Then
//! certificate rotation with SIGHUP: new handshakes present the new certificate on both ports,
//! existing connections and the leader stay.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::grpc_channel;
use quiver_proto::control::MembersRequest;
use quiver_proto::control::cluster_client::ClusterClient;
use quiver_tests::agents::{LocalCluster, wait_for};
use quiver_tests::bin::quiver;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

const READY: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(15);
/// A refused joiner gives up after its join timeout (2 s here) and exits.
const REFUSED_EXIT: Duration = Duration::from_secs(20);

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn members(c: &LocalCluster, via: usize) -> Vec<Value> {
    c.cli(via, &["members"]).json().as_array().cloned().unwrap_or_default()
}

#[track_caller]
fn wait_members(c: &LocalCluster, via: usize, names: &[&str]) {
    wait_for(&format!("members {names:?} alive"), CONVERGE, || {
        let m = members(c, via);
        let alive: Vec<&str> = m.iter().filter(|m| m["state"] == "alive").filter_map(|m| m["name"].as_str()).collect();
        if names.iter().all(|n| alive.contains(n)) && m.len() == names.len() { Ok(()) } else { Err(format!("{m:?}")) }
    });
}

fn token(c: &LocalCluster, args: &[&str]) -> Value {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    c.cli(0, &all).json()
}

/// Starts agent `i` with `--join seed --token t`, expects it to exit non-zero, and returns its log.
#[track_caller]
fn refused_join(c: &mut LocalCluster, i: usize, token: &str) -> String {
    let seed = c.agents[0].peer_addr();
    c.agents[i].start(&["--join", &seed, "--token", token, "--join-timeout-secs", "2"]);
    let status = c.agents[i].wait_exit(REFUSED_EXIT);
    assert!(!status.success(), "{} should have been refused\n{}", c.agents[i].name, c.agents[i].log_tail());
    assert!(!c.agents[i].tls_dir.join("node.pem").exists(), "a refused joiner must not hold a certificate");
    std::fs::read_to_string(&c.agents[i].log).unwrap()
}

async fn members_call(ch: Channel, bearer: Option<&str>) -> Result<usize, tonic::Status> {
    let mut req = tonic::Request::new(MembersRequest {});
    if let Some(b) = bearer {
        req.metadata_mut().insert("authorization", format!("Bearer {b}").parse().unwrap());
    }
    ClusterClient::new(ch).members(req).await.map(|r| r.into_inner().members.len())
}

#[track_caller]
fn unauthenticated(r: Result<usize, tonic::Status>, words: &str) {
    let e = r.expect_err("the call must be refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains(words), "{words:?} missing from {:?}", e.message());
}

#[test]
fn token_joins_work_once_and_every_unauthenticated_peer_or_caller_is_refused() {
    let mut c = LocalCluster::new(&["s1"]);
    // The bootstrap node holds the CA key: it signs the certificates of nodes joining by token.
    std::fs::copy(c.ca_dir().join("ca.key"), c.agents[0].tls_dir.join("ca.key")).unwrap();
    c.agents[0].start(&["--bootstrap"]);
    c.agents[0].wait_ready(READY);
    let seed = c.agents[0].peer_addr();

    // A join token: the new node has no certificate, receives one, and joins.
    let t = token(&c, &["--ttl", "10m"]);
    let join_token = t["token"].as_str().unwrap().to_string();
    assert!(join_token.starts_with("quiver-join."), "{t}");
    let ca_pem = std::fs::read(c.ca_dir().join("ca.pem")).unwrap();
    let ca_der = CertificateDer::from_pem_slice(&ca_pem).unwrap();
    assert_eq!(t["ca_hash"].as_str().unwrap(), sha256_hex(&ca_der), "the token pins the cluster CA");
    let t1 = c.add_agent_without_cert("t1");
    c.agents[t1].start(&["--join", &seed, "--token", &join_token]);
    c.agents[t1].wait_ready(READY);
    wait_members(&c, 0, &["s1", "t1"]);
    assert!(c.agents[t1].tls_dir.join("node.pem").exists() && c.agents[t1].tls_dir.join("node.key").exists());
    assert_eq!(std::fs::read(c.agents[t1].tls_dir.join("ca.pem")).unwrap(), ca_pem);

    // Replayed: the same token again.
    let t2 = c.add_agent_without_cert("t2");
    let log = refused_join(&mut c, t2, &join_token);
    assert!(log.contains("already used"), "{log}");

    // Expired.
    let short = token(&c, &["--ttl", "1s"]);
    let expires = short["expires_unix"].as_u64().unwrap();
    wait_for("the 1-second token to expire", Duration::from_secs(5), || {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        if now >= expires { Ok(()) } else { Err(format!("now {now}, expires {expires}")) }
    });
    let log = refused_join(&mut c, t2, short["token"].as_str().unwrap());
    assert!(log.contains("expired"), "{log}");

    // A token whose CA pin does not match this cluster: refused before the secret is sent, so
    // the same token still works afterwards.
    let good = token(&c, &["--ttl", "10m"]);
    let good = good["token"].as_str().unwrap();
    let (head, _) = good.rsplit_once('.').unwrap();
    let log = refused_join(&mut c, t2, &format!("{head}.{}", "0".repeat(64)));
    assert!(log.contains("wrong cluster"), "{log}");
    c.agents[t2].start(&["--join", &seed, "--token", good]);
    c.agents[t2].wait_ready(READY);
    wait_members(&c, 0, &["s1", "t1", "t2"]);

    // A peer whose certificate comes from another CA.
    let other_ca = c.dir.path().join("other-ca");
    quiver(c.dir.path(), &["tls", "ca", "create", "--out", path(&other_ca)]).ok();
    let intruder = c.add_agent_without_cert("intruder");
    let itls = c.agents[intruder].tls_dir.clone();
    quiver(
        c.dir.path(),
        &["tls", "cert", "create", "--ca", path(&other_ca), "--name", "intruder", "--out", path(&itls)],
    )
    .ok();
    c.agents[intruder].start(&["--join", &seed, "--join-timeout-secs", "2"]);
    let status = c.agents[intruder].wait_exit(REFUSED_EXIT);
    assert!(!status.success());
    let log = std::fs::read_to_string(&c.agents[intruder].log).unwrap();
    assert!(log.contains("could not join") && log.contains("certificate"), "{log}");
    let seed_log = std::fs::read_to_string(&c.agents[0].log).unwrap();
    assert!(seed_log.contains("refused peer"), "the seed logs the refusal\n{seed_log}");

    // gRPC: no credentials, a bad token, a join token, a client certificate from another CA are
    // refused; a client certificate or an API token pass. Zero refused calls may succeed.
    let api = token(&c, &["--api", "--ttl", "10m"]);
    let api = api["token"].as_str().unwrap().to_string();
    assert!(api.starts_with("quiver-api."), "{api}");
    let addr = c.agents[0].addr();
    let client_tls = c.client_tls.clone();
    let other_client = c.dir.path().join("other-client");
    quiver(
        c.dir.path(),
        &[
            "tls",
            "cert",
            "create",
            "--ca",
            path(&other_ca),
            "--name",
            "mallory",
            "--out",
            path(&other_client),
            "--client",
        ],
    )
    .ok();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut refused = 0;
    rt.block_on(async {
        let anon = || async { grpc_channel(&addr, &ca_pem, None).await.expect("TLS without a client certificate") };
        unauthenticated(members_call(anon().await, None).await, "no credentials");
        unauthenticated(members_call(anon().await, Some("nonsense")).await, "not a quiver token");
        let forged = format!("{}.{}", &api[..api.rfind('.').unwrap()], "0".repeat(32));
        unauthenticated(members_call(anon().await, Some(&forged)).await, "secret does not match");
        unauthenticated(members_call(anon().await, Some(good)).await, "join token is not an API credential");
        refused += 4;
        // Another CA's client certificate does not even finish the handshake.
        let read = |f: &str| std::fs::read(other_client.join(f)).unwrap();
        if let Ok(ch) = grpc_channel(&addr, &ca_pem, Some((read("client.pem"), read("client.key")))).await {
            let r = members_call(ch, None).await;
            assert!(r.is_err(), "a certificate from another CA must not pass: {r:?}");
        }
        refused += 1;
        // With credentials.
        assert_eq!(members_call(anon().await, Some(&api)).await.expect("an API token passes"), 3);
        let read = |f: &str| std::fs::read(client_tls.join(f)).unwrap();
        let ch = grpc_channel(&addr, &ca_pem, Some((read("client.pem"), read("client.key")))).await.unwrap();
        assert_eq!(members_call(ch, None).await.expect("a client certificate passes"), 3);
        // Tokens are minted by certificate holders only.
        let mut req = tonic::Request::new(quiver_proto::control::CreateTokenRequest { ttl_secs: 60, api: true });
        req.metadata_mut().insert("authorization", format!("Bearer {api}").parse().unwrap());
        let e = ClusterClient::new(anon().await).create_token(req).await.expect_err("an API token cannot mint tokens");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        refused += 1;
    });
    assert_eq!(refused, 6);
    let metrics = c.agents[0].http_get("/metrics").unwrap().1;
    assert!(metrics.contains("quiver_grpc_auth_refused_total"), "refusals are counted");

    // Nothing else was disturbed: the cluster has its leader and its three members.
    wait_members(&c, 0, &["s1", "t1", "t2"]);
    let status = c.cli(2, &["status"]).json();
    assert_eq!(status["leader"], "s1", "{status}");
}

#[test]
fn sighup_reloads_certificates_for_new_connections_without_dropping_the_cluster() {
    let mut c = LocalCluster::new(&["r1", "r2", "r3"]);
    c.agents[0].start(&["--bootstrap"]);
    c.agents[0].wait_ready(READY);
    let seed = c.agents[0].peer_addr();
    c.agents[1].start(&["--join", &seed]);
    c.agents[2].start(&["--join", &seed]);
    c.agents[1].wait_ready(READY);
    c.agents[2].wait_ready(READY);
    wait_members(&c, 0, &["r1", "r2", "r3"]);
    // Pick a follower to rotate, so the test also shows the leader stays put.
    let before = c.cli(0, &["status"]).json();
    let leader = before["leader"].as_str().unwrap().to_string();
    let term = before["term"].clone();
    let i = if leader == "r2" { 2 } else { 1 };
    let a = &c.agents[i];
    let grpc_addr: SocketAddr = a.addr().parse().unwrap();
    let peer_addr: SocketAddr = a.peer_addr().parse().unwrap();

    let old = std::fs::read(a.tls_dir.join("node.pem")).unwrap();
    let old = CertificateDer::from_pem_slice(&old).unwrap().to_vec();
    assert_eq!(grpc_cert(grpc_addr), old);
    assert_eq!(quic_cert(peer_addr), old);

    // Rotate the node certificate on disk (same CA, same name, new key and serial), then SIGHUP.
    let tls_dir = a.tls_dir.clone();
    quiver(
        c.dir.path(),
        &["tls", "cert", "create", "--ca", path(&c.ca_dir()), "--name", &a.name.clone(), "--out", path(&tls_dir)],
    )
    .ok();
    let new = CertificateDer::from_pem_slice(&std::fs::read(tls_dir.join("node.pem")).unwrap()).unwrap().to_vec();
    assert_ne!(new, old);
    c.agents[i].sighup();
    wait_for("the gRPC port to present the new certificate", Duration::from_secs(10), || {
        if grpc_cert(grpc_addr) == new { Ok(()) } else { Err("still the old certificate".into()) }
    });
    assert_eq!(quic_cert(peer_addr), new, "new peer handshakes present the new certificate");
    let log = std::fs::read_to_string(&c.agents[i].log).unwrap();
    assert!(log.contains("reloaded the node certificate"), "{log}");

    // The existing connections and the leader stayed: same leader, same term, everyone alive.
    wait_members(&c, 0, &["r1", "r2", "r3"]);
    for via in 0..3 {
        let s = c.cli(via, &["status"]).json();
        assert_eq!((s["leader"].as_str().unwrap(), &s["term"]), (leader.as_str(), &term), "{s}");
    }
    // A new peer connection to the rotated node is accepted with the new certificate: restart
    // the third node, which must dial it again to rejoin.
    let k = 3 - i;
    assert!(c.agents[k].sigterm(Duration::from_secs(10)).success());
    c.agents[k].start(&[]);
    c.agents[k].wait_ready(READY);
    wait_members(&c, i, &["r1", "r2", "r3"]);
    // A bad reload keeps the old certificates.
    std::fs::write(tls_dir.join("node.pem"), "garbage").unwrap();
    c.agents[i].sighup();
    wait_for("the failed reload to be logged", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(&c.agents[i].log).unwrap();
        if log.contains("certificate reload failed") { Ok(()) } else { Err("not yet".into()) }
    });
    assert_eq!(grpc_cert(grpc_addr), new);
}

fn sha256_hex(b: &[u8]) -> String {
    // Tests do not depend on ring; the agent's answer is cross-checked by `sha256sum`.
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// Records the server's certificate and accepts it (these probes only look).
#[derive(Debug)]
struct Look {
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Look {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn looking_client(alpn: &[u8]) -> (rustls::ClientConfig, Arc<Mutex<Option<Vec<u8>>>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen = Arc::new(Mutex::new(None));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Look { seen: seen.clone(), provider }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    (cfg, seen)
}

/// The certificate a new TLS connection to the gRPC port is shown.
fn grpc_cert(addr: SocketAddr) -> Vec<u8> {
    let (cfg, seen) = looking_client(b"h2");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), "cluster.quiver".try_into().unwrap()).expect("tls client");
    let mut tcp = std::net::TcpStream::connect(addr).expect("connecting to the gRPC port");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("TLS handshake with the gRPC port");
    }
    seen.lock().unwrap().clone().expect("a server certificate")
}

/// The certificate a new QUIC connection to the peer port is shown (the agent then closes the
/// connection: no client certificate, so no node identity).
fn quic_cert(addr: SocketAddr) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (cfg, seen) = looking_client(b"quiver/1");
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = tokio::time::timeout(Duration::from_secs(5), ep.connect(addr, "probe.quiver").unwrap())
            .await
            .expect("QUIC handshake in time")
            .expect("QUIC handshake");
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("refused in time");
        assert!(reason.to_string().contains("no node identity"), "an unauthenticated peer is refused: {reason}");
        ep.wait_idle().await;
        seen.lock().unwrap().clone().expect("a server certificate")
    })
}

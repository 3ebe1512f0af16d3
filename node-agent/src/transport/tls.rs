//! Mutual TLS for the peer transport: the cluster CA, node and client certificates, and the
//! rustls configurations that make both ends of every connection prove who they are.
//!
//! Identity model: a node certificate is signed by the cluster CA and names its node id twice,
//! as the URI SAN `quiver://node/<id>` (what the server side reads to learn who dialled) and as the
//! DNS SAN `node-<id>.quiver` (what the dialling side asks for as the TLS server name, so rustls'
//! own name check refuses a peer presenting another node's certificate). Client certificates (for
//! gRPC callers and the CLI) carry `quiver://client/<name>` and are refused on the peer port.
//!
//! Crypto is ring everywhere (see DESIGN.md, Dependency notes). This module owns no sockets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore, SignatureScheme};

use super::NodeId;

/// The ALPN protocol every Quiver peer connection negotiates.
pub const ALPN: &[u8] = b"quiver/1";

/// The ALPN of a token join: a node without a certificate yet asks a member for one. Such a
/// connection carries only `Control` streams from [`super::ANONYMOUS`]; the application decides
/// what an anonymous request may do (nothing but present a join token).
pub const JOIN_ALPN: &[u8] = b"quiver-join/1";

const NODE_URI_PREFIX: &str = "quiver://node/";
const CLIENT_URI_PREFIX: &str = "quiver://client/";

/// Why a certificate or key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{what}: no PEM {kind} found")]
    MissingPem { what: String, kind: &'static str },
    #[error("certificate is not a quiver node certificate: {0}")]
    NotANode(String),
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls verifier: {0}")]
    Verifier(String),
}

/// Validity window of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From one hour ago (clock skew between hosts) for `days` days.
    pub fn days(days: u64) -> Self {
        let now = SystemTime::now();
        Self { not_before: now - Duration::from_secs(3600), not_after: now + Duration::from_secs(days * 86_400) }
    }
}

/// A certificate and its private key, both PEM (and DER for the certificate).
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert").field("cert_len", &self.cert_der.len()).finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// The private key as DER.
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        parse_key_pem(&self.key_pem, "issued key")
    }
}

/// The cluster certificate authority: signs node and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert: IssuedCert,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new self-signed CA (ECDSA P-256) named `name`.
    pub fn create(name: &str, validity: Validity) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "quiver");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity);
        let cert = params.self_signed(&key)?;
        let issued = IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), cert_der: cert.der().clone() };
        Ok(Self { issuer: Issuer::new(params, key), cert: issued })
    }

    /// Loads a CA from its PEM certificate and PEM private key (as written by [`Self::cert_pem`] / [`Self::key_pem`]).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = first_cert(cert_pem, "ca certificate")?;
        // The issuer's name is taken from the parsed certificate, so new certificates chain to it exactly.
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self { issuer, cert: IssuedCert { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), cert_der } })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert.cert_pem
    }

    /// The CA private key, PEM (keep it secret: whoever holds it can mint node identities).
    pub fn key_pem(&self) -> &str {
        &self.cert.key_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert.cert_der
    }

    /// Signs a node certificate for `node`, valid for `validity`.
    pub fn sign_node(&self, node: NodeId, validity: Validity) -> Result<IssuedCert, TlsError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("quiver node {}", node.0));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(format!("{NODE_URI_PREFIX}{}", node.0).try_into()?),
            SanType::DnsName(node_server_name(node).try_into()?),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity);
        self.sign(params)
    }

    /// Signs a client certificate (gRPC callers, the CLI) named `name`.
    pub fn sign_client(&self, name: &str, validity: Validity) -> Result<IssuedCert, TlsError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(format!("{CLIENT_URI_PREFIX}{name}").try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<IssuedCert, TlsError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), cert_der: cert.der().clone() })
    }

    /// A node identity signed by this CA, in memory (for tests and single-host setups).
    pub fn node_identity(&self, node: NodeId, validity: Validity) -> Result<NodeIdentity, TlsError> {
        let issued = self.sign_node(node, validity)?;
        Ok(NodeIdentity {
            node_id: node,
            cert_chain: vec![issued.cert_der.clone()],
            key: Arc::new(issued.key_der()?),
            roots: vec![self.cert.cert_der.clone()],
        })
    }
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
}

/// The TLS server name a node's certificate is valid for (`node-<id>.quiver`).
pub fn node_server_name(node: NodeId) -> String {
    format!("node-{}.quiver", node.0)
}

/// What a node proves itself with: its certificate chain and key, and the CA it trusts.
#[derive(Clone)]
pub struct NodeIdentity {
    pub node_id: NodeId,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Trust anchors: the cluster CA certificate(s).
    pub roots: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// File names inside a TLS directory (`<data-dir>/tls/`).
pub const CA_CERT_FILE: &str = "ca.pem";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node.key";

impl NodeIdentity {
    /// Loads `ca.pem`, `node.pem` and `node.key` from `dir`; the node id is read from the certificate.
    pub fn load_dir(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| TlsError::File { path, reason: e.to_string() })
        };
        let ca = read(CA_CERT_FILE)?;
        let cert = read(NODE_CERT_FILE)?;
        let key = read(NODE_KEY_FILE)?;
        Self::from_pem(&ca, &cert, &key)
    }

    /// Builds an identity from PEM text: CA certificate(s), node certificate chain, node key.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let roots = all_certs(ca_pem, "ca certificate")?;
        let cert_chain = all_certs(cert_pem, "node certificate")?;
        let key = parse_key_pem(key_pem, "node key")?;
        let node_id = node_id_of(&cert_chain[0])?;
        Ok(Self { node_id, cert_chain, key: Arc::new(key), roots })
    }

    /// Writes `ca.pem`, `node.pem`, `node.key` into `dir` (the key readable by the owner only on unix).
    pub fn write_dir(dir: &Path, ca_pem: &str, issued: &IssuedCert) -> Result<(), TlsError> {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| TlsError::File { path, reason: e.to_string() })
        };
        std::fs::create_dir_all(dir).map_err(|e| TlsError::File { path: dir.to_owned(), reason: e.to_string() })?;
        write(CA_CERT_FILE, ca_pem)?;
        write(NODE_CERT_FILE, &issued.cert_pem)?;
        write(NODE_KEY_FILE, &issued.key_pem)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(NODE_KEY_FILE);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| TlsError::File { path, reason: e.to_string() })?;
        }
        Ok(())
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.roots {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// The rustls server side: a client certificate, if presented, must come from the cluster CA
    /// and name a node. A `quiver/1` connection without one is closed by the endpoint right after
    /// the handshake; only [`JOIN_ALPN`] connections may go without.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(self.root_store()?, provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(NodeClientVerifier { inner }))
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec(), JOIN_ALPN.to_vec()];
        // Peer connections are long-lived and every handshake should check the current certificates.
        cfg.send_tls13_tickets = 0;
        Ok(cfg)
    }

    /// The rustls client side: presents this node's certificate and checks the server's against the CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = provider();
        let inner = WebPkiServerVerifier::builder_with_provider(self.root_store()?, provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeServerVerifier { inner }))
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(cfg)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the node id out of a node certificate (URI SAN `quiver://node/<id>`).
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<NodeId, TlsError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::NotANode(format!("unparsable: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::NotANode(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| TlsError::NotANode("no subject alternative names".into()))?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
        {
            return id.parse::<u64>().map(NodeId).map_err(|_| TlsError::NotANode(format!("bad node id in {uri}")));
        }
    }
    Err(TlsError::NotANode("no quiver://node/<id> name".into()))
}

fn all_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Verifier(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::MissingPem { what: what.into(), kind: "CERTIFICATE" });
    }
    Ok(certs)
}

fn first_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, TlsError> {
    Ok(all_certs(pem, what)?.swap_remove(0))
}

fn parse_key_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| TlsError::MissingPem { what: what.into(), kind: "PRIVATE KEY" })
}

/// Server side: the CA check of rustls' WebPKI verifier, plus "the certificate names a node".
#[derive(Debug)]
struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for NodeClientVerifier {
    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }

    /// Optional at the TLS layer so a joining node (no certificate yet) can reach the join
    /// service; the endpoint refuses every certificate-less connection that is not a join.
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self.inner.verify_client_cert(end_entity, intermediates, now) {
            tracing::warn!(error = %e, "refused peer client certificate: not valid for the cluster CA");
            return Err(e);
        }
        match node_id_of(end_entity) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                tracing::warn!(error = %e, "refused peer client certificate: wrong identity");
                Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: rustls' WebPKI verifier (CA chain, validity, `node-<id>.quiver` name), with a log line on refusal.
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).inspect_err(|e| {
            tracing::warn!(expected = ?server_name, error = %e, "refused peer server certificate");
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_carry_their_id_and_round_trip_through_pem() {
        let ca = CertificateAuthority::create("test ca", Validity::days(1)).unwrap();
        let issued = ca.sign_node(NodeId(42), Validity::days(1)).unwrap();
        assert_eq!(node_id_of(&issued.cert_der).unwrap(), NodeId(42));
        let dir = tempfile::tempdir().unwrap();
        NodeIdentity::write_dir(dir.path(), ca.cert_pem(), &issued).unwrap();
        let id = NodeIdentity::load_dir(dir.path()).unwrap();
        assert_eq!(id.node_id, NodeId(42));
        id.server_config().unwrap();
        id.client_config().unwrap();
        let reloaded = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let again = reloaded.sign_node(NodeId(7), Validity::days(1)).unwrap();
        assert_eq!(node_id_of(&again.cert_der).unwrap(), NodeId(7));
    }

    #[test]
    fn client_certificates_are_not_nodes() {
        let ca = CertificateAuthority::create("test ca", Validity::days(1)).unwrap();
        let c = ca.sign_client("operator", Validity::days(1)).unwrap();
        assert!(matches!(node_id_of(&c.cert_der), Err(TlsError::NotANode(_))));
    }

    #[test]
    fn missing_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = NodeIdentity::load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca.pem"), "{e}");
    }
}

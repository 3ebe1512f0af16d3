//! `quiver tls ca create` and `quiver tls cert create`: the cluster CA and the node and client
//! certificates agents and operators present (mutual TLS on the peer port and on gRPC).
//!
//! Node ids are derived from node names ([`node_id_for`]) so a certificate made for `--name n1`
//! is exactly the identity an agent started with `--node-name n1` expects. A node certificate
//! names its node three ways: the URI SAN `quiver://node/<id>` and DNS SAN `node-<id>.quiver`
//! that the peer transport checks, and the DNS SAN [`CLUSTER_SERVER_NAME`], shared by every node
//! of the cluster, which gRPC clients ask for (a client reaches "some node of this cluster" at an
//! address, without knowing its id).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use quiver_node_agent::transport::tls::{CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE, node_server_name};
use quiver_node_agent::transport::{CertificateAuthority, NodeId, Validity};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::json;

/// The CA private key file inside a CA directory (`ca.pem` is the certificate).
pub const CA_KEY_FILE: &str = "ca.key";
/// Client certificate and key files inside a client TLS directory.
pub const CLIENT_CERT_FILE: &str = "client.pem";
pub const CLIENT_KEY_FILE: &str = "client.key";
/// The TLS server name every node certificate carries, and that gRPC clients ask for.
pub const CLUSTER_SERVER_NAME: &str = "cluster.quiver";

/// Certificates for mutual TLS.
#[derive(Debug, Subcommand)]
pub enum TlsCmd {
    /// The cluster certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Node and client certificates signed by the cluster CA.
    #[command(subcommand)]
    Cert(CertCmd),
}

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Create a new CA: writes ca.pem and ca.key (owner-readable only) into DIR.
    Create {
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "quiver cluster ca")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u64,
        /// Overwrite an existing CA in DIR.
        #[arg(long)]
        force: bool,
        /// Succeed without touching DIR when it already holds a CA (for init containers that
        /// run on every start, as in deploy/compose.yaml).
        #[arg(long, conflicts_with = "force")]
        if_missing: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Create a node certificate (ca.pem, node.pem, node.key) or, with --client, a client
    /// certificate (ca.pem, client.pem, client.key) in DIR.
    Create {
        /// Directory of the CA (ca.pem, ca.key).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Node name (as given to `quiver agent --node-name`) or client name.
        #[arg(long)]
        name: String,
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Make a client certificate (for the CLI and gRPC callers) instead of a node certificate.
        #[arg(long)]
        client: bool,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

/// The node id of the node named `name`: the first 53 bits of SHA-256(name) (53 so that JSON
/// consumers read it exactly), never 0.
pub fn node_id_for(name: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    let id = u64::from_be_bytes(b) & ((1 << 53) - 1);
    id.max(1)
}

pub fn run(cmd: TlsCmd) -> Result<()> {
    match cmd {
        TlsCmd::Ca(CaCmd::Create { out, name, days, force, if_missing }) => {
            let cert_path = out.join(CA_CERT_FILE);
            if cert_path.exists() && if_missing {
                println!("{}", json!({ "ca": cert_path, "existing": true }));
                return Ok(());
            }
            if cert_path.exists() && !force {
                bail!("{}: a CA already exists there (use --force to replace it)", cert_path.display());
            }
            let ca = CertificateAuthority::create(&name, Validity::days(days)).context("creating the CA")?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            write(&cert_path, ca.cert_pem(), false)?;
            write(&out.join(CA_KEY_FILE), ca.key_pem(), true)?;
            println!("{}", json!({ "ca": cert_path, "key": out.join(CA_KEY_FILE) }));
            Ok(())
        }
        TlsCmd::Cert(CertCmd::Create { ca, name, out, client, days }) => {
            validate_name(&name)?;
            let ca_pem = read(&ca.join(CA_CERT_FILE))?;
            let key_pem = read(&ca.join(CA_KEY_FILE))?;
            let (cert_pem, key, id) = sign(&ca_pem, &key_pem, &name, client, days)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let (cert_file, key_file) =
                if client { (CLIENT_CERT_FILE, CLIENT_KEY_FILE) } else { (NODE_CERT_FILE, NODE_KEY_FILE) };
            write(&out.join(CA_CERT_FILE), &ca_pem, false)?;
            write(&out.join(cert_file), &cert_pem, false)?;
            write(&out.join(key_file), &key, true)?;
            let mut o = json!({ "name": name, "cert": out.join(cert_file), "key": out.join(key_file) });
            if let Some(id) = id {
                o["node_id"] = json!(id);
            }
            println!("{o}");
            Ok(())
        }
    }
}

/// Signs a node (or client) certificate for `name` with the CA given as PEM. Returns the
/// certificate PEM, the key PEM and, for a node, its id.
pub fn sign(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    name: &str,
    client: bool,
    days: u64,
) -> Result<(String, String, Option<u64>)> {
    let issuer = issuer(ca_cert_pem, ca_key_pem)?;
    let (params, id) = cert_params(name, client, days)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer).context("signing the certificate")?;
    Ok((cert.pem(), key.serialize_pem(), id))
}

/// The CA as an rcgen issuer, from its PEM certificate and key.
pub fn issuer(ca_cert_pem: &str, ca_key_pem: &str) -> Result<Issuer<'static, KeyPair>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let ca_key = KeyPair::from_pem(ca_key_pem).context("reading the CA key")?;
    let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes()).context("reading the CA certificate")?;
    Issuer::from_ca_cert_der(&ca_der, ca_key).context("reading the CA certificate")
}

/// What a node (or client) certificate for `name` says: names, usages and validity. The same
/// for certificates made here and for those signed from a joining node's CSR (which only
/// contributes its public key).
pub fn cert_params(name: &str, client: bool, days: u64) -> Result<(CertificateParams, Option<u64>)> {
    let validity = Validity::days(days);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    let id = if client {
        params.subject_alt_names = vec![SanType::URI(format!("quiver://client/{name}").try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        None
    } else {
        let id = node_id_for(name);
        params.subject_alt_names = vec![
            SanType::URI(format!("quiver://node/{id}").try_into()?),
            SanType::DnsName(node_server_name(NodeId(id)).try_into()?),
            SanType::DnsName(CLUSTER_SERVER_NAME.try_into()?),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        Some(id)
    };
    Ok((params, id))
}

/// A random positive 16-byte serial number, so a renewed certificate is told apart from the old one.
fn random_serial() -> rcgen::SerialNumber {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&b)
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        bail!("--name: {name:?} must be 1-63 characters of letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

pub(crate) fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

pub(crate) fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_nonzero() {
        assert_eq!(node_id_for("n1"), node_id_for("n1"));
        assert_ne!(node_id_for("n1"), node_id_for("n2"));
        assert!(node_id_for("") > 0 && node_id_for("x") < (1 << 53));
    }

    #[test]
    fn signed_node_certificates_load_as_transport_identities() {
        let ca = CertificateAuthority::create("t", Validity::days(1)).unwrap();
        let (cert, key, id) = sign(ca.cert_pem(), ca.key_pem(), "n1", false, 1).unwrap();
        let ident = quiver_node_agent::transport::NodeIdentity::from_pem(ca.cert_pem(), &cert, &key).unwrap();
        assert_eq!(ident.node_id, NodeId(id.unwrap()));
        assert_eq!(ident.node_id.0, node_id_for("n1"));
    }
}

//! Agent configuration in two stages (STYLE.md §8): raw values from flags, `QUIVER_*` environment
//! variables and `quiver.toml` are merged and validated into one [`AgentConfig`] that the rest of
//! the daemon uses. Precedence: flags > environment > file > defaults. Every option is documented
//! once, on [`AgentArgs`]; the file uses the same names in snake_case.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

/// Default ports (DESIGN.md, Ports and names).
pub const DEFAULT_PEER_PORT: u16 = 7400;
pub const DEFAULT_GRPC_PORT: u16 = 7401;
pub const DEFAULT_HTTP_PORT: u16 = 7402;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The peer connections' congestion controller (see `quiver_node_agent::transport::Congestion`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CongestionControl {
    /// quinn's default: every loss halves the window. The fastest on a clean network.
    #[default]
    Cubic,
    /// Paces by measured bandwidth and round trip: random loss costs only retransmissions.
    /// For links that lose packets at random; slower on a clean network.
    Bbr,
}

impl From<CongestionControl> for quiver_node_agent::transport::Congestion {
    fn from(c: CongestionControl) -> Self {
        match c {
            CongestionControl::Bbr => Self::Bbr,
            CongestionControl::Cubic => Self::Cubic,
        }
    }
}

/// `quiver agent` flags. Each may also come from `QUIVER_<NAME>` or from the config file.
#[derive(Debug, Default, Args)]
pub struct AgentArgs {
    /// Config file (TOML). Missing is fine when it is the default `quiver.toml`.
    #[arg(long, env = "QUIVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the Raft log, blobs, checkpoints and TLS material.
    #[arg(long, env = "QUIVER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Peer (QUIC, UDP) listen address; `:PORT` means all interfaces.
    #[arg(long, env = "QUIVER_PEER_ADDR")]
    pub peer_addr: Option<String>,
    /// Address other nodes should dial for this node's peer port (defaults to --peer-addr).
    #[arg(long, env = "QUIVER_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// gRPC control-plane listen address.
    #[arg(long, env = "QUIVER_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// HTTP listen address for /metrics, /healthz, /readyz.
    #[arg(long, env = "QUIVER_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Directory with ca.pem, node.pem and node.key (defaults to DATA_DIR/tls).
    #[arg(long, env = "QUIVER_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// This node's name, unique in the cluster (defaults to the host name).
    #[arg(long, env = "QUIVER_NODE_NAME")]
    pub node_name: Option<String>,
    /// Start a new single-node cluster.
    #[arg(long, env = "QUIVER_BOOTSTRAP", conflicts_with_all = ["bootstrap_expect", "join"])]
    pub bootstrap: bool,
    /// Start a new cluster of N nodes: agents started with the same N find each other through
    /// --join (list the others' peer addresses), and bootstrap together once all N agree.
    #[arg(long, env = "QUIVER_BOOTSTRAP_EXPECT", value_name = "N")]
    pub bootstrap_expect: Option<u32>,
    /// Join an existing cluster through any member's peer address (comma-separated seeds).
    #[arg(long, env = "QUIVER_JOIN", value_delimiter = ',', value_name = "SEED")]
    pub join: Vec<String>,
    /// A join token (`quiver token create`): with --join and no node certificate in --tls-dir,
    /// the seed signs one for this node (the token pins the cluster CA by hash).
    #[arg(long = "token", env = "QUIVER_JOIN_TOKEN", value_name = "TOKEN")]
    pub join_token: Option<String>,
    /// Give up joining after this many seconds.
    #[arg(long, env = "QUIVER_JOIN_TIMEOUT_SECS")]
    pub join_timeout_secs: Option<u64>,
    /// Log format.
    #[arg(long, env = "QUIVER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Worker threads for kernels, each pinned to one CPU (default: every CPU this process may use).
    #[arg(long, env = "QUIVER_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Serving requests in flight on this node before `Diffuse` answers RESOURCE_EXHAUSTED
    /// (default: 4 × worker threads × 64).
    #[arg(long, env = "QUIVER_SERVE_QUEUE_LIMIT", value_name = "N")]
    pub serve_queue_limit: Option<usize>,
    /// Worker load above which a `Diffuse` request is offered to a less-loaded peer
    /// (default: 4 × worker threads; 0 offers every request).
    #[arg(long, env = "QUIVER_SERVE_FORWARD_THRESHOLD", value_name = "N")]
    pub serve_forward_threshold: Option<usize>,
    /// Congestion control of the peer (QUIC) connections.
    #[arg(long, env = "QUIVER_CONGESTION", value_enum)]
    pub congestion: Option<CongestionControl>,
    /// Kernel receive buffer to ask for on the peer (UDP) socket, in bytes (default: the kernel's,
    /// 208 KiB on Linux). Larger buffers absorb bursts from many peers at once (a job's halo
    /// exchange) without drops, but let one bulk transfer queue more ahead of heartbeats; Linux
    /// caps it at net.core.rmem_max unless the agent has CAP_NET_ADMIN.
    #[arg(long, env = "QUIVER_UDP_BUFFER", value_name = "BYTES")]
    pub udp_buffer: Option<usize>,
    /// Receive buffer the peer socket is widened to while this node runs a job's supersteps, in
    /// bytes (default 4 MiB; 0 never widens). Their halos arrive from every peer at once while the
    /// cores are busy computing; outside supersteps --udp-buffer applies.
    #[arg(long, env = "QUIVER_JOB_UDP_BUFFER", value_name = "BYTES")]
    pub job_udp_buffer: Option<usize>,
    /// Largest UDP payload the peer connections' path-MTU discovery probes for, 1200–6500
    /// (default 1452, for a 1500-byte Ethernet MTU). On loopback or jumbo-frame links a larger
    /// bound carries several times the data per packet for the same per-packet work.
    #[arg(long, env = "QUIVER_MAX_MTU", value_name = "BYTES")]
    pub max_mtu: Option<u16>,
    /// Bytes of graph partitions this node keeps after their jobs succeed, so that the next job
    /// on the same graph (same content, same partition count) skips cutting and shipping them
    /// (default: 1 GiB; 0 keeps none). Least recently used partitions go first.
    #[arg(long, env = "QUIVER_PARTITION_CACHE", value_name = "BYTES")]
    pub partition_cache: Option<u64>,
    /// For chaos drills only: put the fault-injecting socket under the peer transport and serve
    /// `POST /chaos/net` (drop, delay, duplicate, reorder, partition) on the HTTP port. Costs
    /// UDP segmentation offload; never use it in production.
    #[arg(long, env = "QUIVER_FAULT_INJECTION")]
    pub fault_injection: bool,
}

/// The same options as they appear in `quiver.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    peer_addr: Option<String>,
    advertise_addr: Option<String>,
    grpc_addr: Option<String>,
    http_addr: Option<String>,
    tls_dir: Option<PathBuf>,
    node_name: Option<String>,
    bootstrap: Option<bool>,
    bootstrap_expect: Option<u32>,
    join: Option<Vec<String>>,
    join_token: Option<String>,
    join_timeout_secs: Option<u64>,
    log_format: Option<LogFormat>,
    worker_threads: Option<usize>,
    serve_queue_limit: Option<usize>,
    serve_forward_threshold: Option<usize>,
    congestion: Option<CongestionControl>,
    udp_buffer: Option<usize>,
    job_udp_buffer: Option<usize>,
    max_mtu: Option<u16>,
    partition_cache: Option<u64>,
    fault_injection: Option<bool>,
}

/// How this node enters a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Restart from the data directory only (it must hold cluster state).
    Restart,
    /// Bootstrap a new single-node cluster (`--bootstrap`, or `--bootstrap-expect 1`).
    Bootstrap { expect: u32 },
    /// `--bootstrap-expect N` (N > 1) with `--join` seeds: find the other N − 1 expected nodes
    /// through the seeds, then bootstrap the cluster of all N (see `agent::expect`).
    BootstrapExpect { expect: u32, seeds: Vec<SocketAddr> },
    /// Join through any of these seeds.
    Join { seeds: Vec<SocketAddr> },
}

/// The validated agent configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub peer_addr: SocketAddr,
    pub advertise_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub tls_dir: PathBuf,
    pub node_name: String,
    pub membership: Membership,
    /// `--token`: used once, when the TLS directory has no node certificate yet.
    pub join_token: Option<String>,
    pub join_timeout: Duration,
    pub log_format: LogFormat,
    /// `None`: one worker per usable CPU.
    pub worker_threads: Option<usize>,
    /// `None`: the serving defaults for the worker count (`agent::serve::ServeConfig::defaults`).
    pub serve_queue_limit: Option<usize>,
    pub serve_forward_threshold: Option<usize>,
    /// `--congestion`: the peer connections' congestion controller.
    pub congestion: CongestionControl,
    /// `--udp-buffer`: the peer socket's receive buffer in bytes (0: the kernel's default).
    pub udp_buffer: usize,
    /// `--job-udp-buffer`: the peer socket's receive buffer during a job's supersteps.
    pub job_udp_buffer: usize,
    /// `--max-mtu`: the peer connections' path-MTU discovery bound.
    pub max_mtu: u16,
    /// `--partition-cache`: bytes of partitions kept for later jobs on the same graph.
    pub partition_cache: u64,
    /// `--fault-injection`: the chaos layer under the transport and its HTTP control.
    pub fault_injection: bool,
}

/// A configuration value that does not validate; names the option and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: {reason}", .path.display())]
    File { path: PathBuf, reason: String },
    #[error("{option}: {reason}")]
    Invalid { option: &'static str, reason: String },
}

fn invalid(option: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { option, reason: reason.into() }
}

/// Parses `HOST:PORT`, `:PORT` (all interfaces) or `PORT`.
pub fn parse_addr(option: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    let text = text.trim();
    let full = if let Some(port) = text.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if text.parse::<u16>().is_ok() {
        format!("0.0.0.0:{text}")
    } else {
        text.to_string()
    };
    if let Ok(addr) = full.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    full.to_socket_addrs()
        .map_err(|e| invalid(option, format!("{text:?} is not an address: {e}")))?
        .next()
        .ok_or_else(|| invalid(option, format!("{text:?} resolves to no address")))
}

impl AgentArgs {
    /// Merges flags/env with the config file and defaults, and validates the result.
    pub fn resolve(self) -> Result<AgentConfig, ConfigError> {
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from("quiver.toml"), false),
        };
        let file = read_file(&path, explicit)?;
        let data_dir = self.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("quiver-data"));
        let addr = |option, flag: Option<String>, file: Option<String>, port: u16| -> Result<SocketAddr, ConfigError> {
            parse_addr(option, &flag.or(file).unwrap_or_else(|| format!("0.0.0.0:{port}")))
        };
        let peer_addr = addr("--peer-addr", self.peer_addr, file.peer_addr, DEFAULT_PEER_PORT)?;
        let grpc_addr = addr("--grpc-addr", self.grpc_addr, file.grpc_addr, DEFAULT_GRPC_PORT)?;
        let http_addr = addr("--http-addr", self.http_addr, file.http_addr, DEFAULT_HTTP_PORT)?;
        let advertise_addr = match self.advertise_addr.or(file.advertise_addr) {
            Some(a) => parse_addr("--advertise-addr", &a)?,
            None if peer_addr.ip().is_unspecified() => {
                return Err(invalid(
                    "--advertise-addr",
                    format!(
                        "required when --peer-addr {peer_addr} listens on all interfaces: peers need a dialable address"
                    ),
                ));
            }
            None => peer_addr,
        };
        // The peer port is UDP, so it may share its number with a TCP port; gRPC and HTTP may not.
        if grpc_addr.port() != 0 && grpc_addr.port() == http_addr.port() {
            return Err(invalid("--http-addr", "the gRPC and HTTP ports must differ (both are TCP)"));
        }
        let tls_dir = self.tls_dir.or(file.tls_dir).unwrap_or_else(|| data_dir.join("tls"));
        let node_name = match self.node_name.or(file.node_name) {
            Some(n) => n,
            None => hostname().ok_or_else(|| invalid("--node-name", "not given and the host name is unknown"))?,
        };
        validate_name(&node_name)?;
        let bootstrap = self.bootstrap || file.bootstrap.unwrap_or(false);
        let expect = self.bootstrap_expect.or(file.bootstrap_expect);
        let seeds = if self.join.is_empty() { file.join.unwrap_or_default() } else { self.join };
        let membership = match (bootstrap, expect, seeds.is_empty()) {
            (true, Some(_), _) => return Err(invalid("--bootstrap", "conflicts with --bootstrap-expect")),
            (true, None, false) => return Err(invalid("--bootstrap", "conflicts with --join")),
            (true, None, true) => Membership::Bootstrap { expect: 1 },
            (false, Some(0), _) => return Err(invalid("--bootstrap-expect", "must be at least 1")),
            (false, Some(n), _) if n > 7 => {
                return Err(invalid("--bootstrap-expect", format!("{n} is more voters than the 7 a cluster keeps")));
            }
            (false, Some(n), _) => {
                if n > 1 && seeds.is_empty() {
                    return Err(invalid(
                        "--bootstrap-expect",
                        "needs --join with the other expected members' addresses",
                    ));
                }
                if n == 1 {
                    Membership::Bootstrap { expect: 1 }
                } else {
                    let seeds = seeds.iter().map(|s| parse_addr("--join", s)).collect::<Result<_, _>>()?;
                    Membership::BootstrapExpect { expect: n, seeds }
                }
            }
            (false, None, false) => {
                Membership::Join { seeds: seeds.iter().map(|s| parse_addr("--join", s)).collect::<Result<_, _>>()? }
            }
            (false, None, true) => Membership::Restart,
        };
        let join_timeout_secs = self.join_timeout_secs.or(file.join_timeout_secs).unwrap_or(30);
        if join_timeout_secs == 0 {
            return Err(invalid("--join-timeout-secs", "must be at least 1"));
        }
        let worker_threads = self.worker_threads.or(file.worker_threads);
        if worker_threads == Some(0) {
            return Err(invalid("--worker-threads", "must be at least 1"));
        }
        let serve_queue_limit = self.serve_queue_limit.or(file.serve_queue_limit);
        if serve_queue_limit == Some(0) {
            return Err(invalid("--serve-queue-limit", "must be at least 1"));
        }
        let max_mtu = self.max_mtu.or(file.max_mtu).unwrap_or(quiver_node_agent::transport::DEFAULT_MAX_MTU);
        quiver_node_agent::transport::check_max_mtu(max_mtu).map_err(|reason| invalid("--max-mtu", reason))?;
        let join_token = self.join_token.or(file.join_token);
        if join_token.is_some() && !matches!(membership, Membership::Join { .. }) {
            return Err(invalid("--token", "a join token needs --join SEED (and no --bootstrap)"));
        }
        Ok(AgentConfig {
            join_token,
            worker_threads,
            serve_queue_limit,
            serve_forward_threshold: self.serve_forward_threshold.or(file.serve_forward_threshold),
            data_dir,
            peer_addr,
            advertise_addr,
            grpc_addr,
            http_addr,
            tls_dir,
            node_name,
            membership,
            join_timeout: Duration::from_secs(join_timeout_secs),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            congestion: self.congestion.or(file.congestion).unwrap_or_default(),
            udp_buffer: self.udp_buffer.or(file.udp_buffer).unwrap_or(0),
            job_udp_buffer: self
                .job_udp_buffer
                .or(file.job_udp_buffer)
                .unwrap_or(quiver_node_agent::transport::DEFAULT_JOB_SOCKET_BUFFER),
            max_mtu,
            partition_cache: self
                .partition_cache
                .or(file.partition_cache)
                .unwrap_or(quiver_node_agent::jobs::DEFAULT_PARTITION_CACHE_BYTES),
            fault_injection: self.fault_injection || file.fault_injection.unwrap_or(false),
        })
    }
}

fn read_file(path: &Path, explicit: bool) -> Result<FileConfig, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(FileConfig::default()),
        Err(e) => return Err(ConfigError::File { path: path.to_path_buf(), reason: e.to_string() }),
    };
    toml::from_str(&text).map_err(|e| ConfigError::File { path: path.to_path_buf(), reason: e.to_string() })
}

fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(invalid("--node-name", format!("{name:?} must be 1-63 characters of letters, digits, '-', '_' or '.'")))
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AgentArgs {
        AgentArgs {
            config: Some(PathBuf::from("/nonexistent/quiver.toml")),
            node_name: Some("n1".into()),
            peer_addr: Some("127.0.0.1:7400".into()),
            ..AgentArgs::default()
        }
    }

    fn with_file(text: &str, mut a: AgentArgs) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("quiver.toml");
        std::fs::write(&p, text).unwrap();
        a.config = Some(p);
        a.resolve()
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = args().resolve().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/quiver.toml"), "{err}");
    }

    #[test]
    fn defaults_apply() {
        let c = with_file("", args()).unwrap();
        assert_eq!(c.grpc_addr, "0.0.0.0:7401".parse().unwrap());
        assert_eq!(c.http_addr, "0.0.0.0:7402".parse().unwrap());
        assert_eq!(c.tls_dir, PathBuf::from("quiver-data/tls"));
        assert_eq!(c.membership, Membership::Restart);
        assert_eq!(c.advertise_addr, "127.0.0.1:7400".parse().unwrap());
        assert_eq!(c.udp_buffer, 0, "the kernel's socket buffer unless asked");
        assert_eq!(c.max_mtu, 1452, "quinn's own discovery bound unless asked");
        assert_eq!(c.job_udp_buffer, 4 << 20, "supersteps widen the buffer unless told not to");
    }

    #[test]
    fn max_mtu_is_bounded() {
        assert_eq!(with_file("max_mtu = 6500\n", args()).unwrap().max_mtu, 6500);
        for bad in [1199, 6501, 9000] {
            let err = with_file(&format!("max_mtu = {bad}\n"), args()).unwrap_err().to_string();
            assert!(
                err.contains("--max-mtu") && err.contains(&bad.to_string()) && err.contains("1200..=6500"),
                "{err}"
            );
        }
    }

    #[test]
    fn flags_beat_file() {
        let mut a = args();
        a.grpc_addr = Some("127.0.0.1:9001".into());
        let c = with_file("grpc_addr = \"127.0.0.1:9999\"\nhttp_addr = \":9002\"\n", a).unwrap();
        assert_eq!(c.grpc_addr.port(), 9001);
        assert_eq!(c.http_addr.port(), 9002);
        assert_eq!(with_file("udp_buffer = 4194304\n", args()).unwrap().udp_buffer, 4 << 20);
        assert_eq!(with_file("job_udp_buffer = 0\n", args()).unwrap().job_udp_buffer, 0);
        assert_eq!(c.partition_cache, quiver_node_agent::jobs::DEFAULT_PARTITION_CACHE_BYTES);
        assert_eq!(with_file("partition_cache = 0\n", args()).unwrap().partition_cache, 0);
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let err = with_file("grpc_adr = \"x\"\n", args()).unwrap_err().to_string();
        assert!(err.contains("grpc_adr"), "{err}");
    }

    #[test]
    fn membership_modes() {
        let mut a = args();
        a.join = vec!["127.0.0.1:7500".into()];
        assert_eq!(
            with_file("", a).unwrap().membership,
            Membership::Join { seeds: vec!["127.0.0.1:7500".parse().unwrap()] }
        );
        let mut a = args();
        a.bootstrap = true;
        assert_eq!(with_file("", a).unwrap().membership, Membership::Bootstrap { expect: 1 });
        let mut a = args();
        a.bootstrap_expect = Some(3);
        let err = with_file("", a).unwrap_err().to_string();
        assert!(err.starts_with("--bootstrap-expect"), "{err}");
        let mut a = args();
        a.bootstrap_expect = Some(3);
        a.join = vec!["127.0.0.1:7500".into()];
        assert_eq!(
            with_file("", a).unwrap().membership,
            Membership::BootstrapExpect { expect: 3, seeds: vec!["127.0.0.1:7500".parse().unwrap()] }
        );
    }

    #[test]
    fn bad_values_name_the_option() {
        let mut a = args();
        a.peer_addr = Some("not an addr".into());
        assert!(with_file("", a).unwrap_err().to_string().starts_with("--peer-addr"));
        let mut a = args();
        a.node_name = Some("bad name!".into());
        assert!(with_file("", a).unwrap_err().to_string().starts_with("--node-name"));
        let mut a = args();
        a.peer_addr = Some(":7400".into());
        assert!(with_file("", a).unwrap_err().to_string().starts_with("--advertise-addr"));
    }
}

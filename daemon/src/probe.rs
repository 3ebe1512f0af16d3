//! `quiver health`: asks an agent's HTTP port whether it is live (`/healthz`) or ready
//! (`/readyz`) and exits 0 or 1. It exists for container health checks: the runtime image has no
//! shell, curl or wget, so the binary probes itself. Plain HTTP/1.0 over a std socket, bounded by
//! a timeout; it never touches the agent's state.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

/// `quiver health` flags.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The agent's HTTP address (its --http-addr as seen from here).
    #[arg(long, default_value = "127.0.0.1:7402")]
    pub http_addr: String,
    /// Check `/readyz` (a member of a cluster with a leader) instead of `/healthz` (alive).
    #[arg(long)]
    pub ready: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 2)]
    pub timeout_secs: u64,
}

pub fn run(args: HealthArgs) -> Result<()> {
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let addr: SocketAddr = args
        .http_addr
        .to_socket_addrs()
        .with_context(|| format!("--http-addr {:?} is not an address", args.http_addr))?
        .next()
        .with_context(|| format!("--http-addr {:?} resolves to no address", args.http_addr))?;
    let (code, body) = get(addr, path, timeout).with_context(|| format!("GET http://{addr}{path}"))?;
    if code != 200 {
        bail!("GET http://{addr}{path}: {code} {}", body.trim());
    }
    println!("{}", body.trim());
    Ok(())
}

/// One HTTP/1.0 GET: (status code, body).
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.take(64 * 1024).read_to_string(&mut text)?;
    let code =
        text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("the answer has no HTTP status line")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

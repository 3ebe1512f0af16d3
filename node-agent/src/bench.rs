//! `quiver bench transport`: measures the peer transport on loopback against bare quinn.
//!
//! In one run: a bare quinn baseline (same rustls suite, certificates and quinn tuning; raw
//! `write_chunk` / `read_chunk`, nothing copied) and then the Quiver partition push (typed stream,
//! frame header, zero-copy send, one copy into an aligned buffer on receipt) of the same bytes,
//! with a heartbeat pinging on the same connection throughout; then mutual-TLS connection
//! establishment and the memory of idle connections. Everything runs in this process on 127.0.0.1.

use std::net::SocketAddr;

use std::time::{Duration, Instant};

use bytes::Bytes;
use quiver_compute::Segment;
use quiver_proto::peer::{PartitionMeta, StreamHeader, StreamKind, frame_header};

use crate::transport::{
    CertificateAuthority, Congestion, InboundStream, NodeId, OutFrame, PeerConnection, Transport, TransportConfig,
    TransportError, Validity,
    endpoint::{quinn_configs, size_socket_buffers},
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct TransportBenchOptions {
    /// Bytes pushed in total by each of the two runs (Quiver and baseline). Default 2 GiB.
    pub bytes: u64,
    /// Concurrent bulk streams per connection. Default 1.
    pub streams: u32,
    /// Connections (distinct sending nodes) to one receiver. Default 1.
    pub connections: u32,
    /// Largest frame (one partition) per stream. Default 1 GiB.
    pub frame_bytes: u64,
    /// Heartbeat period during the transfer. Default 5 ms.
    pub heartbeat_every: Duration,
    /// Connections set up to time the handshake. Default 50.
    pub handshakes: u32,
    /// Idle connections opened to measure their memory. Default 100.
    pub idle_connections: u32,
    /// Alternating baseline/Quiver rounds; throughput is the best round of each. Default 3.
    pub rounds: u32,
    /// UDP receive buffer of every endpoint, baseline included ([`TransportConfig::socket_buffer`]).
    /// Default 0: the kernel's.
    pub socket_buffer: usize,
    /// Congestion controller of every connection, baseline included. Default Cubic.
    pub congestion: Congestion,
    /// Path-MTU discovery bound of every connection, baseline included ([`TransportConfig::max_mtu`]).
    pub max_mtu: u16,
}

impl TransportBenchOptions {
    /// The loopback transport settings every endpoint of the run uses.
    fn config(&self) -> TransportConfig {
        TransportConfig {
            socket_buffer: self.socket_buffer,
            congestion: self.congestion,
            max_mtu: self.max_mtu,
            ..TransportConfig::loopback()
        }
    }
}

impl Default for TransportBenchOptions {
    fn default() -> Self {
        Self {
            bytes: 2 << 30,
            streams: 1,
            connections: 1,
            frame_bytes: 1 << 30,
            heartbeat_every: Duration::from_millis(5),
            handshakes: 50,
            idle_connections: 100,
            rounds: 3,
            socket_buffer: 0,
            congestion: Congestion::default(),
            max_mtu: crate::transport::DEFAULT_MAX_MTU,
        }
    }
}

/// What was measured. Field names are the JSON keys.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransportBenchReport {
    pub bytes: u64,
    pub streams: u32,
    pub connections: u32,
    pub frame_bytes: u64,
    pub rounds: u32,
    /// UDP receive buffer asked for on every endpoint (0: the kernel's).
    pub udp_buffer: usize,
    /// `cubic` or `bbr`.
    pub congestion: &'static str,
    /// Path-MTU discovery bound of every connection.
    pub max_mtu: u16,
    /// Best round of the default path (`recv_frame`): every frame lands in freshly allocated memory.
    pub quiver_gbit_per_s: f64,
    /// Best round with the receiver handing each frame's buffer back for the next (`recv_frame_into`).
    pub quiver_reused_gbit_per_s: f64,
    /// Best round.
    pub baseline_gbit_per_s: f64,
    /// quiver / baseline (best rounds).
    pub ratio: f64,
    /// Every round, in order (the machine may be shared: the spread shows how much).
    pub quiver_rounds_gbit_per_s: Vec<f64>,
    pub quiver_reused_rounds_gbit_per_s: Vec<f64>,
    pub baseline_rounds_gbit_per_s: Vec<f64>,
    /// Process CPU time (user + system, both ends) per GiB moved, least over rounds: the cost
    /// that decides throughput when cores are the limit, and much less sensitive to other load.
    pub quiver_cpu_s_per_gib: f64,
    pub quiver_reused_cpu_s_per_gib: f64,
    pub baseline_cpu_s_per_gib: f64,
    pub heartbeat_samples: usize,
    pub heartbeat_rtt_p50_ms: f64,
    pub heartbeat_rtt_p99_ms: f64,
    pub heartbeat_rtt_max_ms: f64,
    /// Connection establishment with mutual TLS (handshake plus the confirming round trip).
    pub handshake_median_ms: f64,
    /// Resident memory per idle connection, both ends counted.
    pub idle_connection_kib: f64,
    /// Peak resident memory added during a Quiver transfer (the receiver's frame buffers and
    /// both ends' QUIC buffers; the sender's data was resident before), largest over rounds.
    pub transfer_peak_extra_mib: f64,
    /// Segment bytes received and verified to equal the sent pattern (sampled).
    pub verified: bool,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("tls: {0}")]
    Tls(#[from] crate::transport::TlsError),
    #[error("benchmark: {0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> BenchError {
    BenchError::Other(e.to_string())
}

const RECEIVER: NodeId = NodeId(1000);

fn gbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// Resident set size and its high-water mark, in bytes (Linux; zeros elsewhere).
fn rss() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else { return (0, 0) };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass; all-zero bytes are a valid `rusage`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn reset_peak_rss() {
    // "5" resets VmHWM to the current RSS (Linux ≥ 4.0); harmless if unsupported.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs the benchmark. Call inside a multi-threaded tokio runtime.
pub async fn transport(opts: &TransportBenchOptions) -> Result<TransportBenchReport, BenchError> {
    let streams = opts.streams.max(1) as u64;
    let conns = opts.connections.max(1) as u64;
    let per_stream = opts.bytes / (streams * conns);
    let frame_bytes = opts.frame_bytes.min(per_stream).max(64) & !63;
    let frames_per_stream = per_stream.div_ceil(frame_bytes).max(1);
    let total = frames_per_stream * frame_bytes * streams * conns;

    let ca = CertificateAuthority::create("bench", Validity::days(1))?;
    let recv_ident = ca.node_identity(RECEIVER, Validity::days(1))?;
    let (receiver, mut handles) = Transport::bind(opts.config(), &recv_ident)?;
    // Nobody acts on connection events here; drain them so the channel never fills.
    let mut events = std::mem::replace(&mut handles.events, tokio::sync::mpsc::channel(1).1);
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let mut senders = Vec::new();
    for i in 0..conns {
        let ident = ca.node_identity(NodeId(i + 1), Validity::days(1))?;
        let (t, _h) = Transport::bind(opts.config(), &ident)?;
        senders.push(t);
    }

    // The data: one frame's worth, referenced by every frame (zero-copy makes that free).
    let source = Segment::<u64>::build((frame_bytes / 8) as usize, |v| {
        v.iter_mut().enumerate().for_each(|(i, x)| *x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    });

    let idle_connection_kib = idle_connections(&ca, &receiver, opts.idle_connections).await?;
    let handshake_median_ms = handshakes(&ca, &receiver, opts.handshakes).await?;

    // One long-lived drain of the receiver's inbound streams; each finished stream reports here.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut inbound = handles.inbound;
    let first_word = source[1];
    tokio::spawn(async move {
        while let Some(s) = inbound.recv().await {
            let done = done_tx.clone();
            tokio::spawn(async move {
                let _ = done.send(drain_partition_stream(s, first_word).await);
            });
        }
    });

    let gib = total as f64 / (1u64 << 30) as f64;
    let (mut q_rounds, mut f_rounds, mut b_rounds, mut rtts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut q_cpu, mut f_cpu, mut b_cpu) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let (mut peak, mut verified) = (0u64, true);
    for _ in 0..opts.rounds.max(1) {
        let cpu = cpu_time();
        let b = baseline(&opts.config(), &ca, &source, conns, streams, frames_per_stream).await?;
        b_cpu = b_cpu.min((cpu_time() - cpu).as_secs_f64() / gib);
        b_rounds.push(gbit(total, b));

        for recycle in [true, false] {
            let cpu = cpu_time();
            let run = quiver_push(
                &receiver,
                &mut done_rx,
                &senders,
                &source,
                streams,
                frames_per_stream,
                opts.heartbeat_every,
                recycle,
            )
            .await?;
            let cpu = (cpu_time() - cpu).as_secs_f64() / gib;
            if recycle {
                q_cpu = q_cpu.min(cpu);
                q_rounds.push(gbit(total, run.elapsed));
            } else {
                f_cpu = f_cpu.min(cpu);
                f_rounds.push(gbit(total, run.elapsed));
            }
            rtts.extend(run.rtts);
            peak = peak.max(run.peak_extra);
            verified &= run.verified;
        }
    }

    for t in senders.iter().chain([&receiver]) {
        t.shutdown().await;
    }
    rtts.sort();
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let quiver_gbit_per_s = best(&f_rounds);
    let baseline_gbit_per_s = best(&b_rounds);
    Ok(TransportBenchReport {
        bytes: total,
        streams: streams as u32,
        connections: conns as u32,
        frame_bytes,
        rounds: q_rounds.len() as u32,
        udp_buffer: opts.socket_buffer,
        max_mtu: opts.max_mtu,
        congestion: match opts.congestion {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
        },
        quiver_gbit_per_s,
        baseline_gbit_per_s,
        ratio: quiver_gbit_per_s / baseline_gbit_per_s,
        quiver_reused_gbit_per_s: best(&q_rounds),
        quiver_rounds_gbit_per_s: f_rounds,
        quiver_reused_rounds_gbit_per_s: q_rounds,
        baseline_rounds_gbit_per_s: b_rounds,
        quiver_cpu_s_per_gib: f_cpu,
        quiver_reused_cpu_s_per_gib: q_cpu,
        baseline_cpu_s_per_gib: b_cpu,
        heartbeat_samples: rtts.len(),
        heartbeat_rtt_p50_ms: percentile(&rtts, 0.5),
        heartbeat_rtt_p99_ms: percentile(&rtts, 0.99),
        heartbeat_rtt_max_ms: rtts.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        handshake_median_ms,
        idle_connection_kib,
        transfer_peak_extra_mib: peak as f64 / (1 << 20) as f64,
        verified,
    })
}

/// Receives every frame of one partition stream, spot-checks it, and drops it.
/// Streams whose header carries this request id hand each frame's buffer back for the next one.
const RECYCLE: u64 = 1;

async fn drain_partition_stream(mut s: InboundStream, first_word: u64) -> Result<(u64, bool), BenchError> {
    let recycle = s.header.request_id == RECYCLE;
    let mut ok = true;
    let mut bytes = 0u64;
    let mut spare = None;
    while let Some(f) = s.recv.recv_frame_into(spare.take()).await.map_err(other)? {
        {
            let seg = f.segment::<u64>(0).map_err(other)?;
            ok &= seg.get(1) == Some(&first_word)
                && f.stats.bytes_copied == f.payload_len()
                && (f.stats.buffers == 1 || f.stats.reused);
        }
        bytes += f.payload_len();
        if recycle {
            spare = f.reclaim();
        } else {
            // Unmapping a GiB takes a while; keep it off the async workers, as compute would.
            tokio::task::spawn_blocking(move || drop(f));
        }
    }
    tokio::task::spawn_blocking(move || drop(spare));
    Ok((bytes, ok))
}

struct PushRun {
    elapsed: Duration,
    rtts: Vec<Duration>,
    peak_extra: u64,
    verified: bool,
}

async fn quiver_push(
    receiver: &Transport,
    done: &mut tokio::sync::mpsc::UnboundedReceiver<Result<(u64, bool), BenchError>>,
    senders: &[Transport],
    source: &Segment<u64>,
    streams: u64,
    frames_per_stream: u64,
    heartbeat_every: Duration,
    recycle: bool,
) -> Result<PushRun, BenchError> {
    let mut conns: Vec<PeerConnection> = Vec::new();
    for s in senders {
        conns.push(s.connect(RECEIVER, receiver.local_addr()).await?);
    }
    let expected_streams = conns.len() as u64 * streams;

    // Heartbeats on the first connection for the whole transfer.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut hb = conns[0].heartbeat().await?;
    let hb_task = tokio::spawn(async move {
        let mut rtts = Vec::new();
        let mut tick = tokio::time::interval(heartbeat_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => break,
            }
            match hb.ping().await {
                Ok(rtt) => rtts.push(rtt),
                Err(_) => break,
            }
        }
        rtts
    });

    let (rss_before, _) = rss();
    reset_peak_rss();
    let start = Instant::now();
    let mut send_tasks = Vec::new();
    for c in &conns {
        for s in 0..streams {
            let c = c.clone();
            let source = source.clone();
            send_tasks.push(tokio::spawn(async move {
                let header = StreamHeader {
                    kind: StreamKind::PartitionPush as i32,
                    job_id: 1,
                    partition: s as u32,
                    request_id: if recycle { RECYCLE } else { 0 },
                    ..Default::default()
                };
                let mut push = c.open_uni(header).await?;
                for i in 0..frames_per_stream {
                    let meta = PartitionMeta { partition: s as u32, first_vertex: i, ..Default::default() };
                    let mut frame = OutFrame::new(Some(frame_header::Meta::Partition(meta)));
                    frame.push("values", &source).set_last(i + 1 == frames_per_stream);
                    push.send_frame(&frame).await?;
                }
                push.finish()?;
                let _ = push.stopped().await;
                Ok::<_, TransportError>(())
            }));
        }
    }
    for t in send_tasks {
        t.await.map_err(other)??;
    }
    let mut verified = true;
    for _ in 0..expected_streams {
        let (_, ok) = done.recv().await.ok_or_else(|| other("receiver stopped"))??;
        verified &= ok;
    }
    let elapsed = start.elapsed();
    let (_, peak) = rss();
    stop_tx.send_replace(true);
    let rtts = hb_task.await.map_err(other)?;
    Ok(PushRun { elapsed, rtts, peak_extra: peak.saturating_sub(rss_before), verified })
}

/// A UDP socket for a baseline endpoint, bound and sized as [`Transport::bind`] does it.
fn bind_socket(cfg: &TransportConfig) -> Result<std::net::UdpSocket, BenchError> {
    let socket = std::net::UdpSocket::bind(cfg.bind).map_err(other)?;
    size_socket_buffers(&socket, cfg.socket_buffer, false);
    Ok(socket)
}

/// Bare quinn: same certificates, rustls suite and quinn tuning; raw chunks, nothing copied.
async fn baseline(
    cfg: &TransportConfig,
    ca: &CertificateAuthority,
    source: &Segment<u64>,
    conns: u64,
    streams: u64,
    frames_per_stream: u64,
) -> Result<Duration, BenchError> {
    let server_ident = ca.node_identity(NodeId(2000), Validity::days(1))?;
    let (server_cfg, _) = quinn_configs(cfg, &server_ident)?;
    let server = quinn::Endpoint::new(
        cfg.quinn_endpoint(),
        Some(server_cfg),
        bind_socket(cfg)?,
        quinn::default_runtime().ok_or_else(|| other("no runtime"))?,
    )
    .map_err(other)?;
    let server_addr = server.local_addr().map_err(other)?;
    // One task per connection: a connection waiting for its streams must not hold up the next handshake.
    let accept = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let conn = server.accept().await.ok_or_else(|| other("endpoint closed"))?.await.map_err(other)?;
            tasks.push(tokio::spawn(async move {
                let mut drains = Vec::new();
                for _ in 0..streams {
                    let mut recv = conn.accept_uni().await.map_err(other)?;
                    drains.push(tokio::spawn(async move {
                        let mut n = 0u64;
                        while let Some(c) = recv.read_chunk(usize::MAX, true).await.map_err(other)? {
                            n += c.bytes.len() as u64;
                        }
                        Ok::<_, BenchError>(n)
                    }));
                }
                let mut n = 0;
                for d in drains {
                    n += d.await.map_err(other)??;
                }
                Ok::<_, BenchError>(n)
            }));
        }
        Ok::<_, BenchError>(tasks)
    });

    let mut clients = Vec::new();
    for i in 0..conns {
        let ident = ca.node_identity(NodeId(2001 + i), Validity::days(1))?;
        let (_, client_cfg) = quinn_configs(cfg, &ident)?;
        let ep = quinn::Endpoint::new(
            cfg.quinn_endpoint(),
            None,
            bind_socket(cfg)?,
            quinn::default_runtime().ok_or_else(|| other("no runtime"))?,
        )
        .map_err(other)?;
        let conn = ep.connect_with(client_cfg, server_addr, "node-2000.quiver").map_err(other)?.await.map_err(other)?;
        clients.push((ep, conn));
    }

    let chunk = Bytes::from_owner(BaselineOwner(source.clone()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (_, conn) in &clients {
        for _ in 0..streams {
            let conn = conn.clone();
            let chunk = chunk.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = conn.open_uni().await.map_err(other)?;
                for _ in 0..frames_per_stream {
                    s.write_chunk(chunk.clone()).await.map_err(other)?;
                }
                s.finish().map_err(other)?;
                let _ = s.stopped().await;
                Ok::<_, BenchError>(())
            }));
        }
    }
    for t in tasks {
        t.await.map_err(other)??;
    }
    let elapsed = start.elapsed();
    for (ep, conn) in &clients {
        conn.close(0u32.into(), b"done");
        ep.close(0u32.into(), b"done");
    }
    for t in accept.await.map_err(other)?? {
        t.await.map_err(other)??;
    }
    Ok(elapsed)
}

struct BaselineOwner(Segment<u64>);

impl AsRef<[u8]> for BaselineOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Median time to establish a mutually authenticated connection (handshake + confirmation).
async fn handshakes(ca: &CertificateAuthority, receiver: &Transport, n: u32) -> Result<f64, BenchError> {
    let ident = ca.node_identity(NodeId(5000), Validity::days(1))?;
    let (client, _h) = Transport::bind(TransportConfig::loopback(), &ident)?;
    let mut times = Vec::new();
    for _ in 0..n.max(1) + 1 {
        let start = Instant::now();
        let c = client.connect(RECEIVER, receiver.local_addr()).await?;
        times.push(start.elapsed());
        client.remove_peer(RECEIVER);
        c.close(crate::transport::ErrorCode::Shutdown, "bench");
    }
    times.remove(0); // warm-up
    times.sort();
    client.shutdown().await;
    Ok(percentile(&times, 0.5))
}

/// Resident memory per idle connection: `n` authenticated connections from one client endpoint.
async fn idle_connections(ca: &CertificateAuthority, receiver: &Transport, n: u32) -> Result<f64, BenchError> {
    let cfg = TransportConfig::loopback();
    let mut client_cfgs = Vec::new();
    for i in 0..n {
        let ident = ca.node_identity(NodeId(10_000 + i as u64), Validity::days(1))?;
        client_cfgs.push(quinn_configs(&cfg, &ident)?.1);
    }
    let ep = quinn::Endpoint::new(
        cfg.quinn_endpoint(),
        None,
        std::net::UdpSocket::bind(cfg.bind).map_err(other)?,
        quinn::default_runtime().ok_or_else(|| other("no runtime"))?,
    )
    .map_err(other)?;
    let addr: SocketAddr = receiver.local_addr();
    let before_peers = receiver.connected_peers().len();
    let (rss_before, _) = rss();
    let mut conns = Vec::new();
    for c in client_cfgs.drain(..) {
        let conn = ep.connect_with(c, addr, "node-1000.quiver").map_err(other)?.await.map_err(other)?;
        conns.push(conn);
    }
    // Wait (bounded) until the receiver has installed all of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.connected_peers().len() < before_peers + n as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (rss_after, _) = rss();
    let per = rss_after.saturating_sub(rss_before) as f64 / n.max(1) as f64 / 1024.0;
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    ep.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
    Ok(per)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small run with every knob away from its default still moves and checks the bytes, and
    /// says which settings it measured.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_run_with_a_larger_buffer_bbr_and_jumbo_datagrams_verifies_its_bytes() {
        let opts = TransportBenchOptions {
            bytes: 8 << 20,
            connections: 2,
            frame_bytes: 2 << 20,
            handshakes: 2,
            idle_connections: 2,
            rounds: 1,
            socket_buffer: 1 << 20,
            congestion: Congestion::Bbr,
            max_mtu: 6500,
            ..TransportBenchOptions::default()
        };
        let report =
            tokio::time::timeout(Duration::from_secs(120), transport(&opts)).await.expect("bench finished").unwrap();
        assert!(report.verified);
        assert_eq!((report.udp_buffer, report.congestion, report.max_mtu), (1 << 20, "bbr", 6500));
        assert_eq!(report.bytes, 8 << 20);
        assert!(report.quiver_gbit_per_s > 0.0 && report.baseline_gbit_per_s > 0.0);
    }
}

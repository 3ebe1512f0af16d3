//! Every transport setting in one struct, with its default and the reason for it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, VarInt};

use super::codec::Limits;

/// Default UDP port of the peer endpoint.
pub const DEFAULT_PEER_PORT: u16 = 7400;

/// Transport settings. `Default` gives the documented values; the daemon fills this from its config.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Local UDP address. Default `0.0.0.0:7400`.
    pub bind: SocketAddr,
    /// Per-stream receive window: how much one stream may have in flight before the receiver reads.
    /// Default 4 MiB (quinn: 1.25 MB, sized for 100 Mbit/s × 100 ms). Bulk throughput on one stream
    /// is bounded by window / RTT; 4 MiB keeps a 10 Gbit/s link busy up to ~3 ms RTT (a data
    /// centre), and a sender holds at most this much of a stream unacknowledged. It was 16 MiB;
    /// 4 MiB moved partitions as fast on loopback and took ~25 MiB off an APPNP owner's peak (its
    /// halo pieces wait in quinn's buffers until acknowledged). Kept below `send_window` so one
    /// bulk stream can never use all of it and control traffic always has room.
    pub stream_receive_window: u32,
    /// Per-connection receive window across all streams. Default 64 MiB (quinn: unlimited). With the
    /// stream window this bounds the memory a peer can make us buffer for one connection.
    pub receive_window: u64,
    /// Per-connection send window: unacknowledged data we hold for a peer. Default 64 MiB
    /// (quinn: 8 × stream window). Bounds send-side buffering; writers wait (back-pressure) beyond it.
    pub send_window: u64,
    /// Concurrent bidirectional streams a peer may open. Default 256 (control, heartbeat, serving).
    pub max_concurrent_bidi_streams: u32,
    /// Concurrent unidirectional streams a peer may open. Default 256 (raft batches, partitions, halos).
    pub max_concurrent_uni_streams: u32,
    /// QUIC keep-alive for idle connections. Default 2 s.
    pub keep_alive_interval: Duration,
    /// A connection silent this long is dead. Default 10 s.
    pub idle_timeout: Duration,
    /// Give up on a handshake after this long. Default 5 s.
    pub handshake_timeout: Duration,
    /// How long an existing connection has to answer a heartbeat when a newer connection from the
    /// same peer would otherwise be refused as a duplicate. Default 100 ms (at least 4 × its RTT is
    /// always allowed). A peer that was killed and restarted leaves a connection behind that looks
    /// alive until `idle_timeout`; failing this probe retires it at once so the restarted peer is
    /// reachable within about this long, not after the idle timeout.
    pub liveness_probe_timeout: Duration,
    /// A stream whose header has not arrived after this long is stopped. Default 10 s.
    pub stream_header_timeout: Duration,
    /// Initial UDP payload size. Default 1200 (quinn's); quinn's path MTU discovery raises it.
    /// Above 1472 also raise `max_udp_payload_size`, or the handshake hangs (DESIGN.md).
    pub initial_mtu: u16,
    /// Largest UDP payload we accept. Default 1472 (a 1500-byte Ethernet MTU).
    pub max_udp_payload_size: u16,
    /// Largest UDP payload quinn's path-MTU discovery probes for ([`MTU_PROBE_LIMITS`]). Default
    /// 1452, quinn's own: right for Ethernet, where larger probes are lost and discovery stays put.
    /// On loopback or jumbo-frame links a larger bound lets discovery climb, and each datagram
    /// then carries several times the data for the same per-packet work: 6,500 moved a 1 GiB
    /// frame at 8.8–11.8 Gbit/s against 4.2–5.4 (half the CPU per GiB, benches/RESULTS.md,
    /// 2026-12-07 night). `quiver agent --max-mtu` sets it; the endpoint accepts datagrams this large.
    pub max_mtu: u16,
    /// UDP segmentation offload. Default on: throughput falls about 3× without it.
    pub segmentation_offload: bool,
    /// Kernel receive buffer asked for on the endpoint's UDP socket. Default 0: the kernel's
    /// (208 KiB on Linux). A burst larger than the buffer is dropped by the kernel before quinn
    /// sees it: three agents sharing two cores dropped ~1,000 packets per scale-20 PageRank job
    /// as their halos converged, and the losses stalled each exchange in QUIC recovery (4 MiB: no
    /// drops, supersteps 0.038 → 0.027 s). But Cubic fills whatever buffer there is: during a
    /// 1 GiB transfer a 1–4 MiB buffer held a standing queue that raised heartbeat RTT p99 from
    /// ~4 to ~10 ms and cost ~10 % of throughput on loopback (benches/RESULTS.md, 2026-12-04),
    /// so the default stays the kernel's and `quiver agent --udp-buffer` sets it. Linux caps it
    /// at `net.core.rmem_max` unless the process may force it (`CAP_NET_ADMIN`); the endpoint
    /// warns when it got less than asked.
    pub socket_buffer: usize,
    /// Receive buffer the socket is widened to while this node runs a job's supersteps
    /// ([`super::Transport::widen_receive_buffer`]), back to `socket_buffer` when the last ends.
    /// Default 4 MiB. A superstep's halos from every reader's peers land at once, while the
    /// node's cores are busy with the kernel: with the kernel's 208 KiB, three agents on two
    /// cores dropped 500–900 datagrams per PageRank job and each loss cost a QUIC recovery and a
    /// Cubic back-off. Outside supersteps the smaller buffer keeps heartbeats from queueing behind
    /// bulk transfers (see `socket_buffer`). 0 never widens.
    pub job_socket_buffer: usize,
    /// Reconnect backoff: first delay. Default 100 ms.
    pub reconnect_base: Duration,
    /// Reconnect backoff: largest delay. Default 5 s.
    pub reconnect_max: Duration,
    /// How often each connection reports its RTT as an event. Default 1 s.
    pub rtt_report_interval: Duration,
    /// Bounds on peer-supplied lengths and counts.
    pub limits: Limits,
    /// Frame payload bytes one connection may have allocated but not yet fully received, summed
    /// over its streams. Default 4 GiB. A receiver waits (the sender sees flow control) beyond it.
    pub max_receiving_bytes_per_connection: u64,
    /// Capacity of the inbound-stream and event channels. Default 1024.
    pub channel_capacity: usize,
    /// Congestion controller of every peer connection. Default [`Congestion::Cubic`].
    pub congestion: Congestion,
    /// Fault injection for the chaos drills (`quiver agent --fault-injection`). Default `None`:
    /// the endpoint uses quinn's own socket, untouched. `Some` wraps it in
    /// [`super::fault::FaultySocket`], steered through this handle.
    pub faults: Option<super::fault::NetFaults>,
}

/// How a connection paces its sending.
///
/// Cubic (quinn's default) reads every lost packet as congestion and halves its window, so on
/// a link that merely drops packets at random (a flaky NIC, a lossy overlay, the chaos drills'
/// 10% loss) a connection crawls at a few packets per round trip. BBR paces by the measured
/// bottleneck bandwidth and round trip instead, so random loss costs only the retransmissions.
/// Measured here (2026-11-29): under 10% loss and 20 ms delay a scale-16 PageRank job of 50
/// supersteps took 35 s with BBR and 96 s with Cubic; on clean loopback quinn's BBR moved a
/// partition at 0.37× Cubic's rate with heartbeat p99 25 ms. Hence Cubic by default and BBR
/// for links known to be lossy (`quiver agent --congestion bbr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Congestion {
    #[default]
    Cubic,
    Bbr,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PEER_PORT)),
            stream_receive_window: 4 << 20,
            receive_window: 64 << 20,
            send_window: 64 << 20,
            max_concurrent_bidi_streams: 256,
            max_concurrent_uni_streams: 256,
            keep_alive_interval: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            liveness_probe_timeout: Duration::from_millis(100),
            stream_header_timeout: Duration::from_secs(10),
            initial_mtu: 1200,
            max_udp_payload_size: 1472,
            max_mtu: DEFAULT_MAX_MTU,
            segmentation_offload: true,
            socket_buffer: 0,
            job_socket_buffer: DEFAULT_JOB_SOCKET_BUFFER,
            reconnect_base: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            rtt_report_interval: Duration::from_secs(1),
            limits: Limits::default(),
            max_receiving_bytes_per_connection: 4 << 30,
            channel_capacity: 1024,
            congestion: Congestion::default(),
            faults: None,
        }
    }
}

impl TransportConfig {
    /// Defaults bound to `127.0.0.1` on an ephemeral port (tests, benchmarks).
    pub fn loopback() -> Self {
        Self { bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), ..Self::default() }
    }

    /// The quinn transport parameters these settings imply.
    pub fn quinn_transport(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u64(self.receive_window).unwrap_or(VarInt::MAX))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_uni_streams))
            .keep_alive_interval(Some(self.keep_alive_interval))
            .max_idle_timeout(Some(IdleTimeout::try_from(self.idle_timeout).unwrap_or(IdleTimeout::from(VarInt::MAX))))
            .initial_mtu(self.initial_mtu)
            .mtu_discovery_config(Some({
                let mut d = quinn::MtuDiscoveryConfig::default();
                d.upper_bound(self.max_mtu);
                d
            }))
            .enable_segmentation_offload(self.segmentation_offload);
        match self.congestion {
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
        };
        Arc::new(t)
    }

    /// The quinn endpoint parameters these settings imply.
    pub fn quinn_endpoint(&self) -> quinn::EndpointConfig {
        let mut e = quinn::EndpointConfig::default();
        // Only fails below 1200, which QUIC forbids anyway; fall back to quinn's default then.
        let _ = e.max_udp_payload_size(self.max_udp_payload_size.max(self.initial_mtu).max(self.max_mtu));
        e
    }

    /// Why these settings cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        check_max_mtu(self.max_mtu)
    }
}

/// Why `max_mtu` cannot be a path-MTU discovery bound ([`MTU_PROBE_LIMITS`]), if it cannot.
pub fn check_max_mtu(max_mtu: u16) -> Result<(), String> {
    if MTU_PROBE_LIMITS.contains(&max_mtu) {
        return Ok(());
    }
    Err(format!(
        "max MTU {max_mtu} is outside {}..={}: QUIC needs 1200-byte datagrams, and quinn sends up to 10 \
         datagrams in one segmentation-offload call, which Linux refuses above 64 KiB in all",
        MTU_PROBE_LIMITS.start(),
        MTU_PROBE_LIMITS.end()
    ))
}

/// quinn's own upper bound for path-MTU discovery (a 1500-byte Ethernet MTU less IP and UDP headers).
pub const DEFAULT_MAX_MTU: u16 = 1452;

/// [`TransportConfig::job_socket_buffer`]'s default: 4 MiB.
pub const DEFAULT_JOB_SOCKET_BUFFER: usize = 4 << 20;

/// The bounds [`TransportConfig::max_mtu`] may take. Below, QUIC's minimum datagram; above, ten
/// datagrams (quinn's segmentation-offload batch) would exceed the 65,507-byte UDP limit and
/// every batch would fail to send (the connection stalls without an error).
pub const MTU_PROBE_LIMITS: std::ops::RangeInclusive<u16> = 1200..=6500;

//! `quiver bench transport`: Quiver partition push vs bare quinn on loopback, heartbeat RTT
//! during the transfer, mutual-TLS handshake time, idle-connection memory. The measuring code is
//! `quiver_node_agent::bench::transport`; this module parses flags and prints.

use std::time::Duration;

use anyhow::Context;
use quiver_node_agent::bench::{TransportBenchOptions, TransportBenchReport, transport};

/// Flags of `quiver bench transport`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes pushed by each run (Quiver and the bare-quinn baseline).
    #[arg(long, default_value_t = 2 << 30)]
    pub bytes: u64,
    /// Concurrent bulk streams per connection.
    #[arg(long, default_value_t = 1)]
    pub streams: u32,
    /// Connections (sending nodes) to the one receiver.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Largest frame (one partition) per stream, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    pub frame_bytes: u64,
    /// Heartbeat period during the transfer, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_ms: u64,
    /// UDP receive buffer of every endpoint (baseline included), in bytes, as `quiver agent
    /// --udp-buffer` (default: the kernel's).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub udp_buffer: usize,
    /// Congestion controller of every connection (baseline included), as `quiver agent --congestion`.
    #[arg(long, value_enum, default_value_t)]
    pub congestion: crate::config::CongestionControl,
    /// Path-MTU discovery bound of every connection (baseline included), as `quiver agent --max-mtu`.
    #[arg(long, value_name = "BYTES", default_value_t = quiver_node_agent::transport::DEFAULT_MAX_MTU)]
    pub max_mtu: u16,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints the result.
pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = TransportBenchOptions {
        bytes: args.bytes,
        streams: args.streams,
        connections: args.connections,
        frame_bytes: args.frame_bytes,
        heartbeat_every: Duration::from_millis(args.heartbeat_ms.max(1)),
        socket_buffer: args.udp_buffer,
        congestion: args.congestion.into(),
        max_mtu: args.max_mtu,
        ..TransportBenchOptions::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    let report = rt.block_on(transport(&opts)).context("transport benchmark")?;
    print_human(&report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn print_human(r: &TransportBenchReport) {
    println!(
        "transport: {:.2} GiB over {} connection(s) × {} stream(s), frames of {} MiB, loopback, {}, UDP receive buffer {}, MTU discovery up to {} bytes",
        r.bytes as f64 / (1u64 << 30) as f64,
        r.connections,
        r.streams,
        r.frame_bytes >> 20,
        r.congestion,
        if r.udp_buffer == 0 { "the kernel's".to_string() } else { format!("{} KiB", r.udp_buffer >> 10) },
        r.max_mtu
    );
    println!(
        "  quiver partition push  {:>7.2} Gbit/s   {:.2} s CPU/GiB  (each frame in new memory)",
        r.quiver_gbit_per_s, r.quiver_cpu_s_per_gib
    );
    println!(
        "  quiver, buffers reused {:>7.2} Gbit/s   {:.2} s CPU/GiB  (recv_frame_into)",
        r.quiver_reused_gbit_per_s, r.quiver_reused_cpu_s_per_gib
    );
    println!(
        "  bare quinn baseline    {:>7.2} Gbit/s   {:.2} s CPU/GiB  (quiver/baseline = {:.1}%)",
        r.baseline_gbit_per_s,
        r.baseline_cpu_s_per_gib,
        r.ratio * 100.0
    );
    println!(
        "  heartbeat RTT during transfer: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} samples)",
        r.heartbeat_rtt_p50_ms, r.heartbeat_rtt_p99_ms, r.heartbeat_rtt_max_ms, r.heartbeat_samples
    );
    println!("  mutual-TLS connection setup median {:.3} ms", r.handshake_median_ms);
    println!("  idle connection {:.0} KiB (both ends)", r.idle_connection_kib);
    println!(
        "  peak extra memory during transfer {:.0} MiB; payload verified: {}",
        r.transfer_peak_extra_mib, r.verified
    );
}

//! # quiver-node-agent — transport, worker pools and job execution
//!
//! What runs on every host besides the control plane. So far: the QUIC peer [`transport`] —
//! one mutually authenticated connection per peer pair, typed streams with priorities, and
//! zero-copy partition and halo frames whose arrays go from a [`quiver_compute::Segment`] on one
//! node to a `Segment` on another with no serialisation and exactly one copy.
//!
//! What it is not: it does not decide anything about the cluster (that is the coordinator) and
//! does not own the event loop (that is the daemon). It depends on `quiver-compute` and
//! `quiver-proto` only.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use quiver_node_agent::transport::*;
//! use quiver_compute::Segment;
//! let ca = CertificateAuthority::create("cluster", Validity::days(365))?;
//! let (a, _a_handles) = Transport::bind(TransportConfig::loopback(), &ca.node_identity(NodeId(1), Validity::days(30))?)?;
//! let (b, mut b_handles) = Transport::bind(TransportConfig::loopback(), &ca.node_identity(NodeId(2), Validity::days(30))?)?;
//! let conn = a.connect(NodeId(2), b.local_addr()).await?;
//! let mut push = conn.open_uni(StreamHeader { kind: StreamKind::PartitionPush as i32, job_id: 7, ..Default::default() }).await?;
//! let mut frame = OutFrame::new(None);
//! frame.push("ranks", &Segment::from_slice(&[0.25f32; 4]));
//! push.send_frame(&frame).await?;
//! push.finish()?;
//! let mut inbound = b_handles.inbound.recv().await.unwrap();
//! let got = inbound.recv.recv_frame().await?.unwrap();
//! assert_eq!(&*got.segment::<f32>(0)?, &[0.25; 4]);
//! # Ok(()) }
//! ```
//!
//! ## Fuzzing
//!
//! Every decoder of peer bytes has a `cargo fuzz` target in `node-agent/fuzz/` (its own
//! workspace, excluded from the main one):
//!
//! ```text
//! cd node-agent/fuzz && cargo +nightly fuzz run frame_header -- -max_total_time=60
//! cd node-agent/fuzz && cargo +nightly fuzz run stream_header -- -max_total_time=60
//! ```

pub mod bench;
pub mod failpoints;
pub mod jobs;
pub mod transport;
pub mod workers;

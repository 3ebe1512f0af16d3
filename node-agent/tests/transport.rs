//! Transport tests on loopback: mutual TLS, dedup, reconnect, typed streams, zero-copy frames,
//! bad input. Every wait has a deadline; nothing sleeps for a fixed time.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use quiver_compute::buf::Storage;
use quiver_compute::{SEGMENT_ALIGN, Segment};
use quiver_node_agent::transport::*;
use quiver_proto::peer::{ControlRequest, ControlResponse, Ping, Pong, control_request, control_response};

const DEADLINE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn ca() -> CertificateAuthority {
    CertificateAuthority::create("test cluster", Validity::days(1)).unwrap()
}

fn node(ca: &CertificateAuthority, id: u64) -> (Transport, TransportHandles) {
    Transport::bind(TransportConfig::loopback(), &ca.node_identity(NodeId(id), Validity::days(1)).unwrap()).unwrap()
}

async fn wait_event(h: &mut TransportHandles, pred: impl Fn(&PeerEvent) -> bool) -> PeerEvent {
    within("peer event", async {
        loop {
            let e = h.events.recv().await.expect("event channel open");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
}

fn header(kind: StreamKind) -> StreamHeader {
    StreamHeader { kind: kind as i32, job_id: 9, epoch: 3, ..Default::default() }
}

/// Captures log output of everything running on the current thread (use with current-thread tests).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        let sub = tracing_subscriber::fmt().with_ansi(false).with_writer(move || me.clone()).finish();
        tracing::subscriber::set_default(sub)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn mutual_tls_connects_and_reports_up_with_the_peer_id() {
    let ca = ca();
    let (a, mut ah) = node(&ca, 1);
    let (b, mut bh) = node(&ca, 2);
    let c = within("connect", a.connect(NodeId(2), b.local_addr())).await.unwrap();
    assert_eq!(c.peer(), NodeId(2));
    wait_event(&mut ah, |e| matches!(e, PeerEvent::Up { peer: NodeId(2), .. })).await;
    wait_event(&mut bh, |e| matches!(e, PeerEvent::Up { peer: NodeId(1), initiator: NodeId(1), .. })).await;
    assert_eq!(b.connected_peers(), vec![NodeId(1)]);

    // A control request/response on a bidirectional stream.
    let server = tokio::spawn(async move {
        let mut s = bh.inbound.recv().await.unwrap();
        assert_eq!((s.peer, s.kind, s.header.job_id, s.header.epoch), (NodeId(1), StreamKind::Control, 9, 3));
        let req: ControlRequest = s.recv.recv_message().await.unwrap().unwrap();
        let mut send = s.send.take().unwrap();
        let pong = ControlResponse {
            request_id: req.request_id,
            body: Some(control_response::Body::Pong(Pong { node_id: 2, version: "t".into() })),
        };
        send.send_message(&pong).await.unwrap();
        send.finish().unwrap();
        bh
    });
    let (mut send, mut recv) = c.open_bi(header(StreamKind::Control)).await.unwrap();
    send.send_message(&ControlRequest { request_id: 5, body: Some(control_request::Body::Ping(Ping {})) })
        .await
        .unwrap();
    let resp: ControlResponse = within("control response", recv.recv_message()).await.unwrap().unwrap();
    assert_eq!(resp.request_id, 5);
    assert!(matches!(resp.body, Some(control_response::Body::Pong(Pong { node_id: 2, .. }))));
    within("server", server).await.unwrap();

    // Heartbeats are answered by the peer's transport itself.
    let mut hb = c.heartbeat().await.unwrap();
    for _ in 0..3 {
        let rtt = within("heartbeat", hb.ping()).await.unwrap();
        assert!(rtt < DEADLINE);
    }
    a.shutdown().await;
    b.shutdown().await;
}

async fn expect_refused(client: &Transport, peer: u64, addr: SocketAddr) {
    let r = within("refused dial", client.connect(NodeId(peer), addr)).await;
    assert!(r.is_err(), "dial to {peer} should have been refused");
}

#[tokio::test(flavor = "current_thread")]
async fn untrusted_expired_and_wrong_identity_certificates_are_refused() {
    let logs = Logs::default();
    let _guard = logs.install();
    let ca = ca();
    let (server, _sh) = node(&ca, 2);
    let addr = server.local_addr();

    // Signed by another CA.
    let rogue = CertificateAuthority::create("rogue", Validity::days(1)).unwrap();
    let (evil, _eh) = node(&rogue, 1);
    expect_refused(&evil, 2, addr).await;

    // Expired certificate from the right CA.
    let past = Validity {
        not_before: SystemTime::now() - Duration::from_secs(10 * 86_400),
        not_after: SystemTime::now() - Duration::from_secs(86_400),
    };
    let (old, _oh) = Transport::bind(TransportConfig::loopback(), &ca.node_identity(NodeId(3), past).unwrap()).unwrap();
    expect_refused(&old, 2, addr).await;

    // Dialling node 2 but reaching a node whose certificate says 4: refused by the name check.
    let (four, _fh) = node(&ca, 4);
    let (honest, _hh) = node(&ca, 5);
    expect_refused(&honest, 2, four.local_addr()).await;

    // A client (operator) certificate is not a node identity.
    let client = ca.sign_client("operator", Validity::days(1)).unwrap();
    let ident = NodeIdentity {
        node_id: NodeId(6),
        cert_chain: vec![client.cert_der.clone()],
        key: Arc::new(client.key_der().unwrap()),
        roots: vec![ca.cert_der().clone()],
    };
    let (op, _oh2) = Transport::bind(TransportConfig::loopback(), &ident).unwrap();
    expect_refused(&op, 2, addr).await;

    assert!(server.connected_peers().is_empty());
    let text = logs.text();
    assert!(text.contains("refused peer client certificate: not valid for the cluster CA"), "{text}");
    assert!(text.contains("refused peer client certificate: wrong identity"), "{text}");
    assert!(text.contains("refused peer server certificate"), "{text}");
    assert!(text.contains("refused peer handshake"), "{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn wrong_alpn_is_refused_at_the_handshake() {
    let logs = Logs::default();
    let _guard = logs.install();
    let ca = ca();
    let (server, _sh) = node(&ca, 2);
    let ident = ca.node_identity(NodeId(1), Validity::days(1)).unwrap();
    let mut crypto = ident.client_config().unwrap();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    let client_cfg =
        quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap()));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let r = within("alpn dial", ep.connect_with(client_cfg, server.local_addr(), "node-2.quiver").unwrap()).await;
    assert!(r.is_err());
    within("server log", async {
        while !logs.text().contains("refused peer handshake") {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn simultaneous_dials_converge_on_the_lower_ids_connection() {
    let ca = ca();
    let (a, mut ah) = node(&ca, 1);
    let (b, mut bh) = node(&ca, 2);
    let (ra, rb) = tokio::join!(a.connect(NodeId(2), b.local_addr()), b.connect(NodeId(1), a.local_addr()));
    ra.unwrap();
    rb.unwrap();
    wait_event(&mut ah, |e| matches!(e, PeerEvent::Up { initiator: NodeId(1), .. })).await;
    wait_event(&mut bh, |e| matches!(e, PeerEvent::Up { initiator: NodeId(1), .. })).await;
    let (ca_, cb) = (a.peer(NodeId(2)).unwrap(), b.peer(NodeId(1)).unwrap());
    assert_eq!(ca_.initiator(), NodeId(1));
    assert_eq!(cb.initiator(), NodeId(1));
    // Both ends really hold the same connection: a stream opened on one arrives on the other.
    let mut s = ca_.open_uni(header(StreamKind::RaftBatch)).await.unwrap();
    s.finish().unwrap();
    let got = within("inbound", bh.inbound.recv()).await.unwrap();
    assert_eq!(got.kind, StreamKind::RaftBatch);
}

#[tokio::test]
async fn wanted_peers_are_redialled_after_they_restart() {
    let ca = ca();
    let (a, mut ah) = node(&ca, 1);
    let (b, _bh) = node(&ca, 2);
    let b_addr = b.local_addr();
    a.add_peer(NodeId(2), b_addr);
    wait_event(&mut ah, |e| matches!(e, PeerEvent::Up { peer: NodeId(2), .. })).await;
    b.shutdown().await;
    drop(b);
    wait_event(&mut ah, |e| matches!(e, PeerEvent::Down { peer: NodeId(2), .. })).await;
    let mut cfg = TransportConfig::loopback();
    cfg.bind = b_addr;
    let ident = ca.node_identity(NodeId(2), Validity::days(1)).unwrap();
    // The old endpoint releases its socket once its tasks have wound down; poll for that with a deadline.
    let (b2, _bh2) = within("port released", async {
        loop {
            match Transport::bind(cfg.clone(), &ident) {
                Ok(t) => return t,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await;
    wait_event(&mut ah, |e| matches!(e, PeerEvent::Up { peer: NodeId(2), .. })).await;
    assert_eq!(b2.connected_peers(), vec![NodeId(1)]);
    a.remove_peer(NodeId(2));
    wait_event(&mut ah, |e| matches!(e, PeerEvent::Down { peer: NodeId(2), .. })).await;
}

/// A SIGKILLed peer sends no CONNECTION_CLOSE, so its old connection looks alive until the idle
/// timeout; when it restarts on the same address and dials in, the tie-break must not prefer the
/// dead connection (the lower id dialled it, and it is young). B runs on its own runtime, and
/// shutting that runtime down in the background is the kill: its endpoint and connections vanish
/// without a packet.
#[tokio::test]
async fn a_killed_peer_that_restarts_on_the_same_address_is_reachable_at_once() {
    let ca = ca();
    let (a, mut ah) = node(&ca, 1);
    let ident_b = ca.node_identity(NodeId(2), Validity::days(1)).unwrap();
    let b_runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let b_addr = {
        let _in_b = b_runtime.enter();
        let (b, bh) = Transport::bind(TransportConfig::loopback(), &ident_b).unwrap();
        let addr = b.local_addr();
        b_runtime.spawn(async move {
            let _alive = (b, bh);
            std::future::pending::<()>().await
        });
        addr
    };
    // A (the lower id) dials, so its connection is the one the simultaneous-dial rule prefers.
    a.add_peer(NodeId(2), b_addr);
    wait_event(&mut ah, |e| matches!(e, PeerEvent::Up { peer: NodeId(2), initiator: NodeId(1), .. })).await;
    let old = a.peer(NodeId(2)).unwrap();

    b_runtime.shutdown_background();
    let mut cfg = TransportConfig::loopback();
    cfg.bind = b_addr;
    let (b2, mut b2h) = within("port released", async {
        loop {
            match Transport::bind(cfg.clone(), &ident_b) {
                Ok(t) => return t,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await;

    // Well under the idle timeout (10 s): B2 dials A, and A reaches B2 over the new connection.
    let fast = TransportConfig::default().idle_timeout / 5;
    let reached = async {
        b2.connect(NodeId(1), a.local_addr()).await.expect("the restarted peer's dial is accepted");
        let c = a.connection(NodeId(2)).await.unwrap();
        let mut s = c.open_uni(header(StreamKind::RaftBatch)).await.unwrap();
        s.finish().unwrap();
        let got = b2h.inbound.recv().await.unwrap();
        (c, got)
    };
    let (c, got) = tokio::time::timeout(fast, reached)
        .await
        .unwrap_or_else(|_| panic!("the restarted peer was not reachable within {fast:?}"));
    assert_eq!((got.peer, got.kind), (NodeId(1), StreamKind::RaftBatch));
    assert_ne!(c.stable_id(), old.stable_id());
    assert_eq!(c.initiator(), NodeId(2));
    // A retired the dead connection itself: the killed process never said goodbye.
    assert!(
        matches!(old.quinn().close_reason(), Some(quinn::ConnectionError::LocallyClosed)),
        "{:?}",
        old.quinn().close_reason()
    );
    assert_eq!(a.connected_peers(), vec![NodeId(2)]);
    assert_eq!(b2.connected_peers(), vec![NodeId(1)]);
}

#[tokio::test]
async fn frames_arrive_aligned_with_exactly_one_copy() {
    let ca = ca();
    let (a, _ah) = node(&ca, 1);
    let (b, mut bh) = node(&ca, 2);
    let c = a.connect(NodeId(2), b.local_addr()).await.unwrap();

    let offsets = Segment::<u64>::build(1001, |v| v.iter_mut().enumerate().for_each(|(i, x)| *x = i as u64 * 3));
    let values = Segment::<f32>::build(3 << 20, |v| v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32 * 0.5));
    let tiny = Segment::from_slice(&[7u8, 8, 9]);
    let mut frame = OutFrame::new(None);
    frame.push("offsets", &offsets).push("tiny", &tiny).push("values", &values).set_last(true);

    // Send side: the chunks handed to quinn are the segments' own memory.
    let limits = Limits::default();
    let chunks = frame.wire_chunks(&limits).unwrap();
    let ptrs: Vec<*const u8> = chunks.iter().map(|c| c.as_ptr()).collect();
    assert!(ptrs.contains(&offsets.as_bytes().as_ptr()));
    assert!(ptrs.contains(&values.as_bytes().as_ptr()));
    assert!(ptrs.contains(&tiny.as_bytes().as_ptr()));

    let mut push = c.open_uni(header(StreamKind::PartitionPush)).await.unwrap();
    let sender = tokio::spawn(async move {
        push.send_frame(&frame).await.unwrap();
        push.send_frame(&frame).await.unwrap();
        push.send_frame(&OutFrame::new(None)).await.unwrap();
        push.finish().unwrap();
    });
    let mut s = within("inbound", bh.inbound.recv()).await.unwrap();
    assert_eq!(s.kind, StreamKind::PartitionPush);
    let f = within("frame", s.recv.recv_frame()).await.unwrap().unwrap();
    assert!(f.header.last);
    assert_eq!(f.segment_count(), 3);
    assert_eq!(f.segment_name(2), Some("values"));

    // Receive side: one buffer, every payload byte copied exactly once, segments view it in place.
    assert_eq!(f.stats.buffers, 1);
    assert_eq!(f.stats.bytes_copied, f.payload_len());
    let (base, buf_len) = match &**f.storage() {
        Storage::Heap(b) => (b.as_slice().as_ptr() as usize, b.len()),
        other => panic!("a received frame lives in one aligned heap buffer, not {other:?}"),
    };
    assert_eq!(buf_len as u64, f.payload_len());
    assert_eq!(base % SEGMENT_ALIGN, 0);
    let got_offsets = f.segment::<u64>(0).unwrap();
    let got_tiny = f.segment::<u8>(1).unwrap();
    let got_values = f.segment::<f32>(2).unwrap();
    let got_values_offset = got_values.as_bytes().as_ptr() as usize - base;
    for bytes in [got_offsets.as_bytes(), got_tiny.as_bytes(), got_values.as_bytes()] {
        let p = bytes.as_ptr() as usize;
        assert!(p >= base && p + bytes.len() <= base + buf_len, "segment outside the payload buffer");
        assert_eq!(p % SEGMENT_ALIGN, 0);
    }
    assert_eq!(got_offsets, offsets);
    assert_eq!(got_tiny, tiny);
    assert_eq!(got_values, values);
    assert!(f.segment::<u32>(2).is_err(), "type is checked");

    // A buffer handed back is reused: the next frame lands in the same memory, no allocation.
    assert!(!f.stats.reused);
    drop((got_offsets, got_tiny, got_values));
    let spare = f.reclaim().expect("no segment is alive any more");
    assert_eq!(spare.as_slice().as_ptr() as usize, base);
    let f2 = within("second frame", s.recv.recv_frame_into(Some(spare))).await.unwrap().unwrap();
    assert!(f2.stats.reused);
    assert_eq!(f2.stats.buffers, 0);
    assert_eq!(f2.stats.bytes_copied, f2.payload_len());
    let again = f2.segment::<f32>(2).unwrap();
    assert_eq!(again.as_bytes().as_ptr() as usize, base + (got_values_offset as usize));
    assert_eq!(again, values);

    let empty = s.recv.recv_frame().await.unwrap().unwrap();
    assert_eq!(empty.segment_count(), 0);
    assert!(s.recv.recv_frame().await.unwrap().is_none());
    sender.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_bad_frame_resets_only_its_stream() {
    let logs = Logs::default();
    let _guard = logs.install();
    let ca = ca();
    let (a, _ah) = node(&ca, 1);
    let (b, mut bh) = node(&ca, 2);
    let c = a.connect(NodeId(2), b.local_addr()).await.unwrap();

    // Stream 1: garbage after a valid stream header.
    let mut bad = c.open_uni(header(StreamKind::HaloExchange)).await.unwrap();
    bad.quinn().write_all(b"this is not a frame at all").await.unwrap();
    // Stream 2: a header promising more than the limit allows (checked before allocating).
    let mut huge = c.open_uni(header(StreamKind::PartitionPush)).await.unwrap();
    let lie = quiver_proto::peer::FrameHeader {
        segments: vec![quiver_proto::peer::SegmentDesc { elem: 3, count: 1 << 40, name: "x".into() }],
        ..Default::default()
    };
    let head = quiver_node_agent::transport::codec::encode_frame_head(&lie);
    huge.quinn().write_all(&head).await.unwrap();
    // Stream 3: a garbage stream header.
    let (mut junk, _) = c.quinn().open_bi().await.unwrap();
    junk.write_all(b"QVS1\xff\xff\xff\xff").await.unwrap();

    for _ in 0..2 {
        let mut s = within("inbound", bh.inbound.recv()).await.unwrap();
        let err = within("bad frame", s.recv.recv_frame()).await.unwrap_err();
        assert!(matches!(err, StreamError::Malformed { peer: NodeId(1), .. }), "{err}");
    }
    assert_eq!(within("stop bad", bad.stopped()).await, Some(ErrorCode::Malformed as u64));
    assert_eq!(within("stop huge", huge.stopped()).await, Some(ErrorCode::TooLarge as u64));
    let code = within("stop junk", junk.stopped()).await.unwrap();
    assert_eq!(code.map(|c| c.into_inner()), Some(ErrorCode::TooLarge as u64));

    // The connection and new streams still work.
    assert!(!c.is_closed());
    let mut good = c.open_uni(header(StreamKind::HaloExchange)).await.unwrap();
    let mut f = OutFrame::new(None);
    f.push("halo", &Segment::from_slice(&[1.5f64, 2.5]));
    good.send_frame(&f).await.unwrap();
    good.finish().unwrap();
    let mut s = within("inbound", bh.inbound.recv()).await.unwrap();
    let got = within("good frame", s.recv.recv_frame()).await.unwrap().unwrap();
    assert_eq!(&*got.segment::<f64>(0).unwrap(), &[1.5, 2.5]);
    let mut hb = c.heartbeat().await.unwrap();
    within("heartbeat", hb.ping()).await.unwrap();

    let text = logs.text();
    assert!(text.contains("stopping peer stream") && text.contains("peer=node-1"), "{text}");
    assert!(text.contains("exceeds the limit"), "{text}");
}

/// A path-MTU bound past what one segmentation-offload batch can send would stall every
/// connection silently; binding refuses it and names the setting.
#[tokio::test(flavor = "current_thread")]
async fn a_max_mtu_past_the_offload_limit_is_refused_at_bind() {
    let ca = ca();
    let identity = ca.node_identity(NodeId(1), Validity::days(1)).unwrap();
    for bad in [1199, 6501] {
        let cfg = TransportConfig { max_mtu: bad, ..TransportConfig::loopback() };
        let Err(err) = Transport::bind(cfg, &identity) else { panic!("max MTU {bad} was accepted") };
        let err = err.to_string();
        assert!(err.contains(&format!("max MTU {bad}")) && err.contains("1200..=6500"), "{err}");
    }
}

/// With a larger bound, path-MTU discovery climbs to it on loopback (whose MTU is 64 KiB); with
/// the default it stays at Ethernet's 1,452.
#[tokio::test]
async fn mtu_discovery_climbs_to_the_configured_bound_on_loopback() {
    let ca = ca();
    let bind = |id: u64, max_mtu: u16| {
        let cfg = TransportConfig { max_mtu, ..TransportConfig::loopback() };
        Transport::bind(cfg, &ca.node_identity(NodeId(id), Validity::days(1)).unwrap()).unwrap()
    };
    for (bound, ids) in [(*MTU_PROBE_LIMITS.end(), (1, 2)), (DEFAULT_MAX_MTU, (3, 4))] {
        let ((a, _ah), (b, _bh)) = (bind(ids.0, bound), bind(ids.1, bound));
        let c = within("connect", a.connect(NodeId(ids.1), b.local_addr())).await.unwrap();
        let mtu = within("discovery to reach the bound", async {
            loop {
                let now = c.quinn().stats().path.current_mtu;
                if now >= bound {
                    return now;
                }
                // Discovery's probes ride on the connection's own timers; poll its state.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(mtu, bound);
    }
}

/// A job's supersteps widen the peer socket's receive buffer; it narrows again only when the
/// last lease is gone.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn supersteps_widen_the_receive_buffer_until_the_last_lease_ends() {
    let ca = ca();
    let want = 3 << 20;
    let cfg = TransportConfig { job_socket_buffer: want, ..TransportConfig::loopback() };
    let (t, _h) = Transport::bind(cfg, &ca.node_identity(NodeId(1), Validity::days(1)).unwrap()).unwrap();
    let resting = t.receive_buffer_bytes().expect("a second descriptor of the socket");
    let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
    let wide = |got: usize| got >= want || (got >= cap && got > resting);
    let first = t.widen_receive_buffer();
    assert!(wide(t.receive_buffer_bytes().unwrap()), "widened to {:?} (resting {resting})", t.receive_buffer_bytes());
    let second = t.widen_receive_buffer();
    drop(first);
    assert!(wide(t.receive_buffer_bytes().unwrap()), "one lease still holds it wide");
    drop(second);
    assert_eq!(t.receive_buffer_bytes(), Some(resting));
}

//! The endpoint and peer manager: one quinn endpoint per node, one connection per peer pair.
//!
//! Simultaneous dials are resolved the same way on both sides: while both connections are young,
//! the one dialled by the lower node id wins and the other is closed with [`ErrorCode::Duplicate`];
//! otherwise the newest connection wins (the old one belongs to a peer that restarted).
//!
//! A peer that was killed (no CONNECTION_CLOSE sent) and restarted on the same address leaves its
//! old connection behind, looking alive until the idle timeout, and its new process dials in from
//! the same UDP address, so neither age nor address tells a restart from a simultaneous dial.
//! Liveness does: before the young old connection is preferred over a newer one, it must answer a
//! heartbeat within [`TransportConfig::liveness_probe_timeout`]. In a genuine simultaneous dial
//! both connections lead to the same live process, the probe answers on both sides, and both
//! sides keep the lower id's connection. A dead connection cannot answer, so it is closed with
//! [`ErrorCode::Stale`] and the new one installed: the restarted peer is reachable after one probe
//! timeout rather than the idle timeout. The probe can only turn the choice towards the new
//! connection, which is what both sides want when the old one is gone. Wanted
//! peers ([`Transport::add_peer`]) are redialled with capped, jittered backoff. Connection events
//! (up, down, RTT) go to one channel and inbound streams, header already read, to another.
//! Heartbeat streams are answered here, so liveness does not depend on the application loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quiver_proto::peer::{Heartbeat, StreamHeader, StreamKind};
use tokio::sync::{Semaphore, mpsc, watch};

use super::backoff::Backoff;
use super::config::TransportConfig;
use super::stream::{self, BUDGET_UNIT, PeerRecvStream, PeerSendStream, StreamError};
use super::tls::{self, NodeIdentity, TlsError};
use super::{ErrorCode, NodeId};

/// Why the transport could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("quic crypto configuration: {0}")]
    Crypto(String),
    #[error("transport settings: {0}")]
    Config(String),
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("no async runtime found (call from inside tokio)")]
    NoRuntime,
    #[error("dial {peer} at {addr}: {reason}")]
    Dial { peer: NodeId, addr: SocketAddr, reason: String },
    #[error("{peer} at {addr} presented the certificate of {actual}")]
    WrongPeer { peer: NodeId, addr: SocketAddr, actual: NodeId },
    #[error("no address known for {0}")]
    UnknownPeer(NodeId),
    #[error("{peer}: connection lost: {source}")]
    Connection { peer: NodeId, source: quinn::ConnectionError },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("transport is shut down")]
    Shutdown,
}

/// Something that happened to a peer connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// A connection to `peer` is established (may repeat when a duplicate replaces a connection).
    Up { peer: NodeId, addr: SocketAddr, initiator: NodeId },
    /// The current connection to `peer` is gone.
    Down { peer: NodeId, reason: String },
    /// Periodic smoothed RTT of the current connection.
    Rtt { peer: NodeId, rtt: Duration },
}

/// A stream a peer opened, its header already read and validated.
#[derive(Debug)]
pub struct InboundStream {
    pub peer: NodeId,
    pub kind: StreamKind,
    pub header: StreamHeader,
    /// The reply half, for bidirectional kinds (control, serving forward).
    pub send: Option<PeerSendStream>,
    pub recv: PeerRecvStream,
}

/// The receiving ends the application drains.
#[derive(Debug)]
pub struct TransportHandles {
    pub events: mpsc::Receiver<PeerEvent>,
    pub inbound: mpsc::Receiver<InboundStream>,
}

/// An established, authenticated connection to one peer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    peer: NodeId,
    initiator: NodeId,
    established: Instant,
    conn: quinn::Connection,
    config: Arc<TransportConfig>,
    budget: Arc<Semaphore>,
}

impl PeerConnection {
    fn new(peer: NodeId, initiator: NodeId, conn: quinn::Connection, config: Arc<TransportConfig>) -> Self {
        let units = config.max_receiving_bytes_per_connection.div_ceil(BUDGET_UNIT).min(u32::MAX as u64) as usize;
        Self { peer, initiator, established: Instant::now(), conn, config, budget: Arc::new(Semaphore::new(units)) }
    }

    /// The node at the other end (from its certificate).
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Which side dialled.
    pub fn initiator(&self) -> NodeId {
        self.initiator
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Identifies this connection among all of the endpoint's.
    pub fn stable_id(&self) -> usize {
        self.conn.stable_id()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Waits until the connection closes.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// The quinn connection (statistics, raw streams for benchmarks).
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }

    fn conn_err(&self, source: quinn::ConnectionError) -> TransportError {
        TransportError::Connection { peer: self.peer, source }
    }

    fn send_half(&self, kind: StreamKind, s: quinn::SendStream) -> PeerSendStream {
        PeerSendStream::new(self.peer, kind, s, self.config.limits)
    }

    fn recv_half(&self, kind: StreamKind, r: quinn::RecvStream) -> PeerRecvStream {
        PeerRecvStream::new(self.peer, kind, r, self.config.limits, self.budget.clone())
    }

    /// Opens a unidirectional stream (raft batch, partition push, halo exchange) and sends its header.
    pub async fn open_uni(&self, header: StreamHeader) -> Result<PeerSendStream, TransportError> {
        let kind = header.kind();
        let s = self.conn.open_uni().await.map_err(|e| self.conn_err(e))?;
        let mut send = self.send_half(kind, s);
        send.write_header(&header).await?;
        Ok(send)
    }

    /// Opens a bidirectional stream (control, heartbeat, serving forward) and sends its header.
    pub async fn open_bi(&self, header: StreamHeader) -> Result<(PeerSendStream, PeerRecvStream), TransportError> {
        let kind = header.kind();
        let (s, r) = self.conn.open_bi().await.map_err(|e| self.conn_err(e))?;
        let mut send = self.send_half(kind, s);
        send.write_header(&header).await?;
        Ok((send, self.recv_half(kind, r)))
    }

    /// Opens a heartbeat stream; the peer's transport answers each ping on it.
    pub async fn heartbeat(&self) -> Result<Heartbeater, TransportError> {
        let header = StreamHeader { kind: StreamKind::Heartbeat as i32, ..Default::default() };
        let (send, recv) = self.open_bi(header).await?;
        Ok(Heartbeater { send, recv, seq: 0, origin: Instant::now() })
    }

    /// One heartbeat round trip on a fresh heartbeat stream: whether the peer's transport answers
    /// (callers bound it with a timeout); returns the round-trip time.
    pub async fn ping_once(&self) -> Result<Duration, TransportError> {
        Ok(self.heartbeat().await?.ping().await?)
    }

    /// Closes the connection with `code`.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        self.conn.close(code.into(), reason.as_bytes());
    }
}

/// The pinging end of a heartbeat stream.
#[derive(Debug)]
pub struct Heartbeater {
    send: PeerSendStream,
    recv: PeerRecvStream,
    seq: u64,
    origin: Instant,
}

impl Heartbeater {
    /// Sends one ping and waits for its echo; returns the round-trip time.
    pub async fn ping(&mut self) -> Result<Duration, StreamError> {
        self.seq += 1;
        let sent = Instant::now();
        let micros = sent.duration_since(self.origin).as_micros() as u64;
        self.send.send_message(&Heartbeat { seq: self.seq, sent_micros: micros, echo: false, node_id: 0 }).await?;
        loop {
            match self.recv.recv_message::<Heartbeat>().await? {
                Some(h) if h.echo && h.seq == self.seq => return Ok(sent.elapsed()),
                Some(_) => continue, // a late echo of an earlier ping
                None => {
                    return Err(StreamError::Truncated { peer: self.recv.peer(), stream: 0, what: "heartbeat echo" });
                }
            }
        }
    }
}

#[derive(Default)]
struct PeerState {
    addr: Option<SocketAddr>,
    wanted: bool,
    dialer_running: bool,
    current: Option<PeerConnection>,
    dial_lock: Arc<tokio::sync::Mutex<()>>,
    /// Woken whenever `current` is set to a new connection.
    installed: Arc<tokio::sync::Notify>,
}

struct Inner {
    node_id: NodeId,
    endpoint: quinn::Endpoint,
    /// Swapped by [`Transport::reload_identity`]; every new dial reads the current one.
    client: Mutex<quinn::ClientConfig>,
    config: Arc<TransportConfig>,
    peers: Mutex<HashMap<NodeId, PeerState>>,
    events: mpsc::Sender<PeerEvent>,
    inbound: mpsc::Sender<InboundStream>,
    shutdown: watch::Sender<bool>,
    receive_buffer: Arc<ReceiveBuffer>,
}

/// A node's peer transport. Cheap to clone; all clones share one endpoint.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("node_id", &self.inner.node_id).finish_non_exhaustive()
    }
}

/// Asks the kernel for `bytes` of receive buffer on the endpoint's socket (forced past
/// `net.core.rmem_max` where the process may), and warns when it got less unless `quiet`; 0
/// leaves the kernel's default ([`TransportConfig::socket_buffer`]). Returns whether it got all
/// it asked for.
pub(crate) fn size_socket_buffers(socket: &std::net::UdpSocket, bytes: usize, quiet: bool) -> bool {
    if bytes == 0 {
        return true;
    }
    let sock = socket2::SockRef::from(socket);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket descriptor, an option that takes a C int, and a pointer to one
        // that lives across the call. Refused without CAP_NET_ADMIN, which is fine.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    // Ask for the plain size where forcing did not give it (the kernel caps that at its maximum).
    if receive_buffer_granted(socket).is_ok_and(|s| s < bytes) {
        let _ = sock.set_recv_buffer_size(bytes);
    }
    match receive_buffer_granted(socket) {
        Ok(got) if got < bytes && quiet => {
            tracing::debug!(asked_kib = bytes >> 10, got_kib = got >> 10, "peer socket receive buffer");
            false
        }
        Ok(got) if got < bytes => {
            tracing::warn!(
                asked_kib = bytes >> 10,
                got_kib = got >> 10,
                "the peer socket's UDP receive buffer is smaller than asked: raise net.core.rmem_max to at least \
                 the asked size"
            );
            false
        }
        Ok(got) => {
            tracing::debug!(kib = got >> 10, "peer socket receive buffer");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read the peer socket's receive buffer size");
            false
        }
    }
}

/// The payload bytes the socket's receive buffer holds now: Linux reports twice the size it books
/// for payload.
fn receive_buffer_granted(socket: &std::net::UdpSocket) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).recv_buffer_size().map(|s| if cfg!(target_os = "linux") { s / 2 } else { s })
}

/// The endpoint socket's receive buffer: its resting size, and the wider one held while any
/// [`ReceiveBufferLease`] lives ([`TransportConfig::job_socket_buffer`]).
#[derive(Debug)]
struct ReceiveBuffer {
    /// A second descriptor of the endpoint's socket (quinn owns the first).
    socket: Option<std::net::UdpSocket>,
    resting: usize,
    wide: usize,
    leases: Mutex<Leases>,
}

/// The leases alive, and whether widening has fallen short once (said once, not at every job).
#[derive(Debug, Default)]
struct Leases {
    count: usize,
    fell_short: bool,
}

/// Keeps the peer socket's receive buffer wide until dropped ([`Transport::widen_receive_buffer`]).
#[derive(Debug)]
#[must_use = "the buffer narrows again when the lease is dropped"]
pub struct ReceiveBufferLease(Arc<ReceiveBuffer>);

impl ReceiveBuffer {
    /// Counts a lease; the first widens the socket (warning once, not at every job, when the
    /// kernel grants less).
    fn acquire(self: &Arc<Self>) -> ReceiveBufferLease {
        let mut leases = self.leases.lock().expect("receive buffer leases");
        if leases.count == 0
            && self.wide > self.resting
            && let Some(socket) = &self.socket
            && !size_socket_buffers(socket, self.wide, leases.fell_short)
        {
            leases.fell_short = true;
        }
        leases.count += 1;
        ReceiveBufferLease(self.clone())
    }

    /// Ends a lease; the last narrows the socket back to its resting size.
    fn release(&self) {
        let mut leases = self.leases.lock().expect("receive buffer leases");
        leases.count -= 1;
        if leases.count == 0
            && self.wide > self.resting
            && let Some(socket) = &self.socket
        {
            size_socket_buffers(socket, self.resting, true);
        }
    }
}

impl Drop for ReceiveBufferLease {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// While both are younger than this, simultaneous connections are resolved by dial direction.
const DEDUP_WINDOW: Duration = Duration::from_secs(2);

impl Transport {
    /// Binds the endpoint and starts accepting peers. Must be called inside a tokio runtime.
    pub fn bind(
        config: TransportConfig,
        identity: &NodeIdentity,
    ) -> Result<(Transport, TransportHandles), TransportError> {
        config.check().map_err(TransportError::Config)?;
        let config = Arc::new(config);
        let (server, client) = quinn_configs(&config, identity)?;
        let socket = std::net::UdpSocket::bind(config.bind)
            .map_err(|source| TransportError::Bind { addr: config.bind, source })?;
        size_socket_buffers(&socket, config.socket_buffer, false);
        let receive_buffer = Arc::new(ReceiveBuffer {
            // Without a second descriptor the buffer simply stays at its resting size.
            socket: socket.try_clone().ok(),
            resting: receive_buffer_granted(&socket).unwrap_or(config.socket_buffer),
            wide: config.job_socket_buffer,
            leases: Mutex::default(),
        });
        let runtime = quinn::default_runtime().ok_or(TransportError::NoRuntime)?;
        let endpoint = match &config.faults {
            None => quinn::Endpoint::new(config.quinn_endpoint(), Some(server), socket, runtime),
            // Only with fault injection asked for: quinn's socket wrapped by the chaos layer.
            Some(faults) => runtime.wrap_udp_socket(socket).and_then(|s| {
                quinn::Endpoint::new_with_abstract_socket(
                    config.quinn_endpoint(),
                    Some(server),
                    faults.wrap(s),
                    runtime,
                )
            }),
        }
        .map_err(|source| TransportError::Bind { addr: config.bind, source })?;
        let (events_tx, events) = mpsc::channel(config.channel_capacity);
        let (inbound_tx, inbound) = mpsc::channel(config.channel_capacity);
        let inner = Arc::new(Inner {
            node_id: identity.node_id,
            endpoint,
            client: Mutex::new(client),
            config,
            peers: Mutex::new(HashMap::new()),
            events: events_tx,
            inbound: inbound_tx,
            shutdown: watch::channel(false).0,
            receive_buffer,
        });
        tokio::spawn(accept_loop(inner.clone()));
        Ok((Transport { inner }, TransportHandles { events, inbound }))
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// Widens the peer socket's receive buffer to [`TransportConfig::job_socket_buffer`] until
    /// the returned lease (and every other) is dropped: a job owner holds one through its
    /// supersteps, whose halos arrive from every peer at once.
    pub fn widen_receive_buffer(&self) -> ReceiveBufferLease {
        self.inner.receive_buffer.acquire()
    }

    /// The payload bytes the peer socket's receive buffer holds now.
    pub fn receive_buffer_bytes(&self) -> Option<usize> {
        self.inner.receive_buffer.socket.as_ref().and_then(|s| receive_buffer_granted(s).ok())
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.endpoint.local_addr().expect("endpoint socket has an address")
    }

    /// The current connection to `peer`, if any.
    pub fn peer(&self, peer: NodeId) -> Option<PeerConnection> {
        let peers = self.inner.peers.lock().expect("peers lock");
        peers.get(&peer).and_then(|p| p.current.clone()).filter(|c| !c.is_closed())
    }

    /// Peers with a live connection.
    pub fn connected_peers(&self) -> Vec<NodeId> {
        let peers = self.inner.peers.lock().expect("peers lock");
        let mut v: Vec<_> = peers
            .iter()
            .filter(|(_, p)| p.current.as_ref().is_some_and(|c| !c.is_closed()))
            .map(|(id, _)| *id)
            .collect();
        v.sort();
        v
    }

    /// Keeps a connection to `peer` at `addr`: dials now and redials with backoff whenever it drops.
    pub fn add_peer(&self, peer: NodeId, addr: SocketAddr) {
        let spawn = {
            let mut peers = self.inner.peers.lock().expect("peers lock");
            let st = peers.entry(peer).or_default();
            st.addr = Some(addr);
            st.wanted = true;
            !std::mem::replace(&mut st.dialer_running, true)
        };
        if spawn {
            tokio::spawn(dialer(self.inner.clone(), peer));
        }
    }

    /// Stops keeping a connection to `peer` and closes the current one.
    pub fn remove_peer(&self, peer: NodeId) {
        let conn = {
            let mut peers = self.inner.peers.lock().expect("peers lock");
            peers.get_mut(&peer).and_then(|st| {
                st.wanted = false;
                // Left in place: the connection's task clears it and reports it down once closed.
                st.current.clone()
            })
        };
        if let Some(c) = conn {
            c.close(ErrorCode::Removed, "removed");
        }
    }

    /// Returns the live connection to `peer`, dialling `addr` once if there is none.
    pub async fn connect(&self, peer: NodeId, addr: SocketAddr) -> Result<PeerConnection, TransportError> {
        connect(&self.inner, peer, addr).await
    }

    /// Returns the live connection to `peer`, dialling its known address if needed.
    pub async fn connection(&self, peer: NodeId) -> Result<PeerConnection, TransportError> {
        if let Some(c) = self.peer(peer) {
            return Ok(c);
        }
        let addr = {
            let peers = self.inner.peers.lock().expect("peers lock");
            peers.get(&peer).and_then(|p| p.addr)
        };
        let addr = addr.ok_or(TransportError::UnknownPeer(peer))?;
        self.connect(peer, addr).await
    }

    /// Presents `identity` (a renewed certificate, a rotated CA) on every handshake from now on:
    /// new inbound connections get the new server configuration and new dials the new client
    /// configuration. Established connections are left alone. The node id must not change.
    pub fn reload_identity(&self, identity: &NodeIdentity) -> Result<(), TransportError> {
        if identity.node_id != self.inner.node_id {
            return Err(TransportError::Tls(TlsError::NotANode(format!(
                "the new certificate is for {}, this node is {}",
                identity.node_id, self.inner.node_id
            ))));
        }
        let (server, client) = quinn_configs(&self.inner.config, identity)?;
        self.inner.endpoint.set_server_config(Some(server));
        *self.inner.client.lock().expect("client config lock") = client;
        Ok(())
    }

    /// Closes every connection and the endpoint, and waits (bounded) for peers to be told.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        self.inner.endpoint.close(ErrorCode::Shutdown.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }
}

/// The quinn server and client configurations for an identity and settings.
pub fn quinn_configs(
    config: &TransportConfig,
    identity: &NodeIdentity,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let server_crypto =
        QuicServerConfig::try_from(identity.server_config()?).map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(config.quinn_transport());
    let client_crypto =
        QuicClientConfig::try_from(identity.client_config()?).map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(config.quinn_transport());
    Ok((server, client))
}

/// The node id in the certificate a connection's peer presented.
fn peer_node_id(conn: &quinn::Connection) -> Result<NodeId, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .ok_or_else(|| TlsError::NotANode("peer presented no certificate".into()))?;
    let first = certs.first().ok_or_else(|| TlsError::NotANode("empty certificate chain".into()))?;
    tls::node_id_of(first)
}

fn emit(inner: &Inner, event: PeerEvent) {
    if let Err(mpsc::error::TrySendError::Full(e)) = inner.events.try_send(event) {
        tracing::warn!(event = ?e, "peer event channel full; event dropped");
    }
}

async fn connect(inner: &Arc<Inner>, peer: NodeId, addr: SocketAddr) -> Result<PeerConnection, TransportError> {
    if *inner.shutdown.borrow() {
        return Err(TransportError::Shutdown);
    }
    let lock = {
        let mut peers = inner.peers.lock().expect("peers lock");
        let st = peers.entry(peer).or_default();
        if let Some(c) = st.current.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        st.dial_lock.clone()
    };
    // One dial per peer at a time, so one side never races itself.
    let _guard = lock.lock().await;
    let current = inner.peers.lock().expect("peers lock").get(&peer).and_then(|p| p.current.clone());
    if let Some(c) = current.filter(|c| !c.is_closed()) {
        return Ok(c);
    }
    let dial_err = |reason: String| TransportError::Dial { peer, addr, reason };
    let connecting = inner
        .endpoint
        .connect_with(inner.client.lock().expect("client config lock").clone(), addr, &tls::node_server_name(peer))
        .map_err(|e| dial_err(e.to_string()))?;
    let conn = match tokio::time::timeout(inner.config.handshake_timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(%peer, %addr, error = %e, "peer handshake failed");
            return Err(dial_err(e.to_string()));
        }
        Err(_) => return Err(dial_err("handshake timed out".into())),
    };
    // The TLS name check already bound the certificate to `peer`; the URI check is belt and braces.
    let actual = peer_node_id(&conn).map_err(|e| dial_err(e.to_string()))?;
    if actual != peer {
        conn.close(ErrorCode::WrongPeer.into(), b"wrong peer");
        tracing::warn!(%peer, %addr, %actual, "refused peer: certificate names another node");
        return Err(TransportError::WrongPeer { peer, addr, actual });
    }
    // With TLS 1.3 the dialler finishes its handshake before the server has checked the dialler's
    // certificate; one heartbeat round trip confirms the server accepted us before anyone uses it.
    let confirm = async {
        let probe = PeerConnection::new(peer, inner.node_id, conn.clone(), inner.config.clone());
        probe.ping_once().await
    };
    match tokio::time::timeout(inner.config.handshake_timeout, confirm).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            // Lost a simultaneous dial: the peer kept the connection the lower id dialled, which
            // is (or is about to be) ours too. That one is the answer, not an error.
            let duplicate = matches!(conn.close_reason(), Some(quinn::ConnectionError::ApplicationClosed(ref c))
                if c.error_code == ErrorCode::Duplicate.into());
            if duplicate && let Some(kept) = wait_installed(inner, peer, conn.stable_id()).await {
                return Ok(kept);
            }
            let reason = conn.close_reason().map_or_else(|| e.to_string(), |r| r.to_string());
            tracing::warn!(%peer, %addr, %reason, "peer refused our connection after the handshake");
            conn.close(ErrorCode::Cancelled.into(), b"refused");
            return Err(dial_err(reason));
        }
        Err(_) => {
            conn.close(ErrorCode::Cancelled.into(), b"timeout");
            return Err(dial_err("no answer after the handshake".into()));
        }
    }
    Ok(install(inner, conn, peer, inner.node_id).await)
}

/// The live connection to `peer` other than `not`, waiting (up to the handshake timeout) for one
/// to be installed.
async fn wait_installed(inner: &Arc<Inner>, peer: NodeId, not: usize) -> Option<PeerConnection> {
    let deadline = tokio::time::Instant::now() + inner.config.handshake_timeout;
    loop {
        let installed = {
            let mut peers = inner.peers.lock().expect("peers lock");
            let st = peers.entry(peer).or_default();
            if let Some(c) = st.current.as_ref().filter(|c| !c.is_closed() && c.stable_id() != not) {
                return Some(c.clone());
            }
            st.installed.clone()
        };
        let notified = installed.notified();
        // Checked again after registering, so an install in between is not missed.
        if let Some(c) = inner.peers.lock().expect("peers lock").get(&peer).and_then(|st| st.current.clone())
            && !c.is_closed()
            && c.stable_id() != not
        {
            return Some(c);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}

/// Makes `conn` the connection to `peer`, or closes it as a duplicate; returns the one kept.
///
/// The tie-break keeps a young connection dialled by the lower id over a newer one dialled by the
/// higher id, but only while the kept one answers a liveness probe (see the module docs).
async fn install(inner: &Arc<Inner>, conn: quinn::Connection, peer: NodeId, initiator: NodeId) -> PeerConnection {
    let new = PeerConnection::new(peer, initiator, conn, inner.config.clone());
    let preferred = inner.node_id.min(peer);
    let replaced = loop {
        let contender = {
            let mut peers = inner.peers.lock().expect("peers lock");
            let st = peers.entry(peer).or_default();
            match st.current.as_ref().filter(|c| !c.is_closed()) {
                Some(old)
                    if old.initiator == preferred
                        && initiator != preferred
                        && old.established.elapsed() < DEDUP_WINDOW =>
                {
                    old.clone()
                }
                _ => {
                    st.installed.notify_waiters();
                    break st.current.replace(new.clone());
                }
            }
        };
        if answers_probe(inner, &contender).await {
            tracing::debug!(%peer, "closing duplicate connection dialled by the higher id");
            new.close(ErrorCode::Duplicate, "duplicate");
            return contender;
        }
        // Retire the silent connection unless another install already did, then decide again.
        {
            let mut peers = inner.peers.lock().expect("peers lock");
            if let Some(st) = peers.get_mut(&peer)
                && st.current.as_ref().is_some_and(|c| c.stable_id() == contender.stable_id())
            {
                st.current = None;
            }
        }
        tracing::info!(%peer, addr = %contender.remote_address(), "retiring a connection that no longer answers (the peer restarted)");
        contender.close(ErrorCode::Stale, "stale");
    };
    if let Some(old) = replaced.filter(|o| !o.is_closed()) {
        tracing::debug!(%peer, "replacing connection");
        old.close(ErrorCode::Duplicate, "duplicate");
    }
    tracing::info!(%peer, addr = %new.remote_address(), %initiator, "peer connection up");
    emit(inner, PeerEvent::Up { peer, addr: new.remote_address(), initiator });
    tokio::spawn(serve_connection(inner.clone(), new.clone()));
    new
}

/// Whether `pc` echoes a heartbeat within the probe timeout (at least 4 RTTs).
async fn answers_probe(inner: &Inner, pc: &PeerConnection) -> bool {
    let within = inner.config.liveness_probe_timeout.max(pc.rtt() * 4);
    matches!(tokio::time::timeout(within, pc.ping_once()).await, Ok(Ok(_)))
}

async fn accept_loop(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            i = inner.endpoint.accept() => i,
            _ = shutdown.changed() => None,
        };
        let Some(incoming) = incoming else { break };
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let result = match incoming.accept() {
                Ok(connecting) => tokio::time::timeout(inner.config.handshake_timeout, connecting).await,
                Err(e) => Ok(Err(e)),
            };
            let conn = match result {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "refused peer handshake");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "refused peer handshake: timed out");
                    return;
                }
            };
            if negotiated_alpn(&conn).as_deref() == Some(tls::JOIN_ALPN) {
                serve_join_connection(inner, conn).await;
                return;
            }
            match peer_node_id(&conn) {
                Ok(peer) if peer == inner.node_id => {
                    tracing::warn!(%remote, "refused peer: it presented our own node id");
                    conn.close(ErrorCode::WrongPeer.into(), b"same node id");
                }
                Ok(peer) => {
                    install(&inner, conn, peer, peer).await;
                }
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused peer: no node identity");
                    conn.close(ErrorCode::WrongPeer.into(), b"no node identity");
                }
            }
        });
    }
}

/// The ALPN protocol the handshake settled on.
fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// Most streams one join connection may open, and how long it may stay.
const JOIN_STREAMS: usize = 4;
const JOIN_LIFETIME: Duration = Duration::from_secs(15);

/// A token join ([`tls::JOIN_ALPN`]): hands at most [`JOIN_STREAMS`] `Control` streams to the
/// application as coming from [`super::ANONYMOUS`], then closes the connection. Nothing else is
/// served on it; the connection is never installed as a peer.
async fn serve_join_connection(inner: Arc<Inner>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    tracing::info!(%remote, "join connection (no certificate yet)");
    let pc = PeerConnection::new(super::ANONYMOUS, super::ANONYMOUS, conn.clone(), inner.config.clone());
    let serve = async {
        for _ in 0..JOIN_STREAMS {
            let Ok((send, recv)) = conn.accept_bi().await else { return };
            let mut recv = pc.recv_half(StreamKind::Unspecified, recv);
            let mut send = pc.send_half(StreamKind::Unspecified, send);
            match stream::read_header_with_timeout(&mut recv, inner.config.stream_header_timeout).await {
                Ok((header, StreamKind::Control)) => {
                    let send = Some(pc.send_half(StreamKind::Control, send.into_inner()));
                    let s = InboundStream { peer: super::ANONYMOUS, kind: StreamKind::Control, header, send, recv };
                    if inner.inbound.send(s).await.is_err() {
                        return;
                    }
                }
                Ok((_, kind)) => {
                    recv.reject(ErrorCode::Refused, &format_args!("{kind:?} streams need a node certificate"));
                    send.reset(ErrorCode::Refused);
                }
                Err(_) => send.reset(ErrorCode::Malformed),
            }
        }
        // Let the last answer drain before closing.
        let _ = conn.closed().await;
    };
    if tokio::time::timeout(JOIN_LIFETIME, serve).await.is_err() {
        tracing::debug!(%remote, "join connection timed out");
    }
    conn.close(ErrorCode::Ok.into(), b"join done");
}

async fn serve_connection(inner: Arc<Inner>, pc: PeerConnection) {
    // Starts one period from now rather than awaiting an interval's immediate first tick: tokio
    // rounds every timer up to its next millisecond, so that tick held the first stream of every
    // new connection (the dialler's confirming heartbeat) back by up to ~1.5 ms.
    let period = inner.config.rtt_report_interval;
    let mut rtt_tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let reason = loop {
        tokio::select! {
            r = pc.conn.accept_uni() => match r {
                Ok(recv) => { tokio::spawn(dispatch(inner.clone(), pc.clone(), None, recv)); }
                Err(e) => break e,
            },
            r = pc.conn.accept_bi() => match r {
                Ok((send, recv)) => { tokio::spawn(dispatch(inner.clone(), pc.clone(), Some(send), recv)); }
                Err(e) => break e,
            },
            _ = rtt_tick.tick() => emit(&inner, PeerEvent::Rtt { peer: pc.peer, rtt: pc.rtt() }),
        }
    };
    let was_current = {
        let mut peers = inner.peers.lock().expect("peers lock");
        match peers.get_mut(&pc.peer) {
            Some(st) if st.current.as_ref().is_some_and(|c| c.stable_id() == pc.stable_id()) => {
                st.current = None;
                true
            }
            _ => false,
        }
    };
    if was_current {
        tracing::info!(peer = %pc.peer, %reason, "peer connection down");
        emit(&inner, PeerEvent::Down { peer: pc.peer, reason: reason.to_string() });
    }
}

async fn dispatch(inner: Arc<Inner>, pc: PeerConnection, send: Option<quinn::SendStream>, recv: quinn::RecvStream) {
    let mut recv = pc.recv_half(StreamKind::Unspecified, recv);
    let mut send = send.map(|s| pc.send_half(StreamKind::Unspecified, s));
    let (header, kind) = match stream::read_header_with_timeout(&mut recv, inner.config.stream_header_timeout).await {
        Ok(h) => h,
        Err(_) => {
            // Already stopped and logged by the stream driver; refuse the reply half too.
            if let Some(s) = send.as_mut() {
                s.reset(ErrorCode::Malformed);
            }
            return;
        }
    };
    if kind.is_bidirectional() != send.is_some() {
        recv.reject(ErrorCode::Malformed, &format_args!("{kind:?} stream with the wrong directionality"));
        if let Some(s) = send.as_mut() {
            s.reset(ErrorCode::Malformed);
        }
        return;
    }
    let send = send.map(|s| pc.send_half(kind, s.into_inner()));
    if kind == StreamKind::Heartbeat {
        if let Some(send) = send {
            answer_heartbeats(inner.node_id, send, recv).await;
        }
        return;
    }
    let stream = InboundStream { peer: pc.peer, kind, header, send, recv };
    if let Err(mpsc::error::SendError(mut s)) = inner.inbound.send(stream).await {
        s.recv.stop(ErrorCode::Refused);
        if let Some(send) = s.send.as_mut() {
            send.reset(ErrorCode::Refused);
        }
    }
}

async fn answer_heartbeats(node: NodeId, mut send: PeerSendStream, mut recv: PeerRecvStream) {
    loop {
        match recv.recv_message::<Heartbeat>().await {
            Ok(Some(h)) => {
                let echo = Heartbeat { seq: h.seq, sent_micros: h.sent_micros, echo: true, node_id: node.0 };
                if send.send_message(&echo).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = send.finish();
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat stream ended");
                return;
            }
        }
    }
}

async fn dialer(inner: Arc<Inner>, peer: NodeId) {
    let mut backoff = Backoff::new(inner.config.reconnect_base, inner.config.reconnect_max);
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let (wanted, addr, current) = {
            let mut peers = inner.peers.lock().expect("peers lock");
            let st = peers.entry(peer).or_default();
            if !st.wanted || *shutdown.borrow() {
                st.dialer_running = false;
                return;
            }
            (st.wanted, st.addr, st.current.clone().filter(|c| !c.is_closed()))
        };
        debug_assert!(wanted);
        if let Some(c) = current {
            tokio::select! {
                _ = c.closed() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let Some(addr) = addr else { return };
        match connect(&inner, peer, addr).await {
            Ok(_) => backoff.reset(),
            Err(e) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                tracing::debug!(%peer, %addr, error = %e, ?delay, "redialling peer after backoff");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0 keeps the kernel's receive buffer; a size is granted up to what the kernel allows this
    /// process (forced past `rmem_max` with `CAP_NET_ADMIN`, capped at it without).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_peer_socket_gets_the_receive_buffer_asked_for() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let size = || socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let before = size();
        size_socket_buffers(&socket, 0, false);
        assert_eq!(size(), before);
        let want = 3 << 20;
        size_socket_buffers(&socket, want, false);
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
        // Linux books twice the size asked and reports what it booked.
        let got = size() / 2;
        assert!(got >= want || got >= cap, "granted {got} bytes of the {want} asked (rmem_max {cap})");
        assert!(got > before / 2);
    }
}

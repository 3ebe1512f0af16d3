//! The QUIC peer transport: one endpoint per node, one mutually authenticated connection per
//! peer pair, typed streams, zero-copy frames.
//!
//! Reading order: [`config`] (every knob), [`tls`] (identities), [`codec`] (the sans-IO wire
//! format), [`frame`] (zero-copy send and receive), [`stream`] (the async stream driver),
//! [`endpoint`] (the endpoint and peer manager). This module must not know about Raft, jobs or
//! kernels: it moves bytes between authenticated nodes and says who they came from.

pub mod backoff;
pub mod codec;
pub mod config;
pub mod endpoint;
pub mod fault;
pub mod frame;
pub mod stream;
pub mod tls;

use std::fmt;

pub use codec::{CodecError, Limits};
pub use config::{
    Congestion, DEFAULT_JOB_SOCKET_BUFFER, DEFAULT_MAX_MTU, DEFAULT_PEER_PORT, MTU_PROBE_LIMITS, TransportConfig,
    check_max_mtu,
};
pub use endpoint::{
    Heartbeater, InboundStream, PeerConnection, PeerEvent, ReceiveBufferLease, Transport, TransportError,
    TransportHandles,
};
pub use frame::{CopyStats, InFrame, OutFrame, SegmentAccessError};
pub use quiver_proto::peer::{StreamHeader, StreamKind};
pub use stream::{PeerRecvStream, PeerSendStream, StreamError};
pub use tls::{CertificateAuthority, IssuedCert, NodeIdentity, TlsError, Validity};

/// A node's identity in the cluster (the Raft id), as named in its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

/// Who sent a stream that arrived on a token-join connection ([`tls::JOIN_ALPN`]): nobody the
/// cluster knows yet. Node id 0 is reserved, so no certificate can name it.
pub const ANONYMOUS: NodeId = NodeId(0);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}

/// Application error codes on the peer wire: stream stop/reset codes and connection close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// Normal close or finish.
    Ok = 0,
    /// Connection: the transport is shutting down.
    Shutdown = 1,
    /// Connection: a simultaneous dial produced a second connection; the other one is kept.
    Duplicate = 2,
    /// Connection: the peer is no longer wanted (removed from the cluster).
    Removed = 3,
    /// Connection: the certificate names another node than the one dialled.
    WrongPeer = 4,
    /// Connection: it failed a liveness probe while a newer connection from the same node waited
    /// (the peer was killed and restarted; this one was left behind).
    Stale = 5,
    /// Stream: bytes that do not follow the wire format.
    Malformed = 0x10,
    /// Stream: a length or count above the configured limits.
    TooLarge = 0x11,
    /// Stream: the receiver is not interested (no handler, shutting down).
    Refused = 0x12,
    /// Stream: the sender gave up.
    Cancelled = 0x13,
}

impl From<ErrorCode> for quinn::VarInt {
    fn from(c: ErrorCode) -> Self {
        quinn::VarInt::from_u32(c as u32)
    }
}

impl ErrorCode {
    /// The code for a wire value, if it is one of ours.
    pub fn from_wire(v: u64) -> Option<Self> {
        use ErrorCode::*;
        [Ok, Shutdown, Duplicate, Removed, WrongPeer, Stale, Malformed, TooLarge, Refused, Cancelled]
            .into_iter()
            .find(|c| *c as u64 == v)
    }
}

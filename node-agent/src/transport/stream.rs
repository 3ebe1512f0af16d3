//! Typed peer streams: the thin async driver over quinn's send and receive streams.
//!
//! Every read of a length or count goes through [`codec`] before anything is allocated. A stream
//! whose bytes break the rules is stopped (receive side) with an application error code and a
//! warning naming the peer; the connection and its other streams are not touched.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use quiver_compute::AlignedBytes;
use quiver_compute::buf::Storage;
use quiver_proto::peer::{StreamHeader, StreamKind};
use tokio::sync::Semaphore;

use super::codec::{self, CodecError, Limits};
use super::frame::{CopyStats, InFrame, OutFrame};
use super::{ErrorCode, NodeId};

/// Why a stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("peer {peer}: malformed {what} on stream {stream}: {source}")]
    Malformed { peer: NodeId, stream: u64, what: &'static str, source: CodecError },
    #[error("peer {peer}: stream {stream} ended inside a {what}")]
    Truncated { peer: NodeId, stream: u64, what: &'static str },
    #[error("peer {peer}: stream {stream} read failed: {source}")]
    Read { peer: NodeId, stream: u64, source: quinn::ReadError },
    #[error("peer {peer}: stream {stream} write failed: {source}")]
    Write { peer: NodeId, stream: u64, source: quinn::WriteError },
    #[error("peer {peer}: stream {stream} already closed")]
    Closed { peer: NodeId, stream: u64 },
    #[error("peer {peer}: timed out waiting for the header of stream {stream}")]
    HeaderTimeout { peer: NodeId, stream: u64 },
}

/// Send priority by stream kind: higher goes first (quinn orders buffered data by it).
pub fn priority(kind: StreamKind) -> i32 {
    match kind {
        StreamKind::Heartbeat => 100,
        StreamKind::RaftBatch => 90,
        StreamKind::Control => 80,
        StreamKind::ServingForward => 70,
        // A job stream carries its partition (and snapshots and results) as big frames besides the
        // small go/partials messages, so it must not hold back halos on the same connection: a
        // step needs its halos before its next `go` matters anyway.
        StreamKind::Job => 5,
        StreamKind::HaloExchange => 10,
        // Copies of a job's graph and checkpoints: bulk, and behind everything a job waits on.
        StreamKind::Replica => 1,
        StreamKind::PartitionPush | StreamKind::Unspecified => 0,
    }
}

/// The sending half of a typed stream.
#[derive(Debug)]
pub struct PeerSendStream {
    peer: NodeId,
    kind: StreamKind,
    inner: quinn::SendStream,
    limits: Limits,
}

impl PeerSendStream {
    pub(crate) fn new(peer: NodeId, kind: StreamKind, inner: quinn::SendStream, limits: Limits) -> Self {
        let _ = inner.set_priority(priority(kind));
        Self { peer, kind, inner, limits }
    }

    fn id(&self) -> u64 {
        self.inner.id().index()
    }

    /// The peer at the other end.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The stream's kind.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    pub(crate) async fn write_header(&mut self, header: &StreamHeader) -> Result<(), StreamError> {
        self.write_chunks(&mut [codec::encode_stream_header(header)]).await
    }

    async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), StreamError> {
        let (peer, stream) = (self.peer, self.id());
        self.inner.write_all_chunks(chunks).await.map_err(|source| StreamError::Write { peer, stream, source })
    }

    /// Sends one length-delimited message (control, raft, heartbeat, serving streams).
    pub async fn send_message(&mut self, msg: &impl Message) -> Result<(), StreamError> {
        let encoded = codec::encode_message(msg);
        if encoded.len() - codec::MESSAGE_PREFIX_LEN > self.limits.max_message_bytes as usize {
            let source = CodecError::MessageTooLarge { len: encoded.len() as u64, max: self.limits.max_message_bytes };
            return Err(StreamError::Malformed {
                peer: self.peer,
                stream: self.id(),
                what: "outgoing message",
                source,
            });
        }
        self.write_chunks(&mut [encoded]).await
    }

    /// Sends one zero-copy frame: the segments' own memory is handed to quinn.
    pub async fn send_frame(&mut self, frame: &OutFrame) -> Result<(), StreamError> {
        let mut chunks = frame.wire_chunks(&self.limits).map_err(|source| StreamError::Malformed {
            peer: self.peer,
            stream: self.id(),
            what: "outgoing frame",
            source,
        })?;
        self.write_chunks(&mut chunks).await
    }

    /// Ends the stream cleanly.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        self.inner.finish().map_err(|_| StreamError::Closed { peer: self.peer, stream: self.id() })
    }

    /// Waits until the peer has received everything (or stopped the stream). Returns the stop code, if any.
    pub async fn stopped(&mut self) -> Option<u64> {
        self.inner.stopped().await.ok().flatten().map(|c| c.into_inner())
    }

    /// Abandons the stream with an error code.
    pub fn reset(&mut self, code: ErrorCode) {
        let _ = self.inner.reset(code.into());
    }

    /// The underlying quinn stream (escape hatch for raw use, e.g. benchmarks).
    pub fn quinn(&mut self) -> &mut quinn::SendStream {
        &mut self.inner
    }

    pub(crate) fn into_inner(self) -> quinn::SendStream {
        self.inner
    }
}

/// The receiving half of a typed stream.
#[derive(Debug)]
pub struct PeerRecvStream {
    peer: NodeId,
    kind: StreamKind,
    inner: quinn::RecvStream,
    limits: Limits,
    budget: Arc<Semaphore>,
}

/// Units in which the per-connection receive budget is counted.
pub(crate) const BUDGET_UNIT: u64 = 64 << 10;

impl PeerRecvStream {
    pub(crate) fn new(
        peer: NodeId,
        kind: StreamKind,
        inner: quinn::RecvStream,
        limits: Limits,
        budget: Arc<Semaphore>,
    ) -> Self {
        Self { peer, kind, inner, limits, budget }
    }

    fn id(&self) -> u64 {
        self.inner.id().index()
    }

    /// The peer at the other end.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The stream's kind.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Refuses the rest of the stream: stops it with `code` and logs the peer and reason.
    pub fn reject(&mut self, code: ErrorCode, reason: &dyn std::fmt::Display) {
        tracing::warn!(peer = %self.peer, stream = self.id(), kind = ?self.kind, code = ?code, %reason, "stopping peer stream");
        let _ = self.inner.stop(code.into());
    }

    fn malformed(&mut self, what: &'static str, source: CodecError) -> StreamError {
        let code = match source {
            CodecError::HeaderTooLarge { .. }
            | CodecError::MessageTooLarge { .. }
            | CodecError::FrameTooLarge { .. }
            | CodecError::TooManySegments { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        };
        let err = StreamError::Malformed { peer: self.peer, stream: self.id(), what, source };
        self.reject(code, &err);
        err
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte.
    async fn read_exact_or_end(&mut self, buf: &mut [u8], what: &'static str) -> Result<bool, StreamError> {
        let (peer, stream) = (self.peer, self.id());
        let mut at = 0;
        while at < buf.len() {
            match self.inner.read(&mut buf[at..]).await {
                Ok(Some(n)) => at += n,
                Ok(None) if at == 0 => return Ok(false),
                Ok(None) => return Err(StreamError::Truncated { peer, stream, what }),
                Err(source) => return Err(StreamError::Read { peer, stream, source }),
            }
        }
        Ok(true)
    }

    async fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        if self.read_exact_or_end(buf, what).await? || buf.is_empty() {
            Ok(())
        } else {
            Err(StreamError::Truncated { peer: self.peer, stream: self.id(), what })
        }
    }

    pub(crate) async fn read_header(&mut self) -> Result<(StreamHeader, StreamKind), StreamError> {
        let mut prefix = [0u8; codec::PREFIX_LEN];
        self.read_exact(&mut prefix, "stream header").await?;
        let len = codec::decode_stream_prefix(&prefix, &self.limits).map_err(|e| self.malformed("stream header", e))?;
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf, "stream header").await?;
        let (h, kind) = codec::decode_stream_header(&buf).map_err(|e| self.malformed("stream header", e))?;
        self.kind = kind;
        Ok((h, kind))
    }

    /// Receives the next length-delimited message; `None` when the peer finished the stream.
    pub async fn recv_message<M: Message + Default>(&mut self) -> Result<Option<M>, StreamError> {
        let mut prefix = [0u8; codec::MESSAGE_PREFIX_LEN];
        if !self.read_exact_or_end(&mut prefix, "message").await? {
            return Ok(None);
        }
        let len = codec::decode_message_prefix(&prefix, &self.limits).map_err(|e| self.malformed("message", e))?;
        let mut buf = vec![0u8; len];
        self.read_exact(&mut buf, "message").await?;
        M::decode(&buf[..])
            .map(Some)
            .map_err(|e| self.malformed("message", CodecError::Decode { what: "message", reason: e.to_string() }))
    }

    /// Receives the next zero-copy frame; `None` when the peer finished the stream.
    ///
    /// The payload is copied exactly once, chunk by chunk, from quinn into one freshly allocated
    /// 64-byte-aligned buffer; the returned frame's segments view that buffer in place.
    pub async fn recv_frame(&mut self) -> Result<Option<InFrame>, StreamError> {
        self.recv_frame_into(None).await
    }

    /// Like [`Self::recv_frame`], but copies into `reuse` when it is large enough.
    ///
    /// Fresh memory costs a page fault and a kernel zeroing per page on first touch — on this
    /// project's VMs about 0.9 s of CPU per GiB, more than QUIC itself spends. Callers that receive
    /// repeatedly (halo exchange every superstep, a node taking in many partitions) hand back the
    /// buffer of a frame they are done with ([`InFrame::reclaim`]) and receive into warm memory.
    /// Bytes of `reuse` past the payload and in the padding between segments keep old contents;
    /// no segment views them.
    pub async fn recv_frame_into(&mut self, reuse: Option<AlignedBytes>) -> Result<Option<InFrame>, StreamError> {
        let mut prefix = [0u8; codec::PREFIX_LEN];
        if !self.read_exact_or_end(&mut prefix, "frame").await? {
            return Ok(None);
        }
        let hlen = codec::decode_frame_prefix(&prefix, &self.limits).map_err(|e| self.malformed("frame header", e))?;
        let mut hbuf = vec![0u8; hlen];
        self.read_exact(&mut hbuf, "frame header").await?;
        let (header, layout) =
            codec::decode_frame_header(&hbuf, &self.limits).map_err(|e| self.malformed("frame header", e))?;
        let total = layout.total as usize;

        // Checked against max_frame_bytes above; the budget bounds the sum over this connection's streams.
        let units = total.div_ceil(BUDGET_UNIT as usize) as u32;
        let _permit = self.budget.acquire_many(units).await.expect("budget semaphore is never closed");

        let (peer, stream) = (self.peer, self.id());
        let (mut buf, fresh) = match reuse {
            Some(b) if b.len() >= total => (b, false),
            _ => (AlignedBytes::zeroed(total), true),
        };
        let _prefault = fresh.then(|| PrefaultTask::start(&buf)).flatten();
        let mut stats = CopyStats { buffers: u32::from(fresh), reused: !fresh, ..CopyStats::default() };
        {
            let dst = buf.as_mut_slice();
            let mut at = 0usize;
            while at < total {
                let chunk = match self.inner.read_chunk(total - at, true).await {
                    Ok(Some(c)) => c,
                    Ok(None) => return Err(StreamError::Truncated { peer, stream, what: "frame payload" }),
                    Err(source) => return Err(StreamError::Read { peer, stream, source }),
                };
                let n = chunk.bytes.len();
                dst[at..at + n].copy_from_slice(&chunk.bytes);
                at += n;
                stats.chunks += 1;
                stats.bytes_copied += n as u64;
            }
        }
        Ok(Some(InFrame::new(header, layout, Arc::new(Storage::Heap(buf)), stats)))
    }

    /// Stops the stream because the application is not interested in the rest.
    pub fn stop(&mut self, code: ErrorCode) {
        let _ = self.inner.stop(code.into());
    }

    /// The underlying quinn stream (escape hatch for raw use, e.g. benchmarks).
    pub fn quinn(&mut self) -> &mut quinn::RecvStream {
        &mut self.inner
    }
}

/// Backs a fresh payload buffer's pages on tokio's blocking pool while the receive loop copies
/// into it (see [`AlignedBytes::prefault`]); stops when dropped, i.e. when the frame is complete or
/// the receive failed.
///
/// The page faults and kernel zeroing of a fresh 1 GiB buffer cost about 0.3–0.9 CPU-s here. Done
/// as a memset before the copy, the reader waits for the whole buffer while the sender sits on a
/// full flow-control window; done lazily inside the copy, they slow the reader and delay the other
/// tasks on its async worker. Ahead of the copy, on another thread, they overlap with both; the
/// copy does not wait for them (making it wait measured slower), so where it catches up it faults
/// the next pages itself. Numbers: benches/RESULTS.md, Transport.
struct PrefaultTask {
    stop: Arc<AtomicBool>,
}

impl PrefaultTask {
    fn start(buf: &AlignedBytes) -> Option<Self> {
        let prefault = buf.prefault()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // Detached: the task holds the mapping alive by itself and ends at the flag or the end.
        drop(tokio::task::spawn_blocking(move || prefault.run(|_| !flag.load(Ordering::Relaxed))));
        Some(Self { stop })
    }
}

impl Drop for PrefaultTask {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads a stream header with a deadline.
pub(crate) async fn read_header_with_timeout(
    recv: &mut PeerRecvStream,
    timeout: Duration,
) -> Result<(StreamHeader, StreamKind), StreamError> {
    match tokio::time::timeout(timeout, recv.read_header()).await {
        Ok(r) => r,
        Err(_) => {
            let err = StreamError::HeaderTimeout { peer: recv.peer, stream: recv.id() };
            recv.reject(ErrorCode::Malformed, &err);
            Err(err)
        }
    }
}

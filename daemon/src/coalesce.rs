//! [`Coalesced`]: one TLS record and one `writev` for everything HTTP/2 writes between two
//! flushes.
//!
//! `h2` writes a response as several frames (HEADERS, DATA, the trailing HEADERS with
//! `grpc-status`), each with its own `poll_write`, and flushes once it has nothing more to send.
//! Straight onto a `tokio_rustls` stream every `poll_write` is sealed as its own TLS record and
//! sent with its own `writev`: a small `Diffuse` answer cost 1.6 `writev`s, each one a trip
//! through the loopback TCP stack and a wake-up of the reader. This adapter keeps the writes in a
//! buffer and hands them to the stream as one write when `h2` flushes (or when the buffer is
//! full), so a burst of answers ready at the same moment leaves as one record.
//!
//! It also reports no vectored writes, which makes `h2` copy DATA payloads of up to 1 KiB into
//! its own buffer instead of chaining them: a chained payload forces a flush before the frame
//! after it, so a small answer's DATA and trailers would leave apart.
//!
//! Nothing waits for more data: a flush from `h2` always reaches the socket, so latency is not
//! traded for the saving.
//!
//! The agent's gRPC server wraps each TLS stream (`agent::auth::incoming`): HTTP/2 frames
//! coalesce before encryption, one record per flush. The CLI and `quiver bench serve` connect
//! through [`Connector`], which wraps the TCP stream under tonic's own TLS: records coalesce
//! into one `writev` per flush (a `Diffuse` request was 2.5 `writev`s before).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes kept before a write goes to the stream without waiting for a flush.
const CAPACITY: usize = 64 << 10;

/// An [`AsyncWrite`] that sends what it is given on flush, as one write (module docs).
#[derive(Debug)]
pub struct Coalesced<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `inner`.
    sent: usize,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Coalesced { inner, buf: Vec::new(), sent: 0 }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Hands every buffered byte to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `want` more bytes (draining a full buffer first); returns how many fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if want > 0 && self.buf.len() >= CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(want.min(CAPACITY.saturating_sub(self.buf.len()))))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_room(cx, data.len()))?;
        self.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    /// The wrapped stream's (for TLS: the peer's certificates, which authentication reads).
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A tonic client connector: TCP to the URI's `host:port`, no Nagle delay, writes [`Coalesced`].
/// tonic adds its TLS on top when the endpoint has a TLS configuration.
#[derive(Clone, Copy, Debug, Default)]
pub struct Connector;

impl tower_service::Service<tonic::codegen::http::Uri> for Connector {
    type Response = TokioIo<Coalesced<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        Box::pin(async move {
            let host =
                uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host")))?;
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(Coalesced::new(tcp)))
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A writer that counts the writes it is given.
    #[derive(Default)]
    struct Counting {
        writes: usize,
        data: Vec<u8>,
        flushes: usize,
    }

    impl AsyncWrite for Counting {
        fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.data.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_between_flushes_leave_as_one() {
        let mut c = Coalesced::new(Counting::default());
        for frame in [&b"headers"[..], b"data", b"trailers"] {
            c.write_all(frame).await.unwrap();
        }
        assert_eq!(c.inner.writes, 0, "nothing leaves before the flush");
        c.flush().await.unwrap();
        assert_eq!((c.inner.writes, c.inner.flushes), (1, 1));
        assert_eq!(c.inner.data, b"headersdatatrailers");
        c.flush().await.unwrap();
        assert_eq!(c.inner.writes, 1, "an empty flush writes nothing");
    }

    #[tokio::test]
    async fn a_full_buffer_is_written_without_a_flush_and_nothing_is_lost() {
        let mut c = Coalesced::new(Counting::default());
        let big: Vec<u8> = (0..CAPACITY * 3 + 17).map(|i| (i % 251) as u8).collect();
        c.write_all(&big).await.unwrap();
        assert!(c.inner.writes >= 2 && c.buf.len() <= CAPACITY, "{} writes", c.inner.writes);
        c.shutdown().await.unwrap();
        assert_eq!(c.inner.data, big);
    }

    /// The connector reaches IPv4 and (where the machine has it) IPv6 loopback listeners.
    #[tokio::test]
    async fn the_connector_reaches_v4_and_v6_loopback() {
        use tower_service::Service as _;
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
                assert!(bind.starts_with('['), "cannot bind {bind}");
                continue;
            };
            let addr = listener.local_addr().unwrap();
            let uri: tonic::codegen::http::Uri = format!("https://{addr}").parse().unwrap();
            let (io, accepted) = tokio::join!(Connector.call(uri), listener.accept());
            let mut io = io.unwrap().into_inner();
            let (mut peer, _) = accepted.unwrap();
            io.write_all(b"hello").await.unwrap();
            io.flush().await.unwrap();
            let mut got = [0u8; 5];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hello", "{bind}");
        }
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Coalesced::new(a);
        b.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        c.write_all(b"pong").await.unwrap();
        c.flush().await.unwrap();
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }
}

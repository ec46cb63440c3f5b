//! The admin server's connections: a cap on how many are served at once, a
//! deadline for each request's header, an idle timeout, and a bound on
//! header size.
//!
//! `axum::serve` has none of these: a client that sent half a header kept
//! its connection (and a descriptor) forever, and 1,100 such connections
//! left the health probes without descriptors, so every backend went down.
//! Here a connection is accepted only when a slot is free (others wait in
//! the kernel's listen backlog, which costs the agent no descriptor), and
//! each is closed when its client stalls.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, UnixListener},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// What one admin client may hold, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog until one
    /// closes. The agent's descriptor budget may lower it (see
    /// `crate::descriptors`).
    pub max_connections: usize,
    /// Time a client has to send a whole request header, counted from the
    /// connection's start or the end of its previous response, so it is
    /// also how long a kept-alive connection may sit between requests.
    pub header_read_timeout: Duration,
    /// Time a connection may make no progress reading or writing at any other
    /// point, e.g. a client that stops reading its response.
    pub idle_timeout: Duration,
    /// Largest request header (request line and fields), in bytes; larger
    /// ones get 431 and the connection is closed.
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
}

impl Limits {
    /// Enough for Prometheus, `lb status` and a few people with curl; small
    /// enough that the admin server can never take the descriptors the
    /// health probes need.
    pub const DEFAULT: Limits = Limits {
        max_connections: 256,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_header_bytes: 16 * 1024,
        max_headers: 64,
    };
}

/// Pause after a failed `accept` (e.g. EMFILE), so a pending connection the
/// kernel keeps offering does not make the loop spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until the task is dropped.
pub async fn accept_loop(listener: TcpListener, app: Router, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    loop {
        // Taken before accept: past the cap, connections stay in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve_connection(stream, app.clone(), limits, slot, peer));
            }
            Err(error) => {
                tracing::warn!(%error, "admin server: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves `app` on the Unix socket `listener` until the task is dropped,
/// within the same limits as [`accept_loop`].
pub async fn accept_loop_unix(listener: UnixListener, app: Router, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, app.clone(), limits, slot, "unix socket"));
            }
            Err(error) => {
                tracing::warn!(%error, "control socket: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves one connection as HTTP/1.1 within `limits`; `slot` is released
/// when it closes.
async fn serve_connection<S>(
    stream: S,
    app: Router,
    limits: Limits,
    slot: OwnedSemaphorePermit,
    peer: impl std::fmt::Display,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(IdleTimeout::new(stream, limits.idle_timeout));
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .serve_connection(io, TowerToHyperService::new(app))
        .await;
    if let Err(error) = result {
        // Timeouts and clients that hang up are routine: not worth a warning.
        tracing::debug!(%peer, %error, "admin connection closed");
    }
    drop(slot);
}

/// A stream that fails with `TimedOut` once it has made no progress
/// (neither read nor written a byte) for `timeout` while the server waits
/// on it. Time spent in a handler, when nothing waits on the stream, does
/// not count.
struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        IdleTimeout { inner, timeout, deadline: Box::pin(tokio::time::sleep(timeout)) }
    }

    /// Some progress: the timeout starts again.
    fn progressed(&mut self) {
        let next = Instant::now() + self.timeout;
        self.deadline.as_mut().reset(next);
    }

    /// Called when the inner stream is not ready: an error once the deadline
    /// has passed, else pending (the deadline's timer wakes the task).
    fn pending_or_expired<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "admin connection idle too long")))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                self.progressed();
                Poll::Ready(result)
            }
            Poll::Pending => self.pending_or_expired(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(result) => {
                self.progressed();
                Poll::Ready(result)
            }
            Poll::Pending => self.pending_or_expired(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.pending_or_expired(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.pending_or_expired(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
        time::timeout,
    };

    use super::*;

    /// Short limits, so each test takes a fraction of a second.
    const TEST_LIMITS: Limits = Limits {
        max_connections: 2,
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(500),
        max_header_bytes: 8 * 1024,
        max_headers: 16,
    };

    /// A bound on every wait, so a broken limit fails rather than hangs.
    const WAIT: Duration = Duration::from_secs(5);

    async fn server(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        let app =
            Router::new().route("/", get(|| async { "ok" })).route("/big", get(|| async { vec![b'x'; 16 << 20] }));
        tokio::spawn(accept_loop(listener, app, limits));
        address
    }

    /// Reads until the server closes the connection; returns what came.
    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut got = Vec::new();
        timeout(WAIT, stream.read_to_end(&mut got)).await.expect("closed in time").expect("read");
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn get_root(stream: &mut TcpStream) -> String {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut buf = vec![0; 1024];
        let n = timeout(WAIT, stream.read(&mut buf)).await.expect("an answer in time").expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn a_half_sent_header_is_closed_after_the_header_timeout() {
        let address = server(TEST_LIMITS).await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        let started = std::time::Instant::now();
        read_to_close(&mut stream).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_loses_its_connection() {
        let limits = Limits { max_connections: 1, ..TEST_LIMITS };
        let address = server(limits).await;
        let mut stalled = TcpStream::connect(address).await.expect("connect");
        // 16 MiB fills both socket buffers; the client then reads nothing.
        stalled.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The only slot frees once the idle timeout closes the stalled one.
        let started = std::time::Instant::now();
        let mut next = TcpStream::connect(address).await.expect("connect (backlog)");
        assert!(get_root(&mut next).await.starts_with("HTTP/1.1 200"));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "served while the stalled one held the slot: {waited:?}");
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_after_the_header_timeout() {
        let address = server(TEST_LIMITS).await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        assert!(get_root(&mut stream).await.starts_with("HTTP/1.1 200"));
        let started = std::time::Instant::now();
        read_to_close(&mut stream).await;
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_slot() {
        let address = server(TEST_LIMITS).await;
        let mut first = TcpStream::connect(address).await.expect("connect");
        let mut second = TcpStream::connect(address).await.expect("connect");
        assert!(get_root(&mut first).await.starts_with("HTTP/1.1 200"));
        assert!(get_root(&mut second).await.starts_with("HTTP/1.1 200"));
        // The kernel completes the third handshake, but the server does not
        // accept it while two connections hold the slots.
        let mut third = TcpStream::connect(address).await.expect("connect (backlog)");
        third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut buf = [0; 64];
        let early = timeout(Duration::from_millis(150), third.read(&mut buf)).await;
        assert!(early.is_err(), "served past the cap: {early:?}");
        drop(first);
        let n = timeout(WAIT, third.read(&mut buf)).await.expect("served once a slot is free").expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused() {
        let address = server(TEST_LIMITS).await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let filler = "x".repeat(9 * 1024);
        let request = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n");
        // The server may close while we still write; only its answer matters.
        let _ = stream.write_all(request.as_bytes()).await;
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    }
}

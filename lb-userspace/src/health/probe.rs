//! One health probe: a TCP connect, or a minimal HTTP/1.1 GET that reads no
//! further than the status line.
//!
//! Written by hand rather than with an HTTP client crate: a probe needs one
//! request, one status code and a hard deadline, nothing more, and owning the
//! code keeps the failure reasons precise ("connect: ...", "timed out after
//! ...", "HTTP status 503, expected 200-399") for `/status` and the logs.

use std::{fmt, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

use crate::config::model::{HealthCheckKind, StatusRange};

/// How much of the response may come before the end of the status line; a
/// real server's status line is a few dozen bytes, so more is not HTTP.
pub const MAX_STATUS_LINE: usize = 4096;

/// How much of an unexpected status line a failure reason quotes.
const EXCERPT_LEN: usize = 64;

/// Why a probe failed. Its `Display` is the reason operators see in `/status`
/// and in transition logs, so every variant says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeFailure {
    /// The TCP connection was refused, unreachable, reset, ...
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The gateway could not run the probe: no descriptor or buffer for its
    /// socket (EMFILE, ENFILE, ENOBUFS, ENOMEM). Says nothing about the
    /// backend, so it never counts against it (see [`ProbeFailure::is_local`]).
    #[error("local error, not the backend's: {step}: {error}")]
    Local {
        /// `socket` or `connect`.
        step: &'static str,
        #[source]
        error: std::io::Error,
    },
    /// Writing the HTTP request failed.
    #[error("send request: {0}")]
    Send(#[source] std::io::Error),
    /// Reading the HTTP response failed.
    #[error("read response: {0}")]
    Receive(#[source] std::io::Error),
    /// The whole probe (connect, request, status line) took too long.
    #[error("timed out after {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// The peer closed the connection before a complete status line.
    #[error("connection closed after {received} bytes, before the end of the status line")]
    Closed { received: usize },
    /// The response does not start with an HTTP/1.x status line.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The server answered with a status outside the expected range.
    #[error("HTTP status {status}, expected {}", ShowRange(*.expected))]
    Status { status: u16, expected: StatusRange },
    /// The configured path or host cannot go into a request line or header
    /// (config validation should have caught it; this keeps the probe from
    /// sending a split request).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ProbeFailure {
    /// Whether the probe failed on this host rather than at the backend:
    /// such a result must not move the backend's rise/fall streaks.
    pub fn is_local(&self) -> bool {
        matches!(self, ProbeFailure::Local { .. })
    }
}

/// Errors of `socket()` and `connect()` that mean this host ran out of
/// something (descriptors, buffers, memory), not that the backend failed.
fn is_local_shortage(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Runs one probe of `kind` against `address`, bounded as a whole by
/// `timeout`. `Ok(())` means healthy.
///
/// [`HealthCheckKind::None`] is always healthy without touching the network.
///
/// # Errors
/// The reason the backend is unhealthy, see [`ProbeFailure`].
pub async fn run(address: SocketAddr, kind: &HealthCheckKind, timeout: Duration) -> Result<(), ProbeFailure> {
    match tokio::time::timeout(timeout, attempt(address, kind)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ProbeFailure::TimedOut(timeout)),
    }
}

/// The probe without its deadline.
async fn attempt(address: SocketAddr, kind: &HealthCheckKind) -> Result<(), ProbeFailure> {
    match kind {
        HealthCheckKind::Tcp => connect(address).await.map(drop),
        HealthCheckKind::Http { path, expect_status, host } => {
            http(address, path, host.as_deref(), *expect_status).await
        }
        HealthCheckKind::None => Ok(()),
    }
}

/// Opens the connection; dropping the stream closes it right away. The
/// socket is made apart from the connect, so a shortage of descriptors is
/// told from a backend that refuses.
async fn connect(address: SocketAddr) -> Result<TcpStream, ProbeFailure> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    // Any other socket() error (EAFNOSUPPORT, ...) means this host cannot
    // probe the backend at all, which is as good as the backend failing.
    let socket = socket.map_err(|error| classify("socket", error))?;
    socket.connect(address).await.map_err(|error| classify("connect", error))
}

/// A failure of `step`: local if this host ran short, else the backend's.
fn classify(step: &'static str, error: std::io::Error) -> ProbeFailure {
    if is_local_shortage(&error) { ProbeFailure::Local { step, error } } else { ProbeFailure::Connect(error) }
}

/// GET `path`, read the status line, compare its code with `expect`. The
/// body is never read: dropping the stream closes the connection.
async fn http(address: SocketAddr, path: &str, host: Option<&str>, expect: StatusRange) -> Result<(), ProbeFailure> {
    let request = request(path, host, address)?;
    let mut stream = connect(address).await?;
    if let Err(error) = stream.set_nodelay(true) {
        // Only latency: the request goes out in one write either way.
        tracing::debug!(%address, %error, "setting TCP_NODELAY failed");
    }
    stream.write_all(request.as_bytes()).await.map_err(ProbeFailure::Send)?;
    let line = read_status_line(&mut stream).await?;
    let status = parse_status_line(&line)?;
    if expect.contains(status) { Ok(()) } else { Err(ProbeFailure::Status { status, expected: expect }) }
}

/// The request bytes. `Host` is the configured host, else the probed
/// address (`10.0.0.1:8080`, `[fd00::1]:8080`), which is valid Host syntax.
///
/// # Errors
/// When `path` or `host` would break the request's framing.
pub fn request(path: &str, host: Option<&str>, address: SocketAddr) -> Result<String, ProbeFailure> {
    if !path.starts_with('/') || !is_token_text(path) {
        let problem = format!("path {path:?} must start with '/' and have no spaces or control characters");
        return Err(ProbeFailure::InvalidRequest(problem));
    }
    let host = host.map_or_else(|| address.to_string(), str::to_owned);
    if host.is_empty() || !is_token_text(&host) {
        let problem = format!("host {host:?} must be non-empty, with no spaces or control characters");
        return Err(ProbeFailure::InvalidRequest(problem));
    }
    Ok(format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ))
}

/// Whether `text` can sit in a request line or header value unescaped.
fn is_token_text(text: &str) -> bool {
    text.bytes().all(|b| b > b' ' && b != 0x7f)
}

/// Reads until the first CRLF and returns the bytes before it.
///
/// # Errors
/// [`ProbeFailure::Closed`] on EOF first, [`ProbeFailure::Malformed`] when
/// [`MAX_STATUS_LINE`] bytes hold no CRLF, [`ProbeFailure::Receive`] on I/O
/// errors.
pub async fn read_status_line<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, ProbeFailure> {
    let mut buf = vec![0; MAX_STATUS_LINE];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            return Err(ProbeFailure::Malformed(format!(
                "no status line in the first {MAX_STATUS_LINE} bytes: {}",
                excerpt(&buf)
            )));
        }
        let read = reader.read(&mut buf[filled..]).await.map_err(ProbeFailure::Receive)?;
        if read == 0 {
            return Err(ProbeFailure::Closed { received: filled });
        }
        // A CR that ended the previous read may pair with this read's LF.
        let from = filled.saturating_sub(1);
        filled += read;
        if let Some(at) = find_crlf(&buf[from..filled]) {
            buf.truncate(from + at);
            return Ok(buf);
        }
    }
}

/// Offset of the first `\r\n` in `bytes`.
fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|pair| pair == b"\r\n")
}

/// The status code of `HTTP/1.x NNN[ reason]`.
///
/// # Errors
/// [`ProbeFailure::Malformed`], quoting the start of the line, for anything
/// else (another protocol, HTTP/0.9 or 2, a code that is not three digits).
pub fn parse_status_line(line: &[u8]) -> Result<u16, ProbeFailure> {
    let malformed = || ProbeFailure::Malformed(format!("expected \"HTTP/1.x NNN ...\", got {}", excerpt(line)));
    let rest = line.strip_prefix(b"HTTP/1.").ok_or_else(malformed)?;
    let [minor, b' ', d1, d2, d3, tail @ ..] = rest else { return Err(malformed()) };
    if !minor.is_ascii_digit() || !matches!(tail.first(), None | Some(b' ')) {
        return Err(malformed());
    }
    status_code([*d1, *d2, *d3]).ok_or_else(malformed)
}

/// Three ASCII digits as a number.
fn status_code(digits: [u8; 3]) -> Option<u16> {
    digits.iter().try_fold(0_u16, |code, &d| d.is_ascii_digit().then(|| code * 10 + u16::from(d - b'0')))
}

/// The start of `bytes`, lossily decoded and escaped, so a failure reason
/// never carries control characters or a whole response into the logs.
fn excerpt(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(EXCERPT_LEN)];
    let more = if bytes.len() > EXCERPT_LEN { "..." } else { "" };
    format!("{:?}{more}", String::from_utf8_lossy(head))
}

/// Displays a [`StatusRange`] the way the config writes it: `200-399` or `200`.
struct ShowRange(StatusRange);

impl fmt::Display for ShowRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let StatusRange { min, max } = self.0;
        if min == max { write!(f, "{min}") } else { write!(f, "{min}-{max}") }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{io::AsyncWriteExt as _, net::TcpListener, sync::oneshot};

    use super::*;

    const OK_RANGE: StatusRange = StatusRange { min: 200, max: 399 };
    const TIMEOUT: Duration = Duration::from_millis(500);

    fn http_check(expect_status: StatusRange) -> HealthCheckKind {
        HealthCheckKind::Http { path: "/healthz".to_owned(), expect_status, host: None }
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        (listener, address)
    }

    /// Reads one request head (up to the blank line), so closing the server
    /// side never resets the connection before the client reads the answer.
    async fn read_request(stream: &mut TcpStream) -> String {
        let mut request = Vec::new();
        let mut chunk = [0; 1024];
        while !request.ends_with(b"\r\n\r\n") && request.len() < 16 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&request).into_owned()
    }

    /// Serves `response` (in the given pieces) to every connection and sends
    /// each captured request head on the returned channel's first slot.
    async fn serve(pieces: Vec<&'static [u8]>) -> (SocketAddr, oneshot::Receiver<String>) {
        let (listener, address) = listener().await;
        let (captured_tx, captured_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut captured_tx = Some(captured_tx);
            while let Ok((mut stream, _)) = listener.accept().await {
                let request = read_request(&mut stream).await;
                if let Some(tx) = captured_tx.take() {
                    let _ = tx.send(request);
                }
                for piece in &pieces {
                    if stream.write_all(piece).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        (address, captured_rx)
    }

    async fn probe_response(response: &'static [u8], expect: StatusRange) -> Result<(), ProbeFailure> {
        let (address, _captured) = serve(vec![response]).await;
        run(address, &http_check(expect), TIMEOUT).await
    }

    #[tokio::test]
    async fn http_200_is_healthy() {
        let result = probe_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", OK_RANGE).await;
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn http_503_fails_with_the_status_in_the_reason() {
        let result = probe_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", OK_RANGE).await;
        let error = result.expect_err("503 is outside 200-399");
        assert!(matches!(error, ProbeFailure::Status { status: 503, .. }), "{error:?}");
        assert_eq!(error.to_string(), "HTTP status 503, expected 200-399");
    }

    #[tokio::test]
    async fn http_204_is_within_200_299() {
        let result = probe_response(b"HTTP/1.1 204 No Content\r\n\r\n", StatusRange { min: 200, max: 299 }).await;
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn single_status_range_is_shown_as_one_code() {
        let error = probe_response(b"HTTP/1.0 301 Moved\r\n\r\n", StatusRange { min: 200, max: 200 })
            .await
            .expect_err("301 is not 200");
        assert_eq!(error.to_string(), "HTTP status 301, expected 200");
    }

    #[tokio::test]
    async fn status_line_split_across_reads_is_reassembled() {
        let (address, _captured) = serve(vec![b"HTTP/1.1 2", b"00 OK\r", b"\n\r\n"]).await;
        let result = run(address, &http_check(OK_RANGE), TIMEOUT).await;
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let error = probe_response(b"SSH-2.0-OpenSSH_9.6\r\n", OK_RANGE).await.expect_err("not HTTP");
        assert!(matches!(error, ProbeFailure::Malformed(_)), "{error:?}");
        assert!(error.to_string().starts_with("malformed response: "), "{error}");
        assert!(error.to_string().contains("SSH-2.0"), "{error}");
    }

    #[tokio::test]
    async fn no_crlf_within_the_cap_is_malformed() {
        static FLOOD: [u8; MAX_STATUS_LINE + 100] = [b'x'; MAX_STATUS_LINE + 100];
        let error = probe_response(&FLOOD, OK_RANGE).await.expect_err("no status line");
        assert!(matches!(error, ProbeFailure::Malformed(_)), "{error:?}");
        assert!(error.to_string().len() < 200, "the reason quotes only an excerpt: {error}");
    }

    #[tokio::test]
    async fn close_without_answer_is_reported() {
        let error = probe_response(b"", OK_RANGE).await.expect_err("no answer");
        assert_eq!(error.to_string(), "connection closed after 0 bytes, before the end of the status line");
    }

    #[tokio::test]
    async fn silent_server_times_out_within_roughly_the_timeout() {
        let (listener, address) = listener().await;
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let error = run(address, &http_check(OK_RANGE), timeout).await.expect_err("never answers");
        let elapsed = started.elapsed();
        assert_eq!(error.to_string(), "timed out after 200ms");
        assert!(elapsed >= Duration::from_millis(180) && elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn closed_port_is_connect_refused() {
        let (listener, address) = listener().await;
        drop(listener);
        for kind in [HealthCheckKind::Tcp, http_check(OK_RANGE)] {
            let error = run(address, &kind, TIMEOUT).await.expect_err("nothing listens");
            assert!(matches!(error, ProbeFailure::Connect(_)), "{error:?}");
            assert!(error.to_string().starts_with("connect: Connection refused"), "{error}");
        }
    }

    #[tokio::test]
    async fn tcp_accept_is_healthy() {
        let (_listener, address) = listener().await;
        let result = run(address, &HealthCheckKind::Tcp, TIMEOUT).await;
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn none_is_healthy_without_network() {
        let unroutable: SocketAddr = "192.0.2.1:9".parse().expect("address");
        let result = run(unroutable, &HealthCheckKind::None, TIMEOUT).await;
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn request_defaults_host_to_the_address() {
        let (address, captured) = serve(vec![b"HTTP/1.1 200 OK\r\n\r\n"]).await;
        run(address, &http_check(OK_RANGE), TIMEOUT).await.expect("healthy");
        let request = captured.await.expect("request captured");
        let expected = format!(
            "GET /healthz HTTP/1.1\r\nHost: {address}\r\n\
             User-Agent: lb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(request, expected);
    }

    #[tokio::test]
    async fn request_uses_the_configured_host() {
        let (address, captured) = serve(vec![b"HTTP/1.1 200 OK\r\n\r\n"]).await;
        let kind = HealthCheckKind::Http {
            path: "/status?full=1".to_owned(),
            expect_status: OK_RANGE,
            host: Some("api.example.com".to_owned()),
        };
        run(address, &kind, TIMEOUT).await.expect("healthy");
        let request = captured.await.expect("request captured");
        assert_eq!(
            request,
            "GET /status?full=1 HTTP/1.1\r\nHost: api.example.com\r\n\
             User-Agent: lb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn request_host_for_ipv6_is_bracketed() {
        let address: SocketAddr = "[fd00::1]:8080".parse().expect("address");
        let request = request("/", None, address).expect("valid");
        assert!(request.contains("\r\nHost: [fd00::1]:8080\r\n"), "{request}");
    }

    #[test]
    fn request_rejects_framing_breakers() {
        let address: SocketAddr = "127.0.0.1:80".parse().expect("address");
        let cases = [("/a b", None), ("/a\r\nX: y", None), ("health", None), ("/", Some("a\r\nb")), ("/", Some(""))];
        for (path, host) in cases {
            let error = request(path, host, address).expect_err("must be rejected");
            assert!(matches!(error, ProbeFailure::InvalidRequest(_)), "{path:?} {host:?}: {error:?}");
        }
    }

    #[test]
    fn shortages_on_this_host_are_local_errors() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let failure = classify("socket", std::io::Error::from_raw_os_error(errno));
            assert!(failure.is_local(), "{errno}: {failure:?}");
        }
        for errno in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ENETUNREACH, libc::EINVAL] {
            let failure = classify("connect", std::io::Error::from_raw_os_error(errno));
            assert!(matches!(failure, ProbeFailure::Connect(_)), "{errno}: {failure:?}");
        }
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK").ok(), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 404").ok(), Some(404));
        assert_eq!(parse_status_line(b"HTTP/1.1 503 Service Unavailable").ok(), Some(503));
        let bad_lines: [&[u8]; 7] = [
            b"HTTP/2 200",
            b"HTTP/1.1 20",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 2x0 OK",
            b"http/1.1 200",
            b"",
            b"HTTP/1.1  200",
        ];
        for bad in bad_lines {
            let result = parse_status_line(bad);
            assert!(matches!(result, Err(ProbeFailure::Malformed(_))), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}

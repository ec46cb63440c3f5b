//! `type = "http"`: a minimal HTTP/1.1 GET. Reads no further than the status
//! line, unless `expect_body` asks for a text in the body; then it reads the
//! headers and at most [`MAX_BODY`] bytes of body. `https` runs the same
//! exchange over TLS.

use std::{fmt, net::SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{ProbeFailure, connect, excerpt};
use crate::config::model::StatusRange;

/// How much of the response may come before the end of the status line; a
/// real server's status line is a few dozen bytes, so more is not HTTP.
pub const MAX_STATUS_LINE: usize = 4096;

/// How much of the headers an `expect_body` check reads before giving up.
pub const MAX_HEADERS: usize = 16 * 1024;

/// How much of the body an `expect_body` check reads: a health page is
/// small, and the probe must stay cheap whatever the backend sends.
pub const MAX_BODY: usize = 64 * 1024;

/// What an HTTP or HTTPS probe asks and expects.
#[derive(Clone, Copy, Debug)]
pub struct Check<'a> {
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub expect_status: StatusRange,
    /// Text the body must contain; `None` reads no body.
    pub expect_body: Option<&'a str>,
}

/// GET over plain TCP.
///
/// # Errors
/// The reason the backend is unhealthy, see [`ProbeFailure`].
pub async fn probe(address: SocketAddr, check: &Check<'_>) -> Result<(), ProbeFailure> {
    let request = request(check.path, check.host, address)?;
    let mut stream = connect(address).await?;
    if let Err(error) = stream.set_nodelay(true) {
        // Only latency: the request goes out in one write either way.
        tracing::debug!(%address, %error, "setting TCP_NODELAY failed");
    }
    exchange(&mut stream, &request, check).await
}

/// Sends `request` on `stream`, then checks the status line and, with
/// `expect_body`, the body. The caller drops the stream, which closes it.
///
/// # Errors
/// The reason the backend is unhealthy, see [`ProbeFailure`].
pub async fn exchange<S>(stream: &mut S, request: &str, check: &Check<'_>) -> Result<(), ProbeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request.as_bytes()).await.map_err(ProbeFailure::Send)?;
    stream.flush().await.map_err(ProbeFailure::Send)?;
    let (line, rest) = read_head_line(stream).await?;
    let status = parse_status_line(&line)?;
    if !check.expect_status.contains(status) {
        return Err(ProbeFailure::Status { status, expected: check.expect_status });
    }
    match check.expect_body {
        Some(expected) => find_in_body(stream, rest, expected).await,
        None => Ok(()),
    }
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
    read_head_line(reader).await.map(|(line, _rest)| line)
}

/// As [`read_status_line`], and also returns what was read past the CRLF.
async fn read_head_line<R: AsyncRead + Unpin>(reader: &mut R) -> Result<(Vec<u8>, Vec<u8>), ProbeFailure> {
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
        if let Some(at) = find(&buf[from..filled], b"\r\n") {
            let rest = buf[from + at + 2..filled].to_vec();
            buf.truncate(from + at);
            return Ok((buf, rest));
        }
    }
}

/// Reads the headers after the status line (`read` holds what came with
/// it), then the body until it contains `expected`, ends, or reaches
/// [`MAX_BODY`]. The body is taken as sent: a chunked body's chunk-size
/// lines stay in it, so the text should not straddle a chunk boundary.
async fn find_in_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut read: Vec<u8>,
    expected: &str,
) -> Result<(), ProbeFailure> {
    let body_start = loop {
        // `read` starts right after the status line's CRLF.
        if read.starts_with(b"\r\n") {
            break 2;
        }
        if let Some(at) = find(&read, b"\r\n\r\n") {
            break at + 4;
        }
        if read.len() > MAX_HEADERS {
            return Err(ProbeFailure::Malformed(format!("no end of the headers in {MAX_HEADERS} bytes")));
        }
        if !read_more(reader, &mut read).await? {
            return Err(ProbeFailure::Malformed("connection closed within the headers".to_owned()));
        }
    };
    let length = content_length(&read[..body_start]);
    let limit = length.map_or(MAX_BODY, |n| n.min(MAX_BODY));
    let mut body = read.split_off(body_start);
    loop {
        let seen = body.len().min(limit);
        if find(&body[..seen], expected.as_bytes()).is_some() {
            return Ok(());
        }
        let at_limit = body.len() >= limit;
        if at_limit || !read_more(reader, &mut body).await? {
            let truncated = at_limit && length.is_none_or(|n| n > MAX_BODY);
            return Err(ProbeFailure::Body { expected: expected.to_owned(), read: seen, truncated });
        }
    }
}

/// Appends one read to `buf`; `false` at the end of the stream. A TLS peer
/// that closes without close_notify ends the stream too: the request said
/// `Connection: close`, and the probe has what it needs either way.
async fn read_more<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> Result<bool, ProbeFailure> {
    let mut chunk = [0; 4096];
    match reader.read(&mut chunk).await {
        Ok(0) => Ok(false),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(ProbeFailure::Receive(error)),
    }
}

/// The `Content-Length` among `headers`, if one parses.
fn content_length(headers: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(headers).split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok()).flatten()
    })
}

/// Offset of the first `needle` in `bytes` (an empty needle is at 0).
fn find(bytes: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    bytes.windows(needle.len()).position(|window| window == needle)
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

/// Displays a [`StatusRange`] the way the config writes it: `200-399` or `200`.
pub struct ShowRange(pub StatusRange);

impl fmt::Display for ShowRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let StatusRange { min, max } = self.0;
        if min == max { write!(f, "{min}") } else { write!(f, "{min}-{max}") }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncWriteExt as _, net::TcpListener};

    use super::*;
    use crate::{config::model::HealthCheckKind, health::probe::run};

    const OK: StatusRange = StatusRange { min: 200, max: 399 };

    fn check(expect_body: &str) -> HealthCheckKind {
        HealthCheckKind::Http {
            path: "/".to_owned(),
            expect_status: OK,
            host: None,
            expect_body: Some(expect_body.to_owned()),
        }
    }

    /// Serves `response` to one connection after reading its request, in
    /// two halves so the probe has to read more than once.
    async fn serve(response: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0; 2048];
                let _ = stream.read(&mut request).await;
                let (a, b) = response.split_at(response.len() / 2);
                let _ = stream.write_all(a).await;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                let _ = stream.write_all(b).await;
            }
        });
        address
    }

    async fn probe_body(response: &str, expected: &str) -> Result<(), ProbeFailure> {
        let address = serve(response.as_bytes().to_vec()).await;
        run(address, &check(expected), std::time::Duration::from_secs(2)).await
    }

    #[tokio::test]
    async fn body_containing_the_text_is_healthy() {
        let result = probe_body("HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nstatus: ready", "ready").await;
        assert!(result.is_ok(), "{result:?}");
        // Read to the end of the stream when no length is given.
        let result = probe_body("HTTP/1.0 200 OK\r\n\r\nall systems ready\n", "systems ready").await;
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn body_without_the_text_fails_and_says_how_much_was_read() {
        let error =
            probe_body("HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nstarting", "ready").await.expect_err("no text");
        assert_eq!(error.to_string(), "body does not contain \"ready\" (read 8 bytes of it)");
    }

    #[tokio::test]
    async fn the_text_in_a_header_does_not_count() {
        let response = "HTTP/1.1 200 OK\r\nX-State: ready\r\nContent-Length: 2\r\n\r\nno";
        let error = probe_body(response, "ready").await.expect_err("only the body counts");
        assert!(matches!(error, ProbeFailure::Body { read: 2, .. }), "{error:?}");
    }

    #[tokio::test]
    async fn bytes_past_content_length_do_not_count() {
        let response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nnoready";
        let error = probe_body(response, "ready").await.expect_err("past the body");
        assert!(matches!(error, ProbeFailure::Body { read: 2, truncated: false, .. }), "{error:?}");
    }

    #[tokio::test]
    async fn a_bad_status_fails_before_the_body() {
        let error = probe_body("HTTP/1.1 503 No\r\nContent-Length: 5\r\n\r\nready", "ready").await.expect_err("503");
        assert!(matches!(error, ProbeFailure::Status { status: 503, .. }), "{error:?}");
    }

    #[tokio::test]
    async fn a_huge_body_is_read_only_up_to_the_cap() {
        let response = format!("HTTP/1.1 200 OK\r\n\r\n{}ready", "x".repeat(MAX_BODY));
        let error = probe_body(&response, "ready").await.expect_err("past the cap");
        assert!(matches!(error, ProbeFailure::Body { read: MAX_BODY, truncated: true, .. }), "{error:?}");
        assert!(error.to_string().ends_with(", the most read)"), "{error}");
    }

    #[test]
    fn content_length_is_found_in_any_case() {
        assert_eq!(content_length(b"X: 1\r\ncontent-LENGTH:  42 \r\n\r\n"), Some(42));
        assert_eq!(content_length(b"X: 1\r\n\r\n"), None);
    }
}

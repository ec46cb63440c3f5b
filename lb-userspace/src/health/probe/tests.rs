//! The probes' unit tests, against servers on loopback.

use std::time::Instant;

use tokio::{io::AsyncWriteExt as _, net::TcpListener, sync::oneshot};

use super::*;

const OK_RANGE: StatusRange = StatusRange { min: 200, max: 399 };
const TIMEOUT: Duration = Duration::from_millis(500);

fn http_check(expect_status: StatusRange) -> HealthCheckKind {
    HealthCheckKind::Http { path: "/healthz".to_owned(), expect_status, host: None, expect_body: None }
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
        expect_body: None,
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

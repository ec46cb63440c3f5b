//! `lb-testbed-backend`: the tiny HTTP and UDP server each testbed backend runs.
//!
//! ```text
//! lb-testbed-backend --name b1 --http [::]:8080 --udp [::]:8081
//! ```
//!
//! The default `[::]` serves IPv4 and IPv6 on one socket each, where
//! `net.ipv6.bindv6only` is 0 (the kernel default; the testbed sets it in
//! backend namespaces): IPv4 peers appear as `::ffff:a.b.c.d`, and answers
//! to them go out as IPv4. Give `0.0.0.0:PORT` for IPv4 only.
//!
//! HTTP/1.1 (one thread per connection, keep-alive, `Content-Length` always set):
//! - `GET /health`: `200 ok` or, after `GET /admin/health/fail`, `503 fail`;
//!   `GET /admin/health/ok` turns it back to 200.
//! - `GET /big?bytes=N`: N bytes of body (capped at 16 MiB), for MTU tests.
//! - any other `GET` (or `HEAD`): `200 backend=<name>`, with `X-Backend: <name>`.
//!
//! UDP: every datagram is answered with `backend=<name> ` followed by its payload.
//!
//! HTTPS (with `--https ADDR:PORT --tls-cert PEM --tls-key PEM`): the same
//! HTTP server behind TLS (rustls), for the agent's `type = "https"` checks.
//! The certificate chain and key are PEM files the test made.
//!
//! It prints one line, `listening`, once every socket is bound (the testbed
//! waits for it) and nothing per request. Bad input closes the connection; it
//! never panics on it.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

/// Longest request line or header line accepted, in bytes.
const MAX_LINE: usize = 8 * 1024;
/// Most header lines accepted in one request.
const MAX_HEADERS: usize = 100;
/// Largest request body read (and discarded), in bytes.
const MAX_REQUEST_BODY: u64 = 1024 * 1024;
/// Cap on `GET /big?bytes=N`, in bytes.
const MAX_BIG: u64 = 16 * 1024 * 1024;
/// Idle time after which a connection is closed.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Body bytes for `/big`, written chunk by chunk.
static FILLER: [u8; 64 * 1024] = [b'x'; 64 * 1024];
/// Stack of a connection thread: small, so thousands of connections stay cheap.
const CONN_STACK: usize = 256 * 1024;
/// Most connections served at once; more are closed at once (file limit is 20000).
const MAX_CONNECTIONS: usize = 4096;

struct Args {
    name: String,
    http: SocketAddr,
    udp: SocketAddr,
    https: Option<Https>,
}

/// `--https`, `--tls-cert` and `--tls-key`.
struct Https {
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
}

fn usage() -> String {
    "usage: lb-testbed-backend --name NAME [--http ADDR:PORT] [--udp ADDR:PORT]\n\
     \x20      [--https ADDR:PORT --tls-cert CHAIN.pem --tls-key KEY.pem]\n\
     defaults: --http [::]:8080 --udp [::]:8081 (dual-stack unless net.ipv6.bindv6only=1), no https"
        .to_owned()
}

fn parse_args() -> Result<Args, String> {
    let mut name = None;
    let mut http: SocketAddr = (Ipv6Addr::UNSPECIFIED, 8080).into();
    let mut udp: SocketAddr = (Ipv6Addr::UNSPECIFIED, 8081).into();
    let (mut https, mut cert, mut key) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value\n{}", usage()));
        match arg.as_str() {
            "--name" => name = Some(value("--name")?),
            "--http" => http = value("--http")?.parse().map_err(|e| format!("--http: {e}"))?,
            "--udp" => udp = value("--udp")?.parse().map_err(|e| format!("--udp: {e}"))?,
            "--https" => https = Some(value("--https")?.parse().map_err(|e| format!("--https: {e}"))?),
            "--tls-cert" => cert = Some(PathBuf::from(value("--tls-cert")?)),
            "--tls-key" => key = Some(PathBuf::from(value("--tls-key")?)),
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    let name = name.ok_or_else(|| format!("--name is required\n{}", usage()))?;
    let https = match (https, cert, key) {
        (None, None, None) => None,
        (Some(listen), Some(cert), Some(key)) => Some(Https { listen, cert, key }),
        _ => return Err(format!("--https, --tls-cert and --tls-key go together\n{}", usage())),
    };
    Ok(Args { name, http, udp, https })
}

/// The TLS server settings: the chain and key of `https`.
fn tls_config(https: &Https) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let shown = |path: &Path| path.display().to_string();
    let chain = CertificateDer::pem_file_iter(&https.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("reading {}: {e}", shown(&https.cert)))?;
    let key = PrivateKeyDer::from_pem_file(&https.key).map_err(|e| format!("reading {}: {e}", shown(&https.key)))?;
    #[expect(deprecated, reason = "ring, as the agent uses: no cmake, a lean build")]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(Arc::new(config))
}

/// State shared by all connection threads.
struct Server {
    name: String,
    healthy: AtomicBool,
    connections: AtomicUsize,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(args.http) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lb-testbed-backend: binding tcp {}: {e}", args.http);
            return ExitCode::FAILURE;
        }
    };
    let udp = match UdpSocket::bind(args.udp) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lb-testbed-backend: binding udp {}: {e}", args.udp);
            return ExitCode::FAILURE;
        }
    };
    let https = match args.https.as_ref().map(bind_https).transpose() {
        Ok(https) => https,
        Err(e) => {
            eprintln!("lb-testbed-backend: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = Arc::new(Server { name: args.name, healthy: AtomicBool::new(true), connections: AtomicUsize::new(0) });

    if let Some((listener, config)) = https {
        let tls_server = Arc::clone(&server);
        let serve = move |stream| serve_https(stream, &config, &tls_server);
        let accept = {
            let server = Arc::clone(&server);
            move || accept_loop(&listener, &server, serve)
        };
        if let Err(e) = thread::Builder::new().name("https".into()).spawn(accept) {
            eprintln!("lb-testbed-backend: spawning https thread: {e}");
            return ExitCode::FAILURE;
        }
    }

    let udp_server = Arc::clone(&server);
    if let Err(e) = thread::Builder::new().name("udp".into()).spawn(move || serve_udp(&udp, &udp_server)) {
        eprintln!("lb-testbed-backend: spawning udp thread: {e}");
        return ExitCode::FAILURE;
    }

    // The testbed waits for this line; a write error only means nobody listens.
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "listening").and_then(|()| stdout.flush());
    drop(stdout);

    let http_server = Arc::clone(&server);
    accept_loop(&listener, &server, move |stream| serve_http(stream, &http_server));
    ExitCode::SUCCESS
}

/// The HTTPS listener and its TLS settings.
fn bind_https(https: &Https) -> Result<(TcpListener, Arc<rustls::ServerConfig>), String> {
    let config = tls_config(https)?;
    let listener = TcpListener::bind(https.listen).map_err(|e| format!("binding tcp {}: {e}", https.listen))?;
    Ok((listener, config))
}

/// Serves each connection of `listener` on a thread of its own, at most
/// [`MAX_CONNECTIONS`] at once (counted in `server`).
fn accept_loop<F>(listener: &TcpListener, server: &Arc<Server>, serve: F)
where
    F: Fn(TcpStream) -> io::Result<()> + Clone + Send + 'static,
{
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if server.connections.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            server.connections.fetch_sub(1, Ordering::Relaxed);
            continue; // dropping the stream closes it
        }
        let conn_server = Arc::clone(server);
        let serve = serve.clone();
        let spawned = thread::Builder::new().stack_size(CONN_STACK).spawn(move || {
            // Errors only end this connection.
            let _ = serve(stream);
            conn_server.connections.fetch_sub(1, Ordering::Relaxed);
        });
        if spawned.is_err() {
            server.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn serve_udp(socket: &UdpSocket, server: &Server) {
    let prefix = format!("backend={} ", server.name);
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(prefix.len() + buf.len());
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        reply.clear();
        reply.extend_from_slice(prefix.as_bytes());
        reply.extend_from_slice(&buf[..n]);
        // Too long for one datagram, or the peer is gone: nothing to do.
        let _ = socket.send_to(&reply, peer);
    }
}

/// One parsed request head.
struct Request {
    method: String,
    target: String,
    keep_alive: bool,
    content_length: u64,
}

/// Reads one line ending in `\n`, at most [`MAX_LINE`] bytes; `None` at a clean EOF.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Option<()>> {
    line.clear();
    let n = reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long or truncated"));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(Some(()))
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads a request head; `Ok(None)` when the client closed between requests.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = Vec::new();
    // Tolerate empty lines before a request (RFC 9112 section 2.2).
    loop {
        if read_line(reader, &mut line)?.is_none() {
            return Ok(None);
        }
        if !line.is_empty() {
            break;
        }
    }
    let request_line = std::str::from_utf8(&line).map_err(|_| bad("request line is not utf-8"))?;
    let mut parts = request_line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(bad("unsupported http version")),
    };
    let (method, target) = (method.to_owned(), target.to_owned());
    let mut content_length = 0;
    for _ in 0..=MAX_HEADERS {
        if read_line(reader, &mut line)?.is_none() {
            return Err(bad("eof in headers"));
        }
        if line.is_empty() {
            return Ok(Some(Request { method, target, keep_alive, content_length }));
        }
        let header = String::from_utf8_lossy(&line);
        let Some((key, value)) = header.split_once(':') else {
            return Err(bad("malformed header"));
        };
        let value = value.trim();
        if key.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if key.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().map_err(|_| bad("bad content-length"))?;
        } else if key.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("transfer-encoding is not supported"));
        }
    }
    Err(bad("too many headers"))
}

/// Timeouts and no Nagle delay on an accepted connection.
fn prepare(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    Ok(())
}

fn serve_http(stream: TcpStream, server: &Server) -> io::Result<()> {
    prepare(&stream)?;
    serve_requests(stream, server)
}

/// HTTP over TLS: the handshake happens on the first read; the connection
/// ends with a close_notify, as a well-behaved server's does.
fn serve_https(stream: TcpStream, config: &Arc<rustls::ServerConfig>, server: &Server) -> io::Result<()> {
    prepare(&stream)?;
    let conn = rustls::ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let result = serve_requests(&mut tls, server);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    result
}

/// Requests and responses on one connection until it closes. Responses are
/// written through the reader's stream: nothing is read while they are.
fn serve_requests<S: Read + Write>(stream: S, server: &Server) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let req = match read_request(&mut reader) {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = respond(reader.get_mut(), 400, "Bad Request", &[], Body::Text("bad request\n"), false, false);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if req.content_length > MAX_REQUEST_BODY {
            respond(reader.get_mut(), 413, "Content Too Large", &[], Body::Text("too large\n"), false, false)?;
            return Ok(());
        }
        // Discard a request body so the next request on the connection parses.
        io::copy(&mut reader.by_ref().take(req.content_length), &mut io::sink())?;
        let keep_alive = req.keep_alive;
        handle(&req, server, reader.get_mut(), keep_alive)?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// A response body: short text or N filler bytes.
enum Body<'a> {
    Text(&'a str),
    Filler(u64),
    /// `lines` lines of [`DRIP_LINE_LEN`] bytes, one every `every`: a
    /// server that writes first and the client only acknowledges.
    Drip {
        lines: u64,
        every: Duration,
    },
}

/// `line NN\n`.
const DRIP_LINE_LEN: u64 = 8;

fn handle(req: &Request, server: &Server, w: &mut impl Write, keep_alive: bool) -> io::Result<()> {
    let head_only = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let allow = [("Allow", "GET, HEAD")];
            return respond(
                w,
                405,
                "Method Not Allowed",
                &allow,
                Body::Text("method not allowed\n"),
                keep_alive,
                false,
            );
        }
    };
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let backend_header = [("X-Backend", server.name.as_str())];
    match path {
        "/health" => {
            if server.healthy.load(Ordering::Relaxed) {
                respond(w, 200, "OK", &backend_header, Body::Text("ok\n"), keep_alive, head_only)
            } else {
                respond(w, 503, "Service Unavailable", &backend_header, Body::Text("fail\n"), keep_alive, head_only)
            }
        }
        "/admin/health/fail" | "/admin/health/ok" => {
            server.healthy.store(path.ends_with("/ok"), Ordering::Relaxed);
            respond(w, 200, "OK", &backend_header, Body::Text("done\n"), keep_alive, head_only)
        }
        "/drip" => {
            let arg = |name: &str| {
                query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok())
            };
            match (arg("lines"), arg("every_ms")) {
                (Some(lines), Some(every_ms)) => respond(
                    w,
                    200,
                    "OK",
                    &backend_header,
                    Body::Drip { lines: lines.min(99), every: Duration::from_millis(every_ms.min(10_000)) },
                    keep_alive,
                    head_only,
                ),
                _ => respond(
                    w,
                    400,
                    "Bad Request",
                    &backend_header,
                    Body::Text("need lines=N&every_ms=M\n"),
                    keep_alive,
                    head_only,
                ),
            }
        }
        "/big" => {
            let bytes = query.split('&').find_map(|kv| kv.strip_prefix("bytes=")).and_then(|n| n.parse::<u64>().ok());
            match bytes {
                Some(n) => respond(w, 200, "OK", &backend_header, Body::Filler(n.min(MAX_BIG)), keep_alive, head_only),
                None => {
                    respond(w, 400, "Bad Request", &backend_header, Body::Text("need bytes=N\n"), keep_alive, head_only)
                }
            }
        }
        _ => {
            let body = format!("backend={}\n", server.name);
            respond(w, 200, "OK", &backend_header, Body::Text(&body), keep_alive, head_only)
        }
    }
}

fn respond(
    w: &mut impl Write,
    status: u16,
    reason: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let len = match body {
        Body::Text(t) => t.len() as u64,
        Body::Filler(n) => n,
        Body::Drip { lines, .. } => lines * DRIP_LINE_LEN,
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nContent-Type: text/plain\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
    match body {
        _ if head_only => w.write_all(head.as_bytes()),
        Body::Text(text) => {
            head.push_str(text);
            w.write_all(head.as_bytes())
        }
        Body::Filler(mut n) => {
            w.write_all(head.as_bytes())?;
            while n > 0 {
                let k = n.min(FILLER.len() as u64);
                // k <= FILLER.len(), so the cast cannot truncate.
                w.write_all(&FILLER[..k as usize])?;
                n -= k;
            }
            Ok(())
        }
        Body::Drip { lines, every } => {
            w.write_all(head.as_bytes())?;
            for i in 1..=lines {
                w.write_all(format!("line {i:02}\n").as_bytes())?;
                w.flush()?;
                if i < lines {
                    std::thread::sleep(every);
                }
            }
            Ok(())
        }
    }
}

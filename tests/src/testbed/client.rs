//! Minimal HTTP/1.1 and UDP clients that report which backend answered.
//!
//! These functions use plain std sockets in the caller's network namespace:
//! call them inside [`Namespace::enter`](super::Namespace::enter), or use the
//! [`Testbed`](super::Testbed) wrappers that run them in the client namespace.

use std::{
    collections::BTreeMap,
    fmt,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

/// Timeout for connecting and for each read or write of one request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound on the whole of one [`requests`] or [`udp_exchange`] call.
pub const TOTAL_DEADLINE: Duration = Duration::from_secs(30);
/// Largest response body accepted, in bytes (`/big` is capped at 16 MiB).
const MAX_BODY: usize = 32 * 1024 * 1024;
/// Longest response head accepted, in bytes.
const MAX_HEAD: u64 = 64 * 1024;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header names and values in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (ASCII case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The backend named in a `backend=<name>` body, if any.
    #[must_use]
    pub fn backend(&self) -> Option<String> {
        backend_name(&self.body)
    }
}

/// Extracts `<name>` from a body that starts with `backend=<name>` (ending at
/// whitespace), as the testbed backends answer over HTTP and UDP.
#[must_use]
pub fn backend_name(body: &[u8]) -> Option<String> {
    let rest = body.strip_prefix(b"backend=")?;
    let end = rest.iter().position(u8::is_ascii_whitespace).unwrap_or(rest.len());
    let name = std::str::from_utf8(&rest[..end]).ok()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// One HTTP/1.1 connection that can carry several requests (keep-alive).
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    host: String,
}

impl HttpConn {
    /// Connects to `addr` with [`IO_TIMEOUT`] for the connect and every read/write.
    ///
    /// # Errors
    ///
    /// When the connection fails.
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self { reader: BufReader::new(stream), host: addr.to_string() })
    }

    /// Sends `GET path` and reads the whole response. With `keep_alive` false
    /// it asks the server to close afterwards.
    ///
    /// # Errors
    ///
    /// On any I/O error, timeout or malformed response.
    pub fn get(&mut self, path: &str, keep_alive: bool) -> anyhow::Result<HttpResponse> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: {connection}\r\n\r\n", self.host);
        self.reader.get_mut().write_all(request.as_bytes()).context("sending request")?;
        read_response(&mut self.reader)
    }
}

fn read_response(reader: &mut BufReader<TcpStream>) -> anyhow::Result<HttpResponse> {
    let mut head = reader.by_ref().take(MAX_HEAD);
    let mut line = String::new();
    if head.read_line(&mut line).context("reading status line")? == 0 {
        bail!("connection closed before a response");
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("malformed status line {line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {line:?}");
    }
    let status: u16 = code.parse().with_context(|| format!("malformed status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if head.read_line(&mut line).context("reading headers")? == 0 {
            bail!("connection closed in headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').with_context(|| format!("malformed header {l:?}"))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut response = HttpResponse { status, headers, body: Vec::new() };
    match response.header("content-length") {
        Some(len) => {
            let len: usize = len.parse().with_context(|| format!("bad content-length {len:?}"))?;
            if len > MAX_BODY {
                bail!("body of {len} bytes is over the {MAX_BODY} limit");
            }
            response.body.resize(len, 0);
            reader.read_exact(&mut response.body).context("reading body")?;
        }
        None => {
            reader.take(MAX_BODY as u64).read_to_end(&mut response.body).context("reading body to eof")?;
        }
    }
    Ok(response)
}

/// One `GET` on a new connection that is closed afterwards.
///
/// # Errors
///
/// On connection or protocol errors (a non-2xx status is not an error).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    let mut conn = HttpConn::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    conn.get(path, false).with_context(|| format!("GET http://{addr}{path}"))
}

/// Sends `n` `GET /` requests to `addr`, each on a new connection or all on
/// one kept-alive connection (reconnecting after an error), and returns, per
/// request, the answering backend's name. Bounded by `n` and [`TOTAL_DEADLINE`]:
/// requests not sent by then are reported as errors. Always returns `n` items.
#[must_use]
pub fn requests(addr: SocketAddr, n: usize, new_connection_each: bool) -> Vec<anyhow::Result<String>> {
    let deadline = Instant::now() + TOTAL_DEADLINE;
    let mut results = Vec::with_capacity(n);
    let mut conn: Option<HttpConn> = None;
    for _ in 0..n {
        if Instant::now() >= deadline {
            results.push(Err(anyhow!("deadline of {TOTAL_DEADLINE:?} passed before this request")));
            continue;
        }
        let result = (|| {
            let c = match conn.take() {
                Some(c) => c,
                None => HttpConn::connect(addr).with_context(|| format!("connecting to {addr}"))?,
            };
            let c = conn.insert(c);
            let response = c.get("/", !new_connection_each).with_context(|| format!("GET http://{addr}/"))?;
            if response.status != 200 {
                bail!("GET http://{addr}/: status {}", response.status);
            }
            response.backend().with_context(|| format!("GET http://{addr}/: no backend in {:?}", response.text()))
        })();
        if result.is_err() || new_connection_each {
            conn = None;
        }
        results.push(result);
    }
    results
}

/// Sends each payload from one UDP socket bound to `from_port` (0: any port)
/// on the unspecified address of `addr`'s family (`0.0.0.0` or `[::]`) to
/// `addr` and waits up to [`IO_TIMEOUT`] for its echo, which must come from
/// `addr` and carry the payload. Returns per payload the answering backend's
/// name. Bounded by the payload count and [`TOTAL_DEADLINE`].
///
/// # Errors
///
/// The outer error is for binding the socket; the inner ones per payload.
pub fn udp_exchange(
    addr: SocketAddr,
    payloads: &[&[u8]],
    from_port: u16,
) -> anyhow::Result<Vec<anyhow::Result<String>>> {
    let local = SocketAddr::new(unspecified_like(addr.ip()), from_port);
    let socket = UdpSocket::bind(local).with_context(|| format!("binding udp {local}"))?;
    let deadline = Instant::now() + TOTAL_DEADLINE;
    let mut buf = vec![0u8; 65536];
    let results = payloads
        .iter()
        .map(|payload| {
            if Instant::now() >= deadline {
                bail!("deadline of {TOTAL_DEADLINE:?} passed before this datagram");
            }
            socket.send_to(payload, addr).with_context(|| format!("sending to {addr}"))?;
            let until = Instant::now() + IO_TIMEOUT;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    bail!("no echo from {addr} within {IO_TIMEOUT:?}");
                }
                socket.set_read_timeout(Some(left))?;
                let (n, from) = match socket.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                        bail!("no echo from {addr} within {IO_TIMEOUT:?}")
                    }
                    Err(e) => return Err(e).with_context(|| format!("receiving from {addr}")),
                };
                if from != addr {
                    bail!("reply came from {from}, expected {addr}");
                }
                let reply = &buf[..n];
                let Some(name) = backend_name(reply) else {
                    bail!("reply without backend name: {:?}", String::from_utf8_lossy(reply));
                };
                let echoed = &reply[("backend=".len() + name.len() + 1).min(n)..];
                if echoed == *payload {
                    return Ok(name);
                }
                // A late echo of an earlier datagram: keep waiting for ours.
            }
        })
        .collect();
    Ok(results)
}

/// The wildcard address of `ip`'s family: a socket bound to it sends to
/// `ip` from the address the route picks.
fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// How many answers each backend gave, plus the errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spread {
    /// Answers per backend name.
    pub per_backend: BTreeMap<String, usize>,
    /// Number of failed requests.
    pub errors: usize,
    /// The first error's message, for reports.
    pub first_error: Option<String>,
}

impl Spread {
    /// Counts results from [`requests`] or [`udp_exchange`].
    #[must_use]
    pub fn of(results: &[anyhow::Result<String>]) -> Self {
        let mut spread = Self::default();
        for r in results {
            match r {
                Ok(name) => *spread.per_backend.entry(name.clone()).or_default() += 1,
                Err(e) => {
                    spread.errors += 1;
                    spread.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        spread
    }

    /// Answers from `backend`.
    #[must_use]
    pub fn count(&self, backend: &str) -> usize {
        self.per_backend.get(backend).copied().unwrap_or(0)
    }

    /// Successful answers in total.
    #[must_use]
    pub fn ok(&self) -> usize {
        self.per_backend.values().sum()
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.per_backend.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{}", if parts.is_empty() { "no answers".to_owned() } else { parts.join(" ") })?;
        if self.errors > 0 {
            write!(f, " errors={}", self.errors)?;
            if let Some(e) = &self.first_error {
                write!(f, " (first: {e})")?;
            }
        }
        Ok(())
    }
}

/// How long a TCP connect to `addr` took to be refused (a RST), or what
/// happened instead: `"connected"`, or the error and when. Waits at most 1 s.
///
/// # Errors
///
/// As described: anything but a refusal within the second.
pub fn refused_tcp(addr: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => Err("connected".to_owned()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(started.elapsed()),
        Err(e) => Err(format!("{e} after {:?}", started.elapsed())),
    }
}

/// How long a UDP datagram to `addr` took to be refused (ICMP port
/// unreachable, seen on a connected socket), or what happened instead:
/// `"answered"`, or the error and when. Waits at most 1 s.
///
/// # Errors
///
/// As described: anything but a refusal within the second.
pub fn refused_udp(addr: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let result = (|| {
        let socket = UdpSocket::bind(SocketAddr::new(unspecified_like(addr.ip()), 0))?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        socket.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        socket.recv(&mut buf).map(|_| ())
    })();
    match result {
        Ok(()) => Err("answered".to_owned()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(started.elapsed()),
        Err(e) => Err(format!("{e} after {:?}", started.elapsed())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_name_parses_http_and_udp_bodies() {
        assert_eq!(backend_name(b"backend=b1\n").as_deref(), Some("b1"));
        assert_eq!(backend_name(b"backend=b12 payload").as_deref(), Some("b12"));
        assert_eq!(backend_name(b"backend=\n"), None);
        assert_eq!(backend_name(b"hello"), None);
    }

    #[test]
    fn spread_counts_and_displays() {
        let results = vec![Ok("b1".to_owned()), Ok("b2".to_owned()), Ok("b1".to_owned()), Err(anyhow!("boom"))];
        let spread = Spread::of(&results);
        assert_eq!(spread.count("b1"), 2);
        assert_eq!(spread.ok(), 3);
        assert_eq!(spread.to_string(), "b1=2 b2=1 errors=1 (first: boom)");
    }
}

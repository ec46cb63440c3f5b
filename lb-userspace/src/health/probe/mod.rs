//! One health probe, bounded by its timeout; one module per `type`:
//!
//! - [`tcp`]: a TCP connect;
//! - [`http`]: a minimal HTTP/1.1 GET that reads the status line and, with
//!   `expect_body`, the body;
//! - [`https`]: the same GET over TLS (rustls), with SNI and optional
//!   certificate verification;
//! - [`dns`]: one DNS query over UDP.
//!
//! Written by hand rather than with HTTP or DNS client crates: a probe needs
//! one request, one answer and a hard deadline, nothing more, and owning the
//! code keeps the failure reasons precise ("connect: ...", "timed out after
//! ...", "HTTP status 503, expected 200-399") for `/status` and the logs.

pub mod dns;
pub mod http;
pub mod https;
pub mod tcp;

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

pub use self::http::{MAX_BODY, MAX_STATUS_LINE, parse_status_line, read_status_line, request};
use crate::config::model::{DnsType, HealthCheckKind, StatusRange};

/// How much of an unexpected answer a failure reason quotes.
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
    /// The gateway cannot set the probe up (e.g. `tls_ca_file` became
    /// unreadable after the config was loaded): local, like [`ProbeFailure::Local`].
    #[error("local error, not the backend's: {0}")]
    Setup(String),
    /// Writing the HTTP request (or DNS query) failed.
    #[error("send request: {0}")]
    Send(#[source] std::io::Error),
    /// Reading the HTTP response (or DNS answer) failed.
    #[error("read response: {0}")]
    Receive(#[source] std::io::Error),
    /// The whole probe (connect, request, status line) took too long.
    #[error("timed out after {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// The peer closed the connection before a complete status line.
    #[error("connection closed after {received} bytes, before the end of the status line")]
    Closed { received: usize },
    /// The response does not start with an HTTP/1.x status line (or is no
    /// DNS answer to the query).
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The server answered with a status outside the expected range.
    #[error("HTTP status {status}, expected {}", http::ShowRange(*.expected))]
    Status { status: u16, expected: StatusRange },
    /// The body (as far as read) does not contain `expect_body`.
    #[error("body does not contain {expected:?} (read {read} bytes of it{})", if *.truncated { ", the most read" } else { "" })]
    Body {
        expected: String,
        /// Body bytes read.
        read: usize,
        /// Whether reading stopped at [`MAX_BODY`] rather than at its end.
        truncated: bool,
    },
    /// The TLS handshake failed: no TLS, a certificate that fails
    /// verification, a name that does not match, ...
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    /// The DNS server answered with an rcode other than NOERROR.
    #[error("DNS rcode {}, expected NOERROR", dns::rcode_name(*.0))]
    Rcode(u8),
    /// The DNS answer has no record of the type asked for.
    #[error("DNS answer has no {0} record ({1} records in it)")]
    NoAnswer(DnsType, u16),
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
        matches!(self, ProbeFailure::Local { .. } | ProbeFailure::Setup(_))
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
/// Prepares the probe anew (see [`Prober`]); a checker prepares once.
///
/// # Errors
/// The reason the backend is unhealthy, see [`ProbeFailure`].
pub async fn run(address: SocketAddr, kind: &HealthCheckKind, timeout: Duration) -> Result<(), ProbeFailure> {
    Prober::new(kind).run(address, timeout).await
}

/// A probe of one kind, ready to run again and again: the HTTPS check's TLS
/// settings (trust roots read from a file or the system) are built once.
#[derive(Clone)]
pub struct Prober {
    kind: HealthCheckKind,
    /// For `https`: the connector, or why it could not be built.
    tls: Option<Result<https::Connector, String>>,
}

impl Prober {
    /// Prepares probes of `kind`. Never fails: a TLS setup problem is
    /// reported by every probe, as a local error.
    #[must_use]
    pub fn new(kind: &HealthCheckKind) -> Self {
        let tls = match kind {
            HealthCheckKind::Https { tls, host, .. } => Some(https::Connector::new(tls, host.as_deref())),
            _ => None,
        };
        Prober { kind: kind.clone(), tls }
    }

    /// One probe of `address`, bounded as a whole by `timeout`.
    ///
    /// # Errors
    /// The reason the backend is unhealthy, see [`ProbeFailure`].
    pub async fn run(&self, address: SocketAddr, timeout: Duration) -> Result<(), ProbeFailure> {
        match tokio::time::timeout(timeout, self.attempt(address)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ProbeFailure::TimedOut(timeout)),
        }
    }

    /// The probe without its deadline.
    async fn attempt(&self, address: SocketAddr) -> Result<(), ProbeFailure> {
        match &self.kind {
            HealthCheckKind::Tcp => tcp::probe(address).await,
            HealthCheckKind::Http { path, expect_status, host, expect_body } => {
                let check = http::Check {
                    path,
                    host: host.as_deref(),
                    expect_status: *expect_status,
                    expect_body: expect_body.as_deref(),
                };
                http::probe(address, &check).await
            }
            HealthCheckKind::Https { path, expect_status, host, expect_body, .. } => {
                let check = http::Check {
                    path,
                    host: host.as_deref(),
                    expect_status: *expect_status,
                    expect_body: expect_body.as_deref(),
                };
                let connector = match &self.tls {
                    Some(Ok(connector)) => connector,
                    Some(Err(problem)) => return Err(ProbeFailure::Setup(problem.clone())),
                    None => return Err(ProbeFailure::Setup("no TLS settings".to_owned())),
                };
                https::probe(address, &check, connector).await
            }
            HealthCheckKind::Dns(check) => dns::probe(address, check).await,
            HealthCheckKind::None => Ok(()),
        }
    }
}

/// Opens a TCP connection; dropping the stream closes it right away. The
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

/// The start of `bytes`, lossily decoded and escaped, so a failure reason
/// never carries control characters or a whole response into the logs.
fn excerpt(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(EXCERPT_LEN)];
    let more = if bytes.len() > EXCERPT_LEN { "..." } else { "" };
    format!("{:?}{more}", String::from_utf8_lossy(head))
}

// The tests read requests with `stream.read`, through this module's scope.
#[cfg(test)]
use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests;

//! Hostile traffic for end-to-end tests (issue 12): floods of spoofed TCP
//! segments, and the well-behaved traffic that must survive them.
//!
//! - [`hping3`]: one `hping3 --flood` from a namespace, with one spoofed
//!   source address (`-a`; hping3 walks the 64k source ports itself).
//!   Never `--rand-source`: it picks addresses anywhere on the internet.
//! - [`spray`]: our own generator, for a source spread over many addresses
//!   (one segment per address and port, in turn), or SYN-then-ACK pairs.
//! - [`KeptAlive`]: kept-alive HTTP connections, each asking every few
//!   milliseconds; a connection that fails once is broken and not retried.
//! - [`Prober`]: a new connection every few milliseconds.
//!
//! Every flood is bounded twice: in time by the caller, and by `timeout(1)`
//! around hping3 (or a deadline and a packet count in [`spray`]), so it
//! stops even if the test process dies. Spoofed sources must lie inside
//! 198.18.0.0/15 ([`SPOOFED_NET`]); the functions refuse others.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::testbed::{ChildGuard, Namespace};

/// Where spoofed sources come from: 198.19.0.0/16, the upper half of the
/// benchmarking range, which no testbed namespace uses. Route it from the
/// gateway to the client namespace ([`route_spoofed_to`]) so the backends'
/// answers to spoofed sources end there (the client does not forward, so it
/// drops them) instead of in the gateway's "no route" path.
pub const SPOOFED_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);

/// Where spoofed IPv6 sources come from: 2001:db8:ff::/48, which no
/// testbed namespace uses; route it like [`SPOOFED_NET`]
/// ([`route_spoofed6_to`]).
pub const SPOOFED_NET6: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0), 48);

/// Routes [`SPOOFED_NET6`] in namespace `router` via `next_hop`.
///
/// # Errors
///
/// When `ip route` fails.
pub fn route_spoofed6_to(router: &Namespace, next_hop: Ipv6Addr) -> anyhow::Result<()> {
    let (net, len) = SPOOFED_NET6;
    router.exec_ok(&["ip", "-6", "route", "replace", &format!("{net}/{len}"), "via", &next_hop.to_string()])?;
    Ok(())
}

/// TCP flags, as in the header's flags byte.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
    /// URG.
    pub const URG: u8 = 0x20;
}

/// Whether `addr` is inside [`SPOOFED_NET`].
#[must_use]
pub fn is_spoofable(addr: Ipv4Addr) -> bool {
    let (net, len) = SPOOFED_NET;
    let mask = u32::MAX << (32 - u32::from(len));
    u32::from(addr) & mask == u32::from(net) & mask
}

/// Routes [`SPOOFED_NET`] in namespace `router` via `next_hop` (the client's
/// address, seen from the gateway).
///
/// # Errors
///
/// When `ip route` fails.
pub fn route_spoofed_to(router: &Namespace, next_hop: Ipv4Addr) -> anyhow::Result<()> {
    let (net, len) = SPOOFED_NET;
    router.exec_ok(&["ip", "route", "replace", &format!("{net}/{len}"), "via", &next_hop.to_string()])?;
    Ok(())
}

/// Starts `hping3 --flood` in `ns` against `target` from the spoofed
/// `source`, with hping3's flag options (`-S`, `-A`, `-R`, `-F`, `-P`, `-U`,
/// `-d 64`, ...), at nice 19, for at most `limit`: `timeout(1)` interrupts
/// it then, so the flood ends even if the caller never stops it. Its output
/// is discarded. Stop it earlier by dropping the guard.
///
/// # Errors
///
/// When `source` is outside [`SPOOFED_NET`], `target` is not IPv4, or the
/// process cannot be started (hping3 is not installed: `cargo xtask setup`
/// installs it).
pub fn hping3(
    ns: &Namespace,
    flags: &[&str],
    source: Ipv4Addr,
    target: SocketAddr,
    limit: Duration,
) -> anyhow::Result<ChildGuard> {
    ensure!(is_spoofable(source), "spoofed source {source} is outside {SPOOFED_NET:?}");
    let IpAddr::V4(dst) = target.ip() else { bail!("hping3 floods here are IPv4 only, not {target}") };
    ensure!(which("hping3"), "hping3 is not installed (cargo xtask setup installs it)");
    let secs = limit.as_secs().max(1).to_string();
    let mut cmd = ns.command("timeout");
    // nice 19 on CPU 0 only: the flood takes what that core has left, and
    // the testbed's real traffic and the agent keep the other. Four senders
    // spread over both cores of the 2-core machine starved the testbed's own
    // kernel (its veths dropped real segments: 9 of 222 new connections
    // failed, from loss alone), which measures the machine, not the
    // balancer. Pinned, they still send 110,000-370,000 segments a second.
    cmd.args(["-s", "INT", "-k", "2", &secs, "taskset", "-c", "0", "nice", "-n", "19", "hping3", "--flood", "-q"])
        .args(flags)
        .args(["-a", &source.to_string(), "-p", &target.port().to_string(), &dst.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn(cmd, format!("hping3 {flags:?} from {source} in {}", ns.name()))
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        || ["/usr/sbin", "/sbin"].iter().any(|dir| std::path::Path::new(dir).join(program).is_file())
}

/// What [`spray`] sends.
#[derive(Debug, Clone, Copy)]
pub struct Spray {
    /// First spoofed source; the others follow it, one address per segment,
    /// `sources` of them, then the source port moves on. IPv4 inside
    /// [`SPOOFED_NET`], or IPv6 inside [`SPOOFED_NET6`], of the target's family.
    pub first_source: IpAddr,
    /// How many source addresses.
    pub sources: u32,
    /// Each segment's flags; with `then_ack`, the first segment of a pair.
    pub flags: u8,
    /// Follow each segment with an ACK of the same 5-tuple: a spoofed
    /// "handshake" that never saw the backend's SYN-ACK.
    pub then_ack: bool,
    /// At most this many segments.
    pub max_packets: u64,
    /// At most this long.
    pub limit: Duration,
}

impl Spray {
    /// Source number `i` (counted from `first_source`).
    fn source(&self, i: u32) -> IpAddr {
        match self.first_source {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(i))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(u128::from(i)))),
        }
    }
}

/// Whether `addr` is a source a spray may spoof: inside [`SPOOFED_NET`] or
/// [`SPOOFED_NET6`].
#[must_use]
pub fn is_spoofable_source(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => is_spoofable(a),
        IpAddr::V6(a) => {
            let (net, len) = SPOOFED_NET6;
            let mask = u128::MAX << (128 - u32::from(len));
            u128::from(a) & mask == u128::from(net) & mask
        }
    }
}

/// Sends [`Spray`]'s segments to `target` from inside `ns` through a raw
/// socket, as fast as one thread can, until its count or time runs out or
/// `stop` is set. Returns how many segments the kernel took.
///
/// # Errors
///
/// When a source falls outside [`SPOOFED_NET`] / [`SPOOFED_NET6`] or is not
/// of the target's family, or the namespace or raw socket cannot be entered
/// or opened.
pub fn spray(ns: &Namespace, target: SocketAddr, what: Spray, stop: &AtomicBool) -> anyhow::Result<u64> {
    let (first, last) = (what.first_source, what.source(what.sources.saturating_sub(1)));
    ensure!(
        what.sources > 0
            && is_spoofable_source(first)
            && is_spoofable_source(last)
            && first.is_ipv4() == target.is_ipv4()
            && first <= last,
        "spoofed sources {first}..={last} are not all inside {SPOOFED_NET:?} or {SPOOFED_NET6:?}, of {target}'s family"
    );
    ns.enter(|| spray_here(target, &what, None, stop)).with_context(|| format!("entering {}", ns.name()))?
}

/// Like [`spray`], but no faster than `per_second` segments a second
/// (steady load rather than a flood; at most 16 segments go back to back).
///
/// # Errors
///
/// As for [`spray`].
pub fn spray_paced(
    ns: &Namespace,
    target: SocketAddr,
    what: Spray,
    per_second: u64,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    ensure!(per_second > 0, "a pace of 0 segments a second sends nothing");
    let (first, last) = (what.first_source, what.source(what.sources.saturating_sub(1)));
    ensure!(
        what.sources > 0 && is_spoofable_source(first) && is_spoofable_source(last) && first <= last,
        "spoofed sources {first}..={last} are not all inside {SPOOFED_NET:?} or {SPOOFED_NET6:?}"
    );
    ns.enter(|| spray_here(target, &what, Some(per_second), stop)).with_context(|| format!("entering {}", ns.name()))?
}

fn spray_here(target: SocketAddr, what: &Spray, pace: Option<u64>, stop: &AtomicBool) -> anyhow::Result<u64> {
    let socket = RawSocket::open(target.is_ipv4())?;
    let started = Instant::now();
    let deadline = started + what.limit;
    let mut sent = 0u64;
    let mut i = 0u64;
    while sent < what.max_packets {
        // The clock and the flag every 256 segments: cheap enough.
        if i.is_multiple_of(256) && (Instant::now() >= deadline || stop.load(Ordering::Relaxed)) {
            break;
        }
        if let Some(per_second) = pace
            && i.is_multiple_of(16)
        {
            let due = Duration::from_secs_f64(sent as f64 / per_second as f64);
            if let Some(early) = due.checked_sub(started.elapsed()) {
                thread::sleep(early.min(deadline.saturating_duration_since(Instant::now())));
            }
            if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let src = SocketAddr::new(
            what.source((i % u64::from(what.sources)) as u32),
            1024 + ((i / u64::from(what.sources)) % 64_000) as u16,
        );
        i += 1;
        sent += u64::from(socket.send(&tcp_datagram(src, target, what.flags, 1000), target.ip()));
        if what.then_ack {
            sent += u64::from(socket.send(&tcp_datagram(src, target, tcp_flags::ACK, 1001), target.ip()));
        }
    }
    Ok(sent)
}

/// A whole IP datagram of `src`'s family holding a TCP segment without
/// payload, with valid checksums (`dst` must be of the same family).
#[must_use]
pub fn tcp_datagram(src: SocketAddr, dst: SocketAddr, flags: u8, seq: u32) -> Vec<u8> {
    match (src.ip(), dst.ip()) {
        (IpAddr::V6(s), IpAddr::V6(d)) => tcp_segment6(s, src.port(), d, dst.port(), flags, seq).to_vec(),
        (IpAddr::V4(s), IpAddr::V4(d)) => tcp_segment(s, src.port(), d, dst.port(), flags, seq).to_vec(),
        _ => Vec::new(),
    }
}

/// The 20-byte TCP header of a segment without payload, checksum 0.
fn tcp_header(sport: u16, dport: u16, flags: u8, seq: u32) -> [u8; 20] {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    if flags & tcp_flags::ACK != 0 {
        t[8..12].copy_from_slice(&1u32.to_be_bytes());
    }
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

/// A whole IPv4 datagram holding a TCP segment without payload, with valid
/// checksums.
#[must_use]
pub fn tcp_segment(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p[20..40].copy_from_slice(&tcp_header(sport, dport, flags, seq));
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_sum = checksum(&[&pseudo, &p[20..40]]);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// A whole IPv6 packet holding a TCP segment without payload, with a valid
/// checksum.
#[must_use]
pub fn tcp_segment6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8, seq: u32) -> [u8; 60] {
    let mut p = [0u8; 60];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&20u16.to_be_bytes());
    p[6] = 6;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..60].copy_from_slice(&tcp_header(sport, dport, flags, seq));
    let mut pseudo = [0u8; 40];
    pseudo[..32].copy_from_slice(&p[8..40]);
    pseudo[35] = 20;
    pseudo[39] = 6;
    let tcp_sum = checksum(&[&pseudo, &p[40..60]]);
    p[56..58].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) of the concatenated even-length parts.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An `IPPROTO_RAW` socket (which implies `IP_HDRINCL`, and for IPv6 since
/// Linux 4.5 `IPV6_HDRINCL`): the kernel routes each datagram by its
/// destination and sends it as it is.
struct RawSocket(libc::c_int);

impl RawSocket {
    fn open(ipv4: bool) -> anyhow::Result<Self> {
        let family = if ipv4 { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: plain socket(2); closed in Drop.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a raw IP socket");
        }
        Ok(Self(fd))
    }

    /// Sends one datagram; whether the kernel took it (a full queue is not
    /// waited out: a flood may lose segments).
    fn send(&self, datagram: &[u8], dst: IpAddr) -> bool {
        let n = match dst {
            IpAddr::V4(dst) => {
                // SAFETY: a zeroed sockaddr_in is valid; the fields are set below.
                let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                addr.sin_family = libc::AF_INET as libc::sa_family_t;
                addr.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
                // SAFETY: the buffer and address are valid for the call.
                unsafe {
                    libc::sendto(
                        self.0,
                        datagram.as_ptr().cast(),
                        datagram.len(),
                        0,
                        std::ptr::addr_of!(addr).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                }
            }
            IpAddr::V6(dst) => {
                // SAFETY: a zeroed sockaddr_in6 is valid; the fields are set below.
                let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                addr.sin6_addr.s6_addr = dst.octets();
                // SAFETY: the buffer and address are valid for the call.
                unsafe {
                    libc::sendto(
                        self.0,
                        datagram.as_ptr().cast(),
                        datagram.len(),
                        0,
                        std::ptr::addr_of!(addr).cast(),
                        size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                }
            }
        };
        n >= 0
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: the fd opened in `open`, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// Packets interface `dev` of namespace `ns` has sent (`tx`) or received.
///
/// # Errors
///
/// When the counter cannot be read.
pub fn link_packets(ns: &Namespace, dev: &str, tx: bool) -> anyhow::Result<u64> {
    let path = format!("/sys/class/net/{dev}/statistics/{}_packets", if tx { "tx" } else { "rx" });
    // `ip netns exec` remounts /sys for the namespace; a thread's setns does not.
    let out = ns.exec_ok(&["cat", &path])?;
    out.trim().parse().with_context(|| format!("{path}: {out:?}"))
}

/// What one kept-alive connection saw.
#[derive(Debug, Clone, Default)]
pub struct ConnReport {
    /// Requests answered.
    pub answered: u64,
    /// The backend that answered the first request.
    pub backend: Option<String>,
    /// Why the connection broke (an error, or another backend answering),
    /// and when, since the start; `None` if it lived to the end.
    pub broken: Option<(Duration, String)>,
    /// The longest a request waited for its answer.
    pub slowest: Duration,
}

/// Kept-alive HTTP connections from one namespace, each sending `GET /`
/// every `every` and checking that the same backend answers, until
/// [`KeptAlive::finish`] (or at most [`KeptAlive::MAX_RUN`]). A failed
/// request breaks its connection for good: it is not retried.
pub struct KeptAlive {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<ConnReport>>,
}

impl KeptAlive {
    /// Bound on how long the connections run if nobody stops them.
    pub const MAX_RUN: Duration = Duration::from_secs(120);
    /// How long a request may wait for its answer before its connection
    /// counts as broken: longer than the 10 s flood plus TCP's backed-off
    /// retransmissions (0.2 + 0.4 + ... + 6.4 s) of a segment a saturated
    /// veth queue kept dropping, so a connection that recovers once the
    /// flood ends is not counted broken (one did, at 11.9 s, under an ACK
    /// flood in a full run). A reset, a close or another backend answering
    /// breaks it at once.
    pub const STALL_LIMIT: Duration = Duration::from_secs(20);

    /// Opens `n` connections to `addr` from `ns` and starts their requests;
    /// returns once every connection has had its first answer.
    ///
    /// # Errors
    ///
    /// When a connection cannot be opened or its first request fails.
    pub fn start(ns: &Namespace, addr: SocketAddr, n: usize, every: Duration) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for _ in 0..n {
            let (ns, stop, ready) = (ns.clone(), Arc::clone(&stop), ready_tx.clone());
            threads.push(thread::spawn(move || {
                let report = ns.enter(|| keep_asking(addr, every, &stop, &ready));
                report.unwrap_or_else(|e| ConnReport {
                    broken: Some((Duration::ZERO, format!("{e:#}"))),
                    ..ConnReport::default()
                })
            }));
        }
        drop(ready_tx);
        let kept = KeptAlive { stop, threads };
        for _ in 0..n {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("a kept-alive connection did not start: {e}"),
                Err(_) => bail!("kept-alive connections did not start within 10 s"),
            }
        }
        Ok(kept)
    }

    /// Stops the requests and returns what each connection saw.
    #[must_use]
    pub fn finish(mut self) -> Vec<ConnReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .drain(..)
            .map(|t| {
                t.join().unwrap_or_else(|_| ConnReport {
                    broken: Some((Duration::ZERO, "its thread panicked".to_owned())),
                    ..ConnReport::default()
                })
            })
            .collect()
    }
}

impl Drop for KeptAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn keep_asking(
    addr: SocketAddr,
    every: Duration,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) -> ConnReport {
    let start = Instant::now();
    let mut report = ConnReport::default();
    let mut conn = match KeptConn::connect(addr) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("connecting to {addr}: {e:#}")));
            report.broken = Some((start.elapsed(), format!("connecting: {e:#}")));
            return report;
        }
    };
    while !stop.load(Ordering::Relaxed) && start.elapsed() < KeptAlive::MAX_RUN {
        let asked = Instant::now();
        let answer = conn.get();
        report.slowest = report.slowest.max(asked.elapsed());
        match (answer, &report.backend) {
            (Ok(b), None) => {
                report.backend = Some(b);
                let _ = ready.send(Ok(()));
            }
            (Ok(b), Some(first)) if &b != first => {
                report.broken = Some((start.elapsed(), format!("moved from {first} to {b}")));
                break;
            }
            (Ok(_), Some(_)) => {}
            (Err(e), first) => {
                if first.is_none() {
                    let _ = ready.send(Err(format!("{e:#}")));
                }
                report.broken = Some((start.elapsed(), format!("{e:#}")));
                break;
            }
        }
        report.answered += 1;
        thread::sleep(every);
    }
    report
}

/// A kept-alive connection that waits [`KeptAlive::STALL_LIMIT`] for an
/// answer: on 2 saturated cores a segment can be lost and sent again
/// several times, which is a stall, not a break.
struct KeptConn {
    reader: std::io::BufReader<std::net::TcpStream>,
    request: String,
}

impl KeptConn {
    fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = std::net::TcpStream::connect_timeout(&addr, Prober::CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(KeptAlive::STALL_LIMIT))?;
        stream.set_write_timeout(Some(KeptAlive::STALL_LIMIT))?;
        stream.set_nodelay(true)?;
        let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: keep-alive\r\n\r\n");
        Ok(KeptConn { reader: std::io::BufReader::new(stream), request })
    }

    /// One request; the backend named in its answer.
    fn get(&mut self) -> anyhow::Result<String> {
        use std::io::{BufRead as _, Read as _, Write as _};
        self.reader.get_mut().write_all(self.request.as_bytes()).context("sending the request")?;
        let mut line = String::new();
        ensure!(self.reader.read_line(&mut line).context("reading the status line")? > 0, "closed by the peer");
        ensure!(line.starts_with("HTTP/1.1 200"), "not a 200 answer: {line:?}");
        let mut length = 0usize;
        loop {
            line.clear();
            ensure!(self.reader.read_line(&mut line).context("reading headers")? > 0, "closed in the headers");
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().with_context(|| format!("bad {header:?}"))?;
            }
        }
        ensure!(length <= 64 * 1024, "a body of {length} bytes");
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).context("reading the body")?;
        crate::testbed::client::backend_name(&body).with_context(|| format!("no backend named in {body:?}"))
    }
}

/// What a [`Prober`] saw.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    /// Connections that got their answer.
    pub ok: u64,
    /// Connections that failed, with the first few errors (and when, since the start).
    pub failed: u64,
    /// Up to 10 failures.
    pub errors: Vec<(Duration, String)>,
    /// The slowest successful connection (connect and answer).
    pub slowest: Duration,
    /// Successful connections that took a second or more: a segment of
    /// theirs (most likely the SYN) was lost and sent again.
    pub retried: u64,
    /// Ticks that opened no connection because [`Prober::MAX_IN_FLIGHT`]
    /// were still open.
    pub skipped: u64,
}

impl ProbeReport {
    /// Connections opened: those answered and those failed.
    #[must_use]
    pub fn attempts(&self) -> u64 {
        self.ok + self.failed
    }

    fn record(&mut self, since_start: Duration, took: Duration, result: anyhow::Result<String>) {
        match result {
            Ok(_) => {
                self.ok += 1;
                self.slowest = self.slowest.max(took);
                self.retried += u64::from(took >= Duration::from_secs(1));
            }
            Err(e) => {
                self.failed += 1;
                if self.errors.len() < 10 {
                    self.errors.push((since_start, format!("{e:#}")));
                }
            }
        }
    }
}

/// Opens a new connection to `addr` every `every`, on schedule (a slow one
/// does not delay the next; at most [`Prober::MAX_IN_FLIGHT`] at a time),
/// sends `GET /` and counts the answers, until [`Prober::finish`] or at most
/// [`KeptAlive::MAX_RUN`]. A connection may
/// take [`Prober::CONNECT_TIMEOUT`] to be accepted, as a client whose kernel
/// resends a lost SYN three times (after 1, 3 and 7 s) would; the answer
/// then has [`KeptAlive::STALL_LIMIT`].
pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ProbeReport>>,
}

impl Prober {
    /// How long a connection may take to be accepted: past the third
    /// retransmission of its SYN (Linux sends them after 1, 3 and 7 s).
    pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(7500);

    /// Connections open at once at most: a tick that finds this many still
    /// waiting opens none, and counts as [`ProbeReport::skipped`].
    pub const MAX_IN_FLIGHT: usize = 64;

    /// Starts probing from `ns`.
    #[must_use]
    pub fn start(ns: &Namespace, addr: SocketAddr, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, flag) = (ns.clone(), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            ns.enter(|| probe(addr, every, &flag)).unwrap_or_else(|e| ProbeReport {
                failed: 1,
                errors: vec![(Duration::ZERO, format!("{e:#}"))],
                ..ProbeReport::default()
            })
        });
        Prober { stop, thread: Some(thread) }
    }

    /// Stops probing and returns the counts.
    #[must_use]
    pub fn finish(mut self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn probe(addr: SocketAddr, every: Duration, stop: &AtomicBool) -> ProbeReport {
    let start = Instant::now();
    let report = Arc::new(std::sync::Mutex::new(ProbeReport::default()));
    let mut open: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < KeptAlive::MAX_RUN {
        let tick = Instant::now();
        open.retain(|t| !t.is_finished());
        if open.len() < Prober::MAX_IN_FLIGHT {
            // A thread inherits the namespace of the thread that spawns it.
            let report = Arc::clone(&report);
            open.push(thread::spawn(move || {
                let began = Instant::now();
                let result = get_once(addr);
                let mut report = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                report.record(began.duration_since(start), began.elapsed(), result);
            }));
        } else {
            report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).skipped += 1;
        }
        thread::sleep(every.saturating_sub(tick.elapsed()));
    }
    // Each is bounded by its connect and I/O timeouts.
    for t in open {
        let _ = t.join();
    }
    let report = report.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    report.clone()
}

/// `GET /` on a new connection, accepted within [`Prober::CONNECT_TIMEOUT`];
/// the answering backend's name.
fn get_once(addr: SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let io = KeptAlive::STALL_LIMIT;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Prober::CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(io))?;
    stream.set_write_timeout(Some(io))?;
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .context("sending the request")?;
    let mut answer = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut answer).context("reading the answer")?;
    let text = String::from_utf8_lossy(&answer);
    ensure!(text.starts_with("HTTP/1.1 200"), "not a 200 answer: {text:?}");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    crate::testbed::client::backend_name(body.as_bytes()).with_context(|| format!("no backend named in {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spoofed_sources_stay_in_the_benchmarking_range() {
        assert!(is_spoofable(Ipv4Addr::new(198, 19, 0, 1)));
        assert!(is_spoofable(Ipv4Addr::new(198, 19, 255, 255)));
        assert!(!is_spoofable(Ipv4Addr::new(198, 18, 1, 2)), "the testbed's own");
        assert!(!is_spoofable(Ipv4Addr::new(8, 8, 8, 8)));
    }

    #[test]
    fn ipv6_segments_carry_valid_checksums() {
        let src = "2001:db8:ff::7".parse().expect("address");
        let p = tcp_segment6(src, 1234, "2001:db8::100".parse().expect("address"), 80, 0x02, 7);
        let (ip, rest) = etherparse::Ipv6Header::from_slice(&p).expect("ipv6");
        let (tcp, payload) = etherparse::TcpHeader::from_slice(rest).expect("tcp");
        assert!(tcp.syn && !tcp.ack);
        assert_eq!(tcp.checksum, tcp.calc_checksum_ipv6(&ip, payload).expect("checksum"));
        assert!(is_spoofable_source(IpAddr::V6(src)));
        assert!(!is_spoofable_source("2001:db8:1::2".parse().expect("address")), "the testbed's client");
    }

    #[test]
    fn segments_carry_valid_checksums() {
        let p = tcp_segment(Ipv4Addr::new(198, 19, 1, 2), 1234, Ipv4Addr::new(198, 18, 0, 100), 80, 0x12, 7);
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&p).expect("ipv4");
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let (tcp, payload) = etherparse::TcpHeader::from_slice(rest).expect("tcp");
        assert!(tcp.syn && tcp.ack && !tcp.rst);
        assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, payload).expect("checksum"));
    }
}

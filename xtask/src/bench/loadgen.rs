//! An HTTP/1.1 load generator of our own, on non-blocking sockets and epoll.
//!
//! Why not wrk alone: with `Connection: close` wrk reconnects after every
//! response, but it starts a request's clock when it writes the request, after
//! the TCP handshake (`c->start` is set in `socket_writeable`), so its latency
//! leaves out exactly what a balancer adds to a new connection (the SYN's new
//! flow). This client starts the clock before `connect` when every request has
//! its own connection, and before the write on a kept-alive one. It is
//! closed-loop like wrk: each connection sends its next request when the
//! previous answer is in (so latency under overload is under-reported, the
//! usual "coordinated omission", the same for every setup).
//!
//! Two drivers: [`closed_loop`] (a fixed number of connections, as fast as
//! they go, for `e2e`) and [`paced`] (a new connection at fixed intervals,
//! each recorded with its start time and the backend that answered, for
//! `failover`). Both are bounded by a request count and a deadline.

use std::{
    io,
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::Namespace;

/// Largest response accepted; the testbed backends answer `GET /` in ~100 bytes.
const MAX_RESPONSE: usize = 64 * 1024;
/// How long `epoll_wait` sleeps at most, so deadlines are checked that often.
const POLL_TICK_MS: i32 = 10;

// ------------------------------------------------------------------ closed loop

/// A closed-loop run: `connections` connections over `threads` threads, each
/// sending `GET /` as soon as its previous answer arrived.
#[derive(Debug, Clone)]
pub struct Load {
    pub target: SocketAddr,
    pub connections: usize,
    pub threads: usize,
    /// `true`: requests reuse their connection; `false`: `Connection: close`
    /// and a new connection per request.
    pub keep_alive: bool,
    /// Run before the measured window, not counted (ARP, caches, pools).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Bound on requests started in total, warm-up included.
    pub max_requests: u64,
    /// A request (with its connect) not answered within this is an error.
    pub io_timeout: Duration,
}

/// What a [`closed_loop`] run measured inside its window.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Answers completed inside the window.
    pub completed: u64,
    /// Failed requests (refused, reset, timed out, bad answer) inside the window.
    pub errors: u64,
    /// Latency of each completed request, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Length of the window.
    pub window: Duration,
}

impl LoadResult {
    pub fn requests_per_sec(&self) -> f64 {
        self.completed as f64 / self.window.as_secs_f64()
    }
}

/// The edges of the measured window, reported to the caller's `mark` so it
/// can sample CPU clocks there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    WindowStart,
    WindowEnd,
}

/// Runs `load` from namespace `ns`; `mark` is called on this thread at the
/// start and the end of the measured window.
pub fn closed_loop(ns: &Namespace, load: &Load, mut mark: impl FnMut(Mark)) -> anyhow::Result<LoadResult> {
    let start = Instant::now();
    let window = (start + load.warmup, start + load.warmup + load.duration);
    let budget = AtomicU64::new(load.max_requests);
    let threads = load.threads.max(1);
    let results = thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let conns = load.connections / threads + usize::from(t < load.connections % threads);
                let budget = &budget;
                s.spawn(move || ns.enter(|| Worker::new(load, window, budget).and_then(|w| w.run(conns))))
            })
            .collect();
        sleep_until(window.0);
        mark(Mark::WindowStart);
        sleep_until(window.1);
        mark(Mark::WindowEnd);
        workers.into_iter().map(|w| w.join()).collect::<Vec<_>>()
    });
    let mut total = LoadResult { window: load.duration, ..LoadResult::default() };
    for result in results {
        let part = result
            .map_err(|_| anyhow::anyhow!("a load generator thread panicked"))?
            .context("entering the client namespace")??;
        total.completed += part.completed;
        total.errors += part.errors;
        total.latencies_us.extend(part.latencies_us);
    }
    total.latencies_us.sort_unstable();
    Ok(total)
}

/// One thread's connections and its epoll set.
struct Worker<'a> {
    load: &'a Load,
    window: (Instant, Instant),
    budget: &'a AtomicU64,
    epoll: OwnedFd,
    request: Vec<u8>,
    result: LoadResult,
}

impl<'a> Worker<'a> {
    fn new(load: &'a Load, window: (Instant, Instant), budget: &'a AtomicU64) -> anyhow::Result<Self> {
        Ok(Self {
            load,
            window,
            budget,
            epoll: epoll_create().context("epoll_create1")?,
            request: request_bytes(load.target, load.keep_alive),
            result: LoadResult::default(),
        })
    }

    fn run(mut self, conns: usize) -> anyhow::Result<LoadResult> {
        let mut slots: Vec<Option<Conn>> = (0..conns).map(|_| None).collect();
        for (k, slot) in slots.iter_mut().enumerate() {
            *slot = self.open(k);
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; conns.max(1)];
        let mut last_scan = Instant::now();
        while Instant::now() < self.window.1 {
            for k in epoll_wait(&self.epoll, &mut events)? {
                self.on_ready(&mut slots, k);
            }
            if last_scan.elapsed() >= Duration::from_millis(POLL_TICK_MS as u64) {
                last_scan = Instant::now();
                for k in 0..slots.len() {
                    match &slots[k] {
                        Some(c) if c.deadline <= last_scan => self.fail(&mut slots, k),
                        // A connect that failed at once (e.g. no source port
                        // free) left its slot empty: try again a tick later.
                        None if self.budget.load(Ordering::Relaxed) > 0 => slots[k] = self.open(k),
                        _ => {}
                    }
                }
            }
        }
        Ok(self.result)
    }

    /// A new connection in slot `k`, unless the request budget is spent.
    fn open(&mut self, k: usize) -> Option<Conn> {
        if self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_err() {
            return None;
        }
        match Conn::connect(self.load.target, &self.epoll, k, self.load.io_timeout) {
            Ok(conn) => Some(conn),
            Err(_) => {
                self.count_error();
                None
            }
        }
    }

    fn on_ready(&mut self, slots: &mut [Option<Conn>], k: usize) {
        let Some(conn) = slots.get_mut(k).and_then(Option::as_mut) else {
            return;
        };
        match conn.advance(&self.request, &self.epoll, k) {
            Ok(Progress::Pending) => {}
            Ok(Progress::Answered(_)) => self.answered(slots, k),
            Err(_) => self.fail(slots, k),
        }
    }

    fn answered(&mut self, slots: &mut [Option<Conn>], k: usize) {
        let now = Instant::now();
        let Some(conn) = slots[k].as_mut() else {
            return;
        };
        if now >= self.window.0 && now < self.window.1 {
            self.result.completed += 1;
            let micros = now.duration_since(conn.started).as_micros();
            self.result.latencies_us.push(u32::try_from(micros).unwrap_or(u32::MAX));
        }
        let budget_left = self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_ok();
        if self.load.keep_alive && budget_left {
            if conn.send_next(&self.request, &self.epoll, k, self.load.io_timeout).is_err() {
                self.fail(slots, k);
            }
            return;
        }
        slots[k] = None;
        if budget_left {
            // The budget unit just taken pays for the new connection's request.
            self.budget.fetch_add(1, Ordering::Relaxed);
            slots[k] = self.open(k);
        }
    }

    fn fail(&mut self, slots: &mut [Option<Conn>], k: usize) {
        slots[k] = None;
        self.count_error();
        if Instant::now() < self.window.1 {
            slots[k] = self.open(k);
        }
    }

    fn count_error(&mut self) {
        let now = Instant::now();
        if now >= self.window.0 && now < self.window.1 {
            self.result.errors += 1;
        }
    }
}

// ------------------------------------------------------------------ paced

/// An open-loop run: a new connection (one `GET /`, `Connection: close`)
/// every `spacing`, whatever happened to the earlier ones.
#[derive(Debug, Clone)]
pub struct Paced {
    pub target: SocketAddr,
    pub spacing: Duration,
    /// The bound on the run; it ends earlier when its stop flag is set.
    pub max_duration: Duration,
    /// A connection not answered within this counts as failed.
    pub io_timeout: Duration,
}

/// One connection of a [`paced`] run.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When its `connect` was issued.
    pub start: Instant,
    /// The backend that answered, or what went wrong.
    pub outcome: Result<String, String>,
}

/// Runs `paced` from namespace `ns` until `stop` is set (or its bound) and
/// returns every attempt in start order. Bounded by `max_duration / spacing`
/// connections and `max_duration + io_timeout`.
pub fn paced(ns: &Namespace, paced: &Paced, stop: &AtomicBool) -> anyhow::Result<Vec<Attempt>> {
    ns.enter(|| paced_here(paced, stop))?
}

fn paced_here(p: &Paced, stop: &AtomicBool) -> anyhow::Result<Vec<Attempt>> {
    let epoll = epoll_create().context("epoll_create1")?;
    let request = request_bytes(p.target, false);
    let start = Instant::now();
    let mut total =
        usize::try_from((p.max_duration.as_nanos() / p.spacing.as_nanos().max(1)).max(1)).unwrap_or(usize::MAX);
    let mut attempts: Vec<Attempt> = Vec::with_capacity(total);
    let mut live: Vec<Option<Conn>> = Vec::with_capacity(total);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let hard_stop = start + p.max_duration + p.io_timeout + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) {
            total = attempts.len();
        }
        // Open every connection whose time has come (catching up after a stall).
        while attempts.len() < total && start + p.spacing * u32::try_from(attempts.len()).unwrap_or(u32::MAX) <= now {
            let k = attempts.len();
            let at = Instant::now();
            let (conn, outcome) = match Conn::connect(p.target, &epoll, k, p.io_timeout) {
                Ok(conn) => (Some(conn), Err("unfinished".to_owned())),
                Err(e) => (None, Err(format!("connect: {e}"))),
            };
            attempts.push(Attempt { start: at, outcome });
            live.push(conn);
        }
        if attempts.len() == total && live.iter().all(Option::is_none) || now >= hard_stop {
            break;
        }
        for k in epoll_wait(&epoll, &mut events)? {
            let Some(conn) = live.get_mut(k).and_then(Option::as_mut) else {
                continue;
            };
            match conn.advance(&request, &epoll, k) {
                Ok(Progress::Pending) => continue,
                Ok(Progress::Answered(name)) => attempts[k].outcome = name.ok_or_else(|| "no backend name".to_owned()),
                Err(e) => attempts[k].outcome = Err(e.to_string()),
            }
            live[k] = None;
        }
        let now = Instant::now();
        for (k, slot) in live.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|c| c.deadline <= now) {
                *slot = None;
                attempts[k].outcome = Err("timed out".to_owned());
            }
        }
    }
    for (k, slot) in live.iter().enumerate() {
        if slot.is_some() {
            attempts[k].outcome = Err("timed out".to_owned());
        }
    }
    Ok(attempts)
}

// ------------------------------------------------------------------ one connection

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Sending,
    Receiving,
}

/// What [`Conn::advance`] got to.
enum Progress {
    Pending,
    /// A complete `200` answer; the backend's name if the body had one.
    Answered(Option<String>),
}

/// One non-blocking connection registered in an epoll set under its slot number.
struct Conn {
    fd: OwnedFd,
    state: State,
    written: usize,
    buf: Vec<u8>,
    /// When the current request's clock started: at `connect` for the first
    /// request of a connection, at the write for later ones.
    started: Instant,
    deadline: Instant,
}

impl Conn {
    fn connect(target: SocketAddr, epoll: &OwnedFd, slot: usize, timeout: Duration) -> io::Result<Self> {
        let started = Instant::now();
        let fd = tcp_socket(target)?;
        let (addr, len) = sockaddr(target);
        // SAFETY: addr is a valid sockaddr of length len.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), libc::EPOLLOUT, slot)?;
        Ok(Self {
            fd,
            state: State::Connecting,
            written: 0,
            buf: Vec::with_capacity(512),
            started,
            deadline: started + timeout,
        })
    }

    /// Does what the socket is ready for; `Answered` once a whole response is in.
    fn advance(&mut self, request: &[u8], epoll: &OwnedFd, slot: usize) -> io::Result<Progress> {
        if self.state == State::Connecting {
            socket_error(&self.fd)?;
            self.state = State::Sending;
        }
        if self.state == State::Sending {
            self.write_some(request, epoll, slot)?;
            if self.state == State::Sending {
                return Ok(Progress::Pending);
            }
        }
        self.read_some()
    }

    fn write_some(&mut self, request: &[u8], epoll: &OwnedFd, slot: usize) -> io::Result<()> {
        while self.written < request.len() {
            // SAFETY: the pointer and length name the unwritten part of `request`.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    request[self.written..].as_ptr().cast(),
                    request.len() - self.written,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return epoll_ctl(epoll, libc::EPOLL_CTL_MOD, self.fd.as_raw_fd(), libc::EPOLLOUT, slot);
                }
                return Err(e);
            }
            self.written += n.cast_unsigned();
        }
        self.state = State::Receiving;
        epoll_ctl(epoll, libc::EPOLL_CTL_MOD, self.fd.as_raw_fd(), libc::EPOLLIN, slot)
    }

    fn read_some(&mut self) -> io::Result<Progress> {
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: chunk is a writable buffer of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock { Ok(Progress::Pending) } else { Err(e) };
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a whole answer"));
            }
            self.buf.extend_from_slice(&chunk[..n.cast_unsigned()]);
            match parse_response(&self.buf) {
                Parsed::Incomplete if self.buf.len() < MAX_RESPONSE => {}
                Parsed::Incomplete => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "answer too long"));
                }
                Parsed::Bad(why) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
                Parsed::Ok { body } => {
                    return Ok(Progress::Answered(lb_tests::testbed::client::backend_name(&self.buf[body..])));
                }
            }
        }
    }

    /// Starts the next request on this kept-alive connection.
    fn send_next(&mut self, request: &[u8], epoll: &OwnedFd, slot: usize, timeout: Duration) -> io::Result<()> {
        self.buf.clear();
        self.written = 0;
        self.state = State::Sending;
        self.started = Instant::now();
        self.deadline = self.started + timeout;
        self.write_some(request, epoll, slot)
    }
}

/// `GET /` for `target`, asking to close the connection unless `keep_alive`.
fn request_bytes(target: SocketAddr, keep_alive: bool) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: {connection}\r\n\r\n").into_bytes()
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Incomplete,
    Bad(&'static str),
    /// A whole `200` response whose body starts at `body`.
    Ok {
        body: usize,
    },
}

/// Whether `buf` holds a whole HTTP/1.x `200` response with a `Content-Length`.
fn parse_response(buf: &[u8]) -> Parsed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Parsed::Incomplete;
    };
    let head = &buf[..head_end];
    if !(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200")) {
        return Parsed::Bad("status is not 200");
    }
    let length = head.split(|&b| b == b'\n').find_map(|line| {
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        name.eq_ignore_ascii_case(b"content-length")
            .then(|| std::str::from_utf8(&value[1..]).ok()?.trim().parse::<usize>().ok())?
    });
    let Some(length) = length else {
        return Parsed::Bad("no content-length");
    };
    let body = head_end + 4;
    if buf.len() < body + length { Parsed::Incomplete } else { Parsed::Ok { body } }
}

// ------------------------------------------------------------------ sockets

fn tcp_socket(target: SocketAddr) -> io::Result<OwnedFd> {
    let family = if target.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_opt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    Ok(fd)
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: value is a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(fd, level, name, (&raw const value).cast(), size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The pending error of a non-blocking connect.
fn socket_error(fd: &OwnedFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err and len are valid for getsockopt to write.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut err).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 { Err(io::Error::from_raw_os_error(err)) } else { Ok(()) }
}

/// `addr` as a `sockaddr_storage` and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A blocking TCP connection from `src` (a fixed source port) to `dst`, for
/// mapping source ports to backends. `SO_REUSEADDR` lets a port be used again
/// at once; the caller closes with [`close_with_reset`] so no TIME_WAIT is left.
pub fn connect_from(src: SocketAddr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let fd = tcp_socket(dst)?;
    set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let (addr, len) = sockaddr(src);
    // SAFETY: addr is a valid sockaddr of length len.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (addr, len) = sockaddr(dst);
    // SAFETY: as above.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&raw mut pfd, 1, ms) } {
        0 => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        n if n < 0 => return Err(io::Error::last_os_error()),
        _ => socket_error(&fd)?,
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Closes `stream` with a RST (`SO_LINGER` 0): neither side keeps TIME_WAIT,
/// so the same source port can carry a new flow at once.
pub fn close_with_reset(stream: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: linger is a valid struct linger of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(stream);
}

/// One `GET /` with `Connection: close` on `stream`; returns the backend's name.
pub fn get_backend(stream: &mut TcpStream, target: SocketAddr) -> io::Result<String> {
    use std::io::{Read as _, Write as _};
    stream.write_all(&request_bytes(target, false))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a whole answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_response(&buf) {
            Parsed::Incomplete if buf.len() < MAX_RESPONSE => {}
            Parsed::Incomplete => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "answer too long"));
            }
            Parsed::Bad(why) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
            Parsed::Ok { body } => {
                return lb_tests::testbed::client::backend_name(&buf[body..])
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no backend name"));
            }
        }
    }
}

// ------------------------------------------------------------------ epoll

fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: plain epoll_create1(2).
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn epoll_ctl(epoll: &OwnedFd, op: libc::c_int, fd: RawFd, events: libc::c_int, slot: usize) -> io::Result<()> {
    let mut event = libc::epoll_event { events: events.cast_unsigned(), u64: slot as u64 };
    // SAFETY: a valid epoll fd, socket fd and event.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &raw mut event) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to [`POLL_TICK_MS`] and returns the slots that are ready.
fn epoll_wait(epoll: &OwnedFd, events: &mut [libc::epoll_event]) -> anyhow::Result<Vec<usize>> {
    let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: events is a writable array of max entries.
    let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), max, POLL_TICK_MS) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(Vec::new());
        }
        return Err(e).context("epoll_wait");
    }
    Ok(events[..n.cast_unsigned() as usize].iter().map(|e| e.u64 as usize).collect())
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_response_waits_for_the_whole_body() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Backend: b1\r\n\r\nbackend=b1\n";
        assert_eq!(parse_response(full), Parsed::Ok { body: full.len() - 11 });
        assert_eq!(parse_response(&full[..full.len() - 1]), Parsed::Incomplete);
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nconTent-length:0\r\n\r\n"), Parsed::Ok { body: 37 });
        assert_eq!(parse_response(b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n"), Parsed::Bad("status is not 200"));
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n"), Parsed::Bad("no content-length"));
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n"), Parsed::Incomplete);
    }

    #[test]
    fn requests_ask_for_close_only_without_keep_alive() {
        let target: SocketAddr = "198.18.0.100:80".parse().expect("address");
        let close = String::from_utf8(request_bytes(target, false)).expect("ascii");
        assert!(close.contains("Connection: close\r\n") && close.ends_with("\r\n\r\n"));
        let keep = String::from_utf8(request_bytes(target, true)).expect("ascii");
        assert!(keep.contains("Connection: keep-alive\r\n"));
    }
}

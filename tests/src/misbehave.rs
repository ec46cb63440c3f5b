//! Backends that misbehave (issue 12): an HTTP server in a backend's
//! namespace, in place of its `lb-testbed-backend` (stop that first with
//! [`Testbed::stop_backend`](crate::Testbed::stop_backend)), that answers
//! like it (`backend=<name>`) but fails in one chosen way.
//!
//! The server runs on threads of the test process, entered into the
//! namespace; it stops (and closes every connection) when its guard drops.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;

use crate::testbed::Namespace;

/// How a [`Misbehaving`] server fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Accepts connections and never reads or answers them.
    Silent,
    /// Answers every request, health checks included, after this delay.
    Slow(Duration),
    /// Answers `/health` with 200; resets every other request's connection.
    ResetsTraffic,
    /// Answers `/health` with 500; serves every other request.
    FailsHealth,
}

/// A misbehaving HTTP server; stops when dropped.
pub struct Misbehaving {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Misbehaving {
    /// How often the accept loop looks at its stop flag.
    const POLL: Duration = Duration::from_millis(10);

    /// Starts a server named `name` on `[::]:port` (both families) in `ns`
    /// that behaves as `behaviour`; returns once it listens.
    ///
    /// # Errors
    ///
    /// When the namespace cannot be entered or the port cannot be bound.
    pub fn start(ns: &Namespace, port: u16, name: &str, behaviour: Behaviour) -> anyhow::Result<Self> {
        let listener = ns
            .enter(|| TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))))?
            .with_context(|| format!("binding [::]:{port} in {}", ns.name()))?;
        listener.set_nonblocking(true).context("a non-blocking listener")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (Arc::clone(&stop), name.to_owned());
        let thread = thread::spawn(move || accept_loop(&listener, &name, behaviour, &flag));
        Ok(Misbehaving { stop, thread: Some(thread) })
    }
}

impl Drop for Misbehaving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until `stop`; each connection gets a thread, which also ends at `stop`.
fn accept_loop(listener: &TcpListener, name: &str, behaviour: Behaviour, stop: &Arc<AtomicBool>) {
    let mut handlers = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (stop, name) = (Arc::clone(stop), name.to_owned());
                handlers.push(thread::spawn(move || {
                    let _ = serve(stream, &name, behaviour, &stop);
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Misbehaving::POLL),
            Err(_) => thread::sleep(Misbehaving::POLL),
        }
    }
    for h in handlers {
        let _ = h.join();
    }
}

fn serve(stream: TcpStream, name: &str, behaviour: Behaviour, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    if behaviour == Behaviour::Silent {
        // Hold the connection, unread, until the server stops.
        while !stop.load(Ordering::Relaxed) {
            thread::sleep(Misbehaving::POLL);
        }
        return Ok(());
    }
    stream.set_read_timeout(Some(Misbehaving::POLL * 10))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while !stop.load(Ordering::Relaxed) {
        let path = match read_request(&mut reader) {
            Ok(Some(path)) => path,
            Ok(None) => return Ok(()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        };
        let health = path == "/health";
        let (status, body) = match behaviour {
            Behaviour::Slow(delay) => {
                thread::sleep(delay);
                (200, if health { "ok".to_owned() } else { format!("backend={name}\n") })
            }
            Behaviour::ResetsTraffic if !health => return reset(&writer),
            Behaviour::FailsHealth if health => (500, "broken\n".to_owned()),
            _ => (200, if health { "ok".to_owned() } else { format!("backend={name}\n") }),
        };
        let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nX-Backend: {name}\r\n\r\n", body.len());
        writer.write_all(head.as_bytes())?;
        writer.write_all(body.as_bytes())?;
    }
    Ok(())
}

/// Reads one request's head; its path, or `None` at end of stream.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        if header.trim().is_empty() {
            return Ok(Some(path));
        }
    }
}

/// Closes `stream` with a RST: SO_LINGER on with a zero timeout.
fn reset(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Dropping the caller's stream (and its clone in the reader) closes it.
    Ok(())
}

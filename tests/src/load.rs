//! Continuous, bounded load through a VIP while the gateway is operated on
//! (restarts, upgrades, drains): new connections at a steady pace, plus
//! kept-alive connections that ask at their own pace, each counted as it
//! fails. What issue 11's table measures.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::testbed::{Namespace, client::HttpConn};

/// The pace of a [`Load`].
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// A new connection (one request, then closed) this often.
    pub new_every: Duration,
    /// Kept-alive connections, opened at the start.
    pub kept: usize,
    /// Each kept-alive connection asks this often.
    pub ask_every: Duration,
    /// The load stops by itself after this long, stopped or not.
    pub limit: Duration,
}

impl Default for Pace {
    /// Issue 11's: a new connection every 50 ms, 10 kept-alive ones asking
    /// every 100 ms; at most a minute.
    fn default() -> Self {
        Pace {
            new_every: Duration::from_millis(50),
            kept: 10,
            ask_every: Duration::from_millis(100),
            limit: Duration::from_secs(60),
        }
    }
}

/// What a [`Load`] saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// New connections that got their answer.
    pub new_ok: usize,
    /// New connections that failed (connect, send or answer), with why.
    pub new_failed: Vec<String>,
    /// Requests answered on kept-alive connections.
    pub kept_requests: usize,
    /// Kept-alive connections that broke (an error, or another backend
    /// answering), with why; a broken one stops asking.
    pub kept_broken: Vec<String>,
    /// Kept-alive connections that could not even be opened.
    pub kept_unopened: Vec<String>,
    /// The backend each kept-alive connection was on, in order (`None` if
    /// it never got an answer).
    pub kept_backends: Vec<Option<String>>,
    /// The slowest answered request, either kind: a packet lost in the
    /// gateway shows here as a TCP retransmission (200 ms and up).
    pub slowest: Duration,
    /// Requests slower than [`SLOW`]: when each began (since the load
    /// started) and how long it took.
    pub slow: Vec<(Duration, Duration)>,
}

/// A request this slow likely waited for a TCP retransmission.
pub const SLOW: Duration = Duration::from_millis(150);

impl LoadReport {
    /// Records an answered request's latency.
    fn note(&mut self, at: Instant, started: Instant) {
        let took = at.elapsed();
        self.slowest = self.slowest.max(took);
        if took >= SLOW {
            self.slow.push((at.duration_since(started), took));
        }
    }

    /// Whether nothing failed and nothing broke.
    #[must_use]
    pub fn clean(&self) -> bool {
        self.new_failed.is_empty() && self.kept_broken.is_empty() && self.kept_unopened.is_empty()
    }
}

/// Load running on threads in the client namespace until [`Load::stop`]
/// (or its [`Pace::limit`]).
pub struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts the load against `vip` from namespace `client`; returns once
    /// every kept-alive connection has had its first answer (or failed).
    #[must_use]
    pub fn start(client: &Namespace, vip: SocketAddr, pace: Pace) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport { kept_backends: vec![None; pace.kept], ..LoadReport::default() }));
        let deadline = Instant::now() + pace.limit;
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for index in 0..pace.kept {
            let (client, stop, report, ready) = (client.clone(), stop.clone(), report.clone(), ready_tx.clone());
            threads.push(thread::spawn(move || {
                let _ = client.enter(|| keep_asking(vip, index, pace, deadline, &stop, &report, &ready));
            }));
        }
        drop(ready_tx);
        // Each kept connection reports once, opened or not; bounded by the
        // connect and first answer's timeouts.
        for _ in 0..pace.kept {
            let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        }
        let (client, stop2, report2) = (client.clone(), stop.clone(), report.clone());
        threads.push(thread::spawn(move || {
            let _ = client.enter(|| open_new(vip, pace, deadline, &stop2, &report2));
        }));
        Load { started: deadline - pace.limit, stop, report, threads }
    }

    /// When the load started: [`LoadReport::slow`] counts from here.
    #[must_use]
    pub fn started(&self) -> Instant {
        self.started
    }

    /// What the load has seen so far.
    #[must_use]
    pub fn snapshot(&self) -> LoadReport {
        self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Stops the load, waits for its threads, and returns what it saw.
    #[must_use]
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        self.report.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

fn record(report: &Mutex<LoadReport>, f: impl FnOnce(&mut LoadReport)) {
    f(&mut report.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
}

/// Sleeps until `next`, in slices, unless told to stop; returns whether to go on.
fn wait_until(next: Instant, deadline: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return false;
        }
        let now = Instant::now();
        if now >= next {
            return true;
        }
        thread::sleep((next - now).min(Duration::from_millis(20)));
    }
}

fn open_new(vip: SocketAddr, pace: Pace, deadline: Instant, stop: &AtomicBool, report: &Mutex<LoadReport>) {
    let started = deadline - pace.limit;
    let mut next = Instant::now();
    while wait_until(next, deadline, stop) {
        next += pace.new_every;
        let at = Instant::now();
        let result = HttpConn::connect(vip)
            .map_err(anyhow::Error::from)
            .and_then(|mut conn| conn.get("/", false))
            .and_then(|r| r.backend().ok_or_else(|| anyhow::anyhow!("status {} and no backend named", r.status)));
        match result {
            Ok(_) => record(report, |r| {
                r.new_ok += 1;
                r.note(at, started);
            }),
            Err(e) => record(report, |r| r.new_failed.push(format!("after {:?}: {e:#}", at.elapsed()))),
        }
    }
}

fn keep_asking(
    vip: SocketAddr,
    index: usize,
    pace: Pace,
    deadline: Instant,
    stop: &AtomicBool,
    report: &Mutex<LoadReport>,
    ready: &std::sync::mpsc::Sender<()>,
) {
    let started = deadline - pace.limit;
    let first = HttpConn::connect(vip)
        .map_err(anyhow::Error::from)
        .and_then(|mut conn| conn.get("/", true).map(|r| (conn, r.backend())));
    let _ = ready.send(());
    let (mut conn, backend) = match first {
        Ok((conn, Some(backend))) => (conn, backend),
        Ok((_, None)) => return record(report, |r| r.kept_unopened.push(format!("#{index}: no backend named"))),
        Err(e) => return record(report, |r| r.kept_unopened.push(format!("#{index}: {e:#}"))),
    };
    record(report, |r| {
        r.kept_requests += 1;
        r.kept_backends[index] = Some(backend.clone());
    });
    let mut next = Instant::now() + pace.ask_every;
    while wait_until(next, deadline, stop) {
        next += pace.ask_every;
        let at = Instant::now();
        match conn.get("/", true) {
            Ok(r) if r.backend().as_deref() == Some(backend.as_str()) => record(report, |r| {
                r.kept_requests += 1;
                r.note(at, started);
            }),
            Ok(r) => {
                let why = format!("#{index} on {backend}: answered by {:?}, status {}", r.backend(), r.status);
                return record(report, |r| r.kept_broken.push(why));
            }
            Err(e) => return record(report, |r| r.kept_broken.push(format!("#{index} on {backend}: {e:#}"))),
        }
    }
}

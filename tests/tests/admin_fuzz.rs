//! The fuzzed admin API (issue 12): random and mutated HTTP requests
//! ([`lb_tests::fuzz::http`]) against a running agent, on the admin port
//! (TCP, `/status` and `/metrics`) and on the control socket (Unix,
//! `/backend` and `/reload` too), from several connections at once.
//!
//! - Every complete request gets a response header or a close within
//!   [`ANSWER_BOUND`] (the control API's own answer timeout plus margin),
//!   and never a 500.
//! - Partial requests, held open meanwhile (a header cut short, a header
//!   trickled a byte every 500 ms, a body shorter than announced), are
//!   closed by the server within its header timeout (10 s, counted from the
//!   connection's start however slowly bytes come) or its idle timeout
//!   (60 s), plus margin; complete requests are served while they wait.
//! - The agent stays up: same process, `/status` answers afterwards, no
//!   panic in its log, and its memory stays bounded (peak and final RSS
//!   from `/proc`, against the RSS before).
//!
//! `LB_ADMIN_FUZZ_REQUESTS` (default 10,000, which take less than the
//! minute the short bodies keep the test waiting anyway: 20,000 took 60 s)
//! and `LB_FUZZ_SEED` (default 1) set the run; `cargo xtask fuzz --target
//! admin --cases N --seed S` runs it longer. Needs root (the agent attaches
//! XDP in a testbed).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    Testbed,
    agent::{ADMIN, Agent, HealthCheck, config_for},
    fuzz::http::{Answer, Request, RequestGenerator, Waiting, response_status},
};

/// Requests per run unless `LB_ADMIN_FUZZ_REQUESTS` says otherwise.
const DEFAULT_REQUESTS: u64 = 10_000;
/// The seed `cargo xtask test` runs with.
const DEFAULT_SEED: u64 = 1;
/// Connections sending complete requests at once.
const WORKERS: usize = 6;
/// Partial requests held open while the others run.
const PARTIALS: usize = 12;
/// A complete request is answered or closed within this: the control API
/// waits up to 30 s for the agent's event loop (`control::ANSWER_TIMEOUT`),
/// plus 10 s for a loaded 2-core machine.
const ANSWER_BOUND: Duration = Duration::from_secs(40);
/// The admin server's header timeout and idle timeout (`server::Limits::DEFAULT`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// What a partial request may wait past its timeout: timers fire late on a
/// loaded machine, and closing is not instant.
const CLOSE_MARGIN: Duration = Duration::from_secs(10);
/// RSS the agent may gain over the run (peak and at the end): a connection
/// costs tens of KiB, and at most 256 are served at once; a leak of even
/// one buffer per request would pass this after a few thousand requests.
const PEAK_GROWTH_KIB: u64 = 64 * 1024;
const FINAL_GROWTH_KIB: u64 = 32 * 1024;

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Admin,
    Control(&'a Path),
}

/// Either kind of stream, as the test uses them.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn open(target: Target<'_>) -> std::io::Result<Stream> {
        let stream = match target {
            Target::Admin => Stream::Tcp(TcpStream::connect_timeout(&ADMIN, Duration::from_secs(5))?),
            Target::Control(path) => Stream::Unix(UnixStream::connect(path)?),
        };
        stream.set_timeouts(Duration::from_millis(200), Duration::from_secs(5))?;
        Ok(stream)
    }

    fn set_timeouts(&self, read: Duration, write: Duration) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(read)).and_then(|()| s.set_write_timeout(Some(write))),
            Stream::Unix(s) => s.set_read_timeout(Some(read)).and_then(|()| s.set_write_timeout(Some(write))),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes),
            Stream::Unix(s) => s.write_all(bytes),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// Sends `request` and waits (at most `bound`) for a response header or a close.
fn exchange(target: Target<'_>, request: &Request, bound: Duration) -> Result<(Answer, Duration), String> {
    let started = Instant::now();
    let mut stream = Stream::open(target).map_err(|e| format!("connect: {e}"))?;
    for (i, piece) in request.pieces.iter().enumerate() {
        if i > 0 {
            thread::sleep(Duration::from_millis(request.pause_ms));
        }
        // The server may answer (431, 413) and close before it has read
        // everything; only what comes back matters.
        if stream.write_all(piece).is_err() {
            break;
        }
    }
    let mut got = Vec::new();
    let mut buf = [0_u8; 16 * 1024];
    loop {
        if let Some(status) = response_status(&got) {
            stream.shutdown();
            return Ok((Answer::Response(status), started.elapsed()));
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok((Answer::Closed, started.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            // A reset is a close too.
            Err(_) => return Ok((Answer::Closed, started.elapsed())),
        }
        if started.elapsed() > bound {
            return Err(format!(
                "neither answered nor closed within {bound:?} (got {} bytes: {:?})",
                got.len(),
                String::from_utf8_lossy(&got[..got.len().min(200)])
            ));
        }
    }
}

/// `VmRSS` and `VmHWM` (peak) of process `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the agent's /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The `lb` process itself: `ip netns exec` may run it as its child.
fn lb_pid(agent: &Agent) -> u32 {
    let pid = agent.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "lb" {
        return pid;
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children.split_whitespace().find_map(|c| c.parse().ok()).unwrap_or(pid)
}

struct Failure {
    index: u64,
    on: &'static str,
    what: String,
    why: String,
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn fuzzed_admin_requests_are_answered_or_closed_and_the_agent_stays_up() {
    lb_tests::require_root!();
    let seed = std::env::var("LB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    let requests: u64 =
        std::env::var("LB_ADMIN_FUZZ_REQUESTS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_REQUESTS);
    eprintln!(
        "admin fuzz: seed {seed}, {requests} requests (again: cargo xtask fuzz --target admin --seed {seed} --cases {requests})"
    );
    let testbed = Testbed::new(2).expect("building the testbed");
    let agent = Agent::start(&testbed, &config_for(&testbed, HealthCheck::default())).expect("starting lb");
    let pid = lb_pid(&agent);
    let socket = agent.control_socket();
    for _ in 0..50 {
        agent.status().expect("/status before the run");
    }
    let (rss_before, _) = memory_kib(pid);

    let started = Instant::now();
    let (failures, statuses, slowest, partial_closes) =
        testbed.gateway().enter(|| run(seed, requests, &socket)).expect("entering the gateway namespace");
    let took = started.elapsed();

    let (rss_after, rss_peak) = memory_kib(pid);
    assert_eq!(lb_pid(&agent), pid, "the agent is the same process");
    let status = agent.status().unwrap_or_else(|e| panic!("/status after the run: {e:#}; log:\n{}", agent.log()));
    assert!(status["vips"].is_array(), "/status after the run: {status}");
    eprintln!(
        "admin fuzz: {requests} requests in {took:.1?}; statuses {statuses}; slowest answer {slowest:?}; partial \
         requests closed after {partial_closes}; RSS {rss_before} KiB before, {rss_peak} KiB peak, {rss_after} KiB after"
    );
    let log = agent.log();
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
    if !failures.is_empty() {
        let mut message = format!("{} requests broke an invariant (seed {seed}):\n", failures.len());
        for f in failures.iter().take(10) {
            message.push_str(&format!("  #{} on {}: {}\n    made: {}\n", f.index, f.on, f.why, f.what));
        }
        panic!("{message}");
    }
    assert!(statuses.contains("200: "), "no request was served: {statuses}");
    assert!(
        rss_peak <= rss_before + PEAK_GROWTH_KIB && rss_after <= rss_before + FINAL_GROWTH_KIB,
        "the agent's memory grew: {rss_before} KiB before, {rss_peak} KiB peak, {rss_after} KiB after"
    );
}

/// Runs the partial requests and the complete ones at once, from the
/// gateway namespace; returns the failures, a tally of statuses, the
/// slowest answer and the partial requests' close times.
fn run(seed: u64, requests: u64, socket: &Path) -> (Vec<Failure>, String, Duration, String) {
    let failures = Mutex::new(Vec::new());
    let tally = Mutex::new(std::collections::BTreeMap::<String, u64>::new());
    let slowest = Mutex::new(Duration::ZERO);
    let closes = Mutex::new(Vec::new());
    let next = AtomicU64::new(0);
    let socket: PathBuf = socket.to_owned();
    thread::scope(|s| {
        let mut partial_gen = RequestGenerator::new(seed ^ 0x5107);
        for i in 0..PARTIALS {
            let request = partial_gen.partial();
            // A body is read only by the control socket's `POST /backend`
            // (the admin port answers 404 at once).
            let (on, target) = if request.waiting == Some(Waiting::Body) {
                ("control socket", Target::Control(&socket))
            } else {
                pick_target(i as u64, &socket)
            };
            let (failures, closes) = (&failures, &closes);
            s.spawn(move || {
                let bound = match request.waiting {
                    Some(Waiting::Body) => IDLE_TIMEOUT,
                    _ => HEADER_TIMEOUT,
                } + CLOSE_MARGIN;
                match exchange(target, &request, bound) {
                    Ok((answer, after)) => {
                        closes.lock().expect("lock").push(format!("{after:.1?} ({:?}, {answer:?})", request.waiting));
                    }
                    Err(why) => {
                        failures.lock().expect("lock").push(Failure { index: i as u64, on, what: request.what, why });
                    }
                }
            });
        }
        for w in 0..WORKERS {
            let (failures, tally, slowest, next, socket) = (&failures, &tally, &slowest, &next, &socket);
            s.spawn(move || {
                // Each worker its own stream of requests, so the run does not
                // depend on how the workers interleave.
                let mut generator = RequestGenerator::new(seed.wrapping_add(w as u64));
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= requests {
                        break;
                    }
                    let request = generator.complete();
                    let (on, target) = pick_target(index, socket);
                    match exchange(target, &request, ANSWER_BOUND) {
                        Ok((Answer::Response(500), _)) => failures.lock().expect("lock").push(Failure {
                            index,
                            on,
                            what: request.what,
                            why: "500 Internal Server Error".to_owned(),
                        }),
                        Ok((answer, took)) => {
                            let key = match answer {
                                Answer::Response(code) => code.to_string(),
                                Answer::Closed => "closed".to_owned(),
                            };
                            *tally.lock().expect("lock").entry(key).or_default() += 1;
                            let mut slowest = slowest.lock().expect("lock");
                            *slowest = (*slowest).max(took);
                        }
                        Err(why) => failures.lock().expect("lock").push(Failure { index, on, what: request.what, why }),
                    }
                }
            });
        }
    });
    let statuses = tally.into_inner().expect("lock").iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>();
    let mut closes = closes.into_inner().expect("lock");
    closes.sort();
    (failures.into_inner().expect("lock"), statuses.join(", "), slowest.into_inner().expect("lock"), closes.join("; "))
}

/// Even requests to the admin port, odd ones to the control socket.
fn pick_target(index: u64, socket: &Path) -> (&'static str, Target<'_>) {
    if index.is_multiple_of(2) { ("admin port", Target::Admin) } else { ("control socket", Target::Control(socket)) }
}

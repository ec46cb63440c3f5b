//! Health checks: one task per backend probes it every `interval`, turns the
//! results into up/down verdicts with rise/fall thresholds, and reports to
//! the agent over a channel.
//!
//! - [`probe`]: one probe (tcp, http, https, dns), bounded by the timeout.
//! - [`thresholds`]: the pure rise/fall state machine.
//! - [`passive`]: passive health, `max_fails` failed handshakes within
//!   `fail_timeout` seen in client traffic.
//!
//! The module decides nothing about the maps: the agent applies transitions
//! and logs them; this module only logs at debug level.

pub mod passive;
pub mod probe;
pub mod thresholds;

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Semaphore, SemaphorePermit, mpsc},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};

use lb_common::backend::{BACKEND_STATE_DOWN, BACKEND_STATE_UP};

pub use self::{
    probe::{ProbeFailure, Prober},
    thresholds::Tracker,
};
use crate::config::model::{HealthCheckConfig, HealthCheckKind};

/// What the agent believes about a backend: the health checks' verdict, and
/// what the balancer writes into `BACKENDS` for it.
///
/// `Unknown` is the state before the first verdict of the health checks; it
/// counts as not up, so a freshly started agent sends no flows to a backend
/// it has not seen answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
    Unknown,
}

impl Health {
    /// Whether the backend may take new flows (if it has weight).
    #[must_use]
    pub fn is_up(self) -> bool {
        self == Health::Up
    }

    /// Lowercase name for logs, metrics labels and the status API.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unknown => "unknown",
        }
    }

    /// Where a backend probed with `kind` starts: up when nothing probes it,
    /// unknown until its first probe otherwise.
    #[must_use]
    pub fn initial(kind: &HealthCheckKind) -> Self {
        match kind {
            HealthCheckKind::None => Health::Up,
            HealthCheckKind::Http { .. }
            | HealthCheckKind::Https { .. }
            | HealthCheckKind::Tcp
            | HealthCheckKind::Dns(_) => Health::Unknown,
        }
    }

    /// The `BACKENDS` state byte of a backend in this health
    /// (`lb_common::backend::BACKEND_STATE_*`): `UP` only when up, so an
    /// unknown backend's flows are rescheduled like a down one's. With
    /// [`Health::of_backend_state`], the one place the two meet.
    #[must_use]
    pub fn backend_state(self) -> u8 {
        if self.is_up() { BACKEND_STATE_UP } else { BACKEND_STATE_DOWN }
    }

    /// What a `BACKENDS` state byte says about its backend; an unused
    /// entry's says nothing.
    #[must_use]
    pub fn of_backend_state(state: u8) -> Self {
        match state {
            BACKEND_STATE_UP => Health::Up,
            BACKEND_STATE_DOWN => Health::Down,
            _ => Health::Unknown,
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of verdict, with a reason for the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The new verdict: up or down, never unknown again.
    pub health: Health,
    /// Why, e.g. "3 consecutive failures, last: HTTP status 503, expected 200-399".
    pub reason: String,
}

/// What a checker reports after each probe, so `/status` can show the last
/// outcome even when the verdict did not change.
#[derive(Clone, Debug)]
pub struct HealthEvent<K> {
    /// The key the checker was spawned with (the agent's backend id).
    pub key: K,
    /// The generation the checker was spawned with. A checker stopped by a
    /// reload may already have queued events; the agent gives each checker a
    /// new generation and drops events of any other, so a stale "down"
    /// cannot override what the reload decided.
    pub generation: u64,
    /// `Some` only when this probe changed the verdict.
    pub transition: Option<Transition>,
    /// `"ok"` or the failure reason, e.g. "connect: Connection refused (os error 111)".
    pub last_check: String,
    /// How long the probe took (from when it had a slot), if it reached a
    /// verdict about the backend; `None` for a probe that could not run
    /// here, and for a backend without checks.
    pub duration: Option<Duration>,
    /// Why the probe failed, as a metric label ([`failure_kind`]); `None`
    /// when it passed.
    pub failure: Option<&'static str>,
}

/// A short, fixed name for why a probe failed: the `reason` label of
/// `lb_health_check_failures_total`.
pub fn failure_kind(failure: &ProbeFailure) -> &'static str {
    match failure {
        ProbeFailure::Connect(_) => "connect",
        ProbeFailure::Local { .. } => "local",
        ProbeFailure::Send(_) => "send",
        ProbeFailure::Receive(_) => "receive",
        ProbeFailure::TimedOut(_) => "timeout",
        ProbeFailure::Closed { .. } => "closed",
        ProbeFailure::Malformed(_) => "malformed",
        ProbeFailure::Status { .. } => "status",
        ProbeFailure::Setup(_) => "setup",
        ProbeFailure::Body { .. } => "body",
        ProbeFailure::Tls(_) => "tls",
        ProbeFailure::Rcode(_) => "rcode",
        ProbeFailure::NoAnswer(..) => "no_answer",
        ProbeFailure::InvalidRequest(_) => "invalid_request",
    }
}

/// What `last_check` says after a successful probe.
pub const CHECK_OK: &str = "ok";

/// Longest delay before a checker's first probe, so that 1,000 checkers
/// spawned at once spread over a second rather than probing in one burst.
pub const MAX_STAGGER: Duration = Duration::from_secs(1);

/// What every checker shares: a cap on probes in flight, and a count of
/// probes that could not run.
///
/// Each probe holds one socket, so the cap (from the descriptor budget, see
/// `crate::descriptors`) keeps thousands of backends that never answer
/// from taking every descriptor, and probes never compete with anything
/// else for theirs. A probe waits for a slot before its timeout starts:
/// waiting delays it, but never fails it.
#[derive(Clone, Debug)]
pub struct ProbePool {
    slots: Arc<Semaphore>,
    capacity: usize,
    local_errors: Arc<AtomicU64>,
}

impl ProbePool {
    /// A pool of `capacity` probes in flight (at least 1).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        ProbePool { slots: Arc::new(Semaphore::new(capacity)), capacity, local_errors: Arc::default() }
    }

    /// Probes that may be in flight at once.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Probes that could not run for a local reason (no descriptor, no
    /// buffer) since the agent started; none of them counted against a backend.
    #[must_use]
    pub fn local_errors(&self) -> u64 {
        self.local_errors.load(Ordering::Relaxed)
    }

    /// Waits for a slot; the probe holds it until it ends. The semaphore is
    /// never closed, so this always gets one.
    async fn slot(&self) -> Option<SemaphorePermit<'_>> {
        self.slots.acquire().await.ok()
    }
}

/// Spawns a task that probes `address` every `config.interval`, in a slot
/// of `pool`, and sends a [`HealthEvent`] after every probe, tagged with
/// `key` and `generation`.
///
/// The first probe runs after a small deterministic stagger (see
/// [`stagger`]). With `initial` [`Health::Unknown`] its result decides the
/// verdict at once (see [`Tracker`]); with a known health (adopted from a
/// previous agent) `rise`/`fall` apply from the start.
/// A probe that fails locally ([`ProbeFailure::is_local`]) is reported in
/// `last_check`, counted in `pool`, and moves no streak. The task runs
/// until aborted or until `events` is closed.
///
/// With [`HealthCheckKind::None`] (which the agent never spawns) it sends a
/// single "up" event and ends, since there is nothing to probe.
pub fn spawn_checker<K: Clone + Send + Sync + 'static>(
    address: SocketAddr,
    config: HealthCheckConfig,
    key: K,
    generation: u64,
    initial: Health,
    pool: ProbePool,
    events: mpsc::Sender<HealthEvent<K>>,
) -> JoinHandle<()> {
    let reporter = Reporter { key, generation, events };
    tokio::spawn(async move {
        if matches!(config.kind, HealthCheckKind::None) {
            report_always_up(&reporter).await;
        } else {
            check_forever(address, &config, initial, &pool, &reporter).await;
        }
    })
}

/// Where a checker's events go, and what they are tagged with.
struct Reporter<K> {
    key: K,
    generation: u64,
    events: mpsc::Sender<HealthEvent<K>>,
}

impl<K: Clone> Reporter<K> {
    /// Sends one event; `false` when the receiver is gone.
    async fn send(&self, transition: Option<Transition>, last_check: String, probe: ProbeTiming) -> bool {
        let event = HealthEvent {
            key: self.key.clone(),
            generation: self.generation,
            transition,
            last_check,
            duration: probe.duration,
            failure: probe.failure,
        };
        self.events.send(event).await.is_ok()
    }
}

/// What an event says about the probe itself, for metrics.
#[derive(Clone, Copy, Debug, Default)]
struct ProbeTiming {
    duration: Option<Duration>,
    failure: Option<&'static str>,
}

/// The checker loop; returns only when the receiver is gone.
async fn check_forever<K: Clone>(
    address: SocketAddr,
    config: &HealthCheckConfig,
    initial: Health,
    pool: &ProbePool,
    reporter: &Reporter<K>,
) {
    let period = config.interval.max(Duration::from_millis(1));
    let start = Instant::now() + stagger(address, period);
    let mut ticks = tokio::time::interval_at(start, period);
    // A slow probe (or a full channel, or a wait for a slot) pushes the
    // schedule back instead of firing a burst of catch-up probes.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tracker = Tracker::starting_at(config.rise, config.fall, initial);
    let mut local_streak = false;
    // Prepared once: an HTTPS check reads its trust roots here, not per probe.
    let prober = Prober::new(&config.kind);
    loop {
        ticks.tick().await;
        let (result, took) = run_in_slot(address, &prober, config.timeout, pool).await;
        let last_check = result.as_ref().map_or_else(ToString::to_string, |()| CHECK_OK.to_owned());
        let transition = judge(&mut tracker, &result, &last_check);
        let local = result.as_ref().is_err_and(ProbeFailure::is_local);
        let timing = ProbeTiming {
            duration: (!local).then_some(took),
            failure: result.as_ref().err().filter(|_| !local).map(failure_kind),
        };
        if local {
            pool.local_errors.fetch_add(1, Ordering::Relaxed);
            // Once per streak: in a shortage every checker hits it at once.
            if !local_streak {
                tracing::warn!(%address, check = %last_check, "health probe could not run; not counted against the backend");
            }
        }
        local_streak = local;
        tracing::debug!(%address, check = %last_check, verdict = ?tracker.verdict(), "health probe");
        if !reporter.send(transition, last_check, timing).await {
            tracing::debug!(%address, "health event receiver closed; checker stopping");
            return;
        }
    }
}

/// Feeds a probe's result to `tracker` and returns the transition, if any.
/// A local failure says nothing about the backend: it moves no streak, so
/// it can neither take an up backend down nor break a down one's rise.
fn judge(tracker: &mut Tracker, result: &Result<(), ProbeFailure>, last_check: &str) -> Option<Transition> {
    match result {
        Err(failure) if failure.is_local() => None,
        _ => tracker.record(result.is_ok(), last_check),
    }
}

/// Runs one probe once `pool` has a slot for it; the timeout starts then.
#[cfg(test)]
async fn probe_in_slot(
    address: SocketAddr,
    config: &HealthCheckConfig,
    pool: &ProbePool,
) -> (Result<(), ProbeFailure>, Duration) {
    run_in_slot(address, &Prober::new(&config.kind), config.timeout, pool).await
}

/// Runs a prepared probe once `pool` has a slot for it; the timeout starts
/// then, and so does the duration returned with its result.
async fn run_in_slot(
    address: SocketAddr,
    prober: &Prober,
    timeout: Duration,
    pool: &ProbePool,
) -> (Result<(), ProbeFailure>, Duration) {
    let _slot = pool.slot().await;
    let started = Instant::now();
    let result = prober.run(address, timeout).await;
    (result, started.elapsed())
}

/// The [`HealthCheckKind::None`] checker: one "up" event, then done.
async fn report_always_up<K: Clone>(reporter: &Reporter<K>) {
    let transition = Transition { health: Health::Up, reason: "no health check configured".to_owned() };
    if !reporter.send(Some(transition), CHECK_OK.to_owned(), ProbeTiming::default()).await {
        tracing::debug!("health event receiver closed before the first event");
    }
}

/// Delay before the first probe of `address`: a hash of the address mapped
/// into `[0, min(interval, MAX_STAGGER))`.
///
/// Deterministic (same address, same delay within a build), so restarts and
/// tests are reproducible; spread by the hash, so checkers started together
/// keep probing at different instants, every interval, not just the first.
/// Keeping it below `interval` and 1 s means a fresh agent still learns
/// every backend's state within about a second.
pub fn stagger(address: SocketAddr, interval: Duration) -> Duration {
    let window = u64::try_from(interval.min(MAX_STAGGER).as_nanos()).unwrap_or(u64::MAX);
    if window == 0 {
        return Duration::ZERO;
    }
    // SipHash with fixed keys: deterministic, unlike RandomState.
    let mut hasher = DefaultHasher::new();
    address.hash(&mut hasher);
    Duration::from_nanos(hasher.finish() % window)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
        sync::watch,
        time::timeout,
    };

    use super::*;
    use crate::config::model::StatusRange;

    /// Long enough for a few 50 ms intervals; short enough that a broken
    /// checker fails the test quickly instead of hanging it.
    const WAIT: Duration = Duration::from_secs(3);

    fn http_config(interval_ms: u64, rise: u32, fall: u32) -> HealthCheckConfig {
        HealthCheckConfig {
            kind: HealthCheckKind::Http {
                path: "/healthz".to_owned(),
                expect_status: StatusRange { min: 200, max: 399 },
                host: None,
                expect_body: None,
            },
            interval: Duration::from_millis(interval_ms),
            // Generous, so a loaded machine does not turn a slow answer into a failure.
            timeout: Duration::from_secs(1),
            rise,
            fall,
            port: None,
        }
    }

    /// An HTTP server answering every request with the status `status` holds.
    async fn switchable_server(status: watch::Receiver<u16>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0; 1024];
                let _ = stream.read(&mut request).await;
                let code = *status.borrow();
                let response = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        address
    }

    /// Receives events until one carries a transition; returns it and the
    /// `last_check`s of the events before it.
    async fn next_transition(rx: &mut mpsc::Receiver<HealthEvent<&'static str>>) -> (Transition, Vec<String>) {
        let mut quiet = Vec::new();
        loop {
            let event = timeout(WAIT, rx.recv()).await.expect("an event in time").expect("channel open");
            assert_eq!((event.key, event.generation), ("backend-a", 7), "tagged as spawned");
            match event.transition {
                Some(transition) => return (transition, quiet),
                None => quiet.push(event.last_check),
            }
        }
    }

    #[tokio::test]
    async fn checker_reports_transitions_with_rise_and_fall() {
        let (set_status, status) = watch::channel(200);
        let address = switchable_server(status).await;
        let (tx, mut rx) = mpsc::channel(16);
        let checker =
            spawn_checker(address, http_config(50, 2, 2), "backend-a", 7, Health::Unknown, ProbePool::new(4), tx);

        let (first, before) = next_transition(&mut rx).await;
        assert_eq!(first, Transition { health: Health::Up, reason: "first check: ok".to_owned() });
        assert!(before.is_empty(), "the first probe decides: {before:?}");

        set_status.send(503).expect("server alive");
        let (down, before) = next_transition(&mut rx).await;
        let failure = "HTTP status 503, expected 200-399";
        assert_eq!(
            down,
            Transition { health: Health::Down, reason: format!("2 consecutive failures, last: {failure}") }
        );
        assert_eq!(before.last().map(String::as_str), Some(failure), "one failure is not enough: {before:?}");

        set_status.send(200).expect("server alive");
        let (up, before) = next_transition(&mut rx).await;
        assert_eq!(up, Transition { health: Health::Up, reason: "2 consecutive successes".to_owned() });
        assert_eq!(before.last().map(String::as_str), Some(CHECK_OK), "one success is not enough: {before:?}");

        let event = timeout(WAIT, rx.recv()).await.expect("keeps probing").expect("channel open");
        assert_eq!((event.transition, event.last_check.as_str()), (None, CHECK_OK));
        checker.abort();
    }

    #[tokio::test]
    async fn checker_stops_when_the_receiver_is_dropped() {
        let (_set_status, status) = watch::channel(200);
        let address = switchable_server(status).await;
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let checker =
            spawn_checker(address, http_config(50, 1, 1), "backend-a", 7, Health::Unknown, ProbePool::new(4), tx);
        timeout(WAIT, checker).await.expect("the checker ends").expect("no panic");
    }

    #[tokio::test]
    async fn checker_reports_a_dead_backend_down_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        drop(listener);
        let (tx, mut rx) = mpsc::channel(16);
        let mut config = http_config(50, 3, 3);
        config.kind = HealthCheckKind::Tcp;
        let checker = spawn_checker(address, config, "backend-a", 7, Health::Unknown, ProbePool::new(4), tx);
        let (transition, before) = next_transition(&mut rx).await;
        assert!(before.is_empty());
        assert!(!transition.health.is_up());
        assert!(transition.reason.starts_with("first check: connect: Connection refused"), "{}", transition.reason);
        checker.abort();
    }

    #[tokio::test]
    async fn none_checker_reports_up_once_and_ends() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut config = http_config(50, 2, 2);
        config.kind = HealthCheckKind::None;
        let unroutable: SocketAddr = "192.0.2.1:9".parse().expect("address");
        let checker = spawn_checker(unroutable, config, "backend-a", 7, Health::Unknown, ProbePool::new(4), tx);
        let (transition, _) = next_transition(&mut rx).await;
        assert!(transition.health.is_up());
        timeout(WAIT, checker).await.expect("the checker ends").expect("no panic");
        assert!(rx.recv().await.is_none(), "exactly one event");
    }

    fn emfile() -> ProbeFailure {
        ProbeFailure::Local { step: "socket", error: std::io::Error::from_raw_os_error(libc::EMFILE) }
    }

    #[test]
    fn local_failures_move_no_streak() {
        let refused = || ProbeFailure::Connect(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        let mut tracker = Tracker::new(2, 2);
        assert!(judge(&mut tracker, &Ok(()), CHECK_OK).is_some_and(|t| t.health.is_up()));
        // However many, local failures never take an up backend down...
        for _ in 0..10 {
            assert_eq!(judge(&mut tracker, &Err(emfile()), "local"), None);
        }
        assert_eq!(tracker.verdict(), Health::Up);
        // ...nor break the streak of real failures around them.
        assert_eq!(judge(&mut tracker, &Err(refused()), "refused"), None);
        assert_eq!(judge(&mut tracker, &Err(emfile()), "local"), None);
        assert!(judge(&mut tracker, &Err(refused()), "refused").is_some_and(|t| !t.health.is_up()));
        // A first probe that fails locally decides nothing.
        let mut fresh = Tracker::new(2, 2);
        assert_eq!(judge(&mut fresh, &Err(emfile()), "local"), None);
        assert_eq!(fresh.verdict(), Health::Unknown);
    }

    #[test]
    fn local_failures_say_so() {
        assert!(emfile().is_local());
        assert_eq!(emfile().to_string(), "local error, not the backend's: socket: Too many open files (os error 24)");
    }

    #[tokio::test]
    async fn the_pool_caps_probes_in_flight() {
        // A server that accepts and never answers: each HTTP probe holds its
        // slot until its timeout.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let pool = ProbePool::new(2);
        let mut config = http_config(1_000, 1, 1);
        config.timeout = Duration::from_millis(200);
        let probes: Vec<_> = (0..6)
            .map(|_| {
                let (pool, config) = (pool.clone(), config.clone());
                tokio::spawn(async move { probe_in_slot(address, &config, &pool).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.slots.available_permits(), 0, "two in flight, the rest wait");
        let started = std::time::Instant::now();
        for probe in probes {
            let result = timeout(WAIT, probe).await.expect("in time").expect("no panic");
            // Waiting for a slot is not part of the timeout: each times out
            // on its own 200 ms, not while it waited.
            let (result, took) = result;
            assert_eq!(result.map_err(|e| e.to_string()), Err("timed out after 200ms".to_owned()));
            assert!(took >= Duration::from_millis(200), "the duration covers the probe: {took:?}");
        }
        assert!(started.elapsed() >= Duration::from_millis(450), "three rounds of two: {:?}", started.elapsed());
        assert_eq!(pool.slots.available_permits(), 2);
    }

    #[test]
    fn stagger_is_deterministic_and_bounded() {
        let address: SocketAddr = "10.0.0.7:8080".parse().expect("address");
        for interval in [Duration::from_millis(50), Duration::from_secs(1), Duration::from_secs(10)] {
            let delay = stagger(address, interval);
            assert_eq!(delay, stagger(address, interval));
            assert!(delay < interval.min(MAX_STAGGER), "{delay:?} for {interval:?}");
        }
        assert_eq!(stagger(address, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn stagger_spreads_many_backends() {
        let delays: Vec<Duration> = (0..1000_u16)
            .map(|i| stagger(SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 80)), Duration::from_secs(5)))
            .collect();
        let early = delays.iter().filter(|d| **d < Duration::from_millis(500)).count();
        assert!((300..700).contains(&early), "{early} of 1000 in the first half");
    }
}

//! End to end: per-client limits (`[vip.limits]`) with the real `lb` agent
//! on a namespace testbed, real HTTP backends and real TCP clients. Needs
//! root. Each test builds its own testbed.
//!
//! The testbed's client namespace gets a second address (`SECOND_CLIENT`),
//! so two clients with budgets of their own share it.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use lb_common::client_limits::{VipLimits, admit};
use lb_tests::{
    Testbed,
    agent::{Agent, HealthCheck, config_for},
};
use socket2::{Domain, Socket, Type};

/// A second client in the testbed's client subnet (198.18.1.0/24).
const SECOND_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 50);
/// The testbed's client.
const FIRST_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

/// Health checks that a loaded 2-core machine does not fail: a backend
/// marked down would refuse connections too (no backend), which is not
/// what these tests measure.
const PATIENT: HealthCheck =
    HealthCheck { interval: Duration::from_secs(1), timeout: Duration::from_secs(1), rise: 2, fall: 5 };

/// The testbed's config with `limits` (lines of `[vip.limits]`) on the web VIP.
fn config_with_limits(testbed: &Testbed, limits: &str) -> String {
    let config = config_for(testbed, PATIENT);
    // The web VIP comes first; its section is followed by its health check.
    config.replacen("[vip.health_check]", &format!("[vip.limits]\n{limits}\n\n[vip.health_check]"), 1)
}

fn running(testbed: &Testbed, config: &str) -> Agent {
    let mut agent = Agent::start(testbed, config).expect("starting lb");
    agent.wait_health("web", &["up"; 3], Duration::from_secs(10)).expect("web backends up");
    agent
}

/// Adds [`SECOND_CLIENT`] to the client namespace.
fn add_second_client(testbed: &Testbed) {
    let cidr = format!("{SECOND_CLIENT}/24");
    let out =
        testbed.exec(testbed.client(), &["ip", "addr", "add", &cidr, "dev", testbed.client_if()]).expect("ip addr add");
    assert!(out.status.success(), "ip addr add: {}", String::from_utf8_lossy(&out.stderr));
}

/// How a connection attempt ended.
enum Attempt {
    Connected,
    Refused,
    Other(String),
}

/// Connects from `from` to `to`, waiting at most 1 s, and closes at once.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> Attempt {
    let socket = match Socket::new(Domain::IPV4, Type::STREAM, None) {
        Ok(s) => s,
        Err(e) => return Attempt::Other(format!("socket: {e}")),
    };
    if let Err(e) = socket.bind(&SocketAddr::new(IpAddr::V4(from), 0).into()) {
        return Attempt::Other(format!("bind {from}: {e}"));
    }
    match socket.connect_timeout(&to.into(), Duration::from_secs(1)) {
        Ok(()) => Attempt::Connected,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Attempt::Refused,
        Err(e) => Attempt::Other(e.to_string()),
    }
}

/// What a run of attempts gave: counts, and when each attempt started.
struct Tally {
    connected: u32,
    refused: u32,
    other: Vec<String>,
    /// Offsets of the attempts' starts from the first one.
    starts: Vec<Duration>,
}

/// Attempts paced at `per_second` from `from` for `duration`, each closed
/// at once.
fn paced_attempts(from: Ipv4Addr, to: SocketAddr, per_second: u32, duration: Duration) -> Tally {
    let mut tally = Tally { connected: 0, refused: 0, other: Vec::new(), starts: Vec::new() };
    let started = Instant::now();
    let gap = Duration::from_secs(1) / per_second;
    let mut next = started;
    while next < started + duration {
        tally.starts.push(started.elapsed());
        match connect_from(from, to) {
            Attempt::Connected => tally.connected += 1,
            Attempt::Refused => tally.refused += 1,
            Attempt::Other(e) => tally.other.push(e),
        }
        next += gap;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    tally
}

/// How many of attempts starting at `starts` a bucket of `rate` and `burst`
/// admits, by the data path's own arithmetic (`client_limits::admit`). On
/// a loaded machine the client stalls, and a bucket never banks more than
/// its burst, so fewer than rate × time get through; this is the number
/// that should.
fn modelled_admissions(starts: &[Duration], rate: u32, burst: u32) -> u32 {
    let limits = VipLimits::new(rate, burst, 0, 32, 0);
    let (mut next, mut admitted) = (0u64, 0);
    for start in starts {
        let now = 1_000_000_000 + u64::try_from(start.as_nanos()).unwrap_or(u64::MAX);
        if let Some(n) = admit(next, now, &limits) {
            next = n;
            admitted += 1;
        }
    }
    admitted
}

/// `lb_limited_total` for the web VIP and `limit`, from `/metrics`.
fn limited_metric(agent: &Agent, limit: &str) -> u64 {
    let text = agent.metrics().expect("/metrics");
    let prefix = format!("lb_limited_total{{vip=\"web\",limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_client_at_five_times_its_rate_is_held_to_it_and_another_is_untouched() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    add_second_client(&testbed);
    let config = config_with_limits(&testbed, "new_connections_per_second = 20\nburst = 5\naction = \"rst\"");
    let agent = running(&testbed, &config);
    let vip = testbed.vip_http();
    let window = Duration::from_secs(10);
    let (fast, slow) = testbed
        .client()
        .enter(|| {
            thread::scope(|s| {
                let fast = s.spawn(|| paced_attempts(FIRST_CLIENT, vip, 100, window));
                let slow = s.spawn(|| paced_attempts(SECOND_CLIENT, vip, 10, window));
                (fast.join().expect("fast client"), slow.join().expect("slow client"))
            })
        })
        .expect("entering the client namespace");
    // Every refusal is the limiter's (not, say, a backend marked down), and
    // counted; the count may be higher by SYNs resent after a lost answer.
    assert_eq!(agent.verdict("tx_rst_no_backend"), 0, "a backend went down during the test");
    let counted = limited_metric(&agent, "new_connections_per_second");
    assert!(counted >= u64::from(fast.refused), "{counted} refusals counted, {} seen", fast.refused);
    // Never over the limit: 20/s over 10 s plus the burst of 5, +5%.
    let within = |n: u32, of: u32| n.abs_diff(of) <= of / 20 + 2;
    assert!(fast.connected <= 215, "fast client admitted {} of {}", fast.connected, fast.starts.len());
    // And as many as the bucket allows for the attempts as they were made
    // (205 when the client kept its pace), within 5%.
    let modelled = modelled_admissions(&fast.starts, 20, 5);
    assert!(
        within(fast.connected, modelled),
        "fast client admitted {}, the bucket allows {modelled} (refused {}, other {:?})",
        fast.connected,
        fast.refused,
        fast.other
    );
    assert!(fast.other.len() <= 3, "fast client: {:?}", fast.other);
    eprintln!("fast client: {} of {} admitted, modelled {modelled}", fast.connected, fast.starts.len());
    assert_eq!((slow.refused, slow.other.len()), (0, 0), "the slow client was refused: {:?}", slow.other);
    assert!(slow.connected >= 90, "slow client made only {} attempts", slow.connected);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn concurrent_connections_are_capped_and_a_reload_keeps_the_count() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let limits = |max: u32| format!("max_connections_per_client = {max}\naction = \"rst\"");
    let config = config_with_limits(&testbed, &limits(5));
    let agent = running(&testbed, &config);
    let vip = testbed.vip_http();
    testbed
        .client()
        .enter(|| {
            // Each connection answers a request before the next opens, so its
            // first ACK has been through the gateway.
            let open = |n: usize| -> Vec<Result<lb_tests::testbed::client::HttpConn, String>> {
                (0..n)
                    .map(|_| {
                        let mut conn = lb_tests::testbed::client::HttpConn::connect(vip).map_err(|e| e.to_string())?;
                        conn.get("/", true).map_err(|e| format!("{e:#}"))?;
                        Ok(conn)
                    })
                    .collect()
            };
            let mut held = open(8);
            let ok = held.iter().filter(|c| c.is_ok()).count();
            assert_eq!(ok, 5, "5 of 8 admitted: {:?}", held.iter().map(|c| c.as_ref().err()).collect::<Vec<_>>());
            held.retain(Result::is_ok);
            // Two closed (FIN): two places free, and no more.
            held.truncate(3);
            thread::sleep(Duration::from_millis(200));
            let more = open(3);
            assert_eq!(more.iter().filter(|c| c.is_ok()).count(), 2, "two freed places");
            held.extend(more.into_iter().filter(Result::is_ok));
            // A reload to 6 keeps the count of 5: one more, not six.
            fs::write(agent.config_path(), config_with_limits(&testbed, &limits(6))).expect("rewriting the config");
            let pid = libc::pid_t::try_from(agent.pid()).expect("pid fits");
            // SAFETY: kill(2) with a pid we started and a valid signal number.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !agent.log().contains("limits changed") && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            assert!(agent.log().contains("limits changed"), "no reload in the log:\n{}", agent.log());
            let after = open(3);
            assert_eq!(after.iter().filter(|c| c.is_ok()).count(), 1, "one more place after the reload");
            drop(held);
        })
        .expect("entering the client namespace");
    assert!(limited_metric(&agent, "max_connections_per_client") >= 5);
}

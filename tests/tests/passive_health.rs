//! End to end: passive health (`[vip.passive_health]`, nginx's `max_fails` /
//! `fail_timeout` at layer 4, issue 11). Real agent, real kernels, real
//! client traffic. Needs root.
//!
//! The active checks are made slow on purpose (every 30 s, fall 2: a dead
//! backend takes them 30 to 61 s), so a backend marked down within
//! seconds, with a `passive:` reason, was taken out by client traffic
//! alone.
//!
//! - A backend whose server dies while its host stays up (it answers pings,
//!   and every SYN with a RST) is marked down by `max_fails = 3` refused
//!   handshakes, and new connections then all succeed on the others.
//! - With every backend healthy, the same traffic marks nothing down and
//!   counts no failure, while the handshake counters show it was seen.
//! - A UDP backend whose server died answers datagrams with ICMP port
//!   unreachable: taken out by `max_fails = 3` of them.

use std::{
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
};
use serde_json::Value;

const BACKENDS: usize = 3;
const VICTIM: usize = 2;
const UP: [&str; 3] = ["up", "up", "up"];
const VICTIM_DOWN: [&str; 3] = ["up", "down", "up"];

/// Active checks too slow to notice anything within the test: the first
/// probe at start (within a second), the next 30 s later.
const SLOW_CHECKS: HealthCheck =
    HealthCheck { interval: Duration::from_secs(30), timeout: Duration::from_secs(1), rise: 2, fall: 2 };

/// The bound on passive detection after the server dies. Traffic sends
/// about 50 new connections a second ([`round`]), a third of them to the
/// victim, each refused at once: 3 refusals take a fraction of a second,
/// plus up to 2 s of sampling (the sample during which it died is
/// forgiven, see `health::passive`).
/// 20 s leaves room for a loaded 2-core machine and stays below the 30 s
/// at which the active checks could first see it.
const DETECTION_BOUND: Duration = Duration::from_secs(20);

/// The testbed's config with `[vip.passive_health]` on the `web` VIP and
/// the `echo` (UDP) VIP, the last one in the file.
fn config(testbed: &Testbed) -> String {
    let config = agent::config_for(testbed, SLOW_CHECKS);
    let echo = "[[vip]]\nname = \"echo\"";
    assert!(config.contains(echo), "the generated config changed shape:\n{config}");
    let passive = "[vip.passive_health]\nmax_fails = 3\nfail_timeout = \"10s\"\n\n";
    format!("{}{passive}", config.replacen(echo, &format!("{passive}{echo}"), 1))
}

fn start() -> (Testbed, Agent) {
    let testbed = Testbed::new(BACKENDS).expect("building the testbed");
    let mut agent = Agent::start(&testbed, &config(&testbed)).expect("starting lb");
    agent.wait_health("web", &UP, Duration::from_secs(10)).expect("web backends up");
    (testbed, agent)
}

/// Backend `i` (1-based) of VIP `web` in `/status`.
fn backend(status: &Value, i: usize) -> Value {
    backend_of(status, "web", i)
}

/// Backend `i` (1-based) of VIP `vip` in `/status`.
fn backend_of(status: &Value, vip: &str, i: usize) -> Value {
    let found = status["vips"].as_array().and_then(|v| v.iter().find(|v| v["name"] == vip));
    found.map(|w| w["backends"][i - 1].clone()).unwrap_or_else(|| panic!("no vip {vip} in {status}"))
}

fn counter(backend: &Value, path: &[&str]) -> u64 {
    let mut v = backend;
    for key in path {
        v = &v[*key];
    }
    v.as_u64().unwrap_or_else(|| panic!("no {path:?} in {backend}"))
}

/// `n` new connections to the VIP; returns how many failed.
fn traffic(testbed: &Testbed, n: usize) -> usize {
    testbed.client_requests(testbed.vip_http(), n, true).iter().filter(|r| r.is_err()).count()
}

/// Connections per round of client traffic, and the pause after each: about
/// 50 new connections a second (a refused one takes microseconds, so
/// unpaced rounds would send thousands between two samples).
const ROUND: usize = 10;
const PAUSE: Duration = Duration::from_millis(200);

/// One round of paced client traffic; returns how many failed.
fn round(testbed: &Testbed) -> usize {
    let failed = traffic(testbed, ROUND);
    thread::sleep(PAUSE);
    failed
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_backend_whose_listener_closed_is_taken_out_by_client_traffic_alone() {
    lb_tests::require_root!();
    let (testbed, agent) = start();
    assert_eq!(traffic(&testbed, 30), 0, "every backend serves before the test");

    testbed.stop_backend(VICTIM).expect("stopping the victim's server");
    let stopped = Instant::now();
    // Its host is still there: the gateway's pings are answered.
    let ping = ["ping", "-c", "1", "-W", "2", &testbed.backend_addr(VICTIM).to_string()];
    testbed.gateway().exec_ok(&ping).expect("the victim's host answers pings");

    // Client traffic until the victim is down; bounded in time and count.
    let mut sent = 0;
    while agent.backend_health("web").expect("health") != VICTIM_DOWN {
        assert!(
            stopped.elapsed() < DETECTION_BOUND && sent < 2_000,
            "not marked down {:?} after the server died ({sent} connections); status: {}; lb's log:\n{}",
            stopped.elapsed(),
            agent.status().map(|s| s.to_string()).unwrap_or_default(),
            agent.log()
        );
        let failed = round(&testbed);
        sent += ROUND;
        eprintln!("{:?}: {ROUND} new connections, {failed} refused", stopped.elapsed());
    }
    let took = stopped.elapsed();
    eprintln!("victim down {took:?} after its server died, after {sent} connections");

    let status = agent.status().expect("/status");
    let victim = backend(&status, VICTIM);
    let reason = victim["down_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("passive: ") && reason.contains("refused"), "not passive health's doing: {victim}");
    assert!(counter(&victim, &["handshakes", "resets"]) >= 3, "{victim}");
    assert!(counter(&victim, &["passive_failures"]) >= 3, "{victim}");
    for other in [1, 3] {
        assert_eq!(counter(&backend(&status, other), &["passive_failures"]), 0, "backend {other} failed");
    }
    let metrics = agent.metrics().expect("/metrics");
    let victim_addr = testbed.backend_http(VICTIM);
    let line = format!("lb_backend_passive_failures_total{{vip=\"web\",backend=\"{victim_addr}\"}}");
    assert!(metrics.lines().any(|l| l.starts_with(&line)), "no {line} in\n{metrics}");

    // From now on, every new connection succeeds on the others.
    let victim_name = testbed.backend_name(VICTIM);
    for (i, r) in testbed.client_requests(testbed.vip_http(), 60, true).into_iter().enumerate() {
        match r {
            Ok(name) => assert_ne!(name, victim_name, "request {i} went to the victim"),
            Err(e) => panic!("request {i} failed after the victim was marked down: {e:#}"),
        }
    }
    // The active checks restarted from down and agree: it stays down.
    assert_eq!(agent.backend_health("web").expect("health"), VICTIM_DOWN);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn healthy_backends_under_the_same_traffic_are_never_marked_down() {
    lb_tests::require_root!();
    let (testbed, agent) = start();
    // The same paced traffic for 10 s (bounded in count and time).
    let started = Instant::now();
    let mut failed = 0;
    for _ in 0..100 {
        if started.elapsed() >= Duration::from_secs(10) {
            break;
        }
        failed += round(&testbed);
    }
    assert_eq!(failed, 0, "healthy backends refused connections");
    // Two sample intervals, so SYNs still in flight at the last sample
    // would have been judged.
    thread::sleep(Duration::from_secs(3));
    let status = agent.status().expect("/status");
    assert_eq!(agent.backend_health("web").expect("health"), UP);
    for i in 1..=BACKENDS {
        let b = backend(&status, i);
        assert_eq!(counter(&b, &["passive_failures"]), 0, "backend {i}: {b}");
        assert_eq!(counter(&b, &["handshakes", "resets"]), 0, "backend {i}: {b}");
        // The test could fail: the data path saw this backend's handshakes.
        let (syns, syn_acks) = (counter(&b, &["handshakes", "syns"]), counter(&b, &["handshakes", "syn_acks"]));
        assert!(syns > 0 && syn_acks > 0, "backend {i}: {syns} SYNs, {syn_acks} SYN+ACKs: {b}");
        assert!(b["down_reason"].is_null(), "backend {i}: {b}");
    }
}

/// UDP has no handshake: a datagram whose backend has no socket for it is
/// answered with ICMP port unreachable, which passes through the gateway
/// on its way to the client and counts as a failure.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_udp_backend_answering_port_unreachable_is_taken_out() {
    lb_tests::require_root!();
    let (testbed, mut agent) = start();
    agent.wait_health("echo", &UP, Duration::from_secs(10)).expect("echo backends up");
    testbed.stop_backend(VICTIM).expect("stopping the victim's servers");
    let stopped = Instant::now();
    let vip = testbed.vip_udp();
    // Rounds of datagrams from fresh sockets (new flows, spread over the
    // backends), not waiting for echoes; bounded in count and time. The
    // victim's kernel rate-limits its unreachables per client (a burst of
    // 6, then 1 a second), enough for 3 within 10 s.
    let mut sent = 0;
    while agent.backend_health("echo").expect("health") != VICTIM_DOWN {
        assert!(
            stopped.elapsed() < DETECTION_BOUND && sent < 2_000,
            "not marked down {:?} after the server died ({sent} datagrams); status: {}",
            stopped.elapsed(),
            agent.status().map(|s| s.to_string()).unwrap_or_default(),
        );
        testbed
            .client()
            .enter(move || {
                for _ in 0..ROUND {
                    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a udp socket");
                    let _ = socket.send_to(b"ping", vip);
                }
            })
            .expect("the client namespace");
        sent += ROUND;
        thread::sleep(PAUSE);
    }
    eprintln!("udp victim down {:?} after its server died, after {sent} datagrams", stopped.elapsed());
    let status = agent.status().expect("/status");
    let victim = backend_of(&status, "echo", VICTIM);
    let reason = victim["down_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("passive: ") && reason.contains("unreachable"), "{victim}");
    assert!(counter(&victim, &["handshakes", "unreachables"]) >= 3, "{victim}");
    // The others still echo, each datagram from a new flow.
    let victim_name = testbed.backend_name(VICTIM);
    for i in 0..20 {
        let result = testbed.client_udp(vip, &[b"after"], 0).pop().expect("one result");
        match result {
            Ok(name) => assert_ne!(name, victim_name, "datagram {i} went to the victim"),
            Err(e) => panic!("datagram {i} failed after the victim was marked down: {e:#}"),
        }
    }
}

//! `/metrics` of a running agent, as Prometheus' own tools see it: the
//! exposition passes `promtool check metrics`, says what the issue asks
//! (serving backends, states, health-check timing and failures, build and
//! process), and `lb_conntrack_entries` is current without waiting for a walk.
//! Needs root, and promtool (Debian's `prometheus`; `cargo xtask setup`).

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
};

const BACKENDS: usize = 3;

fn running() -> (Agent, Testbed) {
    let testbed = Testbed::new(BACKENDS).expect("building the testbed");
    let mut agent = Agent::start(&testbed, &agent::config_for(&testbed, HealthCheck::default())).expect("starting lb");
    let all_up = ["up"; BACKENDS];
    agent.wait_health("web", &all_up, Duration::from_secs(10)).expect("web backends up");
    (agent, testbed)
}

/// `promtool check metrics` on `text`: its verdict and what it printed.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

/// The value of the sample whose name and labels are exactly `series`.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn lb(agent: &Agent, args: &[&str]) {
    let out = agent.lb(args).expect("running lb");
    assert!(out.status.success(), "lb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_live_agents_metrics_pass_promtool_and_tell_states_apart() {
    lb_tests::require_root!();
    let (mut agent, testbed) = running();
    let drained = testbed.backend_http(2).to_string();
    lb(&agent, &["backend", "drain", "web", &drained]);
    let ok = testbed.client_requests(testbed.vip_http(), 30, true).iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 30, "the VIP serves with one backend drained");
    // Backend 3 dies: its checks fail to connect, and it goes down.
    testbed.stop_backend(3).expect("stopping backend 3");
    let check = HealthCheck::default();
    // The detection bound, doubled for a loaded machine.
    agent
        .wait_health("web", &["up", "up", "down"], check.detection_bound() * 2 + Duration::from_secs(2))
        .expect("3 down");

    let metrics = agent.metrics().expect("/metrics");
    let (passed, said) = promtool_check(&metrics);
    assert!(passed, "promtool check metrics: {said}\n{metrics}");
    assert!(said.trim().is_empty(), "promtool has no lint to report: {said}");

    let b = |i: usize| format!("vip=\"web\",backend=\"{}\"", testbed.backend_http(i));
    for (series, want) in [
        // Backend 1 serves; 2 is drained (up, but no new flows); 3 is down.
        ("lb_vip_backends_serving{vip=\"web\"}".to_owned(), 1.0),
        ("lb_vip_backends_up{vip=\"web\"}".to_owned(), 2.0),
        (format!("lb_backend_serving{{{}}}", b(1)), 1.0),
        (format!("lb_backend_serving{{{}}}", b(2)), 0.0),
        (format!("lb_backend_admin_state{{{},state=\"drain\"}}", b(2)), 1.0),
        (format!("lb_backend_health{{{},state=\"up\"}}", b(2)), 1.0),
        (format!("lb_backend_health{{{},state=\"down\"}}", b(3)), 1.0),
        (format!("lb_backend_health{{{},state=\"unknown\"}}", b(3)), 0.0),
        // Its first verdict, then down.
        (format!("lb_backend_health_changes_total{{{}}}", b(3)), 2.0),
        (format!("lb_backend_health_changes_total{{{}}}", b(1)), 1.0),
        (format!("lb_backend_weight{{{}}}", b(1)), 1.0),
    ] {
        assert_eq!(value(&metrics, &series), Some(want), "{series} in\n{metrics}");
    }
    let positive = |series: String| {
        let v = value(&metrics, &series);
        assert!(v.is_some_and(|v| v > 0.0), "{series} = {v:?} in\n{metrics}");
    };
    positive(format!("lb_health_check_duration_seconds_count{{{}}}", b(1)));
    positive(format!("lb_health_check_duration_seconds_sum{{{}}}", b(1)));
    positive(format!("lb_health_check_failures_total{{{},reason=\"connect\"}}", b(3)));
    positive(format!("lb_backend_last_health_change_timestamp_seconds{{{}}}", b(3)));
    positive("lb_vip_packets_total{vip=\"web\",direction=\"in\"}".to_owned());
    positive("lb_vip_packets_total{vip=\"web\",direction=\"out\"}".to_owned());
    positive("lb_vip_bytes_total{vip=\"web\",direction=\"out\"}".to_owned());
    positive("lb_verdict_packets_total{action=\"redirect\",reason=\"to_backend\"}".to_owned());
    for interface in [testbed.gateway_client_if(), testbed.gateway_backend_if()] {
        positive(format!("lb_xdp_attached{{interface=\"{interface}\",mode=\"native\"}}"));
    }
    positive("process_resident_memory_bytes".to_owned());
    positive("process_open_fds".to_owned());
    positive("process_start_time_seconds".to_owned());
    let build = metrics.lines().find(|l| l.starts_with("lb_build_info{")).expect("lb_build_info");
    assert!(build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))) && build.ends_with(" 1"), "{build}");
    assert!(build.contains("kernel=\"") && !build.contains("kernel=\"unknown\""), "{build}");
}

/// Keys inserted into the connection table, from `/metrics`.
fn inserted(metrics: &str) -> f64 {
    value(metrics, "lb_conntrack_events_total{event=\"inserted\"}").expect("lb_conntrack_events_total")
}

/// Issue 13: `lb_conntrack_entries` read 0 a second after millions of
/// inserts, because it was only the last walk's count (one every 5 s at
/// most). Now it adds the inserts since that walk began: 50 new
/// connections show at the next scrape, whenever the last walk was.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn conntrack_entries_count_new_flows_at_once() {
    lb_tests::require_root!();
    let (agent, testbed) = running();
    let entries = |m: &str| value(m, "lb_conntrack_entries").expect("lb_conntrack_entries");
    // This scrape starts a walk if the last is stale; the next ones come
    // well within the 5 s before another may start.
    let before = agent.metrics().expect("/metrics");
    let started = Instant::now();
    let n = 50;
    let ok = testbed.client_requests(testbed.vip_http(), n, true).iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, n, "every request answered");
    let after = agent.metrics().expect("/metrics");
    let took = started.elapsed();
    let (e0, e1) = (entries(&before), entries(&after));
    let new_keys = inserted(&after) - inserted(&before);
    // Each request is a connection of its own, tracked from its first ACK.
    assert!(new_keys >= n as f64, "{new_keys} keys inserted for {n} connections");
    // Nothing is evicted from a table this empty, so every new key is an
    // entry more. Whatever walk ran in between, the figure is never below
    // the entries present.
    assert!(e1 >= e0 + n as f64, "entries {e0} -> {e1} after {n} new flows in {took:?}");
    let capacity = value(&after, "lb_conntrack_capacity").expect("capacity");
    assert!(e1 <= capacity, "{e1} entries in a table of {capacity}");
    assert_eq!(value(&after, "lb_conntrack_evictions_total"), Some(0.0), "nothing evicted:\n{after}");
}

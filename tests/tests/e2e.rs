//! End to end: the real `lb` agent with its XDP program attached to the
//! gateway of a namespace testbed, real HTTP and UDP backends, real traffic.
//! Needs root. Each test builds its own testbed, so they run in parallel.

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    Spread, Testbed,
    agent::{self, Agent, HealthCheck},
    testbed::client,
};

const BACKENDS: usize = 3;

/// A testbed with 3 backends and the agent running on it, all backends up.
fn running() -> (Agent, Testbed) {
    let testbed = Testbed::new(BACKENDS).expect("building the testbed");
    let check = HealthCheck::default();
    let mut agent = Agent::start(&testbed, &agent::config_for(&testbed, check)).expect("starting lb");
    let all_up = ["up"; BACKENDS];
    agent.wait_health("web", &all_up, Duration::from_secs(10)).expect("web backends up");
    agent.wait_health("echo", &all_up, Duration::from_secs(10)).expect("echo backends up");
    // The agent is dropped first: it detaches before the testbed goes.
    (agent, testbed)
}

fn spread_of(testbed: &Testbed, n: usize) -> Spread {
    Spread::of(&testbed.client_requests(testbed.vip_http(), n, true))
}

/// Names of the interfaces in the gateway namespace that have an XDP program.
fn xdp_attached(testbed: &Testbed) -> Vec<String> {
    let out = testbed.gateway().exec_ok(&["ip", "-o", "link", "show"]).expect("ip link show in the gateway");
    out.lines()
        .filter(|l| l.contains(" xdp") || l.contains("prog/xdp"))
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
        .collect()
}

fn counter(status: &serde_json::Value, vip: &str, backend: usize, field: &str) -> u64 {
    let vip = status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == vip))
        .unwrap_or_else(|| panic!("no vip {vip} in {status}"));
    vip["backends"][backend - 1]["traffic"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no traffic.{field} for backend {backend} in {vip}"))
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn new_connections_spread_across_all_backends() {
    lb_tests::require_root!();
    let (agent, testbed) = running();
    assert_eq!(xdp_attached(&testbed).len(), 2, "both gateway interfaces carry the program");

    let spread = spread_of(&testbed, 300);
    assert_eq!(spread.ok(), 300, "every request answered: {spread:?}");
    for i in 1..=BACKENDS {
        // 100 expected; 60 is over 7 standard deviations below.
        let got = spread.count(&testbed.backend_name(i));
        assert!(got >= 60, "backend {i} got {got} of 300: {spread:?}");
    }

    let status = agent.status().expect("/status");
    let flows: u64 = (1..=BACKENDS).map(|i| counter(&status, "web", i, "new_flows")).sum();
    assert!(flows >= 300, "kernel counted {flows} new flows for 300 connections: {status}");
    for i in 1..=BACKENDS {
        assert!(counter(&status, "web", i, "packets") > 0, "no packets counted for backend {i}");
    }
    let metrics = agent.metrics().expect("/metrics");
    for i in 1..=BACKENDS {
        let line = format!("lb_backend_health{{vip=\"web\",backend=\"{}\",state=\"up\"}} 1", testbed.backend_http(i));
        assert!(metrics.contains(&line), "missing {line} in:\n{metrics}");
    }
    for direction in ["in", "out"] {
        let prefix = format!("lb_vip_packets_total{{vip=\"web\",direction=\"{direction}\"}} ");
        let packets = metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse::<u64>().ok());
        assert!(packets.is_some_and(|p| p > 0), "no per-VIP packets {direction} in:\n{metrics}");
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn dead_backend_gets_no_new_connections_and_comes_back() {
    lb_tests::require_root!();
    let (mut agent, testbed) = running();
    lb_tests::scenarios::dead_backend_gets_no_new_connections_and_comes_back(
        &mut agent,
        &testbed,
        "web",
        testbed.vip_http(),
    );
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn udp_flow_stays_on_one_backend() {
    lb_tests::require_root!();
    let (_agent, testbed) = running();
    let payloads: Vec<Vec<u8>> = (0..50).map(|i| format!("datagram {i}").into_bytes()).collect();
    let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();

    let one_flow = Spread::of(&testbed.client_udp(testbed.vip_udp(), &payloads, 40_000));
    assert_eq!(one_flow.ok(), 50, "every datagram echoed: {one_flow:?}");
    assert_eq!(one_flow.per_backend.len(), 1, "one flow, one backend: {one_flow:?}");

    // Many flows (one per source port) still spread.
    let mut seen = BTreeSet::new();
    for port in 40_001..40_031 {
        for result in testbed.client_udp(testbed.vip_udp(), &payloads[..2], port) {
            seen.insert(result.expect("echo through the VIP"));
        }
    }
    assert!(seen.len() >= 2, "30 flows all went to {seen:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn non_vip_traffic_crosses_untouched() {
    lb_tests::require_root!();
    let (agent, testbed) = running();
    // Traffic straight to a backend's service is a direct flow: tracked so
    // its replies stay untranslated, and passed both ways.
    let before = verdict(&agent.status().expect("/status"), "pass_direct_flow");
    for i in 1..=BACKENDS {
        let spread = Spread::of(&testbed.client_requests(testbed.backend_http(i), 5, true));
        assert_eq!(spread.count(&testbed.backend_name(i)), 5, "straight to backend {i}: {spread:?}");
        let echo = Spread::of(&testbed.client_udp(testbed.backend_udp(i), &[b"direct"], 0));
        assert_eq!(echo.count(&testbed.backend_name(i)), 1, "udp straight to backend {i}: {echo:?}");
    }
    let after = verdict(&agent.status().expect("/status"), "pass_direct_flow");
    assert!(after >= before + 4 * BACKENDS as u64, "the program saw and passed them ({before} -> {after})");
}

fn verdict(status: &serde_json::Value, reason: &str) -> u64 {
    status["verdicts"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["reason"] == reason))
        .and_then(|v| v["packets"].as_u64())
        .unwrap_or_else(|| panic!("no verdict {reason} in {status}"))
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn health_checks_work_while_attached_and_stop_detaches() {
    lb_tests::require_root!();
    let (mut agent, testbed) = running();
    let check = HealthCheck::default();
    let within = check.detection_bound() + Duration::from_secs(1);

    testbed.set_backend_health(1, false).expect("failing backend 1's /health");
    agent.wait_health("web", &["down", "up", "up"], within).expect("backend 1 down");
    // The echo VIP probes the same HTTP port, so it follows.
    agent.wait_health("echo", &["down", "up", "up"], within).expect("echo backend 1 down");
    let spread = spread_of(&testbed, 60);
    assert_eq!(spread.ok(), 60, "{spread:?}");
    assert_eq!(spread.count(&testbed.backend_name(1)), 0, "{spread:?}");

    testbed.set_backend_health(1, true).expect("healing backend 1");
    agent
        .wait_health("web", &["up"; BACKENDS], check.recovery_bound() + Duration::from_secs(1))
        .expect("backend 1 up again");
    let log = agent.log();
    assert_eq!(log.matches("backend down").count(), 2, "each transition logged once:\n{log}");

    assert!(agent.stop().expect("stopping lb"), "lb exits 0 on SIGTERM:\n{}", agent.log());
    assert_eq!(xdp_attached(&testbed), Vec::<String>::new(), "detached on exit");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn bad_config_is_refused_and_attaches_nothing() {
    lb_tests::require_root!();
    let testbed = Testbed::new(1).expect("building the testbed");
    let good = agent::config_for(&testbed, HealthCheck::default());
    let bad = good.replacen("weight = 1", "weight = \"heavy\"", 1);
    let dir = std::env::temp_dir().join(format!("lb-tests-bad-{}", testbed.id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, bad).expect("writing the config");

    let lb = lb_tests::lb_bin().expect("lb binary");
    for sub in ["check", "run"] {
        let out = testbed.gateway().command(&lb).args([sub, "--config"]).arg(&path).output().expect("running lb");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "lb {sub} accepted a bad config");
        assert!(stderr.contains(&path.display().to_string()), "names the file: {stderr}");
        assert!(stderr.contains("vip[1]") && stderr.contains("weight"), "names the key: {stderr}");
        assert_eq!(xdp_attached(&testbed), Vec::<String>::new(), "lb {sub} attached nothing");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn no_backend_up_is_answered_by_the_gateway() {
    lb_tests::require_root!();
    let (mut agent, testbed) = running();
    let check = HealthCheck::default();
    for i in 1..=BACKENDS {
        testbed.stop_backend(i).expect("stopping a backend");
    }
    agent
        .wait_health("web", &["down"; BACKENDS], check.detection_bound() + Duration::from_secs(1))
        .expect("all web backends down");
    agent
        .wait_health("echo", &["down"; BACKENDS], check.detection_bound() + Duration::from_secs(1))
        .expect("all echo backends down");

    let (vip_tcp, vip_udp) = (testbed.vip_http(), testbed.vip_udp());
    // The program's replies are checked byte for byte in the packet tests;
    // here: they are sent for real traffic, arrive at once, and nothing
    // reaches a backend.
    let tries = testbed
        .client()
        .enter(|| (0..3).map(|_| (client::refused_tcp(vip_tcp), client::refused_udp(vip_udp))).collect::<Vec<_>>())
        .expect("entering the client namespace");
    let status = agent.status().expect("/status");
    for (what, results, reason) in [
        ("tcp", tries.iter().map(|t| &t.0).collect::<Vec<_>>(), "tx_rst_no_backend"),
        ("udp", tries.iter().map(|t| &t.1).collect::<Vec<_>>(), "tx_icmp_unreachable_no_backend"),
    ] {
        for result in &results {
            assert!(
                !matches!(result, Err(e) if e == "connected" || e == "answered"),
                "{what}: something answered with no backend up: {results:?}"
            );
        }
        let sent = verdict(&status, reason);
        assert!(sent >= 3, "{what}: the program sent {sent} replies for 3 tries ({reason}): {status}");
        assert!(results.iter().all(|r| r.is_ok()), "{what}: not refused within 1 s: {results:?}");
    }
}

//! End to end over IPv6: the real `lb` agent, on the gateway of a dual-stack
//! testbed, balancing the IPv6 VIP (2001:db8::100) to the backends' IPv6
//! addresses, beside the IPv4 VIP in the same agent. Needs root. Each test
//! builds its own testbed, so they run in parallel.
//!
//! Nobody owns the IPv6 VIP and the gateway has no route for it, so every
//! answer through it was balanced by the XDP program; the answers name the
//! backend that served them.

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    Spread, Testbed,
    agent::{self, Agent, ECHO6, HealthCheck, WEB6},
};

const BACKENDS: usize = 3;

/// A testbed with 3 backends and the agent running the dual-stack config,
/// every backend of every VIP up (the IPv6 ones by probes over IPv6).
fn running() -> (Agent, Testbed) {
    let testbed = Testbed::new(BACKENDS).expect("building the testbed");
    let config = agent::config_dual_stack(&testbed, HealthCheck::default());
    let mut agent = Agent::start(&testbed, &config).expect("starting lb");
    for vip in ["web", "echo", WEB6, ECHO6] {
        agent
            .wait_health(vip, &["up"; BACKENDS], Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("vip {vip}: {e:#}"));
    }
    // The agent is dropped first: it detaches before the testbed goes.
    (agent, testbed)
}

/// `n` requests to the IPv6 web VIP, each on a new connection (a new flow).
fn spread6(testbed: &Testbed, n: usize) -> Spread {
    Spread::of(&testbed.client_requests(testbed.vip6_http(), n, true))
}

/// VIP `name`'s entry in `/status`.
fn vip_status<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no vip {name} in {status}"))
}

/// A traffic counter of backend `i` (1-based) of VIP `vip`.
fn counter(status: &serde_json::Value, vip: &str, i: usize, field: &str) -> u64 {
    let vip = vip_status(status, vip);
    vip["backends"][i - 1]["traffic"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no traffic.{field} for backend {i} in {vip}"))
}

fn new_flows(status: &serde_json::Value, vip: &str) -> u64 {
    (1..=BACKENDS).map(|i| counter(status, vip, i, "new_flows")).sum()
}

/// The 1-based index of the backend called `name`.
fn index_of(testbed: &Testbed, name: &str) -> usize {
    (1..=BACKENDS).find(|&i| testbed.backend_name(i) == name).unwrap_or_else(|| panic!("no backend named {name}"))
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_connections_spread_across_all_backends() {
    lb_tests::require_root!();
    let (agent, testbed) = running();
    let before = agent.status().expect("/status");

    let spread = spread6(&testbed, 300);
    assert_eq!(spread.ok(), 300, "every request answered over IPv6: {spread:?}");
    for i in 1..=BACKENDS {
        // 100 expected; 60 is over 7 standard deviations below.
        let got = spread.count(&testbed.backend_name(i));
        assert!(got >= 60, "backend {i} got {got} of 300 over IPv6: {spread:?}");
    }

    let status = agent.status().expect("/status");
    let web6 = vip_status(&status, WEB6);
    assert_eq!(web6["listen"], testbed.vip6_http().to_string(), "{web6}");
    for i in 1..=BACKENDS {
        assert_eq!(web6["backends"][i - 1]["address"], testbed.backend_http6(i).to_string(), "{web6}");
        assert!(counter(&status, WEB6, i, "packets") > 0, "no packets counted for IPv6 backend {i}: {web6}");
    }
    let flows = new_flows(&status, WEB6) - new_flows(&before, WEB6);
    assert!(flows >= 300, "kernel counted {flows} new IPv6 flows for 300 connections: {status}");
    assert_eq!(
        new_flows(&status, "web"),
        new_flows(&before, "web"),
        "IPv6 connections counted on the IPv4 VIP: {status}"
    );

    // The IPv4 VIP of the same agent still balances.
    let v4 = Spread::of(&testbed.client_requests(testbed.vip_http(), 30, true));
    assert_eq!(v4.ok(), 30, "IPv4 beside IPv6: {v4:?}");

    let metrics = agent.metrics().expect("/metrics");
    for i in 1..=BACKENDS {
        let line =
            format!("lb_backend_health{{vip=\"{WEB6}\",backend=\"{}\",state=\"up\"}} 1", testbed.backend_http6(i));
        assert!(metrics.contains(&line), "missing {line} in:\n{metrics}");
    }
    let cli = lb_status_output(&testbed);
    for i in 1..=BACKENDS {
        let row = format!("{} up", testbed.backend_http6(i));
        assert!(
            cli.lines().any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ").starts_with(&row)),
            "lb status has no row {row:?}:\n{cli}"
        );
    }
}

/// What `lb status` prints, run in the gateway namespace.
fn lb_status_output(testbed: &Testbed) -> String {
    let lb = lb_tests::lb_bin().expect("lb binary");
    let out = testbed
        .gateway()
        .command(&lb)
        .args(["status", "--admin", &agent::ADMIN.to_string()])
        .output()
        .expect("running lb status");
    assert!(out.status.success(), "lb status failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_udp_flow_stays_on_one_backend() {
    lb_tests::require_root!();
    let (agent, testbed) = running();
    let payloads: Vec<Vec<u8>> = (0..50).map(|i| format!("datagram {i}").into_bytes()).collect();
    let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();

    let one_flow = Spread::of(&testbed.client_udp(testbed.vip6_udp(), &payloads, 40_000));
    assert_eq!(one_flow.ok(), 50, "every datagram echoed over IPv6: {one_flow:?}");
    assert_eq!(one_flow.per_backend.len(), 1, "one flow, one backend: {one_flow:?}");
    let chosen = one_flow.per_backend.keys().next().map(|name| index_of(&testbed, name)).expect("one backend");
    // The kernel's counters agree: the flow's packets, both ways, on it alone.
    let status = agent.status().expect("/status");
    for i in 1..=BACKENDS {
        let packets = counter(&status, ECHO6, i, "packets");
        if i == chosen {
            assert!(packets >= 100, "backend {i} carried the flow but counted {packets} packets: {status}");
        } else {
            assert_eq!(packets, 0, "backend {i} saw packets of a flow pinned to {chosen}: {status}");
        }
    }

    // Many flows (one per source port) still spread.
    let mut seen = BTreeSet::new();
    for port in 40_001..40_031 {
        for result in testbed.client_udp(testbed.vip6_udp(), &payloads[..2], port) {
            seen.insert(result.expect("echo through the IPv6 VIP"));
        }
    }
    assert!(seen.len() >= 2, "30 IPv6 flows all went to {seen:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn ipv6_dead_backend_gets_no_new_connections_and_comes_back() {
    lb_tests::require_root!();
    let (mut agent, testbed) = running();
    lb_tests::scenarios::dead_backend_gets_no_new_connections_and_comes_back(
        &mut agent,
        &testbed,
        WEB6,
        testbed.vip6_http(),
    );
}

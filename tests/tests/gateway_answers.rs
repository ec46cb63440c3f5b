//! End to end: the answers the gateway gives itself, over both families,
//! with the real agent: VIP addresses answer pings, and with every backend
//! down an IPv6 client is refused at once (TCP RST, ICMPv6 port
//! unreachable) while nothing reaches a backend. (IPv4's no-backend answers
//! are in `e2e.rs`; every answer is checked byte for byte in the packet
//! fixtures.) Needs root.

use std::time::Duration;

use lb_tests::{
    Testbed,
    agent::{self, Agent, ECHO6, HealthCheck, WEB6},
    testbed::client,
};

const BACKENDS: usize = 2;

fn running() -> (Agent, Testbed) {
    let testbed = Testbed::new(BACKENDS).expect("testbed");
    let mut agent = Agent::start(&testbed, &agent::config_dual_stack(&testbed, HealthCheck::default())).expect("lb");
    for vip in ["web", WEB6, ECHO6] {
        agent.wait_health(vip, &["up"; BACKENDS], Duration::from_secs(10)).unwrap_or_else(|e| panic!("{vip}: {e:#}"));
    }
    (agent, testbed)
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn vip_addresses_answer_pings_over_both_families() {
    lb_tests::require_root!();
    let (agent, testbed) = running();
    for vip in [testbed.vip_http().ip(), testbed.vip6_http().ip()] {
        let before = agent.verdict("tx_icmp_echo_reply");
        let out = testbed.client().exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", &vip.to_string()]).expect("ping");
        let text = String::from_utf8_lossy(&out.stdout);
        let answered = agent.verdict("tx_icmp_echo_reply") - before;
        println!(
            "{vip}: {answered} echo replies sent; {}",
            text.lines().find(|l| l.contains("received")).unwrap_or("")
        );
        assert!(answered >= 3, "{vip}: {answered} replies for 3 pings");
        assert!(out.status.success() && text.contains(" 3 received"), "{vip}: not every reply arrived: {text}");
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn with_every_backend_down_ipv6_clients_are_refused_and_nothing_reaches_a_backend() {
    lb_tests::require_root!();
    let (mut agent, testbed) = running();
    let check = HealthCheck::default();
    for i in 1..=BACKENDS {
        testbed.stop_backend(i).expect("stopping a backend");
    }
    for vip in [WEB6, ECHO6] {
        agent.wait_health(vip, &["down"; BACKENDS], check.detection_bound() + Duration::from_secs(1)).expect("down");
    }
    let (tcp, udp) = (testbed.vip6_http(), testbed.vip6_udp());
    let before = (agent.verdict("tx_rst_no_backend"), agent.verdict("tx_icmp_unreachable_no_backend"));
    let tries = testbed
        .client()
        .enter(move || (0..3).map(|_| (client::refused_tcp(tcp), client::refused_udp(udp))).collect::<Vec<_>>())
        .expect("client");
    let sent =
        (agent.verdict("tx_rst_no_backend") - before.0, agent.verdict("tx_icmp_unreachable_no_backend") - before.1);
    for (tcp, udp) in &tries {
        assert!(!matches!(tcp, Err(e) if e == "connected"), "tcp connected with no backend up: {tries:?}");
        assert!(!matches!(udp, Err(e) if e == "answered"), "udp answered with no backend up: {tries:?}");
    }
    assert!(sent.0 >= 3 && sent.1 >= 3, "replies sent (rst, unreachable): {sent:?} for 3 tries each");
    assert!(tries.iter().all(|(t, u)| t.is_ok() && u.is_ok()), "not refused within 1 s: {tries:?}");
    println!("refused: {tries:?}");
}

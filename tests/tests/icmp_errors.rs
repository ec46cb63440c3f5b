//! End to end: ICMP through the gateway with the real agent, real kernels on
//! both ends and real TCP/UDP. Path MTU discovery with the narrow hop at the
//! gateway (its route to the client has a smaller MTU: the XDP program
//! answers the backend with "fragmentation needed" / "packet too big") and
//! beyond it (a router past the gateway sends the error to the VIP, and the
//! program steers it to the backend); and a UDP port unreachable from a
//! backend, translated back so the client's socket sees "connection refused".
//! Without the translation each of these stalls or times out. Needs root.

use std::{
    fmt::Write as _,
    io,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck, WEB6},
    testbed::{FAR_CLIENT_ADDR, FAR_CLIENT_ADDR6, Namespace},
};

/// The narrow hop's MTU: the IPv6 minimum, well under the 1500 of every link.
const NARROW_MTU: u32 = 1280;
/// A response of many full-size segments.
const BIG: usize = 300_000;
/// Port of the UDP VIP whose backends have nothing listening.
const CLOSED_UDP_PORT: u16 = 5400;

/// The dual-stack config, plus `closed`/`closed6`: UDP VIPs over the
/// backends' port 9, where nothing listens (health-checked over HTTP, so the
/// backends are up).
fn config(testbed: &Testbed) -> String {
    let mut toml = agent::config_dual_stack(testbed, HealthCheck::default());
    for (name, listen, v6) in [
        ("closed", SocketAddr::new(testbed.vip_http().ip(), CLOSED_UDP_PORT), false),
        ("closed6", SocketAddr::new(testbed.vip6_http().ip(), CLOSED_UDP_PORT), true),
    ] {
        let _ = writeln!(
            toml,
            "\n[[vip]]\nname = \"{name}\"\nlisten = \"{listen}\"\nprotocol = \"udp\"\n\n[vip.health_check]\ntype = \"http\"\nport = 8080\npath = \"/health\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n"
        );
        for i in 1..=testbed.backend_count() {
            let ip = if v6 { testbed.backend_addr6(i).into() } else { testbed.backend_addr(i).into() };
            let _ = writeln!(toml, "[[vip.backend]]\naddress = \"{}\"\n", SocketAddr::new(ip, 9));
        }
    }
    toml
}

/// A testbed with the agent running and every backend of every VIP up.
fn running() -> (Agent, Testbed) {
    let testbed = Testbed::new(2).expect("building the testbed");
    let mut agent = Agent::start(&testbed, &config(&testbed)).expect("starting lb");
    for vip in ["web", WEB6, "closed", "closed6"] {
        agent.wait_health(vip, &["up", "up"], Duration::from_secs(10)).unwrap_or_else(|e| panic!("{vip}: {e:#}"));
    }
    (agent, testbed)
}

/// Fetches `BIG` bytes from `vip` in namespace `ns`; returns how long it took.
#[track_caller]
fn fetch_big(testbed: &Testbed, ns: &Namespace, vip: SocketAddr) -> Duration {
    let started = Instant::now();
    let response = testbed
        .http_get_in(ns, vip, &format!("/big?bytes={BIG}"))
        .unwrap_or_else(|e| panic!("GET {BIG} bytes from {vip} in {}: {e:#}", ns.name()));
    assert_eq!((response.status, response.body.len()), (200, BIG), "from {vip}");
    started.elapsed()
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn large_responses_arrive_when_the_gateways_own_route_to_the_client_is_narrower() {
    lb_tests::require_root!();
    let (agent, testbed) = running();
    let gw = testbed.gateway();
    let (gc, mtu) = (testbed.gateway_client_if(), NARROW_MTU.to_string());
    let client4 = format!("{}/32", lb_tests::testbed::CLIENT_ADDR);
    let client6 = format!("{}/128", lb_tests::testbed::CLIENT_ADDR6);
    gw.exec_ok(&["ip", "route", "add", &client4, "dev", gc, "mtu", "lock", &mtu]).expect("narrow route");
    gw.exec_ok(&["ip", "-6", "route", "add", &client6, "dev", gc, "mtu", "lock", &mtu]).expect("narrow route");

    for vip in [testbed.vip_http(), testbed.vip6_http()] {
        let before = agent.verdict("tx_icmp_frag_needed");
        let took = fetch_big(&testbed, testbed.client(), vip);
        let sent = agent.verdict("tx_icmp_frag_needed") - before;
        println!("{vip}: {BIG} bytes in {took:?}, after {sent} fragmentation-needed/packet-too-big");
        assert!(sent >= 1, "{vip}: the response fitted without path MTU discovery; the test proves nothing");
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn large_responses_arrive_when_a_router_past_the_gateway_has_a_narrower_hop() {
    lb_tests::require_root!();
    let (agent, mut testbed) = running();
    let far = testbed.add_far_client(NARROW_MTU).expect("far client");
    for (vip, far_addr) in
        [(testbed.vip_http(), FAR_CLIENT_ADDR.to_string()), (testbed.vip6_http(), FAR_CLIENT_ADDR6.to_string())]
    {
        let before = agent.verdict("redirect_icmp_error_to_backend");
        let took = fetch_big(&testbed, &far, vip);
        let steered = agent.verdict("redirect_icmp_error_to_backend") - before;
        println!("{vip} to {far_addr}: {BIG} bytes in {took:?}, {steered} ICMP errors steered to the backend");
        assert!(steered >= 1, "{vip}: no error was steered; the test proves nothing");
    }
    assert_eq!(agent.verdict("drop_icmp_error_no_flow"), 0, "an error to the VIP found no flow");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn udp_port_unreachable_from_a_backend_reaches_the_client_as_connection_refused() {
    lb_tests::require_root!();
    let (agent, testbed) = running();
    for vip in [
        SocketAddr::new(testbed.vip_http().ip(), CLOSED_UDP_PORT),
        SocketAddr::new(testbed.vip6_http().ip(), CLOSED_UDP_PORT),
    ] {
        let before = agent.verdict("redirect_icmp_error_to_client");
        let outcome = testbed.client().enter(move || connected_udp_exchange(vip)).expect("entering the client");
        match outcome {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            other => panic!("{vip}: expected connection refused, got {other:?}"),
        }
        assert!(agent.verdict("redirect_icmp_error_to_client") > before, "{vip}: not counted");
    }
}

/// Sends one datagram on a socket connected to `vip` and waits (at most 3 s)
/// for an answer: the kernel reports a matching ICMP port unreachable as
/// ECONNREFUSED on a connected socket.
fn connected_udp_exchange(vip: SocketAddr) -> io::Result<usize> {
    let local: SocketAddr =
        if vip.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.map_err(io::Error::other)?;
    let socket = UdpSocket::bind(local)?;
    socket.connect(vip)?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send(b"anyone there?")?;
    let mut buf = [0u8; 64];
    socket.recv(&mut buf)
}

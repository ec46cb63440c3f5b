//! End to end: the health-check types beyond tcp and http (issue 11), each
//! against a real server in a backend namespace, judged by a real agent.
//!
//! - `https`: the test backend serving TLS (rustls) with a certificate from
//!   a CA made by `openssl` at test time. Verified against that CA with the
//!   right name: up; a backend whose own check sends another name: down; the
//!   system's roots (which do not hold the test CA): down; verification off:
//!   up, and its `expect_body` over TLS is checked.
//! - `expect_body` over plain HTTP, and a per-backend override of it, in
//!   the file from the start and added by `lb reload` (only that backend's
//!   checker restarts).
//! - `dns`: Debian's dnsmasq in each backend namespace behind a UDP VIP:
//!   up, serving queries through the VIP; down once dnsmasq stops; up again
//!   when it is back.
//!
//! Checks every second with an 800 ms timeout, rise 2, fall 2: a TLS
//! handshake of a debug build on a loaded 2-core machine stays far below
//! that, and every wait below allows [`WAIT`], several times the
//! `fall × interval + timeout` = 2.8 s it takes to see a change. Needs root.

use std::{
    fmt::Write as _,
    net::{SocketAddr, UdpSocket},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use lb::config::model::DnsType;
use lb_tests::{
    ChildGuard, Testbed,
    agent::{ADMIN, Agent},
    testbed::VIP,
    tls::TestCa,
};

/// Generous bound for any health change to show in `/status` (see the module doc).
const WAIT: Duration = Duration::from_secs(15);
/// The name the test certificate is for.
const CERT_NAME: &str = "backend.lb.test";
/// The first TLS server's HTTPS port in each backend; TLS server `k` (from
/// 0) has HTTPS on `HTTPS_PORT + 10k`, HTTP and UDP on the next two ports.
/// One server per VIP: the gateway cannot probe a backend service that two
/// VIPs share on its own port (its replies carry no VIP's flow, and the data
/// path drops them as `drop_reply_no_flow`), so no two VIPs here share one.
const HTTPS_PORT: u16 = 8443;
/// The HTTP port of the second plain server, for the `body-own` VIP.
const OWN_HTTP_PORT: u16 = 8090;
/// dnsmasq's port in each backend.
const DNS_PORT: u16 = 5300;
/// The name dnsmasq answers and the checks ask for.
const DNS_NAME: &str = "health.lb.test";

/// The check settings every VIP here shares, as `[vip.health_check]` lines.
const TIMING: &str = "interval = \"1s\"\ntimeout = \"800ms\"\nrise = 2\nfall = 2\n";

/// `[agent]` for `testbed`, as the other end-to-end tests write it.
fn agent_section(testbed: &Testbed) -> String {
    format!(
        "[agent]\ninterfaces = [\"{}\", \"{}\"]\nadmin_listen = \"{ADMIN}\"\nxdp_mode = \"native\"\n\n",
        testbed.gateway_client_if(),
        testbed.gateway_backend_if()
    )
}

/// One `[[vip]]` on `VIP:port` with `check` (after [`TIMING`]) and one
/// backend per `(address, own check)`; an own check becomes the backend's
/// `[vip.backend.health_check]`.
fn vip(name: &str, port: u16, protocol: &str, check: &str, backends: &[(SocketAddr, Option<&str>)]) -> String {
    let mut toml = format!(
        "[[vip]]\nname = \"{name}\"\nlisten = \"{}\"\nprotocol = \"{protocol}\"\n[vip.health_check]\n{TIMING}{check}\n",
        SocketAddr::from((VIP, port))
    );
    for (address, own) in backends {
        let _ = writeln!(toml, "[[vip.backend]]\naddress = \"{address}\"");
        if let Some(own) = own {
            let _ = writeln!(toml, "[vip.backend.health_check]\n{own}");
        }
        toml.push('\n');
    }
    toml
}

/// The `last_check` of VIP `vip`'s backend `i` (1-based) in `/status`.
fn last_check(agent: &Agent, vip: &str, i: usize) -> String {
    let status = agent.status().expect("/status");
    status["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == vip))
        .and_then(|v| v["backends"][i - 1]["last_check"].as_str())
        .unwrap_or("(none)")
        .to_owned()
}

/// Waits for `want` and prints how long it took.
#[track_caller]
fn expect_health(agent: &mut Agent, vip: &str, want: &[&str]) {
    let took = agent.wait_health(vip, want, WAIT).unwrap_or_else(|e| {
        let checks: Vec<String> = (1..=want.len()).map(|i| last_check(agent, vip, i)).collect();
        panic!("vip {vip} {want:?}: last checks {checks:?}: {e:#}")
    });
    eprintln!("vip {vip} {want:?} after {took:?}");
}

/// Backend `i`'s TLS server `k`, serving HTTPS on its port (see
/// [`HTTPS_PORT`]) with `ca`'s certificate.
fn start_tls_server(testbed: &Testbed, i: usize, k: u16, ca: &TestCa) -> ChildGuard {
    let port = HTTPS_PORT + 10 * k;
    let listen = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).to_string();
    let (cert, key) = (path_str(&ca.cert), path_str(&ca.key));
    let extra = ["--https", listen.as_str(), "--tls-cert", cert, "--tls-key", key];
    testbed
        .start_second_server_with(i, port + 1, port + 2, &extra)
        .unwrap_or_else(|e| panic!("starting TLS server {k} in backend b{i}: {e:#}"))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn https_checks_verify_the_certificate_and_name_and_read_the_body() {
    lb_tests::require_root!();
    if !TestCa::available() {
        return lb_tests::skip("no openssl command to make the test certificates (Debian package openssl)");
    }
    let ca = TestCa::generate(&[CERT_NAME]).expect("making the test CA");
    let testbed = Testbed::new(2).expect("building the testbed");
    let _tls: Vec<ChildGuard> =
        (1..=2).flat_map(|i| (0..3).map(move |k| (i, k))).map(|(i, k)| start_tls_server(&testbed, i, k, &ca)).collect();
    let https = |i, k: u16| SocketAddr::from((testbed.backend_addr(i), HTTPS_PORT + 10 * k));
    let verified =
        format!("type = \"https\"\npath = \"/health\"\nsni = \"{CERT_NAME}\"\ntls_ca_file = \"{}\"", ca.ca.display());
    let mut config = agent_section(&testbed);
    // b2's own check keeps everything but the name: its certificate is not for that one.
    config += &vip(
        "tls-verified",
        443,
        "tcp",
        &verified,
        &[(https(1, 0), None), (https(2, 0), Some("sni = \"other.lb.test\""))],
    );
    config += &vip(
        "tls-system-roots",
        444,
        "tcp",
        &format!("type = \"https\"\npath = \"/health\"\nsni = \"{CERT_NAME}\""),
        &[(https(1, 1), None), (https(2, 1), None)],
    );
    config += &vip(
        "tls-unverified",
        445,
        "tcp",
        "type = \"https\"\npath = \"/health\"\ntls_verify = false\nsni = \"other.lb.test\"\nexpect_body = \"ok\"",
        &[(https(1, 2), None), (https(2, 2), None)],
    );
    let mut agent = Agent::start(&testbed, &config).expect("starting lb");

    expect_health(&mut agent, "tls-verified", &["up", "down"]);
    let wrong_name = last_check(&agent, "tls-verified", 2);
    eprintln!("b2 with another name: {wrong_name}");
    assert!(wrong_name.starts_with("TLS handshake: ") && wrong_name.contains("certificate"), "{wrong_name}");

    expect_health(&mut agent, "tls-system-roots", &["down", "down"]);
    let untrusted = last_check(&agent, "tls-system-roots", 1);
    eprintln!("not in the system's roots: {untrusted}");
    assert!(untrusted.starts_with("TLS handshake: ") && untrusted.contains("certificate"), "{untrusted}");

    expect_health(&mut agent, "tls-unverified", &["up", "up"]);
    // The status behind TLS counts: that server of b1's answers /health with 503 from now on.
    let b1_plain = SocketAddr::from((testbed.backend_addr(1), HTTPS_PORT + 20 + 1));
    let response = testbed.http_get_in(testbed.gateway(), b1_plain, "/admin/health/fail").expect("admin request");
    assert_eq!(response.status, 200);
    expect_health(&mut agent, "tls-unverified", &["down", "up"]);
    let failing = last_check(&agent, "tls-unverified", 1);
    assert_eq!(failing, "HTTP status 503, expected 200-399");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn expect_body_marks_a_mismatch_down_and_a_backends_own_check_overrides_it() {
    lb_tests::require_root!();
    let testbed = Testbed::new(2).expect("building the testbed");
    let backends = [testbed.backend_http(1), testbed.backend_http(2)];
    let _own: Vec<ChildGuard> = (1..=2)
        .map(|i| testbed.start_second_server(i, OWN_HTTP_PORT, OWN_HTTP_PORT + 1).expect("second server"))
        .collect();
    let own = |i| SocketAddr::from((testbed.backend_addr(i), OWN_HTTP_PORT));
    // `GET /` answers `backend=bN` with 200: only b1's body has "backend=b1".
    let check = "type = \"http\"\npath = \"/\"\nexpect_body = \"backend=b1\"";
    let mut config = agent_section(&testbed);
    config += &vip("body", 81, "tcp", check, &[(backends[0], None), (backends[1], None)]);
    config += &vip("body-own", 82, "tcp", check, &[(own(1), None), (own(2), Some("expect_body = \"backend=b2\""))]);
    let mut agent = Agent::start(&testbed, &config).expect("starting lb");

    expect_health(&mut agent, "body", &["up", "down"]);
    let mismatch = last_check(&agent, "body", 2);
    assert_eq!(mismatch, "body does not contain \"backend=b1\" (read 11 bytes of it)");
    expect_health(&mut agent, "body-own", &["up", "up"]);

    // Traffic follows: every new connection to `body` reaches b1, and `body-own` uses both.
    let served = |port: u16| -> Vec<String> {
        let results = testbed.client_requests(SocketAddr::from((VIP, port)), 20, true);
        results.into_iter().enumerate().map(|(i, r)| r.unwrap_or_else(|e| panic!("request {i}: {e:#}"))).collect()
    };
    assert!(served(81).iter().all(|name| name == "b1"), "only b1 passes body's check");
    let both = served(82);
    assert!(both.iter().any(|n| n == "b1") && both.iter().any(|n| n == "b2"), "{both:?}");

    // A reload gives b2 of `body` a check of its own: only that changes.
    let reloaded = config.replacen(
        &format!("address = \"{}\"\n\n", backends[1]),
        &format!("address = \"{}\"\n[vip.backend.health_check]\nexpect_body = \"backend=b2\"\n\n", backends[1]),
        1,
    );
    assert_ne!(reloaded, config, "the override went in");
    std::fs::write(agent.config_path(), &reloaded).expect("rewriting the config");
    let out = agent.lb(&["reload"]).expect("lb reload");
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lb reload: {said}");
    assert!(said.contains(&format!("vip body backend {} health_check changed", backends[1])), "{said}");
    expect_health(&mut agent, "body", &["up", "up"]);
    expect_health(&mut agent, "body-own", &["up", "up"]);
}

/// A query for [`DNS_NAME`] A; `Some((rcode, answers))` if `server` answered in time.
fn dns_query(server: SocketAddr) -> Option<(u8, u16)> {
    let socket = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
    socket.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    socket.connect(server).ok()?;
    let query = lb::health::probe::dns::query(0x4242, DNS_NAME, DnsType(1));
    socket.send(&query).ok()?;
    let mut answer = [0; 512];
    let len = socket.recv(&mut answer).ok()?;
    let answer = &answer[..len];
    (len >= 12 && answer[..2] == [0x42, 0x42]).then(|| (answer[3] & 0x0f, u16::from_be_bytes([answer[6], answer[7]])))
}

/// dnsmasq in backend `i`'s namespace, answering [`DNS_NAME`] with the
/// backend's address on [`DNS_PORT`], and nothing else (no upstream).
/// Waits until it answers.
fn start_dnsmasq(testbed: &Testbed, i: usize, dir: &Path) -> ChildGuard {
    let address = testbed.backend_addr(i);
    let pid_file = dir.join(format!("dnsmasq-b{i}.pid"));
    // Its log goes to a file, shown if it never answers: on stderr it would
    // interleave with the test runner's lines.
    let log = dir.join(format!("dnsmasq-b{i}.log"));
    let args = [
        "dnsmasq".to_owned(),
        "--keep-in-foreground".to_owned(),
        "--conf-file=/dev/null".to_owned(),
        "--no-resolv".to_owned(),
        "--no-hosts".to_owned(),
        "--bind-dynamic".to_owned(),
        format!("--listen-address={address}"),
        format!("--port={DNS_PORT}"),
        format!("--address=/{DNS_NAME}/{address}"),
        format!("--pid-file={}", pid_file.display()),
        "--user=root".to_owned(),
        format!("--log-facility={}", log.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = testbed.spawn_in(testbed.backend_ns(i), &args).expect("starting dnsmasq");
    let server = SocketAddr::from((address, DNS_PORT));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if testbed.gateway().enter(|| dns_query(server)).ok().flatten() == Some((0, 1)) {
            return child;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    panic!("dnsmasq in b{i} does not answer {DNS_NAME} on {server} after 10 s; its log:\n{log}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn dns_checks_follow_a_real_dns_server_on_a_udp_vip() {
    lb_tests::require_root!();
    if std::process::Command::new("dnsmasq").arg("--version").output().is_err() {
        return lb_tests::skip("no dnsmasq (Debian package dnsmasq-base; `cargo xtask setup` installs it)");
    }
    let testbed = Testbed::new(2).expect("building the testbed");
    let dir = std::env::temp_dir().join(format!("lb-tests-dns-{}", testbed.id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut dnsmasq: Vec<Option<ChildGuard>> = (1..=2).map(|i| Some(start_dnsmasq(&testbed, i, &dir))).collect();
    let dns = |i| SocketAddr::from((testbed.backend_addr(i), DNS_PORT));
    let check = format!("type = \"dns\"\nquery_name = \"{DNS_NAME}\"\nquery_type = \"A\"");
    let config = agent_section(&testbed) + &vip("dns", 53, "udp", &check, &[(dns(1), None), (dns(2), None)]);
    let mut agent = Agent::start(&testbed, &config).expect("starting lb");

    expect_health(&mut agent, "dns", &["up", "up"]);
    // The service itself, through the VIP: a client's query is answered.
    let vip = SocketAddr::from((VIP, 53));
    let answer = testbed.client().enter(|| dns_query(vip)).expect("entering the client namespace");
    assert_eq!(answer, Some((0, 1)), "NOERROR with one A record through the VIP");

    // dnsmasq on b2 stops: its port is closed, the check fails.
    drop(dnsmasq[1].take());
    expect_health(&mut agent, "dns", &["up", "down"]);
    eprintln!("b2 without dnsmasq: {}", last_check(&agent, "dns", 2));
    dnsmasq[1] = Some(start_dnsmasq(&testbed, 2, &dir));
    expect_health(&mut agent, "dns", &["up", "up"]);
    drop(dnsmasq);
    let _ = std::fs::remove_dir_all(&dir);
}

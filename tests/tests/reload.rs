//! End to end: config reload on SIGHUP, with the real `lb` agent on a
//! namespace testbed. Needs root. Each test builds its own testbed.

use std::{
    fs,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    ChildGuard, Spread, Testbed,
    agent::{Agent, HealthCheck, config_for},
    testbed::BACKEND_HTTP_PORT,
    testbed::client::HttpConn,
};

const WAIT: Duration = Duration::from_secs(5);

/// Starts the agent on the testbed's standard config and waits until every
/// web backend is up.
fn running(testbed: &Testbed, config: &str) -> Agent {
    let mut agent = Agent::start(testbed, config).expect("starting lb");
    agent.wait_health("web", &["up"; 3], Duration::from_secs(10)).expect("web backends up");
    agent
}

/// Writes `config` over the agent's file and sends it SIGHUP.
fn reload(agent: &Agent, config: &str) {
    fs::write(agent.config_path(), config).expect("rewriting the config");
    let pid = libc::pid_t::try_from(agent.pid()).expect("pid fits");
    // SAFETY: kill(2) with a pid we started and a valid signal number.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(rc, 0, "SIGHUP to {pid}: {}", std::io::Error::last_os_error());
}

/// `/status`'s web backends as (address, weight, backup, health).
fn web_backends(agent: &Agent) -> Vec<(String, u64, bool, String)> {
    let status = agent.status().expect("/status");
    status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == "web"))
        .and_then(|v| v["backends"].as_array())
        .unwrap_or_else(|| panic!("no web vip in {status}"))
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_owned(),
                b["weight"].as_u64().unwrap_or(u64::MAX),
                b["backup"].as_bool().unwrap_or_default(),
                b["health"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Waits (bounded) until backend `address` of web shows `weight`.
fn wait_weight(agent: &Agent, address: SocketAddr, weight: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let backends = web_backends(agent);
        if backends.iter().any(|(a, w, _, _)| *a == address.to_string() && *w == weight) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{address} never showed weight {weight}: {backends:?}; log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until the agent's log contains `text`.
fn wait_log(agent: &Agent, text: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = agent.log();
        if log.contains(text) {
            return log;
        }
        assert!(Instant::now() < deadline, "the log never said {text:?}:\n{log}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The standard config with web backend `address`'s weight set to `weight`.
fn with_weight(config: &str, address: SocketAddr, weight: u32) -> String {
    let from = format!("address = \"{address}\"\nweight = 1\n");
    assert!(config.contains(&from), "no {from:?} in the config");
    config.replacen(&from, &format!("address = \"{address}\"\nweight = {weight}\n"), 1)
}

fn spread(testbed: &Testbed, n: usize) -> Spread {
    Spread::of(&testbed.client_requests(testbed.vip_http(), n, true))
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn sighup_drains_and_undrains_a_backend_without_dropping_its_flows() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let config = config_for(&testbed, HealthCheck::default());
    let agent = running(&testbed, &config);

    let vip = testbed.vip_http();
    let mut kept = testbed
        .client()
        .enter(|| HttpConn::connect(vip))
        .expect("entering the client namespace")
        .expect("connecting to the vip");
    let x = kept.get("/", true).expect("first request").backend().expect("a backend answered");
    let index = (1..=3).find(|&i| testbed.backend_name(i) == x).expect("a testbed backend answered");
    let address = testbed.backend_http(index);

    reload(&agent, &with_weight(&config, address, 0));
    wait_weight(&agent, address, 0);
    wait_log(&agent, &format!("change=vip web backend {address} weight 1 -> 0"));
    let drained = web_backends(&agent);
    assert!(drained.iter().all(|(_, _, _, health)| health == "up"), "drained, not down: {drained:?}");

    let got = spread(&testbed, 60);
    assert_eq!(got.ok(), 60, "{got:?}");
    assert_eq!(got.count(&x), 0, "no new connections on the drained backend {x}: {got:?}");
    for _ in 0..3 {
        let same = kept.get("/", true).expect("the kept connection still works").backend();
        assert_eq!(same.as_deref(), Some(x.as_str()), "the existing flow stays on {x}");
    }

    reload(&agent, &config);
    wait_weight(&agent, address, 1);
    wait_log(&agent, &format!("change=vip web backend {address} weight 0 -> 1"));
    let got = spread(&testbed, 60);
    assert_eq!(got.ok(), 60, "{got:?}");
    // With three equal backends, none of 60 on one has probability (2/3)^60.
    assert!(got.count(&x) > 0, "undrained {x} takes new connections again: {got:?}");
    let same = kept.get("/", true).expect("the kept connection still works").backend();
    assert_eq!(same.as_deref(), Some(x.as_str()));
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn sighup_with_a_bad_or_restart_only_config_keeps_the_running_state() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let config = config_for(&testbed, HealthCheck::default());
    let agent = running(&testbed, &config);
    let before = web_backends(&agent);
    let file = agent.config_path().display().to_string();

    // Invalid: a drain together with a weight that does not parse.
    let address = testbed.backend_http(1);
    let bad = with_weight(&config, address, 0).replacen("weight = 1\n", "weight = -3\n", 1);
    reload(&agent, &bad);
    let log = wait_log(&agent, "reload refused");
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap_or_default();
    assert!(line.contains(&file), "names the file: {line}");
    assert!(line.contains("vip[1] (web).backend[2].weight"), "names the key: {line}");
    assert!(line.contains("-3"), "says why: {line}");

    // Valid, but it changes a key that needs a restart: refused as a whole,
    // the drain alongside it included.
    let restart_only = with_weight(&config, address, 0).replacen(
        "admin_listen = \"127.0.0.1:7451\"",
        "admin_listen = \"127.0.0.1:7452\"",
        1,
    );
    assert_ne!(restart_only, with_weight(&config, address, 0), "admin_listen is in the config");
    reload(&agent, &restart_only);
    let log = wait_log(&agent, "agent.admin_listen");
    let line = log.lines().find(|l| l.contains("agent.admin_listen")).unwrap_or_default();
    assert!(line.contains("needs a restart") && line.contains(&file), "{line}");

    // Valid alone, but web2's backend is web's own listen address (a loop):
    // refused as a whole, naming both VIPs.
    let looping = web2_section(&testbed, BACKEND_HTTP_PORT).replacen(
        &format!("address = \"{}\"", SocketAddr::new(testbed.backend_addr(1).into(), BACKEND_HTTP_PORT)),
        &format!("address = \"{}\"", testbed.vip_http()),
        1,
    );
    reload(&agent, &format!("{}{looping}", with_weight(&config, address, 0)));
    let log = wait_log(&agent, "(web2).backend[1].address");
    let line = log.lines().find(|l| l.contains("(web2).backend[1].address")).unwrap_or_default();
    assert!(line.contains("reload refused") && line.contains(&file), "{line}");
    assert!(
        line.contains("vip[3] (web2).backend[1].address: tcp")
            && line.contains("is the listen address of vip[1] (web)"),
        "{line}"
    );

    assert_eq!(web_backends(&agent), before, "/status unchanged");
    assert!(!log.contains("change=vip"), "nothing applied:\n{log}");
    let got = spread(&testbed, 30);
    assert_eq!(got.ok(), 30, "still serving: {got:?}");
    assert!(got.count(&testbed.backend_name(1)) > 0, "backend 1 was not drained: {got:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn sighup_removes_and_adds_backends_of_a_vip() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let config = config_for(&testbed, HealthCheck::default());
    let agent = running(&testbed, &config);
    let address = testbed.backend_http(2);
    let name = testbed.backend_name(2);

    let entry = format!("[[vip.backend]]\naddress = \"{address}\"\nweight = 1\n\n");
    assert!(config.contains(&entry), "no {entry:?} in the config");
    reload(&agent, &config.replacen(&entry, "", 1));
    wait_log(&agent, &format!("change=vip web backend {address} removed"));
    let left: Vec<String> = web_backends(&agent).into_iter().map(|(a, ..)| a).collect();
    assert_eq!(left, [testbed.backend_http(1).to_string(), testbed.backend_http(3).to_string()]);
    let got = spread(&testbed, 40);
    assert_eq!(got.ok(), 40, "{got:?}");
    assert_eq!(got.count(&name), 0, "the removed backend {name} takes no new connections: {got:?}");

    // Back again: a new id, health-checked before it takes flows.
    reload(&agent, &config);
    wait_log(&agent, &format!("change=vip web backend {address} added"));
    let deadline = Instant::now() + WAIT;
    while !web_backends(&agent).iter().any(|(a, _, _, health)| *a == address.to_string() && health == "up") {
        assert!(Instant::now() < deadline, "{address} never came up: {:?}", web_backends(&agent));
        thread::sleep(Duration::from_millis(50));
    }
    let got = spread(&testbed, 60);
    assert_eq!(got.ok(), 60, "{got:?}");
    assert!(got.count(&name) > 0, "the re-added backend {name} takes new connections: {got:?}");
}

/// Port of the second TCP VIP the VIP tests add, on the testbed's VIP address.
const WEB2_PORT: u16 = 81;
/// Port of web2's backends: a second HTTP server on backends 1 and 2, so
/// that web2's answers tell it apart from web's (tests/tests/shared_backends.rs
/// covers two VIPs sharing a backend).
const WEB2_BACKEND_PORT: u16 = 8082;

/// Starts web2's backend servers (see [`WEB2_BACKEND_PORT`]); they stop
/// when the guards drop.
fn web2_servers(testbed: &Testbed) -> Vec<ChildGuard> {
    [1, 2]
        .into_iter()
        .map(|i| testbed.start_second_server(i, WEB2_BACKEND_PORT, WEB2_BACKEND_PORT + 1).expect("a web2 server"))
        .collect()
}

/// `[[vip]]` web2: TCP on the VIP address, port [`WEB2_PORT`], over backends
/// 1 and 2 only (so its answers tell it apart from web), HTTP-checked, on
/// `backend_port`.
fn web2_section(testbed: &Testbed, backend_port: u16) -> String {
    let listen = SocketAddr::new(testbed.vip_http().ip(), WEB2_PORT);
    let check = HealthCheck::default();
    let mut section = format!(
        "[[vip]]\nname = \"web2\"\nlisten = \"{listen}\"\nprotocol = \"tcp\"\n\n[vip.health_check]\ntype = \"http\"\n\
         path = \"/health\"\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {}\nfall = {}\n\n",
        check.interval.as_millis(),
        check.timeout.as_millis(),
        check.rise,
        check.fall
    );
    for i in [1, 2] {
        let address = SocketAddr::new(testbed.backend_addr(i).into(), backend_port);
        section.push_str(&format!("[[vip.backend]]\naddress = \"{address}\"\nweight = 1\n\n"));
    }
    section
}

/// Names of the VIPs in `/status`, in its order.
fn vip_names(agent: &Agent) -> Vec<String> {
    let status = agent.status().expect("/status");
    status["vips"]
        .as_array()
        .map(|vips| vips.iter().map(|v| v["name"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_else(|| panic!("no vips in {status}"))
}

/// `addr` is not balanced: every connection fails (the gateway's kernel has
/// no route for the VIP address, so it answers "unreachable").
fn assert_not_balanced(testbed: &Testbed, addr: SocketAddr, when: &str) {
    let results = testbed.client_requests(addr, 3, true);
    let answered: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert!(answered.is_empty(), "{when}: {addr} answered by {answered:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn sighup_adds_and_removes_a_vip_while_another_keeps_its_flows() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let config = config_for(&testbed, HealthCheck::default());
    let mut agent = running(&testbed, &config);
    let web2 = SocketAddr::new(testbed.vip_http().ip(), WEB2_PORT);
    assert_not_balanced(&testbed, web2, "before web2 is configured");

    // A connection to web held open across both reloads.
    let vip = testbed.vip_http();
    let mut kept = testbed
        .client()
        .enter(|| HttpConn::connect(vip))
        .expect("entering the client namespace")
        .expect("connecting to the vip");
    let x = kept.get("/", true).expect("first request").backend().expect("a backend answered");
    let mut still_on_x = |when: &str| {
        let same = kept.get("/", true).unwrap_or_else(|e| panic!("{when}: the kept connection broke: {e:#}")).backend();
        assert_eq!(same.as_deref(), Some(x.as_str()), "{when}: the existing flow stays on {x}");
    };

    let _web2_servers = web2_servers(&testbed);
    reload(&agent, &format!("{config}{}", web2_section(&testbed, WEB2_BACKEND_PORT)));
    wait_log(&agent, &format!("change=vip web2 added ({web2} tcp, maglev, 2 backends)"));
    agent.wait_health("web2", &["up", "up"], Duration::from_secs(10)).expect("web2 backends up");
    still_on_x("after adding web2");
    let got = Spread::of(&testbed.client_requests(web2, 40, true));
    assert_eq!(got.ok(), 40, "web2 serves: {got:?}");
    let (one, two, three) = (testbed.backend_name(1), testbed.backend_name(2), testbed.backend_name(3));
    assert_eq!(got.count(&three), 0, "backend 3 is not web2's: {got:?}");
    // With two equal backends, all 40 on one has probability 2^-39.
    assert!(got.count(&one) > 0 && got.count(&two) > 0, "web2 balances over backends 1 and 2: {got:?}");
    assert_eq!(vip_names(&agent), ["web", "echo", "web2"]);
    let metrics = agent.metrics().expect("/metrics");
    assert!(metrics.contains("lb_vip_backends_serving{vip=\"web2\"} 2"), "web2 in /metrics:\n{metrics}");
    let got = spread(&testbed, 30);
    assert_eq!(got.ok(), 30, "web still serves: {got:?}");

    reload(&agent, &config);
    wait_log(&agent, &format!("change=vip web2 removed ({web2} tcp)"));
    assert_eq!(vip_names(&agent), ["web", "echo"]);
    let metrics = agent.metrics().expect("/metrics");
    assert!(!metrics.contains("vip=\"web2\""), "web2 gone from /metrics:\n{metrics}");
    assert_not_balanced(&testbed, web2, "after web2 is removed");
    still_on_x("after removing web2");
    let got = spread(&testbed, 30);
    assert_eq!(got.ok(), 30, "web still serves: {got:?}");
    assert!(!agent.log().contains("reload refused"), "log:\n{}", agent.log());
}

//! End to end: schedulers, backup backends and drain, with the real `lb`
//! agent on a namespace testbed. Needs root. Each test builds its own testbed.
//!
//! The testbed has one client address (198.18.1.2), so under `source-hash`
//! every connection it makes must land on one backend, while the default
//! `maglev` scheduler (5-tuple) spreads them by source port.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    Spread, Testbed,
    agent::{ADMIN, Agent, HealthCheck},
    testbed::{BACKEND_HTTP_PORT, VIP, client::HttpConn},
};

/// Where a test's second VIP finds its backends: a second HTTP server on
/// each backend host ([`Testbed::start_second_server`]).
const SECOND_HTTP_PORT: u16 = 8082;
/// That second server's UDP port, unused here.
const SECOND_UDP_PORT: u16 = 8083;

/// One `[[vip.backend]]`: testbed backend `index` (1-based) and its settings.
#[derive(Clone, Copy)]
struct Backend {
    index: usize,
    weight: u32,
    backup: bool,
}

impl Backend {
    fn primary(index: usize) -> Self {
        Backend { index, weight: 1, backup: false }
    }

    fn backup(index: usize) -> Self {
        Backend { index, weight: 1, backup: true }
    }

    fn weight(index: usize, weight: u32) -> Self {
        Backend { index, weight, backup: false }
    }
}

/// One TCP `[[vip]]` on the testbed's VIP address, over the backends' HTTP servers.
struct Vip {
    name: &'static str,
    port: u16,
    /// The port of its backends' HTTP servers: the testbed's own, or a
    /// second server's ([`SECOND_HTTP_PORT`]), since two VIPs may not share
    /// a backend.
    backend_port: u16,
    /// `None`: the key is left out, so the default applies.
    scheduler: Option<&'static str>,
    backends: Vec<Backend>,
}

impl Vip {
    fn listen(&self) -> SocketAddr {
        SocketAddr::from((VIP, self.port))
    }
}

/// A config for `vips` on the testbed's gateway, HTTP-checked with `check`.
/// Written here rather than with `agent::config_for`, which has one fixed
/// web VIP with equal primaries.
fn config(testbed: &Testbed, check: HealthCheck, vips: &[Vip]) -> String {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let mut toml = format!(
        "[agent]\ninterfaces = [\"{}\", \"{}\"]\nadmin_listen = \"{ADMIN}\"\nxdp_mode = \"native\"\n\n",
        testbed.gateway_client_if(),
        testbed.gateway_backend_if()
    );
    for vip in vips {
        let _ = writeln!(toml, "[[vip]]\nname = \"{}\"\nlisten = \"{}\"\nprotocol = \"tcp\"", vip.name, vip.listen());
        if let Some(scheduler) = vip.scheduler {
            let _ = writeln!(toml, "scheduler = \"{scheduler}\"");
        }
        let _ = writeln!(
            toml,
            "\n[vip.health_check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"{}\"\ntimeout = \"{}\"\nrise = {}\nfall = {}\n",
            ms(check.interval),
            ms(check.timeout),
            check.rise,
            check.fall
        );
        for b in &vip.backends {
            let _ = writeln!(
                toml,
                "[[vip.backend]]\naddress = \"{}\"\nweight = {}\nbackup = {}\n",
                SocketAddr::new(testbed.backend_addr(b.index).into(), vip.backend_port),
                b.weight,
                b.backup
            );
        }
    }
    toml
}

/// Starts the agent on `vips` and waits until every backend of every VIP is up.
fn running(testbed: &Testbed, check: HealthCheck, vips: &[Vip]) -> Agent {
    let mut agent = Agent::start(testbed, &config(testbed, check, vips)).expect("starting lb");
    for vip in vips {
        let all_up = vec!["up"; vip.backends.len()];
        agent
            .wait_health(vip.name, &all_up, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("vip {}: {e:#}", vip.name));
    }
    agent
}

/// `n` requests to `vip`, each on a new connection (so a new flow).
fn spread(testbed: &Testbed, vip: SocketAddr, n: usize) -> Spread {
    Spread::of(&testbed.client_requests(vip, n, true))
}

/// `/status`'s entry for backend `i` (1-based, config order) of VIP `vip`.
fn backend_status(agent: &Agent, vip: &str, i: usize) -> serde_json::Value {
    let status = agent.status().expect("/status");
    status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == vip))
        .map(|v| v["backends"][i - 1].clone())
        .filter(|b| !b.is_null())
        .unwrap_or_else(|| panic!("no backend {i} of vip {vip} in {status}"))
}

/// `/status`'s scheduler for VIP `vip`.
fn scheduler_of(agent: &Agent, vip: &str) -> String {
    let status = agent.status().expect("/status");
    status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == vip))
        .and_then(|v| v["scheduler"].as_str())
        .unwrap_or_else(|| panic!("no scheduler for vip {vip} in {status}"))
        .to_owned()
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn source_hash_sends_one_client_to_one_backend() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let all = || (1..=3).map(Backend::primary).collect::<Vec<_>>();
    let _second_servers: Vec<_> = (1..=3)
        .map(|i| testbed.start_second_server(i, SECOND_HTTP_PORT, SECOND_UDP_PORT).expect("a second server"))
        .collect();
    let vips = [
        Vip { name: "spread", port: 80, backend_port: SECOND_HTTP_PORT, scheduler: None, backends: all() },
        Vip {
            name: "sticky",
            port: 81,
            backend_port: BACKEND_HTTP_PORT,
            scheduler: Some("source-hash"),
            backends: all(),
        },
    ];
    let check = HealthCheck::default();
    let mut agent = running(&testbed, check, &vips);
    assert_eq!(scheduler_of(&agent, "spread"), "maglev", "the default");
    assert_eq!(scheduler_of(&agent, "sticky"), "source-hash");

    let sticky = spread(&testbed, vips[1].listen(), 50);
    assert_eq!(sticky.ok(), 50, "every request answered: {sticky:?}");
    assert_eq!(sticky.per_backend.len(), 1, "one client, one backend: {sticky:?}");
    // The same client, same backends, 5-tuple hash: its connections spread.
    // (All 50 on one of 3 backends has probability 3^-49.)
    let spread_out = spread(&testbed, vips[0].listen(), 50);
    assert_eq!(spread_out.ok(), 50, "{spread_out:?}");
    assert!(spread_out.per_backend.len() >= 2, "maglev spreads a client's connections: {spread_out:?}");

    // When the client's backend goes down, all its new flows move together
    // to one other backend.
    let chosen = sticky.per_backend.keys().next().cloned().unwrap_or_default();
    let index = (1..=3).find(|&i| testbed.backend_name(i) == chosen).expect("a testbed backend answered");
    testbed.stop_backend(index).expect("stopping the client's backend");
    let mut want = vec!["up"; 3];
    want[index - 1] = "down";
    agent.wait_health("sticky", &want, check.detection_bound() + Duration::from_secs(1)).expect("marked down");
    let moved = spread(&testbed, vips[1].listen(), 30);
    assert_eq!(moved.ok(), 30, "{moved:?}");
    assert_eq!(moved.per_backend.len(), 1, "still one backend for the client: {moved:?}");
    assert_eq!(moved.count(&chosen), 0, "{moved:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn backup_takes_over_when_the_primaries_die_and_hands_back() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let vips = [Vip {
        name: "web",
        port: 80,
        backend_port: BACKEND_HTTP_PORT,
        scheduler: None,
        backends: vec![Backend::primary(1), Backend::primary(2), Backend::backup(3)],
    }];
    let vip = vips[0].listen();
    let backup = testbed.backend_name(3);
    let check = HealthCheck::default();
    let mut agent = running(&testbed, check, &vips);
    let flags: Vec<bool> =
        (1..=3).map(|i| backend_status(&agent, "web", i)["backup"].as_bool().unwrap_or(false)).collect();
    assert_eq!(flags, [false, false, true], "/status marks the backup");

    // While a primary is up the backup gets nothing, even with one primary left.
    let before = spread(&testbed, vip, 60);
    assert_eq!(before.ok(), 60, "{before:?}");
    assert_eq!(before.count(&backup), 0, "an idle backup: {before:?}");
    assert!(before.count(&testbed.backend_name(1)) > 0 && before.count(&testbed.backend_name(2)) > 0, "{before:?}");
    testbed.stop_backend(1).expect("stopping primary 1");
    agent
        .wait_health("web", &["down", "up", "up"], check.detection_bound() + Duration::from_secs(1))
        .expect("primary 1 down");
    let one_left = spread(&testbed, vip, 30);
    assert_eq!(one_left.count(&testbed.backend_name(2)), 30, "{one_left:?}");

    // No primary up: after the detection bound every new flow goes to the backup.
    testbed.stop_backend(2).expect("stopping primary 2");
    let killed = Instant::now();
    let bound = check.detection_bound() + Duration::from_secs(1);
    agent.wait_health("web", &["down", "down", "up"], bound).expect("primary 2 down in time");
    std::thread::sleep(bound.saturating_sub(killed.elapsed()));
    let takeover = spread(&testbed, vip, 30);
    assert_eq!(takeover.count(&backup), 30, "the backup serves: {takeover:?}");

    // A connection kept open on the backup across the hand-back.
    let mut kept = testbed
        .client()
        .enter(|| HttpConn::connect(vip))
        .expect("entering the client namespace")
        .expect("connecting to the VIP");
    let first = kept.get("/", true).expect("first request").backend();
    assert_eq!(first.as_deref(), Some(backup.as_str()));

    // A primary returns: new flows go back to the primaries.
    testbed.start_backend(1).expect("restarting primary 1");
    agent
        .wait_health("web", &["up", "down", "up"], check.recovery_bound() + Duration::from_secs(1))
        .expect("primary 1 back up in time");
    let back = spread(&testbed, vip, 30);
    assert_eq!(back.count(&testbed.backend_name(1)), 30, "the primary again: {back:?}");
    let same = kept.get("/", true).expect("the kept connection still works").backend();
    assert_eq!(same.as_deref(), Some(backup.as_str()), "a flow pinned to the backup stays while it is up");
    let backup_flows = backend_status(&agent, "web", 3)["traffic"]["new_flows"].as_u64().unwrap_or(0);
    assert!(backup_flows >= 31, "the kernel counted the backup's flows: {backup_flows}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn weight_zero_takes_no_new_connections_but_stays_up() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let vips = [Vip {
        name: "web",
        port: 80,
        backend_port: BACKEND_HTTP_PORT,
        scheduler: None,
        backends: vec![Backend::primary(1), Backend::weight(2, 0), Backend::primary(3)],
    }];
    let agent = running(&testbed, HealthCheck::default(), &vips);
    let drained = backend_status(&agent, "web", 2);
    assert_eq!(drained["health"], "up", "drained, not down: {drained}");
    assert_eq!(drained["weight"], 0, "{drained}");

    let got = spread(&testbed, vips[0].listen(), 60);
    assert_eq!(got.ok(), 60, "{got:?}");
    assert_eq!(got.count(&testbed.backend_name(2)), 0, "no new connections on the drained backend: {got:?}");
    assert!(got.count(&testbed.backend_name(1)) > 0 && got.count(&testbed.backend_name(3)) > 0, "{got:?}");
    let flows = backend_status(&agent, "web", 2)["traffic"]["new_flows"].as_u64();
    assert_eq!(flows, Some(0), "the kernel assigned it nothing");
}

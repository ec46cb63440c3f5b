//! End to end: VIPs announced over BGP through real BIRD 2 processes. The
//! gateway namespace runs lb with `[announce]` and BIRD with the shipped
//! `deploy/bird/gateway.conf`; the client namespace plays the router, with
//! `deploy/bird/router.conf`. Both configs' example addresses are the
//! testbed's. Needs root and `bird` (Debian's bird2, which `cargo xtask
//! setup` installs).

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_tests::{
    ChildGuard, Namespace, Testbed,
    agent::{Agent, HealthCheck, config_for},
};

const GATEWAY_CONF: &str = include_str!("../../deploy/bird/gateway.conf");
const ROUTER_CONF: &str = include_str!("../../deploy/bird/router.conf");
const WITHDRAW_DELAY: Duration = Duration::from_secs(2);

/// A BIRD daemon in a namespace, stopped (by PID) on drop, with its files
/// in a directory of its own, removed on drop.
struct Bird {
    _process: ChildGuard,
    dir: PathBuf,
}

impl Bird {
    fn start(testbed: &Testbed, ns: &Namespace, role: &str, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-bird-{}-{role}", testbed.id()));
        fs::create_dir_all(&dir).expect("bird dir");
        let conf = dir.join("bird.conf");
        fs::write(&conf, config).expect("bird.conf");
        let (conf, sock, pid) = (conf.display().to_string(), dir.join("bird.ctl"), dir.join("bird.pid"));
        let cmd = ["bird", "-f", "-c", &conf, "-s", &sock.display().to_string(), "-P", &pid.display().to_string()];
        let process = ns.spawn(&cmd).expect("starting bird");
        Bird { _process: process, dir }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether the router (the client namespace) has a BGP route for the VIP.
fn router_has_vip_route(testbed: &Testbed) -> bool {
    let vip = testbed.vip_http().ip().to_string();
    testbed
        .client()
        .exec_ok(&["ip", "route", "show", &format!("{vip}/32"), "proto", "bird"])
        .is_ok_and(|out| out.contains(&vip))
}

/// Waits (bounded by `within`) until the router's route for the VIP is
/// `present`; returns how long it took.
fn wait_route(testbed: &Testbed, present: bool, within: Duration) -> Duration {
    let started = Instant::now();
    while router_has_vip_route(testbed) != present {
        assert!(
            started.elapsed() < within,
            "the router's VIP route is still {} after {within:?}",
            if present { "missing" } else { "there" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_vip_is_announced_while_it_serves_and_withdrawn_before_the_agent_stops() {
    lb_tests::require_root!();
    let testbed = Testbed::new(2).expect("building the testbed");
    let _router = Bird::start(&testbed, testbed.client(), "router", ROUTER_CONF);
    let _gateway_bird = Bird::start(&testbed, testbed.gateway(), "gateway", GATEWAY_CONF);
    let check = HealthCheck::default();
    let config = format!(
        "{}\n[announce]\nrouting_table = 100\nwithdraw_delay = \"{}s\"\n",
        config_for(&testbed, check),
        WITHDRAW_DELAY.as_secs()
    );
    let mut agent = Agent::start(&testbed, &config).expect("starting lb");
    agent.wait_health("web", &["up"; 2], Duration::from_secs(10)).expect("web backends up");
    let took = wait_route(&testbed, true, Duration::from_secs(20));
    eprintln!("announced at the router {took:?} after the backends were up");
    assert!(agent.log().contains("announced"), "{}", agent.log());
    // Traffic follows the route (the client's default route goes there too,
    // so this checks the VIP still answers with the route in place).
    assert!(testbed.http_get(&format!("http://{}/", testbed.vip_http())).is_ok());

    // No backend serves: withdrawn.
    for i in 1..=2 {
        testbed.set_backend_health(i, false).expect("failing health");
    }
    agent.wait_health("web", &["down"; 2], check.detection_bound() + Duration::from_secs(2)).expect("down");
    agent.wait_health("echo", &["down"; 2], Duration::from_secs(5)).expect("echo down");
    let took = wait_route(&testbed, false, Duration::from_secs(10));
    eprintln!("withdrawn at the router {took:?} after the last backend went down");
    // One back: announced again.
    testbed.set_backend_health(1, true).expect("healthy again");
    wait_route(&testbed, true, check.recovery_bound() + Duration::from_secs(10));

    // SIGTERM: withdrawn first, and the agent waits withdraw_delay before it stops.
    let pid = libc::pid_t::try_from(agent.pid()).expect("pid fits");
    let stopping = Instant::now();
    // SAFETY: kill(2) with a pid we started and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let withdrawn = wait_route(&testbed, false, WITHDRAW_DELAY);
    let status = agent.terminate().expect("the agent stops");
    let stopped = stopping.elapsed();
    eprintln!("withdrawn {withdrawn:?} after SIGTERM; the agent exited after {stopped:?} ({status})");
    assert!(withdrawn < stopped, "the route outlived the agent");
    assert!(stopped >= WITHDRAW_DELAY, "the agent stopped {stopped:?} after SIGTERM, before its withdraw_delay");
    let table = testbed.gateway().exec_ok(&["ip", "route", "show", "table", "100"]).expect("table 100");
    assert!(table.trim().is_empty(), "the agent left routes behind: {table}");
}

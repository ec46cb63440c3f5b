//! End to end, issue 11: the data path outlives the agent. Under continuous
//! load (a new connection every 50 ms, 10 kept-alive connections asking
//! every 100 ms), an agent killed or stopped and started again drops no
//! request and breaks no connection; `lb unload` leaves nothing behind; pinned
//! state of another layout is refused and left forwarding. Needs root.
//!
//! The agents here run in the gateway's network namespace only, sharing the
//! host's `/sys/fs/bpf` as on a real gateway, each test with a pin directory
//! of its own ([`PinDir`], removed on every exit path).

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lb_common::layout::LAYOUT_VERSION;
use lb_tests::{
    Testbed,
    agent::{Agent, HealthCheck, PinDir, config_for},
    load::{Load, LoadReport, Pace},
};

/// How long the load runs before and after the operation: several health
/// intervals, so an "unknown until probed" gap after a restart would show.
const AROUND: Duration = Duration::from_secs(2);

/// The agent's default health checks (2 s interval, 1 s timeout, rise 2,
/// fall 3), as an operator runs them: a restarted agent that had to wait
/// for its first probes would leave the VIP without backends for up to a
/// couple of seconds, which the load would see.
const CHECK: HealthCheck =
    HealthCheck { interval: Duration::from_secs(2), timeout: Duration::from_secs(1), rise: 2, fall: 3 };

fn running(testbed: &Testbed, config: &str) -> Agent {
    let mut agent = Agent::start_pinned(testbed, config).expect("starting lb");
    agent.wait_health("web", &["up"; 3], Duration::from_secs(15)).expect("web backends up");
    agent
}

/// Interfaces of the gateway with an XDP program attached.
fn xdp_attached(testbed: &Testbed) -> Vec<String> {
    let out = testbed.gateway().exec_ok(&["ip", "-o", "link", "show"]).expect("ip link show in the gateway");
    out.lines()
        .filter(|l| l.contains(" xdp") || l.contains("prog/xdp"))
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
        .collect()
}

/// The id of the XDP program on each gateway interface (`prog/xdp id N`).
fn xdp_prog_ids(testbed: &Testbed) -> Vec<u32> {
    let out = testbed.gateway().exec_ok(&["ip", "-o", "link", "show"]).expect("ip link show in the gateway");
    out.lines()
        .filter_map(|l| l.split("prog/xdp id ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

fn assert_clean(report: &LoadReport, what: &str, logs: &str) {
    assert!(report.new_ok >= 40, "{what}: too little load to tell: {report:?}");
    assert!(report.kept_requests >= 100, "{what}: too little load to tell: {report:?}");
    assert!(
        report.clean(),
        "{what}: {} of {} new connections failed, {} of 10 kept-alive connections broke: {report:#?}\n{logs}",
        report.new_failed.len(),
        report.new_ok + report.new_failed.len(),
        report.kept_broken.len()
    );
}

/// Kills or stops a running agent under load, starts another at once, and
/// checks that nothing broke and that the new one adopted the pinned state.
fn restart_under_load(stop: impl FnOnce(&mut Agent)) {
    let testbed = Testbed::new(3).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let config = pins.config(&config_for(&testbed, CHECK));
    let mut first = running(&testbed, &config);
    let programs_before = xdp_prog_ids(&testbed);
    assert_eq!(programs_before.len(), 2, "one program on each interface");
    let load = Load::start(testbed.client(), testbed.vip_http(), Pace::default());
    thread::sleep(AROUND);

    let load_started = load.started();
    stop(&mut first);
    let stopped = Instant::now();
    let second = Agent::start_pinned(&testbed, &config).expect("starting lb again");
    let without_agent = stopped.elapsed();
    thread::sleep(AROUND);
    let report = load.stop();

    let logs = format!("first agent:\n{}\nsecond agent:\n{}", first.log(), second.log());
    eprintln!(
        "data path ran {without_agent:?} without an agent, from {:?} into the load; load: {report:?}",
        stopped.duration_since(load_started)
    );
    assert_clean(&report, "restart", &logs);
    let log = second.log();
    assert!(log.contains("adopting the pinned data path"), "the second agent adopted:\n{log}");
    assert!(log.contains("replaced the pinned one atomically"), "its program replaced the old one:\n{log}");
    assert!(
        log.contains("slots_written=0") && log.contains("rings_published=0"),
        "adopting an unchanged config rewrote no ring:\n{log}"
    );
    assert_eq!(second.backend_health("web").expect("status"), vec!["up"; 3], "health carried over");
    // The new agent's program (what an upgrade brings) runs now: replaced
    // in place through the pinned links, with not a packet lost above.
    let programs_after = xdp_prog_ids(&testbed);
    assert_eq!(programs_after.len(), 2, "one program on each interface");
    assert!(
        programs_after.iter().all(|id| !programs_before.contains(id)),
        "the programs were replaced: {programs_before:?} then {programs_after:?}"
    );
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn sigkill_and_restart_drop_nothing() {
    lb_tests::require_root!();
    restart_under_load(|agent| {
        agent.kill().expect("SIGKILL");
    });
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn sigterm_and_restart_drop_nothing() {
    lb_tests::require_root!();
    restart_under_load(|agent| {
        assert!(agent.stop().expect("SIGTERM"), "lb exits 0 on SIGTERM:\n{}", agent.log());
    });
}

/// `lb` with `args`, from the host (pins are the host's).
fn lb(args: &[&str]) -> std::process::Output {
    let lb = lb_tests::lb_bin().expect("lb");
    Command::new(lb).args(args).output().expect("running lb")
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn stopped_agent_leaves_forwarding_status_says_so_and_unload_removes_everything() {
    lb_tests::require_root!();
    let testbed = Testbed::new(2).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let config = pins.config(&config_for(&testbed, HealthCheck::default()));
    let mut agent = Agent::start_pinned(&testbed, &config).expect("starting lb");
    agent.wait_health("web", &["up"; 2], Duration::from_secs(10)).expect("web backends up");
    assert!(agent.stop().expect("SIGTERM"), "lb exits 0 on SIGTERM:\n{}", agent.log());
    assert!(agent.log().contains("the data path stays attached"), "{}", agent.log());

    let attached = xdp_attached(&testbed);
    assert_eq!(attached.len(), 2, "still attached to both interfaces after SIGTERM: {attached:?}");
    let answered = testbed.client_requests(testbed.vip_http(), 20, true).iter().filter(|r| r.is_ok()).count();
    assert_eq!(answered, 20, "the VIP keeps serving with no agent");

    let dir = pins.path().to_str().expect("utf-8 path");
    // No agent listens on the host's 127.0.0.1:9 (the tests' agents
    // serve inside their gateway namespaces), so this asks nobody.
    let status = lb(&["status", "--admin", "127.0.0.1:9", "--pin-dir", dir]);
    let said = String::from_utf8_lossy(&status.stderr);
    assert!(!status.status.success(), "lb status fails without an agent: {said}");
    assert!(
        said.contains("no agent runs")
            && said.contains("no health checks")
            && said.contains(testbed.gateway_client_if()),
        "lb status says the data path runs without an agent: {said}"
    );

    let unload = lb(&["unload", "--pin-dir", dir]);
    assert!(unload.status.success(), "lb unload: {}", String::from_utf8_lossy(&unload.stderr));
    assert_eq!(xdp_attached(&testbed), Vec::<String>::new(), "no program left attached");
    assert!(!pins.path().exists(), "no pin left: {:?}", pins.entries());
    let again = lb(&["unload", "--pin-dir", dir]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing pinned"), "a second unload finds nothing");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn unload_is_refused_while_an_agent_runs() {
    lb_tests::require_root!();
    let testbed = Testbed::new(1).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let config = pins.config(&config_for(&testbed, HealthCheck::default()));
    let agent = Agent::start_pinned(&testbed, &config).expect("starting lb");
    let unload = lb(&["unload", "--pin-dir", pins.path().to_str().expect("utf-8")]);
    let said = String::from_utf8_lossy(&unload.stderr);
    assert!(!unload.status.success() && said.contains("another lb agent is running"), "{said}");
    assert!(agent.status().is_ok(), "the agent still serves");
    assert_eq!(xdp_attached(&testbed).len(), 2, "still attached");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn pinned_state_of_another_layout_is_refused_and_keeps_forwarding() {
    lb_tests::require_root!();
    let testbed = Testbed::new(2).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let config = pins.config(&config_for(&testbed, HealthCheck::default()));
    let mut agent = Agent::start_pinned(&testbed, &config).expect("starting lb");
    agent.wait_health("web", &["up"; 2], Duration::from_secs(10)).expect("web backends up");
    assert!(agent.stop().expect("SIGTERM"));

    // A binary of another layout version finds this tag.
    let tag = pins.path().join("LAYOUT");
    std::fs::remove_file(&tag).expect("removing the layout tag");
    std::os::unix::fs::symlink("lb-layout-v0", &tag).expect("an older layout tag");
    let refused = Agent::start_pinned(&testbed, &config).expect_err("another layout version is refused");
    assert!(
        format!("{refused:#}").contains(&format!("layout version: pinned 0, this lb's {LAYOUT_VERSION}")),
        "{refused:#}"
    );
    std::fs::remove_file(&tag).expect("removing the layout tag");
    std::os::unix::fs::symlink(format!("lb-layout-v{LAYOUT_VERSION}"), &tag).expect("the layout tag back");

    let resized = config.replacen("[agent]\n", "[agent]\nconntrack_capacity = 4096\n", 1);
    let refused = Agent::start_pinned(&testbed, &resized).expect_err("another layout is refused");
    let said = format!("{refused:#}");
    assert!(said.contains("CONNTRACK: capacity"), "names what differs: {said}");
    assert!(said.contains("agent.conntrack_capacity changed"), "and why: {said}");
    assert!(said.contains("lb unload --pin-dir"), "and what to do: {said}");
    assert_eq!(xdp_attached(&testbed).len(), 2, "the old data path is left attached");
    let answered = testbed.client_requests(testbed.vip_http(), 10, true).iter().filter(|r| r.is_ok()).count();
    assert_eq!(answered, 10, "and keeps serving");
}

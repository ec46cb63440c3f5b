//! What an operator reads besides `/metrics`: `lb run --log-format json`
//! (every line a JSON object, events with their fields) and `lb status`
//! (a header, rates). Needs root.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
};
use serde_json::Value;

const BACKENDS: usize = 3;
/// A bound on waits for a log line; generous for a loaded machine.
const WAIT: Duration = Duration::from_secs(20);

/// The agent's log as JSON objects; fails on any line that is not one.
fn json_lines(agent: &Agent) -> Vec<Value> {
    let log = agent.log();
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\nlog:\n{log}")))
        .collect()
}

/// Waits for an event whose `fields.message` is `message` and which `matches`.
fn wait_event(agent: &Agent, message: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = json_lines(agent).into_iter().find(|e| e["fields"]["message"] == message && matches(&e["fields"]));
        if let Some(event) = found {
            return event;
        }
        assert!(Instant::now() < deadline, "no {message:?} event within {WAIT:?}:\n{}", agent.log());
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn json_logs_carry_each_events_fields() {
    lb_tests::require_root!();
    let testbed = Testbed::new(BACKENDS).expect("building the testbed");
    let config = agent::config_for(&testbed, HealthCheck::default());
    let mut agent = Agent::start_with(&testbed, &config, |cmd| {
        cmd.args(["--log-format", "json"]);
    })
    .expect("starting lb");
    agent.wait_health("web", &["up"; BACKENDS], Duration::from_secs(10)).expect("web backends up");

    testbed.stop_backend(3).expect("stopping backend 3");
    let dead = testbed.backend_http(3).to_string();
    let down = wait_event(&agent, "backend down", |f| f["backend"].as_str().is_some_and(|b| b.contains(&dead)));
    let f = &down["fields"];
    assert_eq!((f["from"].as_str(), f["to"].as_str()), (Some("up"), Some("down")), "{down}");
    assert!(f["reason"].as_str().is_some_and(|r| !r.is_empty()), "a reason: {down}");
    assert_eq!(f["generation"], 1, "the config's generation: {down}");
    assert_eq!(down["level"], "WARN", "{down}");

    // A reload that changes one weight: the change and the new generation as fields.
    let first = testbed.backend_http(1).to_string();
    let changed = config.replacen("weight = 1\n", "weight = 2\n", 1);
    assert_ne!(changed, config, "the config has a weight to change");
    fs::write(agent.config_path(), changed).expect("rewriting the config");
    let out = agent.lb(&["reload"]).expect("lb reload");
    assert!(out.status.success(), "lb reload: {}", String::from_utf8_lossy(&out.stderr));
    let applied = wait_event(&agent, "reload: change applied", |f| {
        f["change"].as_str().is_some_and(|c| c.contains(&first) && c.contains("weight 1 -> 2"))
    });
    assert_eq!(applied["fields"]["generation"], 2, "{applied}");
    let done = wait_event(&agent, "reload: done", |_| true);
    assert_eq!((done["fields"]["changes"].as_u64(), done["fields"]["generation"].as_u64()), (Some(1), Some(2)));
    // Every line so far parsed (json_lines panics otherwise).
    assert!(json_lines(&agent).len() > 5);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn lb_status_prints_a_header_and_rates() {
    lb_tests::require_root!();
    let testbed = Testbed::new(BACKENDS).expect("building the testbed");
    let mut agent = Agent::start(&testbed, &agent::config_for(&testbed, HealthCheck::default())).expect("starting lb");
    agent.wait_health("web", &["up"; BACKENDS], Duration::from_secs(10)).expect("web backends up");
    // Traffic all the while `lb status --rates` reads twice, 2 s apart: a
    // client in the client namespace, in batches of 10 until lb status is
    // done, at most 100 batches.
    let lb = lb_tests::lb_bin().expect("lb binary");
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let mut ok = 0;
            for _ in 0..100 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                ok += testbed.client_requests(testbed.vip_http(), 10, true).iter().filter(|r| r.is_ok()).count();
            }
            ok
        });
        let out = testbed
            .gateway()
            .command(&lb)
            .args(["status", "--rates", "--interval", "2s", "--admin", &agent::ADMIN.to_string()])
            .output()
            .expect("running lb status");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let ok = client.join().expect("the client thread");
        assert!(ok > 0, "requests answered");
        out
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lb status failed:\n{text}");
    let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header[..3], ["BACKEND", "HEALTH", "ADMIN"], "{text}");
    let rows: Vec<Vec<&str>> = (1..=BACKENDS)
        .map(|i| {
            let address = testbed.backend_http(i).to_string();
            text.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|cols| cols.first() == Some(&address.as_str()))
                .unwrap_or_else(|| panic!("no row for {address}:\n{text}"))
        })
        .collect();
    // address, health, admin, weight, then packets in per second: the
    // requests were sent within the 2 s, so at least one backend saw some.
    assert!(rows.iter().all(|r| r[1] == "up" && r[2] == "ready"), "{text}");
    assert!(rows.iter().any(|r| r[4] != "0" && r[4] != "-"), "some packets per second in:\n{text}");
    // The last probe's latency, in ms.
    assert!(rows.iter().all(|r| r.iter().any(|c| c.ends_with("ms"))), "check latency:\n{text}");
}

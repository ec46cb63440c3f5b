//! End to end, issue 11: runtime control through the control socket and the
//! CLI (`lb backend drain|disable|enable|weight|wait-drained`, `lb reload`),
//! under load, and runtime changes across a restart and reloads. Needs root.

use std::{
    fs,
    time::{Duration, Instant},
};

use lb_tests::{
    Spread, Testbed,
    agent::{Agent, HealthCheck, PinDir, config_for},
    load::{Load, Pace},
    testbed::client::HttpConn,
};

fn running(testbed: &Testbed, config: &str) -> Agent {
    let mut agent = Agent::start_pinned(testbed, config).expect("starting lb");
    agent.wait_health("web", &["up"; 3], Duration::from_secs(10)).expect("web backends up");
    agent
}

/// `lb ARGS` against `agent`; panics unless its exit status is `ok`.
fn lb(agent: &Agent, args: &[&str], ok: bool) -> String {
    let out = agent.lb(args).expect("running lb");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.success(), ok, "lb {args:?} exited {}: {text}\nagent log:\n{}", out.status, agent.log());
    text
}

/// `/status`'s web backend at `address`: (admin, weight, weight set at runtime, active flows).
fn web_backend(agent: &Agent, address: &str) -> (String, u64, bool, u64) {
    let status = agent.status().expect("/status");
    let backend = status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == "web"))
        .and_then(|v| v["backends"].as_array())
        .and_then(|b| b.iter().find(|b| b["address"] == address))
        .unwrap_or_else(|| panic!("no web backend {address} in {status}"))
        .clone();
    (
        backend["admin"].as_str().unwrap_or_default().to_owned(),
        backend["weight"].as_u64().unwrap_or(u64::MAX),
        backend["weight_set_at_runtime"].as_bool().unwrap_or_default(),
        backend["active_flows"].as_u64().unwrap_or(u64::MAX),
    )
}

fn spread(testbed: &Testbed, n: usize) -> Spread {
    Spread::of(&testbed.client_requests(testbed.vip_http(), n, true))
}

/// The testbed index of the backend named `name` (`b1`...).
fn index_of(testbed: &Testbed, name: &str) -> usize {
    (1..=testbed.backend_count()).find(|&i| testbed.backend_name(i) == name).expect("a testbed backend")
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn drain_keeps_its_connections_takes_no_new_ones_and_wait_drained_waits_for_them() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let agent = running(&testbed, &pins.config(&config_for(&testbed, HealthCheck::default())));
    let load = Load::start(testbed.client(), testbed.vip_http(), Pace::default());
    let kept = load.snapshot().kept_backends;
    let name = kept.iter().flatten().next().expect("a kept connection").clone();
    let on_it = kept.iter().filter(|b| b.as_deref() == Some(name.as_str())).count();
    let address = testbed.backend_http(index_of(&testbed, &name)).to_string();

    let said = lb(&agent, &["backend", "drain", "web", &address], true);
    assert!(said.contains("drain"), "{said}");
    assert_eq!(web_backend(&agent, &address).0, "drain");
    let after = spread(&testbed, 60);
    assert_eq!(after.ok(), 60, "{after:?}");
    assert_eq!(after.count(&name), 0, "no new connection on drained {name}: {after:?}");
    // Long enough for a count of the table begun after the command (the
    // agent counts at most every 5 s).
    let still = lb(&agent, &["backend", "wait-drained", "web", &address, "--timeout", "8s"], false);
    assert!(still.contains("still") && !still.contains("still 0 "), "{on_it} kept connections on {name}: {still}");

    let report = load.stop();
    if !report.clean() {
        let status = agent.status().expect("status");
        eprintln!("DEBUG verdicts: {}", status["verdicts"]);
        eprintln!("DEBUG conntrack: {}", status["conntrack"]);
    }
    assert!(report.clean(), "drain broke nothing ({on_it} kept connections were on {name}): {report:#?}");
    // The kept connections closed; their entries are idle past the closing
    // timeout (10 s) soon after, and the count is at most ~5 s old.
    let started = Instant::now();
    let done = lb(&agent, &["backend", "wait-drained", "web", &address, "--timeout", "40s"], true);
    assert!(done.contains("drained"), "{done}");
    eprintln!("wait-drained returned {:?} after the connections closed", started.elapsed());
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn disable_moves_its_flows_and_enable_brings_it_back() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let agent = running(&testbed, &pins.config(&config_for(&testbed, HealthCheck::default())));
    let vip = testbed.vip_http();
    let mut conn = testbed.client().enter(|| HttpConn::connect(vip)).expect("client ns").expect("connect");
    let name = conn.get("/", true).expect("first request").backend().expect("a backend");
    let address = testbed.backend_http(index_of(&testbed, &name)).to_string();

    lb(&agent, &["backend", "disable", "web", &address], true);
    let (admin, ..) = web_backend(&agent, &address);
    assert_eq!(admin, "maint");
    assert!(conn.get("/", true).is_err(), "its flow moved: the new backend resets it");
    let after = spread(&testbed, 60);
    assert_eq!((after.ok(), after.count(&name)), (60, 0), "none on disabled {name}: {after:?}");

    lb(&agent, &["backend", "enable", "web", &address], true);
    assert_eq!(web_backend(&agent, &address).0, "ready");
    let back = spread(&testbed, 60);
    assert!(back.count(&name) > 0, "enabled {name} takes new connections again: {back:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn runtime_changes_survive_a_restart_and_reloads_and_lb_reload_shows_its_result() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let config = pins.config(&config_for(&testbed, HealthCheck::default()));
    let mut first = running(&testbed, &config);
    let (x, y) = (testbed.backend_http(1).to_string(), testbed.backend_http(2).to_string());
    lb(&first, &["backend", "drain", "web", &x], true);
    lb(&first, &["backend", "weight", "web", &y, "5"], true);
    let refused = lb(&first, &["backend", "drain", "web", "198.18.2.99:8080"], false);
    assert!(refused.contains("no backend 198.18.2.99:8080 of vip web"), "{refused}");

    // Everything below runs under load: restart, reloads good and bad.
    let load = Load::start(testbed.client(), testbed.vip_http(), Pace::default());
    first.kill().expect("SIGKILL");
    let second = Agent::start_pinned(&testbed, &config).expect("starting lb again");
    assert_eq!(web_backend(&second, &x).0, "drain", "the drain survived the restart");
    let (_, weight, runtime, _) = web_backend(&second, &y);
    assert_eq!((weight, runtime), (5, true), "the runtime weight survived the restart");
    let after = spread(&testbed, 60);
    assert_eq!(after.count(&testbed.backend_name(1)), 0, "still drained after the restart: {after:?}");

    // A reload that changes the file's weight of y: the runtime weight stays.
    let path = second.config_path();
    let text = fs::read_to_string(&path).expect("config");
    let from = format!("address = \"{y}\"\nweight = 1\n");
    fs::write(&path, text.replacen(&from, &format!("address = \"{y}\"\nweight = 2\n"), 1)).expect("rewrite");
    let said = lb(&second, &["reload"], true);
    assert!(said.contains(&format!("vip web backend {y} weight 1 -> 2")), "lb reload prints the change: {said}");
    assert_eq!(web_backend(&second, &x).0, "drain", "a reload keeps the drain");
    assert_eq!(web_backend(&second, &y).1, 5, "and the runtime weight");

    let good = fs::read_to_string(&path).expect("config");
    fs::write(&path, good.replacen("weight = 1", "weight = \"heavy\"", 1)).expect("rewrite");
    let refused = lb(&second, &["reload"], false);
    assert!(refused.contains("lb.toml") && refused.contains("weight"), "file, key and reason: {refused}");
    let metrics = second.metrics().expect("/metrics");
    assert!(metrics.contains("lb_config_last_reload_successful 0"), "{metrics}");
    assert!(metrics.contains("lb_config_generation 2"), "start, then one applied reload: {metrics}");
    fs::write(&path, good).expect("restore");
    assert!(lb(&second, &["reload"], true).contains("no changes"));
    let metrics = second.metrics().expect("/metrics");
    assert!(metrics.contains("lb_config_last_reload_successful 1"), "{metrics}");
    assert!(metrics.contains("lb_config_generation 3"), "{metrics}");
    assert!(metrics.contains("lb_config_last_reload_success_timestamp_seconds 1"), "{metrics}");

    let report = load.stop();
    assert!(report.clean(), "restart and reloads under load: {report:#?}");
    lb(&second, &["backend", "enable", "web", &x], true);
    lb(&second, &["backend", "weight", "web", &y, "config"], true);
    assert_eq!(web_backend(&second, &y).1, 2, "back to the file's weight");
    let state = fs::read_to_string(pins.state_file()).expect("state file");
    assert!(!state.contains(&x) && !state.contains(&y), "cleared changes leave the state file: {state}");
}

/// Datagrams on `socket` until one contains `want`, within `within`.
fn wait_notify(socket: &std::os::unix::net::UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let mut buf = [0u8; 512];
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if seen.last().is_some_and(|m| m.contains(want)) {
                return seen;
            }
        }
    }
    panic!("no {want:?} within {within:?}; got {seen:?}");
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn systemd_hears_ready_once_health_is_known_and_reloading_around_a_reload() {
    lb_tests::require_root!();
    let testbed = Testbed::new(2).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let path = std::env::temp_dir().join(format!("lb-tests-notify-{}.sock", testbed.id()));
    let _ = fs::remove_file(&path);
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("binding a notify socket");
    socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let config = pins.config(&config_for(&testbed, HealthCheck::default()));
    let mut agent = Agent::start_pinned_with(&testbed, &config, |cmd| {
        cmd.env("NOTIFY_SOCKET", &path);
    })
    .expect("starting lb");
    let seen = wait_notify(&socket, "READY=1", Duration::from_secs(10));
    let health = agent.backend_health("web").expect("status");
    assert!(health.iter().all(|h| h != "unknown"), "READY=1 came once health was known: {health:?}, {seen:?}");
    lb(&agent, &["reload"], true);
    let seen = wait_notify(&socket, "READY=1", Duration::from_secs(5));
    assert!(seen.iter().any(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC=")), "{seen:?}");
    assert!(agent.stop().expect("SIGTERM"));
    wait_notify(&socket, "STOPPING=1", Duration::from_secs(2));
    let _ = fs::remove_file(&path);
}

/// A raw HTTP/1.1 request over `stream`; returns the status code.
fn raw_status(mut stream: impl std::io::Read + std::io::Write, request: &[u8]) -> u16 {
    stream.write_all(request).expect("sending");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn the_control_api_refuses_outsiders_missing_tokens_and_oversized_requests_without_disturbing_traffic() {
    use std::{net::TcpStream, os::unix::net::UnixStream, process::Command};
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let token_file = std::env::temp_dir().join(format!("lb-tests-token-{}", testbed.id()));
    fs::write(&token_file, "s3cret-token\n").expect("token file");
    let control_tcp = "127.0.0.1:9101";
    let extra = format!(
        "[agent]\ncontrol_group = \"nogroup\"\ncontrol_listen = \"{control_tcp}\"\ncontrol_token_file = \"{}\"\n",
        token_file.display()
    );
    let config = pins.config(&config_for(&testbed, HealthCheck::default())).replacen("[agent]\n", &extra, 1);
    let agent = running(&testbed, &config);
    let load = Load::start(testbed.client(), testbed.vip_http(), Pace::default());
    let address = testbed.backend_http(1).to_string();
    let socket = agent.control_socket();
    let lb_bin = lb_tests::lb_bin().expect("lb");

    // Outside the socket's group: refused by the file system.
    let outsider = Command::new("setpriv")
        .args(["--reuid=65533", "--regid=65533", "--clear-groups", "--"])
        .arg(&lb_bin)
        .args(["backend", "drain", "web", &address, "--socket"])
        .arg(&socket)
        .output()
        .expect("setpriv");
    let said = String::from_utf8_lossy(&outsider.stderr);
    assert!(!outsider.status.success() && said.contains("Permission denied"), "an outsider is refused: {said}");
    // In the group: allowed.
    let member = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&lb_bin)
        .args(["backend", "weight", "web", &address, "config", "--socket"])
        .arg(&socket)
        .output()
        .expect("setpriv");
    assert!(member.status.success(), "a member of the group may: {}", String::from_utf8_lossy(&member.stderr));

    // Oversized body (413) and header (431) on the socket.
    let big = "x".repeat(8192);
    let body = format!("{{\"vip\":\"web\",\"address\":\"{address}\",\"action\":\"drain\",\"pad\":\"{big}\"}}");
    let request = format!(
        "POST /backend HTTP/1.1\r\nHost: lb\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(raw_status(UnixStream::connect(&socket).expect("connect"), request.as_bytes()), 413);
    let request =
        format!("GET /status HTTP/1.1\r\nHost: lb\r\nX-Pad: {}\r\nConnection: close\r\n\r\n", "y".repeat(32 * 1024));
    assert_eq!(raw_status(UnixStream::connect(&socket).expect("connect"), request.as_bytes()), 431);

    // Over TCP: a token on every request, else 401.
    let tcp = |request: String| {
        testbed
            .gateway()
            .enter(move || raw_status(TcpStream::connect(control_tcp).expect("connect"), request.as_bytes()))
            .expect("gateway ns")
    };
    let drain = format!("{{\"vip\":\"web\",\"address\":\"{address}\",\"action\":\"drain\"}}");
    let post = |auth: &str| {
        format!(
            "POST /backend HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{drain}",
            drain.len()
        )
    };
    assert_eq!(tcp(post("")), 401, "no token");
    assert_eq!(tcp(post("Authorization: Bearer wrong-token\r\n")), 401, "a wrong token");
    assert_eq!(web_backend(&agent, &address).0, "ready", "nothing changed");
    assert_eq!(tcp(post("Authorization: Bearer s3cret-token\r\n")), 200, "the token");
    assert_eq!(web_backend(&agent, &address).0, "drain");
    lb(&agent, &["backend", "enable", "web", &address], true);

    let report = load.stop();
    assert!(report.clean(), "none of it disturbed traffic: {report:#?}");
    let _ = fs::remove_file(&token_file);
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn keep_leaves_established_connections_on_a_backend_that_fails_its_checks_but_answers() {
    lb_tests::require_root!();
    let testbed = Testbed::new(3).expect("building the testbed");
    let pins = PinDir::new(&testbed).expect("a pin directory");
    let check = HealthCheck::default();
    let config = pins.config(&config_for(&testbed, check)).replacen(
        "name = \"web\"\n",
        "name = \"web\"\non_backend_down = \"keep\"\n",
        1,
    );
    let mut agent = running(&testbed, &config);
    let vip = testbed.vip_http();
    let mut conn = testbed.client().enter(|| HttpConn::connect(vip)).expect("client ns").expect("connect");
    let name = conn.get("/", true).expect("first request").backend().expect("a backend");
    let index = index_of(&testbed, &name);

    testbed.set_backend_health(index, false).expect("failing its /health");
    let mut want = vec!["up"; 3];
    want[index - 1] = "down";
    agent.wait_health("web", &want, check.detection_bound() + Duration::from_secs(1)).expect("down by its checks");
    for _ in 0..3 {
        let same = conn.get("/", true).expect("the established connection still works").backend();
        assert_eq!(same.as_deref(), Some(name.as_str()), "and stays on {name}");
    }
    let after = spread(&testbed, 60);
    assert_eq!((after.ok(), after.count(&name)), (60, 0), "no new connection on down {name}: {after:?}");
}

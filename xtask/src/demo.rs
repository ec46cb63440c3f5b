//! `cargo xtask demo`: the balancer at work, told as a short story.
//!
//! A namespace testbed (client, gateway, 3 backends; see `lb_tests::testbed`)
//! comes up; `lb run` starts in the gateway namespace with the config below;
//! 300 new connections spread over the backends; backend 2 dies and gets no
//! more; it comes back and gets its share again; a few metrics; teardown.
//!
//! Nothing may be left behind on any exit path, Ctrl-C included: SIGINT and
//! SIGTERM only set a flag, which the demo checks between steps, so it
//! returns with an error and the guards drop in order (lb first, then the
//! testbed, then the temporary files). A second Ctrl-C kills at once; the
//! testbed's watchdog process still deletes its namespaces then.

use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_tests::{ChildGuard, Namespace, Spread, Testbed, testbed::client};
use serde_json::Value;

use crate::{
    build::{self, Binaries, Profile},
    setup,
};

/// Backends in the testbed; the story stops and restarts number 2.
const BACKENDS: usize = 3;
/// The backend that dies and comes back.
const VICTIM: usize = 2;
/// Requests per round, each on a new connection so each is balanced anew.
const REQUESTS: usize = 300;
/// Requests sent between two checks for Ctrl-C.
const BATCH: usize = 25;
/// Health checking of the web VIP, written into the config.
const INTERVAL: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_millis(300);
const RISE: u32 = 2;
const FALL: u32 = 2;
/// Bound on lb starting and reporting every backend up (and on recovery).
const HEALTH_WAIT: Duration = Duration::from_secs(15);
/// Width of the longest bar in a spread table.
const BAR_WIDTH: usize = 40;

/// The demo's config; `{NAME}` placeholders are filled in by [`render_config`].
const CONFIG_TEMPLATE: &str = r#"# Written by `cargo xtask demo`.
[agent]
interfaces = ["{CLIENT_IF}", "{BACKEND_IF}"]
admin_listen = "{ADMIN}"
xdp_mode = "native"

[[vip]]
name = "web"
listen = "{VIP_HTTP}"
protocol = "tcp"

[vip.health_check]
type = "http"
path = "/health"
interval = "{INTERVAL}"
timeout = "{TIMEOUT}"
rise = {RISE}
fall = {FALL}

{WEB_BACKENDS}[[vip]]
name = "echo"
listen = "{VIP_UDP}"
protocol = "udp"

[vip.health_check]
type = "none"

{ECHO_BACKENDS}"#;

/// One `[[vip.backend]]` of [`CONFIG_TEMPLATE`].
const BACKEND_TEMPLATE: &str = "[[vip.backend]]\naddress = \"{ADDRESS}\"\nweight = 1\n\n";

/// Set by SIGINT/SIGTERM; checked between steps.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The `demo` subcommand.
pub fn run() -> anyhow::Result<()> {
    if !lb_tests::is_root() {
        bail!(
            "cargo xtask demo needs root (network namespaces, XDP): rerun as root, e.g. `sudo -E cargo xtask demo`"
        );
    }
    setup::ensure(true)?;
    let mut bins = build::build(Profile::Debug)?;
    // As for the tests, LB_BIN names another agent binary (e.g. a release build).
    if let Some(lb) = std::env::var_os(lb_tests::LB_BIN_ENV) {
        bins.lb = PathBuf::from(lb);
        println!(
            "demo: using {}={} instead of the lb just built",
            lb_tests::LB_BIN_ENV,
            bins.lb.display()
        );
    }
    install_signal_handlers()?;
    let result = story(&bins);
    if INTERRUPTED.load(Ordering::SeqCst) {
        println!("\ndemo: interrupted; everything it started has been stopped and removed");
    }
    result
}

/// The demo proper. Declaration order is drop order reversed: the work
/// directory outlives the testbed, which outlives lb.
fn story(bins: &Binaries) -> anyhow::Result<()> {
    let workdir = WorkDir::create()?;
    let mut problems = Vec::new();

    headline("1. A testbed: a client, a gateway and 3 backends, each in its own network namespace");
    let testbed = Testbed::builder()
        .backends(BACKENDS)
        .backend_bin(&bins.backend)
        .build()
        .context("bringing up the testbed")?;
    print_indented(&testbed.describe());
    check_interrupted()?;

    headline("2. Without a balancer the gateway only routes: backend b1 answers directly");
    let spread = http_requests(&testbed, testbed.backend_http(1), 10)?;
    say(&format!(
        "10 requests to {}: {spread}",
        testbed.backend_http(1)
    ));

    headline(&format!(
        "3. lb starts in the gateway namespace, serving {}",
        testbed.vip_http()
    ));
    let admin = free_local_port(testbed.gateway())?;
    let config = render_config(&testbed, admin);
    let config_path = workdir.path.join("lb.toml");
    fs::write(&config_path, &config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    say(&format!("config ({}):", config_path.display()));
    print_indented(&config);
    let mut lb = Lb::start(
        &testbed,
        &bins.lb,
        &config_path,
        &workdir.path.join("lb.log"),
        admin,
    )?;
    say(&format!(
        "lb started (pid {}), admin API on {admin} inside {}; waiting for all backends to be up...",
        lb.process.id(),
        testbed.gateway().name()
    ));
    let waited = lb.wait_health("web", &["up"; BACKENDS], HEALTH_WAIT)?;
    say(&format!("all {BACKENDS} backends up after {waited:.1?}"));

    headline(&format!(
        "4. {REQUESTS} requests to the VIP, each on a new connection"
    ));
    let spread = http_requests(&testbed, testbed.vip_http(), REQUESTS)?;
    print_spread(&testbed, &spread, REQUESTS);
    if (1..=BACKENDS).any(|i| spread.count(&testbed.backend_name(i)) == 0) {
        problems.push(format!("with all backends up, some got nothing: {spread}"));
    }
    let udp = udp_requests(&testbed, 30)?;
    say(&format!(
        "and 30 UDP datagrams to {} (new source port each): {udp}",
        testbed.vip_udp()
    ));

    headline(&format!("5. Backend {} dies", testbed.backend_name(VICTIM)));
    testbed.stop_backend(VICTIM)?;
    let detection = INTERVAL * FALL + TIMEOUT + Duration::from_secs(1);
    say(&format!(
        "killed its server; waiting {detection:.1?} (fall {FALL} x interval {INTERVAL:?} + timeout {TIMEOUT:?} + 1 s)"
    ));
    pause(detection)?;
    say(&format!("health now: {}", lb.health_line("web")));
    let spread = http_requests(&testbed, testbed.vip_http(), REQUESTS)?;
    print_spread(&testbed, &spread, REQUESTS);
    let victim = testbed.backend_name(VICTIM);
    if spread.count(&victim) == 0 {
        say(&format!("{victim} got nothing, as it should"));
    } else {
        problems.push(format!(
            "{victim} was down but still got {} requests",
            spread.count(&victim)
        ));
    }

    headline(&format!("6. Backend {victim} comes back"));
    testbed.start_backend(VICTIM)?;
    let waited = lb.wait_health("web", &["up"; BACKENDS], HEALTH_WAIT)?;
    say(&format!(
        "{victim} is up again after {waited:.1?} ({RISE} good checks)"
    ));
    let spread = http_requests(&testbed, testbed.vip_http(), REQUESTS)?;
    print_spread(&testbed, &spread, REQUESTS);
    if spread.count(&victim) == 0 {
        problems.push(format!("{victim} was back up but got no requests"));
    }

    headline("7. Some of lb's metrics (GET /metrics)");
    let metrics = lb.get("/metrics")?;
    print_indented(
        &metrics
            .lines()
            .filter(|l| l.starts_with("lb_backend_up") || l.starts_with("lb_packets_total"))
            .collect::<Vec<_>>()
            .join("\n"),
    );

    headline("8. Teardown: lb first (it detaches its program), then the testbed");
    let status = lb.stop()?;
    say(&format!("lb exited: {status}"));
    drop(testbed);
    say("namespaces deleted");
    drop(workdir);

    if !problems.is_empty() {
        bail!(
            "the demo ran, but not as it should:\n  {}",
            problems.join("\n  ")
        );
    }
    println!("\ndemo: done");
    Ok(())
}

/// Fills in [`CONFIG_TEMPLATE`] for `testbed`, with the admin API on `admin`.
fn render_config(testbed: &Testbed, admin: SocketAddr) -> String {
    let backends = |address: &dyn Fn(usize) -> SocketAddr| {
        (1..=testbed.backend_count()).fold(String::new(), |mut s, i| {
            s.push_str(&BACKEND_TEMPLATE.replace("{ADDRESS}", &address(i).to_string()));
            s
        })
    };
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    CONFIG_TEMPLATE
        .replace("{CLIENT_IF}", testbed.gateway_client_if())
        .replace("{BACKEND_IF}", testbed.gateway_backend_if())
        .replace("{ADMIN}", &admin.to_string())
        .replace("{VIP_HTTP}", &testbed.vip_http().to_string())
        .replace("{INTERVAL}", &ms(INTERVAL))
        .replace("{TIMEOUT}", &ms(TIMEOUT))
        .replace("{RISE}", &RISE.to_string())
        .replace("{FALL}", &FALL.to_string())
        .replace("{WEB_BACKENDS}", &backends(&|i| testbed.backend_http(i)))
        .replace("{VIP_UDP}", &testbed.vip_udp().to_string())
        .replace("{ECHO_BACKENDS}", &backends(&|i| testbed.backend_udp(i)))
}

/// A port free on the loopback of `ns` (where lb's admin API will listen).
fn free_local_port(ns: &Namespace) -> anyhow::Result<SocketAddr> {
    ns.enter(|| {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")
    })?
}

/// `n` HTTP requests from the client, in batches so Ctrl-C is noticed.
fn http_requests(testbed: &Testbed, addr: SocketAddr, n: usize) -> anyhow::Result<Spread> {
    let mut results = Vec::with_capacity(n);
    while results.len() < n {
        check_interrupted()?;
        let batch = BATCH.min(n - results.len());
        results.extend(testbed.client_requests(addr, batch, true));
    }
    Ok(Spread::of(&results))
}

/// `n` UDP datagrams to the echo VIP, each from a new socket (so a new flow).
fn udp_requests(testbed: &Testbed, n: usize) -> anyhow::Result<Spread> {
    let mut results = Vec::with_capacity(n);
    for k in 0..n {
        check_interrupted()?;
        let payload = format!("hello {k}");
        results.extend(testbed.client_udp(testbed.vip_udp(), &[payload.as_bytes()], 0));
    }
    Ok(Spread::of(&results))
}

// ------------------------------------------------------------------ lb process

/// `lb run` in the gateway namespace; SIGTERMed (by PID) when dropped.
struct Lb {
    process: ChildGuard,
    gateway: Namespace,
    admin: SocketAddr,
    log: PathBuf,
}

impl Lb {
    /// How long lb gets to detach and exit after SIGTERM.
    const STOP_GRACE: Duration = Duration::from_secs(5);

    fn start(
        testbed: &Testbed,
        lb_bin: &Path,
        config: &Path,
        log: &Path,
        admin: SocketAddr,
    ) -> anyhow::Result<Self> {
        let log_file =
            fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = testbed.gateway().command(lb_bin);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env("LB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            // Its own process group: Ctrl-C reaches only xtask, which then
            // stops lb in order (before the testbed goes).
            .process_group(0);
        let process = ChildGuard::spawn(cmd, format!("lb run in {}", testbed.gateway().name()))?;
        Ok(Self {
            process,
            gateway: testbed.gateway().clone(),
            admin,
            log: log.to_path_buf(),
        })
    }

    /// `GET path` on the admin API, from inside the gateway namespace.
    fn get(&self, path: &str) -> anyhow::Result<String> {
        let admin = self.admin;
        let response = self.gateway.enter(|| client::http_get(admin, path))??;
        ensure!(
            response.status == 200,
            "GET {path}: status {}",
            response.status
        );
        Ok(response.text())
    }

    fn status(&self) -> anyhow::Result<Value> {
        let body = self.get("/status")?;
        serde_json::from_str(&body).with_context(|| format!("/status is not JSON: {body}"))
    }

    /// Health of each backend of `vip`, in config order.
    fn health(&self, vip: &str) -> anyhow::Result<Vec<String>> {
        let status = self.status()?;
        health_of(&status, vip).with_context(|| format!("no vip {vip} in /status: {status}"))
    }

    /// `b1 up, b2 down, b3 up` or why not.
    fn health_line(&self, vip: &str) -> String {
        match self.health(vip) {
            Ok(health) => health
                .iter()
                .enumerate()
                .map(|(k, h)| format!("b{} {h}", k + 1))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("unknown ({e:#})"),
        }
    }

    /// Polls `/status` until `vip`'s backends have exactly `want` health.
    fn wait_health(
        &mut self,
        vip: &str,
        want: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            check_interrupted()?;
            if let Some(status) = self.process.try_wait()? {
                bail!("lb exited with {status}; its log:\n{}", self.log_tail(30));
            }
            let last = match self.health(vip) {
                Ok(health) if health == want => return Ok(start.elapsed()),
                Ok(health) => format!("{health:?}"),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() >= timeout {
                bail!(
                    "vip {vip}: backends not {want:?} within {timeout:?} (last: {last}); lb's log:\n{}",
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines lb logged.
    fn log_tail(&self, n: usize) -> String {
        match fs::read_to_string(&self.log) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("(no log: {e})"),
        }
    }

    fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.process.terminate(Self::STOP_GRACE)
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("demo: warning: stopping lb: {e:#}");
        }
    }
}

/// `vips[name == vip].backends[].health` from `/status`.
fn health_of(status: &Value, vip: &str) -> Option<Vec<String>> {
    let vip = status["vips"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == vip)?;
    vip["backends"]
        .as_array()?
        .iter()
        .map(|b| b["health"].as_str().map(str::to_owned))
        .collect()
}

// ------------------------------------------------------------------ output

fn headline(text: &str) {
    println!("\n== {text}");
}

fn say(text: &str) {
    println!("   {text}");
}

fn print_indented(text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            println!();
        } else {
            println!("     {line}");
        }
    }
}

/// A table of answers per backend with proportional bars.
fn print_spread(testbed: &Testbed, spread: &Spread, sent: usize) {
    print!("{}", spread_table(testbed, spread, sent));
}

fn spread_table(testbed: &Testbed, spread: &Spread, sent: usize) -> String {
    let names: Vec<String> = (1..=testbed.backend_count())
        .map(|i| testbed.backend_name(i))
        .collect();
    format_spread(&names, spread, sent)
}

/// The table for backends `names` (in order), out of `sent` requests.
fn format_spread(names: &[String], spread: &Spread, sent: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "     {:<8} {:>7} {:>5}", "backend", "answers", "share");
    for name in names {
        let count = spread.count(name);
        let share = (count * 100).checked_div(sent).unwrap_or(0);
        let bar = (count * BAR_WIDTH).checked_div(sent).unwrap_or(0);
        let _ = writeln!(
            out,
            "     {name:<8} {count:>7} {share:>4}%  {}",
            "█".repeat(bar)
        );
    }
    if spread.errors > 0 {
        let _ = writeln!(
            out,
            "     {:<8} {:>7}        (first: {})",
            "errors",
            spread.errors,
            spread.first_error.as_deref().unwrap_or("?")
        );
    }
    out
}

// ------------------------------------------------------------------ signals

extern "C" fn on_signal(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // Back to the default action: a second Ctrl-C ends the process at once.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(signal, libc::SIG_DFL) };
}

/// Makes SIGINT and SIGTERM set [`INTERRUPTED`] instead of killing us.
fn install_signal_handlers() -> anyhow::Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic and calls signal(2).
        let previous = unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, waking every 50 ms to notice Ctrl-C.
fn pause(d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        check_interrupted()?;
        thread::sleep(
            Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ files

/// A private temporary directory for the config and lb's log; removed on drop.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("lb-demo-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_table_has_a_row_per_backend_and_bars() {
        let results = vec![
            Ok("b1".to_owned()),
            Ok("b1".to_owned()),
            Ok("b3".to_owned()),
            Ok("b3".to_owned()),
        ];
        let spread = Spread::of(&results);
        let names: Vec<String> = ["b1", "b2", "b3"].iter().map(|s| (*s).to_owned()).collect();
        let table = format_spread(&names, &spread, 4);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 4);
        assert!(rows[1].contains("b1") && rows[1].contains("50%"));
        assert!(rows[2].contains("b2") && rows[2].contains("0%") && !rows[2].contains('█'));
        assert_eq!(rows[3].matches('█').count(), BAR_WIDTH / 2);
    }

    #[test]
    fn template_placeholders_are_all_known() {
        let known = [
            "{CLIENT_IF}",
            "{BACKEND_IF}",
            "{ADMIN}",
            "{VIP_HTTP}",
            "{INTERVAL}",
            "{TIMEOUT}",
            "{RISE}",
            "{FALL}",
            "{WEB_BACKENDS}",
            "{VIP_UDP}",
            "{ECHO_BACKENDS}",
        ];
        let mut rest = CONFIG_TEMPLATE.to_owned();
        for k in known {
            assert!(rest.contains(k), "{k} unused");
            rest = rest.replace(k, "");
        }
        assert!(!rest.contains('{'), "unknown placeholder left in:\n{rest}");
    }

    #[test]
    fn health_is_read_from_status_json() {
        let status: Value = serde_json::from_str(
            r#"{"vips":[{"name":"web","backends":[{"health":"up"},{"health":"down"}]}],"verdicts":[]}"#,
        )
        .expect("json");
        assert_eq!(
            health_of(&status, "web"),
            Some(vec!["up".to_owned(), "down".to_owned()])
        );
        assert_eq!(health_of(&status, "echo"), None);
    }
}

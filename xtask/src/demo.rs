//! `cargo xtask demo`: the balancer at work, told as a short story.
//!
//! A namespace testbed (client, gateway, 3 backends; see `lb_tests::testbed`)
//! comes up; `lb run` starts in the gateway namespace with the config the
//! end-to-end tests use (`lb_tests::agent::config_for`); 300 new connections
//! spread over the backends; backend 2 dies and gets no more; it comes back
//! and gets its share again; a few metrics; teardown.
//!
//! Nothing may be left behind on any exit path, Ctrl-C included: SIGINT and
//! SIGTERM only set a flag, which the demo checks between steps, so it
//! returns with an error and the guards drop in order (lb first, then the
//! testbed). A second Ctrl-C kills at once; the testbed's watchdog process
//! still deletes its namespaces then.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::{
    Spread, Testbed,
    agent::{self, Agent, HealthCheck},
};

use crate::{
    build::{self, Profile},
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
/// Slack on top of the health checks' detection bound before the demo
/// counts on the dead backend getting nothing.
const DETECTION_SLACK: Duration = Duration::from_secs(1);
/// Bound on all backends being reported up after lb starts (and on recovery).
const HEALTH_WAIT: Duration = Duration::from_secs(15);
/// Width of the longest bar in a spread table.
const BAR_WIDTH: usize = 40;
/// Metrics shown in step 7 (name prefixes).
const SHOWN_METRICS: [&str; 2] = ["lb_backend_serving", "lb_backend_packets_total"];

/// Set by SIGINT/SIGTERM; checked between steps.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The `demo` subcommand.
pub fn run() -> anyhow::Result<()> {
    if !lb_tests::is_root() {
        bail!("cargo xtask demo needs root (network namespaces, XDP): rerun as root, e.g. `sudo -E cargo xtask demo`");
    }
    setup::ensure(true)?;
    let bins = build::build(Profile::Debug)?;
    // `Agent::start` runs `lb_tests::lb_bin()`: LB_BIN if set (as for the
    // tests, e.g. a release build), otherwise the lb just built.
    match std::env::var_os(lb_tests::LB_BIN_ENV) {
        Some(lb) => {
            println!("demo: using {}={} instead of the lb just built", lb_tests::LB_BIN_ENV, Path::new(&lb).display())
        }
        // SAFETY: xtask has started no threads, so nothing reads the
        // environment concurrently.
        None => unsafe { std::env::set_var(lb_tests::LB_BIN_ENV, &bins.lb) },
    }
    install_signal_handlers()?;
    let result = story(&bins.backend);
    if INTERRUPTED.load(Ordering::SeqCst) {
        println!("\ndemo: interrupted; everything it started has been stopped and removed");
    }
    result
}

/// The demo proper, with `backend_bin` as the testbed's servers. Declaration
/// order is drop order reversed: the testbed outlives lb.
fn story(backend_bin: &Path) -> anyhow::Result<()> {
    let check = HealthCheck::default();
    let mut problems = Vec::new();

    headline("1. A testbed: a client, a gateway and 3 backends, each in its own network namespace");
    let testbed =
        Testbed::builder().backends(BACKENDS).backend_bin(backend_bin).build().context("bringing up the testbed")?;
    print_indented(&testbed.describe());
    check_interrupted()?;

    headline("2. Without a balancer the gateway only routes: backend b1 answers directly");
    let spread = http_requests(&testbed, testbed.backend_http(1), 10)?;
    say(&format!("10 requests to {}: {spread}", testbed.backend_http(1)));

    headline(&format!("3. lb starts in the gateway namespace, serving {}", testbed.vip_http()));
    let config = agent::config_for(&testbed, check);
    say("config:");
    print_indented(&config);
    // Its own process group: Ctrl-C reaches only xtask, which then stops lb
    // in order (before the testbed goes).
    let mut lb = Agent::start_with(&testbed, &config, |cmd| {
        cmd.process_group(0);
    })?;
    say(&format!(
        "lb started (pid {}, config {}), admin API on {} inside {}; waiting for all backends to be up...",
        lb.pid(),
        lb.config_path().display(),
        agent::ADMIN,
        testbed.gateway().name()
    ));
    let waited = wait_all_up(&mut lb)?;
    say(&format!("all {BACKENDS} backends up after {waited:.1?}"));

    headline(&format!("4. {REQUESTS} requests to the VIP, each on a new connection"));
    let spread = http_requests(&testbed, testbed.vip_http(), REQUESTS)?;
    print_spread(&testbed, &spread, REQUESTS);
    if (1..=BACKENDS).any(|i| spread.count(&testbed.backend_name(i)) == 0) {
        problems.push(format!("with all backends up, some got nothing: {spread}"));
    }
    let udp = udp_requests(&testbed, 30)?;
    say(&format!("and 30 UDP datagrams to {} (new source port each): {udp}", testbed.vip_udp()));

    headline(&format!("5. Backend {} dies", testbed.backend_name(VICTIM)));
    testbed.stop_backend(VICTIM)?;
    let detection = check.detection_bound() + DETECTION_SLACK;
    say(&format!(
        "killed its server; waiting {detection:.1?} (fall {} x interval {:?} + timeout {:?} + {DETECTION_SLACK:?})",
        check.fall, check.interval, check.timeout
    ));
    pause(detection)?;
    say(&format!("health now: {}", health_line(&lb, "web")));
    let spread = http_requests(&testbed, testbed.vip_http(), REQUESTS)?;
    print_spread(&testbed, &spread, REQUESTS);
    let victim = testbed.backend_name(VICTIM);
    if spread.count(&victim) == 0 {
        say(&format!("{victim} got nothing, as it should"));
    } else {
        problems.push(format!("{victim} was down but still got {} requests", spread.count(&victim)));
    }

    headline(&format!("6. Backend {victim} comes back"));
    testbed.start_backend(VICTIM)?;
    let waited = wait_all_up(&mut lb)?;
    say(&format!("{victim} is up again after {waited:.1?} ({} good checks)", check.rise));
    let spread = http_requests(&testbed, testbed.vip_http(), REQUESTS)?;
    print_spread(&testbed, &spread, REQUESTS);
    if spread.count(&victim) == 0 {
        problems.push(format!("{victim} was back up but got no requests"));
    }

    headline("7. Some of lb's metrics (GET /metrics)");
    print_indented(&shown_metrics(&lb.metrics()?));

    headline("8. Teardown: lb first (it detaches its program), then the testbed");
    let status = lb.terminate()?;
    say(&format!("lb exited: {status}"));
    drop(lb);
    drop(testbed);
    say("namespaces deleted");

    if !problems.is_empty() {
        bail!("the demo ran, but not as it should:\n  {}", problems.join("\n  "));
    }
    println!("\ndemo: done");
    Ok(())
}

/// Waits (noticing Ctrl-C) until lb reports every backend of the web VIP up.
fn wait_all_up(lb: &mut Agent) -> anyhow::Result<Duration> {
    lb.wait_health_while("web", &["up"; BACKENDS], HEALTH_WAIT, check_interrupted)
}

/// `b1 up, b2 down, b3 up` or why not.
fn health_line(lb: &Agent, vip: &str) -> String {
    match lb.backend_health(vip) {
        Ok(health) => health.iter().enumerate().map(|(k, h)| format!("b{} {h}", k + 1)).collect::<Vec<_>>().join(", "),
        Err(e) => format!("unknown ({e:#})"),
    }
}

/// The lines of Prometheus text `metrics` for [`SHOWN_METRICS`], sorted.
fn shown_metrics(metrics: &str) -> String {
    let mut lines: Vec<&str> = metrics.lines().filter(|l| SHOWN_METRICS.iter().any(|m| l.starts_with(m))).collect();
    lines.sort_unstable();
    lines.join("\n")
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
    let names: Vec<String> = (1..=testbed.backend_count()).map(|i| testbed.backend_name(i)).collect();
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
        let _ = writeln!(out, "     {name:<8} {count:>7} {share:>4}%  {}", "█".repeat(bar));
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
        thread::sleep(Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_table_has_a_row_per_backend_and_bars() {
        let results = vec![Ok("b1".to_owned()), Ok("b1".to_owned()), Ok("b3".to_owned()), Ok("b3".to_owned())];
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
    fn shown_metrics_are_filtered_and_sorted() {
        let metrics = "# HELP lb_backend_packets_total packets\n\
            lb_backend_packets_total{vip=\"web\",backend=\"b2\",direction=\"in\"} 5\n\
            lb_other 1\n\
            lb_backend_serving{vip=\"web\",backend=\"b2\"} 0\n\
            lb_backend_serving{vip=\"web\",backend=\"b1\"} 1\n\
            lb_backend_packets_total{vip=\"web\",backend=\"b1\",direction=\"in\"} 7\n";
        assert_eq!(
            shown_metrics(metrics),
            "lb_backend_packets_total{vip=\"web\",backend=\"b1\",direction=\"in\"} 7\n\
             lb_backend_packets_total{vip=\"web\",backend=\"b2\",direction=\"in\"} 5\n\
             lb_backend_serving{vip=\"web\",backend=\"b1\"} 1\n\
             lb_backend_serving{vip=\"web\",backend=\"b2\"} 0"
        );
    }
}

//! `failover`: how long new connections fail after a backend dies, against
//! the configured bound (fall × interval + timeout), and how long a returned
//! backend waits for its first new connection.
//!
//! A prober in the client namespace opens a new connection to the VIP every
//! [`SPACING`] (open loop: a hanging attempt does not delay the next one),
//! sends `GET /` and records when it started and which backend answered or
//! how it failed. Meanwhile backend b2 dies and comes back, twice over:
//! - *killed*: its server gets SIGKILL (its kernel then refuses new
//!   connections with a reset at once) and is started again;
//! - *link down*: its switch port goes down, like a pulled cable (SYNs to it
//!   vanish; the attempt fails when [`ATTEMPT_TIMEOUT`] passes, before TCP's
//!   first SYN retransmission at 1 s could reach a new backend), and up again.
//!
//! Death to the last failed new connection = the start of the last failed
//! attempt minus the moment of death; return to the first new connection =
//! the start of the first attempt b2 answered minus the moment it was back.
//! The prober's resolution is its spacing times the number of backends
//! (one attempt in three goes to b2).

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
};

use super::{
    Report,
    harness::{self, table},
    loadgen::{self, Attempt, Paced},
};

const BACKENDS: usize = 3;
/// The backend that dies.
const VICTIM: usize = 2;
/// Time between two new connections of the prober.
const SPACING: Duration = Duration::from_millis(5);
/// An attempt not answered within this failed (under TCP's 1 s initial RTO).
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(900);
/// Probing before the death, so the start is steady.
const LEAD_IN: Duration = Duration::from_millis(500);
/// Probing after the bound has passed (after death) or after b2's first answer (after return).
const SETTLE: Duration = Duration::from_millis(700);
/// The health checks configured for the run.
const CHECK: HealthCheck =
    HealthCheck { interval: Duration::from_millis(500), timeout: Duration::from_millis(300), rise: 2, fall: 2 };

/// How the backend dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    Killed,
    LinkDown,
}

impl Death {
    fn name(self) -> &'static str {
        match self {
            Death::Killed => "server killed",
            Death::LinkDown => "link down",
        }
    }
}

/// One death and return.
#[derive(Debug, Clone)]
struct Episode {
    death: Death,
    /// Until `/status` showed the victim down, and back up.
    agent_down: Duration,
    agent_up: Duration,
    /// Death to the start of the last failed attempt (None: nothing failed).
    last_failure: Option<Duration>,
    failures: usize,
    attempts: usize,
    /// Failed attempts before the death or after the bound: should be none.
    stray_failures: usize,
    /// Return to the start of the first attempt the victim answered.
    first_answer: Option<Duration>,
}

/// The `failover` section.
pub fn run(quick: bool) -> anyhow::Result<Report> {
    let repeats = if quick { 1 } else { 3 };
    let testbed = harness::testbed(BACKENDS)?;
    let mut lb = Agent::start(&testbed, &agent::config_for(&testbed, CHECK))?;
    lb.wait_health("web", &["up"; BACKENDS], Duration::from_secs(15))?;
    let mut episodes = Vec::new();
    for death in [Death::Killed, Death::LinkDown] {
        for k in 0..repeats {
            println!("bench failover: {} {}/{repeats}", death.name(), k + 1);
            let episode = episode(&testbed, &mut lb, death)
                .with_context(|| format!("failover: {}, repeat {}", death.name(), k + 1))?;
            println!(
                "  last failure {:?} after death ({} of {} attempts failed), first answer {:?} after return",
                episode.last_failure, episode.failures, episode.attempts, episode.first_answer
            );
            episodes.push(episode);
        }
    }
    Ok(Report { title: "Failover".to_owned(), body: body(repeats, &episodes) })
}

/// Probes while the victim dies and returns, then reads the attempts.
fn episode(testbed: &Testbed, lb: &mut Agent, death: Death) -> anyhow::Result<Episode> {
    let paced = Paced {
        target: testbed.vip_http(),
        spacing: SPACING,
        max_duration: Duration::from_secs(60),
        io_timeout: ATTEMPT_TIMEOUT,
    };
    let stop = AtomicBool::new(false);
    let up = ["up"; BACKENDS];
    let mut down = up;
    down[VICTIM - 1] = "down";
    let health_wait = (CHECK.detection_bound() + CHECK.recovery_bound()) * 3;
    thread::scope(|s| {
        let prober = s.spawn(|| loadgen::paced(testbed.client(), &paced, &stop));
        let timeline = (|| -> anyhow::Result<_> {
            thread::sleep(LEAD_IN);
            let died = Instant::now();
            kill(testbed, death)?;
            let agent_down = lb.wait_health("web", &down, health_wait)?;
            sleep_until(died + CHECK.detection_bound() + SETTLE);
            revive(testbed, death)?;
            let returned = Instant::now();
            let agent_up = lb.wait_health("web", &up, health_wait)?;
            thread::sleep(SETTLE);
            Ok((died, agent_down, returned, agent_up))
        })();
        stop.store(true, Ordering::Relaxed);
        let attempts = prober.join().map_err(|_| anyhow::anyhow!("the prober panicked"))??;
        // Whatever happened, the victim must be back for the next episode.
        if timeline.is_err() {
            let _ = revive(testbed, death);
        }
        let (died, agent_down, returned, agent_up) = timeline?;
        Ok(analyse(death, &attempts, died, returned, agent_down, agent_up, &testbed.backend_name(VICTIM)))
    })
}

fn analyse(
    death: Death,
    attempts: &[Attempt],
    died: Instant,
    returned: Instant,
    agent_down: Duration,
    agent_up: Duration,
    victim: &str,
) -> Episode {
    let bound_end = died + CHECK.detection_bound() + SETTLE;
    let failed_after_death: Vec<&Attempt> =
        attempts.iter().filter(|a| a.outcome.is_err() && a.start >= died && a.start < bound_end).collect();
    let stray_failures = attempts.iter().filter(|a| a.outcome.is_err()).count() - failed_after_death.len();
    let first_answer = attempts
        .iter()
        .filter(|a| a.start >= returned)
        .find(|a| a.outcome.as_deref() == Ok(victim))
        .map(|a| a.start - returned);
    Episode {
        death,
        agent_down,
        agent_up,
        last_failure: failed_after_death.iter().map(|a| a.start - died).max(),
        failures: failed_after_death.len(),
        attempts: attempts.len(),
        stray_failures,
        first_answer,
    }
}

fn kill(testbed: &Testbed, death: Death) -> anyhow::Result<()> {
    match death {
        Death::Killed => testbed.stop_backend(VICTIM),
        Death::LinkDown => set_link(testbed, "down"),
    }
}

fn revive(testbed: &Testbed, death: Death) -> anyhow::Result<()> {
    match death {
        Death::Killed => testbed.start_backend(VICTIM),
        Death::LinkDown => set_link(testbed, "up"),
    }
}

/// The victim's switch port down or up: its own veth keeps its addresses
/// and routes (only the carrier goes), as with a pulled cable.
fn set_link(testbed: &Testbed, state: &str) -> anyhow::Result<()> {
    testbed.switch().exec_ok(&["ip", "link", "set", "dev", testbed.switch_port(VICTIM), state])?;
    Ok(())
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

// ------------------------------------------------------------------ report

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "none".to_owned(), |d| format!("{}", d.as_millis()))
}

fn body(repeats: usize, episodes: &[Episode]) -> String {
    let bound = CHECK.detection_bound();
    let recovery = CHECK.recovery_bound();
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", harness::command_line());
    let _ = writeln!(
        out,
        "lb with HTTP health checks every {} ms, timeout {} ms, fall {}, rise {}: bound on failed new connections after a death \
         fall × interval + timeout = {} ms; after a return, rise × interval + timeout = {} ms. Backend b{VICTIM} of {BACKENDS} dies \
         {repeats} time(s) each way while a prober in the client namespace opens a new connection to the VIP every {} ms \
         (`xtask/src/bench/loadgen.rs`, `paced`), each allowed {} ms. Times are from the death (kill or link down) and from the return \
         (server listening again, or link up).\n",
        CHECK.interval.as_millis(),
        CHECK.timeout.as_millis(),
        CHECK.fall,
        CHECK.rise,
        bound.as_millis(),
        recovery.as_millis(),
        SPACING.as_millis(),
        ATTEMPT_TIMEOUT.as_millis(),
    );
    let header = [
        "death",
        "agent saw it down, ms",
        "last failed new connection, ms",
        "within the bound",
        "failed / attempts",
        "failures outside the window",
        "agent saw it up, ms",
        "first new connection to it, ms",
        "within the bound",
    ];
    let rows: Vec<Vec<String>> = episodes
        .iter()
        .map(|e| {
            let within = |d: Option<Duration>, b: Duration| match d {
                Some(d) if d <= b => format!("yes ({} ≤ {})", d.as_millis(), b.as_millis()),
                Some(d) => format!("no ({} > {})", d.as_millis(), b.as_millis()),
                None => "–".to_owned(),
            };
            vec![
                e.death.name().to_owned(),
                e.agent_down.as_millis().to_string(),
                ms(e.last_failure),
                within(e.last_failure, bound),
                format!("{} / {}", e.failures, e.attempts),
                e.stray_failures.to_string(),
                e.agent_up.as_millis().to_string(),
                ms(e.first_answer),
                within(e.first_answer, recovery),
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows));
    let _ = write!(
        out,
        "
How to read it:
- Killed: b{VICTIM}'s kernel resets new connections at once, so attempts fail within milliseconds; the agent's probes fail the same way and \
the backend goes down after {fall} failed probes, {lo_n} to {fall} intervals after the death depending on where in the interval it died. \
Link down: nothing answers, so a probe fails only at its timeout, and the bound's timeout term is what covers that.
- Resolution: one attempt in {BACKENDS} lands on b{VICTIM}, so a last failure is known to about {BACKENDS} × {sp} ms; the agent's \
status is polled every 50 ms.
- *Failures outside the window* counts failed attempts before the death or later than the bound plus {settle} ms of margin: the \
other backends' health shows there.
- On a loaded 2-core machine probes and the prober can be late by a scheduling delay: the times are noisy by tens of milliseconds; \
on separate hosts they would shift by the network's round trip, not by the bound.
",
        fall = CHECK.fall,
        lo_n = CHECK.fall - 1,
        sp = SPACING.as_millis(),
        settle = SETTLE.as_millis(),
    );
    out
}

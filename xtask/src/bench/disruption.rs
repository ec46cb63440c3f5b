//! `disruption`: what one backend's death does to the other flows, with
//! [`BACKENDS`] backends behind lb.
//!
//! New flows: the client connects to the VIP from each of [`Plan::ports`]
//! fixed source ports in turn (`GET /`, then a reset so no TIME_WAIT holds
//! the port) and notes which backend answered; the 5-tuple is all Maglev
//! hashes, so this maps flows to backends. The map is taken twice with every
//! backend up (it must not change: that checks the method), once with one
//! backend down, and once after it returned. Maglev's promise: only the
//! flows of the dead backend move (1/N of them), and they move back when it
//! returns.
//!
//! Established flows: [`Plan::held`] kept-alive connections are opened and
//! each answers one request; the backend dies; once the agent shows it down,
//! every connection sends one more request. The connection table keeps the
//! flows of the healthy backends where they are (goal: none breaks); those of
//! the dead one break, as they must.

use std::{fmt::Write as _, net::SocketAddr, thread, time::Duration};

use anyhow::{Context as _, ensure};
use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
    testbed::{CLIENT_ADDR, client::HttpConn},
};

use super::{
    Report,
    harness::{self, table},
    loadgen,
};

/// Backends behind the VIP.
const BACKENDS: usize = 10;
/// First of the fixed source ports (below the client's ephemeral range).
const FIRST_PORT: u16 = 20000;
/// Threads mapping ports, each a share of them.
const MAP_THREADS: usize = 4;
/// Connect and I/O timeout of one mapping connection.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on the agent noticing a death or a return.
const HEALTH_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
struct Plan {
    ports: u16,
    held: usize,
    victims: Vec<usize>,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan { ports: 500, held: 200, victims: vec![5] }
        } else {
            Plan { ports: 3000, held: 1000, victims: vec![2, 5, 9] }
        }
    }
}

/// Which backend each source port's flow went to (None: the attempt failed).
type FlowMap = Vec<Option<String>>;

/// One victim's results.
#[derive(Debug, Clone)]
struct Outcome {
    victim: String,
    flows: usize,
    unstable: usize,
    on_victim: usize,
    changed: usize,
    moved_off_healthy: usize,
    changed_after_return: usize,
    map_errors: usize,
    held_healthy: usize,
    broken_healthy: usize,
    held_victim: usize,
    broken_victim: usize,
}

/// The `disruption` section.
pub fn run(quick: bool) -> anyhow::Result<Report> {
    let plan = Plan::new(quick);
    let testbed = harness::testbed(BACKENDS)?;
    let mut lb = Agent::start(&testbed, &agent::config_for(&testbed, HealthCheck::default()))?;
    lb.wait_health("web", &["up"; BACKENDS], HEALTH_WAIT)?;
    let mut outcomes = Vec::new();
    for &victim in &plan.victims {
        println!("bench disruption: backend b{victim} of {BACKENDS} dies");
        let outcome =
            with_victim(&testbed, &mut lb, victim, &plan).with_context(|| format!("disruption: victim b{victim}"))?;
        println!(
            "  {} of {} flows changed ({} were on b{victim}), {} of {} held connections on healthy backends broke",
            outcome.changed, outcome.flows, outcome.on_victim, outcome.broken_healthy, outcome.held_healthy
        );
        outcomes.push(outcome);
    }
    Ok(Report { title: "Disruption".to_owned(), body: body(&plan, &outcomes) })
}

fn with_victim(testbed: &Testbed, lb: &mut Agent, victim: usize, plan: &Plan) -> anyhow::Result<Outcome> {
    let name = testbed.backend_name(victim);
    let up = vec!["up"; BACKENDS];
    let mut down = up.clone();
    down[victim - 1] = "down";

    let before = map_flows(testbed, plan.ports)?;
    let again = map_flows(testbed, plan.ports)?;
    let mut held = hold_connections(testbed, plan.held)?;

    testbed.stop_backend(victim)?;
    let died = (|| {
        lb.wait_health("web", &down, HEALTH_WAIT)?;
        let still = request_again(&mut held);
        let after = map_flows(testbed, plan.ports)?;
        anyhow::Ok((still, after))
    })();
    // The victim comes back whatever happened, for the next one.
    testbed.start_backend(victim)?;
    let (still, after) = died?;
    lb.wait_health("web", &up, HEALTH_WAIT)?;
    let returned = map_flows(testbed, plan.ports)?;

    let on = |b: &Option<String>| b.as_deref() == Some(name.as_str());
    let compared =
        |a: &FlowMap, b: &FlowMap| a.iter().zip(b).filter(|(x, y)| x.is_some() && y.is_some() && x != y).count();
    let both_known: Vec<(&Option<String>, &Option<String>)> =
        before.iter().zip(&after).filter(|(x, y)| x.is_some() && y.is_some()).collect();
    let (victim_held, healthy_held): (Vec<_>, Vec<_>) = still.iter().partition(|(first, _)| *first == name);
    Ok(Outcome {
        victim: name.clone(),
        flows: both_known.len(),
        unstable: compared(&before, &again),
        on_victim: both_known.iter().filter(|(x, _)| on(x)).count(),
        changed: both_known.iter().filter(|(x, y)| x != y).count(),
        moved_off_healthy: both_known.iter().filter(|(x, y)| !on(x) && x != y).count(),
        changed_after_return: compared(&before, &returned),
        map_errors: [&before, &again, &after, &returned].iter().map(|m| m.iter().filter(|b| b.is_none()).count()).sum(),
        held_healthy: healthy_held.len(),
        broken_healthy: healthy_held.iter().filter(|(first, now)| now.as_deref() != Some(first.as_str())).count(),
        held_victim: victim_held.len(),
        broken_victim: victim_held.iter().filter(|(first, now)| now.as_deref() != Some(first.as_str())).count(),
    })
}

/// The backend of a flow from each source port `FIRST_PORT..FIRST_PORT+ports`.
fn map_flows(testbed: &Testbed, ports: u16) -> anyhow::Result<FlowMap> {
    let vip = testbed.vip_http();
    let all: Vec<u16> = (FIRST_PORT..FIRST_PORT + ports).collect();
    let chunk = all.len().div_ceil(MAP_THREADS);
    let parts: Vec<anyhow::Result<FlowMap>> = thread::scope(|s| {
        let workers: Vec<_> = all
            .chunks(chunk)
            .map(|ports| {
                s.spawn(move || testbed.client().enter(|| ports.iter().map(|&p| flow_backend(p, vip)).collect()))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a mapping thread panicked"))))
            .collect()
    });
    let mut map = FlowMap::with_capacity(all.len());
    for part in parts {
        map.extend(part?);
    }
    Ok(map)
}

/// One new connection from `port` to `vip`: the backend that answered.
fn flow_backend(port: u16, vip: SocketAddr) -> Option<String> {
    let mut stream = loadgen::connect_from(SocketAddr::from((CLIENT_ADDR, port)), vip, IO_TIMEOUT).ok()?;
    let backend = loadgen::get_backend(&mut stream, vip).ok();
    loadgen::close_with_reset(stream);
    backend
}

/// `n` kept-alive connections to the VIP, each with the backend that
/// answered its first request.
fn hold_connections(testbed: &Testbed, n: usize) -> anyhow::Result<Vec<(HttpConn, String)>> {
    let vip = testbed.vip_http();
    let held: Vec<(HttpConn, String)> = testbed.client().enter(|| {
        (0..n)
            .map(|_| {
                let mut conn = HttpConn::connect(vip).context("connecting to the VIP")?;
                let first = conn.get("/", true)?.backend().context("an answer without a backend name")?;
                anyhow::Ok((conn, first))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })??;
    ensure!(held.len() == n, "opened {} of {n} connections", held.len());
    Ok(held)
}

/// One more request on each held connection: (first backend, who answered now).
fn request_again(held: &mut [(HttpConn, String)]) -> Vec<(String, Option<String>)> {
    held.iter_mut().map(|(conn, first)| (first.clone(), conn.get("/", true).ok().and_then(|r| r.backend()))).collect()
}

// ------------------------------------------------------------------ report

fn pct(part: usize, whole: usize) -> String {
    if whole == 0 { "–".to_owned() } else { format!("{:.1}%", 100.0 * part as f64 / whole as f64) }
}

fn body(plan: &Plan, outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", harness::command_line());
    let _ = writeln!(
        out,
        "lb, Maglev (ring size 65537), {BACKENDS} backends of weight 1; each victim's server is killed and restarted once. \
         Ideal share of new flows that change: 1/N = {}.\n",
        pct(1, BACKENDS)
    );
    let _ = writeln!(out, "### New flows: {} source ports mapped to backends\n", plan.ports);
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            vec![
                o.victim.clone(),
                o.flows.to_string(),
                format!("{} ({})", o.changed, pct(o.changed, o.flows)),
                format!("{} ({})", o.on_victim, pct(o.on_victim, o.flows)),
                format!("{} ({})", o.moved_off_healthy, pct(o.moved_off_healthy, o.flows)),
                o.changed_after_return.to_string(),
                o.unstable.to_string(),
                o.map_errors.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "victim",
            "flows",
            "changed backend when it died",
            "were on the victim",
            "moved off a healthy backend",
            "differ from before once it returned",
            "differ between two maps, all up",
            "failed attempts (4 maps)",
        ],
        &rows,
    ));
    let _ =
        writeln!(out, "\n### Established connections: {} kept-alive connections held across the death\n", plan.held);
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            vec![
                o.victim.clone(),
                format!("{} of {} ({})", o.broken_healthy, o.held_healthy, pct(o.broken_healthy, o.held_healthy)),
                format!("{} of {} ({})", o.broken_victim, o.held_victim, pct(o.broken_victim, o.held_victim)),
            ]
        })
        .collect();
    out.push_str(&table(&["victim", "broken, on healthy backends", "broken, on the victim"], &rows));
    out.push_str(
        "
How to read it:
- *changed backend when it died* is the disruption; the flows that *were on the victim* had to move, so the share above 1/N \
is what Maglev moved needlessly (*moved off a healthy backend*). Maglev's table for the same set of backends is the same, so after the \
return the flows go back (*differ from before*).
- *differ between two maps, all up* checks the method: the same source port must reach the same backend while nothing changes.
- A held connection counts as broken when its request after the death failed or was answered by another backend. The victim's \
connections break with its server (its kernel closes them).
- These are counts, not timings: they do not depend on the machine's speed; only a connection or request timing out on a loaded \
machine would show as a failed attempt.
",
    );
    out
}

//! `hostile`: what floods cost the gateway, and what they leave working
//! (issue 12).
//!
//! - Per packet (BPF_PROG_TEST_RUN, `lb-bench packet --hostile`, the packet
//!   section's method): a flood SYN (a new source every iteration) to a
//!   plain TCP VIP, which is `tcp_syn_untracked`, and to a VIP with
//!   per-client limits that never refuse (`tcp_syn_limited`: for IPv6,
//!   whose source address changes every iteration, each SYN also creates
//!   its client's bucket); then one source's SYN over and over to each
//!   (the bucket warm). The differences are the
//!   limiter's cost; one core's SYN budget is 1 s over the cost.
//! - In the testbed (release `lb`, 3 backends, a 65,536-entry table, the
//!   floods test's setup): three floods of [`FLOOD`] each, as fast as the
//!   testbed generates them (hping3 × 4 at nice 19; our own raw-socket spray
//!   from a whole /16; spoofed SYN-then-ACK pairs), against 10 kept-alive
//!   connections asking every 100 ms and a new connection every 50 ms.
//!   Reported: the rate reached, connections broken or failed, the slowest
//!   answer, and the table over time (inserts since the start, live, and
//!   entries as the agent last counted them, at most 5 s old).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    ScratchNamespace, Testbed,
    agent::{self, Agent, HealthCheck},
    flood::{self, KeptAlive, Prober, Spray, tcp_flags},
    testbed::{self, ChildGuard},
};
use serde_json::Value;

use super::{
    Options, Report,
    harness::{self, table},
    lb_bench::{self, number, of_kind},
    spread::{Spread, thousands},
};

/// Iterations per test run and runs per case (`--quick`: fewer).
const REPEAT: u32 = 1_000_000;
const RUNS: u32 = 5;
const QUICK_REPEAT: u32 = 100_000;
const QUICK_RUNS: u32 = 3;
/// Bound on the `lb-bench` run (about a minute).
const TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long each flood runs (`--quick`: half), and how long the table is
/// watched after it.
const FLOOD: Duration = Duration::from_secs(8);
const AFTER: Duration = Duration::from_secs(6);
/// The connection table of the flood runs: small, so a flood that inserted
/// would fill it within seconds.
const TABLE: u32 = 65_536;

/// The per-packet cases, in table order: (case, what it is).
const CASES: [(&str, &str); 4] = [
    ("tcp_syn_untracked", "flood SYN (a new 5-tuple each), plain VIP"),
    ("tcp_syn_limited", "flood SYN (a new 5-tuple each), limited VIP"),
    ("tcp_syn_same_tuple", "one source's SYN again, plain VIP"),
    ("tcp_syn_limited_same_tuple", "one source's SYN again, limited VIP: its bucket warm"),
];

/// The `hostile` section.
///
/// # Errors
/// When building or running `lb-bench`, the testbed or the agent fails.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let mut body = String::new();
    let quick = if opts.quick { " --quick" } else { "" };
    let _ = writeln!(body, "`cargo xtask bench --only hostile{quick}`\n");
    if opts.quick {
        let _ = writeln!(body, "**Quick run: for trying the harness, not for figures.**\n");
    }
    per_packet(&mut body, opts).context("the per-packet cases")?;
    floods(&mut body, opts).context("the floods")?;
    Ok(Report { title: "Hostile traffic".to_owned(), body })
}

// ------------------------------------------------------------ per packet

fn per_packet(out: &mut String, opts: &Options) -> anyhow::Result<()> {
    let tools = lb_bench::build()?;
    let (repeat, runs) = if opts.quick { (QUICK_REPEAT, QUICK_RUNS) } else { (REPEAT, RUNS) };
    let scratch = ScratchNamespace::create("hostile").context("creating the benchmark's namespace")?;
    let mut cmd = scratch.namespace().command(&tools.lb_bench);
    cmd.args(["packet", "--hostile", "--repeat", &repeat.to_string(), "--runs", &runs.to_string()]);
    let load_before = lb_bench::load_average();
    let lines = lb_bench::run(cmd, TIMEOUT)?;
    let load_after = lb_bench::load_average();
    drop(scratch);
    let costs = costs(&lines)?;
    let spread = |case: &str, family: &str| {
        costs
            .get(&(case.to_owned(), family.to_owned()))
            .and_then(|v| Spread::of(v.iter().copied()))
            .with_context(|| format!("no samples of {family} {case}"))
    };
    let _ = writeln!(
        out,
        "### Per packet\n\nNanoseconds per packet (BPF_PROG_TEST_RUN, {} iterations a run, the frame restored before \
         each as in the packet section: `wrapped − wrapper + floor`), median of {runs} runs with (min–max). The \
         limited VIP has `new_connections_per_second = burst = 10,000,000`: the check runs and the bucket is \
         written, and no SYN is refused.\n",
        thousands(u64::from(repeat))
    );
    let mut rows = Vec::new();
    for (case, what) in CASES {
        let (v4, v6) = (spread(case, "ipv4")?, spread(case, "ipv6")?);
        rows.push(vec![format!("`{case}`: {what}"), v4.with(0).to_string(), v6.with(0).to_string()]);
    }
    let mut diff = |label: &str, limited: &str, plain: &str| -> anyhow::Result<()> {
        let cells = ["ipv4", "ipv6"]
            .map(|f| Ok::<_, anyhow::Error>(spread(limited, f)?.median - spread(plain, f)?.median))
            .into_iter()
            .map(|d| d.map(|d| format!("{d:+.0}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        rows.push(vec![label.to_owned(), cells[0].clone(), cells[1].clone()]);
        Ok(())
    };
    diff("limiter's cost, flood SYN (medians' difference)", "tcp_syn_limited", "tcp_syn_untracked")?;
    diff("limiter's cost, known client (medians' difference)", "tcp_syn_limited_same_tuple", "tcp_syn_same_tuple")?;
    let budget = |case: &str, family: &str| spread(case, family).map(|s| thousands((1e9 / s.median) as u64));
    rows.push(vec![
        "one core's flood SYNs a second, plain VIP (1 s ÷ the median)".to_owned(),
        budget("tcp_syn_untracked", "ipv4")?,
        budget("tcp_syn_untracked", "ipv6")?,
    ]);
    rows.push(vec![
        "one core's flood SYNs a second, limited VIP".to_owned(),
        budget("tcp_syn_limited", "ipv4")?,
        budget("tcp_syn_limited", "ipv6")?,
    ]);
    let _ = writeln!(out, "{}", table(&["case", "IPv4 (ns)", "IPv6 (ns)"], &rows));
    let _ = writeln!(
        out,
        "The flood SYNs' sources differ by family (the wrapper's): IPv4 moves the source port each iteration and \
         the address every 64,512, so a client's bucket (`per = \"address\"`) exists for all but one in 64,512 \
         and the IPv4 difference is the check on a known client; IPv6 moves the address each iteration, so every \
         SYN creates a bucket in the LRU `CLIENTS` table: the IPv6 difference is what a flood from ever-new \
         sources costs the limiter. The SYN budget is arithmetic on the test-run cost, not a live-frame \
         measurement: a real core also pays the driver and, for a SYN sent on, the redirect. Load average \
         (1 min): {load_before} before, {load_after} after.\n"
    );
    Ok(())
}

/// `wrapped − wrapper + floor` of every `packet` line, by (case, family).
fn costs(lines: &[Value]) -> anyhow::Result<BTreeMap<(String, String), Vec<f64>>> {
    let mut costs: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for line in of_kind(lines, "packet") {
        let case = line["case"].as_str().context("packet line without case")?.to_owned();
        let family = line["family"].as_str().context("packet line without family")?.to_owned();
        let cost = number(line, "wrapped_ns")? - number(line, "wrapper_ns")? + number(line, "floor_ns")?;
        costs.entry((case, family)).or_default().push(cost);
    }
    Ok(costs)
}

// ------------------------------------------------------------ floods

/// A flood the testbed can generate.
#[derive(Clone, Copy)]
enum Attack {
    /// Four `hping3 -S --flood` at nice 19, each from its own spoofed address.
    HpingSyn,
    /// Our raw-socket spray of SYNs, one source address of a /16 after another.
    SpraySyn,
    /// The spray's SYN-then-ACK pairs: spoofed "handshakes" that pin flows.
    SprayHandshakes,
}

impl Attack {
    const ALL: [Attack; 3] = [Attack::HpingSyn, Attack::SpraySyn, Attack::SprayHandshakes];

    fn name(self) -> &'static str {
        match self {
            Attack::HpingSyn => "SYN flood, hping3 × 4 (4 sources × 64k ports)",
            Attack::SpraySyn => "SYN flood, own spray (65,536 sources)",
            Attack::SprayHandshakes => "spoofed SYN-then-ACK pairs, own spray",
        }
    }
}

/// What one flood run saw.
struct Run {
    attack: Attack,
    sent: u64,
    flood: Duration,
    kept: Vec<flood::ConnReport>,
    probes: flood::ProbeReport,
    /// Seconds since the flood began → (inserts since, entries, entries' age).
    table: Vec<(u64, u64, u64, u64)>,
    health: bool,
}

fn floods(out: &mut String, opts: &Options) -> anyhow::Result<()> {
    let flood_time = if opts.quick { FLOOD / 2 } else { FLOOD };
    let mut runs = Vec::new();
    for attack in Attack::ALL {
        println!("bench: hostile: {}", attack.name());
        runs.push(flood_run(attack, flood_time).with_context(|| attack.name())?);
    }
    let _ = writeln!(
        out,
        "### Established flows under floods\n\nTestbed: release `lb`, 3 HTTP backends, `conntrack_capacity = \
         {}`, health checks every 3 s (the floods test's). Each flood runs {flood_time:?} from the client namespace \
         at the highest rate it reaches there (spoofed sources in 198.19.0.0/16, their answers routed back to the \
         client, which drops them), while 10 kept-alive connections ask every 100 ms and a prober opens a new \
         connection every 50 ms (the connections' figures cover the flood and the second after it). A kept-alive \
         connection breaks on a reset, a close, another backend answering or 20 s without an answer; a new \
         connection may take 7.5 s (its SYN sent again).\n",
        thousands(u64::from(TABLE))
    );
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let broken = r.kept.iter().filter(|k| k.broken.is_some()).count();
            let slowest = r.kept.iter().map(|k| k.slowest).max().unwrap_or_default();
            let inserted = r.table.last().map_or(0, |t| t.1);
            vec![
                r.attack.name().to_owned(),
                format!("{} ({}/s)", thousands(r.sent), thousands((r.sent as f64 / r.flood.as_secs_f64()) as u64)),
                format!("{broken} of {}", r.kept.len()),
                format!("{slowest:.1?}"),
                format!("{} ok, {} failed, {} resent a SYN", r.probes.ok, r.probes.failed, r.probes.retried),
                thousands(inserted),
                if r.health { "yes".to_owned() } else { "**no**".to_owned() },
            ]
        })
        .collect();
    let _ = writeln!(
        out,
        "{}",
        table(
            &[
                "flood",
                "segments sent",
                "kept-alive broken",
                "slowest kept-alive answer",
                "new connections",
                "table inserts",
                "backends up throughout"
            ],
            &rows
        )
    );
    let _ = writeln!(
        out,
        "Table occupancy over time: entries as the agent last counted them (it counts in the background when its \
         count is 5 s old: age in brackets) and, after the slash, inserts since the flood began (live), counted \
         once a second through `/status` (–: no sample that second, e.g. `/status` did not answer in time). The \
         real connections (the prober's) are inserts too; the prober stops a second after the flood.\n"
    );
    let last = runs.iter().filter_map(|r| r.table.last().map(|t| t.0)).max().unwrap_or(0);
    let rows: Vec<Vec<String>> = (1..=last)
        .map(|second| {
            let mut row = vec![format!("{second} s")];
            for r in &runs {
                // No sample that second (`/status` timed out, or the loop waited).
                row.push(r.table.iter().find(|t| t.0 == second).map_or(
                    "–".to_owned(),
                    |&(_, inserted, entries, age)| {
                        format!("{} ({:.1} s) / {}", thousands(entries), age as f64 / 1000.0, thousands(inserted))
                    },
                ));
            }
            row
        })
        .collect();
    let mut header = vec!["since the flood began"];
    header.extend(runs.iter().map(|r| r.attack.name()));
    let _ = writeln!(out, "{}", table(&header, &rows));
    let _ = writeln!(out, "The flood stops at {flood_time:?}; the rows after it show the table settle.\n");
    let _ = writeln!(out, "Load average: {}.\n", harness::load_average());
    Ok(())
}

fn flood_run(attack: Attack, flood_time: Duration) -> anyhow::Result<Run> {
    let testbed = harness::testbed(3)?;
    flood::route_spoofed_to(testbed.gateway(), testbed::CLIENT_ADDR)?;
    let check = HealthCheck { interval: Duration::from_secs(3), timeout: Duration::from_secs(3), rise: 2, fall: 3 };
    let config = agent::config_for(&testbed, check).replacen(
        "[agent]\n",
        &format!("[agent]\nconntrack_capacity = {TABLE}\n"),
        1,
    );
    let mut lb = Agent::start(&testbed, &config)?;
    lb.wait_health("web", &["up"; 3], Duration::from_secs(15))?;
    let vip = testbed.vip_http();
    let mut kept = Some(KeptAlive::start(testbed.client(), vip, 10, Duration::from_millis(100))?);
    thread::sleep(Duration::from_secs(1));
    let mut prober = Some(Prober::start(testbed.client(), vip, Duration::from_millis(50)));
    let (mut kept_report, mut probes) = (Vec::new(), flood::ProbeReport::default());
    let before = lb.status()?;
    let tx_before = flood::link_packets(testbed.client(), testbed.client_if(), true)?;
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let mut table = Vec::new();
    let mut health = true;
    thread::scope(|s| -> anyhow::Result<()> {
        let guards = launch(s, &testbed, attack, flood_time, &stop)?;
        let end = started + flood_time + AFTER;
        let mut second = 1;
        while Instant::now() < end {
            thread::sleep((started + Duration::from_secs(second)).saturating_duration_since(Instant::now()));
            if started.elapsed() >= flood_time {
                stop.store(true, Ordering::Relaxed);
                // What the connections saw during the flood (and the
                // second after it, for answers in flight).
                if started.elapsed() >= flood_time + Duration::from_secs(1) {
                    if let Some(p) = prober.take() {
                        probes = p.finish();
                    }
                    if let Some(k) = kept.take() {
                        kept_report = k.finish();
                    }
                }
            }
            // An answer that times out on the saturated cores says nothing.
            if let Ok(status) = lb.status() {
                let count = |k: &str| status["conntrack"][k].as_u64().unwrap_or(0);
                let inserted = count("inserted").saturating_sub(before["conntrack"]["inserted"].as_u64().unwrap_or(0));
                table.push((second, inserted, count("entries"), count("counted_ms_ago")));
                health &= agent_health(&status);
            }
            second += 1;
        }
        stop.store(true, Ordering::Relaxed);
        drop(guards);
        Ok(())
    })?;
    let sent = flood::link_packets(testbed.client(), testbed.client_if(), true)? - tx_before;
    if let Some(p) = prober {
        probes = p.finish();
    }
    if let Some(k) = kept {
        kept_report = k.finish();
    }
    let kept = kept_report;
    drop(lb);
    drop(testbed);
    Ok(Run { attack, sent, flood: flood_time, kept, probes, table, health })
}

/// Whether every web backend is up in `status`.
fn agent_health(status: &Value) -> bool {
    status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == "web"))
        .and_then(|v| v["backends"].as_array())
        .is_some_and(|b| b.iter().all(|b| b["health"] == "up"))
}

/// Starts `attack` for `flood_time`; it stops when the guards drop
/// (hping3, also bounded by `timeout(1)`) or `stop` is set (the spray, also
/// bounded by its own limit).
fn launch<'s>(
    s: &'s thread::Scope<'s, '_>,
    testbed: &'s Testbed,
    attack: Attack,
    flood_time: Duration,
    stop: &'s AtomicBool,
) -> anyhow::Result<Vec<ChildGuard>> {
    let vip = testbed.vip_http();
    match attack {
        Attack::HpingSyn => (1..=4)
            .map(|k| flood::hping3(testbed.client(), &["-S"], Ipv4Addr::new(198, 19, 0, k), vip, flood_time))
            .collect(),
        Attack::SpraySyn | Attack::SprayHandshakes => {
            let spray = Spray {
                first_source: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 0)),
                sources: 65_536,
                flags: tcp_flags::SYN,
                then_ack: matches!(attack, Attack::SprayHandshakes),
                max_packets: u64::MAX,
                limit: flood_time,
            };
            s.spawn(move || flood::spray(testbed.client(), vip, spray, stop));
            Ok(Vec::new())
        }
    }
}

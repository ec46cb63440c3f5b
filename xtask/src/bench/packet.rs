//! `packet`: per-packet cost of the XDP program through BPF_PROG_TEST_RUN.
//!
//! `lb-bench packet` runs inside a fresh network namespace (it builds a
//! gateway's veths, addresses and permanent neighbours there, so
//! `bpf_fib_lookup` answers as on a real gateway) and prints raw samples;
//! this module turns them into the report's tables. The method is in the
//! report text ([`method`]) and in `lb-bench/src/packet.rs`.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, ensure};
use lb_tests::ScratchNamespace;
use serde_json::Value;

use super::{
    Options, Report,
    lb_bench::{self, number, of_kind},
    spread::{Spread, thousands},
};

/// Iterations per test run and runs per case, for figures.
const REPEAT: u32 = 1_000_000;
const RUNS: u32 = 5;
/// The same for `--quick`: a tenth of the iterations, fewer runs.
const QUICK_REPEAT: u32 = 100_000;
const QUICK_RUNS: u32 = 3;
/// Bound on the whole `lb-bench packet` run (a full run takes 2 to 3 minutes).
const TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// One row of the main table: a case, its goal and Katran's figure.
struct Row {
    case: &'static str,
    label: &'static str,
    /// The goal, in ns, if it sets one for this case.
    goal_ns: Option<f64>,
    /// Katran's figure as issue 4 quotes it, in ns.
    katran_ns: Option<f64>,
}

const ROWS: [Row; 8] = [
    Row {
        case: "tcp_syn_new_flow",
        label: "TCP SYN, new flow (table not full)",
        goal_ns: Some(300.0),
        katran_ns: Some(690.0),
    },
    Row {
        case: "tcp_syn_new_flow_table_full",
        label: "TCP SYN, new flow, table full (LRU evicts)",
        goal_ns: None,
        katran_ns: Some(1250.0),
    },
    Row {
        case: "tcp_established",
        label: "TCP segment of an established flow",
        goal_ns: Some(100.0),
        katran_ns: Some(190.0),
    },
    Row { case: "tcp_reply", label: "TCP reply on the return path", goal_ns: Some(100.0), katran_ns: None },
    Row { case: "udp_tracked", label: "UDP datagram of a tracked flow", goal_ns: None, katran_ns: None },
    Row {
        case: "other_host_pass",
        label: "Not ours: to another host (passed to the kernel)",
        goal_ns: Some(40.0),
        katran_ns: Some(98.0),
    },
    Row {
        case: "not_vip_pass",
        label: "Not for a VIP, but to a backend's address, another port (passed)",
        goal_ns: None,
        katran_ns: None,
    },
    Row {
        case: "direct_flow_pass",
        label: "Straight to a backend's service, not through a VIP (tracked, passed)",
        goal_ns: None,
        katran_ns: None,
    },
];
/// Katran's floor as issue 4 quotes it, in ns.
const KATRAN_FLOOR_NS: f64 = 26.0;
const FAMILIES: [(&str, &str); 2] = [("ipv4", "IPv4"), ("ipv6", "IPv6")];

/// The `packet` section.
///
/// # Errors
/// When building or running `lb-bench` fails, or its output lacks a case.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let tools = lb_bench::build()?;
    let (repeat, runs) = if opts.quick { (QUICK_REPEAT, QUICK_RUNS) } else { (REPEAT, RUNS) };
    let scratch = ScratchNamespace::create("packet").context("creating the packet benchmark's namespace")?;
    let mut cmd = scratch.namespace().command(&tools.lb_bench);
    cmd.args(["packet", "--repeat", &repeat.to_string(), "--runs", &runs.to_string()]);
    let load_before = lb_bench::load_average();
    let lines = lb_bench::run(cmd, TIMEOUT)?;
    let load = (load_before, lb_bench::load_average());
    drop(scratch);
    let samples = Samples::from_lines(&lines)?;
    Ok(Report { title: "Per-packet cost".to_owned(), body: body(&samples, &lines, opts, (repeat, runs), &load)? })
}

/// One run of one case, as `lb-bench` printed it.
struct Sample {
    case: String,
    family: String,
    floor: f64,
    wrapper: f64,
    wrapped: f64,
    plain: f64,
    plain_path: serde_json::Map<String, Value>,
}

impl Sample {
    /// `lb_xdp`'s cost as if it ran directly on a fresh copy of the frame
    /// each iteration: the wrapper's own cost taken out, the floor put back.
    fn cost(&self) -> f64 {
        self.wrapped - self.wrapper + self.floor
    }
}

struct Samples(Vec<Sample>);

impl Samples {
    fn from_lines(lines: &[Value]) -> anyhow::Result<Self> {
        let samples = of_kind(lines, "packet")
            .map(|line| {
                Ok(Sample {
                    case: line["case"].as_str().context("packet line without case")?.to_owned(),
                    family: line["family"].as_str().context("packet line without family")?.to_owned(),
                    floor: number(line, "floor_ns")?,
                    wrapper: number(line, "wrapper_ns")?,
                    wrapped: number(line, "wrapped_ns")?,
                    plain: number(line, "plain_ns")?,
                    plain_path: line["plain_path"].as_object().cloned().unwrap_or_default(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        ensure!(!samples.is_empty(), "lb-bench packet printed no samples");
        Ok(Self(samples))
    }

    fn of<'a>(&'a self, case: &'a str, family: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| s.case == case && s.family == family)
    }

    /// The spread of `f` over the runs of one case.
    fn spread(&self, case: &str, family: &str, f: impl Fn(&Sample) -> f64) -> anyhow::Result<Spread> {
        Spread::of(self.of(case, family).map(f)).with_context(|| format!("no samples of {family} {case}"))
    }

    /// The floor over every run of every case of a family.
    fn floor(&self, family: &str) -> anyhow::Result<Spread> {
        Spread::of(self.0.iter().filter(|s| s.family == family).map(|s| s.floor))
            .with_context(|| format!("no {family} samples"))
    }
}

/// The section's text; `load` is the load average before and after the run.
fn body(
    samples: &Samples,
    lines: &[Value],
    opts: &Options,
    (repeat, runs): (u32, u32),
    load: &(String, String),
) -> anyhow::Result<String> {
    let mut out = String::new();
    let quick = if opts.quick { " --quick" } else { "" };
    let _ = writeln!(out, "`cargo xtask bench --only packet{quick}`\n");
    if opts.quick {
        let _ = writeln!(out, "**Quick run: for trying the harness, not for figures.**\n");
    }
    let _ = writeln!(
        out,
        "Nanoseconds per packet as the kernel reports them (BPF_PROG_TEST_RUN's average over {} iterations \
         per run), median of {runs} runs with (min–max). Every iteration sees the original frame again, restored by \
         a wrapper program (method below).\n",
        thousands(u64::from(repeat))
    );
    main_table(&mut out, samples)?;
    goals(&mut out, samples)?;
    method(&mut out, samples, lines, &thousands(u64::from(repeat)))?;
    let _ = writeln!(out, "Load average (1 min) of the shared machine: {} before the run, {} after.\n", load.0, load.1);
    Ok(out)
}

fn main_table(out: &mut String, samples: &Samples) -> anyhow::Result<()> {
    let _ = writeln!(
        out,
        "| case | IPv4 (ns) | IPv6 (ns) | floor, same frames, IPv4 / IPv6 (ns) | goal | Katran, quoted from issue 4, not measured here (ns) |\n|---|---|---|---|---|---|"
    );
    for row in &ROWS {
        let v4 = samples.spread(row.case, "ipv4", Sample::cost)?;
        let v6 = samples.spread(row.case, "ipv6", Sample::cost)?;
        let f4 = samples.spread(row.case, "ipv4", |s| s.floor)?;
        let f6 = samples.spread(row.case, "ipv6", |s| s.floor)?;
        let goal = row.goal_ns.map_or_else(|| "—".to_owned(), |g| format!("< {g:.0}"));
        let katran = row.katran_ns.map_or_else(|| "—".to_owned(), |k| thousands(k as u64));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} / {:.0} | {goal} | {katran} |",
            row.label,
            v4.with(0),
            v6.with(0),
            f4.median,
            f6.median
        );
    }
    let (f4, f6) = (samples.floor("ipv4")?, samples.floor("ipv6")?);
    let _ = writeln!(
        out,
        "| Floor: an XDP program that only returns its verdict, on the frames above | {} | {} | | | {KATRAN_FLOOR_NS:.0} |\n",
        f4.with(0),
        f6.with(0)
    );
    Ok(())
}

/// Whether the medians meet the goals, said plainly.
fn goals(out: &mut String, samples: &Samples) -> anyhow::Result<()> {
    let mut met = Vec::new();
    let mut missed = Vec::new();
    for row in ROWS.iter().filter(|r| r.goal_ns.is_some()) {
        let goal = row.goal_ns.unwrap_or(f64::INFINITY);
        for (family, name) in FAMILIES {
            let median = samples.spread(row.case, family, Sample::cost)?.median;
            let line = format!("{}, {name}: {median:.0} ns against < {goal:.0} ns", row.label);
            if median < goal { met.push(line) } else { missed.push(line) }
        }
    }
    let _ = writeln!(out, "Goals of issue 4 (same method), by the medians:");
    for line in &missed {
        let _ = writeln!(out, "- not met: {line}");
    }
    for line in &met {
        let _ = writeln!(out, "- met: {line}");
    }
    out.push('\n');
    Ok(())
}

/// The method, its check, the trap it avoids, the table's state and the
/// limits of the figures, each from this run's own output.
fn method(out: &mut String, samples: &Samples, lines: &[Value], repeat: &str) -> anyhow::Result<()> {
    let _ = writeln!(
        out,
        "Method. With a plain `repeat` the kernel runs the program again and again on the same buffer without \
         restoring it, so after the first rewrite every later iteration measures another path. Here a small XDP \
         program (`lb_xdp_bench_restore` in `lb-bench-ebpf`, not part of the production object) copies the \
         original frame back from a map with `bpf_xdp_store_bytes` at the start of every iteration, and tail-calls \
         the program under test through a PROG_ARRAY. For new flows it also writes a per-iteration counter into \
         the source (IPv4: source port and the low bits of a 198.18.0.0/15 source address; IPv6: the low 32 bits \
         of the source address), so every SYN is a 5-tuple the table has never seen. Each run times, on the same \
         frame, the verdict-only program alone (the floor), the wrapper tail-calling the verdict-only program \
         (the wrapper's own cost), and the wrapper tail-calling `lb_xdp`; the figure is wrapped − wrapper + floor, \
         computed per run. After every run `lb_xdp`'s own counters are checked: its verdict reason counted exactly \
         {repeat} times and nothing else, and for new flows {repeat} connection-table inserts (one per iteration), \
         or the benchmark fails. Programs and maps are loaded and filled by the agent's own code (config, \
         `Balancer::install`): 4 VIPs (TCP and UDP, IPv4 and IPv6) of 3 backends each, the default ring size and \
         connection-table capacity. Live-frame mode (BPF_F_TEST_XDP_LIVE_FRAMES) was not used: it carries out each \
         verdict (transmits redirected frames, hands passed ones to the stack), so it would time more than the \
         program.\n"
    );
    check_and_trap(out, samples)?;
    table_state(out, lines)?;
    programs(out, lines);
    limits(out, samples, repeat)?;
    Ok(())
}

/// The raw parts of each figure, and what plain `repeat` reports.
fn check_and_trap(out: &mut String, samples: &Samples) -> anyhow::Result<()> {
    let _ = writeln!(
        out,
        "The parts of each figure (medians, ns), and what a plain `repeat` on the same frame reports, with the \
         paths its iterations actually took (from `lb_xdp`'s verdict counters):\n\n\
         | case | family | wrapper + lb_xdp | wrapper alone | floor | = figure | plain repeat | plain repeat's iterations |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for row in &ROWS {
        for (family, name) in FAMILIES {
            let part = |f: fn(&Sample) -> f64| samples.spread(row.case, family, f).map(|s| s.median);
            let path = samples.of(row.case, family).next().map(|s| describe_path(&s.plain_path)).unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {path} |",
                row.label,
                part(|s| s.wrapped)?,
                part(|s| s.wrapper)?,
                part(|s| s.floor)?,
                part(Sample::cost)?,
                part(|s| s.plain)?,
            );
        }
    }
    let (pass, plain) = (
        samples.spread("not_vip_pass", "ipv4", Sample::cost)?.median,
        samples.spread("not_vip_pass", "ipv4", |s| s.plain)?.median,
    );
    let _ = writeln!(
        out,
        "\nCheck of the subtraction: `lb_xdp` leaves a frame not for a VIP untouched, so there plain `repeat` is \
         valid; it gives {plain:.0} ns against {pass:.0} ns through the wrapper (IPv4 medians). For a frame the \
         program rewrites, plain `repeat` times whatever path the rewritten frame takes from the second iteration \
         on; the last column shows which.\n"
    );
    Ok(())
}

/// `1 redirect_to_backend, 999,999 pass_not_vip`, largest last.
fn describe_path(path: &serde_json::Map<String, Value>) -> String {
    let mut parts: Vec<(u64, &str)> = path.iter().map(|(k, v)| (v.as_u64().unwrap_or(0), k.as_str())).collect();
    parts.sort_unstable();
    parts.iter().map(|(n, k)| format!("{} {k}", thousands(*n))).collect::<Vec<_>>().join(", ")
}

/// What the connection table held around the new-flow cases.
fn table_state(out: &mut String, lines: &[Value]) -> anyhow::Result<()> {
    let _ = writeln!(out, "Connection table (entries counted by walking CONNTRACK; replies keep no state):");
    for line in of_kind(lines, "table") {
        let count = |key| line[key].as_u64().map(thousands).unwrap_or_default();
        let what = match (line["case"].as_str(), line["when"].as_str()) {
            (Some("tcp_syn_new_flow"), _) => format!(
                "new flows, table not full: a fresh program for each run; after the first {} run",
                line["family"].as_str().unwrap_or("?")
            ),
            (Some(_), Some("before")) => {
                "table full: after filling it with 1.25 × capacity new flows, before the runs".to_owned()
            }
            (Some(_), _) => "table full: after all its runs".to_owned(),
            _ => continue,
        };
        let _ = writeln!(out, "- {what}: {} of capacity {}", count("conntrack"), count("capacity"));
    }
    let _ = writeln!(
        out,
        "\nSo \"table not full\" starts empty and ends each run holding one entry per iteration (no evictions: \
         the count equals the inserts); its average includes a table growing to that size, with the cache misses \
         that brings. \"Table full\" stays at capacity, the LRU evicting as it inserts.\n"
    );
    Ok(())
}

fn programs(out: &mut String, lines: &[Value]) {
    let described: Vec<String> = of_kind(lines, "program")
        .map(|p| {
            let name = p["name"].as_str().unwrap_or("?");
            let jited = p["jited_bytes"].as_u64().map(thousands).unwrap_or_default();
            match p["xlated_insns"].as_u64() {
                Some(insns) => format!("`{name}` {} instructions, {jited} bytes JITed", thousands(insns)),
                None => format!("`{name}` {jited} bytes JITed"),
            }
        })
        .collect();
    let _ = writeln!(out, "Programs as loaded: {}.\n", described.join("; "));
}

/// Noise and what the machine limits.
fn limits(out: &mut String, samples: &Samples, repeat: &str) -> anyhow::Result<()> {
    let mut spreads = Vec::new();
    for row in &ROWS {
        for (family, name) in FAMILIES {
            let spread = samples.spread(row.case, family, Sample::cost)?.spread_pct();
            spreads.push(format!("{} {name} ±{spread:.0}%", row.case));
        }
    }
    let floor = FAMILIES
        .iter()
        .map(|(family, name)| Ok(format!("{name} ±{:.0}%", samples.floor(family)?.spread_pct())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let _ = writeln!(
        out,
        "Noise (half the min–max range over the runs, relative to the median): {}; the floor over all frames {}. \
         The kernel's timer leaves out time the test run was preempted, but not cache and memory-bandwidth \
         interference from the other core, which on this 2-core machine runs everyone else's builds and \
         benchmarks (each new-flow run writes {repeat} entries into a table far larger than the caches). This measures the program alone: no driver, no DMA, and for XDP_REDIRECT only the \
         helper that records the target, not the transmit. On a gateway with a real NIC the program costs the \
         same per packet and the driver adds its own; on other machines the figures follow single-core speed and \
         cache sizes.\n",
        spreads.join(", "),
        floor.join(", "),
    );
    Ok(())
}

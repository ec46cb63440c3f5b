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

/// One row of the main table: a case, and the Katran figure it is held to.
struct Row {
    case: &'static str,
    label: &'static str,
    /// Katran's figure for the same kind of packet, if it has one.
    katran: Option<Of>,
    /// Issue 10's goal: at most `factor` × Katran's figure `of`.
    goal: Option<(f64, Of)>,
}

/// Which of Katran's figures.
#[derive(Clone, Copy)]
enum Of {
    Established,
    /// A SYN of a new flow, table not full: Katran inserts at the SYN.
    New,
    NewFull,
    Pass,
}

/// Katran's `balancer_ingress` on one machine kind, by the same method, in
/// ns, IPv4 / IPv6 (`None`: not measured).
struct Katran {
    source: &'static str,
    established: (f64, Option<f64>),
    new: (f64, Option<f64>),
    new_full: (f64, Option<f64>),
    pass: (f64, Option<f64>),
}

impl Katran {
    /// The figures of the machine kind this report runs on: the AMD EPYC
    /// kind or the Intel Xeon kind (see /work/shared/NOTES.md: their floors
    /// differ by 4×, so figures compare only within a kind).
    fn for_this_machine() -> &'static Katran {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if cpu.lines().any(|l| l.starts_with("model name") && l.contains("AMD")) { &KATRAN_AMD } else { &KATRAN_INTEL }
    }

    fn of(&self, of: Of) -> (f64, Option<f64>) {
        match of {
            Of::Established => self.established,
            Of::New => self.new,
            Of::NewFull => self.new_full,
            Of::Pass => self.pass,
        }
    }

    fn ns(&self, of: Of, ipv6: bool) -> Option<f64> {
        let (v4, v6) = self.of(of);
        if ipv6 { v6 } else { Some(v4) }
    }
}

/// Commit 19f08fe built unchanged with clang 14, new-flow rate cap off, 1M-entry LRU.
const KATRAN_INTEL: Katran = Katran {
    source: "Katran's `balancer_ingress` (commit 19f08fe, clang 14, new-flow rate cap off, 1M-entry LRU) as issue 10 \
             quotes it for the Intel Xeon 2-vCPU kind (verdict-only floor 6 ns), same method; not rebuilt in this run",
    established: (68.0, Some(66.0)),
    new: (445.0, Some(463.0)),
    new_full: (847.0, None),
    pass: (27.0, None),
};
const KATRAN_AMD: Katran = Katran {
    source: "Katran's `balancer_ingress` (commit 19f08fe, clang 14, new-flow rate cap off, 1M-entry LRU), measured \
             2026-12-04 on the AMD EPYC 2-vCPU kind by the same method; not rebuilt in this run",
    established: (171.0, Some(164.0)),
    new: (626.0, Some(559.0)),
    new_full: (1190.0, Some(985.0)),
    pass: (80.0, Some(71.0)),
};

const ROWS: [Row; 11] = [
    Row {
        case: "tcp_syn_untracked",
        label: "TCP SYN of a new connection: Maglev only, not inserted (table not full)",
        katran: Some(Of::New),
        goal: Some((0.5, Of::New)),
    },
    Row {
        case: "tcp_first_ack",
        label: "TCP first ACK: the flow enters the table (table not full)",
        katran: Some(Of::New),
        goal: Some((0.5, Of::New)),
    },
    Row {
        case: "tcp_syn_untracked_table_full",
        label: "TCP SYN of a new connection, table full",
        katran: Some(Of::NewFull),
        goal: Some((0.5, Of::NewFull)),
    },
    Row {
        case: "tcp_first_ack_table_full",
        label: "TCP first ACK, table full (LRU evicts)",
        katran: Some(Of::NewFull),
        goal: Some((0.5, Of::NewFull)),
    },
    Row {
        case: "tcp_syn_same_tuple",
        label: "TCP SYN, one 5-tuple every iteration (the SYN path with warm caches; for comparison)",
        katran: None,
        goal: None,
    },
    Row {
        case: "tcp_established",
        label: "TCP segment of an established flow",
        katran: Some(Of::Established),
        goal: Some((0.6, Of::Established)),
    },
    Row { case: "tcp_reply", label: "TCP reply on the return path", katran: None, goal: Some((0.6, Of::Established)) },
    Row {
        case: "udp_tracked",
        label: "UDP datagram of a tracked flow",
        katran: None,
        goal: Some((0.6, Of::Established)),
    },
    Row {
        case: "other_host_pass",
        label: "Not ours: to another host (passed to the kernel)",
        katran: Some(Of::Pass),
        goal: None,
    },
    Row {
        case: "not_vip_pass",
        label: "Not for a VIP, but to a backend's address, another port (passed)",
        katran: None,
        goal: None,
    },
    Row {
        case: "direct_flow_pass",
        label: "Straight to a backend's service, not through a VIP (tracked, passed)",
        katran: None,
        goal: None,
    },
];

/// `a / b` (ns), `—` when unknown.
fn pair(a: Option<f64>, b: Option<f64>, fmt: impl Fn(f64) -> String) -> String {
    let one = |x: Option<f64>| x.map_or_else(|| "—".to_owned(), &fmt);
    format!("{} / {}", one(a), one(b))
}

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
        "| case | IPv4 (ns) | IPv6 (ns) | floor, same frames, IPv4 / IPv6 (ns) | goal, IPv4 / IPv6 (ns) | Katran, IPv4 / IPv6 (ns) | ÷ Katran, IPv4 / IPv6 |\n|---|---|---|---|---|---|---|"
    );
    let katran = Katran::for_this_machine();
    for row in &ROWS {
        let v4 = samples.spread(row.case, "ipv4", Sample::cost)?;
        let v6 = samples.spread(row.case, "ipv6", Sample::cost)?;
        let f4 = samples.spread(row.case, "ipv4", |s| s.floor)?;
        let f6 = samples.spread(row.case, "ipv6", |s| s.floor)?;
        let at = |of: Option<Of>, ipv6: bool| of.and_then(|of| katran.ns(of, ipv6));
        let goal = |ipv6| row.goal.and_then(|(factor, of)| katran.ns(of, ipv6).map(|k| factor * k));
        let goals = pair(goal(false), goal(true), |g| format!("≤ {g:.0}"));
        let figures = pair(at(row.katran, false), at(row.katran, true), |k| thousands(k as u64));
        let ratios =
            pair(at(row.katran, false).map(|k| v4.median / k), at(row.katran, true).map(|k| v6.median / k), |r| {
                format!("{r:.2}×")
            });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} / {:.0} | {goals} | {figures} | {ratios} |",
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
        "| Floor: an XDP program that only returns its verdict, on the frames above | {} | {} | | | | |\n",
        f4.with(0),
        f6.with(0)
    );
    let _ = writeln!(
        out,
        "Katran: {}. Goals (issue 10): established, reply and UDP at most 0.6× Katran's established \
         figure; new flows at most 0.5× Katran's new-flow figure in each table state. Katran tracks a flow at its \
         SYN; here a SYN is untracked and the first ACK inserts, so both packets are held to the new-flow goal.\n",
        katran.source
    );
    Ok(())
}

/// Whether the medians meet the goals, said plainly.
fn goals(out: &mut String, samples: &Samples) -> anyhow::Result<()> {
    let mut met = Vec::new();
    let mut missed = Vec::new();
    let katran = Katran::for_this_machine();
    for row in &ROWS {
        let Some((factor, of)) = row.goal else { continue };
        for (family, name) in FAMILIES {
            let Some(goal) = katran.ns(of, family == "ipv6").map(|k| factor * k) else { continue };
            let median = samples.spread(row.case, family, Sample::cost)?.median;
            let line = format!("{}, {name}: {median:.0} ns against ≤ {goal:.0} ns", row.label);
            if median <= goal { met.push(line) } else { missed.push(line) }
        }
    }
    let _ = writeln!(out, "Goals of issue 10 (same method), by the medians:");
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
         of the source address), so every SYN or ACK is a 5-tuple the table has never seen. A TCP flow enters the \
         connection table at its first ACK after a SYN seen by the program (a SYN is forwarded by Maglev and only \
         writes its slot of `EMBRYOS`), so for the first-ACK cases the wrapper also writes the varied flow's SYN \
         into `lb_xdp`'s own `EMBRYOS` before each iteration (the wrapper is loaded onto that map through a \
         bpffs pin), making every iteration a real first ACK with a real insert; that write is part of the \
         wrapper's cost, and subtracted with it. Each run times, on the same \
         frame, the verdict-only program alone (the floor), the wrapper tail-calling the verdict-only program \
         (the wrapper's own cost), and the wrapper tail-calling `lb_xdp`; the figure is wrapped − wrapper + floor, \
         computed per run. After every run `lb_xdp`'s own counters are checked: its verdict reason counted exactly \
         {repeat} times and nothing else, and for first ACKs {repeat} connection-table inserts (one per \
         iteration), for every other case none, or the benchmark fails. Programs and maps are loaded and filled by the agent's own code (config, \
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
            (Some("tcp_first_ack"), _) => format!(
                "new flows, table not full: a fresh program for each run; after the first {} run",
                line["family"].as_str().unwrap_or("?")
            ),
            (Some(_), Some("before")) => {
                "table full: after filling it with the first ACKs of 1.25 × capacity new flows, before the runs"
                    .to_owned()
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

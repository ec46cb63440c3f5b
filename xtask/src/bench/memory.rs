//! `memory`: BPF map memory and the agent's RSS, at the default capacity
//! and with 1,000,000 tracked flows.
//!
//! The real `lb` agent runs in a 3-backend testbed with the test config
//! (two VIPs, every `[agent]` capacity at its default). `lb-bench maps`
//! lists the BPF maps the agent holds, from `/proc/<pid>/fdinfo`, with the
//! `memlock` the kernel charges for each; RSS comes from
//! `/proc/<pid>/status`. Then `lb-bench fill-flows` writes 1,000,000 flows
//! into the agent's CONNTRACK (as the program would have: client → VIP
//! entries spread over the backends; replies keep no state), the agent is
//! made to count its table through `/status`, and both are measured again.

use std::{
    fmt::Write as _,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
};

use super::{
    Options, Report,
    lb_bench::{self, Tools, number, of_kind},
    spread::thousands,
};

/// Flows written for the second measurement.
const FLOWS: u32 = 1_000_000;
/// Bound on each `lb-bench` call (filling takes a few seconds).
const TOOL_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Bound on the agent counting the filled table (a walk of 1M entries takes
/// about a second or two, started at most every 5 s).
const COUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the testbed's backends being reported up.
const UP_TIMEOUT: Duration = Duration::from_secs(20);
const MIB: f64 = 1024.0 * 1024.0;

/// One BPF map of the agent.
struct MapMemory {
    name: String,
    map_type: u64,
    max_entries: u64,
    memlock: u64,
}

/// What one measurement found.
struct Snapshot {
    maps: Vec<MapMemory>,
    rss_kib: u64,
    hwm_kib: u64,
    /// The agent's own count of the connection table (`/status`).
    entries: u64,
}

impl Snapshot {
    fn memlock(&self) -> u64 {
        self.maps.iter().map(|m| m.memlock).sum()
    }

    fn memlock_of(&self, names: &[&str]) -> u64 {
        self.maps.iter().filter(|m| names.contains(&m.name.as_str())).map(|m| m.memlock).sum()
    }
}

/// The `memory` section.
///
/// # Errors
/// When the tools, the testbed or the agent fail, or the agent never counts
/// the flows written.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let tools = lb_bench::build()?;
    super::control::use_lb_binary(&tools.lb);
    // Drop order: the agent before the testbed that holds its namespace.
    let testbed = Testbed::builder().backends(3).backend_bin(&tools.backend).build().context("the testbed")?;
    let mut agent =
        Agent::start(&testbed, &agent::config_for(&testbed, HealthCheck::default())).context("starting lb")?;
    agent.wait_health("web", &["up", "up", "up"], UP_TIMEOUT)?;
    let idle = snapshot(&tools, &agent)?;
    let filled = fill(&tools, &testbed, &agent)?;
    let full = wait_counted(&tools, &agent)?;
    drop(agent);
    drop(testbed);
    Ok(Report { title: "Memory".to_owned(), body: body(opts, &idle, &full, filled) })
}

/// Writes [`FLOWS`] flows to the `web` VIP into the agent's maps; returns
/// how long the tool took.
fn fill(tools: &Tools, testbed: &Testbed, agent: &Agent) -> anyhow::Result<f64> {
    let mut cmd = Command::new(&tools.lb_bench);
    cmd.args(["fill-flows", "--pid", &agent.pid().to_string(), "--flows", &FLOWS.to_string()]).args([
        "--vip",
        &testbed.vip_http().to_string(),
        "--vip-id",
        "1",
    ]);
    for i in 1..=testbed.backend_count() {
        cmd.args(["--backend", &testbed.backend_http(i).to_string()]);
    }
    let lines = lb_bench::run(cmd, TOOL_TIMEOUT)?;
    let filled = of_kind(&lines, "filled").next().context("lb-bench fill-flows reported nothing")?;
    number(filled, "seconds")
}

/// Polls `/status` until the agent's count of the table reaches the flows
/// written, then measures.
fn wait_counted(tools: &Tools, agent: &Agent) -> anyhow::Result<Snapshot> {
    let start = Instant::now();
    loop {
        let entries = conntrack_entries(agent)?;
        if entries >= u64::from(FLOWS) {
            return snapshot(tools, agent);
        }
        ensure!(
            start.elapsed() < COUNT_TIMEOUT,
            "the agent counted {entries} flows {COUNT_TIMEOUT:?} after {FLOWS} were written"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

fn conntrack_entries(agent: &Agent) -> anyhow::Result<u64> {
    let status = agent.status()?;
    status["conntrack"]["entries"].as_u64().with_context(|| format!("/status has no conntrack.entries: {status}"))
}

/// The agent's maps, its RSS and its count of the table, now.
fn snapshot(tools: &Tools, agent: &Agent) -> anyhow::Result<Snapshot> {
    let entries = conntrack_entries(agent)?;
    let mut cmd = Command::new(&tools.lb_bench);
    cmd.args(["maps", "--pid", &agent.pid().to_string()]);
    let maps = of_kind(&lb_bench::run(cmd, TOOL_TIMEOUT)?, "map")
        .map(|m| {
            Ok(MapMemory {
                name: m["name"].as_str().unwrap_or("?").to_owned(),
                map_type: m["map_type"].as_u64().unwrap_or(0),
                max_entries: m["max_entries"].as_u64().unwrap_or(0),
                memlock: number(m, "memlock")? as u64,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(!maps.is_empty(), "the agent holds no BPF maps?");
    let (rss_kib, hwm_kib) = rss(agent.pid())?;
    Ok(Snapshot { maps, rss_kib, hwm_kib, entries })
}

/// `VmRSS` and `VmHWM` (peak) of process `pid`, in KiB.
fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

fn body(opts: &Options, idle: &Snapshot, full: &Snapshot, fill_seconds: f64) -> String {
    let mut out = String::new();
    let quick = if opts.quick { " --quick" } else { "" };
    let _ = writeln!(out, "`cargo xtask bench --only memory{quick}`\n");
    let _ = writeln!(
        out,
        "The `lb` agent (release build) in a 3-backend testbed, two VIPs (TCP and UDP); its `[agent]` section sets \
         only the interfaces, the admin address and the XDP mode, so every capacity is at its default \
         (conntrack_capacity 1,048,576, ring_size 65,537, max_vips 16; the map sizes below show them). Map memory is the `memlock` \
         the kernel reports per map in `/proc/<pid>/fdinfo` of the agent's map descriptors (each map once), RSS is \
         `VmRSS` of `/proc/<pid>/status` (`VmHWM`, the peak, in brackets). One reading per state: the maps' \
         memory follows from their sizes, RSS is a single reading.\n"
    );
    let _ = writeln!(
        out,
        "| state | flows the agent counts | BPF maps, total (MiB) | CONNTRACK (MiB) | MAGLEV (MiB) | agent RSS (MiB) |\n\
         |---|---|---|---|---|---|"
    );
    for (label, s) in [("default capacity, idle", idle), ("1,000,000 tracked flows", full)] {
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} ({}) |",
            thousands(s.entries),
            mib(s.memlock()),
            mib(s.memlock_of(&["CONNTRACK"])),
            mib(s.memlock_of(&["MAGLEV"])),
            mib(s.rss_kib * 1024),
            mib(s.hwm_kib * 1024)
        );
    }
    let _ = writeln!(
        out,
        "\nThe flows were written by `lb-bench fill-flows` from outside the agent in {fill_seconds:.1} s (two \
         `bpf()` updates per flow), then counted by the agent itself (its `/status`). The connection tables are \
         LRU hash maps, preallocated: the kernel charges their full capacity at creation, so their memory is the \
         same empty or full; what 1,000,000 flows add to the agent is what walking the table to count it costs.\n\n\
         Per map, at default capacity:\n\n| map | type | max entries | memlock (KiB) |\n|---|---|---|---|"
    );
    let mut maps: Vec<&MapMemory> = idle.maps.iter().collect();
    maps.sort_by_key(|m| std::cmp::Reverse(m.memlock));
    for m in maps {
        let name = if m.name.is_empty() { "(unnamed)" } else { m.name.as_str() };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} |",
            map_type_name(m.map_type),
            thousands(m.max_entries),
            thousands(m.memlock.div_ceil(1024))
        );
    }
    out.push('\n');
    out
}

/// `enum bpf_map_type` names for the types the agent uses.
fn map_type_name(map_type: u64) -> String {
    match map_type {
        1 => "hash".to_owned(),
        2 => "array".to_owned(),
        6 => "percpu_array".to_owned(),
        9 => "lru_hash".to_owned(),
        27 => "ringbuf".to_owned(),
        other => format!("type {other}"),
    }
}

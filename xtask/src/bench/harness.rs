//! What the network sections (`e2e`, `pps`, `failover`, `disruption`) share:
//! release binaries, fresh testbeds, CPU clocks, interface counters and
//! summaries (median with min–max).
//!
//! Every measurement gets a fresh [`Testbed`]: new namespaces have no
//! conntrack or NAT state, no TIME_WAIT sockets and no cached timestamps left
//! from the previous run (leftovers distort the next run's figures), which
//! is simpler and more thorough than `ss -K` plus `conntrack -F` (and the
//! `conntrack` tool is not installed).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_tests::{Namespace, Spread, Testbed};

use crate::build::{self, Profile};

/// Builds `lb` and `lb-testbed-backend` in release (figures of a debug build
/// mean nothing) once per xtask run, points `LB_BIN` at the agent for
/// [`lb_tests::agent::Agent`] unless it is set already (as for the tests and
/// the demo, e.g. to measure another build), and returns the backend
/// server's path.
pub fn backend_bin() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = BUILT.get() {
        return Ok(path.clone());
    }
    let bins = build::build(Profile::Release).context("building the release binaries to benchmark")?;
    match std::env::var_os(lb_tests::LB_BIN_ENV) {
        Some(lb) => println!(
            "bench: using {}={} instead of the lb just built",
            lb_tests::LB_BIN_ENV,
            PathBuf::from(lb).display()
        ),
        // SAFETY: the sections run one after another on the main thread, and
        // every thread a section starts has ended before it returns, so
        // nothing reads the environment concurrently.
        None => unsafe { std::env::set_var(lb_tests::LB_BIN_ENV, &bins.lb) },
    }
    Ok(BUILT.get_or_init(|| bins.backend).clone())
}

/// A new testbed with `backends` backends running the release server.
pub fn testbed(backends: usize) -> anyhow::Result<Testbed> {
    Testbed::builder().backends(backends).backend_bin(backend_bin()?).build().context("bringing up a benchmark testbed")
}

/// The command line that produced the report (this process's arguments,
/// run as `cargo xtask`), for the top of each section's body.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("Command: `cargo xtask {}` (as root)", args.join(" "))
}

/// One line of load average, to show how busy the shared machine was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

// ------------------------------------------------------------------ CPU

/// Clock ticks per second of `/proc/stat` and `/proc/<pid>/stat` (USER_HZ).
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Whole-machine CPU time from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    /// user + nice + system + irq + softirq: everything but idle, iowait
    /// and steal (time the hypervisor gave to someone else).
    busy: u64,
}

impl MachineCpu {
    /// Reads `/proc/stat` now.
    pub fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().next().context("/proc/stat is empty")?;
        let fields: Vec<u64> = line.split_whitespace().skip(1).map_while(|f| f.parse().ok()).collect();
        ensure!(fields.len() >= 7, "/proc/stat: unexpected first line {line:?}");
        // user nice system idle iowait irq softirq [steal ...]
        let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6];
        Ok(Self { busy })
    }

    /// CPU microseconds spent between `self` and `later`, over all cores.
    pub fn micros_until(self, later: Self) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 * 1e6 / ticks_per_sec()
    }
}

/// CPU time (user + system, in ticks) of the processes in a namespace.
#[derive(Debug, Clone)]
pub struct NamespaceCpu {
    per_pid: Vec<(u32, u64)>,
}

impl NamespaceCpu {
    /// Reads the processes `ip netns pids` lists for `ns` now. Call it
    /// before the measured window: it runs `ip`.
    pub fn now(ns: &Namespace) -> anyhow::Result<Self> {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", ns.name()])
            .output()
            .with_context(|| format!("listing the processes in {}", ns.name()))?;
        let per_pid = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter_map(|pid| process_ticks(pid).map(|t| (pid, t)))
            .collect();
        Ok(Self { per_pid })
    }

    /// The same processes read again (only `/proc/<pid>/stat`, no subprocess).
    pub fn resample(&self) -> Self {
        let per_pid = self.per_pid.iter().filter_map(|&(pid, _)| process_ticks(pid).map(|t| (pid, t))).collect();
        Self { per_pid }
    }

    /// CPU microseconds the processes present in both samples spent between them.
    pub fn micros_until(&self, later: &Self) -> f64 {
        let ticks: u64 = later
            .per_pid
            .iter()
            .filter_map(|(pid, t)| self.per_pid.iter().find(|(p, _)| p == pid).map(|(_, t0)| t.saturating_sub(*t0)))
            .sum();
        ticks as f64 * 1e6 / ticks_per_sec()
    }
}

/// utime + stime of `pid` (fields 14 and 15 of `/proc/<pid>/stat`).
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

// ------------------------------------------------------------------ links

/// An interface's packet counters, as `ip -s link` shows them in its namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

impl LinkCounters {
    /// Reads `dev`'s counters in `ns` (through `ip -j -s link`: `/sys` from a
    /// thread in another namespace would show the host's devices).
    pub fn read(ns: &Namespace, dev: &str) -> anyhow::Result<Self> {
        let link = link_json(ns, dev, true)?;
        let stats = &link["stats64"];
        let get = |dir: &str, key: &str| stats[dir][key].as_u64().unwrap_or(0);
        Ok(Self {
            rx_packets: get("rx", "packets"),
            tx_packets: get("tx", "packets"),
            rx_dropped: get("rx", "dropped"),
            tx_dropped: get("tx", "dropped"),
        })
    }

    /// Counts since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            rx_dropped: self.rx_dropped.saturating_sub(earlier.rx_dropped),
            tx_dropped: self.tx_dropped.saturating_sub(earlier.tx_dropped),
        }
    }
}

/// `ip -j [-s] link show dev DEV` in `ns`, the one object of its array.
pub fn link_json(ns: &Namespace, dev: &str, stats: bool) -> anyhow::Result<serde_json::Value> {
    let mut cmd = vec!["ip", "-j"];
    if stats {
        cmd.push("-s");
    }
    cmd.extend(["link", "show", "dev", dev]);
    let out = ns.exec_ok(&cmd)?;
    let mut links: Vec<serde_json::Value> =
        serde_json::from_str(&out).with_context(|| format!("parsing `ip -j link show dev {dev}`: {out}"))?;
    ensure!(links.len() == 1, "`ip link show dev {dev}` in {} gave {} links", ns.name(), links.len());
    Ok(links.remove(0))
}

// ------------------------------------------------------------------ checks

/// How many new connections [`check_spread`] makes.
const SPREAD_PROBES: usize = 30;
/// How long a freshly started balancer may take to answer.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until `target` answers from the client, then makes
/// [`SPREAD_PROBES`] new connections and checks who answered: at least two
/// backends when `balanced`, otherwise only `b1`. Returns the spread for the
/// report. Not a timing assertion: a setup that does not balance would make
/// every figure after it meaningless.
pub fn check_spread(testbed: &Testbed, target: SocketAddr, balanced: bool) -> anyhow::Result<Spread> {
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        let first = testbed.client_requests(target, 1, true);
        if first.iter().all(Result::is_ok) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{target} did not answer within {SERVE_TIMEOUT:?}: {}", Spread::of(&first));
        }
        thread::sleep(Duration::from_millis(100));
    }
    let spread = Spread::of(&testbed.client_requests(target, SPREAD_PROBES, true));
    ensure!(spread.errors == 0, "requests to {target} failed: {spread}");
    if balanced {
        ensure!(spread.per_backend.len() >= 2, "{target} does not balance: {spread}");
    } else {
        ensure!(spread.count("b1") == SPREAD_PROBES, "{target} is not backend b1 alone: {spread}");
    }
    Ok(spread)
}

// ------------------------------------------------------------------ summaries

/// Median, minimum and maximum of some runs.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// The summary of `values`; NaN everywhere when there are none.
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self { median: f64::NAN, min: f64::NAN, max: f64::NAN };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { f64::midpoint(v[n / 2 - 1], v[n / 2]) };
        Self { median, min: v[0], max: v[n - 1] }
    }

    /// `median (min–max)` with `decimals` places; only the median when the
    /// range rounds to one value (e.g. a single run).
    pub fn show(&self, decimals: usize) -> String {
        self.show_unit(decimals, "")
    }

    /// Like [`Self::show`], with `unit` after each number: `97% (88–108%)`.
    pub fn show_unit(&self, decimals: usize, unit: &str) -> String {
        if self.median.is_nan() {
            return "–".to_owned();
        }
        let (m, lo, hi) = (
            format!("{:.decimals$}", self.median),
            format!("{:.decimals$}", self.min),
            format!("{:.decimals$}", self.max),
        );
        if lo == hi { format!("{m}{unit}") } else { format!("{m}{unit} ({lo}–{hi}{unit})") }
    }
}

/// `p`-th percentile (0–100) of sorted `values`, nearest rank.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A Markdown table from a header and rows.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", header.iter().map(|_| "---|").collect::<String>());
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_median_and_range() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Summary::of(&[1.0, 2.0, 3.0, 10.0]).median, 2.5);
        assert_eq!(s.show(1), "2.0 (1.0–3.0)");
        assert_eq!(Summary::of(&[5.0]).show(0), "5");
        assert_eq!(Summary::of(&[]).show(0), "–");
        assert_eq!(Summary::of(&[0.01, 0.02]).show(1), "0.0");
        assert_eq!(Summary::of(&[97.0, 88.0, 108.0]).show_unit(0, "%"), "97% (88–108%)");
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn process_ticks_reads_our_own_stat() {
        assert!(process_ticks(std::process::id()).is_some());
    }

    #[test]
    fn table_has_header_separator_and_rows() {
        let t = table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| 1 | 2 |\n");
    }
}

//! `control`: the control plane's cost.
//!
//! 1. Maglev: `lb-bench maglev` builds tables with the agent's own builder
//!    and drives its control plane (`Balancer`) through install and health
//!    changes, counting map writes, against a counting dataplane and the
//!    real kernel maps.
//! 2. Health checks: the real `lb` agent probes 1,000 HTTP backends every
//!    second. They are one `lb-testbed-backend` in the testbed's switch
//!    namespace listening on 0.0.0.0:8080, with 198.18.4.0/22 routed to its
//!    loopback as local (any address of it is the server's), so every probe
//!    is a real TCP connection and HTTP exchange across the gateway's veth,
//!    where the XDP program is attached. The agent's CPU time comes from
//!    `/proc/<pid>/stat` over fixed windows; the probes from the server
//!    namespace's TCP passive opens over the same windows.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_tests::{
    ChildGuard, Namespace, Testbed,
    agent::{ADMIN, Agent},
};
use serde_json::Value;

use super::{
    Options, Report,
    lb_bench::{self, Tools, number, of_kind},
    spread::{Spread, thousands},
};

/// Runs of each Maglev measurement.
const MAGLEV_RUNS: u32 = 5;
const QUICK_MAGLEV_RUNS: u32 = 2;
/// Bound on `lb-bench maglev` (a full run takes about a minute).
const MAGLEV_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Health-checked backends, and their probe interval.
const HC_BACKENDS: usize = 1000;
const HC_INTERVAL: Duration = Duration::from_secs(1);
const HC_TIMEOUT: Duration = Duration::from_millis(500);
/// Measurement windows of the agent's CPU time, and their length.
const HC_WINDOWS: usize = 3;
const HC_WINDOW: Duration = Duration::from_secs(10);
const QUICK_HC_WINDOW: Duration = Duration::from_secs(3);
/// Time after all backends are up before measuring, so start-up (the first
/// probes, 1,000 ring rebuilds) is not counted.
const HC_SETTLE: Duration = Duration::from_secs(3);
/// Bound on the agent seeing every backend up.
const HC_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// The health server: its address on the switch's bridge, and the range
/// routed to it and answered as local.
const HC_SERVER_ADDR: &str = "198.18.2.250";
const HC_RANGE: &str = "198.18.4.0/22";
const HC_PORT: u16 = 8080;

/// The `control` section.
///
/// # Errors
/// When a tool fails to build or run, or the health-check setup fails.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let tools = lb_bench::build()?;
    let quick = if opts.quick { " --quick" } else { "" };
    let mut body = format!("`cargo xtask bench --only control{quick}`\n\n");
    if opts.quick {
        body.push_str("**Quick run: for trying the harness, not for figures.**\n\n");
    }
    maglev(&mut body, &tools, opts).context("Maglev builds")?;
    health_checks(&mut body, &tools, opts).context("health-check CPU")?;
    Ok(Report { title: "Control plane".to_owned(), body })
}

// ------------------------------------------------------------------ Maglev

fn maglev(out: &mut String, tools: &Tools, opts: &Options) -> anyhow::Result<()> {
    let runs = if opts.quick { QUICK_MAGLEV_RUNS } else { MAGLEV_RUNS };
    let mut cmd = std::process::Command::new(&tools.lb_bench);
    cmd.args(["maglev", "--runs", &runs.to_string()]);
    let lines = lb_bench::run(cmd, MAGLEV_TIMEOUT)?;
    let _ = writeln!(
        out,
        "### Maglev tables\n\nOne VIP with N equal backends, ring size M; the agent's own builder \
         (`lb::control::maglev::build_ring`, `ring_diff`) and control plane (`lb::control::balancer::Balancer`). Times are \
         wall-clock medians of {runs} runs with (min–max), in milliseconds, on one core.\n"
    );
    builder_table(out, &lines)?;
    control_table(out, &lines)?;
    for refused in of_kind(&lines, "maglev_refused") {
        let _ = writeln!(
            out,
            "- M = {}, N = {}: the control plane refuses the config (\"{}\"), so only the builder is measured.",
            thousands(refused["ring"].as_u64().unwrap_or(0)),
            thousands(refused["backends"].as_u64().unwrap_or(0)),
            refused["reason"].as_str().unwrap_or("?")
        );
    }
    let _ = writeln!(
        out,
        "\nNoise: slot and write counts are exact, the same in every run. Times vary with what the other core \
         runs: the largest half-range of a builder timing in this run is ±{:.0}% of its median, from single slow \
         runs (the max column); the medians are the figures to compare. The kernel writes are one `bpf()` \
         syscall per slot, so on another machine they scale with its syscall cost.\n",
        worst_spread(&lines)
    );
    Ok(())
}

/// The `(ring, backends)` pairs measured, in output order.
fn configurations(lines: &[Value], kind: &str) -> Vec<(u64, u64)> {
    let mut seen = Vec::new();
    for line in of_kind(lines, kind) {
        let key = (line["ring"].as_u64().unwrap_or(0), line["backends"].as_u64().unwrap_or(0));
        if !seen.contains(&key) {
            seen.push(key);
        }
    }
    seen
}

fn spread_of<'a>(lines: impl Iterator<Item = &'a Value>, key: &str) -> anyhow::Result<Spread> {
    let values = lines.map(|line| number(line, key)).collect::<anyhow::Result<Vec<_>>>()?;
    Spread::of(values).with_context(|| format!("no samples of {key}"))
}

fn ms(spread: Spread) -> Spread {
    Spread { median: spread.median / 1e6, min: spread.min / 1e6, max: spread.max / 1e6, n: spread.n }
}

fn builder_table(out: &mut String, lines: &[Value]) -> anyhow::Result<()> {
    let _ = writeln!(
        out,
        "The builder alone: a full build, and the rebuild without one backend with its diff against the first \
         (the changed slots: what an update must write at least; ideal M/N).\n\n\
         | M | N | full build (ms) | slots | rebuild + diff, one backend gone (ms) | changed slots | ideal M/N | changed / ideal |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for (ring, backends) in configurations(lines, "maglev_builder") {
        let runs: Vec<&Value> = of_kind(lines, "maglev_builder")
            .filter(|l| l["ring"].as_u64() == Some(ring) && l["backends"].as_u64() == Some(backends))
            .collect();
        let build = ms(spread_of(runs.iter().copied(), "build_ns")?);
        let diff = ms(spread_of(runs.iter().copied(), "rebuild_and_diff_ns")?);
        let changed = spread_of(runs.iter().copied(), "changed_slots")?.median;
        let slots = spread_of(runs.iter().copied(), "full_slots")?.median;
        let ideal = ring as f64 / backends.max(1) as f64;
        let shown_ideal = if ideal >= 100.0 { thousands(ideal.round() as u64) } else { format!("{ideal:.1}") };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {shown_ideal} | {:.2} |",
            thousands(ring),
            thousands(backends),
            build.with(1),
            thousands(slots as u64),
            diff.with(1),
            thousands(changed as u64),
            changed / ideal
        );
    }
    out.push('\n');
    Ok(())
}

const STEPS: [(&str, &str); 4] = [
    ("install", "install (fresh maps)"),
    ("first_down", "first backend down"),
    ("back_up", "it comes back"),
    ("later_down", "another backend down"),
];

fn control_table(out: &mut String, lines: &[Value]) -> anyhow::Result<()> {
    let _ = writeln!(
        out,
        "The control plane from a fresh start, through `install` and three health changes: ring slots and \
         backend entries written (each one map write), and the time of each step with a dataplane that only \
         counts (the control plane's own CPU) and with lb_xdp's real maps (loaded, not attached; one syscall \
         per write).\n\n\
         | M | N | step | slots written | backend entries written | time, counting dataplane (ms) | time, kernel maps (ms) |\n\
         |---|---|---|---|---|---|---|"
    );
    for (ring, backends) in configurations(lines, "maglev_control") {
        for (step, label) in STEPS {
            let of = |dataplane: &'static str| {
                of_kind(lines, "maglev_control").filter(move |l| {
                    l["ring"].as_u64() == Some(ring)
                        && l["backends"].as_u64() == Some(backends)
                        && l["step"] == step
                        && l["dataplane"] == dataplane
                })
            };
            let slots = spread_of(of("counting"), "slots_written")?.median;
            let entries = spread_of(of("counting"), "backends_written")?.median;
            let counting = ms(spread_of(of("counting"), "ns")?);
            let kernel = ms(spread_of(of("kernel"), "ns")?);
            let _ = writeln!(
                out,
                "| {} | {} | {label} | {} | {} | {} | {} |",
                thousands(ring),
                thousands(backends),
                thousands(slots as u64),
                thousands(entries as u64),
                counting.with(1),
                kernel.with(1)
            );
        }
    }
    let _ = writeln!(
        out,
        "\nThe Balancer double-buffers each ring: a change is written into the generation packets are not reading, \
         so it writes the differences against that generation's last contents, the ring from two changes ago. The \
         first change after start therefore rewrites the whole standby ring (it was never written), and a later \
         single change writes about twice the builder's changed slots (it also undoes the previous change there). \
         A backend coming back restores exactly the ring the standby generation still holds, so it writes no slot, \
         only the VIP entry that flips the generation."
    );
    Ok(())
}

/// The largest relative spread of any timing, in percent.
fn worst_spread(lines: &[Value]) -> f64 {
    let mut worst = 0.0_f64;
    for (kind, key) in [("maglev_builder", "build_ns"), ("maglev_builder", "rebuild_and_diff_ns")] {
        for (ring, backends) in configurations(lines, kind) {
            let runs = of_kind(lines, kind)
                .filter(|l| l["ring"].as_u64() == Some(ring) && l["backends"].as_u64() == Some(backends));
            if let Ok(spread) = spread_of(runs, key) {
                worst = worst.max(spread.spread_pct());
            }
        }
    }
    worst
}

// ------------------------------------------------------------ health checks

/// One measurement window: the agent's CPU time and the probes answered.
struct Window {
    wall: Duration,
    cpu: Duration,
    probes: u64,
}

impl Window {
    fn cpu_pct(&self) -> f64 {
        self.cpu.as_secs_f64() / self.wall.as_secs_f64() * 100.0
    }

    fn us_per_probe(&self) -> f64 {
        if self.probes == 0 { f64::NAN } else { self.cpu.as_secs_f64() * 1e6 / self.probes as f64 }
    }

    fn probes_per_s(&self) -> f64 {
        self.probes as f64 / self.wall.as_secs_f64()
    }
}

fn health_checks(out: &mut String, tools: &Tools, opts: &Options) -> anyhow::Result<()> {
    let window = if opts.quick { QUICK_HC_WINDOW } else { HC_WINDOW };
    use_lb_binary(&tools.lb);
    // Drop order (reverse of declaration): the agent, then the server, then
    // the testbed that holds their namespaces.
    let testbed = Testbed::builder().backends(0).backend_bin(&tools.backend).build().context("the testbed")?;
    let _server = start_health_server(&testbed, &tools.backend)?;
    let agent = Agent::start(&testbed, &health_config(&testbed)).context("starting lb with 1,000 backends")?;
    let up_after = wait_all_up(&agent)?;
    thread::sleep(HC_SETTLE);
    let load_before = lb_bench::load_average();
    let windows = (0..HC_WINDOWS)
        .map(|_| measure_window(&agent, testbed.switch(), window))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let load = (load_before, lb_bench::load_average());
    let still_up = backends_up(&agent)?;
    let status_ms = status_latency(&agent)?;
    let cpu = Spread::of(windows.iter().map(Window::cpu_pct)).context("no windows")?;
    let per_probe = Spread::of(windows.iter().map(Window::us_per_probe)).context("no probes counted")?;
    let rate = Spread::of(windows.iter().map(Window::probes_per_s)).context("no windows")?;
    let _ = writeln!(
        out,
        "\n### Health checks\n\nThe `lb` agent (release build) with one VIP of {n} backends, HTTP checks \
         (`GET /health`, a new TCP connection each) every {interval} s, timeout {timeout} ms. The backends are one \
         `lb-testbed-backend` in the testbed's switch namespace answering on 0.0.0.0:{HC_PORT} for every address \
         of {HC_RANGE} (routed to it, local there), so every probe crosses the gateway's veth with the XDP program \
         attached. All {n} were up {up:.1} s after the agent served; measured after a further {settle} s, \
         over {HC_WINDOWS} windows of {w} s: the agent's user + system CPU time from `/proc/<pid>/stat` (all its \
         threads), the probes from the server namespace's TCP passive opens.\n\n\
         | backends | interval | probes per second | agent CPU (% of one core) | CPU per probe (µs) |\n\
         |---|---|---|---|---|\n\
         | {} | {interval} s | {} | {} | {} |\n\n\
         {up_at_end} of {n} backends were up at the end. Medians of the {HC_WINDOWS} windows with (min–max). \
         {pace} `GET /status` (all {n} backends in it) took {status} ms from the gateway namespace. Load average (1 min) of the shared machine: {load_before} before the windows, {load_after} after. \
         CPU time is counted in ticks of {tick} ms, small against a window of {w} s. The server, the agent and the \
         kernel's TCP work share the 2 cores; on separate hosts they would not compete, and the cost per probe is \
         the figure to scale from (e.g. 10,000 backends at 1 s would be ten times the probes).\n",
        thousands(HC_BACKENDS as u64),
        rate.with(0),
        cpu.with(1),
        per_probe.with(0),
        interval = HC_INTERVAL.as_secs(),
        timeout = HC_TIMEOUT.as_millis(),
        up = up_after.as_secs_f64(),
        settle = HC_SETTLE.as_secs(),
        w = window.as_secs(),
        tick = 1000 / clock_ticks_per_second().max(1),
        pace = pace(&rate),
        status = status_ms.with(1),
        n = thousands(HC_BACKENDS as u64),
        up_at_end = thousands(still_up as u64),
        load_before = load.0,
        load_after = load.1,
    );
    Ok(())
}

/// Whether the probes kept the configured pace, said plainly.
fn pace(rate: &Spread) -> String {
    let configured = HC_BACKENDS as f64 / HC_INTERVAL.as_secs_f64();
    if rate.min >= 0.9 * configured {
        format!("The probes kept the configured pace ({} per second) in every window.", thousands(configured as u64))
    } else {
        format!(
            "The probes fell short of the configured {} per second in at least one window (slowest \
             {:.0}/s): a slow probe delays that backend's next one, so a starved agent or server probes less; \
             the CPU per probe is the figure that does not depend on the pace.",
            thousands(configured as u64),
            rate.min
        )
    }
}

/// `Agent::start` runs `lb_tests::lb_bin()`, which reads `LB_BIN`: point it
/// at the release build unless the caller chose one.
pub(super) fn use_lb_binary(lb: &Path) {
    if std::env::var_os(lb_tests::LB_BIN_ENV).is_none() {
        // SAFETY: no other thread of xtask runs now (sections run one at a
        // time, their helper threads are joined), so none reads the
        // environment concurrently.
        unsafe { std::env::set_var(lb_tests::LB_BIN_ENV, lb) };
    }
}

/// The server that answers for all health-checked backends, and the routes
/// that lead to it; returns once it answers through the gateway.
fn start_health_server(testbed: &Testbed, backend_bin: &Path) -> anyhow::Result<ChildGuard> {
    let switch = testbed.switch();
    switch.exec_ok(&["ip", "addr", "add", &format!("{HC_SERVER_ADDR}/24"), "dev", testbed.bridge()])?;
    switch.exec_ok(&["ip", "route", "add", "local", HC_RANGE, "dev", "lo"])?;
    testbed.gateway().exec_ok(&["ip", "route", "add", HC_RANGE, "via", HC_SERVER_ADDR])?;
    let mut cmd = switch.command(backend_bin);
    cmd.args(["--name", "hc", "--http", &format!("0.0.0.0:{HC_PORT}"), "--udp", "0.0.0.0:8081"])
        .stdout(std::process::Stdio::null());
    let server = ChildGuard::spawn(cmd, "the health-check server")?;
    let first = backend_addr(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reachable = testbed
            .gateway()
            .enter(|| TcpStream::connect_timeout(&first.into(), Duration::from_millis(200)).is_ok())?;
        if reachable {
            return Ok(server);
        }
        if Instant::now() >= deadline {
            bail!("the health-check server did not answer on {first} from the gateway within 10 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Backend `i` (0-based): 198.18.4.1 to 198.18.7.250, port 8080.
fn backend_addr(i: usize) -> SocketAddrV4 {
    let third = 4 + u8::try_from(i / 250).unwrap_or(u8::MAX);
    let fourth = u8::try_from(i % 250 + 1).unwrap_or(u8::MAX);
    SocketAddrV4::new(Ipv4Addr::new(198, 18, third, fourth), HC_PORT)
}

/// The agent's config: the testbed's gateway interfaces, one TCP VIP `hc`
/// over the 1,000 backends with HTTP checks every second.
fn health_config(testbed: &Testbed) -> String {
    let mut toml = format!(
        "[agent]\ninterfaces = [\"{}\", \"{}\"]\nadmin_listen = \"{ADMIN}\"\nxdp_mode = \"native\"\n\n\
         [[vip]]\nname = \"hc\"\nlisten = \"{}\"\nprotocol = \"tcp\"\n\n\
         [vip.health_check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\n\n",
        testbed.gateway_client_if(),
        testbed.gateway_backend_if(),
        testbed.vip_http(),
        HC_INTERVAL.as_millis(),
        HC_TIMEOUT.as_millis()
    );
    for i in 0..HC_BACKENDS {
        let _ = writeln!(toml, "[[vip.backend]]\naddress = \"{}\"\n", backend_addr(i));
    }
    toml
}

/// Waits until the agent reports every backend up; returns how long it
/// took. While the first verdicts come in, each one rebuilds and rewrites
/// the ring under the lock `/status` also takes, so `/status` may miss the
/// client's timeout for a while: such errors are retried until the bound.
fn wait_all_up(agent: &Agent) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let last = match backends_up(agent) {
            Ok(up) if up == HC_BACKENDS => return Ok(start.elapsed()),
            Ok(up) => format!("{up} of {HC_BACKENDS} up"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            start.elapsed() < HC_UP_TIMEOUT,
            "not every backend up after {HC_UP_TIMEOUT:?} (last: {last}); lb's log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// How long `GET /status` takes with every backend in it (milliseconds,
/// three requests).
fn status_latency(agent: &Agent) -> anyhow::Result<Spread> {
    let times = (0..3)
        .map(|_| {
            let started = Instant::now();
            agent.status()?;
            Ok(started.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Spread::of(times).context("no /status timings")
}

/// How many of the VIP's backends the agent reports up.
fn backends_up(agent: &Agent) -> anyhow::Result<usize> {
    Ok(agent.backend_health("hc")?.iter().filter(|h| *h == "up").count())
}

/// The agent's CPU time and the probes the server accepted over `length`.
fn measure_window(agent: &Agent, server_ns: &Namespace, length: Duration) -> anyhow::Result<Window> {
    let (cpu0, opens0, t0) = (cpu_time(agent.pid())?, passive_opens(server_ns)?, Instant::now());
    thread::sleep(length);
    let (cpu1, opens1, wall) = (cpu_time(agent.pid())?, passive_opens(server_ns)?, t0.elapsed());
    Ok(Window { wall, cpu: cpu1.saturating_sub(cpu0), probes: opens1.saturating_sub(opens0) })
}

/// User plus system CPU time of process `pid`, all threads, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name, which may hold spaces:
    // state is field 3, utime 14 and stime 15 (proc(5)).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |n: usize| -> anyhow::Result<u64> {
        fields.get(n - 3).and_then(|f| f.parse().ok()).with_context(|| format!("field {n} of {path}"))
    };
    let ticks = tick(14)? + tick(15)?;
    let hz = clock_ticks_per_second().max(1);
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100)
}

/// TCP connections accepted so far in namespace `ns` (`PassiveOpens` in
/// its `/proc/net/snmp`).
fn passive_opens(ns: &Namespace) -> anyhow::Result<u64> {
    let snmp = ns.exec_ok(&["cat", "/proc/net/snmp"])?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().context("no Tcp: header")?, tcp.next().context("no Tcp: values")?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "PassiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .context("no PassiveOpens in /proc/net/snmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_addresses_stay_in_their_range() {
        assert_eq!(backend_addr(0).to_string(), "198.18.4.1:8080");
        assert_eq!(backend_addr(249).to_string(), "198.18.4.250:8080");
        assert_eq!(backend_addr(999).to_string(), "198.18.7.250:8080");
    }
}

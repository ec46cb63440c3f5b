//! `e2e`: requests per second, latency and CPU per request through the
//! namespace testbed, for lb (XDP), nftables DNAT, HAProxy, nginx's stream
//! module and the direct path, with kept-alive connections and with a new
//! connection per request.
//!
//! Each measurement gets a fresh testbed (3 backends) and a fresh balancer,
//! so no conntrack, NAT or TIME_WAIT state carries over. The setups take
//! turns inside each round (all five with keep-alive, then all five with a
//! new connection each, then the next round), so slow drift of the machine
//! (the direct figure alone drifts 15-20% over minutes on these machines)
//! hits them alike;
//! the ratios to the direct path are taken within a round.
//!
//! CPU: the kernel-path balancers do their work in softirq, which belongs to
//! no process (and this kernel has no IRQ time accounting, so softirq run on
//! a process's way out of a syscall is charged to that process). So the
//! figure is whole-machine CPU from `/proc/stat` (user, nice, system, irq and
//! softirq) over the measured window, divided by the requests answered in
//! it: client, gateway and backends together. The direct path pays the same
//! client, backend and forwarding costs with no balancing, so a setup's
//! increment over direct is what balancing costs. Processes in the gateway
//! namespace (lb's agent, HAProxy, nginx's workers) are also counted on their
//! own, from `/proc/<pid>/stat`.

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;
use lb_tests::Spread;

use super::{
    Report,
    baselines::{self, Balancer, Params},
    harness::{self, MachineCpu, NamespaceCpu, Summary, table},
    loadgen::{self, Load, Mark},
};

/// Backends behind every balancer.
const BACKENDS: usize = 3;
/// Concurrent connections and client threads, as `wrk -t2 -c64` would use.
const CONNECTIONS: usize = 64;
const CLIENT_THREADS: usize = 2;
/// A request not answered within this counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on requests in one measurement, far above what 10 s can reach here.
const MAX_REQUESTS: u64 = 5_000_000;
/// The client's ephemeral ports: wide, so a new-connection run reuses a
/// source port as late as possible.
const CLIENT_PORT_RANGE: &str = "1024 65535";

/// Runs, window and warm-up: full or `--quick`.
#[derive(Debug, Clone, Copy)]
struct Plan {
    runs: usize,
    warmup: Duration,
    duration: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan { runs: 1, warmup: Duration::from_millis(300), duration: Duration::from_secs(2) }
        } else {
            Plan { runs: 3, warmup: Duration::from_secs(1), duration: Duration::from_secs(10) }
        }
    }
}

/// Connection handling under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    KeepAlive,
    NewConnection,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::KeepAlive, Mode::NewConnection];

    fn title(self) -> &'static str {
        match self {
            Mode::KeepAlive => "Kept-alive connections",
            Mode::NewConnection => "A new connection per request (`Connection: close`)",
        }
    }
}

/// One measurement of one setup.
#[derive(Debug, Clone)]
struct Sample {
    balancer: Balancer,
    mode: Mode,
    round: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    machine_us_per_req: f64,
    gateway_us_per_req: f64,
    machine_busy_pct: f64,
    errors: u64,
    spread: Spread,
    commands: Vec<String>,
}

/// The `e2e` section.
pub fn run(quick: bool) -> anyhow::Result<Report> {
    let plan = Plan::new(quick);
    let load_before = harness::load_average();
    let mut samples = Vec::new();
    for round in 0..plan.runs {
        for mode in Mode::ALL {
            for balancer in Balancer::ALL {
                println!("bench e2e: round {}/{}, {:?}, {}", round + 1, plan.runs, mode, balancer.name());
                let sample = measure(balancer, mode, round, plan)
                    .with_context(|| format!("e2e: {} with {mode:?}, round {}", balancer.name(), round + 1))?;
                println!(
                    "  {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {:.0} CPU-µs/req, {} errors",
                    sample.rps, sample.p50_ms, sample.p99_ms, sample.machine_us_per_req, sample.errors
                );
                samples.push(sample);
            }
        }
    }
    let mut wrk = Vec::new();
    for balancer in [Balancer::Lb, Balancer::Direct] {
        println!("bench e2e: wrk cross-check, {}", balancer.name());
        wrk.push(wrk_check(balancer, plan).with_context(|| format!("e2e: wrk on {}", balancer.name()))?);
    }
    let load = format!(
        "{load_before} before the section ({} after it, which counts its own threads too)",
        harness::load_average()
    );
    let mut body = body(plan, &samples, &load);
    body.push_str(&wrk_table(&wrk, &samples, plan));
    Ok(Report { title: "End to end".to_owned(), body })
}

/// A fresh testbed, `balancer` on it, a balance check, then the load.
fn measure(balancer: Balancer, mode: Mode, round: usize, plan: Plan) -> anyhow::Result<Sample> {
    let testbed = harness::testbed(BACKENDS)?;
    testbed.client().set_sysctl("net.ipv4.ip_local_port_range", CLIENT_PORT_RANGE)?;
    let running = baselines::start(balancer, &testbed, &Params::http(&testbed))?;
    let spread = harness::check_spread(&testbed, running.target(), balancer.balances())
        .with_context(|| baselines::proxy_log(&running))?;
    let load = Load {
        target: running.target(),
        connections: CONNECTIONS,
        threads: CLIENT_THREADS,
        keep_alive: mode == Mode::KeepAlive,
        warmup: plan.warmup,
        duration: plan.duration,
        max_requests: MAX_REQUESTS,
        io_timeout: IO_TIMEOUT,
    };
    let gateway_start = NamespaceCpu::now(testbed.gateway())?;
    let mut machine = (None, None);
    let mut gateway_end = None;
    let result = loadgen::closed_loop(testbed.client(), &load, |mark| match mark {
        Mark::WindowStart => machine.0 = MachineCpu::now().ok(),
        Mark::WindowEnd => {
            machine.1 = MachineCpu::now().ok();
            gateway_end = Some(gateway_start.resample());
        }
    })?;
    let (Some(m0), Some(m1), Some(g1)) = (machine.0, machine.1, gateway_end) else {
        anyhow::bail!("could not read the CPU clocks at the window's edges");
    };
    let answered = result.completed.max(1) as f64;
    let machine_us = m0.micros_until(m1);
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    Ok(Sample {
        balancer,
        mode,
        round,
        rps: result.requests_per_sec(),
        p50_ms: harness::percentile(&result.latencies_us, 50.0) / 1000.0,
        p99_ms: harness::percentile(&result.latencies_us, 99.0) / 1000.0,
        machine_us_per_req: machine_us / answered,
        gateway_us_per_req: gateway_start.micros_until(&g1) / answered,
        machine_busy_pct: 100.0 * machine_us / (plan.duration.as_secs_f64() * 1e6 * cores),
        errors: result.errors,
        spread,
        commands: running.commands.clone(),
    })
}

// ------------------------------------------------------------------ wrk

/// wrk's figures for one setup with kept-alive connections.
#[derive(Debug, Clone)]
struct WrkSample {
    balancer: Balancer,
    command: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs wrk with kept-alive connections on a fresh testbed: a check that
/// our client measures what a known tool measures, where wrk is honest.
fn wrk_check(balancer: Balancer, plan: Plan) -> anyhow::Result<WrkSample> {
    let testbed = harness::testbed(BACKENDS)?;
    let running = baselines::start(balancer, &testbed, &Params::http(&testbed))?;
    harness::check_spread(&testbed, running.target(), balancer.balances())?;
    let args = [
        format!("-t{CLIENT_THREADS}"),
        format!("-c{CONNECTIONS}"),
        format!("-d{}s", plan.duration.as_secs()),
        "--latency".to_owned(),
        format!("http://{}/", running.target()),
    ];
    let mut cmd = vec!["wrk"];
    cmd.extend(args.iter().map(String::as_str));
    let out = testbed.client().exec_ok(&cmd)?;
    let (rps, p50_ms, p99_ms) = parse_wrk(&out).with_context(|| format!("parsing wrk's output:\n{out}"))?;
    Ok(WrkSample { balancer, command: cmd.join(" "), rps, p50_ms, p99_ms })
}

/// Requests/sec and the 50% and 99% latencies (ms) from `wrk --latency` output.
fn parse_wrk(out: &str) -> anyhow::Result<(f64, f64, f64)> {
    let field = |prefix: &str| -> anyhow::Result<&str> {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("no line starting with {prefix:?}"))
    };
    let rps: f64 = field("Requests/sec:")?.parse().context("Requests/sec")?;
    Ok((rps, wrk_millis(field("50%")?)?, wrk_millis(field("99%")?)?))
}

/// `812.00us`, `1.23ms` or `1.01s` in milliseconds.
fn wrk_millis(value: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1e3)
    } else {
        anyhow::bail!("unknown unit in {value:?}");
    };
    Ok(number.parse::<f64>().with_context(|| format!("latency {value:?}"))? * scale)
}

/// Mean latency (ms) that `rps` implies for [`CONNECTIONS`] closed-loop connections.
fn little_ms(rps: f64) -> f64 {
    CONNECTIONS as f64 / rps * 1e3
}

fn wrk_table(wrk: &[WrkSample], samples: &[Sample], plan: Plan) -> String {
    let mut out = format!(
        "\n### Cross-check with wrk (kept-alive connections, one {} s run each, fresh testbed)\n\n",
        plan.duration.as_secs()
    );
    let ours = |b: Balancer, f: fn(&Sample) -> f64| {
        let v: Vec<f64> = samples.iter().filter(|s| s.balancer == b && s.mode == Mode::KeepAlive).map(f).collect();
        Summary::of(&v)
    };
    let rows: Vec<Vec<String>> = wrk
        .iter()
        .map(|w| {
            vec![
                w.balancer.name().to_owned(),
                format!("`{}`", w.command),
                format!("{:.0}", w.rps),
                format!("{:.2}", w.p50_ms),
                format!("{:.2}", w.p99_ms),
                ours(w.balancer, |s| s.rps).show(0),
                ours(w.balancer, |s| s.p50_ms).show(2),
                format!("{:.2} / {:.2}", little_ms(w.rps), little_ms(ours(w.balancer, |s| s.rps).median)),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "setup",
            "command (client namespace)",
            "wrk req/s",
            "wrk p50 ms",
            "wrk p99 ms",
            "ours req/s",
            "ours p50 ms",
            "mean by Little's law, wrk / ours, ms",
        ],
        &rows,
    ));
    out.push_str(
        "\nThe last column is connections / req/s, the mean time a request takes from one connection's point of view. \
         Ours reports about that; wrk less, because after an answer it waits for its next event-loop turn to write the next request \
         and only then starts that request's clock. \
         wrk is not used for the new-connection figures: it starts a request's clock after the TCP handshake \
         (`c->start` is set when the request is written), so it would leave out the balancer's new-flow work from the latency.\n",
    );
    out
}

// ------------------------------------------------------------------ report

fn body(plan: Plan, samples: &[Sample], load: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", harness::command_line());
    let _ = writeln!(
        out,
        "Client: our epoll HTTP/1.1 client (`xtask/src/bench/loadgen.rs`), {CONNECTIONS} connections on {CLIENT_THREADS} threads, \
         `GET /` of the testbed backends (about 100-byte answers), {} s measured after {:.1} s of warm-up, \
         median of {} round(s) with min–max. Latency is from `connect` for a new connection, from the write for a kept-alive one. \
         Each measurement on a fresh testbed ({BACKENDS} backends) and a fresh balancer. Load average (1, 5, 15 min) of the shared machine: {load}.\n",
        plan.duration.as_secs(),
        plan.warmup.as_secs_f64(),
        plan.runs
    );
    let _ = writeln!(out, "Setups (configs in `bench/`, filled in with the testbed's addresses):\n");
    for balancer in Balancer::ALL {
        let commands =
            samples.iter().find(|s| s.balancer == balancer).map(|s| s.commands.join("; ")).unwrap_or_default();
        let spread = samples.iter().find(|s| s.balancer == balancer).map(|s| s.spread.to_string()).unwrap_or_default();
        let how = match balancer {
            Balancer::Direct => "nothing on the gateway but routing".to_owned(),
            Balancer::Lb => format!(
                "`{commands}` with the end-to-end tests' config (`lb_tests::agent::config_for`: VIP web over the {BACKENDS} backends, HTTP health checks every 500 ms)"
            ),
            _ => format!("`{commands}`"),
        };
        let _ = writeln!(out, "- {}: {how}; check before the first run: {spread}", balancer.name());
    }
    for mode in Mode::ALL {
        let _ = writeln!(out, "\n### {}\n", mode.title());
        out.push_str(&mode_table(samples, mode));
    }
    out.push_str(NOTES);
    if plan.runs > 1 {
        out.push_str(&noise_line(samples));
    }
    out
}

/// One figure of a sample.
type Metric = fn(&Sample) -> f64;

/// How noisy each figure was in this run: its spread (max − min) relative
/// to its median, for each setup, and the median of that over the setups.
fn noise_line(samples: &[Sample]) -> String {
    let metrics: [(&str, Metric); 4] =
        [("req/s", |s| s.rps), ("p50", |s| s.p50_ms), ("p99", |s| s.p99_ms), ("CPU-µs/req", |s| s.machine_us_per_req)];
    let mut out = String::from("- Spread (max − min) / median, the median over the five setups:");
    for mode in Mode::ALL {
        let parts: Vec<String> = metrics
            .iter()
            .map(|(name, f)| {
                let spreads: Vec<f64> = Balancer::ALL
                    .iter()
                    .map(|&b| {
                        let v: Vec<f64> = samples.iter().filter(|s| s.mode == mode && s.balancer == b).map(f).collect();
                        let s = Summary::of(&v);
                        (s.max - s.min) / s.median
                    })
                    .collect();
                format!("{name} {:.0}%", 100.0 * Summary::of(&spreads).median)
            })
            .collect();
        let label = if mode == Mode::KeepAlive { "kept-alive" } else { "new connection" };
        let _ = write!(out, " {label}: {};", parts.join(", "));
    }
    out.pop();
    out.push_str(".\n");
    out
}

fn mode_table(samples: &[Sample], mode: Mode) -> String {
    let header = [
        "setup",
        "req/s",
        "of direct",
        "p50 ms",
        "p99 ms",
        "machine CPU-µs/req",
        "over direct",
        "gateway processes CPU-µs/req",
        "machine busy",
        "errors",
    ];
    let of = |b: Balancer| samples.iter().filter(|s| s.mode == mode && s.balancer == b).collect::<Vec<_>>();
    let direct = of(Balancer::Direct);
    let rows = Balancer::ALL
        .iter()
        .map(|&b| {
            let runs = of(b);
            let pick = |f: fn(&Sample) -> f64| Summary::of(&runs.iter().map(|s| f(s)).collect::<Vec<_>>());
            // Ratios and differences to the direct path of the same round.
            let paired = |f: fn(&Sample, &Sample) -> f64| {
                let v: Vec<f64> =
                    runs.iter().filter_map(|s| direct.iter().find(|d| d.round == s.round).map(|d| f(s, d))).collect();
                Summary::of(&v)
            };
            vec![
                b.name().to_owned(),
                pick(|s| s.rps).show(0),
                paired(|s, d| 100.0 * s.rps / d.rps).show_unit(0, "%"),
                pick(|s| s.p50_ms).show(2),
                pick(|s| s.p99_ms).show(2),
                pick(|s| s.machine_us_per_req).show(1),
                paired(|s, d| s.machine_us_per_req - d.machine_us_per_req).show(1),
                pick(|s| s.gateway_us_per_req).show(1),
                pick(|s| s.machine_busy_pct).show_unit(0, "%"),
                runs.iter().map(|s| s.errors).sum::<u64>().to_string(),
            ]
        })
        .collect::<Vec<_>>();
    table(&header, &rows)
}

const NOTES: &str = "
How to read it:
- *machine CPU-µs/req*: busy CPU time of the whole machine (all cores, `/proc/stat`) during the window, per answered request: client, gateway and backends together. *over direct*: minus the direct path's figure of the same round, i.e. what balancing adds per request (for the proxies that includes their second TCP connection). *gateway processes*: CPU of the processes in the gateway namespace (lb's agent, which only health-checks; HAProxy; nginx's workers) from `/proc/<pid>/stat`; lb's and nftables' data paths run in softirq and never show there. A proxy's figure can exceed its increment over direct: without IRQ time accounting, the softirq work its sends trigger (the packet's way into the backend's socket, across the bridge) is charged to the proxy, work the client's process is charged for on the direct path.
- The direct path is the ceiling for balancing, not for forwarding: its packets still cross the gateway through the kernel's IP forwarding, while lb's XDP program moves them between the gateway's veths without the gateway's stack (no socket buffer, routing or netfilter there). So lb can match or pass the direct path, and its *over direct* can be negative.
- The machine has 2 cores for everything: the client, the gateway and the 3 backends (one thread per connection) compete, so the machine is the bottleneck at about 100% busy, and req/s mostly tracks CPU-µs/req: a balancer that costs more per request leaves fewer cycles to the client and the servers. On separate hosts the client and backends would not take the gateway's cycles; the gateway's own limit would show, and a proxy's extra work per request would cap the rate instead of sharing the cores.
- `/proc/stat` counts the whole machine, other users' work included: on a shared machine the figures are noisy, and the spreads above and the line below show how much. The closed-loop client under-reports latency under overload, alike for every setup.
- With a new connection per request the client reuses source ports within a run; TIME_WAIT sockets pile up on whichever side closed first, and the fresh testbed per measurement keeps them from carrying over.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_latency_distribution_and_rate() {
        let out = "Running 2s test @ http://198.18.2.11:8080/\n  Latency Distribution\n     50%  812.00us\n     75%    1.10ms\n     99%    3.52ms\n  \
                   100 requests in 2.00s\nRequests/sec:  51234.56\nTransfer/sec:      6.01MB\n";
        let (rps, p50, p99) = parse_wrk(out).expect("parsed");
        assert!((rps - 51234.56).abs() < 1e-9);
        assert!((p50 - 0.812).abs() < 1e-9 && (p99 - 3.52).abs() < 1e-9);
        assert!((wrk_millis("1.5s").expect("s") - 1500.0).abs() < 1e-9);
        assert!(wrk_millis("3h").is_err());
    }
}

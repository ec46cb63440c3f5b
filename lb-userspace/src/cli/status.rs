//! `lb status`: ask a running agent how its services are doing.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::http;
use crate::{
    api::{Status, status::Traffic},
    dataplane::pins,
};

/// Width of the backend address column: an IPv4 `address:port` fits.
const MIN_ADDRESS_WIDTH: usize = 22;

/// Print a table of each VIP with its backends' health, admin state (ready, drain,
/// maint), weight (`*`: set at runtime), role, rates (`--rates`, `--watch`),
/// active flows and check latency, from a
/// running agent's admin API; or, when no agent answers, whether the data
/// path still runs pinned without one.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent's admin address (agent.admin_listen).
    #[arg(long, default_value_t = crate::config::DEFAULT_ADMIN_LISTEN)]
    pub(super) admin: SocketAddr,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Show rates per second: read the status twice, `--interval` apart.
    #[arg(long)]
    rates: bool,
    /// Print the table with rates every `--interval`, until interrupted.
    #[arg(long)]
    watch: bool,
    /// Time between the two reads of `--rates`, and between tables of `--watch`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// The pin directory (agent.pin_dir): when no agent answers, what is
    /// pinned there says whether the data path still runs without one.
    #[arg(long, default_value = crate::config::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let body = match get(args.admin, "/status") {
        Ok(body) => body,
        Err(error) => bail!("{}", no_agent(&args, &error)),
    };
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let mut before = parse(&body)?;
    let mut at = Instant::now();
    let interval = args.interval.max(Duration::from_millis(100));
    loop {
        if !args.rates && !args.watch {
            print!("{}", table(&before, None));
            return Ok(());
        }
        std::thread::sleep(interval);
        let now = parse(&get(args.admin, "/status")?)?;
        let took = at.elapsed();
        at = Instant::now();
        if args.watch {
            // Clear the screen and go home, as watch(1) does.
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", table(&now, Some((&before, took))));
        if !args.watch {
            return Ok(());
        }
        before = now;
    }
}

fn parse(body: &str) -> anyhow::Result<Status> {
    serde_json::from_str(body).context("the agent's /status is not what this lb expects")
}

/// Per-second rates of one backend's counters between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Rates {
    packets_in: f64,
    packets_out: f64,
    bits: f64,
    flows: f64,
}

impl Rates {
    fn between(now: &Traffic, before: &Traffic, took: Duration) -> Self {
        let secs = took.as_secs_f64().max(1e-3);
        // Counters only grow; a smaller one (a restarted agent) counts as 0.
        let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        Rates {
            packets_in: per_s(now.packets_in, before.packets_in),
            packets_out: per_s(now.packets_out, before.packets_out),
            bits: per_s(now.bytes, before.bytes) * 8.0,
            flows: per_s(now.new_flows, before.new_flows),
        }
    }
}

/// A number with an SI suffix in at most 6 columns: `950`, `12.3k`, `4.5M`.
fn si(value: f64) -> String {
    let (v, suffix) = match value {
        v if v >= 1e9 => (v / 1e9, "G"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => return format!("{v:.0}"),
    };
    format!("{v:.1}{suffix}")
}

/// The status as a table: a header, then per VIP a line and one row per
/// backend. With a previous snapshot and the time between, rates per second;
/// without, `-` in their columns.
fn table(status: &Status, previous: Option<(&Status, Duration)>) -> String {
    use std::fmt::Write as _;
    let width = status
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address.len()))
        .max()
        .unwrap_or(0)
        .max(MIN_ADDRESS_WIDTH);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<width$} {:<7} {:<5} {:>6} {:<7} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8}  LAST CHECK",
        "BACKEND", "HEALTH", "ADMIN", "WEIGHT", "ROLE", "PKT/S IN", "PKT/S OUT", "BIT/S", "FLOW/S", "ACTIVE", "CHECK",
    );
    for vip in &status.vips {
        let _ = writeln!(
            out,
            "{} {} {} {}  {}/{} serving, {} up  {} pkts  {} flows",
            vip.name,
            vip.protocol,
            vip.listen,
            vip.scheduler,
            vip.backends_serving,
            vip.backends.len(),
            vip.backends_up,
            vip.traffic.packets,
            vip.traffic.new_flows
        );
        let before_vip = previous.and_then(|(p, took)| p.vips.iter().find(|v| v.name == vip.name).map(|v| (v, took)));
        for b in &vip.backends {
            let weight = format!("{}{}", b.weight, if b.weight_set_at_runtime { "*" } else { "" });
            let role = if b.standby() {
                "standby"
            } else if b.backup {
                "backup"
            } else {
                ""
            };
            let rates = before_vip.and_then(|(v, took)| {
                let old = v.backends.iter().find(|o| o.address == b.address)?;
                Some(Rates::between(&b.traffic, &old.traffic, took))
            });
            let show = |f: fn(&Rates) -> f64| rates.as_ref().map_or_else(|| "-".to_owned(), |r| si(f(r)));
            let check =
                if b.checks.count > 0 { format!("{:.1}ms", b.checks.last_seconds * 1e3) } else { "-".to_owned() };
            let _ = writeln!(
                out,
                "  {:<width$} {:<7} {:<5} {:>6} {:<7} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8}  {}",
                b.address,
                b.health,
                b.admin,
                weight,
                role,
                show(|r| r.packets_in),
                show(|r| r.packets_out),
                show(|r| r.bits),
                show(|r| r.flows),
                b.active_flows,
                check,
                b.last_check.as_deref().unwrap_or("")
            );
            if let Some(reason) = &b.down_reason {
                println!("  {:<width$} down: {reason}", "");
            }
        }
    }
    out
}

/// What to say when no agent answers at `args.admin`: whether the data path
/// is pinned and attached without an agent, or nothing runs at all.
fn no_agent(args: &Args, error: &anyhow::Error) -> String {
    let dir = args.pin_dir.display();
    let asked = format!("no agent answers at {} ({error:#})", args.admin);
    let links = pins::pinned_links(&args.pin_dir).unwrap_or_default();
    if pins::agent_holds(&args.pin_dir) {
        return format!("{asked}; an agent holds {dir}, so it is starting, or serves another admin address");
    }
    if links.is_empty() {
        if args.pin_dir.exists() {
            return format!("{asked}; {dir} holds pinned maps but no link: nothing is attached");
        }
        return format!("{asked}; nothing is pinned at {dir}: the data path is not running");
    }
    format!(
        "{asked}.\nThe data path is pinned at {dir} and attached to {}, but no agent runs: it forwards on its \
         last state, with no health checks, so no failover (a backend that dies keeps its flows and its share \
         of new ones). Start `lb run` to adopt it, or run `lb unload --pin-dir {dir}` to remove it.",
        links.join(", ")
    )
}

/// `GET path` from the admin server; the body of a 200 answer.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let ask = http::Ask { method: "GET", path, json: None, timeout: Duration::from_secs(5) };
    let answer = http::over_tcp(addr, &ask)?;
    if answer.status != 200 {
        bail!("GET {path}: HTTP status {}: {}", answer.status, answer.body.trim());
    }
    Ok(answer.body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::{BackendStatus, VipStatus};

    fn backend(address: &str, traffic: Traffic) -> BackendStatus {
        BackendStatus {
            address: address.into(),
            weight: 2,
            backup: false,
            health: "up".into(),
            last_check: Some("ok".into()),
            traffic,
            admin: "ready".into(),
            weight_set_at_runtime: true,
            active_flows: 3,
            ring_slots: 1,
            checks: crate::api::status::CheckStats::default(),
            health_changes: 1,
            last_change_unix_seconds: None,
            down_reason: None,
            handshakes: crate::api::status::Handshakes::default(),
            passive_failures: 0,
        }
    }

    fn status(traffic: Traffic) -> Status {
        Status {
            vips: vec![VipStatus {
                name: "web".into(),
                listen: "198.18.0.100:80".into(),
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                backends_up: 1,
                backends_serving: 1,
                traffic,
                backends: vec![backend("198.18.2.11:8080", traffic)],
                limited: None,
            }],
            ..Status::default()
        }
    }

    #[test]
    fn the_table_has_a_header_and_rates_per_second() {
        let before = status(Traffic { packets_in: 100, bytes: 1000, ..Traffic::default() });
        let now =
            status(Traffic { packets_in: 2100, packets_out: 500, bytes: 126_000, new_flows: 10, ..Traffic::default() });
        let text = table(&now, Some((&before, Duration::from_secs(2))));
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
        assert_eq!(header[..3], ["BACKEND", "HEALTH", "ADMIN"], "{text}");
        let row: Vec<&str> = text.lines().nth(2).expect("backend row").split_whitespace().collect();
        // 2000 packets in 2 s; 250/s out; 125,000 bytes = 1 Mbit in 2 s; 5 flows/s.
        assert_eq!(row[..9], ["198.18.2.11:8080", "up", "ready", "2*", "1.0k", "250", "500.0k", "5", "3"], "{text}");
    }

    #[test]
    fn without_a_previous_snapshot_rates_are_dashes() {
        let text = table(&status(Traffic::default()), None);
        let row: Vec<&str> = text.lines().nth(2).expect("backend row").split_whitespace().collect();
        assert_eq!(row[4..8], ["-", "-", "-", "-"], "{text}");
    }
}

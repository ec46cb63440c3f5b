//! `lb status`: ask a running agent how its services are doing.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{api::Status, dataplane::pins};

/// Width of the backend address column: an IPv4 `address:port` fits.
const MIN_ADDRESS_WIDTH: usize = 22;

/// Print each VIP with its backends' health, admin state (ready, drain,
/// maint), weight (`*`: set at runtime), traffic and active flows, from a
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
    let status: Status = serde_json::from_str(&body).context("the agent's /status is not what this lb expects")?;
    for vip in &status.vips {
        println!(
            "{} {} {} {}  {}/{} up  {} pkts  {} flows",
            vip.name,
            vip.protocol,
            vip.listen,
            vip.scheduler,
            vip.backends_up,
            vip.backends.len(),
            vip.traffic.packets,
            vip.traffic.new_flows
        );
        // IPv6 backends ("[2001:db8:2::11]:8080") are wider than IPv4 ones.
        let width = vip.backends.iter().map(|b| b.address.len()).max().unwrap_or(0).max(MIN_ADDRESS_WIDTH);
        for b in &vip.backends {
            let weight = format!("{}{}", b.weight, if b.weight_set_at_runtime { "*" } else { "" });
            println!(
                "  {:<width$} {:<7} {:<5} w={:<4} {:<6} {:>10} pkts {:>8} flows {:>6} active  {}",
                b.address,
                b.health,
                b.admin,
                weight,
                if b.backup { "backup" } else { "" },
                b.traffic.packets,
                b.traffic.new_flows,
                b.active_flows,
                b.last_check.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
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

/// A minimal HTTP/1.1 GET, enough for our own admin server.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or("empty response"));
    }
    Ok(body.to_owned())
}

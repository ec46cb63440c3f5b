//! `lb backend`: runtime changes to one backend, without editing the config.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::control::{SocketArgs, print_answer, request};
use crate::api::{
    Status,
    control::{BackendAction, BackendRequest},
};

/// Drain, disable, enable or reweight a backend of a VIP at runtime. Changes
/// are kept (in agent.state_file) across reloads and restarts until cleared:
/// `enable` clears drain and disable, `weight ... config` clears a weight.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// No new flows; existing flows continue (what weight 0 does).
    Drain(Target),
    /// Maintenance: down at once, its flows move to other backends.
    Disable(Target),
    /// Undo drain and disable.
    Enable(Target),
    /// Set the weight (0 to 10000), or `config` to go back to the file's.
    Weight {
        #[command(flatten)]
        target: Target,
        /// The weight, or `config`.
        weight: String,
    },
    /// Exit 0 once the backend carries no flows (e.g. after `drain`), or
    /// non-zero after the timeout.
    WaitDrained {
        #[command(flatten)]
        target: Target,
        /// How long to wait, e.g. `60s`.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// A backend of a VIP.
#[derive(Debug, clap::Args)]
struct Target {
    /// The VIP's name.
    vip: String,
    /// The backend's address and port, as in the config.
    address: SocketAddr,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let socket = args.socket.path()?;
    let (target, action, weight) = match args.command {
        Command::Drain(target) => (target, BackendAction::Drain, None),
        Command::Disable(target) => (target, BackendAction::Disable, None),
        Command::Enable(target) => (target, BackendAction::Enable, None),
        Command::Weight { target, weight } => {
            let weight = match weight.as_str() {
                "config" => None,
                n => Some(
                    n.parse::<u32>().with_context(|| format!("weight {n:?}: a number from 0 to 10000, or config"))?,
                ),
            };
            (target, BackendAction::Weight, weight)
        }
        Command::WaitDrained { target, timeout } => return wait_drained(&socket, &target, timeout),
    };
    let body = serde_json::to_string(&BackendRequest { vip: target.vip, address: target.address, action, weight })?;
    let (code, answer) = request(&socket, "POST", "/backend", &body)?;
    print_answer(code, &answer)
}

/// How often `wait-drained` asks; the agent counts flows at most every 5 s.
const POLL: Duration = Duration::from_secs(1);

fn wait_drained(socket: &std::path::Path, target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        let asked = started.elapsed();
        let (code, body) = request(socket, "GET", "/status", "")?;
        if code != 200 {
            bail!("the agent answered {code}: {}", body.trim());
        }
        let status: Status = serde_json::from_str(&body).context("the agent's /status is not what this lb expects")?;
        let vip =
            status.vips.iter().find(|v| v.name == target.vip).with_context(|| format!("no vip {}", target.vip))?;
        let address = target.address.to_string();
        let backend = vip
            .backends
            .iter()
            .find(|b| b.address == address)
            .with_context(|| format!("vip {} has no backend {address}", target.vip))?;
        // A count that began before this command may predate the drain.
        let fresh = Duration::from_millis(status.conntrack.counted_ms_ago) < asked;
        if backend.active_flows == 0 && fresh {
            println!("vip {} backend {address}: drained (no active flows)", target.vip);
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "vip {} backend {address}: still {} active flows after {} (as of a count of the connection table \
                 begun {} ms before the last answer)",
                target.vip,
                backend.active_flows,
                humantime::format_duration(timeout),
                status.conntrack.counted_ms_ago
            );
        }
        std::thread::sleep(POLL);
    }
}

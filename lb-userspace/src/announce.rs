//! Announcing VIP addresses to the routers (`[announce]`), through a
//! routing daemon the operator already runs: the agent keeps one route per
//! VIP address it serves, `blackhole ADDR/32` (or `/128`) with protocol
//! [`ROUTE_PROTOCOL`], in a kernel routing table of its own; BIRD's kernel
//! protocol imports that table (`learn`) and its BGP protocol exports the
//! routes (see `deploy/bird/`). A blackhole in a table no rule selects
//! routes nothing on the gateway itself: the XDP program takes the VIP's
//! packets before routing.
//!
//! An address is announced while the data path is attached and at least
//! one VIP on it has a serving backend (one its live Maglev ring names),
//! and withdrawn otherwise. On shutdown the agent withdraws everything
//! first, waits `withdraw_delay` for the routers to move the traffic to
//! other gateways, and only then stops.
//!
//! Routes are written with `ip route` (iproute2): a failed write is logged
//! and retried at the next change or tick, never fatal. A starting agent
//! reads what the table holds, so a restart re-announces nothing that is
//! already there and withdraws what is no longer served.

use std::{collections::BTreeSet, net::IpAddr, process::Command};

use anyhow::{Context as _, bail};

use crate::{config::model::AnnounceConfig, control::balancer::Balancer};

/// The route protocol number the agent's routes carry (`ip route ... proto
/// 200`), so they are told apart from any other route in the table; no
/// routing daemon uses it.
pub const ROUTE_PROTOCOL: u8 = 200;

/// The VIP routes the agent keeps, and what it last wrote.
#[derive(Debug)]
pub struct Announcer {
    config: AnnounceConfig,
    /// Addresses whose route the table holds, as far as the agent knows.
    announced: BTreeSet<IpAddr>,
}

impl Announcer {
    /// Reads what the table holds already (a previous agent's routes).
    ///
    /// # Errors
    ///
    /// When `ip route show` fails (no iproute2, or no such table support).
    pub fn start(config: AnnounceConfig) -> anyhow::Result<Self> {
        let mut announced = BTreeSet::new();
        for family in ["-4", "-6"] {
            let table = config.routing_table.to_string();
            let proto = ROUTE_PROTOCOL.to_string();
            match ip(&[family, "route", "show", "table", &table, "proto", &proto]) {
                Ok(out) => announced.extend(out.lines().filter_map(route_address)),
                // A table comes into being with its first route.
                Err(e) if format!("{e:#}").contains("does not exist") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Announcer { config, announced })
    }

    /// The addresses announced now.
    #[must_use]
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }

    /// Announces the addresses in `wanted` and withdraws the others.
    /// Returns what changed, as (announced, withdrawn).
    ///
    /// # Errors
    ///
    /// The first route that could not be written; the others are still
    /// tried, and a later call tries the failed ones again.
    pub fn sync(&mut self, wanted: &BTreeSet<IpAddr>) -> anyhow::Result<(Vec<IpAddr>, Vec<IpAddr>)> {
        let mut first_error = None;
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for &addr in wanted.difference(&self.announced.clone()) {
            match self.write(addr, "replace") {
                Ok(()) => {
                    self.announced.insert(addr);
                    added.push(addr);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for addr in self.announced.clone().difference(wanted).copied() {
            match self.write(addr, "del") {
                Ok(()) => {
                    self.announced.remove(&addr);
                    removed.push(addr);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok((added, removed)),
        }
    }

    /// Withdraws every route: what a stopping agent does first.
    ///
    /// # Errors
    ///
    /// As [`Announcer::sync`].
    pub fn withdraw_all(&mut self) -> anyhow::Result<Vec<IpAddr>> {
        self.sync(&BTreeSet::new()).map(|(_, removed)| removed)
    }

    /// How long a stopping agent waits after withdrawing.
    #[must_use]
    pub fn withdraw_delay(&self) -> std::time::Duration {
        self.config.withdraw_delay
    }

    fn write(&self, addr: IpAddr, op: &str) -> anyhow::Result<()> {
        let prefix = format!("{addr}/{}", if addr.is_ipv4() { 32 } else { 128 });
        let table = self.config.routing_table.to_string();
        let proto = ROUTE_PROTOCOL.to_string();
        let family = if addr.is_ipv4() { "-4" } else { "-6" };
        ip(&[family, "route", op, "blackhole", &prefix, "table", &table, "proto", &proto])
            .with_context(|| format!("{op} the route for {prefix} in table {table}"))?;
        Ok(())
    }
}

/// The addresses to announce: those of VIPs whose live ring names a backend.
#[must_use]
pub fn wanted(balancer: &Balancer) -> BTreeSet<IpAddr> {
    balancer
        .vips()
        .filter(|vip| vip.ring_generation.is_some() && vip.backends.iter().any(|b| b.ring_slots > 0))
        .map(|vip| vip.listen.ip())
        .collect()
}

/// The address of a route line of `ip route show` (`blackhole 198.18.0.100
/// proto 200`), if it is a host route.
fn route_address(line: &str) -> Option<IpAddr> {
    let mut words = line.split_whitespace();
    let first = words.next()?;
    let dest = if first == "blackhole" { words.next()? } else { first };
    let addr = dest.split('/').next()?;
    addr.parse().ok()
}

/// Runs `ip ARGS`, returning its standard output.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_lines_give_their_host_address() {
        assert_eq!(route_address("blackhole 198.18.0.100 proto 200 "), "198.18.0.100".parse().ok());
        assert_eq!(
            route_address("blackhole 2001:db8::100 dev lo proto 200 metric 1024 pref medium"),
            "2001:db8::100".parse().ok()
        );
        assert_eq!(route_address(""), None);
    }
}

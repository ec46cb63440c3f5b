//! `lb run`'s body: load, fill, attach, then react to health changes until
//! told to stop.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use lb_common::stats::reason;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    announce::{self, Announcer},
    api::{
        self, Status, StatusSource,
        status::{BackendStatus, ConntrackStatus, HealthChecksStatus, Limited, Traffic, VerdictCount, VipStatus},
    },
    config::{Config, HealthCheckConfig, HealthCheckKind, XdpMode},
    control::{
        balancer::{Balancer, VipView},
        plan,
    },
    dataplane::{LoadOptions, Maps, Program},
    descriptors,
    health::{self, HealthEvent, ProbePool},
    host,
};

/// What the admin API reads and the health loop writes.
struct AgentState {
    balancer: Balancer,
    maps: Maps,
    /// Last health check outcome per backend id, for `/status`.
    last_checks: HashMap<u32, String>,
    /// The checkers' shared probe slots, for their counters in `/status`.
    probes: ProbePool,
}

/// Runs the agent until SIGINT or SIGTERM, then detaches. SIGHUP reloads the
/// config file (see [`plan`]).
///
/// # Errors
/// When the program cannot be loaded or attached, or the admin address
/// cannot be bound; nothing stays attached in that case.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let fd_limit = raise_descriptor_limit();
    let mut program = Program::load(&LoadOptions {
        ring_size: config.agent.ring_size,
        max_vips: config.agent.max_vips,
        conntrack_capacity: config.agent.conntrack_capacity,
    })
    .context("loading the XDP program")?;
    let mut maps = program.maps()?;
    let mut balancer = Balancer::new(&config).context("sizing the maps for the config")?;
    balancer.install(&mut maps).context("filling the maps")?;
    let local = host::local_addresses().context("reading the gateway's own addresses")?;
    balancer.set_local_addresses(local, &mut maps).context("marking the gateway's own addresses")?;
    let checkers = Checkers::of(&balancer);

    let budget = descriptor_budget(fd_limit);
    let probes = ProbePool::new(budget.probes);
    let admin_limits = api::Limits { max_connections: budget.admin_connections, ..api::Limits::DEFAULT };
    let state =
        Arc::new(Mutex::new(AgentState { balancer, maps, last_checks: HashMap::new(), probes: probes.clone() }));
    let _admin = api::serve(config.agent.admin_listen, admin_limits, state.clone()).await?;

    let mode = match config.agent.xdp_mode {
        XdpMode::Native => aya::programs::XdpMode::Driver,
        XdpMode::Generic => aya::programs::XdpMode::Skb,
    };
    for interface in &config.agent.interfaces {
        // On error, dropping `program` detaches from the ones already done.
        program.attach(interface, mode).with_context(|| format!("agent.interfaces: {interface}"))?;
        tracing::info!(%interface, ?mode, "attached");
    }

    let mut announcer =
        config.announce.map(Announcer::start).transpose().context("announce: reading the routing table")?;
    let mut health = HealthChecks::new(probes);
    health.follow(checkers);
    tracing::info!(vips = config.vips.len(), admin = %config.agent.admin_listen, "running");

    let mut config = config;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut local_refresh = tokio::time::interval(host::LOCAL_ADDRESS_REFRESH);
    let mut recount = tokio::time::interval(CLIENT_RECOUNT_INTERVAL);
    loop {
        tokio::select! {
            Some(event) = health.next() => {
                apply_health(&state, event);
                announce(&state, announcer.as_mut());
            }
            _ = local_refresh.tick() => {
                refresh_local_addresses(&state);
                // Also retries a route write that failed.
                announce(&state, announcer.as_mut());
            }
            _ = recount.tick() => recount_clients(&state),
            _ = sighup.recv() => {
                if let Some(new) = reload_config(&config, &state) {
                    config = new;
                    let wanted = state.lock().map(|guard| Checkers::of(&guard.balancer));
                    if let Ok(wanted) = wanted {
                        health.follow(wanted);
                    }
                    announce(&state, announcer.as_mut());
                }
            }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
        }
    }
    if let Some(announcer) = announcer.as_mut() {
        withdraw_before_stopping(announcer).await;
    }
    health.stop_all();
    program.detach_all();
    Ok(())
}

/// Brings the announced VIP routes in line with what the VIPs serve now.
/// A failed write is logged; the next call retries it.
fn announce(state: &Mutex<AgentState>, announcer: Option<&mut Announcer>) {
    let Some(announcer) = announcer else { return };
    let Ok(wanted) = state.lock().map(|guard| announce::wanted(&guard.balancer)) else { return };
    if &wanted == announcer.announced() {
        return;
    }
    match announcer.sync(&wanted) {
        Ok((added, removed)) => {
            for addr in added {
                tracing::info!(%addr, "announced: a VIP on it has a serving backend");
            }
            for addr in removed {
                tracing::info!(%addr, "withdrawn: no VIP on it has a serving backend");
            }
        }
        Err(error) => tracing::warn!(error = %format!("{error:#}"), "announce: a route write failed; retrying"),
    }
}

/// Withdraws every VIP route, then waits `withdraw_delay` so the routers
/// send the traffic to other gateways before this one stops forwarding.
async fn withdraw_before_stopping(announcer: &mut Announcer) {
    match announcer.withdraw_all() {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => {
            let delay = announcer.withdraw_delay();
            tracing::info!(addresses = removed.len(), ?delay, "withdrawn; waiting for the routers before stopping");
            tokio::time::sleep(delay).await;
        }
        Err(error) => tracing::warn!(error = %format!("{error:#}"), "announce: withdrawing failed"),
    }
}

/// How often the agent recounts the flows of clients of VIPs with
/// `max_connections_per_client` (see [`recount_clients`]).
const CLIENT_RECOUNT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Corrects the data path's per-client flow counts from the connection
/// table: it counts a flow down at its first FIN or RST, never when a flow
/// ends by idle timeout or eviction (`lb_common::client_limits`). Only
/// when some VIP has `max_connections_per_client`. The walk takes one
/// syscall per entry (about a second for a million flows), under the
/// agent's lock.
fn recount_clients(state: &Mutex<AgentState>) {
    let Ok(mut guard) = state.lock() else { return };
    let AgentState { balancer, maps, .. } = &mut *guard;
    let prefixes: HashMap<u32, u8> = balancer
        .vips()
        .filter_map(|vip| vip.limits.filter(|l| l.max_connections.is_some()).map(|l| (vip.vip_id, l.prefix_len)))
        .collect();
    if prefixes.is_empty() {
        return;
    }
    match maps.recount_clients(&prefixes, host::monotonic_ns()) {
        Ok(0) => {}
        Ok(corrected) => tracing::debug!(corrected, "per-client flow counts corrected"),
        Err(error) => tracing::warn!(error = %anyhow::Error::from(error), "cannot recount clients' flows; retrying"),
    }
}

/// Marks the gateway's addresses again, for those added or removed since.
/// A failure is logged and retried at the next tick.
fn refresh_local_addresses(state: &Mutex<AgentState>) {
    let addrs = match host::local_addresses() {
        Ok(addrs) => addrs,
        Err(error) => {
            tracing::warn!(%error, "cannot read the gateway's own addresses; retrying");
            return;
        }
    };
    let Ok(mut guard) = state.lock() else { return };
    let AgentState { balancer, maps, .. } = &mut *guard;
    if let Err(error) = balancer.set_local_addresses(addrs, maps) {
        tracing::warn!(error = %anyhow::Error::from(error), "cannot mark the gateway's own addresses; retrying");
    }
}

/// Raises the soft descriptor limit to the hard one (logging both) and
/// returns the soft limit in force; on failure logs it and keeps going with
/// what there is, since the budget below adapts to it.
fn raise_descriptor_limit() -> u64 {
    match descriptors::raise_nofile_limit() {
        Ok((before, after)) => {
            tracing::info!(
                before = before.soft,
                after = after.soft,
                hard = after.hard,
                "RLIMIT_NOFILE: soft limit raised to the hard limit"
            );
            after.soft
        }
        Err(error) => {
            let soft = descriptors::NofileLimit::current().map_or(1024, |limit| limit.soft);
            tracing::warn!(%error, soft, "RLIMIT_NOFILE: cannot raise the soft limit; keeping it");
            soft
        }
    }
}

/// Splits `limit` between what is open now (the program, its maps, the
/// runtime), the admin server and the health probes, and logs the split.
fn descriptor_budget(limit: u64) -> descriptors::Budget {
    let in_use = descriptors::open_now().unwrap_or_else(|error| {
        // Unlikely (no /proc); guess high so the reserve errs on the safe side.
        tracing::warn!(%error, "cannot count open descriptors; assuming 256");
        256
    });
    let budget = descriptors::Budget::split(limit, in_use, api::Limits::DEFAULT.max_connections);
    tracing::info!(
        limit,
        in_use,
        reserved = budget.reserved,
        admin_connections = budget.admin_connections,
        probes_in_flight = budget.probes,
        "descriptor budget"
    );
    budget
}

/// What to probe: every backend of every VIP, by the id the balancer gave it.
/// Taken before the balancer moves behind the lock, so no probe holds it.
struct Checkers(Vec<(u32, SocketAddr, HealthCheckConfig)>);

impl Checkers {
    fn of(balancer: &Balancer) -> Self {
        let mut probes = Vec::new();
        for vip in balancer.vips() {
            if matches!(vip.health_check.kind, HealthCheckKind::None) {
                continue;
            }
            for backend in &vip.backends {
                probes.push((backend.backend_id, vip.health_check.target(backend.address), vip.health_check.clone()));
            }
        }
        Checkers(probes)
    }
}

/// Health events queued for the agent loop before a checker's send waits.
const EVENT_QUEUE: usize = 1024;

/// The checkers running, by backend id, and the channel they report on.
///
/// Each checker gets a generation of its own, never reused. A checker a
/// reload stops (its backend removed, its check changed, or switched to
/// `type = "none"`) may already have queued events; [`HealthChecks::next`]
/// drops those, so a stale "down" cannot undo what the reload decided when
/// no checker is left to correct it.
struct HealthChecks {
    checkers: HashMap<u32, RunningChecker>,
    next_generation: u64,
    /// Shared by every checker: bounds the probes in flight.
    probes: ProbePool,
    tx: mpsc::Sender<HealthEvent<u32>>,
    rx: mpsc::Receiver<HealthEvent<u32>>,
}

/// One checker task and what it probes.
struct RunningChecker {
    address: SocketAddr,
    check: HealthCheckConfig,
    generation: u64,
    handle: tokio::task::JoinHandle<()>,
}

impl HealthChecks {
    fn new(probes: ProbePool) -> Self {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        HealthChecks { checkers: HashMap::new(), next_generation: 1, probes, tx, rx }
    }

    /// Makes the running checkers match `wanted`: stops those whose backend
    /// is gone or whose probe changed, starts the missing ones.
    fn follow(&mut self, wanted: Checkers) {
        let wanted: HashMap<u32, (SocketAddr, HealthCheckConfig)> =
            wanted.0.into_iter().map(|(id, address, check)| (id, (address, check))).collect();
        self.checkers.retain(|id, running| {
            let keep = wanted.get(id).is_some_and(|(a, c)| *a == running.address && *c == running.check);
            if !keep {
                running.handle.abort();
            }
            keep
        });
        for (id, (address, check)) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.checkers.entry(id) {
                let generation = self.next_generation;
                self.next_generation += 1;
                let handle =
                    health::spawn_checker(address, check.clone(), id, generation, self.probes.clone(), self.tx.clone());
                slot.insert(RunningChecker { address, check, generation, handle });
            }
        }
    }

    /// The next event of a checker still running; events of stopped ones
    /// are dropped. Cancel-safe, for `select!`.
    async fn next(&mut self) -> Option<HealthEvent<u32>> {
        loop {
            let event = self.rx.recv().await?;
            if self.is_current(&event) {
                return Some(event);
            }
            tracing::debug!(
                backend_id = event.key,
                generation = event.generation,
                "dropping a stopped checker's event"
            );
        }
    }

    /// Whether `event` comes from the checker now running for its backend.
    fn is_current(&self, event: &HealthEvent<u32>) -> bool {
        self.checkers.get(&event.key).is_some_and(|running| running.generation == event.generation)
    }

    fn stop_all(self) {
        for running in self.checkers.into_values() {
            running.handle.abort();
        }
    }
}

/// SIGHUP: loads the config file again and applies what can change in
/// place. Returns the config now running once applied; on any refusal logs
/// one error line (file, key, reason) and returns `None`, nothing changed.
fn reload_config(running: &Config, state: &Mutex<AgentState>) -> Option<Config> {
    tracing::info!(file = %running.source.display(), "SIGHUP: reloading the config");
    let new = match Config::load(&running.source) {
        Ok(new) => new,
        Err(error) => {
            tracing::error!("reload refused, keeping the running config: {error}");
            return None;
        }
    };
    let actions = match plan::reload(running, &new) {
        Ok(actions) => actions,
        Err(refusal) => {
            tracing::error!("reload refused, keeping the running config: {refusal}");
            return None;
        }
    };
    let Ok(mut guard) = state.lock() else { return None };
    let AgentState { balancer, maps, last_checks, .. } = &mut *guard;
    match balancer.apply_reload(&actions, maps) {
        Ok(_) => {}
        Err(error) if error.changed_nothing() => {
            tracing::error!("reload refused, keeping the running config: {}: {error}", new.source.display());
            return None;
        }
        // The desired state is recorded; later health events, or SIGHUP
        // again, retry the writes.
        Err(error) => tracing::error!(error = %format!("{error:#}"), "reload: updating the maps failed"),
    }
    for action in &actions {
        tracing::info!("reload: {action}");
    }
    let live: std::collections::HashSet<u32> = balancer.backends().map(|b| b.backend_id).collect();
    last_checks.retain(|id, _| live.contains(id));
    tracing::info!(changes = actions.len(), vips = balancer.vips().len(), "reload: done");
    Some(plan::as_running(running, new))
}

fn apply_health(state: &Mutex<AgentState>, event: HealthEvent<u32>) {
    let Ok(mut guard) = state.lock() else { return };
    let AgentState { balancer, maps, last_checks, .. } = &mut *guard;
    if balancer.is_retired(event.key) {
        // Sent before a reload removed its backend and stopped its checker.
        return;
    }
    last_checks.insert(event.key, event.last_check.clone());
    let Some(transition) = event.transition else { return };
    let health = transition.health;
    let name = balancer.describe_backend(event.key);
    match balancer.set_health(event.key, health, maps) {
        Ok(change) => {
            if health.is_up() {
                tracing::info!(backend = %name, reason = %transition.reason, slots = change.slots_written, "backend up");
            } else {
                tracing::warn!(backend = %name, reason = %transition.reason, slots = change.slots_written, "backend down");
            }
        }
        Err(error) => tracing::error!(backend = %name, error = %format!("{error:#}"), "updating the maps failed"),
    }
}

impl StatusSource for AgentState {
    fn status(&self) -> Status {
        let vips = self.balancer.vips().map(|vip| self.vip_status(&vip)).collect();
        let verdicts = self
            .maps
            .verdicts()
            .map(|counts| {
                let reasons = reason::NAMES.iter().zip(reason::HELP);
                reasons
                    .zip(counts)
                    .map(|((reason, help), packets)| VerdictCount {
                        reason: (*reason).to_owned(),
                        packets,
                        help: help.to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let conntrack = self.maps.conntrack().map(ConntrackStatus::from).unwrap_or_default();
        let health_checks = HealthChecksStatus {
            probe_slots: u64::try_from(self.probes.capacity()).unwrap_or(u64::MAX),
            local_errors: self.probes.local_errors(),
        };
        Status { vips, verdicts, conntrack, health_checks }
    }
}

impl AgentState {
    fn vip_status(&self, vip: &VipView<'_>) -> VipStatus {
        let backends: Vec<BackendStatus> = vip
            .backends
            .iter()
            .map(|b| BackendStatus {
                address: b.address.to_string(),
                weight: b.weight,
                backup: b.backup,
                health: b.health.as_str().to_owned(),
                last_check: self.last_checks.get(&b.backend_id).cloned(),
                traffic: self.backend_counters(b.backend_id),
            })
            .collect();
        // Summed over its backends, not read from VIP_STATS: a reused VIP id's
        // slot may still count replies of the removed VIP's flows, while
        // backend ids are never reused (see `control::balancer::apply`).
        let mut traffic = Traffic::default();
        for b in &backends {
            traffic += b.traffic;
        }
        for &id in vip.retired_backend_ids {
            traffic += self.backend_counters(id);
        }
        VipStatus {
            name: vip.name.to_owned(),
            listen: vip.listen.to_string(),
            protocol: vip.protocol.as_str().to_owned(),
            scheduler: vip.scheduler.as_str().to_owned(),
            backends_up: backends.iter().filter(|b| b.health == "up").count(),
            traffic,
            backends,
            limited: vip.limits.map(|_| self.limited(vip.vip_id)),
        }
    }

    fn limited(&self, vip_id: u32) -> Limited {
        let [rate, connections] = self.maps.limited(vip_id).unwrap_or_default();
        Limited { new_connections_per_second: rate, max_connections_per_client: connections }
    }

    fn backend_counters(&self, backend_id: u32) -> Traffic {
        self.maps.backend_counters(backend_id).map(Traffic::from).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::{net::TcpListener, time::timeout};

    use super::*;

    /// A bound on every wait, so a broken filter fails rather than hangs.
    const WAIT: Duration = Duration::from_secs(3);

    /// An address where nothing listens: a TCP probe of it fails at once.
    async fn refusing_address() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("local_addr")
    }

    fn tcp_check(interval_ms: u64) -> HealthCheckConfig {
        HealthCheckConfig {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
            port: None,
        }
    }

    /// Waits until the checkers have queued at least one event the agent
    /// has not read yet: a verdict in flight when a reload comes.
    async fn wait_queued(health: &HealthChecks) {
        let deadline = Instant::now() + WAIT;
        while health.rx.is_empty() {
            assert!(Instant::now() < deadline, "no event queued within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_down_event_queued_before_a_switch_to_none_is_dropped() {
        let address = refusing_address().await;
        let mut health = HealthChecks::new(ProbePool::new(8));
        // A long interval: after the first probe the checker sends nothing
        // more for the rest of the test.
        health.follow(Checkers(vec![(1, address, tcp_check(60_000))]));
        wait_queued(&health).await;
        // The reload sets `type = "none"`: Checkers::of lists no checker for
        // the backend, and the balancer brings it up. The queued "down" must
        // not undo that: no checker is left to bring it back.
        health.follow(Checkers(Vec::new()));
        let next = timeout(Duration::from_millis(300), health.next()).await;
        assert!(next.is_err(), "an event of the stopped checker got through: {next:?}");
    }

    #[tokio::test]
    async fn a_changed_check_gets_a_new_generation_and_only_its_events_count() {
        let address = refusing_address().await;
        let mut health = HealthChecks::new(ProbePool::new(8));
        health.follow(Checkers(vec![(1, address, tcp_check(60_000))]));
        wait_queued(&health).await;
        let first = health.checkers.get(&1).map(|c| c.generation);
        health.follow(Checkers(vec![(1, address, tcp_check(30_000))]));
        let second = health.checkers.get(&1).map(|c| c.generation);
        assert!(first.is_some() && second.is_some() && first != second, "{first:?} then {second:?}");
        let event = timeout(WAIT, health.next()).await.expect("the new checker reports").expect("channel open");
        assert_eq!((event.key, Some(event.generation)), (1, second), "only the new checker's event: {event:?}");
        assert!(event.transition.as_ref().is_some_and(|t| !t.health.is_up()), "its first probe decides: {event:?}");
        // Unchanged checks keep their checker and its generation.
        health.follow(Checkers(vec![(1, address, tcp_check(30_000))]));
        assert_eq!(health.checkers.get(&1).map(|c| c.generation), second);
        health.stop_all();
    }
}

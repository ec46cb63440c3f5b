//! `lb run`'s body: load, fill, attach, then react to health changes until
//! told to stop.

mod passive;

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
        control::{self, BackendAction, BackendRequest, ControlAnswer, ControlListen, ControlRequest, Pending},
        status::{
            BackendStatus, BuildInfo, CheckStats, ConfigStatus, ConntrackStatus, Event, Handshakes, HealthChecksStatus,
            InterfaceStatus, Limited, MAX_EVENTS, Traffic, VerdictCount, VipStatus,
        },
    },
    config::{Config, HealthCheckConfig, HealthCheckKind, XdpMode},
    control::{
        balancer::{AdminState, Balancer, VipView},
        plan,
        runtime::RuntimeState,
    },
    dataplane::{
        Attached, LoadOptions, Maps, Program,
        pins::{self, Inspection, PinDir},
    },
    descriptors,
    health::{self, Health, HealthEvent, ProbePool},
    host, notify,
};

/// What the admin API reads and the health loop writes.
/// What the agent saw of one backend's health checks.
#[derive(Clone, Debug, Default)]
struct Observed {
    /// The last probe's outcome: `ok` or why it failed.
    last_check: Option<String>,
    /// Durations and failures of its probes.
    checks: CheckStats,
    /// Health changes (the first verdict, then up ↔ down), and when the
    /// last one was, in Unix seconds.
    changes: u64,
    last_change: Option<f64>,
}

struct AgentState {
    balancer: Balancer,
    maps: Maps,
    /// What the health checks said per backend id, for `/status` and `/metrics`.
    observed: HashMap<u32, Observed>,
    /// The checkers' shared probe slots, for their counters in `/status`.
    probes: ProbePool,
    /// The config's generation and last reload, for `/status` and `/metrics`.
    config: ConfigStatus,
    /// Passive health's failure windows, by backend id.
    passive: health::passive::Watch,
    /// Why each backend that is down went down (the active checks' reason,
    /// or passive health's), for `/status`.
    down_reasons: HashMap<u32, String>,
    /// Recent events, oldest first, at most `MAX_EVENTS`.
    events: std::collections::VecDeque<Event>,
    /// Where the program is attached, and in which mode.
    interfaces: Vec<InterfaceStatus>,
}

impl AgentState {
    /// Keeps `message` among the recent events.
    fn event(&mut self, message: String) {
        record_event(&mut self.events, message);
    }
}

fn record_event(events: &mut std::collections::VecDeque<Event>, message: String) {
    if events.len() >= MAX_EVENTS {
        events.pop_front();
    }
    events.push_back(Event { unix_seconds: unix_now(), message });
}

/// How `lb run` treats the pinned data path.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Remove the program, its links and pins on the way out (the old
    /// behaviour): the data path stops with the agent.
    pub unload_on_exit: bool,
    /// Overrides `agent.control_socket`, at start and at every reload.
    pub control_socket: Option<std::path::PathBuf>,
    /// Overrides `agent.state_file`, at start and at every reload.
    pub state_file: Option<std::path::PathBuf>,
}

impl RunOptions {
    /// Applies the command line's overrides to a config just read, so a
    /// reload of the same file sees the same paths.
    pub fn apply(&self, config: &mut Config) {
        if let Some(path) = &self.control_socket {
            config.agent.control_socket.clone_from(path);
        }
        if let Some(path) = &self.state_file {
            config.agent.state_file.clone_from(path);
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM. SIGHUP reloads the config file
/// (see [`plan`]).
///
/// The program's links and maps are pinned in `agent.pin_dir`: the data
/// path outlives the agent, and a later agent adopts it (see
/// [`crate::dataplane::pins`] and `Balancer::adopt`). On SIGTERM it stays
/// attached, forwarding on its last state, unless
/// [`RunOptions::unload_on_exit`].
///
/// # Errors
/// When the pinned state has another layout, the program cannot be loaded
/// or attached, or the admin address cannot be bound. A fresh start leaves
/// nothing pinned or attached then; an adopting one leaves the data path as
/// it found it (forwarding on its last state).
pub async fn run(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let fd_limit = raise_descriptor_limit();
    let load = LoadOptions {
        ring_size: config.agent.ring_size,
        max_vips: config.agent.max_vips,
        conntrack_capacity: config.agent.conntrack_capacity,
    };
    let pin_dir = config.agent.pin_dir.clone();
    let pins = PinDir::open(&pin_dir).with_context(|| format!("agent.pin_dir: {}", pin_dir.display()))?;
    let adopt = decide_adoption(&pins, &load)?;
    let started = start(&config, &load, &pins, adopt, fd_limit).await;
    let Started { mut program, state, servers, checkers, mut control } = match started {
        Ok(parts) => parts,
        Err(error) => {
            if !adopt {
                // A fresh start that failed leaves nothing behind.
                let _ = pins.clear();
            }
            return Err(error);
        }
    };
    let _servers = servers;
    let probes = state.lock().map_err(|_| anyhow::anyhow!("agent state poisoned"))?.probes.clone();
    let mut health = HealthChecks::new(probes);
    health.follow(checkers);
    tracing::info!(vips = config.vips.len(), admin = %config.agent.admin_listen, adopted = adopt, "running");

    let control_socket = config.agent.control_socket.clone();
    let readiness = Readiness::new(&config);
    let mut announcer =
        config.announce.map(Announcer::start).transpose().context("announce: reading the routing table")?;
    let events = Events { health: &mut health, control: &mut control, announcer: announcer.as_mut() };
    let stop = follow_events(config, &opts, &state, events, readiness).await?;
    if let Some(announcer) = announcer.as_mut() {
        withdraw_before_stopping(announcer).await;
    }
    notify::stopping(if opts.unload_on_exit {
        "stopping; unloading the data path"
    } else {
        "stopping; the data path stays attached"
    });
    let _ = std::fs::remove_file(&control_socket);
    health.stop_all();
    if opts.unload_on_exit {
        program.detach_all();
        drop(program);
        let detached = pins.remove().context("removing the pinned data path")?;
        tracing::info!(?detached, "{stop}: unloaded (--unload-on-exit): program, links and pins removed");
    } else {
        tracing::info!(
            pin_dir = %pin_dir.display(),
            "{stop}: stopping; the data path stays attached and forwards on its last state \
             (no health checks until an agent runs again; `lb unload` removes it)"
        );
    }
    Ok(())
}

/// Whether to adopt what `pins` holds: yes when it matches this binary,
/// no when nothing is pinned (or only state no link uses, which is cleared).
fn decide_adoption(pins: &PinDir, load: &LoadOptions) -> anyhow::Result<bool> {
    let dir = pins.path().display();
    match pins.inspect(load).with_context(|| format!("inspecting {dir}"))? {
        Inspection::Empty => Ok(false),
        Inspection::Matches { links } => {
            tracing::info!(pin_dir = %dir, ?links, "adopting the pinned data path");
            Ok(true)
        }
        Inspection::Differs { differences, links } if links.is_empty() => {
            tracing::warn!(
                pin_dir = %dir, ?differences,
                "clearing pinned maps of another layout: no link uses them, so nothing forwards on them"
            );
            pins.clear().with_context(|| format!("clearing {dir}"))?;
            Ok(false)
        }
        Inspection::Differs { differences, links } => anyhow::bail!(
            "the data path pinned at {dir} (attached to {}) has another layout than this lb, which refuses to \
             adopt it rather than misread it:\n  {}\nIt keeps forwarding on its last state. To replace it, run \
             `lb unload --pin-dir {dir}` and start again: that detaches it and loses the connection table, so \
             established connections are balanced anew (and may be reset).",
            links.join(", "),
            differences.join("\n  ")
        ),
    }
}

/// What [`start`] hands to the event loop.
struct Started {
    program: Program,
    state: Arc<Mutex<AgentState>>,
    /// The admin (TCP) and control (Unix, and TCP if configured) servers.
    servers: Vec<tokio::task::JoinHandle<()>>,
    checkers: Checkers,
    control: mpsc::Receiver<Pending>,
}

/// Loads (pinned), fills or adopts the maps, serves the admin API and
/// attaches: everything before the event loop.
async fn start(
    config: &Config,
    load: &LoadOptions,
    pins: &PinDir,
    adopt: bool,
    fd_limit: u64,
) -> anyhow::Result<Started> {
    let mut program = Program::load_pinned(load, pins).context("loading the XDP program")?;
    if !adopt {
        pins.write_layout()?;
    }
    let mut maps = program.maps()?;
    let mut balancer = if adopt {
        let pinned = maps.read_pinned(config.agent.ring_size).context("reading the pinned maps")?;
        Balancer::adopt(config, &pinned).context("adopting the pinned maps")?
    } else {
        Balancer::new(config).context("sizing the maps for the config")?
    };
    restore_runtime(config, &mut balancer)?;
    let change = balancer.install(&mut maps).context("filling the maps")?;
    if adopt {
        tracing::info!(
            backends_written = change.backends_written,
            slots_written = change.slots_written,
            rings_published = change.rings_published,
            "adopted: wrote only what differs"
        );
    }
    let local = host::local_addresses().context("reading the gateway's own addresses")?;
    balancer.set_local_addresses(local, &mut maps).context("marking the gateway's own addresses")?;
    let checkers = Checkers::of(&balancer);

    let budget = descriptor_budget(fd_limit);
    let probes = ProbePool::new(budget.probes);
    let admin_limits = api::Limits { max_connections: budget.admin_connections, ..api::Limits::DEFAULT };
    let config_status = ConfigStatus {
        generation: 1,
        last_reload_successful: true,
        last_reload_success_timestamp_seconds: unix_now(),
        reloads: 0,
        reload_failures: 0,
    };
    let state = Arc::new(Mutex::new(AgentState {
        balancer,
        maps,
        observed: HashMap::new(),
        probes,
        config: config_status,
        events: std::collections::VecDeque::new(),
        interfaces: Vec::new(),
        passive: health::passive::Watch::default(),
        down_reasons: HashMap::new(),
    }));
    let admin = api::serve(config.agent.admin_listen, admin_limits, state.clone()).await?;
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let agent = &config.agent;
    let tcp = match (&agent.control_listen, &agent.control_token_file) {
        (Some(address), Some(file)) => Some((*address, control::read_token(file)?)),
        _ => None,
    };
    let listen = ControlListen { socket: &agent.control_socket, group: agent.control_group.as_deref(), tcp };
    let control = control::serve(listen, admin_limits, state.clone(), control_tx).await?;

    let mode = match config.agent.xdp_mode {
        XdpMode::Native => aya::programs::XdpMode::Driver,
        XdpMode::Generic => aya::programs::XdpMode::Skb,
    };
    for interface in &config.agent.interfaces {
        let how = program.attach(interface, mode).with_context(|| format!("agent.interfaces: {interface}"))?;
        match how {
            Attached::New => tracing::info!(%interface, ?mode, "attached"),
            Attached::Replaced => {
                tracing::info!(%interface, "attached: this program replaced the pinned one atomically")
            }
        }
        let mode = match config.agent.xdp_mode {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        };
        if let Ok(mut guard) = state.lock() {
            guard.interfaces.push(InterfaceStatus { name: interface.clone(), mode: mode.to_owned() });
        }
    }
    detach_unconfigured(pins, &config.agent.interfaces);
    let mut servers = control;
    servers.push(admin);
    Ok(Started { program, state, servers, checkers, control: control_rx })
}

/// Control requests queued for the event loop before a client waits.
const CONTROL_QUEUE: usize = 16;

/// Applies the runtime changes of `agent.state_file` before anything is
/// written, so a drained backend gets no flow after a restart.
fn restore_runtime(config: &Config, balancer: &mut Balancer) -> anyhow::Result<()> {
    let path = &config.agent.state_file;
    let runtime = RuntimeState::load(path).with_context(|| {
        format!("agent.state_file: {} (fix or remove it; it holds drains and runtime weights)", path.display())
    })?;
    for gone in runtime.restore(balancer) {
        tracing::warn!(vip = %gone.vip, backend = %gone.address, "runtime state names a backend the config lacks; dropped");
    }
    if !runtime.backends.is_empty() {
        tracing::info!(backends = runtime.backends.len(), file = %path.display(), "runtime changes restored");
    }
    Ok(())
}

/// When to tell systemd `READY=1`: once the data path is attached and no
/// checked backend's health is unknown (adopted health counts as known), or
/// after a bound, so a backend that never answers cannot hold the start.
struct Readiness {
    /// `None` once READY=1 was sent.
    deadline: Option<tokio::time::Instant>,
}

impl Readiness {
    fn new(config: &Config) -> Self {
        // Long enough for every first probe (staggered over at most an
        // interval, or `health::MAX_STAGGER`) to finish or time out.
        let checks = config.vips.iter().flat_map(|v| {
            std::iter::once(&v.health_check).chain(v.backends.iter().filter_map(|b| b.health_check.as_ref()))
        });
        let bound = checks.map(|c| c.interval.min(health::MAX_STAGGER) + c.timeout).max().unwrap_or_default();
        Readiness { deadline: Some(tokio::time::Instant::now() + bound + std::time::Duration::from_secs(1)) }
    }

    /// Sends READY=1 if every checked backend's health is known.
    fn check(&mut self, state: &Mutex<AgentState>) {
        if self.deadline.is_none() {
            return;
        }
        let Ok(guard) = state.lock() else { return };
        let count = |health: Health| guard.balancer.backends().filter(|b| b.health == health).count();
        let (unknown, up, down) = (count(Health::Unknown), count(Health::Up), count(Health::Down));
        if unknown == 0 {
            self.deadline = None;
            notify::ready("attached; every backend's health is known");
            let interfaces: Vec<String> = guard.interfaces.iter().map(|i| format!("{} ({})", i.name, i.mode)).collect();
            let vips = guard.balancer.vips().count();
            let serving: usize = guard.balancer.vips().filter(|v| v.backends.iter().any(|b| b.ring_slots > 0)).count();
            tracing::info!(
                interfaces = %interfaces.join(", "),
                vips,
                vips_serving = serving,
                backends_up = up,
                backends_down = down,
                "ready: attached, every backend's health known"
            );
        }
    }

    /// Resolves at the deadline while READY=1 is pending; never after.
    async fn timeout(&self) {
        match self.deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    }

    /// The deadline passed: READY=1 anyway, saying how many are unknown.
    fn give_up(&mut self, state: &Mutex<AgentState>) {
        self.deadline = None;
        let unknown = state.lock().map_or(0, |g| g.balancer.backends().filter(|b| b.health == Health::Unknown).count());
        notify::ready(&format!("attached; {unknown} backends not yet probed"));
        tracing::warn!(unknown, "ready: attached, but some backends' first probes have not finished");
    }

    /// After a reload (applied or refused): READY=1 again, unless the first
    /// one is still pending.
    fn reloaded(&self) {
        if self.deadline.is_none() {
            notify::ready("reloaded");
        }
    }
}

/// Makes the checkers match the balancer's backends (after a reload).
fn follow_checkers(state: &Mutex<AgentState>, health: &mut HealthChecks) {
    if let Ok(wanted) = state.lock().map(|guard| Checkers::of(&guard.balancer)) {
        health.follow(wanted);
    }
}

/// Detaches pinned links of interfaces the config no longer lists.
fn detach_unconfigured(pins: &PinDir, interfaces: &[String]) {
    let Ok(links) = pins::pinned_links(pins.path()) else { return };
    for interface in links.iter().filter(|i| !interfaces.contains(i)) {
        match std::fs::remove_file(pins.link_path(interface)) {
            Ok(()) => tracing::info!(%interface, "detached: no longer in agent.interfaces"),
            Err(error) => {
                tracing::warn!(%interface, %error, "cannot unpin the link of an interface no longer configured")
            }
        }
    }
}

/// What the event loop follows besides signals and timers.
struct Events<'a> {
    health: &'a mut HealthChecks,
    control: &'a mut mpsc::Receiver<Pending>,
    /// `[announce]`, if configured.
    announcer: Option<&'a mut Announcer>,
}

/// The event loop: health events, address refreshes and SIGHUP, until
/// SIGINT or SIGTERM; returns which one.
async fn follow_events(
    mut config: Config,
    opts: &RunOptions,
    state: &Arc<Mutex<AgentState>>,
    events: Events<'_>,
    mut readiness: Readiness,
) -> anyhow::Result<&'static str> {
    let Events { health, control, mut announcer } = events;
    readiness.check(state);
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut local_refresh = tokio::time::interval(host::LOCAL_ADDRESS_REFRESH);
    let mut recount = tokio::time::interval(CLIENT_RECOUNT_INTERVAL);
    let mut passive_tick = tokio::time::interval(passive::INTERVAL);
    // A late tick (a slow reload) samples once, not in a burst: the window
    // takes the time of each sample, so no failure is lost.
    passive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(event) = health.next() => {
                apply_health(state, event);
                readiness.check(state);
                announce(state, announcer.as_deref_mut());
            }
            () = readiness.timeout() => readiness.give_up(state),
            _ = local_refresh.tick() => {
                refresh_local_addresses(state);
                // Also retries a route write that failed.
                announce(state, announcer.as_deref_mut());
            }
            _ = recount.tick() => recount_clients(state),
            _ = passive_tick.tick() => {
                let down = passive::sample(state, &config);
                if !down.is_empty() {
                    for backend_id in down {
                        health.restart_at(backend_id, Health::Down);
                    }
                    announce(state, announcer.as_deref_mut());
                }
            }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP");
                notify::reloading();
                if let Ok((new, _)) = reload_config(&config, opts, state) {
                    config = new;
                    follow_checkers(state, health);
                    announce(state, announcer.as_deref_mut());
                }
                readiness.reloaded();
            }
            Some(pending) = control.recv() => {
                let answer = match &pending.request {
                    ControlRequest::Reload => {
                        notify::reloading();
                        let answer = match reload_config(&config, opts, state) {
                            Ok((new, changes)) => {
                                config = new;
                                follow_checkers(state, health);
                                let messages = if changes.is_empty() { vec!["no changes".to_owned()] } else { changes };
                                ControlAnswer { ok: true, messages }
                            }
                            Err(refusal) => ControlAnswer { ok: false, messages: vec![refusal] },
                        };
                        readiness.reloaded();
                        answer
                    }
                    ControlRequest::Backend(request) => {
                        let answer = backend_control(request, state, &config.agent.state_file);
                        follow_checkers(state, health);
                        answer
                    }
                };
                announce(state, announcer.as_deref_mut());
                // The client may have given up; nothing to do then.
                let _ = pending.answer.send(answer);
            }
            _ = tokio::signal::ctrl_c() => return Ok("SIGINT"),
            _ = sigterm.recv() => return Ok("SIGTERM"),
        }
    }
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
/// Each with the backend's health now, where its checker starts (so an
/// adopted or re-checked backend goes through rise/fall, not one probe).
struct Checkers(Vec<(u32, SocketAddr, HealthCheckConfig, Health)>);

impl Checkers {
    fn of(balancer: &Balancer) -> Self {
        let mut probes = Vec::new();
        for vip in balancer.vips() {
            for backend in &vip.backends {
                // Its own check (`[vip.backend.health_check]`), else its VIP's.
                let check = balancer.backend_check(backend.backend_id).unwrap_or(vip.health_check);
                if matches!(check.kind, HealthCheckKind::None) {
                    continue;
                }
                probes.push((backend.backend_id, check.target(backend.address), check.clone(), backend.health));
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
        let wanted: HashMap<u32, (SocketAddr, HealthCheckConfig, Health)> =
            wanted.0.into_iter().map(|(id, address, check, health)| (id, (address, check, health))).collect();
        self.checkers.retain(|id, running| {
            let keep = wanted.get(id).is_some_and(|(a, c, _)| *a == running.address && *c == running.check);
            if !keep {
                running.handle.abort();
            }
            keep
        });
        for (id, (address, check, initial)) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.checkers.entry(id) {
                let generation = self.next_generation;
                self.next_generation += 1;
                let (probes, tx) = (self.probes.clone(), self.tx.clone());
                let handle = health::spawn_checker(address, check.clone(), id, generation, initial, probes, tx);
                slot.insert(RunningChecker { address, check, generation, handle });
            }
        }
    }

    /// Starts a backend's checker over at `health` (passive health took it
    /// down: from there `rise` probes bring it back). A new generation, so
    /// events the old checker queued (an "up" in flight) are dropped.
    fn restart_at(&mut self, backend_id: u32, health: Health) {
        let Some(old) = self.checkers.remove(&backend_id) else { return };
        old.handle.abort();
        let generation = self.next_generation;
        self.next_generation += 1;
        let (probes, tx) = (self.probes.clone(), self.tx.clone());
        let handle = health::spawn_checker(old.address, old.check.clone(), backend_id, generation, health, probes, tx);
        self.checkers.insert(backend_id, RunningChecker { address: old.address, check: old.check, generation, handle });
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

/// A reload's outcome: the config now running and one line per change,
/// or the refusal (`FILE: KEY: REASON`), nothing changed.
type ReloadOutcome = Result<(Config, Vec<String>), String>;

/// SIGHUP or `lb reload`: loads the config file again and applies what can
/// change in place; logs every change, or the refusal as one error line.
/// Runtime changes (`lb backend`) stay in force; those of backends the
/// file removed are dropped from the state file.
fn reload_config(running: &Config, opts: &RunOptions, state: &Mutex<AgentState>) -> ReloadOutcome {
    tracing::info!(file = %running.source.display(), "reloading the config");
    let outcome = try_reload(running, opts, state);
    let mut generation = 0;
    if let Ok(mut guard) = state.lock() {
        let config = &mut guard.config;
        config.last_reload_successful = outcome.is_ok();
        config.reloads += 1;
        if outcome.is_ok() {
            config.generation += 1;
            config.last_reload_success_timestamp_seconds = unix_now();
        } else {
            config.reload_failures += 1;
        }
        generation = config.generation;
        let what = match &outcome {
            Ok((_, changes)) => format!("reload applied, generation {generation}: {} change(s)", changes.len()),
            Err(refusal) => format!("reload refused: {refusal}"),
        };
        guard.event(what);
    }
    match &outcome {
        Ok((_, changes)) => {
            for change in changes {
                tracing::info!(%change, generation, "reload: change applied");
            }
            tracing::info!(changes = changes.len(), generation, "reload: done");
        }
        Err(refusal) => tracing::error!(reason = %refusal, generation, "reload refused, keeping the running config"),
    }
    outcome
}

fn try_reload(running: &Config, opts: &RunOptions, state: &Mutex<AgentState>) -> ReloadOutcome {
    let mut new = Config::load(&running.source).map_err(|error| error.to_string())?;
    opts.apply(&mut new);
    let actions = plan::reload(running, &new).map_err(|refusal| refusal.to_string())?;
    let mut guard = state.lock().map_err(|_| "the agent's state is poisoned".to_owned())?;
    let AgentState { balancer, maps, observed, down_reasons, .. } = &mut *guard;
    match balancer.apply_reload(&actions, maps) {
        Ok(_) => {}
        Err(error) if error.changed_nothing() => return Err(format!("{}: {error}", new.source.display())),
        // The desired state is recorded; later health events, or a reload
        // again, retry the writes.
        Err(error) => tracing::error!(error = %format!("{error:#}"), "reload: updating the maps failed"),
    }
    let live: std::collections::HashSet<u32> = balancer.backends().map(|b| b.backend_id).collect();
    observed.retain(|id, _| live.contains(id));
    down_reasons.retain(|id, _| live.contains(id));
    save_runtime(&new.agent.state_file, balancer);
    let changes = actions.iter().map(ToString::to_string).collect();
    Ok((plan::as_running(running, new), changes))
}

/// Seconds since the Unix epoch, for the reload metrics.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Writes the runtime changes `balancer` holds to `path`; a failure is
/// logged (they stay in force until the agent stops).
fn save_runtime(path: &std::path::Path, balancer: &Balancer) {
    if let Err(error) = RuntimeState::of(balancer).save(path) {
        tracing::error!(error = %format!("{error:#}"), "cannot save the runtime state; it is lost at the next restart");
    }
}

/// `lb backend ...`: one runtime change, applied and saved.
fn backend_control(request: &BackendRequest, state: &Mutex<AgentState>, state_file: &std::path::Path) -> ControlAnswer {
    let refused = |message: String| ControlAnswer { ok: false, messages: vec![message] };
    let Ok(mut guard) = state.lock() else { return refused("the agent's state is poisoned".to_owned()) };
    let AgentState { balancer, maps, events, .. } = &mut *guard;
    let (vip, address) = (request.vip.as_str(), request.address);
    let result = match request.action {
        BackendAction::Drain => balancer.set_admin(vip, address, AdminState::Drain, maps),
        BackendAction::Disable => balancer.set_admin(vip, address, AdminState::Maint, maps),
        BackendAction::Enable => balancer.set_admin(vip, address, AdminState::Ready, maps),
        BackendAction::Weight => match request.weight {
            Some(weight) if weight > crate::config::MAX_WEIGHT => {
                return refused(format!("weight {weight} is over the limit of {}", crate::config::MAX_WEIGHT));
            }
            weight => balancer.set_weight_override(vip, address, weight, maps),
        },
    };
    let what = match (request.action, request.weight) {
        (BackendAction::Weight, Some(weight)) => format!("weight {weight} (runtime, until cleared)"),
        (BackendAction::Weight, None) => "weight back to the config's".to_owned(),
        (BackendAction::Drain, _) => "drain: no new flows, existing flows continue".to_owned(),
        (BackendAction::Disable, _) => "maint: down, its flows move".to_owned(),
        (BackendAction::Enable, _) => "ready".to_owned(),
    };
    match result {
        Ok(_) => {}
        Err(error) if error.changed_nothing() => return refused(error.to_string()),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "runtime change: updating the maps failed; retried later")
        }
    }
    save_runtime(state_file, balancer);
    let message = format!("vip {vip} backend {address}: {what}");
    tracing::info!(%vip, backend = %address, change = %what, "runtime change");
    record_event(events, message.clone());
    ControlAnswer { ok: true, messages: vec![message] }
}

fn apply_health(state: &Mutex<AgentState>, event: HealthEvent<u32>) {
    let Ok(mut guard) = state.lock() else { return };
    let AgentState { balancer, maps, observed, config, events, down_reasons, .. } = &mut *guard;
    let generation = config.generation;
    if balancer.is_retired(event.key) {
        // Sent before a reload removed its backend and stopped its checker.
        return;
    }
    let seen = observed.entry(event.key).or_default();
    seen.last_check = Some(event.last_check.clone());
    if let Some(took) = event.duration {
        seen.checks.record(took.as_secs_f64(), event.failure);
    }
    let Some(transition) = event.transition else { return };
    let before = balancer.backends().find(|b| b.backend_id == event.key).map(|b| b.health);
    if before.is_some_and(|health| health != transition.health) {
        seen.changes += 1;
        seen.last_change = Some(unix_now());
    }
    let health = transition.health;
    let name = balancer.describe_backend(event.key);
    let from = before.map_or("unknown", Health::as_str);
    let to = health.as_str();
    let reason = &transition.reason;
    record_event(events, format!("{name}: {from} -> {to}: {reason}"));
    match balancer.set_health(event.key, health, maps) {
        Ok(change) => {
            let slots = change.slots_written;
            if health.is_up() {
                down_reasons.remove(&event.key);
            } else {
                down_reasons.insert(event.key, transition.reason.clone());
            }
            if health.is_up() {
                tracing::info!(backend = %name, from, to, %reason, slots, generation, "backend up");
            } else {
                tracing::warn!(backend = %name, from, to, %reason, slots, generation, "backend down");
            }
        }
        Err(error) => tracing::error!(backend = %name, error = %format!("{error:#}"), "updating the maps failed"),
    }
}

impl StatusSource for AgentState {
    fn status(&self) -> Status {
        // First: it starts the count of active flows per backend, if due.
        let conntrack = self.maps.conntrack().map(ConntrackStatus::from).unwrap_or_default();
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
        let health_checks = HealthChecksStatus {
            probe_slots: u64::try_from(self.probes.capacity()).unwrap_or(u64::MAX),
            local_errors: self.probes.local_errors(),
        };
        Status {
            vips,
            verdicts,
            conntrack,
            health_checks,
            config: self.config,
            build: BuildInfo::current(),
            events: self.events.iter().cloned().collect(),
            interfaces: self.interfaces.clone(),
        }
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
                last_check: self.observed.get(&b.backend_id).and_then(|o| o.last_check.clone()),
                traffic: self.backend_counters(b.backend_id),
                admin: b.admin.as_str().to_owned(),
                weight_set_at_runtime: b.weight_override.is_some(),
                active_flows: self.maps.live_flows(b.backend_id),
                down_reason: (!b.health.is_up()).then(|| self.down_reasons.get(&b.backend_id).cloned()).flatten(),
                handshakes: self.maps.handshakes(b.backend_id).map(Handshakes::from).unwrap_or_default(),
                passive_failures: self.passive.failures_total(b.backend_id),
                ring_slots: b.ring_slots,
                checks: self.observed.get(&b.backend_id).map(|o| o.checks.clone()).unwrap_or_default(),
                health_changes: self.observed.get(&b.backend_id).map_or(0, |o| o.changes),
                last_change_unix_seconds: self.observed.get(&b.backend_id).and_then(|o| o.last_change),
            })
            .collect();
        // Summed over its backends: backend ids are never reused, VIP ids are
        // (see `control::balancer::apply`).
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
            backends_serving: backends.iter().filter(|b| b.serving()).count(),
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
        health.follow(Checkers(vec![(1, address, tcp_check(60_000), Health::Unknown)]));
        wait_queued(&health).await;
        // The reload sets `type = "none"`: Checkers::of lists no checker for
        // the backend, and the balancer brings it up. The queued "down" must
        // not undo that: no checker is left to bring it back.
        health.follow(Checkers(Vec::new()));
        let next = timeout(Duration::from_millis(300), health.next()).await;
        assert!(next.is_err(), "an event of the stopped checker got through: {next:?}");
    }

    /// Passive health took the backend down: its checker starts over from
    /// down, so `rise` successes (not one) bring it back, and the old
    /// checker's events no longer count.
    #[tokio::test]
    async fn a_checker_restarted_at_down_needs_rise_successes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let mut health = HealthChecks::new(ProbePool::new(8));
        let check = HealthCheckConfig { rise: 2, ..tcp_check(100) };
        health.follow(Checkers(vec![(1, address, check, Health::Up)]));
        let before = health.checkers.get(&1).map(|c| c.generation);
        health.restart_at(1, Health::Down);
        let after = health.checkers.get(&1).map(|c| c.generation);
        assert!(after.is_some() && after != before, "{before:?} then {after:?}");
        let first = timeout(WAIT, health.next()).await.expect("a probe").expect("channel open");
        assert_eq!(
            (first.generation, first.transition),
            (after.unwrap_or_default(), None),
            "one success is not enough"
        );
        let second = timeout(WAIT, health.next()).await.expect("a probe").expect("channel open");
        let up = second.transition.expect("rise reached");
        assert_eq!((up.health, up.reason.as_str()), (Health::Up, "2 consecutive successes"));
        // A backend without a checker (none configured) is left alone.
        health.restart_at(2, Health::Down);
        assert!(!health.checkers.contains_key(&2));
        health.stop_all();
    }

    #[tokio::test]
    async fn a_changed_check_gets_a_new_generation_and_only_its_events_count() {
        let address = refusing_address().await;
        let mut health = HealthChecks::new(ProbePool::new(8));
        health.follow(Checkers(vec![(1, address, tcp_check(60_000), Health::Unknown)]));
        wait_queued(&health).await;
        let first = health.checkers.get(&1).map(|c| c.generation);
        health.follow(Checkers(vec![(1, address, tcp_check(30_000), Health::Unknown)]));
        let second = health.checkers.get(&1).map(|c| c.generation);
        assert!(first.is_some() && second.is_some() && first != second, "{first:?} then {second:?}");
        let event = timeout(WAIT, health.next()).await.expect("the new checker reports").expect("channel open");
        assert_eq!((event.key, Some(event.generation)), (1, second), "only the new checker's event: {event:?}");
        assert!(event.transition.as_ref().is_some_and(|t| !t.health.is_up()), "its first probe decides: {event:?}");
        // Unchanged checks keep their checker and its generation.
        health.follow(Checkers(vec![(1, address, tcp_check(30_000), Health::Unknown)]));
        assert_eq!(health.checkers.get(&1).map(|c| c.generation), second);
        health.stop_all();
    }
}

//! Prometheus metrics, rendered from a status snapshot at scrape time.
//!
//! The kernel keeps per-CPU counters; they are summed when read, so a
//! registry is built per scrape rather than kept in step with the maps.
//! Names follow Prometheus' conventions: the `lb_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters, `_info` on the build's
//! labels, enum-like states as one gauge per state (1 for the current one).
//! The process metrics (`process_*`) carry no prefix, as every client
//! library exports them.
//!
//! [`render`] writes OpenMetrics (what Prometheus asks for); [`to_text_format`]
//! turns that into the older Prometheus text format for clients that ask
//! for `text/plain` (and for `promtool check metrics`).

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, text::encode_registry},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::{Registry, Unit},
};

use crate::{
    api::status::{
        BackendStatus, CHECK_DURATION_BUCKETS, CheckStats, ConfigStatus, ConntrackStatus, HealthChecksStatus, Status,
        Traffic, VipStatus,
    },
    process::ProcessStats,
};

type Labels = Vec<(&'static str, String)>;

/// A float gauge.
type FGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The states `lb_backend_health` has a series for.
const HEALTH_STATES: [&str; 3] = ["unknown", "up", "down"];
/// The states `lb_backend_admin_state` has a series for.
const ADMIN_STATES: [&str; 3] = ["ready", "drain", "maint"];

fn gauge(value: u64) -> Gauge {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

fn fgauge(value: f64) -> FGauge {
    let g = FGauge::default();
    g.set(value);
    g
}

fn counter(value: u64) -> Counter {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    c
}

/// Traffic counters by direction, under one name prefix (`backend_` or `vip_`).
struct TrafficFamilies {
    packets: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    new_flows: Family<Labels, Counter>,
    rescheduled: Family<Labels, Counter>,
}

impl TrafficFamilies {
    fn register(registry: &mut Registry, of: &str, whose: &str) -> Self {
        let f = TrafficFamilies {
            packets: Family::default(),
            bytes: Family::default(),
            new_flows: Family::default(),
            rescheduled: Family::default(),
        };
        registry.register(
            format!("{of}_packets"),
            format!(
                "Packets of {whose} balanced flows, by direction: in is client to backend, out is backend to client"
            ),
            f.packets.clone(),
        );
        registry.register_with_unit(
            of.to_owned(),
            format!("Bytes (whole frames) of {whose} balanced flows, by direction"),
            Unit::Bytes,
            f.bytes.clone(),
        );
        registry.register(
            format!("{of}_new_flows"),
            format!("Flows assigned to {whose} backend(s): new ones, and ones moved off a down backend"),
            f.new_flows.clone(),
        );
        registry.register(
            format!("{of}_rescheduled_flows"),
            format!("Flows moved to {whose} backend(s) off a backend that went down"),
            f.rescheduled.clone(),
        );
        f
    }

    fn record(&self, labels: &Labels, t: Traffic) {
        for (direction, packets, bytes) in [("in", t.packets_in, t.bytes_in), ("out", t.packets_out, t.bytes_out)] {
            let mut l = labels.clone();
            l.push(("direction", direction.to_owned()));
            self.packets.get_or_create(&l).inc_by(packets);
            self.bytes.get_or_create(&l).inc_by(bytes);
        }
        self.new_flows.get_or_create(labels).inc_by(t.new_flows);
        self.rescheduled.get_or_create(labels).inc_by(t.rescheduled_flows);
    }
}

/// A histogram whose buckets were counted elsewhere (the agent keeps one
/// per backend's health checks), one series per label set.
#[derive(Debug, Default)]
struct CountedHistograms {
    series: Vec<(Labels, CheckStats)>,
}

impl EncodeMetric for CountedHistograms {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, h) in &self.series {
            let bounds = CHECK_DURATION_BUCKETS.iter().copied().chain([f64::MAX]);
            let buckets: Vec<(f64, u64)> = bounds.zip(h.buckets.iter().copied().chain(std::iter::repeat(0))).collect();
            encoder.encode_family(labels)?.encode_histogram::<Labels>(h.sum_seconds, h.count, &buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Per-backend families.
struct BackendFamilies {
    traffic: TrafficFamilies,
    health: Family<Labels, Gauge>,
    admin: Family<Labels, Gauge>,
    backup: Family<Labels, Gauge>,
    serving: Family<Labels, Gauge>,
    standby: Family<Labels, Gauge>,
    weight: Family<Labels, Gauge>,
    ring_slots: Family<Labels, Gauge>,
    active_flows: Family<Labels, Gauge>,
    changes: Family<Labels, Counter>,
    last_change: Family<Labels, FGauge>,
    check_failures: Family<Labels, Counter>,
    check_durations: CountedHistograms,
}

impl BackendFamilies {
    fn new(registry: &mut Registry) -> Self {
        let f = BackendFamilies {
            traffic: TrafficFamilies::register(registry, "backend", "the backend's"),
            health: Family::default(),
            admin: Family::default(),
            backup: Family::default(),
            serving: Family::default(),
            standby: Family::default(),
            weight: Family::default(),
            ring_slots: Family::default(),
            active_flows: Family::default(),
            changes: Family::default(),
            last_change: Family::default(),
            check_failures: Family::default(),
            check_durations: CountedHistograms::default(),
        };
        registry.register(
            "backend_health",
            "1 for the backend's health as its checks say (unknown before the first verdict, up, down), 0 for the others",
            f.health.clone(),
        );
        registry.register(
            "backend_admin_state",
            "1 for the backend's admin state set with `lb backend` (ready, drain: no new flows, maint: down), 0 for the others",
            f.admin.clone(),
        );
        registry.register("backend_backup", "1 if the backend is a backup of its VIP", f.backup.clone());
        registry.register(
            "backend_serving",
            "1 if the backend takes new flows now: up, ready, weight above 0, and not a backup standing by",
            f.serving.clone(),
        );
        registry.register(
            "backend_standby",
            "1 if the backend is a backup, up and ready, holding no flows' slots while a primary is available",
            f.standby.clone(),
        );
        registry.register(
            "backend_weight",
            "The backend's weight in force (the config's, or one set with `lb backend weight`)",
            f.weight.clone(),
        );
        registry.register(
            "backend_ring_slots",
            "Slots the backend holds in its VIP's Maglev ring: its share of new flows",
            f.ring_slots.clone(),
        );
        registry.register(
            "backend_active_flows",
            "Flows pinned to the backend and not idle past their timeout, as of the last count of the connection table",
            f.active_flows.clone(),
        );
        registry.register(
            "backend_health_changes",
            "Times the backend's health changed since the agent started: its first verdict, then each flip between up and down",
            f.changes.clone(),
        );
        registry.register(
            "backend_last_health_change_timestamp_seconds",
            "When the backend's health last changed, in Unix seconds (no series before the first change)",
            f.last_change.clone(),
        );
        registry.register(
            "health_check_failures",
            "Health probes of the backend that failed, by reason (connect, timeout, status, send, receive, closed, malformed)",
            f.check_failures.clone(),
        );
        f
    }

    fn record(&mut self, labels: &Labels, b: &BackendStatus) {
        self.traffic.record(labels, b.traffic);
        for state in HEALTH_STATES {
            set_state(&self.health, labels, state, b.health == state);
        }
        for state in ADMIN_STATES {
            set_state(&self.admin, labels, state, b.admin == state);
        }
        self.backup.get_or_create(labels).set(i64::from(b.backup));
        self.serving.get_or_create(labels).set(i64::from(b.serving()));
        self.standby.get_or_create(labels).set(i64::from(b.standby()));
        self.weight.get_or_create(labels).set(i64::from(b.weight));
        self.ring_slots.get_or_create(labels).set(i64::from(b.ring_slots));
        self.active_flows.get_or_create(labels).set(i64::try_from(b.active_flows).unwrap_or(i64::MAX));
        self.changes.get_or_create(labels).inc_by(b.health_changes);
        if let Some(at) = b.last_change_unix_seconds {
            self.last_change.get_or_create(labels).set(at);
        }
        for (reason, count) in &b.checks.failures {
            let mut l = labels.clone();
            l.push(("reason", reason.clone()));
            self.check_failures.get_or_create(&l).inc_by(*count);
        }
        self.check_durations.series.push((labels.clone(), b.checks.clone()));
    }

    fn finish(self, registry: &mut Registry) {
        registry.register_with_unit(
            "health_check_duration",
            "How long the backend's health probes took, from when each had a probe slot",
            Unit::Seconds,
            self.check_durations,
        );
    }
}

/// Sets the series of `family` for `labels` plus `state` to 1 if `on`, else 0.
fn set_state(family: &Family<Labels, Gauge>, labels: &Labels, state: &str, on: bool) {
    let mut l = labels.clone();
    l.push(("state", state.to_owned()));
    family.get_or_create(&l).set(i64::from(on));
}

/// Per-VIP families.
struct VipFamilies {
    traffic: TrafficFamilies,
    backends: Family<Labels, Gauge>,
    up: Family<Labels, Gauge>,
    serving: Family<Labels, Gauge>,
    limited: Family<Labels, Counter>,
}

impl VipFamilies {
    fn new(registry: &mut Registry) -> Self {
        let f = VipFamilies {
            traffic: TrafficFamilies::register(registry, "vip", "the VIP's"),
            backends: Family::default(),
            up: Family::default(),
            serving: Family::default(),
            limited: Family::default(),
        };
        registry.register("vip_backends", "Backends the VIP has in its config", f.backends.clone());
        registry.register(
            "vip_backends_up",
            "Backends of the VIP that pass their health checks, whatever their admin state, weight or backup role",
            f.up.clone(),
        );
        registry.register(
            "vip_backends_serving",
            "Backends of the VIP that take new flows now (not down, drained, in maintenance, at weight 0 or a backup standing by); 0 means the VIP refuses new flows",
            f.serving.clone(),
        );
        registry.register(
            "limited",
            "Packets that would have opened a flow, refused by a per-client limit of the VIP ([vip.limits])",
            f.limited.clone(),
        );
        f
    }

    fn record(&self, v: &VipStatus) {
        let labels: Labels = vec![("vip", v.name.clone())];
        self.traffic.record(&labels, v.traffic);
        self.backends.get_or_create(&labels).set(i64::try_from(v.backends.len()).unwrap_or(i64::MAX));
        self.up.get_or_create(&labels).set(i64::try_from(v.backends_up).unwrap_or(i64::MAX));
        self.serving.get_or_create(&labels).set(i64::try_from(v.backends_serving).unwrap_or(i64::MAX));
        if let Some(l) = v.limited {
            for (limit, count) in [
                ("new_connections_per_second", l.new_connections_per_second),
                ("max_connections_per_client", l.max_connections_per_client),
            ] {
                self.limited.get_or_create(&vec![("vip", v.name.clone()), ("limit", limit.to_owned())]).inc_by(count);
            }
        }
    }
}

/// Renders the snapshot, and this process's figures if given, as
/// OpenMetrics text. Names carry the `lb_` prefix; counters get `_total`
/// from the encoder.
///
/// # Errors
/// Only if formatting into a string fails.
pub fn render(status: &Status, process: Option<&ProcessStats>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("lb");
    let vips = VipFamilies::new(&mut registry);
    let mut backends = BackendFamilies::new(&mut registry);
    for v in &status.vips {
        vips.record(v);
        for b in &v.backends {
            backends.record(&vec![("vip", v.name.clone()), ("backend", b.address.clone())], b);
        }
    }
    backends.finish(&mut registry);
    register_verdicts(&mut registry, status);
    register_conntrack(&mut registry, &status.conntrack);
    register_health_checks(&mut registry, &status.health_checks);
    register_config(&mut registry, &status.config);
    let attached = Family::<Labels, Gauge>::default();
    registry.register(
        "xdp_attached",
        "1 for each interface the XDP program is attached to, with its mode (native or generic)",
        attached.clone(),
    );
    for i in &status.interfaces {
        attached.get_or_create(&vec![("interface", i.name.clone()), ("mode", i.mode.clone())]).set(1);
    }
    let b = &status.build;
    registry.register(
        "build",
        "The running agent: its version, the git commit it was built from, and the kernel's release",
        Info::new(vec![("version", b.version.clone()), ("commit", b.commit.clone()), ("kernel", b.kernel.clone())]),
    );
    let mut out = String::new();
    encode_registry(&mut out, &registry)?;
    if let Some(p) = process {
        encode_registry(&mut out, &process_registry(p))?;
    }
    prometheus_client::encoding::text::encode_eof(&mut out)?;
    Ok(out)
}

/// `lb_verdict_packets_total{action, reason}`: the reason's name is its
/// action, an underscore, then why (`drop_no_backend`: `drop`, `no_backend`).
fn register_verdicts(registry: &mut Registry, status: &Status) {
    let verdicts = Family::<Labels, Counter>::default();
    registry.register(
        "verdict_packets",
        "Packets by the XDP program's action (pass, drop, redirect, tx) and its reason; the README lists every reason",
        verdicts.clone(),
    );
    for c in &status.verdicts {
        let (action, reason) = c.reason.split_once('_').unwrap_or(("other", c.reason.as_str()));
        verdicts.get_or_create(&vec![("action", action.to_owned()), ("reason", reason.to_owned())]).inc_by(c.packets);
    }
}

/// The connection table's occupancy (gauges) and lifecycle (counters).
fn register_conntrack(registry: &mut Registry, c: &ConntrackStatus) {
    registry.register(
        "conntrack_entries",
        "Entries in the connection table: the last count plus keys inserted since it began, at most the capacity",
        gauge(c.entries),
    );
    registry.register("conntrack_capacity", "Entries the connection table has room for", gauge(c.capacity));
    registry.register(
        "conntrack_evictions",
        "Connection-table entries evicted by LRU, estimated as keys inserted minus entries present",
        counter(c.evicted),
    );
    let events = Family::<Labels, Counter>::default();
    registry.register(
        "conntrack_events",
        "Connection-table events: inserted, expired, reopened (SYN after FIN/RST)",
        events.clone(),
    );
    for (event, value) in [("inserted", c.inserted), ("expired", c.expired), ("reopened", c.reopened)] {
        events.get_or_create(&vec![("event", event.to_owned())]).inc_by(value);
    }
}

/// The config's generation and its reloads, under Prometheus' usual names.
fn register_config(registry: &mut Registry, c: &ConfigStatus) {
    registry.register(
        "config_generation",
        "1 for the config read at start, one more per applied reload",
        gauge(c.generation),
    );
    registry.register(
        "config_last_reload_successful",
        "1 if the last reload was applied (or none was tried)",
        gauge(u64::from(c.last_reload_successful)),
    );
    registry.register(
        "config_last_reload_success_timestamp_seconds",
        "When the config now running was applied, in Unix seconds",
        fgauge(c.last_reload_success_timestamp_seconds),
    );
    let reloads = Family::<Labels, Counter>::default();
    registry.register(
        "config_reloads",
        "Reloads tried (SIGHUP or `lb reload`), by result: success, or failure (refused, nothing changed)",
        reloads.clone(),
    );
    let ok = c.reloads.saturating_sub(c.reload_failures);
    for (result, count) in [("success", ok), ("failure", c.reload_failures)] {
        reloads.get_or_create(&vec![("result", result.to_owned())]).inc_by(count);
    }
}

/// The checkers' shared probe slots and the probes that could not run.
fn register_health_checks(registry: &mut Registry, h: &HealthChecksStatus) {
    registry.register("health_probe_slots", "Health probes that may be in flight at once", gauge(h.probe_slots));
    registry.register(
        "health_probe_local_errors",
        "Health probes that could not run on this host (no descriptor or buffer); never counted against a backend",
        counter(h.local_errors),
    );
}

/// The `process_*` metrics, without the `lb_` prefix.
fn process_registry(p: &ProcessStats) -> Registry {
    let mut registry = Registry::default();
    let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    cpu.inc_by(p.cpu_seconds);
    registry.register_with_unit("process_cpu", "User and system CPU time the agent spent", Unit::Seconds, cpu);
    registry.register_with_unit(
        "process_resident_memory",
        "The agent's resident memory",
        Unit::Bytes,
        gauge(p.resident_memory_bytes),
    );
    registry.register_with_unit(
        "process_virtual_memory",
        "The agent's virtual memory",
        Unit::Bytes,
        gauge(p.virtual_memory_bytes),
    );
    registry.register("process_open_fds", "File descriptors the agent has open", gauge(p.open_fds));
    registry.register("process_max_fds", "The agent's limit on open file descriptors (soft)", gauge(p.max_fds));
    registry.register_with_unit(
        "process_start_time",
        "When the agent started, in Unix seconds",
        Unit::Seconds,
        fgauge(p.start_time_seconds),
    );
    registry
}

/// OpenMetrics text as the Prometheus text format (0.0.4): `# TYPE` and
/// `# HELP` name what the samples are called (a counter's `_total`, an
/// info's `_info`), `info` becomes `gauge`, and `# UNIT` and `# EOF` go.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut types = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|rest| rest.split_once(' ')) {
            types.insert(name.to_owned(), kind.to_owned());
        }
    }
    let sample_name = |name: &str| match types.get(name).map(String::as_str) {
        Some("counter") => format!("{name}_total"),
        Some("info") => format!("{name}_info"),
        _ => name.to_owned(),
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|rest| rest.split_once(' ')) {
            let kind = if kind == "info" { "gauge" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", sample_name(name)));
        } else if let Some((name, help)) = line.strip_prefix("# HELP ").and_then(|rest| rest.split_once(' ')) {
            out.push_str(&format!("# HELP {} {help}\n", sample_name(name)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests;

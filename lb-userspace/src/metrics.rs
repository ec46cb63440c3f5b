//! Prometheus metrics, rendered from a status snapshot at scrape time.
//!
//! The kernel keeps per-CPU counters; they are summed when read, so the
//! exposition is written per scrape rather than kept in step with the maps.
//! Names follow Prometheus' conventions: the `lb_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters, `_info` on the build's
//! labels, enum-like states as one gauge per state (1 for the current one).
//! The process metrics (`process_*`) carry no prefix, as every client
//! library exports them.
//!
//! [`render`] writes OpenMetrics (what Prometheus asks for) directly into
//! one string: at 1,024 VIPs × 4 backends that is 150,000 lines, and a
//! registry of label-set families (prometheus_client) spent most of its
//! time hashing and cloning label sets. [`to_text_format`] turns it into
//! the older Prometheus text format for clients that ask for `text/plain`
//! (and for `promtool check metrics`).

use std::fmt::Write as _;

use crate::{
    api::status::{BackendStatus, CHECK_DURATION_BUCKETS, Status, Traffic, VipStatus},
    process::ProcessStats,
};

/// The states `lb_backend_health` has a series for.
const HEALTH_STATES: [&str; 3] = ["unknown", "up", "down"];
/// The states `lb_backend_admin_state` has a series for.
const ADMIN_STATES: [&str; 3] = ["ready", "drain", "maint"];

/// A family with one sample per VIP or backend: its name, its help, and
/// how to read the value.
type Column<T, V> = (&'static str, &'static str, fn(&T) -> V);

/// A metric family's kind, as `# TYPE` says it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Info,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Info => "info",
        }
    }

    /// What its samples' names add to the family's.
    fn suffix(self) -> &'static str {
        match self {
            Kind::Counter => "_total",
            Kind::Info => "_info",
            Kind::Gauge | Kind::Histogram => "",
        }
    }
}

/// A sample's value: integers as they are, floats as OpenMetrics spells them.
trait Value {
    fn write_to(&self, out: &mut String);
}

impl Value for u64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for f64 {
    fn write_to(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            // Debug keeps a fraction or an exponent: "1.0", "0.0005", "1e20".
            let _ = write!(out, "{self:?}");
        }
    }
}

/// Appends `value` as an OpenMetrics label value: `\`, `"` and newlines escaped.
fn push_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `k1="v1",k2="v2"`, escaped, for reuse across a series' families.
fn label_set(labels: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (key, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        push_escaped(&mut out, value);
        out.push('"');
    }
    out
}

/// The exposition being written: one family at a time, its header, then
/// its samples.
struct Writer {
    out: String,
    /// The family being written: its name and kind.
    name: &'static str,
    kind: Kind,
}

impl Writer {
    /// Starts family `name` (without `_total`/`_info`), with its help line and unit.
    fn family(&mut self, name: &'static str, kind: Kind, unit: Option<&str>, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}.");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        if let Some(unit) = unit {
            let _ = writeln!(self.out, "# UNIT {name} {unit}");
        }
        self.name = name;
        self.kind = kind;
    }

    /// One sample of the current family: `labels` (already a label set, may
    /// be empty), then `extra` labels, escaped here.
    fn sample(&mut self, suffix: &str, labels: &str, extra: &[(&str, &str)], value: impl Value) {
        self.out.push_str(self.name);
        self.out.push_str(if suffix.is_empty() { self.kind.suffix() } else { suffix });
        if !labels.is_empty() || !extra.is_empty() {
            self.out.push('{');
            self.out.push_str(labels);
            for (i, (key, value)) in extra.iter().enumerate() {
                if i > 0 || !labels.is_empty() {
                    self.out.push(',');
                }
                self.out.push_str(key);
                self.out.push_str("=\"");
                push_escaped(&mut self.out, value);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        value.write_to(&mut self.out);
        self.out.push('\n');
    }
}

/// A VIP's label set and its backends' (`vip`, `backend`), escaped once.
struct Labelled<'a> {
    vip: &'a VipStatus,
    labels: String,
    backends: Vec<(&'a BackendStatus, String)>,
}

fn labelled(status: &Status) -> Vec<Labelled<'_>> {
    status
        .vips
        .iter()
        .map(|vip| Labelled {
            vip,
            labels: label_set(&[("vip", &vip.name)]),
            backends: vip
                .backends
                .iter()
                .map(|b| (b, label_set(&[("vip", &vip.name), ("backend", &b.address)])))
                .collect(),
        })
        .collect()
}

/// Renders the snapshot, and this process's figures if given, as
/// OpenMetrics text.
///
/// # Errors
/// Never in practice (writing into a string); kept for the callers' sake.
pub fn render(status: &Status, process: Option<&ProcessStats>) -> Result<String, std::fmt::Error> {
    let vips = labelled(status);
    let lines: usize = vips.iter().map(|v| 12 + 40 * v.backends.len()).sum::<usize>() + 200;
    let mut w = Writer { out: String::with_capacity(lines * 80), name: "", kind: Kind::Gauge };
    write_vips(&mut w, &vips);
    write_backends(&mut w, &vips);
    write_checks(&mut w, &vips);
    write_agent(&mut w, status);
    if let Some(p) = process {
        write_process(&mut w, p);
    }
    w.out.push_str("# EOF\n");
    Ok(w.out)
}

/// Traffic families by direction, of VIPs (`of` = `vip`) or backends.
fn write_traffic<'a>(
    w: &mut Writer,
    names: [&'static str; 4],
    whose: &str,
    series: impl Iterator<Item = (&'a str, Traffic)> + Clone,
) {
    let [packets, bytes, new_flows, rescheduled] = names;
    w.family(
        packets,
        Kind::Counter,
        None,
        &format!("Packets of {whose} balanced flows, by direction: in is client to backend, out is backend to client"),
    );
    for (labels, t) in series.clone() {
        w.sample("", labels, &[("direction", "in")], t.packets_in);
        w.sample("", labels, &[("direction", "out")], t.packets_out);
    }
    w.family(
        bytes,
        Kind::Counter,
        Some("bytes"),
        &format!("Bytes (whole frames) of {whose} balanced flows, by direction"),
    );
    for (labels, t) in series.clone() {
        w.sample("", labels, &[("direction", "in")], t.bytes_in);
        w.sample("", labels, &[("direction", "out")], t.bytes_out);
    }
    w.family(
        new_flows,
        Kind::Counter,
        None,
        &format!("Flows assigned to {whose} backend(s): new ones, and ones moved off a down backend"),
    );
    for (labels, t) in series.clone() {
        w.sample("", labels, &[], t.new_flows);
    }
    w.family(
        rescheduled,
        Kind::Counter,
        None,
        &format!("Flows moved to {whose} backend(s) off a backend that went down"),
    );
    for (labels, t) in series {
        w.sample("", labels, &[], t.rescheduled_flows);
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn write_vips(w: &mut Writer, vips: &[Labelled<'_>]) {
    let series = vips.iter().map(|v| (v.labels.as_str(), v.vip.traffic));
    write_traffic(
        w,
        ["lb_vip_packets", "lb_vip_bytes", "lb_vip_new_flows", "lb_vip_rescheduled_flows"],
        "the VIP's",
        series,
    );
    let gauges: [Column<VipStatus, usize>; 3] = [
        ("lb_vip_backends", "Backends the VIP has in its config", |v| v.backends.len()),
        (
            "lb_vip_backends_up",
            "Backends of the VIP that pass their health checks, whatever their admin state, weight or backup role",
            |v| v.backends_up,
        ),
        (
            "lb_vip_backends_serving",
            "Backends of the VIP that take new flows now (not down, drained, in maintenance, at weight 0 or a backup standing by); 0 means the VIP refuses new flows",
            |v| v.backends_serving,
        ),
    ];
    for (name, help, value) in gauges {
        w.family(name, Kind::Gauge, None, help);
        for v in vips {
            w.sample("", &v.labels, &[], count(value(v.vip)));
        }
    }
    w.family(
        "lb_limited",
        Kind::Counter,
        None,
        "Packets that would have opened a flow, refused by a per-client limit of the VIP ([vip.limits])",
    );
    for v in vips {
        if let Some(l) = v.vip.limited {
            w.sample("", &v.labels, &[("limit", "new_connections_per_second")], l.new_connections_per_second);
            w.sample("", &v.labels, &[("limit", "max_connections_per_client")], l.max_connections_per_client);
        }
    }
}

/// Every backend of every VIP with its label set.
fn backends<'a>(vips: &'a [Labelled<'a>]) -> impl Iterator<Item = (&'a BackendStatus, &'a str)> + Clone {
    vips.iter().flat_map(|v| v.backends.iter().map(|(b, labels)| (*b, labels.as_str())))
}

fn write_backends(w: &mut Writer, vips: &[Labelled<'_>]) {
    let series = backends(vips).map(|(b, labels)| (labels, b.traffic));
    write_traffic(
        w,
        ["lb_backend_packets", "lb_backend_bytes", "lb_backend_new_flows", "lb_backend_rescheduled_flows"],
        "the backend's",
        series,
    );
    w.family(
        "lb_backend_health",
        Kind::Gauge,
        None,
        "1 for the backend's health as its checks say (unknown before the first verdict, up, down), 0 for the others",
    );
    for (b, labels) in backends(vips) {
        for state in HEALTH_STATES {
            w.sample("", labels, &[("state", state)], u64::from(b.health == state));
        }
    }
    w.family(
        "lb_backend_admin_state",
        Kind::Gauge,
        None,
        "1 for the backend's admin state set with `lb backend` (ready, drain: no new flows, maint: down), 0 for the others",
    );
    for (b, labels) in backends(vips) {
        for state in ADMIN_STATES {
            w.sample("", labels, &[("state", state)], u64::from(b.admin == state));
        }
    }
    let per_backend: [Column<BackendStatus, u64>; 7] = [
        ("lb_backend_backup", "1 if the backend is a backup of its VIP", |b| u64::from(b.backup)),
        (
            "lb_backend_serving",
            "1 if the backend takes new flows now: up, ready, weight above 0, and not a backup standing by",
            |b| u64::from(b.serving()),
        ),
        (
            "lb_backend_standby",
            "1 if the backend is a backup, up and ready, holding no flows' slots while a primary is available",
            |b| u64::from(b.standby()),
        ),
        (
            "lb_backend_weight",
            "The backend's weight in force (the config's, or one set with `lb backend weight`)",
            |b| u64::from(b.weight),
        ),
        ("lb_backend_ring_slots", "Slots the backend holds in its VIP's Maglev ring: its share of new flows", |b| {
            u64::from(b.ring_slots)
        }),
        (
            "lb_backend_active_flows",
            "Flows pinned to the backend and not idle past their timeout, as of the last count of the connection table",
            |b| b.active_flows,
        ),
        (
            "lb_backend_health_changes",
            "Times the backend's health changed since the agent started: its first verdict, then each flip between up and down",
            |b| b.health_changes,
        ),
    ];
    for (name, help, value) in per_backend {
        // All gauges but the one counter among them.
        let kind = if name == "lb_backend_health_changes" { Kind::Counter } else { Kind::Gauge };
        w.family(name, kind, None, help);
        for (b, labels) in backends(vips) {
            w.sample("", labels, &[], value(b));
        }
    }
    w.family(
        "lb_backend_handshakes",
        Kind::Counter,
        None,
        "TCP handshakes and UDP unreachables the data path saw per backend, by event: syn (forwarded to it), \
         syn_ack, reset (a RST answering a SYN), unreachable (ICMP port/host unreachable quoting a UDP datagram)",
    );
    for (b, labels) in backends(vips) {
        let h = b.handshakes;
        for (event, count) in
            [("syn", h.syns), ("syn_ack", h.syn_acks), ("reset", h.resets), ("unreachable", h.unreachables)]
        {
            w.sample("", labels, &[("event", event)], count);
        }
    }
    w.family(
        "lb_backend_passive_failures",
        Kind::Counter,
        None,
        "Failed handshakes passive health ([vip.passive_health]) counted against the backend while it was up, \
         since the agent started or its VIP turned passive health on",
    );
    for (b, labels) in backends(vips) {
        w.sample("", labels, &[], b.passive_failures);
    }
    w.family(
        "lb_backend_last_health_change_timestamp_seconds",
        Kind::Gauge,
        None,
        "When the backend's health last changed, in Unix seconds (no series before the first change)",
    );
    for (b, labels) in backends(vips) {
        if let Some(at) = b.last_change_unix_seconds {
            w.sample("", labels, &[], at);
        }
    }
}

fn write_checks(w: &mut Writer, vips: &[Labelled<'_>]) {
    w.family(
        "lb_health_check_failures",
        Kind::Counter,
        None,
        "Health probes of the backend that failed, by reason (connect, timeout, status, body, send, receive, closed, malformed, tls, rcode, no_answer, setup)",
    );
    for (b, labels) in backends(vips) {
        for (reason, count) in &b.checks.failures {
            w.sample("", labels, &[("reason", reason)], *count);
        }
    }
    w.family(
        "lb_health_check_duration_seconds",
        Kind::Histogram,
        Some("seconds"),
        "How long the backend's health probes took, from when each had a probe slot",
    );
    // Bucket bounds as label values, formatted once.
    let bounds: Vec<String> = CHECK_DURATION_BUCKETS
        .iter()
        .map(|le| {
            let mut s = String::new();
            le.write_to(&mut s);
            s
        })
        .chain(["+Inf".to_owned()])
        .collect();
    for (b, labels) in backends(vips) {
        let h = &b.checks;
        w.sample("_sum", labels, &[], h.sum_seconds);
        w.sample("_count", labels, &[], h.count);
        let mut cumulative = 0;
        for (i, le) in bounds.iter().enumerate() {
            cumulative += h.buckets.get(i).copied().unwrap_or(0);
            w.sample("_bucket", labels, &[("le", le)], cumulative);
        }
    }
}

/// The verdicts, the connection table, the checkers, the config, the
/// interfaces and the build.
fn write_agent(w: &mut Writer, status: &Status) {
    w.family(
        "lb_verdict_packets",
        Kind::Counter,
        None,
        "Packets by the XDP program's action (pass, drop, redirect, tx) and its reason; the README lists every reason",
    );
    for c in &status.verdicts {
        // The reason's name is its action, an underscore, then why.
        let (action, reason) = c.reason.split_once('_').unwrap_or(("other", c.reason.as_str()));
        w.sample("", "", &[("action", action), ("reason", reason)], c.packets);
    }
    let c = &status.conntrack;
    let scalars: [(&'static str, Kind, &str, u64); 3] = [
        (
            "lb_conntrack_entries",
            Kind::Gauge,
            "Entries in the connection table: the last count plus keys inserted since it began, at most the capacity",
            c.entries,
        ),
        ("lb_conntrack_capacity", Kind::Gauge, "Entries the connection table has room for", c.capacity),
        (
            "lb_conntrack_evictions",
            Kind::Counter,
            "Connection-table entries evicted by LRU, estimated as keys inserted minus entries present",
            c.evicted,
        ),
    ];
    for (name, kind, help, value) in scalars {
        w.family(name, kind, None, help);
        w.sample("", "", &[], value);
    }
    w.family(
        "lb_conntrack_events",
        Kind::Counter,
        None,
        "Connection-table events: inserted, expired, reopened (SYN after FIN/RST)",
    );
    for (event, value) in [("inserted", c.inserted), ("expired", c.expired), ("reopened", c.reopened)] {
        w.sample("", "", &[("event", event)], value);
    }
    let h = &status.health_checks;
    w.family("lb_health_probe_slots", Kind::Gauge, None, "Health probes that may be in flight at once");
    w.sample("", "", &[], h.probe_slots);
    w.family(
        "lb_health_probe_local_errors",
        Kind::Counter,
        None,
        "Health probes that could not run on this host (no descriptor or buffer); never counted against a backend",
    );
    w.sample("", "", &[], h.local_errors);
    let config = &status.config;
    w.family("lb_config_generation", Kind::Gauge, None, "1 for the config read at start, one more per applied reload");
    w.sample("", "", &[], config.generation);
    w.family(
        "lb_config_last_reload_successful",
        Kind::Gauge,
        None,
        "1 if the last reload was applied (or none was tried)",
    );
    w.sample("", "", &[], u64::from(config.last_reload_successful));
    w.family(
        "lb_config_last_reload_success_timestamp_seconds",
        Kind::Gauge,
        None,
        "When the config now running was applied, in Unix seconds",
    );
    w.sample("", "", &[], config.last_reload_success_timestamp_seconds);
    w.family(
        "lb_config_reloads",
        Kind::Counter,
        None,
        "Reloads tried (SIGHUP or `lb reload`), by result: success, or failure (refused, nothing changed)",
    );
    w.sample("", "", &[("result", "success")], config.reloads.saturating_sub(config.reload_failures));
    w.sample("", "", &[("result", "failure")], config.reload_failures);
    w.family(
        "lb_xdp_attached",
        Kind::Gauge,
        None,
        "1 for each interface the XDP program is attached to, with its mode (native or generic)",
    );
    for i in &status.interfaces {
        w.sample("", "", &[("interface", &i.name), ("mode", &i.mode)], 1_u64);
    }
    let b = &status.build;
    w.family(
        "lb_build",
        Kind::Info,
        None,
        "The running agent: its version, the git commit it was built from, and the kernel's release",
    );
    w.sample("", "", &[("version", &b.version), ("commit", &b.commit), ("kernel", &b.kernel)], 1_u64);
}

/// The `process_*` metrics, without the `lb_` prefix.
fn write_process(w: &mut Writer, p: &ProcessStats) {
    w.family("process_cpu_seconds", Kind::Counter, Some("seconds"), "User and system CPU time the agent spent");
    w.sample("", "", &[], p.cpu_seconds);
    let gauges: [(&'static str, Option<&str>, &str, u64); 4] = [
        ("process_resident_memory_bytes", Some("bytes"), "The agent's resident memory", p.resident_memory_bytes),
        ("process_virtual_memory_bytes", Some("bytes"), "The agent's virtual memory", p.virtual_memory_bytes),
        ("process_open_fds", None, "File descriptors the agent has open", p.open_fds),
        ("process_max_fds", None, "The agent's limit on open file descriptors (soft)", p.max_fds),
    ];
    for (name, unit, help, value) in gauges {
        w.family(name, Kind::Gauge, unit, help);
        w.sample("", "", &[], value);
    }
    w.family("process_start_time_seconds", Kind::Gauge, Some("seconds"), "When the agent started, in Unix seconds");
    w.sample("", "", &[], p.start_time_seconds);
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

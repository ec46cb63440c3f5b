//! Prometheus metrics, rendered from a status snapshot at scrape time.
//!
//! The kernel keeps per-CPU counters; they are summed when read, so a
//! registry is built per scrape rather than kept in step with the maps.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::api::status::{ConfigStatus, ConntrackStatus, HealthChecksStatus, Status, Traffic};

type Labels = Vec<(&'static str, String)>;

struct TrafficFamilies {
    packets: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    new_flows: Family<Labels, Counter>,
    rescheduled: Family<Labels, Counter>,
}

impl TrafficFamilies {
    fn register(registry: &mut Registry) -> Self {
        let f = TrafficFamilies {
            packets: Family::default(),
            bytes: Family::default(),
            new_flows: Family::default(),
            rescheduled: Family::default(),
        };
        registry.register("packets", "Packets of balanced flows, both directions", f.packets.clone());
        registry.register("bytes", "Bytes of balanced flows (whole frames), both directions", f.bytes.clone());
        registry.register("new_flows", "Flows assigned a backend (new, or moved off a down one)", f.new_flows.clone());
        registry.register("rescheduled_flows", "Flows moved off a backend that went down", f.rescheduled.clone());
        f
    }

    fn record(&self, labels: &Labels, t: Traffic) {
        self.packets.get_or_create(labels).inc_by(t.packets);
        self.bytes.get_or_create(labels).inc_by(t.bytes);
        self.new_flows.get_or_create(labels).inc_by(t.new_flows);
        self.rescheduled.get_or_create(labels).inc_by(t.rescheduled_flows);
    }
}

/// Renders the snapshot as OpenMetrics text. Names carry the `lb_` prefix;
/// counters get `_total` from the encoder.
///
/// # Errors
/// Only if formatting into a string fails.
pub fn render(status: &Status) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("lb");
    // Per (vip, backend) only: a VIP's totals are the sum over its backends.
    let traffic = TrafficFamilies::register(&mut registry);
    let up = Family::<Labels, Gauge>::default();
    registry.register("backend_up", "1 if the backend passes its health checks, else 0", up.clone());
    let handshakes = Family::<Labels, Counter>::default();
    registry.register(
        "backend_handshakes",
        "TCP handshakes and UDP unreachables the data path saw per backend, by event: syn (forwarded to it), \
         syn_ack, reset (a RST answering a SYN), unreachable (ICMP port/host unreachable quoting a UDP datagram)",
        handshakes.clone(),
    );
    let passive_failures = Family::<Labels, Counter>::default();
    registry.register(
        "backend_passive_failures",
        "Failed handshakes passive health ([vip.passive_health]) counted against the backend while it was up, \
         since the agent started or its VIP turned passive health on",
        passive_failures.clone(),
    );
    let backends_up = Family::<Labels, Gauge>::default();
    registry.register("vip_backends_up", "Backends of the VIP that are up", backends_up.clone());
    let verdicts = Family::<Labels, Counter>::default();
    registry.register("verdicts", "Packets by the XDP program's verdict and its reason", verdicts.clone());
    let limited = Family::<Labels, Counter>::default();
    registry.register(
        "limited",
        "Packets that would have opened a flow, refused by a per-client limit of the VIP ([vip.limits])",
        limited.clone(),
    );

    for v in &status.vips {
        let vip_labels: Labels = vec![("vip", v.name.clone())];
        backends_up.get_or_create(&vip_labels).set(v.backends_up as i64);
        if let Some(l) = v.limited {
            for (limit, count) in [
                ("new_connections_per_second", l.new_connections_per_second),
                ("max_connections_per_client", l.max_connections_per_client),
            ] {
                limited.get_or_create(&vec![("vip", v.name.clone()), ("limit", limit.to_owned())]).inc_by(count);
            }
        }
        for b in &v.backends {
            let labels: Labels = vec![("vip", v.name.clone()), ("backend", b.address.clone())];
            traffic.record(&labels, b.traffic);
            up.get_or_create(&labels).set(i64::from(b.health == "up"));
            passive_failures.get_or_create(&labels).inc_by(b.passive_failures);
            let h = b.handshakes;
            for (event, count) in
                [("syn", h.syns), ("syn_ack", h.syn_acks), ("reset", h.resets), ("unreachable", h.unreachables)]
            {
                let mut labels = labels.clone();
                labels.push(("event", event.to_owned()));
                handshakes.get_or_create(&labels).inc_by(count);
            }
        }
    }
    for c in &status.verdicts {
        verdicts.get_or_create(&vec![("reason", c.reason.clone())]).inc_by(c.packets);
    }
    register_conntrack(&mut registry, &status.conntrack);
    register_health_checks(&mut registry, &status.health_checks);
    register_config(&mut registry, &status.config);
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

/// The connection table's occupancy (gauges) and lifecycle (counters).
fn register_conntrack(registry: &mut Registry, c: &ConntrackStatus) {
    let gauge = |value: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        g
    };
    let counter = |value: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        c
    };
    registry.register(
        "conntrack_entries",
        "Entries in the connection table (walked every few seconds)",
        gauge(c.entries),
    );
    registry.register("conntrack_capacity", "Entries the connection table has room for", gauge(c.capacity));
    registry.register(
        "conntrack_evictions",
        "Connection-table entries evicted by LRU, estimated as inserted minus present",
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

/// The config's generation and its last reload, under Prometheus' usual names.
fn register_config(registry: &mut Registry, c: &ConfigStatus) {
    let generation = Gauge::<i64>::default();
    generation.set(i64::try_from(c.generation).unwrap_or(i64::MAX));
    registry.register("config_generation", "1 for the config read at start, one more per applied reload", generation);
    let ok = Gauge::<i64>::default();
    ok.set(i64::from(c.last_reload_successful));
    registry.register("config_last_reload_successful", "1 if the last reload was applied (or none was tried)", ok);
    let at = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    at.set(c.last_reload_success_timestamp_seconds);
    registry.register(
        "config_last_reload_success_timestamp_seconds",
        "When the config now running was applied, in Unix seconds",
        at,
    );
}

/// The checkers' shared probe slots and the probes that could not run.
fn register_health_checks(registry: &mut Registry, h: &HealthChecksStatus) {
    let slots = Gauge::<i64>::default();
    slots.set(i64::try_from(h.probe_slots).unwrap_or(i64::MAX));
    registry.register("health_probe_slots", "Health probes that may be in flight at once", slots);
    let local = Counter::<u64>::default();
    local.inc_by(h.local_errors);
    registry.register(
        "health_probe_local_errors",
        "Health probes that could not run on this host (no descriptor or buffer); never counted against a backend",
        local,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::{BackendStatus, Handshakes, Limited, VerdictCount, VipStatus};

    #[test]
    fn renders_the_metrics_the_docs_promise() {
        let status = Status {
            vips: vec![VipStatus {
                name: "web".into(),
                listen: "198.18.0.100:80".into(),
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                backends_up: 1,
                traffic: Traffic { packets: 10, bytes: 1000, new_flows: 2, rescheduled_flows: 0 },
                backends: vec![BackendStatus {
                    address: "198.18.2.11:8080".into(),
                    weight: 1,
                    backup: false,
                    health: "up".into(),
                    last_check: Some("ok".into()),
                    traffic: Traffic { packets: 7, bytes: 700, new_flows: 1, rescheduled_flows: 0 },
                    admin: "ready".into(),
                    weight_set_at_runtime: false,
                    active_flows: 0,
                    down_reason: None,
                    handshakes: Handshakes { syns: 20, syn_acks: 17, resets: 3, unreachables: 0 },
                    passive_failures: 3,
                }],
                limited: Some(Limited { new_connections_per_second: 11, max_connections_per_client: 12 }),
            }],
            verdicts: vec![VerdictCount { reason: "pass_not_vip".into(), packets: 3, help: String::new() }],
            conntrack: ConntrackStatus {
                entries: 5,
                capacity: 1024,
                inserted: 9,
                expired: 2,
                reopened: 1,
                evicted: 4,
                counted_ms_ago: 0,
            },
            health_checks: HealthChecksStatus { probe_slots: 690, local_errors: 6 },
            config: ConfigStatus {
                generation: 3,
                last_reload_successful: false,
                last_reload_success_timestamp_seconds: 1_700_000_000.5,
            },
        };
        let text = render(&status).expect("render");
        for line in [
            "lb_backend_up{vip=\"web\",backend=\"198.18.2.11:8080\"} 1",
            "lb_packets_total{vip=\"web\",backend=\"198.18.2.11:8080\"} 7",
            "lb_bytes_total{vip=\"web\",backend=\"198.18.2.11:8080\"} 700",
            "lb_new_flows_total{vip=\"web\",backend=\"198.18.2.11:8080\"} 1",
            "lb_vip_backends_up{vip=\"web\"} 1",
            "lb_verdicts_total{reason=\"pass_not_vip\"} 3",
            "lb_conntrack_entries 5",
            "lb_conntrack_capacity 1024",
            "lb_conntrack_evictions_total 4",
            "lb_conntrack_events_total{event=\"expired\"} 2",
            "lb_conntrack_events_total{event=\"inserted\"} 9",
            "lb_health_probe_slots 690",
            "lb_health_probe_local_errors_total 6",
            "lb_limited_total{vip=\"web\",limit=\"new_connections_per_second\"} 11",
            "lb_limited_total{vip=\"web\",limit=\"max_connections_per_client\"} 12",
            "lb_backend_handshakes_total{vip=\"web\",backend=\"198.18.2.11:8080\",event=\"syn\"} 20",
            "lb_backend_handshakes_total{vip=\"web\",backend=\"198.18.2.11:8080\",event=\"syn_ack\"} 17",
            "lb_backend_handshakes_total{vip=\"web\",backend=\"198.18.2.11:8080\",event=\"reset\"} 3",
            "lb_backend_handshakes_total{vip=\"web\",backend=\"198.18.2.11:8080\",event=\"unreachable\"} 0",
            "lb_backend_passive_failures_total{vip=\"web\",backend=\"198.18.2.11:8080\"} 3",
            "lb_config_generation 3",
            "lb_config_last_reload_successful 0",
            "lb_config_last_reload_success_timestamp_seconds 1700000000.5",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn ipv6_backends_are_labelled_as_bracketed_addresses() {
        let backend = BackendStatus {
            address: "[2001:db8:2::11]:8080".into(),
            weight: 1,
            backup: false,
            health: "up".into(),
            last_check: Some("ok".into()),
            traffic: Traffic { packets: 3, ..Traffic::default() },
            admin: "ready".into(),
            weight_set_at_runtime: false,
            active_flows: 0,
            down_reason: None,
            handshakes: Handshakes::default(),
            passive_failures: 0,
        };
        let status = Status {
            vips: vec![VipStatus {
                name: "web6".into(),
                listen: "[2001:db8::100]:80".into(),
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                backends_up: 1,
                traffic: Traffic::default(),
                backends: vec![backend],
                limited: None,
            }],
            ..Status::default()
        };
        let text = render(&status).expect("render");
        for line in [
            "lb_backend_up{vip=\"web6\",backend=\"[2001:db8:2::11]:8080\"} 1",
            "lb_packets_total{vip=\"web6\",backend=\"[2001:db8:2::11]:8080\"} 3",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}

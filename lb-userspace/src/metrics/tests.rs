use super::*;
use crate::api::status::{
    BackendStatus, BuildInfo, CheckStats, ConfigStatus, ConntrackStatus, HealthChecksStatus, Limited, VerdictCount,
    VipStatus,
};

/// Every metric family the agent exports: name (as in `# TYPE`), type and
/// unit. The README's metrics table must list the same names (checked
/// below), and `promtool check metrics` lints a live agent's (tests/tests/metrics.rs).
const GOLDEN: &[(&str, &str, Option<&str>)] = &[
    ("lb_vip_packets", "counter", None),
    ("lb_vip_bytes", "counter", Some("bytes")),
    ("lb_vip_new_flows", "counter", None),
    ("lb_vip_rescheduled_flows", "counter", None),
    ("lb_vip_backends", "gauge", None),
    ("lb_vip_backends_up", "gauge", None),
    ("lb_vip_backends_serving", "gauge", None),
    ("lb_limited", "counter", None),
    ("lb_backend_packets", "counter", None),
    ("lb_backend_bytes", "counter", Some("bytes")),
    ("lb_backend_new_flows", "counter", None),
    ("lb_backend_rescheduled_flows", "counter", None),
    ("lb_backend_health", "gauge", None),
    ("lb_backend_admin_state", "gauge", None),
    ("lb_backend_backup", "gauge", None),
    ("lb_backend_serving", "gauge", None),
    ("lb_backend_standby", "gauge", None),
    ("lb_backend_weight", "gauge", None),
    ("lb_backend_ring_slots", "gauge", None),
    ("lb_backend_active_flows", "gauge", None),
    ("lb_backend_health_changes", "counter", None),
    ("lb_backend_handshakes", "counter", None),
    ("lb_backend_passive_failures", "counter", None),
    ("lb_backend_last_health_change_timestamp_seconds", "gauge", None),
    ("lb_health_check_failures", "counter", None),
    ("lb_health_check_duration_seconds", "histogram", Some("seconds")),
    ("lb_verdict_packets", "counter", None),
    ("lb_conntrack_entries", "gauge", None),
    ("lb_conntrack_capacity", "gauge", None),
    ("lb_conntrack_evictions", "counter", None),
    ("lb_conntrack_events", "counter", None),
    ("lb_health_probe_slots", "gauge", None),
    ("lb_health_probe_local_errors", "counter", None),
    ("lb_config_generation", "gauge", None),
    ("lb_config_last_reload_successful", "gauge", None),
    ("lb_config_last_reload_success_timestamp_seconds", "gauge", None),
    ("lb_config_reloads", "counter", None),
    ("lb_xdp_attached", "gauge", None),
    ("lb_build", "info", None),
    ("process_cpu_seconds", "counter", Some("seconds")),
    ("process_resident_memory_bytes", "gauge", Some("bytes")),
    ("process_virtual_memory_bytes", "gauge", Some("bytes")),
    ("process_open_fds", "gauge", None),
    ("process_max_fds", "gauge", None),
    ("process_start_time_seconds", "gauge", Some("seconds")),
];

/// The name a family's samples carry: a counter's `_total`, an info's `_info`.
fn sample_name(name: &str, kind: &str) -> String {
    match kind {
        "counter" => format!("{name}_total"),
        "info" => format!("{name}_info"),
        _ => name.to_owned(),
    }
}

fn backend(address: &str) -> BackendStatus {
    BackendStatus {
        address: address.into(),
        weight: 1,
        backup: false,
        health: "up".into(),
        last_check: Some("ok".into()),
        traffic: Traffic::default(),
        admin: "ready".into(),
        weight_set_at_runtime: false,
        active_flows: 0,
        ring_slots: 0,
        checks: CheckStats::default(),
        health_changes: 0,
        last_change_unix_seconds: None,
        down_reason: None,
        handshakes: crate::api::status::Handshakes::default(),
        passive_failures: 0,
    }
}

fn vip(name: &str, listen: &str, backends: Vec<BackendStatus>) -> VipStatus {
    VipStatus {
        name: name.into(),
        listen: listen.into(),
        protocol: "tcp".into(),
        scheduler: "maglev".into(),
        backends_up: backends.iter().filter(|b| b.health == "up").count(),
        backends_serving: backends.iter().filter(|b| b.serving()).count(),
        traffic: Traffic::default(),
        backends,
        limited: None,
    }
}

/// A VIP with a serving primary, a drained one and a backup standing by.
fn sample_status() -> Status {
    let mut checks = CheckStats::default();
    checks.record(0.0007, None);
    checks.record(0.03, Some("timeout"));
    checks.record(9.0, Some("connect"));
    let primary = BackendStatus {
        traffic: Traffic {
            packets: 10,
            bytes: 1000,
            packets_in: 7,
            bytes_in: 600,
            packets_out: 3,
            bytes_out: 400,
            new_flows: 1,
            rescheduled_flows: 0,
        },
        ring_slots: 65537,
        active_flows: 4,
        checks,
        health_changes: 2,
        last_change_unix_seconds: Some(1_700_000_000.25),
        ..backend("198.18.2.11:8080")
    };
    let drained = BackendStatus { admin: "drain".into(), ..backend("198.18.2.12:8080") };
    let standby = BackendStatus { backup: true, ..backend("198.18.2.13:8080") };
    let mut web = vip("web", "198.18.0.100:80", vec![primary, drained, standby]);
    web.traffic = web.backends[0].traffic;
    web.limited = Some(Limited { new_connections_per_second: 11, max_connections_per_client: 12 });
    Status {
        vips: vec![web],
        verdicts: vec![
            VerdictCount { reason: "pass_not_vip".into(), packets: 3, help: String::new() },
            VerdictCount { reason: "drop_no_backend".into(), packets: 5, help: String::new() },
        ],
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
            reloads: 4,
            reload_failures: 2,
        },
        build: BuildInfo { version: "0.1.0".into(), commit: "abc".into(), kernel: "6.18.0".into() },
        events: Vec::new(),
        interfaces: vec![crate::api::status::InterfaceStatus { name: "eth0".into(), mode: "native".into() }],
    }
}

fn render_sample() -> String {
    let process = ProcessStats {
        cpu_seconds: 1.5,
        resident_memory_bytes: 4096,
        virtual_memory_bytes: 8192,
        open_fds: 9,
        max_fds: 1024,
        start_time_seconds: 1_700_000_000.0,
    };
    render(&sample_status(), Some(&process)).expect("render")
}

#[test]
fn the_families_are_the_golden_list_each_with_help_and_its_unit() {
    let text = render_sample();
    let mut types = Vec::new();
    let mut units = std::collections::HashMap::new();
    let mut helps = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            types.push((name.to_owned(), kind.to_owned()));
        } else if let Some((name, unit)) = line.strip_prefix("# UNIT ").and_then(|r| r.split_once(' ')) {
            units.insert(name.to_owned(), unit.to_owned());
        } else if let Some((name, help)) = line.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
            assert!(help.len() > 10, "{name}: help too short: {help:?}");
            helps.insert(name.to_owned());
        }
    }
    let got: Vec<(String, String, Option<String>)> =
        types.iter().map(|(n, k)| (n.clone(), k.clone(), units.get(n).cloned())).collect();
    let want: Vec<(String, String, Option<String>)> =
        GOLDEN.iter().map(|(n, k, u)| ((*n).to_owned(), (*k).to_owned(), u.map(str::to_owned))).collect();
    assert_eq!(got, want, "families (name, type, unit) in order");
    for (name, _, _) in GOLDEN {
        assert!(helps.contains(*name), "{name} has no HELP");
    }
    assert!(text.ends_with("# EOF\n"), "one EOF, at the end");
    assert_eq!(text.matches("# EOF").count(), 1);
}

#[test]
fn renders_the_values_with_their_labels() {
    let text = render_sample();
    let b = r#"vip="web",backend="198.18.2.11:8080""#;
    let drained = r#"vip="web",backend="198.18.2.12:8080""#;
    let standby = r#"vip="web",backend="198.18.2.13:8080""#;
    for line in [
        format!("lb_backend_packets_total{{{b},direction=\"in\"}} 7"),
        format!("lb_backend_packets_total{{{b},direction=\"out\"}} 3"),
        format!("lb_backend_bytes_total{{{b},direction=\"in\"}} 600"),
        format!("lb_backend_bytes_total{{{b},direction=\"out\"}} 400"),
        format!("lb_backend_new_flows_total{{{b}}} 1"),
        format!("lb_backend_health{{{b},state=\"up\"}} 1"),
        format!("lb_backend_health{{{b},state=\"unknown\"}} 0"),
        format!("lb_backend_health{{{b},state=\"down\"}} 0"),
        format!("lb_backend_admin_state{{{b},state=\"ready\"}} 1"),
        format!("lb_backend_admin_state{{{drained},state=\"drain\"}} 1"),
        format!("lb_backend_serving{{{b}}} 1"),
        format!("lb_backend_serving{{{drained}}} 0"),
        format!("lb_backend_serving{{{standby}}} 0"),
        format!("lb_backend_standby{{{standby}}} 1"),
        format!("lb_backend_standby{{{b}}} 0"),
        format!("lb_backend_backup{{{standby}}} 1"),
        format!("lb_backend_weight{{{b}}} 1"),
        format!("lb_backend_ring_slots{{{b}}} 65537"),
        format!("lb_backend_active_flows{{{b}}} 4"),
        format!("lb_backend_health_changes_total{{{b}}} 2"),
        format!("lb_backend_last_health_change_timestamp_seconds{{{b}}} 1700000000.25"),
        format!("lb_health_check_failures_total{{{b},reason=\"timeout\"}} 1"),
        format!("lb_health_check_failures_total{{{b},reason=\"connect\"}} 1"),
        format!("lb_health_check_duration_seconds_count{{{b}}} 3"),
        format!("lb_health_check_duration_seconds_bucket{{{b},le=\"0.001\"}} 1"),
        format!("lb_health_check_duration_seconds_bucket{{{b},le=\"0.05\"}} 2"),
        format!("lb_health_check_duration_seconds_bucket{{{b},le=\"5.0\"}} 2"),
        format!("lb_health_check_duration_seconds_bucket{{{b},le=\"+Inf\"}} 3"),
        "lb_vip_packets_total{vip=\"web\",direction=\"in\"} 7".to_owned(),
        "lb_vip_bytes_total{vip=\"web\",direction=\"out\"} 400".to_owned(),
        "lb_vip_backends{vip=\"web\"} 3".to_owned(),
        "lb_vip_backends_up{vip=\"web\"} 3".to_owned(),
        "lb_vip_backends_serving{vip=\"web\"} 1".to_owned(),
        "lb_limited_total{vip=\"web\",limit=\"new_connections_per_second\"} 11".to_owned(),
        "lb_limited_total{vip=\"web\",limit=\"max_connections_per_client\"} 12".to_owned(),
        "lb_verdict_packets_total{action=\"pass\",reason=\"not_vip\"} 3".to_owned(),
        "lb_verdict_packets_total{action=\"drop\",reason=\"no_backend\"} 5".to_owned(),
        "lb_conntrack_entries 5".to_owned(),
        "lb_conntrack_capacity 1024".to_owned(),
        "lb_conntrack_evictions_total 4".to_owned(),
        "lb_conntrack_events_total{event=\"expired\"} 2".to_owned(),
        "lb_conntrack_events_total{event=\"inserted\"} 9".to_owned(),
        "lb_health_probe_slots 690".to_owned(),
        "lb_health_probe_local_errors_total 6".to_owned(),
        "lb_config_generation 3".to_owned(),
        "lb_config_last_reload_successful 0".to_owned(),
        "lb_config_last_reload_success_timestamp_seconds 1700000000.5".to_owned(),
        "lb_config_reloads_total{result=\"success\"} 2".to_owned(),
        "lb_config_reloads_total{result=\"failure\"} 2".to_owned(),
        "lb_build_info{version=\"0.1.0\",commit=\"abc\",kernel=\"6.18.0\"} 1".to_owned(),
        "lb_xdp_attached{interface=\"eth0\",mode=\"native\"} 1".to_owned(),
        "process_cpu_seconds_total 1.5".to_owned(),
        "process_resident_memory_bytes 4096".to_owned(),
        "process_open_fds 9".to_owned(),
        "process_start_time_seconds 1700000000.0".to_owned(),
    ] {
        assert!(text.contains(&format!("{line}\n")), "missing {line:?} in\n{text}");
    }
}

#[test]
fn ipv6_backends_are_labelled_as_bracketed_addresses() {
    let backend = BackendStatus {
        traffic: Traffic { packets_in: 3, packets: 3, ..Traffic::default() },
        ..backend("[2001:db8:2::11]:8080")
    };
    let status = Status { vips: vec![vip("web6", "[2001:db8::100]:80", vec![backend])], ..Status::default() };
    let text = render(&status, None).expect("render");
    for line in [
        "lb_backend_health{vip=\"web6\",backend=\"[2001:db8:2::11]:8080\",state=\"up\"} 1",
        "lb_backend_packets_total{vip=\"web6\",backend=\"[2001:db8:2::11]:8080\",direction=\"in\"} 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn the_text_format_names_samples_in_type_and_help_and_drops_unit_and_eof() {
    let text = to_text_format(&render_sample());
    for line in [
        "# TYPE lb_backend_bytes_total counter",
        "# HELP lb_backend_bytes_total ",
        "# TYPE lb_build_info gauge",
        "# TYPE lb_health_check_duration_seconds histogram",
        "# TYPE lb_conntrack_entries gauge",
        "lb_conntrack_entries 5",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains("# UNIT") && !text.contains("# EOF"), "{text}");
}

/// The README's table under "Status and metrics" lists exactly the
/// families, by the names their samples carry.
#[test]
fn the_readme_lists_every_metric_and_no_other() {
    let readme = include_str!("../../../README.md");
    let section = readme.split("\n## Status and metrics").nth(1).expect("README has a Status and metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let listed: Vec<&str> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("lb_") || name.starts_with("process_"))
        .collect();
    let want: Vec<String> = GOLDEN.iter().map(|(n, k, _)| sample_name(n, k)).collect();
    let mut listed_sorted: Vec<String> = listed.iter().map(|s| (*s).to_owned()).collect();
    listed_sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(listed_sorted, want_sorted, "README metrics table vs the agent's families");
}

/// Issue 13's scale: 1,024 VIPs of 4 backends each, every backend with
/// checks and traffic. Prints the render time and size (the README's
/// figures come from `cargo test --release -p lb-userspace --lib
/// scrape_of_1024 -- --nocapture`); the bound here only catches a
/// blow-up, generous for a debug build on a loaded machine.
#[test]
fn scrape_of_1024_vips_of_4_backends() {
    let mut checks = CheckStats::default();
    checks.record(0.002, None);
    checks.record(0.3, Some("timeout"));
    let traffic = Traffic {
        packets: 20,
        bytes: 3000,
        packets_in: 12,
        bytes_in: 1000,
        packets_out: 8,
        bytes_out: 2000,
        new_flows: 2,
        rescheduled_flows: 0,
    };
    let vips: Vec<VipStatus> = (0..1024)
        .map(|v| {
            let backends = (0..4)
                .map(|b| BackendStatus {
                    traffic,
                    checks: checks.clone(),
                    ring_slots: 1000,
                    last_change_unix_seconds: Some(1.7e9),
                    ..backend(&format!("198.18.{}.{}:{}", 2 + v / 250, b + 1, 8000 + v % 250))
                })
                .collect();
            vip(&format!("vip{v}"), "198.18.0.100:80", backends)
        })
        .collect();
    let status = Status { vips, ..sample_status() };
    let started = std::time::Instant::now();
    let openmetrics = render(&status, None).expect("render");
    let rendered = started.elapsed();
    let text = to_text_format(&openmetrics);
    let total = started.elapsed();
    println!(
        "scrape of 1,024 VIPs x 4 backends: render {rendered:?}, with the text format {total:?}; {} bytes ({} lines)",
        openmetrics.len(),
        openmetrics.lines().count()
    );
    assert!(text.len() > 1_000_000 && total < std::time::Duration::from_secs(10), "{total:?}");
}

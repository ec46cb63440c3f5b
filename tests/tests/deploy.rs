//! The deploy kit checked by the real tools: `promtool check config`,
//! `check rules` and `test rules` on `deploy/prometheus/`, and every metric
//! the Grafana dashboard and the alert rules query exported by a live
//! agent, so neither can drift from it. promtool comes with Debian's
//! `prometheus` package (`cargo xtask setup` installs it).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs `promtool ARGS` in `dir`; panics with its output unless it succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{said}");
    said
}

#[test]
fn the_scrape_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy_dir().join("prometheus");
    promtool(&dir, &["check", "config", "prometheus.yml"]);
    let rules = promtool(&dir, &["check", "rules", "alerts.yml"]);
    assert!(rules.contains("6 rules found"), "{rules}");
    let tested = promtool(&dir, &["test", "rules", "alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Metric names in a PromQL expression: identifiers starting `lb_` or
/// `process_` outside quoted label values.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut quoted = false;
    let mut word = String::new();
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("lb_") || word.starts_with("process_") {
            names.insert(word.clone());
        }
        word.clear();
    }
    names
}

/// Every query of the dashboard: panel targets and template variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    for variable in dashboard["templating"]["list"].as_array().cloned().unwrap_or_default() {
        if let Some(q) = variable["query"].as_str() {
            queries.push(q.to_owned());
        }
    }
    queries
}

/// The `expr:` lines of the alert rules (each on one line).
fn alert_queries(rules: &str) -> Vec<String> {
    rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")).map(|e| e.trim().to_owned()).collect()
}

/// Sample names a scrape can carry: each family's, and a histogram's
/// `_bucket`, `_sum` and `_count`, from the text format's `# TYPE` lines
/// (present even for a family with no series yet, such as `lb_limited_total`
/// without limits).
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    lb_tests::require_root!();
    let testbed = Testbed::new(2).expect("building the testbed");
    let mut agent = Agent::start(&testbed, &agent::config_for(&testbed, HealthCheck::default())).expect("starting lb");
    agent.wait_health("web", &["up", "up"], Duration::from_secs(10)).expect("web backends up");
    let metrics = agent.metrics().expect("/metrics");
    let exported = exported(&metrics);

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_dir().join("grafana/lb-dashboard.json")).expect("reading the dashboard"),
    )
    .expect("the dashboard is JSON");
    let rules = std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yml")).expect("reading the rules");
    let queries: Vec<String> = dashboard_queries(&dashboard).into_iter().chain(alert_queries(&rules)).collect();
    assert!(queries.len() > 20, "queries found: {queries:?}");
    let mut queried = BTreeSet::new();
    for query in &queries {
        for name in metric_names(query) {
            assert!(exported.contains(&name), "{name} (in {query}) is not exported; exported: {exported:?}");
            queried.insert(name);
        }
    }
    // The panels cover the main families.
    for name in ["lb_vip_backends_serving", "lb_vip_packets_total", "lb_health_check_duration_seconds_bucket"] {
        assert!(queried.contains(name), "no panel or rule queries {name}");
    }
}

/// `lb check` (the binary, as an operator runs it) passes every example.
#[test]
fn lb_check_passes_every_example() {
    let lb = lb_tests::lb_bin().expect("lb binary");
    let dir = deploy_dir().join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("an entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(&lb).arg("check").arg("--config").arg(&path).output().expect("running lb check");
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "lb check {}: {said}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 6, "{checked} examples");
}

#[test]
fn metric_names_skip_label_values_and_functions() {
    let names = metric_names(r#"sum by (reason) (rate(lb_verdict_packets_total{action="drop",x="lb_no"}[5m])) / lb_a"#);
    assert_eq!(names, BTreeSet::from(["lb_verdict_packets_total".to_owned(), "lb_a".to_owned()]));
}

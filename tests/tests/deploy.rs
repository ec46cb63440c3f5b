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

/// Prometheus itself (Debian's 2.42, in the gateway namespace) scrapes the
/// agent, which answers it in OpenMetrics (promtool lints only the text
/// format), and loads deploy/'s rules: the target is up with no scrape
/// error, the agent's series are queryable, and every rule evaluates.
#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn a_real_prometheus_scrapes_the_agent_and_evaluates_the_rules() {
    lb_tests::require_root!();
    let testbed = Testbed::new(2).expect("building the testbed");
    let mut agent = Agent::start(&testbed, &agent::config_for(&testbed, HealthCheck::default())).expect("starting lb");
    agent.wait_health("web", &["up", "up"], Duration::from_secs(10)).expect("web backends up");
    let dir = std::env::temp_dir().join(format!("lb-prometheus-{}", testbed.id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let rules = deploy_dir().join("prometheus/alerts.yml").canonicalize().expect("alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: ['{}']\n",
        rules.display(),
        agent::ADMIN
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("writing prometheus.yml");
    // Its own port on the gateway namespace's loopback: nothing else there.
    let web = "127.0.0.1:19090";
    let args = [
        "prometheus".to_owned(),
        format!("--config.file={}", dir.join("prometheus.yml").display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address={web}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = testbed.spawn_in(testbed.gateway(), &args).expect("starting prometheus");
    let api = |path: &str| -> Option<Value> {
        let out = testbed.gateway().exec(&["curl", "-sf", &format!("http://{web}{path}")]).ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    // Prometheus starts, scrapes every second and evaluates every second:
    // 30 s is many times what it takes here (about 3 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let target = loop {
        let target = api("/api/v1/targets").and_then(|t| t["data"]["activeTargets"].get(0).cloned());
        if let Some(t) = target.filter(|t| t["health"] == "up") {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no healthy target; prometheus said {:?}",
            api("/api/v1/targets")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(target["lastError"], "", "{target}");
    let serving = api("/api/v1/query?query=lb_vip_backends_serving").expect("a query answer");
    let results = serving["data"]["result"].as_array().cloned().unwrap_or_default();
    assert!(results.iter().any(|r| r["metric"]["vip"] == "web" && r["value"][1] == "2"), "{serving}");
    let build = api("/api/v1/query?query=lb_build_info").expect("a query answer");
    assert_eq!(build["data"]["result"].as_array().map(Vec::len), Some(1), "{build}");
    let groups = loop {
        let groups = api("/api/v1/rules").and_then(|r| r["data"]["groups"].as_array().cloned()).unwrap_or_default();
        let evaluated = groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).count() == 6
            && groups.iter().all(|g| g["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")));
        if evaluated {
            break groups;
        }
        assert!(std::time::Instant::now() < deadline, "the rules never evaluated: {groups:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for rule in groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()) {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
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

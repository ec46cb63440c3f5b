//! `[vip.passive_health]`: nginx's `max_fails` / `fail_timeout` at layer 4.
//! Its own file, beside `parse.rs`, so the active checks' keys and these
//! change apart.

use std::time::Duration;

use super::{
    error::Problem,
    model::{HealthCheckConfig, HealthCheckKind, PassiveHealthConfig},
    parse::duration,
    table::Section,
};

/// The keys `[vip.passive_health]` takes.
pub(super) const PASSIVE_KEYS: &[&str] = &["max_fails", "fail_timeout"];

/// `max_fails` unless set: nginx's default.
pub const DEFAULT_MAX_FAILS: u32 = 1;
/// `fail_timeout` unless set: nginx's default.
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// Highest `max_fails`.
const MAX_MAX_FAILS: u32 = 10_000;
/// Bounds of `fail_timeout`: the agent samples the counters once a second
/// (`health::passive::SAMPLE_INTERVAL`), so a shorter window means nothing.
const FAIL_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// `[vip.passive_health]` of a VIP whose active checks are `check`: only
/// with active checks, since they are what brings a backend back.
pub(super) fn passive_health(mut s: Section, check: &HealthCheckConfig) -> Result<PassiveHealthConfig, Problem> {
    let max_fails = s.integer("max_fails", 0, MAX_MAX_FAILS)?.unwrap_or(DEFAULT_MAX_FAILS);
    if max_fails == 0 {
        return Err(
            s.problem("max_fails", "must be at least 1 (to turn passive health off, remove [vip.passive_health])")
        );
    }
    let fail_timeout = duration(&mut s, "fail_timeout")?.unwrap_or(DEFAULT_FAIL_TIMEOUT);
    let (lo, hi) = FAIL_TIMEOUT_RANGE;
    if fail_timeout < lo || fail_timeout > hi {
        return Err(s.problem(
            "fail_timeout",
            format!(
                "{} is out of range (1s to 1h; the counters are sampled once a second)",
                humantime::format_duration(fail_timeout)
            ),
        ));
    }
    if matches!(check.kind, HealthCheckKind::None) {
        return Err(s.problem(
            "max_fails",
            "passive health needs active health checks to bring a backend back up: \
             set [vip.health_check] type to something other than \"none\"",
        ));
    }
    s.finish()?;
    Ok(PassiveHealthConfig { max_fails, fail_timeout })
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use crate::config::{Config, model::PassiveHealthConfig};

    /// A VIP with TCP checks and `passive` as its `[vip.passive_health]` body.
    fn config(check_type: &str, passive: &str) -> String {
        format!(
            r#"
[agent]
interfaces = ["eth0"]

[[vip]]
name = "web"
listen = "198.18.0.100:80"

[vip.health_check]
type = "{check_type}"

[vip.passive_health]
{passive}

[[vip.backend]]
address = "198.18.2.11:8080"
"#
        )
    }

    fn parsed(text: &str) -> Option<PassiveHealthConfig> {
        let config = Config::parse(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("rejected: {e}"));
        config.vips[0].passive_health
    }

    fn rejected(text: &str) -> String {
        match Config::parse(text, Path::new("test.toml")) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_issue_example_parses() {
        let passive = parsed(&config("tcp", "max_fails = 3\nfail_timeout = \"10s\""));
        assert_eq!(passive, Some(PassiveHealthConfig { max_fails: 3, fail_timeout: Duration::from_secs(10) }));
    }

    #[test]
    fn an_empty_table_takes_nginx_defaults() {
        let passive = parsed(&config("tcp", ""));
        assert_eq!(passive, Some(PassiveHealthConfig { max_fails: 1, fail_timeout: Duration::from_secs(10) }));
    }

    #[test]
    fn absent_is_off() {
        let text = config("tcp", "").replace("[vip.passive_health]", "");
        assert_eq!(parsed(&text), None);
    }

    #[test]
    fn bad_values_name_file_key_and_reason() {
        assert_eq!(
            rejected(&config("tcp", "max_fails = 0")),
            "test.toml: vip[1] (web).passive_health.max_fails: must be at least 1 (to turn passive health off, \
             remove [vip.passive_health])"
        );
        assert_eq!(
            rejected(&config("tcp", "fail_timeout = \"500ms\"")),
            "test.toml: vip[1] (web).passive_health.fail_timeout: 500ms is out of range (1s to 1h; the counters \
             are sampled once a second)"
        );
        assert!(
            rejected(&config("tcp", "fail_timeout = \"soon\""))
                .starts_with("test.toml: vip[1] (web).passive_health.fail_timeout: \"soon\" is not a duration")
        );
        assert!(
            rejected(&config("tcp", "max_fails = \"3\""))
                .starts_with("test.toml: vip[1] (web).passive_health.max_fails: expected an integer")
        );
        assert!(rejected(&config("tcp", "max_fails = 100000")).contains("passive_health.max_fails"));
        assert!(
            rejected(&config("tcp", "fails = 3")).starts_with("test.toml: vip[1] (web).passive_health.fails: unknown")
        );
    }

    #[test]
    fn without_active_checks_nothing_could_bring_a_backend_back() {
        let message = rejected(&config("none", "max_fails = 3"));
        assert!(
            message.starts_with(
                "test.toml: vip[1] (web).passive_health.max_fails: passive health needs active health checks"
            ),
            "{message}"
        );
    }
}

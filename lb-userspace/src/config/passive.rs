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

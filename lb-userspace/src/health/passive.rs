//! Passive health: nginx's `max_fails` / `fail_timeout` at layer 4, from
//! the handshakes the data path sees (`lb_common::handshake`).
//!
//! The agent samples each backend's cumulative counters every
//! [`SAMPLE_INTERVAL`] and feeds them to its [`Window`]. One sample's
//! failures are:
//! - **refused**: RSTs answering a SYN (nothing listens);
//! - **unreachable**: ICMP port or host unreachables quoting a UDP datagram
//!   to the backend;
//! - **unanswered**: SYNs neither accepted nor refused a whole sample
//!   interval later. A SYN sent just before a sample may be answered just
//!   after it, so a SYN counts as unanswered only once it was sent before
//!   the *previous* sample: the unanswered count is the SYNs sent up to the
//!   previous sample minus every answer (SYN+ACK or RST) seen up to this
//!   one. That is a lower bound (an answer to a newer SYN hides an older
//!   unanswered one), so it never over-counts; a SYN lost once and answered
//!   on its retransmission does count, once.
//!
//! A sample with any SYN+ACK is a **success**: it clears the window,
//! including that sample's own failures (the counters do not say in which
//! order they came, so the benefit of the doubt goes to the backend; a
//! backend that fails completely is caught from the next sample on).
//! Otherwise the sample's failures join the window, failures older than
//! `fail_timeout` leave it, and once the window holds `max_fails` the
//! backend is marked down ([`Observation::down`]) and the window starts
//! over. From down, the active checks bring it back through `rise`.
//!
//! UDP has no handshake, so nothing ever counts as a success for it: a UDP
//! backend goes down once `max_fails` unreachables arrive within
//! `fail_timeout`.
//!
//! Pure and clock-free (the caller passes the time), so the window
//! arithmetic is unit-tested without a data path.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use lb_common::handshake::Handshakes;

use crate::config::model::PassiveHealthConfig;

/// How often the agent samples the handshake counters: the resolution of
/// the window and the grace a SYN has before it counts as unanswered (1 to
/// 2 intervals; a SYN+ACK takes one round trip, milliseconds in a data
/// centre). One read of a per-CPU array entry per backend per interval.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Failures of one sample, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Failures {
    /// RSTs answering a SYN.
    pub refused: u64,
    /// SYNs not answered within a sample interval.
    pub unanswered: u64,
    /// ICMP unreachables quoting a UDP datagram.
    pub unreachable: u64,
}

impl Failures {
    /// All kinds together.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.refused.saturating_add(self.unanswered).saturating_add(self.unreachable)
    }

    fn add(&mut self, other: &Failures) {
        self.refused = self.refused.saturating_add(other.refused);
        self.unanswered = self.unanswered.saturating_add(other.unanswered);
        self.unreachable = self.unreachable.saturating_add(other.unreachable);
    }
}

/// What one sample of one backend showed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Failures first seen in this sample.
    pub failures: Failures,
    /// `Some(reason)` when the window reached `max_fails`: mark it down.
    pub down: Option<String>,
}

/// One backend's passive-health state: the counters at the last sample
/// and the failures within `fail_timeout`.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// The counters at the previous sample; `None` before the first.
    last: Option<Handshakes>,
    /// The highest unanswered-SYN count seen (cumulative, see the module's
    /// doc): only growth beyond it is new.
    unanswered_mark: u64,
    /// SYNs sent up to the previous sample, counted from the first one.
    syns_before: u64,
    /// Answers (SYN+ACK and RST) since the first sample.
    answers: u64,
    /// SYNs since the first sample.
    syns: u64,
    /// Failures within `fail_timeout`, oldest first, by sample time.
    recent: VecDeque<(Instant, Failures)>,
    /// Every failure counted since the agent started watching.
    total: u64,
}

impl Window {
    /// Failures counted since this window began (for the metric).
    #[must_use]
    pub fn failures_total(&self) -> u64 {
        self.total
    }

    /// Failures now within the window.
    #[must_use]
    pub fn pending(&self) -> u64 {
        self.recent.iter().map(|(_, f)| f.total()).sum()
    }

    /// Feeds the counters read at `now`. `judging` is false while the
    /// backend is not up (or its VIP has no `[vip.passive_health]`): the
    /// counters are followed, so nothing piles up, but nothing is judged
    /// and the window stays empty.
    pub fn observe(
        &mut self,
        now: Instant,
        counters: Handshakes,
        config: Option<&PassiveHealthConfig>,
        judging: bool,
    ) -> Observation {
        let Some(last) = self.last.replace(counters) else { return Observation::default() };
        let delta = Delta::between(&last, &counters);
        self.syns_before = self.syns;
        self.syns = self.syns.wrapping_add(delta.syns);
        self.answers = self.answers.wrapping_add(delta.syn_acks).wrapping_add(delta.resets);
        let unanswered_now = self.syns_before.saturating_sub(self.answers);
        let unanswered = unanswered_now.saturating_sub(self.unanswered_mark);
        self.unanswered_mark = self.unanswered_mark.max(unanswered_now);
        let failures = Failures { refused: delta.resets, unanswered, unreachable: delta.unreachables };
        let (Some(config), true) = (config, judging) else {
            self.recent.clear();
            return Observation::default();
        };
        self.total = self.total.saturating_add(failures.total());
        let down = self.judge(now, config, &failures, delta.syn_acks > 0);
        Observation { failures, down }
    }

    /// Applies one sample's outcome to the window; `Some(reason)` when it
    /// reaches `max_fails`.
    fn judge(
        &mut self,
        now: Instant,
        config: &PassiveHealthConfig,
        failures: &Failures,
        succeeded: bool,
    ) -> Option<String> {
        if succeeded {
            self.recent.clear();
            return None;
        }
        if failures.total() > 0 {
            self.recent.push_back((now, *failures));
        }
        while self.recent.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > config.fail_timeout) {
            self.recent.pop_front();
        }
        let mut within = Failures::default();
        for (_, f) in &self.recent {
            within.add(f);
        }
        if within.total() < u64::from(config.max_fails) {
            return None;
        }
        self.recent.clear();
        Some(format!(
            "passive: {} failed handshakes within {} with no success ({} refused, {} unanswered, {} unreachable)",
            within.total(),
            humantime::format_duration(config.fail_timeout),
            within.refused,
            within.unanswered,
            within.unreachable
        ))
    }
}

/// One backend's reading for [`Watch::sample`].
#[derive(Clone, Copy, Debug)]
pub struct Reading<'a> {
    pub backend_id: u32,
    /// Its VIP's `[vip.passive_health]`, if set.
    pub config: Option<&'a PassiveHealthConfig>,
    /// Whether to judge it: only an up backend can be taken down.
    pub judging: bool,
    /// Its cumulative counters, summed over CPUs.
    pub counters: Handshakes,
}

/// Every backend's [`Window`], by backend id.
#[derive(Debug, Default)]
pub struct Watch {
    windows: HashMap<u32, Window>,
}

impl Watch {
    /// Feeds one sample taken at `now`; returns the backends to mark down,
    /// with why. Windows of backends not read (removed by a reload) are
    /// dropped.
    pub fn sample<'a>(&mut self, now: Instant, readings: impl IntoIterator<Item = Reading<'a>>) -> Vec<(u32, String)> {
        let mut seen = HashSet::new();
        let mut down = Vec::new();
        for r in readings {
            seen.insert(r.backend_id);
            let window = self.windows.entry(r.backend_id).or_default();
            if let Some(reason) = window.observe(now, r.counters, r.config, r.judging).down {
                down.push((r.backend_id, reason));
            }
        }
        self.windows.retain(|id, _| seen.contains(id));
        down
    }

    /// Whether no backend has a window (nothing was ever sampled, or
    /// every backend is gone).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Failures counted for a backend since the agent started watching it.
    #[must_use]
    pub fn failures_total(&self, backend_id: u32) -> u64 {
        self.windows.get(&backend_id).map_or(0, Window::failures_total)
    }
}

/// Counter growth between two samples (wrapping, like the counters).
struct Delta {
    syns: u64,
    syn_acks: u64,
    resets: u64,
    unreachables: u64,
}

impl Delta {
    fn between(before: &Handshakes, after: &Handshakes) -> Self {
        Delta {
            syns: after.syns.wrapping_sub(before.syns),
            syn_acks: after.syn_acks.wrapping_sub(before.syn_acks),
            resets: after.resets.wrapping_sub(before.resets),
            unreachables: after.unreachables.wrapping_sub(before.unreachables),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: PassiveHealthConfig = PassiveHealthConfig { max_fails: 3, fail_timeout: Duration::from_secs(10) };

    /// Drives a window one sample a second from cumulative counters.
    struct Run {
        window: Window,
        start: Instant,
        second: u64,
        counters: Handshakes,
    }

    impl Run {
        fn new() -> Self {
            let mut run =
                Run { window: Window::default(), start: Instant::now(), second: 0, counters: Handshakes::default() };
            // The first sample only sets the baseline.
            assert_eq!(run.sample(0, 0, 0, 0), Observation::default());
            run
        }

        /// One more second in which `syns` SYNs were sent, `syn_acks` and
        /// `resets` came back and `unreachables` arrived.
        fn sample(&mut self, syns: u64, syn_acks: u64, resets: u64, unreachables: u64) -> Observation {
            self.sample_judging(syns, syn_acks, resets, unreachables, true)
        }

        fn sample_judging(
            &mut self,
            syns: u64,
            syn_acks: u64,
            resets: u64,
            unreachables: u64,
            judging: bool,
        ) -> Observation {
            self.counters.syns += syns;
            self.counters.syn_acks += syn_acks;
            self.counters.resets += resets;
            self.counters.unreachables += unreachables;
            let now = self.start + Duration::from_secs(self.second);
            self.second += 1;
            self.window.observe(now, self.counters, Some(&CONFIG), judging)
        }

        fn idle(&mut self, seconds: u64) {
            for _ in 0..seconds {
                assert_eq!(self.sample(0, 0, 0, 0).down, None);
            }
        }
    }

    fn refused(n: u64) -> Failures {
        Failures { refused: n, ..Failures::default() }
    }

    #[test]
    fn healthy_traffic_never_fails() {
        let mut run = Run::new();
        for _ in 0..100 {
            let seen = run.sample(50, 50, 0, 0);
            assert_eq!(seen, Observation::default());
        }
        assert_eq!(run.window.failures_total(), 0);
    }

    #[test]
    fn syns_in_flight_at_a_sample_are_not_failures() {
        let mut run = Run::new();
        // Each second, 5 of the 50 SYN+ACKs come back after the sample.
        assert_eq!(run.sample(50, 45, 0, 0).failures, Failures::default());
        for _ in 0..20 {
            assert_eq!(run.sample(50, 50, 0, 0).failures, Failures::default());
        }
    }

    #[test]
    fn refusals_reach_max_fails_and_mark_down_once() {
        let mut run = Run::new();
        assert_eq!(run.sample(1, 0, 1, 0).failures, refused(1));
        assert_eq!(run.sample(1, 0, 1, 0).down, None, "2 of 3");
        let third = run.sample(1, 0, 1, 0);
        assert_eq!(
            third.down.as_deref(),
            Some("passive: 3 failed handshakes within 10s with no success (3 refused, 0 unanswered, 0 unreachable)")
        );
        // The window starts over: the next failure alone is not enough.
        assert_eq!(run.sample(1, 0, 1, 0).down, None);
        assert_eq!(run.window.failures_total(), 4);
    }

    #[test]
    fn many_refusals_in_one_sample_are_enough() {
        let mut run = Run::new();
        assert!(run.sample(7, 0, 7, 0).down.is_some());
    }

    #[test]
    fn a_success_clears_the_window_including_its_own_sample() {
        let mut run = Run::new();
        run.sample(2, 0, 2, 0);
        // The listener closed during this sample: successes, then refusals.
        assert_eq!(run.sample(10, 5, 5, 0).down, None, "the benefit of the doubt");
        assert_eq!(run.window.pending(), 0);
        run.sample(1, 0, 1, 0);
        run.sample(1, 0, 1, 0);
        assert!(run.sample(1, 0, 1, 0).down.is_some(), "caught from the next samples on");
    }

    #[test]
    fn failures_older_than_fail_timeout_leave_the_window() {
        let mut run = Run::new();
        run.sample(2, 0, 2, 0);
        run.idle(10);
        // 11 s later: the first two have left (older than 10 s).
        assert_eq!(run.sample(1, 0, 1, 0).down, None);
        assert_eq!(run.window.pending(), 1);
        run.sample(1, 0, 1, 0);
        assert!(run.sample(1, 0, 1, 0).down.is_some());
    }

    #[test]
    fn failures_exactly_fail_timeout_apart_still_count() {
        let mut run = Run::new();
        run.sample(2, 0, 2, 0);
        run.idle(9);
        // 10 s after the first: still within.
        assert!(run.sample(1, 0, 1, 0).down.is_some());
    }

    #[test]
    fn unanswered_syns_count_after_a_whole_interval() {
        let mut run = Run::new();
        // A blackholed backend: SYNs go, nothing comes back.
        assert_eq!(run.sample(2, 0, 0, 0).failures, Failures::default(), "in flight");
        let second = run.sample(0, 0, 0, 0);
        assert_eq!(second.failures, Failures { unanswered: 2, ..Failures::default() });
        assert_eq!(second.down, None);
        // The retransmissions.
        assert_eq!(run.sample(2, 0, 0, 0).failures.unanswered, 0);
        let fourth = run.sample(0, 0, 0, 0);
        assert_eq!(fourth.failures.unanswered, 2);
        assert!(fourth.down.is_some_and(|r| r.contains("4 unanswered")));
    }

    #[test]
    fn an_unanswered_syn_counts_once() {
        let mut run = Run::new();
        run.sample(1, 0, 0, 0);
        assert_eq!(run.sample(0, 0, 0, 0).failures.unanswered, 1);
        for _ in 0..5 {
            assert_eq!(run.sample(0, 0, 0, 0).failures.unanswered, 0);
        }
        assert_eq!(run.window.failures_total(), 1);
    }

    #[test]
    fn a_late_answer_does_not_fail_the_next_syns() {
        let mut run = Run::new();
        run.sample(1, 0, 0, 0);
        assert_eq!(run.sample(0, 0, 0, 0).failures.unanswered, 1, "counted as lost");
        // It was answered after all (a retransmitted SYN's SYN+ACK): a success.
        assert_eq!(run.sample(1, 1, 0, 0).down, None);
        assert_eq!(run.sample(5, 5, 0, 0).failures.unanswered, 0);
        assert_eq!(run.window.pending(), 0);
    }

    #[test]
    fn udp_unreachables_fail_and_nothing_succeeds() {
        let mut run = Run::new();
        assert_eq!(run.sample(0, 0, 0, 2).failures, Failures { unreachable: 2, ..Failures::default() });
        assert!(run.sample(0, 0, 0, 1).down.is_some_and(|r| r.contains("3 unreachable")));
    }

    #[test]
    fn nothing_is_judged_while_not_judging() {
        let mut run = Run::new();
        for _ in 0..5 {
            assert_eq!(run.sample_judging(1, 0, 1, 0, false), Observation::default());
        }
        assert_eq!(run.window.failures_total(), 0);
        // Judging again starts from an empty window, not from what piled up.
        assert_eq!(run.sample(1, 0, 1, 0).down, None);
        assert_eq!(run.window.pending(), 1);
    }

    #[test]
    fn without_a_config_nothing_is_judged() {
        let mut window = Window::default();
        let now = Instant::now();
        window.observe(now, Handshakes::default(), None, true);
        let failing = Handshakes { syns: 9, resets: 9, ..Handshakes::default() };
        assert_eq!(window.observe(now + SAMPLE_INTERVAL, failing, None, true), Observation::default());
    }

    #[test]
    fn counters_that_wrap_are_followed() {
        let mut window = Window::default();
        let now = Instant::now();
        let near = Handshakes { syns: u64::MAX, syn_acks: u64::MAX, resets: u64::MAX, unreachables: 0 };
        window.observe(now, near, Some(&CONFIG), true);
        let wrapped = Handshakes { syns: 1, syn_acks: 1, resets: u64::MAX, unreachables: 0 };
        let seen = window.observe(now + SAMPLE_INTERVAL, wrapped, Some(&CONFIG), true);
        assert_eq!(seen, Observation::default(), "2 SYNs, 2 SYN+ACKs");
    }

    #[test]
    fn the_watch_reports_downs_and_forgets_removed_backends() {
        let mut watch = Watch::default();
        let now = Instant::now();
        let reading = |backend_id, resets| Reading {
            backend_id,
            config: Some(&CONFIG),
            judging: true,
            counters: Handshakes { syns: resets, resets, ..Handshakes::default() },
        };
        assert!(watch.sample(now, [reading(1, 0), reading(2, 0)]).is_empty());
        let down = watch.sample(now + SAMPLE_INTERVAL, [reading(1, 5), reading(2, 0)]);
        assert_eq!(down.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1]);
        assert_eq!((watch.failures_total(1), watch.failures_total(2)), (5, 0));
        watch.sample(now + 2 * SAMPLE_INTERVAL, [reading(2, 0)]);
        assert_eq!(watch.failures_total(1), 0, "backend 1 is gone");
    }

    #[test]
    fn the_first_sample_is_a_baseline() {
        let mut window = Window::default();
        let old = Handshakes { syns: 1000, resets: 1000, ..Handshakes::default() };
        assert_eq!(window.observe(Instant::now(), old, Some(&CONFIG), true), Observation::default());
        assert_eq!(window.pending(), 0, "what the counters held before the agent watched is not judged");
    }
}

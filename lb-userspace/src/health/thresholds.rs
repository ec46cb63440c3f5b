//! Rise/fall thresholds: turns a stream of probe results into up/down
//! verdicts, so one lost packet does not take a backend out of the ring and
//! one lucky answer does not put a flapping one back.
//!
//! Pure and clock-free, so every rule is unit-tested without sockets.

use super::{Health, Transition};

/// Consecutive-result counter with HAProxy-style `rise`/`fall` thresholds.
///
/// The first result decides at once (so a freshly started agent serves as
/// soon as its backends answer, and does not wait `rise` intervals); after
/// that an up backend goes down after `fall` consecutive failures and a down
/// backend comes up after `rise` consecutive successes. A success resets the
/// failure streak and a failure resets the success streak, so alternating
/// results never flip the verdict (with thresholds above 1).
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    verdict: Health,
    successes: u32,
    failures: u32,
}

impl Tracker {
    /// A tracker in the [`Health::Unknown`] state. Thresholds of 0 are
    /// treated as 1 (config validation rejects them; this keeps the type
    /// total rather than never flipping).
    pub fn new(rise: u32, fall: u32) -> Self {
        Tracker { rise: rise.max(1), fall: fall.max(1), verdict: Health::Unknown, successes: 0, failures: 0 }
    }

    /// A tracker that already holds `verdict`, e.g. the health a restarted
    /// agent found pinned: from there `rise` and `fall` apply as usual, so a
    /// single probe cannot flip it. With [`Health::Unknown`] it is [`Tracker::new`].
    pub fn starting_at(rise: u32, fall: u32, verdict: Health) -> Self {
        Tracker { verdict, ..Tracker::new(rise, fall) }
    }

    /// The current verdict: unknown until the first probe finishes, then
    /// up or down.
    pub fn verdict(&self) -> Health {
        self.verdict
    }

    /// Feeds one probe result; `last_check` is what the probe reported ("ok"
    /// or the failure reason) and is quoted in the transition's reason.
    ///
    /// Returns the transition when the verdict changes, `None` otherwise.
    pub fn record(&mut self, ok: bool, last_check: &str) -> Option<Transition> {
        self.count(ok);
        let transition = self.decide(ok, last_check)?;
        self.verdict = transition.health;
        Some(transition)
    }

    /// Extends the streak `ok` belongs to and breaks the other one.
    fn count(&mut self, ok: bool) {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
    }

    /// The transition the streaks call for, if any.
    fn decide(&self, ok: bool, last_check: &str) -> Option<Transition> {
        match (self.verdict, ok) {
            (Health::Unknown, _) => {
                let health = if ok { Health::Up } else { Health::Down };
                Some(Transition { health, reason: format!("first check: {last_check}") })
            }
            (Health::Up, false) if self.failures >= self.fall => Some(Transition {
                health: Health::Down,
                reason: format!("{}, last: {last_check}", streak(self.failures, "failure", "failures")),
            }),
            (Health::Down, true) if self.successes >= self.rise => {
                Some(Transition { health: Health::Up, reason: streak(self.successes, "success", "successes") })
            }
            _ => None,
        }
    }
}

/// "1 consecutive failure", "3 consecutive successes".
fn streak(count: u32, one: &str, many: &str) -> String {
    format!("{count} consecutive {}", if count == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: &str = "HTTP status 503, expected 200-399";

    fn up(reason: &str) -> Option<Transition> {
        Some(Transition { health: Health::Up, reason: reason.to_owned() })
    }

    fn down(reason: &str) -> Option<Transition> {
        Some(Transition { health: Health::Down, reason: reason.to_owned() })
    }

    #[test]
    fn a_known_start_needs_fall_failures_not_one() {
        let mut tracker = Tracker::starting_at(2, 3, Health::Up);
        assert_eq!(tracker.record(false, FAIL), None);
        assert_eq!(tracker.record(false, FAIL), None);
        assert_eq!(
            tracker.record(false, FAIL),
            down("3 consecutive failures, last: HTTP status 503, expected 200-399")
        );
        let mut tracker = Tracker::starting_at(2, 3, Health::Down);
        assert_eq!(tracker.record(true, "ok"), None);
        assert_eq!(tracker.record(true, "ok"), up("2 consecutive successes"));
    }

    #[test]
    fn starts_unknown() {
        assert_eq!(Tracker::new(2, 3).verdict(), Health::Unknown);
    }

    #[test]
    fn first_success_decides_up_at_once() {
        let mut tracker = Tracker::new(5, 5);
        assert_eq!(tracker.record(true, "ok"), up("first check: ok"));
        assert_eq!(tracker.verdict(), Health::Up);
    }

    #[test]
    fn first_failure_decides_down_at_once() {
        let mut tracker = Tracker::new(5, 5);
        let reason = "connect: Connection refused (os error 111)";
        assert_eq!(tracker.record(false, reason), down(&format!("first check: {reason}")));
        assert_eq!(tracker.verdict(), Health::Down);
    }

    #[test]
    fn up_goes_down_after_fall_consecutive_failures() {
        let mut tracker = Tracker::new(2, 3);
        tracker.record(true, "ok");
        assert_eq!(tracker.record(false, "timed out after 500ms"), None);
        assert_eq!(tracker.record(false, "timed out after 500ms"), None);
        assert_eq!(tracker.record(false, FAIL), down(&format!("3 consecutive failures, last: {FAIL}")));
        assert_eq!(tracker.verdict(), Health::Down);
        assert_eq!(tracker.record(false, FAIL), None, "already down: no second transition");
    }

    #[test]
    fn down_comes_up_after_rise_consecutive_successes() {
        let mut tracker = Tracker::new(2, 3);
        tracker.record(false, FAIL);
        assert_eq!(tracker.record(true, "ok"), None);
        assert_eq!(tracker.record(true, "ok"), up("2 consecutive successes"));
        assert_eq!(tracker.verdict(), Health::Up);
        assert_eq!(tracker.record(true, "ok"), None, "already up: no second transition");
    }

    #[test]
    fn success_resets_the_failure_streak() {
        let mut tracker = Tracker::new(2, 2);
        tracker.record(true, "ok");
        assert_eq!(tracker.record(false, FAIL), None);
        assert_eq!(tracker.record(true, "ok"), None);
        assert_eq!(tracker.record(false, FAIL), None, "the streak restarted at 1");
        assert_eq!(tracker.record(false, FAIL), down(&format!("2 consecutive failures, last: {FAIL}")));
    }

    #[test]
    fn failure_resets_the_success_streak() {
        let mut tracker = Tracker::new(2, 2);
        tracker.record(false, FAIL);
        assert_eq!(tracker.record(true, "ok"), None);
        assert_eq!(tracker.record(false, FAIL), None);
        assert_eq!(tracker.record(true, "ok"), None, "the streak restarted at 1");
        assert_eq!(tracker.record(true, "ok"), up("2 consecutive successes"));
    }

    #[test]
    fn alternating_results_never_flip() {
        for first in [true, false] {
            let mut tracker = Tracker::new(2, 2);
            let initial = tracker.record(first, "first").map(|t| t.health.is_up());
            assert_eq!(initial, Some(first));
            for i in 0..20 {
                let ok = (i % 2 == 0) != first;
                assert_eq!(tracker.record(ok, "x"), None, "probe {i} flipped the verdict");
            }
        }
    }

    #[test]
    fn thresholds_of_one_flip_on_every_change() {
        let mut tracker = Tracker::new(1, 1);
        tracker.record(true, "ok");
        assert_eq!(tracker.record(false, FAIL), down(&format!("1 consecutive failure, last: {FAIL}")));
        assert_eq!(tracker.record(true, "ok"), up("1 consecutive success"));
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut tracker = Tracker::new(0, 0);
        tracker.record(true, "ok");
        assert_eq!(tracker.record(false, FAIL).map(|t| t.health.is_up()), Some(false));
        assert_eq!(tracker.record(true, "ok").map(|t| t.health.is_up()), Some(true));
    }
}

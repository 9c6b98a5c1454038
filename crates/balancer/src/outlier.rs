//! Failure statistics, outlier ejection and slow start (claim 9, and what
//! Envoy's outlier detection and slow start do for HTTP pools). Pure: the
//! clock is a number of milliseconds passed in, so every rule is tested
//! with exact times.
//!
//! - Each new-session attempt ends as a success (the server answered) or a
//!   failure (no answer within the failover timeout, or a failover status).
//!   A sliding window of per-second buckets gives the failure ratio that
//!   feeds the score's claim 9 term.
//! - `consecutive` failures in a row eject the server: score 0 for the
//!   ejection time, which doubles with every ejection (capped), and comes
//!   back down by one step for every `max` period without one. At most
//!   `max_ejected_percent` of the pool is ejected at once (at least one
//!   server when the pool has two or more).
//! - A server that answers `503 Service Unavailable` with `Retry-After: N`
//!   says it is overloaded: it takes no new session for N seconds (capped
//!   by `routing.retry_after_max`), then comes back like any other.
//! - A server that comes back (up again after being down, an ejection or
//!   an overload period over) ramps its weight linearly from `floor` to 1
//!   over `slow_start`.

use std::time::Duration;

/// Outlier detection and slow start settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    /// Failures in a row that eject a server; 0 turns ejection off.
    pub consecutive: u32,
    /// First ejection time; doubled on each repeat.
    pub base_ejection: Duration,
    /// Longest ejection time.
    pub max_ejection: Duration,
    /// Largest share of the pool ejected at once, percent.
    pub max_ejected_percent: u8,
    /// Span of the failure ratio window.
    pub window: Duration,
    /// Ramp time of a server that comes back; zero: none.
    pub slow_start: Duration,
    /// Weight fraction a ramp starts from.
    pub floor: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
            window: Duration::from_secs(10),
            slow_start: Duration::from_secs(10),
            floor: 0.1,
        }
    }
}

/// Buckets of the failure window (one per second, at most this many).
const BUCKETS: usize = 60;

/// One server's failure record.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// `(second, attempts, failures)` per bucket, indexed by second modulo.
    buckets: [(u64, u32, u32); BUCKETS],
    consecutive: u32,
    /// Ejections that count towards the next ejection time.
    level: u32,
    ejected_until: Option<u64>,
    last_ejection: Option<u64>,
    /// Ejections so far.
    pub ejections: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            buckets: [(u64::MAX, 0, 0); BUCKETS],
            consecutive: 0,
            level: 0,
            ejected_until: None,
            last_ejection: None,
            ejections: 0,
        }
    }
}

/// What an outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed.
    Kept,
    /// The server is ejected until this time (ms).
    Ejected(u64),
}

impl Tracker {
    /// Records one attempt's outcome at `now` (ms). `may_eject` says whether
    /// the pool's ejection budget allows one more ([`may_eject`]).
    pub fn record(&mut self, now: u64, ok: bool, cfg: &OutlierConfig, may_eject: bool) -> Verdict {
        let sec = now / 1000;
        let b = &mut self.buckets[(sec % BUCKETS as u64) as usize];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b.1 += 1;
        if ok {
            self.consecutive = 0;
            return Verdict::Kept;
        }
        b.2 += 1;
        self.consecutive += 1;
        if cfg.consecutive == 0
            || self.consecutive < cfg.consecutive
            || self.ejected(now)
            || !may_eject
        {
            return Verdict::Kept;
        }
        // The level steps down once per `max_ejection` since the last ejection.
        let max = cfg.max_ejection.as_millis() as u64;
        if let Some(last) = self.last_ejection
            && max > 0
        {
            let quiet = (now.saturating_sub(last) / max) as u32;
            self.level = self.level.saturating_sub(quiet);
        }
        let base = cfg.base_ejection.as_millis() as u64;
        let time = base
            .saturating_mul(1u64 << self.level.min(20))
            .min(max.max(base));
        self.level += 1;
        self.consecutive = 0;
        self.ejections += 1;
        self.last_ejection = Some(now);
        let until = now + time;
        self.ejected_until = Some(until);
        Verdict::Ejected(until)
    }

    /// Whether the server is ejected at `now`.
    #[must_use]
    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until.is_some_and(|u| now < u)
    }

    /// End of the current (or last) ejection, ms.
    #[must_use]
    pub fn ejected_until(&self) -> Option<u64> {
        self.ejected_until
    }

    /// Failures / attempts over the `window` ending at `now`; 0 without attempts.
    #[must_use]
    pub fn failure_ratio(&self, now: u64, window: Duration) -> f64 {
        let sec = now / 1000;
        let span = (window.as_secs().max(1)).min(BUCKETS as u64);
        let (mut n, mut f) = (0u64, 0u64);
        for &(s, a, x) in &self.buckets {
            if s <= sec && sec - s < span {
                n += u64::from(a);
                f += u64::from(x);
            }
        }
        if n == 0 { 0.0 } else { f as f64 / n as f64 }
    }
}

/// Whether one more server may be ejected when `ejected` of `pool` already are.
#[must_use]
pub fn may_eject(ejected: usize, pool: usize, max_percent: u8) -> bool {
    if pool < 2 {
        // Ejecting the only server refuses every call: leave that to health.
        return false;
    }
    let budget = (pool * usize::from(max_percent) / 100).max(1);
    ejected < budget
}

/// The weight factor of a server that came back at `from` (ms), at `now`:
/// `floor` rising linearly to 1 over `slow_start`.
#[must_use]
pub fn ramp(now: u64, from: Option<u64>, cfg: &OutlierConfig) -> f64 {
    let span = cfg.slow_start.as_millis() as u64;
    match from {
        Some(f) if span > 0 && now < f + span => {
            let t = (now - f.min(now)) as f64 / span as f64;
            cfg.floor + (1.0 - cfg.floor) * t
        }
        _ => 1.0,
    }
}

/// The seconds of a `Retry-After` value (RFC 3261 §20.33:
/// `delta-seconds [comment] *( SEMI retry-param )`); `None` when it does
/// not start with digits.
#[must_use]
pub fn retry_after_secs(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii_start();
    let digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    // More digits than a u64 holds: as long as it can be (the cap decides).
    Some(
        std::str::from_utf8(&v[..digits])
            .ok()?
            .parse()
            .unwrap_or(u64::MAX),
    )
}

/// Until when (ms) a server that answered `503` with `Retry-After: secs`
/// at `now` stays out of new-session selection: `secs`, at most `max`;
/// `None` (no overload period) for 0 s or when `max` is zero (off).
#[must_use]
pub fn overload_until(now: u64, secs: u64, max: Duration) -> Option<u64> {
    let max_ms = max.as_millis() as u64;
    let ms = secs.saturating_mul(1000).min(max_ms);
    (ms > 0).then(|| now.saturating_add(ms))
}

/// Up/down with hysteresis, in the shape of pingora's `observe_health`: a
/// result against the current state counts towards a flip; `needed` of them
/// in a row flip it; a result that agrees resets the count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hysteresis {
    /// Down now.
    pub down: bool,
    /// Results in a row against the current state.
    pub streak: u32,
}

impl Hysteresis {
    /// Takes one result (`ok`: the check passed); `to_down` failures in a
    /// row take an up server down, `to_up` successes bring it back.
    /// Returns whether the state flipped.
    pub fn observe(&mut self, ok: bool, to_down: u32, to_up: u32) -> bool {
        if ok != self.down {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.down { to_up } else { to_down };
        if self.streak >= needed.max(1) {
            self.down = !self.down;
            self.streak = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_flips_after_a_streak_only() {
        let mut h = Hysteresis::default();
        assert!(!h.observe(false, 2, 3));
        assert!(!h.observe(true, 2, 3), "a success resets the streak");
        assert!(!h.observe(false, 2, 3));
        assert!(h.observe(false, 2, 3), "two failures in a row: down");
        assert!(h.down);
        assert!(!h.observe(true, 2, 3));
        assert!(!h.observe(true, 2, 3));
        assert!(!h.observe(false, 2, 3), "a failure while down resets");
        for _ in 0..2 {
            assert!(!h.observe(true, 2, 3));
        }
        assert!(h.observe(true, 2, 3), "three successes: up");
        assert!(!h.down);
    }

    fn cfg() -> OutlierConfig {
        OutlierConfig::default()
    }

    #[test]
    fn three_failures_in_a_row_eject_and_a_success_resets() {
        let c = cfg();
        let mut t = Tracker::default();
        assert_eq!(t.record(0, false, &c, true), Verdict::Kept);
        assert_eq!(t.record(10, false, &c, true), Verdict::Kept);
        assert_eq!(t.record(20, true, &c, true), Verdict::Kept);
        assert_eq!(t.record(30, false, &c, true), Verdict::Kept);
        assert_eq!(t.record(40, false, &c, true), Verdict::Kept);
        assert!(!t.ejected(40));
        assert_eq!(t.record(50, false, &c, true), Verdict::Ejected(10_050));
        assert!(t.ejected(10_049));
        assert!(!t.ejected(10_050));
        assert_eq!(t.ejections, 1);
    }

    #[test]
    fn ejection_time_doubles_on_repeat_caps_and_decays() {
        let c = OutlierConfig {
            max_ejection: Duration::from_secs(35),
            ..cfg()
        };
        let mut t = Tracker::default();
        let mut now = 0;
        let mut times = vec![];
        for _ in 0..4 {
            let mut v = Verdict::Kept;
            for _ in 0..3 {
                v = t.record(now, false, &c, true);
            }
            let Verdict::Ejected(until) = v else {
                panic!("not ejected at {now}")
            };
            times.push(until - now);
            now = until;
        }
        assert_eq!(times, [10_000, 20_000, 35_000, 35_000]);
        // A long quiet spell brings the level back down.
        now += 3 * 35_000;
        for _ in 0..2 {
            t.record(now, false, &c, true);
        }
        assert_eq!(
            t.record(now, false, &c, true),
            Verdict::Ejected(now + 10_000)
        );
    }

    #[test]
    fn no_ejection_beyond_the_budget_or_of_a_lone_server() {
        let c = cfg();
        let mut t = Tracker::default();
        for i in 0..10 {
            assert_eq!(t.record(i, false, &c, false), Verdict::Kept);
        }
        assert!(!may_eject(0, 1, 50));
        assert!(may_eject(0, 2, 50));
        assert!(!may_eject(1, 2, 50));
        assert!(may_eject(0, 2, 10), "at least one");
        assert!(may_eject(3, 8, 50));
        assert!(!may_eject(4, 8, 50));
        // Off.
        let off = OutlierConfig {
            consecutive: 0,
            ..c
        };
        let mut t = Tracker::default();
        for i in 0..10 {
            assert_eq!(t.record(i, false, &off, true), Verdict::Kept);
        }
    }

    #[test]
    fn failure_ratio_covers_the_window_only() {
        let c = cfg();
        let mut t = Tracker::default();
        for i in 0..10u64 {
            t.record(i * 1000, i % 2 == 0, &c, false);
        }
        // Seconds 0..9: 5 of 10 failed.
        assert!((t.failure_ratio(9_999, Duration::from_secs(10)) - 0.5).abs() < 1e-9);
        // Seconds 8..9 only: 8 ok, 9 failed.
        assert!((t.failure_ratio(9_000, Duration::from_secs(2)) - 0.5).abs() < 1e-9);
        assert!((t.failure_ratio(8_500, Duration::from_secs(1))).abs() < 1e-9);
        // Long after: nothing in the window.
        assert_eq!(t.failure_ratio(100_000, Duration::from_secs(10)), 0.0);
        assert_eq!(Tracker::default().failure_ratio(0, c.window), 0.0);
        // Far beyond the bucket count the window wraps cleanly.
        t.record(61_000, false, &c, false);
        assert_eq!(t.failure_ratio(61_000, Duration::from_secs(10)), 1.0);
    }

    #[test]
    fn retry_after_is_read_and_capped() {
        assert_eq!(retry_after_secs(b"5"), Some(5));
        assert_eq!(retry_after_secs(b" 18000;duration=3600"), Some(18_000));
        assert_eq!(retry_after_secs(b"120 (I'm in a meeting)"), Some(120));
        assert_eq!(retry_after_secs(b"soon"), None);
        assert_eq!(retry_after_secs(b""), None);
        assert_eq!(retry_after_secs(b"99999999999999999999999"), Some(u64::MAX));
        let max = Duration::from_secs(300);
        assert_eq!(overload_until(1_000, 5, max), Some(6_000));
        assert_eq!(overload_until(1_000, 3600, max), Some(301_000), "capped");
        assert_eq!(overload_until(1_000, u64::MAX, max), Some(301_000));
        assert_eq!(overload_until(1_000, 0, max), None, "0 s: no period");
        assert_eq!(overload_until(1_000, 5, Duration::ZERO), None, "off");
    }

    #[test]
    fn slow_start_ramps_from_the_floor() {
        let c = cfg();
        assert_eq!(ramp(5_000, None, &c), 1.0);
        assert!((ramp(1_000, Some(1_000), &c) - 0.1).abs() < 1e-9);
        assert!((ramp(6_000, Some(1_000), &c) - 0.55).abs() < 1e-9);
        assert_eq!(ramp(11_000, Some(1_000), &c), 1.0);
        let off = OutlierConfig {
            slow_start: Duration::ZERO,
            ..c
        };
        assert_eq!(ramp(1_000, Some(1_000), &off), 1.0);
    }
}

//! Passive outlier detection: a backend that fails `consecutive_failures`
//! requests in a row (connect errors, 5xx answers, first-byte timeouts,
//! resets before the response head) is ejected for `base_time`, doubled on
//! each repeat up to `max_time`; then one probe request goes through
//! (half-open) before it takes full traffic again. The pool never ejects a
//! backend when that would leave none, or more than `max_ejected_percent`
//! of its serving backends ejected (Envoy's panic threshold).

use crate::config::EjectionConfig;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds on a monotonic clock (since the first call).
pub fn mono_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Takes traffic.
    Normal,
    /// Out until its ejection time ends.
    Ejected,
    /// The ejection time ended: one probe at a time.
    HalfOpen { probing: bool },
}

#[derive(Debug, Default)]
pub struct Ejection {
    failures: AtomicU32,
    /// Monotonic ms when the ejection ends; 0 when not ejected.
    until_ms: AtomicU64,
    /// Ejections in a row (the back-off exponent).
    repeats: AtomicU32,
    probing: AtomicBool,
    /// Ejections since start (metrics).
    pub total: AtomicU64,
}

/// How a request holds a backend it was picked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Normal,
    /// The one half-open probe: its outcome decides the backend's fate.
    Probe,
}

/// What one exchange with a backend said about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl Ejection {
    pub fn status(&self) -> Status {
        let until = self.until_ms.load(Ordering::Relaxed);
        if until == 0 {
            Status::Normal
        } else if mono_ms() < until {
            Status::Ejected
        } else {
            Status::HalfOpen {
                probing: self.probing.load(Ordering::Relaxed),
            }
        }
    }

    /// Whether a request may be sent now (not ejected; half-open and no
    /// probe in flight).
    pub fn admits(&self) -> bool {
        matches!(
            self.status(),
            Status::Normal | Status::HalfOpen { probing: false }
        )
    }

    /// The request just picked for this backend: in half-open, it becomes
    /// the probe. `None` when the backend is ejected or another request won
    /// the probe.
    pub fn claim(&self) -> Option<Claim> {
        match self.status() {
            Status::Normal => Some(Claim::Normal),
            Status::Ejected => None,
            Status::HalfOpen { .. } => self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
                .then_some(Claim::Probe),
        }
    }

    /// A probe that ended without an outcome (its client left, a retry
    /// budget refused it, the queue could not hand it over): let the next
    /// request probe instead. Without this the backend would stay half-open
    /// with a probe "in flight" forever.
    pub fn release_probe(&self) {
        if matches!(self.status(), Status::HalfOpen { probing: true }) {
            self.probing.store(false, Ordering::Relaxed);
        }
    }

    /// Seconds until the ejection ends (0 when not ejected).
    pub fn remaining(&self) -> Duration {
        let until = self.until_ms.load(Ordering::Relaxed);
        Duration::from_millis(until.saturating_sub(mono_ms()))
    }

    /// Record an exchange. `may_eject` says whether the pool can spare this
    /// backend (panic threshold). Returns true when this outcome ejected it.
    pub fn record(&self, outcome: Outcome, config: &EjectionConfig, may_eject: bool) -> bool {
        if !config.enabled {
            return false;
        }
        match outcome {
            Outcome::Success => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                if self.until_ms.load(Ordering::Relaxed) != 0 && self.status() != Status::Ejected {
                    // the half-open probe passed
                    self.until_ms.store(0, Ordering::Relaxed);
                    self.repeats.store(0, Ordering::Relaxed);
                    self.probing.store(false, Ordering::Relaxed);
                }
                false
            }
            Outcome::Failure => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                let probe_failed = matches!(self.status(), Status::HalfOpen { probing: true });
                if !(probe_failed || failures >= config.consecutive_failures) {
                    return false;
                }
                if self.status() == Status::Ejected || !(may_eject || probe_failed) {
                    return false;
                }
                let repeats = self.repeats.fetch_add(1, Ordering::Relaxed);
                let time = config
                    .base_time
                    .saturating_mul(1u32 << repeats.min(16))
                    .min(config.max_time);
                let until =
                    mono_ms().saturating_add(u64::try_from(time.as_millis()).unwrap_or(u64::MAX));
                self.until_ms.store(until.max(1), Ordering::Relaxed);
                self.probing.store(false, Ordering::Relaxed);
                self.failures.store(0, Ordering::Relaxed);
                self.total.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ms: u64) -> EjectionConfig {
        EjectionConfig {
            enabled: true,
            consecutive_failures: 3,
            base_time: Duration::from_millis(ms),
            max_time: Duration::from_millis(ms * 4),
            max_ejected_percent: 50,
        }
    }

    /// Three failures eject `e` (1 ms); wait for the half-open state.
    fn eject_until_half_open(e: &Ejection, c: &EjectionConfig, deadline: Instant) {
        for _ in 0..3 {
            e.record(Outcome::Failure, c, true);
        }
        while e.status() == Status::Ejected && Instant::now() < deadline {
            std::thread::yield_now();
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let e = Ejection::default();
        let c = config(60_000);
        assert!(!e.record(Outcome::Failure, &c, true));
        assert!(!e.record(Outcome::Failure, &c, true));
        assert!(
            !e.record(Outcome::Success, &c, true),
            "a success resets the run"
        );
        assert!(!e.record(Outcome::Failure, &c, true));
        assert!(!e.record(Outcome::Failure, &c, true));
        assert!(e.record(Outcome::Failure, &c, true));
        assert_eq!(e.status(), Status::Ejected);
        assert!(!e.admits());
    }

    #[test]
    fn the_panic_threshold_keeps_it_in() {
        let e = Ejection::default();
        let c = config(60_000);
        for _ in 0..10 {
            assert!(!e.record(Outcome::Failure, &c, false));
        }
        assert_eq!(e.status(), Status::Normal);
    }

    #[test]
    fn half_open_lets_one_probe_through_and_backs_off_on_failure() {
        let e = Ejection::default();
        let c = config(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        eject_until_half_open(&e, &c, deadline);
        assert_eq!(e.status(), Status::HalfOpen { probing: false });
        assert_eq!(
            e.claim(),
            Some(Claim::Probe),
            "the first request is the probe"
        );
        assert_eq!(e.claim(), None, "only one probe at a time");
        assert!(!e.admits());
        assert!(
            e.record(Outcome::Failure, &c, false),
            "a failed probe ejects again"
        );
        assert!(e.remaining() <= Duration::from_millis(2));
        while e.status() == Status::Ejected && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(e.claim(), Some(Claim::Probe));
        assert!(!e.record(Outcome::Success, &c, true));
        assert_eq!(e.status(), Status::Normal, "a passing probe restores it");
        assert_eq!(e.total.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_probe_that_ends_without_an_outcome_frees_the_probe_slot() {
        let e = Ejection::default();
        let c = config(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        eject_until_half_open(&e, &c, deadline);
        assert_eq!(e.claim(), Some(Claim::Probe));
        assert!(!e.admits(), "the probe is in flight");
        e.release_probe();
        assert_eq!(e.status(), Status::HalfOpen { probing: false });
        assert_eq!(e.claim(), Some(Claim::Probe), "the next request probes");
    }
}

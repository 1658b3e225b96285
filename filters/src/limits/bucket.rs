//! A token bucket: `capacity` tokens, refilled continuously at `per_sec`.
//!
//! Used for requests per second (take 1 per request), tokens per minute
//! (reserve an estimate, settle on real usage) and, by `auth`, login attempts
//! per client IP. The level may go negative ([`TokenBucket::take`]): usage
//! beyond a reservation is a debt repaid by the refill before anything else
//! is admitted.
//!
//! Time comes from `tokio::time::Instant`, so tests that pause tokio time
//! control every bucket. The bucket is not synchronised: keep it behind the
//! owner's lock.

use std::time::Duration;
use tokio::time::Instant;

/// Slack for floating-point refill arithmetic: a level of 0.999999999 after
/// exactly one refill period counts as 1.
const EPSILON: f64 = 1e-9;

/// A token bucket (see the module docs).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket of `capacity` tokens refilled at `per_sec` tokens per
    /// second. A negative or non-finite capacity counts as 0; a rate that is
    /// not a positive finite number never refills.
    pub fn new(capacity: f64, per_sec: f64) -> Self {
        let capacity = sanitize(capacity);
        TokenBucket {
            capacity,
            per_sec: sanitize(per_sec),
            level: capacity,
            updated: super::clock::now(),
        }
    }

    /// Take `n` tokens if they are there. `Err(wait)`: nothing was taken, and
    /// `n` tokens will be there after `wait`; `Duration::MAX` when they never
    /// will be (`n` exceeds the capacity, or the bucket never refills).
    pub fn try_take(&mut self, n: f64) -> Result<(), Duration> {
        self.refill();
        let n = sanitize(n);
        if n > self.capacity + EPSILON {
            return Err(Duration::MAX);
        }
        if self.level + EPSILON >= n {
            self.level -= n;
            return Ok(());
        }
        Err(self.time_to_reach(n))
    }

    /// Take `n` tokens unconditionally; the level may go negative (a debt).
    pub fn take(&mut self, n: f64) {
        self.refill();
        self.level -= sanitize(n);
    }

    /// Give `n` tokens back (a refund); the level never exceeds the capacity.
    pub fn give(&mut self, n: f64) {
        self.refill();
        self.level = (self.level + sanitize(n)).min(self.capacity);
    }

    /// Tokens available now (negative while in debt).
    pub fn remaining(&mut self) -> f64 {
        self.refill();
        self.level
    }

    /// Time until the bucket is full again (`Duration::ZERO` if it is).
    pub fn until_full(&mut self) -> Duration {
        self.refill();
        self.time_to_reach(self.capacity)
    }

    /// The bucket's size.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// The refill rate, tokens per second.
    pub fn per_sec(&self) -> f64 {
        self.per_sec
    }

    /// Change size and rate in place (a reloaded limit), keeping what was
    /// consumed: the level is cut to the new capacity, a debt is kept.
    pub fn reconfigure(&mut self, capacity: f64, per_sec: f64) {
        self.refill();
        self.capacity = sanitize(capacity);
        self.per_sec = sanitize(per_sec);
        self.level = self.level.min(self.capacity);
    }

    fn refill(&mut self) {
        let now = super::clock::now();
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        if self.level < self.capacity {
            self.level = (self.level + elapsed * self.per_sec).min(self.capacity);
        }
    }

    /// Time until the level reaches `target` at the current rate.
    fn time_to_reach(&self, target: f64) -> Duration {
        let missing = target - self.level;
        if missing <= EPSILON {
            return Duration::ZERO;
        }
        if self.per_sec <= 0.0 {
            return Duration::MAX;
        }
        Duration::try_from_secs_f64(missing / self.per_sec).unwrap_or(Duration::MAX)
    }
}

/// Negative, NaN and infinite amounts would poison the level forever.
fn sanitize(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::clock::{advance, pause};

    #[test]
    fn starts_full_and_refuses_when_empty_with_the_wait() {
        pause();
        let mut b = TokenBucket::new(2.0, 1.0);
        assert_eq!(b.remaining(), 2.0);
        assert_eq!(b.try_take(1.0), Ok(()));
        assert_eq!(b.try_take(1.0), Ok(()));
        assert_eq!(b.try_take(1.0), Err(Duration::from_secs(1)));
        advance(Duration::from_millis(500));
        assert_eq!(b.try_take(1.0), Err(Duration::from_millis(500)));
        advance(Duration::from_millis(500));
        assert_eq!(b.try_take(1.0), Ok(()));
    }

    #[test]
    fn more_than_capacity_never_fits() {
        pause();
        let mut b = TokenBucket::new(10.0, 1.0);
        assert_eq!(b.try_take(11.0), Err(Duration::MAX));
        assert_eq!(b.remaining(), 10.0, "a refused take takes nothing");
    }

    #[test]
    fn refill_is_capped_at_capacity() {
        pause();
        let mut b = TokenBucket::new(5.0, 10.0);
        b.take(5.0);
        advance(Duration::from_secs(60));
        assert_eq!(b.remaining(), 5.0);
    }

    #[test]
    fn take_goes_into_debt_and_refill_repays_it() {
        pause();
        let mut b = TokenBucket::new(10.0, 2.0);
        b.take(14.0);
        assert_eq!(b.remaining(), -4.0);
        assert_eq!(b.try_take(1.0), Err(Duration::from_millis(2500)));
        assert_eq!(b.until_full(), Duration::from_secs(7));
        advance(Duration::from_millis(2500));
        assert_eq!(b.try_take(1.0), Ok(()));
    }

    #[test]
    fn give_refunds_up_to_capacity() {
        pause();
        let mut b = TokenBucket::new(10.0, 1.0);
        b.take(6.0);
        b.give(4.0);
        assert_eq!(b.remaining(), 8.0);
        b.give(100.0);
        assert_eq!(b.remaining(), 10.0);
        assert_eq!(b.until_full(), Duration::ZERO);
    }

    #[test]
    fn fractional_rates_refill_exactly_enough() {
        pause();
        // 10 per second: one token every 100 ms, float error must not refuse it.
        let mut b = TokenBucket::new(1.0, 10.0);
        for _ in 0..50 {
            assert_eq!(b.try_take(1.0), Ok(()));
            assert!(b.try_take(1.0).is_err());
            advance(Duration::from_millis(100));
        }
    }

    #[test]
    fn garbage_amounts_do_not_poison_the_bucket() {
        pause();
        let mut b = TokenBucket::new(f64::NAN, f64::INFINITY);
        assert_eq!(b.capacity(), 0.0);
        assert_eq!(b.try_take(1.0), Err(Duration::MAX));
        let mut b = TokenBucket::new(3.0, 0.0);
        b.take(f64::NAN);
        b.give(-5.0);
        assert_eq!(b.remaining(), 3.0);
        b.take(1.0);
        assert_eq!(b.try_take(3.0), Err(Duration::MAX), "rate 0 never refills");
        assert_eq!(b.until_full(), Duration::MAX);
    }

    #[test]
    fn reconfigure_keeps_consumption_and_debt() {
        pause();
        let mut b = TokenBucket::new(10.0, 1.0);
        b.take(4.0);
        b.reconfigure(20.0, 2.0);
        assert_eq!(
            b.remaining(),
            6.0,
            "growing the bucket grants nothing at once"
        );
        b.reconfigure(3.0, 1.0);
        assert_eq!(b.remaining(), 3.0);
        b.take(5.0);
        b.reconfigure(100.0, 1.0);
        assert_eq!(b.remaining(), -2.0);
    }
}

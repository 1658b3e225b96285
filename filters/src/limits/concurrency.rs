//! Requests in flight at one level, against an optional limit.
//!
//! Kept inside the level's lock with its buckets, so a reload that changes the
//! limit keeps the count: requests already running are never forgotten, and
//! lowering the limit below the count just refuses new ones until enough end.

/// In-flight requests and the limit on them (`None` = unlimited, counted only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Slots {
    limit: Option<u32>,
    in_flight: u32,
}

impl Slots {
    pub(crate) fn new(limit: Option<u32>) -> Self {
        Slots {
            limit,
            in_flight: 0,
        }
    }

    /// Take a slot if one is free.
    pub(crate) fn try_acquire(&mut self) -> bool {
        if self.limit.is_some_and(|limit| self.in_flight >= limit) {
            return false;
        }
        self.in_flight = self.in_flight.saturating_add(1);
        true
    }

    /// Give a slot back (never below zero).
    pub(crate) fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub(crate) fn set_limit(&mut self, limit: Option<u32>) {
        self.limit = limit;
    }

    pub(crate) fn limit(&self) -> Option<u32> {
        self.limit
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_at_the_limit_and_frees_on_release() {
        let mut s = Slots::new(Some(2));
        assert!(s.try_acquire());
        assert!(s.try_acquire());
        assert!(!s.try_acquire());
        assert_eq!(s.in_flight(), 2, "a refused acquire takes nothing");
        s.release();
        assert!(s.try_acquire());
    }

    #[test]
    fn unlimited_still_counts_and_release_never_underflows() {
        let mut s = Slots::new(None);
        for _ in 0..1000 {
            assert!(s.try_acquire());
        }
        assert_eq!(s.in_flight(), 1000);
        let mut s = Slots::new(Some(1));
        s.release();
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn lowering_the_limit_keeps_running_requests() {
        let mut s = Slots::new(Some(3));
        for _ in 0..3 {
            assert!(s.try_acquire());
        }
        s.set_limit(Some(1));
        assert_eq!(s.in_flight(), 3);
        s.release();
        s.release();
        assert!(!s.try_acquire(), "still one running at limit 1");
        s.release();
        assert!(s.try_acquire());
    }
}

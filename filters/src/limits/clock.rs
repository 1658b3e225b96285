//! The limiters' time source.
//!
//! Production reads [`tokio::time::Instant::now`], so a test of the gateway
//! that pauses tokio time (`start_paused`) also pauses every bucket.
//!
//! This crate's own unit tests cannot pause tokio time (that needs tokio's
//! `test-util` feature, which `filters/Cargo.toml` does not enable), so under
//! `cfg(test)` a thread may freeze its clock with [`pause`] and move it with
//! [`advance`]: deterministic, no wall-clock sleeps. A thread that never calls
//! `pause` sees tokio's clock, exactly as in production. Other filters' tests
//! that drive a [`super::TokenBucket`] can use the same `pause`/`advance`.

/// Now, as the limiters see it.
#[cfg(not(test))]
#[inline]
pub(crate) fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

#[cfg(test)]
pub(crate) use virtual_clock::{advance, now, pause};

#[cfg(test)]
mod virtual_clock {
    use std::cell::Cell;
    use std::time::Duration;
    use tokio::time::Instant;

    thread_local! {
        static FROZEN: Cell<Option<Instant>> = const { Cell::new(None) };
    }

    /// Now: the frozen instant if this thread paused its clock, tokio's otherwise.
    pub(crate) fn now() -> Instant {
        FROZEN.with(|f| f.get()).unwrap_or_else(Instant::now)
    }

    /// Freeze this thread's clock at the current instant.
    pub(crate) fn pause() {
        FROZEN.with(|f| f.set(Some(Instant::now())));
    }

    /// Move this thread's frozen clock forward (pauses it first if needed).
    pub(crate) fn advance(by: Duration) {
        FROZEN.with(|f| f.set(Some(f.get().unwrap_or_else(Instant::now) + by)));
    }
}

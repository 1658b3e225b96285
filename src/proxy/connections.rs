//! `server.max_connections`: how many client connections `server.listen`
//! holds open at once. Counted in at accept (Pingora's `ConnectionFilter`)
//! and out when the connection ends (the `downstream_connection_closed`
//! hook of the vendored pingora-proxy). Above the cap a new connection is
//! closed right after accept, before a byte is read, so the file
//! descriptors left (`server.connection_reserve`) stay free for engine
//! connections, health checks, logs and the side listeners (admin, metrics),
//! which are not counted.

use async_trait::async_trait;
use pingora_core::listeners::ConnectionFilter;
use prometheus::{IntCounter, IntGauge};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    max: usize,
    open_gauge: IntGauge,
    rejected: IntCounter,
}

impl ConnectionLimit {
    pub fn new(max: usize, open_gauge: IntGauge, rejected: IntCounter) -> ConnectionLimit {
        ConnectionLimit {
            open: AtomicUsize::new(0),
            max: max.max(1),
            open_gauge,
            rejected,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// One connection more, unless the cap is reached.
    pub fn try_open(&self) -> bool {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if taken {
            self.open_gauge.inc();
        } else {
            self.rejected.inc();
        }
        taken
    }

    /// One connection fewer.
    pub fn closed(&self) {
        let was = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
        if was.is_ok() {
            self.open_gauge.dec();
        }
    }
}

#[async_trait]
impl ConnectionFilter for ConnectionLimit {
    async fn should_accept(&self, _addr: Option<&std::net::SocketAddr>) -> bool {
        self.try_open()
    }
}

/// The cap when `server.max_connections` is not set: half of what the file
/// descriptor limit leaves after the reserve, since every client connection
/// with a request in flight also holds one engine connection.
pub fn default_max_connections(reserve: usize) -> usize {
    soft_fd_limit().map_or(10_000, |soft| (soft.saturating_sub(reserve) / 2).max(1))
}

/// The soft `RLIMIT_NOFILE` (from /proc, which needs no `unsafe`).
pub fn soft_fd_limit() -> Option<usize> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<usize>().ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_and_closing_frees_a_place() {
        let limit = ConnectionLimit::new(
            2,
            IntGauge::new("o", "o").unwrap_or_else(|_| unreachable!()),
            IntCounter::new("r", "r").unwrap_or_else(|_| unreachable!()),
        );
        assert!(limit.try_open());
        assert!(limit.try_open());
        assert!(!limit.try_open());
        assert_eq!(limit.rejected.get(), 1);
        limit.closed();
        assert!(limit.try_open());
        limit.closed();
        limit.closed();
        limit.closed(); // more closes than opens never wraps
        assert_eq!(limit.open.load(Ordering::Relaxed), 0);
        assert_eq!(limit.open_gauge.get(), 0);
    }

    #[test]
    fn the_default_leaves_the_reserve() {
        let max = default_max_connections(512);
        assert!(max >= 1);
    }
}

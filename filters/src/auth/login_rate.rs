//! Login attempts per client address: a [`TokenBucket`] of
//! `login_attempts_per_minute`, refilled evenly over the minute.
//!
//! IPv6 addresses count per /64 (one host usually owns a whole /64), and
//! IPv4-mapped IPv6 addresses as their IPv4 address. At most [`MAX_CLIENTS`]
//! addresses are tracked: when full, addresses whose bucket has refilled are
//! forgotten, then the least recently seen half.

use crate::limits::TokenBucket;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

/// Most addresses tracked at once.
pub(crate) const MAX_CLIENTS: usize = 10_000;

struct Client {
    bucket: TokenBucket,
    /// When it was last seen, as a sequence number (for eviction).
    seen: u64,
}

#[derive(Default)]
struct Clients {
    map: HashMap<Option<IpAddr>, Client>,
    next_seq: u64,
}

pub(crate) struct LoginLimiter {
    per_minute: f64,
    clients: Mutex<Clients>,
}

/// The address attempts are counted under.
pub(crate) fn client_key(ip: Option<IpAddr>) -> Option<IpAddr> {
    match ip? {
        IpAddr::V4(v4) => Some(IpAddr::V4(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Some(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                Some(IpAddr::V6(Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
        },
    }
}

impl LoginLimiter {
    pub(crate) fn new(per_minute: u32) -> Self {
        LoginLimiter {
            per_minute: f64::from(per_minute.max(1)),
            clients: Mutex::new(Clients::default()),
        }
    }

    /// Take one attempt for `ip`; `Err(wait)` until one is available.
    pub(crate) fn try_take(&self, ip: Option<IpAddr>) -> Result<(), Duration> {
        let key = client_key(ip);
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let clients = &mut *clients;
        if !clients.map.contains_key(&key) && clients.map.len() >= MAX_CLIENTS {
            evict(&mut clients.map);
        }
        clients.next_seq += 1;
        let seq = clients.next_seq;
        let client = clients.map.entry(key).or_insert_with(|| Client {
            bucket: TokenBucket::new(self.per_minute, self.per_minute / 60.0),
            seen: seq,
        });
        client.seen = seq;
        client.bucket.try_take(1.0)
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.clients.lock().map(|c| c.map.len()).unwrap_or(0)
    }
}

/// Forget addresses whose bucket is full again (they are as good as new);
/// if that is not enough, the least recently seen half.
fn evict(map: &mut HashMap<Option<IpAddr>, Client>) {
    map.retain(|_, c| c.bucket.until_full() > Duration::ZERO);
    if map.len() >= MAX_CLIENTS {
        let mut seen: Vec<u64> = map.values().map(|c| c.seen).collect();
        let mid = seen.len() / 2;
        let (_, median, _) = seen.select_nth_unstable(mid);
        let median = *median;
        map.retain(|_, c| c.seen > median);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(n: u32) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::from(n)))
    }

    #[test]
    fn limits_per_address() {
        let limiter = LoginLimiter::new(10);
        for _ in 0..10 {
            assert_eq!(limiter.try_take(v4(1)), Ok(()));
        }
        let wait = limiter.try_take(v4(1)).unwrap_err();
        // one attempt comes back every 6 s
        assert!(
            wait > Duration::from_secs(5) && wait <= Duration::from_secs(6),
            "{wait:?}"
        );
        assert_eq!(limiter.try_take(v4(2)), Ok(()));
        // unknown addresses share one bucket
        for _ in 0..10 {
            assert_eq!(limiter.try_take(None), Ok(()));
        }
        assert!(limiter.try_take(None).is_err());
    }

    #[test]
    fn ipv6_counts_per_slash_64_and_mapped_v4_as_v4() {
        let limiter = LoginLimiter::new(1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.try_take(Some(a)).is_ok());
        assert!(limiter.try_take(Some(b)).is_err());
        assert!(limiter.try_take(Some(c)).is_ok());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(limiter.try_take(Some("10.0.0.1".parse().unwrap())).is_ok());
        assert!(limiter.try_take(Some(mapped)).is_err());
    }

    #[test]
    fn memory_is_bounded_and_recent_addresses_stay_limited() {
        let limiter = LoginLimiter::new(5);
        let total = u32::try_from(MAX_CLIENTS).unwrap() + 500;
        for n in 0..total {
            assert!(limiter.try_take(v4(n)).is_ok());
        }
        assert!(limiter.tracked() <= MAX_CLIENTS);
        assert!(limiter.tracked() >= MAX_CLIENTS / 2);
        let last = v4(total - 1);
        for _ in 0..4 {
            assert!(limiter.try_take(last).is_ok());
        }
        assert!(limiter.try_take(last).is_err());
    }
}

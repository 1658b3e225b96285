//! Memory for request bodies the gateway is holding.
//!
//! The gateway reads a whole body before it can route it (the `model` is in
//! it; docs/adr/0001-body-pre-read.md), so bodies are held in memory from the
//! first byte until the engine exchange ends. Two bounds keep a client from
//! turning that into gigabytes:
//!
//! - a global budget of bytes (`server.max_buffered_body_bytes`): a body that
//!   would pass it is refused with 503 `server_overloaded` and `Retry-After`
//!   before more of it is read (a declared `Content-Length` is reserved
//!   whole, before any byte is read; a chunked body as it arrives);
//! - per principal (API key or user), at most as many bodies being received
//!   at once as its `concurrent` limit, checked from the request head, so a
//!   key limited to 5 concurrent requests cannot have 200 uploads in flight.
//!
//! Shared by every config generation (a reload changes the capacity, not the
//! count of what is held).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, Default)]
pub struct BodyBudget {
    capacity: AtomicU64,
    used: AtomicU64,
    /// Bodies being received, per principal id.
    receiving: Mutex<HashMap<String, u32>>,
}

/// Why a body cannot be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The global budget is full.
    Full { capacity: u64 },
    /// The principal already has `limit` bodies in receipt.
    PerPrincipal { limit: u32 },
}

impl BodyBudget {
    pub fn new(capacity: u64) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            capacity: AtomicU64::new(capacity),
            ..BodyBudget::default()
        })
    }

    pub fn set_capacity(&self, capacity: u64) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Start receiving one body: counts against `principal`'s limit (if it
    /// has one) until the returned hold drops or [`Hold::received`].
    pub fn begin(self: &Arc<Self>, principal: Option<(&str, u32)>) -> Result<Hold, Refused> {
        let receiving = match principal {
            Some((id, limit)) => {
                let mut map = self
                    .receiving
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let count = map.entry(id.to_string()).or_insert(0);
                if *count >= limit {
                    return Err(Refused::PerPrincipal { limit });
                }
                *count += 1;
                Some(id.to_string())
            }
            None => None,
        };
        Ok(Hold {
            budget: self.clone(),
            bytes: 0,
            receiving,
        })
    }

    fn try_add(&self, bytes: u64) -> Result<(), Refused> {
        let capacity = self.capacity();
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(bytes);
            if next > capacity {
                return Err(Refused::Full { capacity });
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    fn end_receiving(&self, id: &str) {
        let mut map = self
            .receiving
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = map.get_mut(id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(id);
            }
        }
    }
}

/// One body's share of the budget; gives it back on drop.
#[derive(Debug)]
pub struct Hold {
    budget: Arc<BodyBudget>,
    bytes: u64,
    receiving: Option<String>,
}

impl Hold {
    /// Make sure `total` bytes are reserved for this body (reserves only the
    /// difference with what it holds already).
    pub fn reserve_up_to(&mut self, total: u64) -> Result<(), Refused> {
        if total <= self.bytes {
            return Ok(());
        }
        self.budget.try_add(total - self.bytes)?;
        self.bytes = total;
        Ok(())
    }

    /// The body is in: it no longer counts as being received (its bytes stay
    /// reserved until the hold drops).
    pub fn received(&mut self) {
        if let Some(id) = self.receiving.take() {
            self.budget.end_receiving(&id);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.received();
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_back_when_the_hold_drops() {
        let budget = BodyBudget::new(100);
        let mut a = budget.begin(None).unwrap_or_else(|_| unreachable!());
        assert_eq!(a.reserve_up_to(60), Ok(()));
        assert_eq!(a.reserve_up_to(40), Ok(()), "already held");
        assert_eq!(budget.used(), 60);
        let mut b = budget.begin(None).unwrap_or_else(|_| unreachable!());
        assert_eq!(b.reserve_up_to(50), Err(Refused::Full { capacity: 100 }));
        assert_eq!(b.reserve_up_to(40), Ok(()));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_principal_has_at_most_its_limit_of_bodies_in_receipt() {
        let budget = BodyBudget::new(1 << 20);
        let k = Some(("key:a", 2));
        let one = budget.begin(k);
        let mut two = budget.begin(k).unwrap_or_else(|_| unreachable!());
        assert!(one.is_ok());
        assert_eq!(
            budget.begin(k).map(|_| ()),
            Err(Refused::PerPrincipal { limit: 2 })
        );
        assert!(
            budget.begin(Some(("key:b", 2))).is_ok(),
            "others unaffected"
        );
        two.received();
        assert!(budget.begin(k).is_ok(), "a received body frees its place");
        drop(one);
        drop(two);
        assert!(budget
            .receiving
            .lock()
            .map(|m| m.is_empty())
            .unwrap_or(false));
    }

    #[test]
    fn a_smaller_capacity_after_a_reload_applies_to_new_bytes() {
        let budget = BodyBudget::new(100);
        let mut a = budget.begin(None).unwrap_or_else(|_| unreachable!());
        assert_eq!(a.reserve_up_to(80), Ok(()));
        budget.set_capacity(50);
        let mut b = budget.begin(None).unwrap_or_else(|_| unreachable!());
        assert!(b.reserve_up_to(1).is_err());
        drop(a);
        assert_eq!(b.reserve_up_to(50), Ok(()));
    }
}

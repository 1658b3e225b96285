//! The order of a pool's dispatch queue: who goes next when a backend slot
//! frees (docs/flow-control.md).
//!
//! - Higher priority first. A waiting request gains one level per `aging`
//!   waited, against requests of other priorities (never within its own),
//!   so low priority is delayed, never starved: a `low` (2) request
//!   that waited 3 × `aging` competes as `normal` (5).
//! - Within a level, principals share by weight (start-time fair queueing,
//!   tagged at dispatch): a principal's next request starts at
//!   `max(virtual now, where its last dispatched request finished)` and
//!   finishes `1 / weight` later; the smallest start goes first, the oldest
//!   request within a principal. Tags move only when a request is served, so
//!   a tenant whose flood times out in the queue is not pushed back for
//!   requests it never got; a tenant with weight 2 gets twice the dispatches
//!   of one with weight 1 while both are backlogged.
//!
//! Pure bookkeeping: no locks, no clocks of its own, no I/O.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One waiting request.
#[derive(Debug)]
pub struct Entry<T> {
    pub id: u64,
    principal: u64,
    priority: u8,
    weight: u32,
    pub since: Instant,
    pub item: T,
}

#[derive(Debug)]
pub struct WaitList<T> {
    entries: Vec<Entry<T>>,
    next_id: u64,
    virtual_now: f64,
    /// Where each waiting principal's last dispatched request finished.
    served: HashMap<u64, f64>,
}

impl<T> Default for WaitList<T> {
    fn default() -> Self {
        WaitList {
            entries: Vec::new(),
            next_id: 1,
            virtual_now: 0.0,
            served: HashMap::new(),
        }
    }
}

impl<T> WaitList<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Queue `item` for `principal`; returns its id.
    pub fn push(
        &mut self,
        principal: u64,
        priority: u8,
        weight: u32,
        now: Instant,
        item: T,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push(Entry {
            id,
            principal,
            priority,
            weight: weight.max(1),
            since: now,
            item,
        });
        id
    }

    /// The virtual start of `principal`'s next request.
    fn start_tag(&self, principal: u64) -> f64 {
        self.served
            .get(&principal)
            .copied()
            .unwrap_or(0.0)
            .max(self.virtual_now)
    }

    /// About how many waiting requests a new request of `principal` (at
    /// `priority`, with `weight`) would wait behind: every request at a
    /// higher level, its principal's own, and from each other principal at
    /// its level about as many as fair share serves meanwhile.
    pub fn ahead_of(
        &self,
        principal: u64,
        priority: u8,
        weight: u32,
        now: Instant,
        aging: Duration,
    ) -> usize {
        let aging = aging.as_secs_f64().max(1e-3);
        let mine_level = f64::from(priority);
        let mut higher = 0usize;
        let mut same: HashMap<u64, (usize, u32)> = HashMap::new();
        for e in &self.entries {
            let waited = now.saturating_duration_since(e.since).as_secs_f64();
            let level = f64::from(e.priority) + (waited / aging).floor();
            if e.priority == priority {
                let slot = same.entry(e.principal).or_insert((0, e.weight));
                slot.0 += 1;
            } else if level >= mine_level {
                higher += 1;
            }
        }
        let mine = same.get(&principal).map_or(0, |s| s.0);
        let turns = (mine + 1) as f64 / f64::from(weight.max(1));
        let others: usize = same
            .iter()
            .filter(|(p, _)| **p != principal)
            .map(|(_, &(count, w))| count.min((turns * f64::from(w)).ceil() as usize))
            .sum();
        higher + mine + others
    }

    /// The queue is full and `principal` (at `priority`, with `weight`)
    /// wants in: the request to push out for it, or `None` when it already
    /// holds its fair share. The victim belongs to the principal holding the
    /// most waiting requests per unit of weight, when that is more than the
    /// newcomer's principal would hold with it (so a flood that filled the
    /// queue before another tenant came gives way down to equal shares); it is
    /// that principal's lowest-priority, newest request, never one of a
    /// higher priority than the newcomer's.
    pub fn push_out(&self, principal: u64, priority: u8, weight: u32) -> Option<u64> {
        let mut held: HashMap<u64, (usize, u32)> = HashMap::new();
        for e in self.entries.iter().filter(|e| e.priority <= priority) {
            held.entry(e.principal).or_insert((0, e.weight)).0 += 1;
        }
        let mine = held.get(&principal).map_or(0, |h| h.0);
        let mine_share = (mine + 1) as f64 / f64::from(weight.max(1));
        let (heaviest, share) = held
            .iter()
            .filter(|(p, _)| **p != principal)
            .map(|(p, &(count, w))| (*p, count as f64 / f64::from(w)))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))?;
        if share <= mine_share {
            return None;
        }
        self.entries
            .iter()
            .filter(|e| e.principal == heaviest && e.priority <= priority)
            .min_by(|a, b| a.priority.cmp(&b.priority).then(b.id.cmp(&a.id)))
            .map(|e| e.id)
    }

    /// Take a request out without dispatching it (it left or timed out).
    pub fn remove(&mut self, id: u64) -> Option<Entry<T>> {
        let index = self.entries.iter().position(|e| e.id == id)?;
        let entry = self.entries.swap_remove(index);
        let principal = entry.principal;
        if !self.entries.iter().any(|e| e.principal == principal) {
            // an idle principal starts again at the virtual now
            self.served.remove(&principal);
        }
        Some(entry)
    }

    /// The request that goes next.
    pub fn next(&self, now: Instant, aging: Duration) -> Option<&Entry<T>> {
        let aging = aging.as_secs_f64().max(1e-3);
        let level = |e: &Entry<T>| {
            let waited = now.saturating_duration_since(e.since).as_secs_f64();
            f64::from(e.priority) + (waited / aging).floor()
        };
        // aging lifts a request over lower *priorities* only: between
        // requests of one priority, fair share alone decides (else a
        // flooder's old requests would age past a newcomer's)
        self.entries.iter().max_by(|a, b| {
            let by_level = if a.priority == b.priority {
                std::cmp::Ordering::Equal
            } else {
                level(a).total_cmp(&level(b))
            };
            by_level
                .then(
                    self.start_tag(b.principal)
                        .total_cmp(&self.start_tag(a.principal)),
                )
                .then(b.id.cmp(&a.id))
        })
    }

    /// Dispatch the request `id` (the one [`WaitList::next`] named).
    pub fn take(&mut self, id: u64) -> Option<Entry<T>> {
        let start = self.entries.iter().find(|e| e.id == id).map(|e| {
            (
                self.start_tag(e.principal),
                e.principal,
                1.0 / f64::from(e.weight),
            )
        });
        let (start, principal, cost) = start?;
        self.virtual_now = start;
        self.served.insert(principal, start + cost);
        self.remove(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_pushes_out_the_heaviest_tenant_down_to_equal_shares() {
        let now = Instant::now();
        let mut list: WaitList<&'static str> = WaitList::default();
        for _ in 0..4 {
            list.push(1, 5, 1, now, "a");
        }
        // B (principal 2) arrives at a queue A filled: A's newest gives way
        let victim = list.push_out(2, 5, 1).unwrap();
        assert_eq!(victim, 4, "A's newest request");
        list.remove(victim);
        list.push(2, 5, 1, now, "b");
        let victim = list.push_out(2, 5, 1).unwrap();
        list.remove(victim);
        list.push(2, 5, 1, now, "b");
        // 2 : 2 — B's third would be more than its share
        assert_eq!(list.push_out(2, 5, 1), None);
        assert_eq!(list.push_out(1, 5, 1), None, "A holds its share");
        // a tenant with weight 2 may hold twice as many: with 2 waiting it
        // still pushes out (B, weight 1, with 2 does not)
        list.push(3, 5, 2, now, "c");
        list.push(3, 5, 2, now, "c");
        assert!(list.push_out(3, 5, 2).is_some());
        // never a request of a higher priority than the newcomer's
        let mut high: WaitList<&'static str> = WaitList::default();
        for _ in 0..4 {
            high.push(1, 8, 1, now, "a-high");
        }
        assert_eq!(high.push_out(2, 5, 1), None);
        high.push(1, 2, 1, now, "a-low");
        assert_eq!(high.push_out(2, 5, 1), None, "1 low vs B's 1: equal");
        high.push(1, 2, 1, now, "a-low");
        assert_eq!(high.push_out(2, 5, 1), Some(6), "A's newest low request");
    }

    fn drain(
        list: &mut WaitList<&'static str>,
        now: Instant,
        aging: Duration,
    ) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Some(id) = list.next(now, aging).map(|e| e.id) {
            out.push(list.take(id).unwrap().item);
        }
        out
    }

    #[test]
    fn higher_priority_first_then_arrival() {
        let now = Instant::now();
        let mut l = WaitList::default();
        l.push(1, 5, 1, now, "a-normal");
        l.push(2, 2, 1, now, "b-low");
        l.push(3, 8, 1, now, "c-high");
        l.push(4, 5, 1, now, "d-normal");
        assert_eq!(
            drain(&mut l, now, Duration::from_secs(60)),
            ["c-high", "a-normal", "d-normal", "b-low"]
        );
    }

    #[test]
    fn a_flooding_principal_does_not_starve_another() {
        let now = Instant::now();
        let mut l = WaitList::default();
        for _ in 0..10 {
            l.push(1, 5, 1, now, "a");
        }
        l.push(2, 5, 1, now, "b");
        l.push(2, 5, 1, now, "b");
        let order = drain(&mut l, now, Duration::from_secs(60));
        assert_eq!(&order[..4], ["a", "b", "a", "b"]);
    }

    #[test]
    fn weights_share_in_proportion() {
        let now = Instant::now();
        let mut l = WaitList::default();
        for _ in 0..30 {
            l.push(1, 5, 2, now, "heavy");
            l.push(2, 5, 1, now, "light");
        }
        let order = drain(&mut l, now, Duration::from_secs(60));
        let heavy = order[..30].iter().filter(|x| **x == "heavy").count();
        assert_eq!(heavy, 20, "2:1 while both are backlogged: {order:?}");
    }

    #[test]
    fn requests_that_left_unserved_cost_their_principal_nothing() {
        let now = Instant::now();
        let mut l = WaitList::default();
        let flood: Vec<u64> = (0..10).map(|_| l.push(1, 5, 1, now, "a")).collect();
        for id in &flood[..8] {
            l.remove(*id); // timed out in the queue
        }
        for _ in 0..2 {
            l.push(2, 5, 1, now, "b");
        }
        let order = drain(&mut l, now, Duration::from_secs(60));
        assert_eq!(order, ["a", "b", "a", "b"]);
    }

    #[test]
    fn a_newcomer_waits_behind_its_fair_share_not_the_whole_queue() {
        let now = Instant::now();
        let aging = Duration::from_secs(60);
        let mut l = WaitList::default();
        for _ in 0..100 {
            l.push(1, 5, 1, now, "a");
        }
        l.push(3, 8, 1, now, "high");
        // B: one A request per own turn, plus the high one
        assert_eq!(l.ahead_of(2, 5, 1, now, aging), 2);
        l.push(2, 5, 1, now, "b");
        assert_eq!(l.ahead_of(2, 5, 1, now, aging), 4);
        // A itself waits behind its own hundred
        assert_eq!(l.ahead_of(1, 5, 1, now, aging), 1 + 100 + 1);
        // a low request waits behind everyone
        assert_eq!(l.ahead_of(4, 2, 1, now, aging), 102);
    }

    #[test]
    fn aging_does_not_reorder_one_priority() {
        let start = Instant::now();
        let mut l = WaitList::default();
        for _ in 0..3 {
            l.push(1, 5, 1, start, "old-a");
        }
        let later = start + Duration::from_secs(10);
        l.push(2, 5, 1, later, "new-b");
        let order = drain(&mut l, later, Duration::from_secs(2));
        assert_eq!(order, ["old-a", "new-b", "old-a", "old-a"]);
    }

    #[test]
    fn low_priority_ages_into_the_normal_band() {
        let start = Instant::now();
        let mut l = WaitList::default();
        l.push(1, 2, 1, start, "old-low");
        let later = start + Duration::from_secs(7);
        l.push(2, 5, 1, later, "new-normal");
        // 7 s waited at 2 s per level: 2 + 3 = 5, tied with normal; older tag wins
        assert_eq!(
            drain(&mut l, later, Duration::from_secs(2)),
            ["old-low", "new-normal"]
        );
    }

    #[test]
    fn removed_entries_are_gone_and_idle_principals_reset() {
        let now = Instant::now();
        let mut l = WaitList::default();
        let a = l.push(1, 5, 1, now, "a");
        l.push(2, 5, 1, now, "b");
        assert!(l.remove(a).is_some());
        assert!(l.remove(a).is_none());
        assert_eq!(drain(&mut l, now, Duration::from_secs(1)), ["b"]);
        assert!(l.is_empty());
        assert!(l.served.is_empty());
    }
}

//! A backend's load as its engine reports it (scraped `/metrics`), and the
//! expected-wait score `load_aware` and `prefix_aware` compare.

use super::signals::EngineSignals;
use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One successful scrape.
#[derive(Debug, Clone)]
pub struct Scraped {
    pub signals: EngineSignals,
    pub at: Instant,
    /// The gateway's own in-flight count on this backend when the scrape
    /// answered: requests sent (or finished) since then are added (or taken
    /// off), so a burst does not pile onto the backend that looked idle.
    pub inflight_at: usize,
    /// Prefix-cache hit rate: the engine's gauge, or hits / queries over the
    /// last scrape interval from its counters (the previous rate when no
    /// query came in between).
    pub hit_rate: Option<f64>,
    /// Requests the engine runs at once, as learnt from the last scrape that
    /// showed a queue (a full batch): beyond it, requests wait.
    pub capacity: Option<f64>,
}

/// The scraped state of one backend.
#[derive(Debug, Default)]
pub struct EngineLoad {
    latest: ArcSwapOption<Scraped>,
    pub scrapes_ok: AtomicU64,
    pub scrapes_failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl EngineLoad {
    /// Store a scrape's signals. Returns true when the engine's counters went
    /// back (it restarted, and its KV cache is empty).
    pub fn record(&self, signals: EngineSignals, inflight: usize) -> bool {
        let previous = self.latest.load_full();
        let before = previous.as_ref().map(|p| &p.signals);
        let restarted = matches!(
            (before.and_then(|s| s.prefix_queries), signals.prefix_queries),
            (Some(old), Some(new)) if new < old
        );
        // an engine with a queue runs a full batch: that is its capacity
        let capacity = match (signals.running, signals.waiting) {
            (Some(running), Some(waiting)) if waiting > 0.0 && running > 0.0 => Some(running),
            _ if restarted => None,
            _ => previous.as_ref().and_then(|p| p.capacity),
        };
        let hit_rate = signals.hit_rate.or_else(|| {
            let (queries, hits) = (signals.prefix_queries?, signals.prefix_hits?);
            match before.and_then(|s| Some((s.prefix_queries?, s.prefix_hits?))) {
                Some((q0, h0)) if !restarted && queries > q0 => {
                    Some(((hits - h0) / (queries - q0)).clamp(0.0, 1.0))
                }
                Some(_) if !restarted => previous.as_ref().and_then(|p| p.hit_rate),
                _ if queries > 0.0 => Some((hits / queries).clamp(0.0, 1.0)),
                _ => None,
            }
        });
        self.latest.store(Some(Arc::new(Scraped {
            signals,
            at: Instant::now(),
            inflight_at: inflight,
            hit_rate,
            capacity,
        })));
        self.scrapes_ok.fetch_add(1, Ordering::Relaxed);
        restarted
    }

    pub fn record_failure(&self, error: String) {
        self.scrapes_failed.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
    }

    /// The last scrape, whatever its age.
    pub fn latest(&self) -> Option<Arc<Scraped>> {
        self.latest.load_full()
    }

    /// The last scrape if it is at most `max_age` old.
    pub fn fresh(&self, max_age: Duration) -> Option<Arc<Scraped>> {
        self.latest
            .load_full()
            .filter(|s| s.at.elapsed() <= max_age)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The KV-cache use above which an engine starts to preempt or refuse
/// work; the score grows from here to 4 requests' worth at 100 %.
const KV_KNEE: f64 = 0.8;

/// Expected wait on a backend, in requests per unit of weight.
///
/// From a fresh scrape: the engine's requests (running + waiting) moved by
/// what the gateway sent or finished there since (`inflight − inflight_at`),
/// and never below the gateway's own in-flight count there (the engine's
/// view lags: a request in transit is not in it yet), split again into
/// running and waiting at the engine's learnt capacity (a
/// full batch seen with a queue); waiting requests count double, and KV-cache
/// pressure above 80 % adds up to 4. Without a fresh scrape: the gateway's own
/// in-flight count.
pub fn score(scraped: Option<&Scraped>, inflight: usize, weight: usize) -> f64 {
    let raw = match scraped {
        Some(s) => {
            let running = s.signals.running.unwrap_or(0.0);
            let waiting = s.signals.waiting.unwrap_or(0.0);
            let kv = s.signals.kv_usage.unwrap_or(0.0);
            let pressure = if kv > KV_KNEE {
                (kv - KV_KNEE) * 20.0
            } else {
                0.0
            };
            let since = inflight as f64 - s.inflight_at as f64;
            // never fewer than the gateway itself has outstanding there: a
            // request in transit, or one the engine counts as finished while
            // its last bytes are relayed, is still work on that backend
            let total = (running + waiting + since).max(inflight as f64);
            let queued = match s.capacity {
                Some(capacity) => (total - capacity).max(0.0),
                None => waiting.min(total),
            };
            total + queued + pressure
        }
        None => inflight as f64,
    };
    raw / weight.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(running: f64, waiting: f64, kv: f64) -> EngineSignals {
        EngineSignals {
            family: "vllm",
            running: Some(running),
            waiting: Some(waiting),
            kv_usage: Some(kv),
            ..Default::default()
        }
    }

    #[test]
    fn waiting_weighs_double_and_dispatches_since_count() {
        let load = EngineLoad::default();
        load.record(signals(2.0, 1.0, 0.1), 3);
        let s = load.latest().unwrap();
        assert_eq!(s.capacity, Some(2.0), "a queue means a full batch");
        assert_eq!(score(Some(&s), 3, 1), 4.0, "2 running + 2 × 1 waiting");
        assert_eq!(score(Some(&s), 5, 1), 8.0, "two more sent since: both wait");
        assert_eq!(
            score(Some(&s), 2, 1),
            2.0,
            "one finished: nothing waits now"
        );
        assert_eq!(score(Some(&s), 0, 1), 0.0, "three finished since");
        assert_eq!(score(Some(&s), 5, 2), 4.0, "weight divides");
        // no queue seen: the capacity is unknown, new requests count once
        let fresh = EngineLoad::default();
        fresh.record(signals(2.0, 0.0, 0.1), 2);
        let s = fresh.latest().unwrap();
        assert_eq!(score(Some(&s), 4, 1), 4.0);
        assert_eq!(score(None, 5, 1), 5.0, "no scrape: the gateway's own count");
        // the engine saw 2 of the 3 the gateway had sent (one in transit):
        // the backend is no cheaper than the gateway's own count
        let lagging = EngineLoad::default();
        lagging.record(signals(2.0, 0.0, 0.1), 3);
        let s = lagging.latest().unwrap();
        assert_eq!(score(Some(&s), 3, 1), 3.0);
        assert_eq!(score(Some(&s), 4, 1), 4.0);
        load.record(signals(0.0, 0.0, 1.0), 0);
        let full = score(load.latest().as_deref(), 0, 1);
        assert!((full - 4.0).abs() < 1e-9, "{full}");
    }

    #[test]
    fn hit_rate_from_counters_and_restart_detection() {
        let load = EngineLoad::default();
        let with = |q: f64, h: f64| EngineSignals {
            prefix_queries: Some(q),
            prefix_hits: Some(h),
            ..signals(0.0, 0.0, 0.0)
        };
        assert!(!load.record(with(100.0, 50.0), 0));
        assert_eq!(load.latest().unwrap().hit_rate, Some(0.5));
        assert!(!load.record(with(200.0, 140.0), 0));
        assert_eq!(load.latest().unwrap().hit_rate, Some(0.9));
        assert!(!load.record(with(200.0, 140.0), 0));
        assert_eq!(load.latest().unwrap().hit_rate, Some(0.9), "no new query");
        assert!(
            load.record(with(10.0, 0.0), 0),
            "counters went back: restarted"
        );
        assert_eq!(load.latest().unwrap().hit_rate, Some(0.0));
    }
}

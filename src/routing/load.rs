//! A backend's load as its engine reports it (scraped `/metrics`), and the
//! expected-wait score `load_aware` and `prefix_aware` compare.

use super::signals::EngineSignals;
use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A new sample's weight in the pace average when samples come often; a
/// sample after a quiet spell weighs more (see [`Pace::record`]).
const PACE_ALPHA: f64 = 0.05;
/// Pace information ages with this time constant: a sample `PACE_DECAY`
/// after the previous one weighs 63 %, and a backend that got no request
/// for a while relaxes toward the pool's fastest pace (so a slow backend
/// that recovered is tried again).
pub const PACE_DECAY: Duration = Duration::from_secs(10);
/// Backends within this factor of the fastest pace count as equally fast: a
/// prefix-cache hit or miss, or a longer prompt, moves one backend's average
/// by that much without the backend being slower.
pub const PACE_TOLERANCE: f64 = 1.5;
/// Paces below this many milliseconds are compared as this (scheduling
/// jitter on an idle machine is not a slow engine).
const PACE_FLOOR_MS: f64 = 10.0;

/// How long a backend takes to start answering: a moving average of the
/// time from dispatch to the first byte of the engine's response body
/// (time to first token for streams, the whole answer otherwise), weighted by
/// time as tower's and linkerd's peak-EWMA balancers do, without the peak
/// (a single prefix-cache miss is not a slow engine).
#[derive(Debug)]
pub struct Pace {
    /// Milliseconds as `f64` bits; 0 until the first sample.
    ewma_ms: AtomicU64,
    /// When the last sample came, in microseconds since `epoch`.
    last_us: AtomicU64,
    epoch: Instant,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            ewma_ms: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Pace {
    /// Fold in one request's time to first body byte.
    pub fn record(&self, sample: Duration) {
        let now = self.epoch.elapsed();
        let ms = (sample.as_secs_f64() * 1e3).max(0.0);
        let old = f64::from_bits(self.ewma_ms.load(Ordering::Relaxed));
        let new = if old > 0.0 {
            let since =
                now.saturating_sub(Duration::from_micros(self.last_us.load(Ordering::Relaxed)));
            let alpha =
                PACE_ALPHA.max(1.0 - (-since.as_secs_f64() / PACE_DECAY.as_secs_f64()).exp());
            old + alpha * (ms - old)
        } else {
            ms
        };
        // concurrent samples may overwrite each other: one is lost, no harm
        self.ewma_ms
            .store(new.max(f64::MIN_POSITIVE).to_bits(), Ordering::Relaxed);
        self.last_us.store(
            now.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// The average in milliseconds and the time since its last sample.
    pub fn estimate(&self) -> Option<(f64, Duration)> {
        let ms = f64::from_bits(self.ewma_ms.load(Ordering::Relaxed));
        (ms > 0.0).then(|| {
            let last = Duration::from_micros(self.last_us.load(Ordering::Relaxed));
            (ms, self.epoch.elapsed().saturating_sub(last))
        })
    }
}

/// How many times slower than the pool's fastest backend this one starts
/// answering (1 within [`PACE_TOLERANCE`], or without samples). A backend
/// that got no sample for a while relaxes toward the fastest pace.
pub fn pace_factor(own: Option<(f64, Duration)>, fastest_ms: Option<f64>) -> f64 {
    match (own, fastest_ms) {
        (Some((ms, age)), Some(fastest)) => {
            let relax = (-age.as_secs_f64() / PACE_DECAY.as_secs_f64()).exp();
            let relaxed = fastest + (ms - fastest).max(0.0) * relax;
            let reference = fastest.max(PACE_FLOOR_MS) * PACE_TOLERANCE;
            (relaxed / reference).max(1.0)
        }
        _ => 1.0,
    }
}

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
///
/// A backend `pace` times slower to answer than the fastest (see
/// [`pace_factor`]) costs `pace` times as much per request, this one included:
/// `(requests + 1) × pace − 1`, so an idle slow backend is worth `pace − 1`
/// requests queued on the fastest.
pub fn score(scraped: Option<&Scraped>, inflight: usize, weight: usize, pace: f64) -> f64 {
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
    let paced = if pace > 1.0 {
        (raw + 1.0) * pace - 1.0
    } else {
        raw
    };
    paced / weight.max(1) as f64
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
        assert_eq!(score(Some(&s), 3, 1, 1.0), 4.0, "2 running + 2 × 1 waiting");
        assert_eq!(
            score(Some(&s), 5, 1, 1.0),
            8.0,
            "two more sent since: both wait"
        );
        assert_eq!(
            score(Some(&s), 2, 1, 1.0),
            2.0,
            "one finished: nothing waits now"
        );
        assert_eq!(score(Some(&s), 0, 1, 1.0), 0.0, "three finished since");
        assert_eq!(score(Some(&s), 5, 2, 1.0), 4.0, "weight divides");
        // no queue seen: the capacity is unknown, new requests count once
        let fresh = EngineLoad::default();
        fresh.record(signals(2.0, 0.0, 0.1), 2);
        let s = fresh.latest().unwrap();
        assert_eq!(score(Some(&s), 4, 1, 1.0), 4.0);
        assert_eq!(
            score(None, 5, 1, 1.0),
            5.0,
            "no scrape: the gateway's own count"
        );
        // the engine saw 2 of the 3 the gateway had sent (one in transit):
        // the backend is no cheaper than the gateway's own count
        let lagging = EngineLoad::default();
        lagging.record(signals(2.0, 0.0, 0.1), 3);
        let s = lagging.latest().unwrap();
        assert_eq!(score(Some(&s), 3, 1, 1.0), 3.0);
        assert_eq!(score(Some(&s), 4, 1, 1.0), 4.0);
        load.record(signals(0.0, 0.0, 1.0), 0);
        let full = score(load.latest().as_deref(), 0, 1, 1.0);
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

    #[test]
    fn pace_factor_counts_only_a_real_difference_and_relaxes_with_age() {
        let fresh = Duration::ZERO;
        assert_eq!(pace_factor(None, Some(20.0)), 1.0, "no sample: as fast");
        assert_eq!(pace_factor(Some((20.0, fresh)), None), 1.0);
        assert_eq!(
            pace_factor(Some((28.0, fresh)), Some(20.0)),
            1.0,
            "within tolerance"
        );
        let slow = pace_factor(Some((300.0, fresh)), Some(20.0));
        assert!((slow - 10.0).abs() < 1e-9, "300 / (1.5 × 20): {slow}");
        // sub-floor paces are jitter: 3 ms vs 0.5 ms is not 6× slower
        assert_eq!(pace_factor(Some((3.0, fresh)), Some(0.5)), 1.0);
        // no sample for one decay period: a third of the way back, then more
        let aged = pace_factor(Some((300.0, PACE_DECAY)), Some(20.0));
        assert!(aged < slow && aged > 3.0, "{aged}");
        let old = pace_factor(Some((300.0, PACE_DECAY * 5)), Some(20.0));
        assert!(old < 1.1, "{old}");
    }

    #[test]
    fn a_slow_backend_costs_its_pace_per_request_including_the_new_one() {
        assert_eq!(score(None, 0, 1, 1.0), 0.0);
        assert_eq!(
            score(None, 0, 1, 10.0),
            9.0,
            "idle but 10× slower: 9 requests' worth"
        );
        assert_eq!(score(None, 2, 1, 10.0), 29.0);
        assert_eq!(score(None, 2, 2, 10.0), 14.5, "weight divides");
    }

    #[test]
    fn pace_average_follows_samples_and_weighs_a_late_one_more() {
        let pace = Pace::default();
        assert!(pace.estimate().is_none());
        pace.record(Duration::from_millis(100));
        let (ms, _) = pace.estimate().unwrap();
        assert!(
            (ms - 100.0).abs() < 1e-6,
            "the first sample is the average: {ms}"
        );
        for _ in 0..200 {
            pace.record(Duration::from_millis(10));
        }
        let (ms, age) = pace.estimate().unwrap();
        assert!(ms < 11.0, "many fast samples pull it down: {ms}");
        assert!(age < PACE_DECAY);
        // one slow sample right after moves it by PACE_ALPHA only
        pace.record(Duration::from_millis(210));
        let (ms, _) = pace.estimate().unwrap();
        assert!(ms > 15.0 && ms < 25.0, "{ms}");
    }
}

//! Per-model counters for the status pages (seed 000's `request_count`,
//! `total_requests`, `last_used_at`, `idle_seconds`): one entry per
//! configured model name and alias, fixed at start, updated with atomics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Default)]
pub struct ModelCounters {
    in_flight: AtomicU64,
    total: AtomicU64,
    /// Unix milliseconds of the last request; 0 = never.
    last_used_ms: AtomicU64,
}

/// A snapshot of one model's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelUse {
    pub in_flight: u64,
    pub total: u64,
    pub last_used: Option<SystemTime>,
}

pub struct ModelStats {
    models: HashMap<String, Arc<ModelCounters>>,
}

/// Held while a request for a model runs.
pub struct ModelGuard(Arc<ModelCounters>);

impl Drop for ModelGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

use crate::clock::now_ms;

impl ModelStats {
    pub fn new(names: impl IntoIterator<Item = String>) -> ModelStats {
        ModelStats {
            models: names
                .into_iter()
                .map(|n| (n, Arc::new(ModelCounters::default())))
                .collect(),
        }
    }

    /// The counters for a reloaded config's names: names it keeps keep their
    /// counts, new names start at zero.
    pub fn carry(&self, names: impl IntoIterator<Item = String>) -> ModelStats {
        ModelStats {
            models: names
                .into_iter()
                .map(|n| {
                    let counters = self.models.get(&n).cloned().unwrap_or_default();
                    (n, counters)
                })
                .collect(),
        }
    }

    /// Count a request for `model` (configured names only).
    pub fn begin(&self, model: &str) -> Option<ModelGuard> {
        let counters = self.models.get(model)?;
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        counters.total.fetch_add(1, Ordering::Relaxed);
        counters.last_used_ms.store(now_ms(), Ordering::Relaxed);
        Some(ModelGuard(counters.clone()))
    }

    pub fn get(&self, model: &str) -> ModelUse {
        match self.models.get(model) {
            Some(c) => {
                let ms = c.last_used_ms.load(Ordering::Relaxed);
                ModelUse {
                    in_flight: c.in_flight.load(Ordering::Relaxed),
                    total: c.total.load(Ordering::Relaxed),
                    last_used: (ms > 0).then(|| UNIX_EPOCH + std::time::Duration::from_millis(ms)),
                }
            }
            None => ModelUse {
                in_flight: 0,
                total: 0,
                last_used: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_in_flight_and_total() {
        let stats = ModelStats::new(["m".to_string()]);
        assert!(stats.begin("unknown").is_none());
        let a = stats.begin("m");
        let b = stats.begin("m");
        assert_eq!(stats.get("m").in_flight, 2);
        drop(a);
        drop(b);
        let used = stats.get("m");
        assert_eq!((used.in_flight, used.total), (0, 2));
        assert!(used.last_used.is_some());
        assert_eq!(stats.get("unknown").total, 0);
    }
}

//! Engine load signals: scrape each backend's Prometheus `/metrics` on the
//! pool's `engine_metrics.interval` and keep what it says (running, waiting,
//! KV-cache use, prefix-cache hit rate) on the backend's state.
//!
//! A failed scrape is not a health failure: the backend keeps serving, its
//! last signals age out, and the policies fall back to the gateway's own
//! in-flight count. Failures are counted (`/metrics`, `/services`).

use crate::routing::{signals, Pool};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// An engine's `/metrics` answer larger than this is refused (vLLM's is
/// ~100 KiB with every histogram).
const MAX_METRICS_BODY: usize = 8 * 1024 * 1024;

/// Scrape every backend of `pool` once, concurrently.
pub async fn scrape_pool(pool: &Arc<Pool>) {
    let config = &pool.config.engine_metrics;
    let mut tasks = tokio::task::JoinSet::new();
    for state in pool.backend_states() {
        let state = state.clone();
        let path = config.path.clone();
        let timeout = config.timeout;
        tasks.spawn(async move {
            let body = crate::fetch::get(state.address, &path, timeout, MAX_METRICS_BODY).await;
            let parsed = body.map_err(ScrapeError::from).and_then(|b| {
                let text = String::from_utf8_lossy(&b);
                Ok(signals::parse(&text)?)
            });
            (state, parsed)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let pump = pool.queue_len() > 0;
        let Ok((state, parsed)) = done else { continue };
        match parsed {
            Ok(found) => {
                let inflight = state.inflight.load(Ordering::Relaxed);
                if state.engine.record(found, inflight) {
                    log::info!(
                        "engine at {} restarted (its counters went back); forgetting its prefix-cache entries",
                        state.address
                    );
                    if let Some(index) = pool.prefix_index() {
                        index.forget_backend(state.position);
                    }
                }
            }
            Err(e) => {
                if state.engine.scrapes_failed.load(Ordering::Relaxed) == 0 {
                    log::warn!(
                        "engine metrics of {} in pool {}: {e} (load falls back to the gateway's own count)",
                        state.address,
                        pool.name()
                    );
                } else {
                    log::debug!("engine metrics of {}: {e}", state.address);
                }
                state.engine.record_failure(e.to_string());
            }
        }
        if pump {
            pool.pump(); // the engine may have room again
        }
    }
}

/// Why a scrape of an engine's `/metrics` gave no load signals.
#[derive(Debug, thiserror::Error)]
enum ScrapeError {
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error(transparent)]
    Parse(#[from] signals::NoLoadMetrics),
}

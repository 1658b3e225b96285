//! Background supervision of the pools: active health checks on each pool's
//! interval, engine load signals from backends' `/metrics` (pools with
//! `engine_metrics`), and model discovery from healthy backends' `/v1/models`.
//!
//! Runs as one Pingora background service; never on the request path (a
//! request reads the results, it never waits for a check or a fetch).

mod discovery;
mod scrape;

use crate::routing::Pool;
use crate::state::Live;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;
use tokio::task::JoinHandle;

pub struct Supervisor {
    pub live: Arc<Live>,
}

/// How often a pool with a queue looks for free slots besides the events
/// that free them.
const QUEUE_TICK: std::time::Duration = std::time::Duration::from_millis(50);

type PoolTasks = Vec<(Arc<Pool>, Vec<JoinHandle<()>>)>;

/// One health-check task (and one scrape task with `engine_metrics`) per
/// pool of the current generation; after a reload, pools that were kept
/// keep their tasks, new pools get theirs (the reload already ran their
/// first check), dropped pools' tasks stop.
fn reconcile_checks(live: &Live, tasks: &mut PoolTasks) {
    let app = live.current();
    let pools = app.router.pools();
    tasks.retain(|(pool, handles)| {
        let kept = pools.iter().any(|p| Arc::ptr_eq(p, pool));
        if !kept {
            handles.iter().for_each(JoinHandle::abort);
        }
        kept
    });
    for pool in pools {
        if tasks.iter().any(|(p, _)| Arc::ptr_eq(p, pool)) {
            continue;
        }
        let checked = pool.clone();
        let mut handles = vec![tokio::spawn(async move {
            let mut tick = tokio::time::interval(checked.config.health_check.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                checked.check_health().await;
            }
        })];
        if pool.config.engine_metrics.enabled {
            let scraped = pool.clone();
            handles.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(scraped.config.engine_metrics.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    scrape::scrape_pool(&scraped).await;
                }
            }));
        }
        if pool.queues() {
            // a slot can free without a request ending (an ejection ends, a
            // backend turns healthy, an engine's queue drains): look again
            let pumped = pool.clone();
            handles.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(QUEUE_TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    pumped.drain_rate();
                    pumped.sample_service_rate();
                    if pumped.queue_len() > 0 {
                        pumped.pump();
                    }
                }
            }));
        }
        tasks.push((pool.clone(), handles));
    }
}

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // every pool was warmed up before the listeners opened (server.rs)
        // or before its reload was published (state.rs)
        let mut checks = Vec::new();
        reconcile_checks(&self.live, &mut checks);
        let live = self.live.clone();
        let discovery = tokio::spawn(async move {
            loop {
                let app = live.current();
                discovery::refresh(&app).await;
                let interval = app.config.routing.models_refresh_interval;
                drop(app);
                tokio::time::sleep(interval).await;
            }
        });
        let mut reloaded = self.live.reloaded.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                changed = reloaded.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    reconcile_checks(&self.live, &mut checks);
                }
            }
        }
        let app = self.live.current();
        log::info!(
            "graceful shutdown: draining; open requests have until the end of the {} s grace period",
            app.config.server.grace_period.as_secs()
        );
        app.start_draining(std::time::Duration::ZERO);
        discovery.abort();
        for (_, handles) in checks {
            handles.iter().for_each(JoinHandle::abort);
        }
    }
}

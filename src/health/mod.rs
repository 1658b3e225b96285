//! Background supervision of the pools: active health checks on each pool's
//! interval, and model discovery from healthy backends' `/v1/models`.
//!
//! Runs as one Pingora background service; never on the request path (a
//! request reads the results, it never waits for a check or a fetch).

mod discovery;

use crate::state::AppState;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;

pub struct Supervisor {
    pub app: Arc<AppState>,
}

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tasks = Vec::new();
        for pool in self.app.router.pools() {
            if let Err(e) = pool.load_backends().await {
                log::error!("pool {}: loading backends failed: {e}", pool.name());
            }
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(pool.config.health_check.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    pool.check_health().await;
                }
            }));
        }
        let app = self.app.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(app.config.routing.models_refresh_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                discovery::refresh(&app).await;
            }
        }));
        let _ = shutdown.changed().await;
        log::info!(
            "graceful shutdown: draining; open requests have until the end of the {} s grace period",
            self.app.config.server.grace_period.as_secs()
        );
        let grace = self.app.config.server.grace_period;
        // leave time to write the error before Pingora stops the runtime
        let margin = std::time::Duration::from_secs(1).min(grace / 2);
        self.app.draining.send_replace(Some(
            tokio::time::Instant::now() + grace.saturating_sub(margin),
        ));
        for task in tasks {
            task.abort();
        }
    }
}

//! Everything a request needs, built once from a validated config.

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::engines::Engines;
use crate::gpu::GpuMonitor;
use crate::metrics::Metrics;
use crate::model_stats::ModelStats;
use crate::routing::Router;
use infergate_filters::auth::Auth;
use infergate_filters::limits::Limits;
use infergate_filters::Chain;
use pingora_core::connectors::http::v1::Connector;
use std::sync::Arc;

pub struct AppState {
    pub config: Config,
    pub router: Router,
    pub chain: Chain,
    /// The `auth` filter's keys and users, for login and `/admin/reload-keys`.
    pub auth: Option<Arc<Auth>>,
    /// The `limits` filter's state, for `/admin/usage`.
    pub limits: Option<Arc<Limits>>,
    /// Pooled HTTP/1.1 connections to engines (vLLM, SGLang, llama.cpp speak HTTP/1.1).
    pub connector: Connector,
    pub started_at: std::time::SystemTime,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub models: ModelStats,
    pub gpu: Arc<GpuMonitor>,
    /// Engine processes infergate manages (none without `engines:`).
    pub engines: Arc<Engines>,
    /// Set when a graceful shutdown starts (SIGTERM) to the moment open
    /// responses must end (just before `server.grace_period` runs out);
    /// readiness turns 503 at once.
    pub draining: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
}

impl AppState {
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let router = Router::new(&config).map_err(|e| format!("cannot build pools: {e}"))?;
        let built = infergate_filters::registry::build(&config.filters)?;
        for warning in &built.warnings {
            log::warn!("{warning}");
        }
        let chain = built.chain;
        let auth = built.auth;
        let limits = built.limits;
        let names: Vec<String> = config
            .pools
            .iter()
            .flat_map(|p| p.models.iter().chain(p.aliases.keys()).cloned())
            .chain(config.engines.models.iter().flat_map(|m| {
                std::iter::once(m.name.clone())
                    .chain(m.aliases.keys().cloned())
                    .chain(m.lora.iter().map(|(n, _)| n.clone()))
            }))
            .collect();
        let gpu = GpuMonitor::start();
        let engines = Arc::new(Engines::new(config.engines.clone(), gpu.clone()));
        let metrics = Metrics::new(names.iter().cloned().collect())
            .map_err(|e| format!("cannot set up metrics: {e}"))?;
        let access_log = AccessLog::start(config.access_log.clone())
            .map_err(|e| format!("cannot start the access log: {e}"))?;
        Ok(Arc::new(AppState {
            router,
            chain,
            auth,
            limits,
            connector: Connector::new(None),
            config,
            started_at: std::time::SystemTime::now(),
            metrics,
            access_log,
            models: ModelStats::new(names),
            engines,
            gpu,
            draining: tokio::sync::watch::Sender::new(None),
        }))
    }
}

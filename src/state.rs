//! Everything a request needs, built once from a validated config.

use crate::config::Config;
use crate::routing::Router;
use infergate_filters::Chain;
use pingora_core::connectors::http::v1::Connector;
use std::sync::Arc;

pub struct AppState {
    pub config: Config,
    pub router: Router,
    pub chain: Chain,
    /// Pooled HTTP/1.1 connections to engines (vLLM, SGLang, llama.cpp speak HTTP/1.1).
    pub connector: Connector,
    pub started_at: std::time::SystemTime,
}

impl AppState {
    pub fn new(config: Config) -> std::io::Result<Arc<Self>> {
        let router = Router::new(&config)?;
        let chain = Chain::from_config(&config.filters);
        Ok(Arc::new(AppState {
            router,
            chain,
            connector: Connector::new(None),
            config,
            started_at: std::time::SystemTime::now(),
        }))
    }
}

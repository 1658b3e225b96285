//! Raw config: the YAML shape exactly as ops teams write it.
//!
//! Every struct rejects unknown keys. Nothing here is validated beyond its
//! type: `validate.rs` turns these into runtime types and reports every
//! problem with its YAML path.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub threads: Option<usize>,
    pub work_stealing: Option<bool>,
    pub max_request_body_bytes: Option<u64>,
    pub grace_period: Option<String>,
    pub admin_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub ready_requires_backend: Option<bool>,
    pub watch_config: Option<bool>,
    pub upgrade_sock: Option<String>,
    pub client_header_timeout: Option<String>,
    pub client_body_timeout: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub max_buffered_body_bytes: Option<u64>,
    pub max_connections: Option<usize>,
    pub connection_reserve: Option<usize>,
    pub drain_delay: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<String>,
    pub first_byte: Option<String>,
    pub idle: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub keepalive_idle: Option<String>,
    pub max_connect_attempts: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub default_pool: Option<String>,
    pub models_refresh_interval: Option<String>,
    #[serde(default)]
    pub user_paths: Vec<String>,
    #[serde(default)]
    pub engine_admin_paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawBackend {
    Address(String),
    Detailed(RawBackendDetail),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendDetail {
    pub address: String,
    pub weight: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub unhealthy_after: Option<usize>,
    pub healthy_after: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    pub backends: Vec<RawBackend>,
    pub balance: Option<String>,
    pub hash_header: Option<String>,
    pub health_check: Option<RawHealthCheck>,
    pub discover_models: Option<bool>,
    pub owned_by: Option<String>,
    pub inject_stream_usage: Option<bool>,
    pub engine_metrics: Option<RawEngineMetrics>,
    pub prefix_aware: Option<RawPrefixAware>,
    pub max_inflight: Option<usize>,
    pub queue: Option<RawQueue>,
    pub retries: Option<usize>,
    pub retry_budget: Option<f64>,
    pub ejection: Option<RawEjection>,
    #[serde(default)]
    pub fallbacks: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_len: Option<usize>,
    pub max_wait: Option<String>,
    pub aging: Option<String>,
    pub max_engine_waiting: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEjection {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<u32>,
    pub base_time: Option<String>,
    pub max_time: Option<String>,
    pub max_ejected_percent: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngineMetrics {
    pub enabled: Option<bool>,
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrefixAware {
    pub index_bytes: Option<u64>,
    pub block_bytes: Option<usize>,
    pub load_threshold: Option<f64>,
    pub session: Option<String>,
    pub max_sessions: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    pub enabled: Option<bool>,
    pub format: Option<String>,
    pub output: Option<String>,
    pub path: Option<String>,
    pub max_size_bytes: Option<u64>,
    pub max_age: Option<String>,
    pub max_files: Option<usize>,
}

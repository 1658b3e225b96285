//! Config seam: YAML file → raw serde structs → validated runtime [`Config`].
//!
//! Owns parsing and validation and nothing else. Every problem is reported
//! with its YAML path (`pools[1].backends[0]`), all of them at once, so
//! `infergate --check` tells an operator everything to fix in one pass.
//! An invalid file never produces a `Config`.

pub(crate) mod duration;
pub mod engines;
mod load;
mod raw;
mod validate;

pub use load::{load_file, parse_str};

use infergate_filters::FilterConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// YAML path of the offending value, e.g. `pools[0].balance`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The validated configuration. Immutable once built.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where and how access lines are written.
    pub access_log: crate::access_log::AccessLogConfig,
    pub server: ServerConfig,
    pub timeouts: Timeouts,
    pub upstream: UpstreamConfig,
    pub routing: RoutingConfig,
    pub pools: Vec<PoolConfig>,
    pub filters: Vec<FilterConfig>,
    /// Engine processes infergate manages.
    pub engines: engines::EnginesConfig,
    /// model → the models to try, in order, when its pool has no healthy
    /// backend or its queue is full (top level and every pool's, merged).
    pub fallbacks: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port at start.
    pub listen: SocketAddr,
    pub threads: usize,
    /// Tokio work stealing between the proxy's worker threads (Pingora's
    /// default, on). Off: each connection stays on the thread it was given, as
    /// in nginx's workers (docs/performance.md: measured, not conclusive).
    pub work_stealing: bool,
    pub max_request_body_bytes: u64,
    pub grace_period: Duration,
    /// When set, `/admin/*` is served only on this address (e.g. loopback).
    pub admin_listen: Option<SocketAddr>,
    /// When set, `/metrics` is served only on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// `/health/ready` answers 503 while no backend takes traffic.
    pub ready_requires_backend: bool,
    /// Reload the config file by itself when its content changes (polled
    /// every second; follows symlinks, so ConfigMap `..data` swaps count).
    pub watch_config: bool,
    /// The Unix socket a zero-downtime upgrade (`--upgrade` + SIGQUIT) hands
    /// the listening sockets over on.
    pub upgrade_sock: String,
    /// The whole request head must arrive within this (408 otherwise), as
    /// nginx's `client_header_timeout`.
    pub client_header_timeout: Duration,
    /// The whole request body must arrive within this (408 otherwise).
    pub client_body_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub keepalive_timeout: Duration,
    /// Bytes of request bodies held in memory at once, all requests
    /// together (503 `server_overloaded` beyond).
    pub max_buffered_body_bytes: u64,
    /// Client connections open at once on `server.listen`; more are closed
    /// at accept. Derived from the fd limit when not set.
    pub max_connections: Option<usize>,
    /// File descriptors kept free of client connections for engines,
    /// health checks, logs and the side listeners.
    pub connection_reserve: usize,
    /// After SIGTERM, keep serving (readiness 503) this long before
    /// draining, so load balancers stop sending new connections first.
    pub drain_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub keepalive_idle: Duration,
    pub max_connect_attempts: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    pub default_pool: Option<String>,
    pub models_refresh_interval: Duration,
    /// Which forwarded paths users may reach (`routing.user_paths` added to
    /// the defaults) and which engine-internal paths admins may
    /// (`routing.engine_admin_paths`).
    pub paths: crate::path::PathPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastInflight,
    ConsistentHash,
    /// The backend with the lowest expected wait, from its engine's own
    /// queue, running requests and KV-cache use (docs/routing.md).
    LoadAware,
    /// The backend holding the longest prefix of the prompt in its KV cache
    /// (as far as the gateway's index knows), unless it is much busier.
    PrefixAware,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastInflight => "least_inflight",
            Balance::ConsistentHash => "consistent_hash",
            Balance::LoadAware => "load_aware",
            Balance::PrefixAware => "prefix_aware",
        }
    }

    /// Whether the policy reads engine load signals (and so turns
    /// `engine_metrics` on unless the pool says otherwise).
    pub fn wants_engine_metrics(self) -> bool {
        matches!(self, Balance::LoadAware | Balance::PrefixAware)
    }
}

/// Scraping each backend's Prometheus `/metrics` for its own load signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMetricsConfig {
    pub enabled: bool,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

/// Where a prefix-aware pool takes its session key from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKey {
    /// The pool's `hash_header`, when the request has it.
    Header,
    /// The authenticated principal (the key's user).
    User,
    None,
}

/// Backends a prefix-aware pool can tell apart (the prefix index keeps a
/// 64-bit mask of backends per entry); validation refuses more.
pub const PREFIX_MAX_BACKENDS: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixAwareConfig {
    /// Memory budget of the pool's prefix index (LRU beyond).
    pub index_bytes: u64,
    /// Bytes of prompt per hashed block.
    pub block_bytes: usize,
    /// The prefix's backend is skipped when its load exceeds the least
    /// loaded backend's by more than this (requests).
    pub load_threshold: f64,
    pub session: SessionKey,
    /// Sessions remembered (LRU beyond).
    pub max_sessions: usize,
}

// `f64` in these configs: configs compare for reload; NaN is refused by validation.
impl Eq for PrefixAwareConfig {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: usize,
    pub healthy_after: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub models: Vec<String>,
    /// public alias → served model name
    pub aliases: BTreeMap<String, String>,
    pub backends: Vec<BackendConfig>,
    pub balance: Balance,
    pub hash_header: String,
    pub health_check: HealthCheckConfig,
    pub discover_models: bool,
    pub owned_by: String,
    /// Ask streaming engines for usage (`stream_options.include_usage`) when
    /// the client did not, and hide that extra chunk from the client.
    pub inject_stream_usage: bool,
    pub engine_metrics: EngineMetricsConfig,
    pub prefix_aware: PrefixAwareConfig,
    /// Requests in flight per backend; more wait in the pool's queue.
    pub max_inflight: Option<usize>,
    pub queue: QueueConfig,
    /// Retries on another backend before the first byte reached the client.
    pub retries: usize,
    /// Retries allowed per request, averaged (0.2 = one retry per 5 requests).
    pub retry_budget: f64,
    pub ejection: EjectionConfig,
    /// This pool's `fallbacks` (also merged into [`Config::fallbacks`]).
    pub fallbacks: BTreeMap<String, Vec<String>>,
}

/// The pool's dispatch queue (docs/flow-control.md).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub max_len: usize,
    pub max_wait: Duration,
    /// A waiting request gains one priority level per `aging` waited.
    pub aging: Duration,
    /// A backend whose engine reports more waiting requests than this is
    /// saturated (needs engine_metrics).
    pub max_engine_waiting: Option<f64>,
}

impl Eq for QueueConfig {}
impl Eq for PoolConfig {}

/// Passive outlier detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EjectionConfig {
    pub enabled: bool,
    pub consecutive_failures: u32,
    pub base_time: Duration,
    pub max_time: Duration,
    pub max_ejected_percent: u32,
}

pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 32 * 1024 * 1024;

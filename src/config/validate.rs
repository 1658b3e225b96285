//! Raw config → validated [`Config`], collecting every error with its path.

use super::duration::parse_duration;
use super::raw::{
    RawAccessLog, RawBackend, RawEjection, RawEngineMetrics, RawHealthCheck, RawPool,
    RawPrefixAware, RawQueue, RawRouting, RawServer, RawTimeouts, RawUpstream,
};
use super::{
    BackendConfig, Balance, Config, ConfigError, EjectionConfig, EngineMetricsConfig,
    HealthCheckConfig, PoolConfig, PrefixAwareConfig, QueueConfig, RoutingConfig, ServerConfig,
    SessionKey, Timeouts, UpstreamConfig, DEFAULT_MAX_REQUEST_BODY_BYTES,
};
use crate::access_log::{AccessLogConfig, FileOutput, Format, Output, DEFAULT_MAX_AGE};
use infergate_filters::FilterConfig;
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Round robin keeps one slot per unit of weight and Ketama 160 points per
/// unit: large weights cost memory and can overflow, and ratios above this
/// are not meaningful for engines.
const MAX_WEIGHT: usize = 1000;

pub struct RawConfig {
    pub access_log: RawAccessLog,
    pub engines: crate::config::engines::RawEngines,
    pub server: RawServer,
    pub timeouts: RawTimeouts,
    pub upstream: RawUpstream,
    pub routing: RawRouting,
    pub pools: Vec<Option<RawPool>>,
    pub filters: Vec<Option<FilterConfig>>,
    pub fallbacks: BTreeMap<String, Vec<String>>,
}

struct Errors<'a>(&'a mut Vec<ConfigError>);

impl Errors<'_> {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, text: Option<&String>, default: Duration) -> Duration {
        match text {
            None => default,
            Some(t) => parse_duration(t).unwrap_or_else(|e| {
                self.push(path, e);
                default
            }),
        }
    }
}

pub fn validate(raw: RawConfig, errors: &mut Vec<ConfigError>) -> Config {
    let mut errs = Errors(errors);
    let server = validate_server(raw.server, &mut errs);
    let timeouts = Timeouts {
        connect: errs.duration("timeouts.connect", raw.timeouts.connect.as_ref(), secs(5)),
        first_byte: errs.duration(
            "timeouts.first_byte",
            raw.timeouts.first_byte.as_ref(),
            secs(300),
        ),
        idle: errs.duration("timeouts.idle", raw.timeouts.idle.as_ref(), secs(120)),
    };
    let upstream = validate_upstream(raw.upstream, &mut errs);
    let pools: Vec<PoolConfig> = raw
        .pools
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| validate_pool(i, p, &mut errs)))
        .collect();
    let engines = crate::config::engines::validate(raw.engines, &mut |path, message| {
        errs.push(path, message)
    });
    if pools.is_empty() && engines.models.is_empty() && errs.0.is_empty() {
        errs.push("pools", "at least one pool (or managed engine) is required");
    }
    for (i, model) in engines.models.iter().enumerate() {
        for name in std::iter::once(&model.name).chain(model.aliases.keys()) {
            if let Some(p) = pools
                .iter()
                .position(|p| p.models.contains(name) || p.aliases.contains_key(name))
            {
                errs.push(
                    format!("engines.models[{i}].name"),
                    format!("`{name}` is already served by pools[{p}]; a model name belongs to one place"),
                );
            }
        }
    }
    check_names(&pools, &mut errs);
    let routing = RoutingConfig {
        default_pool: raw.routing.default_pool.clone(),
        models_refresh_interval: errs.duration(
            "routing.models_refresh_interval",
            raw.routing.models_refresh_interval.as_ref(),
            secs(10),
        ),
        paths: crate::path::PathPolicy::new(
            &raw.routing.user_paths,
            &raw.routing.engine_admin_paths,
        ),
    };
    for (key, entries) in [
        ("routing.user_paths", &raw.routing.user_paths),
        (
            "routing.engine_admin_paths",
            &raw.routing.engine_admin_paths,
        ),
    ] {
        for (i, entry) in entries.iter().enumerate() {
            if let Err(e) = crate::path::check_policy_entry(entry) {
                errs.push(format!("{key}[{i}]"), e);
            }
        }
    }
    if let Some(name) = &routing.default_pool {
        if !pools.iter().any(|p| &p.name == name) {
            errs.push(
                "routing.default_pool",
                format!("no pool is named `{name}`; it must be one of the `pools[].name`"),
            );
        }
    }
    check_fallbacks("fallbacks", &raw.fallbacks, &mut errs);
    let mut fallbacks = raw.fallbacks;
    for (i, pool) in pools.iter().enumerate() {
        for (model, list) in &pool.fallbacks {
            if !pool.models.contains(model) && !pool.aliases.contains_key(model) {
                errs.push(
                    format!("pools[{i}].fallbacks.{model}"),
                    "is not one of this pool's models or aliases (put it under the top-level `fallbacks`)",
                );
            }
            if fallbacks.insert(model.clone(), list.clone()).is_some() {
                errs.push(
                    format!("pools[{i}].fallbacks.{model}"),
                    "is also in the top-level `fallbacks`; keep one",
                );
            }
        }
    }
    Config {
        access_log: validate_access_log(raw.access_log, &mut errs),
        server,
        timeouts,
        upstream,
        routing,
        pools,
        filters: validate_filters(raw.filters, &mut errs),
        engines,
        fallbacks,
    }
}

fn validate_access_log(raw: RawAccessLog, errs: &mut Errors) -> AccessLogConfig {
    let format = match raw.format.as_deref() {
        None | Some("json") => Format::Json,
        Some("text") => Format::Text,
        Some(other) => {
            errs.push(
                "access_log.format",
                format!("`{other}` is not a format; use json or text"),
            );
            Format::Json
        }
    };
    let file_keys = raw.path.is_some()
        || raw.max_size_bytes.is_some()
        || raw.max_age.is_some()
        || raw.max_files.is_some();
    let output = match (raw.output.as_deref(), raw.path) {
        (None | Some("stderr"), None) => Output::Stderr,
        (Some("stdout"), None) => Output::Stdout,
        (None | Some("file"), Some(path)) => {
            let mut file = FileOutput::new(path);
            if let Some(bytes) = raw.max_size_bytes {
                file.max_size_bytes = bytes;
            }
            if let Some(age) = &raw.max_age {
                file.max_age = match age.as_str() {
                    "0" | "never" => None,
                    _ => Some(errs.duration("access_log.max_age", Some(age), DEFAULT_MAX_AGE)),
                };
            }
            if let Some(n) = raw.max_files {
                file.max_files = n;
            }
            Output::File(file)
        }
        (Some("file"), None) => {
            errs.push("access_log.path", "output: file needs a path");
            Output::Stderr
        }
        (Some(other @ ("stderr" | "stdout")), Some(_)) => {
            errs.push(
                "access_log.path",
                format!("a path is only used with output: file (output is {other})"),
            );
            Output::Stderr
        }
        (Some(other), _) => {
            errs.push(
                "access_log.output",
                format!("`{other}` is not an output; use stderr, stdout or file"),
            );
            Output::Stderr
        }
    };
    if file_keys && !matches!(output, Output::File(_)) && raw.output.as_deref() != Some("file") {
        // path-less rotation keys: reported once, as above or here
        if raw.max_size_bytes.is_some() || raw.max_age.is_some() || raw.max_files.is_some() {
            errs.push(
                "access_log",
                "max_size_bytes, max_age and max_files apply to output: file only",
            );
        }
    }
    AccessLogConfig {
        enabled: raw.enabled.unwrap_or(true),
        format,
        output,
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// 512 MiB of request bodies in memory at once (16 bodies of the largest
/// default size, or tens of thousands of ordinary chat requests).
const DEFAULT_MAX_BUFFERED_BODY_BYTES: u64 = 512 << 20;

fn validate_server(raw: RawServer, errs: &mut Errors) -> ServerConfig {
    let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let listen = resolve(&listen_text).unwrap_or_else(|e| {
        errs.push("server.listen", e);
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let threads = raw.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        errs.push("server.threads", "must be at least 1");
    }
    let max_body = raw
        .max_request_body_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES);
    if max_body == 0 {
        errs.push("server.max_request_body_bytes", "must be at least 1");
    }
    let server = ServerConfig {
        listen,
        threads: threads.max(1),
        work_stealing: raw.work_stealing.unwrap_or(true),
        max_request_body_bytes: max_body,
        grace_period: errs.duration("server.grace_period", raw.grace_period.as_ref(), secs(30)),
        admin_listen: raw.admin_listen.and_then(|text| {
            resolve(&text)
                .map_err(|e| errs.push("server.admin_listen", e))
                .ok()
        }),
        ready_requires_backend: raw.ready_requires_backend.unwrap_or(true),
        watch_config: raw.watch_config.unwrap_or(false),
        upgrade_sock: raw
            .upgrade_sock
            .unwrap_or_else(|| "/tmp/infergate-upgrade.sock".to_string()),
        metrics_listen: raw.metrics_listen.and_then(|text| {
            resolve(&text)
                .map_err(|e| errs.push("server.metrics_listen", e))
                .ok()
        }),
        client_header_timeout: errs.duration(
            "server.client_header_timeout",
            raw.client_header_timeout.as_ref(),
            secs(60),
        ),
        client_body_timeout: errs.duration(
            "server.client_body_timeout",
            raw.client_body_timeout.as_ref(),
            secs(60),
        ),
        keepalive_timeout: errs.duration(
            "server.keepalive_timeout",
            raw.keepalive_timeout.as_ref(),
            secs(60),
        ),
        max_buffered_body_bytes: raw
            .max_buffered_body_bytes
            .unwrap_or(DEFAULT_MAX_BUFFERED_BODY_BYTES),
        max_connections: raw.max_connections,
        connection_reserve: raw.connection_reserve.unwrap_or(512),
        drain_delay: errs.duration("server.drain_delay", raw.drain_delay.as_ref(), secs(0)),
    };
    for (key, value) in [
        ("server.client_header_timeout", server.client_header_timeout),
        ("server.client_body_timeout", server.client_body_timeout),
        ("server.keepalive_timeout", server.keepalive_timeout),
    ] {
        if value < Duration::from_secs(1) {
            errs.push(key, "must be at least 1s");
        }
    }
    if server.max_buffered_body_bytes < server.max_request_body_bytes {
        errs.push(
            "server.max_buffered_body_bytes",
            format!(
                "must be at least server.max_request_body_bytes ({}), or no body of the largest allowed size could ever be read",
                server.max_request_body_bytes
            ),
        );
    }
    if server.max_connections == Some(0) {
        errs.push("server.max_connections", "must be at least 1");
    }
    for (key, side) in [
        ("server.admin_listen", server.admin_listen),
        ("server.metrics_listen", server.metrics_listen),
    ] {
        if let Some(side) = side {
            if side.port() != 0 && side.port() == listen.port() {
                errs.push(
                    key,
                    format!(
                        "uses the same port as server.listen ({}); give it its own port",
                        listen.port()
                    ),
                );
            }
        }
    }
    server
}

fn validate_upstream(raw: RawUpstream, errs: &mut Errors) -> UpstreamConfig {
    let attempts = raw.max_connect_attempts.unwrap_or(3);
    if attempts == 0 {
        errs.push("upstream.max_connect_attempts", "must be at least 1");
    }
    UpstreamConfig {
        keepalive_idle: errs.duration(
            "upstream.keepalive_idle",
            raw.keepalive_idle.as_ref(),
            secs(4),
        ),
        max_connect_attempts: attempts.max(1),
    }
}

fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("`{text}` is not a `host:port` address that resolves"))
}

fn validate_pool(i: usize, raw: RawPool, errs: &mut Errors) -> PoolConfig {
    let at = format!("pools[{i}]");
    if raw.name.trim().is_empty() {
        errs.push(format!("{at}.name"), "must not be empty");
    }
    for (j, m) in raw.models.iter().enumerate() {
        if m.trim().is_empty() {
            errs.push(format!("{at}.models[{j}]"), "model names must not be empty");
        }
    }
    for (alias, target) in &raw.aliases {
        if !raw.models.contains(target) {
            errs.push(
                format!("{at}.aliases.{alias}"),
                format!("points to `{target}`, which is not in this pool's `models`"),
            );
        }
    }
    let backends = validate_backends(&at, raw.backends, errs);
    let balance = match raw.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_inflight") => Balance::LeastInflight,
        Some("consistent_hash") => Balance::ConsistentHash,
        Some("load_aware") => Balance::LoadAware,
        Some("prefix_aware") => Balance::PrefixAware,
        Some(other) => {
            errs.push(
                format!("{at}.balance"),
                format!("`{other}` is not one of: round_robin, least_inflight, consistent_hash, load_aware, prefix_aware"),
            );
            Balance::RoundRobin
        }
    };
    let hash_header = raw
        .hash_header
        .unwrap_or_else(|| "x-session-id".to_string())
        .to_ascii_lowercase();
    if http::HeaderName::from_bytes(hash_header.as_bytes()).is_err() {
        errs.push(format!("{at}.hash_header"), "is not a valid header name");
    }
    if raw.prefix_aware.is_some() && balance != Balance::PrefixAware {
        errs.push(
            format!("{at}.prefix_aware"),
            "is only read with `balance: prefix_aware`",
        );
    }
    let engine_metrics =
        validate_engine_metrics(&at, balance, raw.engine_metrics.unwrap_or_default(), errs);
    let prefix_aware = validate_prefix_aware(&at, raw.prefix_aware.unwrap_or_default(), errs);
    if balance == Balance::PrefixAware && backends.len() > super::PREFIX_MAX_BACKENDS {
        errs.push(
            format!("{at}.backends"),
            format!(
                "`balance: prefix_aware` supports at most {} backends per pool",
                super::PREFIX_MAX_BACKENDS
            ),
        );
    }
    if raw.max_inflight == Some(0) {
        errs.push(format!("{at}.max_inflight"), "must be at least 1");
    }
    let queue = validate_queue(&at, raw.queue, errs);
    if queue.max_engine_waiting.is_some() && !engine_metrics.enabled {
        errs.push(
            format!("{at}.queue.max_engine_waiting"),
            "needs engine_metrics (set `engine_metrics: { enabled: true }` or an engine-aware balance)",
        );
    }
    let retry_budget = raw.retry_budget.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&retry_budget) {
        errs.push(
            format!("{at}.retry_budget"),
            "must be a fraction between 0 and 1 (0.2: one retry per five requests)",
        );
    }
    if raw.retries.is_some_and(|r| r > 5) {
        errs.push(format!("{at}.retries"), "must be at most 5");
    }
    check_fallbacks(&format!("{at}.fallbacks"), &raw.fallbacks, errs);
    PoolConfig {
        max_inflight: raw.max_inflight.map(|n| n.max(1)),
        queue,
        retries: raw.retries.unwrap_or(1).min(5),
        retry_budget: retry_budget.clamp(0.0, 1.0),
        ejection: validate_ejection(&at, raw.ejection.unwrap_or_default(), errs),
        fallbacks: raw.fallbacks,
        engine_metrics,
        prefix_aware,
        health_check: validate_health(&at, raw.health_check.unwrap_or_default(), errs),
        name: raw.name,
        models: raw.models,
        aliases: raw.aliases,
        backends,
        balance,
        hash_header,
        discover_models: raw.discover_models.unwrap_or(true),
        owned_by: raw.owned_by.unwrap_or_else(|| "infergate".to_string()),
        inject_stream_usage: raw.inject_stream_usage.unwrap_or(true),
    }
}

fn validate_backends(at: &str, raw: Vec<RawBackend>, errs: &mut Errors) -> Vec<BackendConfig> {
    if raw.is_empty() {
        errs.push(format!("{at}.backends"), "at least one backend is required");
    }
    let mut out: Vec<BackendConfig> = Vec::new();
    for (j, b) in raw.into_iter().enumerate() {
        let (address, weight) = match b {
            RawBackend::Address(a) => (a, 1),
            RawBackend::Detailed(d) => (d.address, d.weight.unwrap_or(1)),
        };
        let path = format!("{at}.backends[{j}]");
        if !(1..=MAX_WEIGHT).contains(&weight) {
            errs.push(
                format!("{path}.weight"),
                format!("must be between 1 and {MAX_WEIGHT}"),
            );
        }
        match resolve(&address) {
            Ok(addr) if out.iter().any(|b| b.address == addr) => {
                errs.push(path, format!("`{address}` is listed twice in this pool"))
            }
            Ok(addr) => out.push(BackendConfig {
                address: addr,
                weight: weight.clamp(1, MAX_WEIGHT),
            }),
            Err(e) => errs.push(path, e),
        }
    }
    out
}

fn validate_health(at: &str, raw: RawHealthCheck, errs: &mut Errors) -> HealthCheckConfig {
    let at = format!("{at}.health_check");
    let path = raw.path.unwrap_or_else(|| "/health".to_string());
    if !path.starts_with('/') {
        errs.push(format!("{at}.path"), "must start with `/`");
    } else if path.parse::<http::uri::PathAndQuery>().is_err() {
        errs.push(
            format!("{at}.path"),
            "is not a valid URL path (spaces and non-ASCII must be %-encoded)",
        );
    }
    let unhealthy_after = raw.unhealthy_after.unwrap_or(2);
    let healthy_after = raw.healthy_after.unwrap_or(1);
    if unhealthy_after == 0 {
        errs.push(format!("{at}.unhealthy_after"), "must be at least 1");
    }
    if healthy_after == 0 {
        errs.push(format!("{at}.healthy_after"), "must be at least 1");
    }
    HealthCheckConfig {
        path,
        interval: errs.duration(&format!("{at}.interval"), raw.interval.as_ref(), secs(2)),
        timeout: errs.duration(&format!("{at}.timeout"), raw.timeout.as_ref(), secs(1)),
        unhealthy_after: unhealthy_after.max(1),
        healthy_after: healthy_after.max(1),
    }
}

fn validate_queue(at: &str, raw: Option<RawQueue>, errs: &mut Errors) -> QueueConfig {
    let at = format!("{at}.queue");
    let raw = raw.unwrap_or_default();
    let max_len = raw.max_len.unwrap_or(1000);
    let max_wait = errs.duration(&format!("{at}.max_wait"), raw.max_wait.as_ref(), secs(10));
    if max_wait.is_zero() {
        errs.push(format!("{at}.max_wait"), "must be more than 0");
    }
    let aging = errs.duration(&format!("{at}.aging"), raw.aging.as_ref(), secs(2));
    if aging.is_zero() {
        errs.push(format!("{at}.aging"), "must be more than 0");
    }
    if let Some(w) = raw.max_engine_waiting {
        if !w.is_finite() || w < 0.0 {
            errs.push(format!("{at}.max_engine_waiting"), "must be a number ≥ 0");
        }
    }
    QueueConfig {
        max_len,
        max_wait: max_wait.max(Duration::from_millis(1)),
        aging: aging.max(Duration::from_millis(1)),
        max_engine_waiting: raw
            .max_engine_waiting
            .filter(|w| w.is_finite() && *w >= 0.0),
    }
}

fn validate_ejection(at: &str, raw: RawEjection, errs: &mut Errors) -> EjectionConfig {
    let at = format!("{at}.ejection");
    let consecutive_failures = raw.consecutive_failures.unwrap_or(5);
    if consecutive_failures == 0 {
        errs.push(format!("{at}.consecutive_failures"), "must be at least 1");
    }
    let base_time = errs.duration(&format!("{at}.base_time"), raw.base_time.as_ref(), secs(10));
    let max_time = errs.duration(&format!("{at}.max_time"), raw.max_time.as_ref(), secs(300));
    if base_time.is_zero() || max_time < base_time {
        errs.push(
            format!("{at}.max_time"),
            "base_time must be more than 0 and max_time at least base_time",
        );
    }
    let max_ejected_percent = raw.max_ejected_percent.unwrap_or(50);
    if max_ejected_percent > 100 {
        errs.push(format!("{at}.max_ejected_percent"), "must be 0-100");
    }
    EjectionConfig {
        enabled: raw.enabled.unwrap_or(true),
        consecutive_failures: consecutive_failures.max(1),
        base_time: base_time.max(Duration::from_millis(1)),
        max_time: max_time.max(base_time),
        max_ejected_percent: max_ejected_percent.min(100),
    }
}

/// `fallbacks`: model → models to try, none empty, none itself.
fn check_fallbacks(at: &str, fallbacks: &BTreeMap<String, Vec<String>>, errs: &mut Errors) {
    for (model, list) in fallbacks {
        if model.trim().is_empty() {
            errs.push(at, "model names must not be empty");
        }
        if list.is_empty() {
            errs.push(
                format!("{at}.{model}"),
                "list at least one model to fall back to",
            );
        }
        for (i, target) in list.iter().enumerate() {
            if target.trim().is_empty() || target == model {
                errs.push(format!("{at}.{model}[{i}]"), "must name another model");
            }
        }
    }
}

fn validate_engine_metrics(
    at: &str,
    balance: Balance,
    raw: RawEngineMetrics,
    errs: &mut Errors,
) -> EngineMetricsConfig {
    let at = format!("{at}.engine_metrics");
    let path = raw.path.unwrap_or_else(|| "/metrics".to_string());
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        errs.push(
            format!("{at}.path"),
            "must be a URL path starting with `/` (spaces and non-ASCII %-encoded)",
        );
    }
    let interval = errs.duration(
        &format!("{at}.interval"),
        raw.interval.as_ref(),
        Duration::from_millis(250),
    );
    if interval < Duration::from_millis(10) {
        errs.push(format!("{at}.interval"), "must be at least 10ms");
    }
    let timeout = errs.duration(
        &format!("{at}.timeout"),
        raw.timeout.as_ref(),
        interval.clamp(Duration::from_millis(10), secs(1)),
    );
    if timeout.is_zero() {
        errs.push(format!("{at}.timeout"), "must be more than 0");
    }
    EngineMetricsConfig {
        enabled: raw.enabled.unwrap_or(balance.wants_engine_metrics()),
        path,
        interval: interval.max(Duration::from_millis(10)),
        timeout: timeout.max(Duration::from_millis(1)),
    }
}

fn validate_prefix_aware(at: &str, raw: RawPrefixAware, errs: &mut Errors) -> PrefixAwareConfig {
    let at = format!("{at}.prefix_aware");
    let index_bytes = raw.index_bytes.unwrap_or(64 * 1024 * 1024);
    if index_bytes < 64 * 1024 {
        errs.push(
            format!("{at}.index_bytes"),
            "must be at least 65536 (64 KiB)",
        );
    }
    let block_bytes = raw.block_bytes.unwrap_or(128);
    if !(16..=65536).contains(&block_bytes) {
        errs.push(format!("{at}.block_bytes"), "must be between 16 and 65536");
    }
    let load_threshold = raw.load_threshold.unwrap_or(4.0);
    if !load_threshold.is_finite() || load_threshold < 0.0 {
        errs.push(
            format!("{at}.load_threshold"),
            "must be a number ≥ 0 (requests)",
        );
    }
    let session = match raw.session.as_deref() {
        None | Some("header") => SessionKey::Header,
        Some("user") => SessionKey::User,
        Some("none") => SessionKey::None,
        Some(other) => {
            errs.push(
                format!("{at}.session"),
                format!("`{other}` is not one of: header, user, none"),
            );
            SessionKey::Header
        }
    };
    let max_sessions = raw.max_sessions.unwrap_or(100_000);
    if max_sessions == 0 {
        errs.push(format!("{at}.max_sessions"), "must be at least 1");
    }
    PrefixAwareConfig {
        index_bytes: index_bytes.max(64 * 1024),
        block_bytes: block_bytes.clamp(16, 65536),
        load_threshold: if load_threshold.is_finite() {
            load_threshold.max(0.0)
        } else {
            4.0
        },
        session,
        max_sessions: max_sessions.max(1),
    }
}

/// Pool names are unique; a public model name (served or alias) belongs to one pool.
fn check_names(pools: &[PoolConfig], errs: &mut Errors) {
    let mut pool_names: HashMap<&str, usize> = HashMap::new();
    let mut owners: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    for (i, pool) in pools.iter().enumerate() {
        if let Some(first) = pool_names.insert(&pool.name, i) {
            errs.push(
                format!("pools[{i}].name"),
                format!("`{}` is already the name of pools[{first}]", pool.name),
            );
        }
        let names = pool
            .models
            .iter()
            .map(|m| (m.as_str(), "models"))
            .chain(pool.aliases.keys().map(|a| (a.as_str(), "aliases")));
        for (name, kind) in names {
            match owners.get(name) {
                Some((j, _)) if *j == i => errs.push(
                    format!("pools[{i}].{kind}"),
                    format!("`{name}` is listed twice in this pool"),
                ),
                Some((j, _)) => errs.push(
                    format!("pools[{i}].{kind}"),
                    format!("`{name}` is already served by pools[{j}]; a model name belongs to one pool"),
                ),
                None => {
                    owners.insert(name, (i, kind));
                }
            }
        }
    }
}

fn validate_filters(raw: Vec<Option<FilterConfig>>, errs: &mut Errors) -> Vec<FilterConfig> {
    let mut out: Vec<FilterConfig> = Vec::new();
    for (i, filter) in raw.into_iter().enumerate() {
        let Some(filter) = filter else { continue };
        if let Err((key, message)) = filter.validate() {
            errs.push(format!("filters[{i}].{key}"), message);
        }
        if out.iter().any(|f| f.name() == filter.name()) {
            errs.push(
                format!("filters[{i}]"),
                format!("`{}` is listed twice; each filter runs once", filter.name()),
            );
        }
        // A preflight carries no credentials: CORS must answer it before auth asks for one.
        if filter.name() == "cors" && out.iter().any(|f| f.name() == "auth") {
            errs.push(
                format!("filters[{i}]"),
                "`cors` must come before `auth`, or browsers' preflight requests get 401"
                    .to_string(),
            );
        }
        out.push(filter);
    }
    out
}

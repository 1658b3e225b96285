//! Prometheus metrics: the seeds' names, so existing dashboards keep working,
//! and infergate's own catalogue in base units (`docs/observability.md`).
//!
//! Label values come from closed sets only: endpoint labels from the
//! endpoint table, methods from a fixed list, models from the configured
//! names (anything else is `other`), users from the keys/users files,
//! backends and pools from the config. No key, path or other raw client
//! string ever becomes a label.
//!
//! Request-path metrics are updated once per request in the `logging` hook
//! (plus one histogram observation per streamed chunk); backend and model
//! state is read from the router when Prometheus scrapes.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// Latency buckets (seconds) for whole requests and upstream answers: 1 ms
/// to 5 minutes (the default first-byte timeout).
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Time to first token: 1 ms to 2 minutes.
/// Matched prompt bytes: none, part of a block, up to a long agent history.
const PREFIX_BUCKETS: &[f64] = &[
    0.0, 128.0, 512.0, 2048.0, 8192.0, 32768.0, 131072.0, 524288.0,
];
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Gap between streamed chunks: 100 µs to 10 s.
const CHUNK_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// What the exposition reads at scrape time, handed in by the owner of
/// the state (`AppState::metrics_text`) so this module does not depend on it.
#[derive(Clone, Copy)]
pub struct LiveState<'a> {
    pub store: Option<&'a infergate_filters::limits::RedisStore>,
    pub gpus: &'a crate::gpu::GpuSnapshot,
    pub router: &'a crate::routing::Router,
    pub engines: &'a crate::engines::Engines,
}

pub struct Metrics {
    registry: Registry,
    /// Seed: `http_requests_total{method,endpoint,status}`.
    pub http_requests: IntCounterVec,
    /// Seed: `http_request_duration_seconds{method,endpoint}`.
    pub http_duration: HistogramVec,
    /// Seed: `http_active_requests`.
    pub http_active: IntGauge,
    /// Seed: `http_errors_total{type}`.
    pub http_errors: IntCounterVec,
    /// Client connections open on `server.listen`.
    pub connections_open: IntGauge,
    /// Client connections closed at accept because `server.max_connections`
    /// were open.
    pub connections_rejected: IntCounter,
    /// Bytes of request bodies held in memory now.
    pub buffered_body_bytes: IntGauge,
    /// Seed: `token_usage_total{user,type}`.
    pub token_usage: IntCounterVec,
    /// Seed: `vllm_gpu_memory_total_mb{gpu_id}` / `vllm_gpu_memory_used_mb{gpu_id}`.
    gpu_total_mb: GaugeVec,
    gpu_used_mb: GaugeVec,
    /// Seed: `vllm_model_loaded{model_id}`.
    model_loaded: IntGaugeVec,
    pub model_requests: IntCounterVec,
    pub model_tokens: IntCounterVec,
    pub upstream_response: HistogramVec,
    pub ttft: HistogramVec,
    pub inter_chunk: HistogramVec,
    pub rate_limited: IntCounterVec,
    pub config_reloads: IntCounterVec,
    backend_requests: IntCounterVec,
    backend_errors: IntCounterVec,
    backend_in_flight: IntGaugeVec,
    backend_healthy: IntGaugeVec,
    backend_response_time: GaugeVec,
    engine_running: GaugeVec,
    engine_waiting: GaugeVec,
    engine_kv_usage: GaugeVec,
    engine_hit_rate: GaugeVec,
    engine_load: GaugeVec,
    engine_scrape_age: GaugeVec,
    engine_scrapes: IntCounterVec,
    routing_decisions: IntCounterVec,
    prefix_match_bytes: HistogramVec,
    prefix_index_bytes: IntGaugeVec,
    store_up: IntGaugeVec,
    store_errors: IntCounterVec,
    store_fallbacks: IntCounterVec,
    store_pending: IntGaugeVec,
    store_leases: IntGaugeVec,
    prefix_index_budget: IntGaugeVec,
    prefix_index_entries: IntGaugeVec,
    prefix_index_evictions: IntCounterVec,
    pub queue_wait: HistogramVec,
    queue_length: IntGaugeVec,
    queue_outcomes: IntCounterVec,
    retries: IntCounterVec,
    retries_denied: IntCounterVec,
    backend_ejected: IntGaugeVec,
    backend_ejections: IntCounterVec,
    fallbacks: IntCounterVec,
    /// Model names that may appear as label values: every name any config
    /// (start or reload) declared; only grows, so series never go stale.
    models: arc_swap::ArcSwap<HashSet<String>>,
    /// The backend (pool, address) and `vllm_model_loaded` label values the
    /// last refresh wrote: those a reload removed are dropped from the
    /// exposition instead of showing their last value forever.
    exported: std::sync::Mutex<Exported>,
}

#[derive(Default)]
struct Exported {
    backends: HashSet<(String, String)>,
    loaded: HashSet<String>,
    /// Pools with a prefix index.
    indexed: HashSet<String>,
}

/// Methods that get their own label value; anything else is `other`.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "HEAD" => "HEAD",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        _ => "other",
    }
}

fn status_label(status: u16) -> &'static str {
    // a closed set without allocating: the codes a gateway answers
    match status {
        0 => "0",
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        409 => "409",
        413 => "413",
        422 => "422",
        429 => "429",
        500 => "500",
        501 => "501",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 200 => "1xx",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

macro_rules! register {
    ($registry:expr, $metric:expr) => {{
        let metric = $metric.map_err(|e| e.to_string())?;
        $registry
            .register(Box::new(metric.clone()))
            .map_err(|e| e.to_string())?;
        metric
    }};
}

impl Metrics {
    pub fn new(models: HashSet<String>) -> Result<Metrics, String> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .map_err(|e| e.to_string())?;
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help).buckets(buckets.to_vec())
        };
        let metrics = Metrics {
            http_requests: register!(registry, IntCounterVec::new(
                Opts::new("http_requests_total", "Requests answered, by method, endpoint and status code."),
                &["method", "endpoint", "status"])),
            http_duration: register!(registry, HistogramVec::new(
                hist("http_request_duration_seconds", "Time from request arrival to the end of the response, by method and endpoint.", REQUEST_BUCKETS),
                &["method", "endpoint"])),
            http_active: register!(registry, IntGauge::new(
                "http_active_requests", "Requests being handled now.")),
            connections_open: register!(registry, IntGauge::new(
                "infergate_connections_open", "Client connections open on server.listen (side listeners not counted).")),
            connections_rejected: register!(registry, IntCounter::new(
                "infergate_connections_rejected_total", "Client connections closed at accept because server.max_connections were open.")),
            buffered_body_bytes: register!(registry, IntGauge::new(
                "infergate_buffered_body_bytes", "Bytes of request bodies the gateway holds in memory now (server.max_buffered_body_bytes bounds it).")),
            http_errors: register!(registry, IntCounterVec::new(
                Opts::new("http_errors_total", "Requests that ended in an error, by error code (the OpenAI error `code`, or `upstream_<status>` for an engine's error)."),
                &["type"])),
            token_usage: register!(registry, IntCounterVec::new(
                Opts::new("token_usage_total", "Tokens used, by user (from the keys/users files; `anonymous` without auth) and type (prompt, completion)."),
                &["user", "type"])),
            gpu_total_mb: register!(registry, GaugeVec::new(
                Opts::new("vllm_gpu_memory_total_mb", "GPU memory in MB, per GPU (absent without a GPU)."),
                &["gpu_id"])),
            gpu_used_mb: register!(registry, GaugeVec::new(
                Opts::new("vllm_gpu_memory_used_mb", "GPU memory used in MB, per GPU (absent without a GPU)."),
                &["gpu_id"])),
            model_loaded: register!(registry, IntGaugeVec::new(
                Opts::new("vllm_model_loaded", "1 when a configured model has a healthy backend, else 0."),
                &["model_id"])),
            model_requests: register!(registry, IntCounterVec::new(
                Opts::new("infergate_model_requests_total", "Proxied requests by model (configured names; others are `other`) and status code."),
                &["model", "status"])),
            model_tokens: register!(registry, IntCounterVec::new(
                Opts::new("infergate_model_tokens_total", "Tokens by model and type (prompt, completion), as reported by the engine or estimated."),
                &["model", "type"])),
            upstream_response: register!(registry, HistogramVec::new(
                hist("infergate_upstream_response_seconds", "Time from sending a request to an engine to its response header, by pool.", REQUEST_BUCKETS),
                &["pool"])),
            ttft: register!(registry, HistogramVec::new(
                hist("infergate_time_to_first_token_seconds", "Streams: time from request arrival to the first chunk of the engine's response body, as the gateway saw it, by model.", TTFT_BUCKETS),
                &["model"])),
            inter_chunk: register!(registry, HistogramVec::new(
                hist("infergate_inter_chunk_seconds", "Streams: time between consecutive chunks of the engine's response body, by model.", CHUNK_BUCKETS),
                &["model"])),
            rate_limited: register!(registry, IntCounterVec::new(
                Opts::new("infergate_rate_limited_total", "Requests refused by a limit, by reason (requests_per_second, concurrency, tokens_per_minute, request_too_large, quota, login)."),
                &["reason"])),
            config_reloads: register!(registry, IntCounterVec::new(
                Opts::new("infergate_config_reloads_total", "Reloads by kind (keys: the keys/users files) and result (success, failure)."),
                &["kind", "result"])),
            backend_requests: register!(registry, IntCounterVec::new(
                Opts::new("infergate_backend_requests_total", "Requests sent to a backend (connect attempts included)."),
                &["pool", "backend"])),
            backend_errors: register!(registry, IntCounterVec::new(
                Opts::new("infergate_backend_errors_total", "Failed connects, broken exchanges and 5xx answers of a backend."),
                &["pool", "backend"])),
            backend_in_flight: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_backend_in_flight", "Requests a backend is working on now."),
                &["pool", "backend"])),
            backend_healthy: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_backend_healthy", "1 when a backend takes traffic (passed its health checks), else 0."),
                &["pool", "backend"])),
            backend_response_time: register!(registry, GaugeVec::new(
                Opts::new("infergate_backend_response_time_seconds", "Moving average (weight 1/10) of request durations on a backend."),
                &["pool", "backend"])),
            engine_running: register!(registry, GaugeVec::new(
                Opts::new("infergate_engine_requests_running", "Requests the backend's engine reports running (last scrape of its /metrics; pools with engine_metrics)."),
                &["pool", "backend"])),
            engine_waiting: register!(registry, GaugeVec::new(
                Opts::new("infergate_engine_requests_waiting", "Requests waiting in the backend's engine's own queue (last scrape)."),
                &["pool", "backend"])),
            engine_kv_usage: register!(registry, GaugeVec::new(
                Opts::new("infergate_engine_kv_cache_usage_ratio", "KV-cache use the backend's engine reports, 0 to 1 (last scrape)."),
                &["pool", "backend"])),
            engine_hit_rate: register!(registry, GaugeVec::new(
                Opts::new("infergate_engine_prefix_cache_hit_ratio", "Prefix-cache hit rate the backend's engine reports, 0 to 1 (its gauge, or hits/queries between the last two scrapes)."),
                &["pool", "backend"])),
            engine_load: register!(registry, GaugeVec::new(
                Opts::new("infergate_backend_load", "The expected-wait score load_aware and prefix_aware compare (requests per unit of weight; docs/routing.md)."),
                &["pool", "backend"])),
            engine_scrape_age: register!(registry, GaugeVec::new(
                Opts::new("infergate_engine_metrics_age_seconds", "Age of the last successful scrape of the backend's engine metrics."),
                &["pool", "backend"])),
            engine_scrapes: register!(registry, IntCounterVec::new(
                Opts::new("infergate_engine_metrics_scrapes_total", "Scrapes of backends' engine metrics, by result (ok, error)."),
                &["pool", "backend", "result"])),
            routing_decisions: register!(registry, IntCounterVec::new(
                Opts::new("infergate_routing_decisions_total", "prefix_aware choices: prefix_hit, session, load_fallback (a known backend was too busy), no_match."),
                &["pool", "decision"])),
            prefix_match_bytes: register!(registry, HistogramVec::new(
                hist("infergate_routing_prefix_match_bytes", "Prompt bytes the chosen backend was believed to hold already (prefix_aware; 0 when none).", PREFIX_BUCKETS),
                &["pool"])),
            store_up: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_limits_store_up", "1 while the shared limits store (limits.store: redis) answers, 0 while it is down and on_error applies."),
                &["kind"])),
            store_errors: register!(registry, IntCounterVec::new(
                Opts::new("infergate_limits_store_errors_total", "Calls to the shared limits store that failed or timed out."),
                &["kind"])),
            store_fallbacks: register!(registry, IntCounterVec::new(
                Opts::new("infergate_limits_store_fallbacks_total", "Requests admitted on this replica's own counters because the shared store was down (on_error: fail_open)."),
                &["kind"])),
            store_pending: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_limits_store_pending_tokens", "Quota tokens counted while the shared store was down, not yet added to it."),
                &["kind"])),
            store_leases: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_limits_store_leases", "Concurrency/reservation leases this replica holds in the shared store (renewed every lease/3)."),
                &["kind"])),
            prefix_index_bytes: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_prefix_index_bytes", "Memory of the pool's prefix index (upper bound: entries × bytes per entry)."),
                &["pool"])),
            prefix_index_budget: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_prefix_index_budget_bytes", "The prefix index's memory budget (prefix_aware.index_bytes)."),
                &["pool"])),
            prefix_index_entries: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_prefix_index_entries", "Block and session entries in the pool's prefix index."),
                &["pool"])),
            prefix_index_evictions: register!(registry, IntCounterVec::new(
                Opts::new("infergate_prefix_index_evictions_total", "Entries the prefix index dropped to stay within its budget."),
                &["pool"])),
            queue_wait: register!(registry, HistogramVec::new(
                hist("infergate_queue_wait_seconds", "Time requests waited in their pool's dispatch queue (those that waited).", TTFT_BUCKETS),
                &["pool"])),
            queue_length: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_queue_length", "Requests waiting in the pool's dispatch queue now."),
                &["pool"])),
            queue_outcomes: register!(registry, IntCounterVec::new(
                Opts::new("infergate_queue_requests_total", "Requests that waited in a pool's queue, by outcome: dispatched, full (queue.max_len: refused at once), shed (refused at once: the measured rate says it would wait past queue.max_wait), timed_out, abandoned (the client left), pushed_out (queued, then pushed out of a full queue to make room for a tenant below its fair share)."),
                &["pool", "outcome"])),
            retries: register!(registry, IntCounterVec::new(
                Opts::new("infergate_retries_total", "Requests retried on another backend before any byte reached the client, by reason (connect, status_502, status_503, reset)."),
                &["pool", "reason"])),
            retries_denied: register!(registry, IntCounterVec::new(
                Opts::new("infergate_retry_budget_exhausted_total", "Retries not made because the pool's retry budget was spent."),
                &["pool"])),
            backend_ejected: register!(registry, IntGaugeVec::new(
                Opts::new("infergate_backend_ejected", "1 while outlier detection keeps a backend out (or half-open), else 0."),
                &["pool", "backend"])),
            backend_ejections: register!(registry, IntCounterVec::new(
                Opts::new("infergate_backend_ejections_total", "Times outlier detection ejected a backend."),
                &["pool", "backend"])),
            fallbacks: register!(registry, IntCounterVec::new(
                Opts::new("infergate_fallbacks_total", "Requests served by a fallback model (from, to)."),
                &["from", "to"])),
            registry,
            models: arc_swap::ArcSwap::from_pointee(models),
            exported: std::sync::Mutex::default(),
        };
        let build = register!(
            metrics.registry,
            IntGaugeVec::new(
                Opts::new("infergate_build_info", "Always 1; the version is a label."),
                &["version"]
            )
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(metrics)
    }

    /// One `prefix_aware` routing choice.
    pub fn record_routing(&self, pool: &str, decision: crate::routing::Decision, matched: usize) {
        self.routing_decisions
            .with_label_values(&[pool, decision.as_str()])
            .inc();
        self.prefix_match_bytes
            .with_label_values(&[pool])
            .observe(matched as f64);
    }

    pub fn count_retry(&self, pool: &str, reason: &str) {
        self.retries.with_label_values(&[pool, reason]).inc();
    }

    pub fn count_fallback(&self, from: &str, to: &str) {
        self.fallbacks.with_label_values(&[from, to]).inc();
    }

    /// One reload of `kind` (`config`, `keys`) and whether it worked.
    pub fn count_reload(&self, kind: &str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads.with_label_values(&[kind, result]).inc();
    }

    /// Allow the names of a reloaded config as label values (the old ones stay).
    pub fn add_models(&self, names: impl IntoIterator<Item = String>) {
        let mut all = HashSet::clone(&self.models.load());
        all.extend(names);
        self.models.store(std::sync::Arc::new(all));
    }

    /// `model` if configured, else `other`.
    pub fn model_label<'a>(&self, model: Option<&'a str>) -> &'a str {
        match model {
            Some(m) if self.models.load().contains(m) => m,
            Some(_) => "other",
            None => "none",
        }
    }

    /// One finished request (called from the `logging` hook).
    pub fn record_request(&self, r: &Finished<'_>) {
        let method = method_label(r.method);
        let status = status_label(r.status);
        self.http_requests
            .with_label_values(&[method, r.endpoint, status])
            .inc();
        self.http_duration
            .with_label_values(&[method, r.endpoint])
            .observe(r.duration_s);
        if let Some(code) = r.error {
            self.http_errors.with_label_values(&[code]).inc();
        }
        if let Some(reason) = r.limited {
            self.rate_limited.with_label_values(&[reason]).inc();
        }
        if r.proxied {
            let model = self.model_label(r.model);
            self.model_requests
                .with_label_values(&[model, status])
                .inc();
            if let Some((prompt, completion)) = r.tokens {
                let user = r.user.unwrap_or("anonymous");
                self.token_usage
                    .with_label_values(&[user, "prompt"])
                    .inc_by(prompt);
                self.token_usage
                    .with_label_values(&[user, "completion"])
                    .inc_by(completion);
                self.model_tokens
                    .with_label_values(&[model, "prompt"])
                    .inc_by(prompt);
                self.model_tokens
                    .with_label_values(&[model, "completion"])
                    .inc_by(completion);
            }
        }
    }

    /// The exposition, with backend and model state read now.
    pub fn render(&self, live: LiveState<'_>) -> Vec<u8> {
        self.refresh_state(live);
        let mut out = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            log::error!("encoding metrics failed: {e}");
        }
        out
    }

    fn refresh_state(&self, app: LiveState<'_>) {
        if let Some(store) = app.store {
            let kind = ["redis"];
            self.store_up
                .with_label_values(&kind)
                .set(i64::from(store.is_up()));
            set_counter(
                &self.store_errors,
                &kind,
                store.errors.load(Ordering::Relaxed),
            );
            set_counter(
                &self.store_fallbacks,
                &kind,
                store.fallbacks.load(Ordering::Relaxed),
            );
            self.store_pending
                .with_label_values(&kind)
                .set(i64::try_from(store.pending_tokens()).unwrap_or(i64::MAX));
            self.store_leases
                .with_label_values(&kind)
                .set(i64::try_from(store.leases_held()).unwrap_or(i64::MAX));
        }
        for gpu in &app.gpus.gpus {
            let id = gpu.id.to_string();
            self.gpu_total_mb
                .with_label_values(&[id.as_str()])
                .set(gpu.memory.total_mb as f64);
            self.gpu_used_mb
                .with_label_values(&[id.as_str()])
                .set(gpu.memory.used_mb as f64);
        }
        let mut backends = HashSet::new();
        let mut loaded = HashSet::new();
        let mut indexed = HashSet::new();
        for pool in app.router.pools() {
            for state in pool.backend_states() {
                let backend = state.address.to_string();
                let labels = [pool.name(), backend.as_str()];
                backends.insert((pool.name().to_string(), backend.clone()));
                set_counter(
                    &self.backend_requests,
                    &labels,
                    state.requests.load(Ordering::Relaxed),
                );
                set_counter(
                    &self.backend_errors,
                    &labels,
                    state.errors.load(Ordering::Relaxed),
                );
                self.backend_in_flight
                    .with_label_values(&labels)
                    .set(state.inflight.load(Ordering::Relaxed) as i64);
                self.backend_healthy
                    .with_label_values(&labels)
                    .set(i64::from(pool.is_serving(&state.address)));
                self.backend_response_time
                    .with_label_values(&labels)
                    .set(state.response_time_us.load(Ordering::Relaxed) as f64 / 1e6);
                if pool.config.engine_metrics.enabled {
                    self.refresh_engine(pool, state, &labels);
                }
                self.backend_ejected
                    .with_label_values(&labels)
                    .set(i64::from(!matches!(
                        state.ejection.status(),
                        crate::routing::eject::Status::Normal
                    )));
                set_counter(
                    &self.backend_ejections,
                    &labels,
                    state.ejection.total.load(Ordering::Relaxed),
                );
            }
            let name = [pool.name()];
            if pool.queues() {
                self.queue_length
                    .with_label_values(&name)
                    .set(i64::try_from(pool.queue_len()).unwrap_or(i64::MAX));
                for (outcome, counter) in [
                    ("dispatched", &pool.queue_dispatched),
                    ("full", &pool.queue_rejected_full),
                    ("shed", &pool.queue_shed),
                    ("timed_out", &pool.queue_timed_out),
                    ("abandoned", &pool.queue_abandoned),
                    ("pushed_out", &pool.queue_pushed_out),
                ] {
                    set_counter(
                        &self.queue_outcomes,
                        &[pool.name(), outcome],
                        counter.load(Ordering::Relaxed),
                    );
                }
            }
            set_counter(
                &self.retries_denied,
                &name,
                pool.retries_denied.load(Ordering::Relaxed),
            );
            if let Some(index) = pool.prefix_index() {
                indexed.insert(pool.name().to_string());
                let (entries, bytes, evictions) = index.usage();
                let name = [pool.name()];
                let gauge = |g: &IntGaugeVec, v: u64| {
                    g.with_label_values(&name)
                        .set(i64::try_from(v).unwrap_or(i64::MAX))
                };
                gauge(&self.prefix_index_entries, entries);
                gauge(&self.prefix_index_bytes, bytes);
                gauge(&self.prefix_index_budget, index.budget_bytes());
                set_counter(&self.prefix_index_evictions, &name, evictions);
            }
            let any_serving = i64::from(pool.serving_backends().next().is_some());
            for model in pool.config.models.iter().chain(pool.config.aliases.keys()) {
                self.model_loaded
                    .with_label_values(&[model])
                    .set(any_serving);
                loaded.insert(model.clone());
            }
        }
        for engine in app.engines.all().iter() {
            let running = i64::from(matches!(engine.state(), crate::engines::State::Running(_)));
            for id in std::iter::once(&engine.spec.name).chain(engine.spec.aliases.keys()) {
                self.model_loaded.with_label_values(&[id]).set(running);
                loaded.insert(id.clone());
            }
        }
        self.drop_removed(backends, loaded, indexed);
    }

    fn refresh_engine(
        &self,
        pool: &crate::routing::Pool,
        state: &crate::routing::BackendState,
        labels: &[&str; 2],
    ) {
        let [pool_name, backend] = *labels;
        set_counter(
            &self.engine_scrapes,
            &[pool_name, backend, "ok"],
            state.engine.scrapes_ok.load(Ordering::Relaxed),
        );
        set_counter(
            &self.engine_scrapes,
            &[pool_name, backend, "error"],
            state.engine.scrapes_failed.load(Ordering::Relaxed),
        );
        self.engine_load
            .with_label_values(labels)
            .set(pool.load(state));
        let scraped = state.engine.latest();
        let gauges = [
            (
                &self.engine_running,
                scraped.as_ref().and_then(|s| s.signals.running),
            ),
            (
                &self.engine_waiting,
                scraped.as_ref().and_then(|s| s.signals.waiting),
            ),
            (
                &self.engine_kv_usage,
                scraped.as_ref().and_then(|s| s.signals.kv_usage),
            ),
            (
                &self.engine_hit_rate,
                scraped.as_ref().and_then(|s| s.hit_rate),
            ),
            (
                &self.engine_scrape_age,
                scraped.as_ref().map(|s| s.at.elapsed().as_secs_f64()),
            ),
        ];
        for (gauge, value) in gauges {
            match value {
                Some(v) => gauge.with_label_values(labels).set(v),
                None => {
                    let _ = gauge.remove_label_values(labels);
                }
            }
        }
    }

    /// Remove the series of backends and models the config no longer has
    /// (a reload took them out); keep what was written this time.
    fn drop_removed(
        &self,
        backends: HashSet<(String, String)>,
        loaded: HashSet<String>,
        indexed: HashSet<String>,
    ) {
        let mut exported = self
            .exported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (pool, backend) in exported.backends.difference(&backends) {
            let labels = [pool.as_str(), backend.as_str()];
            let _ = self.backend_requests.remove_label_values(&labels);
            let _ = self.backend_errors.remove_label_values(&labels);
            let _ = self.backend_in_flight.remove_label_values(&labels);
            let _ = self.backend_healthy.remove_label_values(&labels);
            let _ = self.backend_response_time.remove_label_values(&labels);
            let _ = self.backend_ejected.remove_label_values(&labels);
            let _ = self.backend_ejections.remove_label_values(&labels);
            for gauge in [
                &self.engine_running,
                &self.engine_waiting,
                &self.engine_kv_usage,
                &self.engine_hit_rate,
                &self.engine_load,
                &self.engine_scrape_age,
            ] {
                let _ = gauge.remove_label_values(&labels);
            }
            for result in ["ok", "error"] {
                let _ = self.engine_scrapes.remove_label_values(&[
                    pool.as_str(),
                    backend.as_str(),
                    result,
                ]);
            }
        }
        for model in exported.loaded.difference(&loaded) {
            let _ = self.model_loaded.remove_label_values(&[model.as_str()]);
        }
        for pool in exported.indexed.difference(&indexed) {
            let _ = self
                .prefix_index_entries
                .remove_label_values(&[pool.as_str()]);
            let _ = self
                .prefix_index_bytes
                .remove_label_values(&[pool.as_str()]);
            let _ = self
                .prefix_index_budget
                .remove_label_values(&[pool.as_str()]);
        }
        *exported = Exported {
            backends,
            loaded,
            indexed,
        };
    }
}

/// Bring a counter up to `value` (backend counters live in the router as
/// atomics; the exported counter follows them and never goes down).
fn set_counter(counter: &IntCounterVec, labels: &[&str], value: u64) {
    let c = counter.with_label_values(labels);
    let current = c.get();
    if value > current {
        c.inc_by(value - current);
    }
}

/// What one finished request contributes.
pub struct Finished<'a> {
    pub method: &'a str,
    pub endpoint: &'static str,
    pub status: u16,
    pub duration_s: f64,
    pub error: Option<&'static str>,
    pub limited: Option<&'static str>,
    /// It was sent (or meant to be sent) to an engine.
    pub proxied: bool,
    pub model: Option<&'a str>,
    pub user: Option<&'a str>,
    /// (prompt, completion) tokens, reported or estimated.
    pub tokens: Option<(u64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(m: &Metrics) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn unknown_models_and_methods_collapse_into_other() {
        let m = Metrics::new(["known".to_string()].into_iter().collect()).unwrap();
        for model in ["known", "client-made-this-up-1", "client-made-this-up-2"] {
            m.record_request(&Finished {
                method: "BREW",
                endpoint: "chat_completions",
                status: 200,
                duration_s: 0.01,
                error: None,
                limited: None,
                proxied: true,
                model: Some(model),
                user: Some("alice"),
                tokens: Some((3, 4)),
            });
        }
        let text = exposition(&m);
        assert!(text.contains(r#"infergate_model_requests_total{model="known",status="200"} 1"#));
        assert!(text.contains(r#"infergate_model_requests_total{model="other",status="200"} 2"#));
        assert!(!text.contains("made-this-up"));
        assert!(text.contains(
            r#"http_requests_total{endpoint="chat_completions",method="other",status="200"} 3"#
        ));
        assert!(text.contains(r#"token_usage_total{type="completion",user="alice"} 12"#));
    }

    #[test]
    fn odd_status_codes_become_classes() {
        assert_eq!(status_label(299), "2xx");
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(599), "5xx");
        assert_eq!(status_label(429), "429");
    }
}

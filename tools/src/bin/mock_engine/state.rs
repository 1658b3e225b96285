//! Shared server state: configuration, counters, health flag, error injection,
//! the scheduler, the prefix cache and the record of the last inference
//! request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::kvcache::PrefixCache;
use crate::sched::Scheduler;

/// The engine model's sizes (scheduler and KV cache).
pub struct Engine {
    /// `--max-running`: `None` is unlimited.
    pub max_running: Option<usize>,
    /// `--prefix-cache-tokens`: 0 turns the cache off.
    pub prefix_cache_tokens: u64,
}

/// Immutable configuration derived from the command line.
pub struct Config {
    pub instance: HeaderValue,
    pub ttft: Duration,
    pub token_interval: Duration,
    pub tokens: u32,
    pub fail_status: Option<u16>,
    pub error_rate: Option<f64>,
    pub drop_after_chunks: Option<u32>,
    pub hang: bool,
    pub flat_errors: bool,
    pub start_unix: u64,
    /// Prefill time per uncached prompt token (`--prefill-us-per-token`).
    pub prefill_per_token: Duration,
    /// How `/metrics` answers (`--metrics-mode`).
    pub metrics_mode: MetricsMode,
}

/// `--metrics-mode`: a healthy exposition, or a broken one for tests of
/// the gateway's engine-metrics scraping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsMode {
    /// vLLM's names with the real state.
    Normal,
    /// 200 with bytes that are not Prometheus text.
    Garbage,
    /// 404, as an engine started without metrics.
    Missing,
    /// Never answers.
    Hang,
}

/// Per-model counters (exported on /metrics with a `model_name` label).
pub struct ModelStats {
    pub name: String,
    /// Requests holding a running slot.
    pub running: AtomicI64,
    /// Requests in the scheduler's queue.
    pub waiting: AtomicI64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Prompt tokens looked up in the prefix cache (when it is on).
    pub cache_queries: AtomicU64,
    /// Of those, the tokens found cached.
    pub cache_hits: AtomicU64,
}

/// Global counters, exposed on /mock/stats.
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub active: AtomicI64,
    pub cancelled: AtomicU64,
    pub aborted_streams: AtomicU64,
    pub dropped_streams: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub health_checks: AtomicU64,
    pub ws_opened: AtomicU64,
    pub ws_closed: AtomicU64,
    pub ws_frames: AtomicU64,
    /// Inference requests refused with 400 as vLLM would (bad JSON, bad
    /// shape, bad values).
    pub rejected_invalid: AtomicU64,
    /// Inference requests refused with 404 for a model not served.
    pub rejected_model: AtomicU64,
    /// Prompt tokens (the cache's count: words) of requests that ran.
    pub prompt_tokens: AtomicU64,
    /// Of those, the tokens of their cached prefixes.
    pub cached_prompt_tokens: AtomicU64,
}

/// What /mock/last-request reports.
pub struct LastRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body_bytes: usize,
    pub body_sha256: String,
    pub model: Option<String>,
    /// The `stream_options` the request carried (to see what a gateway added).
    pub stream_options: Option<Value>,
}

pub struct State {
    pub cfg: Config,
    pub models: Vec<ModelStats>,
    pub counters: Counters,
    pub healthy: AtomicBool,
    /// `POST /mock/fault`: fail every inference request with this status
    /// (0: off), or close its connection before answering.
    pub fail_status: std::sync::atomic::AtomicU16,
    pub reset_inference: AtomicBool,
    pub errors: Option<Mutex<ErrorInjector>>,
    pub last_request: Mutex<Option<LastRequest>>,
    /// LoRA adapters loaded at runtime: adapter name → base model index.
    pub loras: Mutex<Vec<(String, usize)>>,
    pub sched: Scheduler,
    pub cache: Mutex<PrefixCache>,
    /// Whether the prefix cache is on (fixed at start).
    pub cache_on: bool,
}

impl State {
    pub fn new(cfg: Config, models: Vec<String>, healthy: bool, seed: u64, engine: Engine) -> Self {
        let cache = PrefixCache::new(engine.prefix_cache_tokens);
        let cache_on = cache.enabled();
        let errors = cfg
            .error_rate
            .map(|rate| Mutex::new(ErrorInjector::new(rate, seed)));
        let models = models
            .into_iter()
            .map(|name| ModelStats {
                name,
                running: AtomicI64::new(0),
                waiting: AtomicI64::new(0),
                prompt_tokens: AtomicU64::new(0),
                generation_tokens: AtomicU64::new(0),
                cache_queries: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
            })
            .collect();
        State {
            cfg,
            models,
            counters: Counters::default(),
            healthy: AtomicBool::new(healthy),
            fail_status: std::sync::atomic::AtomicU16::new(0),
            reset_inference: AtomicBool::new(false),
            errors,
            last_request: Mutex::new(None),
            loras: Mutex::new(Vec::new()),
            sched: Scheduler::new(engine.max_running),
            cache: Mutex::new(cache),
            cache_on,
        }
    }

    /// A state with default settings and `engine`, for unit tests.
    #[cfg(test)]
    pub fn for_tests(models: &[&str], engine: Engine) -> Self {
        let cfg = Config {
            instance: HeaderValue::from_static("test"),
            ttft: Duration::ZERO,
            token_interval: Duration::ZERO,
            tokens: 8,
            fail_status: None,
            error_rate: None,
            drop_after_chunks: None,
            hang: false,
            flat_errors: false,
            start_unix: 0,
            prefill_per_token: Duration::ZERO,
            metrics_mode: MetricsMode::Normal,
        };
        let models = models.iter().map(|m| (*m).to_owned()).collect();
        State::new(cfg, models, true, 0, engine)
    }

    pub fn cache(&self) -> std::sync::MutexGuard<'_, PrefixCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Index of a served model; `None` for an unknown name. A missing model
    /// field selects the first served model (as vLLM does).
    pub fn model_index(&self, name: Option<&str>) -> Option<usize> {
        match name {
            None => Some(0),
            Some(n) => self.models.iter().position(|m| m.name == n).or_else(|| {
                let loras = self.loras.lock().unwrap_or_else(|e| e.into_inner());
                loras.iter().find(|(a, _)| a == n).map(|(_, base)| *base)
            }),
        }
    }

    /// Status code to fail this request with, if failure injection says so.
    pub fn injected_failure(&self) -> Option<u16> {
        let runtime = self.fail_status.load(Ordering::Relaxed);
        if runtime != 0 {
            return Some(runtime);
        }
        match &self.errors {
            Some(inj) => {
                let mut guard = inj.lock().unwrap_or_else(|e| e.into_inner());
                if guard.should_fail() {
                    Some(self.cfg.fail_status.unwrap_or(500))
                } else {
                    None
                }
            }
            None => self.cfg.fail_status,
        }
    }

    pub fn set_last_request(&self, rec: LastRequest) {
        let mut guard = self.last_request.lock().unwrap_or_else(|e| e.into_inner());
        *guard = Some(rec);
    }

    pub fn last_request_json(&self) -> Value {
        let guard = self.last_request.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rec) = guard.as_ref() else {
            return Value::Null;
        };
        let mut headers = Map::new();
        for (name, value) in rec.headers.iter() {
            let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
            match headers.get_mut(name.as_str()) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(&v);
                }
                _ => {
                    headers.insert(name.as_str().to_owned(), Value::String(v));
                }
            }
        }
        json!({
            "method": rec.method.as_str(),
            "path": rec.path,
            "query": rec.query,
            "headers": headers,
            "body_bytes": rec.body_bytes,
            "body_sha256": rec.body_sha256,
            "model": rec.model,
            "stream_options": rec.stream_options,
        })
    }

    pub fn stats_json(&self) -> Value {
        let c = &self.counters;
        let s = &self.sched;
        let opened = c.connections_opened.load(Ordering::Relaxed);
        let closed = c.connections_closed.load(Ordering::Relaxed);
        let (cache_tokens, cache_capacity, cache_evictions) = {
            let cache = self.cache();
            (
                cache.cached_tokens(),
                cache.capacity_tokens(),
                cache.evictions(),
            )
        };
        json!({
            "requests": c.requests.load(Ordering::Relaxed),
            "completed": c.completed.load(Ordering::Relaxed),
            "active": c.active.load(Ordering::Relaxed),
            "cancelled": c.cancelled.load(Ordering::Relaxed),
            "aborted_streams": c.aborted_streams.load(Ordering::Relaxed),
            "dropped_streams": c.dropped_streams.load(Ordering::Relaxed),
            "connections_opened": opened,
            "connections_closed": closed,
            "open_connections": opened.saturating_sub(closed),
            "health_checks": c.health_checks.load(Ordering::Relaxed),
            "ws_opened": c.ws_opened.load(Ordering::Relaxed),
            "ws_closed": c.ws_closed.load(Ordering::Relaxed),
            "ws_frames": c.ws_frames.load(Ordering::Relaxed),
            "rejected_invalid": c.rejected_invalid.load(Ordering::Relaxed),
            "rejected_model": c.rejected_model.load(Ordering::Relaxed),
            "running": s.running.load(Ordering::Relaxed),
            "max_active": s.max_running_seen.load(Ordering::Relaxed),
            "queued": s.queued.load(Ordering::Relaxed),
            "max_queued": s.max_queued.load(Ordering::Relaxed),
            "started": s.started.load(Ordering::Relaxed),
            "prompt_tokens": c.prompt_tokens.load(Ordering::Relaxed),
            "cached_prompt_tokens": c.cached_prompt_tokens.load(Ordering::Relaxed),
            "cache_tokens": cache_tokens,
            "cache_capacity_tokens": cache_capacity,
            "cache_evictions": cache_evictions,
        })
    }

    /// Prometheus text exposition, as vLLM's prometheus_client writes it:
    /// counters are declared under their base name and sampled as `_total`.
    pub fn metrics_text(&self) -> String {
        let mut out = String::with_capacity(2048);
        let usage = self.cache().usage();
        // (name, type, help, value from the model's stats and the cache usage)
        type Getter = fn(&ModelStats, f64) -> f64;
        let families: [(&str, &str, &str, Getter); 7] = [
            (
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                |m, _| m.running.load(Ordering::Relaxed) as f64,
            ),
            (
                "vllm:num_requests_waiting",
                "gauge",
                "Number of requests waiting to be processed.",
                |m, _| m.waiting.load(Ordering::Relaxed) as f64,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "gauge",
                "KV-cache usage. 1 means 100 percent usage.",
                // engine-wide, repeated under each served model's label
                |_, usage| usage,
            ),
            (
                "vllm:prefix_cache_queries",
                "counter",
                "Prefix cache queries, in terms of number of queried tokens.",
                |m, _| m.cache_queries.load(Ordering::Relaxed) as f64,
            ),
            (
                "vllm:prefix_cache_hits",
                "counter",
                "Prefix cache hits, in terms of number of cached tokens.",
                |m, _| m.cache_hits.load(Ordering::Relaxed) as f64,
            ),
            (
                "vllm:prompt_tokens",
                "counter",
                "Number of prefill tokens processed.",
                |m, _| m.prompt_tokens.load(Ordering::Relaxed) as f64,
            ),
            (
                "vllm:generation_tokens",
                "counter",
                "Number of generation tokens processed.",
                |m, _| m.generation_tokens.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, kind, help, get) in families {
            // as Python's prometheus_client writes the text format: a
            // counter's family is named with its `_total` suffix
            let suffix = if kind == "counter" { "_total" } else { "" };
            let _ = writeln!(
                out,
                "# HELP {name}{suffix} {help}\n# TYPE {name}{suffix} {kind}"
            );
            for m in &self.models {
                let v = get(m, usage);
                let _ = writeln!(
                    out,
                    "{name}{suffix}{{model_name=\"{}\"}} {}",
                    escape_label(&m.name),
                    prom_value(v)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP mock_requests_total Inference requests received by the mock engine.\n\
             # TYPE mock_requests_total counter\nmock_requests_total {}",
            self.counters.requests.load(Ordering::Relaxed)
        );
        out
    }
}

/// A label value escaped as the exposition format requires.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value as prometheus_client prints floats (`3.0`, `0.25`).
fn prom_value(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Deterministic failure injection: the same seed yields the same sequence
/// of decisions.
pub struct ErrorInjector {
    rate: f64,
    rng: StdRng,
}

impl ErrorInjector {
    pub fn new(rate: f64, seed: u64) -> Self {
        ErrorInjector {
            rate: rate.clamp(0.0, 1.0),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn should_fail(&mut self) -> bool {
        self.rng.random::<f64>() < self.rate
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_injection_is_deterministic() {
        let mut a = ErrorInjector::new(0.3, 42);
        let mut b = ErrorInjector::new(0.3, 42);
        let sa: Vec<bool> = (0..1000).map(|_| a.should_fail()).collect();
        let sb: Vec<bool> = (0..1000).map(|_| b.should_fail()).collect();
        assert_eq!(sa, sb);
        let fails = sa.iter().filter(|f| **f).count();
        assert!((220..380).contains(&fails), "fails = {fails}");
        let mut c = ErrorInjector::new(0.3, 43);
        let sc: Vec<bool> = (0..1000).map(|_| c.should_fail()).collect();
        assert_ne!(sa, sc);
    }

    #[test]
    fn metrics_are_written_as_prometheus_client_does() {
        let st = State::for_tests(
            &["a", "b\"q"],
            Engine {
                max_running: Some(1),
                prefix_cache_tokens: 64,
            },
        );
        st.models[0].cache_queries.fetch_add(40, Ordering::Relaxed);
        st.models[0].cache_hits.fetch_add(32, Ordering::Relaxed);
        st.cache().insert(&[1, 2]);
        let text = st.metrics_text();
        for want in [
            "# TYPE vllm:prefix_cache_queries_total counter\n",
            "vllm:prefix_cache_queries_total{model_name=\"a\"} 40.0\n",
            "vllm:prefix_cache_hits_total{model_name=\"a\"} 32.0\n",
            "vllm:prefix_cache_hits_total{model_name=\"b\\\"q\"} 0.0\n",
            "vllm:kv_cache_usage_perc{model_name=\"a\"} 0.5\n",
            "vllm:kv_cache_usage_perc{model_name=\"b\\\"q\"} 0.5\n",
            "# TYPE vllm:num_requests_waiting gauge\n",
            "vllm:num_requests_waiting{model_name=\"a\"} 0.0\n",
            "vllm:num_requests_running{model_name=\"a\"} 0.0\n",
            "# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{",
            "mock_requests_total 0\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert_eq!(prom_value(3.0), "3.0");
        assert_eq!(prom_value(0.0703125), "0.0703125");
        let stats = st.stats_json();
        assert_eq!(stats["cache_tokens"], 32);
        assert_eq!(stats["cache_capacity_tokens"], 64);
        assert_eq!(stats["max_active"], 0);
    }

    #[test]
    fn error_injection_extremes() {
        let mut never = ErrorInjector::new(0.0, 1);
        let mut always = ErrorInjector::new(1.0, 1);
        assert!((0..100).all(|_| !never.should_fail()));
        assert!((0..100).all(|_| always.should_fail()));
    }
}

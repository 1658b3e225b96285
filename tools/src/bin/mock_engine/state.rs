//! Shared server state: configuration, counters, health flag, error injection
//! and the record of the last inference request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

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
}

/// Per-model counters (exported on /metrics with a `model_name` label).
pub struct ModelStats {
    pub name: String,
    pub running: AtomicI64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
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
    pub errors: Option<Mutex<ErrorInjector>>,
    pub last_request: Mutex<Option<LastRequest>>,
    /// LoRA adapters loaded at runtime: adapter name → base model index.
    pub loras: Mutex<Vec<(String, usize)>>,
}

impl State {
    pub fn new(cfg: Config, models: Vec<String>, healthy: bool, seed: u64) -> Self {
        let errors = cfg
            .error_rate
            .map(|rate| Mutex::new(ErrorInjector::new(rate, seed)));
        let models = models
            .into_iter()
            .map(|name| ModelStats {
                name,
                running: AtomicI64::new(0),
                prompt_tokens: AtomicU64::new(0),
                generation_tokens: AtomicU64::new(0),
            })
            .collect();
        State {
            cfg,
            models,
            counters: Counters::default(),
            healthy: AtomicBool::new(healthy),
            errors,
            last_request: Mutex::new(None),
            loras: Mutex::new(Vec::new()),
        }
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
        let opened = c.connections_opened.load(Ordering::Relaxed);
        let closed = c.connections_closed.load(Ordering::Relaxed);
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
        })
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::with_capacity(1024);
        type Getter = fn(&ModelStats) -> i64;
        let families: [(&str, &str, &str, Getter); 4] = [
            (
                "vllm:num_requests_running",
                "gauge",
                "Number of requests currently running.",
                |m| m.running.load(Ordering::Relaxed),
            ),
            (
                "vllm:num_requests_waiting",
                "gauge",
                "Number of requests waiting to be processed.",
                |_| 0,
            ),
            (
                "vllm:prompt_tokens_total",
                "counter",
                "Number of prefill tokens processed.",
                |m| m.prompt_tokens.load(Ordering::Relaxed) as i64,
            ),
            (
                "vllm:generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                |m| m.generation_tokens.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for m in &self.models {
                let _ = writeln!(out, "{name}{{model_name=\"{}\"}} {}", m.name, get(m));
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
    fn error_injection_extremes() {
        let mut never = ErrorInjector::new(0.0, 1);
        let mut always = ErrorInjector::new(1.0, 1);
        assert!((0..100).all(|_| !never.should_fail()));
        assert!((0..100).all(|_| always.should_fail()));
    }
}

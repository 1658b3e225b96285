//! The model catalogue clients see at `GET /v1/models`: configured models and
//! aliases, plus models discovered on healthy backends, in OpenAI's list shape
//! with the seeds' `owned_by` and `status` fields; and the status pages
//! (`/health`, `/health/ready`, `/services`, `/stats`) in the seeds' shapes.

use crate::state::AppState;
use infergate_filters::Identity;
use serde_json::{json, Value};

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2024-01-15T10:30:00Z`, the seeds' timestamp form (UTC, seconds).
fn iso(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The engine port shown for a pool's models (seed 000's `port`): the first
/// backend that takes traffic, else the first configured one.
fn pool_port(pool: &crate::routing::Pool) -> Option<u16> {
    pool.serving_backends()
        .next()
        .or_else(|| pool.backend_states().first())
        .map(|b| b.address.port())
}

/// Every model a client may name, in config order, discovered ones last.
pub fn list_models(app: &AppState) -> Vec<Value> {
    let created = unix(app.started_at);
    let mut out = Vec::new();
    for pool in app.router.pools() {
        let serving = pool.serving_backends().count();
        let status = if serving > 0 {
            "running"
        } else {
            "unavailable"
        };
        let port = pool_port(pool);
        let entry = |id: &str, root: &str| {
            json!({
                "id": id, "object": "model", "created": created,
                "owned_by": pool.config.owned_by, "root": root,
                "status": status, "pool": pool.name(), "healthy_backends": serving,
                "port": port, "gpu_memory_mb": null,
                "request_count": app.models.get(id).in_flight,
            })
        };
        for m in &pool.config.models {
            out.push(entry(m, m));
        }
        for (alias, target) in &pool.config.aliases {
            out.push(entry(alias, target));
        }
    }
    for engine in app.engines.all().iter() {
        let state = engine.state();
        let port = match state {
            crate::engines::State::Running(a) => Some(a.port()),
            _ => None,
        };
        for id in std::iter::once(&engine.spec.name).chain(engine.spec.aliases.keys()) {
            out.push(json!({
                "id": id, "object": "model", "created": created,
                "owned_by": "infergate", "root": engine.spec.name,
                "status": state.label(), "managed": true, "kind": engine.spec.kind.as_str(),
                "pool": engine.spec.name,
                "healthy_backends": usize::from(port.is_some()),
                "port": port, "gpu_memory_mb": engine.spec.gpu_memory_mb,
                "request_count": engine.in_flight(),
            }));
        }
        for adapter in engine.adapters() {
            out.push(json!({
                "id": adapter, "object": "model", "created": created,
                "owned_by": "infergate", "root": adapter, "parent": engine.spec.name,
                "lora": true, "status": state.label(), "managed": true,
                "kind": engine.spec.kind.as_str(), "pool": engine.spec.name,
                "healthy_backends": usize::from(port.is_some()), "port": port,
                "gpu_memory_mb": null, "request_count": null,
            }));
        }
    }
    let discovered = app.router.discovered();
    let mut extra: Vec<(&String, &usize)> = discovered
        .iter()
        .filter(|(name, _)| !app.router.is_configured(name))
        .collect();
    extra.sort();
    for (name, &pool_index) in extra {
        if let Some(pool) = app.router.pool(pool_index) {
            out.push(json!({
                "id": name, "object": "model", "created": created,
                "owned_by": pool.config.owned_by, "root": name,
                "status": "running", "pool": pool.name(), "discovered": true,
                "healthy_backends": pool.serving_backends().count(),
            }));
        }
    }
    out
}

/// Only the models `identity` may use (all of them without auth).
pub fn list_body(app: &AppState, identity: Option<&Identity>) -> Vec<u8> {
    let models: Vec<Value> = list_models(app)
        .into_iter()
        .filter(|m| visible(m, identity))
        .collect();
    json!({"object": "list", "data": models})
        .to_string()
        .into_bytes()
}

/// One model by id: its list entry plus seed 000's `detail`, or `None` (the
/// caller answers 404 `model_not_found`, also for a model the caller may
/// not use).
pub fn model_body(app: &AppState, id: &str, identity: Option<&Identity>) -> Option<Vec<u8>> {
    let mut model = list_models(app)
        .into_iter()
        .find(|m| m["id"] == id && visible(m, identity))?;
    let used = app.models.get(id);
    let now = std::time::SystemTime::now();
    let idle = used
        .last_used
        .unwrap_or(app.started_at)
        .elapsed()
        .map(|d| d.as_secs())
        .unwrap_or(0);
    model["detail"] = json!({
        "model_id": id,
        "status": model["status"],
        "port": model["port"],
        "gpu_memory_mb": null,
        "request_count": used.in_flight,
        "total_requests": used.total,
        "created_at": iso(app.started_at),
        "last_used_at": used.last_used.map(iso),
        "idle_seconds": idle,
        "checked_at": iso(now),
    });
    Some(model.to_string().into_bytes())
}

fn visible(model: &Value, identity: Option<&Identity>) -> bool {
    match (identity, model["id"].as_str()) {
        (None, _) => true,
        (Some(identity), Some(id)) => identity.may_use(id),
        (Some(_), None) => false,
    }
}

/// `GET /health`: seeds 000 and 001 merged. `status` is `healthy` when
/// every backend takes traffic, `degraded` when some do, `unhealthy` (503)
/// when none does.
pub fn health_body(app: &AppState) -> (u16, Vec<u8>) {
    let mut total = 0;
    let mut healthy = 0;
    let mut model_status = serde_json::Map::new();
    let mut loaded = 0;
    for pool in app.router.pools() {
        total += pool.backend_states().len();
        let serving = pool.serving_backends().count();
        healthy += serving;
        let status = if serving > 0 {
            "running"
        } else {
            "unavailable"
        };
        let port = pool_port(pool);
        for id in pool.config.models.iter().chain(pool.config.aliases.keys()) {
            if serving > 0 {
                loaded += 1;
            }
            model_status.insert(
                id.clone(),
                json!({
                    "model_id": id, "status": status, "port": port,
                    "gpu_memory_mb": null, "request_count": app.models.get(id).in_flight,
                }),
            );
        }
    }
    let mut engines_failed = 0;
    for engine in app.engines.all().iter() {
        let state = engine.state();
        let port = match state {
            crate::engines::State::Running(a) => {
                loaded += 1;
                Some(a.port())
            }
            _ => None,
        };
        if matches!(state, crate::engines::State::Failed(_)) {
            engines_failed += 1;
        }
        for id in std::iter::once(&engine.spec.name).chain(engine.spec.aliases.keys()) {
            model_status.insert(
                id.clone(),
                json!({
                    "model_id": id, "status": state.label(), "port": port,
                    "gpu_memory_mb": engine.spec.gpu_memory_mb,
                    "request_count": engine.in_flight(),
                }),
            );
        }
    }
    // managed engines start on demand: a stopped one is fine, a failed one is not
    let (status, code) = match (healthy, total) {
        (0, t) if t > 0 => ("unhealthy", 503),
        (h, t) if h < t || engines_failed > 0 => ("degraded", 200),
        _ => ("healthy", 200),
    };
    let gpu = app.gpu.snapshot();
    // the shared limits store: down is not unhealthy (on_error decides what
    // admission does), but it shows
    let limits_store = app.limits.as_ref().and_then(|l| l.redis()).map(|s| {
        json!({
            "kind": "redis",
            "status": if s.is_up() { "up" } else { "down" },
            "on_error": s.on_error(),
            "pending_tokens": s.pending_tokens(),
        })
    });
    let body = json!({
        "status": status,
        "router": "running",
        "limits_store": limits_store,
        "healthy_services": format!("{healthy}/{total}"),
        "timestamp": iso(std::time::SystemTime::now()),
        "gpu": gpu.gpus.first(),
        "gpus": gpu.gpus,
        "gpu_unavailable": gpu.unavailable,
        "loaded_models": loaded,
        "model_status": model_status,
    });
    (code, body.to_string().into_bytes())
}

/// `GET /health/ready`: 200 `{"ready":true}` when at least one backend can
/// take traffic, else 503 with the reason (a Kubernetes readiness probe then
/// takes the gateway out of its Service until engines are back).
pub fn ready_body(app: &AppState) -> (u16, Vec<u8>) {
    if app.draining.borrow().is_some() {
        let body = json!({"ready": false, "reason": "draining: the gateway is shutting down"});
        return (503, body.to_string().into_bytes());
    }
    let serving = app
        .router
        .pools()
        .iter()
        .map(|p| p.serving_backends().count())
        .sum::<usize>();
    // managed engines count: they start on the first request
    if serving > 0 || !app.engines.is_empty() || !app.config.server.ready_requires_backend {
        (200, json!({"ready": true}).to_string().into_bytes())
    } else {
        let body = json!({"ready": false, "reason": "no backend has passed its health checks"});
        (503, body.to_string().into_bytes())
    }
}

fn backend_entries(app: &AppState) -> Vec<Value> {
    let mut out = Vec::new();
    for pool in app.router.pools() {
        for state in pool.backend_states() {
            let ordering = std::sync::atomic::Ordering::Relaxed;
            out.push(json!({
                "name": format!("{}@{}", pool.name(), state.address),
                "url": format!("http://{}", state.address),
                "pool": pool.name(),
                "healthy": pool.is_serving(&state.address),
                "models": pool.config.models,
                "weight": state.weight,
                "request_count": state.requests.load(ordering),
                "error_count": state.errors.load(ordering),
                "response_time": state.response_time_us.load(ordering) as f64 / 1e6,
                "inflight": state.inflight.load(ordering),
                "engine": engine_entry(pool, state),
                "ejected": !matches!(state.ejection.status(), crate::routing::eject::Status::Normal),
                "ejected_for_seconds": state.ejection.remaining().as_secs_f64(),
                "ejections": state.ejection.total.load(ordering),
                "saturated": pool.saturated(state),
            }));
        }
    }
    out
}

/// What a backend's engine reports (`engine_metrics`), and the load score
/// the engine-aware policies compare; `null` for pools that don't scrape.
fn engine_entry(pool: &crate::routing::Pool, state: &crate::routing::BackendState) -> Value {
    if !pool.config.engine_metrics.enabled {
        return Value::Null;
    }
    let ordering = std::sync::atomic::Ordering::Relaxed;
    let scraped = state.engine.latest();
    let signals = scraped.as_ref().map(|s| &s.signals);
    json!({
        "family": signals.map(|s| s.family),
        "running": signals.and_then(|s| s.running),
        "waiting": signals.and_then(|s| s.waiting),
        "kv_cache_usage": signals.and_then(|s| s.kv_usage),
        "prefix_cache_hit_rate": scraped.as_ref().and_then(|s| s.hit_rate),
        "age_seconds": scraped.as_ref().map(|s| s.at.elapsed().as_secs_f64()),
        "scrapes_ok": state.engine.scrapes_ok.load(ordering),
        "scrapes_failed": state.engine.scrapes_failed.load(ordering),
        "last_error": state.engine.last_error(),
        "load": pool.load(state),
        "first_byte_ms": state.pace.estimate().map(|(ms, _)| ms),
        "pace": pool.pace(state),
    })
}

/// `GET /services`: every configured backend (InfiniLM router shape, plus `pool`, `weight`, `inflight`).
pub fn services_body(app: &AppState) -> Vec<u8> {
    let services = backend_entries(app);
    json!({"total": services.len(), "services": services})
        .to_string()
        .into_bytes()
}

/// `GET /stats`: totals and per-backend counters (InfiniLM router shape).
pub fn stats_body(app: &AppState) -> Vec<u8> {
    let services = backend_entries(app);
    let healthy = services.iter().filter(|s| s["healthy"] == true).count();
    json!({"total_services": services.len(), "healthy_services": healthy, "services": services})
        .to_string()
        .into_bytes()
}

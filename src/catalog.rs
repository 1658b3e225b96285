//! The model catalogue clients see at `GET /v1/models`: configured models and
//! aliases, plus models discovered on healthy backends, in OpenAI's list shape
//! with the seeds' `owned_by` and `status` fields.

use crate::state::AppState;
use serde_json::{json, Value};

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
        let entry = |id: &str, root: &str| {
            json!({
                "id": id, "object": "model", "created": created,
                "owned_by": pool.config.owned_by, "root": root,
                "status": status, "pool": pool.name(), "healthy_backends": serving,
            })
        };
        for m in &pool.config.models {
            out.push(entry(m, m));
        }
        for (alias, target) in &pool.config.aliases {
            out.push(entry(alias, target));
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

pub fn list_body(app: &AppState) -> Vec<u8> {
    json!({"object": "list", "data": list_models(app)})
        .to_string()
        .into_bytes()
}

/// One model by id, or `None` (the caller answers 404 `model_not_found`).
pub fn model_body(app: &AppState, id: &str) -> Option<Vec<u8>> {
    list_models(app)
        .into_iter()
        .find(|m| m["id"] == id)
        .map(|m| m.to_string().into_bytes())
}

/// `GET /health`: the InfiniLM router's shape (`status`, `healthy_services`).
pub fn health_body(app: &AppState) -> (u16, Vec<u8>) {
    let mut total = 0;
    let mut healthy = 0;
    for pool in app.router.pools() {
        total += pool.backend_states().len();
        healthy += pool.serving_backends().count();
    }
    let status = if healthy > 0 { "healthy" } else { "degraded" };
    let body = json!({
        "status": status,
        "router": "running",
        "healthy_services": format!("{healthy}/{total}"),
        "timestamp": unix(std::time::SystemTime::now()),
    });
    (200, body.to_string().into_bytes())
}

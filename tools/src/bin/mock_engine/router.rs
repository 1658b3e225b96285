//! Request routing, body reading and common response headers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, ALLOW, CONTENT_LENGTH};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::body::{error_response, full, json_response, MockBody, TEXT_PLAIN};
use crate::guard::InflightGuard;
use crate::inference::{respond, Endpoint, Timing};
use crate::request::{read_body, route, Route};
use crate::state::{LastRequest, MetricsMode, State};
use crate::validate;

static X_MOCK_INSTANCE: HeaderName = HeaderName::from_static("x-mock-instance");
static X_MOCK_BODY_BYTES: HeaderName = HeaderName::from_static("x-mock-body-bytes");
static X_MOCK_BODY_SHA256: HeaderName = HeaderName::from_static("x-mock-body-sha256");
static X_MOCK_REQUEST_ID: HeaderName = HeaderName::from_static("x-mock-request-id");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Per-request override of `--token-interval-ms`, in microseconds (benchmarks
/// run several token rates against one mock).
static X_MOCK_TOKEN_INTERVAL_US: HeaderName = HeaderName::from_static("x-mock-token-interval-us");
/// Per-request override of `--prefill-us-per-token`.
static X_MOCK_PREFILL_US_PER_TOKEN: HeaderName =
    HeaderName::from_static("x-mock-prefill-us-per-token");

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<MockBody> {
    if req.uri().path() == crate::ws::PATH {
        let mut resp = crate::ws::handle(state.clone(), req);
        resp.headers_mut()
            .insert(X_MOCK_INSTANCE.clone(), state.cfg.instance.clone());
        return resp;
    }
    let (parts, body) = req.into_parts();
    let route = route(&parts.method, parts.uri.path());
    let guard = match route {
        Route::Inference(_) => Some(InflightGuard::new(state.clone())),
        _ => None,
    };
    let received = if parts.method == Method::POST {
        let hint = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        match read_body(body, hint).await {
            Ok(b) => Some(b),
            Err(e) => {
                log::debug!("failed to read request body: {e}");
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("failed to read request body: {e}"),
                    "BadRequestError",
                    None,
                    state.cfg.flat_errors,
                );
            }
        }
    } else {
        None
    };
    let flat = state.cfg.flat_errors;

    let mut resp = match (route, guard) {
        (Route::Inference(ep), Some(guard)) => {
            let (data, sha) = match &received {
                Some(r) => (r.data.clone(), r.sha256.clone()),
                None => (Bytes::new(), String::new()),
            };
            inference(&state, ep, &parts, data, sha, guard).await
        }
        (Route::Models, _) => {
            let mut data: Vec<Value> = state
                .models
                .iter()
                .map(|m| {
                    json!({"id": m.name, "object": "model", "created": state.cfg.start_unix,
                           "owned_by": "mock-engine", "root": m.name, "parent": null})
                })
                .collect();
            for (adapter, base) in state.loras.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let parent = state.models.get(*base).map(|m| m.name.clone());
                data.push(
                    json!({"id": adapter, "object": "model", "created": state.cfg.start_unix,
                                 "owned_by": "mock-engine", "root": adapter, "parent": parent}),
                );
            }
            json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
        }
        (Route::Health, _) => {
            state.counters.health_checks.fetch_add(1, Ordering::Relaxed);
            if state.healthy.load(Ordering::Relaxed) {
                json_response(StatusCode::OK, &json!({"status": "ok"}))
            } else {
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unhealthy",
                    "unavailable",
                    None,
                    flat,
                )
            }
        }
        (Route::Metrics, _) => match state.cfg.metrics_mode {
            MetricsMode::Normal => full(
                StatusCode::OK,
                &TEXT_PLAIN,
                Bytes::from(state.metrics_text()),
            ),
            MetricsMode::Garbage => full(
                StatusCode::OK,
                &TEXT_PLAIN,
                Bytes::from_static(
                    b"vllm:num_requests_running{model_name=\"m\" 1e\nvllm:num_requests_waiting{{}} x\n\x00\xff<html>\n",
                ),
            ),
            MetricsMode::Missing => full(
                StatusCode::NOT_FOUND,
                &TEXT_PLAIN,
                Bytes::from_static(b"404 Not Found"),
            ),
            MetricsMode::Hang => std::future::pending().await,
        },
        (Route::MockHealth, _) => {
            let body = received
                .as_ref()
                .map(|r| r.data.clone())
                .unwrap_or_default();
            match serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("healthy").and_then(Value::as_bool))
            {
                Some(h) => {
                    state.healthy.store(h, Ordering::Relaxed);
                    log::info!("health set to {h}");
                    json_response(StatusCode::OK, &json!({"healthy": h}))
                }
                None => error_response(
                    StatusCode::BAD_REQUEST,
                    "expected {\"healthy\": true|false}",
                    "BadRequestError",
                    Some("healthy"),
                    flat,
                ),
            }
        }
        (Route::MockFault, _) => {
            let v: Value = received
                .as_ref()
                .and_then(|r| serde_json::from_slice(&r.data).ok())
                .unwrap_or(Value::Null);
            let status = match v.get("fail_status") {
                None => Ok(None),
                Some(Value::Null) => Ok(Some(0)),
                Some(s) => s
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| (400..600).contains(n))
                    .map(Some)
                    .ok_or(()),
            };
            let reset = v.get("reset").map(|r| r.as_bool().ok_or(()));
            match (status, reset.transpose()) {
                (Ok(status), Ok(reset)) if v.is_object() => {
                    if let Some(code) = status {
                        state.fail_status.store(code, Ordering::Relaxed);
                    }
                    if let Some(r) = reset {
                        state.reset_inference.store(r, Ordering::Relaxed);
                    }
                    log::info!("fault injection now {v}");
                    json_response(
                        StatusCode::OK,
                        &json!({
                            "fail_status": match state.fail_status.load(Ordering::Relaxed) { 0 => Value::Null, n => json!(n) },
                            "reset": state.reset_inference.load(Ordering::Relaxed),
                        }),
                    )
                }
                _ => error_response(
                    StatusCode::BAD_REQUEST,
                    "expected {\"fail_status\": 400-599|null, \"reset\": true|false}",
                    "BadRequestError",
                    None,
                    flat,
                ),
            }
        }
        (Route::MockStats, _) => json_response(StatusCode::OK, &state.stats_json()),
        (Route::LoadLora, _) | (Route::UnloadLora, _) => {
            let load = matches!(route, Route::LoadLora);
            let req: Value = received
                .as_ref()
                .and_then(|r| serde_json::from_slice(&r.data).ok())
                .unwrap_or(Value::Null);
            let Some(name) = req.get("lora_name").and_then(Value::as_str) else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "lora_name is required",
                    "BadRequestError",
                    Some("lora_name"),
                    flat,
                );
            };
            let mut loras = state.loras.lock().unwrap_or_else(|e| e.into_inner());
            let exists = loras.iter().any(|(a, _)| a == name);
            if load {
                if exists {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        &format!("The lora adapter '{name}' has already been loaded."),
                        "BadRequestError",
                        None,
                        flat,
                    );
                }
                loras.push((name.to_string(), 0));
                full(
                    StatusCode::OK,
                    &TEXT_PLAIN,
                    Bytes::from(format!(
                        "Success: LoRA adapter '{name}' added successfully."
                    )),
                )
            } else {
                if !exists {
                    return error_response(
                        StatusCode::NOT_FOUND,
                        &format!("The lora adapter '{name}' cannot be found."),
                        "NotFoundError",
                        None,
                        flat,
                    );
                }
                loras.retain(|(a, _)| a != name);
                full(
                    StatusCode::OK,
                    &TEXT_PLAIN,
                    Bytes::from(format!(
                        "Success: LoRA adapter '{name}' removed successfully."
                    )),
                )
            }
        }
        (Route::MockLastRequest, _) => json_response(StatusCode::OK, &state.last_request_json()),
        (Route::WrongMethod(allow), _) => {
            let mut r = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method Not Allowed",
                "MethodNotAllowed",
                None,
                flat,
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            r
        }
        (Route::NotFound, _) | (Route::Inference(_), None) => error_response(
            StatusCode::NOT_FOUND,
            &format!("Not Found: {}", parts.uri.path()),
            "NotFoundError",
            None,
            flat,
        ),
    };

    let h = resp.headers_mut();
    h.insert(X_MOCK_INSTANCE.clone(), state.cfg.instance.clone());
    if let Some(r) = &received {
        h.insert(X_MOCK_BODY_BYTES.clone(), HeaderValue::from(r.data.len()));
        if let Ok(v) = HeaderValue::from_str(&r.sha256) {
            h.insert(X_MOCK_BODY_SHA256.clone(), v);
        }
    }
    if let Some(id) = parts.headers.get(&X_REQUEST_ID) {
        h.insert(X_MOCK_REQUEST_ID.clone(), id.clone());
    }
    resp
}

async fn inference(
    state: &Arc<State>,
    ep: Endpoint,
    parts: &hyper::http::request::Parts,
    data: Bytes,
    sha256: String,
    guard: InflightGuard,
) -> Response<MockBody> {
    let flat = state.cfg.flat_errors;
    let parsed = serde_json::from_slice::<Value>(&data);
    let model = match &parsed {
        Ok(v) => v.get("model").and_then(Value::as_str).map(str::to_owned),
        Err(_) => None,
    };
    state.set_last_request(LastRequest {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body_bytes: data.len(),
        body_sha256: sha256,
        model,
        stream_options: parsed
            .as_ref()
            .ok()
            .and_then(|v| v.get("stream_options").cloned()),
    });

    if state.cfg.hang {
        // Never answer; the guard counts a cancellation when the client leaves.
        std::future::pending::<()>().await;
    }
    if let Some(code) = state.injected_failure() {
        guard.finish();
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error_response(status, "mock failure", "InternalServerError", None, flat);
    }
    let req = match validate::check_shape(ep, &data, parsed) {
        Ok(v) => v,
        Err(msg) => return reject_invalid(state, guard, &msg),
    };
    // The shape check leaves `model` a string, null or absent; like vLLM,
    // an empty or absent name means the first served model.
    let model_field = req
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty());
    let Some(idx) = state.model_index(model_field) else {
        guard.finish();
        state
            .counters
            .rejected_model
            .fetch_add(1, Ordering::Relaxed);
        let msg = format!("The model `{}` does not exist.", model_field.unwrap_or(""));
        return error_response(
            StatusCode::NOT_FOUND,
            &msg,
            "NotFoundError",
            Some("model"),
            flat,
        );
    };
    if let Err(msg) = validate::check_values(ep, &req) {
        return reject_invalid(state, guard, &msg);
    }
    let micros = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_micros)
    };
    let timing = Timing {
        interval: micros(&X_MOCK_TOKEN_INTERVAL_US).unwrap_or(state.cfg.token_interval),
        prefill_per_token: micros(&X_MOCK_PREFILL_US_PER_TOKEN)
            .unwrap_or(state.cfg.prefill_per_token),
    };
    respond(ep, &req, idx, model_field, timing, guard).await
}

/// A request vLLM would refuse as malformed: 400 `BadRequestError`, counted
/// in `/mock/stats` as `rejected_invalid`.
fn reject_invalid(state: &Arc<State>, guard: InflightGuard, message: &str) -> Response<MockBody> {
    guard.finish();
    state
        .counters
        .rejected_invalid
        .fetch_add(1, Ordering::Relaxed);
    log::debug!("refused an invalid request: {message}");
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "BadRequestError",
        None,
        state.cfg.flat_errors,
    )
}

//! Endpoints around identity: `POST /user/user_login` (seed 004) and the
//! admin surface (`/admin/*`, admin role or the admin listener).

use super::ctx::RequestCtx;
use super::{read_body, respond};
use crate::errors::GatewayError;
use crate::state::{AppState, Live};
use infergate_filters::Rejection;
use pingora_proxy::Session;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::IpAddr;

/// Login bodies are small; anything larger is not a login.
const LOGIN_BODY_LIMIT: u64 = 16 * 1024;

/// `/admin/*` without any protection configured.
pub fn needs_protection() -> Rejection {
    Rejection::new(
        403,
        "invalid_request_error",
        "admin_disabled",
        "Admin endpoints need an admin credential: configure the `auth` filter with a key or user whose role is admin, or set server.admin_listen to a private address.",
    )
}

fn not_configured(what: &str) -> GatewayError {
    GatewayError::rejected(Rejection::new(
        404,
        "invalid_request_error",
        "not_configured",
        format!("{what} is not configured on this gateway (see docs/auth.md)."),
    ))
}

#[derive(Deserialize)]
struct Credentials {
    email: String,
    password: String,
}

/// `POST /user/user_login` `{"email","password"}` →
/// `{"success":true,"data":{"token","version","user_id"}}`.
pub async fn login(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    ip: Option<IpAddr>,
) -> Result<(), GatewayError> {
    let Some(auth) = app.auth.clone() else {
        return Err(not_configured("Login"));
    };
    auth.check_login_rate(ip).map_err(GatewayError::rejected)?;
    if let Some(limits) = &app.limits {
        // with `limits.store: redis`, every replica's attempts count
        let scope = infergate_filters::auth::Auth::login_scope(ip);
        if let Some(wait) = limits
            .check_login(&scope, auth.login_attempts_per_minute())
            .await
            .map_err(GatewayError::rejected)?
        {
            return Err(GatewayError::rejected(
                infergate_filters::auth::login_refused(wait),
            ));
        }
    }
    let body = read_small_body(app, session).await?;
    ctx.request_bytes = body.len();
    // serde's messages can quote the input: never let a password reach one
    let credentials: Credentials =
        serde_json::from_slice(&body).map_err(|_| GatewayError::InvalidJson {
            detail: r#"send {"email": "...", "password": "..."} as JSON"#.to_string(),
        })?;
    // argon2 takes tens of milliseconds of CPU: keep it off the proxy's threads
    let grant = tokio::task::spawn_blocking(move || {
        auth.login(&credentials.email, &credentials.password)
            .map_err(Box::new)
    })
    .await
    .map_err(|_| GatewayError::Internal {
        detail: "the login worker failed".into(),
    })?
    .map_err(GatewayError::Rejected)?;
    let body = json!({
        "success": true,
        "data": {"token": grant.token, "version": grant.version, "user_id": grant.user_id},
    });
    ctx.user = Some(format!("user:{}", grant.user_id));
    respond::answer(session, ctx, 200, body.to_string().into_bytes()).await
}

/// `POST /admin/reload-keys`: re-read the keys and users files. A file that
/// fails to parse or validate changes nothing; the answer says why.
pub async fn reload_keys(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    let Some(auth) = app.auth.clone() else {
        return Err(not_configured("The auth filter"));
    };
    let outcome = tokio::task::spawn_blocking(move || auth.reload())
        .await
        .map_err(|_| GatewayError::Internal {
            detail: "the reload worker failed".into(),
        })?;
    crate::state::keys_reloaded(&app.metrics, "POST /admin/reload-keys", &outcome);
    match outcome {
        Ok(report) => {
            let body = json!({
                "success": true,
                "keys": report.keys,
                "users": report.users,
                "warnings": report.warnings,
            });
            respond::answer(session, ctx, 200, body.to_string().into_bytes()).await
        }
        Err(reason) => Err(reload_failed(&reason)),
    }
}

/// 422 `reload_failed`: the file was refused and nothing changed.
fn reload_failed(reason: &str) -> GatewayError {
    GatewayError::rejected(Rejection::new(
        422,
        "invalid_request_error",
        "reload_failed",
        format!("Nothing was changed: {reason}"),
    ))
}

/// `POST /admin/reload`: read the config file again and apply it (the same
/// as SIGHUP). 200 with what changed; 422 `reload_failed` with the reason
/// when the file is bad (nothing changes).
pub async fn reload_config(
    live: &Live,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    match live.reload("POST /admin/reload").await {
        Ok(report) => {
            let body = json!({
                "success": true,
                "generation": report.generation,
                "changes": report.changes,
                "restart_required": report.restart_required,
                "warnings": report.warnings,
            });
            respond::answer(session, ctx, 200, body.to_string().into_bytes()).await
        }
        Err(reason) => Err(reload_failed(&reason)),
    }
}

fn unknown_engine(id: &str) -> GatewayError {
    GatewayError::rejected(Rejection {
        param: Some("model_id"),
        ..Rejection::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!(
                "No managed engine serves `{}`; GET /admin/engines lists them.",
                id.chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect::<String>()
            ),
        )
    })
}

/// `POST /admin/models/{id}/load` → `{"success":true,"model_id","port","status":"running"}`
/// once the engine is ready (seed 000).
pub async fn load_model(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    id: &str,
) -> Result<(), GatewayError> {
    let Some(engine) = app.engines.find(id) else {
        return Err(unknown_engine(id));
    };
    let address = app
        .engines
        .load(&engine)
        .await
        .map_err(GatewayError::Engine)?;
    let body = json!({
        "success": true,
        "model_id": engine.spec.name,
        "port": address.port(),
        "status": "running",
    });
    respond::answer(session, ctx, 200, body.to_string().into_bytes()).await
}

/// `POST /admin/models/{id}/unload` → `{"success":true,"model_id"}` once the
/// engine has stopped (in-flight requests finish first, up to the grace).
pub async fn unload_model(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    id: &str,
) -> Result<(), GatewayError> {
    let Some(engine) = app.engines.find(id) else {
        return Err(unknown_engine(id));
    };
    app.engines.unload(&engine).await;
    let body = json!({"success": true, "model_id": engine.spec.name});
    respond::answer(session, ctx, 200, body.to_string().into_bytes()).await
}

fn adapter_error(base: &str, e: crate::engines::AdapterError) -> GatewayError {
    use crate::engines::AdapterError as A;
    match e {
        A::NotEnabled => GatewayError::rejected(Rejection::new(
            400,
            "invalid_request_error",
            "lora_not_enabled",
            format!("The engine for `{base}` was not started with LoRA support: set `enable_lora: true` (kind vllm) in its engines entry."),
        )),
        A::Unknown => GatewayError::rejected(Rejection::new(
            404,
            "invalid_request_error",
            "lora_not_found",
            format!("`{base}` has no such LoRA adapter; GET /v1/models lists them."),
        )),
        A::Start(e) => GatewayError::Engine(e),
        A::Engine { status, message } => GatewayError::rejected(Rejection::new(
            if status >= 500 { 502 } else { status },
            if status >= 500 { "upstream_error" } else { "invalid_request_error" },
            "lora_failed",
            format!(
                "The engine refused the adapter: {}",
                message.chars().filter(|c| !c.is_control()).take(300).collect::<String>()
            ),
        )),
    }
}

#[derive(Deserialize)]
struct LoraRequest {
    lora_name: String,
    lora_path: String,
}

/// `POST /admin/models/{base}/lora` `{"lora_name","lora_path"}` →
/// `{"success":true,"model_id":base,"lora_name"}`.
pub async fn load_lora(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    base: &str,
) -> Result<(), GatewayError> {
    let Some(engine) = app.engines.find(base) else {
        return Err(unknown_engine(base));
    };
    let body = read_small_body(app, session).await?;
    let request: LoraRequest =
        serde_json::from_slice(&body).map_err(|e| GatewayError::InvalidJson {
            detail: format!(r#"send {{"lora_name": "...", "lora_path": "..."}} ({e})"#),
        })?;
    if request.lora_name.is_empty() || request.lora_name.contains(char::is_control) {
        return Err(GatewayError::InvalidJson {
            detail: "lora_name must be a non-empty printable name".into(),
        });
    }
    app.engines
        .load_adapter(&engine, &request.lora_name, &request.lora_path)
        .await
        .map_err(|e| adapter_error(base, e))?;
    let body =
        json!({"success": true, "model_id": engine.spec.name, "lora_name": request.lora_name});
    respond::answer(session, ctx, 200, body.to_string().into_bytes()).await
}

/// `DELETE /admin/models/{base}/lora/{name}` → `{"success":true,"model_id","lora_name"}`.
pub async fn unload_lora(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    base: &str,
    name: &str,
) -> Result<(), GatewayError> {
    let Some(engine) = app.engines.find(base) else {
        return Err(unknown_engine(base));
    };
    app.engines
        .unload_adapter(&engine, name)
        .await
        .map_err(|e| adapter_error(base, e))?;
    let body = json!({"success": true, "model_id": engine.spec.name, "lora_name": name});
    respond::answer(session, ctx, 200, body.to_string().into_bytes()).await
}

/// `GET /admin/usage`: every principal's limits state and quota. With
/// `limits.store: redis`, `quota_used` is Redis' shared total (all
/// replicas), and `store` says whether it answered.
pub async fn usage_body(app: &AppState) -> Vec<u8> {
    let Some(limits) = &app.limits else {
        let principals = app.auth.as_ref().map_or(0, |a| a.identities().len());
        return json!({"object": "list", "principals": principals, "data": []})
            .to_string()
            .into_bytes();
    };
    let mut rows = limits.snapshot();
    let mut store = Value::Null;
    if let Some(redis) = limits.redis() {
        store = match redis.quota_totals().await {
            Ok(totals) => {
                for row in &mut rows {
                    row.quota_used = totals.get(&row.id).copied().unwrap_or(0);
                }
                let known: std::collections::HashSet<String> =
                    rows.iter().map(|r| r.id.clone()).collect();
                for (id, used) in totals {
                    if !known.contains(&id) {
                        rows.push(infergate_filters::limits::PrincipalStatus::unseen(id, used));
                    }
                }
                rows.sort_by(|a, b| a.id.cmp(&b.id));
                json!({"kind": "redis", "status": "up"})
            }
            Err(e) => json!({"kind": "redis", "status": "down", "error": e.to_string()}),
        };
    }
    let principals = app.auth.as_ref().map_or(0, |a| a.identities().len());
    let data = serde_json::to_value(rows).unwrap_or_default();
    json!({"object": "list", "principals": principals, "data": data, "store": store})
        .to_string()
        .into_bytes()
}

/// A small admin body (login, LoRA requests): at most `LOGIN_BODY_LIMIT`
/// bytes within `server.client_body_timeout`, outside the body budget (it
/// is bounded by its own small limit).
async fn read_small_body(
    app: &AppState,
    session: &mut Session,
) -> Result<bytes::Bytes, GatewayError> {
    read_body::read_full_body(
        session,
        LOGIN_BODY_LIMIT,
        None,
        app.config.server.client_body_timeout,
    )
    .await
}

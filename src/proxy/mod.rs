//! The Pingora `ProxyHttp` implementation: the only code that touches a
//! Pingora `Session`.
//!
//! Hooks stay thin. `request_filter` runs the filter chain, classifies the
//! endpoint and either answers locally (`/v1/models`, `/health`) or reads the
//! whole body, resolves `model` → pool and hands off to [`forward`]. It always
//! answers itself (returns `Ok(true)`), so `upstream_peer` is never reached:
//! see docs/adr/0001-body-pre-read.md for why. `logging` writes the access
//! line for every request, success, error or disconnect.

mod ctx;
mod endpoint;
mod forward;
mod read_body;
mod respond;
mod sockopt;
mod upstream_error;

pub use ctx::RequestCtx;
pub use endpoint::{classify, Endpoint};

use crate::body::{extract_model, rewrite_model};
use crate::catalog;
use crate::errors::GatewayError;
use crate::state::AppState;
use async_trait::async_trait;
use bytes::Bytes;
use infergate_filters::Headers;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};
use std::sync::Arc;

pub struct Gateway {
    pub app: Arc<AppState>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // While we wait on an engine we watch the client socket for a close.
        // A keep-alive client that already holds its whole response may send
        // its next request meanwhile; with pipelining on, Pingora keeps those
        // bytes for the next request instead of dropping them.
        session.as_downstream_mut().set_pipelining_enabled(true);
        // A client that stops reading must not pin an engine forever.
        session.set_write_timeout(Some(self.app.config.timeouts.idle));
        handle(&self.app, session, ctx).await;
        if ctx.client_gone || !session.is_body_done() {
            // the client left, a write failed, or we answered without draining
            // the body: the connection cannot be reused
            session.set_keepalive(None);
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // request_filter answers every request; reaching here is a bug, not a panic
        Error::e_explain(
            ErrorType::InternalError,
            "upstream_peer is not used by infergate",
        )
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let req = session.req_header();
        log::info!(
            target: "access",
            "{} {} {} status={} dur_ms={:.3} ttfb_ms={} endpoint={} model={} pool={} backend={} req_bytes={} resp_bytes={} error={} client_gone={}{}",
            ctx.request_id(),
            req.method,
            req.uri.path(),
            ctx.status,
            ctx.started.elapsed().as_secs_f64() * 1000.0,
            ctx.first_byte_at.map_or("-".to_string(), |t| format!("{:.3}", (t - ctx.started).as_secs_f64() * 1000.0)),
            ctx.endpoint,
            ctx.model.as_deref().unwrap_or("-"),
            ctx.pool.as_deref().unwrap_or("-"),
            ctx.backend.map_or("-".to_string(), |b| b.to_string()),
            ctx.request_bytes,
            ctx.response_bytes,
            ctx.error_code.unwrap_or("-"),
            ctx.client_gone,
            error.map_or(String::new(), |e| format!(" pingora_error={e}")),
        );
        if let Some(guard) = ctx.inflight.take() {
            guard
                .state()
                .record_duration(ctx.started.elapsed().as_micros() as u64);
        }
    }
}

struct HeaderAdapter<'a>(&'a mut RequestHeader);

impl Headers for HeaderAdapter<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn set(&mut self, name: &'static str, value: &str) {
        let _ = self.0.insert_header(name, value);
    }
}

/// Answer one request; every outcome is written to the client here.
async fn handle(app: &AppState, session: &mut Session, ctx: &mut RequestCtx) {
    let outcome = route_and_forward(app, session, ctx).await;
    if let Err(error) = outcome {
        if respond::write_error(session, ctx, &error).await.is_err() {
            ctx.client_gone = true;
        }
    }
}

async fn route_and_forward(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    app.chain
        .run(
            &mut HeaderAdapter(session.req_header_mut()),
            &mut ctx.filters,
        )
        .map_err(GatewayError::Rejected)?;
    let endpoint = classify(
        session.req_header().method.as_str(),
        session.req_header().uri.path(),
    )?;
    ctx.endpoint = endpoint.label();
    match endpoint {
        Endpoint::ListModels => answer(session, ctx, 200, catalog::list_body(app)).await,
        Endpoint::GetModel(id) => match catalog::model_body(app, &id) {
            Some(body) => answer(session, ctx, 200, body).await,
            None => Err(GatewayError::UnknownModel { model: id }),
        },
        Endpoint::GatewayHealth => {
            let (status, body) = catalog::health_body(app);
            answer(session, ctx, status, body).await
        }
        Endpoint::Live => answer(session, ctx, 200, br#"{"alive":true}"#.to_vec()).await,
        Endpoint::Ready => {
            let (status, body) = catalog::ready_body(app);
            answer(session, ctx, status, body).await
        }
        Endpoint::Services => answer(session, ctx, 200, catalog::services_body(app)).await,
        Endpoint::Stats => answer(session, ctx, 200, catalog::stats_body(app)).await,
        Endpoint::Inference(_) => {
            let body = read_body::read_full_body(session, app.config.server.max_request_body_bytes)
                .await?;
            ctx.request_bytes = body.len();
            let field = extract_model(&body)?;
            proxy_to_model(app, session, ctx, body, Some(field)).await
        }
        Endpoint::OtherV1 => {
            let body = read_body::read_full_body(session, app.config.server.max_request_body_bytes)
                .await?;
            ctx.request_bytes = body.len();
            // a body that is not a JSON object with a model (multipart, empty) goes to the default pool
            let field = extract_model(&body).ok();
            proxy_to_model(app, session, ctx, body, field).await
        }
    }
}

async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Vec<u8>,
) -> Result<(), GatewayError> {
    if respond::write_json(session, ctx, status, body, &[])
        .await
        .is_err()
    {
        ctx.client_gone = true;
    }
    Ok(())
}

async fn proxy_to_model(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    body: Bytes,
    field: Option<crate::body::ModelField>,
) -> Result<(), GatewayError> {
    let (pool_index, body) = match field {
        Some(field) => {
            let route =
                app.router
                    .resolve_pool(&field.name)
                    .ok_or_else(|| GatewayError::UnknownModel {
                        model: field.name.clone(),
                    })?;
            let body = match &route.rewrite_to {
                Some(served) => Bytes::from(rewrite_model(&body, &field, served)),
                None => body,
            };
            ctx.model = Some(field.name);
            (route.pool, body)
        }
        None => (
            app.router
                .default_pool()
                .ok_or(GatewayError::MissingModel)?,
            body,
        ),
    };
    let pool = app
        .router
        .pool(pool_index)
        .ok_or(GatewayError::MissingModel)?
        .clone();
    ctx.pool = Some(pool.name().to_string());
    forward::forward(app, session, ctx, &pool, body).await
}

//! The Pingora `ProxyHttp` implementation: the only code that touches a
//! Pingora `Session`.
//!
//! Hooks stay thin. `request_filter` runs the filter chain, classifies the
//! endpoint and either answers locally (`/v1/models`, `/health`) or reads the
//! whole body, resolves `model` → pool and hands off to [`forward`]. It
//! answers itself (returns `Ok(true)`), so `upstream_peer` is not reached
//! (docs/adr/0001-body-pre-read.md says why), except for a WebSocket
//! upgrade, which returns `Ok(false)` and goes through Pingora's own proxy
//! path (`upstream_peer`) as a tunnel. `logging` writes the access
//! line for every request, success, error or disconnect.

mod admin;
pub mod connections;
mod ctx;
mod endpoint;
mod forward;
mod read_body;
mod respond;
mod sockopt;
mod upstream_error;

pub use ctx::RequestCtx;
pub use endpoint::{classify, Endpoint};

use crate::access_log::Record;
use crate::body::{apply_edits, include_usage_edit, inspect, model_edit, BodyInfo};
use crate::catalog;
use crate::errors::GatewayError;
use crate::metrics::Finished;
use crate::state::{AppState, Live};
use async_trait::async_trait;
use bytes::Bytes;
use infergate_filters::limits::Usage;
use infergate_filters::{Access, AdmitInfo, Flow, Request};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};
use std::net::IpAddr;
use std::sync::Arc;

pub struct Gateway {
    live: Arc<Live>,
    /// Shared by every generation (the `logging` hook needs no generation).
    metrics: Arc<crate::metrics::Metrics>,
    access_log: Arc<crate::access_log::AccessLog>,
    /// `server.max_connections` for the listener this instance serves
    /// (`None` on the side listeners).
    connections: Option<Arc<connections::ConnectionLimit>>,
}

impl Gateway {
    pub fn new(live: Arc<Live>, connections: Option<Arc<connections::ConnectionLimit>>) -> Gateway {
        let app = live.current();
        Gateway {
            metrics: app.metrics.clone(),
            access_log: app.access_log.clone(),
            live,
            connections,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    fn request_header_timeout(&self, reused: bool) -> Option<std::time::Duration> {
        let app = self.live.current();
        let server = &app.config.server;
        // a reused connection first waits (idle) up to the keep-alive timeout
        Some(if reused {
            server.client_header_timeout + server.keepalive_timeout
        } else {
            server.client_header_timeout
        })
    }

    fn request_header_timeout_body(&self) -> (Bytes, &'static str) {
        let after = self.live.current().config.server.client_header_timeout;
        let error = GatewayError::ClientTimeout {
            what: "request head",
            after,
        };
        (Bytes::from(error.spec().body()), "application/json")
    }

    /// A marker, so the next request on a reused connection is known as such
    /// (its head timeout includes the keep-alive idle wait). A box of a
    /// zero-sized value does not allocate.
    fn persist_connection_context(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        Some(Box::new(()))
    }

    fn downstream_connection_closed(&self) {
        if let Some(connections) = &self.connections {
            connections.closed();
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // While we wait on an engine we watch the client socket for a close.
        // A keep-alive client that already holds its whole response may send
        // its next request meanwhile; with pipelining on, Pingora keeps those
        // bytes for the next request instead of dropping them.
        session.as_downstream_mut().set_pipelining_enabled(true);
        // The config this request runs on to its end, whatever reloads happen.
        let app = self.live.current();
        if self.live.closing.load(std::sync::atomic::Ordering::Relaxed) {
            // handing over or stopping: this connection ends with this response
            // (`Connection: close`), so the client does not send its next
            // request on a connection about to close
            session.set_keepalive(None);
        }
        // A client that stops reading must not pin an engine forever.
        session.set_write_timeout(Some(app.config.timeouts.idle));
        if !self.live.closing.load(std::sync::atomic::Ordering::Relaxed)
            && session.as_downstream().get_keepalive().is_some()
        {
            // Pingora keeps an idle HTTP/1.1 connection open for ever by
            // default; close it after server.keepalive_timeout
            session.set_keepalive(Some(app.config.server.keepalive_timeout.as_secs().max(1)));
        }
        self.metrics.http_active.inc();
        ctx.counted_active = true;
        handle(&self.live, &app, session, ctx).await;
        if ctx.websocket_upstream.is_some() {
            // Pingora proxies the upgrade and then the frames both ways
            return Ok(false);
        }
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
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // request_filter answers every request but WebSocket upgrades
        let Some(address) = ctx.websocket_upstream else {
            return Error::e_explain(
                ErrorType::InternalError,
                "upstream_peer is only used for WebSocket upgrades",
            );
        };
        let app = self.live.current();
        let mut peer = HttpPeer::new(address, false, String::new());
        peer.options.connection_timeout = Some(app.config.timeouts.connect);
        // a WebSocket may stay quiet for long: no read/idle timeout on it
        Ok(Box::new(peer))
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> pingora_proxy::FailToProxy {
        // only WebSocket upgrades reach Pingora's proxy path: answer in OpenAI's shape
        log::warn!(
            "request {}: WebSocket proxy to {:?} failed: {e}",
            ctx.request_id(),
            ctx.websocket_upstream
        );
        let error = GatewayError::UpstreamFailed {
            detail: format!("the WebSocket upgrade failed ({})", e.etype().as_str()),
        };
        let code = if session.response_written().is_some() {
            0 // the 101 went out: the connection just ends
        } else {
            let written = respond::write_error(session, ctx, &error).await;
            if written.is_err() {
                ctx.client_gone = true;
            }
            error.spec().error.status
        };
        pingora_proxy::FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.status == 0 {
            // proxied by Pingora (WebSocket): what went to the client
            if let Some(response) = session.response_written() {
                ctx.status = response.status.as_u16();
            }
        }
        let usage = settle_usage(ctx);
        let req = session.req_header();
        if ctx.counted_active {
            self.metrics.http_active.dec();
        }
        let error_type = match (ctx.error_code, ctx.status) {
            (Some(code), _) => Some(code),
            (None, s) if s >= 400 => Some(upstream_error_label(s)),
            _ => None,
        };
        self.metrics.record_request(&Finished {
            method: req.method.as_str(),
            endpoint: ctx.endpoint,
            status: ctx.status,
            duration_s: ctx.started.elapsed().as_secs_f64(),
            error: error_type,
            limited: ctx.limited,
            proxied: ctx.proxied,
            model: ctx.model.as_deref(),
            user: ctx.user.as_deref(),
            tokens: usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        });
        if self.access_log.is_enabled() {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
            self.access_log.write(&Record {
                time: String::new(),
                request_id: ctx.request_id(),
                client: session.client_addr().map(|a| a.to_string()),
                user: ctx.user.as_deref(),
                method: req.method.as_str(),
                path: req.uri.path(),
                status: ctx.status,
                duration_ms: ms(ctx.started.elapsed()),
                endpoint: ctx.endpoint,
                model: ctx.model.as_deref(),
                pool: ctx.pool.as_deref(),
                backend: ctx.backend.map(|b| b.to_string()),
                prompt_tokens: usage.map(|u| u.prompt_tokens),
                completion_tokens: usage.map(|u| u.completion_tokens),
                usage: usage.map(|u| if u.estimated { "estimated" } else { "reported" }),
                ttft_ms: ctx
                    .first_chunk_at
                    .or(ctx.first_byte_at)
                    .map(|t| ms(t - ctx.started)),
                request_bytes: ctx.request_bytes as u64,
                response_bytes: ctx.response_bytes as u64,
                stream: ctx.stream,
                error: error_type,
                client_gone: ctx.client_gone,
                queue_ms: ctx.queue_wait.map(ms),
                retries: ctx.retries,
                fallback: ctx.fallback.as_deref(),
            });
        }
        if let Some(e) = error {
            log::debug!("request {}: pingora error {e}", ctx.request_id());
        }
        if let Some(guard) = ctx.inflight.take() {
            guard
                .state()
                .record_duration(ctx.started.elapsed().as_micros() as u64);
        }
    }
}

/// `http_errors_total{type}` for an engine's own error status.
fn upstream_error_label(status: u16) -> &'static str {
    match status {
        400 => "upstream_400",
        401 => "upstream_401",
        403 => "upstream_403",
        404 => "upstream_404",
        408 => "upstream_408",
        413 => "upstream_413",
        422 => "upstream_422",
        429 => "upstream_429",
        500 => "upstream_500",
        502 => "upstream_502",
        503 => "upstream_503",
        504 => "upstream_504",
        s if s < 500 => "upstream_4xx",
        _ => "upstream_5xx",
    }
}

/// The request ended: turn its token reservation into real usage.
///
/// - the engine reported usage: that;
/// - the response started but usage never came (the client left, the engine
///   broke): the prompt estimate plus the content events seen, marked
///   estimated;
/// - nothing reached the client (an error before the response): no usage,
///   and dropping the admission refunds the reservation.
fn settle_usage(ctx: &mut RequestCtx) -> Option<Usage> {
    let reported = ctx.tap.usage();
    let usage = match reported {
        Some(counts) => Some(Usage {
            prompt_tokens: counts.prompt_tokens,
            completion_tokens: counts.completion_tokens,
            estimated: false,
        }),
        None if ctx.first_byte_at.is_some() && ctx.status > 0 && ctx.status < 400 => Some(Usage {
            prompt_tokens: ctx.prompt_estimate,
            completion_tokens: ctx.tap.content_events(),
            estimated: true,
        }),
        None => None,
    };
    if let Some(admission) = ctx.filters.admission.take() {
        match usage {
            Some(usage) => admission.settle(usage),
            None => drop(admission),
        }
    }
    usage
}

/// The request as filters see it.
struct FilterView<'a> {
    header: &'a mut RequestHeader,
    access: Access,
    client_ip: Option<IpAddr>,
}

impl Request for FilterView<'_> {
    fn method(&self) -> &str {
        self.header.method.as_str()
    }
    fn path(&self) -> &str {
        self.header.uri.path()
    }
    fn query(&self) -> Option<&str> {
        self.header.uri.query()
    }
    fn set_query(&mut self, query: Option<&str>) {
        let path = self.header.uri.path().to_string();
        let target = match query {
            Some(q) if !q.is_empty() => format!("{path}?{q}"),
            _ => path,
        };
        if let Ok(uri) = http::Uri::builder().path_and_query(target).build() {
            self.header.set_uri(uri);
        }
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.header.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn set_header(&mut self, name: &'static str, value: &str) {
        let _ = self.header.insert_header(name, value);
    }
    fn remove_header(&mut self, name: &str) {
        let _ = self.header.remove_header(name);
    }
    fn access(&self) -> Access {
        self.access
    }
    fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }
}

/// Answer one request; every outcome is written to the client here.
async fn handle(live: &Live, app: &AppState, session: &mut Session, ctx: &mut RequestCtx) {
    let outcome = route_and_forward(live, app, session, ctx).await;
    if let Err(error) = outcome {
        if let GatewayError::Rejected(r) = &error {
            ctx.limited = r.limit;
        }
        let written = if ctx.sse_started {
            // the stream's header already went out (engine start keep-alive)
            let spec = error.spec();
            ctx.error_code = Some(spec.error.code);
            log::log!(
                spec.log_level,
                "request {} failed after the stream started: {} {}",
                ctx.request_id(),
                spec.error.status,
                spec.error.code
            );
            respond::write_sse_error_event(session, &spec.body()).await
        } else {
            respond::write_error(session, ctx, &error).await
        };
        if written.is_err() {
            ctx.client_gone = true;
        }
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Which of the optional side listeners (admin, metrics) the request came in on.
fn side_listeners(app: &AppState, session: &Session) -> (bool, bool) {
    let local = session
        .server_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.port());
    let on = |addr: Option<std::net::SocketAddr>| {
        addr.is_some_and(|a| Some(a.port()) == local && a.port() != app.config.server.listen.port())
    };
    (
        on(app.config.server.admin_listen),
        on(app.config.server.metrics_listen),
    )
}

/// Whether this listener serves this request: `/admin/*` and `/metrics` live
/// only on their own listener when one is configured, and side listeners
/// serve nothing but their own endpoints and the status pages.
fn served_here(
    app: &AppState,
    access: Access,
    is_metrics: bool,
    admin: bool,
    metrics: bool,
) -> bool {
    let server = &app.config.server;
    if access == Access::Admin {
        return server.admin_listen.is_none() || admin;
    }
    if is_metrics {
        return server.metrics_listen.is_none() || metrics;
    }
    if admin || metrics {
        return access == Access::Public;
    }
    true
}

async fn route_and_forward(
    live: &Live,
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    normalize_path(session.req_header_mut())?;
    let classified = if is_websocket_upgrade(session.req_header()) {
        Ok(Endpoint::WebSocket)
    } else {
        classify(
            session.req_header().method.as_str(),
            session.req_header().uri.path(),
            &app.config.routing.paths,
        )
    };
    let access = match &classified {
        Ok(endpoint) => {
            ctx.endpoint = endpoint.label();
            endpoint.access()
        }
        Err(_) => endpoint::access_for_path(session.req_header().uri.path()),
    };
    let (admin_listener, metrics_listener) = side_listeners(app, session);
    let is_metrics = matches!(classified, Ok(Endpoint::Metrics));
    if !served_here(app, access, is_metrics, admin_listener, metrics_listener) {
        return Err(GatewayError::UnknownPath {
            path: session.req_header().uri.path().to_string(),
        });
    }
    let ip = client_ip(session);
    let flow = app
        .chain
        .on_request(
            &mut FilterView {
                header: session.req_header_mut(),
                access,
                client_ip: ip,
            },
            &mut ctx.filters,
        )
        .map_err(GatewayError::rejected)?;
    if let Flow::Respond(local) = flow {
        if respond::write_local(session, ctx, local).await.is_err() {
            ctx.client_gone = true;
        }
        return Ok(());
    }
    ctx.user = ctx.filters.identity.as_ref().map(|i| i.user.clone());
    if access == Access::Admin && app.auth.is_none() && !admin_listener {
        return Err(GatewayError::rejected(admin::needs_protection()));
    }
    let endpoint = classified?;
    ctx.endpoint = endpoint.label();
    match endpoint {
        Endpoint::ListModels => {
            let body = catalog::list_body(app, ctx.filters.identity.as_deref());
            respond::answer(session, ctx, 200, body).await
        }
        Endpoint::GetModel(id) => {
            match catalog::model_body(app, &id, ctx.filters.identity.as_deref()) {
                Some(body) => respond::answer(session, ctx, 200, body).await,
                None => Err(GatewayError::UnknownModel { model: id }),
            }
        }
        Endpoint::GatewayHealth => {
            let (status, body) = catalog::health_body(app);
            respond::answer(session, ctx, status, body).await
        }
        Endpoint::Live => respond::answer(session, ctx, 200, br#"{"alive":true}"#.to_vec()).await,
        Endpoint::Ready => {
            let (status, body) = catalog::ready_body(app);
            respond::answer(session, ctx, status, body).await
        }
        Endpoint::Services => respond::answer(session, ctx, 200, catalog::services_body(app)).await,
        Endpoint::Stats => respond::answer(session, ctx, 200, catalog::stats_body(app)).await,
        Endpoint::Login => admin::login(app, session, ctx, ip).await,
        Endpoint::AdminModelLoad(id) => admin::load_model(app, session, ctx, &id).await,
        Endpoint::AdminModelUnload(id) => admin::unload_model(app, session, ctx, &id).await,
        Endpoint::AdminLoraLoad(base) => admin::load_lora(app, session, ctx, &base).await,
        Endpoint::AdminLoraUnload(base, name) => {
            admin::unload_lora(app, session, ctx, &base, &name).await
        }
        Endpoint::AdminEngines => {
            let body = serde_json::json!({"object": "list", "data": app.engines.status()});
            respond::answer(session, ctx, 200, body.to_string().into_bytes()).await
        }
        Endpoint::AdminReloadKeys => admin::reload_keys(app, session, ctx).await,
        Endpoint::AdminReload => admin::reload_config(live, session, ctx).await,
        Endpoint::AdminUsage => {
            let body = admin::usage_body(app).await;
            respond::answer(session, ctx, 200, body).await
        }
        Endpoint::Metrics => {
            app.metrics
                .buffered_body_bytes
                .set(i64::try_from(live.body_budget.used()).unwrap_or(i64::MAX));
            let body = app.metrics_text();
            let header = [(
                "content-type",
                "text/plain; version=0.0.4; charset=utf-8".to_string(),
            )];
            if respond::write_body(session, ctx, 200, body, &header)
                .await
                .is_err()
            {
                ctx.client_gone = true;
            }
            Ok(())
        }
        Endpoint::Inference(_) => {
            let body = read_body_within_budget(live, app, session, ctx).await?;
            ctx.request_bytes = body.len();
            let info = inspect(&body)?;
            let field = info.model.clone()?;
            proxy_to_model(app, session, ctx, body, Some(field), Some(&info)).await
        }
        Endpoint::WebSocket => websocket_target(app, session, ctx).await,
        Endpoint::OtherV1 | Endpoint::EngineInternal => {
            let body = read_body_within_budget(live, app, session, ctx).await?;
            ctx.request_bytes = body.len();
            // a body that is not a JSON object with a model (multipart, empty) goes to the default pool
            let info = inspect(&body).ok();
            let field = info.as_ref().and_then(|i| i.model.clone().ok());
            proxy_to_model(app, session, ctx, body, field, info.as_ref()).await
        }
    }
}

/// Read the whole body, holding its bytes in the body budget until the
/// request ends; a principal with a `concurrent` limit receives at most that
/// many bodies at once (checked before a byte is read).
async fn read_body_within_budget(
    live: &Live,
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<Bytes, GatewayError> {
    let principal = ctx
        .filters
        .identity
        .as_deref()
        .and_then(|i| i.limits.concurrent.map(|c| (i.id.as_str(), c)));
    let hold = ctx.body_hold.insert(live.body_budget.begin(principal)?);
    let server = &app.config.server;
    read_body::read_full_body(
        session,
        server.max_request_body_bytes,
        Some(hold),
        server.client_body_timeout,
    )
    .await
}

/// Normalise the request path in place (`crate::path`): everything after
/// this, the filters, the endpoint, the access log and the engine, sees the
/// normalised form. The query is kept as sent.
fn normalize_path(header: &mut RequestHeader) -> Result<(), GatewayError> {
    let normal = match crate::path::normalize(header.uri.path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(normal)) => normal,
        Err(reason) => return Err(GatewayError::InvalidPath { reason }),
    };
    let target = match header.uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let uri = http::Uri::builder()
        .path_and_query(target)
        .build()
        .map_err(|_| GatewayError::InvalidPath {
            reason: crate::path::PathError::BadEscape,
        })?;
    header.set_uri(uri);
    Ok(())
}

/// `GET` with `Upgrade: websocket` (and `Connection: upgrade`).
fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    let has = |name: &str, token: &str| {
        req.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    req.method == http::Method::GET && has("upgrade", "websocket") && has("connection", "upgrade")
}

/// The model a WebSocket names: `?model=` (as OpenAI's Realtime API does).
fn websocket_model(req: &RequestHeader) -> Option<String> {
    req.uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "model" && !v.is_empty()).then(|| crate::proxy::endpoint::percent_decode(v))
    })
}

/// Choose where a WebSocket upgrade goes: the pool (or managed engine) of
/// `?model=`, else the default pool, with the usual model access and limits
/// (a concurrency slot is held while the socket is open). Pingora then
/// proxies the upgrade to `ctx.websocket_upstream`.
async fn websocket_target(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), GatewayError> {
    let model = websocket_model(session.req_header());
    let (target, _served) = choose_target(app, ctx, model.as_deref())?;
    ctx.model = model;
    ctx.pool = Some(target.name().to_string());
    ctx.proxied = true;
    admit(app, ctx, 0, Some(0)).await?;
    let address = match target {
        Target::Engine(engine) => {
            let (address, engine_use) = app
                .engines
                .acquire(&engine)
                .await
                .map_err(GatewayError::Engine)?;
            ctx.engine_use = Some(engine_use);
            address
        }
        Target::Pool(pool) => {
            let guard =
                pool.pick_backend(None, &[])
                    .ok_or_else(|| GatewayError::NoHealthyBackend {
                        pool: pool.name().to_string(),
                    })?;
            let address = guard.state().address;
            ctx.inflight = Some(guard);
            address
        }
    };
    ctx.backend = Some(address);
    ctx.websocket_upstream = Some(address);
    Ok(())
}

/// The filters' admission (limits) once the target is known, for the model
/// in `ctx.model`; with `limits.store: redis`, the one Redis round trip.
async fn admit(
    app: &AppState,
    ctx: &mut RequestCtx,
    prompt_tokens_estimate: u64,
    max_output_tokens: Option<u64>,
) -> Result<(), GatewayError> {
    app.chain
        .on_admit(
            &AdmitInfo {
                model: ctx.model.as_deref(),
                prompt_tokens_estimate,
                max_output_tokens,
            },
            &mut ctx.filters,
        )
        .map_err(GatewayError::rejected)?;
    if let Some(admission) = ctx.filters.admission.as_mut().filter(|a| a.is_pending()) {
        let result = admission.complete().await;
        let headers = admission.rate_limit_headers().to_vec();
        if let Err(rejection) = result {
            // nothing is held: the refusal's own headers say what to do
            ctx.filters.admission = None;
            return Err(GatewayError::rejected(rejection));
        }
        ctx.filters.response_headers.extend(headers);
    }
    Ok(())
}

/// Rough prompt size before the engine counts it: JSON bytes / 4, the usual
/// bytes-per-token of English text (an over-estimate for JSON overhead, which
/// the settlement corrects).
fn prompt_estimate(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

/// How often a streaming client waiting for an engine start gets a comment.
/// A streaming client waiting in a pool's queue gets `: queued` this often.
const QUEUE_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(2);
const START_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(5);

/// Wait for an engine start while sending `: loading` SSE comments.
/// `None` when the client went away (nothing more to write).
async fn acquire_with_keepalive(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    engine: &Arc<crate::engines::Engine>,
) -> Option<Result<(std::net::SocketAddr, crate::engines::EngineUse), GatewayError>> {
    if respond::write_sse_header(session, ctx).await.is_err() {
        ctx.client_gone = true;
        return None;
    }
    let acquire = app.engines.acquire(engine);
    tokio::pin!(acquire);
    let mut tick = tokio::time::interval(START_KEEPALIVE);
    tick.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            result = &mut acquire => return Some(result.map_err(GatewayError::Engine)),
            _ = tick.tick() => {
                let comment = format!(": loading model {}\n\n", engine.spec.name);
                if session
                    .write_response_body(Some(Bytes::from(comment)), false)
                    .await
                    .is_err()
                {
                    ctx.client_gone = true;
                    return None;
                }
            }
        }
    }
}

/// Where a request goes: a pool of backends, or a managed engine.
enum Target {
    Pool(Arc<crate::routing::Pool>),
    Engine(Arc<crate::engines::Engine>),
}

impl Target {
    /// The pool's name, or the managed model's (the `pool` in logs and metrics).
    fn name(&self) -> &str {
        match self {
            Target::Pool(pool) => pool.name(),
            Target::Engine(engine) => &engine.spec.name,
        }
    }
}

/// Where `model` goes (managed engines first, then configured and discovered
/// pool names), or the default pool when the request names none; and the
/// name to send upstream when it differs (an alias). A model the caller may
/// not use gets the same 404 as one that does not exist.
fn choose_target(
    app: &AppState,
    ctx: &RequestCtx,
    model: Option<&str>,
) -> Result<(Target, Option<String>), GatewayError> {
    let Some(name) = model else {
        let pool = app
            .router
            .default_pool()
            .and_then(|index| app.router.pool(index))
            .ok_or(GatewayError::MissingModel)?;
        return Ok((Target::Pool(pool.clone()), None));
    };
    let unknown = || GatewayError::UnknownModel {
        model: name.to_string(),
    };
    let (target, served) = match app.engines.find(name) {
        Some(engine) => {
            // an alias is rewritten; a LoRA adapter's name is what the engine serves
            let served = engine
                .spec
                .aliases
                .contains_key(name)
                .then(|| engine.spec.name.clone());
            (Target::Engine(engine), served)
        }
        None => {
            let route = app.router.resolve_pool(name).ok_or_else(unknown)?;
            let pool = app
                .router
                .pool(route.pool)
                .ok_or(GatewayError::MissingModel)?
                .clone();
            (Target::Pool(pool), route.rewrite_to)
        }
    };
    if let Some(identity) = &ctx.filters.identity {
        let allowed =
            identity.may_use(name) || served.as_deref().is_some_and(|s| identity.may_use(s));
        if !allowed {
            return Err(unknown());
        }
    }
    Ok((target, served))
}

/// The request as the client sent it, for a retry on a fallback model.
struct FallbackFrom<'a> {
    body: Bytes,
    field: Option<crate::body::ModelField>,
    info: Option<&'a BodyInfo>,
    /// The served name the original model resolved to (an alias's target).
    served: Option<String>,
}

/// The model's pool has no healthy backend or a full queue: try the models
/// `fallbacks` lists for it, in order, among those the caller may use; the
/// response says which one answered in `x-infergate-fallback`. Only pools
/// (a managed engine starts on demand instead).
async fn fall_back(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    from: FallbackFrom<'_>,
    error: GatewayError,
) -> Result<(), GatewayError> {
    let (Some(field), Some(asked)) = (from.field.as_ref(), ctx.model.clone()) else {
        return Err(error);
    };
    let list = app.config.fallbacks.get(&asked).or_else(|| {
        from.served
            .as_ref()
            .and_then(|s| app.config.fallbacks.get(s))
    });
    let Some(list) = list.cloned() else {
        return Err(error);
    };
    let mut last = error;
    for candidate in list {
        let Ok((Target::Pool(pool), served)) = choose_target(app, ctx, Some(&candidate)) else {
            log::debug!(
                "request {}: fallback `{candidate}` is unknown, a managed engine, or not allowed for this caller",
                ctx.request_id()
            );
            continue;
        };
        let mut edits = vec![model_edit(field, served.as_deref().unwrap_or(&candidate))];
        if ctx.injected_usage {
            if let Some(edit) = from.info.and_then(|i| include_usage_edit(&from.body, i)) {
                edits.push(edit);
            }
        }
        let body = Bytes::from(apply_edits(&from.body, edits));
        let prompt = if pool.config.balance == crate::config::Balance::PrefixAware {
            let model = served.as_deref().unwrap_or(&candidate);
            prompt_key(session, ctx, &pool, &from.body, from.info, Some(model))
        } else {
            None
        };
        log::info!(
            "request {}: model `{asked}` unavailable ({}); falling back to `{candidate}`",
            ctx.request_id(),
            last.spec().error.code
        );
        ctx.pool = Some(pool.name().to_string());
        ctx.fallback = Some(candidate.clone());
        ctx.filters
            .response_headers
            .retain(|(name, _)| *name != FALLBACK_HEADER);
        ctx.filters
            .response_headers
            .push((FALLBACK_HEADER, candidate.clone()));
        match forward::forward(app, session, ctx, &pool, body, prompt).await {
            Err(
                e @ (GatewayError::NoHealthyBackend { .. }
                | GatewayError::QueueFull { .. }
                | GatewayError::QueueWouldWait { .. }),
            ) => {
                last = e;
            }
            other => {
                app.metrics.count_fallback(&asked, &candidate);
                return other;
            }
        }
    }
    ctx.fallback = None;
    ctx.filters
        .response_headers
        .retain(|(name, _)| *name != FALLBACK_HEADER);
    Err(last)
}

/// The response header naming the model a fallback served.
pub const FALLBACK_HEADER: &str = "x-infergate-fallback";

/// The prompt's block hashes for a `prefix_aware` pool, seeded with the
/// model the engine will see and the request's `tools`; and its session
/// (the pool's `hash_header`, or the caller's user, per `prefix_aware.session`).
fn prompt_key(
    session: &Session,
    ctx: &RequestCtx,
    pool: &crate::routing::Pool,
    body: &[u8],
    info: Option<&BodyInfo>,
    model: Option<&str>,
) -> Option<crate::routing::PromptKey> {
    let settings = &pool.config.prefix_aware;
    let span_bytes = |span: &Option<std::ops::Range<usize>>| {
        span.as_ref()
            .and_then(|r| body.get(r.clone()))
            .unwrap_or_default()
    };
    let info = info?;
    let prompt = span_bytes(&info.prompt_span);
    let seed = [
        model.unwrap_or_default().as_bytes(),
        span_bytes(&info.tools_span),
    ];
    let session_key = match settings.session {
        crate::config::SessionKey::Header => session
            .req_header()
            .headers
            .get(pool.config.hash_header.as_str())
            .map(|v| v.as_bytes()),
        crate::config::SessionKey::User => ctx.user.as_deref().map(str::as_bytes),
        crate::config::SessionKey::None => None,
    };
    Some(
        crate::routing::PromptKey::new(&seed, prompt, settings.block_bytes)
            .with_session(session_key),
    )
}

async fn proxy_to_model(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    body: Bytes,
    field: Option<crate::body::ModelField>,
    info: Option<&BodyInfo>,
) -> Result<(), GatewayError> {
    let (target, served) = choose_target(app, ctx, field.as_ref().map(|f| f.name.as_str()))?;
    let prompt = match &target {
        Target::Pool(pool) if pool.config.balance == crate::config::Balance::PrefixAware => {
            let upstream_model = served
                .as_deref()
                .or(field.as_ref().map(|f| f.name.as_str()));
            prompt_key(session, ctx, pool, &body, info, upstream_model)
        }
        _ => None,
    };
    let mut edits = match (&field, &served) {
        (Some(field), Some(served)) => vec![model_edit(field, served)],
        _ => Vec::new(),
    };
    ctx.model = field.as_ref().map(|f| f.name.clone());
    let inject_usage = match &target {
        Target::Pool(pool) => pool.config.inject_stream_usage,
        Target::Engine(_) => true,
    };
    ctx.pool = Some(target.name().to_string());
    ctx.proxied = true;
    ctx.prompt_estimate = prompt_estimate(body.len());
    admit(
        app,
        ctx,
        ctx.prompt_estimate,
        info.and_then(|i| i.max_output_tokens),
    )
    .await?;
    if let Some(info) = info {
        ctx.stream = info.stream;
        if inject_usage {
            if let Some(edit) = include_usage_edit(&body, info) {
                edits.push(edit);
                ctx.injected_usage = true;
            }
        }
    }
    let original = body.clone();
    let body = if edits.is_empty() {
        body
    } else {
        Bytes::from(apply_edits(&body, edits))
    };
    if let Some(model) = &ctx.model {
        ctx.model_use = app.models.begin(model);
    }
    match target {
        Target::Pool(pool) => {
            match forward::forward(app, session, ctx, &pool, body, prompt).await {
                Err(
                    e @ (GatewayError::NoHealthyBackend { .. }
                    | GatewayError::QueueFull { .. }
                    | GatewayError::QueueWouldWait { .. }),
                ) => {
                    let asked = FallbackFrom {
                        body: original,
                        field,
                        info,
                        served,
                    };
                    fall_back(app, session, ctx, asked, e).await
                }
                other => other,
            }
        }
        Target::Engine(engine) => {
            // the first request to a stopped engine starts it and waits; a
            // streaming client gets SSE comments meanwhile
            let waiting_stream =
                ctx.stream && !matches!(engine.state(), crate::engines::State::Running(_));
            let (address, engine_use) = if waiting_stream {
                match acquire_with_keepalive(app, session, ctx, &engine).await {
                    Some(acquired) => acquired?,
                    None => return Ok(()), // the client left
                }
            } else {
                app.engines
                    .acquire(&engine)
                    .await
                    .map_err(GatewayError::Engine)?
            };
            ctx.engine_use = Some(engine_use);
            forward::forward_direct(app, session, ctx, address, body).await
        }
    }
}

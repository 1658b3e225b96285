//! Forwarding one request to an engine and streaming its answer back.
//!
//! The body is already in memory (see ADR 0001), so this module owns the
//! upstream exchange: pick a backend, connect (a refused or timed-out connect
//! moves on to another backend — nothing was sent yet), write the request,
//! wait for the first byte, then relay every chunk as it arrives. A client
//! that goes away at any point drops the engine connection at once, so the
//! engine stops generating. Nothing is replayed once body bytes may have
//! reached an engine, except on a pooled keep-alive connection the engine had
//! already closed (it never saw the request).

use super::ctx::RequestCtx;
use super::upstream_error;
use crate::errors::{GatewayError, TimeoutPhase};
use crate::routing::eject::Outcome;
use crate::routing::{Dispatch, Hints, Picked, Pool, Principal, PromptKey, Refusal, Want};
use crate::state::AppState;
use crate::usage::UsageTap;
use bytes::Bytes;
use infergate_filters::{Priority, Role};
use pingora_core::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora_core::protocols::http::v1::client::ONE_WRITE_BODY_MAX;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::ErrorType;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::time::timeout;
use xxhash_rust::xxh3::xxh3_64;

/// Request headers that describe one hop and must not be forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
];

/// Why the relay stopped early.
enum Interrupted {
    ClientGone,
    Upstream(GatewayError),
}

/// Forward `body` to a backend of `pool` and relay the response to the client.
///
/// `Err` means nothing was written to the client yet and the caller answers
/// with the error; once the response header went out, failures are handled
/// here (an SSE error event, or a cut connection).
pub async fn forward(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    pool: &Pool,
    body: Bytes,
    prompt: Option<PromptKey>,
) -> Result<(), GatewayError> {
    let request = upstream_request(session.req_header(), body.len())?;
    let hash_key = session
        .req_header()
        .headers
        .get(pool.config.hash_header.as_str())
        .map(|v| v.as_bytes().to_vec());
    let hints = Hints {
        hash_key: hash_key.as_deref(),
        prompt: prompt.as_ref(),
    };
    let want = || Want {
        hash_key: hash_key.clone(),
        prompt: prompt.clone(),
    };
    let Some(first) = acquire_slot(app, session, ctx, pool, &hints, want).await? else {
        return Ok(()); // the client left while queued
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut next = Some(first);
    let mut retries = 0;
    loop {
        let (mut upstream, peer) = send_request(
            app,
            ctx,
            pool,
            (&request, &body),
            &hints,
            &mut tried,
            next.take(),
        )
        .await?;
        let failure = match read_head(app, session, ctx, &mut upstream).await {
            Ok(None) => return Ok(()), // the client left; dropping `upstream` closes it
            Ok(Some(header)) => {
                let status = header.status.as_u16();
                record_outcome(ctx, status < 500);
                if !matches!(status, 502 | 503) {
                    relay_from_head(app, session, ctx, &mut upstream, header).await?;
                    break finish(app, ctx, upstream, &peer).await;
                }
                RetryCause::Status(status, header)
            }
            Err(e) => {
                record_outcome(ctx, false);
                if !matches!(e, GatewayError::UpstreamFailed { .. }) {
                    return Err(e); // a timeout: the engine may still be working on it
                }
                RetryCause::Broken(e)
            }
        };
        // the engine refused before any byte went to the client: another backend?
        let backend = ctx.backend;
        tried.extend(backend);
        let another = (retries < pool.config.retries && !ctx.sse_started)
            .then(|| pool.pick(&hints, &tried))
            .flatten()
            .filter(|_| pool.take_retry());
        match (another, failure) {
            (Some(picked), failure) => {
                retries += 1;
                ctx.retries += 1;
                let reason = failure.label();
                log::warn!(
                    "request {}: {} from {}; retrying on {} ({reason})",
                    ctx.request_id(),
                    failure.describe(),
                    backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
                    picked.guard.state().address
                );
                app.metrics.count_retry(pool.name(), reason);
                next = Some(picked);
            }
            (None, RetryCause::Status(_, header)) => {
                relay_from_head(app, session, ctx, &mut upstream, header).await?;
                break finish(app, ctx, upstream, &peer).await;
            }
            (None, RetryCause::Broken(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Why an exchange may be retried on another backend.
enum RetryCause {
    Status(u16, ResponseHeader),
    Broken(GatewayError),
}

impl RetryCause {
    fn label(&self) -> &'static str {
        match self {
            RetryCause::Status(502, _) => "status_502",
            RetryCause::Status(_, _) => "status_503",
            RetryCause::Broken(_) => "reset",
        }
    }

    fn describe(&self) -> String {
        match self {
            RetryCause::Status(status, _) => format!("status {status}"),
            RetryCause::Broken(e) => format!("{e:?}"),
        }
    }
}

/// After the response: keep the engine connection for the next request
/// when it is clean.
async fn finish(app: &AppState, ctx: &RequestCtx, mut upstream: UpstreamSession, peer: &HttpPeer) {
    if ctx.client_gone {
        return; // dropping `upstream` closes the engine connection
    }
    if upstream.is_body_done() {
        app.connector
            .release_http_session(upstream, peer, Some(app.config.upstream.keepalive_idle))
            .await;
    }
}

/// What the exchange said about the backend, for outlier detection.
fn record_outcome(ctx: &RequestCtx, ok: bool) {
    if let Some(guard) = &ctx.inflight {
        guard.record(if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        });
    }
}

/// A backend slot for the request: at once, or after waiting in the pool's
/// queue (a streaming client gets its SSE header and `: queued` comments
/// meanwhile). `None`: the client left while queued.
async fn acquire_slot(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    pool: &Pool,
    hints: &Hints<'_>,
    want: impl FnOnce() -> Want,
) -> Result<Option<Picked>, GatewayError> {
    let who = principal(session, ctx);
    let refused = |r: Refusal| refusal_error(pool, r);
    let mut ticket = match pool.dispatch(hints, want, who).map_err(refused)? {
        Dispatch::Now(picked) => {
            note_pick(app, pool, &picked);
            return Ok(Some(picked));
        }
        Dispatch::Wait(ticket) => ticket,
    };
    ctx.queued = true;
    let started = Instant::now();
    if ctx.stream
        && !ctx.sse_started
        && super::respond::write_sse_header(session, ctx)
            .await
            .is_err()
    {
        ctx.client_gone = true;
        return Ok(None);
    }
    // the first tick is immediate: a streaming client hears `: queued` at once
    let mut tick = tokio::time::interval(super::QUEUE_KEEPALIVE);
    let result = loop {
        tokio::select! {
            biased;
            result = ticket.wait() => break result,
            _ = client_closed(session) => {
                ctx.client_gone = true;
                log::info!("request {}: client left while queued; it never reached an engine", ctx.request_id());
                return Ok(None); // dropping the ticket leaves the queue
            }
            _ = tick.tick(), if ctx.sse_started => {
                let comment = Bytes::from_static(b": queued\n\n");
                if session.write_response_body(Some(comment), false).await.is_err() {
                    ctx.client_gone = true;
                    return Ok(None);
                }
            }
        }
    };
    ctx.queue_wait = Some(started.elapsed());
    app.metrics
        .queue_wait
        .with_label_values(&[pool.name()])
        .observe(started.elapsed().as_secs_f64());
    let picked = result.map_err(refused)?;
    note_pick(app, pool, &picked);
    Ok(Some(picked))
}

fn note_pick(app: &AppState, pool: &Pool, picked: &Picked) {
    if let Some(decision) = picked.decision {
        app.metrics
            .record_routing(pool.name(), decision, picked.matched_bytes);
    }
}

/// The queue's view of the caller: its principal (the key or user; the
/// client address without auth) and share; an admin may set the priority
/// of one request with `x-infergate-priority`.
fn principal(session: &Session, ctx: &RequestCtx) -> Principal {
    let identity = ctx.filters.identity.as_deref();
    let key = match identity {
        Some(id) => xxh3_64(id.id.as_bytes()),
        None => session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(0, |a| xxh3_64(a.ip().to_string().as_bytes())),
    };
    let mut share = identity.map(|i| i.share).unwrap_or_default();
    if identity.is_some_and(|i| i.role == Role::Admin) {
        let asked = session
            .req_header()
            .headers
            .get(PRIORITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Priority::parse(v).ok());
        if let Some(p) = asked {
            share.priority = p.0;
        }
    }
    Principal { key, share }
}

/// The request header an admin sets a request's queue priority with.
pub const PRIORITY_HEADER: &str = "x-infergate-priority";

fn refusal_error(pool: &Pool, refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::NoBackend => GatewayError::NoHealthyBackend {
            pool: pool.name().to_string(),
        },
        Refusal::QueueFull { retry_after } => GatewayError::QueueFull {
            pool: pool.name().to_string(),
            max_len: pool.config.queue.max_len,
            retry_after,
        },
        Refusal::WouldWait {
            expected,
            retry_after,
        } => GatewayError::QueueWouldWait {
            pool: pool.name().to_string(),
            expected,
            retry_after,
        },
        Refusal::TimedOut {
            waited,
            retry_after,
        } => GatewayError::QueueTimeout {
            pool: pool.name().to_string(),
            waited,
            retry_after,
        },
    }
}

/// Forward `body` to one engine at `address` (a managed engine: no pool,
/// no failover — it is the only process serving the model).
pub async fn forward_direct(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    address: SocketAddr,
    body: Bytes,
) -> Result<(), GatewayError> {
    let request = upstream_request(session.req_header(), body.len())?;
    let peer = make_peer(app, address);
    ctx.backend = Some(address);
    let mut upstream = match connect_and_write(app, ctx, (&peer, address), &request, &body).await {
        Ok(upstream) => upstream,
        Err(SendFailure::Connect(e)) => {
            log::warn!(
                "request {}: connect to engine {address} failed: {e}",
                ctx.request_id()
            );
            return Err(GatewayError::ConnectFailed {
                pool: ctx.pool.clone().unwrap_or_default(),
                attempts: 1,
            });
        }
        Err(SendFailure::Write(e)) => return Err(write_failed(&e)),
    };
    relay_response(app, session, ctx, &mut upstream).await?;
    finish(app, ctx, upstream, &peer).await;
    Ok(())
}

/// Why one backend did not take the request.
enum SendFailure {
    /// No connection: the engine saw nothing.
    Connect(Box<pingora_error::Error>),
    /// Writing the request failed on a fresh connection.
    Write(Box<pingora_error::Error>),
}

fn write_failed(e: &pingora_error::Error) -> GatewayError {
    GatewayError::UpstreamFailed {
        detail: format!("sending the request failed ({})", e.etype().as_str()),
    }
}

/// Connect to `peer` (an idle pooled connection if there is one) and write
/// the request. A pooled connection the engine has closed meanwhile fails
/// the write having delivered nothing: it is replaced, at most twice.
async fn connect_and_write(
    app: &AppState,
    ctx: &mut RequestCtx,
    (peer, address): (&HttpPeer, SocketAddr),
    request: &RequestHeader,
    body: &Bytes,
) -> Result<UpstreamSession, SendFailure> {
    let host = address.to_string();
    let mut stale_retries = 0;
    loop {
        let (mut upstream, reused) = app
            .connector
            .get_http_session(peer)
            .await
            .map_err(SendFailure::Connect)?;
        let mut req = request.clone();
        let _ = req.insert_header("host", host.as_str());
        match write_request(&mut upstream, req, body).await {
            Ok(()) => {
                ctx.sent_at = Some(Instant::now());
                return Ok(upstream);
            }
            Err(e) if reused && stale_retries < 2 => {
                log::debug!("stale pooled connection to {address}: {e}; retrying on a new one");
                stale_retries += 1;
            }
            Err(e) => return Err(SendFailure::Write(e)),
        }
    }
}

fn upstream_request(
    client: &RequestHeader,
    body_len: usize,
) -> Result<RequestHeader, GatewayError> {
    let internal = |e: Box<pingora_error::Error>| GatewayError::UpstreamFailed {
        detail: format!("could not build the upstream request: {e}"),
    };
    let mut req = RequestHeader::build(
        client.method.clone(),
        client
            .uri
            .path_and_query()
            .map_or(b"/".as_slice(), |p| p.as_str().as_bytes()),
        Some(client.headers.len() + 2),
    )
    .map_err(internal)?;
    for (name, value) in client.headers.iter() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            req.append_header(name.clone(), value.clone())
                .map_err(internal)?;
        }
    }
    if body_len > 0 || client.method != http::Method::GET {
        req.insert_header("content-length", body_len.to_string())
            .map_err(internal)?;
    }
    Ok(req)
}

/// Connect and write the request, moving to another backend when a connect fails.
async fn send_request(
    app: &AppState,
    ctx: &mut RequestCtx,
    pool: &Pool,
    (request, body): (&RequestHeader, &Bytes),
    hints: &Hints<'_>,
    tried: &mut Vec<SocketAddr>,
    mut first: Option<Picked>,
) -> Result<(UpstreamSession, HttpPeer), GatewayError> {
    let mut last_timeout = false;
    let mut connects = 0;
    while connects < app.config.upstream.max_connect_attempts {
        let picked = match first.take() {
            Some(picked) => picked,
            None => match pool.pick(hints, tried) {
                Some(picked) => {
                    note_pick(app, pool, &picked);
                    if connects > 0 {
                        // failover after a refused connect: the engine saw
                        // nothing, so no retry budget is spent, but it counts
                        ctx.retries += 1;
                        app.metrics.count_retry(pool.name(), "connect");
                    }
                    picked
                }
                None => break,
            },
        };
        let guard = picked.guard;
        let address = guard.state().address;
        let peer = make_peer(app, address);
        ctx.backend = Some(address);
        ctx.inflight = Some(guard);
        match connect_and_write(app, ctx, (&peer, address), request, body).await {
            Ok(upstream) => return Ok((upstream, peer)),
            Err(SendFailure::Connect(e)) => {
                last_timeout = matches!(e.etype(), ErrorType::ConnectTimedout);
                log::warn!(
                    "request {}: connect to {address} failed: {e}",
                    ctx.request_id()
                );
                count_error(ctx);
                record_outcome(ctx, false);
                tried.push(address);
                connects += 1;
            }
            Err(SendFailure::Write(e)) => {
                count_error(ctx);
                record_outcome(ctx, false);
                return Err(write_failed(&e));
            }
        }
    }
    ctx.inflight = None;
    if connects == 0 {
        return Err(GatewayError::NoHealthyBackend {
            pool: pool.name().to_string(),
        });
    }
    if last_timeout {
        return Err(GatewayError::UpstreamTimeout {
            phase: TimeoutPhase::Connect,
        });
    }
    Err(GatewayError::ConnectFailed {
        pool: pool.name().to_string(),
        attempts: connects,
    })
}

fn count_error(ctx: &RequestCtx) {
    if let Some(guard) = &ctx.inflight {
        guard
            .state()
            .errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn make_peer(app: &AppState, address: SocketAddr) -> HttpPeer {
    let mut peer = HttpPeer::new(address, false, String::new());
    peer.options.connection_timeout = Some(app.config.timeouts.connect);
    peer.options.idle_timeout = Some(app.config.upstream.keepalive_idle);
    peer.options.write_timeout = Some(app.config.timeouts.idle);
    peer
}

async fn write_request(
    upstream: &mut UpstreamSession,
    req: RequestHeader,
    body: &Bytes,
) -> pingora_error::Result<()> {
    // One `write(2)` for the header and a body of up to 64 KiB (a patch to
    // pingora-core, vendor/README.md): Pingora would flush the header on its
    // own, then the body, two segments and on loopback two wake-ups of the
    // engine. A larger body still follows the header in its own writes, with
    // the socket corked so that the header rides with the first of them.
    let fd = upstream.stream().id();
    let corked = body.len() > ONE_WRITE_BODY_MAX && super::sockopt::set_cork(fd, true);
    let result = async {
        upstream
            .write_request_header_and_body(Box::new(req), body)
            .await?;
        upstream.finish_body().await?;
        Ok(())
    }
    .await;
    if corked {
        super::sockopt::set_cork(fd, false);
    }
    result
}

/// Wait for the engine's response header, then relay the body chunk by chunk.
async fn relay_response(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: &mut UpstreamSession,
) -> Result<(), GatewayError> {
    match read_head(app, session, ctx, upstream).await? {
        Some(header) => relay_from_head(app, session, ctx, upstream, header).await,
        None => Ok(()),
    }
}

/// Wait for the engine's final response header. `Ok(None)`: the client left.
async fn read_head(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: &mut UpstreamSession,
) -> Result<Option<ResponseHeader>, GatewayError> {
    let first_byte = app.config.timeouts.first_byte;
    let read_header = tokio::select! {
        biased;
        res = timeout(first_byte, read_final_header(upstream)) => res,
        _ = grace_ends(app) => return Err(GatewayError::ShuttingDown),
        _ = client_closed(session) => {
            ctx.client_gone = true;
            log::info!("request {}: client left before the first byte; closing the engine connection", ctx.request_id());
            return Ok(None);
        }
    };
    match read_header {
        Err(_) => {
            return Err(GatewayError::UpstreamTimeout {
                phase: TimeoutPhase::FirstByte,
            })
        }
        Ok(Err(e)) => {
            count_error(ctx);
            return Err(GatewayError::UpstreamFailed {
                detail: format!("no valid response header ({})", e.etype().as_str()),
            });
        }
        Ok(Ok(_)) => {}
    }
    let now = Instant::now();
    ctx.first_byte_at = Some(now);
    if let (Some(sent), Some(pool)) = (ctx.sent_at, ctx.pool.as_deref()) {
        app.metrics
            .upstream_response
            .with_label_values(&[pool])
            .observe((now - sent).as_secs_f64());
    }
    match upstream.resp_header().cloned() {
        Some(header) => Ok(Some(header)),
        None => Err(GatewayError::UpstreamFailed {
            detail: "no response header".into(),
        }),
    }
}

/// Relay a response whose final header was read: errors normalised, SSE
/// and JSON bodies chunk by chunk.
async fn relay_from_head(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: &mut UpstreamSession,
    header: ResponseHeader,
) -> Result<(), GatewayError> {
    if header.status.as_u16() >= 400 {
        return upstream_error::relay_normalised(app, session, ctx, upstream, header).await;
    }
    let is_sse = header
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let is_json = header
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let mut response = downstream_header(&header, ctx)?;
    ctx.tap = if is_sse {
        if ctx.injected_usage {
            // the usage-only chunk is removed, so the length changes: chunked
            response.remove_header("content-length");
        }
        UsageTap::sse(ctx.injected_usage)
    } else if is_json {
        UsageTap::json()
    } else {
        UsageTap::off()
    };
    ctx.status = response.status.as_u16();
    // a client that waited for an engine start already has its SSE header
    if !ctx.sse_started
        && session
            .write_response_header(Box::new(response), false)
            .await
            .is_err()
    {
        ctx.client_gone = true;
        return Ok(());
    }
    if is_sse {
        // the first body chunk is the first token as far as the gateway can tell
        ctx.last_chunk_at = Some(ctx.started);
    }
    match relay_body(app, session, ctx, upstream).await {
        Ok(()) => {
            if session.write_response_body(None, true).await.is_err() {
                ctx.client_gone = true;
            }
        }
        Err(Interrupted::ClientGone) => {
            ctx.client_gone = true;
            log::info!(
                "request {}: client left mid-response; closing the engine connection",
                ctx.request_id()
            );
        }
        Err(Interrupted::Upstream(error)) => end_broken_stream(session, ctx, &error, is_sse).await,
    }
    Ok(())
}

fn downstream_header(
    upstream: &ResponseHeader,
    ctx: &RequestCtx,
) -> Result<ResponseHeader, GatewayError> {
    let mut header = upstream.clone();
    for name in ["connection", "keep-alive", "proxy-connection"] {
        header.remove_header(name);
    }
    for (name, value) in &ctx.filters.response_headers {
        header
            .insert_header(*name, value.as_str())
            .map_err(|e| GatewayError::UpstreamFailed {
                detail: e.to_string(),
            })?;
    }
    Ok(header)
}

async fn relay_body(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: &mut UpstreamSession,
) -> Result<(), Interrupted> {
    let idle = app.config.timeouts.idle;
    // one shutdown watch for the whole body, not one per chunk
    let grace = grace_ends(app);
    tokio::pin!(grace);
    let mut paced = false;
    loop {
        if upstream.is_body_done() {
            // the client may already hold the whole response and send its next
            // request: stop probing its socket now
            return flush_tap(session, ctx).await;
        }
        let chunk = tokio::select! {
            biased;
            res = timeout(idle, upstream.read_body_bytes()) => res,
            _ = client_closed(session) => return Err(Interrupted::ClientGone),
            _ = &mut grace => return Err(Interrupted::Upstream(GatewayError::ShuttingDown)),
        };
        match chunk {
            Err(_) => {
                return Err(Interrupted::Upstream(GatewayError::UpstreamTimeout {
                    phase: TimeoutPhase::Idle,
                }))
            }
            Ok(Err(e)) => {
                count_error(ctx);
                return Err(Interrupted::Upstream(GatewayError::UpstreamFailed {
                    detail: format!(
                        "the engine connection broke mid-response ({})",
                        e.etype().as_str()
                    ),
                }));
            }
            Ok(Ok(None)) => return flush_tap(session, ctx).await,
            Ok(Ok(Some(bytes))) => {
                if !paced {
                    paced = true;
                    // what starting an answer costs on this backend (routing)
                    if let (Some(sent), Some(guard)) = (ctx.sent_at, ctx.inflight.as_ref()) {
                        guard.state().pace.record(sent.elapsed());
                    }
                }
                if let Some(previous) = ctx.last_chunk_at {
                    observe_chunk(app, ctx, previous);
                }
                let bytes = ctx.tap.on_chunk(bytes);
                if bytes.is_empty() {
                    // everything in it was held back or removed; an empty
                    // chunk would end a chunked body
                    continue;
                }
                ctx.response_bytes += bytes.len();
                if session
                    .write_response_body(Some(bytes), false)
                    .await
                    .is_err()
                {
                    return Err(Interrupted::ClientGone);
                }
            }
        }
    }
}

/// Streams: time to first token for the first chunk, gap for the others.
fn observe_chunk(app: &AppState, ctx: &mut RequestCtx, previous: Instant) {
    let now = Instant::now();
    let seconds = (now - previous).as_secs_f64();
    match &ctx.chunk_gaps {
        Some(gaps) => gaps.observe(seconds),
        None => {
            ctx.first_chunk_at = Some(now);
            let model = app.metrics.model_label(ctx.model.as_deref()).to_string();
            app.metrics
                .ttft
                .with_label_values(&[model.as_str()])
                .observe(seconds);
            ctx.chunk_gaps = Some(app.metrics.inter_chunk.with_label_values(&[model.as_str()]));
        }
    }
    ctx.last_chunk_at = Some(now);
}

/// Bytes the usage tap held back (an unterminated last event) go out as they were.
async fn flush_tap(session: &mut Session, ctx: &mut RequestCtx) -> Result<(), Interrupted> {
    if let Some(rest) = ctx.tap.flush() {
        ctx.response_bytes += rest.len();
        if session
            .write_response_body(Some(rest), false)
            .await
            .is_err()
        {
            return Err(Interrupted::ClientGone);
        }
    }
    Ok(())
}

/// The engine failed after the response started. An SSE client gets one
/// `data: {"error":...}` event and a clean end (no fake `[DONE]`); any other
/// client gets a cut connection, so it cannot take a truncated body as whole.
async fn end_broken_stream(
    session: &mut Session,
    ctx: &mut RequestCtx,
    error: &GatewayError,
    is_sse: bool,
) {
    let spec = error.spec();
    ctx.error_code = Some(spec.error.code);
    log::warn!(
        "request {}: {} after the response started",
        ctx.request_id(),
        spec.error.message
    );
    session.set_keepalive(None);
    if !is_sse {
        // Close without the final chunk (Pingora would add it on finish), so
        // the client sees a truncated body, not a complete-looking one.
        session.as_downstream_mut().shutdown().await;
        return;
    }
    let mut event = b"data: ".to_vec();
    event.extend_from_slice(&spec.body());
    event.extend_from_slice(b"\n\n");
    let _ = session
        .write_response_body(Some(Bytes::from(event)), false)
        .await;
    let _ = session.write_response_body(None, true).await;
}

/// Resolves shortly before a graceful shutdown's grace period ends (never
/// while the gateway is not shutting down), so an unfinished response ends
/// with an error the client can read instead of a cut connection.
async fn grace_ends(app: &AppState) {
    let mut draining = app.draining.subscribe();
    let deadline = match draining.wait_for(Option::is_some).await {
        Ok(d) => *d,
        Err(_) => None,
    };
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending::<()>().await,
    }
}

/// Read response headers until a final (non-1xx) one; 1xx responses such as
/// 103 Early Hints are dropped, never relayed as the final status.
async fn read_final_header(upstream: &mut UpstreamSession) -> pingora_error::Result<()> {
    loop {
        upstream.read_response().await?;
        let informational = upstream
            .get_status()
            .is_some_and(|s| s.is_informational() && s.as_u16() != 101);
        if !informational {
            return Ok(());
        }
    }
}

/// Resolves only when the client closes its connection (or it errors).
/// Bytes of a next (pipelined) request are stashed by Pingora for the next
/// session (see `set_pipelining_enabled` in `request_filter`) and keep this
/// pending, as does anything else that is not a close.
async fn client_closed(session: &mut Session) {
    if session
        .downstream_session
        .read_body_or_idle(true)
        .await
        .is_err()
    {
        return;
    }
    std::future::pending::<()>().await
}

//! Answers written by the gateway itself: JSON bodies and OpenAI-shaped errors.

use super::ctx::RequestCtx;
use crate::errors::GatewayError;
use bytes::Bytes;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// Answer a locally served endpoint with JSON; a failed write only marks the
/// client gone (there is nobody left to tell).
pub async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Vec<u8>,
) -> std::result::Result<(), crate::errors::GatewayError> {
    if write_json(session, ctx, status, body, &[]).await.is_err() {
        ctx.client_gone = true;
    }
    Ok(())
}

/// Write a complete JSON response (status, body, the filters' headers).
pub async fn write_json(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Vec<u8>,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut headers = Vec::with_capacity(extra.len() + 1);
    headers.push(("content-type", "application/json".to_string()));
    headers.extend_from_slice(extra);
    write_body(session, ctx, status, body, &headers).await
}

/// Write a complete response; `extra` must include the content type.
pub async fn write_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    body: Vec<u8>,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(4 + extra.len()))?;
    header.insert_header("content-length", body.len().to_string())?;
    for (name, value) in extra.iter().chain(ctx.filters.response_headers.iter()) {
        header.insert_header(*name, value.as_str())?;
    }
    ctx.status = status;
    ctx.response_bytes = body.len();
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await?;
    }
    Ok(())
}

/// End a stream whose header already went out with one OpenAI error event
/// (`data: {"error":...}`), and no `[DONE]`.
pub async fn write_sse_error_event(session: &mut Session, body: &[u8]) -> Result<()> {
    let mut event = Vec::with_capacity(body.len() + 8);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(body);
    event.extend_from_slice(b"\n\n");
    session
        .write_response_body(Some(Bytes::from(event)), false)
        .await?;
    session.write_response_body(None, true).await
}

/// A streaming client waiting for an engine start: 200 with the SSE header
/// now, so proxies and clients see progress instead of a silent socket.
pub async fn write_sse_header(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    let mut header = ResponseHeader::build(200, Some(4 + ctx.filters.response_headers.len()))?;
    header.insert_header("content-type", "text/event-stream")?;
    header.insert_header("cache-control", "no-cache")?;
    for (name, value) in ctx.filters.response_headers.iter() {
        header.insert_header(*name, value.as_str())?;
    }
    ctx.status = 200;
    ctx.sse_started = true;
    session.write_response_header(Box::new(header), false).await
}

/// A filter's own answer (e.g. a CORS preflight).
pub async fn write_local(
    session: &mut Session,
    ctx: &mut RequestCtx,
    local: infergate_filters::LocalResponse,
) -> Result<()> {
    let mut header = ResponseHeader::build(local.status, Some(2 + local.headers.len()))?;
    header.insert_header("content-length", local.body.len().to_string())?;
    for (name, value) in ctx
        .filters
        .response_headers
        .iter()
        .chain(local.headers.iter())
    {
        header.insert_header(*name, value.as_str())?;
    }
    ctx.status = local.status;
    ctx.response_bytes = local.body.len();
    let empty = local.body.is_empty();
    session
        .write_response_header(Box::new(header), empty)
        .await?;
    if !empty {
        session
            .write_response_body(Some(Bytes::from(local.body)), true)
            .await?;
    }
    Ok(())
}

/// Answer with the OpenAI error for `error`, and record it on the context.
pub async fn write_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    error: &GatewayError,
) -> Result<()> {
    let spec = error.spec();
    log::log!(
        spec.log_level,
        "request {} failed: {} {} ({})",
        ctx.request_id(),
        spec.error.status,
        spec.error.code,
        spec.error.message
    );
    ctx.error_code = Some(spec.error.code);
    let mut extra = spec.error.headers.clone();
    if let Some(secs) = spec.error.retry_after {
        extra.push(("retry-after", secs.to_string()));
    }
    if let GatewayError::MethodNotAllowed { allow } = error {
        extra.push(("allow", allow.to_string()));
    }
    if !spec.keep_alive {
        // the rest of the body was never read: the connection cannot be reused
        session.set_keepalive(None);
        extra.push(("connection", "close".to_string()));
    }
    write_json(session, ctx, spec.error.status, spec.body(), &extra).await?;
    if let GatewayError::BodyTooLarge { .. } = error {
        super::read_body::drain_briefly(session).await;
    }
    Ok(())
}

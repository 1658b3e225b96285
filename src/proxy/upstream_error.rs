//! Engine error responses, normalised to OpenAI's error schema.
//!
//! Engines answer errors in their own shapes: vLLM's flat
//! `{"object":"error","message",...,"code":400}`, the nested form with an
//! integer `code`, llama.cpp's, or plain text/HTML from a crashed worker.
//! Clients (OpenAI SDKs) read `body["error"]` as an object with string
//! `code`, so the gateway rewrites the body and keeps the engine's status.

use super::ctx::RequestCtx;
use crate::errors::GatewayError;
use crate::state::AppState;
use infergate_filters::openai_error_body;
use pingora_core::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use serde_json::Value;
use tokio::time::timeout;

/// Engine error bodies larger than this are not parsed (only the status is kept).
const MAX_ERROR_BODY: usize = 1024 * 1024;

pub async fn relay_normalised(
    app: &AppState,
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: &mut UpstreamSession,
    header: ResponseHeader,
) -> Result<(), GatewayError> {
    let status = header.status.as_u16();
    let mut raw = Vec::new();
    loop {
        match timeout(app.config.timeouts.idle, upstream.read_body_bytes()).await {
            Ok(Ok(Some(chunk))) if raw.len() + chunk.len() <= MAX_ERROR_BODY => {
                raw.extend_from_slice(&chunk)
            }
            Ok(Ok(None)) => break,
            _ => {
                raw.clear();
                break;
            }
        }
    }
    let body = normalise(status, &raw);
    log::info!("request {}: engine answered {status}", ctx.request_id());
    ctx.error_code = Some("upstream_error_status");
    ctx.status = status;
    ctx.response_bytes = body.len();
    if status >= 500 {
        if let Some(guard) = &ctx.inflight {
            guard
                .state()
                .errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // keep the engine's other headers (Retry-After, rate limits); replace framing and type
    let mut response = header;
    for name in [
        "content-length",
        "transfer-encoding",
        "content-type",
        "content-encoding",
        "connection",
        "keep-alive",
    ] {
        response.remove_header(name);
    }
    let written = if ctx.sse_started {
        // the SSE header went out while the engine started: the error is an event
        super::respond::write_sse_error_event(session, &body).await
    } else {
        write_normalised(session, ctx, response, body).await
    };
    if written.is_err() {
        ctx.client_gone = true;
    }
    Ok(())
}

async fn write_normalised(
    session: &mut Session,
    ctx: &RequestCtx,
    mut response: ResponseHeader,
    body: Vec<u8>,
) -> pingora_error::Result<()> {
    response.insert_header("content-type", "application/json")?;
    response.insert_header("content-length", body.len().to_string())?;
    for (name, value) in &ctx.filters.response_headers {
        response.insert_header(*name, value.as_str())?;
    }
    session
        .write_response_header(Box::new(response), false)
        .await?;
    session
        .write_response_body(Some(bytes::Bytes::from(body)), true)
        .await
}

/// Turn any engine error body into `{"error":{message,type,param,code}}`.
pub fn normalise(status: u16, raw: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = serde_json::from_slice(raw).ok();
    let source = match &parsed {
        Some(Value::Object(map)) => match map.get("error") {
            Some(inner @ Value::Object(_)) => Some(inner),
            Some(Value::String(_)) | None => parsed.as_ref(),
            Some(_) => parsed.as_ref(),
        },
        _ => None,
    };
    let text = |v: Option<&Value>| -> Option<String> {
        match v? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let message = source
        .and_then(|s| text(s.get("message")).or_else(|| text(s.get("detail"))))
        .or_else(|| parsed.as_ref().and_then(|p| text(p.get("error"))))
        .unwrap_or_else(|| {
            format!("The engine returned HTTP {status} without a readable error body.")
        });
    let error_type = source
        .and_then(|s| text(s.get("type")))
        .unwrap_or_else(|| default_type(status).to_string());
    let param = source.and_then(|s| text(s.get("param")));
    let code = source
        .and_then(|s| text(s.get("code")))
        .unwrap_or_else(|| status.to_string());
    openai_error_body(&message, &error_type, param.as_deref(), Some(&code))
}

fn default_type(status: u16) -> &'static str {
    match status {
        400..=499 => "invalid_request_error",
        _ => "upstream_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, raw: &str) -> Value {
        serde_json::from_slice(&normalise(status, raw.as_bytes())).unwrap_or_default()
    }

    #[test]
    fn vllm_flat_error_becomes_nested_with_string_code() {
        let v = parse(
            400,
            r#"{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}"#,
        );
        assert_eq!(v["error"]["message"], "bad");
        assert_eq!(v["error"]["type"], "BadRequestError");
        assert_eq!(v["error"]["code"], "400");
        assert_eq!(v["error"]["param"], Value::Null);
    }

    #[test]
    fn nested_error_with_integer_code_keeps_fields() {
        let v = parse(
            404,
            r#"{"error":{"message":"nope","type":"NotFoundError","param":"model","code":404}}"#,
        );
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], "404");
    }

    #[test]
    fn html_and_detail_shapes_are_normalised() {
        let v = parse(502, "<html>bad gateway</html>");
        assert_eq!(v["error"]["type"], "upstream_error");
        assert_eq!(v["error"]["code"], "502");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("502")));
        let v = parse(500, r#"{"detail":"boom"}"#);
        assert_eq!(v["error"]["message"], "boom");
        let v = parse(500, r#"{"error":"flat string"}"#);
        assert_eq!(v["error"]["message"], "flat string");
    }
}

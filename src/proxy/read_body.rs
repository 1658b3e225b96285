//! Reading the whole request body, bounded by the configured limit.
//!
//! See docs/adr/0001-body-pre-read.md: the gateway reads the full body before
//! choosing a pool, because Pingora 0.9 replays a consumed body only up to 64 KiB.

use crate::errors::GatewayError;
use bytes::{Bytes, BytesMut};
use pingora_proxy::Session;

/// Read the whole body. Answers `Expect: 100-continue` first; refuses a
/// declared `Content-Length` over `limit` without reading a byte, and a
/// chunked upload as soon as it passes `limit`.
pub async fn read_full_body(session: &mut Session, limit: u64) -> Result<Bytes, GatewayError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .as_downstream_mut()
            .write_continue_response()
            .await
            .map_err(|e| GatewayError::BodyRead {
                detail: e.to_string(),
            })?;
    }
    let capacity = declared.unwrap_or(0).min(limit) as usize;
    let mut body = BytesMut::with_capacity(capacity);
    loop {
        let chunk = session
            .read_request_body()
            .await
            .map_err(|e| GatewayError::BodyRead {
                detail: e.to_string(),
            })?;
        let Some(chunk) = chunk else { break };
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        if body.is_empty() && chunk.len() >= capacity {
            // common case: one chunk carries the whole body; avoid a copy
            if session.is_body_done() {
                return Ok(chunk);
            }
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

//! Reading the whole request body, bounded by the configured limit.
//!
//! See docs/adr/0001-body-pre-read.md: the gateway reads the full body before
//! choosing a pool, because Pingora 0.9 replays a consumed body only up to 64 KiB.

use crate::body_budget::Hold;
use crate::errors::GatewayError;
use bytes::{Bytes, BytesMut};
use pingora_proxy::Session;

/// After refusing a body, read and discard what the client is still sending
/// (bounded in bytes and time) so it receives our 413 instead of a TCP reset
/// from closing a socket with unread data (what nginx calls lingering close).
pub async fn drain_briefly(session: &mut Session) {
    const MAX_BYTES: usize = 8 << 20;
    let work = async {
        let mut seen = 0;
        while seen < MAX_BYTES {
            match session.read_request_body().await {
                Ok(Some(chunk)) => seen += chunk.len(),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), work).await;
}

/// Refuse framings that two HTTP parsers could read differently: both
/// `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.3 lets a server
/// reject it; Pingora would accept it), or a coding other than `chunked`.
pub fn check_framing(session: &Session) -> Result<(), GatewayError> {
    let headers = &session.req_header().headers;
    let encodings: Vec<_> = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .collect();
    if encodings.is_empty() {
        return Ok(());
    }
    // Pingora drops Content-Length when Transfer-Encoding is present (and
    // closes the connection afterwards); the raw header still shows it.
    if headers.contains_key(http::header::CONTENT_LENGTH)
        || raw_has_content_length(&session.as_downstream().to_h1_raw())
    {
        return Err(GatewayError::AmbiguousFraming);
    }
    let chunked_only = encodings.len() == 1
        && encodings[0]
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
    if !chunked_only {
        return Err(GatewayError::AmbiguousFraming);
    }
    Ok(())
}

fn raw_has_content_length(raw: &[u8]) -> bool {
    raw.split(|&b| b == b'\n')
        .skip(1)
        .any(|line| line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
}

/// Read the whole body. Answers `Expect: 100-continue` first; refuses a
/// declared `Content-Length` over `limit` without reading a byte, and a
/// chunked upload as soon as it passes `limit`. Every byte is reserved in
/// the body budget (`hold`) before it is kept; the whole read, from its first
/// byte to its last, must finish within `timeout` (408 otherwise: a client
/// sending one byte a second cannot hold a connection and its buffer for
/// ever).
pub async fn read_full_body(
    session: &mut Session,
    limit: u64,
    mut hold: Option<&mut Hold>,
    timeout: std::time::Duration,
) -> Result<Bytes, GatewayError> {
    check_framing(session)?;
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    // a declared size is reserved whole before a byte is read
    if let Some(hold) = hold.as_deref_mut() {
        hold.reserve_up_to(declared.unwrap_or(0))?;
    }
    match tokio::time::timeout(
        timeout,
        read_bounded(session, limit, hold.as_deref_mut(), declared),
    )
    .await
    {
        Ok(result) => {
            let body = result?;
            if let Some(hold) = hold {
                hold.received();
            }
            Ok(body)
        }
        Err(_) => Err(GatewayError::ClientTimeout {
            what: "request body",
            after: timeout,
        }),
    }
}

async fn read_bounded(
    session: &mut Session,
    limit: u64,
    mut hold: Option<&mut Hold>,
    declared: Option<u64>,
) -> Result<Bytes, GatewayError> {
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
    // Room for the declared size at once (an 8 MB prompt is not copied again
    // on each doubling): it is already reserved in the body budget, which
    // bounds the sum of them. Without a budget hold, at most 1 MiB before
    // bytes arrive.
    let declared_room = declared.unwrap_or(0).min(limit);
    let capacity = if hold.is_some() {
        declared_room
    } else {
        declared_room.min(1 << 20)
    } as usize;
    let mut body = BytesMut::with_capacity(capacity);
    loop {
        let chunk = session
            .read_request_body()
            .await
            .map_err(|e| GatewayError::BodyRead {
                detail: e.to_string(),
            })?;
        let Some(chunk) = chunk else { break };
        let total = (body.len() + chunk.len()) as u64;
        if total > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        if let Some(hold) = hold.as_deref_mut() {
            hold.reserve_up_to(total)?;
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

#[cfg(test)]
mod tests {
    use super::raw_has_content_length;

    #[test]
    fn finds_content_length_in_any_case_but_not_in_the_request_line() {
        assert!(raw_has_content_length(
            b"POST / HTTP/1.1\r\nHost: x\r\nCONTENT-LENGTH: 4\r\n\r\n"
        ));
        assert!(!raw_has_content_length(
            b"POST /content-length: HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        assert!(!raw_has_content_length(
            b"POST / HTTP/1.1\r\nX-Content-Length: 4\r\n\r\n"
        ));
    }
}

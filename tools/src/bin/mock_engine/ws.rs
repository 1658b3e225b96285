//! `GET /ws/echo`: a WebSocket (RFC 6455) echo endpoint, so a gateway's
//! upgrade path can be tested against a real upgraded connection.
//!
//! The handshake answers 101 with `Sec-WebSocket-Accept` = base64(sha1(key +
//! GUID)); then every text, binary or continuation frame is sent back
//! unmasked with its opcode and FIN bit, a ping is answered with a pong, and a
//! close frame is answered with a close frame carrying the same payload,
//! after which the connection ends. Extensions and subprotocols are not
//! negotiated; messages are echoed frame by frame, not reassembled.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::{error_response, MockBody};
use crate::state::State;

pub const PATH: &str = "/ws/echo";
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest frame payload echoed; a bigger frame closes with 1009 (too big).
const MAX_PAYLOAD: u64 = 16 << 20;

const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Answer a request for [`PATH`]: 101 and an echo task, or a 4xx.
pub fn handle(state: Arc<State>, mut req: Request<Incoming>) -> Response<MockBody> {
    let flat = state.cfg.flat_errors;
    if req.method() != Method::GET {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
            "MethodNotAllowed",
            None,
            flat,
        );
    }
    let h = req.headers();
    let upgrade_ok = h
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection_ok = h
        .get(CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    let Some(key) = h.get(SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().to_vec()) else {
        return bad_request("missing Sec-WebSocket-Key", flat);
    };
    if !upgrade_ok || !connection_ok {
        return bad_request("expected Upgrade: websocket and Connection: Upgrade", flat);
    }
    if h.get(SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        let mut r = error_response(
            StatusCode::UPGRADE_REQUIRED,
            "Sec-WebSocket-Version must be 13",
            "BadRequestError",
            None,
            flat,
        );
        r.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let accept = accept_key(&key);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                state.counters.ws_opened.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = echo(TokioIo::new(upgraded), &state).await {
                    log::debug!("websocket echo ended: {e}");
                }
                state.counters.ws_closed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::debug!("websocket upgrade failed: {e}"),
        }
    });
    let mut resp = Response::new(MockBody::Full(None));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

fn bad_request(msg: &str, flat: bool) -> Response<MockBody> {
    error_response(StatusCode::BAD_REQUEST, msg, "BadRequestError", None, flat)
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64(&sha.finalize())
}

/// Standard base64 with padding (the handshake needs only this one use).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One frame as read from the client (payload already unmasked).
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Bytes,
}

/// Read one frame; `Ok(None)` on a clean end of stream before a frame starts.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 2];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let fin = head[0] & 0x80 != 0;
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7F {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(Some(Frame {
        fin,
        opcode,
        payload: Bytes::from(payload),
    }))
}

/// Encode an unmasked server frame.
fn encode_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    state: &Arc<State>,
) -> std::io::Result<()> {
    loop {
        let frame = match read_frame(&mut io).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // 1009: message too big
                let _ = io
                    .write_all(&encode_frame(true, OP_CLOSE, &1009u16.to_be_bytes()))
                    .await;
                let _ = io.shutdown().await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        match frame.opcode {
            OP_CLOSE => {
                io.write_all(&encode_frame(true, OP_CLOSE, &frame.payload))
                    .await?;
                io.flush().await?;
                return io.shutdown().await;
            }
            OP_PING => {
                io.write_all(&encode_frame(true, OP_PONG, &frame.payload))
                    .await?
            }
            OP_PONG => {}
            op => {
                state.counters.ws_frames.fetch_add(1, Ordering::Relaxed);
                io.write_all(&encode_frame(frame.fin, op, &frame.payload))
                    .await?
            }
        }
        io.flush().await?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[tokio::test]
    async fn masked_frames_are_read_and_echoed_unmasked() {
        let mask = [1u8, 2, 3, 4];
        let text = b"hello";
        let mut wire = vec![0x81, 0x80 | text.len() as u8];
        wire.extend_from_slice(&mask);
        wire.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        let f = read_frame(&mut &wire[..]).await.unwrap().unwrap();
        assert!(f.fin);
        assert_eq!(f.opcode, 1);
        assert_eq!(&f.payload[..], text);
        assert_eq!(encode_frame(true, 1, text), b"\x81\x05hello");
        let big = vec![7u8; 70_000];
        let enc = encode_frame(false, 2, &big);
        assert_eq!(&enc[..2], &[0x02, 127]);
        let f = read_frame(&mut &enc[..]).await.unwrap().unwrap();
        assert!(!f.fin);
        assert_eq!(f.payload.len(), 70_000);
        assert!(read_frame(&mut &b""[..]).await.unwrap().is_none());
    }
}

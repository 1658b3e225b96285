//! Response body type (a full buffer or an SSE stream) and vLLM-style error
//! bodies.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::sse::SseStream;

pub enum MockBody {
    Full(Option<Bytes>),
    Stream(Box<SseStream>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            MockBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            MockBody::Stream(s) => s.poll_next_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(data) => data.is_none(),
            MockBody::Stream(s) => s.is_finished(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

pub static JSON: HeaderValue = HeaderValue::from_static("application/json");
pub static TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; version=0.0.4");

pub fn full(status: StatusCode, content_type: &HeaderValue, body: Bytes) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::Full(Some(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, content_type.clone());
    resp
}

pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<MockBody> {
    match serde_json::to_vec(value) {
        Ok(v) => full(status, &JSON, Bytes::from(v)),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("serialization failed: {e}"),
            "InternalServerError",
            None,
            false,
        ),
    }
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

#[derive(Serialize)]
struct NestedError<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct FlatError<'a> {
    object: &'static str,
    #[serde(flatten)]
    detail: ErrorDetail<'a>,
}

/// Serialize an error body: nested `{"error":{...}}` (current vLLM) or the
/// older flat `{"object":"error",...}` shape.
pub fn error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: u16,
    flat: bool,
) -> Vec<u8> {
    let detail = ErrorDetail {
        message,
        kind,
        param,
        code,
    };
    let res = if flat {
        serde_json::to_vec(&FlatError {
            object: "error",
            detail,
        })
    } else {
        serde_json::to_vec(&NestedError { error: detail })
    };
    res.unwrap_or_else(|_| b"{\"error\":{\"message\":\"error\"}}".to_vec())
}

pub fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    flat: bool,
) -> Response<MockBody> {
    let body = error_body(message, kind, param, status.as_u16(), flat);
    full(status, &JSON, Bytes::from(body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_error_shapes() {
        let nested = error_body("mock failure", "InternalServerError", None, 503, false);
        let v: serde_json::Value = serde_json::from_slice(&nested).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"message":"mock failure","type":"InternalServerError","param":null,"code":503}})
        );
        let flat = error_body("bad", "BadRequestError", Some("model"), 400, true);
        let v: serde_json::Value = serde_json::from_slice(&flat).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"object":"error","message":"bad","type":"BadRequestError","param":"model","code":400})
        );
    }
}

//! Routing table and request-body reading (SHA-256 computed on the fly).

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Method;
use sha2::{Digest, Sha256};

use crate::inference::Endpoint;

/// Largest pre-allocation made from a Content-Length header.
const MAX_PREALLOC: usize = 256 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Route {
    Inference(Endpoint),
    Models,
    Health,
    Metrics,
    MockHealth,
    MockFault,
    MockStats,
    MockLastRequest,
    /// vLLM's runtime LoRA endpoints.
    LoadLora,
    UnloadLora,
    WrongMethod(&'static str),
    NotFound,
}

pub fn route(method: &Method, path: &str) -> Route {
    let (target, allowed) = match path {
        "/health" => (Route::Health, Method::GET),
        "/metrics" => (Route::Metrics, Method::GET),
        "/mock/health" => (Route::MockHealth, Method::POST),
        "/mock/fault" => (Route::MockFault, Method::POST),
        "/mock/stats" => (Route::MockStats, Method::GET),
        "/mock/last-request" => (Route::MockLastRequest, Method::GET),
        "/v1/load_lora_adapter" => (Route::LoadLora, Method::POST),
        "/v1/unload_lora_adapter" => (Route::UnloadLora, Method::POST),
        _ => {
            let p = match path.strip_prefix("/v1") {
                Some(rest) if rest.starts_with('/') => rest,
                _ => path,
            };
            match p {
                "/chat/completions" => (Route::Inference(Endpoint::Chat), Method::POST),
                "/completions" => (Route::Inference(Endpoint::Completions), Method::POST),
                "/embeddings" => (Route::Inference(Endpoint::Embeddings), Method::POST),
                "/models" => (Route::Models, Method::GET),
                _ => return Route::NotFound,
            }
        }
    };
    if *method == allowed || (allowed == Method::GET && *method == Method::HEAD) {
        target
    } else if allowed == Method::GET {
        Route::WrongMethod("GET, HEAD")
    } else {
        Route::WrongMethod("POST")
    }
}

pub struct ReceivedBody {
    pub data: Bytes,
    pub sha256: String,
}

pub async fn read_body(body: Incoming, size_hint: usize) -> Result<ReceivedBody, hyper::Error> {
    let mut body = body;
    let mut hasher = Sha256::new();
    let mut first: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        hasher.update(&data);
        match first.take() {
            // Keep a single-chunk body without copying it.
            None if buf.is_empty() => first = Some(data),
            Some(prev) => {
                buf.reserve(size_hint.min(MAX_PREALLOC).max(prev.len() + data.len()));
                buf.extend_from_slice(&prev);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
    }
    let data = match first {
        Some(b) => b,
        None => Bytes::from(buf),
    };
    Ok(ReceivedBody {
        data,
        sha256: hex::encode(hasher.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            route(&post, "/v1/chat/completions"),
            Route::Inference(Endpoint::Chat)
        );
        assert_eq!(
            route(&post, "/chat/completions"),
            Route::Inference(Endpoint::Chat)
        );
        assert_eq!(
            route(&post, "/v1/completions"),
            Route::Inference(Endpoint::Completions)
        );
        assert_eq!(
            route(&post, "/embeddings"),
            Route::Inference(Endpoint::Embeddings)
        );
        assert_eq!(route(&get, "/v1/models"), Route::Models);
        assert_eq!(
            route(&get, "/v1/chat/completions"),
            Route::WrongMethod("POST")
        );
        assert_eq!(route(&post, "/health"), Route::WrongMethod("GET, HEAD"));
        assert_eq!(route(&get, "/v1x/models"), Route::NotFound);
        assert_eq!(route(&get, "/nope"), Route::NotFound);
    }
}

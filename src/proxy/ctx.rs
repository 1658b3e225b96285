//! Per-request context: what the hooks decided, for the response and the log.

use crate::routing::InflightGuard;
use infergate_filters::FilterState;
use std::net::SocketAddr;
use std::time::Instant;

pub struct RequestCtx {
    pub started: Instant,
    pub filters: FilterState,
    pub endpoint: &'static str,
    pub model: Option<String>,
    pub pool: Option<String>,
    pub backend: Option<SocketAddr>,
    /// Held while an engine works on this request (least-in-flight balancing).
    pub inflight: Option<InflightGuard>,
    pub status: u16,
    pub error_code: Option<&'static str>,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub first_byte_at: Option<Instant>,
    /// The client went away before the response was complete.
    pub client_gone: bool,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            started: Instant::now(),
            filters: FilterState::default(),
            endpoint: "unknown",
            model: None,
            pool: None,
            backend: None,
            inflight: None,
            status: 0,
            error_code: None,
            request_bytes: 0,
            response_bytes: 0,
            first_byte_at: None,
            client_gone: false,
        }
    }

    pub fn request_id(&self) -> &str {
        self.filters.request_id.as_deref().unwrap_or("-")
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

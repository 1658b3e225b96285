//! Per-request context: what the hooks decided, for the response and the log.

use crate::model_stats::ModelGuard;
use crate::routing::InflightGuard;
use crate::usage::UsageTap;
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
    /// The authenticated principal's name, for the log.
    pub user: Option<String>,
    /// Prompt tokens estimated from the body size (admission, fallback usage).
    pub prompt_estimate: u64,
    /// The client asked for a stream.
    pub stream: bool,
    /// The gateway added `stream_options.include_usage` to the request.
    pub injected_usage: bool,
    /// Reads usage off the response.
    pub tap: UsageTap,
    /// A model pool was chosen: the request counts as proxied in metrics.
    pub proxied: bool,
    /// When the request went to the engine (upstream response time).
    pub sent_at: Option<Instant>,
    /// SSE responses: when the previous body chunk arrived, and the
    /// gap histogram for this request's model.
    pub last_chunk_at: Option<Instant>,
    /// SSE responses: when the first body chunk arrived (time to first token).
    pub first_chunk_at: Option<Instant>,
    pub chunk_gaps: Option<prometheus::Histogram>,
    /// The limit that refused the request, for metrics.
    pub limited: Option<&'static str>,
    /// `http_active_requests` was incremented for this request.
    pub counted_active: bool,
    /// Counts this request in its model's status counters while it runs.
    pub model_use: Option<ModelGuard>,
    /// Holds a managed engine busy (no idle unload, no eviction) while it runs.
    pub engine_use: Option<crate::engines::EngineUse>,
    /// The SSE response header already went out (keep-alive comments while
    /// an engine started): later errors become SSE error events.
    pub sse_started: bool,
    /// A WebSocket upgrade goes to this backend through Pingora's own proxy
    /// path (`upstream_peer`), which pipes both directions after the 101.
    pub websocket_upstream: Option<SocketAddr>,
    /// This request's body in the body budget, until the request ends.
    pub body_hold: Option<crate::body_budget::Hold>,
    /// It waited in its pool's dispatch queue, and for how long.
    pub queued: bool,
    pub queue_wait: Option<std::time::Duration>,
    /// Retries on another backend before the first byte.
    pub retries: u32,
    /// The model it was served by instead of the one asked for (`fallbacks`).
    pub fallback: Option<String>,
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
            user: None,
            prompt_estimate: 0,
            stream: false,
            injected_usage: false,
            tap: UsageTap::off(),
            proxied: false,
            sent_at: None,
            last_chunk_at: None,
            first_chunk_at: None,
            chunk_gaps: None,
            limited: None,
            counted_active: false,
            model_use: None,
            engine_use: None,
            sse_started: false,
            websocket_upstream: None,
            body_hold: None,
            queued: false,
            queue_wait: None,
            retries: 0,
            fallback: None,
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

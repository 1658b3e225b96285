//! Every error a client can see, and the one place that maps it to a status,
//! an OpenAI-shaped body, a log level and a metric label.
//!
//! Messages state what was wrong and how to fix it; they never echo a secret.
//! The match in [`GatewayError::spec`] has no wildcard arm on purpose: a new
//! variant must decide its own status.

use infergate_filters::Rejection;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// The body is not valid JSON (or not UTF-8, or nested too deep).
    InvalidJson { detail: String },
    /// The body is JSON but not an object.
    BodyNotObject,
    /// The body has no `model`.
    MissingModel,
    /// `model` is present but not a string.
    ModelNotString,
    /// No pool serves this model (or the caller may not see it).
    UnknownModel { model: String },
    /// The path takes another method.
    MethodNotAllowed { allow: &'static str },
    /// Nothing is served at this path.
    UnknownPath { path: String },
    /// The path cannot be normalised without guessing (`crate::path`).
    InvalidPath { reason: crate::path::PathError },
    /// The body is larger than `server.max_request_body_bytes`.
    BodyTooLarge { limit: u64 },
    /// The client's body ended early or was malformed on the wire.
    BodyRead { detail: String },
    /// Both `Content-Length` and `Transfer-Encoding`, or a transfer coding
    /// other than `chunked`: the framing is ambiguous (request smuggling).
    AmbiguousFraming,
    /// Every backend of the pool is unhealthy (or not yet checked).
    NoHealthyBackend { pool: String },
    /// Healthy backends exist but none accepted a connection.
    ConnectFailed { pool: String, attempts: usize },
    /// The engine did not answer in time.
    UpstreamTimeout { phase: TimeoutPhase },
    /// The engine broke the exchange (reset, garbage, early close).
    UpstreamFailed { detail: String },
    /// A filter refused the request (boxed: it is the largest variant).
    Rejected(Box<Rejection>),
    /// A bug or a failed worker inside the gateway.
    Internal { detail: String },
    /// A managed engine could not be made ready.
    Engine(crate::engines::EngineError),
    /// The gateway is shutting down and the grace period is ending.
    ShuttingDown,
    /// The client did not send its request (head or body) in time.
    ClientTimeout {
        what: &'static str,
        after: std::time::Duration,
    },
    /// The gateway cannot take more of this now (bodies held in memory, a
    /// full queue); `retry_after` in seconds.
    Overloaded { detail: String, retry_after: u32 },
    /// The pool's dispatch queue holds `queue.max_len` requests.
    QueueFull {
        pool: String,
        max_len: usize,
        retry_after: u32,
    },
    /// At the queue's measured rate the request would wait past `queue.max_wait`.
    QueueWouldWait {
        pool: String,
        expected: std::time::Duration,
        retry_after: u32,
    },
    /// The request waited `queue.max_wait` in the pool's queue.
    QueueTimeout {
        pool: String,
        waited: std::time::Duration,
        retry_after: u32,
    },
}

impl From<crate::body_budget::Refused> for GatewayError {
    fn from(refused: crate::body_budget::Refused) -> GatewayError {
        use crate::body_budget::Refused;
        match refused {
            Refused::Full { capacity } => GatewayError::Overloaded {
                detail: format!(
                    "the gateway is holding as many request bodies as it may ({capacity} bytes, server.max_buffered_body_bytes)"
                ),
                retry_after: 1,
            },
            Refused::PerPrincipal { limit } => {
                let mut rejection = infergate_filters::Rejection::new(
                    429,
                    "requests",
                    "rate_limit_exceeded",
                    format!(
                        "Your key is already sending {limit} request bodies at once, its concurrency limit. Wait for one to finish."
                    ),
                );
                rejection.retry_after = Some(1);
                rejection.limit = Some("concurrency");
                GatewayError::rejected(rejection)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    Connect,
    FirstByte,
    Idle,
}

impl TimeoutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Connect => "connect",
            TimeoutPhase::FirstByte => "first_byte",
            TimeoutPhase::Idle => "idle",
        }
    }
}

/// Everything the proxy needs to answer and record one error: what the
/// client sees (the same [`Rejection`] a filter gives, so there is one shape
/// for a client-facing error) and how the proxy handles the connection and
/// the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorSpec {
    pub error: Rejection,
    /// Whether the client connection can be kept (false when the body was not drained).
    pub keep_alive: bool,
    pub log_level: log::Level,
}

const INVALID: &str = "invalid_request_error";

impl GatewayError {
    pub fn rejected(rejection: Rejection) -> GatewayError {
        GatewayError::Rejected(Box::new(rejection))
    }

    pub fn spec(&self) -> ErrorSpec {
        use GatewayError as E;
        let (status, error_type, code, param, message) = match self {
            E::InvalidJson { detail } => (400, INVALID, "invalid_json", None,
                format!("We could not parse the JSON body of your request ({detail}). Send a JSON object with a `model` field.")),
            E::BodyNotObject => (400, INVALID, "invalid_json", None,
                "The request body must be a JSON object, e.g. {\"model\": \"...\", \"messages\": [...]}.".to_string()),
            E::MissingModel => (400, INVALID, "missing_model", Some("model"),
                "You must provide a model parameter: add `\"model\": \"<name>\"` to the JSON body (GET /v1/models lists the names).".to_string()),
            E::ModelNotString => (400, INVALID, "invalid_type", Some("model"),
                "The `model` parameter must be a string naming a model (GET /v1/models lists them).".to_string()),
            E::UnknownModel { model } => (404, INVALID, "model_not_found", Some("model"),
                format!("The model `{}` does not exist or you do not have access to it. GET /v1/models lists the available models.", sanitize(model))),
            E::MethodNotAllowed { allow } => (405, INVALID, "method_not_allowed", None,
                format!("This endpoint does not support this method; use {allow}.")),
            E::UnknownPath { path } => (404, INVALID, "unknown_url", None,
                format!("Unknown request URL: {}. See the API documentation for the supported endpoints.", sanitize(path))),
            E::InvalidPath { reason } => (400, INVALID, "invalid_path", None,
                format!("The request path is ambiguous: {reason}. Send the path in plain form, e.g. /v1/chat/completions.")),
            E::BodyTooLarge { limit } => (413, INVALID, "request_too_large", None,
                format!("The request body is larger than the gateway's limit of {limit} bytes. Shorten the prompt or ask the operator to raise server.max_request_body_bytes.")),
            E::BodyRead { detail } => (400, INVALID, "invalid_body", None,
                format!("The request body could not be read ({detail}).")),
            E::AmbiguousFraming => (400, INVALID, "invalid_framing", None,
                "The request has both Content-Length and Transfer-Encoding, or a transfer coding other than `chunked`. Send exactly one of them.".to_string()),
            E::NoHealthyBackend { pool } => (503, "service_unavailable", "no_healthy_backend", None,
                format!("No healthy engine is available for this model right now (pool `{pool}`). Retry shortly.")),
            E::ConnectFailed { pool, attempts } => (503, "service_unavailable", "upstream_unreachable", None,
                format!("No engine of pool `{pool}` accepted a connection ({attempts} attempts). Retry shortly.")),
            E::UpstreamTimeout { phase } => (504, "timeout", "upstream_timeout", None,
                format!("The engine did not respond in time ({} timeout).", phase.as_str())),
            E::UpstreamFailed { detail } => (502, "upstream_error", "upstream_error", None,
                format!("The engine failed to complete the request: {detail}.")),
            E::Rejected(r) => (r.status, r.error_type, r.code, r.param, r.message.clone()),
            E::Internal { detail } => (500, "server_error", "internal_error", None,
                format!("The gateway failed to handle the request ({detail}). Retry; if it persists, tell the operator.")),
            E::ShuttingDown => (503, "service_unavailable", "server_shutting_down", None,
                "The gateway is shutting down and could not finish this response within its grace period. Retry; another instance will take it.".to_string()),
            E::ClientTimeout { what, after } => (408, INVALID, "request_timeout", None,
                format!("The {what} did not arrive within {} s (server.client_{}_timeout). Send the whole request without pausing.", after.as_secs(), if *what == "request body" { "body" } else { "header" })),
            E::Overloaded { detail, .. } => (503, "service_unavailable", "server_overloaded", None,
                format!("The gateway is overloaded: {detail}. Retry after the time in Retry-After.")),
            E::QueueFull { pool, max_len, .. } => (503, "service_unavailable", "server_overloaded", None,
                format!("Every engine of pool `{pool}` is busy and {max_len} requests are already waiting (queue.max_len). Retry after the time in Retry-After.")),
            E::QueueWouldWait { pool, expected, .. } => (503, "service_unavailable", "server_overloaded", None,
                format!("Every engine of pool `{pool}` is busy and at the rate it serves its queue this request would wait about {:.1} s, longer than queue.max_wait. Retry after the time in Retry-After.", expected.as_secs_f64())),
            E::QueueTimeout { pool, waited, .. } => (503, "service_unavailable", "server_overloaded", None,
                format!("Every engine of pool `{pool}` stayed busy for the {:.1} s this request waited (queue.max_wait). Retry after the time in Retry-After.", waited.as_secs_f64())),
            E::Engine(e) => {
                use crate::engines::EngineError as X;
                let code = match e {
                    X::Failed { .. } => "engine_failed",
                    X::Timeout { .. } => "engine_start_timeout",
                    X::NoGpuMemory { .. } => "insufficient_gpu_memory",
                    X::TooLargeForGpu { .. } => "model_too_large_for_gpu",
                    X::Unloading { .. } => "engine_unloading",
                };
                (503, "service_unavailable", code, None, e.message())
            }
        };
        let retry_after = match self {
            E::Rejected(r) => r.retry_after.map(|s| s.max(1)),
            E::NoHealthyBackend { .. } | E::ConnectFailed { .. } | E::ShuttingDown => Some(1),
            E::Overloaded { retry_after, .. }
            | E::QueueFull { retry_after, .. }
            | E::QueueWouldWait { retry_after, .. }
            | E::QueueTimeout { retry_after, .. } => Some((*retry_after).max(1)),
            E::Engine(crate::engines::EngineError::Failed { .. }) => None,
            E::Engine(crate::engines::EngineError::TooLargeForGpu { .. }) => None,
            E::Engine(crate::engines::EngineError::NoGpuMemory { .. }) => Some(10),
            E::Engine(_) => Some(2),
            _ => None,
        };
        let headers = match self {
            // the OpenAI SDKs retry 503s unless told not to: this one never passes
            E::Engine(crate::engines::EngineError::TooLargeForGpu { .. }) => {
                vec![("x-should-retry", "false".to_string())]
            }
            _ => Vec::new(),
        };
        let keep_alive = !matches!(
            self,
            E::BodyTooLarge { .. }
                | E::BodyRead { .. }
                | E::AmbiguousFraming
                | E::ClientTimeout { .. }
                | E::Overloaded { .. }
        );
        // shedding under overload is the gateway doing its job, like a 429:
        // counted in metrics and the access log, not a warning per request
        let shed = matches!(
            self,
            E::QueueFull { .. } | E::QueueWouldWait { .. } | E::QueueTimeout { .. }
        );
        let log_level = if status >= 500 && !shed {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        let error = match self {
            // a filter's refusal keeps its headers and its limit label
            E::Rejected(r) => Rejection {
                retry_after,
                ..(**r).clone()
            },
            _ => {
                let mut error = Rejection::new(status, error_type, code, message);
                error.param = param;
                error.retry_after = retry_after;
                error.headers = headers;
                error
            }
        };
        ErrorSpec {
            error,
            keep_alive,
            log_level,
        }
    }
}

impl ErrorSpec {
    /// OpenAI's error schema: all four keys, `param` and `code` nullable strings.
    pub fn body(&self) -> Vec<u8> {
        self.error.body()
    }
}

/// Client-supplied text echoed in a message: bounded and printable.
fn sanitize(text: &str) -> String {
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_is_404_model_not_found_with_param() {
        let spec = GatewayError::UnknownModel { model: "x".into() }.spec();
        assert_eq!(
            (spec.error.status, spec.error.code, spec.error.param),
            (404, "model_not_found", Some("model"))
        );
        let body: serde_json::Value = serde_json::from_slice(&spec.body()).unwrap_or_default();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("`x`")));
    }

    #[test]
    fn no_healthy_backend_is_503_with_retry_after() {
        let spec = GatewayError::NoHealthyBackend {
            pool: "chat".into(),
        }
        .spec();
        assert_eq!((spec.error.status, spec.error.retry_after), (503, Some(1)));
    }

    #[test]
    fn oversized_body_closes_the_connection() {
        let spec = GatewayError::BodyTooLarge { limit: 10 }.spec();
        assert_eq!((spec.error.status, spec.keep_alive), (413, false));
    }

    #[test]
    fn echoed_model_names_are_bounded_and_stripped() {
        let spec = GatewayError::UnknownModel {
            model: format!("a\n{}", "b".repeat(500)),
        }
        .spec();
        assert!(!spec.error.message.contains('\n'));
        assert!(spec.error.message.len() < 400);
    }
}

//! infergate's request filters, free of any Pingora type.
//!
//! A filter decides *whether and how* a request proceeds (identity, limits,
//! CORS, request ids); routing decides *where* it goes and lives in the
//! gateway. Each filter has a typed config (unknown keys are errors), lives in
//! its own file or directory with its tests, and is listed in [`registry`].
//!
//! The gateway calls a filter at two points:
//! - [`Filter::on_request`], before the body is read: headers, path, query.
//!   Identity is established here, CORS preflights are answered here.
//! - [`Filter::on_admit`], once the body is read and `model` is known, before
//!   any engine is contacted: model access and limits.
//!
//! What they learn travels in [`FilterState`] to the response and the log.

// `Rejection` is the cold path (a refused request); keeping it unboxed keeps
// the filters simple, and its size does not matter for the admitted requests.
#![allow(clippy::result_large_err)]

pub mod auth;
mod chain;
pub mod cors;
pub mod limits;
pub mod percent;
pub mod registry;
mod request_id;
pub mod watch;

pub use chain::Chain;
pub use registry::FilterConfig;
pub use request_id::{RequestId, RequestIdConfig};

use std::net::IpAddr;
use std::sync::Arc;

/// What an endpoint requires of its caller; the gateway's endpoint table
/// decides, filters enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Status pages, metrics, unknown paths: no identity needed.
    Public,
    /// `POST /user/user_login`: no identity, but login attempts are limited.
    Login,
    /// The OpenAI API (`/v1/*`): a valid key or token.
    Api,
    /// `/admin/*`: a key or token with the admin role.
    Admin,
}

/// One request as a filter sees it. The gateway implements this over
/// Pingora's request header; tests implement it over plain fields.
pub trait Request {
    fn method(&self) -> &str;
    fn path(&self) -> &str;
    /// The raw query string, without `?`.
    fn query(&self) -> Option<&str>;
    /// Replace the query string (`None` removes it) in what goes upstream.
    fn set_query(&mut self, query: Option<&str>);
    fn header(&self, name: &str) -> Option<&str>;
    fn set_header(&mut self, name: &'static str, value: &str);
    fn remove_header(&mut self, name: &str);
    fn access(&self) -> Access;
    fn client_ip(&self) -> Option<IpAddr>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

/// Per-principal limits, each optional (absent = unlimited at this level).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Sustained requests per second (token bucket refill rate).
    pub requests_per_second: Option<f64>,
    /// Bucket size for requests; default: max(1, ceil(requests_per_second)).
    pub burst: Option<u32>,
    /// Requests in flight at once.
    pub concurrent: Option<u32>,
    /// Tokens (prompt + completion) per minute.
    pub tokens_per_minute: Option<u64>,
}

/// A principal's place in a pool's dispatch queue: higher `priority` is
/// served first (with aging), and within a priority, principals share by
/// `weight` (docs/flow-control.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// 0–9; `low` = 2, `normal` = 5, `high` = 8.
    pub priority: u8,
    /// 1–1000.
    pub weight: u32,
}

impl Default for Share {
    fn default() -> Self {
        Share {
            priority: Priority::NORMAL,
            weight: 1,
        }
    }
}

/// `priority` in a keys or users file: `high`, `normal`, `low` or 0–9.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Priority(pub u8);

impl Priority {
    pub const LOW: u8 = 2;
    pub const NORMAL: u8 = 5;
    pub const HIGH: u8 = 8;
    pub const MAX: u8 = 9;

    /// `high`, `normal`, `low` or a number 0–9.
    pub fn parse(text: &str) -> Result<Priority, String> {
        match text.trim() {
            "high" => Ok(Priority(Self::HIGH)),
            "normal" => Ok(Priority(Self::NORMAL)),
            "low" => Ok(Priority(Self::LOW)),
            other => match other.parse::<u8>() {
                Ok(n) if n <= Self::MAX => Ok(Priority(n)),
                _ => Err(format!(
                    "priority `{other}` is not one of high, normal, low or a number 0-9"
                )),
            },
        }
    }
}

impl<'de> serde::Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Priority, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        Priority::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `weight` bounds in keys and users files.
pub const MAX_SHARE_WEIGHT: u32 = 1000;

/// Who is calling, as established by the `auth` filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Stable, secret-free id for limiter state, the quota store and logs:
    /// `key:<first 12 hex of the key's SHA-256>` or `user:<user_id>`.
    pub id: String,
    /// The principal's display name (the seed's `user`, or the user's email).
    pub user: String,
    pub role: Role,
    /// Models this principal may use; `None` = all.
    pub models: Option<Vec<String>>,
    /// Limits for this principal; fields left `None` fall back to the
    /// `limits` filter's `per_key` defaults.
    pub limits: LimitSpec,
    /// Total token quota over the principal's lifetime; `None` = unlimited.
    pub quota: Option<u64>,
    /// Priority and weight in a pool's dispatch queue.
    pub share: Share,
}

impl Identity {
    /// Whether this principal may use `model` (served name or alias as the client wrote it).
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == model || m == "*"))
    }
}

/// What the gateway knows once the body is read, for admission.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmitInfo<'a> {
    /// `model` as the client wrote it (`None`: no model, default pool).
    pub model: Option<&'a str>,
    /// Estimated prompt tokens (from the body size).
    pub prompt_tokens_estimate: u64,
    /// `max_completion_tokens` or `max_tokens` from the body, if given.
    pub max_output_tokens: Option<u64>,
}

/// What the filters learned about one request, carried to the response.
#[derive(Default)]
pub struct FilterState {
    /// The request id the request runs under (client's or generated).
    pub request_id: Option<String>,
    /// Headers every response to this request carries, errors included.
    pub response_headers: Vec<(&'static str, String)>,
    /// The authenticated caller, if any.
    pub identity: Option<Arc<Identity>>,
    /// Limit slots and token reservations held while the request runs;
    /// settle it with the real usage, or drop it to refund.
    pub admission: Option<limits::Admission>,
}

/// A response a filter gives instead of proceeding (e.g. a CORS preflight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// Whether the request goes on after a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Respond(LocalResponse),
}

/// An error as the client sees it: a filter's refusal, and (through the
/// gateway's `ErrorSpec`) every other error the gateway answers with. The
/// body is OpenAI's error object ([`Rejection::body`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub error_type: &'static str,
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
    /// Seconds for `Retry-After` (≥ 1), when waiting helps.
    pub retry_after: Option<u32>,
    /// Extra headers for this error (e.g. `x-should-retry: false`).
    pub headers: Vec<(&'static str, String)>,
    /// Which limit refused, for metrics (`requests_per_second`,
    /// `concurrency`, `tokens_per_minute`, `request_too_large`, `quota`,
    /// `login`); `None` for refusals that are not limits.
    pub limit: Option<&'static str>,
}

impl Rejection {
    pub fn new(
        status: u16,
        error_type: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Rejection {
            status,
            error_type,
            code,
            param: None,
            message: message.into(),
            retry_after: None,
            headers: Vec::new(),
            limit: None,
        }
    }

    /// OpenAI's error schema: all four keys, `param` and `code` nullable strings.
    pub fn body(&self) -> Vec<u8> {
        openai_error_body(&self.message, self.error_type, self.param, Some(self.code))
    }
}

/// `{"error": {"message", "type", "param", "code"}}`, OpenAI's error object.
pub fn openai_error_body(
    message: &str,
    error_type: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Vec<u8> {
    serde_json::json!({"error": {"message": message, "type": error_type, "param": param, "code": code}})
        .to_string()
        .into_bytes()
}

/// One step of the chain.
pub trait Filter: Send + Sync {
    /// The name used in YAML and logs.
    fn name(&self) -> &'static str;
    /// Before the body is read. `Ok(Flow::Respond)` answers the client
    /// without going further; `Err` answers with an error.
    fn on_request(&self, req: &mut dyn Request, state: &mut FilterState)
        -> Result<Flow, Rejection>;
    /// Once `model` is known, before any engine is contacted.
    fn on_admit(&self, _info: &AdmitInfo<'_>, _state: &mut FilterState) -> Result<(), Rejection> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::{Access, Request};
    use std::net::IpAddr;

    /// A request for filter tests.
    pub struct TestRequest {
        pub method: String,
        pub path: String,
        pub query: Option<String>,
        pub headers: Vec<(String, String)>,
        pub access: Access,
        pub client_ip: Option<IpAddr>,
    }

    impl Default for TestRequest {
        fn default() -> Self {
            TestRequest {
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                query: None,
                headers: Vec::new(),
                access: Access::Api,
                client_ip: None,
            }
        }
    }

    impl TestRequest {
        pub fn with_header(mut self, name: &str, value: &str) -> Self {
            self.headers.push((name.to_string(), value.to_string()));
            self
        }
    }

    impl Request for TestRequest {
        fn method(&self) -> &str {
            &self.method
        }
        fn path(&self) -> &str {
            &self.path
        }
        fn query(&self) -> Option<&str> {
            self.query.as_deref()
        }
        fn set_query(&mut self, query: Option<&str>) {
            self.query = query.map(str::to_string);
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn set_header(&mut self, name: &'static str, value: &str) {
            self.remove_header(name);
            self.headers.push((name.to_string(), value.to_string()));
        }
        fn remove_header(&mut self, name: &str) {
            self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        }
        fn access(&self) -> Access {
            self.access
        }
        fn client_ip(&self) -> Option<IpAddr> {
            self.client_ip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Rejection;

    #[test]
    fn a_rejection_body_is_openai_s_error_object_with_all_four_keys() {
        let rejection = Rejection::new(429, "requests", "rate_limit_exceeded", "slow down");
        let body: serde_json::Value = serde_json::from_slice(&rejection.body()).unwrap_or_default();
        assert_eq!(body["error"]["message"], "slow down");
        assert_eq!(body["error"]["type"], "requests");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        let error = body["error"].as_object().cloned().unwrap_or_default();
        assert!(error.get("param").is_some_and(|p| p.is_null()), "{body}");
    }
}

//! `cors`: lets browser apps on allowed origins call the API.
//!
//! ```yaml
//! filters:
//!   - cors:
//!       allow_origins: ["http://localhost:5173", "http://127.0.0.1:5173"]
//! ```
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
//!   is answered here with 204, before authentication (browsers send no
//!   credentials on preflights), or 403 saying what is not allowed.
//! - Any other request from an allowed origin gets `Access-Control-Allow-Origin`
//!   on its response, errors included, and the headers the OpenAI SDKs read
//!   (`Retry-After`, `x-ratelimit-*`, `x-request-id`) are exposed.
//! - `Vary: Origin` is on every response, so caches never mix origins.
//!
//! Allowed request headers are those the OpenAI SDKs send (`Authorization`,
//! `Content-Type`, `OpenAI-Organization`, `OpenAI-Project`, `OpenAI-Beta`,
//! `X-Stainless-*`, ...) plus `allow_headers`. Put `cors` before `auth`.

use crate::{Filter, FilterState, Flow, LocalResponse, Rejection, Request};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Exact origins (`scheme://host[:port]`) allowed to call the API, or `"*"`.
    pub allow_origins: Vec<String>,
    /// Request headers allowed in addition to the built-in list.
    pub allow_headers: Vec<String>,
    /// How long browsers may cache a preflight answer.
    pub max_age_seconds: u32,
    /// Send `Access-Control-Allow-Credentials: true` (cookies); forbids `"*"`.
    pub allow_credentials: bool,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allow_origins: vec![
                "http://localhost:5173".to_string(),
                "http://127.0.0.1:5173".to_string(),
            ],
            allow_headers: Vec::new(),
            max_age_seconds: 600,
            allow_credentials: false,
        }
    }
}

/// Headers browsers may send, lower case. `x-stainless-*` is matched by prefix.
const BUILTIN_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "accept",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-api-key",
    "x-request-id",
    "x-session-id",
    "retry-after-ms",
];

const EXPOSE: &str = "Retry-After, x-request-id, x-should-retry, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens";
const METHODS: &str = "GET, POST, DELETE, OPTIONS";

impl CorsConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for origin in &self.allow_origins {
            if origin == "*" {
                if self.allow_credentials {
                    return Err((
                        "allow_origins",
                        "`*` cannot be combined with allow_credentials: true; list the origins"
                            .into(),
                    ));
                }
                continue;
            }
            let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.ends_with('/')
                && !origin.contains(char::is_whitespace)
                && origin.split("://").nth(1).is_some_and(|h| !h.is_empty());
            if !ok {
                return Err((
                    "allow_origins",
                    format!("`{origin}` is not an origin; write scheme://host[:port] without a path or trailing slash, or \"*\""),
                ));
            }
        }
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        for h in &self.allow_headers {
            if h.is_empty() || !h.bytes().all(token) {
                return Err(("allow_headers", format!("`{h}` is not a valid header name")));
            }
        }
        Ok(())
    }
}

pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    extra_headers: Vec<String>,
    max_age: String,
    credentials: bool,
}

impl Cors {
    pub fn new(config: CorsConfig) -> Self {
        Cors {
            any_origin: config.allow_origins.iter().any(|o| o == "*"),
            origins: config.allow_origins,
            extra_headers: config
                .allow_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            max_age: config.max_age_seconds.to_string(),
            credentials: config.allow_credentials,
        }
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.any_origin || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }

    fn header_allowed(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        name.starts_with("x-stainless-")
            || BUILTIN_HEADERS.contains(&name.as_str())
            || self.extra_headers.contains(&name)
    }

    fn allow_origin_value(&self, origin: &str) -> String {
        if self.any_origin && !self.credentials {
            "*".to_string()
        } else {
            origin.to_string()
        }
    }

    fn preflight(&self, req: &dyn Request, origin: &str) -> Result<Flow, Rejection> {
        let forbidden = |message: String| {
            let mut r = Rejection::new(403, "invalid_request_error", "cors_forbidden", message);
            r.headers.push(("vary", "Origin".to_string()));
            r
        };
        if !self.origin_allowed(origin) {
            return Err(forbidden(format!(
                "Cross-origin requests from `{}` are not allowed. Ask the operator to add it to the cors filter's allow_origins.",
                printable(origin)
            )));
        }
        let method = req.header("access-control-request-method").unwrap_or("");
        if !matches!(method, "GET" | "POST" | "DELETE" | "OPTIONS") {
            return Err(forbidden(format!(
                "Method `{}` is not allowed cross-origin; use one of {METHODS}.",
                printable(method)
            )));
        }
        let requested = req.header("access-control-request-headers").unwrap_or("");
        let mut allowed = Vec::new();
        for name in requested
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
        {
            if !self.header_allowed(name) {
                return Err(forbidden(format!(
                    "Request header `{}` is not allowed cross-origin. Ask the operator to add it to the cors filter's allow_headers.",
                    printable(name)
                )));
            }
            allowed.push(name.to_ascii_lowercase());
        }
        let mut headers = vec![
            (
                "access-control-allow-origin",
                self.allow_origin_value(origin),
            ),
            ("access-control-allow-methods", METHODS.to_string()),
            ("access-control-max-age", self.max_age.clone()),
            (
                "vary",
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers".to_string(),
            ),
        ];
        if !allowed.is_empty() {
            headers.push(("access-control-allow-headers", allowed.join(", ")));
        }
        if self.credentials {
            headers.push(("access-control-allow-credentials", "true".to_string()));
        }
        Ok(Flow::Respond(LocalResponse {
            status: 204,
            headers,
            body: Vec::new(),
        }))
    }
}

/// Client text echoed in a message: short and printable.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(100).collect()
}

impl Filter for Cors {
    fn name(&self) -> &'static str {
        "cors"
    }

    fn on_request(
        &self,
        req: &mut dyn Request,
        state: &mut FilterState,
    ) -> Result<Flow, Rejection> {
        let Some(origin) = req.header("origin").map(str::to_string) else {
            if !self.any_origin {
                state.response_headers.push(("vary", "Origin".to_string()));
            }
            return Ok(Flow::Continue);
        };
        if req.method() == "OPTIONS" && req.header("access-control-request-method").is_some() {
            return self.preflight(req, &origin);
        }
        state.response_headers.push(("vary", "Origin".to_string()));
        if self.origin_allowed(&origin) {
            state.response_headers.push((
                "access-control-allow-origin",
                self.allow_origin_value(&origin),
            ));
            state
                .response_headers
                .push(("access-control-expose-headers", EXPOSE.to_string()));
            if self.credentials {
                state
                    .response_headers
                    .push(("access-control-allow-credentials", "true".to_string()));
            }
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestRequest;

    fn header<'a>(headers: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn preflight(origin: &str, req_headers: &str) -> TestRequest {
        let mut req = TestRequest::default()
            .with_header("origin", origin)
            .with_header("access-control-request-method", "POST")
            .with_header("access-control-request-headers", req_headers);
        req.method = "OPTIONS".into();
        req
    }

    #[test]
    fn preflight_from_default_origin_allows_sdk_headers() {
        let cors = Cors::new(CorsConfig::default());
        let mut req = preflight(
            "http://localhost:5173",
            "authorization, content-type, x-stainless-os, openai-organization",
        );
        let mut state = FilterState::default();
        let Ok(Flow::Respond(resp)) = cors.on_request(&mut req, &mut state) else {
            panic!("expected a preflight answer");
        };
        assert_eq!(resp.status, 204);
        assert_eq!(
            header(&resp.headers, "access-control-allow-origin"),
            Some("http://localhost:5173")
        );
        assert_eq!(
            header(&resp.headers, "access-control-allow-headers"),
            Some("authorization, content-type, x-stainless-os, openai-organization")
        );
        assert!(header(&resp.headers, "vary").is_some_and(|v| v.contains("Origin")));
    }

    #[test]
    fn preflight_from_unknown_origin_or_with_odd_header_is_403() {
        let cors = Cors::new(CorsConfig::default());
        let mut state = FilterState::default();
        let err = cors
            .on_request(
                &mut preflight("http://evil.example", "authorization"),
                &mut state,
            )
            .err();
        assert_eq!(
            err.map(|e| (e.status, e.code)),
            Some((403, "cors_forbidden"))
        );
        let err = cors
            .on_request(
                &mut preflight("http://localhost:5173", "x-secret-thing"),
                &mut state,
            )
            .err();
        assert!(err.is_some_and(|e| e.message.contains("x-secret-thing")));
    }

    #[test]
    fn simple_request_gets_allow_origin_and_exposed_headers() {
        let cors = Cors::new(CorsConfig::default());
        let mut req = TestRequest::default().with_header("origin", "http://127.0.0.1:5173");
        let mut state = FilterState::default();
        assert_eq!(cors.on_request(&mut req, &mut state), Ok(Flow::Continue));
        let h = &state.response_headers;
        assert_eq!(
            header(h, "access-control-allow-origin"),
            Some("http://127.0.0.1:5173")
        );
        assert!(header(h, "access-control-expose-headers").is_some_and(|v| v
            .contains("x-ratelimit-remaining-tokens")
            && v.contains("Retry-After")));
        assert_eq!(header(h, "vary"), Some("Origin"));
    }

    #[test]
    fn disallowed_origin_gets_no_allow_origin_but_vary() {
        let cors = Cors::new(CorsConfig::default());
        let mut req = TestRequest::default().with_header("origin", "http://evil.example");
        let mut state = FilterState::default();
        assert_eq!(cors.on_request(&mut req, &mut state), Ok(Flow::Continue));
        assert_eq!(
            header(&state.response_headers, "access-control-allow-origin"),
            None
        );
        assert_eq!(header(&state.response_headers, "vary"), Some("Origin"));
    }

    #[test]
    fn wildcard_answers_star_and_rejects_credentials() {
        let config = CorsConfig {
            allow_origins: vec!["*".into()],
            ..CorsConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
        let cors = Cors::new(config.clone());
        let mut req = TestRequest::default().with_header("origin", "https://app.example");
        let mut state = FilterState::default();
        assert_eq!(cors.on_request(&mut req, &mut state), Ok(Flow::Continue));
        assert_eq!(
            header(&state.response_headers, "access-control-allow-origin"),
            Some("*")
        );
        let bad = CorsConfig {
            allow_credentials: true,
            ..config
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn origins_are_validated() {
        for bad in ["localhost:5173", "http://x/", "http://", "http://a b"] {
            let config = CorsConfig {
                allow_origins: vec![bad.into()],
                ..CorsConfig::default()
            };
            assert!(config.validate().is_err(), "{bad} should be rejected");
        }
    }
}

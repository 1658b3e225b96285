//! `request_id`: every request runs under an id, the client's when it sent a
//! sane one, a fresh UUID otherwise. The id goes upstream in the same header
//! and comes back on every response, errors included.

use crate::{Filter, FilterState, Flow, Rejection, Request};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RequestIdConfig {
    /// Header carrying the id, in both directions.
    pub header: String,
}

impl Default for RequestIdConfig {
    fn default() -> Self {
        RequestIdConfig {
            header: "x-request-id".to_string(),
        }
    }
}

impl RequestIdConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        // RFC 9110 token characters
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if self.header.is_empty() || !self.header.bytes().all(token) {
            return Err((
                "header",
                format!("`{}` is not a valid HTTP header name", self.header),
            ));
        }
        Ok(())
    }
}

pub struct RequestId {
    header: &'static str,
}

impl RequestId {
    pub fn new(config: RequestIdConfig) -> Self {
        // Header names live for the whole process; leaking one small string per
        // configured filter lets the hot path use `&'static str` without copies.
        let header: &'static str = Box::leak(config.header.to_ascii_lowercase().into_boxed_str());
        RequestId { header }
    }
}

/// A client id is kept only if it is short and made of safe characters, so it
/// can be logged and forwarded without escaping.
fn acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

impl Filter for RequestId {
    fn name(&self) -> &'static str {
        "request_id"
    }

    fn on_request(
        &self,
        req: &mut dyn Request,
        state: &mut FilterState,
    ) -> Result<Flow, Rejection> {
        let id = match req.header(self.header) {
            Some(given) if acceptable(given) => given.to_string(),
            _ => {
                let fresh = uuid::Uuid::new_v4().to_string();
                req.set_header(self.header, &fresh);
                fresh
            }
        };
        state.response_headers.push((self.header, id.clone()));
        state.request_id = Some(id);
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestRequest;

    fn run(req: &mut TestRequest) -> FilterState {
        let mut state = FilterState::default();
        let filter = RequestId::new(RequestIdConfig::default());
        assert_eq!(filter.on_request(req, &mut state), Ok(Flow::Continue));
        state
    }

    #[test]
    fn keeps_a_clean_client_id() {
        let mut req = TestRequest::default().with_header("X-Request-Id", "abc-123");
        let state = run(&mut req);
        assert_eq!(state.request_id.as_deref(), Some("abc-123"));
        assert_eq!(
            state.response_headers,
            vec![("x-request-id", "abc-123".to_string())]
        );
    }

    #[test]
    fn replaces_a_missing_or_unsafe_id_upstream_too() {
        for given in [None, Some("has space"), Some("")] {
            let mut req = TestRequest::default();
            if let Some(g) = given {
                req = req.with_header("x-request-id", g);
            }
            let state = run(&mut req);
            let id = state.request_id.unwrap_or_default();
            assert_eq!(id.len(), 36, "a UUID is generated for {given:?}");
            assert_eq!(req.header("x-request-id"), Some(id.as_str()));
        }
    }

    #[test]
    fn header_name_is_validated() {
        let bad = RequestIdConfig {
            header: "x request id".into(),
        };
        assert!(bad.validate().is_err());
        assert_eq!(RequestIdConfig::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_overlong_ids() {
        assert!(!acceptable(&"a".repeat(129)));
        assert!(acceptable(&"a".repeat(128)));
    }
}

//! infergate's request filters, free of any Pingora type.
//!
//! A filter decides *whether and how* a request proceeds (identity, limits,
//! request ids); routing decides *where* it goes and lives in the gateway.
//! Each filter has a typed config (unknown keys are errors), lives in its own
//! file with its tests, and is listed in [`registry`]. The gateway runs the
//! [`Chain`] in `request_filter`, before it reads the body.

mod chain;
pub mod registry;
mod request_id;

pub use chain::Chain;
pub use registry::FilterConfig;
pub use request_id::{RequestId, RequestIdConfig};

/// Request headers as a filter sees them. The gateway implements this over
/// Pingora's request header; tests implement it over a `Vec`.
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
    fn set(&mut self, name: &'static str, value: &str);
}

/// What the filters learned about one request, carried to the response.
#[derive(Debug, Default, Clone)]
pub struct FilterState {
    /// The request id the request runs under (client's or generated).
    pub request_id: Option<String>,
    /// Headers every response to this request carries, errors included.
    pub response_headers: Vec<(&'static str, String)>,
}

/// A filter's refusal: the gateway turns it into an OpenAI-shaped error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub error_type: &'static str,
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
}

/// One step of the chain.
pub trait Filter: Send + Sync {
    /// The name used in YAML and logs.
    fn name(&self) -> &'static str;
    /// Inspect or change the request; `Err` stops the chain and answers the client.
    fn on_request(
        &self,
        headers: &mut dyn Headers,
        state: &mut FilterState,
    ) -> Result<(), Rejection>;
}

#[cfg(test)]
pub(crate) mod testing {
    use super::Headers;

    #[derive(Default)]
    pub struct VecHeaders(pub Vec<(String, String)>);

    impl Headers for VecHeaders {
        fn get(&self, name: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn set(&mut self, name: &'static str, value: &str) {
            self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            self.0.push((name.to_string(), value.to_string()));
        }
    }
}

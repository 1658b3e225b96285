//! An ordered list of filters built from config.

use crate::{AdmitInfo, Filter, FilterState, Flow, Rejection, Request};

/// The configured filters, run in order for every request.
#[derive(Default)]
pub struct Chain {
    filters: Vec<Box<dyn Filter>>,
}

impl Chain {
    pub fn new(filters: Vec<Box<dyn Filter>>) -> Self {
        Chain { filters }
    }

    /// Names in order, for logs and `--check`.
    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    /// Run every filter's `on_request`, recording into `state`. The first
    /// rejection or local response stops the chain (what earlier filters
    /// recorded, e.g. the request id or CORS headers, is kept).
    pub fn on_request(
        &self,
        req: &mut dyn Request,
        state: &mut FilterState,
    ) -> Result<Flow, Rejection> {
        for filter in &self.filters {
            match filter.on_request(req, state)? {
                Flow::Continue => {}
                respond => return Ok(respond),
            }
        }
        Ok(Flow::Continue)
    }

    /// Run every filter's `on_admit` once `model` is known.
    pub fn on_admit(&self, info: &AdmitInfo<'_>, state: &mut FilterState) -> Result<(), Rejection> {
        for filter in &self.filters {
            filter.on_admit(info, state)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestRequest;
    use crate::{RequestId, RequestIdConfig};

    #[test]
    fn empty_chain_passes_and_sets_nothing() {
        let chain = Chain::default();
        let mut req = TestRequest::default();
        let mut state = FilterState::default();
        assert_eq!(chain.on_request(&mut req, &mut state), Ok(Flow::Continue));
        assert_eq!(state.request_id, None);
    }

    #[test]
    fn chain_runs_configured_filters_in_order() {
        let chain = Chain::new(vec![Box::new(RequestId::new(RequestIdConfig::default()))]);
        assert_eq!(chain.names(), vec!["request_id"]);
        let mut req = TestRequest::default();
        let mut state = FilterState::default();
        assert_eq!(chain.on_request(&mut req, &mut state), Ok(Flow::Continue));
        assert!(state.request_id.is_some());
    }
}

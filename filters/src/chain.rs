//! An ordered list of filters built from config.

use crate::registry::FilterConfig;
use crate::{Filter, FilterState, Headers, Rejection};

/// The configured filters, run in order for every proxied request.
pub struct Chain {
    filters: Vec<Box<dyn Filter>>,
}

impl Chain {
    pub fn from_config(configs: &[FilterConfig]) -> Self {
        Chain {
            filters: configs.iter().map(FilterConfig::build).collect(),
        }
    }

    /// Names in order, for logs and `--check`.
    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    /// Run every filter, recording into `state`; the first rejection stops the
    /// chain (what earlier filters recorded, e.g. the request id, is kept).
    pub fn run(&self, headers: &mut dyn Headers, state: &mut FilterState) -> Result<(), Rejection> {
        for filter in &self.filters {
            filter.on_request(headers, state)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::VecHeaders;
    use crate::RequestIdConfig;

    #[test]
    fn empty_chain_passes_and_sets_nothing() {
        let chain = Chain::from_config(&[]);
        let mut headers = VecHeaders::default();
        let mut state = FilterState::default();
        assert_eq!(chain.run(&mut headers, &mut state), Ok(()));
        assert_eq!(state.request_id, None);
    }

    #[test]
    fn chain_runs_configured_filters_in_order() {
        let chain = Chain::from_config(&[FilterConfig::RequestId(RequestIdConfig::default())]);
        assert_eq!(chain.names(), vec!["request_id"]);
        let mut headers = VecHeaders::default();
        let mut state = FilterState::default();
        assert_eq!(chain.run(&mut headers, &mut state), Ok(()));
        assert!(state.request_id.is_some());
    }
}

//! Every built-in filter, by the name used in YAML.
//!
//! ```yaml
//! filters:
//!   - request_id: { header: x-request-id }
//! ```

use crate::request_id::{RequestId, RequestIdConfig};
use crate::Filter;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// Names of all built-in filters, in the order they are documented.
pub const BUILTIN: &[&str] = &["request_id"];

/// One entry of the `filters:` list: the filter's name and its typed config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterConfig {
    RequestId(RequestIdConfig),
}

/// A one-key map `{name: config}`. Written by hand because serde_yaml 0.9
/// expects `!tag` syntax for enums, which ops teams do not write.
impl<'de> Deserialize<'de> for FilterConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneKey;
        impl<'de> Visitor<'de> for OneKey {
            type Value = FilterConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a filter as `name: {{config}}`, one of: {}",
                    BUILTIN.join(", ")
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FilterConfig, A::Error> {
                let Some(name) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("empty filter entry"));
                };
                let config = match name.as_str() {
                    "request_id" => {
                        let cfg: Option<RequestIdConfig> = map.next_value()?;
                        FilterConfig::RequestId(cfg.unwrap_or_default())
                    }
                    other => return Err(de::Error::unknown_variant(other, BUILTIN)),
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("one filter per list entry"));
                }
                Ok(config)
            }
        }
        deserializer.deserialize_map(OneKey)
    }
}

impl FilterConfig {
    pub fn build(&self) -> Box<dyn Filter> {
        match self {
            FilterConfig::RequestId(cfg) => Box::new(RequestId::new(cfg.clone())),
        }
    }

    /// Check values serde cannot: `Err((key, message))` names the bad key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match self {
            FilterConfig::RequestId(cfg) => cfg.validate(),
        }
    }

    /// The chain used when the config has no `filters:` key.
    pub fn defaults() -> Vec<FilterConfig> {
        vec![FilterConfig::RequestId(RequestIdConfig::default())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_filter_entry() {
        let parsed: Result<FilterConfig, _> = serde_yaml::from_str("request_id: {}");
        assert_eq!(
            parsed.ok(),
            Some(FilterConfig::RequestId(RequestIdConfig::default()))
        );
    }

    #[test]
    fn rejects_unknown_filter_and_unknown_keys() {
        assert!(serde_yaml::from_str::<FilterConfig>("no_such_filter: {}").is_err());
        assert!(serde_yaml::from_str::<FilterConfig>("request_id: { colour: red }").is_err());
    }
}

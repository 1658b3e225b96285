//! Every built-in filter, by the name used in YAML.
//!
//! ```yaml
//! filters:
//!   - request_id: { header: x-request-id }
//! ```

use crate::auth::{Auth, AuthConfig, AuthFilter, StagedFiles};
use crate::cors::{Cors, CorsConfig};
use crate::limits::{Limits, LimitsConfig, LimitsFilter};
use crate::request_id::{RequestId, RequestIdConfig};
use crate::{Chain, Filter};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::sync::Arc;

/// Names of all built-in filters, in the order they are documented.
pub const BUILTIN: &[&str] = &["request_id", "cors", "auth", "limits"];

/// One entry of the `filters:` list: the filter's name and its typed config.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterConfig {
    RequestId(RequestIdConfig),
    Cors(CorsConfig),
    Auth(AuthConfig),
    Limits(LimitsConfig),
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
                    "cors" => {
                        let cfg: Option<CorsConfig> = map.next_value()?;
                        FilterConfig::Cors(cfg.unwrap_or_default())
                    }
                    "auth" => FilterConfig::Auth(map.next_value()?),
                    "limits" => {
                        let cfg: Option<LimitsConfig> = map.next_value()?;
                        FilterConfig::Limits(cfg.unwrap_or_default())
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
    pub fn name(&self) -> &'static str {
        match self {
            FilterConfig::RequestId(_) => "request_id",
            FilterConfig::Cors(_) => "cors",
            FilterConfig::Auth(_) => "auth",
            FilterConfig::Limits(_) => "limits",
        }
    }

    /// Check values serde cannot: `Err((key, message))` names the bad key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let named = |(k, m): (&'static str, String)| (k.to_string(), m);
        match self {
            FilterConfig::RequestId(cfg) => cfg.validate().map_err(named),
            FilterConfig::Cors(cfg) => cfg.validate().map_err(named),
            FilterConfig::Auth(cfg) => cfg.validate(),
            FilterConfig::Limits(cfg) => cfg.validate(),
        }
    }

    /// The chain used when the config has no `filters:` key.
    pub fn defaults() -> Vec<FilterConfig> {
        vec![FilterConfig::RequestId(RequestIdConfig::default())]
    }
}

/// The chain and the typed handles the gateway needs beside it.
#[derive(Default)]
pub struct Built {
    pub chain: Chain,
    /// Things worth one log line at start (e.g. plain-text keys).
    pub warnings: Vec<String>,
    /// The `auth` filter's state (login, reloads), when configured.
    pub auth: Option<Arc<Auth>>,
    /// The `limits` filter's state (`/admin/usage`), when configured.
    pub limits: Option<Arc<Limits>>,
    /// A kept `auth`'s re-read key and user files, put in use by
    /// [`Built::commit_files`] once the whole reload has succeeded.
    staged: Option<(Arc<Auth>, StagedFiles)>,
}

impl Built {
    /// Put the files a reload re-read in use. Call it when nothing else can
    /// fail any more: until then, a failed reload leaves the running keys
    /// and users as they were.
    pub fn commit_files(&mut self) {
        if let Some((auth, staged)) = self.staged.take() {
            auth.apply_staged(staged);
        }
    }
}

/// What a config reload may keep from the running chain.
#[derive(Default, Clone, Copy)]
pub struct Previous<'a> {
    pub auth: Option<&'a Arc<Auth>>,
    pub limits: Option<&'a Arc<Limits>>,
}

/// Build the chain; loading a filter's files may fail (`Err` says which and why).
pub fn build(configs: &[FilterConfig]) -> Result<Built, String> {
    build_with(configs, Previous::default())
}

/// Build the chain for a reloaded config, keeping state where the config
/// allows: an `auth` filter with an unchanged config keeps its `Auth` (its
/// files are read again, its watcher keeps running); a `limits` filter with
/// an unchanged config keeps its counters, and one with a changed config
/// keeps the quota store when `data_dir` is the same.
pub fn build_with(configs: &[FilterConfig], previous: Previous<'_>) -> Result<Built, String> {
    let mut filters: Vec<Box<dyn Filter>> = Vec::with_capacity(configs.len());
    let mut warnings = Vec::new();
    let mut auth = None;
    let mut limits = None;
    let mut staged: Option<(Arc<Auth>, StagedFiles)> = None;
    for config in configs {
        match config {
            FilterConfig::RequestId(cfg) => filters.push(Box::new(RequestId::new(cfg.clone()))),
            FilterConfig::Cors(cfg) => filters.push(Box::new(Cors::new(cfg.clone()))),
            FilterConfig::Auth(cfg) => {
                let built = match previous.auth.filter(|a| a.config() == cfg) {
                    Some(same) => {
                        let (files, mut report) = same.stage_reload()?;
                        warnings.append(&mut report.warnings);
                        staged = Some((same.clone(), files));
                        same.clone()
                    }
                    None => {
                        let (built, mut loaded) = Auth::new(cfg.clone())?;
                        warnings.append(&mut loaded);
                        Arc::new(built)
                    }
                };
                filters.push(Box::new(AuthFilter(built.clone())));
                auth = Some(built);
            }
            FilterConfig::Limits(cfg) => {
                let built = match previous.limits {
                    Some(same) if same.config() == cfg => same.clone(),
                    Some(old) => Arc::new(Limits::reconfigured(cfg.clone(), old)?),
                    None => Arc::new(Limits::new(cfg.clone())?),
                };
                filters.push(Box::new(LimitsFilter(built.clone())));
                limits = Some(built);
            }
        }
    }
    // the identities the chain will have: the staged files', if any
    let identities = match (&staged, &auth) {
        (Some((_, files)), _) => files.identities(),
        (None, Some(auth)) => auth.identities(),
        (None, None) => Vec::new(),
    };
    // A quota must outlive restarts: it needs the store.
    if let (Some(_), Some(limits)) = (&auth, &limits) {
        let with_quota = identities.iter().filter(|i| i.quota.is_some()).count();
        if with_quota > 0 && !limits.has_store() {
            return Err(format!(
                "{with_quota} keys or users have a quota, but the limits filter has no data_dir to keep usage across restarts; set limits.data_dir"
            ));
        }
    }
    if identities.iter().any(|i| i.quota.is_some()) && limits.is_none() {
        warnings.push(
            "keys or users have a quota, but no `limits` filter is configured: quotas are not enforced".to_string(),
        );
    }
    Ok(Built {
        chain: Chain::new(filters),
        warnings,
        auth,
        limits,
        staged,
    })
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

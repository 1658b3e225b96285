//! The `limits` filter's config: YAML shape and the checks serde cannot do.

use crate::LimitSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The `limits` filter's config. Every field is optional.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Limits on the whole gateway, all callers together.
    pub global: LimitSpec,
    /// Default limits of every identity (key or user); an identity's own
    /// `limits` override these field by field.
    pub per_key: LimitSpec,
    /// Limits per model, keyed by the name the client sends (alias or served
    /// name); a model not listed has no model-level limit.
    pub models: BTreeMap<String, LimitSpec>,
    /// Output tokens reserved when a request gives neither `max_tokens` nor
    /// `max_completion_tokens`. Default 1024.
    pub default_max_tokens: u64,
    /// Directory of the quota store (`quota.sqlite3`), created if missing.
    /// Needed for quotas to survive a restart: without it quotas are counted
    /// in memory only and a warning says so.
    pub data_dir: Option<PathBuf>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            global: LimitSpec::default(),
            per_key: LimitSpec::default(),
            models: BTreeMap::new(),
            default_max_tokens: 1024,
            data_dir: None,
        }
    }
}

impl LimitsConfig {
    /// Check values serde cannot: `Err((key path, message))`, e.g.
    /// `("per_key.requests_per_second", "must be a number above 0 ...")`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let specs = [
            ("global".to_string(), &self.global),
            ("per_key".to_string(), &self.per_key),
        ];
        let models = self.models.iter().map(|(m, s)| (format!("models.{m}"), s));
        for (path, spec) in specs.into_iter().chain(models) {
            validate_spec(spec).map_err(|(field, msg)| (format!("{path}.{field}"), msg))?;
            if path != "per_key" && spec.burst.is_some() && spec.requests_per_second.is_none() {
                return Err((
                    format!("{path}.burst"),
                    "burst only sizes a requests_per_second limit; set requests_per_second too, or remove burst".to_string(),
                ));
            }
        }
        if self.models.keys().any(String::is_empty) {
            return Err(("models".to_string(), "a model name is empty".to_string()));
        }
        if self.default_max_tokens < 1 {
            return Err((
                "default_max_tokens".to_string(),
                "must be at least 1 (output tokens reserved when a request sets no max_tokens)"
                    .to_string(),
            ));
        }
        if self
            .data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err((
                "data_dir".to_string(),
                "is empty; give a directory for the quota store or remove the key".to_string(),
            ));
        }
        Ok(())
    }
}

/// Check one [`LimitSpec`] (also for identities' own limits in keys/users
/// files): `Err((field, message))`. At run time an invalid identity field is
/// ignored and `per_key`'s value applies.
pub fn validate_spec(spec: &LimitSpec) -> Result<(), (&'static str, String)> {
    if let Some(rps) = spec.requests_per_second {
        if !(rps.is_finite() && rps > 0.0) {
            return Err((
                "requests_per_second",
                format!("is {rps}; it must be a number above 0 (e.g. 0.5 or 10); remove it for no limit"),
            ));
        }
    }
    let at_least_one = |field: &'static str, value: Option<u64>| match value {
        Some(0) => Err((
            field,
            "is 0; it must be at least 1; remove it for no limit".to_string(),
        )),
        _ => Ok(()),
    };
    at_least_one("burst", spec.burst.map(u64::from))?;
    at_least_one("concurrent", spec.concurrent.map(u64::from))?;
    at_least_one("tokens_per_minute", spec.tokens_per_minute)
}

/// An identity's effective limits: its own fields, `per_key`'s where unset
/// (or invalid).
pub(crate) fn effective_spec(per_key: &LimitSpec, own: &LimitSpec) -> LimitSpec {
    LimitSpec {
        requests_per_second: own
            .requests_per_second
            .filter(|r| r.is_finite() && *r > 0.0)
            .or(per_key.requests_per_second),
        burst: own.burst.filter(|b| *b >= 1).or(per_key.burst),
        concurrent: own.concurrent.filter(|c| *c >= 1).or(per_key.concurrent),
        tokens_per_minute: own
            .tokens_per_minute
            .filter(|t| *t >= 1)
            .or(per_key.tokens_per_minute),
    }
}

//! Reading a config file and collecting every error with its YAML path.
//!
//! Sections are deserialized one by one (each pool on its own) so that one
//! bad section does not hide the errors of the others.

use super::raw::{RawAccessLog, RawPool, RawRouting, RawServer, RawTimeouts, RawUpstream};
use super::validate::{validate, RawConfig};
use super::{Config, ConfigError};
use infergate_filters::FilterConfig;
use serde::de::DeserializeOwned;
use serde_yaml::Value;
use std::path::Path;

const SECTIONS: &[&str] = &[
    "server",
    "timeouts",
    "upstream",
    "routing",
    "pools",
    "filters",
    "access_log",
    "engines",
    "fallbacks",
];

/// Read and validate a config file.
pub fn load_file(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }]
    })?;
    parse_str(&text)
}

/// Parse and validate config text.
pub fn parse_str(text: &str) -> Result<Config, Vec<ConfigError>> {
    let root: Value = serde_yaml::from_str(text).map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            message: format!("not valid YAML: {e}"),
        }]
    })?;
    let mut errors = Vec::new();
    let map = match root {
        Value::Mapping(map) => map,
        Value::Null => serde_yaml::Mapping::new(),
        _ => {
            return Err(vec![ConfigError {
                path: String::new(),
                message: "the file must be a YAML mapping with `server`, `pools`, ...".into(),
            }])
        }
    };
    for key in map.keys() {
        let name = key.as_str().unwrap_or("<non-string key>");
        if !SECTIONS.contains(&name) {
            errors.push(ConfigError {
                path: name.to_string(),
                message: format!("unknown key; expected one of: {}", SECTIONS.join(", ")),
            });
        }
    }
    let raw = RawConfig {
        server: section::<RawServer>(&map, "server", &mut errors).unwrap_or_default(),
        timeouts: section::<RawTimeouts>(&map, "timeouts", &mut errors).unwrap_or_default(),
        upstream: section::<RawUpstream>(&map, "upstream", &mut errors).unwrap_or_default(),
        routing: section::<RawRouting>(&map, "routing", &mut errors).unwrap_or_default(),
        access_log: section::<RawAccessLog>(&map, "access_log", &mut errors).unwrap_or_default(),
        engines: section::<crate::config::engines::RawEngines>(&map, "engines", &mut errors)
            .unwrap_or_default(),
        pools: list::<RawPool>(&map, "pools", &mut errors),
        fallbacks: section(&map, "fallbacks", &mut errors).unwrap_or_default(),
        filters: if map.contains_key("filters") {
            list::<FilterConfig>(&map, "filters", &mut errors)
        } else {
            FilterConfig::defaults().into_iter().map(Some).collect()
        },
    };
    let config = validate(raw, &mut errors);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

fn section<T: DeserializeOwned>(
    map: &serde_yaml::Mapping,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let value = map.get(key)?;
    if value.is_null() {
        return None;
    }
    decode(value.clone(), key, errors)
}

/// A list section: each element is decoded on its own; elements that fail are
/// reported and left out (`None` in the result keeps indexes stable).
fn list<T: DeserializeOwned>(
    map: &serde_yaml::Mapping,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<Option<T>> {
    match map.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| decode(item.clone(), &format!("{key}[{i}]"), errors))
            .collect(),
        Some(_) => {
            errors.push(ConfigError {
                path: key.to_string(),
                message: "must be a list".into(),
            });
            Vec::new()
        }
    }
}

fn decode<T: DeserializeOwned>(
    value: Value,
    prefix: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let path = if inner == "." || inner.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}.{inner}")
            };
            errors.push(ConfigError {
                path,
                message: e.into_inner().to_string(),
            });
            None
        }
    }
}

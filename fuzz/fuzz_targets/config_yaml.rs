//! The YAML config loader (`config::parse_str`: YAML text → validated
//! `Config`, every error with its path).
//!
//! Input: the config file's text. Inputs whose listen or backend addresses
//! would need a DNS lookup (`host:port` with a host that is not an IP
//! address or `localhost`) are skipped: the loader resolves names with the
//! system resolver, and a fuzzer must not send queries or wait on them.
//!
//! Checks: no panic; a config that loads has pools (each with a backend) or
//! managed engines; a config that does not gets errors, each with a message.

#![no_main]

use infergate::config::parse_str;
use libfuzzer_sys::fuzz_target;
use serde_yaml::Value;
use std::net::{IpAddr, SocketAddr};

fn untag(v: &Value) -> &Value {
    match v {
        Value::Tagged(t) => untag(&t.value),
        v => v,
    }
}

/// Whether resolving `text` as `host:port` would ask the resolver.
fn needs_dns(text: &str) -> bool {
    if text.parse::<SocketAddr>().is_ok() {
        return false;
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok() && host.parse::<IpAddr>().is_err() && host != "localhost"
}

fn string_needs_dns(v: Option<&Value>) -> bool {
    v.map(untag).and_then(Value::as_str).is_some_and(needs_dns)
}

fn any_lookup(root: &Value) -> bool {
    let Value::Mapping(root) = untag(root) else {
        return false;
    };
    if let Some(Value::Mapping(server)) = root.get("server").map(untag) {
        for key in ["listen", "admin_listen", "metrics_listen"] {
            if string_needs_dns(server.get(key)) {
                return true;
            }
        }
    }
    let Some(Value::Sequence(pools)) = root.get("pools").map(untag) else {
        return false;
    };
    pools.iter().any(|pool| {
        let Some(Value::Sequence(backends)) = pool.get("backends").map(untag) else {
            return false;
        };
        backends.iter().any(|b| match untag(b) {
            Value::Mapping(m) => string_needs_dns(m.get("address")),
            v => string_needs_dns(Some(v)),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match serde_yaml::from_str::<Value>(text) {
        Ok(root) if any_lookup(&root) => return,
        _ => {}
    }
    match parse_str(text) {
        Ok(config) => {
            assert!(!config.pools.is_empty() || !config.engines.models.is_empty());
            for pool in &config.pools {
                assert!(
                    !pool.backends.is_empty(),
                    "pool {} has no backend",
                    pool.name
                );
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in &errors {
                assert!(!e.message.is_empty(), "empty message at {}", e.path);
            }
        }
    }
});

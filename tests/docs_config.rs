//! Every key of the config schema is documented: each field of the structs
//! serde reads the YAML into must appear, in backticks, in
//! docs/configuration.md or the page it links for that section. A key added
//! without documentation fails this test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

/// (source file, struct names whose fields are YAML keys, docs that must name them)
const SCHEMA: &[(&str, &[&str], &[&str])] = &[
    (
        "src/config/raw.rs",
        &[
            "RawServer",
            "RawTimeouts",
            "RawUpstream",
            "RawRouting",
            "RawBackendDetail",
            "RawHealthCheck",
            "RawPool",
            "RawAccessLog",
        ],
        &["docs/configuration.md"],
    ),
    (
        "src/config/raw.rs",
        &[
            "RawEngineMetrics",
            "RawPrefixAware",
            "RawQueue",
            "RawEjection",
        ],
        &[
            "docs/configuration.md",
            "docs/routing.md",
            "docs/flow-control.md",
        ],
    ),
    (
        "src/config/engines.rs",
        &[
            "RawEngines",
            "RawGpu",
            "RawFakeGpu",
            "RawManagedModel",
            "RawLora",
        ],
        &["docs/configuration.md", "docs/engines.md"],
    ),
    (
        "filters/src/request_id.rs",
        &["RequestIdConfig"],
        &["docs/configuration.md"],
    ),
    (
        "filters/src/cors.rs",
        &["CorsConfig"],
        &["docs/configuration.md", "docs/auth.md"],
    ),
    (
        "filters/src/auth/mod.rs",
        &["AuthConfig", "JwtConfig"],
        &["docs/configuration.md", "docs/auth.md"],
    ),
    (
        "filters/src/limits/config.rs",
        &["LimitsConfig", "StoreConfig"],
        &["docs/configuration.md", "docs/limits.md"],
    ),
    ("filters/src/lib.rs", &["LimitSpec"], &["docs/limits.md"]),
];

/// The `pub name:` fields of `struct name { ... }` in `source`.
fn fields(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} not found"));
    let body = &source[start..];
    let end = body.find("\n}").unwrap();
    body[..end]
        .lines()
        .skip(1)
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("pub ")?;
            let (field, _) = rest.split_once(':')?;
            let field = field.trim();
            field
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
                .then(|| field.to_string())
        })
        .collect()
}

#[test]
fn every_config_key_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = Vec::new();
    let mut checked = 0;
    for (file, structs, docs) in SCHEMA {
        let source = std::fs::read_to_string(root.join(file)).unwrap();
        let text: String = docs
            .iter()
            .map(|d| std::fs::read_to_string(root.join(d)).unwrap())
            .collect();
        for name in *structs {
            let found = fields(&source, name);
            assert!(!found.is_empty(), "{name} in {file} has no fields?");
            for field in found {
                checked += 1;
                // `key`, `key: value`, `section.key`, `key.sub` or inline
                // YAML `{ key: ... }` / `, key: ...` forms
                let documented = text.contains(&format!("`{field}`"))
                    || text.contains(&format!("`{field}:"))
                    || text.contains(&format!(".{field}`"))
                    || text.contains(&format!("`{field}."))
                    || text.contains(&format!("`{field} "))
                    || text.contains(&format!("{{ {field}: "))
                    || text.contains(&format!(", {field}: "));
                if !documented {
                    missing.push(format!("{name}.{field} ({file}) not in {docs:?}"));
                }
            }
        }
    }
    assert!(
        checked > 60,
        "only {checked} keys found: the parser is broken"
    );
    assert!(
        missing.is_empty(),
        "undocumented config keys:\n{}",
        missing.join("\n")
    );
}

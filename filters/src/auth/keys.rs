//! The API key file, in the seed's shape:
//!
//! ```json
//! {"keys": [
//!   {"key": "sk-your-api-key-here", "user": "user1", "quota": 10000, "enabled": true},
//!   {"key": "sha256:<64 hex>", "user": "ops", "role": "admin", "models": ["qwen"],
//!    "limits": {"requests_per_second": 5, "concurrent": 2, "tokens_per_minute": 20000}}
//! ]}
//! ```
//!
//! `key` is the key itself or, better, `sha256:<hex of its SHA-256>`, so the
//! file holds no usable secret. `role` defaults to `user`, `enabled` to true;
//! `quota`, `models` and `limits` are optional.

use super::{check_limits, redact_quoted, sha256, share};
use crate::{Identity, LimitSpec, Priority, Role};
use rand::Rng;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;

type Digest = [u8; 32];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default = "user_role")]
    role: Role,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    quota: Option<u64>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    limits: Option<LimitSpec>,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    weight: Option<u32>,
}

fn user_role() -> Role {
    Role::User
}
fn yes() -> bool {
    true
}

struct KeyRecord {
    digest: Digest,
    enabled: bool,
    identity: Arc<Identity>,
}

/// Loaded keys, by the SHA-256 of the key.
#[derive(Default)]
pub(crate) struct KeyTable {
    by_digest: HashMap<Digest, KeyRecord>,
}

/// `key:<first 12 hex of SHA-256(key)>`.
pub(crate) fn key_id(digest: &Digest) -> String {
    format!("key:{}", hex::encode(&digest[..6]))
}

impl KeyTable {
    /// Parse a key file; `Err` names the file and the entry. Returns warnings
    /// (plain-text keys) along with the table. `jwt`: whether JWTs are in use
    /// (a plain key shaped like a JWT could then never match).
    pub(crate) fn parse(
        bytes: &[u8],
        file: &Path,
        jwt: bool,
    ) -> Result<(KeyTable, Vec<String>), String> {
        let shown = file.display();
        // serde reads a struct from an array too: `[[]]` would load as no keys
        if !bytes.trim_ascii_start().starts_with(b"{") {
            return Err(format!(
                "api_keys_file {shown}: the file is not a JSON object; expected {{\"keys\": [{{\"key\": ..., \"user\": ...}}]}}"
            ));
        }
        let parsed: KeysFile = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "api_keys_file {shown}: {}; expected {{\"keys\": [{{\"key\": ..., \"user\": ...}}]}}",
                redact_quoted(&e.to_string())
            )
        })?;
        let mut by_digest = HashMap::with_capacity(parsed.keys.len());
        let mut ids: HashMap<String, usize> = HashMap::new();
        let mut plain = 0usize;
        let mut warnings = Vec::new();
        for (i, value) in parsed.keys.into_iter().enumerate() {
            let at = |msg: String| format!("api_keys_file {shown}: keys[{i}]: {msg}");
            let entry: KeyEntry =
                serde_json::from_value(value).map_err(|e| at(redact_quoted(&e.to_string())))?;
            let digest = match entry.key.strip_prefix("sha256:") {
                Some(hexed) => {
                    let mut digest = [0u8; 32];
                    hex::decode_to_slice(hexed.trim(), &mut digest).map_err(|_| {
                        at(
                            "`sha256:` must be followed by the 64 hex digits of the key's SHA-256 \
                            (infergate keys new prints it)"
                                .into(),
                        )
                    })?;
                    digest
                }
                None => {
                    let key = entry.key.as_str();
                    if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(at(
                            "`key` is empty or contains whitespace; clients could not send it"
                                .into(),
                        ));
                    }
                    if jwt && key.matches('.').count() == 2 {
                        return Err(at("`key` has two dots and would be read as a JWT; \
                                       pick a key without dots (infergate keys new)"
                            .into()));
                    }
                    plain += 1;
                    sha256(key.as_bytes())
                }
            };
            if let Some(limits) = &entry.limits {
                check_limits(limits).map_err(at)?;
            }
            let id = key_id(&digest);
            if let Some(first) = ids.insert(id.clone(), i) {
                return Err(at(format!("same key as keys[{first}]; remove one of them")));
            }
            let identity = Identity {
                user: entry.user.unwrap_or_else(|| id.clone()),
                id,
                role: entry.role,
                models: entry.models,
                limits: entry.limits.unwrap_or_default(),
                quota: entry.quota,
                share: share(entry.priority, entry.weight).map_err(at)?,
            };
            by_digest.insert(
                digest,
                KeyRecord {
                    digest,
                    enabled: entry.enabled,
                    identity: Arc::new(identity),
                },
            );
        }
        if plain > 0 {
            let (noun, verb) = if plain == 1 {
                ("key", "is")
            } else {
                ("keys", "are")
            };
            warnings.push(format!(
                "{plain} {noun} in {shown} {verb} stored in plain text; store `sha256:<hex>` instead \
                 (infergate keys new prints both)"
            ));
        }
        Ok((KeyTable { by_digest }, warnings))
    }

    /// The identity of an enabled key, compared in constant time.
    pub(crate) fn lookup(&self, presented: &str) -> Option<Arc<Identity>> {
        let digest = sha256(presented.as_bytes());
        let record = self.by_digest.get(&digest)?;
        let same: bool = record.digest.ct_eq(&digest).into();
        (same && record.enabled).then(|| Arc::clone(&record.identity))
    }

    pub(crate) fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Enabled keys' identities, sorted by id.
    pub(crate) fn identities(&self) -> Vec<Arc<Identity>> {
        let mut all: Vec<_> = self
            .by_digest
            .values()
            .filter(|r| r.enabled)
            .map(|r| Arc::clone(&r.identity))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

/// A fresh API key (`sk-` + 48 URL-safe random characters) and the
/// `sha256:<hex>` form to store in the key file.
pub fn new_api_key() -> (String, String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let mut key = String::with_capacity(51);
    key.push_str("sk-");
    for _ in 0..48 {
        let i = usize::from(rng.random::<u8>() & 63);
        key.push(char::from(ALPHABET[i]));
    }
    let stored = format!("sha256:{}", hex::encode(sha256(key.as_bytes())));
    (key, stored)
}

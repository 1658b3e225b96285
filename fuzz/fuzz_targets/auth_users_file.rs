//! The users file parser (`users_file`, YAML), through `Auth`'s reload: the
//! auth module reads the file from a path, so each input is written to the
//! fixture's users file and staged (no password is ever verified here:
//! argon2 is too slow to fuzz through).
//!
//! Checks: a file that loads has one user per entry; a token signed for an
//! entry's `user_id` and `version` then authenticates as `user:<id>` with the
//! entry's role exactly when the entry is enabled.

#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::FuzzRequest;
use infergate_filters::auth::Auth;
use infergate_filters::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_yaml::Value;
use std::sync::OnceLock;

struct Fixture {
    files: common::Files,
    hs256: Auth,
    signing: EncodingKey,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let files = common::Files::new("auth_users_file");
        let hs256 = files.hs256();
        Fixture {
            files,
            hs256,
            signing: EncodingKey::from_secret(common::SECRET),
        }
    })
}

/// What this target reads of an entry, by the same serde_yaml rules.
#[derive(Deserialize)]
struct Entry {
    user_id: u64,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    role: Option<Role>,
}

fn untag(v: Value) -> Value {
    match v {
        Value::Tagged(t) => untag(t.value),
        v => v,
    }
}

fn entries(text: &str) -> Vec<Value> {
    if text.trim().is_empty() {
        return Vec::new();
    }
    let root: Value = serde_yaml::from_str(text)
        .unwrap_or_else(|e| panic!("loaded a file serde_yaml cannot read: {e}"));
    match untag(root) {
        // an empty scalar (`!!tag` alone) reads as an empty file
        Value::Null => Vec::new(),
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::Mapping(m) => match m.get("users").cloned().map(untag) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(users)) => users,
            Some(other) => panic!("loaded `users: {other:?}`"),
        },
        // serde also reads a struct from a list of its fields: `[[...]]` is `users: [...]`
        Value::Sequence(fields) => match fields.into_iter().next().map(untag) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(users)) => users,
            Some(other) => panic!("loaded `[{other:?}]`"),
        },
        other => panic!("loaded a file that is not a mapping: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    common::write(&f.files.users, data);
    let (staged, report) = match f.hs256.stage_reload() {
        Ok(ok) => ok,
        Err(e) => {
            assert!(e.starts_with("users_file "), "{e}");
            return;
        }
    };
    let Ok(text) = std::str::from_utf8(data) else {
        panic!("loaded a users file that is not UTF-8");
    };
    let users = entries(text);
    assert_eq!(report.users, users.len(), "one user per entry");
    f.hs256.apply_staged(staged);
    for value in users {
        let entry: Entry = serde_yaml::from_value(value)
            .unwrap_or_else(|e| panic!("loaded an entry this target cannot read: {e}"));
        let version = entry.version.unwrap_or(1);
        let claims = serde_json::json!({
            "sub": entry.user_id.to_string(),
            "user_id": entry.user_id,
            "version": version,
            "exp": common::now() + 3600,
        });
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &f.signing)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut req = FuzzRequest::api().with_header("authorization", &format!("Bearer {token}"));
        let enabled = entry.enabled.unwrap_or(true);
        match f.hs256.authenticate(&mut req) {
            Ok(Some(identity)) => {
                assert!(enabled, "a disabled user authenticated: {identity:?}");
                assert_eq!(identity.id, format!("user:{}", entry.user_id));
                assert_eq!(identity.role, entry.role.unwrap_or(Role::User));
            }
            other => assert!(!enabled, "user {} refused: {other:?}", entry.user_id),
        }
    }
});

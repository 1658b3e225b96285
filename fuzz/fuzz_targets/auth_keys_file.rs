//! The API key file parser (`api_keys_file`, JSON), through `Auth`'s reload:
//! the auth module reads the file from a path, so each input is written to
//! the fixture's key file and staged.
//!
//! Checks: a file that loads has one key per entry; every enabled plain-text
//! key in it then authenticates as its `user`, and a disabled one does not;
//! a file the JWT-enabled gateway accepts, the keys-only one accepts too.

#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::FuzzRequest;
use infergate_filters::auth::Auth;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::OnceLock;

struct Fixture {
    files: common::Files,
    keys_only: Auth,
    hs256: Auth,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let files = common::Files::new("auth_keys_file");
        let keys_only = files.keys_only();
        let hs256 = files.hs256();
        Fixture {
            files,
            keys_only,
            hs256,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    common::write(&f.files.keys, data);
    let with_jwt = f.hs256.stage_reload();
    let plain = f.keys_only.stage_reload();
    let (staged, report) = match plain {
        Ok(ok) => ok,
        Err(e) => {
            assert!(with_jwt.is_err(), "only the JWT gateway accepts it: {e}");
            assert!(e.starts_with("api_keys_file "), "{e}");
            return;
        }
    };
    let file = serde_json::from_slice::<Value>(data)
        .unwrap_or_else(|e| panic!("loaded a file that is not JSON: {e}"));
    // serde also reads a struct from a list of its fields: `[[...]]` is `{"keys": [...]}`
    let entries = match &file {
        Value::Object(file) => file.get("keys"),
        Value::Array(fields) => fields.first(),
        _ => None,
    };
    let Some(Value::Array(entries)) = entries else {
        panic!("loaded a file without a `keys` list: {file}");
    };
    assert_eq!(report.keys, entries.len(), "one key per entry");
    f.keys_only.apply_staged(staged);
    assert_eq!(f.keys_only.key_count(), entries.len());
    for entry in entries {
        let Some(key) = entry.get("key").and_then(Value::as_str) else {
            panic!("loaded an entry without a string `key`: {entry}");
        };
        if key.starts_with("sha256:") {
            continue;
        }
        let enabled = entry
            .get("enabled")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut req = FuzzRequest::api().with_header("x-api-key", key);
        match f.keys_only.authenticate(&mut req) {
            Ok(Some(identity)) => {
                assert!(enabled, "a disabled key authenticated: {entry}");
                if let Some(user) = entry.get("user").and_then(Value::as_str) {
                    assert_eq!(identity.user, user, "{entry}");
                }
                assert!(identity.id.starts_with("key:"), "{identity:?}");
            }
            other => assert!(!enabled, "key {key:?} did not authenticate: {other:?}"),
        }
    }
});

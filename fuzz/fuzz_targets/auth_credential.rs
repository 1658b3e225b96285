//! Credential extraction (`Authorization`, `x-api-key`, `?token=`) through
//! `Auth::authenticate`, with API keys and HS256 tokens configured.
//!
//! Input: one flag byte, then UTF-8 text split at `\n` into the
//! `Authorization` value, the `x-api-key` value and the query string.
//! Flag bits 0, 1, 2: each of those is present; bit 3: an admin endpoint;
//! bit 6: a public endpoint. (`7` = all three on an API endpoint.)
//!
//! Checks: every `token` query parameter (name compared after
//! percent-decoding) is gone and the others are kept in order; the
//! `Authorization` and `x-api-key` headers are gone, whatever the endpoint; a public
//! endpoint needs nothing; only the fixture's enabled keys or a valid token
//! authenticate, and an admin endpoint only lets the admin role through.

#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::{FuzzRequest, ADMIN_KEY, USER_KEY};
use infergate_filters::auth::Auth;
use infergate_filters::{Access, Request, Role};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Fixture {
    hs256: Auth,
    keys_only: Auth,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let files = common::Files::new("auth_credential");
        Fixture {
            hs256: files.hs256(),
            keys_only: files.keys_only(),
        }
    })
}

/// The query as it must look once `token` parameters are removed.
fn expected_query(query: &str) -> Option<String> {
    let is_token = |part: &&str| {
        let name = part.split_once('=').map_or(*part, |(n, _)| n);
        common::percent_decode(name).as_deref() == Some("token")
    };
    if !query.split('&').any(|p| is_token(&p)) {
        return Some(query.to_string());
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_token(p)).collect();
    let rest = kept.join("&");
    (!rest.is_empty()).then_some(rest)
}

fn check(auth: &Auth, req: &FuzzRequest) {
    let mut req = req.clone();
    let before = req.query.clone();
    let result = auth.authenticate(&mut req);
    if let Some(q) = &before {
        assert_eq!(req.query, expected_query(q), "query {q:?}");
    } else {
        assert_eq!(req.query, None);
    }
    for name in ["authorization", "x-api-key"] {
        assert!(req.header(name).is_none(), "{name} left in the request");
    }
    match req.access {
        Access::Public | Access::Login => assert!(result.is_ok(), "{result:?}"),
        Access::Api | Access::Admin => {}
    }
    match result {
        Ok(Some(identity)) => {
            if req.access == Access::Admin {
                assert_eq!(identity.role, Role::Admin, "{identity:?}");
            }
            if identity.id.starts_with("key:") {
                // only the fixture's enabled plain keys are known to anyone
                let known = [(USER_KEY, "alice"), (ADMIN_KEY, "ops")];
                assert!(
                    known.iter().any(|(_, user)| identity.user == *user),
                    "{identity:?}"
                );
            } else {
                assert!(identity.id.starts_with("user:"), "{identity:?}");
            }
        }
        Ok(None) => assert!(
            matches!(req.access, Access::Public | Access::Login),
            "no identity on {:?}",
            req.access
        ),
        Err(rejection) => {
            assert!(
                matches!(rejection.status, 401 | 403),
                "status {}",
                rejection.status
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let (authorization, api_key, query) = (parts.next(), parts.next(), parts.next());
    let mut req = FuzzRequest::api();
    req.access = if flags & 0x40 != 0 {
        Access::Public
    } else if flags & 0x08 != 0 {
        Access::Admin
    } else {
        Access::Api
    };
    if flags & 1 != 0 {
        req = req.with_header("authorization", authorization.unwrap_or(""));
    }
    if flags & 2 != 0 {
        req = req.with_header("x-api-key", api_key.unwrap_or(""));
    }
    if flags & 4 != 0 {
        req.query = Some(query.unwrap_or("").to_string());
    }
    let f = fixture();
    check(&f.hs256, &req);
    check(&f.keys_only, &req);
});

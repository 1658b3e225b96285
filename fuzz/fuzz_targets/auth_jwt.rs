//! JWT verification through `Auth::authenticate` (`Authorization: Bearer`),
//! against a fixed HS256 secret and a fixed ES256 public key.
//!
//! Input: one mode byte, then
//! - even mode: the token string itself, verified by both;
//! - odd mode: header JSON, `\n`, claims JSON, signed here with the HS256
//!   secret, so the claims checks behind the signature are reached too.
//!
//! Checks: a token authenticates only with the pinned algorithm and a
//! signature that verifies under the fixed key; `exp` is present, a number
//! and not past (leeway 30 s), `nbf` not in the future; the identity is the
//! user the token names, at the user's current version, never a disabled one.

#![no_main]

#[path = "common/mod.rs"]
mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::FuzzRequest;
use infergate_filters::auth::Auth;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Fixture {
    hs256: Auth,
    es256: Auth,
    hs_key: DecodingKey,
    es_key: DecodingKey,
    signing: EncodingKey,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let files = common::Files::new("auth_jwt");
        Fixture {
            hs256: files.hs256(),
            es256: files.es256(),
            hs_key: DecodingKey::from_secret(common::SECRET),
            es_key: DecodingKey::from_ec_pem(common::EC_PUBLIC_PEM.as_bytes())
                .unwrap_or_else(|e| panic!("ec key: {e}")),
            signing: EncodingKey::from_secret(common::SECRET),
        }
    })
}

/// The fixture's users: id → current version (user 7 is disabled).
const ENABLED: &[(u64, u64)] = &[(1, 1), (123, 3)];
const LEEWAY: u64 = 30;

fn authenticate(auth: &Auth, token: &str) -> Option<String> {
    let mut req = FuzzRequest::api().with_header("authorization", &format!("Bearer {token}"));
    match auth.authenticate(&mut req) {
        Ok(Some(identity)) => Some(identity.id.clone()),
        Ok(None) => panic!("an API endpoint returned no identity"),
        Err(r) => {
            assert_eq!(r.status, 401, "{}", r.message);
            None
        }
    }
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<serde_json::Value>,
}

/// What must hold of a token that authenticated as `id`.
fn check_accepted(token: &str, id: &str, alg: Algorithm, key: &DecodingKey) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "accepted a token that is not h.p.s: {token:?}"
    );
    let header = jsonwebtoken::decode_header(token).unwrap_or_else(|e| panic!("{e}: {token:?}"));
    assert_eq!(header.alg, alg, "accepted another algorithm: {token:?}");
    let message = format!("{}.{}", parts[0], parts[1]);
    let verified = jsonwebtoken::crypto::verify(parts[2], message.as_bytes(), key, alg);
    assert!(
        matches!(verified, Ok(true)),
        "bad signature accepted: {token:?}"
    );

    // only the claims the verifier reads: the others are skipped unchecked
    // (strings not UTF-8, numbers beyond f64), here as by the verifier
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(parts[1])
        .ok()
        .and_then(|b| serde_json::from_str(&String::from_utf8_lossy(&b)).ok())
        .unwrap_or_else(|| panic!("accepted unreadable claims: {token:?}"));
    let claims = serde_json::to_value(claims).unwrap_or_default();
    let now = common::now();
    let exp = claims.get("exp").and_then(serde_json::Value::as_f64);
    let exp = exp.unwrap_or_else(|| panic!("accepted without a numeric exp: {claims}"));
    assert!(
        exp + (LEEWAY as f64) + 1.0 >= now as f64,
        "accepted expired: {claims}"
    );
    if let Some(nbf) = claims.get("nbf").and_then(serde_json::Value::as_f64) {
        assert!(
            nbf <= (now + LEEWAY + 1) as f64,
            "accepted before nbf: {claims}"
        );
    }
    let version = claims.get("version").and_then(serde_json::Value::as_u64);
    let Some(&(user, current)) = ENABLED.iter().find(|(u, _)| format!("user:{u}") == id) else {
        panic!("authenticated as {id}, not an enabled user: {claims}");
    };
    assert_eq!(version, Some(current), "stale version accepted: {claims}");
    let named = claims
        .get("user_id")
        .and_then(serde_json::Value::as_u64)
        .or_else(|| claims.get("sub")?.as_str()?.parse().ok());
    assert_eq!(
        named,
        Some(user),
        "identity is not the user named: {claims}"
    );
    if let Some(sub) = claims.get("sub").and_then(serde_json::Value::as_str) {
        assert_eq!(sub, user.to_string(), "sub and user_id disagree: {claims}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    if mode & 1 == 0 {
        let Ok(token) = std::str::from_utf8(rest) else {
            return;
        };
        // the header value is trimmed and split at whitespace; keep the token whole
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return;
        }
        if let Some(id) = authenticate(&f.hs256, token) {
            if !id.starts_with("key:") {
                check_accepted(token, &id, Algorithm::HS256, &f.hs_key);
            }
        }
        if let Some(id) = authenticate(&f.es256, token) {
            check_accepted(token, &id, Algorithm::ES256, &f.es_key);
        }
    } else {
        let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let (header, claims) = (&rest[..split], rest.get(split + 1..).unwrap_or(&[]));
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let Ok(signature) =
            jsonwebtoken::crypto::sign(message.as_bytes(), &f.signing, Algorithm::HS256)
        else {
            return;
        };
        let token = format!("{message}.{signature}");
        if let Some(id) = authenticate(&f.hs256, &token) {
            check_accepted(&token, &id, Algorithm::HS256, &f.hs_key);
        }
    }
});

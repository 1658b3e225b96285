//! Finding the caller's credential in a request.
//!
//! In this order: `Authorization: Bearer <x>` (scheme case-insensitive),
//! `Authorization: <x>` (no scheme, as the seed allows), `x-api-key: <x>`,
//! `?token=<x>` (percent-decoded; for browsers' EventSource, which cannot set
//! headers). Once read, every credential (both headers and every `token`
//! query parameter) is removed from the request, so none reaches an engine:
//! the auth filter decides this, the proxy only applies the edited request.

use crate::Request;

/// What the request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    Nothing,
    Credential(String),
    /// `Authorization: <scheme> <x>` with a scheme other than Bearer (the
    /// scheme is safe to echo; the rest is not kept).
    UnsupportedScheme(String),
}

/// Take the credential out of `req`: it is read, then every place a
/// credential can be (`Authorization`, `x-api-key`, any `token` query
/// parameter) is removed from the request, so the gateway's credentials
/// never reach an engine, whatever the endpoint.
pub(crate) fn take(req: &mut dyn Request) -> Found {
    let found = read(req);
    req.remove_header("authorization");
    req.remove_header("x-api-key");
    found
}

fn read(req: &mut dyn Request) -> Found {
    let from_query = match req.query() {
        Some(query) => {
            let (token, rest) = strip_token(query);
            if token.is_some() {
                req.set_query(rest.as_deref());
            }
            token
        }
        None => None,
    };
    if let Some(value) = req.header("authorization").map(str::trim) {
        if !value.is_empty() {
            return match value.split_once(|c: char| c.is_ascii_whitespace()) {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
                    credential(rest.trim())
                }
                Some((scheme, _)) => Found::UnsupportedScheme(safe_scheme(scheme)),
                None if value.eq_ignore_ascii_case("bearer") => Found::Nothing,
                None => credential(value),
            };
        }
    }
    if let Some(value) = req.header("x-api-key").map(str::trim) {
        if !value.is_empty() {
            return credential(value);
        }
    }
    match from_query {
        Some(token) => credential(token.trim()),
        None => Found::Nothing,
    }
}

fn credential(value: &str) -> Found {
    if value.is_empty() {
        Found::Nothing
    } else {
        Found::Credential(value.to_string())
    }
}

/// A scheme name fit for an error message (short, token characters only).
fn safe_scheme(scheme: &str) -> String {
    scheme
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(32)
        .collect()
}

/// Whether a credential is shaped like a JWT (`header.payload.signature`).
pub(crate) fn looks_like_jwt(credential: &str) -> bool {
    credential.bytes().filter(|b| *b == b'.').count() == 2
}

/// Split `query` into the first `token` value (percent-decoded) and the
/// query without any `token` parameter (`None` when nothing remains).
/// Parameter names are compared after percent-decoding.
pub(crate) fn strip_token(query: &str) -> (Option<String>, Option<String>) {
    let mut token = None;
    let mut kept: Vec<&str> = Vec::new();
    for part in query.split('&') {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        if crate::percent::decode(name).as_deref() == Some("token") {
            if token.is_none() {
                token = Some(crate::percent::decode(value).unwrap_or_else(|| value.to_string()));
            }
        } else {
            kept.push(part);
        }
    }
    if token.is_none() {
        return (None, Some(query.to_string()));
    }
    let rest = kept.join("&");
    (token, (!rest.is_empty()).then_some(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_token_keeps_other_parameters_in_order() {
        assert_eq!(
            strip_token("a=1&token=sk%2Dx&b=2&token=second"),
            (Some("sk-x".into()), Some("a=1&b=2".into()))
        );
        assert_eq!(strip_token("token=abc"), (Some("abc".into()), None));
        assert_eq!(
            strip_token("%74oken=abc&z"),
            (Some("abc".into()), Some("z".into()))
        );
        assert_eq!(strip_token("tokens=1&b"), (None, Some("tokens=1&b".into())));
    }

    #[test]
    fn jwt_shape_is_two_dots() {
        assert!(looks_like_jwt("a.b.c"));
        assert!(looks_like_jwt("a.b."));
        assert!(!looks_like_jwt("sk-abc"));
        assert!(!looks_like_jwt("a.b.c.d"));
    }
}

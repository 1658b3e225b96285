//! Request body inspection: find `model` in a JSON body of any size, and
//! rewrite it (alias → served name) without touching any other byte.
//!
//! Pure functions over bytes; the proxy reads the body, this decides what it says.

use crate::errors::GatewayError;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::ops::Range;

/// The `model` of a request body and where its JSON value sits in the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelField {
    pub name: String,
    /// Byte range of the JSON value (quotes included) inside the body.
    pub span: Range<usize>,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
}

/// Parse `body` as a JSON object and return its `model`.
///
/// The whole body is validated (UTF-8, JSON syntax, nesting depth ≤ 128,
/// no duplicate `model`), so a malformed body never reaches an engine.
/// Other fields are skipped without being built into values.
pub fn extract_model(body: &[u8]) -> Result<ModelField, GatewayError> {
    let text = std::str::from_utf8(body).map_err(|e| GatewayError::InvalidJson {
        detail: format!("the body is not valid UTF-8 at byte {}", e.valid_up_to()),
    })?;
    match text.trim_start().as_bytes().first() {
        Some(b'{') => {}
        None => {
            return Err(GatewayError::InvalidJson {
                detail: "the body is empty".into(),
            })
        }
        Some(_) => return Err(GatewayError::BodyNotObject),
    }
    if exceeds_depth(body, MAX_DEPTH) {
        return Err(GatewayError::InvalidJson {
            detail: format!("nesting deeper than {MAX_DEPTH} levels"),
        });
    }
    let peek: Peek = serde_json::from_str(text).map_err(|e| GatewayError::InvalidJson {
        detail: e.to_string(),
    })?;
    let raw = peek.model.ok_or(GatewayError::MissingModel)?;
    let json = raw.get();
    if json == "null" {
        return Err(GatewayError::MissingModel);
    }
    if !json.starts_with('"') {
        return Err(GatewayError::ModelNotString);
    }
    let name: String = serde_json::from_str(json).map_err(|e| GatewayError::InvalidJson {
        detail: format!("`model` is not a valid string: {e}"),
    })?;
    if name.is_empty() {
        return Err(GatewayError::MissingModel);
    }
    // `raw` borrows from `text`, so its offset is a pointer difference.
    let start = json.as_ptr() as usize - text.as_ptr() as usize;
    Ok(ModelField {
        name,
        span: start..start + json.len(),
    })
}

/// Deepest nesting accepted; serde_json's own limit for values it builds.
/// Engines parse the body with recursive parsers, so the gateway refuses
/// bodies that could blow their stacks (skipped fields have no depth limit
/// in serde_json).
pub const MAX_DEPTH: usize = 128;

/// Whether `[`/`{` nesting (outside strings) goes deeper than `limit`.
fn exceeds_depth(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The body with the `model` value replaced by `served` (JSON-escaped), every
/// other byte unchanged.
pub fn rewrite_model(body: &[u8], field: &ModelField, served: &str) -> Vec<u8> {
    let value = serde_json::Value::String(served.to_string()).to_string();
    let mut out = Vec::with_capacity(body.len() + value.len());
    out.extend_from_slice(&body[..field.span.start]);
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(&body[field.span.end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(body: &str) -> Result<String, GatewayError> {
        extract_model(body.as_bytes()).map(|f| f.name)
    }

    #[test]
    fn finds_model_anywhere_in_the_object() {
        assert_eq!(model(r#"{"model":"a","messages":[]}"#), Ok("a".into()));
        assert_eq!(
            model(r#"{"messages":[{"content":"x"}],"top_k":5,"model":"b"}"#),
            Ok("b".into())
        );
        assert_eq!(model(r#"  {"model":"\u00e9t\u00e9"}"#), Ok("été".into()));
    }

    #[test]
    fn bad_bodies_get_precise_errors() {
        assert!(matches!(
            model("{\"model\":"),
            Err(GatewayError::InvalidJson { .. })
        ));
        assert_eq!(model(r#"["model","a"]"#), Err(GatewayError::BodyNotObject));
        assert_eq!(model(r#"{"messages":[]}"#), Err(GatewayError::MissingModel));
        assert_eq!(model(r#"{"model":null}"#), Err(GatewayError::MissingModel));
        assert_eq!(model(r#"{"model":7}"#), Err(GatewayError::ModelNotString));
        assert!(matches!(
            model(r#"{"model":"a","model":"b"}"#),
            Err(GatewayError::InvalidJson { .. })
        ));
        assert!(matches!(
            model(r#"{"model":"\ud800"}"#),
            Err(GatewayError::InvalidJson { .. })
        ));
        assert!(matches!(
            extract_model(b"{\"model\":\"\xff\"}"),
            Err(GatewayError::InvalidJson { .. })
        ));
        assert!(matches!(model(""), Err(GatewayError::InvalidJson { .. })));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!(
            "{{\"model\":\"a\",\"x\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(matches!(
            model(&deep),
            Err(GatewayError::InvalidJson { .. })
        ));
    }

    #[test]
    fn depth_limit_ignores_brackets_inside_strings() {
        let ok = format!("{{\"model\":\"a\",\"x\":\"{}\"}}", "[".repeat(1000));
        assert_eq!(model(&ok), Ok("a".into()));
        let at_limit = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(!exceeds_depth(at_limit.as_bytes(), MAX_DEPTH));
        assert!(exceeds_depth("{".repeat(129).as_bytes(), MAX_DEPTH));
    }

    #[test]
    fn rewrite_changes_only_the_model_value() {
        let body = br#"{"messages":[{"content":"1.0000"}], "model" : "alias", "top_k":5}"#;
        let field = extract_model(body).unwrap_or_else(|e| unreachable!("{e:?}"));
        let out = rewrite_model(body, &field, "served\"x");
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"messages":[{"content":"1.0000"}], "model" : "served\"x", "top_k":5}"#
        );
    }
}

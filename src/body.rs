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
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    /// Present as `null` too: plain `Option` reads `null` as absent, and the
    /// include_usage edit would then add a second `stream_options` key.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
}

/// A field that is in the body, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// What the gateway reads from a request body: routing, admission and usage
/// accounting need these; everything else passes through untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyInfo {
    pub model: Result<ModelField, GatewayError>,
    /// `max_completion_tokens`, else `max_tokens`, when a non-negative integer.
    pub max_output_tokens: Option<u64>,
    /// `"stream": true`.
    pub stream: bool,
    /// `"stream_options": {"include_usage": true}`.
    pub include_usage: bool,
    /// Byte range of the `stream_options` value, when present.
    pub stream_options_span: Option<Range<usize>>,
    /// Byte range of what the engine renders the prompt from: the
    /// `messages` array (chat) or the `prompt` (completions), as sent.
    pub prompt_span: Option<Range<usize>>,
    /// Byte range of `tools` (part of a chat prompt's start).
    pub tools_span: Option<Range<usize>>,
}

/// Parse `body` as a JSON object and read the fields the gateway needs.
///
/// `Err` when the body itself is unusable (not UTF-8, not JSON, not an
/// object, too deep); a missing or malformed `model` is reported in
/// [`BodyInfo::model`] so callers that can route without one still may.
pub fn inspect(body: &[u8]) -> Result<BodyInfo, GatewayError> {
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
    let span_of = |raw: &RawValue| {
        // `raw` borrows from `text`, so its offset is a pointer difference.
        let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
        start..start + raw.get().len()
    };
    let count = |raw: Option<&RawValue>| raw.and_then(|r| r.get().parse::<u64>().ok());
    let include_usage = peek.stream_options.is_some_and(|raw| {
        serde_json::from_str::<serde_json::Value>(raw.get())
            .ok()
            .and_then(|v| v.get("include_usage").and_then(serde_json::Value::as_bool))
            == Some(true)
    });
    Ok(BodyInfo {
        model: model_field(peek.model, span_of),
        max_output_tokens: count(peek.max_completion_tokens).or(count(peek.max_tokens)),
        stream: peek.stream.is_some_and(|r| r.get() == "true"),
        include_usage,
        stream_options_span: peek.stream_options.map(span_of),
        prompt_span: peek.messages.or(peek.prompt).map(span_of),
        tools_span: peek.tools.map(span_of),
    })
}

fn model_field(
    raw: Option<&RawValue>,
    span_of: impl Fn(&RawValue) -> Range<usize>,
) -> Result<ModelField, GatewayError> {
    let raw = raw.ok_or(GatewayError::MissingModel)?;
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
    Ok(ModelField {
        name,
        span: span_of(raw),
    })
}

/// Parse `body` as a JSON object and return its `model`.
///
/// The whole body is validated (UTF-8, JSON syntax, nesting depth ≤ 128,
/// no duplicate `model`), so a malformed body never reaches an engine.
/// Other fields are skipped without being built into values.
pub fn extract_model(body: &[u8]) -> Result<ModelField, GatewayError> {
    inspect(body)?.model
}

/// Deepest nesting accepted; serde_json's own limit for values it builds.
/// Engines parse the body with recursive parsers, so the gateway refuses
/// bodies that could blow their stacks (skipped fields have no depth limit
/// in serde_json).
pub const MAX_DEPTH: usize = 128;

/// Whether `[`/`{` nesting (outside strings) goes deeper than `limit`.
///
/// A prompt's bytes are almost all inside strings, so the scan jumps from
/// one `"` or `\\` to the next with `memchr2` (SIMD) instead of looking at
/// every byte: an 8 MB prompt is checked in a fraction of the time.
fn exceeds_depth(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // skip the string: to its closing quote, past escapes
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[i.min(body.len())..]) {
                        None => return false,
                        Some(k) if body[i + k] == b'\\' => i += k + 2,
                        Some(k) => {
                            i += k + 1;
                            break;
                        }
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// The body with the `model` value replaced by `served` (JSON-escaped), every
/// other byte unchanged.
pub fn rewrite_model(body: &[u8], field: &ModelField, served: &str) -> Vec<u8> {
    apply_edits(body, vec![model_edit(field, served)])
}

/// A replacement of `range` in the body by new bytes.
pub type Edit = (Range<usize>, Vec<u8>);

/// The edit that renames the model.
pub fn model_edit(field: &ModelField, served: &str) -> Edit {
    let value = serde_json::Value::String(served.to_string()).to_string();
    (field.span.clone(), value.into_bytes())
}

/// The edit that asks a streaming engine for a final usage chunk
/// (`stream_options.include_usage = true`), keeping any other stream option.
/// `None` when the body already asks for it or is not streaming.
pub fn include_usage_edit(body: &[u8], info: &BodyInfo) -> Option<Edit> {
    if !info.stream || info.include_usage {
        return None;
    }
    match &info.stream_options_span {
        Some(span) => {
            let mut options: serde_json::Map<String, serde_json::Value> =
                match serde_json::from_slice(body.get(span.clone())?) {
                    Ok(map) => map,
                    // `null` or a non-object: let the engine judge the client's value
                    Err(_) => return None,
                };
            options.insert("include_usage".into(), serde_json::Value::Bool(true));
            let value = serde_json::to_vec(&options).ok()?;
            Some((span.clone(), value))
        }
        None => {
            // right after the opening brace
            let open = body.iter().position(|&b| b == b'{')?;
            Some((
                open + 1..open + 1,
                br#""stream_options":{"include_usage":true},"#.to_vec(),
            ))
        }
    }
}

/// Apply non-overlapping edits; every byte outside them is unchanged.
pub fn apply_edits(body: &[u8], mut edits: Vec<Edit>) -> Vec<u8> {
    edits.sort_by_key(|(range, _)| range.start);
    let extra: usize = edits.iter().map(|(_, b)| b.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for (range, bytes) in edits {
        if range.start < at || range.end > body.len() {
            continue; // overlapping or out of range: never produced by this module
        }
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(&bytes);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
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
        // escaped quotes and backslashes do not end a string early, and
        // brackets after a string's end count again
        let deep = "[".repeat(129);
        let escaped = format!(r#"{{"x":"a\"{deep}\\\"{deep}"}}"#);
        assert!(!exceeds_depth(escaped.as_bytes(), MAX_DEPTH));
        let after = format!(r#"{{"x":"a\\"{deep}"#);
        assert!(exceeds_depth(after.as_bytes(), MAX_DEPTH));
        // an unterminated string, or one ending in a lone backslash
        assert!(!exceeds_depth(br#"{"x":"abc"#, MAX_DEPTH));
        assert!(!exceeds_depth(br#"{"x":"abc\"#, MAX_DEPTH));
    }

    #[test]
    fn reads_admission_fields() {
        let info = inspect(br#"{"model":"m","max_tokens":50,"stream":true}"#).unwrap();
        assert_eq!(
            (info.max_output_tokens, info.stream, info.include_usage),
            (Some(50), true, false)
        );
        let info = inspect(
            br#"{"model":"m","max_tokens":50,"max_completion_tokens":7,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(
            (info.max_output_tokens, info.stream, info.include_usage),
            (Some(7), false, true)
        );
        let info = inspect(br#"{"max_tokens":"lots"}"#).unwrap();
        assert_eq!(info.max_output_tokens, None);
        assert_eq!(info.model, Err(GatewayError::MissingModel));
    }

    #[test]
    fn include_usage_is_added_or_merged() {
        let body = br#" {"model":"m","stream":true}"#;
        let info = inspect(body).unwrap();
        let edit = include_usage_edit(body, &info).unwrap();
        let out = apply_edits(body, vec![edit]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        let body = br#"{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false,"include_usage":false}}"#;
        let info = inspect(body).unwrap();
        let field = info.model.clone().unwrap();
        let out = apply_edits(
            body,
            vec![
                include_usage_edit(body, &info).unwrap(),
                model_edit(&field, "served"),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "served");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["continuous_usage_stats"], false);
        // already asked for, or not streaming: nothing to do
        for body in [
            &br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#[..],
            &br#"{"model":"m"}"#[..],
        ] {
            assert_eq!(include_usage_edit(body, &inspect(body).unwrap()), None);
        }
    }

    #[test]
    fn null_stream_options_is_left_to_the_engine_not_duplicated() {
        // found by fuzz/fuzz_targets/body.rs: `null` was read as absent, so the edit
        // added a second `stream_options` key, and engines keep the last one (`null`)
        let body = br#"{"stream" : true , "model":"a","stream_options":null}"#;
        let info = inspect(body).unwrap();
        assert_eq!(info.stream_options_span, Some(48..52));
        assert!(!info.include_usage);
        assert_eq!(include_usage_edit(body, &info), None);
        let field = info.model.clone().unwrap();
        let out = apply_edits(body, vec![model_edit(&field, "served")]);
        assert_eq!(
            inspect(&out).unwrap().model.map(|m| m.name),
            Ok("served".into())
        );
        // still refused when duplicated, `null` or not
        assert!(inspect(br#"{"stream_options":null,"stream_options":{}}"#).is_err());
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

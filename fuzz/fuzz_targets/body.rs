//! Request body inspection and the alias rewrite (`src/body.rs`): `inspect`,
//! `model_edit`, `include_usage_edit`, `apply_edits`.
//!
//! Input: the request body. The served name the alias is rewritten to is
//! picked from a fixed list by the body's length (quotes, backslashes,
//! control and non-ASCII characters included).
//!
//! Checks: `model`'s span holds exactly its JSON string; the rewritten body
//! (model renamed, `include_usage` added when the edit applies) is still a
//! body `inspect` accepts, names the served model, keeps `max_tokens` and
//! `stream`, asks for usage, and leaves every byte outside the edits as is.

#![no_main]

use infergate::body::{apply_edits, include_usage_edit, inspect, model_edit, BodyInfo};
use infergate::errors::GatewayError;
use libfuzzer_sys::fuzz_target;

const SERVED: &[&str] = &[
    "served",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "q\"uote",
    "back\\slash",
    "ctl\u{1}\n",
    "été-ü",
    "🦀",
];

fn same_admission(a: &BodyInfo, b: &BodyInfo) {
    assert_eq!(a.max_output_tokens, b.max_output_tokens);
    assert_eq!(a.stream, b.stream);
}

fuzz_target!(|body: &[u8]| {
    let Ok(info) = inspect(body) else {
        return;
    };
    if let Some(span) = &info.stream_options_span {
        assert!(span.start <= span.end && span.end <= body.len(), "{span:?}");
    }
    let served = SERVED[body.len() % SERVED.len()];

    // the model alone
    if let Ok(field) = &info.model {
        let span = field.span.clone();
        assert!(span.start < span.end && span.end <= body.len(), "{span:?}");
        let name: String = serde_json::from_slice(&body[span.clone()])
            .unwrap_or_else(|e| panic!("span {span:?} is not a JSON string: {e}"));
        assert_eq!(name, field.name);
        assert!(!field.name.is_empty());

        let out = apply_edits(body, vec![model_edit(field, served)]);
        assert_eq!(&out[..span.start], &body[..span.start]);
        assert_eq!(
            &out[out.len() - (body.len() - span.end)..],
            &body[span.end..]
        );
        let again = inspect(&out).unwrap_or_else(|e| panic!("rewrite broke the body: {e:?}"));
        same_admission(&info, &again);
        assert_eq!(again.include_usage, info.include_usage);
        assert_eq!(again.model.map(|m| m.name), Ok(served.to_string()));
    } else {
        assert!(matches!(
            info.model,
            Err(GatewayError::MissingModel
                | GatewayError::ModelNotString
                | GatewayError::InvalidJson { .. })
        ));
    }

    // usage requested, with or without the rename
    let Some(usage) = include_usage_edit(body, &info) else {
        return;
    };
    assert!(info.stream && !info.include_usage);
    let mut edits = vec![usage.clone()];
    if let Ok(field) = &info.model {
        edits.push(model_edit(field, served));
    }
    let out = apply_edits(body, edits);
    let again = inspect(&out).unwrap_or_else(|e| {
        panic!(
            "include_usage broke the body: {e:?}\n{}",
            String::from_utf8_lossy(&out)
        )
    });
    assert!(again.include_usage, "{}", String::from_utf8_lossy(&out));
    same_admission(&info, &again);
    match &info.model {
        Ok(_) => assert_eq!(again.model.map(|m| m.name), Ok(served.to_string())),
        Err(e) => assert_eq!(again.model.as_ref().err(), Some(e)),
    }
    let first = match &info.model {
        Ok(field) => usage.0.start.min(field.span.start),
        Err(_) => usage.0.start,
    };
    assert_eq!(&out[..first], &body[..first]);
});

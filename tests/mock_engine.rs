//! The mock engine refuses what vLLM refuses, with vLLM's 400 body, and still
//! answers every valid request of each kind.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const EMBEDDINGS: &str = "/v1/embeddings";

fn post(engine: &Proc, path: &str, body: &str) -> (u16, Value) {
    let r = client()
        .post(engine.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

fn stats(engine: &Proc) -> Value {
    get_json(&engine.url("/mock/stats"))
}

/// vLLM's current 400: exactly `{"error":{"message","type","param","code"}}`.
fn assert_vllm_400(v: &Value, what: &str) -> String {
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no message in {v}"))
        .to_owned();
    assert_eq!(
        *v,
        json!({"error": {"message": message, "type": "BadRequestError", "param": null, "code": 400}}),
        "{what}"
    );
    message
}

#[test]
fn invalid_requests_get_vllms_400_naming_the_field() {
    let engine = mock(&["--model", "tiny-chat"]);
    let long = format!(
        r#"{{"model":"tiny-chat","messages":"{}"}}"#,
        "x".repeat(100_000)
    );
    let cases: &[(&str, &str, &str)] = &[
        // (path, body, what the message must name)
        (CHAT, r#"{"model":"tiny-chat","messages":"hi"}"#, "'loc': ('body', 'messages'), 'msg': 'Input should be a valid list'"),
        (CHAT, &long, "'loc': ('body', 'messages')"),
        (CHAT, r#"{"model":"tiny-chat"}"#, "'type': 'missing', 'loc': ('body', 'messages')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[]}"#, "`messages`"),
        (CHAT, r#"{"model":"tiny-chat","messages":["hi"]}"#, "('body', 'messages', 0)"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"content":"hi"}]}"#, "('body', 'messages', 0, 'role')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":7,"content":"hi"}]}"#, "('body', 'messages', 0, 'role')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":null}]}"#, "('body', 'messages', 0, 'content'"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":5}]}"#, "('body', 'messages', 0, 'content'"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"a"},{"role":"user","content":[1]}]}"#, "('body', 'messages', 1, 'content'"),
        (CHAT, r#"{"model":42,"messages":[{"role":"user","content":"hi"}]}"#, "('body', 'model')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":-1}"#, "max_tokens must be at least 1, got -1."),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#, "max_tokens must be at least 1, got 0."),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":2.5}"#, "('body', 'max_tokens')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":-4}"#, "max_completion_tokens must be at least 1"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":"many"}"#, "('body', 'max_completion_tokens')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"temperature":-0.5}"#, "temperature must be non-negative, got -0.5."),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#, "('body', 'temperature')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"top_p":0}"#, "top_p must be in (0, 1], got 0.0."),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"top_p":1.5}"#, "top_p must be in (0, 1], got 1.5."),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"n":0}"#, "n must be at least 1, got 0."),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"n":"two"}"#, "('body', 'n')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"stream":"maybe"}"#, "('body', 'stream')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#, "Stream options can only be defined when `stream=True`."),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"stream":false,"stream_options":{"include_usage":true}}"#, "Stream options can only be defined when `stream=True`."),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":"yes"}"#, "('body', 'stream_options')"),
        (CHAT, r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":"sometimes"}}"#, "('body', 'stream_options', 'include_usage')"),
        (CHAT, r#"{"model": "tiny-chat", "messages": [}"#, "'type': 'json_invalid', 'loc': ('body', 36)"),
        (CHAT, "", "'type': 'missing', 'loc': ('body',)"),
        (CHAT, "[1,2]", "'loc': ('body',), 'msg': 'Input should be a valid dictionary or object to extract fields from'"),
        (COMPLETIONS, r#"{"model":"tiny-chat"}"#, "'type': 'missing', 'loc': ('body', 'prompt')"),
        (COMPLETIONS, r#"{"model":"tiny-chat","prompt":5}"#, "('body', 'prompt', 'str')"),
        (COMPLETIONS, r#"{"model":"tiny-chat","prompt":["a",{}]}"#, "('body', 'prompt', 'list[str]', 1)"),
        (COMPLETIONS, r#"{"model":"tiny-chat","prompt":[[1,"x"]]}"#, "('body', 'prompt', 'list[list[int]]', 0, 1)"),
        (COMPLETIONS, r#"{"model":"tiny-chat","prompt":"x","max_tokens":-2}"#, "max_tokens must be at least 1, got -2."),
        (COMPLETIONS, r#"{"model":"tiny-chat","prompt":"x","stream_options":{"include_usage":true}}"#, "Stream options can only be defined when `stream=True`."),
        (COMPLETIONS, "{", "'type': 'json_invalid'"),
        (EMBEDDINGS, r#"{"model":"tiny-chat"}"#, "'type': 'missing', 'loc': ('body', 'input')"),
        (EMBEDDINGS, r#"{"model":"tiny-chat","input":{"text":"x"}}"#, "('body', 'input', 'str')"),
        (EMBEDDINGS, r#"{"model":"tiny-chat","input":[true, null]}"#, "('body', 'input', 'list[int]', 1)"),
        (EMBEDDINGS, r#"{"model":"tiny-chat","input":"x","encoding_format":"hex"}"#, "('body', 'encoding_format')"),
        (EMBEDDINGS, r#""x""#, "'loc': ('body',)"),
    ];
    for (i, (path, body, names)) in cases.iter().enumerate() {
        let shown: String = body.chars().take(120).collect();
        let what = format!("{path} {shown}");
        let (status, v) = post(&engine, path, body);
        assert_eq!(status, 400, "{what} -> {v}");
        let message = assert_vllm_400(&v, &what);
        assert!(
            message.contains(names),
            "{what}: message should contain {names:?}, got {message:?}"
        );
        assert!(
            message.len() < 4096,
            "{what}: message of {} bytes",
            message.len()
        );
        // the engine saw it and counted the refusal
        let s = stats(&engine);
        assert_eq!(s["rejected_invalid"], i + 1, "{what}: {s}");
        assert_eq!(s["requests"], i + 1, "{what}: {s}");
    }
    let s = stats(&engine);
    assert_eq!(s["active"], 0, "{s}");
    assert_eq!(s["rejected_model"], 0, "{s}");
    // what was refused is still on record
    let last = get_json(&engine.url("/mock/last-request"));
    assert_eq!(last["path"], EMBEDDINGS, "{last}");
    assert_eq!(last["body_bytes"], 3, "{last}");
}

#[test]
fn the_issue_example_a_string_for_messages_is_refused_as_vllm_does() {
    let engine = mock(&["--model", "tiny-chat"]);
    let (status, v) = post(&engine, CHAT, r#"{"model":"tiny-chat","messages":"hello"}"#);
    assert_eq!(status, 400);
    assert_eq!(
        v,
        json!({"error": {
            "message": "[{'type': 'list_type', 'loc': ('body', 'messages'), 'msg': 'Input should be a valid list', 'input': 'hello'}]",
            "type": "BadRequestError",
            "param": null,
            "code": 400,
        }})
    );
}

#[test]
fn valid_requests_of_each_kind_still_get_200() {
    let engine = mock(&["--model", "tiny-chat", "--model", "tiny-embed"]);
    let cases: &[(&str, &str, &str)] = &[
        // (path, body, the response's `object`)
        (
            CHAT,
            r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}]}"#,
            "chat.completion",
        ),
        (
            CHAT,
            r#"{"messages":[{"role":"user","content":"no model: the first served one"}]}"#,
            "chat.completion",
        ),
        (
            CHAT,
            r#"{"model":null,"messages":[{"role":"user","content":"hi"}],"max_tokens":null,"stream":null,"stream_options":null}"#,
            "chat.completion",
        ),
        (
            CHAT,
            r#"{"model":"tiny-chat","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:,"}}]},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"},{"role":"user","name":"bob","content":"and?"}]}"#,
            "chat.completion",
        ),
        (
            CHAT,
            r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":"4","max_completion_tokens":3.0,"temperature":0,"top_p":1,"n":1,"top_k":50,"repetition_penalty":1.1,"chat_template_kwargs":{"x":[1]}}"#,
            "chat.completion",
        ),
        (
            CHAT,
            r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"stream":false,"stream_options":{}}"#,
            "chat.completion",
        ),
        (
            COMPLETIONS,
            r#"{"model":"tiny-chat","prompt":"once upon a time"}"#,
            "text_completion",
        ),
        (
            COMPLETIONS,
            r#"{"model":"tiny-chat","prompt":["a","b"],"max_tokens":2}"#,
            "text_completion",
        ),
        (
            COMPLETIONS,
            r#"{"model":"tiny-chat","prompt":[1,2,3]}"#,
            "text_completion",
        ),
        (
            COMPLETIONS,
            r#"{"model":"tiny-chat","prompt":[[1,2],[3]]}"#,
            "text_completion",
        ),
        (
            COMPLETIONS,
            r#"{"model":"tiny-chat","prompt":"x","echo":true,"max_tokens":0}"#,
            "text_completion",
        ),
        (
            EMBEDDINGS,
            r#"{"model":"tiny-embed","input":"hello"}"#,
            "list",
        ),
        (
            EMBEDDINGS,
            r#"{"model":"tiny-embed","input":["a","b"],"encoding_format":"float"}"#,
            "list",
        ),
        (
            EMBEDDINGS,
            r#"{"model":"tiny-embed","input":[1,2,3]}"#,
            "list",
        ),
        (
            EMBEDDINGS,
            r#"{"model":"tiny-embed","input":[[1],[2,3]]}"#,
            "list",
        ),
    ];
    for (path, body, object) in cases {
        let (status, v) = post(&engine, path, body);
        assert_eq!(status, 200, "{path} {body} -> {v}");
        assert_eq!(v["object"], *object, "{path} {body} -> {v}");
    }
    // streams, as vLLM streams them, with the usage asked for
    let r = client()
        .post(engine.url(CHAT))
        .body(r#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().unwrap();
    assert!(text.contains("\"usage\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // pydantic's lax bool: "true" streams too
    let r = client()
        .post(engine.url(COMPLETIONS))
        .body(r#"{"model":"tiny-chat","prompt":"x","stream":"true"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert!(r.text().unwrap().trim_end().ends_with("data: [DONE]"));
    let s = stats(&engine);
    assert_eq!(s["rejected_invalid"], 0, "{s}");
    assert_eq!(s["rejected_model"], 0, "{s}");
    assert_eq!(s["requests"], cases.len() + 2, "{s}");
}

#[test]
fn unknown_model_is_vllms_404_and_counted() {
    let engine = mock(&["--model", "tiny-chat"]);
    let (status, v) = post(
        &engine,
        CHAT,
        r#"{"model":"gpt-9","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 404);
    assert_eq!(
        v,
        json!({"error": {"message": "The model `gpt-9` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    );
    // a malformed body is refused before the model is looked at, as in vLLM
    let (status, v) = post(&engine, CHAT, r#"{"model":"gpt-9","messages":"hi"}"#);
    assert_eq!(status, 400, "{v}");
    let s = stats(&engine);
    assert_eq!(s["rejected_model"], 1, "{s}");
    assert_eq!(s["rejected_invalid"], 1, "{s}");
}

#[test]
fn flat_errors_flag_gives_vllms_older_shape() {
    let engine = mock(&["--model", "tiny-chat", "--flat-errors"]);
    let (status, v) = post(&engine, CHAT, r#"{"model":"tiny-chat","messages":"hi"}"#);
    assert_eq!(status, 400);
    let message = v["message"].as_str().unwrap().to_owned();
    assert!(message.contains("('body', 'messages')"), "{message}");
    assert_eq!(
        v,
        json!({"object": "error", "message": message, "type": "BadRequestError", "param": null, "code": 400})
    );
}

#[test]
fn failure_knobs_still_come_before_validation() {
    // --fail-status answers every inference request, valid or not
    let engine = mock(&["--model", "tiny-chat", "--fail-status", "503"]);
    for body in [r#"{"model":"tiny-chat","messages":"hi"}"#, "not json"] {
        let (status, v) = post(&engine, CHAT, body);
        assert_eq!(status, 503, "{body} -> {v}");
        assert_eq!(v["error"]["message"], "mock failure", "{v}");
    }
    assert_eq!(stats(&engine)["rejected_invalid"], 0);
    // --error-rate 1.0 likewise
    let engine = mock(&["--model", "tiny-chat", "--error-rate", "1.0"]);
    let (status, _) = post(&engine, COMPLETIONS, r#"{"prompt":7}"#);
    assert_eq!(status, 500);
    assert_eq!(stats(&engine)["rejected_invalid"], 0);
    // the per-request token interval header still applies to valid streams
    let engine = mock(&["--model", "tiny-chat", "--tokens", "3"]);
    let r = client()
        .post(engine.url(CHAT))
        .header("x-mock-token-interval-us", "1000")
        .body(chat_body("tiny-chat", true))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().unwrap();
    assert!(text.contains("tok2") && !text.contains("tok3"), "{text}");
}

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

// ---------------------------------------------------------------------------
// The engine model: scheduler (--max-running), prefix cache
// (--prefix-cache-tokens), prefill time (--prefill-us-per-token) and the
// vLLM metrics that show them.

/// One `/metrics` sample: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parse the exposition strictly: every line is a `# HELP`/`# TYPE` comment
/// or `name{k="v",...} value` / `name value` with a float value.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            let name = line[7..].split(' ').next().unwrap();
            assert!(is_metric_name(name), "bad comment line {line:?}");
            continue;
        }
        assert!(!line.is_empty() && !line.starts_with('#'), "line {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let labels = body
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or_else(|| panic!("unquoted label in {line:?}"));
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(is_metric_name(name), "bad name in {line:?}");
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

/// The value of `name{model_name="<model>"}`.
fn metric(engine: &Proc, name: &str, model: &str) -> f64 {
    let text = client()
        .get(engine.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let samples = parse_metrics(&text);
    samples
        .iter()
        .find(|s| s.name == name && s.labels == [("model_name".to_owned(), model.to_owned())])
        .unwrap_or_else(|| panic!("no {name} for {model} in\n{text}"))
        .value
}

fn words(n: usize, tag: &str) -> String {
    (0..n)
        .map(|i| format!("{tag}{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn completion(prompt: &str) -> String {
    json!({"model": "tiny-chat", "prompt": prompt, "max_tokens": 2}).to_string()
}

/// POST, return (status, time to the response head, the engine's prompt
/// tokens and cached tokens from its `x-mock-*` headers).
fn timed_post(engine: &Proc, path: &str, body: String) -> (u16, std::time::Duration, u64, u64) {
    let start = std::time::Instant::now();
    let r = client()
        .post(engine.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    let ttfb = start.elapsed();
    let header = |n: &str| -> u64 {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {n} header"))
    };
    let (prompt, cached) = (
        header("x-mock-prompt-tokens"),
        header("x-mock-cached-tokens"),
    );
    let status = r.status().as_u16();
    r.text().unwrap();
    (status, ttfb, prompt, cached)
}

fn stat(engine: &Proc, key: &str) -> i64 {
    stats(engine)[key]
        .as_i64()
        .unwrap_or_else(|| panic!("no {key} in /mock/stats"))
}

#[test]
fn max_running_queues_the_rest_and_all_complete() {
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--max-running",
        "2",
        "--ttft-ms",
        "1500",
    ]);
    let addr = engine.addr;
    let clients: Vec<_> = (0..5)
        .map(|i| {
            std::thread::spawn(move || {
                let r = client()
                    .post(format!("http://{addr}{COMPLETIONS}"))
                    .body(completion(&format!("request {i}")))
                    .send()
                    .unwrap();
                (r.status().as_u16(), r.text().unwrap())
            })
        })
        .collect();
    // 2 run, 3 wait: in the vLLM gauges and in /mock/stats
    wait_until(
        std::time::Duration::from_secs(10),
        "2 running, 3 waiting",
        || {
            metric(&engine, "vllm:num_requests_running", "tiny-chat") == 2.0
                && metric(&engine, "vllm:num_requests_waiting", "tiny-chat") == 3.0
        },
    );
    let s = stats(&engine);
    assert_eq!(
        (s["queued"].as_i64(), s["running"].as_i64()),
        (Some(3), Some(2)),
        "{s}"
    );
    assert_eq!(s["active"], 5, "in flight, queued included: {s}");
    for c in clients {
        let (status, body) = c.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("text_completion"), "{body}");
    }
    let s = stats(&engine);
    assert_eq!(s["max_active"], 2, "{s}");
    assert_eq!(s["max_queued"], 3, "{s}");
    assert_eq!(s["completed"], 5, "{s}");
    assert_eq!(s["started"], 5, "{s}");
    assert_eq!(
        (s["queued"].as_i64(), s["running"].as_i64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert_eq!(
        metric(&engine, "vllm:num_requests_waiting", "tiny-chat"),
        0.0
    );
    assert_eq!(
        metric(&engine, "vllm:num_requests_running", "tiny-chat"),
        0.0
    );
}

#[test]
fn without_max_running_nothing_waits() {
    let engine = mock(&["--model", "tiny-chat", "--ttft-ms", "500"]);
    let addr = engine.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                client()
                    .post(format!("http://{addr}{COMPLETIONS}"))
                    .body(completion("x"))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    wait_until(std::time::Duration::from_secs(10), "4 running", || {
        metric(&engine, "vllm:num_requests_running", "tiny-chat") == 4.0
    });
    assert_eq!(
        metric(&engine, "vllm:num_requests_waiting", "tiny-chat"),
        0.0
    );
    for c in clients {
        assert_eq!(c.join().unwrap(), 200);
    }
    let s = stats(&engine);
    assert_eq!(
        (s["max_active"].as_i64(), s["max_queued"].as_i64()),
        (Some(4), Some(0)),
        "{s}"
    );
}

/// Open a stream and read its first chunk: the request holds a running slot.
fn open_stream(engine: &Proc, interval_us: Option<u64>) -> reqwest::blocking::Response {
    use std::io::Read;
    let mut req = client()
        .post(engine.url(CHAT))
        .body(chat_body("tiny-chat", true));
    if let Some(us) = interval_us {
        req = req.header("x-mock-token-interval-us", us.to_string());
    }
    let mut r = req.send().unwrap();
    assert_eq!(r.status(), 200);
    let mut buf = [0u8; 256];
    assert!(r.read(&mut buf).unwrap() > 0);
    r
}

#[test]
fn a_stream_holds_its_slot_until_it_ends_or_its_client_leaves() {
    // streams of 3 tokens, a minute apart unless a request says otherwise
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--max-running",
        "1",
        "--tokens",
        "3",
        "--token-interval-ms",
        "60000",
    ]);
    let addr = engine.addr;
    let queued_stream = move || {
        std::thread::spawn(move || {
            let r = client()
                .post(format!("http://{addr}{CHAT}"))
                .header("x-mock-token-interval-us", "0")
                .body(chat_body("tiny-chat", true))
                .send()
                .unwrap();
            r.text().unwrap()
        })
    };
    // 1. a stream that ends normally (tokens 1 s apart)
    let first = std::thread::spawn(move || {
        client()
            .post(format!("http://{addr}{CHAT}"))
            .header("x-mock-token-interval-us", "1000000")
            .body(chat_body("tiny-chat", true))
            .send()
            .unwrap()
            .text()
            .unwrap()
    });
    wait_until(
        std::time::Duration::from_secs(10),
        "the first stream to run",
        || stat(&engine, "running") == 1,
    );
    let second = queued_stream();
    wait_until(
        std::time::Duration::from_secs(10),
        "the second to queue",
        || stat(&engine, "queued") == 1,
    );
    assert_eq!(stat(&engine, "started"), 1);
    assert!(first.join().unwrap().ends_with("data: [DONE]\n\n"));
    assert!(second.join().unwrap().ends_with("data: [DONE]\n\n"));
    // 2. a stream whose client leaves mid-stream frees its slot
    let held = open_stream(&engine, None);
    let third = queued_stream();
    wait_until(
        std::time::Duration::from_secs(10),
        "the third to queue",
        || stat(&engine, "queued") == 1,
    );
    assert_eq!(stat(&engine, "started"), 3);
    drop(held);
    assert!(third.join().unwrap().ends_with("data: [DONE]\n\n"));
    let s = stats(&engine);
    assert_eq!(s["max_active"], 1, "{s}");
    assert_eq!(s["max_queued"], 1, "{s}");
    assert_eq!(s["completed"], 3, "{s}");
    assert_eq!(s["aborted_streams"], 1, "{s}");
    assert_eq!(s["started"], 4, "{s}");
    assert_eq!(
        (s["running"].as_i64(), s["queued"].as_i64()),
        (Some(0), Some(0)),
        "{s}"
    );
}

#[test]
fn a_queued_client_that_disconnects_leaves_the_queue_and_never_runs() {
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--max-running",
        "1",
        "--tokens",
        "2",
        "--token-interval-ms",
        "60000",
    ]);
    // a stream holds the only slot
    let held = open_stream(&engine, None);
    assert_eq!(stat(&engine, "running"), 1);
    // a raw request queues behind it, then its client hangs up
    let body = completion(&words(100, "gone"));
    let mut s = raw_connect(engine.addr);
    write_all(
        &mut s,
        format!(
            "POST {COMPLETIONS} HTTP/1.1\r\nHost: mock\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    wait_until(
        std::time::Duration::from_secs(10),
        "the request to queue",
        || stat(&engine, "queued") == 1,
    );
    assert_eq!(
        metric(&engine, "vllm:num_requests_waiting", "tiny-chat"),
        1.0
    );
    drop(s);
    // it leaves the queue at once, while the slot is still taken
    wait_until(
        std::time::Duration::from_secs(10),
        "the queue to empty",
        || {
            let s = stats(&engine);
            s["queued"] == 0 && s["cancelled"] == 1
        },
    );
    let st = stats(&engine);
    assert_eq!(st["cancelled"], 1, "{st}");
    assert_eq!(
        (st["running"].as_i64(), st["started"].as_i64()),
        (Some(1), Some(1)),
        "{st}"
    );
    assert_eq!(
        metric(&engine, "vllm:num_requests_waiting", "tiny-chat"),
        0.0
    );
    // the next one queues, and runs once the stream goes
    let addr = engine.addr;
    let next = std::thread::spawn(move || {
        let r = client()
            .post(format!("http://{addr}{COMPLETIONS}"))
            .body(completion("a b c"))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    wait_until(
        std::time::Duration::from_secs(10),
        "the next to queue",
        || stat(&engine, "queued") == 1,
    );
    drop(held);
    let (status, body) = next.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let st = stats(&engine);
    // the stream and the last request ran; the one that left never did
    assert_eq!(st["started"], 2, "{st}");
    assert_eq!(st["completed"], 1, "{st}");
    assert_eq!(st["cancelled"], 2, "{st}");
    assert_eq!(st["max_active"], 1, "{st}");
    // prompt tokens: the stream's "hello" (role marker + 1 word) and "a b c"
    assert_eq!(st["prompt_tokens"], 2 + 3, "{st}");
}

#[test]
fn a_cached_prefix_skips_its_prefill() {
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--prefix-cache-tokens",
        "8192",
        "--prefill-us-per-token",
        "2000",
    ]);
    // 300 words: 18 full blocks; a full hit keeps the last token uncached,
    // so 18 blocks of (300 - 1) tokens can hit: 288
    let prompt = words(300, "w");
    let (status, cold, tokens, cached) = timed_post(&engine, COMPLETIONS, completion(&prompt));
    assert_eq!((status, tokens, cached), (200, 300, 0));
    let (status, warm, tokens, cached) = timed_post(&engine, COMPLETIONS, completion(&prompt));
    assert_eq!((status, tokens, cached), (200, 300, 288));
    assert!(warm < cold, "a cached prefix: TTFT {warm:?}, cold {cold:?}");
    let s = stats(&engine);
    assert_eq!(
        (
            s["prompt_tokens"].as_u64(),
            s["cached_prompt_tokens"].as_u64()
        ),
        (Some(600), Some(288)),
        "{s}"
    );
    assert_eq!(s["cache_tokens"], 288, "{s}");
    // the same words after a different first word: block hashes chain, no hit
    let other = format!("other {}", words(299, "w"));
    let (_, _, tokens, cached) = timed_post(&engine, COMPLETIONS, completion(&other));
    assert_eq!((tokens, cached), (300, 0));
    // a longer prompt with the same start hits the shared blocks
    let longer = format!("{prompt} and more");
    let (_, _, tokens, cached) = timed_post(&engine, COMPLETIONS, completion(&longer));
    assert_eq!((tokens, cached), (302, 288));
    // the per-request prefill rate: 0 µs makes a cold prompt fast
    let r = client()
        .post(engine.url(COMPLETIONS))
        .header("x-mock-prefill-us-per-token", "0")
        .body(completion(&words(300, "fresh")))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-mock-cached-tokens"], "0");
    let s = stats(&engine);
    assert_eq!(s["prompt_tokens"], 600 + 300 + 302 + 300, "{s}");
    assert_eq!(s["cached_prompt_tokens"], 288 * 2, "{s}");
    // the vLLM counters say the same, in tokens
    assert_eq!(
        metric(&engine, "vllm:prefix_cache_queries_total", "tiny-chat"),
        1502.0
    );
    assert_eq!(
        metric(&engine, "vllm:prefix_cache_hits_total", "tiny-chat"),
        576.0
    );
    let usage = metric(&engine, "vllm:kv_cache_usage_perc", "tiny-chat");
    let held = s["cache_tokens"].as_f64().unwrap();
    assert!((usage - held / 8192.0).abs() < 1e-9, "{usage} vs {held}");
    // the usage the client sees keeps the older estimate (characters / 4)
    let (_, v) = post(&engine, COMPLETIONS, &completion(&prompt));
    assert_eq!(
        v["usage"]["prompt_tokens"],
        prompt.chars().count() / 4,
        "{v}"
    );
}

#[test]
fn chat_follow_ups_hit_the_conversation_and_adapters_do_not_share() {
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--prefix-cache-tokens",
        "4096",
        "--prefill-us-per-token",
        "1",
    ]);
    let system = json!({"role": "system", "content": words(60, "s")});
    let turn1 = json!({"role": "user", "content": words(40, "u")});
    let chat = |model: &str, messages: Value| {
        json!({"model": model, "messages": messages, "max_tokens": 2}).to_string()
    };
    // role marker + 60 words, role marker + 40 words = 102 tokens, 6 blocks
    let (status, _, tokens, cached) =
        timed_post(&engine, CHAT, chat("tiny-chat", json!([system, turn1])));
    assert_eq!((status, tokens, cached), (200, 102, 0));
    // the next turn: the same messages, the answer, a new question
    let follow = json!([system, turn1, {"role": "assistant", "content": "ok then"},
                        {"role": "user", "content": "and next?"}]);
    let (_, _, tokens, cached) = timed_post(&engine, CHAT, chat("tiny-chat", follow.clone()));
    assert_eq!((tokens, cached), (102 + 3 + 3, 96));
    // a different system prompt shares nothing
    let other = json!([{"role": "system", "content": "be brief"}, turn1]);
    let (_, _, _, cached) = timed_post(&engine, CHAT, chat("tiny-chat", other));
    assert_eq!(cached, 0);
    // the same conversation through a LoRA adapter starts cold
    let r = client()
        .post(engine.url("/v1/load_lora_adapter"))
        .body(r#"{"lora_name":"tiny-lora","lora_path":"/adapters/x"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _, _, cached) = timed_post(&engine, CHAT, chat("tiny-lora", follow.clone()));
    assert_eq!((status, cached), (200, 0));
    let (_, _, _, cached) = timed_post(&engine, CHAT, chat("tiny-lora", follow));
    assert_eq!(cached, 96);
    // embeddings use the cache too
    let body = json!({"model": "tiny-chat", "input": words(40, "e")}).to_string();
    let (_, _, tokens, cached) = timed_post(&engine, EMBEDDINGS, body.clone());
    assert_eq!((tokens, cached), (40, 0));
    let (_, _, _, cached) = timed_post(&engine, EMBEDDINGS, body);
    assert_eq!(cached, 32);
}

#[test]
fn the_prefix_cache_evicts_the_least_recently_used() {
    // 8 blocks; prompts of 65 words: 4 blocks each, all usable for a hit
    let engine = mock(&["--model", "tiny-chat", "--prefix-cache-tokens", "128"]);
    let hit = |tag: &str| timed_post(&engine, COMPLETIONS, completion(&words(65, tag))).3;
    assert_eq!(hit("a"), 0);
    assert_eq!(hit("b"), 0);
    assert_eq!(
        metric(&engine, "vllm:kv_cache_usage_perc", "tiny-chat"),
        1.0
    );
    assert_eq!(stat(&engine, "cache_evictions"), 0);
    assert_eq!(
        hit("a"),
        64,
        "a refreshed: b is now the least recently used"
    );
    assert_eq!(hit("c"), 0);
    assert_eq!(stat(&engine, "cache_evictions"), 4);
    assert_eq!(hit("a"), 64, "a survived");
    assert_eq!(hit("b"), 0, "b was evicted");
    // b came back by evicting c, the least recently used: a still hits
    assert_eq!(hit("a"), 64);
    assert_eq!(hit("c"), 0);
    assert_eq!(stat(&engine, "cache_tokens"), 128);
    assert_eq!(
        metric(&engine, "vllm:kv_cache_usage_perc", "tiny-chat"),
        1.0
    );
}

#[test]
fn metrics_parse_and_carry_vllms_names_per_model() {
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--model",
        "tiny-embed",
        "--max-running",
        "4",
        "--prefix-cache-tokens",
        "1024",
    ]);
    let (status, _) = post(&engine, COMPLETIONS, &completion(&words(40, "m")));
    assert_eq!(status, 200);
    let text = client()
        .get(engine.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let samples = parse_metrics(&text);
    let kinds = [
        (
            "vllm:num_requests_running",
            "gauge",
            "vllm:num_requests_running",
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "vllm:num_requests_waiting",
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "vllm:kv_cache_usage_perc",
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "vllm:prefix_cache_queries_total",
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "vllm:prefix_cache_hits_total",
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "vllm:prompt_tokens_total",
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "vllm:generation_tokens_total",
        ),
    ];
    for (family, kind, sample) in kinds {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "{family} {kind}:\n{text}"
        );
        for model in ["tiny-chat", "tiny-embed"] {
            assert!(
                samples.iter().any(|s| s.name == sample
                    && s.labels == [("model_name".to_owned(), model.to_owned())]),
                "{sample} for {model}:\n{text}"
            );
        }
    }
    assert!(samples
        .iter()
        .any(|s| s.name == "mock_requests_total" && s.value == 1.0));
    assert_eq!(
        metric(&engine, "vllm:prefix_cache_queries_total", "tiny-chat"),
        40.0
    );
    assert_eq!(
        metric(&engine, "vllm:prefix_cache_queries_total", "tiny-embed"),
        0.0
    );
    assert_eq!(
        metric(&engine, "vllm:kv_cache_usage_perc", "tiny-chat"),
        32.0 / 1024.0
    );
    // the cache off: usage 0, no queries counted, stats still count tokens
    let engine = mock(&["--model", "tiny-chat"]);
    post(&engine, COMPLETIONS, &completion(&words(40, "m")));
    assert_eq!(
        metric(&engine, "vllm:kv_cache_usage_perc", "tiny-chat"),
        0.0
    );
    assert_eq!(
        metric(&engine, "vllm:prefix_cache_queries_total", "tiny-chat"),
        0.0
    );
    let s = stats(&engine);
    assert_eq!(
        (
            s["prompt_tokens"].as_u64(),
            s["cached_prompt_tokens"].as_u64()
        ),
        (Some(40), Some(0)),
        "{s}"
    );
}

#[test]
fn bad_engine_flags_are_refused() {
    for args in [
        &["--max-running", "0"][..],
        &["--prefix-cache-tokens", "8"][..],
    ] {
        let out = std::process::Command::new(mock_bin())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
    }
}

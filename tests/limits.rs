//! Limits end to end: requests per second, concurrency (released on
//! completion and on client disconnect), tokens per minute with reservation
//! and settlement, quotas that survive `kill -9`, usage accounting (the
//! injected `include_usage` chunk is invisible to the client) — against the
//! real gateway and mock engine.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

const KEY: &str = "sk-limits-0123456789abcdef0123456789";
const ADMIN: &str = "sk-limits-admin-0123456789abcdef0123";

struct Setup {
    dir: PathBuf,
    engine: Proc,
    gw: Proc,
    yaml: String,
}

/// A gateway with one user key (`key_extra` merged into its entry), an admin
/// key, and the `limits` filter configured by `limits` (YAML lines under it).
fn start(limits: &str, key_extra: Value, engine_args: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut key = json!({"key": KEY, "user": "alice"});
    if let (Some(k), Some(extra)) = (key.as_object_mut(), key_extra.as_object()) {
        for (name, value) in extra {
            k.insert(name.clone(), value.clone());
        }
    }
    let keys = json!({"keys": [key, {"key": ADMIN, "user": "ops", "role": "admin"}]});
    std::fs::write(dir.join("keys.json"), keys.to_string()).unwrap();
    let mut args = vec!["--model", "tiny-chat"];
    args.extend_from_slice(engine_args);
    let engine = mock(&args);
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  threads: 2\npools:\n  - name: chat\n    models: [\"tiny-chat\"]\n    backends: [\"{}\"]\n    health_check: {{ path: /health, interval: 200ms }}\nfilters:\n  - request_id: {{}}\n  - auth:\n      api_keys_file: {}\n  - limits:\n      data_dir: {}\n{limits}",
        engine.addr,
        dir.join("keys.json").display(),
        dir.join("data").display(),
    );
    let gw = gateway(&yaml);
    wait_healthy(&gw, 1);
    Setup {
        dir,
        engine,
        gw,
        yaml,
    }
}

fn send(gw: &Proc, body: &str) -> reqwest::blocking::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap()
}

fn chat_max(max_tokens: u64, stream: bool) -> String {
    json!({
        "model": "tiny-chat",
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}],
    })
    .to_string()
}

fn usage_of(gw: &Proc, id_user: &str) -> Value {
    let all: Value = client()
        .get(gw.url("/admin/usage"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    all["data"]
        .as_array()
        .and_then(|list| list.iter().find(|p| p["user"] == id_user).cloned())
        .unwrap_or(Value::Null)
}

fn header(resp: &reqwest::blocking::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[test]
fn requests_per_second_limit_is_reached_and_recovers() {
    let s = start(
        "      per_key: { requests_per_second: 1, burst: 2 }\n",
        json!({}),
        &[],
    );
    let body = chat_body("tiny-chat", false);
    let first = send(&s.gw, &body);
    assert_eq!(first.status(), 200);
    assert_eq!(
        header(&first, "x-ratelimit-limit-requests").as_deref(),
        Some("2")
    );
    assert_eq!(
        header(&first, "x-ratelimit-remaining-requests").as_deref(),
        Some("1")
    );
    assert!(header(&first, "x-ratelimit-reset-requests").is_some());
    assert_eq!(send(&s.gw, &body).status(), 200);
    let limited = send(&s.gw, &body);
    assert_eq!(limited.status(), 429);
    let retry: u64 = header(&limited, "retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    let requests_before = get_json(&s.engine.url("/mock/stats"))["requests"].clone();
    let error: Value = limited.json().unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "requests");
    // refused before any upstream contact
    assert_eq!(
        get_json(&s.engine.url("/mock/stats"))["requests"],
        requests_before
    );
    // within Retry-After (and a second of slack) the key may send again
    wait_until(
        Duration::from_secs(retry + 1),
        "the rate limit to let a request through",
        || send(&s.gw, &body).status() == 200,
    );
}

#[test]
fn concurrency_slot_is_released_on_completion_and_on_disconnect() {
    let s = start(
        "      per_key: { concurrent: 1 }\n",
        json!({}),
        &["--ttft-ms", "800"],
    );
    // hold the only slot with a slow request
    let gw_addr = s.gw.addr;
    let slow = std::thread::spawn(move || {
        client()
            .post(format!("http://{gw_addr}/v1/chat/completions"))
            .header("authorization", format!("Bearer {KEY}"))
            .body(chat_body("tiny-chat", false))
            .send()
            .unwrap()
            .status()
            .as_u16()
    });
    wait_until(
        Duration::from_secs(5),
        "the slow request to reach the engine",
        || get_json(&s.engine.url("/mock/stats"))["active"] == 1,
    );
    let refused = send(&s.gw, &chat_body("tiny-chat", false));
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after").as_deref(), Some("1"));
    assert_eq!(slow.join().unwrap(), 200);
    assert_eq!(send(&s.gw, &chat_body("tiny-chat", false)).status(), 200);

    // a client that leaves mid-request frees its slot too
    let body = chat_body("tiny-chat", true);
    let mut raw = raw_connect(s.gw.addr);
    write_all(
        &mut raw,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    wait_until(
        Duration::from_secs(5),
        "the stream to reach the engine",
        || get_json(&s.engine.url("/mock/stats"))["active"] == 1,
    );
    drop(raw);
    wait_until(Duration::from_secs(5), "the slot to be released", || {
        send(&s.gw, &chat_body("tiny-chat", false)).status() == 200
    });
}

#[test]
fn tokens_per_minute_reserve_settle_and_refuse() {
    // the mock answers max_tokens tokens; prompt ≈ body bytes / 4 at admission
    let s = start(
        "      per_key: { tokens_per_minute: 600 }\n      default_max_tokens: 100\n",
        json!({}),
        &["--tokens", "200"],
    );
    // more than the whole minute's budget: refused for good
    let too_big = send(&s.gw, &chat_max(5000, false));
    assert_eq!(too_big.status(), 429);
    assert_eq!(header(&too_big, "x-should-retry").as_deref(), Some("false"));
    let error: Value = too_big.json().unwrap();
    assert_eq!(error["error"]["type"], "tokens");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));

    // reservations are settled to the real usage: small requests fit many times
    let ok = send(&s.gw, &chat_max(8, false));
    assert_eq!(ok.status(), 200);
    let limit: u64 = header(&ok, "x-ratelimit-limit-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(limit, 600);
    let usage: Value = ok.json().unwrap();
    let used = usage["usage"]["total_tokens"].as_u64().unwrap();
    let remaining_after_first = 600 - used;
    // the next admission sees the settled figure, not the reservation
    let next = send(&s.gw, &chat_max(8, false));
    let remaining: u64 = header(&next, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    let reserved = (chat_max(8, false).len() as u64).div_ceil(4) + 8;
    assert!(
        remaining + reserved >= remaining_after_first - 2,
        "settled: remaining {remaining} + reserved {reserved} ≈ {remaining_after_first}"
    );
    // exhaust the minute with large requests: 429 type tokens, retryable
    let mut last = 0;
    for _ in 0..10 {
        let resp = send(&s.gw, &chat_max(200, false));
        last = resp.status().as_u16();
        if last == 429 {
            assert!(header(&resp, "retry-after").is_some());
            assert_ne!(header(&resp, "x-should-retry").as_deref(), Some("false"));
            let e: Value = resp.json().unwrap();
            assert_eq!(e["error"]["type"], "tokens");
            break;
        }
    }
    assert_eq!(last, 429, "the token budget ran out");
}

#[test]
fn aborted_stream_refunds_its_unused_reservation() {
    let s = start(
        "      per_key: { tokens_per_minute: 100000 }\n",
        json!({}),
        &["--tokens", "1000", "--token-interval-ms", "50"],
    );
    let body = chat_max(1000, true);
    let mut raw = raw_connect(s.gw.addr);
    write_all(
        &mut raw,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while seen.windows(2).filter(|w| w == b"\n\n").count() < 3 {
        let n = raw.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let during = usage_of(&s.gw, "alice");
    assert!(
        during["reserved_tokens"].as_u64().unwrap() >= 1000,
        "reserved while streaming: {during}"
    );
    drop(raw);
    wait_until(
        Duration::from_secs(5),
        "the reservation to be settled",
        || usage_of(&s.gw, "alice")["reserved_tokens"] == 0,
    );
    // the next request sees almost the whole budget again
    let resp = send(&s.gw, &chat_max(10, false));
    let remaining: u64 = header(&resp, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining > 100000 - 300, "refunded: {remaining} left");
    wait_until(
        Duration::from_secs(10),
        "the aborted request's usage marked estimated in the access log",
        || s.gw.stderr().contains("\"usage\":\"estimated\""),
    );
}

#[test]
fn injected_include_usage_is_invisible_and_counted() {
    let s = start("", json!({"quota": 1000000}), &["--tokens", "5"]);
    let resp = send(&s.gw, &chat_body("tiny-chat", true));
    assert_eq!(resp.status(), 200);
    let text = resp.text().unwrap();
    // what the engine was asked
    let last = get_json(&s.engine.url("/mock/last-request"));
    assert_eq!(last["stream_options"]["include_usage"], true);
    // what the client got: no usage chunk, content intact, [DONE] at the end
    assert!(!text.contains("\"usage\""), "usage chunk leaked:\n{text}");
    assert_eq!(
        text.matches("\"delta\"").count(),
        6,
        "5 tokens + role chunk:\n{text}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    // and the usage was counted from it, exactly
    let used = usage_of(&s.gw, "alice")["quota_used"].as_u64().unwrap();
    assert!(used > 5, "prompt + 5 completion tokens counted: {used}");
    // a client that asked for usage gets it, counted once more
    let asked = json!({
        "model": "tiny-chat", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hello"}],
    });
    let text = send(&s.gw, &asked.to_string()).text().unwrap();
    let usage_line = text
        .lines()
        .find(|l| l.contains("\"usage\"") && l.contains("\"choices\":[]"))
        .expect("the usage chunk the client asked for");
    let chunk: Value = serde_json::from_str(usage_line.trim_start_matches("data: ")).unwrap();
    let total = chunk["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(
        usage_of(&s.gw, "alice")["quota_used"].as_u64().unwrap(),
        used + total
    );
}

#[test]
fn quota_is_enforced_and_survives_kill_9() {
    let s = start("", json!({"quota": 60}), &["--tokens", "10"]);
    let mut total = 0;
    let mut refused = None;
    for _ in 0..20 {
        let resp = send(&s.gw, &chat_max(10, false));
        if resp.status() == 429 {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().unwrap();
        total += body["usage"]["total_tokens"].as_u64().unwrap();
    }
    let refused = refused.expect("the quota ran out");
    assert_eq!(header(&refused, "x-should-retry").as_deref(), Some("false"));
    let error: Value = refused.json().unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert!(total >= 60);
    assert_eq!(usage_of(&s.gw, "alice")["quota_used"].as_u64(), Some(total));

    // kill -9 right after the last answer, restart on the same data dir
    let Setup {
        dir,
        engine,
        mut gw,
        yaml,
        ..
    } = s;
    gw.child.kill().unwrap(); // SIGKILL
    gw.child.wait().unwrap();
    let gw = gateway(&yaml);
    wait_healthy(&gw, 1);
    assert_eq!(usage_of(&gw, "alice")["quota_used"].as_u64(), Some(total));
    assert_eq!(send(&gw, &chat_max(10, false)).status(), 429);
    drop(engine);
    let _ = dir;
}

#[test]
fn rate_limit_headers_are_on_streaming_responses() {
    let s = start(
        "      per_key: { requests_per_second: 5, tokens_per_minute: 100000 }\n",
        json!({}),
        &[],
    );
    let mut raw = raw_connect(s.gw.addr);
    let body = chat_body("tiny-chat", true);
    write_all(
        &mut raw,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let mut out = String::new();
    raw.read_to_string(&mut out).unwrap();
    let head = out.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.contains("text/event-stream"), "{head}");
    for name in [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ] {
        assert!(head.contains(name), "{name} missing in\n{head}");
    }
    let _ = raw.flush();
}

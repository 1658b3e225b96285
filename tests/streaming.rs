//! SSE passes through chunk by chunk; client disconnects close the engine
//! connection; engine failures mid-stream end with one error event.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

fn stream_request(model: &str) -> Vec<u8> {
    let body = chat_body(model, true);
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        body
    )
    .into_bytes()
}

/// Read the response head; return the reader positioned at the body.
fn open_stream(gw: &Proc, model: &str) -> BufReader<std::net::TcpStream> {
    let mut s = raw_connect(gw.addr);
    s.write_all(&stream_request(model)).unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            return reader;
        }
    }
}

/// Next SSE `data:` payload from a chunked body, with its arrival time.
fn next_event(reader: &mut BufReader<std::net::TcpStream>) -> Option<(String, Instant)> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            return Some((data.to_string(), Instant::now()));
        }
    }
}

#[test]
fn chunks_sent_100ms_apart_arrive_about_100ms_apart() {
    let (_engine, gw) = engine_behind_gateway(&["--token-interval-ms", "100", "--tokens", "6"], "");
    let mut reader = open_stream(&gw, "tiny-chat");
    let mut events = Vec::new();
    while let Some(e) = next_event(&mut reader) {
        events.push(e);
    }
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("[DONE]"));
    // role chunk, 6 tokens, [DONE]
    assert_eq!(events.len(), 8, "{events:?}");
    let gaps: Vec<Duration> = events
        .windows(2)
        .skip(1)
        .take(5)
        .map(|w| w[1].1 - w[0].1)
        .collect();
    for gap in &gaps {
        // a buffering proxy delivers several chunks at once (gap ~0)
        assert!(
            *gap >= Duration::from_millis(50),
            "chunks coalesced: gaps {gaps:?}"
        );
    }
}

#[test]
fn client_leaving_mid_stream_closes_the_engine_connection() {
    let (engine, gw) =
        engine_behind_gateway(&["--token-interval-ms", "200", "--tokens", "100"], "");
    let mut reader = open_stream(&gw, "tiny-chat");
    assert!(next_event(&mut reader).is_some());
    assert!(next_event(&mut reader).is_some());
    let left = Instant::now();
    drop(reader);
    wait_until(
        Duration::from_secs(2),
        "the engine to see the stream aborted",
        || get_json(&engine.url("/mock/stats"))["aborted_streams"] == 1,
    );
    assert!(left.elapsed() < Duration::from_secs(2));
}

#[test]
fn client_leaving_before_the_first_byte_closes_the_engine_connection() {
    let (engine, gw) = engine_behind_gateway(&["--ttft-ms", "5000"], "");
    let mut s = raw_connect(gw.addr);
    s.write_all(&stream_request("tiny-chat")).unwrap();
    wait_until(
        Duration::from_secs(5),
        "the engine to receive the request",
        || get_json(&engine.url("/mock/stats"))["requests"] == 1,
    );
    drop(s);
    wait_until(
        Duration::from_secs(2),
        "the engine to see the request cancelled",
        || get_json(&engine.url("/mock/stats"))["cancelled"] == 1,
    );
}

#[test]
fn engine_dying_mid_stream_ends_with_one_error_event_and_no_done() {
    let (_engine, gw) = engine_behind_gateway(&["--drop-after-chunks", "3", "--tokens", "10"], "");
    let mut reader = open_stream(&gw, "tiny-chat");
    let mut events = Vec::new();
    while let Some((data, _)) = next_event(&mut reader) {
        events.push(data);
    }
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "{last}");
    assert!(last["error"]["message"].is_string());
    // role chunk + 3 content chunks arrived before the error
    assert_eq!(events.len(), 5, "{events:?}");
}

#[test]
fn stalled_stream_gets_an_idle_timeout_error_event() {
    let (_engine, gw) = engine_behind_gateway(
        &["--token-interval-ms", "3000", "--tokens", "3"],
        "timeouts: { idle: 500ms }",
    );
    let mut reader = open_stream(&gw, "tiny-chat");
    let mut events = Vec::new();
    while let Some((data, _)) = next_event(&mut reader) {
        events.push(data);
    }
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{events:?}");
}

#[test]
fn include_usage_is_passed_to_the_engine_and_usage_chunk_comes_back() {
    let (_engine, gw) = engine_behind_gateway(&["--tokens", "4"], "");
    let body = r#"{"model":"tiny-chat","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let text = client()
        .post(gw.url("/v1/chat/completions"))
        .body(body)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let usage: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["usage"].is_object())
        .collect();
    assert_eq!(usage.len(), 1, "{text}");
    assert_eq!(usage[0]["usage"]["completion_tokens"], 4);
    assert_eq!(usage[0]["choices"].as_array().map(Vec::len), Some(0));
}

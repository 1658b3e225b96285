//! Request bodies of every size reach the engine intact; over the limit is 413.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

/// A chat body of exactly `size` bytes with `model` last (as the OpenAI SDK writes it).
fn body_of_size(size: usize) -> Vec<u8> {
    let head = r#"{"messages":[{"role":"user","content":""#;
    let tail = r#""}],"model":"tiny-chat"}"#;
    let fill = size - head.len() - tail.len();
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(head.as_bytes());
    body.extend((0..fill).map(|i| b"abcdefghij klmnopqrstuvwxyz"[i % 27]));
    body.extend_from_slice(tail.as_bytes());
    assert_eq!(body.len(), size);
    body
}

fn setup(limit: Option<u64>) -> (Proc, Proc) {
    let engine = mock(&["--model", "tiny-chat"]);
    let top = limit.map_or(String::new(), |l| format!("  max_request_body_bytes: {l}"));
    let gw = gateway(&one_pool(&[engine.addr], "", &top));
    wait_healthy(&gw, 1);
    (engine, gw)
}

#[test]
fn bodies_around_and_far_past_64k_reach_the_engine_intact() {
    let (_engine, gw) = setup(None);
    for size in [1024, 63 * 1024, 65 * 1024, 1024 * 1024, 8 * 1024 * 1024] {
        let body = body_of_size(size);
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .body(body.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "size {size}");
        assert_eq!(
            r.headers()["x-mock-body-bytes"],
            size.to_string().as_str(),
            "size {size}"
        );
        assert_eq!(
            r.headers()["x-mock-body-sha256"],
            sha256_hex(&body).as_str(),
            "size {size}"
        );
    }
}

#[test]
fn body_over_the_limit_is_413_and_never_reaches_the_engine() {
    let (engine, gw) = setup(Some(100_000));
    // a client without `Expect` is still uploading when the 413 goes out: the
    // gateway drains briefly so it reads the 413, not a connection reset
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(body_of_size(2_000_000))
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // chunked upload past the limit: no Content-Length to refuse up front
    let mut s = raw_connect(gw.addr);
    write_all(
        &mut s,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let chunk = vec![b'a'; 60_000];
    for _ in 0..2 {
        write_all(&mut s, format!("{:x}\r\n", chunk.len()).as_bytes());
        write_all(&mut s, &chunk);
        write_all(&mut s, b"\r\n");
    }
    let mut head = String::new();
    BufReader::new(&mut s).read_line(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 413"), "got {head:?}");
    let stats = get_json(&engine.url("/mock/stats"));
    assert_eq!(stats["requests"], 0, "nothing reached the engine: {stats}");
    // the limit itself is fine
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(body_of_size(100_000))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn chunked_upload_is_read_whole_and_forwarded_with_a_length() {
    let (_engine, gw) = setup(None);
    let body = body_of_size(200 * 1024);
    let mut s = raw_connect(gw.addr);
    write_all(&mut s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    for piece in body.chunks(7000) {
        write_all(&mut s, format!("{:x}\r\n", piece.len()).as_bytes());
        write_all(&mut s, piece);
        write_all(&mut s, b"\r\n");
    }
    write_all(&mut s, b"0\r\n\r\n");
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("x-mock-body-sha256: {}", sha256_hex(&body))),
        "{response}"
    );
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let (_engine, gw) = setup(None);
    let body = body_of_size(300 * 1024);
    let mut s = raw_connect(gw.addr);
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    write_all(&mut s, head.as_bytes());
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("HTTP/1.1 100"),
        "expected 100 Continue, got {line:?}"
    );
    let mut blank = String::new();
    reader.read_line(&mut blank).unwrap();
    write_all(&mut s, &body);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest
        .to_ascii_lowercase()
        .contains(&format!("x-mock-body-sha256: {}", sha256_hex(&body))));
}

#[test]
fn oversized_content_length_with_expect_gets_413_without_100() {
    let (_engine, gw) = setup(Some(1000));
    let mut s = raw_connect(gw.addr);
    write_all(&mut s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n");
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 413"), "got {line:?}");
}

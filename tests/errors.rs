//! Every error a client can see is OpenAI-shaped, with the right status.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::Value;

fn assert_openai_error(v: &Value) {
    let e = &v["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "missing {key} in {v}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(e["code"].is_string() || e["code"].is_null());
}

fn post(gw: &Proc, path: &str, body: &'static [u8]) -> (u16, Value) {
    let r = client().post(gw.url(path)).body(body).send().unwrap();
    let status = r.status().as_u16();
    assert_eq!(r.headers()["content-type"], "application/json");
    (status, r.json().unwrap_or(Value::Null))
}

#[test]
fn bad_request_bodies_get_400_and_never_reach_the_engine() {
    let (engine, gw) = engine_behind_gateway(&[], "");
    let cases: &[(&[u8], &str, Value)] = &[
        (b"{\"model\": \"tiny-chat\"", "invalid_json", Value::Null),
        (b"[1,2]", "invalid_json", Value::Null),
        (b"", "invalid_json", Value::Null),
        (b"{\"messages\":[]}", "missing_model", Value::from("model")),
        (b"{\"model\":null}", "missing_model", Value::from("model")),
        (b"{\"model\":42}", "invalid_type", Value::from("model")),
        (
            b"{\"model\":\"a\",\"model\":\"b\"}",
            "invalid_json",
            Value::Null,
        ),
        (
            b"{\"model\":\"tiny-chat\",\"x\":\"\xff\"}",
            "invalid_json",
            Value::Null,
        ),
        (b"{\"model\":\"\\ud800\"}", "invalid_json", Value::Null),
    ];
    for (body, code, param) in cases {
        let (status, v) = post(&gw, "/v1/chat/completions", body);
        assert_eq!(status, 400, "{:?} -> {v}", String::from_utf8_lossy(body));
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], *code, "{v}");
        assert_eq!(v["error"]["param"], *param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let deep = format!(
        "{{\"model\":\"tiny-chat\",\"x\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(deep)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(get_json(&engine.url("/mock/stats"))["requests"], 0);
}

#[test]
fn unknown_model_is_404_model_not_found() {
    let (engine, gw) = engine_behind_gateway(&[], "");
    let (status, v) = post(
        &gw,
        "/v1/chat/completions",
        br#"{"model":"gpt-9","messages":[]}"#,
    );
    assert_eq!(status, 404);
    assert_openai_error(&v);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["param"], "model");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
    assert_eq!(get_json(&engine.url("/mock/stats"))["requests"], 0);
}

#[test]
fn wrong_method_is_405_and_unknown_path_is_404() {
    let (_engine, gw) = engine_behind_gateway(&[], "");
    let r = client().get(gw.url("/v1/chat/completions")).send().unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_openai_error(&r.json().unwrap());
    let r = client().delete(gw.url("/v1/models")).send().unwrap();
    assert_eq!(r.status(), 405);
    let r = client().get(gw.url("/admin/../etc/passwd")).send().unwrap();
    assert_eq!(r.status(), 404);
    assert_openai_error(&r.json().unwrap());
}

#[test]
fn engine_errors_are_normalised_and_keep_their_status() {
    for flat in [false, true] {
        let mut args = vec!["--fail-status", "500"];
        if flat {
            args.push("--flat-errors");
        }
        let (_engine, gw) = engine_behind_gateway(&args, "");
        let (status, v) = post(
            &gw,
            "/v1/chat/completions",
            br#"{"model":"tiny-chat","messages":[]}"#,
        );
        assert_eq!(status, 500);
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], "500", "{v}");
        assert_eq!(v["error"]["message"], "mock failure");
    }
}

#[test]
fn engine_that_never_answers_gets_504() {
    let (_engine, gw) = engine_behind_gateway(&["--hang"], "timeouts: { first_byte: 500ms }");
    let (status, v) = post(
        &gw,
        "/v1/chat/completions",
        br#"{"model":"tiny-chat","messages":[]}"#,
    );
    assert_eq!(status, 504);
    assert_openai_error(&v);
    assert_eq!(v["error"]["code"], "upstream_timeout");
}

#[test]
fn gateway_keeps_serving_after_garbage() {
    use std::io::{Read, Write};
    let (_engine, gw) = engine_behind_gateway(&[], "");
    for garbage in [&b"GARBAGE\r\n\r\n"[..], b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"\x00\xff\xfe\r\n\r\n"] {
        let mut s = raw_connect(gw.addr);
        let _ = s.write_all(garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let (status, _) = post(
        &gw,
        "/v1/chat/completions",
        br#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200);
}

#[test]
fn an_engines_validation_error_reaches_the_client_in_openai_shape() {
    // the mock refuses what vLLM refuses, with vLLM's body
    let (engine, gw) = engine_behind_gateway(&[], "");
    for body in [
        &br#"{"model":"tiny-chat","messages":"hello"}"#[..],
        br#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":-1}"#,
        br#"{"model":"tiny-chat","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#,
    ] {
        let (status, v) = post(&gw, "/v1/chat/completions", body);
        assert_eq!(status, 400, "{v}");
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], "400", "{v}");
    }
    let stats = get_json(&engine.url("/mock/stats"));
    assert_eq!(stats["rejected_invalid"], 3, "{stats}");
}

/// A fake engine on a raw socket: `/health` passes, everything else gets `reply`.
fn raw_engine(reply: &'static [u8]) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0; 65536];
                let n = conn.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                if head.starts_with("GET /health") {
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                } else {
                    let _ = conn.write_all(reply);
                }
            });
        }
    });
    addr
}

#[test]
fn engine_answering_garbage_or_closing_gets_502() {
    for reply in [&b"this is not http\r\n\r\n"[..], b""] {
        let addr = raw_engine(reply);
        let gw = gateway(&one_pool(&[addr], "", ""));
        wait_healthy(&gw, 1);
        let (status, v) = post(
            &gw,
            "/v1/chat/completions",
            br#"{"model":"tiny-chat","messages":[]}"#,
        );
        assert_eq!(status, 502, "{v}");
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], "upstream_error");
    }
}

#[test]
fn request_smuggling_framing_is_refused_and_nothing_reaches_the_engine() {
    use std::io::{Read, Write};
    let (engine, gw) = engine_behind_gateway(&[], "");
    let body = r#"{"model":"tiny-chat","messages":[]}"#;
    let attacks = [
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nContent-Length: 5\r\n\r\n{body}", body.len()),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n", body.len()),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n", body.len()),
    ];
    for attack in &attacks {
        let mut s = raw_connect(gw.addr);
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(attack.as_bytes()).unwrap();
        let mut response = Vec::new();
        let _ = s.read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response);
        assert!(
            !text.starts_with("HTTP/1.1 200"),
            "accepted {attack:?}: {text}"
        );
    }
    assert_eq!(get_json(&engine.url("/mock/stats"))["requests"], 0);
}

#[test]
fn engine_cutting_a_chunked_non_sse_body_leaves_it_visibly_truncated() {
    use std::io::Read;
    let addr = raw_engine(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n");
    let gw = gateway(&one_pool(&[addr], "", ""));
    wait_healthy(&gw, 1);
    let mut s = raw_connect(gw.addr);
    let body = r#"{"model":"tiny-chat","messages":[]}"#;
    write_all(
        &mut s,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("{\"a\":"), "the relayed part arrived: {text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a terminal chunk would make the body look complete: {text:?}"
    );
}

#[test]
fn informational_1xx_from_the_engine_is_not_relayed_as_final() {
    let addr = raw_engine(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"ok\":true}");
    let gw = gateway(&one_pool(&[addr], "", ""));
    wait_healthy(&gw, 1);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(r#"{"model":"tiny-chat"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), r#"{"ok":true}"#);
}

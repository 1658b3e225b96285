//! Routing by `model`: pools, aliases, models list, default pool, request ids.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

#[test]
fn chat_request_is_routed_to_the_pool_of_its_model() {
    let chat = mock(&["--model", "tiny-chat", "--name", "chat-engine"]);
    let embed = mock(&["--model", "tiny-embed", "--name", "embed-engine"]);
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:0\", threads: 2 }}\npools:\n  - name: chat\n    models: [tiny-chat]\n    backends: [\"{}\"]\n    health_check: {{ interval: 200ms }}\n  - name: embed\n    models: [tiny-embed]\n    backends: [\"{}\"]\n    health_check: {{ interval: 200ms }}\n",
        chat.addr, embed.addr
    );
    let gw = gateway(&yaml);
    wait_healthy(&gw, 2);
    let c = client();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-instance"], "chat-engine");
    let v: Value = r.json().unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let r = c
        .post(gw.url("/embeddings"))
        .body(r#"{"input":["a","b"],"model":"tiny-embed"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-instance"], "embed-engine");
    let v: Value = r.json().unwrap();
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));

    let r = c
        .post(gw.url("/completions"))
        .body(r#"{"model":"tiny-chat","prompt":"x"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-instance"], "chat-engine");
}

#[test]
fn alias_is_rewritten_to_the_served_name_and_nothing_else_changes() {
    let engine = mock(&["--model", "tiny-chat"]);
    let gw = gateway(&one_pool(&[engine.addr], "", ""));
    wait_healthy(&gw, 1);
    let sent = r#"{"messages":[{"role":"user","content":"1.50"}],"top_k":50,"repetition_penalty":1.0,"chat_template_kwargs":{"x":[1,2]},"model":"chat-latest"}"#;
    let expected = sent.replace("\"chat-latest\"", "\"tiny-chat\"");
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(sent)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-mock-body-sha256"],
        sha256_hex(expected.as_bytes()).as_str()
    );
    let last = get_json(&engine.url("/mock/last-request"));
    assert_eq!(last["model"], "tiny-chat");
}

#[test]
fn unknown_fields_pass_through_byte_for_byte() {
    let engine = mock(&["--model", "tiny-chat"]);
    let gw = gateway(&one_pool(&[engine.addr], "", ""));
    wait_healthy(&gw, 1);
    let sent = "{ \"model\" : \"tiny-chat\", \"top_k\": 50, \"min_p\": 0.05000, \"messages\": [{\"role\":\"user\",\"content\":\"caf\\u00e9 \u{1F600}\"}] }";
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(sent)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-mock-body-bytes"],
        sent.len().to_string().as_str()
    );
    assert_eq!(
        r.headers()["x-mock-body-sha256"],
        sha256_hex(sent.as_bytes()).as_str()
    );
}

#[test]
fn models_list_has_configured_aliases_and_discovered_models() {
    let engine = mock(&["--model", "tiny-chat", "--model", "found-on-engine"]);
    let gw = gateway(&one_pool(
        &[engine.addr],
        "",
        "routing: { models_refresh_interval: 200ms }",
    ));
    wait_healthy(&gw, 1);
    wait_until(Duration::from_secs(10), "model discovery", || {
        get_json(&gw.url("/v1/models"))["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == "found-on-engine"))
    });
    let list = get_json(&gw.url("/models"));
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["tiny-chat", "chat-latest", "found-on-engine"]);
    for m in list["data"].as_array().unwrap() {
        assert_eq!(m["object"], "model");
        assert_eq!(m["status"], "running");
        assert!(m["owned_by"].is_string());
    }
    let one = get_json(&gw.url("/v1/models/tiny-chat"));
    assert_eq!(one["id"], "tiny-chat");
    let r = client().get(gw.url("/v1/models/nope")).send().unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    // a discovered model is routable
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("found-on-engine", false))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn other_v1_paths_go_to_the_model_pool_or_the_default_pool() {
    let engine = mock(&["--model", "tiny-chat"]);
    let gw = gateway(&one_pool(
        &[engine.addr],
        "",
        "routing: { default_pool: chat, user_paths: [\"/v1/files\"] }",
    ));
    wait_healthy(&gw, 1);
    // the mock answers unknown paths with 404; what matters is where it went
    let r = client()
        .post(gw.url("/v1/rerank"))
        .body(r#"{"model":"tiny-chat","query":"q"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().unwrap();
    assert!(
        v["error"]["message"].is_string(),
        "engine error normalised: {v}"
    );
    assert_eq!(r_code(&v), "404");
    // /v1/files is not on the built-in user list: routing.user_paths adds it
    let r = client().get(gw.url("/v1/files")).send().unwrap();
    assert!(
        r.headers().contains_key("x-mock-instance"),
        "GET /v1/files went to the default pool"
    );
    // a path on no list is an engine's own: the admin role (here: none
    // without auth, so refused) and the engine never sees it
    let r = client().get(gw.url("/v1/batches")).send().unwrap();
    assert_eq!(r.status(), 403);
    assert!(!r.headers().contains_key("x-mock-instance"));
}

fn r_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

#[test]
fn request_id_is_kept_or_created_and_reaches_the_engine() {
    let engine = mock(&["--model", "tiny-chat"]);
    let gw = gateway(&one_pool(&[engine.addr], "", ""));
    wait_healthy(&gw, 1);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "trace-42")
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42");
    assert_eq!(r.headers()["x-mock-request-id"], "trace-42");
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    assert_eq!(r.headers()["x-mock-request-id"], id.as_str());
    // errors carry it too
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().contains_key("x-request-id"));
}

/// Regression: while waiting on the engine the gateway watches the client
/// socket for a close; a keep-alive client's next request must not lose bytes
/// to that watch (it once lost its first byte and got a 405).
#[test]
fn keep_alive_and_pipelined_requests_are_all_answered_intact() {
    use std::io::{BufRead, BufReader, Read, Write};
    let engine = mock(&["--model", "tiny-chat"]);
    let gw = gateway(&one_pool(&[engine.addr], "", ""));
    wait_healthy(&gw, 1);
    let body = chat_body("tiny-chat", false);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        body
    );
    let read_response = |reader: &mut BufReader<std::net::TcpStream>| -> String {
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut buf = vec![0; length];
        reader.read_exact(&mut buf).unwrap();
        status
    };
    let mut s = raw_connect(gw.addr);
    // a lost byte leaves the gateway waiting for the rest of a request: fail fast
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for i in 0..300 {
        s.write_all(request.as_bytes()).unwrap();
        let status = read_response(&mut reader);
        assert!(status.starts_with("HTTP/1.1 200"), "request {i}: {status}");
    }
    // two requests in one write: both answered, in order
    s.write_all(format!("{request}{request}").as_bytes())
        .unwrap();
    for i in 0..2 {
        let status = read_response(&mut reader);
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "pipelined {i}: {status}"
        );
    }
}

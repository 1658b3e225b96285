//! What an attacker or a careless client tries (issue #13): engine-internal
//! endpoints with a user key, dot segments and other path spellings, slow
//! clients, bodies larger than the budget, too many connections.
//! Every request here is written by hand on a raw socket: HTTP client
//! libraries normalise paths themselves and would hide what is tested.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const USER: &str = "sk-user-0123456789abcdef0123456789abcd";
const ADMIN: &str = "sk-admin-0123456789abcdef0123456789ab";

struct Setup {
    _dir: PathBuf,
    engine: Proc,
    gw: Proc,
}

fn start(server_extra: &str, key_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap().keep();
    let user: Value = serde_json::from_str(&format!(
        r#"{{"key": "{USER}", "user": "user1"{key_extra}}}"#
    ))
    .unwrap();
    let keys = json!({"keys": [user, {"key": ADMIN, "user": "ops", "role": "admin"}]});
    std::fs::write(dir.join("keys.json"), keys.to_string()).unwrap();
    let engine = mock(&["--model", "tiny-chat"]);
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  threads: 2\n{server_extra}\npools:\n  - name: chat\n    models: [\"tiny-chat\"]\n    backends: [\"{}\"]\n    health_check: {{ path: /health, interval: 200ms }}\nrouting:\n  default_pool: chat\nfilters:\n  - auth:\n      api_keys_file: {}\n  - limits: {{}}\n",
        engine.addr,
        dir.join("keys.json").display()
    );
    let gw = gateway(&yaml);
    wait_healthy(&gw, 1);
    Setup {
        _dir: dir,
        engine,
        gw,
    }
}

/// One request on a fresh connection, exactly as written; the status and
/// body of the answer (status 0 when the connection closed without one).
fn raw(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let mut s = raw_connect(addr);
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

fn parse_response(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn error_code(body: &str) -> String {
    // chunked bodies: the JSON object is between the first `{` and the last `}`
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map(|e| e + 1).unwrap_or(body.len());
    let v: Value = serde_json::from_str(body.get(start..end).unwrap_or("")).unwrap_or_default();
    v["error"]["code"].as_str().unwrap_or("").to_string()
}

fn engine_requests(engine: &Proc) -> u64 {
    get_json(&engine.url("/mock/stats"))["requests"]
        .as_u64()
        .unwrap_or(0)
}

fn engine_adapters(engine: &Proc) -> Vec<String> {
    get_json(&engine.url("/v1/models"))["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_user_key_cannot_reach_the_engines_own_endpoints() {
    let s = start("", "");
    let load = r#"{"lora_name":"evil","lora_path":"/etc"}"#;
    let before = engine_requests(&s.engine);
    for path in [
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/some_future_internal_route",
        "/reset_prefix_cache",
        "/sleep",
        "/wake_up",
        "/collective_rpc",
        "/start_profile",
        "/stop_profile",
        "/scale_elastic_ep",
        "/server_info",
    ] {
        let (status, body) = raw(s.gw.addr, "POST", path, Some(USER), load);
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(error_code(&body), "permission_denied", "{path}: {body}");
    }
    assert_eq!(
        engine_requests(&s.engine),
        before,
        "the engine saw a request"
    );
    assert!(!engine_adapters(&s.engine).contains(&"evil".to_string()));
    // the allowlist still lets users reach what they may
    let chat = chat_body("tiny-chat", false);
    let (status, body) = raw(s.gw.addr, "POST", "/v1/chat/completions", Some(USER), &chat);
    assert_eq!(status, 200, "{body}");
    // an admin reaches the engine's endpoint through the gateway
    let (status, body) = raw(
        s.gw.addr,
        "POST",
        "/v1/load_lora_adapter",
        Some(ADMIN),
        r#"{"lora_name":"ops-adapter","lora_path":"/tmp/a"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(engine_adapters(&s.engine).contains(&"ops-adapter".to_string()));
}

#[test]
fn paths_are_normalised_before_routing_and_authorisation() {
    let s = start("", "");
    let chat = chat_body("tiny-chat", false);
    // dot segments and merged slashes: the engine sees the normal form
    for path in [
        "/v1/../v1/chat/completions",
        "/v1/%2e%2e/v1/chat/completions",
        "/v1/./chat/completions",
        "//v1//chat///completions",
        "/v1/%63hat/completions",
    ] {
        let (status, body) = raw(s.gw.addr, "POST", path, Some(USER), &chat);
        assert_eq!(status, 200, "{path}: {body}");
        let seen = get_json(&s.engine.url("/mock/last-request"));
        assert_eq!(seen["path"], "/v1/chat/completions", "{path}: {seen}");
    }
    // a user cannot climb into the admin surface or the gateway's own pages
    let before = engine_requests(&s.engine);
    for path in [
        "/v1/../admin/engines",
        "/v1/%2e%2e/admin/engines",
        "/v1/%2E%2E/admin/engines",
        "/v1/.%2e/admin/engines",
    ] {
        let (status, body) = raw(s.gw.addr, "GET", path, Some(USER), "");
        assert_eq!(status, 403, "{path}: {body}");
    }
    let (status, body) = raw(s.gw.addr, "GET", "/v1/../metrics", Some(USER), "");
    assert_eq!(status, 200, "served by the gateway itself: {body}");
    assert!(body.contains("infergate_"), "{body}");
    // ambiguous spellings are refused outright
    for path in [
        "/v1/..%2fmetrics",
        "/v1/%2e%2e%2fmetrics",
        "/v1/%2f%2fchat/completions",
        "/v1/..;/metrics",
        "/v1/chat/completions;jsessionid=1",
        "/v1/%5c..%5cmetrics",
        "/../metrics",
        "/v1/%zz",
    ] {
        let (status, body) = raw(s.gw.addr, "POST", path, Some(USER), &chat);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(error_code(&body), "invalid_path", "{path}: {body}");
    }
    assert_eq!(
        engine_requests(&s.engine),
        before,
        "none of these reached the engine"
    );
    // an encoded `/` inside a name is a name, not a separator
    let (status, body) = raw(s.gw.addr, "GET", "/v1/models/tiny%2Dchat", Some(USER), "");
    assert_eq!(status, 200, "{body}");
}

#[allow(dead_code)]
fn wait_closed(s: &mut std::net::TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (started.elapsed(), out)
}

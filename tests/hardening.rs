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

/// Read until the server closes (or `limit` passes): how long it took and
/// what came.
fn wait_closed(s: &mut std::net::TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (started.elapsed(), out)
}

/// Send `data` one byte every `gap` from a thread until the peer closes or
/// `data` runs out; returns how many bytes went out.
fn trickle(
    mut s: std::net::TcpStream,
    data: Vec<u8>,
    gap: Duration,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut sent = 0;
        for b in data {
            if s.write_all(&[b]).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(gap);
        }
        sent
    })
}

#[test]
fn a_request_head_sent_byte_by_byte_is_cut_at_the_header_timeout() {
    let s = start("  client_header_timeout: 2s\n", "");
    let mut conn = raw_connect(s.gw.addr);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {USER}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(100)
    );
    // 200 ms a byte: the whole head would take ~40 s
    let sender = trickle(
        conn.try_clone().unwrap(),
        head.into_bytes(),
        Duration::from_millis(200),
    );
    let (took, answer) = wait_closed(&mut conn, Duration::from_secs(20));
    let (status, body) = parse_response(&answer);
    assert_eq!(status, 408, "{body}");
    assert_eq!(error_code(&body), "request_timeout", "{body}");
    assert!(
        took < Duration::from_secs(15),
        "the connection was cut after {took:?}, not at the 2 s timeout"
    );
    let sent = sender.join().unwrap();
    assert!(sent < 200, "the client got to send {sent} bytes");
}

#[test]
fn a_body_sent_byte_by_byte_is_cut_at_the_body_timeout() {
    let s = start("  client_body_timeout: 2s\n", "");
    let mut conn = raw_connect(s.gw.addr);
    let body = chat_body("tiny-chat", false);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {USER}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    let before = engine_requests(&s.engine);
    let sender = trickle(
        conn.try_clone().unwrap(),
        body.into_bytes(),
        Duration::from_millis(200),
    );
    let (took, answer) = wait_closed(&mut conn, Duration::from_secs(20));
    let (status, text) = parse_response(&answer);
    assert_eq!(status, 408, "{text}");
    assert_eq!(error_code(&text), "request_timeout", "{text}");
    assert!(took < Duration::from_secs(15), "cut after {took:?}");
    let _ = sender.join();
    assert_eq!(engine_requests(&s.engine), before, "the engine saw nothing");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() {
    let s = start("  keepalive_timeout: 1s\n", "");
    let mut conn = raw_connect(s.gw.addr);
    conn.write_all(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    // the answer, then the close: the read ends without a second response
    let (took, answer) = wait_closed(&mut conn, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
}

/// Send the head and the first `first` bytes of a `len`-byte body, then
/// keep the connection open without sending more.
fn start_upload(addr: SocketAddr, key: &str, len: usize, first: usize) -> std::net::TcpStream {
    let mut conn = raw_connect(addr);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(&vec![b' '; first]).unwrap();
    conn
}

fn metric(gw_metrics: &str, name: &str) -> f64 {
    gw_metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn bodies_are_bounded_per_key_and_in_total() {
    let s = start(
        "  max_request_body_bytes: 2097152\n  max_buffered_body_bytes: 4194304\n",
        r#", "limits": {"concurrent": 2}"#,
    );
    // the key with `concurrent: 2` may send two bodies at once, not three
    let _a = start_upload(s.gw.addr, USER, 100_000, 10);
    let _b = start_upload(s.gw.addr, USER, 100_000, 10);
    wait_until(Duration::from_secs(10), "two bodies held", || {
        metric(&metrics_text(&s.gw), "infergate_buffered_body_bytes") >= 200_000.0
    });
    let body = chat_body("tiny-chat", false);
    let (status, text) = raw(s.gw.addr, "POST", "/v1/chat/completions", Some(USER), &body);
    assert_eq!(status, 429, "{text}");
    assert_eq!(error_code(&text), "rate_limit_exceeded", "{text}");
    // in total: with two declared 1.9 MB bodies the 4 MiB budget is full
    let _c = start_upload(s.gw.addr, ADMIN, 1_900_000, 10);
    let _d = start_upload(s.gw.addr, ADMIN, 1_900_000, 10);
    wait_until(Duration::from_secs(10), "four bodies held", || {
        metric(&metrics_text(&s.gw), "infergate_buffered_body_bytes") >= 4_000_000.0
    });
    let mut e = start_upload(s.gw.addr, ADMIN, 2_000_000, 0);
    let (_, answer) = wait_closed(&mut e, Duration::from_secs(10));
    let (status, text) = parse_response(&answer);
    assert_eq!(status, 503, "{text}");
    assert_eq!(error_code(&text), "server_overloaded", "{text}");
    assert!(
        String::from_utf8_lossy(&answer)
            .to_ascii_lowercase()
            .contains("retry-after: 1"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let held = metric(&metrics_text(&s.gw), "infergate_buffered_body_bytes");
    assert!(held <= 4_194_304.0, "{held} bytes held");
    // a body that fits still goes through (the admin key has no concurrency cap)
    let (status, text) = raw(
        s.gw.addr,
        "POST",
        "/v1/chat/completions",
        Some(ADMIN),
        &body,
    );
    assert_eq!(status, 200, "{text}");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn many_large_uploads_stay_within_the_body_budget() {
    // 48 uploads of 8 MiB at once (384 MiB offered) with a 32 MiB budget
    let s = start(
        "  max_request_body_bytes: 8388608\n  max_buffered_body_bytes: 33554432\n",
        "",
    );
    let base = rss_kib(s.gw.child.id());
    let len = 8 << 20;
    let mut peak = base;
    let handles: Vec<_> = (0..48)
        .map(|_| {
            let addr = s.gw.addr;
            std::thread::spawn(move || {
                let mut conn = start_upload(addr, ADMIN, len, 0);
                let chunk = vec![b' '; 1 << 16];
                let mut sent = 0;
                while sent < len {
                    if conn
                        .write_all(&chunk[..(len - sent).min(chunk.len())])
                        .is_err()
                    {
                        break;
                    }
                    sent += chunk.len();
                }
                let (_, answer) = wait_closed(&mut conn, Duration::from_secs(30));
                parse_response(&answer).0
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for h in handles {
        while !h.is_finished() {
            peak = peak.max(rss_kib(s.gw.child.id()));
            std::thread::sleep(Duration::from_millis(5));
        }
        statuses.push(h.join().unwrap());
    }
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert!(refused > 0, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| [400, 503].contains(s)),
        "the bodies are not JSON (400) or were refused (503): {statuses:?}"
    );
    let grew_mib = peak.saturating_sub(base) / 1024;
    eprintln!("RSS {base} KiB at start, peak {peak} KiB (+{grew_mib} MiB), {refused}/48 refused");
    assert!(
        grew_mib < 32 + 48,
        "RSS grew by {grew_mib} MiB with a 32 MiB body budget"
    );
}

#[test]
fn connections_above_max_connections_are_closed_at_accept() {
    let dir = tempfile::tempdir().unwrap().keep();
    let _ = &dir;
    let engine = mock(&["--model", "tiny-chat"]);
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  threads: 2\n  max_connections: 8\n  metrics_listen: \"127.0.0.1:0\"\npools:\n  - name: chat\n    models: [\"tiny-chat\"]\n    backends: [\"{}\"]\n    health_check: {{ path: /health, interval: 200ms }}\n",
        engine.addr
    );
    let gw = gateway(&yaml);
    let metrics_addr = gw.next_addr("infergate metrics listening on http://");
    let metrics = || {
        client()
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default()
    };
    wait_healthy(&gw, 1);
    // the connections that came before (the ready probe, the health polls)
    // count until the gateway has seen them close: let them go first, or
    // one of the eight below is the one refused
    wait_until(
        Duration::from_secs(10),
        "earlier connections uncounted",
        || metric(&metrics(), "infergate_connections_open") == 0.0,
    );
    let mut held: Vec<_> = (0..8).map(|_| raw_connect(gw.addr)).collect();
    wait_until(Duration::from_secs(10), "8 connections counted", || {
        metric(&metrics(), "infergate_connections_open") == 8.0
    });
    // the ninth is closed without an answer
    let mut ninth = raw_connect(gw.addr);
    let _ = ninth.write_all(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n");
    let (_, answer) = wait_closed(&mut ninth, Duration::from_secs(10));
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert!(metric(&metrics(), "infergate_connections_rejected_total") >= 1.0);
    // the side listener still serves: it is not counted
    let health = client()
        .get(format!("http://{metrics_addr}/health/live"))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(health, 200);
    // one closes: a new connection is served again
    drop(held.pop());
    wait_until(Duration::from_secs(10), "the closed one uncounted", || {
        metric(&metrics(), "infergate_connections_open") == 7.0
    });
    let (status, _) = raw(gw.addr, "GET", "/health/live", None, "");
    assert_eq!(status, 200);
}

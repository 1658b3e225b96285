//! Identity end to end: API keys (plain and hashed, every header form),
//! disabled keys, model access, `?token=`, admin gating, reloads (endpoint,
//! corrupt file, watched directory), JWT login and revocation, CORS, and the
//! admin listener — against the real gateway and mock engine.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const PLAIN: &str = "sk-plain-0123456789abcdef0123456789";
const HASHED: &str = "sk-hashed-abcdef0123456789abcdef0123";
const ADMIN: &str = "sk-admin-0123456789abcdef0123456789ab";
const DISABLED: &str = "sk-disabled-0123456789abcdef01234567";
const LIMITED: &str = "sk-limited-0123456789abcdef0123456789";
const JWT_SECRET: &str = "test-secret-that-is-long-enough-for-hs256-0123456789";

fn keys_json() -> Value {
    json!({"keys": [
        {"key": PLAIN, "user": "user1", "quota": 100000, "enabled": true},
        {"key": format!("sha256:{}", sha256_hex(HASHED.as_bytes())), "user": "hashed-user"},
        {"key": format!("sha256:{}", sha256_hex(ADMIN.as_bytes())), "user": "ops", "role": "admin"},
        {"key": DISABLED, "user": "gone", "enabled": false},
        {"key": LIMITED, "user": "limited", "models": ["other-model"]},
    ]})
}

struct Setup {
    dir: PathBuf,
    engine: Proc,
    gw: Proc,
}

fn start(extra_filters: &str, top: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("keys.json"), keys_json().to_string()).unwrap();
    std::fs::write(dir.join("jwt.secret"), JWT_SECRET).unwrap();
    add_user(
        &dir.join("users.yaml"),
        "test@example.com",
        "correct horse battery",
        "user",
    );
    let engine = mock(&["--model", "tiny-chat", "--model", "other-model"]);
    let filters = format!(
        "filters:\n  - request_id: {{}}\n  - cors: {{}}\n  - auth:\n      api_keys_file: {keys}\n      users_file: {users}\n      jwt: {{ algorithm: HS256, secret_file: {secret} }}\n{extra_filters}",
        keys = dir.join("keys.json").display(),
        users = dir.join("users.yaml").display(),
        secret = dir.join("jwt.secret").display(),
    );
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  threads: 2\n{top}\npools:\n  - name: chat\n    models: [\"tiny-chat\", \"other-model\"]\n    backends: [\"{}\"]\n    health_check: {{ path: /health, interval: 200ms }}\n{filters}",
        engine.addr
    );
    let gw = gateway(&yaml);
    wait_healthy(&gw, 1);
    Setup { dir, engine, gw }
}

fn add_user(file: &Path, email: &str, password: &str, role: &str) {
    let mut child = Command::new(GATEWAY_BIN)
        .args(["users", "add", "--file"])
        .arg(file)
        .args(["--email", email, "--role", role])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "users add failed: {out:?}");
}

fn chat(gw: &Proc, headers: &[(&str, &str)], model: &str) -> reqwest::blocking::Response {
    chat_at(gw, "/v1/chat/completions", headers, model)
}

fn chat_at(
    gw: &Proc,
    path: &str,
    headers: &[(&str, &str)],
    model: &str,
) -> reqwest::blocking::Response {
    let mut req = client()
        .post(gw.url(path))
        .header("content-type", "application/json")
        .body(chat_body(model, false));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().unwrap()
}

fn error_of(resp: reqwest::blocking::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().unwrap_or(Value::Null);
    (status, body["error"].clone())
}

#[test]
fn api_key_matrix() {
    let s = start("", "");
    let bearer = |k: &str| format!("Bearer {k}");
    for (what, headers) in [
        ("bearer plain", vec![("authorization", bearer(PLAIN))]),
        (
            "bare plain (seed form)",
            vec![("authorization", PLAIN.to_string())],
        ),
        ("x-api-key", vec![("x-api-key", PLAIN.to_string())]),
        ("bearer hashed", vec![("authorization", bearer(HASHED))]),
        (
            "lowercase scheme",
            vec![("authorization", format!("bearer {HASHED}"))],
        ),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let resp = chat(&s.gw, &h, "tiny-chat");
        assert_eq!(resp.status(), 200, "{what}");
    }
    for (what, headers) in [
        ("missing", vec![]),
        ("wrong", vec![("authorization", bearer("sk-nope"))]),
        ("disabled", vec![("authorization", bearer(DISABLED))]),
        (
            "hash given as key",
            vec![(
                "authorization",
                bearer(&format!("sha256:{}", sha256_hex(HASHED.as_bytes()))),
            )],
        ),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, error) = error_of(chat(&s.gw, &h, "tiny-chat"));
        assert_eq!(status, 401, "{what}");
        assert_eq!(error["code"], "invalid_api_key", "{what}");
        assert_eq!(error["type"], "invalid_request_error", "{what}");
    }
    // status pages stay open
    assert_eq!(
        client().get(s.gw.url("/health")).send().unwrap().status(),
        200
    );
    // /v1/models needs a key too
    assert_eq!(
        client()
            .get(s.gw.url("/v1/models"))
            .send()
            .unwrap()
            .status(),
        401
    );
    let log = s.gw.stderr();
    assert_eq!(
        log.matches("plain text").count(),
        1,
        "one warning about plain-text keys at load:\n{log}"
    );
    for secret in [PLAIN, HASHED, ADMIN, DISABLED, "sk-nope"] {
        assert!(!log.contains(secret), "a key reached the log");
    }
}

#[test]
fn model_access_looks_like_an_unknown_model() {
    let s = start("", "");
    let auth = format!("Bearer {LIMITED}");
    assert_eq!(
        chat(&s.gw, &[("authorization", &auth)], "other-model").status(),
        200
    );
    let (status, denied) = error_of(chat(&s.gw, &[("authorization", &auth)], "tiny-chat"));
    let (_, unknown) = error_of(chat(&s.gw, &[("authorization", &auth)], "no-such-model"));
    assert_eq!(status, 404);
    assert_eq!(denied["code"], "model_not_found");
    assert_eq!(
        denied["message"]
            .as_str()
            .unwrap()
            .replace("tiny-chat", "X"),
        unknown["message"]
            .as_str()
            .unwrap()
            .replace("no-such-model", "X")
    );
    let list: Value = client()
        .get(s.gw.url("/v1/models"))
        .header("authorization", &auth)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["other-model"]);
    let detail = client()
        .get(s.gw.url("/v1/models/tiny-chat"))
        .header("authorization", &auth)
        .send()
        .unwrap();
    assert_eq!(detail.status(), 404);
}

#[test]
fn query_token_never_reaches_the_engine_or_the_log() {
    let s = start("", "");
    let resp = chat_at(
        &s.gw,
        &format!("/v1/chat/completions?foo=1&token={PLAIN}&bar=2"),
        &[],
        "tiny-chat",
    );
    assert_eq!(resp.status(), 200);
    let last = get_json(&s.engine.url("/mock/last-request"));
    assert_eq!(last["query"], "foo=1&bar=2");
    assert!(!last.to_string().contains(PLAIN));
    // only the token: no query at all upstream
    let resp = chat_at(
        &s.gw,
        &format!("/v1/chat/completions?token={PLAIN}"),
        &[],
        "tiny-chat",
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(
        get_json(&s.engine.url("/mock/last-request"))["query"],
        Value::Null
    );
    // a wrong ?token= is a 401 that does not echo it
    let resp = chat_at(
        &s.gw,
        "/v1/chat/completions?token=sk-wrong-secret",
        &[],
        "tiny-chat",
    );
    let (status, error) = error_of(resp);
    assert_eq!(status, 401);
    assert!(!error.to_string().contains("sk-wrong-secret"));
    // the log writer batches: wait for the 401's access line to be written
    wait_until(Duration::from_secs(10), "the 401's access line", || {
        s.gw.stderr()
            .lines()
            .any(|l| l.contains("/v1/chat/completions") && l.contains("\"status\":401"))
    });
    let log = s.gw.stderr();
    assert!(
        log.contains("/v1/chat/completions"),
        "access lines are logged"
    );
    assert!(
        !log.contains(PLAIN) && !log.contains("sk-wrong-secret"),
        "a token reached the log:\n{log}"
    );
}

#[test]
fn admin_endpoints_need_the_admin_role() {
    let s = start("", "");
    let usage = |auth: Option<&str>| {
        let mut req = client().get(s.gw.url("/admin/usage"));
        if let Some(a) = auth {
            req = req.header("authorization", format!("Bearer {a}"));
        }
        req.send().unwrap()
    };
    assert_eq!(usage(None).status(), 401);
    let (status, error) = error_of(usage(Some(PLAIN)));
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("permission_denied"))
    );
    assert_eq!(usage(Some(ADMIN)).status(), 200);
    // unknown admin paths do not tell anonymous callers what exists
    assert_eq!(
        client()
            .get(s.gw.url("/admin/nope"))
            .send()
            .unwrap()
            .status(),
        401
    );
}

fn reload(gw: &Proc) -> (u16, Value) {
    let resp = client()
        .post(gw.url("/admin/reload-keys"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

#[test]
fn reload_endpoint_applies_good_files_and_refuses_corrupt_ones() {
    let s = start("", "");
    let keys = s.dir.join("keys.json");
    let new_key = "sk-brand-new-0123456789abcdef01234567";
    // corrupt: nothing changes, the answer and the log say why
    std::fs::write(&keys, "{\"keys\": [ {\"key\": ").unwrap();
    let (status, body) = reload(&s.gw);
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "reload_failed");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("keys.json"));
    assert_eq!(
        chat(
            &s.gw,
            &[("authorization", &format!("Bearer {PLAIN}"))],
            "tiny-chat"
        )
        .status(),
        200,
        "old keys still work after a failed reload"
    );
    // valid: the new key works, a removed one stops working
    let mut doc = keys_json();
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["user"] != "user1");
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": format!("sha256:{}", sha256_hex(new_key.as_bytes())), "user": "new"}));
    std::fs::write(&keys, doc.to_string()).unwrap();
    let (status, body) = reload(&s.gw);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["keys"], 5);
    assert_eq!(
        chat(
            &s.gw,
            &[("authorization", &format!("Bearer {new_key}"))],
            "tiny-chat"
        )
        .status(),
        200
    );
    assert_eq!(
        chat(
            &s.gw,
            &[("authorization", &format!("Bearer {PLAIN}"))],
            "tiny-chat"
        )
        .status(),
        401
    );
    wait_until(
        Duration::from_secs(5),
        "the failed reload to be logged",
        || {
            s.gw.stderr()
                .contains("keys reload (POST /admin/reload-keys) failed, nothing changed")
        },
    );
}

#[test]
fn watched_directory_picks_up_atomic_renames() {
    let s = start("", "");
    let new_key = "sk-watched-0123456789abcdef0123456789";
    let mut doc = keys_json();
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": format!("sha256:{}", sha256_hex(new_key.as_bytes())), "user": "w"}));
    let tmp = s.dir.join(".keys.json.tmp");
    std::fs::write(&tmp, doc.to_string()).unwrap();
    std::fs::rename(&tmp, s.dir.join("keys.json")).unwrap();
    let auth = format!("Bearer {new_key}");
    wait_until(
        Duration::from_secs(10),
        "the watcher to load the new key",
        || chat(&s.gw, &[("authorization", &auth)], "tiny-chat").status() == 200,
    );
    // a corrupt write is refused and logged; the last good keys stay
    std::fs::write(s.dir.join("keys.json"), "not json").unwrap();
    wait_until(
        Duration::from_secs(10),
        "the failed reload to be logged",
        || s.gw.stderr().contains("nothing changed"),
    );
    assert_eq!(
        chat(&s.gw, &[("authorization", &auth)], "tiny-chat").status(),
        200
    );
}

fn login(gw: &Proc, email: &str, password: &str) -> (u16, Value) {
    let resp = client()
        .post(gw.url("/user/user_login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

#[test]
fn jwt_login_use_and_revoke() {
    let s = start("", "");
    let (status, body) = login(&s.gw, "test@example.com", "correct horse battery");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["data"]["version"], 1);
    assert!(body["data"]["user_id"].as_u64().is_some());
    let token = body["data"]["token"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {token}");
    assert_eq!(
        chat(&s.gw, &[("authorization", &bearer)], "tiny-chat").status(),
        200
    );
    // browsers' EventSource path: ?token=
    let resp = chat_at(
        &s.gw,
        &format!("/v1/chat/completions?token={token}"),
        &[],
        "tiny-chat",
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(
        get_json(&s.engine.url("/mock/last-request"))["query"],
        Value::Null
    );

    // wrong password and unknown email: the same answer
    let (s1, wrong_pw) = login(&s.gw, "test@example.com", "wrong password!!");
    let (s2, no_user) = login(&s.gw, "nobody@example.com", "correct horse battery");
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(wrong_pw, no_user);

    // a new password bumps the version: the old token is revoked
    add_user(
        &s.dir.join("users.yaml"),
        "test@example.com",
        "another long password",
        "user",
    );
    let (status, _) = reload(&s.gw);
    assert_eq!(status, 200);
    let (status, error) = error_of(chat(&s.gw, &[("authorization", &bearer)], "tiny-chat"));
    assert_eq!(status, 401);
    assert_eq!(error["code"], "invalid_api_key");
    let (status, body) = login(&s.gw, "test@example.com", "another long password");
    assert_eq!((status, body["data"]["version"].as_u64()), (200, Some(2)));

    // the access log is written in order: once a marker request's line is
    // in, every line before it is too
    let marker = "flush-marker-jwt-login";
    let _ = client()
        .get(s.gw.url("/health/live"))
        .header("x-request-id", marker)
        .send();
    wait_until(
        Duration::from_secs(10),
        "the access log to catch up",
        || s.gw.stderr().contains(marker),
    );
    let log = s.gw.stderr();
    assert!(!log.contains(&token), "a JWT reached the log");
    assert!(
        !log.contains("correct horse battery"),
        "a password reached the log"
    );
}

#[test]
fn login_attempts_are_limited_per_address() {
    let s = start("", "");
    let mut statuses = Vec::new();
    for _ in 0..15 {
        statuses.push(login(&s.gw, "test@example.com", "wrong password!!").0);
    }
    assert!(statuses.contains(&401));
    assert_eq!(
        statuses.last(),
        Some(&429),
        "the 11th attempt within a minute is refused: {statuses:?}"
    );
}

#[test]
fn cors_preflight_and_exposed_headers() {
    let s = start("", "");
    let resp = client()
        .request(reqwest::Method::OPTIONS, s.gw.url("/v1/chat/completions"))
        .header("origin", "http://localhost:5173")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, x-stainless-lang, openai-project",
        )
        .send()
        .unwrap();
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "http://localhost:5173");
    assert!(h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("x-stainless-lang"));
    assert!(h["vary"].to_str().unwrap().contains("Origin"));
    let resp = chat(
        &s.gw,
        &[
            ("origin", "http://127.0.0.1:5173"),
            ("authorization", &format!("Bearer {PLAIN}")),
        ],
        "tiny-chat",
    );
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "http://127.0.0.1:5173");
    assert!(h["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("x-ratelimit-remaining-requests"));
    // errors carry CORS headers too, so the browser app can read them
    let resp = chat(&s.gw, &[("origin", "http://127.0.0.1:5173")], "tiny-chat");
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://127.0.0.1:5173"
    );
    // an origin not on the list gets no CORS grant
    let resp = client()
        .request(reqwest::Method::OPTIONS, s.gw.url("/v1/chat/completions"))
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[test]
fn admin_listener_serves_admin_only_there() {
    let s = start("", "  admin_listen: \"127.0.0.1:0\"\n");
    let admin = s.gw.next_addr("infergate admin listening on http://");
    let auth = format!("Bearer {ADMIN}");
    let main_usage = client()
        .get(s.gw.url("/admin/usage"))
        .header("authorization", &auth)
        .send()
        .unwrap();
    assert_eq!(main_usage.status(), 404);
    let admin_usage = client()
        .get(format!("http://{admin}/admin/usage"))
        .header("authorization", &auth)
        .send()
        .unwrap();
    assert_eq!(admin_usage.status(), 200);
    // the admin listener does not proxy inference
    let resp = client()
        .post(format!("http://{admin}/v1/chat/completions"))
        .header("authorization", format!("Bearer {PLAIN}"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        client()
            .get(format!("http://{admin}/health"))
            .send()
            .unwrap()
            .status(),
        200
    );
}

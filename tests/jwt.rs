//! JWT verification end to end, against a gateway pinned to RS256 with an
//! issuer and audience: the attacks a token verifier must refuse, each next to
//! a control token that passes, so a refusal is never for the wrong reason.
//! (The same matrix for HS256 runs as unit tests in `filters/src/auth`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/filters/src/auth/testdata");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn start() -> (PathBuf, Proc, Proc) {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut child = Command::new(GATEWAY_BIN)
        .args(["users", "add", "--file"])
        .arg(dir.join("users.yaml"))
        .args(["--email", "jwt@example.com", "--user-id", "7"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "a long enough password").unwrap();
    assert!(child.wait().unwrap().success());
    let engine = mock(&["--model", "tiny-chat"]);
    let yaml = format!(
        // work stealing off here (the default is on), so both schedulers serve a suite
        "server:\n  listen: \"127.0.0.1:0\"\n  threads: 2\n  work_stealing: false\npools:\n  - name: chat\n    models: [tiny-chat]\n    backends: [\"{}\"]\n    health_check: {{ path: /health, interval: 200ms }}\nfilters:\n  - auth:\n      users_file: {}\n      jwt:\n        algorithm: RS256\n        public_key_file: {TESTDATA}/rsa_public.pem\n        private_key_file: {TESTDATA}/rsa_private.pem\n        issuer: infergate-test\n        audience: chat-app\n        leeway_seconds: 5\n",
        engine.addr,
        dir.join("users.yaml").display()
    );
    let gw = gateway(&yaml);
    wait_healthy(&gw, 1);
    (dir, engine, gw)
}

fn claims() -> Value {
    json!({
        "sub": "7", "user_id": 7, "email": "jwt@example.com", "version": 1,
        "iat": now(), "exp": now() + 600, "iss": "infergate-test", "aud": "chat-app",
    })
}

fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(format!("{TESTDATA}/rsa_private.pem")).unwrap();
    encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

fn status_with(gw: &Proc, token: &str) -> (u16, Value) {
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {token}"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

#[test]
fn rs256_deployment_refuses_forged_and_malformed_tokens() {
    let (_dir, _engine, gw) = start();
    // controls: a token we sign properly passes, and so does one from login
    assert_eq!(status_with(&gw, &rs256(&claims())).0, 200);
    let login: Value = client()
        .post(gw.url("/user/user_login"))
        .json(&json!({"email": "jwt@example.com", "password": "a long enough password"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let issued = login["data"]["token"].as_str().unwrap();
    assert_eq!(status_with(&gw, issued).0, 200);

    let public_pem = std::fs::read(format!("{TESTDATA}/rsa_public.pem")).unwrap();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims();
        edit(&mut c);
        c
    };
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let mut cases: Vec<(&str, String)> = vec![
        (
            "expired beyond leeway",
            rs256(&with(&|c| c["exp"] = json!(now() - 60))),
        ),
        (
            "exp missing",
            rs256(&with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
        ),
        (
            "exp as a string",
            rs256(&with(&|c| c["exp"] = json!((now() + 600).to_string()))),
        ),
        (
            "wrong issuer",
            rs256(&with(&|c| c["iss"] = json!("someone-else"))),
        ),
        (
            "wrong audience",
            rs256(&with(&|c| c["aud"] = json!("other-app"))),
        ),
        (
            "revoked version",
            rs256(&with(&|c| c["version"] = json!(0))),
        ),
        (
            "unknown user",
            rs256(&with(&|c| {
                c["user_id"] = json!(99);
                c["sub"] = json!("99");
            })),
        ),
        (
            "RS256 public key used as an HS256 secret",
            encode(
                &Header::new(Algorithm::HS256),
                &claims(),
                &EncodingKey::from_secret(&public_pem),
            )
            .unwrap(),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&claims())
            ),
        ),
        ("garbage", "a.b.c".to_string()),
    ];
    // a valid token with one flipped signature byte
    let good = rs256(&claims());
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    cases.push(("tampered signature", String::from_utf8(tampered).unwrap()));

    for (what, token) in &cases {
        let (status, body) = status_with(&gw, token);
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{what}");
    }
    wait_until(std::time::Duration::from_secs(5), "access lines", || {
        gw.stderr().matches("\"status\":401").count() >= cases.len()
    });
    let log = gw.stderr();
    for (what, token) in &cases {
        assert!(
            token.len() < 12 || !log.contains(token.as_str()),
            "{what}: token in the log"
        );
    }
}

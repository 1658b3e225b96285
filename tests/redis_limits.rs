//! `limits.store: redis` on real processes: three gateway replicas, one real
//! `redis-server` (Debian's, started here on a free port), the mock engine.
//! Each shared limit is checked against `store: memory` in the same test, to
//! show the difference; then the faults: a replica killed with slots held,
//! Redis stopped and restarted (with persistence), `fail_open` and
//! `fail_closed`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "sk-redis-0123456789abcdef0123456789";
const ADMIN: &str = "sk-redis-admin-0123456789abcdef0123";

/// A `redis-server` on a free port, stopped on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap().keep();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis {
            child: None,
            port,
            dir,
        };
        redis.restart();
        redis
    }

    /// Start (again) on the same port and directory; append-only file on,
    /// so a restart keeps what was written.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: `make setup-test` (or apt-get install redis-server)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        wait_until(Duration::from_secs(10), "redis-server to accept", || {
            TcpStream::connect(addr).is_ok()
        });
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Redis' clock, in ms.
    fn now_ms(&self) -> u64 {
        let t: Vec<u64> = self
            .cli(&["TIME"])
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        t[0] * 1000 + t[1] / 1000
    }

    /// The latest expiry among the concurrency leases held now.
    fn max_lease_expiry_ms(&self) -> u64 {
        let keys = self.cli(&["--scan", "--pattern", "*:conc"]);
        keys.lines()
            .flat_map(|k| {
                self.cli(&["ZRANGE", k.trim(), "0", "-1", "WITHSCORES"])
                    .lines()
                    .skip(1)
                    .step_by(2)
                    .filter_map(|v| v.trim().parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .fold(0.0, f64::max) as u64
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keys file: the user key with `key_extra`, and an admin key.
fn keys_file(dir: &Path, key_extra: Value) -> PathBuf {
    let mut key = json!({"key": KEY, "user": "alice"});
    for (k, v) in key_extra.as_object().unwrap() {
        key[k] = v.clone();
    }
    let path = dir.join("keys.json");
    let keys = json!({"keys": [key, {"key": ADMIN, "user": "ops", "role": "admin"}]});
    std::fs::write(&path, keys.to_string()).unwrap();
    path
}

/// `n` gateways over one engine, each with its own data_dir; `store` is
/// the YAML flow map of `limits.store`.
fn replicas(n: usize, engine: &Proc, keys: &Path, store: &str) -> Vec<Proc> {
    (0..n)
        .map(|_| {
            let data = tempfile::tempdir().unwrap().keep();
            let yaml = format!(
                "server:\n  listen: \"127.0.0.1:0\"\n  threads: 1\npools:\n  - name: chat\n    models: [\"tiny-chat\"]\n    backends: [\"{}\"]\n    health_check: {{ path: /health, interval: 200ms }}\nfilters:\n  - auth:\n      api_keys_file: {}\n  - limits:\n      data_dir: {}\n      store: {store}\n",
                engine.addr,
                keys.display(),
                data.display(),
            );
            let gw = gateway(&yaml);
            wait_healthy(&gw, 1);
            gw
        })
        .collect()
}

fn chat() -> String {
    json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4})
        .to_string()
}

/// One chat request with the user key: (status, body).
fn send(gw: &Proc) -> (u16, Value) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(chat())
        .timeout(Duration::from_secs(10))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn redis_store(redis: &Redis, on_error: &str) -> String {
    format!(
        "{{ kind: redis, url: \"{}\", on_error: {on_error}, lease: 2s, timeout: 200ms }}",
        redis.url()
    )
}

fn admin_usage(gw: &Proc) -> Value {
    client()
        .get(gw.url("/admin/usage"))
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn quota_used(gw: &Proc) -> u64 {
    admin_usage(gw)["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user"] == "alice" || r["id"].as_str().is_some_and(|id| id.starts_with("key:")))
        .and_then(|r| r["quota_used"].as_u64())
        .unwrap_or(0)
}

fn store_status(gw: &Proc) -> String {
    get_json(&gw.url("/health"))["limits_store"]["status"]
        .as_str()
        .unwrap_or("none")
        .to_string()
}

/// Requests round robin over `gws` as fast as they come back: how many
/// got 200, and how long the burst took.
fn burst(gws: &[Proc], n: usize) -> (usize, Duration) {
    let start = Instant::now();
    let ok = (0..n)
        .filter(|i| send(&gws[i % gws.len()]).0 == 200)
        .count();
    (ok, start.elapsed())
}

#[test]
fn three_replicas_share_one_requests_per_second_limit() {
    let redis = Redis::start();
    let engine = mock(&["--model", "tiny-chat"]);
    let dir = tempfile::tempdir().unwrap().keep();
    let keys = keys_file(
        &dir,
        json!({"limits": {"requests_per_second": 1, "burst": 6}}),
    );
    // memory: each replica has its own bucket of 6
    let local = replicas(3, &engine, &keys, "{ kind: memory }");
    let (ok_memory, _) = burst(&local, 18);
    drop(local);
    assert!(ok_memory >= 15, "memory: {ok_memory} of 18 admitted");
    // redis: one bucket of 6 (plus 1/s refill) for all three
    let shared = replicas(3, &engine, &keys, &redis_store(&redis, "fail_closed"));
    let (ok_redis, took) = burst(&shared, 18);
    let refill = took.as_secs() as usize + 1;
    assert!(
        (6..=6 + refill).contains(&ok_redis),
        "redis: {ok_redis} of 18 admitted in {took:?} (bucket 6, refill 1/s)"
    );
    // a refusal is OpenAI-shaped, names the limit and says when to retry
    let r = client()
        .post(shared[0].url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(chat())
        .send()
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests per second"),
        "{body}"
    );
}

/// Open a streaming request through `gw` that the engine answers slowly,
/// and wait until its first bytes arrived (it holds its slot).
fn hold(gw: &Proc) -> TcpStream {
    let body = json!({"model": "tiny-chat", "stream": true, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hold"}]})
    .to_string();
    let mut s = raw_connect(gw.addr);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nx-mock-token-interval-us: 30000000\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    write_all(&mut s, head.as_bytes());
    write_all(&mut s, body.as_bytes());
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200", "the held request was not admitted");
    s
}

#[test]
fn concurrency_slots_are_shared_and_a_killed_replica_frees_its_slots_within_the_lease() {
    let redis = Redis::start();
    let engine = mock(&["--model", "tiny-chat", "--tokens", "4"]);
    let dir = tempfile::tempdir().unwrap().keep();
    let keys = keys_file(&dir, json!({"limits": {"concurrent": 2}}));
    // memory: two running on replicas 0 and 1 do not count on replica 2
    let local = replicas(3, &engine, &keys, "{ kind: memory }");
    let held = [hold(&local[0]), hold(&local[1])];
    assert_eq!(
        send(&local[2]).0,
        200,
        "memory: replica 2 counts only its own"
    );
    drop(held);
    drop(local);

    let mut shared = replicas(3, &engine, &keys, &redis_store(&redis, "fail_closed"));
    let held = [hold(&shared[0]), hold(&shared[1])];
    let (status, body) = send(&shared[2]);
    assert_eq!(
        status, 429,
        "redis: the third request across replicas: {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrent"),
        "{body}"
    );
    // kill -9 the replica holding one slot: nobody gives it back, the
    // lease (2s) runs out; until then the slot stays taken
    shared[0].kill();
    let killed = Instant::now();
    let mut refused_after_kill = 0;
    wait_until(
        Duration::from_secs(8),
        "the dead replica's slot to expire",
        || {
            let ok = send(&shared[2]).0 == 200;
            refused_after_kill += usize::from(!ok);
            ok
        },
    );
    let freed = killed.elapsed();
    assert!(
        refused_after_kill >= 1,
        "the slot was free at once: not a lease"
    );
    assert!(
        freed < Duration::from_secs(5),
        "slot back after {freed:?} (lease 2s)"
    );
    // the live replica's stream still holds its slot once its first lease
    // would have run out: renewal keeps it
    let first_expiry = redis.max_lease_expiry_ms();
    wait_until(
        Duration::from_secs(5),
        "the first lease's expiry to pass",
        || redis.now_ms() > first_expiry,
    );
    let a = hold(&shared[2]);
    let (status, _) = send(&shared[2]);
    assert_eq!(
        status, 429,
        "replica 1's renewed lease and this one fill the 2 slots"
    );
    drop((a, held));
}

#[test]
fn a_quota_is_spent_once_across_replicas_and_kept_when_redis_restarts() {
    let mut redis = Redis::start();
    let engine = mock(&["--model", "tiny-chat", "--tokens", "4"]);
    let dir = tempfile::tempdir().unwrap().keep();
    // one request costs ~6 tokens (prompt estimate by the engine + 4)
    let keys = keys_file(&dir, json!({"quota": 60}));
    let local = replicas(3, &engine, &keys, "{ kind: memory }");
    let ok_memory = (0..60).take_while(|i| send(&local[i % 3]).0 == 200).count();
    let refused_everywhere = local.iter().all(|gw| send(gw).0 == 429);
    drop(local);

    let shared = replicas(3, &engine, &keys, &redis_store(&redis, "fail_closed"));
    let mut ok_redis = 0;
    let mut last = Value::Null;
    // until every replica in a row refuses (a refusal while another
    // request's reservation is still counted can be followed by a success
    // once it settles for less)
    let mut refused_in_a_row = 0;
    for i in 0..60 {
        let (status, body) = send(&shared[i % 3]);
        if status == 200 {
            ok_redis += 1;
            refused_in_a_row = 0;
        } else {
            last = body;
            refused_in_a_row += 1;
            if refused_in_a_row == 3 {
                break;
            }
        }
    }
    assert_eq!(refused_in_a_row, 3, "the quota was never spent everywhere");
    assert_eq!(last["error"]["code"], "insufficient_quota", "{last}");
    assert!(
        ok_memory >= 2 * ok_redis,
        "memory admitted {ok_memory} (each replica its own quota), redis {ok_redis}"
    );
    assert!(refused_everywhere);
    // settled in the background: wait for the shared total
    let mut used = 0;
    wait_until(Duration::from_secs(5), "usage settled in Redis", || {
        used = quota_used(&shared[1]);
        used >= 60
    });
    let per_request = used / ok_redis as u64;
    assert!(
        used < 60 + per_request,
        "spent {used} of 60: more than one request over"
    );
    // Redis restarts (append-only file on): the total is still there
    redis.stop();
    redis.restart();
    wait_until(
        Duration::from_secs(5),
        "the total after a Redis restart",
        || quota_used(&shared[2]) == used,
    );
    // a replica that saw the connection break refuses (fail_closed) until
    // its probe reaches Redis again, then sees the spent quota
    wait_until(Duration::from_secs(5), "replica 0 back on Redis", || {
        send(&shared[0]).0 == 429
    });
}

#[test]
fn redis_down_fail_open_admits_locally_and_hands_the_usage_over_when_back() {
    let mut redis = Redis::start();
    let engine = mock(&["--model", "tiny-chat", "--tokens", "4"]);
    let dir = tempfile::tempdir().unwrap().keep();
    let keys = keys_file(&dir, json!({"quota": 100000, "limits": {"concurrent": 3}}));
    let gws = replicas(2, &engine, &keys, &redis_store(&redis, "fail_open"));
    let mut before = 0;
    for gw in &gws {
        let (status, body) = send(gw);
        assert_eq!(status, 200);
        before += body["usage"]["total_tokens"].as_u64().unwrap();
    }
    wait_until(Duration::from_secs(5), "two requests settled", || {
        quota_used(&gws[0]) == before
    });
    assert_eq!(store_status(&gws[0]), "up");
    redis.stop();
    // every request answers (no hang), on the replica's own counters
    for i in 0..6 {
        let (status, body) = send(&gws[i % 2]);
        assert_eq!(status, 200, "fail_open while Redis is down: {body}");
    }
    for gw in &gws {
        assert_eq!(store_status(gw), "down");
        let health = get_json(&gw.url("/health"));
        assert_eq!(health["limits_store"]["on_error"], "fail_open");
        let ready = client().get(gw.url("/health/ready")).send().unwrap();
        assert_eq!(
            ready.status(),
            200,
            "readiness does not fail under fail_open"
        );
        let metrics = metrics_text(gw);
        assert!(
            metrics.contains("infergate_limits_store_up{kind=\"redis\"} 0"),
            "{metrics}"
        );
        assert!(!metrics.contains("infergate_limits_store_fallbacks_total{kind=\"redis\"} 0\n"));
    }
    wait_until(Duration::from_secs(5), "the store-down log line", || {
        gws[0].stderr().contains("Redis is unreachable")
    });
    // back (its append-only file kept the two requests): the six counted
    // meanwhile are added, nothing lost
    redis.restart();
    let mut after = 0;
    wait_until(
        Duration::from_secs(8),
        "usage from the outage in Redis",
        || {
            after = quota_used(&gws[1]);
            store_status(&gws[0]) == "up" && store_status(&gws[1]) == "up" && after >= before * 4
        },
    );
    assert_eq!(
        after,
        before * 4,
        "2 requests before, 6 during: all counted once"
    );
    assert_eq!(send(&gws[0]).0, 200);
}

#[test]
fn redis_down_fail_closed_refuses_with_503_and_recovers() {
    let mut redis = Redis::start();
    let engine = mock(&["--model", "tiny-chat"]);
    let dir = tempfile::tempdir().unwrap().keep();
    let keys = keys_file(&dir, json!({}));
    let gws = replicas(1, &engine, &keys, &redis_store(&redis, "fail_closed"));
    assert_eq!(send(&gws[0]).0, 200);
    redis.stop();
    let r = client()
        .post(gws[0].url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(chat())
        .timeout(Duration::from_secs(10))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "limits_unavailable", "{body}");
    assert_eq!(send(&gws[0]).0, 503, "still down: refused at once");
    redis.restart();
    wait_until(
        Duration::from_secs(8),
        "admission after Redis is back",
        || send(&gws[0]).0 == 200,
    );
}

#[test]
fn the_store_config_keeps_secrets_out_of_the_yaml() {
    let dir = tempfile::tempdir().unwrap().keep();
    let check = |store: &str| {
        let yaml = format!(
            "server:\n  listen: \"127.0.0.1:0\"\npools:\n  - name: chat\n    models: [\"m\"]\n    backends: [\"127.0.0.1:9\"]\nfilters:\n  - limits:\n      store: {store}\n"
        );
        let path = dir.join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(GATEWAY_BIN)
            .args(["--check", "--config"])
            .arg(&path)
            .env("INFERGATE_TEST_REDIS_PW", "pw-from-env")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) =
        check("{ kind: redis, url: \"redis://:hunter2@127.0.0.1:6379/0\", on_error: fail_open }");
    assert!(!ok);
    assert!(err.contains("password_file or password_env"), "{err}");
    assert!(!err.contains("hunter2"), "the password is echoed: {err}");
    let (ok, err) = check("{ kind: redis, url: \"redis://127.0.0.1:6379/0\" }");
    assert!(!ok);
    assert!(
        err.contains("on_error") && err.contains("fail_open"),
        "{err}"
    );
    let (ok, err) = check("{ kind: redis, url: \"http://127.0.0.1\", on_error: fail_closed }");
    assert!(!ok && err.contains("redis://"), "{err}");
    let (ok, err) = check(
        "{ kind: redis, url: \"redis://127.0.0.1:6379/0\", password_env: INFERGATE_TEST_REDIS_PW, on_error: fail_closed }",
    );
    assert!(ok, "{err}");
}

#[test]
fn a_dead_replicas_quota_reservation_comes_back_and_settles_survive_a_script_flush() {
    let redis = Redis::start();
    let engine = mock(&["--model", "tiny-chat", "--tokens", "4"]);
    let dir = tempfile::tempdir().unwrap().keep();
    // a held stream reserves its estimate (prompt + max_tokens 4, ~10
    // tokens) against a quota of 12: while it runs, nothing else fits
    let keys = keys_file(&dir, json!({"quota": 12}));
    let mut shared = replicas(2, &engine, &keys, &redis_store(&redis, "fail_closed"));
    let held = hold(&shared[0]);
    let (status, body) = send(&shared[1]);
    assert_eq!(status, 429, "the reservation on replica 0 counts: {body}");
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    // kill -9 the replica holding the reservation: it comes back when the
    // lease (2s) runs out, not never
    shared[0].kill();
    drop(held);
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(8),
        "the dead replica's reservation to expire",
        || send(&shared[1]).0 == 200,
    );
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "reservation back after {:?} (lease 2s)",
        killed.elapsed()
    );
    let mut used = 0;
    wait_until(Duration::from_secs(5), "the usage settled", || {
        used = quota_used(&shared[1]);
        used > 0
    });

    // Redis forgets its scripts (SCRIPT FLUSH, or a restart without the
    // cache): settlements, sent as one pipeline, load the script again
    // instead of counting Redis as down, and nothing is lost
    let keys = keys_file(&dir, json!({"quota": 100000}));
    let gw = replicas(1, &engine, &keys, &redis_store(&redis, "fail_closed"));
    assert_eq!(send(&gw[0]).0, 200);
    let mut before = 0;
    wait_until(Duration::from_secs(5), "the first usage settled", || {
        before = quota_used(&gw[0]);
        before > used
    });
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(send(&gw[0]).0, 200);
    let per_request = before - used;
    wait_until(
        Duration::from_secs(5),
        "usage settled after the flush",
        || quota_used(&gw[0]) == before + per_request,
    );
    assert_eq!(
        store_status(&gw[0]),
        "up",
        "a missing script is not an outage"
    );
    let errors = metrics_text(&gw[0]);
    assert!(
        errors
            .lines()
            .any(|l| l == "infergate_limits_store_errors_total{kind=\"redis\"} 0"),
        "{}",
        errors
            .lines()
            .filter(|l| l.contains("limits_store"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn login_attempts_are_counted_across_replicas() {
    let redis = Redis::start();
    let engine = mock(&["--model", "tiny-chat"]);
    let dir = tempfile::tempdir().unwrap().keep();
    let keys = keys_file(&dir, json!({}));
    std::fs::write(dir.join("jwt.secret"), "0123456789abcdef0123456789abcdef").unwrap();
    let users = dir.join("users.yaml");
    let mut add = Command::new(GATEWAY_BIN)
        .args(["users", "add", "--file"])
        .arg(&users)
        .args(["--email", "bob@example.com", "--role", "user"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(add.stdin.take().unwrap(), "correct horse battery").unwrap();
    }
    assert!(add.wait().unwrap().success());
    let start = |store: &str| -> Vec<Proc> {
        (0..2)
            .map(|_| {
                let yaml = format!(
                    "server:\n  listen: \"127.0.0.1:0\"\n  threads: 1\npools:\n  - name: chat\n    models: [\"tiny-chat\"]\n    backends: [\"{}\"]\nfilters:\n  - auth:\n      api_keys_file: {}\n      users_file: {}\n      jwt: {{ algorithm: HS256, secret_file: {} }}\n      login_attempts_per_minute: 4\n  - limits:\n      store: {store}\n",
                    engine.addr,
                    keys.display(),
                    users.display(),
                    dir.join("jwt.secret").display(),
                );
                gateway(&yaml)
            })
            .collect()
    };
    let login = |gw: &Proc| -> u16 {
        client()
            .post(gw.url("/user/user_login"))
            .json(&json!({"email": "bob@example.com", "password": "wrong password!!"}))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // memory: each replica allows its own 4 a minute: 8 wrong guesses pass
    let local = start("{ kind: memory }");
    let statuses: Vec<u16> = (0..8).map(|i| login(&local[i % 2])).collect();
    assert!(statuses.iter().all(|&s| s == 401), "{statuses:?}");
    drop(local);
    // redis: 4 a minute from this address across both replicas
    let shared = start(&redis_store(&redis, "fail_closed"));
    let statuses: Vec<u16> = (0..6).map(|i| login(&shared[i % 2])).collect();
    assert_eq!(statuses, [401, 401, 401, 401, 429, 429], "{statuses:?}");
    let resp = client()
        .post(shared[0].url("/user/user_login"))
        .json(&json!({"email": "bob@example.com", "password": "correct horse battery"}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 429, "the right password waits too");
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("login attempts"),
        "{body}"
    );
}

/// A CA and a server certificate for 127.0.0.1 (openssl), in `dir`.
fn tls_files(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=infergate test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

#[test]
fn rediss_verifies_the_server_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap().keep();
    tls_files(&dir);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(dir.join("server.crt"))
        .arg("--tls-key-file")
        .arg(dir.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.crt"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    wait_until(
        Duration::from_secs(10),
        "redis-server (TLS) to accept",
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let engine = mock(&["--model", "tiny-chat", "--tokens", "4"]);
    let keys = keys_file(&dir, json!({"quota": 100000}));
    let url = format!("rediss://127.0.0.1:{port}/0");
    // trusted through tls.ca_file: shared counting works over TLS
    let store = format!(
        "{{ kind: redis, url: \"{url}\", on_error: fail_closed, timeout: 500ms, tls: {{ ca_file: {} }} }}",
        dir.join("ca.crt").display()
    );
    let gw = replicas(1, &engine, &keys, &store);
    let (status, body) = send(&gw[0]);
    assert_eq!(status, 200, "{body}");
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    wait_until(
        Duration::from_secs(5),
        "the usage in Redis over TLS",
        || quota_used(&gw[0]) == used,
    );
    assert_eq!(store_status(&gw[0]), "up");
    drop(gw);
    // the same server without the CA: not trusted, so Redis is unreachable
    // and fail_closed refuses
    let store = format!("{{ kind: redis, url: \"{url}\", on_error: fail_closed, timeout: 500ms }}");
    let gw = replicas(1, &engine, &keys, &store);
    let (status, body) = send(&gw[0]);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "limits_unavailable", "{body}");
    let _ = redis.kill();
    let _ = redis.wait();
}

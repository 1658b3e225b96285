//! Observability end to end: a real Prometheus server scrapes the gateway and
//! its query API returns the requests the test made; `promtool check
//! metrics` accepts the whole exposition; status pages keep the seeds'
//! shapes; `/health/ready` follows a backend that dies and comes back; JSON
//! access lines parse, carry no secret, and rotate at the size limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let path = format!("{dir}/{name}");
        if Path::new(&path).exists() {
            return path;
        }
    }
    panic!("`{name}` is missing: install Debian's `prometheus` package (make setup-test does)");
}

fn post_chat(gw: &Proc, model: &str, stream: bool) -> u16 {
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(model, stream))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let _ = resp.bytes();
    status
}

#[test]
fn promtool_accepts_the_exposition() {
    let (_engine, gw) = engine_behind_gateway(&["--tokens", "3"], "");
    for stream in [false, true, true] {
        assert_eq!(post_chat(&gw, "tiny-chat", stream), 200);
    }
    assert_eq!(post_chat(&gw, "chat-latest", false), 200);
    assert_eq!(post_chat(&gw, "made-up-model", false), 404);
    let resp = client().get(gw.url("/metrics")).send().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = resp.text().unwrap();
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // the seeds' names and ours, with closed label sets
    for needle in [
        r#"http_requests_total{endpoint="chat_completions",method="POST",status="200"} 4"#,
        r#"http_errors_total{type="model_not_found"} 1"#,
        r#"token_usage_total{type="completion",user="anonymous"} 12"#,
        r#"vllm_model_loaded{model_id="tiny-chat"} 1"#,
        r#"infergate_model_requests_total{model="tiny-chat",status="200"} 3"#,
        r#"infergate_model_requests_total{model="chat-latest",status="200"} 1"#,
        r#"infergate_time_to_first_token_seconds_count{model="tiny-chat"} 2"#,
        "infergate_backend_healthy{",
        "http_request_duration_seconds_bucket{",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(
        !text.contains("made-up-model"),
        "a client string became a label"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus {
    proc: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

fn start_prometheus(target: SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap().keep();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: infergate\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let proc = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Prometheus { proc, addr }
}

fn query(prom: &Prometheus, promql: &str) -> Option<f64> {
    let resp = client()
        .get(format!("http://{}/api/v1/query", prom.addr))
        .query(&[("query", promql)])
        .send()
        .ok()?;
    let v: Value = resp.json().ok()?;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

#[test]
fn a_real_prometheus_scrapes_the_request_counts() {
    let engine = mock(&["--model", "tiny-chat", "--tokens", "2"]);
    // metrics on their own listener, as ops teams run it
    let gw = gateway(&one_pool(
        &[engine.addr],
        "",
        "  metrics_listen: \"127.0.0.1:0\"\n",
    ));
    let metrics = gw.next_addr("infergate metrics listening on http://");
    wait_healthy(&gw, 1);
    // /metrics lives only on its listener, which serves nothing else
    assert_eq!(
        client().get(gw.url("/metrics")).send().unwrap().status(),
        404
    );
    let proxied = client()
        .post(format!("http://{metrics}/v1/chat/completions"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(proxied.status(), 404);
    let prom = start_prometheus(metrics);
    for _ in 0..7 {
        assert_eq!(post_chat(&gw, "tiny-chat", false), 200);
    }
    assert_eq!(post_chat(&gw, "nope", false), 404);
    let promql = r#"sum(http_requests_total{endpoint="chat_completions",status="200"})"#;
    let mut seen = None;
    wait_until(
        Duration::from_secs(60),
        "Prometheus to scrape 7 requests",
        || {
            seen = query(&prom, promql);
            seen == Some(7.0)
        },
    );
    println!("Prometheus: {promql} = {seen:?}");
    assert_eq!(
        query(
            &prom,
            r#"sum(infergate_model_tokens_total{model="tiny-chat",type="completion"})"#
        ),
        Some(14.0)
    );
    assert_eq!(
        query(&prom, r#"sum(http_errors_total{type="model_not_found"})"#),
        Some(1.0)
    );
    assert_eq!(query(&prom, r#"up{job="infergate"}"#), Some(1.0));
}

#[test]
fn status_pages_keep_the_seed_shapes() {
    let (_engine, gw) = engine_behind_gateway(&[], "");
    assert_eq!(post_chat(&gw, "chat-latest", false), 200);
    let health = get_json(&gw.url("/health"));
    for key in [
        "status",
        "router",
        "healthy_services",
        "timestamp",
        "gpu",
        "loaded_models",
        "model_status",
    ] {
        assert!(health.get(key).is_some(), "/health lacks {key}: {health}");
    }
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["healthy_services"], "1/1");
    assert!(health["timestamp"].as_str().unwrap().ends_with('Z'));
    // no GPU here: null, and the reason
    assert_eq!(health["gpu"], Value::Null);
    assert!(health["gpu_unavailable"].is_string());
    // the GPU monitor service runs: the reason becomes what NVML said
    wait_until(
        Duration::from_secs(10),
        "the GPU monitor's first read",
        || {
            let reason = get_json(&gw.url("/health"))["gpu_unavailable"].clone();
            reason.as_str().is_some_and(|r| r.contains("NVML"))
        },
    );
    assert_eq!(health["loaded_models"], 2);
    let tiny = &health["model_status"]["tiny-chat"];
    for key in [
        "model_id",
        "status",
        "port",
        "gpu_memory_mb",
        "request_count",
    ] {
        assert!(tiny.get(key).is_some(), "model_status lacks {key}: {tiny}");
    }
    assert_eq!(tiny["status"], "running");

    let detail = get_json(&gw.url("/v1/models/chat-latest"));
    assert_eq!(detail["id"], "chat-latest");
    assert_eq!(detail["object"], "model");
    assert_eq!(detail["status"], "running");
    let d = &detail["detail"];
    for key in [
        "model_id",
        "status",
        "port",
        "gpu_memory_mb",
        "request_count",
        "total_requests",
        "created_at",
        "last_used_at",
        "idle_seconds",
    ] {
        assert!(d.get(key).is_some(), "detail lacks {key}: {detail}");
    }
    assert_eq!(d["total_requests"], 1);
    assert_eq!(d["request_count"], 0);
    assert!(d["last_used_at"].is_string());
    let services = get_json(&gw.url("/services"));
    let s = &services["services"][0];
    for key in [
        "name",
        "url",
        "healthy",
        "models",
        "request_count",
        "error_count",
        "response_time",
        "inflight",
    ] {
        assert!(s.get(key).is_some(), "/services entry lacks {key}: {s}");
    }
    let stats = get_json(&gw.url("/stats"));
    assert_eq!(stats["total_services"], 1);
    assert_eq!(stats["healthy_services"], 1);
    assert_eq!(stats["services"][0]["request_count"], 1);
}

#[test]
fn readiness_follows_a_backend_that_dies_and_returns() {
    let mut engine = mock(&["--model", "tiny-chat"]);
    let port = engine.addr;
    let gw = gateway(&one_pool(&[engine.addr], "", ""));
    wait_healthy(&gw, 1);
    let ready = || {
        client()
            .get(gw.url("/health/ready"))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready(), 200);
    engine.kill();
    wait_until(Duration::from_secs(10), "ready to turn 503", || {
        ready() == 503
    });
    let body = get_json(&gw.url("/health/ready"));
    assert_eq!(body["ready"], false);
    // the same engine comes back on the same address
    let back = Command::new(mock_bin())
        .args(["--listen", &port.to_string(), "--model", "tiny-chat"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _back = Proc {
        child: back,
        addr: port,
        stderr_path: None,
        lines: None,
    };
    wait_until(Duration::from_secs(10), "ready to return", || {
        ready() == 200
    });
}

#[test]
fn access_log_lines_are_json_secret_free_and_rotate() {
    let dir = tempfile::tempdir().unwrap().keep();
    let key = "sk-access-log-0123456789abcdef01234567";
    std::fs::write(
        dir.join("keys.json"),
        json!({"keys": [{"key": key, "user": "logger"}]}).to_string(),
    )
    .unwrap();
    let log = dir.join("logs/access.log");
    let engine = mock(&["--model", "tiny-chat"]);
    let top = format!(
        "access_log:\n  output: file\n  path: {}\n  max_size_bytes: 4000\n  max_files: 2\n",
        log.display()
    );
    let filters = format!(
        "filters:\n  - request_id: {{}}\n  - auth: {{ api_keys_file: {} }}\n",
        dir.join("keys.json").display()
    );
    let gw = gateway(&format!("{}{filters}", one_pool(&[engine.addr], "", &top)));
    wait_healthy(&gw, 1);
    for i in 0..30 {
        let (path, auth) = if i % 2 == 0 {
            (format!("/v1/chat/completions?token={key}"), None)
        } else {
            (
                "/v1/chat/completions".to_string(),
                Some(format!("Bearer {key}")),
            )
        };
        let mut req = client()
            .post(gw.url(&path))
            .body(chat_body("tiny-chat", i % 3 == 0));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        assert_eq!(req.send().unwrap().status(), 200);
    }
    // a refused one too
    let refused = client()
        .post(gw.url("/v1/chat/completions?token=sk-wrong-wrong-wrong"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 401);
    let rotated = log.with_file_name("access.log.1");
    wait_until(Duration::from_secs(10), "rotation at 4000 bytes", || {
        rotated.exists()
    });
    wait_until(Duration::from_secs(5), "the refused request's line", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("invalid_api_key")
    });
    let mut lines = 0;
    let older = log.with_file_name("access.log.2");
    let files: Vec<&std::path::PathBuf> = [&log, &rotated, &older]
        .into_iter()
        .filter(|f| f.exists())
        .collect();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.len() <= 4000,
            "{} is {} bytes",
            file.display(),
            text.len()
        );
        for line in text.lines() {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                !line.contains(key) && !line.contains("sk-wrong"),
                "secret in {line}"
            );
            assert!(!line.contains("token="), "query string in {line}");
            if v.get("event").is_none() {
                for field in [
                    "time",
                    "request_id",
                    "client",
                    "status",
                    "duration_ms",
                    "path",
                ] {
                    assert!(v.get(field).is_some(), "{field} missing in {line}");
                }
                lines += 1;
            }
        }
    }
    // each ~450-byte line: a 4000-byte file holds 8; right after a rotation
    // the live file may hold one
    assert!(lines >= 8, "{lines} access lines kept");
    assert!(
        !log.with_file_name("access.log.3").exists(),
        "max_files: 2 keeps two"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], 401);
    assert_eq!(last["error"], "invalid_api_key");
}

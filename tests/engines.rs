//! Managed engines end to end, with the mock engine as a `command` engine:
//! on-demand start shared by concurrent first requests, preload, idle unload,
//! LRU eviction under a fake GPU, 503 when nothing can be evicted, crash →
//! restart, crash loop → failed, unload draining an open stream, and no
//! engine process left after the gateway exits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::Value;
use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

/// One managed model entry running the mock engine.
fn mock_model(name: &str, extra: &str, mock_args: &str) -> String {
    let mock = mock_bin();
    format!(
        "    - name: {name}\n      kind: command\n      command: [\"{mock}\", \"--listen\", \"127.0.0.1:{{port}}\", \"--model\", \"{{name}}\"{mock_args}]\n      startup_timeout: 20s\n{extra}"
    )
}

struct Setup {
    gw: Proc,
    admin: SocketAddr,
}

/// A port range of its own for each gateway: tests run in parallel, and two
/// gateways handing out the same ports would make engines fail to bind.
fn port_range() -> (u32, u32) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let slot = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let lo = 20000 + (std::process::id() % 50) * 400 + slot * 20;
    (lo, lo + 19)
}

fn start(models: &[String], engines_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap().keep();
    let (lo, hi) = port_range();
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  admin_listen: \"127.0.0.1:0\"\n  threads: 2\n  grace_period: 1s\nengines:\n  port_range: \"{lo}-{hi}\"\n  log_dir: {logs}\n  stop_grace: 3s\n{engines_extra}  models:\n{models}",
        logs = dir.join("engine-logs").display(),
        models = models.join(""),
    );
    let gw = gateway(&yaml);
    let admin = gw.next_addr("infergate admin listening on http://");
    Setup { gw, admin }
}

fn chat(s: &Setup, model: &str) -> (u16, Value) {
    let resp = client()
        .post(s.gw.url("/v1/chat/completions"))
        .body(chat_body(model, false))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn engines(s: &Setup) -> Vec<Value> {
    get_json(&format!("http://{}/admin/engines", s.admin))["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn engine(s: &Setup, name: &str) -> Value {
    engines(s)
        .into_iter()
        .find(|e| e["model_id"] == name)
        .unwrap_or(Value::Null)
}

fn alive(pid: u64) -> bool {
    // a zombie is not alive for our purposes
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn admin_post(s: &Setup, path: &str) -> (u16, Value) {
    let resp = client()
        .post(format!("http://{}{path}", s.admin))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

#[test]
fn first_requests_share_one_on_demand_start() {
    let s = start(&[mock_model("tiny-chat", "", "")], "");
    assert_eq!(engine(&s, "tiny-chat")["status"], "stopped");
    let listed = get_json(&s.gw.url("/v1/models"));
    assert_eq!(listed["data"][0]["status"], "stopped");
    let url = s.gw.url("/v1/chat/completions");
    let threads: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                client()
                    .post(url)
                    .body(chat_body("tiny-chat", false))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    let e = engine(&s, "tiny-chat");
    assert_eq!(e["status"], "running");
    assert_eq!(e["restarts"], 0);
    assert!(alive(e["pid"].as_u64().unwrap()));
    wait_until(Duration::from_secs(5), "the start to be logged", || {
        s.gw.stderr().contains("engine `tiny-chat` ready")
    });
    assert_eq!(
        s.gw.stderr().matches("starting engine `tiny-chat`").count(),
        1,
        "one start for five concurrent first requests"
    );
    assert_eq!(
        get_json(&s.gw.url("/v1/models"))["data"][0]["status"],
        "running"
    );
}

#[test]
fn preload_and_idle_unload() {
    let s = start(
        &[mock_model(
            "tiny-chat",
            "      preload: true\n      idle_ttl: 2s\n",
            "",
        )],
        "",
    );
    wait_until(
        Duration::from_secs(20),
        "the preloaded engine to run",
        || engine(&s, "tiny-chat")["status"] == "running",
    );
    let pid = engine(&s, "tiny-chat")["pid"].as_u64().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the idle engine to be unloaded",
        || engine(&s, "tiny-chat")["status"] == "stopped",
    );
    assert!(!alive(pid), "the unloaded engine's process is gone");
    // and it comes back on demand
    assert_eq!(chat(&s, "tiny-chat").0, 200);
}

#[test]
fn lru_eviction_under_a_fake_gpu_and_503_when_nothing_can_go() {
    let gpu = "  gpu: { source: fake, fake_gpus: [{ id: 0, memory_mb: 24000 }] }\n";
    let mem = "      gpus: [0]\n      gpu_memory_mb: 16000\n";
    let s = start(
        &[
            mock_model("model-a", mem, ""),
            mock_model("model-b", mem, ", \"--token-interval-ms\", \"100\""),
        ],
        gpu,
    );
    assert_eq!(chat(&s, "model-a").0, 200);
    let a_pid = engine(&s, "model-a")["pid"].as_u64().unwrap();
    // b does not fit beside a: the idle a is unloaded first
    assert_eq!(chat(&s, "model-b").0, 200);
    assert_eq!(engine(&s, "model-a")["status"], "stopped");
    assert!(!alive(a_pid));
    assert_eq!(engine(&s, "model-b")["status"], "running");
    // now keep b busy and ask for a: nothing can be evicted
    let gw_url = s.gw.url("/v1/chat/completions");
    let busy = std::thread::spawn(move || {
        client()
            .post(gw_url)
            .body(
                serde_json::json!({"model": "model-b", "stream": true, "max_tokens": 30,
                    "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            )
            .send()
            .unwrap()
            .text()
            .unwrap()
    });
    wait_until(Duration::from_secs(5), "b to be busy", || {
        engine(&s, "model-b")["in_flight"] == 1
    });
    let (status, body) = chat(&s, "model-a");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_gpu_memory");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("GPU 0") && message.contains("16000 MB") && message.contains("8000 MB"),
        "says which GPU, what is needed and what is free: {message}"
    );
    let text = busy.join().unwrap();
    assert!(text.contains("[DONE]"));
}

/// Issue #13: a model declared larger than its GPU is refused at once, and
/// the idle model already running is not unloaded for it.
#[test]
fn a_model_larger_than_the_gpu_unloads_nothing() {
    let gpu = "  gpu: { source: fake, fake_gpus: [{ id: 0, memory_mb: 24000 }] }\n";
    let s = start(
        &[
            mock_model(
                "model-a",
                "      gpus: [0]\n      gpu_memory_mb: 16000\n",
                "",
            ),
            mock_model("huge", "      gpus: [0]\n      gpu_memory_mb: 30000\n", ""),
        ],
        gpu,
    );
    assert_eq!(chat(&s, "model-a").0, 200);
    let a_pid = engine(&s, "model-a")["pid"].as_u64().unwrap();
    let (status, body) = chat(&s, "huge");
    assert_eq!(status, 503, "{body}");
    // its own code (no Retry-After, x-should-retry: false): no retry can help
    assert_eq!(body["error"]["code"], "model_too_large_for_gpu");
    // the answer came without touching model-a: same process, still serving
    let a = engine(&s, "model-a");
    assert_eq!(a["status"], "running", "model-a was not unloaded: {a}");
    assert_eq!(a["pid"].as_u64(), Some(a_pid));
    assert!(alive(a_pid));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("needs 30000 MB") && message.contains("GPU 0 has 24000 MB in total"),
        "says which number is too big: {message}"
    );
    assert_eq!(chat(&s, "model-a").0, 200);
    assert_eq!(engine(&s, "model-a")["pid"].as_u64(), Some(a_pid));
    assert_eq!(engine(&s, "huge")["status"], "stopped");
    let log = s.gw.stderr();
    assert!(!log.contains("unloading idle"), "{log}");
    assert!(!log.contains("starting engine `huge`"), "{log}");
}

/// When unloading every idle engine would still not make room (the rest is
/// busy), nothing is unloaded and the answer says how much could be freed.
#[test]
fn no_eviction_when_evicting_every_idle_engine_would_not_be_enough() {
    let gpu = "  gpu: { source: fake, fake_gpus: [{ id: 0, memory_mb: 24000 }] }\n";
    let s = start(
        &[
            mock_model(
                "busy",
                "      gpus: [0]\n      gpu_memory_mb: 16000\n",
                ", \"--token-interval-ms\", \"100\"",
            ),
            mock_model("small", "      gpus: [0]\n      gpu_memory_mb: 4000\n", ""),
            mock_model(
                "model-b",
                "      gpus: [0]\n      gpu_memory_mb: 16000\n",
                "",
            ),
        ],
        gpu,
    );
    assert_eq!(chat(&s, "busy").0, 200);
    assert_eq!(chat(&s, "small").0, 200);
    let small_pid = engine(&s, "small")["pid"].as_u64().unwrap();
    let gw_url = s.gw.url("/v1/chat/completions");
    let stream = std::thread::spawn(move || {
        client()
            .post(gw_url)
            .body(
                serde_json::json!({"model": "busy", "stream": true, "max_tokens": 30,
                    "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
            )
            .send()
            .unwrap()
            .text()
            .unwrap()
    });
    wait_until(Duration::from_secs(5), "`busy` to be busy", || {
        engine(&s, "busy")["in_flight"] == 1
    });
    // 4000 MB free, and unloading `small` would free only 4000 MB more
    let (status, body) = chat(&s, "model-b");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_gpu_memory");
    let small = engine(&s, "small");
    assert_eq!(
        small["status"], "running",
        "`small` was not unloaded: {small}"
    );
    assert_eq!(small["pid"].as_u64(), Some(small_pid));
    assert!(alive(small_pid));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("needs 16000 MB")
            && message.contains("4000 MB free")
            && message.contains("only 4000 MB more"),
        "{message}"
    );
    assert_eq!(chat(&s, "small").0, 200);
    assert!(stream.join().unwrap().contains("[DONE]"));
}

/// `--check` warns (exit status unchanged) about a model larger than its GPU.
#[test]
fn check_warns_about_a_model_larger_than_its_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let config = |huge_mb: u64| {
        format!(
            "engines:\n  gpu: {{ source: fake, fake_gpus: [{{ id: 0, memory_mb: 24000 }}] }}\n  models:\n{}{}",
            mock_model("model-a", "      gpus: [0]\n      gpu_memory_mb: 16000\n", ""),
            mock_model("huge", &format!("      gpus: [0]\n      gpu_memory_mb: {huge_mb}\n"), ""),
        )
    };
    let check = |yaml: String| {
        let path = dir.path().join("check.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(GATEWAY_BIN)
            .arg("--check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = check(config(30000));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("OK"), "{stdout}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("engines.models[1].gpu_memory_mb")
            && warnings[0].contains("`huge` needs 30000 MB")
            && warnings[0].contains("GPU 0 has 24000 MB in total"),
        "{stderr}"
    );
    let (code, _, stderr) = check(config(8000));
    assert_eq!(code, Some(0));
    assert!(!stderr.contains("warning:"), "{stderr}");
}

#[test]
fn crash_restarts_and_a_crash_loop_fails() {
    let crashing = "    - name: broken\n      kind: command\n      command: [\"sh\", \"-c\", \"echo boom on port $0; exit 3\", \"{port}\"]\n      startup_timeout: 5s\n      max_restarts: 2\n".to_string();
    let s = start(&[mock_model("tiny-chat", "", ""), crashing], "");
    assert_eq!(chat(&s, "tiny-chat").0, 200);
    let pid = engine(&s, "tiny-chat")["pid"].as_u64().unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    wait_until(
        Duration::from_secs(20),
        "the crashed engine to restart",
        || {
            let e = engine(&s, "tiny-chat");
            e["status"] == "running" && e["restarts"] == 1 && e["pid"].as_u64() != Some(pid)
        },
    );
    assert_eq!(chat(&s, "tiny-chat").0, 200);

    let (status, body) = chat(&s, "broken");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "engine_failed");
    let e = engine(&s, "broken");
    assert_eq!(e["status"], "failed");
    assert!(
        e["last_error"].as_str().unwrap().contains("boom on port"),
        "the engine's own output is in the error: {e}"
    );
}

#[test]
fn unload_drains_an_open_stream() {
    let s = start(
        &[mock_model(
            "tiny-chat",
            "",
            ", \"--tokens\", \"20\", \"--token-interval-ms\", \"100\"",
        )],
        "",
    );
    assert_eq!(chat(&s, "tiny-chat").0, 200);
    let pid = engine(&s, "tiny-chat")["pid"].as_u64().unwrap();
    let mut stream = raw_connect(s.gw.addr);
    let body = chat_body("tiny-chat", true);
    write_all(
        &mut stream,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    wait_until(Duration::from_secs(5), "the stream to start", || {
        engine(&s, "tiny-chat")["in_flight"] == 1
    });
    let admin = s.admin;
    let unload = std::thread::spawn(move || {
        let resp = client()
            .post(format!("http://{admin}/admin/models/tiny-chat/unload"))
            .send()
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json::<Value>().unwrap_or(Value::Null),
        )
    });
    // draining: new requests are refused while the stream finishes
    wait_until(Duration::from_secs(5), "draining", || {
        engine(&s, "tiny-chat")["status"] == "draining"
    });
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(
        text.contains("data: [DONE]"),
        "the open stream completed:\n{text}"
    );
    let (status, body) = unload.join().unwrap();
    assert_eq!(
        (status, body["success"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    assert_eq!(body["model_id"], "tiny-chat");
    assert_eq!(engine(&s, "tiny-chat")["status"], "stopped");
    assert!(!alive(pid));
    // admin load brings it back, in seed 000's shape
    let (status, body) = admin_post(&s, "/admin/models/tiny-chat/load");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "running");
    assert!(body["port"].as_u64().is_some());
    let (status, _) = admin_post(&s, "/admin/models/nope/load");
    assert_eq!(status, 404);
}

#[test]
fn no_engine_process_outlives_the_gateway() {
    for signal in ["TERM", "KILL"] {
        let mut s = start(&[mock_model("tiny-chat", "      preload: true\n", "")], "");
        wait_until(Duration::from_secs(20), "the engine to run", || {
            engine(&s, "tiny-chat")["status"] == "running"
        });
        let pid = engine(&s, "tiny-chat")["pid"].as_u64().unwrap();
        assert!(alive(pid));
        let gw_pid = s.gw.child.id();
        std::process::Command::new("kill")
            .args([&format!("-{signal}"), &gw_pid.to_string()])
            .status()
            .unwrap();
        let _ = s.gw.child.wait();
        wait_until(
            Duration::from_secs(15),
            &format!("the engine to be gone after SIG{signal} to the gateway"),
            || !alive(pid),
        );
    }
}

#[test]
fn lora_adapters_route_to_their_base_and_load_at_runtime() {
    let s = start(
        &[mock_model(
            "tiny-chat",
            "      enable_lora: true\n      lora: [{ name: sql-adapter, path: /adapters/sql }]\n",
            "",
        )],
        "",
    );
    let listed = get_json(&s.gw.url("/v1/models"));
    let adapter = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "sql-adapter")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(adapter["parent"], "tiny-chat", "{listed}");
    assert_eq!(adapter["lora"], true);
    // a request for the adapter starts the base engine, which loads it
    assert_eq!(chat(&s, "sql-adapter").0, 200);
    assert_eq!(engine(&s, "tiny-chat")["status"], "running");
    // runtime load and unload through vLLM's endpoints
    let resp = client()
        .post(format!("http://{}/admin/models/tiny-chat/lora", s.admin))
        .body(r#"{"lora_name":"math","lora_path":"/adapters/math"}"#)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().unwrap();
    assert_eq!(
        (body["success"].as_bool(), body["lora_name"].as_str()),
        (Some(true), Some("math"))
    );
    assert_eq!(chat(&s, "math").0, 200);
    // adapters come back after a crash and restart
    let pid = engine(&s, "tiny-chat")["pid"].as_u64().unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    wait_until(Duration::from_secs(20), "the restart", || {
        let e = engine(&s, "tiny-chat");
        e["status"] == "running" && e["restarts"] == 1
    });
    assert_eq!(
        chat(&s, "math").0,
        200,
        "runtime adapter reloaded after restart"
    );
    assert_eq!(chat(&s, "sql-adapter").0, 200);
    let resp = client()
        .delete(format!(
            "http://{}/admin/models/tiny-chat/lora/math",
            s.admin
        ))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = chat(&s, "math");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let resp = client()
        .delete(format!(
            "http://{}/admin/models/tiny-chat/lora/math",
            s.admin
        ))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[test]
fn streaming_clients_get_keepalive_comments_while_an_engine_starts() {
    let mock = mock_bin();
    let slow = format!(
        "    - name: slow-chat\n      kind: command\n      command: [\"sh\", \"-c\", \"sleep 6; exec {mock} --listen 127.0.0.1:$0 --model slow-chat\", \"{{port}}\"]\n      startup_timeout: 30s\n"
    );
    let broken = "    - name: broken\n      kind: command\n      command: [\"sh\", \"-c\", \"echo no luck; exit 1\", \"{port}\"]\n      startup_timeout: 5s\n      max_restarts: 0\n".to_string();
    let s = start(&[slow, broken], "");
    let stream = |model: &str| {
        let mut raw = raw_connect(s.gw.addr);
        let body = chat_body(model, true);
        write_all(
            &mut raw,
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let mut text = String::new();
        raw.read_to_string(&mut text).unwrap();
        text
    };
    let text = stream("slow-chat");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("text/event-stream"));
    let comment = text
        .find(": loading model slow-chat")
        .expect("a keep-alive comment");
    let first_data = text.find("data: {").expect("the engine's chunks");
    assert!(comment < first_data, "comments come before the first chunk");
    assert!(text.contains("data: [DONE]"));
    // a start that fails ends the stream with an OpenAI error event
    let text = stream("broken");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let event = text
        .lines()
        .find(|l| l.starts_with("data: {\"error\""))
        .expect("an error event");
    let error: Value = serde_json::from_str(&event["data: ".len()..]).unwrap();
    assert_eq!(error["error"]["code"], "engine_failed");
    assert!(!text.contains("[DONE]"));
}

/// A config reload reconciles engines: unchanged ones keep their process,
/// a changed one restarts, a removed one drains and stops, an added one
/// starts on its first request.
#[test]
fn reload_reconciles_engines() {
    let dir = tempfile::tempdir().unwrap().keep();
    let (lo, hi) = port_range();
    let yaml = |models: &[String]| {
        format!(
            "server:\n  listen: \"127.0.0.1:0\"\n  admin_listen: \"127.0.0.1:0\"\n  threads: 2\n  grace_period: 1s\nengines:\n  port_range: \"{lo}-{hi}\"\n  log_dir: {logs}\n  stop_grace: 3s\n  models:\n{models}",
            logs = dir.join("engine-logs").display(),
            models = models.join(""),
        )
    };
    let path = dir.join("infergate.yaml");
    std::fs::write(
        &path,
        yaml(&[
            mock_model("keep", "", ""),
            mock_model("change", "", ""),
            mock_model("remove", "", ""),
        ]),
    )
    .unwrap();
    let gw = gateway_file(&path, &[]);
    let admin = gw.next_addr("infergate admin listening on http://");
    let s = Setup { gw, admin };
    for model in ["keep", "change", "remove"] {
        assert_eq!(chat(&s, model).0, 200, "{model}");
    }
    let pid = |name: &str| engine(&s, name)["pid"].as_u64().unwrap_or(0);
    let (keep, change, remove) = (pid("keep"), pid("change"), pid("remove"));
    assert!(keep > 0 && change > 0 && remove > 0);

    std::fs::write(
        &path,
        yaml(&[
            mock_model("keep", "", ""),
            mock_model("change", "", ", \"--tokens\", \"3\""),
            mock_model("added", "", ""),
        ]),
    )
    .unwrap();
    let resp = client()
        .post(format!("http://{}/admin/reload", s.admin))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let report: Value = resp.json().unwrap();
    let changes = report["changes"].to_string();
    for expected in [
        "engine `change` changed: restarting",
        "engine `added` added",
        "engine `remove` removed: draining",
    ] {
        assert!(changes.contains(expected), "{changes}");
    }
    // `change` comes back on a new process, `remove` goes, `keep` is untouched
    wait_until(Duration::from_secs(20), "`change` to restart", || {
        engine(&s, "change")["status"] == "running" && pid("change") != change
    });
    wait_until(
        Duration::from_secs(20),
        "the removed engine to stop",
        || !alive(remove) && !alive(change),
    );
    assert_eq!(pid("keep"), keep);
    assert!(alive(keep));
    assert_eq!(engine(&s, "remove"), Value::Null);
    assert_eq!(chat(&s, "remove").0, 404);
    // the changed definition is the one running: 3 completion tokens
    let (status, body) = chat(&s, "change");
    assert_eq!(status, 200);
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    // the added engine starts on its first request
    assert_eq!(engine(&s, "added")["status"], "stopped");
    assert_eq!(chat(&s, "added").0, 200);
    assert_eq!(engine(&s, "added")["status"], "running");
}

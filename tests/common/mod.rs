//! Test harness: real `infergate` and `mock-engine` processes on port 0.
//!
//! Readiness comes from the processes themselves (the mock prints its bound
//! address; the gateway prints `infergate listening on http://ADDR`), and
//! backend health from polling the gateway with a deadline — never a sleep.
//! Every spawned process is killed when its handle drops.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_infergate");
/// The mock engine, built by the `infergate-tools` workspace crate next to
/// the gateway (`cargo build --release` and `cargo test --workspace` build
/// it; a test binary lives in `target/<profile>/deps/`).
pub fn mock_bin() -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("mock-engine"))
        .expect("target/<profile>/");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --release -p infergate-tools` (or run `cargo test --workspace`)",
        path.display()
    );
    path.display().to_string()
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr_path: Option<PathBuf>,
    /// Later stdout lines (e.g. the admin listener's address).
    pub lines: Option<mpsc::Receiver<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The address on the next stdout line starting with `prefix`.
    pub fn next_addr(&self, prefix: &str) -> SocketAddr {
        let lines = self.lines.as_ref().expect("gateway stdout");
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("another stdout line");
            if let Some(addr) = line.trim().strip_prefix(prefix) {
                return addr.parse().expect("an address");
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stderr(&self) -> String {
        self.stderr_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

/// Read the first stdout line within `limit`, keep draining the rest.
fn first_line(child: &mut Child, limit: Duration) -> String {
    let rx = stdout_lines(child);
    rx.recv_timeout(limit).unwrap_or_default()
}

/// Every stdout line, as it comes.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let reader = BufReader::new(stdout);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                // nobody listens: keep draining so the child never blocks
                continue;
            }
        }
    });
    rx
}

pub fn mock(args: &[&str]) -> Proc {
    let mut child = Command::new(mock_bin())
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mock-engine");
    let line = first_line(&mut child, Duration::from_secs(20));
    let addr = line.trim().parse().unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("mock-engine did not print its address, got {line:?}")
    });
    Proc {
        child,
        addr,
        stderr_path: None,
        lines: None,
    }
}

/// Start the gateway with `yaml` (its `server.listen` should use port 0).
pub fn gateway(yaml: &str) -> Proc {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let config = dir.join("infergate.yaml");
    std::fs::write(&config, yaml).expect("write config");
    gateway_file(&config, &[])
}

/// Start the gateway on an existing config file (its stderr goes next to it).
pub fn gateway_file(config: &std::path::Path, extra_args: &[&str]) -> Proc {
    let dir = config.parent().expect("config dir");
    let stderr_path = dir.join(format!(
        "stderr-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = Command::new(GATEWAY_BIN)
        .arg("--config")
        .arg(config)
        .args(extra_args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn infergate");
    let lines = stdout_lines(&mut child);
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_default();
    let addr = line
        .trim()
        .strip_prefix("infergate listening on http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            let _ = child.kill();
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("infergate did not become ready; stdout {line:?}; stderr:\n{log}")
        });
    Proc {
        child,
        addr,
        stderr_path: Some(stderr_path),
        lines: Some(lines),
    }
}

/// Poll `check` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// The gateway's `/metrics` exposition (empty if it cannot be fetched).
pub fn metrics_text(gw: &Proc) -> String {
    client()
        .get(gw.url("/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default()
}

pub fn get_json(url: &str) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .and_then(|r| r.json())
        .unwrap_or(serde_json::Value::Null)
}

/// Wait until the gateway reports `n` serving backends in total.
pub fn wait_healthy(gw: &Proc, n: usize) {
    let want = format!("{n}/");
    wait_until(
        Duration::from_secs(20),
        "backends to pass health checks",
        || {
            get_json(&gw.url("/health"))["healthy_services"]
                .as_str()
                .is_some_and(|s| s.starts_with(&want))
        },
    );
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A one-pool config around `backends` (addresses), with extra pool YAML lines.
pub fn one_pool(backends: &[SocketAddr], pool_extra: &str, top_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  threads: 2\n{top_extra}\npools:\n  - name: chat\n    models: [\"tiny-chat\"]\n    aliases: {{ chat-latest: tiny-chat }}\n    backends: [{}]\n    health_check: {{ path: /health, interval: 200ms }}\n{pool_extra}\n",
        list.join(", ")
    )
}

pub fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    })
    .to_string()
}

/// A raw HTTP/1.1 exchange for cases a client library hides (100-continue,
/// chunk timing, disconnects).
pub fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.set_nodelay(true).ok();
    s
}

pub fn write_all(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).expect("write");
}

/// One mock engine serving `tiny-chat` (plus `engine_args`) behind a gateway
/// with the one-pool config (plus top-level YAML `top`), backend healthy.
pub fn engine_behind_gateway(engine_args: &[&str], top: &str) -> (Proc, Proc) {
    let mut args = vec!["--model", "tiny-chat"];
    args.extend_from_slice(engine_args);
    let engine = mock(&args);
    let gw = gateway(&one_pool(&[engine.addr], "", top));
    wait_healthy(&gw, 1);
    (engine, gw)
}

//! Health checks, failover, balancing and the errors when engines are gone.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

fn instance_counts(gw: &Proc, n: usize, header: Option<(&str, &str)>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let mut req = client()
            .post(gw.url("/v1/chat/completions"))
            .body(chat_body("tiny-chat", false));
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        let r = req.send().unwrap();
        assert_eq!(r.status(), 200);
        *counts
            .entry(r.headers()["x-mock-instance"].to_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

#[test]
fn connect_failure_fails_over_to_the_other_engine() {
    let a = mock(&["--model", "tiny-chat", "--name", "a"]);
    let mut b = mock(&["--model", "tiny-chat", "--name", "b"]);
    // long interval: the health checker will not notice b is gone; failover must
    let yaml = one_pool(&[a.addr, b.addr], "", "").replace("interval: 200ms", "interval: 1h");
    let gw = gateway(&yaml);
    wait_healthy(&gw, 2);
    b.kill();
    let counts = instance_counts(&gw, 20, None);
    assert_eq!(counts.get("a"), Some(&20), "{counts:?}");
}

#[test]
fn all_engines_down_is_503_with_retry_after() {
    let mut a = mock(&["--model", "tiny-chat"]);
    let mut b = mock(&["--model", "tiny-chat"]);
    let yaml = one_pool(&[a.addr, b.addr], "", "").replace("interval: 200ms", "interval: 1h");
    let gw = gateway(&yaml);
    wait_healthy(&gw, 2);
    a.kill();
    b.kill();
    let started = std::time::Instant::now();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "upstream_unreachable");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn never_healthy_pool_gets_no_traffic_and_answers_503() {
    let engine = mock(&["--model", "tiny-chat", "--unhealthy"]);
    let gw = gateway(&one_pool(&[engine.addr], "", ""));
    wait_until(Duration::from_secs(10), "a few health checks", || {
        get_json(&engine.url("/mock/stats"))["health_checks"].as_u64() >= Some(2)
    });
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "no_healthy_backend");
    assert_eq!(get_json(&engine.url("/mock/stats"))["requests"], 0);
    let models = get_json(&gw.url("/v1/models"));
    assert_eq!(models["data"][0]["status"], "unavailable");
}

#[test]
fn failing_health_checks_take_a_backend_out_and_passing_ones_bring_it_back() {
    let a = mock(&["--model", "tiny-chat", "--name", "a"]);
    let b = mock(&["--model", "tiny-chat", "--name", "b"]);
    let extra = "    balance: round_robin";
    let yaml = one_pool(&[a.addr, b.addr], extra, "").replace(
        "interval: 200ms",
        "interval: 100ms, unhealthy_after: 2, healthy_after: 2",
    );
    let gw = gateway(&yaml);
    wait_healthy(&gw, 2);
    client()
        .post(b.url("/mock/health"))
        .body(r#"{"healthy":false}"#)
        .send()
        .unwrap();
    wait_healthy(&gw, 1);
    let counts = instance_counts(&gw, 10, None);
    assert_eq!(counts.get("a"), Some(&10), "{counts:?}");
    client()
        .post(b.url("/mock/health"))
        .body(r#"{"healthy":true}"#)
        .send()
        .unwrap();
    wait_healthy(&gw, 2);
    let counts = instance_counts(&gw, 30, None);
    assert!(counts.get("b").copied().unwrap_or(0) > 0, "{counts:?}");
}

#[test]
fn weighted_round_robin_follows_weights() {
    let a = mock(&["--model", "tiny-chat", "--name", "a"]);
    let b = mock(&["--model", "tiny-chat", "--name", "b"]);
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:0\" }}\npools:\n  - name: chat\n    models: [tiny-chat]\n    backends: [\"{}\", {{ address: \"{}\", weight: 3 }}]\n    health_check: {{ interval: 200ms }}\n",
        a.addr, b.addr
    );
    let gw = gateway(&yaml);
    wait_healthy(&gw, 2);
    let counts = instance_counts(&gw, 40, None);
    assert_eq!(counts.values().sum::<usize>(), 40);
    assert_eq!((counts["a"], counts["b"]), (10, 30), "{counts:?}");
}

#[test]
fn consistent_hash_keeps_a_session_on_one_backend() {
    let a = mock(&["--model", "tiny-chat", "--name", "a"]);
    let b = mock(&["--model", "tiny-chat", "--name", "b"]);
    let gw = gateway(&one_pool(
        &[a.addr, b.addr],
        "    balance: consistent_hash\n    hash_header: x-session-id",
        "",
    ));
    wait_healthy(&gw, 2);
    let mut seen = std::collections::HashSet::new();
    // the ring's points come from the backends' (random) ports: with six
    // sessions all of them landed on one backend about once in 30 runs;
    // with 32 that is below one in a billion
    for n in 0..32 {
        let session = format!("s{n}");
        let counts = instance_counts(&gw, 3, Some(("x-session-id", session.as_str())));
        assert_eq!(counts.len(), 1, "session {session} moved: {counts:?}");
        seen.extend(counts.into_keys());
    }
    assert_eq!(
        seen.len(),
        2,
        "32 sessions should spread over both backends"
    );
}

#[test]
fn least_inflight_sends_new_work_to_the_idle_backend() {
    let slow = mock(&[
        "--model",
        "tiny-chat",
        "--name",
        "slow",
        "--ttft-ms",
        // long enough that the request on `slow` is still in flight while
        // the five below are counted, even on a busy machine (3 s was not)
        "10000",
    ]);
    let fast = mock(&["--model", "tiny-chat", "--name", "fast"]);
    // a health check missed on a busy machine must not take `fast` out of
    // rotation while the requests are counted: this test is about balance
    let gw = gateway(
        &one_pool(&[slow.addr, fast.addr], "    balance: least_inflight", "").replace(
            "interval: 200ms }",
            "interval: 200ms, unhealthy_after: 20 }",
        ),
    );
    wait_healthy(&gw, 2);
    // occupy whichever backend the first requests land on until one sits on `slow`
    let url = gw.url("/v1/chat/completions");
    let mut busy = Vec::new();
    for _ in 0..2 {
        let url = url.clone();
        busy.push(std::thread::spawn(move || {
            client()
                .post(url)
                .body(chat_body("tiny-chat", false))
                .send()
                .map(|r| r.status().as_u16())
        }));
    }
    wait_until(
        Duration::from_secs(5),
        "one request in flight on slow",
        || get_json(&slow.url("/mock/stats"))["active"] == 1,
    );
    // and the gateway itself counts it in flight there
    let in_flight_on_slow = format!(
        "infergate_backend_in_flight{{backend=\"{}\",pool=\"chat\"}} 1",
        slow.addr
    );
    let backend_lines = || {
        metrics_text(&gw)
            .lines()
            .filter(|l| l.starts_with("infergate_backend_"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    wait_until(
        Duration::from_secs(5),
        "the gateway's in-flight count on slow",
        || backend_lines().contains(&in_flight_on_slow),
    );
    let counts = instance_counts(&gw, 5, None);
    assert_eq!(
        counts.get("fast"),
        Some(&5),
        "{counts:?}\n{}\n{}",
        backend_lines(),
        gw.stderr()
    );
    for t in busy {
        assert_eq!(t.join().unwrap().unwrap(), 200);
    }
}

#[test]
fn engine_that_stops_accepting_connections_gets_504_connect_timeout() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // A backend that answers its first health check, then stops accepting;
    // once its accept queue is full the kernel drops new SYNs: a black hole.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = Arc::new(AtomicBool::new(true));
    let flag = accepting.clone();
    std::thread::spawn(move || {
        while flag.load(Ordering::SeqCst) {
            let Ok((mut conn, _)) = listener.accept() else {
                continue;
            };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
        std::thread::sleep(Duration::from_secs(3600)); // keep the listener open, never accept
    });
    let yaml = one_pool(&[addr], "", "timeouts: { connect: 300ms, first_byte: 2s }")
        .replace("interval: 200ms", "interval: 1h");
    let gw = gateway(&yaml);
    wait_healthy(&gw, 1);
    accepting.store(false, Ordering::SeqCst);
    // wake the accept loop once so it sees the flag, then fill the accept queue
    let _wake = std::net::TcpStream::connect(addr);
    let mut fillers = Vec::new();
    let mut refused_in_a_row = 0;
    for _ in 0..1000 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            Ok(s) => {
                fillers.push(s);
                refused_in_a_row = 0;
            }
            Err(_) => refused_in_a_row += 1,
        }
        if refused_in_a_row == 5 {
            break; // queue full: SYNs are dropped now
        }
    }
    assert_eq!(refused_in_a_row, 5, "could not fill the accept queue");
    let started = std::time::Instant::now();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("connect"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

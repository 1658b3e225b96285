//! Flow control on real processes: the pool's dispatch queue (`max_inflight`,
//! `queue`), priorities and fair share, passive ejection, retries before the
//! first byte, and fallback models.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const USER_A: &str = "sk-flow-user-a-000000000000000000000";
const USER_B: &str = "sk-flow-user-b-000000000000000000000";
const LOW: &str = "sk-flow-low-00000000000000000000000";
const HIGH: &str = "sk-flow-high-0000000000000000000000";
const ADMIN: &str = "sk-flow-admin-000000000000000000000";

/// A gateway with keys (A, B normal; LOW low; HIGH high; ADMIN admin) in
/// front of `backends`, the pool's extra YAML and top-level YAML.
fn keyed_gateway(backends: &[SocketAddr], pool_extra: &str, top: &str) -> Proc {
    let dir = tempfile::tempdir().unwrap().keep();
    let keys = json!({"keys": [
        {"key": USER_A, "user": "tenant-a"},
        {"key": USER_B, "user": "tenant-b"},
        {"key": LOW, "user": "batch", "priority": "low"},
        {"key": HIGH, "user": "interactive", "priority": "high", "models": ["tiny-chat"]},
        {"key": ADMIN, "user": "ops", "role": "admin"},
    ]});
    std::fs::write(dir.join("keys.json"), keys.to_string()).unwrap();
    let filters = format!(
        "filters:\n  - request_id: {{}}\n  - auth:\n      api_keys_file: {}\n{top}",
        dir.join("keys.json").display()
    );
    let gw = gateway(&one_pool(backends, pool_extra, &filters));
    wait_healthy(&gw, backends.len());
    gw
}

/// POST a chat completion to the gateway at `base` (`http://host:port`).
fn chat(base: &str, key: &str, body: &Value) -> reqwest::blocking::Response {
    client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .body(body.to_string())
        .send()
        .unwrap()
}

fn hello() -> Value {
    json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
}

fn metric(gw: &Proc, prefix: &str) -> f64 {
    metrics_text(gw)
        .lines()
        .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn queue_len(gw: &Proc) -> f64 {
    metric(gw, "infergate_queue_length{pool=\"chat\"} ")
}

fn stats(engine: &Proc) -> Value {
    get_json(&engine.url("/mock/stats"))
}

/// Run `f` on a thread; its result arrives on the returned handle.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::spawn(f)
}

#[test]
fn the_queue_holds_requests_at_max_inflight_and_engines_never_exceed_it() {
    let engines: Vec<Proc> = (0..2)
        .map(|_| mock(&["--model", "tiny-chat", "--ttft-ms", "150"]))
        .collect();
    let addrs: Vec<SocketAddr> = engines.iter().map(|e| e.addr).collect();
    let gw = gateway(&one_pool(
        &addrs,
        "    max_inflight: 1\n    queue: { max_len: 50, max_wait: 20s }\n",
        "",
    ));
    wait_healthy(&gw, 2);
    let base = gw.url("");
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let base = base.clone();
            spawn(move || chat(&base, "", &hello()).status().as_u16())
        })
        .collect();
    let statuses: Vec<u16> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for e in &engines {
        assert_eq!(
            stats(e)["max_active"],
            1,
            "an engine ran more than max_inflight"
        );
    }
    assert!(
        metric(
            &gw,
            "infergate_queue_requests_total{outcome=\"dispatched\",pool=\"chat\"} "
        ) >= 1.0
    );
    assert_eq!(queue_len(&gw), 0.0);
}

#[test]
fn max_wait_ends_in_503_with_retry_after_and_max_len_refuses_at_once() {
    let engine = mock(&["--model", "tiny-chat", "--ttft-ms", "4000"]);
    let gw = gateway(&one_pool(
        &[engine.addr],
        "    max_inflight: 1\n    queue: { max_len: 1, max_wait: 400ms }\n",
        "",
    ));
    wait_healthy(&gw, 1);
    let base = gw.url("");
    let busy = {
        let base = base.clone();
        spawn(move || chat(&base, "", &hello()).status().as_u16())
    };
    wait_until(Duration::from_secs(10), "the engine to be busy", || {
        stats(&engine)["active"] == 1
    });
    let waiting = {
        let base = base.clone();
        spawn(move || {
            let r = chat(&base, "", &hello());
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry, r.json::<Value>().unwrap())
        })
    };
    wait_until(Duration::from_secs(10), "a request to queue", || {
        queue_len(&gw) == 1.0
    });
    // the queue is full (max_len 1): refused at once, while the other still waits
    let r = chat(&base, "", &hello());
    assert_eq!(r.status(), 503);
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 1
    );
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "server_overloaded");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue.max_len"));
    assert!(
        !waiting.is_finished(),
        "the queued request ended before the refusal"
    );

    let (status, retry, body) = waiting.join().unwrap();
    assert_eq!(status, 503);
    assert!(retry.unwrap().parse::<u32>().unwrap() >= 1);
    assert_eq!(body["error"]["code"], "server_overloaded");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue.max_wait"));
    assert_eq!(busy.join().unwrap(), 200);
    assert_eq!(
        stats(&engine)["requests"],
        1,
        "refused requests reached the engine"
    );
    assert_eq!(
        metric(
            &gw,
            "infergate_queue_requests_total{outcome=\"full\",pool=\"chat\"} "
        ),
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            "infergate_queue_requests_total{outcome=\"timed_out\",pool=\"chat\"} "
        ),
        1.0
    );
}

/// A slow stream through the gateway that holds a backend slot until dropped.
fn hold_stream(gw: &Proc, key: &str) -> std::net::TcpStream {
    let mut body = hello();
    body["stream"] = json!(true);
    body["max_tokens"] = json!(8);
    let body = body.to_string();
    let mut s = raw_connect(gw.addr);
    write_all(
        &mut s,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nx-mock-token-interval-us: 30000000\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    s
}

#[test]
fn higher_priority_goes_first_and_a_flooding_tenant_does_not_starve_another() {
    let engine = mock(&["--model", "tiny-chat", "--ttft-ms", "20"]);
    let gw = keyed_gateway(
        &[engine.addr],
        "    max_inflight: 1\n    queue: { max_len: 100, max_wait: 60s, aging: 60s }\n",
        "",
    );
    let base = gw.url("");
    let done: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let send = |key: &'static str, label: &'static str| {
        let base = base.clone();
        let done = done.clone();
        spawn(move || {
            let status = chat(&base, key, &hello()).status().as_u16();
            done.lock().unwrap().push(label);
            status
        })
    };
    // a slow stream holds the engine; then low, normal, high queue in that order
    let hold = hold_stream(&gw, USER_A);
    wait_until(Duration::from_secs(10), "the engine to be busy", || {
        stats(&engine)["active"] == 1
    });
    let mut workers = Vec::new();
    for (n, (key, label)) in [(LOW, "low"), (USER_B, "normal"), (HIGH, "high")]
        .into_iter()
        .enumerate()
    {
        workers.push(send(key, label));
        wait_until(Duration::from_secs(10), "the request to queue", || {
            queue_len(&gw) == (n + 1) as f64
        });
    }
    // an admin raises one request above everything with the header
    let admin = {
        let base = base.clone();
        let done = done.clone();
        spawn(move || {
            let r = client()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(ADMIN)
                .header("x-infergate-priority", "9")
                .body(hello().to_string())
                .send()
                .unwrap();
            done.lock().unwrap().push("admin");
            r.status().as_u16()
        })
    };
    wait_until(
        Duration::from_secs(10),
        "the admin request to queue",
        || queue_len(&gw) == 4.0,
    );
    workers.push(admin);
    drop(hold); // the slot frees: the queue drains one by one
    for w in workers {
        assert_eq!(w.join().unwrap(), 200);
    }
    assert_eq!(*done.lock().unwrap(), ["admin", "high", "normal", "low"]);

    // tenant A floods; tenant B's two requests are served within the first dispatches
    done.lock().unwrap().clear();
    let hold = hold_stream(&gw, USER_A);
    wait_until(Duration::from_secs(10), "the engine to be busy", || {
        stats(&engine)["active"] == 1
    });
    let mut workers = Vec::new();
    for n in 0..8 {
        workers.push(send(USER_A, "a"));
        wait_until(Duration::from_secs(10), "A's requests to queue", || {
            queue_len(&gw) == (n + 1) as f64
        });
    }
    for n in 0..2 {
        workers.push(send(USER_B, "b"));
        wait_until(Duration::from_secs(10), "B's requests to queue", || {
            queue_len(&gw) == (9 + n) as f64
        });
    }
    drop(hold);
    for w in workers {
        assert_eq!(w.join().unwrap(), 200);
    }
    let order = done.lock().unwrap().clone();
    let last_b = order.iter().rposition(|l| *l == "b").unwrap();
    assert!(last_b <= 3, "B waited behind A's flood: {order:?}");
}

#[test]
fn a_client_that_leaves_while_queued_never_reaches_the_engine() {
    let engine = mock(&["--model", "tiny-chat", "--ttft-ms", "1500"]);
    let gw = gateway(&one_pool(
        &[engine.addr],
        "    max_inflight: 1\n    queue: { max_wait: 30s }\n",
        "",
    ));
    wait_healthy(&gw, 1);
    let base = gw.url("");
    let busy = {
        let base = base.clone();
        spawn(move || chat(&base, "", &hello()).status().as_u16())
    };
    wait_until(Duration::from_secs(10), "the engine to be busy", || {
        stats(&engine)["active"] == 1
    });
    let body = hello().to_string();
    let mut s = raw_connect(gw.addr);
    write_all(
        &mut s,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    wait_until(Duration::from_secs(10), "the request to queue", || {
        queue_len(&gw) == 1.0
    });
    drop(s);
    wait_until(Duration::from_secs(10), "the queue to notice", || {
        metric(
            &gw,
            "infergate_queue_requests_total{outcome=\"abandoned\",pool=\"chat\"} ",
        ) == 1.0
    });
    assert_eq!(queue_len(&gw), 0.0);
    assert_eq!(busy.join().unwrap(), 200);
    // the slot freed with nobody waiting; the engine saw the first request only
    assert_eq!(stats(&engine)["requests"], 1);
}

#[test]
fn a_queued_streaming_client_hears_comments_then_gets_its_answer() {
    let engine = mock(&["--model", "tiny-chat", "--ttft-ms", "800"]);
    let gw = gateway(&one_pool(
        &[engine.addr],
        "    max_inflight: 1\n    queue: { max_wait: 30s }\n",
        "",
    ));
    wait_healthy(&gw, 1);
    let base = gw.url("");
    let busy = {
        let base = base.clone();
        spawn(move || chat(&base, "", &hello()).status().as_u16())
    };
    wait_until(Duration::from_secs(10), "the engine to be busy", || {
        stats(&engine)["active"] == 1
    });
    let mut body = hello();
    body["stream"] = json!(true);
    let r = chat(&base, "", &body);
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut lines = BufReader::new(r).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, ": queued", "the first thing a queued stream hears");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(rest.iter().any(|l| l.starts_with("data: {")), "{rest:?}");
    assert_eq!(
        rest.iter().rev().find(|l| !l.is_empty()).unwrap(),
        "data: [DONE]"
    );
    assert_eq!(busy.join().unwrap(), 200);
}

#[test]
fn a_queued_stream_whose_wait_fails_ends_in_one_error_event() {
    let engine = mock(&["--model", "tiny-chat", "--ttft-ms", "3000"]);
    let gw = gateway(&one_pool(
        &[engine.addr],
        "    max_inflight: 1\n    queue: { max_wait: 300ms }\n",
        "",
    ));
    wait_healthy(&gw, 1);
    let base = gw.url("");
    let busy = {
        let base = base.clone();
        spawn(move || chat(&base, "", &hello()).status().as_u16())
    };
    wait_until(Duration::from_secs(10), "the engine to be busy", || {
        stats(&engine)["active"] == 1
    });
    let mut body = hello();
    body["stream"] = json!(true);
    let r = chat(&base, "", &body);
    assert_eq!(r.status(), 200, "the SSE header went out while queued");
    let mut text = String::new();
    BufReader::new(r).read_to_string(&mut text).unwrap();
    let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.len(), 1, "{text}");
    let error: Value = serde_json::from_str(&events[0]["data: ".len()..]).unwrap();
    assert_eq!(error["error"]["code"], "server_overloaded");
    assert_eq!(busy.join().unwrap(), 200);
}

fn post_fault(engine: &Proc, fault: Value) {
    let r = client()
        .post(engine.url("/mock/fault"))
        .body(fault.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn service(gw: &Proc, backend: SocketAddr) -> Value {
    get_json(&gw.url("/services"))["services"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|s| s["url"] == format!("http://{backend}"))
                .cloned()
        })
        .unwrap_or(Value::Null)
}

#[test]
fn a_failing_backend_is_ejected_then_let_back_through_a_probe() {
    let engines: Vec<Proc> = (0..3).map(|_| mock(&["--model", "tiny-chat"])).collect();
    let addrs: Vec<SocketAddr> = engines.iter().map(|e| e.addr).collect();
    let gw = gateway(&one_pool(
        &addrs,
        "    retries: 0\n    ejection: { consecutive_failures: 2, base_time: 400ms, max_time: 10s }\n",
        "",
    ));
    wait_healthy(&gw, 3);
    let base = gw.url("");
    post_fault(&engines[0], json!({"fail_status": 500}));
    let mut failures = 0;
    for _ in 0..12 {
        if chat(&base, "", &hello()).status() != 200 {
            failures += 1;
        }
    }
    assert_eq!(failures, 2, "two failures eject it; the rest go elsewhere");
    assert_eq!(stats(&engines[0])["requests"], 2);
    let entry = service(&gw, engines[0].addr);
    assert_eq!(entry["ejected"], true, "{entry}");
    assert_eq!(
        entry["healthy"], true,
        "ejection is not a health-check failure"
    );
    assert!(metrics_text(&gw).contains(&format!(
        "infergate_backend_ejected{{backend=\"{}\",pool=\"chat\"}} 1",
        engines[0].addr
    )));

    // it recovers; after the ejection time one probe goes through, then traffic
    post_fault(&engines[0], json!({"fail_status": null}));
    wait_until(Duration::from_secs(10), "the ejection to end", || {
        service(&gw, engines[0].addr)["ejected_for_seconds"] == 0.0
    });
    wait_until(
        Duration::from_secs(10),
        "the backend to take traffic again",
        || {
            chat(&base, "", &hello()).status() == 200
                && service(&gw, engines[0].addr)["ejected"] == false
        },
    );
    for _ in 0..6 {
        assert_eq!(chat(&base, "", &hello()).status(), 200);
    }
    assert!(stats(&engines[0])["requests"].as_u64().unwrap() >= 3);
}

#[test]
fn a_probe_whose_client_leaves_does_not_keep_the_backend_out() {
    // e0 answers slowly (1.5 s), so a client can leave while its request
    // is e0's half-open probe
    let slow = mock(&["--model", "tiny-chat", "--ttft-ms", "1500"]);
    let fast = mock(&["--model", "tiny-chat"]);
    let addrs = [slow.addr, fast.addr];
    let gw = gateway(&one_pool(
        &addrs,
        "    retries: 0\n    ejection: { consecutive_failures: 1, base_time: 300ms, max_time: 300ms }\n",
        "",
    ));
    wait_healthy(&gw, 2);
    let base = gw.url("");
    post_fault(&slow, json!({"fail_status": 500}));
    wait_until(Duration::from_secs(10), "e0 to be ejected", || {
        chat(&base, "", &hello());
        service(&gw, slow.addr)["ejected"] == true
    });
    post_fault(&slow, json!({"fail_status": null}));
    wait_until(Duration::from_secs(10), "the ejection to end", || {
        service(&gw, slow.addr)["ejected_for_seconds"] == 0.0
    });
    // the probe: a client that gives up after 300 ms, long before e0 answers
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let before = stats(&slow)["requests"].as_u64().unwrap();
    wait_until(Duration::from_secs(10), "a probe to reach e0", || {
        let _ = impatient
            .post(format!("{base}/v1/chat/completions"))
            .body(hello().to_string())
            .send();
        stats(&slow)["requests"].as_u64().unwrap() > before
    });
    // its client left without an answer: the next request may probe again,
    // and e0's answer brings it back (it would stay out forever if the
    // abandoned probe kept the half-open slot)
    let after_probe = stats(&slow)["requests"].as_u64().unwrap();
    wait_until(Duration::from_secs(20), "e0 to take traffic again", || {
        assert_eq!(chat(&base, "", &hello()).status(), 200);
        stats(&slow)["requests"].as_u64().unwrap() > after_probe
            && service(&gw, slow.addr)["ejected"] == false
    });
}

#[test]
fn ejection_never_takes_the_pool_below_its_panic_threshold() {
    let engines: Vec<Proc> = (0..2)
        .map(|_| mock(&["--model", "tiny-chat", "--fail-status", "500"]))
        .collect();
    let addrs: Vec<SocketAddr> = engines.iter().map(|e| e.addr).collect();
    let gw = gateway(&one_pool(
        &addrs,
        "    retries: 0\n    ejection: { consecutive_failures: 1, base_time: 60s }\n",
        "",
    ));
    wait_healthy(&gw, 2);
    let base = gw.url("");
    for _ in 0..10 {
        let r = chat(&base, "", &hello());
        assert_eq!(r.status(), 500, "the engine's own error passes through");
    }
    let ejected: Vec<bool> = addrs
        .iter()
        .map(|a| service(&gw, *a)["ejected"] == true)
        .collect();
    assert_eq!(
        ejected.iter().filter(|e| **e).count(),
        1,
        "50 % at most: {ejected:?}"
    );
    let served: u64 = engines
        .iter()
        .map(|e| stats(e)["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 10, "the last backend kept serving");
}

#[test]
fn a_503_or_a_reset_is_retried_on_another_backend_before_any_byte() {
    for fault in [json!({"fail_status": 503}), json!({"reset": true})] {
        let bad = mock(&["--model", "tiny-chat", "--name", "bad"]);
        let good = mock(&["--model", "tiny-chat", "--name", "good"]);
        post_fault(&bad, fault.clone());
        let gw = gateway(&one_pool(
            &[bad.addr, good.addr],
            "    retry_budget: 1.0\n    ejection: { enabled: false }\n",
            "",
        ));
        wait_healthy(&gw, 2);
        let base = gw.url("");
        for _ in 0..6 {
            let r = chat(&base, "", &hello());
            assert_eq!(r.status(), 200, "{fault}");
            assert_eq!(r.headers()["x-mock-instance"], "good");
        }
        let tried = stats(&bad)["requests"].as_u64().unwrap();
        assert!(tried >= 1, "round robin never tried the bad backend");
        let reason = if fault["reset"] == true {
            "reset"
        } else {
            "status_503"
        };
        assert_eq!(
            metric(
                &gw,
                &format!("infergate_retries_total{{pool=\"chat\",reason=\"{reason}\"}} ")
            ),
            tried as f64,
            "{fault}: every refusal was retried once"
        );
        assert_eq!(stats(&good)["requests"], 6);
    }
}

#[test]
fn the_retry_budget_stops_a_retry_storm() {
    let bad = mock(&["--model", "tiny-chat", "--fail-status", "503"]);
    let good = mock(&["--model", "tiny-chat"]);
    let gw = gateway(&one_pool(
        &[bad.addr, good.addr],
        "    balance: round_robin\n    retry_budget: 0.05\n    ejection: { enabled: false }\n",
        "",
    ));
    wait_healthy(&gw, 2);
    let base = gw.url("");
    let mut refused = 0;
    for _ in 0..40 {
        if chat(&base, "", &hello()).status() == 503 {
            refused += 1;
        }
    }
    let retries = metric(
        &gw,
        "infergate_retries_total{pool=\"chat\",reason=\"status_503\"} ",
    );
    // 3 retries to start with, then one per 20 requests (0.05)
    assert!(retries <= 5.0, "{retries} retries");
    assert!(
        refused >= 1,
        "the budget ran out, and the engine's 503 passed through"
    );
    assert!(
        metric(
            &gw,
            "infergate_retry_budget_exhausted_total{pool=\"chat\"} "
        ) >= 1.0
    );
}

#[test]
fn fallback_models_serve_when_a_pool_is_down_or_full_within_the_keys_acl() {
    let big = mock(&["--model", "big-model", "--ttft-ms", "1500", "--name", "big"]);
    let small = mock(&["--model", "small-model", "--name", "small"]);
    let dir = tempfile::tempdir().unwrap().keep();
    let keys = json!({"keys": [
        {"key": USER_A, "user": "both", "models": ["big-model", "small-model"]},
        {"key": USER_B, "user": "big-only", "models": ["big-model"]},
    ]});
    std::fs::write(dir.join("keys.json"), keys.to_string()).unwrap();
    let yaml = format!(
        "server: {{ listen: \"127.0.0.1:0\", threads: 2 }}\npools:\n  - name: big\n    models: [big-model]\n    backends: [\"{}\"]\n    health_check: {{ interval: 200ms }}\n    max_inflight: 1\n    queue: {{ max_len: 0 }}\n  - name: small\n    models: [small-model]\n    backends: [\"{}\"]\n    health_check: {{ interval: 200ms }}\nfallbacks:\n  big-model: [small-model]\nfilters:\n  - auth:\n      api_keys_file: {}\n",
        big.addr,
        small.addr,
        dir.join("keys.json").display()
    );
    let gw = gateway(&yaml);
    wait_healthy(&gw, 2);
    let base = gw.url("");
    let body = json!({"model": "big-model", "messages": [{"role": "user", "content": "hi"}]});

    // full: big's one slot is taken, its queue takes none
    let busy = {
        let (base, body) = (base.clone(), body.clone());
        spawn(move || chat(&base, USER_A, &body).status().as_u16())
    };
    wait_until(Duration::from_secs(10), "big to be busy", || {
        stats(&big)["active"] == 1
    });
    let r = chat(&base, USER_A, &body);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-infergate-fallback"], "small-model");
    assert_eq!(r.headers()["x-mock-instance"], "small");
    assert_eq!(
        get_json(&small.url("/mock/last-request"))["model"],
        "small-model"
    );
    // a key that may not use the fallback gets the pool's own refusal
    let r = chat(&base, USER_B, &body);
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("x-infergate-fallback").is_none());
    assert_eq!(
        r.json::<Value>().unwrap()["error"]["code"],
        "server_overloaded"
    );
    assert_eq!(busy.join().unwrap(), 200);

    // down: big fails its health checks
    client()
        .post(big.url("/mock/health"))
        .body(r#"{"healthy": false}"#)
        .send()
        .unwrap();
    wait_until(Duration::from_secs(10), "big to be out", || {
        chat(&base, USER_B, &body).status() == 503
    });
    let r = chat(&base, USER_A, &body);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-infergate-fallback"], "small-model");
    let text = metrics_text(&gw);
    assert!(
        text.contains("infergate_fallbacks_total{from=\"big-model\",to=\"small-model\"} 2"),
        "{text}"
    );
}

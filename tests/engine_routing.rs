//! Engine-aware routing (`balance: load_aware`, `balance: prefix_aware`) on
//! real processes: mock engines with a scheduler and a prefix cache, whose
//! `/metrics` the gateway scrapes.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Mock engines that run `running` requests at a time and cache prefixes.
fn engines(n: usize, running: &str) -> Vec<Proc> {
    (0..n)
        .map(|i| {
            let name = format!("engine-{i}");
            let args = vec![
                "--model",
                "tiny-chat",
                "--name",
                name.as_str(),
                "--max-running",
                running,
                "--prefix-cache-tokens",
                "20000",
                "--tokens",
                "4",
            ];
            mock(&args)
        })
        .collect()
}

fn names(engines: &[Proc]) -> Vec<SocketAddr> {
    engines.iter().map(|e| e.addr).collect()
}

/// A conversation: its own long system prompt, then `turns` user turns
/// with the (mock) assistant answers in between.
fn conversation(tag: &str, turns: usize, model: &str) -> Value {
    let system: Vec<String> = (0..300).map(|i| format!("{tag}-w{i}")).collect();
    let mut messages = vec![json!({"role": "system", "content": system.join(" ")})];
    for t in 0..turns {
        if t > 0 {
            messages.push(json!({"role": "assistant", "content": format!("answer {t}")}));
        }
        messages.push(json!({"role": "user", "content": format!("question {t} of {tag}")}));
    }
    json!({"model": model, "messages": messages, "max_tokens": 4})
}

/// Send one chat request; (engine name, cached prompt tokens).
fn send(gw: &Proc, body: &Value) -> (String, u64) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(body.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text());
    let engine = r.headers()["x-mock-instance"].to_str().unwrap().to_string();
    let cached = r.headers()["x-mock-cached-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (engine, cached)
}

/// Hold a slow stream open directly on an engine (not through the
/// gateway): the engine runs or queues it, and says so on its `/metrics`.
fn hold_on_engine(engine: SocketAddr, body: &Value) -> TcpStream {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let body = body.to_string();
    let mut s = raw_connect(engine);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-mock-token-interval-us: 30000000\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    write_all(&mut s, head.as_bytes());
    write_all(&mut s, body.as_bytes());
    s
}

/// The gateway's `/services` entry of one backend.
fn service(gw: &Proc, backend: SocketAddr) -> Value {
    let all = get_json(&gw.url("/services"));
    all["services"]
        .as_array()
        .and_then(|list| {
            list.iter()
                .find(|s| s["url"] == format!("http://{backend}"))
                .cloned()
        })
        .unwrap_or(Value::Null)
}

fn counter(gw: &Proc, decision: &str) -> u64 {
    let want =
        format!("infergate_routing_decisions_total{{decision=\"{decision}\",pool=\"chat\"}} ");
    metrics_text(gw)
        .lines()
        .find_map(|l| l.strip_prefix(want.as_str()).map(str::to_string))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

const FAST_SCRAPES: &str = "    engine_metrics: { interval: 50ms, timeout: 500ms }\n";

#[test]
fn prefix_aware_keeps_a_conversation_on_its_backend_and_moves_it_when_that_backend_is_saturated() {
    let engines = engines(3, "2");
    let extra = format!(
        "    balance: prefix_aware\n{FAST_SCRAPES}    prefix_aware: {{ load_threshold: 2 }}\n"
    );
    let gw = gateway(&one_pool(&names(&engines), &extra, ""));
    wait_healthy(&gw, 3);

    // turns of one conversation land on one backend, which has the prefix cached
    let (home, cached) = send(&gw, &conversation("a", 1, "tiny-chat"));
    assert_eq!(cached, 0, "a new conversation is not cached anywhere");
    for turns in 2..=4 {
        // through the alias too: the index keys on the model the engine sees
        let model = if turns == 3 {
            "chat-latest"
        } else {
            "tiny-chat"
        };
        let (engine, cached) = send(&gw, &conversation("a", turns, model));
        assert_eq!(engine, home, "turn {turns} left its backend");
        assert!(cached >= 288, "turn {turns}: only {cached} tokens cached");
    }
    assert_eq!(counter(&gw, "prefix_hit"), 3);
    assert_eq!(counter(&gw, "no_match"), 1);

    // the home engine gets busy (a request held open on it, directly): a new
    // conversation goes to a less loaded backend
    let home_addr = engines
        .iter()
        .zip(0..)
        .find(|(_, i)| format!("engine-{i}") == home)
        .map(|(e, _)| e.addr)
        .unwrap();
    let running = hold_on_engine(home_addr, &conversation("a", 5, "tiny-chat"));
    wait_until(
        Duration::from_secs(10),
        "the gateway to see the running request",
        || service(&gw, home_addr)["engine"]["running"].as_f64() == Some(1.0),
    );
    let (engine, _) = send(&gw, &conversation("b", 1, "tiny-chat"));
    assert_ne!(engine, home, "a new conversation went to the busy backend");

    // one running is within the threshold (2): the conversation stays
    let (engine, cached) = send(&gw, &conversation("a", 2, "tiny-chat"));
    assert_eq!(engine, home);
    assert!(cached > 0);

    // saturated: both its slots taken and a request waiting (running 2 +
    // 2 × waiting 1 = 4 > 0 + threshold 2): the next turn moves, counted
    let waiting: Vec<TcpStream> = (6..8)
        .map(|t| hold_on_engine(home_addr, &conversation("a", t, "tiny-chat")))
        .collect();
    wait_until(
        Duration::from_secs(10),
        "the gateway to see the queue",
        || service(&gw, home_addr)["engine"]["waiting"].as_f64() == Some(1.0),
    );
    let fallbacks = counter(&gw, "load_fallback");
    let (engine, cached) = send(&gw, &conversation("a", 9, "tiny-chat"));
    assert_ne!(engine, home, "the turn waited behind a saturated engine");
    assert_eq!(cached, 0, "the new backend never saw this conversation");
    assert_eq!(counter(&gw, "load_fallback"), fallbacks + 1);

    // its next turn follows the conversation to where it now lives
    let (again, cached) = send(&gw, &conversation("a", 10, "tiny-chat"));
    assert_eq!(again, engine);
    assert!(cached >= 288, "{cached}");
    drop((running, waiting));

    let text = metrics_text(&gw);
    assert!(text.contains("infergate_prefix_index_entries{pool=\"chat\"}"));
    assert!(text.contains("infergate_routing_prefix_match_bytes_count{pool=\"chat\"}"));
    assert!(text.contains(&format!(
        "infergate_engine_requests_running{{backend=\"{home_addr}\",pool=\"chat\"}}"
    )));
}

#[test]
fn prefix_aware_sessions_stick_before_the_index_knows_the_prompt() {
    let engines = engines(3, "1");
    let extra = format!("    balance: prefix_aware\n{FAST_SCRAPES}");
    let gw = gateway(&one_pool(&names(&engines), &extra, ""));
    wait_healthy(&gw, 3);
    let c = client();
    let mut seen = Vec::new();
    // prompts shorter than one block share nothing; the session header does
    for i in 0..6 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .header("x-session-id", "agent-42")
            .body(json!({"model": "tiny-chat", "messages": [{"role": "user", "content": format!("q{i}")}]}).to_string())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        seen.push(r.headers()["x-mock-instance"].to_str().unwrap().to_string());
    }
    assert!(seen.iter().all(|e| *e == seen[0]), "{seen:?}");
    assert_eq!(counter(&gw, "session"), 5);
}

#[test]
fn load_aware_sends_new_requests_away_from_an_engine_with_a_queue() {
    let engines = engines(3, "1");
    let extra = format!("    balance: load_aware\n{FAST_SCRAPES}");
    let gw = gateway(&one_pool(&names(&engines), &extra, ""));
    wait_healthy(&gw, 3);
    let busy = engines[1].addr;
    let held: Vec<TcpStream> = (0..3)
        .map(|i| hold_on_engine(busy, &conversation(&format!("h{i}"), 1, "tiny-chat")))
        .collect();
    wait_until(
        Duration::from_secs(10),
        "the gateway to see the queue",
        || service(&gw, busy)["engine"]["waiting"].as_f64() == Some(2.0),
    );
    for i in 0..12 {
        let (engine, _) = send(&gw, &conversation(&format!("n{i}"), 1, "tiny-chat"));
        assert_ne!(engine, "engine-1", "request {i} went to the queued engine");
    }
    let entry = service(&gw, busy);
    assert_eq!(entry["engine"]["family"], "vllm");
    assert!(entry["engine"]["load"].as_f64().unwrap() >= 5.0, "{entry}");
    drop(held);
}

#[test]
fn engine_aware_policies_send_little_to_a_backend_that_answers_slowly() {
    // one engine takes 300 ms to start answering, the others ~none: its
    // queue and running counts look the same as theirs, its pace does not
    let mut engines = engines(2, "4");
    engines.insert(
        0,
        mock(&[
            "--model",
            "tiny-chat",
            "--name",
            "slow",
            "--max-running",
            "4",
            "--tokens",
            "4",
            "--ttft-ms",
            "300",
        ]),
    );
    let slow = engines[0].addr;
    for balance in ["load_aware", "prefix_aware"] {
        let extra = format!("    balance: {balance}\n{FAST_SCRAPES}");
        let gw = gateway(&one_pool(&names(&engines), &extra, ""));
        wait_healthy(&gw, 3);
        // until every backend answered once, none has a pace: they rotate
        let mut warm = 0;
        while engines
            .iter()
            .any(|e| service(&gw, e.addr)["engine"]["first_byte_ms"].is_null())
        {
            assert!(warm < 30, "{balance}: not every backend got a request");
            send(
                &gw,
                &conversation(&format!("{balance}-w{warm}"), 1, "tiny-chat"),
            );
            warm += 1;
        }
        let entry = service(&gw, slow);
        assert!(
            entry["engine"]["first_byte_ms"].as_f64().unwrap() >= 300.0,
            "{entry}"
        );
        assert!(entry["engine"]["pace"].as_f64().unwrap() > 5.0, "{entry}");
        for e in &engines[1..] {
            let fast = service(&gw, e.addr);
            assert_eq!(fast["engine"]["pace"].as_f64(), Some(1.0), "{fast}");
        }
        for i in 0..12 {
            let (engine, _) = send(
                &gw,
                &conversation(&format!("{balance}-n{i}"), 1, "tiny-chat"),
            );
            assert_ne!(
                engine, "slow",
                "{balance}: request {i} went to the slow engine"
            );
        }
    }
}

#[test]
fn backends_with_missing_slow_or_garbage_metrics_still_serve() {
    let modes = ["garbage", "missing", "hang"];
    let engines: Vec<Proc> = modes
        .iter()
        .map(|m| mock(&["--model", "tiny-chat", "--name", m, "--metrics-mode", m]))
        .collect();
    for balance in ["load_aware", "prefix_aware"] {
        let extra = format!(
            "    balance: {balance}\n    engine_metrics: {{ interval: 50ms, timeout: 100ms }}\n"
        );
        let gw = gateway(&one_pool(&names(&engines), &extra, ""));
        wait_healthy(&gw, 3);
        for e in &engines {
            wait_until(
                Duration::from_secs(10),
                "failed scrapes to be counted",
                || {
                    service(&gw, e.addr)["engine"]["scrapes_failed"]
                        .as_u64()
                        .is_some_and(|n| n >= 2)
                },
            );
        }
        let mut served = std::collections::HashSet::new();
        for i in 0..12 {
            let (engine, _) = send(&gw, &conversation(&format!("{balance}{i}"), 1, "tiny-chat"));
            served.insert(engine);
        }
        assert_eq!(
            served.len(),
            3,
            "{balance}: every backend still serves: {served:?}"
        );
        let garbage = service(&gw, engines[0].addr);
        assert!(
            garbage["healthy"].as_bool().unwrap(),
            "a scrape failure is not a health failure"
        );
        assert_eq!(garbage["engine"]["running"], Value::Null);
        let error = garbage["engine"]["last_error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            error.contains("unreadable") || error.contains("no "),
            "{error}"
        );
        assert!(service(&gw, engines[1].addr)["engine"]["last_error"]
            .as_str()
            .unwrap()
            .contains("404"));
        assert!(service(&gw, engines[2].addr)["engine"]["last_error"]
            .as_str()
            .unwrap()
            .contains("no answer"));
        let text = metrics_text(&gw);
        assert!(text.contains(&format!(
            "infergate_engine_metrics_scrapes_total{{backend=\"{}\",pool=\"chat\",result=\"error\"}}",
            engines[1].addr
        )));
        assert!(!gw.stderr().contains("panicked"));
    }
}

#[test]
fn a_streamed_turn_is_routed_by_its_prefix_too() {
    let engines = engines(2, "1");
    let extra = format!("    balance: prefix_aware\n{FAST_SCRAPES}");
    let gw = gateway(&one_pool(&names(&engines), &extra, ""));
    wait_healthy(&gw, 2);
    let (home, _) = send(&gw, &conversation("s", 1, "tiny-chat"));
    let mut body = conversation("s", 2, "tiny-chat");
    body["stream"] = json!(true);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(body.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-instance"].to_str().unwrap(), home);
    let mut text = String::new();
    BufReader::new(r).read_to_string(&mut text).unwrap();
    assert!(text.lines().any(|l| l == "data: [DONE]"), "{text}");
}

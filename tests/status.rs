//! Status endpoints in the seeds' shapes: /health, /health/live, /health/ready,
//! /services, /stats.

// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use std::time::Duration;

#[test]
fn readiness_follows_backend_health_and_liveness_stays_up() {
    let engine = mock(&["--model", "tiny-chat"]);
    let gw = gateway(&one_pool(&[engine.addr], "", ""));
    let status = |path: &str| client().get(gw.url(path)).send().unwrap().status().as_u16();
    wait_healthy(&gw, 1);
    assert_eq!(status("/health/ready"), 200);
    assert_eq!(get_json(&gw.url("/health/ready"))["ready"], true);
    assert_eq!(get_json(&gw.url("/health/live"))["alive"], true);
    client()
        .post(engine.url("/mock/health"))
        .body(r#"{"healthy":false}"#)
        .send()
        .unwrap();
    wait_until(Duration::from_secs(10), "readiness to turn 503", || {
        status("/health/ready") == 503
    });
    let v = get_json(&gw.url("/health/ready"));
    assert_eq!(v["ready"], false);
    assert!(v["reason"].is_string());
    assert_eq!(status("/health/live"), 200);
    assert_eq!(status("/health"), 503, "no backend: unhealthy");
    let health = get_json(&gw.url("/health"));
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["healthy_services"], "0/1");
    assert_eq!(health["loaded_models"], 0);
    assert_eq!(health["model_status"]["tiny-chat"]["status"], "unavailable");
    client()
        .post(engine.url("/mock/health"))
        .body(r#"{"healthy":true}"#)
        .send()
        .unwrap();
    wait_until(Duration::from_secs(10), "readiness to return", || {
        status("/health/ready") == 200
    });
}

#[test]
fn services_and_stats_count_requests_and_errors_per_backend() {
    let good = mock(&["--model", "tiny-chat", "--name", "good"]);
    let bad = mock(&["--model", "tiny-chat", "--fail-status", "500"]);
    let gw = gateway(&one_pool(&[good.addr, bad.addr], "", ""));
    wait_healthy(&gw, 2);
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .body(chat_body("tiny-chat", false))
            .send()
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    // the in-flight slot is released in the access-log hook, just after the answer
    wait_until(Duration::from_secs(5), "in-flight back to 0", || {
        get_json(&gw.url("/services"))["services"]
            .as_array()
            .is_some_and(|l| l.iter().all(|s| s["inflight"] == 0))
    });
    let services = get_json(&gw.url("/services"));
    assert_eq!(services["total"], 2);
    let list = services["services"].as_array().unwrap();
    let by_url = |addr: std::net::SocketAddr| {
        list.iter()
            .find(|s| s["url"] == format!("http://{addr}"))
            .unwrap()
            .clone()
    };
    let (g, b) = (by_url(good.addr), by_url(bad.addr));
    let failed = statuses.iter().filter(|&&s| s == 500).count() as u64;
    assert_eq!(
        g["request_count"].as_u64().unwrap() + b["request_count"].as_u64().unwrap(),
        10
    );
    assert_eq!(b["request_count"].as_u64(), Some(failed));
    assert_eq!(b["error_count"].as_u64(), Some(failed));
    assert_eq!(g["error_count"], 0);
    assert_eq!(g["healthy"], true);
    assert_eq!(g["models"][0], "tiny-chat");
    assert!(g["response_time"].as_f64().unwrap() > 0.0);
    assert_eq!(g["inflight"], 0);
    let stats = get_json(&gw.url("/stats"));
    assert_eq!(stats["total_services"], 2);
    assert_eq!(stats["healthy_services"], 2);
    assert_eq!(stats["services"].as_array().map(Vec::len), Some(2));
}

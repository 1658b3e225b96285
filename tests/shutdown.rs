//! Graceful shutdown: on SIGTERM an open stream keeps flowing during the
//! grace period, then ends with an OpenAI error event (not a cut
//! connection), and the process exits soon after; SIGINT is fast.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::io::Read;
use std::time::{Duration, Instant};

fn open_stream(gw: &Proc) -> std::net::TcpStream {
    let mut raw = raw_connect(gw.addr);
    let body = chat_body("tiny-chat", true);
    write_all(
        &mut raw,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    raw
}

fn signal(gw: &Proc, sig: &str) {
    std::process::Command::new("kill")
        .args([&format!("-{sig}"), &gw.child.id().to_string()])
        .status()
        .unwrap();
}

fn exits_within(gw: &mut Proc, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if gw.child.try_wait().unwrap().is_some() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "the gateway did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_lets_streams_run_for_the_grace_period_then_ends_them_cleanly() {
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--tokens",
        "200",
        "--token-interval-ms",
        "100",
    ]);
    let mut gw = gateway(&one_pool(&[engine.addr], "", "  grace_period: 3s\n"));
    wait_healthy(&gw, 1);
    let mut stream = open_stream(&gw);
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while seen.windows(6).filter(|w| w == b"data: ").count() < 2 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let t0 = Instant::now();
    signal(&gw, "TERM");
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut rest = String::new();
    let _ = stream.read_to_string(&mut rest);
    let ended_after = t0.elapsed();
    // chunks kept coming during the grace period ...
    assert!(
        rest.matches("\"delta\"").count() >= 10,
        "the stream kept flowing after SIGTERM:\n{rest}"
    );
    // ... then one OpenAI error event, no [DONE]
    let event = rest
        .lines()
        .find(|l| l.starts_with("data: {\"error\""))
        .unwrap_or_else(|| panic!("no error event at the end:\n{rest}"));
    assert!(event.contains("server_shutting_down"), "{event}");
    assert!(!rest.contains("[DONE]"));
    assert!(
        ended_after >= Duration::from_millis(1500) && ended_after < Duration::from_secs(10),
        "ended {ended_after:?} after SIGTERM (grace 3 s)"
    );
    exits_within(&mut gw, Duration::from_secs(20));
}

#[test]
fn sigint_is_fast() {
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--tokens",
        "200",
        "--token-interval-ms",
        "100",
    ]);
    let mut gw = gateway(&one_pool(&[engine.addr], "", "  grace_period: 30s\n"));
    wait_healthy(&gw, 1);
    let mut stream = open_stream(&gw);
    // the stream is under way: its first bytes arrived
    let mut first = [0u8; 64];
    assert!(stream.read(&mut first).unwrap() > 0);
    signal(&gw, "INT");
    let took = exits_within(&mut gw, Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(10),
        "SIGINT took {took:?} despite a 30 s grace"
    );
}

/// One request on a keep-alive connection, which then stays open and idle.
fn idle_keep_alive(gw: &Proc) -> std::net::TcpStream {
    let mut conn = raw_connect(gw.addr);
    write_all(&mut conn, b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    conn
}

#[test]
fn an_idle_gateway_exits_soon_after_sigterm_not_after_the_grace_period() {
    let engine = mock(&["--model", "tiny-chat"]);
    let mut gw = gateway(&one_pool(&[engine.addr], "", "  grace_period: 30s\n"));
    wait_healthy(&gw, 1);
    let _idle = idle_keep_alive(&gw);
    signal(&gw, "TERM");
    let took = exits_within(&mut gw, Duration::from_secs(40));
    assert!(
        took < Duration::from_secs(6),
        "an idle gateway took {took:?} to stop (grace 30 s)"
    );
    assert!(gw.stderr().contains("nothing in flight"), "{}", gw.stderr());
}

#[test]
fn sigterm_waits_for_an_open_stream_then_exits_at_once() {
    let engine = mock(&[
        "--model",
        "tiny-chat",
        "--tokens",
        "30",
        "--token-interval-ms",
        "100",
    ]);
    let mut gw = gateway(&one_pool(&[engine.addr], "", "  grace_period: 30s\n"));
    wait_healthy(&gw, 1);
    let mut stream = open_stream(&gw);
    let mut first = [0u8; 64];
    assert!(stream.read(&mut first).unwrap() > 0);
    let t0 = Instant::now();
    signal(&gw, "TERM");
    let mut rest = String::new();
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let _ = stream.read_to_string(&mut rest);
    let stream_ended = t0.elapsed();
    assert!(rest.contains("[DONE]"), "the stream was cut:\n{rest}");
    let took = exits_within(&mut gw, Duration::from_secs(40));
    assert!(
        took < stream_ended + Duration::from_secs(4),
        "exited {took:?} after SIGTERM; the stream ended at {stream_ended:?}"
    );
}

#[test]
fn drain_delay_keeps_serving_with_readiness_503_first() {
    let engine = mock(&["--model", "tiny-chat"]);
    let mut gw = gateway(&one_pool(
        &[engine.addr],
        "",
        "  grace_period: 30s\n  drain_delay: 3s\n",
    ));
    wait_healthy(&gw, 1);
    let t0 = Instant::now();
    signal(&gw, "TERM");
    wait_until(Duration::from_secs(3), "readiness 503", || {
        client()
            .get(gw.url("/health/ready"))
            .send()
            .map(|r| r.status().as_u16() == 503)
            .unwrap_or(false)
    });
    // still served during the delay, with Connection: close
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .body(chat_body("tiny-chat", false))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "checked within the delay"
    );
    let took = exits_within(&mut gw, Duration::from_secs(40));
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(9),
        "exited {took:?} after SIGTERM with a 3 s drain_delay"
    );
}

//! WebSocket upgrades are proxied (Nginx's `proxy_set_header Upgrade`): the
//! 101 comes from the engine, frames flow both ways, the same auth applies,
//! and an unknown model is an OpenAI-shaped 404 before any upgrade.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// RFC 6455's example: the accept value for `KEY`.
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn handshake(s: &mut TcpStream, target: &str, extra: &str) -> String {
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    write_all(s, req.as_bytes());
    // read up to the end of the response head
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert!(
            n > 0,
            "closed during the handshake: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A masked client text frame (payload < 126 bytes).
fn text_frame(text: &str) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Read one unmasked server frame: (opcode, payload).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    let len = (head[1] & 0x7f) as usize;
    assert!(len < 126, "short frames only in this test");
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (head[0] & 0x0f, payload)
}

#[test]
fn websocket_upgrades_are_proxied_both_ways() {
    let (engine, gw) = engine_behind_gateway(&[], "");
    let mut s = raw_connect(gw.addr);
    let head = handshake(&mut s, "/ws/echo?model=tiny-chat", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains(ACCEPT), "{head}");
    for text in ["hello", "second message through the gateway"] {
        s.write_all(&text_frame(text)).unwrap();
        let (opcode, payload) = read_frame(&mut s);
        assert_eq!(opcode, 1);
        assert_eq!(payload, text.as_bytes());
    }
    // close: the engine answers with a close frame
    s.write_all(&[0x88, 0x80, 1, 2, 3, 4]).unwrap();
    let (opcode, _) = read_frame(&mut s);
    assert_eq!(opcode, 8);
    let stats = get_json(&format!("http://{}/mock/stats", engine.addr));
    // two text frames echoed, one socket opened through the gateway
    assert_eq!(stats["ws_frames"], 2, "{stats}");
    assert_eq!(stats["ws_opened"], 1, "{stats}");
    // the access log has the upgrade, with its status
    wait_until(std::time::Duration::from_secs(5), "the access line", || {
        gw.stderr().contains("\"endpoint\":\"websocket\"") && gw.stderr().contains("\"status\":101")
    });

    // an unknown model: an OpenAI 404, no upgrade
    let mut s = raw_connect(gw.addr);
    let head = handshake(&mut s, "/ws/echo?model=nope", "");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

#[test]
fn websocket_upgrades_need_the_same_credentials() {
    let dir = tempfile::tempdir().unwrap().keep();
    let keys = dir.join("keys.json");
    std::fs::write(
        &keys,
        r#"{"keys": [{"key": "sk-ws-test-key", "user": "ws"}]}"#,
    )
    .unwrap();
    let top = format!(
        "filters:\n  - auth: {{ api_keys_file: \"{}\" }}",
        keys.display()
    );
    let (engine, gw) = engine_behind_gateway(&[], &top);
    let mut s = raw_connect(gw.addr);
    let head = handshake(&mut s, "/ws/echo?model=tiny-chat", "");
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let mut s = raw_connect(gw.addr);
    let head = handshake(
        &mut s,
        "/ws/echo?model=tiny-chat",
        "Authorization: Bearer sk-ws-test-key\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(&text_frame("hi")).unwrap();
    assert_eq!(read_frame(&mut s).1, b"hi");
    let stats = get_json(&format!("http://{}/mock/stats", engine.addr));
    assert_eq!(
        stats["ws_opened"], 1,
        "only the authenticated upgrade: {stats}"
    );
}

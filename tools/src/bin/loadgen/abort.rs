//! Time from a client abort to the upstream connection closing.
//!
//! The loadgen is both ends: it serves as the upstream engine itself (health
//! checks, `/v1/models`, and a streaming chat completion that sends one
//! token and then waits), so the moment the proxy closes the upstream
//! connection is seen on the same clock as the moment the client hung up.
//! Aborts run one at a time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::http::{connect, find, Error, Response, Target};
use crate::sse::{classify, Event, Splitter};
use crate::stats::summary;

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
const TOKEN: &str = "data: {\"id\":\"chatcmpl-abort\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"mock-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok0 \"},\"finish_reason\":null}]}\n\n";

fn small(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serve one upstream connection: answer GETs, start a never-ending stream
/// on a POST and report (via `closed`) when the peer closes during it.
async fn serve_conn(mut s: TcpStream, closed: mpsc::UnboundedSender<Instant>) -> Result<(), Error> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // one request: head, then Content-Length bytes of body
        let head_end = loop {
            if let Some(i) = find(&pending, b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while pending.len() < head_end + 4 + len {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buf[..n]);
        }
        pending.drain(..head_end + 4 + len);
        if head.starts_with("get /v1/models") {
            s.write_all(&small(
                "200 OK",
                r#"{"object":"list","data":[{"id":"mock-model","object":"model"}]}"#,
            ))
            .await?;
        } else if head.starts_with("get ") {
            s.write_all(&small("200 OK", r#"{"status":"ok"}"#)).await?;
        } else {
            let mut out = SSE_HEAD.to_vec();
            out.extend_from_slice(format!("{:x}\r\n{TOKEN}\r\n", TOKEN.len()).as_bytes());
            s.write_all(&out).await?;
            // wait for the proxy (or client) to close this connection
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = closed.send(Instant::now());
                        return Ok(());
                    }
                    Ok(_) => {}
                }
            }
        }
    }
}

pub async fn serve(listener: TcpListener, closed: mpsc::UnboundedSender<Instant>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let closed = closed.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(s, closed).await {
                        eprintln!("loadgen abort upstream: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("loadgen abort upstream: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Open a stream through `target`, wait for its first token, hang up; the
/// instant of the hang-up.
async fn open_and_abort(target: &Target, request: &[u8]) -> Result<Instant, Error> {
    let mut s = connect(target.addr).await?;
    s.write_all(request).await?;
    let mut buf = vec![0u8; 8192];
    let mut resp = Response::new();
    let mut split = Splitter::default();
    let mut first = false;
    while !first {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err("closed before the first token".into());
        }
        resp.feed(Some(&buf[..n]), &mut |b| {
            split.push(b, &mut |ev| {
                first |= matches!(classify(ev), Event::Token { .. })
            })
        })?;
        if resp.status != 0 && resp.status != 200 {
            return Err(format!("status {}", resp.status).into());
        }
    }
    let at = Instant::now();
    drop(s);
    Ok(at)
}

pub async fn run_abort(
    listen: SocketAddr,
    target: Target,
    request: Vec<u8>,
    count: usize,
    ready_timeout: Duration,
) -> Result<Value, Error> {
    let listener = TcpListener::bind(listen).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(serve(listener, tx));
    // the proxy routes to us once its health check has passed
    let deadline = Instant::now() + ready_timeout;
    loop {
        match open_and_abort(&target, &request).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "no stream through {} within {ready_timeout:?}: {e}",
                    target.host
                )
                .into())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    while rx.try_recv().is_ok() {}
    let mut samples = Vec::with_capacity(count);
    let mut timeouts = 0u64;
    for _ in 0..count {
        let at = open_and_abort(&target, &request).await?;
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(closed)) => {
                samples.push(closed.saturating_duration_since(at).as_micros() as u64)
            }
            _ => timeouts += 1,
        }
        // let the previous close settle before the next abort
        tokio::time::sleep(Duration::from_millis(5)).await;
        while rx.try_recv().is_ok() {}
    }
    Ok(json!({
        "mode": "abort",
        "aborts": count,
        "not_closed_within_5s": timeouts,
        "abort_to_upstream_close_us": summary(&mut samples),
    }))
}

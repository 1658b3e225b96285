//! Streaming measurements against the mock engine (directly or through a
//! proxy): time to first token, per-chunk delay (receive time minus the
//! mock's send stamp, one clock), coalesced chunks; and holding many streams
//! open at once for memory measurements.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

use crate::http::{connect, Error, Response, Target};
use crate::sse::{classify, Event, Splitter};
use crate::stats::summary;

pub struct StreamOpts {
    pub target: Target,
    pub request: Vec<u8>,
    pub streams: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub coalesce_gap_us: u64,
}

#[derive(Default)]
struct Samples {
    requests: u64,
    errors: u64,
    first_error: Option<String>,
    ttft_us: Vec<u64>,
    chunk_delay_us: Vec<u64>,
    chunks: u64,
    coalesced: u64,
}

fn realtime_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What one streamed response yielded.
#[derive(Default)]
struct One {
    status: u16,
    keep_alive: bool,
    ttft_us: Option<u64>,
    chunk_delay_us: Vec<u64>,
    coalesced: u64,
}

/// Send one streaming request and read its response to the end, stamping
/// every read.
async fn one_stream(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut [u8],
    coalesce_gap_us: u64,
) -> Result<One, Error> {
    let sent = Instant::now();
    stream.write_all(request).await?;
    let mut resp = Response::new();
    let mut split = Splitter::default();
    let mut one = One::default();
    let mut reads: u64 = 0;
    // (token index, read number, send stamp) of the last token chunk seen
    let mut last_token: Option<(u32, u64, u64)> = None;
    while !resp.is_done() {
        let n = stream.read(buf).await?;
        let at = Instant::now();
        let at_us = realtime_us();
        reads += 1;
        let mut events: Vec<Event> = Vec::new();
        resp.feed((n > 0).then(|| &buf[..n]), &mut |body| {
            split.push(body, &mut |ev| events.push(classify(ev)));
        })?;
        for ev in events {
            if let Event::Token { index, sent_us } = ev {
                if index == 0 {
                    one.ttft_us = Some(at.duration_since(sent).as_micros() as u64);
                }
                if let Some(s) = sent_us {
                    one.chunk_delay_us.push(at_us.saturating_sub(s));
                }
                // coalesced: delivered in the same read as the previous token
                // although the mock sent them at least `coalesce_gap_us` apart
                // (chunks the mock itself sent back to back do not count)
                if let (Some((prev, read, prev_sent)), Some(s)) = (last_token, sent_us) {
                    if index == prev + 1 && read == reads && s >= prev_sent + coalesce_gap_us {
                        one.coalesced += 1;
                    }
                }
                last_token = Some((index, reads, sent_us.unwrap_or(0)));
            }
        }
        if n == 0 && !resp.is_done() {
            return Err("connection closed mid-response".into());
        }
    }
    split.clear();
    one.status = resp.status;
    one.keep_alive = resp.keep_alive;
    Ok(one)
}

/// `streams` concurrent clients, each streaming request after request on a
/// keep-alive connection for `warmup + duration`; samples after the warm-up.
pub async fn run_stream(o: StreamOpts) -> Value {
    let samples = Rc::new(RefCell::new(Samples::default()));
    let start = Instant::now();
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
    let request: Rc<[u8]> = o.request.into();
    let local = tokio::task::LocalSet::new();
    for _ in 0..o.streams {
        let samples = samples.clone();
        let request = request.clone();
        let addr = o.target.addr;
        let gap = o.coalesce_gap_us;
        local.spawn_local(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut conn: Option<TcpStream> = None;
            while Instant::now() < end {
                let mut stream = match conn.take() {
                    Some(s) => s,
                    None => match connect(addr).await {
                        Ok(s) => s,
                        Err(e) => {
                            note_error(&samples, &e.to_string());
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let began = Instant::now();
                match one_stream(&mut stream, &request, &mut buf, gap).await {
                    Ok(one) => {
                        if began >= measure_from {
                            let mut s = samples.borrow_mut();
                            s.requests += 1;
                            if one.status != 200 {
                                s.errors += 1;
                                s.first_error
                                    .get_or_insert_with(|| format!("status {}", one.status));
                            }
                            s.ttft_us.extend(one.ttft_us);
                            s.chunks += one.chunk_delay_us.len() as u64;
                            s.chunk_delay_us.extend_from_slice(&one.chunk_delay_us);
                            s.coalesced += one.coalesced;
                        }
                        if one.keep_alive {
                            conn = Some(stream);
                        }
                    }
                    Err(e) => note_error(&samples, &e.to_string()),
                }
            }
        });
    }
    local.await;
    let elapsed = start.elapsed().saturating_sub(o.warmup).as_secs_f64();
    let mut s = samples.take();
    json!({
        "mode": "stream",
        "streams": o.streams,
        "seconds": elapsed,
        "requests": s.requests,
        "errors": s.errors,
        "first_error": s.first_error,
        "chunks": s.chunks,
        "coalesced": s.coalesced,
        "ttft_us": summary(&mut s.ttft_us),
        "chunk_delay_us": summary(&mut s.chunk_delay_us),
    })
}

fn note_error(samples: &Rc<RefCell<Samples>>, e: &str) {
    let mut s = samples.borrow_mut();
    s.errors += 1;
    s.first_error.get_or_insert_with(|| e.to_owned());
}

pub struct HoldOpts {
    pub target: Target,
    pub request: Vec<u8>,
    pub streams: usize,
    pub connect_concurrency: usize,
    pub ready_timeout: Duration,
}

/// Open `streams` streams, wait until each has received its first token,
/// print a `ready` line, hold them until a line (or EOF) on stdin, then
/// close them all and print `closed`.
pub async fn run_hold(o: HoldOpts) -> Result<(), Error> {
    let ready = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(o.connect_concurrency.max(1)));
    let request: Arc<[u8]> = o.request.into();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(o.streams);
    for _ in 0..o.streams {
        let (ready, failed, gate, request) =
            (ready.clone(), failed.clone(), gate.clone(), request.clone());
        let mut stop = stop_rx.clone();
        let addr = o.target.addr;
        tasks.push(tokio::spawn(async move {
            let opened = async {
                let _permit = gate.acquire().await?;
                let mut s = connect(addr).await?;
                s.write_all(&request).await?;
                let mut buf = vec![0u8; 4096];
                let mut resp = Response::new();
                let mut split = Splitter::default();
                let mut first = false;
                while !first {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Err::<_, Error>("closed before the first token".into());
                    }
                    resp.feed(Some(&buf[..n]), &mut |b| {
                        split.push(b, &mut |ev| {
                            first |= matches!(classify(ev), Event::Token { .. })
                        })
                    })?;
                }
                Ok(s)
            };
            match opened.await {
                Ok(mut s) => {
                    ready.fetch_add(1, Ordering::Relaxed);
                    let mut sink = [0u8; 1024];
                    loop {
                        tokio::select! {
                            _ = stop.changed() => break,
                            r = s.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { break },
                        }
                    }
                }
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("loadgen hold: a stream failed: {e}");
                    }
                }
            }
        }));
    }
    let deadline = start + o.ready_timeout;
    while ready.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < o.streams
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{}",
        json!({"event": "ready", "open": ready.load(Ordering::Relaxed),
               "failed": failed.load(Ordering::Relaxed),
               "seconds": start.elapsed().as_secs_f64()})
    );
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let _ = tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut line).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    println!("{}", json!({"event": "closed"}));
    Ok(())
}

//! Non-streaming load: a fixed request rate (open loop) or as fast as the
//! connections go (closed loop), with every latency kept.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::http::{connect, roundtrip, Target};
use crate::stats::summary;

pub struct LoadOpts {
    pub target: Target,
    pub request: Vec<u8>,
    pub connections: usize,
    /// Requests per second over all connections; `None` = closed loop.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub warmup: Duration,
}

#[derive(Default)]
struct Samples {
    ok: u64,
    non2xx: u64,
    errors: u64,
    first_error: Option<String>,
    /// From writing the request to the end of the response.
    latency_us: Vec<u64>,
    /// From the scheduled send time (open loop: includes waiting for a free
    /// connection and timer lateness).
    from_schedule_us: Vec<u64>,
}

/// Open loop: request `i` is due at `start + i / rate`; each connection
/// takes the next due request when it is free, so a slow response delays the
/// following ones and shows in `from_schedule_us` (no coordinated omission).
/// Tokio's timer has 1 ms granularity: several due requests may leave
/// together, which both configurations of a comparison see alike.
pub async fn run_load(o: LoadOpts) -> Value {
    let samples = Rc::new(RefCell::new(Samples::default()));
    let next = Rc::new(Cell::new(0u64));
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
    let request: Rc<[u8]> = o.request.into();
    let local = tokio::task::LocalSet::new();
    for _ in 0..o.connections.max(1) {
        let (samples, next, request) = (samples.clone(), next.clone(), request.clone());
        let addr = o.target.addr;
        let rate = o.rate;
        local.spawn_local(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut conn: Option<TcpStream> = None;
            loop {
                let due = match rate {
                    Some(r) => {
                        let i = next.get();
                        next.set(i + 1);
                        let due = start + Duration::from_secs_f64(i as f64 / r);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                if due >= end {
                    break;
                }
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
                let sent = Instant::now();
                let r = roundtrip(&mut stream, &request, &mut buf).await;
                let done = Instant::now();
                let mut s = samples.borrow_mut();
                match r {
                    Ok((status, keep_alive)) => {
                        if due >= measure_from {
                            if (200..300).contains(&status) {
                                s.ok += 1;
                            } else {
                                s.non2xx += 1;
                                s.first_error
                                    .get_or_insert_with(|| format!("status {status}"));
                            }
                            s.latency_us
                                .push(done.duration_since(sent).as_micros() as u64);
                            s.from_schedule_us
                                .push(done.saturating_duration_since(due).as_micros() as u64);
                        }
                        if keep_alive {
                            conn = Some(stream);
                        }
                    }
                    Err(e) => {
                        s.errors += 1;
                        s.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        });
    }
    local.await;
    let mut s = samples.take();
    let secs = o.duration.as_secs_f64();
    json!({
        "mode": if o.rate.is_some() { "rate" } else { "closed" },
        "connections": o.connections,
        "target_rate": o.rate,
        "seconds": secs,
        "ok": s.ok,
        "non2xx": s.non2xx,
        "errors": s.errors,
        "first_error": s.first_error,
        "achieved_rate": (s.ok + s.non2xx) as f64 / secs,
        "latency_us": summary(&mut s.latency_us),
        "from_schedule_us": summary(&mut s.from_schedule_us),
    })
}

fn note_error(samples: &Rc<RefCell<Samples>>, e: &str) {
    let mut s = samples.borrow_mut();
    s.errors += 1;
    s.first_error.get_or_insert_with(|| e.to_owned());
}

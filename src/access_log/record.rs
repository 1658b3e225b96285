//! One access line: the [`Record`] of a finished request, rendered as JSON or
//! `key=value` text, and the notice for lost lines.

use std::cell::RefCell;
use std::io::Write;
use std::time::SystemTime;

use serde::Serializer;

use super::Format;

/// Scratch buffers larger than this are given back after use.
const SCRATCH_KEEP: usize = 64 * 1024;
/// `{"time":""` — how the derived serializer starts a record without a time.
const EMPTY_TIME_PREFIX: &[u8] = b"{\"time\":\"\"";

/// One finished request. All strings are already secret-free (the gateway
/// passes the path without query, user names from the keys file, never a
/// key or token).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Record<'a> {
    /// RFC 3339 UTC with milliseconds; filled by [`AccessLog::write`] if
    /// empty. Must stay the first field (see `EMPTY_TIME_PREFIX`).
    pub time: String,
    pub request_id: &'a str,
    /// Client IP:port.
    pub client: Option<String>,
    pub user: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Written rounded to the microsecond.
    #[serde(serialize_with = "ms")]
    pub duration_ms: f64,
    pub endpoint: &'a str,
    pub model: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub backend: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// "reported" | "estimated"
    pub usage: Option<&'a str>,
    /// Time to the first byte of the response body; rounded to the microsecond.
    #[serde(serialize_with = "opt_ms")]
    pub ttft_ms: Option<f64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub stream: bool,
    /// Error code.
    pub error: Option<&'a str>,
    pub client_gone: bool,
    /// Time waited in the pool's dispatch queue; rounded to the microsecond.
    #[serde(serialize_with = "opt_ms")]
    pub queue_ms: Option<f64>,
    /// Retries on another backend before the first byte.
    pub retries: u32,
    /// The model that served the request instead of `model` (`fallbacks`).
    pub fallback: Option<&'a str>,
}

fn round_ms(v: f64) -> f64 {
    if v.is_finite() {
        (v * 1000.0).round() / 1000.0
    } else {
        v
    }
}

fn ms<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_ms(*v))
}

fn opt_ms<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&round_ms(*v)),
        None => s.serialize_none(),
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// The line for `record`, newline included, in an exactly-sized buffer.
pub(super) fn render(format: Format, record: &Record<'_>) -> Option<Vec<u8>> {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let line = render_with(&mut scratch, format, record);
            if scratch.capacity() > SCRATCH_KEEP {
                *scratch = Vec::with_capacity(1024);
            }
            line
        }
        // not reachable (render does not call itself); stay correct anyway
        Err(_) => render_with(&mut Vec::new(), format, record),
    })
}

fn render_with(scratch: &mut Vec<u8>, format: Format, record: &Record<'_>) -> Option<Vec<u8>> {
    scratch.clear();
    let mut stamp = Stamp::default();
    let time: &[u8] = if record.time.is_empty() {
        stamp.now()
    } else {
        record.time.as_bytes()
    };
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *scratch, record).ok()?;
            let line = if record.time.is_empty() && scratch.starts_with(EMPTY_TIME_PREFIX) {
                // `{"time":"` + stamp + `"` + the rest of the serialized record
                let rest = &scratch[EMPTY_TIME_PREFIX.len()..];
                let mut line = Vec::with_capacity(9 + time.len() + 1 + rest.len() + 1);
                line.extend_from_slice(b"{\"time\":\"");
                line.extend_from_slice(time);
                line.push(b'"');
                line.extend_from_slice(rest);
                line.push(b'\n');
                line
            } else {
                let mut line = Vec::with_capacity(scratch.len() + 1);
                line.extend_from_slice(scratch);
                line.push(b'\n');
                line
            };
            Some(line)
        }
        Format::Text => {
            write_text(scratch, time, record);
            scratch.push(b'\n');
            Some(scratch.as_slice().to_vec())
        }
    }
}

/// `<time> <request_id> <METHOD> <path> status=… dur_ms=… ttfb_ms=… endpoint=…
/// user=… model=… pool=… backend=… client=… stream=… req_bytes=… resp_bytes=…
/// prompt_tokens=… completion_tokens=… usage=… error=… client_gone=… queue_ms=…
/// retries=… fallback=…`:
/// the process log's access line (same keys, same order, `-` for none) with
/// the time in front and `client`, `stream` added. Values with spaces,
/// quotes, `=` or control characters are written as JSON strings.
fn write_text(out: &mut Vec<u8>, time: &[u8], r: &Record<'_>) {
    out.extend_from_slice(time);
    out.push(b' ');
    text_value(out, r.request_id);
    out.push(b' ');
    text_value(out, r.method);
    out.push(b' ');
    text_value(out, r.path);
    let _ = write!(
        out,
        " status={} dur_ms={:.3} ttfb_ms=",
        r.status, r.duration_ms
    );
    match r.ttft_ms {
        Some(t) => {
            let _ = write!(out, "{t:.3}");
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" endpoint=");
    text_value(out, r.endpoint);
    out.extend_from_slice(b" user=");
    text_opt(out, r.user);
    out.extend_from_slice(b" model=");
    text_opt(out, r.model);
    out.extend_from_slice(b" pool=");
    text_opt(out, r.pool);
    out.extend_from_slice(b" backend=");
    text_opt(out, r.backend.as_deref());
    out.extend_from_slice(b" client=");
    text_opt(out, r.client.as_deref());
    let _ = write!(
        out,
        " stream={} req_bytes={} resp_bytes={} prompt_tokens=",
        r.stream, r.request_bytes, r.response_bytes
    );
    num_opt(out, r.prompt_tokens);
    out.extend_from_slice(b" completion_tokens=");
    num_opt(out, r.completion_tokens);
    out.extend_from_slice(b" usage=");
    text_opt(out, r.usage);
    out.extend_from_slice(b" error=");
    text_opt(out, r.error);
    let _ = write!(out, " client_gone={} queue_ms=", r.client_gone);
    match r.queue_ms {
        Some(t) => {
            let _ = write!(out, "{t:.3}");
        }
        None => out.push(b'-'),
    }
    let _ = write!(out, " retries={} fallback=", r.retries);
    text_opt(out, r.fallback);
}

fn text_opt(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(v) => text_value(out, v),
        None => out.push(b'-'),
    }
}

fn num_opt(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push(b'-'),
    }
}

/// `v` as is, or as a JSON string when it is empty or could break the line
/// apart (whitespace, quotes, `=`, control characters).
fn text_value(out: &mut Vec<u8>, v: &str) {
    let plain = !v.is_empty()
        && v.bytes()
            .all(|b| b > b' ' && b != b'"' && b != b'=' && b != 0x7f);
    if plain {
        out.extend_from_slice(v.as_bytes());
    } else {
        let _ = serde_json::to_writer(&mut *out, v);
    }
}

/// `2026-11-21T22:31:00.123Z` without allocating.
#[derive(Default)]
struct Stamp {
    buf: [u8; 32],
    len: usize,
}

impl Stamp {
    fn now(&mut self) -> &[u8] {
        let mut cursor = std::io::Cursor::new(&mut self.buf[..]);
        let _ = write!(
            cursor,
            "{}",
            humantime::format_rfc3339_millis(SystemTime::now())
        );
        self.len = usize::try_from(cursor.position()).unwrap_or(0);
        &self.buf[..self.len]
    }
}

#[derive(Clone, Copy)]
pub(super) enum Loss {
    QueueFull,
    WriteError,
}

/// The line reporting `count` lost lines: JSON
/// `{"time":…,"event":"access_log_dropped","dropped":N,"reason":"queue_full"|"write_error"}`,
/// or text `<time> [infergate] N access lines dropped: …`.
pub(super) fn notice(format: Format, count: u64, loss: Loss) -> Vec<u8> {
    let mut stamp = Stamp::default();
    let time = String::from_utf8_lossy(stamp.now()).into_owned();
    let mut line = match format {
        Format::Json => {
            let reason = match loss {
                Loss::QueueFull => "queue_full",
                Loss::WriteError => "write_error",
            };
            serde_json::json!({
                "time": time,
                "event": "access_log_dropped",
                "dropped": count,
                "reason": reason,
            })
            .to_string()
        }
        Format::Text => {
            let why = match loss {
                Loss::QueueFull => "the access log writer fell behind",
                Loss::WriteError => "the access log could not be written",
            };
            format!("{time} [infergate] {count} access lines dropped: {why}")
        }
    }
    .into_bytes();
    line.push(b'\n');
    line
}

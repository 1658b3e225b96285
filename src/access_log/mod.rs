//! Access log: one line per finished request, JSON or `key=value` text, to
//! stderr, stdout or a size/age-rotated file.
//!
//! The request path only serializes the record (into a per-thread scratch
//! buffer, then one exactly-sized allocation) and hands the line to a bounded
//! channel; it never waits on I/O. One writer thread writes the lines in
//! batches, like `logging.rs`: everything queued, one flush, then a 5 ms
//! pause so that senders need not wake it for every line. When the writer
//! falls behind by `QUEUE_LINES`, lines are dropped (counted) and the number
//! dropped is written to the log afterwards.
//!
//! File output rotates before a line would push the file past
//! `max_size_bytes`, or at the first batch after the file is older than
//! `max_age`: `access.log.{max_files-1}` → `.{max_files}` … `access.log` →
//! `access.log.1`, and a fresh `access.log`. If the file is moved or deleted
//! by someone else (logrotate), the writer notices within a second and opens
//! a new one at the configured path; no signal is needed. Write errors never
//! stop the gateway: they are reported (at most once a minute) and the
//! affected lines are counted as lost.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serializer;

/// Default size limit of the access log file before it is rotated.
pub const DEFAULT_MAX_SIZE_BYTES: u64 = 100 * 1024 * 1024;
/// Default age of the access log file after which it is rotated.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Default number of rotated files kept.
pub const DEFAULT_MAX_FILES: usize = 7;

/// Lines the writer may fall behind before lines are dropped.
const QUEUE_LINES: usize = 65_536;
/// Longest a line waits before it is written (beyond the write itself).
const BATCH_PAUSE: Duration = Duration::from_millis(5);
/// Most lines written between two flushes (and two rotation-by-age checks).
const BATCH_LINES: usize = 8192;
/// Buffered bytes that trigger a write in the middle of a batch.
const FLUSH_BYTES: usize = 256 * 1024;
/// How often the file at the configured path is compared with the open one.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// After a failed rotation, how long to keep appending before trying again.
const ROTATE_RETRY: Duration = Duration::from_secs(60);
/// At most one I/O error report per this interval.
const ERROR_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// Scratch buffers larger than this are given back after use.
const SCRATCH_KEEP: usize = 64 * 1024;
/// `{"time":""` — how the derived serializer starts a record without a time.
const EMPTY_TIME_PREFIX: &[u8] = b"{\"time\":\"\"";

/// Where access lines go.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Stderr,
    Stdout,
    File(FileOutput),
}

/// A rotated access log file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileOutput {
    pub path: PathBuf,
    /// Rotate when the file would exceed this many bytes (default 100 MiB);
    /// 0 = never by size. A single line longer than this still gets written
    /// (alone in its file).
    pub max_size_bytes: u64,
    /// Rotate when the current file is older than this (default 24h); None =
    /// never by age. Age counts from the file's creation time where the file
    /// system reports it, else from when the gateway opened it.
    pub max_age: Option<Duration>,
    /// Rotated files kept (default 7); older ones are deleted. 0 = keep none
    /// (rotation truncates).
    pub max_files: usize,
}

impl FileOutput {
    /// `path` with the default limits.
    pub fn new(path: impl Into<PathBuf>) -> FileOutput {
        FileOutput {
            path: path.into(),
            max_size_bytes: DEFAULT_MAX_SIZE_BYTES,
            max_age: Some(DEFAULT_MAX_AGE),
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line, keys as in [`Record`].
    Json,
    /// `time request_id METHOD path status=… dur_ms=… …`, like the process
    /// log's access line.
    Text,
}

/// Access log settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub enabled: bool,
    pub format: Format,
    pub output: Output,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: true,
            format: Format::Json,
            output: Output::Stderr,
        }
    }
}

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

/// The access log: cheap to call from every request; lines are written by a
/// background thread. Dropping it writes what is queued and stops the thread.
pub struct AccessLog {
    format: Format,
    /// None when disabled.
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
    /// Lines queued, and lines the writer has written and flushed: equal
    /// when nothing is pending.
    queued: AtomicU64,
    written: Arc<AtomicU64>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.tx.is_some())
            .field("format", &self.format)
            .finish()
    }
}

impl AccessLog {
    /// Start the writer (a dedicated thread). File output: the file is
    /// opened (created with its parent directories) before this returns, so
    /// an unwritable path is an `Err` naming it; rotated files beyond
    /// `max_files` are deleted. Disabled: no thread, `write` does nothing.
    pub fn start(config: AccessLogConfig) -> Result<AccessLog, String> {
        let (mut log, writer) = Self::unstarted(config, QUEUE_LINES)?;
        if let Some((rx, sink)) = writer {
            let dropped = log.dropped.clone();
            let written = log.written.clone();
            let format = log.format;
            let handle = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_batches(rx, dropped, written, sink, format))
                .map_err(|e| format!("access log: cannot start the writer thread: {e}"))?;
            log.writer = Some(handle);
        }
        Ok(log)
    }

    /// Everything but the thread (tests fill the queue before it runs).
    fn unstarted(
        config: AccessLogConfig,
        queue: usize,
    ) -> Result<(AccessLog, Option<WriterParts>), String> {
        let mut log = AccessLog {
            format: config.format,
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
            queued: AtomicU64::new(0),
            written: Arc::new(AtomicU64::new(0)),
            writer: None,
        };
        if !config.enabled {
            return Ok((log, None));
        }
        let sink = match config.output {
            Output::Stderr => Sink::Stream(StreamSink::new(Stream::Stderr)),
            Output::Stdout => Sink::Stream(StreamSink::new(Stream::Stdout)),
            Output::File(file) => Sink::File(RotatingFile::open(file, Instant::now())?),
        };
        let (tx, rx) = sync_channel(queue);
        log.tx = Some(tx);
        Ok((log, Some((rx, sink))))
    }

    /// Wait (at most `limit`) until every line queued so far is written and
    /// flushed, before the process exits.
    pub fn flush_before_exit(&self, limit: std::time::Duration) {
        let deadline = Instant::now() + limit;
        let target = self.queued.load(Ordering::Acquire);
        while self.written.load(Ordering::Acquire) < target && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Whether lines are written at all (callers may skip building a record).
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Serialize `record` and hand it to the writer without blocking. If the
    /// writer is `QUEUE_LINES` behind, the line is dropped and counted.
    pub fn write(&self, record: &Record<'_>) {
        let Some(tx) = &self.tx else {
            return;
        };
        let Some(line) = render(self.format, record) else {
            return;
        };
        match tx.try_send(line) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Release);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // closing the channel ends the writer once it has written the queue
        self.tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// What the writer thread runs on: the queue's receiving end and the output.
type WriterParts = (Receiver<Vec<u8>>, Sink);

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// The line for `record`, newline included, in an exactly-sized buffer.
fn render(format: Format, record: &Record<'_>) -> Option<Vec<u8>> {
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

fn write_batches(
    rx: Receiver<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    mut sink: Sink,
    format: Format,
) {
    while let Ok(first) = rx.recv() {
        sink.begin_batch(Instant::now());
        sink.write_line(&first);
        let mut lines = 1;
        while lines < BATCH_LINES {
            match rx.try_recv() {
                Ok(next) => {
                    sink.write_line(&next);
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        let queue_full = dropped.swap(0, Ordering::Relaxed);
        if queue_full > 0 {
            sink.write_notice(&notice(format, queue_full, Loss::QueueFull));
        }
        let io = sink.take_lost();
        if io > 0 {
            sink.write_notice(&notice(format, io, Loss::WriteError));
        }
        sink.flush();
        written.fetch_add(lines as u64, Ordering::Release);
        // Let lines pile up briefly: while this thread sleeps, senders never
        // have to wake it, and the next batch is written with one syscall.
        std::thread::sleep(BATCH_PAUSE);
    }
    sink.flush();
}

#[derive(Clone, Copy)]
enum Loss {
    QueueFull,
    WriteError,
}

/// The line reporting `count` lost lines: JSON
/// `{"time":…,"event":"access_log_dropped","dropped":N,"reason":"queue_full"|"write_error"}`,
/// or text `<time> [infergate] N access lines dropped: …`.
fn notice(format: Format, count: u64, loss: Loss) -> Vec<u8> {
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

/// I/O errors, reported through `log` at most once per `ERROR_REPORT_INTERVAL`.
#[derive(Default)]
struct Complaints {
    last: Option<Instant>,
    suppressed: u64,
}

impl Complaints {
    fn report(&mut self, now: Instant, what: std::fmt::Arguments<'_>) {
        if let Some(last) = self.last {
            if now.saturating_duration_since(last) < ERROR_REPORT_INTERVAL {
                self.suppressed += 1;
                return;
            }
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        if suppressed > 0 {
            log::error!(target: "access_log", "{what} ({suppressed} more errors in the last minute)");
        } else {
            log::error!(target: "access_log", "{what}");
        }
        self.last = Some(now);
    }
}

enum Sink {
    Stream(StreamSink),
    File(RotatingFile),
}

#[derive(Clone, Copy)]
enum Stream {
    Stderr,
    Stdout,
}

/// stderr or stdout, written once per batch like logging.rs: the stream is
/// locked per write only, so other code can still print.
struct StreamSink {
    stream: Stream,
    buf: Vec<u8>,
    complaints: Complaints,
}

impl StreamSink {
    fn new(stream: Stream) -> StreamSink {
        StreamSink {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            complaints: Complaints::default(),
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let (result, name) = match self.stream {
            Stream::Stderr => (std::io::stderr().write_all(&self.buf), "stderr"),
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                (
                    out.write_all(&self.buf).and_then(|()| out.flush()),
                    "stdout",
                )
            }
        };
        if let Err(e) = result {
            self.complaints
                .report(Instant::now(), format_args!("cannot write to {name}: {e}"));
        }
        self.buf.clear();
    }
}

impl Sink {
    fn begin_batch(&mut self, now: Instant) {
        if let Sink::File(file) = self {
            file.begin_batch(now);
        }
    }

    fn write_line(&mut self, line: &[u8]) {
        match self {
            Sink::Stream(stream) => {
                stream.buf.extend_from_slice(line);
                if stream.buf.len() >= FLUSH_BYTES {
                    stream.flush();
                }
            }
            Sink::File(file) => file.write_line(line),
        }
    }

    /// A line about lost lines: not itself counted if lost.
    fn write_notice(&mut self, line: &[u8]) {
        match self {
            Sink::File(file) => file.push(line, 0),
            Sink::Stream(_) => self.write_line(line),
        }
    }

    /// Lines that could not be written since the last call.
    fn take_lost(&mut self) -> u64 {
        match self {
            Sink::File(file) => std::mem::take(&mut file.lost_lines),
            // nothing to tell a stream that failed
            Sink::Stream(_) => 0,
        }
    }

    fn flush(&mut self) {
        match self {
            Sink::Stream(stream) => stream.flush(),
            Sink::File(file) => file.flush(),
        }
    }
}

/// The access log file, rotated by size and age, reopened when moved away.
/// Time comes from the caller (`begin_batch(now)`) so tests can drive it.
struct RotatingFile {
    cfg: FileOutput,
    /// None after a failed (re)open; retried every `CHECK_INTERVAL`.
    file: Option<File>,
    /// (device, inode) of `file`, to notice it was moved or replaced.
    id: Option<(u64, u64)>,
    /// Bytes in `file` (not counting `buf`).
    size: u64,
    /// When the current file was created (or opened, where the file system
    /// does not say).
    opened_at: Instant,
    last_check: Instant,
    /// Time of the current batch.
    now: Instant,
    /// No rotation before this (after one failed).
    rotate_after: Option<Instant>,
    buf: Vec<u8>,
    /// Lines that could not be written, reported in the file when it works again.
    lost_lines: u64,
    lines_in_buf: u64,
    complaints: Complaints,
}

impl RotatingFile {
    /// Create the directories, delete rotated files beyond `max_files`, open
    /// the file for appending.
    fn open(cfg: FileOutput, now: Instant) -> Result<RotatingFile, String> {
        let mut file = RotatingFile {
            cfg,
            file: None,
            id: None,
            size: 0,
            opened_at: now,
            last_check: now,
            now,
            rotate_after: None,
            buf: Vec::with_capacity(64 * 1024),
            lost_lines: 0,
            lines_in_buf: 0,
            complaints: Complaints::default(),
        };
        file.try_open()
            .map_err(|e| format!("access log {}: {e}", file.cfg.path.display()))?;
        file.prune();
        Ok(file)
    }

    fn try_open(&mut self) -> std::io::Result<()> {
        self.file = None;
        self.id = None;
        let path = &self.cfg.path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // client addresses and user names: not for everyone to read
            options.mode(0o640);
        }
        let file = options.open(path)?;
        let meta = file.metadata()?;
        self.size = meta.len();
        self.id = file_id(&meta);
        let age = meta
            .created()
            .ok()
            .and_then(|created| SystemTime::now().duration_since(created).ok())
            .unwrap_or_default();
        self.opened_at = self.now.checked_sub(age).unwrap_or(self.now);
        self.last_check = self.now;
        self.file = Some(file);
        Ok(())
    }

    fn reopen(&mut self) {
        if let Err(e) = self.try_open() {
            let path = self.cfg.path.display().to_string();
            self.complaints
                .report(self.now, format_args!("cannot open {path}: {e}"));
        }
    }

    /// Delete `<path>.N` for N > max_files.
    fn prune(&mut self) {
        for (old, e) in crate::rotate::prune(&self.cfg.path, self.cfg.max_files) {
            let old = old.display().to_string();
            self.complaints
                .report(self.now, format_args!("cannot delete {old}: {e}"));
        }
    }

    fn begin_batch(&mut self, now: Instant) {
        self.now = now;
        if now.saturating_duration_since(self.last_check) >= CHECK_INTERVAL {
            self.last_check = now;
            self.check_path();
        }
        if let Some(max_age) = self.cfg.max_age {
            if self.file.is_some() && now.saturating_duration_since(self.opened_at) >= max_age {
                if self.size + self.buf.len() as u64 == 0 {
                    // nothing to keep: do not make an empty rotated file
                    self.opened_at = now;
                } else if self.may_rotate() {
                    self.rotate();
                }
            }
        }
    }

    /// Reopen when the path no longer names our file (moved, deleted,
    /// replaced) or nothing is open; resync the size (truncated by someone).
    fn check_path(&mut self) {
        let Some(file) = &self.file else {
            self.reopen();
            return;
        };
        let current = std::fs::metadata(&self.cfg.path).ok();
        let same = match (&current, self.id) {
            (Some(meta), Some(id)) => file_id(meta) == Some(id),
            (Some(_), None) => true, // no inode numbers here: cannot tell
            (None, _) => false,
        };
        if same {
            if let Ok(meta) = file.metadata() {
                self.size = meta.len();
            }
        } else {
            // lines already queued go to the old file, then a fresh one
            self.flush();
            self.reopen();
        }
    }

    fn may_rotate(&self) -> bool {
        self.rotate_after.is_none_or(|t| self.now >= t)
    }

    fn write_line(&mut self, line: &[u8]) {
        self.push(line, 1);
    }

    /// Buffer `line`, rotating first if it would not fit; `lines` is what it
    /// counts for if lost.
    fn push(&mut self, line: &[u8], lines: u64) {
        if self.file.is_none() {
            self.lost_lines += lines;
            return;
        }
        let max = self.cfg.max_size_bytes;
        if max > 0 {
            let current = self.size + self.buf.len() as u64;
            if current > 0 && current + line.len() as u64 > max && self.may_rotate() {
                self.rotate();
                if self.file.is_none() {
                    self.lost_lines += lines;
                    return;
                }
            }
        }
        self.buf.extend_from_slice(line);
        self.lines_in_buf += lines;
        if self.buf.len() >= FLUSH_BYTES {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.lines_in_buf);
        let result = match &mut self.file {
            Some(file) => file.write_all(&self.buf),
            None => Err(std::io::Error::other("not open")),
        };
        match result {
            Ok(()) => self.size += self.buf.len() as u64,
            Err(e) => {
                self.lost_lines += lines;
                let path = self.cfg.path.display().to_string();
                self.complaints
                    .report(self.now, format_args!("cannot write {path}: {e}"));
            }
        }
        self.buf.clear();
    }

    /// `.{max-1}` → `.{max}`, …, `.1` → `.2`, file → `.1`, then a fresh file.
    /// If that fails, keep appending to the file and try again in a minute.
    fn rotate(&mut self) {
        self.flush();
        self.file = None;
        match self.shift() {
            Ok(()) => self.rotate_after = None,
            Err(e) => {
                let path = self.cfg.path.display().to_string();
                self.complaints
                    .report(self.now, format_args!("cannot rotate {path}: {e}"));
                self.rotate_after = Some(self.now + ROTATE_RETRY);
            }
        }
        self.reopen();
    }

    fn shift(&self) -> std::io::Result<()> {
        crate::rotate::shift(&self.cfg.path, self.cfg.max_files)
    }
}

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_id(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn record() -> Record<'static> {
        Record {
            request_id: "req-1",
            client: Some("10.0.0.7:51234".into()),
            user: Some("alice"),
            method: "POST",
            path: "/v1/chat/completions",
            status: 200,
            duration_ms: 1.208_333_3,
            endpoint: "chat_completions",
            model: Some("tiny-chat"),
            pool: Some("chat"),
            backend: Some("127.0.0.1:18001".into()),
            prompt_tokens: Some(12),
            completion_tokens: Some(34),
            usage: Some("reported"),
            ttft_ms: Some(1.198),
            request_bytes: 81,
            response_bytes: 334,
            stream: true,
            error: None,
            client_gone: false,
            ..Record::default()
        }
    }

    const KEYS: [&str; 24] = [
        "time",
        "request_id",
        "client",
        "user",
        "method",
        "path",
        "status",
        "duration_ms",
        "endpoint",
        "model",
        "pool",
        "backend",
        "prompt_tokens",
        "completion_tokens",
        "usage",
        "ttft_ms",
        "request_bytes",
        "response_bytes",
        "stream",
        "error",
        "client_gone",
        "queue_ms",
        "retries",
        "fallback",
    ];

    fn file_config(dir: &Path, max_size_bytes: u64, max_files: usize) -> AccessLogConfig {
        AccessLogConfig {
            enabled: true,
            format: Format::Json,
            output: Output::File(FileOutput {
                path: dir.join("logs").join("access.log"),
                max_size_bytes,
                max_age: None,
                max_files,
            }),
        }
    }

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn json_line_has_every_key() {
        let line = render(Format::Json, &record()).unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.len(), line.capacity(), "right-sized buffer");
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let object = value.as_object().unwrap();
        for key in KEYS {
            assert!(object.contains_key(key), "missing {key}: {value}");
        }
        assert_eq!(object.len(), KEYS.len());
        let time = value["time"].as_str().unwrap();
        assert_eq!(time.len(), "2026-11-21T22:31:00.123Z".len(), "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
        assert_eq!(value["duration_ms"], 1.208);
        assert_eq!(value["error"], serde_json::Value::Null);
        assert_eq!(value["status"], 200);
        assert_eq!(value["stream"], true);
        assert_eq!(value["client"], "10.0.0.7:51234");

        // a given time is kept; None fields are null
        let given = Record {
            time: "2026-01-02T03:04:05.006Z".into(),
            ..Record::default()
        };
        let value: serde_json::Value =
            serde_json::from_slice(&render(Format::Json, &given).unwrap()).unwrap();
        assert_eq!(value["time"], "2026-01-02T03:04:05.006Z");
        assert_eq!(value["model"], serde_json::Value::Null);
        assert_eq!(value["ttft_ms"], serde_json::Value::Null);
        assert_eq!(value.as_object().unwrap().len(), KEYS.len());
    }

    #[test]
    fn text_line() {
        let mut r = record();
        r.time = "2026-11-21T22:31:00.123Z".into();
        let line = String::from_utf8(render(Format::Text, &r).unwrap()).unwrap();
        assert_eq!(
            line,
            "2026-11-21T22:31:00.123Z req-1 POST /v1/chat/completions status=200 dur_ms=1.208 \
             ttfb_ms=1.198 endpoint=chat_completions user=alice model=tiny-chat pool=chat \
             backend=127.0.0.1:18001 client=10.0.0.7:51234 stream=true req_bytes=81 resp_bytes=334 \
             prompt_tokens=12 completion_tokens=34 usage=reported error=- client_gone=false \
             queue_ms=- retries=0 fallback=-\n"
        );

        // nothing in a value can split the line or forge a key
        let odd = Record {
            request_id: "a b",
            model: Some("x\ny error=forged"),
            user: Some(""),
            ..Record::default()
        };
        let line = String::from_utf8(render(Format::Text, &odd).unwrap()).unwrap();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.contains(" \"a b\" "), "{line}");
        assert!(line.contains(r#"model="x\ny error=forged""#), "{line}");
        assert!(line.contains(r#"user="""#), "{line}");
        assert!(line.contains(" ttfb_ms=- "), "{line}");
    }

    #[test]
    fn rotates_at_the_size_limit_and_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = file_config(dir.path(), 1024, 2);
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        // left over from a run with more files: deleted at start
        std::fs::write(logs.join("access.log.5"), "old\n").unwrap();
        std::fs::write(logs.join("access.log.other"), "not ours\n").unwrap();

        let log = AccessLog::start(config).unwrap();
        assert!(!logs.join("access.log.5").exists());
        assert!(logs.join("access.log.other").exists());
        for i in 0..40 {
            let id = format!("req-{i}");
            log.write(&Record {
                request_id: &id,
                ..record()
            });
        }
        drop(log); // writes the queue, stops the writer

        let current = logs.join("access.log");
        for path in [
            &current,
            &logs.join("access.log.1"),
            &logs.join("access.log.2"),
        ] {
            let len = std::fs::metadata(path).unwrap().len();
            assert!(len > 0 && len <= 1024, "{} is {len} bytes", path.display());
            for line in read_lines(path) {
                serde_json::from_str::<serde_json::Value>(&line).unwrap();
            }
        }
        assert!(!logs.join("access.log.3").exists());
        let last = read_lines(&current).pop().unwrap();
        assert!(last.contains("\"req-39\""), "{last}");
    }

    #[test]
    fn rotates_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let t0 = Instant::now();
        let mut file = RotatingFile::open(
            FileOutput {
                path: path.clone(),
                max_size_bytes: 0,
                max_age: Some(Duration::from_secs(3600)),
                max_files: 3,
            },
            t0,
        )
        .unwrap();
        file.begin_batch(t0);
        file.write_line(b"one\n");
        file.flush();
        file.begin_batch(t0 + Duration::from_secs(1800));
        file.write_line(b"two\n");
        file.flush();
        assert!(!dir.path().join("access.log.1").exists());

        file.begin_batch(t0 + Duration::from_secs(3601));
        file.write_line(b"three\n");
        file.flush();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("access.log.1")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");

        // the new file's age counts from its rotation
        file.begin_batch(t0 + Duration::from_secs(3601 + 1800));
        file.write_line(b"four\n");
        file.flush();
        assert!(!dir.path().join("access.log.2").exists());
        file.begin_batch(t0 + Duration::from_secs(3601 + 3601));
        file.write_line(b"five\n");
        file.flush();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("access.log.2")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("access.log.1")).unwrap(),
            "three\nfour\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "five\n");
    }

    #[test]
    fn counts_and_reports_drops_when_the_queue_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, writer) = AccessLog::unstarted(file_config(dir.path(), 0, 1), 2).unwrap();
        for _ in 0..5 {
            log.write(&record()); // the writer is not running: 2 fit, 3 dropped
        }
        assert_eq!(log.dropped.load(Ordering::Relaxed), 3);

        let (rx, sink) = writer.unwrap();
        let dropped = log.dropped.clone();
        log.writer = Some(std::thread::spawn(move || {
            write_batches(rx, dropped, Arc::new(AtomicU64::new(0)), sink, Format::Json)
        }));
        drop(log);

        let lines = read_lines(&dir.path().join("logs").join("access.log"));
        assert_eq!(lines.len(), 3, "{lines:?}");
        let notice: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(notice["event"], "access_log_dropped");
        assert_eq!(notice["dropped"], 3);
        assert_eq!(notice["reason"], "queue_full");

        let text = String::from_utf8(notice_line(Format::Text, 4)).unwrap();
        assert!(
            text.ends_with(
                " [infergate] 4 access lines dropped: the access log writer fell behind\n"
            ),
            "{text}"
        );
    }

    fn notice_line(format: Format, n: u64) -> Vec<u8> {
        notice(format, n, Loss::QueueFull)
    }

    #[test]
    fn reopens_after_an_external_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let moved = dir.path().join("access.log-20261121");
        let t0 = Instant::now();
        let mut file = RotatingFile::open(FileOutput::new(&path), t0).unwrap();
        file.begin_batch(t0);
        file.write_line(b"a\n");
        file.flush();
        std::fs::rename(&path, &moved).unwrap(); // logrotate

        // within the check interval: still the old file
        file.begin_batch(t0 + Duration::from_millis(500));
        file.write_line(b"b\n");
        file.flush();
        assert!(!path.exists());

        file.begin_batch(t0 + Duration::from_millis(1600));
        file.write_line(b"c\n");
        file.flush();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "a\nb\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "c\n");

        // deleted outright: same
        std::fs::remove_file(&path).unwrap();
        file.begin_batch(t0 + Duration::from_millis(3000));
        file.write_line(b"d\n");
        file.flush();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "d\n");
    }

    #[test]
    fn lines_lost_while_the_path_is_unusable_are_reported_after() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let path = logs.join("access.log");
        let t0 = Instant::now();
        let mut sink = Sink::File(RotatingFile::open(FileOutput::new(&path), t0).unwrap());
        sink.begin_batch(t0);
        sink.write_line(b"a\n");
        sink.flush();
        // the directory is moved away and a file takes its name
        std::fs::rename(&logs, dir.path().join("logs.old")).unwrap();
        std::fs::write(&logs, "").unwrap();

        sink.begin_batch(t0 + Duration::from_secs(2)); // reopen fails
        sink.write_line(b"b\n");
        sink.write_line(b"c\n");
        sink.flush();
        assert_eq!(sink.take_lost(), 2);
        sink.begin_batch(t0 + Duration::from_secs(2) + Duration::from_millis(5));
        sink.write_line(b"d\n");
        sink.write_notice(&notice(Format::Json, 2, Loss::WriteError));
        sink.flush();
        assert_eq!(sink.take_lost(), 1, "the notice does not count itself");

        std::fs::remove_file(&logs).unwrap();
        sink.begin_batch(t0 + Duration::from_secs(4)); // reopen works
        sink.write_line(b"e\n");
        sink.write_notice(&notice(Format::Json, 1, Loss::WriteError));
        sink.flush();
        let lines = read_lines(&path);
        assert_eq!(lines[0], "e");
        let notice: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(notice["reason"], "write_error");
        assert_eq!(notice["dropped"], 1);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("logs.old").join("access.log")).unwrap(),
            "a\n"
        );
    }

    #[test]
    fn unwritable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, "").unwrap();
        let path = blocker.join("access.log");
        let err = AccessLog::start(AccessLogConfig {
            output: Output::File(FileOutput::new(&path)),
            ..AccessLogConfig::default()
        })
        .unwrap_err();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn disabled_writes_nothing() {
        let log = AccessLog::start(AccessLogConfig {
            enabled: false,
            ..AccessLogConfig::default()
        })
        .unwrap();
        assert!(!log.is_enabled());
        log.write(&record());
        assert_eq!(log.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<AccessLog>();
    }
}

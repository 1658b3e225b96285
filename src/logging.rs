//! Process logging: `env_logger` formatting, written off the request path by
//! a [`BatchWriter`] to stderr. If the writer falls behind by `QUEUE_LINES`,
//! lines are dropped (never blocking a request) and the number dropped is
//! reported.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use crate::batch_writer::{BatchWriter, Sent, Sink, Stream, StreamSink};

const QUEUE_LINES: usize = 65_536;

static WRITER: OnceLock<BatchWriter> = OnceLock::new();

/// Wait (at most `limit`) until every line logged so far is on stderr, before
/// the process exits (`std::process::exit` does not wait for the writer).
pub fn flush_before_exit(limit: std::time::Duration) {
    if let Some(writer) = WRITER.get() {
        writer.flush_before_exit(limit);
    }
}

/// env_logger's target: hands each formatted line to the writer.
struct ToWriter(&'static BatchWriter);

impl Write for ToWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Sent::Closed(line) = self.0.send(buf.to_vec()) {
            // the writer thread is gone (process exiting): write directly
            let _ = std::io::stderr().write_all(&line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// stderr, with a line when lines were dropped.
struct ProcessLog(StreamSink);

impl Sink for ProcessLog {
    fn begin_batch(&mut self, _now: Instant) {}

    fn write_line(&mut self, line: &[u8]) {
        self.0.write_line(line);
    }

    fn end_batch(&mut self, dropped: u64) {
        if dropped > 0 {
            let notice =
                format!("[infergate] {dropped} log lines dropped: the log writer fell behind\n");
            self.0.write_line(notice.as_bytes());
        }
        self.0.flush();
    }
}

/// Install the logger (level from `RUST_LOG`, default `info`).
pub fn init() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    let sink = ProcessLog(StreamSink::new(Stream::Stderr, "log_writer"));
    if let Ok(writer) = BatchWriter::start("log-writer", QUEUE_LINES, sink) {
        // a second init keeps the first writer (and stops this one)
        let _ = WRITER.set(writer);
    }
    if let Some(writer) = WRITER.get() {
        builder.target(env_logger::Target::Pipe(Box::new(ToWriter(writer))));
    }
    builder.init();
}

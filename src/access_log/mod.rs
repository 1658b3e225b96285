//! Access log: one line per finished request, JSON or `key=value` text, to
//! stderr, stdout or a size/age-rotated file.
//!
//! The request path only serializes the record (into a per-thread scratch
//! buffer, then one exactly-sized allocation) and hands the line to a bounded
//! channel; it never waits on I/O. A [`BatchWriter`] thread writes the lines in
//! batches, like the process log's. When the writer falls behind by
//! `QUEUE_LINES`, lines are dropped (counted) and the number dropped is
//! written to the log afterwards.
//!
//! `record.rs` makes the line (JSON or text), `file.rs` is the rotating file.
//!
//! File output rotates before a line would push the file past
//! `max_size_bytes`, or at the first batch after the file is older than
//! `max_age`: `access.log.{max_files-1}` → `.{max_files}` … `access.log` →
//! `access.log.1`, and a fresh `access.log`. If the file is moved or deleted
//! by someone else (logrotate), the writer notices within a second and opens
//! a new one at the configured path; no signal is needed. Write errors never
//! stop the gateway: they are reported (at most once a minute) and the
//! affected lines are counted as lost.

mod file;
mod record;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::batch_writer::{BatchWriter, Sent, Stream, StreamSink};
use file::RotatingFile;
pub use record::Record;
use record::{notice, render, Loss};

/// Default size limit of the access log file before it is rotated.
pub const DEFAULT_MAX_SIZE_BYTES: u64 = 100 * 1024 * 1024;
/// Default age of the access log file after which it is rotated.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Default number of rotated files kept.
pub const DEFAULT_MAX_FILES: usize = 7;

/// Lines the writer may fall behind before lines are dropped.
const QUEUE_LINES: usize = 65_536;

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

/// The access log: cheap to call from every request; lines are written by a
/// background thread. Dropping it writes what is queued and stops the thread.
pub struct AccessLog {
    format: Format,
    /// None when disabled.
    writer: Option<BatchWriter>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.writer.is_some())
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
        let format = config.format;
        let writer = match AccessSink::open(config)? {
            Some(sink) => Some(
                BatchWriter::start("access-log", QUEUE_LINES, sink)
                    .map_err(|e| format!("access log: cannot start the writer thread: {e}"))?,
            ),
            None => None,
        };
        Ok(AccessLog { format, writer })
    }

    /// Wait (at most `limit`) until every line queued so far is written and
    /// flushed, before the process exits.
    pub fn flush_before_exit(&self, limit: Duration) {
        if let Some(writer) = &self.writer {
            writer.flush_before_exit(limit);
        }
    }

    /// Whether lines are written at all (callers may skip building a record).
    pub fn is_enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Serialize `record` and hand it to the writer without blocking. If the
    /// writer is `QUEUE_LINES` behind, the line is dropped and counted.
    pub fn write(&self, record: &Record<'_>) {
        let Some(writer) = &self.writer else {
            return;
        };
        let Some(line) = render(self.format, record) else {
            return;
        };
        // Closed: only while the process exits; nothing to report it to
        let _: Sent = writer.send(line);
    }
}

/// Where the lines go, and how lost lines are reported there.
struct AccessSink {
    out: Out,
    format: Format,
}

enum Out {
    Stream(StreamSink),
    File(RotatingFile),
}

impl AccessSink {
    /// The sink for `config`, the file opened; `None` when disabled.
    fn open(config: AccessLogConfig) -> Result<Option<AccessSink>, String> {
        if !config.enabled {
            return Ok(None);
        }
        let out = match config.output {
            Output::Stderr => Out::Stream(StreamSink::new(Stream::Stderr, "access_log")),
            Output::Stdout => Out::Stream(StreamSink::new(Stream::Stdout, "access_log")),
            Output::File(file) => Out::File(RotatingFile::open(file, Instant::now())?),
        };
        Ok(Some(AccessSink {
            out,
            format: config.format,
        }))
    }

    /// A line about lost lines: not itself counted if lost.
    fn write_notice(&mut self, line: &[u8]) {
        match &mut self.out {
            Out::File(file) => file.push(line, 0),
            Out::Stream(stream) => stream.write_line(line),
        }
    }

    /// Lines that could not be written since the last call.
    fn take_lost(&mut self) -> u64 {
        match &mut self.out {
            Out::File(file) => file.take_lost(),
            // nothing to tell a stream that failed
            Out::Stream(_) => 0,
        }
    }

    fn flush(&mut self) {
        match &mut self.out {
            Out::Stream(stream) => stream.flush(),
            Out::File(file) => file.flush(),
        }
    }
}

impl crate::batch_writer::Sink for AccessSink {
    fn begin_batch(&mut self, now: Instant) {
        if let Out::File(file) = &mut self.out {
            file.begin_batch(now);
        }
    }

    fn write_line(&mut self, line: &[u8]) {
        match &mut self.out {
            Out::Stream(stream) => stream.write_line(line),
            Out::File(file) => file.write_line(line),
        }
    }

    fn end_batch(&mut self, dropped: u64) {
        if dropped > 0 {
            self.write_notice(&notice(self.format, dropped, Loss::QueueFull));
        }
        let io = self.take_lost();
        if io > 0 {
            self.write_notice(&notice(self.format, io, Loss::WriteError));
        }
        self.flush();
    }
}

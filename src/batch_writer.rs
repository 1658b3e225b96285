//! One writer thread per log, writing lines in batches off the request path.
//!
//! Writing each line where it is made costs a syscall and a lock that the
//! worker threads contend on (≈8% of gateway CPU in `load-tests/`). A
//! [`BatchWriter`] takes lines through a bounded channel and never blocks the
//! sender: one thread writes everything queued (at most [`BATCH_LINES`]),
//! ends the batch with one flush, then pauses [`BATCH_PAUSE`] so that senders
//! need not wake it for every line; a quiet gateway still logs promptly. When
//! the writer falls behind by the queue's length, lines are dropped and
//! counted, and the [`Sink`] is told how many at the end of the next batch.
//!
//! The process log (`logging.rs`) and the access log (`access_log/`) are the
//! two users; they differ only in their sink.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest a line waits before it is written (beyond the write itself).
pub const BATCH_PAUSE: Duration = Duration::from_millis(5);
/// Most lines written between two flushes.
pub const BATCH_LINES: usize = 8192;
/// Buffered bytes that trigger a write in the middle of a batch.
pub const FLUSH_BYTES: usize = 256 * 1024;
/// At most one I/O error report per this interval.
const ERROR_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Where a batch writer's lines go.
pub trait Sink: Send + 'static {
    /// A batch starts at `now` (a file sink checks rotation here).
    fn begin_batch(&mut self, _now: Instant) {}
    /// One line, newline included.
    fn write_line(&mut self, line: &[u8]);
    /// The batch is over: `dropped` lines were refused since the last batch
    /// because the queue was full. Report them if the sink can, then flush.
    fn end_batch(&mut self, dropped: u64);
}

/// What became of a line handed to [`BatchWriter::send`].
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// The queue was full: counted, reported later.
    Dropped,
    /// The writer has stopped (the process is exiting): the line is given back.
    Closed(Vec<u8>),
}

/// A bounded queue of lines and the thread that writes them. Dropping it
/// writes what is queued and stops the thread.
pub struct BatchWriter {
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
    /// Lines queued, and lines the writer has written and flushed: equal
    /// when nothing is pending.
    queued: AtomicU64,
    written: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// Start a writer thread named `name` for `sink`, `queue` lines deep.
    pub fn start(name: &str, queue: usize, sink: impl Sink) -> std::io::Result<BatchWriter> {
        let (mut writer, rx) = BatchWriter::unstarted(queue);
        writer.run(name, rx, sink)?;
        Ok(writer)
    }

    /// The queue without its thread (tests fill it before the writer runs).
    pub(crate) fn unstarted(queue: usize) -> (BatchWriter, Receiver<Vec<u8>>) {
        let (tx, rx) = sync_channel(queue);
        let writer = BatchWriter {
            tx: Some(tx),
            dropped: Arc::new(AtomicU64::new(0)),
            queued: AtomicU64::new(0),
            written: Arc::new(AtomicU64::new(0)),
            thread: None,
        };
        (writer, rx)
    }

    /// Start the thread that drains `rx` into `sink`.
    pub(crate) fn run(
        &mut self,
        name: &str,
        rx: Receiver<Vec<u8>>,
        sink: impl Sink,
    ) -> std::io::Result<()> {
        let dropped = self.dropped.clone();
        let written = self.written.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_batches(rx, dropped, written, sink))?;
        self.thread = Some(handle);
        Ok(())
    }

    /// Queue `line` without blocking.
    pub fn send(&self, line: Vec<u8>) -> Sent {
        let Some(tx) = &self.tx else {
            return Sent::Closed(line);
        };
        match tx.try_send(line) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Release);
                Sent::Queued
            }
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Sent::Dropped
            }
            Err(TrySendError::Disconnected(line)) => Sent::Closed(line),
        }
    }

    /// Lines dropped since the writer last reported them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Wait (at most `limit`) until every line queued so far is written and
    /// flushed, e.g. before the process exits (`std::process::exit` does
    /// not wait for the writer).
    pub fn flush_before_exit(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let target = self.queued.load(Ordering::Acquire);
        while self.written.load(Ordering::Acquire) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for BatchWriter {
    fn drop(&mut self) {
        // closing the channel ends the writer once it has written the queue
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_batches(
    rx: Receiver<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    mut sink: impl Sink,
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
        sink.end_batch(dropped.swap(0, Ordering::Relaxed));
        written.fetch_add(lines as u64, Ordering::Release);
        // Let lines pile up briefly: while this thread sleeps, senders never
        // have to wake it, and the next batch is written with one syscall.
        std::thread::sleep(BATCH_PAUSE);
    }
    sink.end_batch(dropped.swap(0, Ordering::Relaxed));
}

/// I/O errors, reported through `log` at most once per minute.
pub struct Complaints {
    target: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl Complaints {
    /// Reports go to the `log` target `target`.
    pub fn new(target: &'static str) -> Complaints {
        Complaints {
            target,
            last: None,
            suppressed: 0,
        }
    }

    pub fn report(&mut self, now: Instant, what: std::fmt::Arguments<'_>) {
        if let Some(last) = self.last {
            if now.saturating_duration_since(last) < ERROR_REPORT_INTERVAL {
                self.suppressed += 1;
                return;
            }
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        if suppressed > 0 {
            log::error!(target: self.target, "{what} ({suppressed} more errors in the last minute)");
        } else {
            log::error!(target: self.target, "{what}");
        }
        self.last = Some(now);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stderr,
    Stdout,
}

/// stderr or stdout, written once per batch (or per [`FLUSH_BYTES`]): the
/// stream is locked per write only, so other code can still print.
pub struct StreamSink {
    stream: Stream,
    buf: Vec<u8>,
    complaints: Complaints,
}

impl StreamSink {
    /// Write errors are reported to the `log` target `target`.
    pub fn new(stream: Stream, target: &'static str) -> StreamSink {
        StreamSink {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            complaints: Complaints::new(target),
        }
    }

    pub fn write_line(&mut self, line: &[u8]) {
        self.buf.extend_from_slice(line);
        if self.buf.len() >= FLUSH_BYTES {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// One batch: its lines, and the drops the sink was told of at its end.
    type Batch = (Vec<String>, u64);

    /// Records batches (and the lines of the one open).
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Batch>>>, Arc<Mutex<Vec<String>>>);

    impl Sink for Recorder {
        fn write_line(&mut self, line: &[u8]) {
            if let Ok(mut open) = self.1.lock() {
                open.push(String::from_utf8_lossy(line).into_owned());
            }
        }
        fn end_batch(&mut self, dropped: u64) {
            let lines = self.1.lock().map(|mut l| std::mem::take(&mut *l));
            if let (Ok(mut batches), Ok(lines)) = (self.0.lock(), lines) {
                batches.push((lines, dropped));
            }
        }
    }

    #[test]
    fn a_full_queue_drops_counts_and_reports_in_the_next_batch() {
        let (mut writer, rx) = BatchWriter::unstarted(2);
        let sent: Vec<Sent> = (0..5).map(|i| writer.send(vec![b'0' + i])).collect();
        assert_eq!(
            sent,
            [
                Sent::Queued,
                Sent::Queued,
                Sent::Dropped,
                Sent::Dropped,
                Sent::Dropped
            ]
        );
        assert_eq!(writer.dropped(), 3);
        let sink = Recorder::default();
        writer.run("test-writer", rx, sink.clone()).unwrap();
        writer.flush_before_exit(Duration::from_secs(10));
        drop(writer);
        let batches = sink.0.lock().unwrap().clone();
        assert_eq!(batches[0], (vec!["0".to_string(), "1".to_string()], 3));
        // the last end_batch (on close) reports nothing new
        assert_eq!(batches.last().map(|b| b.1), Some(0));
    }

    #[test]
    fn flush_before_exit_returns_once_everything_is_written() {
        let sink = Recorder::default();
        let writer = BatchWriter::start("test-writer", 1024, sink.clone()).unwrap();
        for i in 0..100u8 {
            assert_eq!(writer.send(vec![i]), Sent::Queued);
        }
        writer.flush_before_exit(Duration::from_secs(10));
        let written: usize = sink.0.lock().unwrap().iter().map(|b| b.0.len()).sum();
        assert_eq!(written, 100);
    }

    #[test]
    fn a_stopped_writer_gives_the_line_back() {
        let (writer, rx) = BatchWriter::unstarted(4);
        drop(rx);
        assert_eq!(writer.send(b"x".to_vec()), Sent::Closed(b"x".to_vec()));
    }
}

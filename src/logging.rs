//! Process logging: `env_logger` formatting, written off the request path.
//!
//! Writing each line to stderr costs a syscall and a lock that the worker
//! threads contend on (≈8% of gateway CPU in `load-tests/`). Lines go
//! through a bounded channel to one writer thread that writes batches and
//! flushes whenever the channel runs dry, then pauses 5 ms so that senders
//! need not wake it for every line; a quiet gateway still logs promptly. If the writer falls behind by `QUEUE_LINES`, lines are dropped
//! (never blocking a request) and the number dropped is reported.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

const QUEUE_LINES: usize = 65_536;

/// Lines handed to the writer, and lines it has written and flushed.
static QUEUED: AtomicU64 = AtomicU64::new(0);
static WRITTEN: AtomicU64 = AtomicU64::new(0);

/// Wait (at most `limit`) until every line logged so far is on stderr, before
/// the process exits (`std::process::exit` does not wait for the writer).
pub fn flush_before_exit(limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    let target = QUEUED.load(Ordering::Acquire);
    while WRITTEN.load(Ordering::Acquire) < target && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
/// Longest a line waits before it is written (beyond the write itself).
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

struct ChannelWriter {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.tx.try_send(buf.to_vec()) {
            Ok(()) => {
                QUEUED.fetch_add(1, Ordering::Release);
            }
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                // the writer thread is gone (process exiting): write directly
                let _ = std::io::stderr().write_all(buf);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_batches(rx: Receiver<Vec<u8>>, dropped: Arc<AtomicU64>) {
    // stderr is locked per batch only: other code (e.g. `eprintln!`) must
    // still be able to write
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    while let Ok(first) = rx.recv() {
        let _ = out.write_all(&first);
        let mut lines = 1;
        while let Ok(next) = rx.try_recv() {
            let _ = out.write_all(&next);
            lines += 1;
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(
                out,
                "[infergate] {lost} log lines dropped: the log writer fell behind"
            );
        }
        let _ = out.flush();
        WRITTEN.fetch_add(lines, Ordering::Release);
        // Let lines pile up briefly: while this thread sleeps, senders never
        // have to wake it, and the next batch is written with one syscall.
        std::thread::sleep(BATCH_PAUSE);
    }
}

/// Install the logger (level from `RUST_LOG`, default `info`).
pub fn init() {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer = ChannelWriter {
        tx,
        dropped: dropped.clone(),
    };
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_batches(rx, dropped));
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if spawned.is_ok() {
        builder.target(env_logger::Target::Pipe(Box::new(writer)));
    }
    builder.init();
}

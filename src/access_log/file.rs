//! The access log file, rotated by size and age, reopened when moved away.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use super::FileOutput;
use crate::batch_writer::{Complaints, FLUSH_BYTES};

/// How often the file at the configured path is compared with the open one.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// After a failed rotation, how long to keep appending before trying again.
const ROTATE_RETRY: Duration = Duration::from_secs(60);

/// The access log file, rotated by size and age, reopened when moved away.
/// Time comes from the caller (`begin_batch(now)`) so tests can drive it.
pub(super) struct RotatingFile {
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
    pub(super) fn open(cfg: FileOutput, now: Instant) -> Result<RotatingFile, String> {
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
            complaints: Complaints::new("access_log"),
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

    pub(super) fn begin_batch(&mut self, now: Instant) {
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

    pub(super) fn write_line(&mut self, line: &[u8]) {
        self.push(line, 1);
    }

    /// Buffer `line`, rotating first if it would not fit; `lines` is what it
    /// counts for if lost.
    pub(super) fn push(&mut self, line: &[u8], lines: u64) {
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

    pub(super) fn flush(&mut self) {
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

    /// Lines that could not be written since the last call.
    pub(super) fn take_lost(&mut self) -> u64 {
        std::mem::take(&mut self.lost_lines)
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

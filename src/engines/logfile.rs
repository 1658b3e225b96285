//! A size-rotated log file for an engine's stdout and stderr.
//!
//! `engine.log` is written until the next write would take it past
//! `max_bytes`; then `engine.log` becomes `engine.log.1` (`.1` becomes `.2`,
//! ..., up to `.max_files`, older ones deleted) and a fresh `engine.log` is
//! started. Writes are cut at a line end when one fits, so a line is only split
//! across files when it alone is longer than `max_bytes`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An append-only log file with size rotation. Not buffered: every `write`
/// goes straight to the file.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    /// `None` after a failed reopen; the next write tries again.
    file: Option<File>,
    size: u64,
    /// 0: never rotate.
    max_bytes: u64,
    /// Rotated files kept (`log.1` .. `log.N`); 0: the log is just truncated.
    max_files: usize,
}

impl RotatingLog {
    /// Open (append to) `path`, creating it and its parent directories.
    pub fn open(path: &Path, max_bytes: u64, max_files: usize) -> io::Result<RotatingLog> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                fs::create_dir_all(dir)?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            max_bytes,
            max_files,
        })
    }

    /// Append `buf`, rotating first whenever it would not fit.
    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.max_bytes > 0 && self.size >= self.max_bytes {
                self.rotate();
            }
            let n = if self.max_bytes == 0 {
                buf.len()
            } else {
                let room = usize::try_from(self.max_bytes - self.size).unwrap_or(usize::MAX);
                if room >= buf.len() {
                    buf.len()
                } else {
                    match buf[..room].iter().rposition(|&b| b == b'\n') {
                        Some(i) => i + 1,
                        // The next line does not fit in what is left: start a new file.
                        None if self.size > 0 => {
                            self.rotate();
                            continue;
                        }
                        // One line longer than a whole file: split it.
                        None => room,
                    }
                }
            };
            let file = match &mut self.file {
                Some(f) => f,
                None => {
                    let f = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.path)?;
                    self.size = f.metadata()?.len();
                    self.file.insert(f)
                }
            };
            file.write_all(&buf[..n])?;
            self.size += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Shift the backups, move the log to `.1` and start an empty log. Best
    /// effort: if the log cannot be renamed it is truncated instead, so the
    /// size bound holds either way.
    fn rotate(&mut self) {
        self.file = None;
        // drops any left from a larger max_files, then shifts
        let _ = crate::rotate::prune(&self.path, self.max_files);
        let _ = crate::rotate::shift(&self.path, self.max_files);
        // create + truncate: if the rename failed this empties the old log.
        match OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)
        {
            Ok(f) => self.file = Some(f),
            Err(e) => log::warn!("engine log {}: cannot reopen: {e}", self.path.display()),
        }
        // Even without a file (the next write reopens it), the count restarts:
        // a failure must not make every write rotate again.
        self.size = 0;
    }

    /// `log.N`
    #[cfg(test)]
    fn backup(&self, n: usize) -> PathBuf {
        crate::rotate::backup(&self.path, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn creates_parent_dirs_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/engine.log");
        let mut log = RotatingLog::open(&path, 0, 3).unwrap();
        log.write(b"one\n").unwrap();
        drop(log);
        let mut log = RotatingLog::open(&path, 0, 3).unwrap();
        log.write(b"two\n").unwrap();
        assert_eq!(read(&path), "one\ntwo\n");
    }

    #[test]
    fn rotates_at_line_ends_and_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        let mut log = RotatingLog::open(&path, 20, 2).unwrap();
        // 10-byte lines: two per file.
        for i in 0..7 {
            log.write(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        assert_eq!(read(&path), "line 0006\n");
        assert_eq!(read(&log.backup(1)), "line 0004\nline 0005\n");
        assert_eq!(read(&log.backup(2)), "line 0002\nline 0003\n");
        assert!(!log.backup(3).exists());
    }

    #[test]
    fn a_chunk_is_cut_at_a_line_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        let mut log = RotatingLog::open(&path, 16, 3).unwrap();
        log.write(b"aaaa\nbbbb\ncccc\ndddd\n").unwrap();
        assert_eq!(read(&log.backup(1)), "aaaa\nbbbb\ncccc\n");
        assert_eq!(read(&path), "dddd\n");
    }

    #[test]
    fn a_line_longer_than_a_file_is_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        let mut log = RotatingLog::open(&path, 8, 5).unwrap();
        log.write(b"xy\n").unwrap();
        log.write(b"0123456789abcdefghij\n").unwrap();
        assert_eq!(read(&log.backup(3)), "xy\n");
        assert_eq!(read(&log.backup(2)), "01234567");
        assert_eq!(read(&log.backup(1)), "89abcdef");
        assert_eq!(read(&path), "ghij\n");
    }

    #[test]
    fn zero_max_files_truncates_and_stale_backups_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        let mut log = RotatingLog::open(&path, 10, 0).unwrap();
        log.write(b"123456789\n").unwrap();
        log.write(b"abc\n").unwrap();
        assert_eq!(read(&path), "abc\n");
        assert!(!log.backup(1).exists());

        // Backups beyond a (lowered) max_files are removed at the next rotation.
        for n in 1..=4 {
            fs::write(log.backup(n), format!("old {n}\n")).unwrap();
        }
        let mut log = RotatingLog::open(&path, 10, 2).unwrap();
        log.write(b"123456789\n").unwrap();
        assert_eq!(read(&log.backup(1)), "abc\n");
        assert_eq!(read(&log.backup(2)), "old 1\n");
        assert!(!log.backup(3).exists());
        assert!(!log.backup(4).exists());
        assert_eq!(read(&path), "123456789\n");
    }
}

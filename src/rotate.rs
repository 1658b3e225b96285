//! Numbered backups of a log file, shared by the access log and the engine
//! logs: `<path>.1` is the newest, `<path>.<max_files>` the oldest kept.
//! Each caller keeps its own policy (when to rotate, what to do when a
//! rename fails); the file names and the shifting are here, once.

use std::io;
use std::path::{Path, PathBuf};

/// `<path>.<n>`
pub fn backup(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// `.{max-1}` → `.{max}`, …, `.1` → `.2`, `path` → `.1` (the oldest is
/// deleted); with `max_files` 0, `path` is deleted. Files that are not
/// there are skipped. Stops at the first other error.
pub fn shift(path: &Path, max_files: usize) -> io::Result<()> {
    if max_files == 0 {
        return ignore_missing(std::fs::remove_file(path));
    }
    ignore_missing(std::fs::remove_file(backup(path, max_files)))?;
    for n in (1..max_files).rev() {
        ignore_missing(std::fs::rename(backup(path, n), backup(path, n + 1)))?;
    }
    ignore_missing(std::fs::rename(path, backup(path, 1)))
}

/// Delete `<path>.N` for every N > `max_files` (left from a larger
/// `max_files`); returns what could not be deleted.
pub fn prune(path: &Path, max_files: usize) -> Vec<(PathBuf, io::Error)> {
    let mut failed = Vec::new();
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return failed;
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return failed;
    };
    let prefix = format!("{name}.");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let old = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|suffix| suffix.parse::<usize>().ok())
            .is_some_and(|n| n > max_files);
        if old {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                failed.push((entry.path(), e));
            }
        }
    }
    failed
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_keeps_max_files_and_prunes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        std::fs::write(&path, "now").unwrap();
        std::fs::write(backup(&path, 1), "one").unwrap();
        std::fs::write(backup(&path, 2), "two").unwrap();
        std::fs::write(backup(&path, 5), "left from max_files 5").unwrap();
        shift(&path, 2).unwrap();
        assert!(!path.exists());
        assert_eq!(read(backup(&path, 1)), "now");
        assert_eq!(read(backup(&path, 2)), "one");
        assert!(!backup(&path, 3).exists(), "the oldest goes");
        assert!(prune(&path, 2).is_empty());
        assert!(!backup(&path, 5).exists());
        assert_eq!(read(backup(&path, 2)), "one", "kept ones stay");
        // nothing there: fine; max_files 0 deletes the file
        shift(&path, 2).unwrap();
        std::fs::write(&path, "x").unwrap();
        shift(&path, 0).unwrap();
        assert!(!path.exists());
    }
}

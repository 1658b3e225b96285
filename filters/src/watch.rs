//! Noticing that files changed, by polling their content: one mechanism for
//! the config file (`src/reload.rs`) and the key and users files
//! (`auth::watch`).
//!
//! Each poll reads the files through their paths (symlinks followed) and
//! compares the SHA-256 of their content with what was seen last. This sees
//! in-place edits, atomic renames over a file and Kubernetes ConfigMap
//! updates (the `..data` symlink swapped to a new directory) alike, without
//! inotify. A change counts once the content has stayed the same over a
//! settle pause (editors write in several steps); the caller sleeps, this
//! type only compares, so it serves a thread and an async task alike.

use std::path::PathBuf;

/// The content digest of each file, in order; `None` where it cannot be
/// read (missing, or mid-swap).
pub type Fingerprint = Vec<Option<[u8; 32]>>;

/// The files and the content last seen.
#[derive(Debug, Clone)]
pub struct FileWatch {
    files: Vec<PathBuf>,
    seen: Fingerprint,
}

impl FileWatch {
    /// Watch `files`, taking their content now as seen.
    pub fn new(files: Vec<PathBuf>) -> FileWatch {
        let seen = fingerprint(&files);
        FileWatch { files, seen }
    }

    /// Watch `files`, with `seen` as the content already known (e.g. what
    /// was loaded).
    pub fn with_seen(files: Vec<PathBuf>, seen: Fingerprint) -> FileWatch {
        FileWatch { files, seen }
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The content now.
    pub fn current(&self) -> Fingerprint {
        fingerprint(&self.files)
    }

    /// A poll: the content now, if it differs from what was seen.
    pub fn changed(&self) -> Option<Fingerprint> {
        Some(self.current()).filter(|now| *now != self.seen)
    }

    /// After the settle pause: whether the content is still `candidate`; if
    /// so it becomes what was seen.
    pub fn settled(&mut self, candidate: &Fingerprint) -> bool {
        if self.current() == *candidate {
            self.seen = candidate.clone();
            true
        } else {
            false
        }
    }

    /// Take the content now as seen (after a reload from another trigger).
    pub fn mark_seen(&mut self) {
        self.seen = self.current();
    }
}

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    files
        .iter()
        .map(|f| std::fs::read(f).ok().map(|b| crate::auth::sha256(&b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_counts_once_it_is_stable() {
        let dir = std::env::temp_dir().join(format!("infergate-watch-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.yaml");
        std::fs::write(&file, "one").unwrap();
        let mut watch = FileWatch::new(vec![file.clone()]);
        assert_eq!(watch.changed(), None, "nothing changed");
        std::fs::write(&file, "two").unwrap();
        let candidate = watch.changed().unwrap();
        std::fs::write(&file, "three").unwrap();
        assert!(!watch.settled(&candidate), "still being written");
        let candidate = watch.changed().unwrap();
        assert!(watch.settled(&candidate));
        assert_eq!(watch.changed(), None, "seen now");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            watch.changed(),
            Some(vec![None]),
            "a missing file is a change"
        );
        watch.mark_seen();
        assert_eq!(watch.changed(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Reloading the key and users files when they change.
//!
//! A background thread reads each file once per poll (following symlinks)
//! and compares the SHA-256 of its content with what it saw last. This sees
//! in-place edits, atomic renames over the file and Kubernetes ConfigMap
//! updates (the `..data` symlink swapped to a new directory) alike, without
//! inotify. A change is reloaded once the content has been the same for one
//! settle interval (editors write in several steps); content equal to what is
//! loaded (a `touch`, a reload already done through the admin endpoint) is
//! skipped. A file that fails to load is reported once, then retried only
//! when its content changes again.

use super::{Auth, ReloadReport};
use crate::watch::{FileWatch, Fingerprint};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often to look, and how long a change must be stable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub poll: Duration,
    pub settle: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            poll: Duration::from_secs(1),
            settle: Duration::from_millis(200),
        }
    }
}

/// Hashes of the files as currently loaded, in the order of `files`.
fn loaded(auth: &Auth) -> Fingerprint {
    let snapshot = auth.snapshot();
    let mut out = Vec::with_capacity(2);
    if auth.config.api_keys_file.is_some() {
        out.push(snapshot.keys_hash);
    }
    if auth.config.users_file.is_some() {
        out.push(snapshot.users_hash);
    }
    out
}

/// Start the watcher thread; it ends when the last `Arc<Auth>` is dropped.
pub(crate) fn spawn(
    auth: &Arc<Auth>,
    timing: Timing,
    on_result: Box<dyn Fn(Result<ReloadReport, String>) + Send + Sync>,
) -> Result<(), String> {
    let files: Vec<PathBuf> = [&auth.config.api_keys_file, &auth.config.users_file]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    if files.is_empty() {
        return Ok(());
    }
    let weak: Weak<Auth> = Arc::downgrade(auth);
    let mut watch = FileWatch::with_seen(files, loaded(auth));
    std::thread::Builder::new()
        .name("infergate-auth-watch".into())
        .spawn(move || loop {
            std::thread::sleep(timing.poll);
            if weak.strong_count() == 0 {
                return;
            }
            let Some(mut current) = watch.changed() else {
                continue;
            };
            loop {
                std::thread::sleep(timing.settle);
                if watch.settled(&current) {
                    break;
                }
                current = watch.current();
            }
            let Some(auth) = weak.upgrade() else {
                return;
            };
            if loaded(&auth) == current {
                continue;
            }
            on_result(auth.reload());
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the auth file watcher thread: {e}"))
}

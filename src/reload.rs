//! What triggers a config reload besides `POST /admin/reload`: SIGHUP
//! (systemd's `ExecReload`), and, with `server.watch_config: true`, a change
//! of the file's content.
//!
//! The file is polled once a second through its path (so symlinks are
//! followed and Kubernetes ConfigMap `..data` swaps are seen like atomic
//! renames); a change is applied once the content has been stable for
//! 200 ms, which rides out editors and in-place writes. A content that failed
//! to load is not retried until it changes again.

use crate::state::Live;
use async_trait::async_trait;
use infergate_filters::watch::FileWatch;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

pub struct Reloader {
    pub live: Arc<Live>,
}

const POLL: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_millis(200);

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot listen for SIGHUP, reload with POST /admin/reload: {e}");
                None
            }
        };
        let path = self.live.config_path.clone();
        let watch_file = self.live.current().config.server.watch_config;
        let mut watch = path.clone().map(|p| FileWatch::new(vec![p]));
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sighup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = sighup => {
                    let _ = self.live.reload("SIGHUP").await;
                    if let Some(w) = watch.as_mut() {
                        w.mark_seen();
                    }
                }
                _ = poll.tick(), if watch_file => {
                    let Some(w) = watch.as_mut() else { continue };
                    // a file that cannot be read is mid-swap: next poll
                    let Some(now) = w.changed().filter(|now| now.iter().all(Option::is_some)) else {
                        continue;
                    };
                    tokio::time::sleep(SETTLE).await;
                    if !w.settled(&now) {
                        continue; // still being written: next poll
                    }
                    let _ = self.live.reload("config file changed").await;
                }
            }
        }
    }
}

/// SIGHUP's default action ends the process. Between start and the moment
/// the reload service listens for it, ignore it instead (the listener
/// replaces this disposition; engines started later get the default back at
/// exec, as for any handled signal).
#[allow(unsafe_code)]
pub fn ignore_sighup_until_ready() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory effects.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

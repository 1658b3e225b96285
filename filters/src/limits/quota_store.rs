//! The quota store: each identity's lifetime token usage, kept across restarts.
//!
//! One SQLite file, `<data_dir>/quota.sqlite3`, table
//! `usage(id TEXT PRIMARY KEY, used INTEGER NOT NULL, updated_at INTEGER, user TEXT)`
//! (`updated_at`: Unix seconds; `user`: the identity's display name when last
//! written, so `/admin/usage` can name identities not seen since a restart; a
//! table without it is migrated at open). Only identities with a quota are
//! written.
//! Every row is loaded into memory at open, so admission reads a counter and
//! never touches the disk. Settled requests are written with group commit:
//! the settling thread that finds no commit in progress commits its own usage
//! at once (one UPSERT, `used = used + n`), and keeps committing whatever
//! other threads added meanwhile, in one transaction per round, until nothing
//! is pending. A thread that finds a commit in progress leaves its usage for
//! that committer and returns without waiting on the database, so under load
//! no worker thread queues behind SQLite and one transaction carries many
//! requests.
//!
//! Durability: the database runs in WAL mode with `synchronous=NORMAL`. A
//! committed write is in the WAL file, i.e. in the operating system's page
//! cache, so a crash of the gateway process (panic, OOM kill, `kill -9`)
//! loses nothing committed. Without contention a settle returns after its own
//! commit; with contention its usage is in the round being committed or the
//! next one (microseconds later). There is no fsync per commit:
//! a power loss or kernel crash may lose the last moments of usage, which
//! under-counts, never corrupts. The WAL is checkpointed into the database
//! (with an fsync) by a background thread every second, never inside a
//! request's commit. The file is
//! safe to copy with `sqlite3 quota.sqlite3 .backup` while the gateway runs.
//!
//! When a write fails (disk full, file removed) the usage is still counted in
//! memory and the failure is reported through [`QuotaStore::take_warnings`];
//! the request itself is never failed for it.

use super::lock;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File name inside `data_dir`.
pub const FILE_NAME: &str = "quota.sqlite3";

/// Warnings kept until the gateway collects them; older ones are counted.
const MAX_WARNINGS: usize = 32;

/// Persisted usage counters (see the module docs).
pub(crate) struct QuotaStore {
    /// `None`: memory only (no `data_dir`), lost on restart.
    db: Option<Db>,
    used: Mutex<HashMap<String, Entry>>,
    warnings: Mutex<Warnings>,
}

struct Db {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Usage settled but not yet committed: id → (user, tokens).
    pending: Mutex<HashMap<String, (String, u64)>>,
    /// A thread is committing (it will also commit what is pending).
    committing: AtomicBool,
    /// Tells the checkpoint thread to finish.
    stop_checkpointer: Arc<AtomicBool>,
}

impl Drop for Db {
    fn drop(&mut self) {
        self.stop_checkpointer.store(true, Ordering::Release);
    }
}

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// A thread with its own connection that checkpoints the WAL every
/// [`CHECKPOINT_EVERY`] (PASSIVE: it never blocks the writer), so the fsync
/// of a checkpoint never lands in a request's commit.
fn spawn_checkpointer(path: &Path, stop: Arc<AtomicBool>) -> Result<(), String> {
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    conn.busy_timeout(Duration::from_millis(250))
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("quota-checkpoint".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(CHECKPOINT_EVERY);
                // failures (busy, I/O) are retried next round; the WAL keeps the data
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One identity's persisted total and name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) used: u64,
    pub(crate) user: Option<String>,
}

#[derive(Default)]
struct Warnings {
    kept: Vec<String>,
    dropped: u64,
}

impl QuotaStore {
    /// Open (creating if needed) `dir/quota.sqlite3` and load every counter.
    /// The error names the path and says what to fix.
    pub(crate) fn open(dir: &Path) -> Result<QuotaStore, String> {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create the quota store directory {}: {e}; create it or give the gateway write access (limits.data_dir)",
                dir.display()
            )
        })?;
        let path = dir.join(FILE_NAME);
        let fail = |e: rusqlite::Error| {
            format!(
                "cannot open the quota store {}: {e}; check that the file is a SQLite database the gateway can write (limits.data_dir)",
                path.display()
            )
        };
        let conn = Connection::open(&path).map_err(fail)?;
        // A busy lock (another process, a backup) is waited for briefly, not forever.
        conn.busy_timeout(Duration::from_millis(250))
            .map_err(fail)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(fail)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!(
                "cannot open the quota store {}: the filesystem does not support SQLite's WAL mode (got `{mode}`); put limits.data_dir on a local disk",
                path.display()
            ));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(fail)?;
        // Checkpoints (copying the WAL into the database, with an fsync) run on
        // a background thread, never inside a request's commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(fail)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS usage (
                 id TEXT PRIMARY KEY,
                 used INTEGER NOT NULL,
                 updated_at INTEGER,
                 user TEXT
             );
             BEGIN IMMEDIATE; COMMIT;",
        )
        .map_err(fail)?;
        add_user_column(&conn).map_err(fail)?;
        let used = load(&conn).map_err(fail)?;
        let stop = Arc::new(AtomicBool::new(false));
        spawn_checkpointer(&path, stop.clone()).map_err(|e| {
            format!(
                "cannot start the quota store's checkpoint thread for {}: {e}",
                path.display()
            )
        })?;
        Ok(QuotaStore {
            db: Some(Db {
                path,
                conn: Mutex::new(conn),
                pending: Mutex::default(),
                committing: AtomicBool::new(false),
                stop_checkpointer: stop,
            }),
            used: Mutex::new(used),
            warnings: Mutex::default(),
        })
    }

    /// Counters in memory only, for a gateway without `data_dir`.
    pub(crate) fn in_memory() -> QuotaStore {
        QuotaStore {
            db: None,
            used: Mutex::default(),
            warnings: Mutex::default(),
        }
    }

    /// Whether totals survive a restart.
    pub(crate) fn is_persistent(&self) -> bool {
        self.db.is_some()
    }

    /// The total recorded for `id` (0 if none).
    pub(crate) fn used(&self, id: &str) -> u64 {
        lock(&self.used).get(id).map_or(0, |e| e.used)
    }

    /// Every recorded total, sorted by id.
    pub(crate) fn all(&self) -> Vec<(String, Entry)> {
        let mut all: Vec<_> = lock(&self.used)
            .iter()
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Add `tokens` to `id`'s total (named `user`); persisted by group
    /// commit (see the module docs).
    pub(crate) fn add(&self, id: &str, user: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        {
            let mut used = lock(&self.used);
            let entry = used.entry(id.to_string()).or_default();
            if entry.user.as_deref() != Some(user) {
                entry.user = Some(user.to_string());
            }
            entry.used = entry.used.saturating_add(tokens);
        }
        let Some(db) = &self.db else { return };
        {
            let mut pending = lock(&db.pending);
            let slot = pending
                .entry(id.to_string())
                .or_insert_with(|| (user.to_string(), 0));
            slot.0.clear();
            slot.0.push_str(user);
            slot.1 = slot.1.saturating_add(tokens);
        }
        self.commit_pending(db);
    }

    /// Become the committer unless one is at work, and commit until nothing
    /// is pending.
    fn commit_pending(&self, db: &Db) {
        loop {
            if db.committing.swap(true, Ordering::AcqRel) {
                return; // the committer at work will take what we added
            }
            loop {
                let batch = std::mem::take(&mut *lock(&db.pending));
                if batch.is_empty() {
                    break;
                }
                match db.add_batch(&batch) {
                    Ok(totals) => {
                        // The database's total also counts other writers (e.g.
                        // a Limits from before a config reload still settling).
                        let mut used = lock(&self.used);
                        for (id, db_total) in totals {
                            if let Some(entry) = used.get_mut(&id) {
                                entry.used = entry.used.max(db_total);
                            }
                        }
                    }
                    Err(e) => {
                        let tokens: u64 = batch.values().map(|(_, t)| *t).sum();
                        self.warn(format!(
                            "quota store {}: could not record {tokens} tokens for {} identities: {e}; counted in memory only until the store is writable again",
                            db.path.display(),
                            batch.len()
                        ));
                    }
                }
            }
            db.committing.store(false, Ordering::Release);
            // Something may have been added between our last take and the
            // release; if so, and nobody else took over, commit it too.
            if lock(&db.pending).is_empty() {
                return;
            }
        }
    }

    /// Record a problem for the gateway to log.
    pub(crate) fn warn(&self, message: String) {
        let mut w = lock(&self.warnings);
        if w.kept.len() >= MAX_WARNINGS {
            w.kept.remove(0);
            w.dropped = w.dropped.saturating_add(1);
        }
        w.kept.push(message);
    }

    /// Warnings since the last call, oldest first.
    pub(crate) fn take_warnings(&self) -> Vec<String> {
        let mut w = lock(&self.warnings);
        let mut out = std::mem::take(&mut w.kept);
        if w.dropped > 0 {
            out.insert(
                0,
                format!("{} older limits warnings were dropped", w.dropped),
            );
            w.dropped = 0;
        }
        out
    }
}

impl Db {
    /// One transaction of UPSERTs; returns each row's new total.
    fn add_batch(
        &self,
        batch: &HashMap<String, (String, u64)>,
    ) -> rusqlite::Result<Vec<(String, u64)>> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        let mut totals = Vec::with_capacity(batch.len());
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO usage (id, used, updated_at, user) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET used = used + excluded.used,
                     updated_at = excluded.updated_at, user = excluded.user
                 RETURNING used",
            )?;
            for (id, (user, tokens)) in batch {
                let tokens = i64::try_from(*tokens).unwrap_or(i64::MAX);
                let total: Option<i64> = stmt
                    .query_row(params![id, tokens, now, user], |row| row.get(0))
                    .optional()?;
                if let Some(t) = total {
                    totals.push((id.clone(), u64::try_from(t).unwrap_or(0)));
                }
            }
        }
        tx.commit()?;
        Ok(totals)
    }
}

/// A table created before the `user` column existed gets it.
fn add_user_column(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('usage')")?;
    let names = stmt.query_map([], |row| row.get::<_, String>(0))?;
    for name in names {
        if name? == "user" {
            return Ok(());
        }
    }
    conn.execute_batch("ALTER TABLE usage ADD COLUMN user TEXT")
}

fn load(conn: &Connection) -> rusqlite::Result<HashMap<String, Entry>> {
    let mut stmt = conn.prepare("SELECT id, used, user FROM usage")?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, Option<String>>(2)?,
        ))
    })?;
    let mut used = HashMap::new();
    for row in rows {
        let (id, n, user) = row?;
        let used_n = u64::try_from(n).unwrap_or(0);
        used.insert(id, Entry { used: used_n, user });
    }
    Ok(used)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new() -> Self {
            let dir =
                std::env::temp_dir().join(format!("infergate-limits-{}", uuid::Uuid::new_v4()));
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn totals_survive_close_and_reopen() {
        let dir = TempDir::new();
        let store = QuotaStore::open(&dir.0).unwrap();
        assert!(store.is_persistent());
        store.add("key:aaa", "alice", 100);
        store.add("key:aaa", "alice", 23);
        store.add("user:7", "bob@example.com", 5);
        store.add("user:7", "bob@example.com", 0);
        assert_eq!(store.used("key:aaa"), 123);
        drop(store);
        let store = QuotaStore::open(&dir.0).unwrap();
        assert_eq!(store.used("key:aaa"), 123);
        assert_eq!(store.used("user:7"), 5);
        assert_eq!(store.used("nobody"), 0);
        let entry = |used, user: &str| Entry {
            used,
            user: Some(user.to_string()),
        };
        assert_eq!(
            store.all(),
            vec![
                ("key:aaa".to_string(), entry(123, "alice")),
                ("user:7".to_string(), entry(5, "bob@example.com")),
            ]
        );
    }

    #[test]
    fn totals_survive_a_store_that_was_never_closed() {
        let dir = TempDir::new();
        let store = QuotaStore::open(&dir.0).unwrap();
        store.add("key:bbb", "b", 4096);
        // No destructor, no checkpoint, no close: the data is only in the WAL.
        std::mem::forget(store);
        assert!(dir.0.join("quota.sqlite3-wal").exists());
        let store = QuotaStore::open(&dir.0).unwrap();
        assert_eq!(store.used("key:bbb"), 4096);
    }

    /// Not a test on its own: the child process of
    /// `totals_survive_kill_9`, which writes, says so, and waits to be killed.
    #[test]
    #[ignore = "run by totals_survive_kill_9"]
    fn crash_child() {
        let Some(dir) = std::env::var_os("INFERGATE_QUOTA_CRASH_DIR") else {
            return;
        };
        let store = QuotaStore::open(Path::new(&dir)).unwrap();
        for _ in 0..10 {
            store.add("key:ccc", "c", 7);
        }
        println!("written");
        loop {
            std::thread::park();
        }
    }

    #[test]
    fn totals_survive_kill_9() {
        let dir = TempDir::new();
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "limits::quota_store::tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("INFERGATE_QUOTA_CRASH_DIR", &dir.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let written = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("written"));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        assert!(written, "the child never reported its writes");
        let store = QuotaStore::open(&dir.0).unwrap();
        assert_eq!(store.used("key:ccc"), 70);
    }

    #[test]
    fn a_table_without_the_user_column_is_migrated() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let conn = Connection::open(dir.0.join(FILE_NAME)).unwrap();
        conn.execute_batch(
            "CREATE TABLE usage (id TEXT PRIMARY KEY, used INTEGER NOT NULL, updated_at INTEGER);
             INSERT INTO usage VALUES ('key:old', 42, 0);",
        )
        .unwrap();
        drop(conn);
        let store = QuotaStore::open(&dir.0).unwrap();
        assert_eq!(store.used("key:old"), 42);
        store.add("key:old", "carol", 8);
        drop(store);
        let store = QuotaStore::open(&dir.0).unwrap();
        let all = store.all();
        assert_eq!(all[0].1.used, 50);
        assert_eq!(all[0].1.user.as_deref(), Some("carol"));
    }

    #[test]
    fn an_unusable_path_is_an_error_naming_it() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        // data_dir points at a regular file: nothing can be created under it.
        let file = dir.0.join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = QuotaStore::open(&file).err().unwrap();
        assert!(err.contains("not-a-dir"), "{err}");
        // A file that is not a database.
        let bad = dir.0.join("bad");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join(FILE_NAME), vec![b'z'; 4096]).unwrap();
        let err = QuotaStore::open(&bad).err().unwrap();
        assert!(err.contains(FILE_NAME), "{err}");
    }

    #[test]
    fn memory_store_counts_and_warnings_are_bounded() {
        let store = QuotaStore::in_memory();
        assert!(!store.is_persistent());
        store.add("key:x", "x", 3);
        store.add("key:x", "x", 4);
        assert_eq!(store.used("key:x"), 7);
        for i in 0..40 {
            store.warn(format!("w{i}"));
        }
        let w = store.take_warnings();
        assert_eq!(w.len(), MAX_WARNINGS + 1);
        assert!(w[0].contains("8 older"), "{}", w[0]);
        assert_eq!(w.last().map(String::as_str), Some("w39"));
        assert!(store.take_warnings().is_empty());
    }
}

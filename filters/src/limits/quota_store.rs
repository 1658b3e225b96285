//! The quota store: each identity's lifetime token usage, kept across restarts
//! and crashes.
//!
//! Two parts in `data_dir`:
//! - `quota.sqlite3` (SQLite, WAL mode): table
//!   `usage(id TEXT PRIMARY KEY, used INTEGER NOT NULL, updated_at INTEGER, user TEXT)`
//!   (`updated_at`: Unix seconds; `user`: the identity's display name when last
//!   written, so `/admin/usage` can name identities not seen since a restart)
//!   and `meta(key, value)` holding `folded_journal`, the last journal folded in;
//! - `quota-journal.<N>.log`: an append-only journal, one JSON line per
//!   settled request (`{"i":id,"t":tokens,"u":user}`).
//!
//! Each settled request appends its line with one `write(2)` (O_APPEND, no
//! fsync) before returning: from then on it survives a crash of the gateway
//! process — panic, OOM kill, `kill -9` — because the bytes are in the
//! operating system's page cache. A background thread folds the journal into
//! SQLite once a second: it switches appends to journal N+1, adds journal N's
//! lines to the table in one transaction that also records `folded_journal =
//! N`, then deletes journal N. At open, journals after `folded_journal` are
//! replayed (a torn last line from a crash mid-append is skipped and
//! reported). So the request path costs one small write, SQLite writes once a
//! second, and nothing acknowledged is lost on a process crash; a power loss or
//! kernel crash may lose what was not yet written back to disk (under-counting,
//! never corrupting).
//!
//! Every total is also kept in memory, so admission reads a counter and never
//! touches the disk.
//!
//! Two processes may share a `data_dir` for a while (a zero-downtime upgrade,
//! `infergate --check` next to a running gateway): each appends to journals
//! it created itself (numbers are never reused) and holds an exclusive
//! `flock` on its current one. Opening folds only journals nobody holds
//! (left by a process that exited or crashed); a held journal is read into
//! memory and left to its owner, which folds it itself. Folding and the
//! opening read take `quota.lock`, so a journal is counted exactly once.
//! What the other process records after this one opened is in the database
//! but not in this process's memory until it restarts. When a write fails
//! (disk full, directory removed) the usage is still counted in memory and the
//! failure is reported through [`QuotaStore::take_warnings`]; the request
//! itself is never failed for it. The database can be copied live with
//! `sqlite3 quota.sqlite3 .backup copy.db`.

use super::lock;
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File name inside `data_dir`.
pub const FILE_NAME: &str = "quota.sqlite3";

/// Held (flock) while folding and while an opening store reads the state.
const LOCK_FILE: &str = "quota.lock";

/// Journal files: `quota-journal.<N>.log`.
const JOURNAL_PREFIX: &str = "quota-journal.";
const JOURNAL_SUFFIX: &str = ".log";

/// How often the journal is folded into the database.
const FOLD_EVERY: Duration = Duration::from_secs(1);

/// Warnings kept until the gateway collects them; older ones are counted.
const MAX_WARNINGS: usize = 32;

/// Persisted usage counters (see the module docs).
pub(crate) struct QuotaStore {
    /// `None`: memory only (no `data_dir`), lost on restart.
    db: Option<Arc<Db>>,
    used: Mutex<HashMap<String, Entry>>,
    warnings: Arc<Mutex<Warnings>>,
}

struct Db {
    dir: PathBuf,
    conn: Mutex<Connection>,
    /// The journal appends go to, and its number; this process holds an
    /// exclusive flock on it while the file is open. Appenders take the read
    /// lock (appends with O_APPEND need no more); the fold takes the write
    /// lock only to switch files.
    journal: RwLock<(u64, File)>,
    /// Serializes folds (the background thread, `fold_now`, drop), and holds
    /// the journals switched away from but not folded yet, oldest first: a
    /// journal that failed to fold is retried before any newer one, so
    /// `folded_journal` never passes an unfolded journal.
    folding: Mutex<Vec<(u64, File)>>,
    stop: AtomicBool,
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

fn push_warning(warnings: &Mutex<Warnings>, message: String) {
    let mut w = lock(warnings);
    if w.kept.len() >= MAX_WARNINGS {
        w.kept.remove(0);
        w.dropped = w.dropped.saturating_add(1);
    }
    w.kept.push(message);
}

/// One journal line.
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    i: std::borrow::Cow<'a, str>,
    t: u64,
    u: std::borrow::Cow<'a, str>,
}

/// Why the quota store could not be opened, or a journal not folded; each
/// names the file and, where an operator can act, what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the quota store directory {}: {source}; create it or give the gateway write access (limits.data_dir)", .path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the quota store {}: {source}; check that the file is a SQLite database the gateway can write (limits.data_dir)", .path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot open the quota store {}: the filesystem does not support SQLite's WAL mode (got `{mode}`); put limits.data_dir on a local disk", .path.display())]
    NoWal { path: PathBuf, mode: String },
    #[error("cannot create a quota journal: {0}; give the gateway write access (limits.data_dir)")]
    Journal(Box<StoreError>),
    #[error("cannot start the quota store's fold thread: {0}")]
    FoldThread(std::io::Error),
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {what} {}: {source}", .path.display())]
    Db {
        what: &'static str,
        path: PathBuf,
        source: rusqlite::Error,
    },
}

impl StoreError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    fn db(what: &'static str, path: &Path, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

fn journal_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{JOURNAL_PREFIX}{n}{JOURNAL_SUFFIX}"))
}

/// Journal files in `dir`, sorted by number.
fn journal_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let number = name
            .strip_prefix(JOURNAL_PREFIX)
            .and_then(|rest| rest.strip_suffix(JOURNAL_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = number {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Create this process's next journal: a number no journal had (after every
/// file present and every number folded), created exclusively and flocked.
fn create_journal(dir: &Path, conn: &Connection) -> Result<(u64, File), StoreError> {
    let on_disk = journal_files(dir)
        .map_err(|e| StoreError::io("list", dir, e))?
        .last()
        .map_or(0, |(n, _)| *n);
    let folded = max_folded(conn).map_err(|e| StoreError::db("read", &dir.join(FILE_NAME), e))?;
    let mut n = on_disk.max(folded) + 1;
    loop {
        let path = journal_path(dir, n);
        match std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
        {
            Ok(file) => {
                file.try_lock()
                    .map_err(|e| StoreError::io("lock", &path, e.into()))?;
                return Ok((n, file));
            }
            // another process took this number a moment ago
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(StoreError::io("create", &path, e)),
        }
    }
}

/// Hold `quota.lock` until the returned file is dropped.
fn store_lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io("open", &path, e))?;
    file.lock().map_err(|e| StoreError::io("lock", &path, e))?;
    Ok(file)
}

/// The legacy watermark (`meta.folded_journal`, written before journals
/// were per process): every journal up to it is folded.
fn legacy_watermark(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT value FROM meta WHERE key = 'folded_journal'",
        [],
        |row| row.get::<_, i64>(0),
    )
    .map(|v| u64::try_from(v).unwrap_or(0))
    .or_else(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(0),
        e => Err(e),
    })
}

/// The highest journal number ever folded (0: none).
fn max_folded(conn: &Connection) -> rusqlite::Result<u64> {
    let max: Option<i64> = conn.query_row("SELECT MAX(n) FROM folded", [], |row| row.get(0))?;
    Ok(legacy_watermark(conn)?.max(max.map_or(0, |v| u64::try_from(v).unwrap_or(0))))
}

/// Whether journal `n` was folded already (a file left by a crash between
/// the fold's commit and the file's removal).
fn is_folded(conn: &Connection, n: u64) -> rusqlite::Result<bool> {
    if n <= legacy_watermark(conn)? {
        return Ok(true);
    }
    let found: Option<i64> = conn
        .query_row(
            "SELECT n FROM folded WHERE n = ?1",
            params![i64::try_from(n).unwrap_or(i64::MAX)],
            |row| row.get(0),
        )
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    Ok(found.is_some())
}

/// Sum a journal per identity. A line that does not parse (a torn write at
/// a crash) is skipped and counted.
/// Tokens per identity id, with the identity's latest display name.
type Sums = HashMap<String, (String, u64)>;

fn read_journal(path: &Path) -> std::io::Result<(Sums, usize)> {
    let mut sums: Sums = HashMap::new();
    let mut bad = 0;
    for line in BufReader::new(File::open(path)?).split(b'\n') {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(&line) {
            Ok(l) => {
                let slot = sums
                    .entry(l.i.into_owned())
                    .or_insert_with(|| (String::new(), 0));
                slot.0 = l.u.into_owned();
                slot.1 = slot.1.saturating_add(l.t);
            }
            Err(_) => bad += 1,
        }
    }
    Ok((sums, bad))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Add a journal's sums to the table and record it as folded, atomically.
fn fold_into(conn: &mut Connection, n: u64, sums: &Sums) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO usage (id, used, updated_at, user) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET used = used + excluded.used,
                 updated_at = excluded.updated_at, user = excluded.user",
        )?;
        let now = now_secs();
        for (id, (user, tokens)) in sums {
            let tokens = i64::try_from(*tokens).unwrap_or(i64::MAX);
            stmt.execute(params![id, tokens, now, user])?;
        }
        tx.execute(
            "INSERT OR IGNORE INTO folded (n) VALUES (?1)",
            params![i64::try_from(n).unwrap_or(i64::MAX)],
        )?;
    }
    tx.commit()
}

impl Db {
    /// Switch appends to a new journal and fold the previous one into the
    /// database. The error goes to the warnings.
    fn fold(&self) -> Result<(), StoreError> {
        let mut unfolded = lock(&self.folding);
        while let Some((n, _held)) = unfolded.first() {
            self.fold_file(*n)?;
            unfolded.remove(0);
        }
        let current = {
            let journal = self
                .journal
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            journal.0
        };
        let path = journal_path(&self.dir, current);
        let empty = std::fs::metadata(&path)
            .map(|m| m.len() == 0)
            .unwrap_or(true);
        if empty {
            return Ok(());
        }
        let next = {
            let conn = lock(&self.conn);
            create_journal(&self.dir, &conn)?
        };
        let old = {
            let mut journal = self
                .journal
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *journal, next)
        };
        // No appender holds journal `current` any more: fold it. Its file
        // (and flock) stays open until it is folded, so no other process
        // takes it for an orphan meanwhile.
        unfolded.push(old);
        self.fold_file(current)?;
        unfolded.pop();
        Ok(())
    }

    /// Add journal `n` to the table (recording it as folded), then delete it.
    fn fold_file(&self, n: u64) -> Result<(), StoreError> {
        let _store = store_lock(&self.dir)?;
        let path = journal_path(&self.dir, n);
        let db_path = self.dir.join(FILE_NAME);
        let done =
            is_folded(&lock(&self.conn), n).map_err(|e| StoreError::db("read", &db_path, e))?;
        if done {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        let (sums, _bad) = read_journal(&path).map_err(|e| StoreError::io("read", &path, e))?;
        let mut conn = lock(&self.conn);
        fold_into(&mut conn, n, &sums)
            .map_err(|e| StoreError::db("fold a journal into", &db_path, e))?;
        drop(conn);
        // Folded: a leftover file would only be deleted at the next start.
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn spawn_folder(db: &Arc<Db>, warnings: Arc<Mutex<Warnings>>) -> std::io::Result<()> {
    let weak = Arc::downgrade(db);
    std::thread::Builder::new()
        .name("quota-fold".into())
        .spawn(move || loop {
            std::thread::sleep(FOLD_EVERY);
            let Some(db) = weak.upgrade() else { return };
            if db.stop.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = db.fold() {
                push_warning(
                    &warnings,
                    format!("quota store: {e}; the journal is kept and retried every second"),
                );
            }
        })
        .map(|_| ())
}

impl QuotaStore {
    /// Open (creating if needed) the store in `dir`: load the table, replay
    /// journals not yet folded, start the fold thread. The error names the
    /// path and says what to fix.
    pub(crate) fn open(dir: &Path) -> Result<QuotaStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let fail = |source: rusqlite::Error| StoreError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(fail)?;
        conn.busy_timeout(Duration::from_millis(250))
            .map_err(fail)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(fail)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(fail)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS usage (
                 id TEXT PRIMARY KEY,
                 used INTEGER NOT NULL,
                 updated_at INTEGER,
                 user TEXT
             );
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(fail)?;
        add_user_column(&conn).map_err(fail)?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS folded (n INTEGER PRIMARY KEY);")
            .map_err(fail)?;
        let warnings = Arc::new(Mutex::new(Warnings::default()));
        // a consistent view: no fold (by us or another process) meanwhile
        let store = store_lock(dir)?;
        let journals = journal_files(dir)
            .map_err(|e| StoreError::io("list the quota store directory", dir, e))?;
        let mut held: Vec<Sums> = Vec::new();
        for (n, journal) in &journals {
            if is_folded(&conn, *n).map_err(fail)? {
                let _ = std::fs::remove_file(journal);
                continue;
            }
            let Ok(file) = File::open(journal) else {
                continue; // removed by its owner meanwhile
            };
            let owned_elsewhere = file.try_lock_shared().is_err();
            let (sums, bad) = read_journal(journal)
                .map_err(|e| StoreError::io("read the quota journal", journal, e))?;
            if owned_elsewhere {
                // another running gateway appends here and will fold it
                held.push(sums);
                continue;
            }
            if bad > 0 {
                push_warning(
                    &warnings,
                    format!("quota store: {bad} unreadable line(s) in {} skipped (a write cut by a crash)", journal.display()),
                );
            }
            fold_into(&mut conn, *n, &sums).map_err(fail)?;
            std::fs::remove_file(journal)
                .map_err(|e| StoreError::io("remove the folded quota journal", journal, e))?;
        }
        let mut used = load(&conn).map_err(fail)?;
        for sums in held {
            for (id, (user, tokens)) in sums {
                let entry: &mut Entry = used.entry(id).or_default();
                entry.used = entry.used.saturating_add(tokens);
                entry.user.get_or_insert(user);
            }
        }
        let journal = create_journal(dir, &conn).map_err(|e| StoreError::Journal(Box::new(e)))?;
        drop(store);
        let db = Arc::new(Db {
            dir: dir.to_path_buf(),
            conn: Mutex::new(conn),
            journal: RwLock::new(journal),
            folding: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        spawn_folder(&db, warnings.clone()).map_err(StoreError::FoldThread)?;
        Ok(QuotaStore {
            db: Some(db),
            used: Mutex::new(used),
            warnings,
        })
    }

    /// Counters in memory only, for a gateway without `data_dir`.
    pub(crate) fn in_memory() -> QuotaStore {
        QuotaStore {
            db: None,
            used: Mutex::default(),
            warnings: Arc::default(),
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

    /// Add `tokens` to `id`'s total (named `user`); persistent stores append
    /// it to the journal before returning (see the module docs).
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
        let line = Line {
            i: id.into(),
            t: tokens,
            u: user.into(),
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(e) => {
                self.warn(format!("quota store: cannot encode usage for {id}: {e}"));
                return;
            }
        };
        bytes.push(b'\n');
        let journal = db
            .journal
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // O_APPEND: concurrent appends land whole, one after another
        if let Err(e) = (&journal.1).write_all(&bytes) {
            drop(journal);
            self.warn(format!(
                "quota store {}: could not record {tokens} tokens for {id}: {e}; counted in memory only",
                db.dir.display()
            ));
        }
    }

    /// Fold the journal into the database now (tests; the thread does it every second).
    #[cfg(test)]
    pub(crate) fn fold_now(&self) {
        if let Some(db) = &self.db {
            if let Err(e) = db.fold() {
                self.warn(e.to_string());
            }
        }
    }

    /// Record a problem for the gateway to log.
    pub(crate) fn warn(&self, message: String) {
        push_warning(&self.warnings, message);
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

impl Drop for QuotaStore {
    fn drop(&mut self) {
        // a clean shutdown folds what is left; a crash leaves it for the replay
        if let Some(db) = &self.db {
            let _ = db.fold();
            // nothing was appended since: the empty journal can go
            let journal = db
                .journal
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let path = journal_path(&db.dir, journal.0);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(&path);
            }
        }
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

    /// A zero-downtime upgrade: the new process opens the store while the
    /// old one still writes to it. Nothing is counted twice, nothing is lost
    /// once both have closed.
    #[test]
    fn two_stores_on_one_dir_count_everything_once() {
        let dir = TempDir::new();
        let old = QuotaStore::open(&dir.0).unwrap();
        old.add("key:a", "a", 100);
        old.fold_now(); // 100 in the database
        old.add("key:a", "a", 10); // 10 in old's live journal
        let new = QuotaStore::open(&dir.0).unwrap();
        // the new one sees both, and left old's journal alone
        assert_eq!(new.used("key:a"), 110);
        let journals = journal_files(&dir.0).unwrap();
        assert_eq!(journals.len(), 2, "old's and new's: {journals:?}");
        new.add("key:a", "a", 1);
        old.add("key:a", "a", 5); // after new opened: not in new's memory
        old.fold_now();
        new.fold_now();
        old.add("key:a", "a", 7);
        drop(old);
        new.add("key:a", "a", 2);
        drop(new);
        let third = QuotaStore::open(&dir.0).unwrap();
        assert_eq!(third.used("key:a"), 100 + 10 + 1 + 5 + 7 + 2);
        drop(third);
        assert!(journal_files(&dir.0).unwrap().is_empty());
    }

    #[test]
    fn totals_survive_a_store_that_was_never_closed() {
        let dir = TempDir::new();
        let store = QuotaStore::open(&dir.0).unwrap();
        store.add("key:bbb", "b", 4096);
        // No destructor, no fold into the database: the data is only in the journal.
        std::mem::forget(store);
        let store = QuotaStore::open(&dir.0).unwrap();
        assert_eq!(store.used("key:bbb"), 4096);
        // and the replayed journal was folded in: a third open agrees
        drop(store);
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
        assert!(matches!(err, StoreError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
        // A file that is not a database.
        let bad = dir.0.join("bad");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join(FILE_NAME), vec![b'z'; 4096]).unwrap();
        let err = QuotaStore::open(&bad).err().unwrap();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }

    #[test]
    fn journal_is_folded_into_the_database_and_removed() {
        let dir = TempDir::new();
        let store = QuotaStore::open(&dir.0).unwrap();
        store.add("key:ddd", "d\twith\ttabs\n", 11);
        store.add("key:ddd", "d\twith\ttabs\n", 22);
        store.fold_now();
        let journals = journal_files(&dir.0).unwrap();
        assert_eq!(
            journals.len(),
            1,
            "only the current journal remains: {journals:?}"
        );
        assert_eq!(std::fs::metadata(&journals[0].1).unwrap().len(), 0);
        // written after the fold: in the new journal
        store.add("key:ddd", "d", 5);
        std::mem::forget(store);
        let store = QuotaStore::open(&dir.0).unwrap();
        assert_eq!(store.used("key:ddd"), 38);
    }

    #[test]
    fn a_torn_last_journal_line_is_ignored() {
        let dir = TempDir::new();
        drop(QuotaStore::open(&dir.0).unwrap());
        // what a crashed process leaves: a journal nobody holds, its last
        // append cut short
        std::fs::write(
            journal_path(&dir.0, 1000),
            b"{\"i\":\"key:eee\",\"t\":9,\"u\":\"e\"}\n{\"i\":\"key:eee\",\"t\":10",
        )
        .unwrap();
        let store = QuotaStore::open(&dir.0).unwrap();
        assert_eq!(store.used("key:eee"), 9);
        assert!(store
            .take_warnings()
            .iter()
            .any(|w| w.contains("unreadable")));
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

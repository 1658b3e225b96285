//! Engine processes that never outlive the gateway.
//!
//! Every engine runs in its own process group (pgid = its pid), so stopping it
//! signals the engine *and* whatever it started (vLLM workers, shells' children)
//! with one `kill(-pgid, ..)`. If the gateway itself dies, even by SIGKILL, the
//! kernel sends the engine SIGKILL (`PR_SET_PDEATHSIG`). That signal fires when
//! the *thread* that forked the engine exits, so every engine is forked by one
//! dedicated, never-ending thread, `engine-spawner`, never by a tokio worker or a
//! `spawn_blocking` thread (those come and go).
//!
//! The engine's stdout and stderr share one pipe, copied by a thread per engine
//! into a size-rotated log file (see `logfile.rs`); the copier also keeps the
//! last few KiB in memory for [`EngineProcess::log_tail`].
//!
//! Caveats:
//! - PDEATHSIG reaches only the engine itself. Its own children are cleaned up
//!   by [`EngineProcess::stop`] / `Drop` (group kill), but if the gateway is
//!   SIGKILLed they survive unless the engine takes them down when it dies (vLLM
//!   and llama.cpp workers do notice their parent's death; a `sh -c 'a & b'`
//!   does not).
//! - A child that leaves the group (`setsid`, `setpgid`) escapes the group kill.
//! - If the gateway runs as PID 1 (a container without `--init`), orphaned
//!   grandchildren become its zombies; `stop` then waits the full grace for
//!   the group to empty before its final SIGKILL. Run under an init (tini).

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::logfile::RotatingLog;

/// Bytes of recent output kept in memory.
const TAIL_KEEP: usize = 4096;
/// Longest [`EngineProcess::log_tail`] answer, in bytes.
const TAIL_MAX: usize = 2048;
/// After the engine exits, how long to wait for the copier to write its last
/// output (a lingering grandchild can hold the pipe open forever).
const DRAIN_WAIT: Duration = Duration::from_millis(500);
/// How long a SIGKILLed engine gets to disappear (it can be stuck in the
/// kernel, e.g. in a GPU driver call).
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often `stop` checks whether the rest of the group has gone.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// What to run.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// e.g. "python3" or "/usr/bin/llama-server" (looked up in `PATH`)
    pub program: String,
    pub args: Vec<String>,
    /// Added to the gateway's environment.
    pub env: Vec<(String, String)>,
    pub workdir: Option<PathBuf>,
    /// Engine stdout+stderr go here (parent dirs created; appended to).
    pub log_path: PathBuf,
    /// Rotate past this size (0: never).
    pub log_max_bytes: u64,
    /// Rotated files kept: `log.1` .. `log.N` (0: the log is truncated instead).
    pub log_max_files: usize,
}

/// A running engine process (its own process group). Dropping it SIGKILLs the
/// group.
pub struct EngineProcess {
    child: Child,
    /// Also the process group id.
    pid: u32,
    program: String,
    /// How it ended, once known.
    ended: Option<String>,
    /// The whole group has been SIGKILLed after the engine ended: nothing of
    /// it is left to clean up.
    group_cleaned: bool,
    /// The copier has been given its chance to write the final output.
    drained: bool,
    tail: Arc<Mutex<VecDeque<u8>>>,
    /// Becomes `true` when the copier reaches end of output.
    copier_done: watch::Receiver<bool>,
}

impl fmt::Debug for EngineProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineProcess")
            .field("pid", &self.pid)
            .field("program", &self.program)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// Why an engine process could not be started: the program, and what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot start `{program}`: {why}")]
pub struct SpawnError {
    pub program: String,
    pub why: SpawnFailure,
}

impl SpawnError {
    fn new(program: &str, why: SpawnFailure) -> SpawnError {
        SpawnError {
            program: program.to_string(),
            why,
        }
    }
}

/// What failed in a start (OS errors as their message, e.g. "No such file
/// or directory").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpawnFailure {
    #[error("no tokio runtime")]
    NoRuntime,
    #[error("the engine-spawner thread is gone")]
    SpawnerGone,
    #[error("cannot start the engine-spawner thread: {0}")]
    SpawnerThread(String),
    #[error("internal error")]
    Internal,
    #[error("working directory {} does not exist", .0.display())]
    NoWorkdir(PathBuf),
    #[error("cannot open its log {}: {reason}", .path.display())]
    Log { path: PathBuf, reason: String },
    #[error("pipe: {0}")]
    Pipe(String),
    #[error("dup: {0}")]
    Dup(String),
    #[error("cannot start its log thread: {0}")]
    LogThread(String),
    #[error("{0}")]
    Os(String),
    #[error("it vanished at once")]
    Vanished,
}

impl EngineProcess {
    /// Start it (see the module docs). Err names the program and the OS error,
    /// e.g. "cannot start `vllm`: No such file or directory".
    pub async fn spawn(spec: &SpawnSpec) -> Result<EngineProcess, SpawnError> {
        let cannot = |why| SpawnError::new(&spec.program, why);
        let runtime = Handle::try_current().map_err(|_| cannot(SpawnFailure::NoRuntime))?;
        let (reply, answer) = oneshot::channel();
        let request = SpawnRequest {
            spec: spec.clone(),
            runtime,
            reply,
        };
        spawner()
            .map_err(|e| cannot(e.clone()))?
            .send(request)
            .map_err(|_| cannot(SpawnFailure::SpawnerGone))?;
        // If this future is dropped before the answer arrives, the spawner
        // drops the new EngineProcess, which kills it: no orphan.
        answer
            .await
            .map_err(|_| cannot(SpawnFailure::SpawnerGone))?
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resolves when the process exits; returns a description ("exited with
    /// status 1", "killed by signal 9 (SIGKILL)"). Cancel-safe. Leaves the
    /// engine's own children alone: call [`stop`](Self::stop) (immediate once
    /// it has ended) or drop it to clean them up.
    pub async fn wait(&mut self) -> String {
        let ended = match &self.ended {
            Some(ended) => ended.clone(),
            None => {
                let result = self.child.wait().await;
                self.record(result)
            }
        };
        self.drain_output().await;
        ended
    }

    /// Non-blocking: `Some(description)` if it has exited. (Its last output
    /// may not be in [`log_tail`](Self::log_tail) yet; `wait` waits for it.)
    pub fn try_exited(&mut self) -> Option<String> {
        if self.ended.is_none() {
            match self.child.try_wait() {
                Ok(None) => return None,
                Ok(Some(status)) => {
                    self.record(Ok(status));
                }
                Err(e) => {
                    self.record(Err(e));
                }
            }
        }
        self.ended.clone()
    }

    /// SIGTERM to the whole process group, wait up to `grace` for the engine
    /// and then for the rest of its group, then SIGKILL the group; reap.
    /// Returns how the engine ended. Safe to call on an already-exited (or
    /// already stopped) process. Never panics.
    pub async fn stop(&mut self, grace: Duration) -> String {
        let deadline = Instant::now() + grace;
        if self.group_cleaned {
            return self.ended.clone().unwrap_or_default();
        }
        // The whole group, even if the engine itself has already gone: its
        // workers deserve the same chance to shut down cleanly.
        if let Err(e) = signal_group(self.pid, libc::SIGTERM) {
            log::debug!("engine {} ({}): SIGTERM: {e}", self.pid, self.program);
        }
        if self.try_exited().is_none() {
            match tokio::time::timeout_at(deadline, self.child.wait()).await {
                Ok(result) => {
                    self.record(result);
                }
                Err(_) => {
                    log::warn!(
                        "engine {} ({}) still running {grace:?} after SIGTERM: SIGKILL",
                        self.pid,
                        self.program
                    );
                    let _ = signal_group(self.pid, libc::SIGKILL);
                    match tokio::time::timeout(KILL_WAIT, self.child.wait()).await {
                        Ok(result) => {
                            self.record(result);
                        }
                        Err(_) => {
                            // Drop will SIGKILL it again; tokio reaps it whenever it goes.
                            return format!("still running {KILL_WAIT:?} after SIGKILL");
                        }
                    }
                }
            }
        }
        // The engine is gone; give the rest of its group what is left of the grace.
        while group_exists(self.pid) && Instant::now() < deadline {
            tokio::time::sleep(GROUP_POLL).await;
        }
        let _ = signal_group(self.pid, libc::SIGKILL);
        self.group_cleaned = true;
        self.drain_output().await;
        self.ended.clone().unwrap_or_default()
    }

    /// The last `lines` lines of the engine's output (for error messages:
    /// "crashed: <last lines>"), at most ~2 KiB. Of a line rewritten with `\r`
    /// (progress bars) only the last version is kept.
    pub fn log_tail(&self, lines: usize) -> String {
        let (bytes, wrapped) = {
            let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
            (
                tail.iter().copied().collect::<Vec<u8>>(),
                tail.len() >= TAIL_KEEP,
            )
        };
        tail_lines(&bytes, wrapped, lines)
    }

    /// Remember how it ended; returns the description.
    fn record(&mut self, result: io::Result<ExitStatus>) -> String {
        let ended = match result {
            Ok(status) => describe(status),
            Err(e) => format!("ended (its status is unknown: {e})"),
        };
        self.ended = Some(ended.clone());
        ended
    }

    /// Give the copier a moment to write the engine's last words.
    async fn drain_output(&mut self) {
        if self.drained {
            return;
        }
        let mut done = self.copier_done.clone();
        let _ = tokio::time::timeout(DRAIN_WAIT, done.wait_for(|d| *d)).await;
        self.drained = true;
    }
}

impl Drop for EngineProcess {
    /// Best effort: SIGKILL the group (the engine if still running, and any of
    /// its children). The engine itself is reaped by tokio in the background.
    fn drop(&mut self) {
        if !self.group_cleaned {
            let _ = signal_group(self.pid, libc::SIGKILL);
        }
    }
}

/// "exited with status 1", "killed by signal 9 (SIGKILL)"
fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGHUP => " (SIGHUP)",
            libc::SIGINT => " (SIGINT)",
            libc::SIGQUIT => " (SIGQUIT)",
            libc::SIGILL => " (SIGILL)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGBUS => " (SIGBUS)",
            libc::SIGFPE => " (SIGFPE)",
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGPIPE => " (SIGPIPE)",
            libc::SIGTERM => " (SIGTERM)",
            _ => "",
        };
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        return format!("killed by signal {sig}{name}{core}");
    }
    format!("ended ({status})")
}

/// The last `lines` lines of `bytes`, bounded to [`TAIL_MAX`]. `wrapped`: the
/// buffer has dropped older bytes, so its first line is probably partial.
fn tail_lines(bytes: &[u8], wrapped: bool, lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut all: Vec<&str> = text
        .lines()
        .map(|l| l.rsplit('\r').find(|s| !s.is_empty()).unwrap_or(""))
        .collect();
    if wrapped && all.len() > 1 {
        all.remove(0);
    }
    while all.last().is_some_and(|l| l.trim().is_empty()) {
        all.pop();
    }
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if out.len() > TAIL_MAX {
        let mut cut = out.len() - TAIL_MAX;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        // Start at a line if that still leaves something.
        if let Some(nl) = out[cut..].find('\n') {
            if cut + nl + 1 < out.len() {
                cut += nl + 1;
            }
        }
        out.drain(..cut);
    }
    out
}

/// "No such file or directory", without std's " (os error 2)".
fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .map(str::to_string)
            .unwrap_or(text),
        None => text,
    }
}

struct SpawnRequest {
    spec: SpawnSpec,
    /// The caller's runtime: the child is registered with its reactor.
    runtime: Handle,
    reply: oneshot::Sender<Result<EngineProcess, SpawnError>>,
}

/// The channel to the `engine-spawner` thread, started on first use and
/// never ended.
fn spawner() -> Result<&'static mpsc::Sender<SpawnRequest>, &'static SpawnFailure> {
    static SPAWNER: OnceLock<Result<mpsc::Sender<SpawnRequest>, SpawnFailure>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("engine-spawner".into())
                .spawn(move || {
                    // This thread is the parent of every engine: if it ended,
                    // PDEATHSIG would kill them all. So it must never panic out.
                    while let Ok(request) = rx.recv() {
                        let _in_runtime = request.runtime.enter();
                        let started =
                            std::panic::catch_unwind(AssertUnwindSafe(|| start(&request.spec)))
                                .unwrap_or_else(|_| {
                                    Err(SpawnError::new(
                                        &request.spec.program,
                                        SpawnFailure::Internal,
                                    ))
                                });
                        // Err: the caller gave up; dropping the engine kills it.
                        let _ = request.reply.send(started);
                    }
                })
                .map(|_| tx)
                .map_err(|e| SpawnFailure::SpawnerThread(os_message(&e)))
        })
        .as_ref()
}

/// Runs on the `engine-spawner` thread (inside the caller's runtime).
fn start(spec: &SpawnSpec) -> Result<EngineProcess, SpawnError> {
    let cannot = |why| SpawnError::new(&spec.program, why);
    if let Some(dir) = &spec.workdir {
        if !dir.is_dir() {
            return Err(cannot(SpawnFailure::NoWorkdir(dir.clone())));
        }
    }
    let log =
        RotatingLog::open(&spec.log_path, spec.log_max_bytes, spec.log_max_files).map_err(|e| {
            cannot(SpawnFailure::Log {
                path: spec.log_path.clone(),
                reason: os_message(&e),
            })
        })?;
    let (read_end, write_end) =
        pipe_cloexec().map_err(|e| cannot(SpawnFailure::Pipe(os_message(&e))))?;
    let write_end_2 = write_end
        .try_clone()
        .map_err(|e| cannot(SpawnFailure::Dup(os_message(&e))))?;

    // The copier first: if spawning fails it just sees end of output.
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_KEEP)));
    let (done_tx, copier_done) = watch::channel(false);
    let copier_tail = Arc::clone(&tail);
    let log_name = spec.log_path.display().to_string();
    std::thread::Builder::new()
        .name("engine-log".into())
        .spawn(move || copy_output(File::from(read_end), log, &log_name, &copier_tail, &done_tx))
        .map_err(|e| cannot(SpawnFailure::LogThread(os_message(&e))))?;

    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_end_2))
        .process_group(0);
    if let Some(dir) = &spec.workdir {
        cmd.current_dir(dir);
    }
    kill_when_parent_dies(&mut cmd);
    let spawned = cmd.spawn();
    // Close our copies of the pipe's write end, or the copier never sees EOF.
    drop(cmd);
    let child = spawned.map_err(|e| cannot(SpawnFailure::Os(os_message(&e))))?;
    let Some(pid) = child.id() else {
        return Err(cannot(SpawnFailure::Vanished));
    };
    log::info!("engine `{}` started: pid {pid}", spec.program);
    Ok(EngineProcess {
        child,
        pid,
        program: spec.program.clone(),
        ended: None,
        group_cleaned: false,
        drained: false,
        tail,
        copier_done,
    })
}

/// The copier thread: pipe → log file (+ the in-memory tail), until every
/// writer (the engine and its children) has closed it.
fn copy_output(
    mut pipe: File,
    mut log: RotatingLog,
    log_name: &str,
    tail: &Mutex<VecDeque<u8>>,
    done: &watch::Sender<bool>,
) {
    let mut buf = [0u8; 8192];
    let mut failing = false;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("engine log {log_name}: reading engine output: {e}");
                break;
            }
        };
        let chunk = &buf[..n];
        {
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            tail.extend(chunk);
            let excess = tail.len().saturating_sub(TAIL_KEEP);
            tail.drain(..excess);
        }
        // Keep draining the pipe even when the disk fails, or the engine blocks.
        match log.write(chunk) {
            Ok(()) if failing => {
                log::info!("engine log {log_name}: writing again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                log::warn!("engine log {log_name}: {e} (output lost until it recovers)");
                failing = true;
            }
            Err(_) => {}
        }
    }
    let _ = done.send(true);
}

/// Does any process of group `pgid` still exist?
fn group_exists(pgid: u32) -> bool {
    match signal_group(pgid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPERM),
    }
}

/// `kill(-pgid, sig)`: signal every process of group `pgid` (0: just check
/// that it exists).
#[allow(unsafe_code)]
pub(super) fn signal_group(pgid: u32, sig: libc::c_int) -> io::Result<()> {
    // 0 and 1 would make -pgid address our own group or every process.
    let pgid = match libc::pid_t::try_from(pgid) {
        Ok(p) if p > 1 => p,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an engine's process group: {pgid}"),
            ))
        }
    };
    // SAFETY: kill() takes no pointers and has no memory effects in this
    // process; `-pgid` (pgid > 1) addresses exactly that process group, which
    // `process_group(0)` created with the engine as its leader.
    let rc = unsafe { libc::kill(-pgid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `kill(pid, sig)`: signal the engine process itself (its leader), so it can
/// shut its own workers down in order before the group is killed.
#[allow(unsafe_code)]
pub(super) fn signal_process(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = match libc::pid_t::try_from(pid) {
        Ok(p) if p > 1 => p,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an engine process: {pid}"),
            ))
        }
    };
    // SAFETY: kill() takes no pointers and has no memory effects in this
    // process; pid > 1 addresses one process, the engine we spawned (its exit
    // is reaped by our own supervisor, so the pid cannot have been reused
    // while it is recorded as running).
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A pipe whose two ends are closed on exec (only the copies that become the
/// engine's stdout/stderr reach it).
#[allow(unsafe_code)]
fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [-1, -1];
    // SAFETY: pipe2 writes two descriptors into `fds`, a live array of exactly
    // two c_ints, and reads nothing else.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success both are new, open descriptors that nothing else
    // owns; each OwnedFd becomes their sole owner and closes it once.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// In the child, before exec: SIGKILL me when my parent (the
/// `engine-spawner` thread) dies; if the gateway already died between fork
/// and this point, exit at once.
#[allow(unsafe_code)]
fn kill_when_parent_dies(cmd: &mut Command) {
    let gateway = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe code may run: it only makes raw system calls (prctl,
    // getppid, _exit), allocates nothing (an io::Error from an errno does not
    // allocate) and takes no locks. It captures one integer.
    unsafe {
        cmd.pre_exec(move || {
            #[cfg(target_os = "linux")]
            {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != gateway {
                    libc::_exit(1);
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = gateway;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Instant as StdInstant;

    const LONG: Duration = Duration::from_secs(10);

    fn sh(dir: &Path, script: &str) -> SpawnSpec {
        SpawnSpec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            workdir: None,
            log_path: dir.join("logs/engine.log"),
            log_max_bytes: 1 << 20,
            log_max_files: 3,
        }
    }

    /// Exists and is not a zombie.
    fn alive(pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, Some('Z' | 'X') | None)
    }

    async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
        let deadline = StdInstant::now() + within;
        loop {
            if check() {
                return true;
            }
            if StdInstant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The pids the script printed as "child <pid>", once `n` are there.
    async fn child_pids(engine: &EngineProcess, n: usize) -> Vec<u32> {
        let mut pids = vec![];
        let found = eventually(LONG, || {
            pids = engine
                .log_tail(50)
                .lines()
                .filter_map(|l| l.strip_prefix("child ")?.trim().parse().ok())
                .collect();
            pids.len() >= n
        })
        .await;
        assert!(found, "no child pids in: {}", engine.log_tail(50));
        pids
    }

    async fn wait_for_output(engine: &EngineProcess, needle: &str) {
        let found = eventually(LONG, || engine.log_tail(50).contains(needle)).await;
        assert!(found, "no {needle:?} in: {}", engine.log_tail(50));
    }

    #[tokio::test]
    async fn output_env_and_workdir_land_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let mut spec = sh(
            dir.path(),
            "echo out; echo err >&2; echo \"foo=$FOO\"; pwd; exit 3",
        );
        spec.env = vec![("FOO".into(), "bar baz".into())];
        spec.workdir = Some(work.clone());
        let mut engine = EngineProcess::spawn(&spec).await.unwrap();
        assert!(engine.pid() > 1);
        let ended = tokio::time::timeout(LONG, engine.wait()).await.unwrap();
        assert_eq!(ended, "exited with status 3");
        let expected = format!("out\nerr\nfoo=bar baz\n{}\n", work.display());
        assert_eq!(std::fs::read_to_string(&spec.log_path).unwrap(), expected);
        assert_eq!(engine.log_tail(10), expected.trim_end());
        assert_eq!(
            engine.log_tail(2),
            format!("foo=bar baz\n{}", work.display())
        );
        // Ended: all further answers are the same, at once.
        assert_eq!(engine.try_exited().as_deref(), Some("exited with status 3"));
        assert_eq!(engine.wait().await, "exited with status 3");
        assert_eq!(engine.stop(LONG).await, "exited with status 3");
        assert_eq!(engine.stop(LONG).await, "exited with status 3");
    }

    #[tokio::test]
    async fn try_exited_and_a_cancelled_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = EngineProcess::spawn(&sh(dir.path(), "sleep 1"))
            .await
            .unwrap();
        assert_eq!(engine.try_exited(), None);
        // wait() dropped half-way (as in a select!) leaves things intact.
        tokio::select! {
            ended = engine.wait() => panic!("ended early: {ended}"),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert!(eventually(LONG, || engine.try_exited().is_some()).await);
        assert_eq!(engine.try_exited().as_deref(), Some("exited with status 0"));
        assert_eq!(engine.wait().await, "exited with status 0");
    }

    #[tokio::test]
    async fn stop_sends_sigterm_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = EngineProcess::spawn(&sh(dir.path(), "echo ready; sleep 100"))
            .await
            .unwrap();
        wait_for_output(&engine, "ready").await;
        let started = StdInstant::now();
        let ended = engine.stop(Duration::from_secs(30)).await;
        assert_eq!(ended, "killed by signal 15 (SIGTERM)");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(!alive(engine.pid()));
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine =
            EngineProcess::spawn(&sh(dir.path(), "trap '' TERM; echo ready; sleep 100"))
                .await
                .unwrap();
        wait_for_output(&engine, "ready").await;
        let started = StdInstant::now();
        let ended = engine.stop(Duration::from_secs(1)).await;
        let took = started.elapsed();
        assert_eq!(ended, "killed by signal 9 (SIGKILL)");
        assert!(took >= Duration::from_secs(1), "{took:?}");
        assert!(took < Duration::from_secs(1) + LONG, "{took:?}");
        assert_eq!(
            engine.try_exited().as_deref(),
            Some("killed by signal 9 (SIGKILL)")
        );
    }

    #[tokio::test]
    async fn stop_kills_grandchildren_even_those_ignoring_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let script = "sleep 1000 & echo \"child $!\"; \
                      (trap '' TERM; exec sleep 1000) & echo \"child $!\"; \
                      wait";
        let mut engine = EngineProcess::spawn(&sh(dir.path(), script)).await.unwrap();
        let pids = child_pids(&engine, 2).await;
        assert!(pids.iter().all(|&p| alive(p)));
        let ended = engine.stop(Duration::from_secs(1)).await;
        assert!(ended.starts_with("killed by signal"), "{ended}");
        assert!(eventually(LONG, || pids.iter().all(|&p| !alive(p))).await);
        assert!(!alive(engine.pid()));
    }

    #[tokio::test]
    async fn stop_after_the_engine_died_still_takes_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let script = "(trap '' TERM; exec sleep 1000) & echo \"child $!\"; exit 7";
        let mut engine = EngineProcess::spawn(&sh(dir.path(), script)).await.unwrap();
        let pids = child_pids(&engine, 1).await;
        assert_eq!(
            tokio::time::timeout(LONG, engine.wait()).await.unwrap(),
            "exited with status 7"
        );
        assert!(alive(pids[0]), "wait() alone leaves the group alone");
        assert_eq!(
            engine.stop(Duration::from_millis(200)).await,
            "exited with status 7"
        );
        assert!(eventually(LONG, || !alive(pids[0])).await);
    }

    #[tokio::test]
    async fn drop_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let script = "trap '' TERM; sleep 1000 & echo \"child $!\"; wait";
        let engine = EngineProcess::spawn(&sh(dir.path(), script)).await.unwrap();
        let pids = child_pids(&engine, 1).await;
        let leader = engine.pid();
        drop(engine);
        assert!(eventually(LONG, || !alive(leader) && !alive(pids[0])).await);
    }

    #[tokio::test]
    async fn a_missing_program_or_workdir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = sh(dir.path(), "true");
        spec.program = "/nonexistent/vllm".into();
        let err = EngineProcess::spawn(&spec).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot start `/nonexistent/vllm`: No such file or directory"
        );

        spec.program = "infergate-no-such-engine".into();
        let err = EngineProcess::spawn(&spec).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot start `infergate-no-such-engine`: No such file or directory"
        );

        let mut spec = sh(dir.path(), "true");
        spec.workdir = Some(dir.path().join("nope"));
        let err = EngineProcess::spawn(&spec).await.unwrap_err();
        assert_eq!(err.why, SpawnFailure::NoWorkdir(dir.path().join("nope")));
        let err = err.to_string();
        assert!(
            err.starts_with("cannot start `sh`: working directory"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_log_rotates_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        // 300 lines of 20 bytes = 6000 bytes through 1000-byte files, 2 kept.
        let script =
            "i=100; while [ $i -lt 400 ]; do echo \"line $i 0123456789\"; i=$((i+1)); done";
        let mut spec = sh(dir.path(), script);
        spec.log_max_bytes = 1000;
        spec.log_max_files = 2;
        let mut engine = EngineProcess::spawn(&spec).await.unwrap();
        assert_eq!(
            tokio::time::timeout(LONG, engine.wait()).await.unwrap(),
            "exited with status 0"
        );
        let name = |suffix: &str| {
            let mut p = spec.log_path.clone().into_os_string();
            p.push(suffix);
            PathBuf::from(p)
        };
        assert!(!name(".3").exists());
        let mut kept = String::new();
        for suffix in [".2", ".1", ""] {
            let text = std::fs::read_to_string(name(suffix)).unwrap();
            assert!(
                !text.is_empty() && text.len() <= 1000,
                "{suffix}: {}",
                text.len()
            );
            assert!(text.ends_with('\n'));
            kept.push_str(&text);
        }
        // What is kept is the end of the output, in order, nothing lost in between.
        let expected: String = (100..400)
            .map(|i| format!("line {i} 0123456789\n"))
            .collect();
        assert!(expected.ends_with(&kept));
        assert!(kept.len() > 2000);
        assert_eq!(engine.log_tail(1), "line 399 0123456789");
    }

    #[tokio::test]
    async fn log_tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let script = "i=0; while [ $i -lt 500 ]; do echo \"line $i ................................\"; i=$((i+1)); done; printf 'step 1\\rstep 2\\rstep 3\\n'";
        let mut engine = EngineProcess::spawn(&sh(dir.path(), script)).await.unwrap();
        tokio::time::timeout(LONG, engine.wait()).await.unwrap();
        let tail = engine.log_tail(1000);
        assert!(tail.len() <= TAIL_MAX, "{}", tail.len());
        assert!(tail.len() > TAIL_MAX - 100, "{}", tail.len());
        assert!(tail.starts_with("line "), "{tail}");
        assert!(tail.ends_with("line 499 ................................\nstep 3"));
        assert_eq!(engine.log_tail(0), "");
    }

    #[test]
    fn tail_lines_edge_cases() {
        assert_eq!(tail_lines(b"", false, 5), "");
        assert_eq!(tail_lines(b"a\nb\n\n\n", false, 1), "b");
        assert_eq!(tail_lines(b"partial\nwhole\n", true, 5), "whole");
        assert_eq!(tail_lines(b"only\n", true, 5), "only");
        let long = "\u{e9}".repeat(3000); // 2 bytes each
        let t = tail_lines(long.as_bytes(), false, 1);
        assert!(t.len() <= TAIL_MAX && t.len() >= TAIL_MAX - 1);
    }

    #[test]
    fn the_engine_outlives_the_thread_that_asked_for_it() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = sh(dir.path(), "sleep 1000");
        let handle = rt.handle().clone();
        // A short-lived thread asks; had *it* forked, PDEATHSIG would fire when it ends.
        let mut engine = std::thread::spawn(move || handle.block_on(EngineProcess::spawn(&spec)))
            .join()
            .unwrap()
            .unwrap();
        rt.block_on(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(engine.try_exited(), None);
            assert!(alive(engine.pid()));
            assert_eq!(engine.stop(LONG).await, "killed by signal 15 (SIGTERM)");
        });
    }

    const HELPER_ENV: &str = "INFERGATE_TEST_PDEATHSIG_DIR";

    /// Not a test on its own: the "gateway" process of
    /// `the_engine_dies_with_the_gateway` (this test binary, re-run with
    /// `--ignored`); ignored in normal runs, where it would check nothing.
    #[test]
    #[ignore = "the helper process of the_engine_dies_with_the_gateway"]
    fn pdeathsig_helper() {
        let Some(dir) = std::env::var_os(HELPER_ENV) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // `sleep` itself, not `sh -c`: PDEATHSIG reaches only the engine, a
            // shell's child would outlive this test (see the module docs).
            let mut spec = sh(&dir, "");
            spec.program = "sleep".into();
            spec.args = vec!["1000".into()];
            let engine = EngineProcess::spawn(&spec).await.unwrap();
            std::fs::write(dir.join("pid.tmp"), engine.pid().to_string()).unwrap();
            std::fs::rename(dir.join("pid.tmp"), dir.join("pid")).unwrap();
            // No Drop: only the kernel can kill it now.
            std::mem::forget(engine);
            tokio::time::sleep(Duration::from_secs(300)).await;
        });
    }

    #[test]
    fn the_engine_dies_with_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let mut gateway = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "pdeathsig_helper",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(HELPER_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid_file = dir.path().join("pid");
        let deadline = StdInstant::now() + Duration::from_secs(30);
        let engine: u32 = loop {
            if let Ok(text) = std::fs::read_to_string(&pid_file) {
                break text.trim().parse().unwrap();
            }
            if StdInstant::now() > deadline || gateway.try_wait().unwrap().is_some() {
                let _ = gateway.kill();
                panic!("the helper never started its engine");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(alive(engine));
        gateway.kill().unwrap(); // SIGKILL: no Drop, no cleanup code runs
        gateway.wait().unwrap();
        let deadline = StdInstant::now() + LONG;
        while alive(engine) && StdInstant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(engine) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &engine.to_string()])
                .status();
            panic!("engine {engine} outlived its SIGKILLed gateway");
        }
    }
}

//! One managed engine: its state machine, counters and the predicates
//! the registry (`mod.rs`) applies to it (eviction candidate, idle expiry).

use super::admission::Evictable;
use crate::clock::now_ms;
use crate::config::engines::ManagedModel;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where an engine is in its life, as `/admin/engines` and `/v1/models` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Stopped,
    Starting,
    Running(SocketAddr),
    Draining,
    Stopping,
    Failed(String),
    /// The last start could not get GPU memory (`NoGpuMemory` or
    /// `TooLargeForGpu`); the next request tries again.
    Unavailable(EngineError),
}

impl State {
    pub fn label(&self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running(_) => "running",
            State::Draining => "draining",
            State::Stopping => "stopping",
            State::Failed(_) => "failed",
            State::Unavailable(_) => "stopped",
        }
    }
}

/// Why a request could not get a running engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The engine failed to start or crashed too often.
    Failed { model: String, reason: String },
    /// Not ready within the start timeout.
    Timeout { model: String, waited: Duration },
    /// Not enough GPU memory: the model is larger than a GPU, or does not
    /// fit even after unloading every idle engine (then nothing is unloaded).
    NoGpuMemory { model: String, detail: String },
    /// The model needs more memory than its GPU has in total: no retry and
    /// no eviction can help (a configuration error).
    TooLargeForGpu { model: String, detail: String },
    /// It is being unloaded.
    Unloading { model: String },
}

impl EngineError {
    pub fn message(&self) -> String {
        match self {
            EngineError::Failed { model, reason } => format!(
                "The engine for `{model}` could not be started: {reason}. An operator can retry with POST /admin/models/{model}/load."
            ),
            EngineError::Timeout { model, waited } => format!(
                "The engine for `{model}` did not become ready within {} s. Retry shortly.",
                waited.as_secs()
            ),
            EngineError::NoGpuMemory { model, detail }
            | EngineError::TooLargeForGpu { model, detail } => {
                format!("Not enough GPU memory to load `{model}`: {detail}.")
            }
            EngineError::Unloading { model } => {
                format!("The engine for `{model}` is being unloaded. Retry shortly.")
            }
        }
    }
}

/// Why an adapter could not be loaded or unloaded.
#[derive(Debug)]
pub enum AdapterError {
    NotEnabled,
    Unknown,
    Start(EngineError),
    Engine { status: u16, message: String },
}

/// Counts a request against an engine (idle time, eviction) while it runs.
pub struct EngineUse(pub(super) Arc<Engine>);

impl Drop for EngineUse {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

pub struct Engine {
    pub spec: ManagedModel,
    pub(super) state: watch::Sender<State>,
    /// It passed GPU admission and holds its declared memory until stopped.
    pub(super) admitted: AtomicBool,
    pub(super) in_flight: AtomicU64,
    /// Unix milliseconds of the last request start or end.
    pub(super) last_used_ms: AtomicU64,
    /// Consecutive failed starts / crashes since the last successful start.
    pub(super) failures: AtomicU32,
    /// Total restarts after crashes.
    pub(super) restarts: AtomicU32,
    pub(super) started: Mutex<Option<Instant>>,
    pub(super) last_error: Mutex<Option<String>>,
    pub(super) pid: AtomicU32,
    pub(super) port: Mutex<Option<u16>>,
    /// LoRA adapters (name, path): the configured ones plus those loaded
    /// through the admin API; all are loaded again after every start.
    pub(super) adapters: Mutex<Vec<(String, String)>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Engine {
    pub(super) fn new(spec: &ManagedModel) -> Arc<Engine> {
        Arc::new(Engine {
            spec: spec.clone(),
            state: watch::Sender::new(State::Stopped),
            admitted: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(now_ms()),
            failures: AtomicU32::new(0),
            restarts: AtomicU32::new(0),
            started: Mutex::new(None),
            last_error: Mutex::new(None),
            pid: AtomicU32::new(0),
            port: Mutex::new(None),
            adapters: Mutex::new(spec.lora.clone()),
        })
    }

    pub(super) fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    pub(super) fn set(&self, state: State) {
        self.state.send_replace(state);
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Names of the LoRA adapters this engine serves.
    pub fn adapters(&self) -> Vec<String> {
        lock(&self.adapters)
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub(super) fn serves_adapter(&self, model: &str) -> bool {
        lock(&self.adapters).iter().any(|(n, _)| n == model)
    }

    pub(super) fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_used_ms.load(Ordering::Relaxed)))
    }

    /// Whether unloading this engine could make room for `other`: it is
    /// running with no request in flight, declares GPU memory and shares a
    /// GPU with `other`.
    pub(super) fn can_make_room_for(&self, other: &Engine) -> bool {
        !std::ptr::eq(self, other)
            && matches!(self.state(), State::Running(_))
            && self.in_flight() == 0
            && self.spec.gpu_memory_mb > 0
            && self.spec.gpus.iter().any(|g| other.spec.gpus.contains(g))
    }

    /// How long it has been idle, when that is past its `idle_ttl` and it
    /// may be unloaded for it (running, no request in flight).
    pub(super) fn idle_expired(&self) -> Option<Duration> {
        let ttl = self.spec.idle_ttl?;
        let idle = self.idle_for();
        (matches!(self.state(), State::Running(_)) && self.in_flight() == 0 && idle >= ttl)
            .then_some(idle)
    }

    /// What admission knows of it as an eviction candidate.
    pub(super) fn as_evictable(&self) -> Evictable {
        Evictable {
            gpus: self.spec.gpus.clone(),
            memory_mb: self.spec.gpu_memory_mb,
            last_used_ms: self.last_used_ms.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        name: &str,
        gpus: Vec<u32>,
        gpu_memory_mb: u64,
        idle_ttl: Option<Duration>,
    ) -> ManagedModel {
        ManagedModel::for_tests(name, gpus, gpu_memory_mb, idle_ttl)
    }

    fn running(engine: &Engine) {
        engine.set(State::Running(SocketAddr::from(([127, 0, 0, 1], 1))));
    }

    #[test]
    fn only_idle_running_engines_on_a_shared_gpu_are_eviction_candidates() {
        let wants = Engine::new(&spec("wants", vec![0, 1], 10_000, None));
        let other = Engine::new(&spec("other", vec![1], 8_000, None));
        // stopped, starting, draining: not candidates
        for state in [State::Stopped, State::Starting, State::Draining] {
            other.set(state);
            assert!(!other.can_make_room_for(&wants));
        }
        running(&other);
        assert!(other.can_make_room_for(&wants));
        // a request in flight protects it; its end makes it a candidate again
        other.in_flight.fetch_add(1, Ordering::AcqRel);
        assert!(!other.can_make_room_for(&wants));
        drop(EngineUse(other.clone()));
        assert!(other.can_make_room_for(&wants));
        // never itself
        running(&wants);
        assert!(!wants.can_make_room_for(&wants));
        // no shared GPU, or no declared memory: unloading frees nothing
        let elsewhere = Engine::new(&spec("elsewhere", vec![2], 8_000, None));
        running(&elsewhere);
        assert!(!elsewhere.can_make_room_for(&wants));
        let undeclared = Engine::new(&spec("undeclared", vec![0], 0, None));
        running(&undeclared);
        assert!(!undeclared.can_make_room_for(&wants));
        assert_eq!(
            other.as_evictable(),
            Evictable {
                gpus: vec![1],
                memory_mb: 8_000,
                last_used_ms: other.last_used_ms.load(Ordering::Relaxed),
            }
        );
    }

    #[test]
    fn idle_expiry_needs_a_ttl_a_running_engine_and_no_request_in_flight() {
        let never = Engine::new(&spec("never", vec![], 0, None));
        running(&never);
        never.last_used_ms.store(0, Ordering::Relaxed);
        assert_eq!(never.idle_expired(), None, "no idle_ttl: never unloaded");

        let engine = Engine::new(&spec("ttl", vec![], 0, Some(Duration::from_secs(60))));
        running(&engine);
        assert_eq!(engine.idle_expired(), None, "just used");
        // last used two minutes ago
        let two_minutes_ago = now_ms().saturating_sub(120_000);
        engine
            .last_used_ms
            .store(two_minutes_ago, Ordering::Relaxed);
        let idle = engine.idle_expired();
        assert!(
            idle.is_some_and(|d| d >= Duration::from_secs(120)),
            "{idle:?}"
        );
        // a request in flight keeps it loaded, however old the last use
        engine.in_flight.fetch_add(1, Ordering::AcqRel);
        assert_eq!(engine.idle_expired(), None);
        engine.in_flight.fetch_sub(1, Ordering::AcqRel);
        // only a running engine is unloaded for idleness
        engine.set(State::Starting);
        assert_eq!(engine.idle_expired(), None);
    }
}

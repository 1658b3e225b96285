//! Managed engines: processes infergate starts on the first request (or at
//! start with `preload`), watches, restarts after a crash, unloads when idle
//! or when GPU memory is needed, and stops on exit.
//!
//! States: `stopped` → `starting` (process spawned, readiness probe not yet
//! passed) → `running` (routable) → `draining` (no new requests; in-flight
//! ones finish) → `stopping` (SIGTERM, then SIGKILL to the process group) →
//! `stopped`; a crash while running restarts with backoff, and after
//! `max_restarts` consecutive failures the engine is `failed` until an admin
//! `load` resets it. Concurrent first requests share one start.

mod admission;
mod engine;
mod logfile;
mod process;

use self::admission::measured_gpu_memory;
pub use self::admission::{
    gpu_fit_warnings, oversized_models, plan_admission, Evictable, GpuRoom, Infeasible,
};
use self::engine::lock;
pub use self::engine::{AdapterError, Engine, EngineError, EngineUse, State};
use self::process::{EngineProcess, SpawnSpec};
use crate::config::engines::{self as config, EnginesConfig, GpuSource};
use crate::gpu::GpuMonitor;
use serde::Serialize;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One engine in `/admin/engines`.
#[derive(Debug, Serialize)]
pub struct EngineStatus {
    pub model_id: String,
    pub kind: &'static str,
    pub status: &'static str,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub uptime_seconds: Option<u64>,
    pub restarts: u32,
    pub in_flight: u64,
    pub idle_seconds: u64,
    pub gpus: Vec<u32>,
    /// Declared in the config (admission and eviction use it).
    pub gpu_memory_mb: u64,
    /// Measured through NVML: the GPU memory of the engine's process group
    /// (`null` without NVML or while stopped).
    pub gpu_memory_used_mb: Option<u64>,
    pub last_error: Option<String>,
}

/// Why one start of an engine failed (the engine retries with backoff,
/// then turns `failed`).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no free port in engines.port_range {from}-{to}")]
    NoPort { from: u16, to: u16 },
    #[error(transparent)]
    Spawn(#[from] process::SpawnError),
    #[error("the process {exit} before it was ready; last output: {tail}")]
    Exited { exit: String, tail: String },
    #[error("not ready within {} s (GET {path} never answered 200)", .waited.as_secs())]
    NotReady { waited: Duration, path: String },
    #[error("loading LoRA adapter `{name}` {why}")]
    Adapter { name: String, why: String },
    #[error("unloaded while starting ({how})")]
    Unloaded { how: String },
}

pub struct Engines {
    /// The settings that need a restart (ports, logs, GPU source...); the
    /// `models` here are those of the start, see [`Engines::all`] for the
    /// current ones.
    pub config: EnginesConfig,
    /// The current engine definitions; replaced by [`Engines::reconcile`].
    engines: arc_swap::ArcSwap<Vec<Arc<Engine>>>,
    /// Engines removed or redefined by a reload that are still draining or
    /// stopping: they keep their GPU memory until stopped.
    retiring: Mutex<Vec<Arc<Engine>>>,
    free_ports: Mutex<BTreeSet<u16>>,
    gpu: Arc<GpuMonitor>,
    /// Serializes GPU admission so two starts do not count the same free memory.
    admission: tokio::sync::Mutex<()>,
}

impl Engines {
    pub fn new(config: EnginesConfig, gpu: Arc<GpuMonitor>) -> Engines {
        let engines = config.models.iter().map(Engine::new).collect();
        let (lo, hi) = config.ports;
        Engines {
            free_ports: Mutex::new((lo..=hi).collect()),
            engines: arc_swap::ArcSwap::from_pointee(engines),
            retiring: Mutex::new(Vec::new()),
            config,
            gpu,
            admission: tokio::sync::Mutex::new(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.engines.load().is_empty()
    }

    /// The engine serving `model`: its name, an alias or one of its LoRA adapters.
    pub fn find(&self, model: &str) -> Option<Arc<Engine>> {
        self.engines
            .load()
            .iter()
            .find(|e| {
                e.spec.name == model
                    || e.spec.aliases.contains_key(model)
                    || e.serves_adapter(model)
            })
            .cloned()
    }

    /// Current engines plus those a reload retired that are still stopping
    /// (GPU accounting counts both).
    fn everyone(&self) -> Vec<Arc<Engine>> {
        let mut all: Vec<Arc<Engine>> = self.engines.load().iter().cloned().collect();
        all.extend(lock(&self.retiring).iter().cloned());
        all
    }

    /// Apply a reloaded `engines:` section. Unchanged definitions keep their
    /// engine (and its process) untouched; a changed definition gets a new
    /// engine, and the old one drains and stops (if it was running or
    /// starting, the new one is started right away); a removed one drains and
    /// stops; an added one starts on its first request (or now, `preload`).
    /// Settings other than `models` need a restart: they are returned, not
    /// applied. Returns (changes, restart-only settings that differ).
    pub fn reconcile(self: &Arc<Self>, new: &EnginesConfig) -> (Vec<String>, Vec<String>) {
        let mut restart_only = Vec::new();
        let old = &self.config;
        let global = [
            ("engines.ports", old.ports != new.ports),
            ("engines.log_dir", old.log_dir != new.log_dir),
            (
                "engines.log_max_bytes",
                old.log_max_bytes != new.log_max_bytes,
            ),
            (
                "engines.log_max_files",
                old.log_max_files != new.log_max_files,
            ),
            ("engines.stop_grace", old.stop_grace != new.stop_grace),
            ("engines.on_exit", old.on_exit != new.on_exit),
            ("engines.python", old.python != new.python),
            ("engines.gpu", old.gpu != new.gpu),
        ];
        for (key, differs) in global {
            if differs {
                restart_only.push(key.to_string());
            }
        }
        let current = self.engines.load_full();
        let mut changes = Vec::new();
        let mut next = Vec::with_capacity(new.models.len());
        // engines to start now, and engines to stop, each with its
        // replacement to start once it has stopped (a changed definition)
        let mut start_now = Vec::new();
        let mut retire: Vec<(Arc<Engine>, Option<Arc<Engine>>)> = Vec::new();
        for spec in &new.models {
            let fresh = match current.iter().find(|e| e.spec.name == spec.name) {
                Some(engine) if engine.spec == *spec => {
                    next.push(engine.clone());
                    continue;
                }
                Some(engine) => {
                    let fresh = Engine::new(spec);
                    let was_up = matches!(engine.state(), State::Running(_) | State::Starting);
                    let restart = (was_up || spec.preload).then(|| fresh.clone());
                    changes.push(format!("engine `{}` changed: restarting", spec.name));
                    retire.push((engine.clone(), restart));
                    fresh
                }
                None => {
                    let fresh = Engine::new(spec);
                    if spec.preload {
                        start_now.push(fresh.clone());
                    }
                    changes.push(format!("engine `{}` added", spec.name));
                    fresh
                }
            };
            next.push(fresh);
        }
        for engine in current.iter() {
            if !new.models.iter().any(|m| m.name == engine.spec.name) {
                changes.push(format!("engine `{}` removed: draining", engine.spec.name));
                retire.push((engine.clone(), None));
            }
        }
        if changes.is_empty() {
            return (changes, restart_only);
        }
        lock(&self.retiring).extend(retire.iter().map(|(old, _)| old.clone()));
        self.engines.store(Arc::new(next));
        for (engine, replacement) in retire {
            let me = self.clone();
            tokio::spawn(async move {
                me.unload(&engine).await;
                lock(&me.retiring).retain(|e| !Arc::ptr_eq(e, &engine));
                if let Some(fresh) = replacement {
                    me.start_in_background(fresh);
                }
            });
        }
        for engine in start_now {
            self.clone().start_in_background(engine);
        }
        (changes, restart_only)
    }

    /// `POST /admin/models/{base}/lora`: load an adapter into the running
    /// engine (started if needed) through vLLM's `/v1/load_lora_adapter`;
    /// it is loaded again after every restart.
    pub async fn load_adapter(
        self: &Arc<Self>,
        engine: &Arc<Engine>,
        name: &str,
        path: &str,
    ) -> Result<(), AdapterError> {
        if !engine.spec.enable_lora {
            return Err(AdapterError::NotEnabled);
        }
        if self.find(name).is_some() {
            return Err(AdapterError::Engine {
                status: 400,
                message: format!("`{name}` is already a model name; choose another adapter name"),
            });
        }
        let (addr, _use) = self.acquire(engine).await.map_err(AdapterError::Start)?;
        let body = serde_json::json!({"lora_name": name, "lora_path": path});
        adapter_call(addr, "/v1/load_lora_adapter", &body).await?;
        lock(&engine.adapters).push((name.to_string(), path.to_string()));
        Ok(())
    }

    /// `DELETE /admin/models/{base}/lora/{name}` through `/v1/unload_lora_adapter`.
    pub async fn unload_adapter(
        &self,
        engine: &Arc<Engine>,
        name: &str,
    ) -> Result<(), AdapterError> {
        if !engine.serves_adapter(name) {
            return Err(AdapterError::Unknown);
        }
        if let State::Running(addr) = engine.state() {
            let body = serde_json::json!({"lora_name": name});
            adapter_call(addr, "/v1/unload_lora_adapter", &body).await?;
        }
        lock(&engine.adapters).retain(|(n, _)| n != name);
        Ok(())
    }

    /// The current engines (a snapshot: a reload may replace the list).
    pub fn all(&self) -> Arc<Vec<Arc<Engine>>> {
        self.engines.load_full()
    }

    /// A running engine's address for one request, starting it if needed
    /// (requests arriving meanwhile wait for the same start).
    pub async fn acquire(
        self: &Arc<Self>,
        engine: &Arc<Engine>,
    ) -> Result<(SocketAddr, EngineUse), EngineError> {
        let name = engine.spec.name.clone();
        let deadline = Instant::now() + engine.spec.startup_timeout + Duration::from_secs(5);
        let mut rx = engine.state.subscribe();
        let mut first = true;
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                State::Running(addr) => {
                    engine.in_flight.fetch_add(1, Ordering::AcqRel);
                    engine.touch();
                    // it may have started draining between the read and the count
                    if matches!(engine.state(), State::Running(_)) {
                        return Ok((addr, EngineUse(engine.clone())));
                    }
                    drop(EngineUse(engine.clone()));
                    continue;
                }
                State::Stopped => self.clone().start_in_background(engine.clone()),
                // a new request retries a start that found no memory; one that
                // waited for that start gets its answer
                State::Unavailable(_) if first => self.clone().start_in_background(engine.clone()),
                State::Unavailable(error) => return Err(error),
                State::Failed(reason) => {
                    return Err(EngineError::Failed {
                        model: name,
                        reason,
                    })
                }
                State::Draining | State::Stopping => {
                    return Err(EngineError::Unloading { model: name })
                }
                State::Starting => {}
            }
            first = false;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || tokio::time::timeout(remaining, rx.changed()).await.is_err() {
                return Err(EngineError::Timeout {
                    model: name,
                    waited: engine.spec.startup_timeout,
                });
            }
        }
    }

    /// Start unless already on its way (the state flips under the watch lock,
    /// so exactly one caller wins).
    fn start_in_background(self: Arc<Self>, engine: Arc<Engine>) {
        let won = engine.state.send_if_modified(|s| {
            if matches!(s, State::Stopped | State::Unavailable(_)) {
                *s = State::Starting;
                true
            } else {
                false
            }
        });
        if won {
            tokio::spawn(async move { self.run(engine).await });
        }
    }

    /// Admin load: reset a failed engine and start it; wait until running.
    pub async fn load(self: &Arc<Self>, engine: &Arc<Engine>) -> Result<SocketAddr, EngineError> {
        engine.state.send_if_modified(|s| {
            if matches!(s, State::Failed(_)) {
                *s = State::Stopped;
                true
            } else {
                false
            }
        });
        engine.failures.store(0, Ordering::Relaxed);
        let (addr, _use) = self.acquire(engine).await?;
        Ok(addr)
    }

    /// GPU admission: `engine` needs `gpu_memory_mb` on each of its GPUs.
    /// First decide whether it can fit at all (see [`plan_admission`]): a
    /// model larger than a GPU's total, or one that would not fit even after
    /// unloading every idle engine, is refused at once and nothing is
    /// unloaded. Otherwise idle engines are unloaded, least recently used
    /// first (never one with requests in flight), until it fits.
    async fn admit_gpu(self: &Arc<Self>, engine: &Arc<Engine>) -> Result<(), EngineError> {
        let need = engine.spec.gpu_memory_mb;
        if need == 0 || engine.spec.gpus.is_empty() {
            return Ok(());
        }
        // one admission at a time: two starts never count the same free memory
        let _one = self.admission.lock().await;
        let rooms = self.rooms(engine);
        let everyone = self.everyone();
        let candidates: Vec<&Arc<Engine>> = everyone
            .iter()
            .filter(|e| e.can_make_room_for(engine))
            .collect();
        let evictable: Vec<Evictable> = candidates.iter().map(|e| e.as_evictable()).collect();
        let victims = plan_admission(need, &rooms, &evictable).map_err(|why| match why {
            Infeasible::LargerThanGpu { .. } => EngineError::TooLargeForGpu {
                model: engine.spec.name.clone(),
                detail: why.describe(need),
            },
            Infeasible::CannotFree { .. } => EngineError::NoGpuMemory {
                model: engine.spec.name.clone(),
                detail: why.describe(need),
            },
        })?;
        for i in victims {
            let Some(victim) = candidates.get(i) else {
                continue;
            };
            log::info!(
                "unloading idle `{}` (LRU) to free {} MB on GPU {:?} for `{}`",
                victim.spec.name,
                victim.spec.gpu_memory_mb,
                victim.spec.gpus,
                engine.spec.name
            );
            self.unload(victim).await;
        }
        // The plan counted each victim's declared memory as freed. That is
        // exact for fake GPUs; with NVML the snapshot lags (polled every 5 s),
        // so reading it again now would still show the victims' memory.
        engine.admitted.store(true, Ordering::Release);
        Ok(())
    }

    /// What admission knows about each GPU of `engine`: its total (when
    /// known) and the memory free for it now. GPUs nothing is known about
    /// (source `none`, or NVML without that GPU) are left out: they do not
    /// block a start.
    fn rooms(&self, engine: &Engine) -> Vec<GpuRoom> {
        let mut rooms = Vec::new();
        for &gpu in &engine.spec.gpus {
            let room = match &self.config.gpu {
                GpuSource::None => continue,
                GpuSource::Fake(gpus) => {
                    let total = gpus.iter().find(|g| g.id == gpu).map_or(0, |g| g.memory_mb);
                    GpuRoom {
                        id: gpu,
                        total_mb: Some(total),
                        free_mb: total.saturating_sub(self.declared_use(gpu, engine)),
                    }
                }
                GpuSource::Nvml => {
                    let snapshot = self.gpu.snapshot();
                    let Some(info) = snapshot.gpus.iter().find(|g| g.id == gpu) else {
                        continue; // nothing known: do not block
                    };
                    // engines still starting have not allocated yet
                    let pending: u64 = self
                        .everyone()
                        .iter()
                        .filter(|e| {
                            !std::ptr::eq(e.as_ref(), engine)
                                && e.admitted.load(Ordering::Acquire)
                                && !matches!(e.state(), State::Running(_))
                                && e.spec.gpus.contains(&gpu)
                        })
                        .map(|e| e.spec.gpu_memory_mb)
                        .sum();
                    GpuRoom {
                        id: gpu,
                        total_mb: Some(info.memory.total_mb),
                        free_mb: info.memory.free_mb.saturating_sub(pending),
                    }
                }
            };
            rooms.push(room);
        }
        rooms
    }

    /// Declared memory of the other engines that hold `gpu`.
    fn declared_use(&self, gpu: u32, except: &Engine) -> u64 {
        self.everyone()
            .iter()
            .filter(|e| {
                !std::ptr::eq(e.as_ref(), except)
                    && e.admitted.load(Ordering::Acquire)
                    && e.spec.gpus.contains(&gpu)
            })
            .map(|e| e.spec.gpu_memory_mb)
            .sum()
    }

    /// Start (state is already `Starting`), then supervise until stopped.
    async fn run(self: Arc<Self>, engine: Arc<Engine>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if let Err(e) = self.admit_gpu(&engine).await {
                let reason = e.message();
                log::warn!("{reason}");
                *lock(&engine.last_error) = Some(reason);
                if matches!(
                    e,
                    EngineError::NoGpuMemory { .. } | EngineError::TooLargeForGpu { .. }
                ) {
                    engine.set(State::Unavailable(e));
                }
                return;
            }
            let reason = match self.start_once(&engine).await {
                Ok(mut process) => {
                    engine.failures.store(0, Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    let ended = process.wait().await;
                    engine.pid.store(0, Ordering::Release);
                    self.release_port(&engine);
                    if !matches!(engine.state(), State::Running(_)) {
                        // stopped on purpose (unload, shutdown)
                        engine.admitted.store(false, Ordering::Release);
                        return;
                    }
                    // a crash: out of routing at once
                    engine.set(State::Starting);
                    engine.restarts.fetch_add(1, Ordering::Relaxed);
                    let reason = format!(
                        "the engine process {ended}; last output: {}",
                        process.log_tail(5)
                    );
                    log::warn!("engine `{}` crashed: {reason}", engine.spec.name);
                    reason
                }
                Err(why) => {
                    log::warn!("engine `{}` failed to start: {why}", engine.spec.name);
                    self.release_port(&engine);
                    why.to_string()
                }
            };
            *lock(&engine.last_error) = Some(reason.clone());
            let failures = engine.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures > engine.spec.max_restarts {
                engine.admitted.store(false, Ordering::Release);
                engine.set(State::Failed(format!(
                    "{failures} failed starts or crashes in a row; last: {reason}"
                )));
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            if !matches!(engine.state(), State::Starting) {
                engine.admitted.store(false, Ordering::Release);
                return; // unloaded meanwhile
            }
        }
    }

    fn take_port(&self) -> Option<u16> {
        let mut ports = lock(&self.free_ports);
        let port = ports.iter().next().copied()?;
        ports.remove(&port);
        Some(port)
    }

    fn release_port(&self, engine: &Engine) {
        if let Some(port) = lock(&engine.port).take() {
            lock(&self.free_ports).insert(port);
        }
    }

    /// Spawn the process and wait for its readiness probe. On success the
    /// engine is `Running`; the process is returned for supervision (the
    /// mutex keeps a handle for stopping).
    async fn start_once(&self, engine: &Arc<Engine>) -> Result<EngineProcess, StartError> {
        let spec = &engine.spec;
        let port = loop {
            let Some(port) = self.take_port() else {
                return Err(StartError::NoPort {
                    from: self.config.ports.0,
                    to: self.config.ports.1,
                });
            };
            // a port held by something else is skipped (and not handed out again)
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                break port;
            }
            log::warn!("engine port {port} is in use by another process; skipping it");
        };
        *lock(&engine.port) = Some(port);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let fill = |arg: &str| {
            arg.replace("{python}", &self.config.python)
                .replace("{path}", spec.path.as_deref().unwrap_or(""))
                .replace("{name}", &spec.name)
                .replace("{host}", "127.0.0.1")
                .replace("{port}", &port.to_string())
        };
        let mut argv = spec.command.iter().map(|a| fill(a));
        let program = argv.next().unwrap_or_default();
        let mut env = spec.env.clone();
        if !spec.gpus.is_empty() {
            let ids: Vec<String> = spec.gpus.iter().map(u32::to_string).collect();
            env.push(("CUDA_VISIBLE_DEVICES".to_string(), ids.join(",")));
        }
        let spawn = SpawnSpec {
            program,
            args: argv.collect(),
            env,
            workdir: spec.workdir.clone(),
            log_path: self
                .config
                .log_dir
                .join(format!("{}.log", sanitize(&spec.name))),
            log_max_bytes: self.config.log_max_bytes,
            log_max_files: self.config.log_max_files,
        };
        log::info!(
            "starting engine `{}` ({}) on {addr}: {} {}",
            spec.name,
            spec.kind.as_str(),
            spawn.program,
            spawn.args.join(" ")
        );
        let t0 = Instant::now();
        let mut process = EngineProcess::spawn(&spawn).await?;
        engine.pid.store(process.pid(), Ordering::Release);
        let deadline = t0 + spec.startup_timeout;
        let probe_url_path = spec.health_path.clone();
        loop {
            if let Some(exit) = process.try_exited() {
                let tail = process.log_tail(5);
                engine.pid.store(0, Ordering::Relaxed);
                return Err(StartError::Exited { exit, tail });
            }
            if probe(addr, &probe_url_path).await {
                break;
            }
            if Instant::now() >= deadline {
                let _ = process.stop(self.config.stop_grace).await;
                engine.pid.store(0, Ordering::Relaxed);
                return Err(StartError::NotReady {
                    waited: spec.startup_timeout,
                    path: probe_url_path,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let adapters = lock(&engine.adapters).clone();
        for (name, path) in adapters {
            let body = serde_json::json!({"lora_name": name, "lora_path": path}).to_string();
            match post_json(addr, "/v1/load_lora_adapter", &body).await {
                Ok((200, _)) => log::info!("engine `{}`: LoRA adapter `{name}` loaded", spec.name),
                Ok((status, text)) => {
                    let _ = process.stop(self.config.stop_grace).await;
                    engine.pid.store(0, Ordering::Release);
                    return Err(StartError::Adapter {
                        name,
                        why: format!(
                            "from {path} failed ({status}): {}",
                            text.chars().take(300).collect::<String>()
                        ),
                    });
                }
                Err(e) => {
                    let _ = process.stop(self.config.stop_grace).await;
                    engine.pid.store(0, Ordering::Release);
                    return Err(StartError::Adapter {
                        name,
                        why: format!("failed: {e}"),
                    });
                }
            }
        }
        log::info!(
            "engine `{}` ready on {addr} after {:.2} s (pid {})",
            spec.name,
            t0.elapsed().as_secs_f64(),
            process.pid()
        );
        engine.touch();
        let routable = engine.state.send_if_modified(|s| {
            if matches!(s, State::Starting) {
                *s = State::Running(addr);
                true
            } else {
                false
            }
        });
        if !routable {
            // unloaded while starting
            let how = process.stop(self.config.stop_grace).await;
            engine.pid.store(0, Ordering::Release);
            return Err(StartError::Unloaded { how });
        }
        *lock(&engine.started) = Some(Instant::now());
        Ok(process)
    }

    /// Unload: out of routing at once, in-flight requests finish (up to
    /// `stop_grace`), then SIGTERM → SIGKILL to the process group.
    pub async fn unload(&self, engine: &Arc<Engine>) {
        let mut was = State::Stopped;
        engine.state.send_if_modified(|s| {
            was = s.clone();
            match s {
                State::Running(_) => {
                    *s = State::Draining;
                    true
                }
                State::Starting => {
                    *s = State::Stopping;
                    true
                }
                State::Failed(_) | State::Unavailable(_) => {
                    *s = State::Stopped;
                    true
                }
                _ => false,
            }
        });
        if !matches!(was, State::Running(_) | State::Starting) {
            return;
        }
        let grace = self.config.stop_grace;
        let deadline = Instant::now() + grace;
        while engine.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        engine.set(State::Stopping);
        let pid = engine.pid.load(Ordering::Acquire);
        if pid != 0 {
            // SIGTERM to the engine itself first, so it can stop its own
            // workers in order (vLLM does); the supervising task reaps it
            // and clears the pid
            let _ = process::signal_process(pid, libc::SIGTERM);
            if !wait_pid_cleared(engine, grace).await {
                log::warn!(
                    "engine `{}` (pid {pid}) ignored SIGTERM for {} s: SIGKILL to its process group",
                    engine.spec.name,
                    grace.as_secs()
                );
                let _ = process::signal_group(pid, libc::SIGKILL);
                wait_pid_cleared(engine, Duration::from_secs(10)).await;
            }
            // whatever the engine left behind in its group goes too
            let _ = process::signal_group(pid, libc::SIGKILL);
        }
        engine.admitted.store(false, Ordering::Release);
        *lock(&engine.started) = None;
        engine.set(State::Stopped);
        log::info!("engine `{}` unloaded", engine.spec.name);
    }

    /// Idle TTLs, preloads; runs until shutdown, then stops every engine.
    pub async fn supervise(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        for engine in self.engines.load().iter() {
            if engine.spec.preload {
                self.clone().start_in_background(engine.clone());
            }
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => break,
            }
            for engine in self.engines.load_full().iter() {
                if let Some(idle) = engine.idle_expired() {
                    log::info!(
                        "engine `{}` idle for {} s (idle_ttl {} s): unloading",
                        engine.spec.name,
                        idle.as_secs(),
                        engine.spec.idle_ttl.unwrap_or_default().as_secs()
                    );
                    self.unload(engine).await;
                }
            }
        }
        self.stop_all().await;
    }

    /// Stop every engine at once (gateway exit), unless `on_exit: leave`.
    pub async fn stop_all(self: &Arc<Self>) {
        if self.config.on_exit == config::OnExit::Leave {
            log::info!("leaving engines running (engines.on_exit: leave)");
            return;
        }
        let mut stops = tokio::task::JoinSet::new();
        for engine in self.everyone() {
            let (me, engine) = (self.clone(), engine.clone());
            stops.spawn(async move { me.unload(&engine).await });
        }
        while stops.join_next().await.is_some() {}
    }

    pub fn status(&self) -> Vec<EngineStatus> {
        let snapshot = self.gpu.snapshot();
        self.engines
            .load()
            .iter()
            .map(|e| {
                let state = e.state();
                let pid = e.pid.load(Ordering::Relaxed);
                EngineStatus {
                    model_id: e.spec.name.clone(),
                    kind: e.spec.kind.as_str(),
                    status: state.label(),
                    pid: (pid != 0).then_some(pid),
                    port: match state {
                        State::Running(a) => Some(a.port()),
                        _ => *lock(&e.port),
                    },
                    uptime_seconds: lock(&e.started).map(|t| t.elapsed().as_secs()),
                    restarts: e.restarts.load(Ordering::Relaxed),
                    in_flight: e.in_flight(),
                    idle_seconds: e.idle_for().as_secs(),
                    gpus: e.spec.gpus.clone(),
                    gpu_memory_mb: e.spec.gpu_memory_mb,
                    gpu_memory_used_mb: (pid != 0)
                        .then(|| measured_gpu_memory(&snapshot.processes, pid))
                        .flatten(),
                    last_error: match &state {
                        State::Failed(r) => Some(r.clone()),
                        _ => lock(&e.last_error).clone(),
                    },
                }
            })
            .collect()
    }
}

/// Wait until the supervising task has reaped the process.
async fn wait_pid_cleared(engine: &Engine, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while engine.pid.load(Ordering::Acquire) != 0 {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A small JSON POST to an engine's own API: (status, body).
async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> Result<(u16, String), crate::fetch::FetchError> {
    let (status, answer) = crate::fetch::exchange(
        "POST",
        addr,
        path,
        Some(body.as_bytes()),
        Duration::from_secs(120),
        1024 * 1024,
    )
    .await?;
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}

/// vLLM's adapter API: POST `body` to `path`; anything but 200 is an error
/// with the engine's status and text (502 when it could not be reached).
async fn adapter_call(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> Result<(), AdapterError> {
    let (status, text) = post_json(addr, path, &body.to_string())
        .await
        .map_err(|e| AdapterError::Engine {
            status: 502,
            message: e.to_string(),
        })?;
    if status != 200 {
        return Err(AdapterError::Engine {
            status,
            message: text,
        });
    }
    Ok(())
}

/// One readiness probe: `GET path` answered 200.
async fn probe(addr: SocketAddr, path: &str) -> bool {
    crate::fetch::get(addr, path, Duration::from_secs(2), 1024 * 1024)
        .await
        .is_ok()
}

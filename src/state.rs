//! Everything a request needs, built from a validated config, and the
//! reload that replaces it.
//!
//! An [`AppState`] is one *generation*: the config and what is built from it
//! (pools, filter chain, auth, limits), plus handles to the process-wide
//! parts every generation shares (metrics, access log, engines, GPU monitor,
//! upstream connection pool). [`Live`] holds the current generation; a
//! request takes it once when it starts and keeps it to the end, so
//! in-flight requests finish on the config they started with while new
//! requests see the reloaded one.

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::engines::Engines;
use crate::gpu::GpuMonitor;
use crate::metrics::Metrics;
use crate::model_stats::ModelStats;
use crate::routing::Router;
use arc_swap::ArcSwap;
use infergate_filters::auth::Auth;
use infergate_filters::limits::Limits;
use infergate_filters::registry::Previous;
use infergate_filters::Chain;
use pingora_core::connectors::http::v1::Connector;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

pub struct AppState {
    /// 1 at start, +1 per successful reload.
    pub generation: u64,
    pub config: Config,
    pub router: Router,
    pub chain: Chain,
    /// The `auth` filter's keys and users, for login and `/admin/reload-keys`.
    pub auth: Option<Arc<Auth>>,
    /// The `limits` filter's state, for `/admin/usage`.
    pub limits: Option<Arc<Limits>>,
    /// Pooled HTTP/1.1 connections to engines (vLLM, SGLang, llama.cpp speak
    /// HTTP/1.1); shared by every generation, so a reload keeps them warm.
    pub connector: Arc<Connector>,
    pub started_at: std::time::SystemTime,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AccessLog>,
    pub models: ModelStats,
    pub gpu: Arc<GpuMonitor>,
    /// Engine processes infergate manages (none without `engines:`).
    pub engines: Arc<Engines>,
    /// Set when a graceful shutdown starts (SIGTERM) to the moment open
    /// responses must end (just before `server.grace_period` runs out);
    /// readiness turns 503 at once.
    pub draining: Arc<tokio::sync::watch::Sender<Option<tokio::time::Instant>>>,
}

impl AppState {
    /// The Prometheus exposition, with backend, engine, GPU and store
    /// state read now.
    pub fn metrics_text(&self) -> Vec<u8> {
        let gpus = self.gpu.snapshot();
        self.metrics.render(crate::metrics::LiveState {
            store: self.limits.as_ref().and_then(|l| l.redis()).map(|s| &**s),
            gpus: &gpus,
            router: &self.router,
            engines: &self.engines,
        })
    }

    /// Readiness turns 503 now; open responses must end `after` plus the
    /// grace period from now, less a margin to write their error before
    /// Pingora stops the runtime.
    pub fn start_draining(&self, after: std::time::Duration) {
        let grace = self.config.server.grace_period;
        let margin = std::time::Duration::from_secs(1).min(grace / 2);
        self.draining.send_replace(Some(
            tokio::time::Instant::now() + after + grace.saturating_sub(margin),
        ));
    }
}

/// Every name a client may use for a model in this config.
fn model_names(config: &Config) -> Vec<String> {
    config
        .pools
        .iter()
        .flat_map(|p| p.models.iter().chain(p.aliases.keys()).cloned())
        .chain(config.engines.models.iter().flat_map(|m| {
            std::iter::once(m.name.clone())
                .chain(m.aliases.keys().cloned())
                .chain(m.lora.iter().map(|(n, _)| n.clone()))
        }))
        .collect()
}

impl AppState {
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let router = Router::new(&config).map_err(|e| format!("cannot build pools: {e}"))?;
        let built = infergate_filters::registry::build(&config.filters)?;
        for warning in &built.warnings {
            log::warn!("{warning}");
        }
        let names = model_names(&config);
        let gpu = GpuMonitor::new();
        let engines = Arc::new(Engines::new(config.engines.clone(), gpu.clone()));
        let metrics = Metrics::new(names.iter().cloned().collect())
            .map_err(|e| format!("cannot set up metrics: {e}"))?;
        let access_log = AccessLog::start(config.access_log.clone())
            .map_err(|e| format!("cannot start the access log: {e}"))?;
        Ok(Arc::new(AppState {
            generation: 1,
            router,
            chain: built.chain,
            auth: built.auth,
            limits: built.limits,
            connector: Arc::new(Connector::new(None)),
            config,
            started_at: std::time::SystemTime::now(),
            metrics: Arc::new(metrics),
            access_log: Arc::new(access_log),
            models: ModelStats::new(names),
            engines,
            gpu,
            draining: Arc::new(tokio::sync::watch::Sender::new(None)),
        }))
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub generation: u64,
    /// What changed, one line each (empty: the file was the same).
    pub changes: Vec<String>,
    /// Settings that differ but need a restart; they keep their running
    /// values until then.
    pub restart_required: Vec<String>,
    pub warnings: Vec<String>,
}

/// The current generation and how to replace it.
pub struct Live {
    current: ArcSwap<AppState>,
    /// The file the config came from (`None`: built in code; reload refuses).
    pub config_path: Option<PathBuf>,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// The generation number, bumped after every successful reload (the
    /// pool supervisor follows it).
    pub reloaded: tokio::sync::watch::Sender<u64>,
    /// Set when this process is handing over (an upgrade's SIGQUIT) or
    /// stopping: every response then says `Connection: close`, so clients
    /// stop reusing connections to it before it closes them.
    pub closing: std::sync::atomic::AtomicBool,
    /// Request bodies held in memory, across generations
    /// (`server.max_buffered_body_bytes`).
    pub body_budget: Arc<crate::body_budget::BodyBudget>,
}

impl Live {
    pub fn new(app: Arc<AppState>, config_path: Option<PathBuf>) -> Arc<Live> {
        let generation = app.generation;
        let body_budget =
            crate::body_budget::BodyBudget::new(app.config.server.max_buffered_body_bytes);
        Arc::new(Live {
            body_budget,
            current: ArcSwap::new(app),
            config_path,
            reload_lock: tokio::sync::Mutex::new(()),
            reloaded: tokio::sync::watch::Sender::new(generation),
            closing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The generation new requests use.
    pub fn current(&self) -> Arc<AppState> {
        self.current.load_full()
    }

    /// Read the config file again and apply it. The new file is validated
    /// completely (schema, values, filter files, pools) before anything
    /// changes; on `Err` nothing changed. Counted in
    /// `infergate_config_reloads_total{kind="config"}` and logged.
    pub async fn reload(&self, trigger: &str) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let old = self.current();
        let outcome = self.build_next(&old).await;
        old.metrics.count_reload("config", outcome.is_ok());
        match outcome {
            Ok((next, report)) => {
                self.body_budget
                    .set_capacity(next.config.server.max_buffered_body_bytes);
                self.current.store(next);
                self.reloaded.send_replace(report.generation);
                if report.changes.is_empty() {
                    log::info!(
                        "config reloaded ({trigger}): generation {}, nothing changed",
                        report.generation
                    );
                } else {
                    log::info!(
                        "config reloaded ({trigger}): generation {}: {}",
                        report.generation,
                        report.changes.join("; ")
                    );
                }
                for key in &report.restart_required {
                    log::warn!("config reload ({trigger}): `{key}` changed but needs a restart; the running value stays until then");
                }
                for warning in &report.warnings {
                    log::warn!("{warning}");
                }
                Ok(report)
            }
            Err(reason) => {
                log::error!("config reload ({trigger}) failed, nothing changed: {reason}");
                Err(reason)
            }
        }
    }

    async fn build_next(
        &self,
        old: &Arc<AppState>,
    ) -> Result<(Arc<AppState>, ReloadReport), String> {
        let Some(path) = &self.config_path else {
            return Err("the gateway was not started from a config file".to_string());
        };
        let mut config = crate::config::load_file(path).map_err(|errors| {
            let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            format!("{}: {}", path.display(), all.join("; "))
        })?;
        let mut restart_required = Vec::new();
        keep_restart_only(&old.config, &mut config, &mut restart_required);
        let mut changes = describe_changes(&old.config, &config);

        // everything that can fail, before anything changes
        let router = Router::rebuild(&config, &old.router)
            .map_err(|e| format!("cannot build pools: {e}"))?;
        let mut built = infergate_filters::registry::build_with(
            &config.filters,
            Previous {
                auth: old.auth.as_ref(),
                limits: old.limits.as_ref(),
            },
        )?;
        let mut warnings = std::mem::take(&mut built.warnings);
        // new or changed pools get their first health check before they take
        // traffic (a backend routes only after a passing check)
        for pool in router.pools() {
            if old.router.pools().iter().any(|p| Arc::ptr_eq(p, pool)) {
                continue;
            }
            if let Err(e) = pool.warm_up().await {
                return Err(format!(
                    "pool {}: loading backends failed: {e}",
                    pool.name()
                ));
            }
            if pool.healthy_count() == 0 {
                warnings.push(format!(
                    "pool `{}` has no healthy backend after its first health check",
                    pool.name()
                ));
            }
        }
        router.carry_discovered(&old.router);
        if let Some(auth) = &built.auth {
            if !old.auth.as_ref().is_some_and(|a| Arc::ptr_eq(a, auth)) {
                spawn_keys_watcher(auth, old.metrics.clone())?;
            }
        }

        // applied from here on: nothing below fails
        built.commit_files();
        let (engine_changes, engine_restart) = old.engines.reconcile(&config.engines);
        changes.extend(engine_changes);
        restart_required.extend(engine_restart);
        let names = model_names(&config);
        old.metrics.add_models(names.iter().cloned());
        let generation = old.generation + 1;
        let next = Arc::new(AppState {
            generation,
            router,
            chain: built.chain,
            auth: built.auth,
            limits: built.limits,
            connector: old.connector.clone(),
            config,
            started_at: old.started_at,
            metrics: old.metrics.clone(),
            access_log: old.access_log.clone(),
            models: old.models.carry(names),
            gpu: old.gpu.clone(),
            engines: old.engines.clone(),
            draining: old.draining.clone(),
        });
        Ok((
            next,
            ReloadReport {
                generation,
                changes,
                restart_required,
                warnings,
            },
        ))
    }
}

/// Settings a running process cannot change (listeners, threads, the grace
/// period Pingora was given, the access log's open file) keep their running
/// values; each one that differs is reported.
fn keep_restart_only(old: &Config, new: &mut Config, report: &mut Vec<String>) {
    use std::net::SocketAddr;
    /// The running value stays; `key` is reported when the file's differs.
    fn keep<T: Clone>(
        key: &str,
        running: &T,
        file: &mut T,
        same: impl Fn(&T, &T) -> bool,
        report: &mut Vec<String>,
    ) {
        if !same(running, file) {
            report.push(key.to_string());
        }
        *file = running.clone();
    }
    // port 0 was resolved to a concrete port at start
    fn same_addr(running: &SocketAddr, file: &SocketAddr) -> bool {
        running == file || (file.port() == 0 && running.ip() == file.ip())
    }
    fn same_side(running: &Option<SocketAddr>, file: &Option<SocketAddr>) -> bool {
        match (running, file) {
            (Some(a), Some(b)) => same_addr(a, b),
            (a, b) => a == b,
        }
    }
    let (o, n) = (&old.server, &mut new.server);
    keep("server.listen", &o.listen, &mut n.listen, same_addr, report);
    keep(
        "server.admin_listen",
        &o.admin_listen,
        &mut n.admin_listen,
        same_side,
        report,
    );
    keep(
        "server.metrics_listen",
        &o.metrics_listen,
        &mut n.metrics_listen,
        same_side,
        report,
    );
    keep(
        "server.threads",
        &o.threads,
        &mut n.threads,
        PartialEq::eq,
        report,
    );
    keep(
        "server.work_stealing",
        &o.work_stealing,
        &mut n.work_stealing,
        PartialEq::eq,
        report,
    );
    keep(
        "server.max_connections",
        &o.max_connections,
        &mut n.max_connections,
        PartialEq::eq,
        report,
    );
    keep(
        "server.connection_reserve",
        &o.connection_reserve,
        &mut n.connection_reserve,
        PartialEq::eq,
        report,
    );
    keep(
        "server.grace_period",
        &o.grace_period,
        &mut n.grace_period,
        PartialEq::eq,
        report,
    );
    keep(
        "server.watch_config",
        &o.watch_config,
        &mut n.watch_config,
        PartialEq::eq,
        report,
    );
    keep(
        "server.upgrade_sock",
        &o.upgrade_sock,
        &mut n.upgrade_sock,
        PartialEq::eq,
        report,
    );
    keep(
        "access_log",
        &old.access_log,
        &mut new.access_log,
        PartialEq::eq,
        report,
    );
}

/// One line per changed pool and section (engines report their own).
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for pool in &new.pools {
        match old.pools.iter().find(|p| p.name == pool.name) {
            None => out.push(format!("pool `{}` added", pool.name)),
            Some(was) if was != pool => out.push(format!("pool `{}` changed", pool.name)),
            Some(_) => {}
        }
    }
    for pool in &old.pools {
        if !new.pools.iter().any(|p| p.name == pool.name) {
            out.push(format!("pool `{}` removed", pool.name));
        }
    }
    let sections = [
        ("filters", old.filters != new.filters),
        ("timeouts", old.timeouts != new.timeouts),
        ("upstream", old.upstream != new.upstream),
        ("routing", old.routing != new.routing),
        (
            "server.max_request_body_bytes",
            old.server.max_request_body_bytes != new.server.max_request_body_bytes,
        ),
        (
            "server.ready_requires_backend",
            old.server.ready_requires_backend != new.server.ready_requires_backend,
        ),
    ];
    for (name, changed) in sections {
        if changed {
            out.push(format!("{name} changed"));
        }
    }
    out
}

/// Reload the keys/users files when they change (`auth.watch: true`),
/// counting each outcome. The watcher ends with its `Auth`: the closure holds
/// only the metrics, never the generation.
pub fn spawn_keys_watcher(auth: &Arc<Auth>, metrics: Arc<Metrics>) -> Result<(), String> {
    auth.spawn_watcher(Box::new(move |outcome| {
        keys_reloaded(&metrics, "keys/users files changed", &outcome)
    }))
}

/// Count and log one reload of the keys/users files, however triggered.
pub fn keys_reloaded(
    metrics: &Metrics,
    trigger: &str,
    outcome: &Result<infergate_filters::auth::ReloadReport, String>,
) {
    metrics.count_reload("keys", outcome.is_ok());
    match outcome {
        Ok(report) => {
            log::info!(
                "keys reloaded ({trigger}): {} keys, {} users",
                report.keys,
                report.users
            );
            for warning in &report.warnings {
                log::warn!("{warning}");
            }
        }
        Err(reason) => log::error!("keys reload ({trigger}) failed, nothing changed: {reason}"),
    }
}

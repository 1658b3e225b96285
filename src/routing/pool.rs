//! A pool: the health-checked backends that serve a set of models, and the
//! choice of one backend per attempt.
//!
//! Selection and health state come from `pingora-load-balancing`; this file
//! adds what it lacks: a backend takes traffic only after its *first passing*
//! check (Pingora counts new backends healthy), least-in-flight selection, and
//! per-backend in-flight counters, and the engine-aware policies
//! (`load_aware`, `prefix_aware`: docs/routing.md).

use super::load::{self, EngineLoad};
use super::prefix::{PrefixIndex, PromptKey, MAX_BACKENDS};
use crate::config::{Balance, PoolConfig};
use async_trait::async_trait;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result as PResult;
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::selection::{Consistent, RoundRobin};
use pingora_load_balancing::{discovery, Backend, Backends, LoadBalancer};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Live state of one backend, shared by selection, health checks and status pages.
#[derive(Debug)]
pub struct BackendState {
    pub address: SocketAddr,
    pub weight: usize,
    pub inflight: AtomicUsize,
    /// Set by the first passing health check; never cleared.
    pub checked_ok: AtomicBool,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Moving average of request durations on this backend, in microseconds.
    pub response_time_us: AtomicU64,
    /// Position in the pool's backend list (its bit in the prefix index).
    pub position: usize,
    /// What the engine reports about its own load (`engine_metrics`).
    pub engine: EngineLoad,
}

impl BackendState {
    /// Fold one finished request's duration into the moving average (weight 1/10).
    pub fn record_duration(&self, micros: u64) {
        let old = self.response_time_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            micros
        } else {
            (old * 9 + micros) / 10
        };
        self.response_time_us.store(new, Ordering::Relaxed);
    }
}

enum Selector {
    RoundRobin(LoadBalancer<RoundRobin>),
    Consistent(LoadBalancer<Consistent>),
}

pub struct Pool {
    pub config: PoolConfig,
    selector: Selector,
    states: Arc<HashMap<SocketAddr, Arc<BackendState>>>,
    /// Stable order (config order) for least-in-flight scans and status pages.
    ordered: Vec<Arc<BackendState>>,
    rr_offset: AtomicUsize,
    /// `balance: prefix_aware` only.
    prefix: Option<Arc<PrefixIndex>>,
}

/// What an engine-aware policy based its choice on (metrics, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The backend holding the longest known prefix.
    PrefixHit,
    /// No prefix known; the backend the session went to before.
    Session,
    /// A prefix (or session) was known, but its backend was too busy.
    LoadFallback,
    /// Nothing known: the least-loaded backend.
    NoMatch,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::PrefixHit => "prefix_hit",
            Decision::Session => "session",
            Decision::LoadFallback => "load_fallback",
            Decision::NoMatch => "no_match",
        }
    }
}

/// What the request offers the policy to choose by.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hints<'a> {
    /// `consistent_hash`: the pool's `hash_header` value.
    pub hash_key: Option<&'a [u8]>,
    /// `prefix_aware`: the prompt's block hashes and session.
    pub prompt: Option<&'a PromptKey>,
}

/// A chosen backend, holding its in-flight slot.
pub struct Picked {
    pub guard: InflightGuard,
    /// `prefix_aware` only.
    pub decision: Option<Decision>,
    /// Bytes of the prompt the chosen backend is believed to hold.
    pub matched_bytes: usize,
}

/// Holds one in-flight slot on a backend until dropped.
pub struct InflightGuard(Arc<BackendState>);

impl InflightGuard {
    pub fn state(&self) -> &BackendState {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(config: PoolConfig) -> std::io::Result<Self> {
        let mut set = BTreeSet::new();
        let mut ordered = Vec::new();
        let mut states = HashMap::new();
        for (position, b) in config.backends.iter().enumerate() {
            let mut backend = Backend::new_with_weight(&b.address.to_string(), b.weight)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            backend.weight = b.weight;
            set.insert(backend);
            let state = Arc::new(BackendState {
                address: b.address,
                weight: b.weight,
                inflight: AtomicUsize::new(0),
                checked_ok: AtomicBool::new(false),
                requests: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                response_time_us: AtomicU64::new(0),
                position,
                engine: EngineLoad::default(),
            });
            ordered.push(state.clone());
            states.insert(b.address, state);
        }
        let states = Arc::new(states);
        let prefix = (config.balance == Balance::PrefixAware).then(|| {
            Arc::new(PrefixIndex::new(
                config.prefix_aware.index_bytes,
                config.prefix_aware.max_sessions,
            ))
        });
        let check = EngineHealthCheck::new(&config, states.clone(), prefix.clone());
        let backends = || {
            let mut backends = Backends::new(discovery::Static::new(set.clone()));
            backends.set_health_check(Box::new(check.clone()));
            backends
        };
        let selector = match config.balance {
            Balance::ConsistentHash => {
                Selector::Consistent(LoadBalancer::from_backends(backends()))
            }
            Balance::RoundRobin
            | Balance::LeastInflight
            | Balance::LoadAware
            | Balance::PrefixAware => Selector::RoundRobin(LoadBalancer::from_backends(backends())),
        };
        Ok(Pool {
            config,
            selector,
            states,
            ordered,
            rr_offset: AtomicUsize::new(0),
            prefix,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Make a new pool ready to take traffic: load its backends and run its
    /// first health check (a backend routes only after a passing check).
    pub async fn warm_up(&self) -> PResult<()> {
        self.load_backends().await?;
        self.check_health().await;
        Ok(())
    }

    /// Load the static backend list into the selector (once, before serving).
    pub async fn load_backends(&self) -> PResult<()> {
        match &self.selector {
            Selector::RoundRobin(lb) => lb.update().await,
            Selector::Consistent(lb) => lb.update().await,
        }
    }

    /// Run one round of health checks on every backend.
    pub async fn check_health(&self) {
        match &self.selector {
            Selector::RoundRobin(lb) => lb.backends().run_health_check(true).await,
            Selector::Consistent(lb) => lb.backends().run_health_check(true).await,
        }
    }

    fn backends(&self) -> &Backends {
        match &self.selector {
            Selector::RoundRobin(lb) => lb.backends(),
            Selector::Consistent(lb) => lb.backends(),
        }
    }

    /// Whether the backend may take traffic: checked OK once and healthy now.
    pub fn is_serving(&self, address: &SocketAddr) -> bool {
        let Some(state) = self.states.get(address) else {
            return false;
        };
        if !state.checked_ok.load(Ordering::Relaxed) {
            return false;
        }
        let backend = Backend {
            addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(*address),
            weight: state.weight,
            ext: Default::default(),
        };
        self.backends().ready(&backend)
    }

    pub fn backend_states(&self) -> &[Arc<BackendState>] {
        &self.ordered
    }

    /// Backends taking traffic now.
    pub fn healthy_count(&self) -> usize {
        self.serving_backends().count()
    }

    pub fn serving_backends(&self) -> impl Iterator<Item = &Arc<BackendState>> {
        self.ordered.iter().filter(|s| self.is_serving(&s.address))
    }

    /// Pick a serving backend not in `exclude`; `hash_key` feeds consistent hashing.
    pub fn pick_backend(
        &self,
        hash_key: Option<&[u8]>,
        exclude: &[SocketAddr],
    ) -> Option<InflightGuard> {
        let hints = Hints {
            hash_key,
            prompt: None,
        };
        self.pick(&hints, exclude).map(|p| p.guard)
    }

    /// Pick a serving backend not in `exclude` by the pool's policy.
    pub fn pick(&self, hints: &Hints<'_>, exclude: &[SocketAddr]) -> Option<Picked> {
        let accept = |b: &Backend, healthy: bool| {
            let Some(addr) = b.addr.as_inet() else {
                return false;
            };
            healthy && !exclude.contains(addr) && self.is_checked(addr)
        };
        let tries = self.ordered.len().max(1) * 4;
        let mut decision = None;
        let mut matched_bytes = 0;
        let picked: Option<SocketAddr> = match (&self.selector, self.config.balance) {
            (Selector::Consistent(lb), _) => {
                let key = hints.hash_key.unwrap_or(b"");
                let found = match hints.hash_key {
                    Some(_) => lb.select_with(key, tries, accept),
                    None => None,
                };
                found
                    .and_then(|b| b.addr.as_inet().copied())
                    .or_else(|| self.pick_least_inflight(exclude))
            }
            (Selector::RoundRobin(_), Balance::LeastInflight) => self.pick_least_inflight(exclude),
            (Selector::RoundRobin(_), Balance::LoadAware) => self
                .pick_least_loaded(exclude, u64::MAX)
                .map(|(s, _)| s.address),
            (Selector::RoundRobin(_), Balance::PrefixAware) => match (hints.prompt, &self.prefix) {
                (Some(prompt), Some(index)) => {
                    let chosen = self.pick_by_prefix(index, prompt, exclude);
                    chosen.map(|(state, d, blocks)| {
                        decision = Some(d);
                        matched_bytes = blocks * prompt.block_bytes;
                        state.address
                    })
                }
                _ => self.pick_least_loaded(exclude, u64::MAX).map(|(s, _)| {
                    decision = Some(Decision::NoMatch);
                    s.address
                }),
            },
            (Selector::RoundRobin(lb), _) => lb
                .select_with(b"", tries, accept)
                .and_then(|b| b.addr.as_inet().copied())
                // the weighted iterator's fallback is pseudo-random and can miss
                // the one remaining backend; a linear scan cannot
                .or_else(|| self.pick_least_inflight(exclude)),
        };
        let state = self.states.get(&picked?)?.clone();
        state.inflight.fetch_add(1, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            guard: InflightGuard(state),
            decision,
            matched_bytes,
        })
    }

    /// The longest known prefix's backend, unless it is busier than the
    /// least-loaded one by more than `load_threshold`; then the session's
    /// backend on the same terms; else the least loaded. Records where the
    /// prompt went.
    fn pick_by_prefix(
        &self,
        index: &PrefixIndex,
        prompt: &PromptKey,
        exclude: &[SocketAddr],
    ) -> Option<(&Arc<BackendState>, Decision, usize)> {
        let threshold = self.config.prefix_aware.load_threshold;
        let mut result = None;
        index.route(prompt, |found| {
            let (least, least_load) = self.pick_least_loaded(exclude, u64::MAX)?;
            let preferred = if found.blocks > 0 {
                self.pick_least_loaded(exclude, found.holders)
                    .map(|(s, l)| (s, l, Decision::PrefixHit, found.blocks))
            } else {
                None
            };
            let preferred = preferred.or_else(|| {
                let state = self.ordered.get(found.session?)?;
                let usable = !exclude.contains(&state.address) && self.is_serving(&state.address);
                usable.then(|| (state, self.load(state), Decision::Session, 0))
            });
            let (state, decision, blocks) = match preferred {
                Some((state, load, decision, blocks)) if load - least_load <= threshold => {
                    (state, decision, blocks)
                }
                Some(_) => (least, Decision::LoadFallback, 0),
                None => (least, Decision::NoMatch, 0),
            };
            result = Some((state, decision, blocks));
            Some(state.position)
        })?;
        result
    }

    /// Expected wait on a backend (see [`load::score`]).
    pub fn load(&self, state: &BackendState) -> f64 {
        let max_age = self.config.engine_metrics.interval * 3 + self.config.engine_metrics.timeout;
        let scraped = if self.config.engine_metrics.enabled {
            state.engine.fresh(max_age)
        } else {
            None
        };
        load::score(
            scraped.as_deref(),
            state.inflight.load(Ordering::Relaxed),
            state.weight,
        )
    }

    /// The serving backend (among `among`, a mask of positions) with the
    /// lowest load; equal loads go to the higher weight, then rotate.
    fn pick_least_loaded(
        &self,
        exclude: &[SocketAddr],
        among: u64,
    ) -> Option<(&Arc<BackendState>, f64)> {
        let n = self.ordered.len();
        if n == 0 {
            return None;
        }
        let start = self.rr_offset.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(&Arc<BackendState>, f64)> = None;
        for i in 0..n {
            let state = &self.ordered[(start + i) % n];
            let in_mask = state.position >= MAX_BACKENDS || among & (1u64 << state.position) != 0;
            if !in_mask || exclude.contains(&state.address) || !self.is_serving(&state.address) {
                continue;
            }
            let load = self.load(state);
            let better = match &best {
                None => true,
                Some((b, l)) => load < *l || (load == *l && state.weight > b.weight),
            };
            if better {
                best = Some((state, load));
            }
        }
        best
    }

    /// The prefix index (`prefix_aware` pools).
    pub fn prefix_index(&self) -> Option<&PrefixIndex> {
        self.prefix.as_deref()
    }

    fn is_checked(&self, addr: &SocketAddr) -> bool {
        self.states
            .get(addr)
            .is_some_and(|s| s.checked_ok.load(Ordering::Relaxed))
    }

    /// Fewest in-flight requests per unit of weight; ties rotate.
    fn pick_least_inflight(&self, exclude: &[SocketAddr]) -> Option<SocketAddr> {
        let n = self.ordered.len();
        if n == 0 {
            return None;
        }
        let start = self.rr_offset.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(&Arc<BackendState>, u128)> = None;
        for i in 0..n {
            let state = &self.ordered[(start + i) % n];
            if exclude.contains(&state.address) || !self.is_serving(&state.address) {
                continue;
            }
            // compare inflight/weight without division: scale by the product of weights
            let load = state.inflight.load(Ordering::Relaxed) as u128 * 1_000_000
                / state.weight.max(1) as u128;
            if best.as_ref().is_none_or(|(_, l)| load < *l) {
                best = Some((state, load));
            }
        }
        best.map(|(s, _)| s.address)
    }
}

/// Pingora's HTTP health check, plus the record of a first passing check.
#[derive(Clone)]
struct EngineHealthCheck {
    inner: Arc<HttpHealthCheck>,
    states: Arc<HashMap<SocketAddr, Arc<BackendState>>>,
    /// A backend that fails its checks loses its prefix-index entries.
    prefix: Option<Arc<PrefixIndex>>,
}

impl EngineHealthCheck {
    fn new(
        config: &PoolConfig,
        states: Arc<HashMap<SocketAddr, Arc<BackendState>>>,
        prefix: Option<Arc<PrefixIndex>>,
    ) -> Self {
        let mut check = HttpHealthCheck::new("localhost", false);
        let hc = &config.health_check;
        check.consecutive_failure = hc.unhealthy_after;
        check.consecutive_success = hc.healthy_after;
        let mut peer = HttpPeer::new("0.0.0.0:1", false, String::new());
        peer.options.connection_timeout = Some(hc.timeout);
        peer.options.read_timeout = Some(hc.timeout);
        peer.options.write_timeout = Some(hc.timeout);
        peer.options.total_connection_timeout = Some(hc.timeout);
        check.peer_template = peer;
        if let Ok(mut req) = RequestHeader::build("GET", hc.path.as_bytes(), None) {
            let _ = req.insert_header("Host", "localhost");
            let _ = req.insert_header("User-Agent", "infergate-health");
            check.req = req;
        }
        EngineHealthCheck {
            inner: Arc::new(check),
            states,
            prefix,
        }
    }
}

#[async_trait]
impl HealthCheck for EngineHealthCheck {
    async fn check(&self, target: &Backend) -> PResult<()> {
        let result = self.inner.check(target).await;
        if result.is_ok() {
            if let Some(state) = target.addr.as_inet().and_then(|a| self.states.get(a)) {
                if !state.checked_ok.swap(true, Ordering::Relaxed) {
                    log::info!("backend {} passed its first health check", state.address);
                }
            }
        }
        result
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        if healthy {
            log::info!("backend {} is healthy again", target.addr);
        } else {
            log::warn!(
                "backend {} failed its health checks; taken out of rotation",
                target.addr
            );
            let state = target.addr.as_inet().and_then(|a| self.states.get(a));
            if let (Some(index), Some(state)) = (&self.prefix, state) {
                index.forget_backend(state.position);
            }
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
    }
}

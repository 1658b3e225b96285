//! A pool: the health-checked backends that serve a set of models, and the
//! choice of one backend per attempt.
//!
//! Selection and health state come from `pingora-load-balancing`; this file
//! adds what it lacks: a backend takes traffic only after its *first passing*
//! check (Pingora counts new backends healthy), least-in-flight selection, and
//! per-backend in-flight counters.

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
        for b in &config.backends {
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
            });
            ordered.push(state.clone());
            states.insert(b.address, state);
        }
        let states = Arc::new(states);
        let check = EngineHealthCheck::new(&config, states.clone());
        let backends = || {
            let mut backends = Backends::new(discovery::Static::new(set.clone()));
            backends.set_health_check(Box::new(check.clone()));
            backends
        };
        let selector = match config.balance {
            Balance::ConsistentHash => {
                Selector::Consistent(LoadBalancer::from_backends(backends()))
            }
            Balance::RoundRobin | Balance::LeastInflight => {
                Selector::RoundRobin(LoadBalancer::from_backends(backends()))
            }
        };
        Ok(Pool {
            config,
            selector,
            states,
            ordered,
            rr_offset: AtomicUsize::new(0),
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
        let accept = |b: &Backend, healthy: bool| {
            let Some(addr) = b.addr.as_inet() else {
                return false;
            };
            healthy && !exclude.contains(addr) && self.is_checked(addr)
        };
        let tries = self.ordered.len().max(1) * 4;
        let picked: Option<SocketAddr> = match (&self.selector, self.config.balance) {
            (Selector::Consistent(lb), _) => {
                let key = hash_key.unwrap_or(b"");
                let found = match hash_key {
                    Some(_) => lb.select_with(key, tries, accept),
                    None => None,
                };
                found
                    .and_then(|b| b.addr.as_inet().copied())
                    .or_else(|| self.pick_least_inflight(exclude))
            }
            (Selector::RoundRobin(_), Balance::LeastInflight) => self.pick_least_inflight(exclude),
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
        Some(InflightGuard(state))
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
}

impl EngineHealthCheck {
    fn new(config: &PoolConfig, states: Arc<HashMap<SocketAddr, Arc<BackendState>>>) -> Self {
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
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
    }
}

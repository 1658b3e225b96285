//! A pool: the health-checked backends that serve a set of models, and the
//! choice of one backend per attempt.
//!
//! Selection and health state come from `pingora-load-balancing`; this file
//! adds what it lacks: a backend takes traffic only after its *first passing*
//! check (Pingora counts new backends healthy), least-in-flight selection, and
//! per-backend in-flight counters, and the engine-aware policies
//! (`load_aware`, `prefix_aware`: docs/routing.md).

use super::eject::{Claim, Ejection, Outcome};
use super::load::{self, EngineLoad, Pace};
use super::prefix::{PrefixIndex, PromptKey, MAX_BACKENDS};
use super::queue::WaitList;
use crate::config::{Balance, PoolConfig};
use async_trait::async_trait;
use infergate_filters::Share;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result as PResult;
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::selection::{Consistent, RoundRobin};
use pingora_load_balancing::{discovery, Backend, Backends, LoadBalancer};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
    /// Passive outlier detection.
    pub ejection: Ejection,
    /// How long it takes to start answering (`load_aware`, `prefix_aware`).
    pub pace: Pace,
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

/// The retry budget starts with, and holds at most, this many retries
/// (×1000): a short burst of failures is retried at once, a long outage at
/// `retry_budget` of the traffic.
const RETRY_TOKENS_START: u64 = 3_000;
const RETRY_TOKENS_MAX: u64 = 10_000;

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
    /// This pool, for in-flight guards that wake the queue when they end.
    me: Weak<Pool>,
    /// Requests waiting for a backend slot (`max_inflight`, `queue`).
    queue: Mutex<WaitList<Waiting>>,
    /// `queue.len()`, readable without the lock.
    waiting: AtomicUsize,
    /// Requests the queue dispatched, and those it refused (metrics).
    pub queue_dispatched: AtomicU64,
    pub queue_rejected_full: AtomicU64,
    pub queue_timed_out: AtomicU64,
    pub queue_abandoned: AtomicU64,
    /// Waiting requests pushed out of a full queue for a fairer share.
    pub queue_pushed_out: AtomicU64,
    /// Microseconds dispatched requests waited, in total (metrics).
    pub queue_wait_us: AtomicU64,
    /// Retry budget: tokens (×1000) earned by requests, spent by retries.
    retry_tokens: AtomicU64,
    pub retries: AtomicU64,
    pub retries_denied: AtomicU64,
    /// Drain rate for `Retry-After`: (when, completions then, rate per s).
    drain: Mutex<(Instant, u64, f64)>,
    /// The queue's own dispatch rate while it stays non-empty (the pool's
    /// capacity): (when, dispatched then, rate per s; 0 = not known).
    service: Mutex<(Instant, u64, f64)>,
    pub queue_shed: AtomicU64,
}

/// A request waiting in the queue: what the policy needs to pick for it,
/// and where to hand the picked backend.
struct Waiting {
    want: Want,
    /// A backend slot, or a refusal (pushed out of a full queue).
    grant: oneshot::Sender<Result<Picked, Refusal>>,
}

/// The owned form of [`Hints`], for a request that waits.
#[derive(Debug, Default, Clone)]
pub struct Want {
    pub hash_key: Option<Vec<u8>>,
    pub prompt: Option<PromptKey>,
}

impl Want {
    pub fn hints(&self) -> Hints<'_> {
        Hints {
            hash_key: self.hash_key.as_deref(),
            prompt: self.prompt.as_ref(),
        }
    }
}

/// Who is asking, for the queue's order.
#[derive(Debug, Clone, Copy)]
pub struct Principal {
    /// A stable hash of the principal's id (one value for anonymous callers).
    pub key: u64,
    pub share: Share,
}

/// What the pool did with a request.
pub enum Dispatch {
    /// A backend slot now.
    Now(Picked),
    /// Queued: wait on the ticket.
    Wait(Ticket),
}

/// Why the pool refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No backend takes traffic at all (unhealthy, unchecked or ejected).
    NoBackend,
    /// The queue holds `queue.max_len` requests.
    QueueFull { retry_after: u32 },
    /// At the queue's measured service rate the request would wait longer
    /// than `queue.max_wait`: refused now rather than after the wait.
    WouldWait {
        expected: Duration,
        retry_after: u32,
    },
    /// Waited `queue.max_wait` without a slot.
    TimedOut { waited: Duration, retry_after: u32 },
}

/// A place in the queue. Dropping it leaves the queue (a client that went
/// away never reaches an engine).
pub struct Ticket {
    pool: Arc<Pool>,
    id: u64,
    rx: oneshot::Receiver<Result<Picked, Refusal>>,
    since: Instant,
}

impl Ticket {
    /// Wait for a backend slot until `queue.max_wait` after queueing.
    pub async fn wait(&mut self) -> Result<Picked, Refusal> {
        let deadline = self.since + self.pool.config.queue.max_wait;
        match tokio::time::timeout_at(deadline.into(), &mut self.rx).await {
            Ok(Ok(granted)) => granted,
            // the sender is only dropped by `leave`, or by a timed-out wait
            Ok(Err(_)) | Err(_) => {
                if self.pool.leave(self.id) {
                    self.pool.queue_timed_out.fetch_add(1, Ordering::Relaxed);
                } else if let Ok(granted) = self.rx.try_recv() {
                    return granted; // granted (or pushed out) at the last moment
                }
                Err(Refusal::TimedOut {
                    waited: self.since.elapsed(),
                    retry_after: self.pool.retry_after(),
                })
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.pool.leave(self.id) {
            self.pool.queue_abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
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

/// Holds one in-flight slot on a backend until dropped; the freed slot goes
/// to the pool's queue.
pub struct InflightGuard {
    state: Arc<BackendState>,
    pool: Weak<Pool>,
    /// Wake the queue on drop (off for a grant the queue could not hand over).
    pump: bool,
    /// This request is a half-open backend's probe and has not yet recorded
    /// an outcome: dropping it unrecorded lets another request probe.
    probe: AtomicBool,
}

impl InflightGuard {
    pub fn state(&self) -> &BackendState {
        &self.state
    }

    /// Record what the exchange said about the backend (outlier detection).
    pub fn record(&self, outcome: Outcome) {
        self.probe.store(false, Ordering::Relaxed);
        if let Some(pool) = self.pool.upgrade() {
            pool.record_outcome(&self.state, outcome);
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::Relaxed);
        if *self.probe.get_mut() {
            self.state.ejection.release_probe();
        }
        if self.pump {
            if let Some(pool) = self.pool.upgrade() {
                if pool.waiting.load(Ordering::Relaxed) > 0 {
                    pool.pump();
                }
            }
        }
    }
}

impl Pool {
    pub fn new(config: PoolConfig) -> std::io::Result<Arc<Self>> {
        for b in &config.backends {
            Backend::new_with_weight(&b.address.to_string(), b.weight)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(Arc::new_cyclic(|me| Pool::build(config, me.clone())))
    }

    fn build(config: PoolConfig, me: Weak<Pool>) -> Self {
        let config_retry_budget = config.retry_budget;
        let mut set = BTreeSet::new();
        let mut ordered = Vec::new();
        let mut states = HashMap::new();
        for (position, b) in config.backends.iter().enumerate() {
            if let Ok(mut backend) = Backend::new_with_weight(&b.address.to_string(), b.weight) {
                backend.weight = b.weight;
                set.insert(backend);
            }
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
                ejection: Ejection::default(),
                pace: Pace::default(),
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
        Pool {
            config,
            selector,
            states,
            ordered,
            rr_offset: AtomicUsize::new(0),
            prefix,
            me,
            queue: Mutex::new(WaitList::default()),
            waiting: AtomicUsize::new(0),
            queue_dispatched: AtomicU64::new(0),
            queue_rejected_full: AtomicU64::new(0),
            queue_timed_out: AtomicU64::new(0),
            queue_abandoned: AtomicU64::new(0),
            queue_pushed_out: AtomicU64::new(0),
            queue_wait_us: AtomicU64::new(0),
            retry_tokens: AtomicU64::new(if config_retry_budget > 0.0 {
                RETRY_TOKENS_START
            } else {
                0
            }),
            retries: AtomicU64::new(0),
            retries_denied: AtomicU64::new(0),
            drain: Mutex::new((Instant::now(), 0, 0.0)),
            service: Mutex::new((Instant::now(), 0, 0.0)),
            queue_shed: AtomicU64::new(0),
        }
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
        let mut skip: Vec<SocketAddr> = exclude.to_vec();
        // a half-open backend's probe slot can be won by another request
        // between the choice and the claim: choose again without it
        for _ in 0..self.ordered.len().max(1) {
            let picked = self.choose(hints, &skip)?;
            if let Some(claim) = picked.guard.state.ejection.claim() {
                picked
                    .guard
                    .probe
                    .store(claim == Claim::Probe, Ordering::Relaxed);
                return Some(picked);
            }
            skip.push(picked.guard.state.address);
        }
        None
    }

    fn choose(&self, hints: &Hints<'_>, exclude: &[SocketAddr]) -> Option<Picked> {
        let accept = |b: &Backend, healthy: bool| {
            let Some(addr) = b.addr.as_inet() else {
                return false;
            };
            healthy
                && !exclude.contains(addr)
                && self.states.get(addr).is_some_and(|s| self.admits(s))
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
            guard: InflightGuard {
                state,
                pool: self.me.clone(),
                pump: true,
                probe: AtomicBool::new(false),
            },
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
                let usable = !exclude.contains(&state.address) && self.admits(state);
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

    /// The fastest backend's pace (ms to first body byte), if any has one.
    pub fn fastest_pace(&self) -> Option<f64> {
        self.ordered
            .iter()
            .filter_map(|s| s.pace.estimate().map(|(ms, _)| ms))
            .min_by(f64::total_cmp)
    }

    /// How many times slower than the fastest this backend answers (see
    /// [`load::pace_factor`]).
    pub fn pace(&self, state: &BackendState) -> f64 {
        load::pace_factor(state.pace.estimate(), self.fastest_pace())
    }

    /// Expected wait on a backend (see [`load::score`]).
    pub fn load(&self, state: &BackendState) -> f64 {
        self.load_with(state, self.fastest_pace())
    }

    fn load_with(&self, state: &BackendState, fastest_pace: Option<f64>) -> f64 {
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
            load::pace_factor(state.pace.estimate(), fastest_pace),
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
        let fastest = self.fastest_pace();
        let mut best: Option<(&Arc<BackendState>, f64)> = None;
        for i in 0..n {
            let state = &self.ordered[(start + i) % n];
            let in_mask = state.position >= MAX_BACKENDS || among & (1u64 << state.position) != 0;
            if !in_mask || exclude.contains(&state.address) || !self.admits(state) {
                continue;
            }
            let load = self.load_with(state, fastest);
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

    /// Whether a request may go to this backend now: serving (checked and
    /// healthy), not ejected, and not saturated.
    fn admits(&self, state: &BackendState) -> bool {
        self.is_serving(&state.address) && state.ejection.admits() && !self.saturated(state)
    }

    /// At `max_inflight`, or its engine reports more than
    /// `queue.max_engine_waiting` waiting requests.
    pub fn saturated(&self, state: &BackendState) -> bool {
        if self
            .config
            .max_inflight
            .is_some_and(|max| state.inflight.load(Ordering::Relaxed) >= max)
        {
            return true;
        }
        let Some(limit) = self.config.queue.max_engine_waiting else {
            return false;
        };
        let max_age = self.config.engine_metrics.interval * 3 + self.config.engine_metrics.timeout;
        state
            .engine
            .fresh(max_age)
            .and_then(|s| s.signals.waiting)
            .is_some_and(|waiting| waiting > limit)
    }

    /// Whether this pool queues requests when its backends are saturated.
    pub fn queues(&self) -> bool {
        self.config.max_inflight.is_some() || self.config.queue.max_engine_waiting.is_some()
    }

    /// Requests waiting in the queue now.
    pub fn queue_len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A backend for the request now, or a place in the queue when every
    /// serving backend is saturated (pools with `max_inflight` or
    /// `queue.max_engine_waiting`), or a refusal.
    pub fn dispatch(
        &self,
        hints: &Hints<'_>,
        want: impl FnOnce() -> Want,
        who: Principal,
    ) -> Result<Dispatch, Refusal> {
        self.earn_retry_token();
        if !self.queues() {
            return self
                .pick(hints, &[])
                .map(Dispatch::Now)
                .ok_or(Refusal::NoBackend);
        }
        let mut queue = self.lock_queue();
        if queue.is_empty() {
            if let Some(picked) = self.pick(hints, &[]) {
                return Ok(Dispatch::Now(picked));
            }
        }
        let any_up = self.ordered.iter().any(|s| {
            self.is_serving(&s.address)
                && !matches!(s.ejection.status(), super::eject::Status::Ejected)
        });
        if !any_up {
            return Err(Refusal::NoBackend);
        }
        // a full queue makes room for a principal below its fair share by
        // pushing out the newest request of the one most above it
        let mut victim = None;
        if queue.len() >= self.config.queue.max_len {
            victim = queue.push_out(who.key, who.share.priority, who.share.weight);
            if victim.is_none() {
                drop(queue);
                self.queue_rejected_full.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::QueueFull {
                    retry_after: self.retry_after(),
                });
            }
        }
        let rate = self.service_rate();
        if rate > 0.0 {
            let share = who.share;
            let ahead = queue.ahead_of(
                who.key,
                share.priority,
                share.weight,
                Instant::now(),
                self.config.queue.aging,
            );
            let expected = Duration::from_secs_f64((ahead + 1) as f64 / rate);
            if expected > self.config.queue.max_wait {
                drop(queue);
                self.queue_shed.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::WouldWait {
                    expected,
                    retry_after: self.retry_after(),
                });
            }
        }
        let Some(pool) = self.me.upgrade() else {
            return Err(Refusal::NoBackend);
        };
        if let Some(victim) = victim.and_then(|id| queue.remove(id)) {
            self.queue_pushed_out.fetch_add(1, Ordering::Relaxed);
            let _ = victim.item.grant.send(Err(Refusal::QueueFull {
                retry_after: self.retry_after(),
            }));
        }
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let id = queue.push(
            who.key,
            who.share.priority,
            who.share.weight,
            now,
            Waiting {
                want: want(),
                grant: tx,
            },
        );
        self.waiting.store(queue.len(), Ordering::Relaxed);
        drop(queue);
        // a slot may have freed between the failed pick and the push
        self.pump();
        Ok(Dispatch::Wait(Ticket {
            pool,
            id,
            rx,
            since: now,
        }))
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, WaitList<Waiting>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a request out of the queue; false when it was not there (it was
    /// dispatched, or already left).
    fn leave(&self, id: u64) -> bool {
        let mut queue = self.lock_queue();
        let removed = queue.remove(id).is_some();
        self.waiting.store(queue.len(), Ordering::Relaxed);
        removed
    }

    /// Hand free backend slots to waiting requests, best first, while there
    /// are both. Called when a slot frees, a scrape lands, and on a timer.
    pub fn pump(&self) {
        let aging = self.config.queue.aging;
        loop {
            let mut undelivered = Vec::new();
            {
                let mut queue = self.lock_queue();
                while let Some(id) = queue.next(Instant::now(), aging).map(|e| e.id) {
                    let picked = match queue.next(Instant::now(), aging) {
                        Some(entry) => self.pick(&entry.item.want.hints(), &[]),
                        None => None,
                    };
                    let Some(mut picked) = picked else { break };
                    let Some(entry) = queue.take(id) else {
                        picked.guard.pump = false; // dropped under the lock
                        break;
                    };
                    self.queue_dispatched.fetch_add(1, Ordering::Relaxed);
                    let waited =
                        u64::try_from(entry.since.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.queue_wait_us.fetch_add(waited, Ordering::Relaxed);
                    if let Err(Ok(mut back)) = entry.item.grant.send(Ok(picked)) {
                        // the waiter is gone: free the slot after the lock,
                        // without re-entering this pump from the guard's drop
                        back.guard.pump = false;
                        undelivered.push(back);
                    }
                }
                self.waiting.store(queue.len(), Ordering::Relaxed);
            }
            if undelivered.is_empty() {
                return;
            }
            drop(undelivered); // slots freed: try again
        }
    }

    /// Seconds a refused client should wait: the queue ahead of it at the
    /// measured drain rate (completions per second), 1–60.
    pub fn retry_after(&self) -> u32 {
        let ahead = self.queue_len() as f64 + 1.0;
        let rate = self.drain_rate();
        let secs = if rate > 0.0 {
            ahead / rate
        } else {
            self.config.queue.max_wait.as_secs_f64()
        };
        secs.ceil().clamp(1.0, 60.0) as u32
    }

    /// The queue's dispatches per second over the last second or more in
    /// which it never ran empty (0 when it did: no saturated measurement).
    /// Sampled by the pool's queue timer.
    pub fn sample_service_rate(&self) {
        let dispatched = self.queue_dispatched.load(Ordering::Relaxed);
        let waiting = self.queue_len() > 0;
        let mut service = self
            .service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !waiting {
            *service = (Instant::now(), dispatched, 0.0);
            return;
        }
        let (since, before, rate) = *service;
        let elapsed = since.elapsed().as_secs_f64();
        if elapsed >= 1.0 {
            let now_rate = dispatched.saturating_sub(before) as f64 / elapsed;
            let smoothed = if rate == 0.0 {
                now_rate
            } else {
                0.5 * rate + 0.5 * now_rate
            };
            *service = (Instant::now(), dispatched, smoothed);
        }
    }

    fn service_rate(&self) -> f64 {
        self.service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .2
    }

    /// Completions per second, measured over the last second or more.
    pub fn drain_rate(&self) -> f64 {
        let completed: u64 = self
            .ordered
            .iter()
            .map(|s| {
                s.requests
                    .load(Ordering::Relaxed)
                    .saturating_sub(s.inflight.load(Ordering::Relaxed) as u64)
            })
            .sum();
        let mut drain = self
            .drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (since, before, rate) = *drain;
        let elapsed = since.elapsed().as_secs_f64();
        if elapsed >= 1.0 {
            let now_rate = completed.saturating_sub(before) as f64 / elapsed;
            let smoothed = if rate == 0.0 {
                now_rate
            } else {
                0.5 * rate + 0.5 * now_rate
            };
            *drain = (Instant::now(), completed, smoothed);
            return smoothed;
        }
        rate
    }

    /// Outlier detection: record an exchange's outcome; ejects the backend
    /// when it failed enough in a row and the pool can spare it.
    pub fn record_outcome(&self, state: &BackendState, outcome: Outcome) {
        let config = &self.config.ejection;
        if !config.enabled {
            return;
        }
        if outcome == Outcome::Success {
            // the common case: no scan of the pool
            state.ejection.record(outcome, config, false);
            return;
        }
        let serving: Vec<&Arc<BackendState>> = self.serving_backends().collect();
        let ejected = serving
            .iter()
            .filter(|s| s.address != state.address && !s.ejection.admits())
            .count();
        let left = serving.len().saturating_sub(ejected + 1);
        let may_eject =
            left >= 1 && (ejected + 1) * 100 <= serving.len() * config.max_ejected_percent as usize;
        if state.ejection.record(outcome, config, may_eject) {
            log::warn!(
                "backend {} of pool {} ejected for {} ms after consecutive failures",
                state.address,
                self.name(),
                state.ejection.remaining().as_millis()
            );
        }
    }

    /// Every request earns `retry_budget` of a retry (capped); a retry
    /// spends one.
    fn earn_retry_token(&self) {
        let earn = (self.config.retry_budget * 1000.0) as u64;
        if earn == 0 {
            return;
        }
        let _ = self
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < RETRY_TOKENS_MAX).then(|| (t + earn).min(RETRY_TOKENS_MAX))
            });
    }

    /// Spend a retry from the budget; false when it is exhausted.
    pub fn take_retry(&self) -> bool {
        let taken = self
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(1000)
            })
            .is_ok();
        if taken {
            self.retries.fetch_add(1, Ordering::Relaxed);
        } else {
            self.retries_denied.fetch_add(1, Ordering::Relaxed);
        }
        taken
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
            if exclude.contains(&state.address) || !self.admits(state) {
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

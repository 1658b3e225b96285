//! `limits`: rate limits, concurrency limits, token reservations and quotas,
//! decided once the body is read and before any engine is contacted.
//!
//! ```yaml
//! filters:
//!   - limits:
//!       global:  { requests_per_second: 200, burst: 400, concurrent: 128, tokens_per_minute: 2000000 }
//!       per_key: { requests_per_second: 10, concurrent: 5, tokens_per_minute: 100000 }
//!       models:
//!         qwen: { concurrent: 32, tokens_per_minute: 500000 }
//!       default_max_tokens: 1024
//!       data_dir: /var/lib/infergate
//! ```
//!
//! Three levels apply to a request: the gateway (`global`), the model the
//! client named (`models`, if configured for that exact name) and the caller
//! (`per_key`, overridden field by field by the identity's own limits from the
//! keys/users file). Checks run in this order, each over every level, and a
//! failed check gives back everything the earlier ones took:
//! 1. quota (identities with a `quota`): persisted usage plus the tokens
//!    reserved by the identity's running requests must be below the quota;
//! 2. requests per second (token bucket of `burst`, default ceil(rps));
//! 3. concurrent requests;
//! 4. tokens per minute: the request reserves `prompt estimate + max_tokens`
//!    (or `default_max_tokens`), settled against real usage when it ends.
//!
//! Refusals are 429s in OpenAI's shape with `Retry-After` when waiting helps
//! and `x-should-retry: false` when it cannot. Admitted requests and refusals
//! carry OpenAI's `x-ratelimit-*` headers ([`headers`]).
//!
//! The [`Admission`] is held while the request runs: [`Admission::settle`] it
//! with the real usage (the gateway does this in `logging()`, which runs on
//! success, error and disconnect), or drop it to refund the reservation.
//! Per-identity state is keyed by `Identity.id`, so it survives reloads of the
//! keys file. Quota totals are persisted in `data_dir` ([`quota_store`]).
//!
//! This module never logs; problems (a quota store write that failed, a quota
//! without `data_dir`) are collected for [`Limits::take_warnings`].

mod admission;
mod bucket;
pub(crate) mod clock;
mod concurrency;
mod config;
pub mod headers;
mod level;
pub mod quota_store;
pub mod redis_store;

pub use admission::{Admission, Usage};
pub use bucket::TokenBucket;
pub use config::{validate_spec, LimitsConfig, OnStoreError, StoreConfig, StoreKind};
pub use redis_store::RedisStore;

use admission::{Ledger, Pending};
use redis_store::SharedLevel;

use crate::{AdmitInfo, Filter, FilterState, Flow, Identity, LimitSpec, Rejection, Request};
use config::effective_spec;
use level::{Level, Scope};
use quota_store::QuotaStore;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// One identity's state, for `GET /admin/usage`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrincipalStatus {
    /// `key:<hash prefix>` or `user:<id>`.
    pub id: String,
    /// Display name (for an identity not seen since the gateway started: as
    /// recorded in the quota store, if at all).
    pub user: Option<String>,
    /// Requests running now.
    pub in_flight: u32,
    /// Concurrency limit; `None` = unlimited.
    pub concurrent: Option<u32>,
    /// Lifetime token quota; `None` = unlimited (or not seen since start).
    pub quota: Option<u64>,
    /// Tokens counted against the quota (persisted).
    pub quota_used: u64,
    /// Tokens reserved by running requests, not yet settled.
    pub reserved_tokens: u64,
    /// Tokens settled since the gateway started.
    pub tokens_used_since_start: u64,
    /// Settled requests whose usage the gateway estimated (e.g. disconnects).
    pub estimated_usage_requests: u64,
    /// Tokens-per-minute limit; `None` = unlimited.
    pub tokens_per_minute: Option<u64>,
    /// Tokens left in the per-minute bucket now (0 while in debt).
    pub tokens_remaining_this_minute: Option<u64>,
    /// Requests-per-second limit; `None` = unlimited.
    pub requests_per_second: Option<f64>,
    /// Requests left in the requests bucket now.
    pub requests_remaining: Option<u64>,
}

impl PrincipalStatus {
    /// An identity known only by its persisted total.
    pub fn unseen(id: String, quota_used: u64) -> PrincipalStatus {
        PrincipalStatus {
            id,
            user: None,
            in_flight: 0,
            concurrent: None,
            quota: None,
            quota_used,
            reserved_tokens: 0,
            tokens_used_since_start: 0,
            estimated_usage_requests: 0,
            tokens_per_minute: None,
            tokens_remaining_this_minute: None,
            requests_per_second: None,
            requests_remaining: None,
        }
    }
}

/// The limiters, shared by every request (and across config reloads, if the
/// gateway keeps the same `Arc`).
pub struct Limits {
    shared: Arc<Shared>,
}

struct Shared {
    config: LimitsConfig,
    global: Arc<Level>,
    models: HashMap<String, Arc<Level>>,
    principals: Mutex<HashMap<String, Arc<Level>>>,
    store: Arc<QuotaStore>,
    /// `store: { kind: redis }`: the shared counters.
    redis: Option<Arc<RedisStore>>,
}

impl Limits {
    /// Build the limiters; opens (creating) the quota store when `data_dir`
    /// is set. `Err` says which key is wrong or why the store cannot open.
    pub fn new(config: LimitsConfig) -> Result<Limits, String> {
        Self::build(config, None)
    }

    /// New limits for a reloaded config. The quota store of `previous` is
    /// kept when `data_dir` is unchanged (one process never opens the same
    /// store twice); rate and concurrency counters start afresh.
    pub fn reconfigured(config: LimitsConfig, previous: &Limits) -> Result<Limits, String> {
        let same_store = config.data_dir == previous.shared.config.data_dir;
        let redis = previous
            .shared
            .redis
            .clone()
            .filter(|r| *r.config() == config.store);
        Self::build_with(
            config,
            same_store.then(|| previous.shared.store.clone()),
            redis,
        )
    }

    fn build(config: LimitsConfig, store: Option<Arc<QuotaStore>>) -> Result<Limits, String> {
        Self::build_with(config, store, None)
    }

    fn build_with(
        config: LimitsConfig,
        store: Option<Arc<QuotaStore>>,
        redis: Option<Arc<RedisStore>>,
    ) -> Result<Limits, String> {
        config
            .validate()
            .map_err(|(key, msg)| format!("limits.{key}: {msg}"))?;
        let store = match (store, &config.data_dir) {
            (Some(store), _) => store,
            (None, Some(dir)) => Arc::new(QuotaStore::open(dir).map_err(|e| e.to_string())?),
            (None, None) => Arc::new(QuotaStore::in_memory()),
        };
        let redis = match (redis, config.store.kind) {
            (_, StoreKind::Memory) => None,
            (Some(redis), StoreKind::Redis) => Some(redis),
            (None, StoreKind::Redis) => {
                let redis = RedisStore::open(config.store.clone())?;
                // Redis becomes the source of truth: offer it the totals this
                // replica kept so far (kept only where Redis has none)
                if store.is_persistent() {
                    redis.import(
                        store
                            .all()
                            .into_iter()
                            .map(|(id, e)| (id, e.used))
                            .collect(),
                    );
                }
                Some(redis)
            }
        };
        // with a shared store, this replica's own counters are the fail_open
        // fallback: each limit divided by `replicas`
        let local = |spec: &LimitSpec| match &redis {
            Some(_) => divided(spec, config.store.replicas),
            None => spec.clone(),
        };
        let models = config
            .models
            .iter()
            .map(|(m, spec)| {
                (
                    m.clone(),
                    Arc::new(Level::new(Scope::Model(m.clone()), &local(spec))),
                )
            })
            .collect();
        Ok(Limits {
            shared: Arc::new(Shared {
                global: Arc::new(Level::new(Scope::Gateway, &local(&config.global))),
                models,
                principals: Mutex::new(HashMap::new()),
                store,
                redis,
                config,
            }),
        })
    }

    /// The shared store, with `store: { kind: redis }`.
    pub fn redis(&self) -> Option<&Arc<RedisStore>> {
        self.shared.redis.as_ref()
    }

    /// `limits.store: redis`: take one login attempt for `scope` (the
    /// client's address) from the bucket every replica shares, at most
    /// `per_minute`. `Ok(Some(wait))`: over the limit. Without a shared
    /// store, or when it is down and `on_error: fail_open`, `Ok(None)` (the
    /// auth filter's per-replica limit still applies); down and
    /// `fail_closed`: the 503 `limits_unavailable`.
    pub async fn check_login(
        &self,
        scope: &str,
        per_minute: u32,
    ) -> Result<Option<std::time::Duration>, Rejection> {
        let Some(redis) = &self.shared.redis else {
            return Ok(None);
        };
        let answer = if redis.is_up() {
            redis.login_attempt(scope, per_minute).await
        } else {
            Err(redis_store::StoreError("down".into()))
        };
        match answer {
            Ok(wait) => Ok(wait),
            Err(_) => match redis.on_error() {
                config::OnStoreError::FailOpen => Ok(None),
                config::OnStoreError::FailClosed => Err(admission::store_unavailable()),
            },
        }
    }

    /// Decide whether a request may run now; see the module docs for the
    /// checks. `Ok` holds the slots and the token reservation until settled
    /// or dropped; `Err` is a 429 with its headers and nothing held.
    pub fn admit(
        &self,
        identity: Option<&Identity>,
        info: &AdmitInfo<'_>,
    ) -> Result<Admission, Rejection> {
        let shared = &self.shared;
        let estimate = info.prompt_tokens_estimate.saturating_add(
            info.max_output_tokens
                .unwrap_or(shared.config.default_max_tokens),
        );
        let mut levels = Vec::with_capacity(3);
        levels.push(shared.global.clone());
        if let Some(level) = info.model.and_then(|m| shared.models.get(m)) {
            levels.push(level.clone());
        }
        let principal = identity.map(|id| (id, self.principal(id)));
        if let Some((_, level)) = &principal {
            levels.push(level.clone());
        }
        if let Some(redis) = &shared.redis {
            let pending = self.pending(redis, levels, identity, estimate, info.model);
            if redis.is_up() {
                return Ok(Admission::pending(pending));
            }
            // known down: on_error at once, without waiting on Redis again
            return admission::fallback(&pending);
        }
        let principal = principal.map(|(id, level)| (id.id.as_str(), id.user.as_str(), level));
        admission::admit(
            &levels,
            principal,
            &Ledger::Local(shared.store.clone()),
            estimate,
        )
    }

    /// The Redis check of a request: the full (not divided) limits.
    fn pending(
        &self,
        redis: &Arc<RedisStore>,
        levels: Vec<Arc<Level>>,
        identity: Option<&Identity>,
        estimate: u64,
        model: Option<&str>,
    ) -> Pending {
        let config = &self.shared.config;
        let level = |scope: String, spec: &LimitSpec, count: bool| {
            let (burst, rate) = level::requests_shape(spec).unwrap_or((0.0, 0.0));
            SharedLevel {
                scope,
                rate,
                burst,
                concurrent: match spec.concurrent {
                    Some(n) => i64::from(n),
                    None if count => -1,
                    None => 0,
                },
                tokens_per_minute: spec.tokens_per_minute.unwrap_or(0),
            }
        };
        let mut shared = vec![level("gateway".to_string(), &config.global, false)];
        if let Some((m, spec)) = model.and_then(|m| config.models.get_key_value(m)) {
            shared.push(level(format!("model:{m}"), spec, false));
        }
        if let Some(id) = identity {
            let spec = effective_spec(&config.per_key, &id.limits);
            shared.push(level(id.id.clone(), &spec, true));
        }
        Pending {
            store: redis.clone(),
            shared,
            levels,
            identity: identity.map(|id| (id.id.clone(), id.user.clone(), id.quota)),
            estimate,
        }
    }

    /// The persisted token total of `identity_id` (0 if none).
    pub fn quota_used(&self, identity_id: &str) -> u64 {
        self.shared.store.used(identity_id)
    }

    /// Whether quota totals are persisted (`data_dir` is set, or Redis).
    pub fn has_store(&self) -> bool {
        self.shared.store.is_persistent() || self.shared.redis.is_some()
    }

    /// The config these limits were built from.
    pub fn config(&self) -> &LimitsConfig {
        &self.shared.config
    }

    /// Problems to log since the last call (e.g. a quota store write failed).
    pub fn take_warnings(&self) -> Vec<String> {
        let mut out = self.shared.store.take_warnings();
        if let Some(redis) = &self.shared.redis {
            out.extend(redis.take_warnings());
        }
        out
    }

    /// Every identity seen since start, plus every identity with a persisted
    /// total, sorted by id.
    pub fn snapshot(&self) -> Vec<PrincipalStatus> {
        let principals: Vec<(String, Arc<Level>)> = lock(&self.shared.principals)
            .iter()
            .map(|(id, level)| (id.clone(), level.clone()))
            .collect();
        let mut out: BTreeMap<String, PrincipalStatus> = BTreeMap::new();
        for (id, level) in principals {
            let mut st = lock(&level.state);
            let status = PrincipalStatus {
                user: st.user.clone(),
                in_flight: st.slots.in_flight(),
                concurrent: st.slots.limit(),
                quota: st.quota,
                quota_used: 0,
                reserved_tokens: st.reserved,
                tokens_used_since_start: st.used_since_start,
                estimated_usage_requests: st.estimated_settles,
                tokens_per_minute: st.spec.tokens_per_minute,
                tokens_remaining_this_minute: st.tokens.as_mut().map(|b| floor_u64(b.remaining())),
                requests_per_second: st.spec.requests_per_second,
                requests_remaining: st.requests.as_mut().map(|b| floor_u64(b.remaining())),
                id: id.clone(),
            };
            drop(st);
            out.insert(id, status);
        }
        for (id, entry) in self.shared.store.all() {
            let status = out.entry(id.clone()).or_insert_with(|| PrincipalStatus {
                user: entry.user.clone(),
                ..PrincipalStatus::unseen(id, 0)
            });
            status.quota_used = entry.used;
        }
        out.into_values().collect()
    }

    /// The identity's level, created on first use, updated to its current
    /// limits, name and quota.
    fn principal(&self, identity: &Identity) -> Arc<Level> {
        let shared = &self.shared;
        let mut spec = effective_spec(&shared.config.per_key, &identity.limits);
        if shared.redis.is_some() {
            spec = divided(&spec, shared.config.store.replicas);
        }
        let level = {
            let mut map = lock(&shared.principals);
            match map.get(&identity.id) {
                Some(level) => level.clone(),
                None => {
                    let level = Arc::new(Level::new(Scope::of_identity(&identity.id), &spec));
                    map.insert(identity.id.clone(), level.clone());
                    level
                }
            }
        };
        let mut st = lock(&level.state);
        st.apply(&spec);
        if st.user.as_deref() != Some(identity.user.as_str()) {
            st.user = Some(identity.user.clone());
        }
        st.quota = identity.quota;
        if st.quota.is_some() && !self.has_store() && !st.warned_unpersisted {
            st.warned_unpersisted = true;
            shared.store.warn(format!(
                "{} has a token quota but limits.data_dir is not set: its usage is counted in memory only and starts from 0 after a restart",
                identity.id
            ));
        }
        drop(st);
        level
    }
}

/// The `limits` filter: admission in [`Filter::on_admit`]. Holds the shared
/// [`Limits`], which the gateway also keeps for `/admin/usage`.
pub struct LimitsFilter(pub Arc<Limits>);

impl Filter for LimitsFilter {
    fn name(&self) -> &'static str {
        "limits"
    }

    fn on_request(
        &self,
        _req: &mut dyn Request,
        _state: &mut FilterState,
    ) -> Result<Flow, Rejection> {
        Ok(Flow::Continue)
    }

    fn on_admit(&self, info: &AdmitInfo<'_>, state: &mut FilterState) -> Result<(), Rejection> {
        let admission = self.0.admit(state.identity.as_deref(), info)?;
        state
            .response_headers
            .extend(admission.rate_limit_headers().iter().cloned());
        state.admission = Some(admission);
        Ok(())
    }
}

/// Lock, ignoring poisoning: limiter state stays usable (counts may be off by
/// the one panicking update) rather than turning every request into a panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One replica's share of a limit: rates and counts divided by `replicas`
/// (at least 1 request at once, bursts at least 1).
fn divided(spec: &LimitSpec, replicas: u32) -> LimitSpec {
    if replicas <= 1 {
        return spec.clone();
    }
    let n = f64::from(replicas);
    LimitSpec {
        requests_per_second: spec.requests_per_second.map(|r| r / n),
        burst: spec.burst.map(|b| b.div_ceil(replicas).max(1)),
        concurrent: spec.concurrent.map(|c| c.div_ceil(replicas).max(1)),
        tokens_per_minute: spec
            .tokens_per_minute
            .map(|t| t.div_ceil(u64::from(replicas)).max(1)),
    }
}

fn floor_u64(x: f64) -> u64 {
    if x > 0.0 {
        x.floor() as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod divided_tests {
    use super::*;

    #[test]
    fn a_replica_share_divides_rates_and_counts_and_keeps_at_least_one() {
        let spec = LimitSpec {
            requests_per_second: Some(50.0),
            burst: Some(10),
            concurrent: Some(4),
            tokens_per_minute: Some(100),
        };
        let third = divided(&spec, 3);
        assert!((third.requests_per_second.unwrap() - 50.0 / 3.0).abs() < 1e-9);
        assert_eq!(third.burst, Some(4));
        assert_eq!(third.concurrent, Some(2));
        assert_eq!(third.tokens_per_minute, Some(34));
        assert_eq!(divided(&spec, 1), spec);
        assert_eq!(divided(&spec, 100).concurrent, Some(1));
    }
}

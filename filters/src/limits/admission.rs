//! Admission: the checks that let a request run, and the handle that gives
//! back what it holds when the request ends.

use super::headers::{rate_limit_headers, BucketView};
use super::level::{Level, Scope};
use super::lock;
use super::quota_store::QuotaStore;
use super::redis_store::{Lease, RedisStore, SharedLevel, Verdict};
use crate::Rejection;
use std::sync::Arc;
use std::time::Duration;

/// Where an identity's quota total is kept.
#[derive(Clone)]
pub(crate) enum Ledger {
    /// This process (memory or `data_dir`).
    Local(Arc<QuotaStore>),
    /// Redis (this replica admitted on its own counters while Redis was
    /// down: the usage waits for Redis to be back).
    Shared(Arc<RedisStore>),
}

impl Ledger {
    fn used(&self, id: &str) -> u64 {
        match self {
            Ledger::Local(store) => store.used(id),
            Ledger::Shared(store) => store.known_used(id),
        }
    }

    fn add(&self, id: &str, user: &str, used: u64) {
        match self {
            Ledger::Local(store) => store.add(id, user, used),
            Ledger::Shared(store) => store.defer(id, used),
        }
    }
}

/// The caller, for the quota check: id, display name, level.
pub(crate) type Principal<'a> = (&'a str, &'a str, Arc<Level>);

/// An admission that still has to ask Redis ([`Admission::complete`]).
pub(crate) struct Pending {
    pub(crate) store: Arc<RedisStore>,
    pub(crate) shared: Vec<SharedLevel>,
    /// The same levels, for messages and the fail_open fallback.
    pub(crate) levels: Vec<Arc<Level>>,
    /// id, user, quota.
    pub(crate) identity: Option<(String, String, Option<u64>)>,
    pub(crate) estimate: u64,
}

/// Tokens a finished request really used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, as the engine reported (or the gateway estimated).
    pub prompt_tokens: u64,
    /// Completion tokens, as the engine reported (or the gateway counted).
    pub completion_tokens: u64,
    /// The engine did not report usage (e.g. the client disconnected) and the
    /// gateway counted it; charged the same, shown in the usage snapshot.
    pub estimated: bool,
}

/// What one admitted request holds: concurrency slots and a token
/// reservation at each level, until [`Admission::settle`] or drop.
///
/// Dropping it unsettled refunds the whole reservation and frees the slots
/// (the request failed before an engine used anything). Neither settling nor
/// dropping blocks for long or panics.
pub struct Admission {
    holds: Vec<Hold>,
    principal: Option<PrincipalHold>,
    reserved: u64,
    headers: Vec<(&'static str, String)>,
    /// False while the checks run: a failed check also returns the requests
    /// taken. Once admitted, a request keeps its requests-per-second token.
    admitted: bool,
    /// `limits.store: redis`: the Redis check still to run.
    pending: Option<Box<Pending>>,
    /// `limits.store: redis`: what this request holds in Redis.
    lease: Option<(Arc<RedisStore>, Lease)>,
}

/// What was taken at one level.
struct Hold {
    level: Arc<Level>,
    request: bool,
    slot: bool,
    tokens: u64,
}

/// The identity's side: reservation against its quota, usage to persist.
struct PrincipalHold {
    level: Arc<Level>,
    id: String,
    user: String,
    store: Ledger,
    reserved: u64,
    /// The identity had a quota at admission: persist its usage.
    persist: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("reserved_tokens", &self.reserved)
            .field("levels", &self.holds.len())
            .field("identity", &self.principal.as_ref().map(|p| p.id.as_str()))
            .finish()
    }
}

impl Admission {
    /// The `x-ratelimit-*` headers as of admission, for the response.
    pub fn rate_limit_headers(&self) -> &[(&'static str, String)] {
        &self.headers
    }

    /// Tokens reserved for this request (prompt estimate + max output).
    pub fn reserved_tokens(&self) -> u64 {
        self.reserved
    }

    /// The request ended: charge its real usage instead of the reservation
    /// (refund if less, debt if more), add it to the identity's persisted
    /// quota total, free the concurrency slots.
    pub fn settle(mut self, usage: Usage) {
        self.finish(Some(usage));
    }

    fn finish(&mut self, usage: Option<Usage>) {
        let total = usage.map(|u| u.prompt_tokens.saturating_add(u.completion_tokens));
        if let Some((store, lease)) = self.lease.take() {
            store.settle(lease, total);
        }
        for hold in std::mem::take(&mut self.holds) {
            let mut st = lock(&hold.level.state);
            if let Some(bucket) = st.tokens.as_mut().filter(|_| hold.tokens > 0) {
                match total {
                    Some(used) if used > hold.tokens => bucket.take((used - hold.tokens) as f64),
                    Some(used) => bucket.give((hold.tokens - used) as f64),
                    None => bucket.give(hold.tokens as f64),
                }
            }
            if hold.slot {
                st.slots.release();
            }
            if hold.request && !self.admitted {
                if let Some(bucket) = st.requests.as_mut() {
                    bucket.give(1.0);
                }
            }
        }
        if let Some(p) = self.principal.take() {
            // Record before un-reserving: used + reserved never under-counts.
            if let (Some(used), true) = (total, p.persist) {
                p.store.add(&p.id, &p.user, used);
            }
            let mut st = lock(&p.level.state);
            st.reserved = st.reserved.saturating_sub(p.reserved);
            if let (Some(used), Some(usage)) = (total, usage) {
                st.used_since_start = st.used_since_start.saturating_add(used);
                st.estimated_settles += u64::from(usage.estimated);
            }
        }
    }
}

impl Admission {
    /// An admission to complete against Redis ([`Admission::complete`]).
    pub(crate) fn pending(pending: Pending) -> Admission {
        Admission {
            holds: Vec::new(),
            principal: None,
            reserved: pending.estimate,
            headers: Vec::new(),
            admitted: false,
            pending: Some(Box::new(pending)),
            lease: None,
        }
    }

    /// Whether [`Admission::complete`] still has to run.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// `limits.store: redis`: check and take at every level in one Redis
    /// round trip. When Redis fails, `on_error` decides: admit on this
    /// replica's own counters (`fail_open`) or refuse with 503
    /// (`fail_closed`). A no-op for an admission that is not pending.
    pub async fn complete(&mut self) -> Result<(), Rejection> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let identity = pending
            .identity
            .as_ref()
            .map(|(id, _, quota)| (id.as_str(), *quota));
        match pending
            .store
            .admit(&pending.shared, identity, pending.estimate)
            .await
        {
            Ok((
                Verdict::Ok {
                    requests, tokens, ..
                },
                Some(lease),
            )) => {
                self.headers = shared_headers(&pending.shared, requests, tokens);
                self.lease = Some((pending.store.clone(), lease));
                self.admitted = true;
                Ok(())
            }
            Ok((
                Verdict::Refused {
                    what, level, wait, ..
                },
                _,
            )) => Err(shared_refusal(&pending, &what, level, wait)),
            Ok((Verdict::Ok { .. }, None)) => Err(store_unavailable()),
            Err(_) => fallback(&pending).map(|local| *self = local),
        }
    }
}

/// Redis did not answer: `on_error` decides.
pub(crate) fn fallback(pending: &Pending) -> Result<Admission, Rejection> {
    use super::config::OnStoreError;
    match pending.store.on_error() {
        OnStoreError::FailClosed => Err(store_unavailable()),
        OnStoreError::FailOpen => {
            pending
                .store
                .fallbacks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let principal = pending.identity.as_ref().and_then(|(id, user, _)| {
                pending
                    .levels
                    .last()
                    .map(|level| (id.as_str(), user.as_str(), level.clone()))
            });
            admit(
                &pending.levels,
                principal,
                &Ledger::Shared(pending.store.clone()),
                pending.estimate,
            )
        }
    }
}

/// The `x-ratelimit-*` headers from what the admission script reported.
fn shared_headers(
    levels: &[SharedLevel],
    requests: Option<(f64, f64)>,
    tokens: Option<(f64, f64)>,
) -> Vec<(&'static str, String)> {
    let requests = requests.map(|(left, cap)| {
        let rate = levels
            .iter()
            .find(|l| l.rate > 0.0 && l.burst == cap)
            .map_or(1.0, |l| l.rate);
        BucketView::new(
            cap,
            left,
            Duration::from_secs_f64(((cap - left) / rate).max(0.0)),
        )
    });
    let tokens = tokens.map(|(left, cap)| {
        let per_sec = (cap / 60.0).max(f64::MIN_POSITIVE);
        BucketView::new(
            cap,
            left,
            Duration::from_secs_f64(((cap - left) / per_sec).max(0.0)),
        )
    });
    rate_limit_headers(requests, tokens)
}

fn shared_refusal(pending: &Pending, what: &str, level: usize, wait: Duration) -> Rejection {
    let scope = pending
        .levels
        .get(level.min(pending.levels.len().saturating_sub(1)))
        .map_or(Scope::Gateway, |l| l.scope.clone());
    let spec = pending.shared.get(level);
    match what {
        "quota" => quota_exhausted(
            &scope,
            pending
                .identity
                .as_ref()
                .and_then(|(_, _, q)| *q)
                .unwrap_or(0),
        ),
        "rps" => too_many_requests(&scope, spec.map_or(0.0, |s| s.rate), wait),
        "conc" => too_many_concurrent(&scope, spec.and_then(|s| u32::try_from(s.concurrent).ok())),
        "large" => request_too_large(
            pending.estimate,
            spec.map_or(0.0, |s| s.tokens_per_minute as f64),
        ),
        _ => too_many_tokens(
            &scope,
            spec.map_or(0.0, |s| s.tokens_per_minute as f64),
            pending.estimate,
            wait,
        ),
    }
}

/// 503: the shared limits store is down and `on_error: fail_closed`.
pub(crate) fn store_unavailable() -> Rejection {
    let mut r = Rejection::new(
        503,
        "server_error",
        "limits_unavailable",
        "The gateway cannot check rate limits right now (its shared limits store does not answer) and is configured to refuse rather than admit unchecked. Retry shortly.",
    );
    r.limit = Some("store");
    r.retry_after = Some(1);
    r
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// Run the checks over `levels` (gateway, model, identity, in that order);
/// `principal` is the identity and its level (also the last of `levels`).
pub(crate) fn admit(
    levels: &[Arc<Level>],
    principal: Option<Principal<'_>>,
    store: &Ledger,
    estimate: u64,
) -> Result<Admission, Rejection> {
    let result = check(levels, principal, store, estimate);
    // Headers after the checks: what this request took, or, for a refusal,
    // the state after everything was given back.
    let headers = headers(levels);
    match result {
        Ok(mut admission) => {
            admission.headers = headers;
            Ok(admission)
        }
        Err(mut rejection) => {
            rejection.headers.extend(headers);
            Err(rejection)
        }
    }
}

fn check(
    levels: &[Arc<Level>],
    principal: Option<Principal<'_>>,
    store: &Ledger,
    estimate: u64,
) -> Result<Admission, Rejection> {
    // Dropped on any early return below, which gives back what was taken.
    let mut admission = Admission {
        holds: levels
            .iter()
            .map(|level| Hold {
                level: level.clone(),
                request: false,
                slot: false,
                tokens: 0,
            })
            .collect(),
        principal: None,
        reserved: estimate,
        headers: Vec::new(),
        admitted: false,
        pending: None,
        lease: None,
    };

    if let Some((id, user, level)) = principal {
        let mut st = lock(&level.state);
        if let Some(quota) = st.quota {
            let used = store.used(id);
            if used.saturating_add(st.reserved) >= quota {
                return Err(quota_exhausted(&level.scope, quota));
            }
        }
        st.reserved = st.reserved.saturating_add(estimate);
        let persist = st.quota.is_some();
        drop(st);
        admission.principal = Some(PrincipalHold {
            id: id.to_string(),
            user: user.to_string(),
            store: store.clone(),
            reserved: estimate,
            persist,
            level,
        });
    }

    for hold in &mut admission.holds {
        let mut st = lock(&hold.level.state);
        if let Some(bucket) = st.requests.as_mut() {
            bucket
                .try_take(1.0)
                .map_err(|wait| too_many_requests(&hold.level.scope, bucket.per_sec(), wait))?;
            hold.request = true;
        }
    }

    for hold in &mut admission.holds {
        let mut st = lock(&hold.level.state);
        if !st.slots.try_acquire() {
            return Err(too_many_concurrent(&hold.level.scope, st.slots.limit()));
        }
        hold.slot = true;
    }

    for hold in &mut admission.holds {
        let mut st = lock(&hold.level.state);
        if let Some(bucket) = st.tokens.as_mut() {
            let limit = bucket.capacity();
            if estimate as f64 > limit {
                return Err(request_too_large(estimate, limit));
            }
            bucket
                .try_take(estimate as f64)
                .map_err(|wait| too_many_tokens(&hold.level.scope, limit, estimate, wait))?;
            hold.tokens = estimate;
        }
    }

    admission.admitted = true;
    Ok(admission)
}

fn headers(levels: &[Arc<Level>]) -> Vec<(&'static str, String)> {
    let (mut requests, mut tokens) = (None, None);
    for level in levels {
        let mut st = lock(&level.state);
        if let Some(v) = st.requests_view() {
            requests = Some(v.tighter(requests));
        }
        if let Some(v) = st.tokens_view() {
            tokens = Some(v.tighter(tokens));
        }
    }
    rate_limit_headers(requests, tokens)
}

/// Whole seconds to wait, at least 1 (OpenAI's `Retry-After` contract).
fn retry_secs(wait: Duration) -> u32 {
    let secs = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

fn no_retry() -> (&'static str, String) {
    ("x-should-retry", "false".to_string())
}

fn quota_exhausted(scope: &Scope, quota: u64) -> Rejection {
    let mut r = Rejection::new(
        429,
        "insufficient_quota",
        "insufficient_quota",
        format!(
            "{} token quota ({quota} tokens) is used up. Ask the gateway operator to raise the quota.",
            scope.owner()
        ),
    );
    r.limit = Some("quota");
    r.headers.push(no_retry());
    r
}

fn too_many_requests(scope: &Scope, per_sec: f64, wait: Duration) -> Rejection {
    let secs = retry_secs(wait);
    let mut r = Rejection::new(
        429,
        "requests",
        "rate_limit_exceeded",
        format!(
            "Rate limit reached for requests per second (limit {per_sec}/s) on {}. Retry after {secs} s.",
            scope.describe()
        ),
    );
    r.limit = Some("requests_per_second");
    r.retry_after = Some(secs);
    r
}

fn too_many_concurrent(scope: &Scope, limit: Option<u32>) -> Rejection {
    let limit = limit.map_or_else(|| "?".to_string(), |l| l.to_string());
    let mut r = Rejection::new(
        429,
        "requests",
        "rate_limit_exceeded",
        format!(
            "Too many concurrent requests on {} (limit {limit} at once). Retry when one of them has finished.",
            scope.describe()
        ),
    );
    r.limit = Some("concurrency");
    r.retry_after = Some(1);
    r
}

fn request_too_large(estimate: u64, limit: f64) -> Rejection {
    let mut r = Rejection::new(
        429,
        "tokens",
        "rate_limit_exceeded",
        format!(
            "Request too large: it may use up to {estimate} tokens but the limit is {limit} tokens per minute; lower max_tokens or shorten the prompt."
        ),
    );
    r.limit = Some("request_too_large");
    r.headers.push(no_retry());
    r
}

fn too_many_tokens(scope: &Scope, limit: f64, estimate: u64, wait: Duration) -> Rejection {
    let secs = retry_secs(wait);
    let mut r = Rejection::new(
        429,
        "tokens",
        "rate_limit_exceeded",
        format!(
            "Rate limit reached for tokens per minute (limit {limit}/min) on {}: this request reserves {estimate} tokens (prompt estimate + max_tokens). Retry after {secs} s.",
            scope.describe()
        ),
    );
    r.limit = Some("tokens_per_minute");
    r.retry_after = Some(secs);
    r
}

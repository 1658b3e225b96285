//! Admission: the checks that let a request run, and the handle that gives
//! back what it holds when the request ends.

use super::headers::rate_limit_headers;
use super::level::{Level, Scope};
use super::lock;
use super::quota_store::QuotaStore;
use crate::{Identity, Rejection};
use std::sync::Arc;
use std::time::Duration;

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
    store: Arc<QuotaStore>,
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

impl Drop for Admission {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// Run the checks over `levels` (gateway, model, identity, in that order);
/// `principal` is the identity and its level (also the last of `levels`).
pub(crate) fn admit(
    levels: &[Arc<Level>],
    principal: Option<(&Identity, Arc<Level>)>,
    store: &Arc<QuotaStore>,
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
    principal: Option<(&Identity, Arc<Level>)>,
    store: &Arc<QuotaStore>,
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
    };

    if let Some((identity, level)) = principal {
        let mut st = lock(&level.state);
        if let Some(quota) = st.quota {
            let used = store.used(&identity.id);
            if used.saturating_add(st.reserved) >= quota {
                return Err(quota_exhausted(&level.scope, quota));
            }
        }
        st.reserved = st.reserved.saturating_add(estimate);
        let persist = st.quota.is_some();
        drop(st);
        admission.principal = Some(PrincipalHold {
            id: identity.id.clone(),
            user: identity.user.clone(),
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

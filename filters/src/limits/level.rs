//! One level of limits: the whole gateway, one model, or one identity.
//!
//! A level owns its buckets, its in-flight count and (for identities) the
//! tokens reserved by its running requests, all behind one short-lived lock
//! that is never held across I/O or another level's lock.

use super::concurrency::Slots;
use super::headers::BucketView;
use super::TokenBucket;
use crate::LimitSpec;
use std::sync::Mutex;

/// Which level, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    Gateway,
    Model(String),
    Key,
    User,
}

impl Scope {
    /// An identity's scope from its id (`key:…` or `user:…`).
    pub(crate) fn of_identity(id: &str) -> Scope {
        if id.starts_with("user:") {
            Scope::User
        } else {
            Scope::Key
        }
    }

    /// How messages name the level: "this key", "model `qwen`", "the gateway".
    pub(crate) fn describe(&self) -> String {
        match self {
            Scope::Gateway => "the gateway".to_string(),
            Scope::Model(m) => format!("model `{m}`"),
            Scope::Key => "this key".to_string(),
            Scope::User => "this user".to_string(),
        }
    }

    /// Possessive, for the quota message: "This key's".
    pub(crate) fn owner(&self) -> &'static str {
        match self {
            Scope::User => "This user's",
            _ => "This key's",
        }
    }
}

/// A level and its state.
pub(crate) struct Level {
    pub(crate) scope: Scope,
    pub(crate) state: Mutex<LevelState>,
}

impl Level {
    pub(crate) fn new(scope: Scope, spec: &LimitSpec) -> Level {
        Level {
            scope,
            state: Mutex::new(LevelState::new(spec)),
        }
    }
}

/// Everything a level counts.
pub(crate) struct LevelState {
    pub(crate) spec: LimitSpec,
    /// Requests per second, if limited.
    pub(crate) requests: Option<TokenBucket>,
    /// Tokens per minute, if limited.
    pub(crate) tokens: Option<TokenBucket>,
    pub(crate) slots: Slots,
    /// Identities only: tokens reserved by requests still running.
    pub(crate) reserved: u64,
    /// Identities only: display name and quota as last seen.
    pub(crate) user: Option<String>,
    pub(crate) quota: Option<u64>,
    /// Identities only: tokens settled since the gateway started.
    pub(crate) used_since_start: u64,
    /// Identities only: settled requests whose usage the gateway estimated.
    pub(crate) estimated_settles: u64,
    /// Identities only: the "quota without data_dir" warning was given.
    pub(crate) warned_unpersisted: bool,
}

impl LevelState {
    fn new(spec: &LimitSpec) -> LevelState {
        LevelState {
            spec: spec.clone(),
            requests: requests_shape(spec).map(|(cap, rate)| TokenBucket::new(cap, rate)),
            tokens: tokens_shape(spec).map(|(cap, rate)| TokenBucket::new(cap, rate)),
            slots: Slots::new(spec.concurrent),
            reserved: 0,
            user: None,
            quota: None,
            used_since_start: 0,
            estimated_settles: 0,
            warned_unpersisted: false,
        }
    }

    /// Adopt a changed spec (a reloaded keys file), keeping what is consumed
    /// and what is running.
    pub(crate) fn apply(&mut self, spec: &LimitSpec) {
        if self.spec == *spec {
            return;
        }
        reshape(&mut self.requests, requests_shape(spec));
        reshape(&mut self.tokens, tokens_shape(spec));
        self.slots.set_limit(spec.concurrent);
        self.spec = spec.clone();
    }

    pub(crate) fn requests_view(&mut self) -> Option<BucketView> {
        self.requests.as_mut().map(BucketView::of)
    }

    pub(crate) fn tokens_view(&mut self) -> Option<BucketView> {
        self.tokens.as_mut().map(BucketView::of)
    }
}

fn reshape(bucket: &mut Option<TokenBucket>, shape: Option<(f64, f64)>) {
    match (bucket.as_mut(), shape) {
        (Some(b), Some((cap, rate))) => b.reconfigure(cap, rate),
        (None, Some((cap, rate))) => *bucket = Some(TokenBucket::new(cap, rate)),
        (_, None) => *bucket = None,
    }
}

/// Requests bucket (capacity, per second): burst or max(1, ceil(rps)).
pub(crate) fn requests_shape(spec: &LimitSpec) -> Option<(f64, f64)> {
    let rps = spec
        .requests_per_second
        .filter(|r| r.is_finite() && *r > 0.0)?;
    let capacity = match spec.burst.filter(|b| *b >= 1) {
        Some(burst) => f64::from(burst),
        None => rps.ceil().max(1.0),
    };
    Some((capacity, rps))
}

/// Tokens bucket (capacity, per second): tpm, refilled tpm/60 per second.
pub(crate) fn tokens_shape(spec: &LimitSpec) -> Option<(f64, f64)> {
    let tpm = spec.tokens_per_minute.filter(|t| *t >= 1)? as f64;
    Some((tpm, tpm / 60.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_shapes_follow_the_spec() {
        let spec = LimitSpec {
            requests_per_second: Some(2.5),
            ..LimitSpec::default()
        };
        assert_eq!(requests_shape(&spec), Some((3.0, 2.5)));
        let spec = LimitSpec {
            requests_per_second: Some(0.2),
            burst: Some(5),
            tokens_per_minute: Some(600),
            ..LimitSpec::default()
        };
        assert_eq!(requests_shape(&spec), Some((5.0, 0.2)));
        assert_eq!(tokens_shape(&spec), Some((600.0, 10.0)));
        assert_eq!(requests_shape(&LimitSpec::default()), None);
        assert_eq!(tokens_shape(&LimitSpec::default()), None);
    }

    #[test]
    fn scopes_are_named_for_people() {
        assert_eq!(Scope::of_identity("key:abc").describe(), "this key");
        assert_eq!(Scope::of_identity("user:7").describe(), "this user");
        assert_eq!(Scope::Model("qwen".into()).describe(), "model `qwen`");
        assert_eq!(Scope::Gateway.describe(), "the gateway");
    }
}

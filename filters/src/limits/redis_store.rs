//! `limits.store: { kind: redis }`: requests per second, tokens per minute,
//! concurrency slots and lifetime quotas shared by every replica that points
//! at one Redis (or Valkey).
//!
//! One admission is one server-side script (`EVALSHA`): it refills and checks
//! every level's buckets, expires dead concurrency leases, checks the quota
//! against the persisted total plus live reservations, and takes everything
//! or nothing — one round trip. Settlement is one more script, run in the
//! background. Concurrency slots and quota reservations are leases (a sorted
//! set member scored by its expiry, Redis' own clock): this replica renews
//! its leases every `lease / 3`, so a replica that dies (`kill -9`) gives its
//! slots back within `lease`.
//!
//! When Redis is slow or down (a call fails or outlasts `timeout`) the store
//! is marked down and every admission follows `on_error` at once, without
//! waiting on Redis again: `fail_open` admits against this replica's own
//! counters (each limit divided by `replicas`), `fail_closed` refuses with a
//! 503. A probe pings Redis every 200 ms while it is down; when it answers, the quota usage
//! settled meanwhile is added to Redis (nothing counted is lost) and shared
//! counting resumes.
//!
//! The client is `redis` (redis-rs), the maintained Rust client, with its
//! `ConnectionManager` (one multiplexed connection, reconnects on its own).
//! It runs on a small runtime of its own, so Redis I/O never depends on which
//! of Pingora's runtimes a request is on.

use super::config::{OnStoreError, StoreConfig};
use super::lock;
use redis::aio::ConnectionManager;
use redis::Script;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::Duration;

/// The runtime Redis I/O and the store's background tasks run on; built once,
/// never dropped (a runtime cannot be dropped from async code).
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("limits-store")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the limits store's runtime: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Check and take, at every level, all or nothing (see the module docs).
///
/// KEYS: per level i (1..n): `3i-2` requests bucket, `3i-1` lease set,
/// `3i` tokens bucket; then the quota hash, the identity's reservation set
/// and its reservation amounts.
/// ARGV: lease, lease ms, estimate, n, quota (-1: none), identity id ('' for
/// none), then per level: rate/s (0: none), burst, concurrent (0: not
/// counted, -1: counted, unlimited), tokens per minute (0: none).
/// Returns {status, level, wait ms, quota used, requests left, requests cap,
/// tokens left, tokens cap}; status: ok, quota, rps, conc, tpm, large.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, lease_ms, est, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local quota, id = tonumber(ARGV[5]), ARGV[6]
local qk, rz, rh = KEYS[3 * n + 1], KEYS[3 * n + 2], KEYS[3 * n + 3]
local function arg(i, j) return tonumber(ARGV[6 + (i - 1) * 4 + j]) end
local used = 0
if id ~= '' then
  local dead = redis.call('ZRANGEBYSCORE', rz, '-inf', now)
  if #dead > 0 then
    redis.call('ZREM', rz, unpack(dead))
    redis.call('HDEL', rh, unpack(dead))
  end
  used = tonumber(redis.call('HGET', qk, id) or '0')
  if quota >= 0 then
    local reserved = 0
    for _, v in ipairs(redis.call('HVALS', rh)) do reserved = reserved + tonumber(v) end
    if used + reserved >= quota then return {'quota', n, 0, used, -1, -1, -1, -1} end
  end
end
local function level(key, cap, rate)
  local v = redis.call('HMGET', key, 't', 'ts')
  local tokens, ts = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or ts == nil then return cap end
  return math.min(cap, tokens + math.max(0, now - ts) * rate / 1000)
end
local rps, tpm = {}, {}
for i = 1, n do
  local rate, burst = arg(i, 1), arg(i, 2)
  if rate > 0 then
    local tokens = level(KEYS[3 * i - 2], burst, rate)
    if tokens < 1 then
      return {'rps', i, math.ceil((1 - tokens) * 1000 / rate), used, 0, burst, -1, -1}
    end
    rps[i] = tokens
  end
end
for i = 1, n do
  local limit = arg(i, 3)
  if limit > 0 then
    local k = KEYS[3 * i - 1]
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    if redis.call('ZCARD', k) >= limit then return {'conc', i, 1000, used, -1, -1, -1, -1} end
  end
end
for i = 1, n do
  local cap = arg(i, 4)
  if cap > 0 then
    if est > cap then return {'large', i, 0, used, -1, -1, -1, -1} end
    local tokens = level(KEYS[3 * i], cap, cap / 60)
    if tokens < est then
      return {'tpm', i, math.ceil((est - tokens) * 60000 / cap), used, -1, -1, math.max(0, tokens), cap}
    end
    tpm[i] = tokens
  end
end
local req_left, req_cap, tok_left, tok_cap = -1, -1, -1, -1
for i = 1, n do
  if rps[i] then
    local k, left = KEYS[3 * i - 2], rps[i] - 1
    redis.call('HSET', k, 't', left, 'ts', now)
    redis.call('PEXPIRE', k, math.ceil(arg(i, 2) * 1000 / arg(i, 1)) + 1000)
    if req_left < 0 or left < req_left then req_left, req_cap = left, arg(i, 2) end
  end
  if arg(i, 3) ~= 0 then
    local k = KEYS[3 * i - 1]
    if arg(i, 3) < 0 then redis.call('ZREMRANGEBYSCORE', k, '-inf', now) end
    redis.call('ZADD', k, now + lease_ms, lease)
    redis.call('PEXPIRE', k, lease_ms * 2)
  end
  if tpm[i] then
    local k, left = KEYS[3 * i], tpm[i] - est
    redis.call('HSET', k, 't', left, 'ts', now)
    redis.call('PEXPIRE', k, 61000)
    if tok_left < 0 or left < tok_left then tok_left, tok_cap = left, arg(i, 4) end
  end
end
if id ~= '' then
  redis.call('ZADD', rz, now + lease_ms, lease)
  redis.call('HSET', rh, lease, est)
  redis.call('PEXPIRE', rz, lease_ms * 2)
  redis.call('PEXPIRE', rh, lease_ms * 2)
end
return {'ok', 0, 0, used, math.floor(req_left), req_cap, math.floor(tok_left), tok_cap}
";

/// Give back what an admission holds and charge its usage.
///
/// KEYS: `nt` tokens buckets, `nc` lease sets, quota hash, reservation set,
/// reservation amounts. ARGV: lease, reserved, used (-1: refund), identity
/// ('' none), persist (1/0), nt, nc.
const SETTLE: &str = r"
local lease, reserved, used, id = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local persist, nt, nc = ARGV[5] == '1', tonumber(ARGV[6]), tonumber(ARGV[7])
local charge = used
if charge < 0 then charge = 0 end
for i = 1, nt do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HINCRBYFLOAT', KEYS[i], 't', reserved - charge)
  end
end
for i = 1, nc do redis.call('ZREM', KEYS[nt + i], lease) end
if id ~= '' then
  local qk, rz, rh = KEYS[nt + nc + 1], KEYS[nt + nc + 2], KEYS[nt + nc + 3]
  if persist and used > 0 then redis.call('HINCRBY', qk, id, used) end
  redis.call('ZREM', rz, lease)
  redis.call('HDEL', rh, lease)
end
return 1
";

/// Extend leases this replica still holds. KEYS: lease sets; ARGV: lease
/// ms, then the member for each key.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[1])
local renewed = 0
for i, k in ipairs(KEYS) do
  if redis.call('ZSCORE', k, ARGV[i + 1]) then
    redis.call('ZADD', k, now + ms, ARGV[i + 1])
    redis.call('PEXPIRE', k, ms * 2)
    renewed = renewed + 1
  end
end
return renewed
";

static ADMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT));
static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE));
static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));

/// One level as the admission script sees it.
#[derive(Debug, Clone)]
pub(crate) struct SharedLevel {
    /// `gateway`, `model:<name>` or the identity's id.
    pub(crate) scope: String,
    pub(crate) rate: f64,
    pub(crate) burst: f64,
    /// 0: not counted; -1: counted, unlimited; N: limit.
    pub(crate) concurrent: i64,
    pub(crate) tokens_per_minute: u64,
}

/// What the admission script said.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    Ok {
        quota_used: u64,
        requests: Option<(f64, f64)>,
        tokens: Option<(f64, f64)>,
    },
    /// `level` is an index into the levels sent (or `levels.len()` for the quota).
    Refused {
        what: String,
        level: usize,
        wait: Duration,
        tokens: Option<(f64, f64)>,
    },
}

/// What one admission holds in Redis, to settle or renew.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) id: String,
    tpm_keys: Vec<String>,
    lease_keys: Vec<String>,
    identity: Option<String>,
    reserved: u64,
    persist: bool,
}

/// Why a Redis call did not get an answer (never holds the password).
#[derive(Debug, Clone)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// The Redis side of the limits (see the module docs).
pub struct RedisStore {
    config: StoreConfig,
    conn: ConnectionManager,
    up: AtomicBool,
    /// A random id of this process: lease names are `<replica>:<n>`.
    replica: String,
    next_lease: AtomicU64,
    /// Leases this replica holds: lease id → its lease sets.
    held: Mutex<HashMap<String, Vec<String>>>,
    /// Quota usage settled while Redis was down: identity → tokens.
    pending: Mutex<HashMap<String, u64>>,
    /// The last quota total Redis gave per identity (fail_open checks quotas
    /// against it plus what this replica counted since).
    last_used: Mutex<HashMap<String, u64>>,
    pub errors: AtomicU64,
    pub fallbacks: AtomicU64,
    warnings: Mutex<Vec<String>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("up", &self.is_up())
            .field("prefix", &self.config.key_prefix)
            .finish()
    }
}

impl RedisStore {
    /// Connect lazily (a Redis that is down at start is a store that is
    /// down, not a failed start) and start the lease renewal and the probe.
    pub fn open(config: StoreConfig) -> Result<Arc<RedisStore>, String> {
        let url = config.resolved_url()?;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| format!("limits.store.url: {}", redacted(&e.to_string())))?;
        let rt = runtime()?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = {
            let _inside = rt.enter();
            ConnectionManager::new_lazy_with_config(client, manager_config)
                .map_err(|e| format!("limits.store: {}", redacted(&e.to_string())))?
        };
        let store = Arc::new(RedisStore {
            conn,
            up: AtomicBool::new(true),
            replica: format!("{:016x}", rand::random::<u64>()),
            next_lease: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            last_used: Mutex::new(HashMap::new()),
            errors: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            warnings: Mutex::new(Vec::new()),
            config,
        });
        rt.spawn(background(Arc::downgrade(&store)));
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Whether the last call (or probe) reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn on_error(&self) -> OnStoreError {
        self.config.on_error.unwrap_or(OnStoreError::FailClosed)
    }

    /// Leases this replica holds now.
    pub fn leases_held(&self) -> usize {
        lock(&self.held).len()
    }

    /// Quota tokens counted while Redis was down, not yet added to it.
    pub fn pending_tokens(&self) -> u64 {
        lock(&self.pending).values().sum()
    }

    pub(crate) fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.warnings))
    }

    fn key(&self, scope: &str, kind: &str) -> String {
        format!("{}{scope}:{kind}", self.config.key_prefix)
    }

    fn quota_key(&self) -> String {
        format!("{}quota", self.config.key_prefix)
    }

    /// The last quota total Redis gave for `identity`, plus what this
    /// replica settled since that Redis has not seen.
    pub(crate) fn known_used(&self, identity: &str) -> u64 {
        let last = lock(&self.last_used).get(identity).copied().unwrap_or(0);
        last.saturating_add(lock(&self.pending).get(identity).copied().unwrap_or(0))
    }

    fn mark(&self, up: bool, why: &str) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            let msg = if up {
                "limits store: Redis answers again; shared limits resume".to_string()
            } else {
                format!(
                    "limits store: Redis is unreachable ({why}); {}",
                    match self.on_error() {
                        OnStoreError::FailOpen =>
                            "admitting on this replica's own counters (on_error: fail_open)",
                        OnStoreError::FailClosed =>
                            "refusing requests with 503 (on_error: fail_closed)",
                    }
                )
            };
            lock(&self.warnings).push(msg);
        }
    }

    /// Run one Redis call on the store's runtime, bounded by `timeout`.
    async fn call<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        let rt = runtime().map_err(StoreError)?;
        let task = rt.spawn(work);
        let result = match tokio::time::timeout(self.config.timeout, task).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(StoreError(redacted(&e.to_string()))),
            Ok(Err(e)) => Err(StoreError(format!("the call was lost ({e})"))),
            Err(_) => Err(StoreError(format!(
                "no answer within {:?}",
                self.config.timeout
            ))),
        };
        if let Err(e) = &result {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.mark(false, &e.0);
        }
        result
    }

    /// The admission script (see [`ADMIT`]). `identity`: id, quota, persist.
    pub(crate) async fn admit(
        &self,
        levels: &[SharedLevel],
        identity: Option<(&str, Option<u64>)>,
        estimate: u64,
    ) -> Result<(Verdict, Option<Lease>), StoreError> {
        let lease_id = format!(
            "{}:{}",
            self.replica,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let lease_ms = self.config.lease.as_millis().max(1) as u64;
        let mut invocation = ADMIT_SCRIPT.prepare_invoke();
        let mut tpm_keys = Vec::new();
        let mut lease_keys = Vec::new();
        for level in levels {
            invocation.key(self.key(&level.scope, "rps"));
            let conc = self.key(&level.scope, "conc");
            invocation.key(&conc);
            invocation.key(self.key(&level.scope, "tpm"));
            if level.concurrent != 0 {
                lease_keys.push(conc);
            }
            if level.tokens_per_minute > 0 {
                tpm_keys.push(self.key(&level.scope, "tpm"));
            }
        }
        let scope = identity.map_or("-", |(id, _)| id);
        invocation
            .key(self.quota_key())
            .key(self.key(scope, "resv"))
            .key(self.key(scope, "resvt"));
        invocation
            .arg(&lease_id)
            .arg(lease_ms)
            .arg(estimate)
            .arg(levels.len())
            .arg(
                identity
                    .and_then(|(_, q)| q)
                    .map_or(-1, |q| q.min(i64::MAX as u64) as i64),
            )
            .arg(identity.map_or("", |(id, _)| id));
        for level in levels {
            invocation
                .arg(level.rate)
                .arg(level.burst)
                .arg(level.concurrent)
                .arg(level.tokens_per_minute);
        }
        let mut conn = self.conn.clone();
        let cmd = invocation;
        let reply: Vec<redis::Value> = self
            .call(async move { cmd.invoke_async(&mut conn).await })
            .await?;
        self.mark(true, "");
        let verdict = parse_verdict(&reply)
            .ok_or_else(|| StoreError(format!("the admission script answered {reply:?}")))?;
        if let (Some((id, _)), Verdict::Ok { quota_used, .. }) = (identity, &verdict) {
            lock(&self.last_used).insert(id.to_string(), *quota_used);
        }
        let lease = match verdict {
            Verdict::Ok { .. } => {
                if let Some((id, _)) = identity {
                    lease_keys.push(self.key(id, "resv"));
                }
                lock(&self.held).insert(lease_id.clone(), lease_keys.clone());
                Some(Lease {
                    id: lease_id,
                    tpm_keys,
                    lease_keys,
                    identity: identity.map(|(id, _)| id.to_string()),
                    reserved: estimate,
                    persist: identity.is_some_and(|(_, q)| q.is_some()),
                })
            }
            Verdict::Refused { .. } => None,
        };
        Ok((verdict, lease))
    }

    /// Settle a lease in the background: charge `used` (`None`: refund),
    /// free its slots. If Redis does not answer, the quota usage waits in
    /// `pending` for the probe to add it; the slots expire with the lease.
    pub(crate) fn settle(self: &Arc<Self>, lease: Lease, used: Option<u64>) {
        lock(&self.held).remove(&lease.id);
        let store = self.clone();
        let Ok(rt) = runtime() else { return };
        rt.spawn(async move {
            let mut invocation = SETTLE_SCRIPT.prepare_invoke();
            let slots: Vec<&String> = lease
                .lease_keys
                .iter()
                .filter(|k| !k.ends_with(":resv"))
                .collect();
            for k in &lease.tpm_keys {
                invocation.key(k);
            }
            for k in &slots {
                invocation.key(*k);
            }
            let scope = lease.identity.as_deref().unwrap_or("-");
            invocation
                .key(store.quota_key())
                .key(store.key(scope, "resv"))
                .key(store.key(scope, "resvt"));
            invocation
                .arg(&lease.id)
                .arg(lease.reserved)
                .arg(used.map_or(-1, |u| u.min(i64::MAX as u64) as i64))
                .arg(lease.identity.as_deref().unwrap_or(""))
                .arg(if lease.persist { "1" } else { "0" })
                .arg(lease.tpm_keys.len())
                .arg(slots.len());
            let mut conn = store.conn.clone();
            let cmd = invocation;
            let done: Result<i64, StoreError> = if store.is_up() {
                store
                    .call(async move { cmd.invoke_async(&mut conn).await })
                    .await
            } else {
                Err(StoreError("down".into()))
            };
            if done.is_err() {
                if let (Some(id), Some(used), true) = (&lease.identity, used, lease.persist) {
                    store.defer(id, used);
                }
            }
        });
    }

    /// Quota usage Redis could not take now: add it when it answers again.
    pub(crate) fn defer(&self, identity: &str, used: u64) {
        if used > 0 {
            *lock(&self.pending).entry(identity.to_string()).or_insert(0) += used;
        }
    }

    /// Every persisted quota total in Redis (`/admin/usage`).
    pub async fn quota_totals(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.quota_key();
        self.call(async move {
            redis::cmd("HGETALL")
                .arg(key)
                .query_async::<HashMap<String, u64>>(&mut conn)
                .await
        })
        .await
    }

    /// Import quota totals that Redis does not know yet (`HSETNX`): a
    /// `data_dir` store's totals, once, when Redis becomes the source of truth.
    pub fn import(self: &Arc<Self>, totals: Vec<(String, u64)>) {
        if totals.is_empty() {
            return;
        }
        let store = self.clone();
        let Ok(rt) = runtime() else { return };
        rt.spawn(async move {
            let mut pipe = redis::pipe();
            for (id, used) in &totals {
                pipe.cmd("HSETNX").arg(store.quota_key()).arg(id).arg(*used).ignore();
            }
            let mut conn = store.conn.clone();
            let n = totals.len();
            match store
                .call(async move { pipe.query_async::<()>(&mut conn).await })
                .await
            {
                Ok(()) => lock(&store.warnings).push(format!(
                    "limits store: offered {n} quota totals from data_dir to Redis (kept where Redis had none)"
                )),
                Err(e) => lock(&store.warnings).push(format!(
                    "limits store: could not import the data_dir quota totals into Redis ({}); they stay local",
                    e.0
                )),
            }
        });
    }

    /// Renew held leases; when down, ping and, on an answer, add the usage
    /// counted meanwhile.
    async fn tick(&self) {
        if !self.is_up() {
            let mut conn = self.conn.clone();
            let pong = self
                .call(async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
                .await;
            if pong.is_err() {
                return;
            }
            self.mark(true, "");
        }
        let pending: Vec<(String, u64)> = lock(&self.pending).drain().collect();
        if !pending.is_empty() {
            let mut pipe = redis::pipe();
            for (id, used) in &pending {
                pipe.cmd("HINCRBY")
                    .arg(self.quota_key())
                    .arg(id)
                    .arg(*used)
                    .ignore();
            }
            let mut conn = self.conn.clone();
            if self
                .call(async move { pipe.query_async::<()>(&mut conn).await })
                .await
                .is_err()
            {
                for (id, used) in pending {
                    self.defer(&id, used);
                }
                return;
            }
            let total: u64 = pending.iter().map(|(_, u)| *u).sum();
            lock(&self.warnings).push(format!(
                "limits store: added {total} quota tokens counted while Redis was down"
            ));
        }
        let held: Vec<(String, Vec<String>)> = lock(&self.held)
            .iter()
            .map(|(id, keys)| (id.clone(), keys.clone()))
            .collect();
        if held.is_empty() {
            return;
        }
        let mut invocation = RENEW_SCRIPT.prepare_invoke();
        invocation.arg(self.config.lease.as_millis().max(1) as u64);
        for (id, keys) in &held {
            for k in keys {
                invocation.key(k).arg(id);
            }
        }
        let mut conn = self.conn.clone();
        let cmd = invocation;
        let _ = self
            .call(async move { cmd.invoke_async::<i64>(&mut conn).await })
            .await;
    }
}

/// While Redis is down, it is pinged this often.
const PROBE_PERIOD: Duration = Duration::from_millis(200);

/// Lease renewal every `lease / 3` (a ping every [`PROBE_PERIOD`] while Redis
/// is down, to notice it back); ends with the store.
async fn background(store: Weak<RedisStore>) {
    loop {
        let period = match store.upgrade() {
            Some(s) if s.is_up() => s.config.lease / 3,
            Some(s) => (s.config.lease / 3).min(PROBE_PERIOD),
            None => return,
        };
        tokio::time::sleep(period.max(Duration::from_millis(50))).await;
        match store.upgrade() {
            Some(s) => s.tick().await,
            None => return,
        }
    }
}

fn parse_verdict(reply: &[redis::Value]) -> Option<Verdict> {
    use redis::Value;
    let int = |i: usize| -> Option<i64> {
        match reply.get(i)? {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    };
    let status = match reply.first()? {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    let pair = |left: i64, cap: i64| (cap >= 0).then(|| (left.max(0) as f64, cap as f64));
    let used = int(3)?.max(0) as u64;
    if status == "ok" {
        return Some(Verdict::Ok {
            quota_used: used,
            requests: pair(int(4)?, int(5)?),
            tokens: pair(int(6)?, int(7)?),
        });
    }
    Some(Verdict::Refused {
        level: int(1)?.max(1) as usize - 1,
        wait: Duration::from_millis(int(2)?.max(0) as u64),
        tokens: pair(int(6)?, int(7)?),
        what: status,
    })
}

/// A Redis error or URL without its password (`redis://:secret@host` →
/// `redis://:***@host`).
pub(crate) fn redacted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let user = authority[..at].split(':').next().unwrap_or("");
                out.push_str(user);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.1:6379/0 refused"),
            "redis://:***@10.0.0.1:6379/0 refused"
        );
        assert_eq!(
            redacted("rediss://app:pw@r:6380"),
            "rediss://app:***@r:6380"
        );
        assert_eq!(
            redacted("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redacted("no url here"), "no url here");
    }

    #[test]
    fn verdicts_parse() {
        use redis::Value;
        let s = |x: &str| Value::BulkString(x.as_bytes().to_vec());
        let ok = [
            s("ok"),
            Value::Int(0),
            Value::Int(0),
            Value::Int(12),
            Value::Int(3),
            Value::Int(5),
            Value::Int(-1),
            Value::Int(-1),
        ];
        assert_eq!(
            parse_verdict(&ok),
            Some(Verdict::Ok {
                quota_used: 12,
                requests: Some((3.0, 5.0)),
                tokens: None
            })
        );
        let no = [
            s("rps"),
            Value::Int(2),
            Value::Int(250),
            Value::Int(0),
            Value::Int(0),
            Value::Int(5),
            Value::Int(-1),
            Value::Int(-1),
        ];
        assert_eq!(
            parse_verdict(&no),
            Some(Verdict::Refused {
                what: "rps".into(),
                level: 1,
                wait: Duration::from_millis(250),
                tokens: None
            })
        );
        assert_eq!(parse_verdict(&[Value::Nil]), None);
    }
}

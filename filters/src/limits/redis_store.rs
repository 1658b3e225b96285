//! `limits.store: { kind: redis }`: requests per second, tokens per minute,
//! concurrency slots and lifetime quotas shared by every replica that points
//! at one Redis (or Valkey).
//!
//! An admission is one server-side script (`EVALSHA`): it refills and checks
//! every level's buckets, checks the concurrency leases and the quota
//! against the persisted total plus live reservations, and takes everything
//! or nothing — one round trip. Admissions that arrive while a call is out
//! go together in the next call (one script run for the batch, each key
//! read and written once), the way a group commit does; settlements are
//! batched the same way, in the background, aggregated per key. Each
//! Pingora worker thread has its own admitter, flusher and connection, so a
//! request's Redis call does not hop to another thread and back.
//!
//! Concurrency slots and quota reservations are leases (a sorted set member
//! scored by its expiry, Redis' own clock): this replica renews its leases
//! every `lease / 3`, so a replica that dies (`kill -9`) gives its slots and
//! reservations back within `lease`.
//!
//! When Redis is slow or down (a call fails or outlasts `timeout`) the store
//! is marked down and every admission follows `on_error` at once, without
//! waiting on Redis again: `fail_open` admits against this replica's own
//! counters (each limit divided by `replicas`), `fail_closed` refuses with a
//! 503. A probe pings Redis every 200 ms while it is down; when it answers,
//! the quota usage settled meanwhile is added to Redis (nothing counted is
//! lost) and shared counting resumes.
//!
//! The client is `redis` (redis-rs), the maintained Rust client, with its
//! `ConnectionManager` (one multiplexed connection, reconnects on its own).
//! Lease renewal and the probe run on a small runtime of the store's own.

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

/// Check and take, for a batch of admissions in arrival order, each all or
/// nothing at every level (see the module docs).
///
/// Per level, one hash `<scope>:b` holds the requests bucket (`r`, `rts`),
/// the tokens bucket (`t`, `tts`), at the identity's level the sum of its
/// live quota reservations (`rs`), and when the key's expiry was last
/// pushed (`x`); one sorted set `<scope>:conc` holds the concurrency leases
/// (members `<lease>|<estimate>`, scored by expiry). A key is read once and
/// written once per batch, however many admissions of the batch touch it.
/// Expired leases are swept only when they could matter (a level at its
/// limit, a quota that looks used up) and every 10 minutes per level.
///
/// KEYS: the quota hash, then every other key the batch uses, once.
/// ARGV: lease ms, m (admissions), then per admission: lease member,
/// estimate, quota (-1: none), identity id ('' for none; its level is the
/// last), n (levels), then per level: hash key index (0: not needed), set
/// key index, rate/s (0: none), burst, concurrent (0: not counted, -1:
/// counted, unlimited), tokens per minute (0: none), hash ttl ms.
/// Returns per admission {status, level, wait ms, quota used, requests
/// left, requests cap, tokens left, tokens cap}; status: ok, quota, rps,
/// conc, tpm, large.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local H, Z, U = {}, {}, {}
local function hash(k)
  local h = H[k]
  if h == nil then
    local v = redis.call('HMGET', KEYS[k], 'r', 'rts', 't', 'tts', 'rs', 'x')
    h = {r = tonumber(v[1]), rts = tonumber(v[2]), t = tonumber(v[3]), tts = tonumber(v[4]),
         rs = math.max(0, tonumber(v[5]) or 0), x = tonumber(v[6]), w = {}, ttl = 0}
    H[k] = h
  end
  return h
end
local function set(k)
  local z = Z[k]
  if z == nil then z = {add = {}}; Z[k] = z end
  return z
end
local function card(k)
  local z = set(k)
  if z.card == nil then z.card = redis.call('ZCARD', KEYS[k]) + #z.add / 2 end
  return z.card
end
local function sweep(k, hk)
  local z = set(k)
  if not z.swept then
    z.swept = true
    local dead = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', now, 'LIMIT', 0, 1000)
    if #dead > 0 then
      redis.call('ZREM', KEYS[k], unpack(dead))
      if hk > 0 then
        local gone = 0
        for _, mb in ipairs(dead) do gone = gone + (tonumber(string.match(mb, '|(%d+)$')) or 0) end
        local h = hash(hk)
        h.rs = math.max(0, h.rs - gone)
        h.w.rs = true
      end
      z.card = nil
    end
  end
  return card(k)
end
local function fill(amount, ts, cap, rate)
  if amount == nil or ts == nil then return cap end
  return math.min(cap, amount + math.max(0, now - ts) * rate / 1000)
end
local function admit(member, est, quota, id, n, L)
  local used = 0
  if id ~= '' then
    if U[id] == nil then U[id] = tonumber(redis.call('HGET', KEYS[1], id) or '0') end
    used = U[id]
    if quota >= 0 and used + hash(L[n].hk).rs >= quota then
      sweep(L[n].zk, L[n].hk)
      if used + hash(L[n].hk).rs >= quota then return {'quota', n, 0, used, -1, -1, -1, -1} end
    end
  end
  local rps, tpm = {}, {}
  for i = 1, n do
    local l = L[i]
    if l.rate > 0 then
      local h = hash(l.hk)
      local tokens = fill(h.r, h.rts, l.burst, l.rate)
      if tokens < 1 then
        return {'rps', i, math.ceil((1 - tokens) * 1000 / l.rate), used, 0, l.burst, -1, -1}
      end
      rps[i] = tokens
    end
  end
  for i = 1, n do
    local l = L[i]
    local own = (id ~= '' and i == n) and l.hk or 0
    if l.conc > 0 and card(l.zk) >= l.conc and sweep(l.zk, own) >= l.conc then
      return {'conc', i, 1000, used, -1, -1, -1, -1}
    end
  end
  for i = 1, n do
    local l = L[i]
    if l.tpm > 0 then
      if est > l.tpm then return {'large', i, 0, used, -1, -1, -1, -1} end
      local h = hash(l.hk)
      local tokens = fill(h.t, h.tts, l.tpm, l.tpm / 60)
      if tokens < est then
        return {'tpm', i, math.ceil((est - tokens) * 60000 / l.tpm), used, -1, -1, math.max(0, tokens), l.tpm}
      end
      tpm[i] = tokens
    end
  end
  local req_left, req_cap, tok_left, tok_cap = -1, -1, -1, -1
  for i = 1, n do
    local l = L[i]
    local own = id ~= '' and i == n
    if l.hk > 0 then
      local h = hash(l.hk)
      if rps[i] then
        h.r, h.rts, h.w.r = rps[i] - 1, now, true
        if req_left < 0 or h.r < req_left then req_left, req_cap = h.r, l.burst end
      end
      if tpm[i] then
        h.t, h.tts, h.w.t = tpm[i] - est, now, true
        if tok_left < 0 or h.t < tok_left then tok_left, tok_cap = h.t, l.tpm end
      end
      if own then h.rs, h.w.rs = h.rs + est, true end
      h.ttl = math.max(h.ttl, l.ttl)
      if (h.x == nil or now - h.x > 600000) and l.conc ~= 0 then sweep(l.zk, own and l.hk or 0) end
    end
    if l.conc ~= 0 then
      local z = set(l.zk)
      z.add[#z.add + 1] = now + lease_ms
      z.add[#z.add + 1] = member
      if z.card then z.card = z.card + 1 end
    end
  end
  return {'ok', 0, 0, used, math.floor(req_left), req_cap, math.floor(tok_left), tok_cap}
end
local out, p = {}, 3
for a = 1, m do
  local member, est, quota, id, n = ARGV[p], tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2]), ARGV[p + 3], tonumber(ARGV[p + 4])
  local L = {}
  for i = 1, n do
    local q = p + 5 + (i - 1) * 7
    L[i] = {hk = tonumber(ARGV[q]), zk = tonumber(ARGV[q + 1]), rate = tonumber(ARGV[q + 2]),
            burst = tonumber(ARGV[q + 3]), conc = tonumber(ARGV[q + 4]), tpm = tonumber(ARGV[q + 5]),
            ttl = tonumber(ARGV[q + 6])}
  end
  p = p + 5 + n * 7
  out[a] = admit(member, est, quota, id, n, L)
end
for k, h in pairs(H) do
  local f = {}
  if h.w.r then f[#f + 1] = 'r'; f[#f + 1] = h.r; f[#f + 1] = 'rts'; f[#f + 1] = h.rts end
  if h.w.t then f[#f + 1] = 't'; f[#f + 1] = h.t; f[#f + 1] = 'tts'; f[#f + 1] = h.tts end
  if h.w.rs then f[#f + 1] = 'rs'; f[#f + 1] = h.rs end
  local stale = #f > 0 and (h.x == nil or now - h.x > 600000)
  if stale then f[#f + 1] = 'x'; f[#f + 1] = now end
  if #f > 0 then redis.call('HSET', KEYS[k], unpack(f)) end
  if stale then redis.call('PEXPIRE', KEYS[k], h.ttl) end
end
for k, z in pairs(Z) do
  if #z.add > 0 then redis.call('ZADD', KEYS[k], unpack(z.add)) end
end
return out
";

/// Give back what a batch of admissions holds and charge its usage,
/// aggregated per key in the gateway.
///
/// KEYS: the quota hash, then every other key, once.
/// ARGV: nt, then nt × (hash key index, tokens to give back; negative: debt);
/// ns, then per lease set: set key index, the identity's hash key index (0:
/// not an identity's set), count, then count × (member, estimate); nq,
/// then nq × (identity, tokens used).
/// A lease already swept as expired (its replica looked dead) is not
/// subtracted from the reservations twice.
const SETTLE: &str = r"
local p = 1
local nt = tonumber(ARGV[p]); p = p + 1
for i = 1, nt do
  redis.call('HINCRBYFLOAT', KEYS[tonumber(ARGV[p])], 't', ARGV[p + 1])
  p = p + 2
end
local ns = tonumber(ARGV[p]); p = p + 1
for i = 1, ns do
  local zk, hk, cnt = tonumber(ARGV[p]), tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
  p = p + 3
  local members, ests = {}, {}
  for j = 1, cnt do
    members[j], ests[j] = ARGV[p], tonumber(ARGV[p + 1])
    p = p + 2
  end
  if hk == 0 then
    redis.call('ZREM', KEYS[zk], unpack(members))
  else
    local scores = redis.call('ZMSCORE', KEYS[zk], unpack(members))
    local live, gone = {}, 0
    for j = 1, cnt do
      if scores[j] then live[#live + 1] = members[j]; gone = gone + ests[j] end
    end
    if #live > 0 then
      redis.call('ZREM', KEYS[zk], unpack(live))
      redis.call('HINCRBY', KEYS[hk], 'rs', -gone)
    end
  end
end
local nq = tonumber(ARGV[p]); p = p + 1
for i = 1, nq do
  redis.call('HINCRBY', KEYS[1], ARGV[p], ARGV[p + 1])
  p = p + 2
end
return 1
";

/// Extend leases this replica still holds (only those not yet swept as
/// expired). KEYS: lease sets; ARGV: lease ms, then the member for each key.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[1])
local renewed = 0
for i, k in ipairs(KEYS) do
  renewed = renewed + redis.call('ZADD', k, 'XX', 'CH', now + ms, ARGV[i + 1])
end
return renewed
";

/// One login attempt from the shared per-address bucket.
/// KEYS: the bucket hash. ARGV: attempts per minute.
/// Returns 0 (taken) or the ms to wait for the next attempt.
const LOGIN: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = cap
if v[1] and v[2] then
  tokens = math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * cap / 60000)
end
if tokens < 1 then return math.ceil((1 - tokens) * 60000 / cap) end
redis.call('HSET', KEYS[1], 't', tokens - 1, 'ts', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return 0
";

static LOGIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LOGIN));
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
    /// The lease's member in the lease sets: `<replica>:<n>|<estimate>`.
    pub(crate) id: String,
    /// Per level held: hash, lease set, flags (see [`SETTLE`]).
    levels: Vec<(String, String, u8)>,
    identity: Option<String>,
    reserved: u64,
    persist: bool,
}

/// What a lease holds at one level.
const HOLDS_TOKENS: u8 = 1;
const HOLDS_LEASE: u8 = 2;
const HOLDS_RESERVATION: u8 = 4;

/// Admissions and settlements waiting when a call to Redis ends go in the
/// next call, at most this many at once.
const BATCH: usize = 128;

/// A lease set in one settlement batch: its key index, the identity's hash
/// index (0: not an identity's set), the members to remove with their
/// reserved tokens.
type SetRelease<'a> = (usize, usize, Vec<(&'a str, u64)>);

/// One admission waiting for the admitter.
struct AdmitJob {
    lease: Lease,
    quota: i64,
    /// Per level: rate, burst, concurrent, tokens per minute, hash ttl ms.
    levels: Vec<(f64, f64, i64, u64, u64)>,
    reply: tokio::sync::oneshot::Sender<Result<(Verdict, Lease), StoreError>>,
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
    /// A random id of this process: lease names are `<replica>:<n>|<estimate>`.
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
    /// To open a connection per worker thread.
    client: redis::Client,
    manager_config: redis::aio::ConnectionManagerConfig,
    /// The worker on the runtime requests run on (Pingora's), started by
    /// the first admission: a request's wake-ups stay on its runtime's
    /// threads instead of hopping to the store's runtime and back.
    worker: Mutex<Option<Worker>>,
    /// The same on the store's runtime, for callers outside a runtime.
    fallback_worker: Worker,
}

/// The queues of one worker task (see [`worker`]).
#[derive(Clone)]
struct Worker {
    admissions: tokio::sync::mpsc::UnboundedSender<AdmitJob>,
    settles: tokio::sync::mpsc::UnboundedSender<(Lease, Option<u64>)>,
}

/// Start a worker for `store` on the current runtime.
fn start_worker(store: Weak<RedisStore>, conn: ConnectionManager) -> Worker {
    let (settles, settle_queue) = tokio::sync::mpsc::unbounded_channel();
    let (admissions, admit_queue) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(worker(store, conn, admit_queue, settle_queue));
    Worker {
        admissions,
        settles,
    }
}

/// One `EVALSHA` built as its keys turn up: the quota hash is `KEYS[1]`,
/// every other key is sent once and referred to by index.
struct ScriptCall {
    keys: Vec<String>,
    index: HashMap<String, usize>,
    args: Vec<Vec<u8>>,
}

impl ScriptCall {
    fn new(quota_key: String) -> ScriptCall {
        ScriptCall {
            index: HashMap::from([(quota_key.clone(), 1)]),
            keys: vec![quota_key],
            args: Vec::new(),
        }
    }

    fn arg<T: redis::ToRedisArgs>(&mut self, value: T) -> &mut Self {
        self.args.extend(value.to_redis_args());
        self
    }

    /// The key's 1-based index in `KEYS`.
    fn key(&mut self, key: &str) -> usize {
        if let Some(&i) = self.index.get(key) {
            return i;
        }
        self.keys.push(key.to_string());
        self.index.insert(key.to_string(), self.keys.len());
        self.keys.len()
    }

    fn cmd(&self, script: &Script) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(self.keys.len());
        for key in &self.keys {
            cmd.arg(key);
        }
        for arg in &self.args {
            cmd.arg(arg.as_slice());
        }
        cmd
    }
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
        let client = match &config.tls {
            Some(tls) => {
                let read = |key: &str, path: &Option<std::path::PathBuf>| {
                    path.as_ref()
                        .map(|p| {
                            std::fs::read(p).map_err(|e| {
                                format!("limits.store.tls.{key}: cannot read {}: {e}", p.display())
                            })
                        })
                        .transpose()
                };
                let root_cert = read("ca_file", &tls.ca_file)?;
                let client_tls = match (
                    read("cert_file", &tls.cert_file)?,
                    read("key_file", &tls.key_file)?,
                ) {
                    (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                        client_cert,
                        client_key,
                    }),
                    _ => None,
                };
                redis::Client::build_with_tls(
                    url.as_str(),
                    redis::TlsCertificates {
                        client_tls,
                        root_cert,
                    },
                )
            }
            None => redis::Client::open(url.as_str()),
        }
        .map_err(|e| format!("limits.store: {}", redacted(&e.to_string())))?;
        let rt = runtime()?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let _inside = rt.enter();
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            .map_err(|e| format!("limits.store: {}", redacted(&e.to_string())))?;
        let store = Arc::new_cyclic(|weak| RedisStore {
            fallback_worker: start_worker(weak.clone(), conn.clone()),
            worker: Mutex::new(None),
            client,
            manager_config,
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
        self.here(async move {
            task.await.unwrap_or_else(|e| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "the call was lost",
                    e.to_string(),
                )))
            })
        })
        .await
    }

    /// Run one Redis call where this runs (the store's runtime), bounded by
    /// `timeout`; a failure marks the store down.
    async fn here<T>(
        &self,
        work: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.config.timeout, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError(redacted(&e.to_string()))),
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

    /// Check and take at every level (see [`ADMIT`]): queued for the
    /// admitter, which sends what waits as one script call. `identity`: id,
    /// quota; its level is the last of `levels`.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        levels: &[SharedLevel],
        identity: Option<(&str, Option<u64>)>,
        estimate: u64,
    ) -> Result<(Verdict, Option<Lease>), StoreError> {
        let lease_ms = self.config.lease.as_millis().max(1) as u64;
        let mut held = Vec::with_capacity(levels.len());
        let mut shape = Vec::with_capacity(levels.len());
        for (i, level) in levels.iter().enumerate() {
            let mut flags = 0;
            if level.tokens_per_minute > 0 {
                flags |= HOLDS_TOKENS;
            }
            if level.concurrent != 0 {
                flags |= HOLDS_LEASE;
            }
            if identity.is_some() && i + 1 == levels.len() {
                flags |= HOLDS_RESERVATION | HOLDS_LEASE;
            }
            held.push((
                self.key(&level.scope, "b"),
                self.key(&level.scope, "conc"),
                flags,
            ));
            shape.push((
                level.rate,
                level.burst,
                if flags & HOLDS_RESERVATION != 0 && level.concurrent == 0 {
                    -1
                } else {
                    level.concurrent
                },
                level.tokens_per_minute,
                hash_ttl_ms(level, lease_ms),
            ));
        }
        let lease = Lease {
            id: format!(
                "{}:{}|{estimate}",
                self.replica,
                self.next_lease.fetch_add(1, Ordering::Relaxed)
            ),
            levels: held,
            identity: identity.map(|(id, _)| id.to_string()),
            reserved: estimate,
            persist: identity.is_some_and(|(_, q)| q.is_some()),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = AdmitJob {
            lease,
            quota: identity
                .and_then(|(_, q)| q)
                .map_or(-1, |q| q.min(i64::MAX as u64) as i64),
            levels: shape,
            reply,
        };
        if let Err(unsent) = self.worker().admissions.send(job) {
            // the worker's runtime has ended: this one gets the next
            lock(&self.worker).take();
            if self.fallback_worker.admissions.send(unsent.0).is_err() {
                return Err(StoreError("the admitter has stopped".into()));
            }
        }
        // The admitter bounds each call by `timeout`; one batch may be ahead.
        let (verdict, lease) = match tokio::time::timeout(self.config.timeout * 2, answer).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(StoreError("the admission was lost".into())),
            Err(_) => {
                let e = StoreError(format!("no answer within {:?}", self.config.timeout * 2));
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.mark(false, &e.0);
                return Err(e);
            }
        };
        if let (Some((id, _)), Verdict::Ok { quota_used, .. }) = (identity, &verdict) {
            lock(&self.last_used).insert(id.to_string(), *quota_used);
        }
        match verdict {
            Verdict::Ok { .. } => {
                let sets = lease
                    .levels
                    .iter()
                    .filter(|(_, _, f)| f & HOLDS_LEASE != 0)
                    .map(|(_, set, _)| set.clone())
                    .collect();
                lock(&self.held).insert(lease.id.clone(), sets);
                Ok((verdict, Some(lease)))
            }
            Verdict::Refused { .. } => Ok((verdict, None)),
        }
    }

    /// The admission script call for a batch (see [`ADMIT`]).
    fn admit_call(&self, jobs: &[AdmitJob]) -> redis::Cmd {
        let mut call = ScriptCall::new(self.quota_key());
        call.arg(self.config.lease.as_millis().max(1) as u64)
            .arg(jobs.len());
        for job in jobs {
            let lease = &job.lease;
            call.arg(&lease.id)
                .arg(lease.reserved)
                .arg(job.quota)
                .arg(lease.identity.as_deref().unwrap_or(""))
                .arg(lease.levels.len());
            for ((hash, set, flags), (rate, burst, conc, tpm, ttl)) in
                lease.levels.iter().zip(&job.levels)
            {
                let needs_hash = *rate > 0.0 || *tpm > 0 || flags & HOLDS_RESERVATION != 0;
                let h = if needs_hash { call.key(hash) } else { 0 };
                let z = call.key(set);
                call.arg(h)
                    .arg(z)
                    .arg(*rate)
                    .arg(*burst)
                    .arg(*conc)
                    .arg(*tpm)
                    .arg(*ttl);
            }
        }
        call.cmd(&ADMIT_SCRIPT)
    }

    /// The settlement script call for a batch (see [`SETTLE`]), aggregated
    /// per key here.
    fn settle_call(&self, batch: &[(Lease, Option<u64>)]) -> redis::Cmd {
        let mut call = ScriptCall::new(self.quota_key());
        let mut tokens: Vec<(usize, i64)> = Vec::new();
        // set index, the identity's hash index or 0, members and estimates
        let mut sets: Vec<SetRelease<'_>> = Vec::new();
        let mut quota: Vec<(&str, u64)> = Vec::new();
        for (lease, used) in batch {
            let charge = used.unwrap_or(0);
            let give = lease.reserved as i64 - charge.min(i64::MAX as u64) as i64;
            for (hash, set, flags) in &lease.levels {
                if flags & HOLDS_TOKENS != 0 && give != 0 {
                    let k = call.key(hash);
                    match tokens.iter_mut().find(|(i, _)| *i == k) {
                        Some((_, sum)) => *sum = sum.saturating_add(give),
                        None => tokens.push((k, give)),
                    }
                }
                if flags & HOLDS_LEASE != 0 {
                    let z = call.key(set);
                    let h = if flags & HOLDS_RESERVATION != 0 {
                        call.key(hash)
                    } else {
                        0
                    };
                    match sets.iter_mut().find(|(i, _, _)| *i == z) {
                        Some((_, _, members)) => members.push((&lease.id, lease.reserved)),
                        None => sets.push((z, h, vec![(&lease.id, lease.reserved)])),
                    }
                }
            }
            if let (Some(id), Some(used), true) = (&lease.identity, used, lease.persist) {
                if *used > 0 {
                    match quota.iter_mut().find(|(i, _)| i == id) {
                        Some((_, sum)) => *sum = sum.saturating_add(*used),
                        None => quota.push((id, *used)),
                    }
                }
            }
        }
        call.arg(tokens.len());
        for (k, give) in &tokens {
            call.arg(*k).arg(*give);
        }
        call.arg(sets.len());
        for (z, h, members) in &sets {
            call.arg(*z).arg(*h).arg(members.len());
            for (member, estimate) in members {
                call.arg(*member).arg(*estimate);
            }
        }
        call.arg(quota.len());
        for (id, used) in &quota {
            call.arg(*id).arg(*used);
        }
        call.cmd(&SETTLE_SCRIPT)
    }

    /// One round trip: the waiting settlements, then the waiting admissions,
    /// as a pipeline of (at most) two script calls. A script Redis does not
    /// know (a restarted or flushed Redis) is loaded and its call sent again.
    /// Every admission gets its answer; settlements Redis did not take keep
    /// their quota usage for later.
    async fn exchange(
        self: &Arc<Self>,
        conn: &mut ConnectionManager,
        jobs: Vec<AdmitJob>,
        settles: Vec<(Lease, Option<u64>)>,
    ) {
        let mut calls: Vec<(&Script, redis::Cmd)> = Vec::with_capacity(2);
        if !settles.is_empty() {
            calls.push((&SETTLE_SCRIPT, self.settle_call(&settles)));
        }
        if !jobs.is_empty() {
            calls.push((&ADMIT_SCRIPT, self.admit_call(&jobs)));
        }
        let replies = if self.is_up() || !jobs.is_empty() {
            self.here(run_scripts(conn, &calls)).await
        } else {
            Err(StoreError("down".into()))
        };
        let (settled, admitted) = match replies {
            Ok(mut replies) => {
                let admitted = if jobs.is_empty() { None } else { replies.pop() };
                (replies.pop(), admitted)
            }
            Err(e) => (Some(Err(e.clone())), Some(Err(e))),
        };
        if !settles.is_empty() && !matches!(settled, Some(Ok(_))) {
            for (lease, used) in &settles {
                self.defer_settle(lease, *used);
            }
        }
        if jobs.is_empty() {
            return;
        }
        let verdicts: Result<Vec<Vec<redis::Value>>, StoreError> =
            match admitted.unwrap_or_else(|| Err(StoreError("no answer".into()))) {
                Ok(value) => redis::from_redis_value(value)
                    .map_err(|e| StoreError(format!("the admission script answered {e}"))),
                Err(e) => {
                    // the script failed (not the connection): an error all the same
                    if self.is_up() {
                        self.errors.fetch_add(1, Ordering::Relaxed);
                        self.mark(false, &e.0);
                    }
                    Err(e)
                }
            };
        let mut verdicts = match verdicts {
            Ok(replies) if replies.len() == jobs.len() => {
                self.mark(true, "");
                replies.into_iter().map(|r| parse_verdict(&r)).collect()
            }
            Ok(_) => vec![None; jobs.len()],
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
                return;
            }
        }
        .into_iter();
        for job in jobs {
            let answer = match verdicts.next().flatten() {
                Some(verdict) => Ok((verdict, job.lease)),
                None => Err(StoreError(
                    "the admission script answered something else".into(),
                )),
            };
            if let Err(Ok((Verdict::Ok { .. }, lease))) = job.reply.send(answer) {
                // the request gave up waiting: give back what it took
                self.settle(lease, None);
            }
        }
    }

    /// Settle a lease in the background: charge `used` (`None`: refund),
    /// free its slots. Settlements waiting are sent as one script call. If
    /// Redis does not answer, the quota usage waits in `pending` for the
    /// probe to add it; the slots expire with the lease.
    pub(crate) fn settle(self: &Arc<Self>, lease: Lease, used: Option<u64>) {
        lock(&self.held).remove(&lease.id);
        if let Err(unsent) = self.worker().settles.send((lease, used)) {
            lock(&self.worker).take();
            if let Err(unsent) = self.fallback_worker.settles.send(unsent.0) {
                let (lease, used) = unsent.0;
                self.defer_settle(&lease, used);
            }
        }
    }

    /// The worker, started on the current runtime on first use; the store's
    /// own outside a runtime.
    fn worker(self: &Arc<Self>) -> Worker {
        let mut slot = lock(&self.worker);
        if let Some(worker) = slot.as_ref() {
            return worker.clone();
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return self.fallback_worker.clone();
        }
        let worker = slot.get_or_insert_with(|| {
            match ConnectionManager::new_lazy_with_config(
                self.client.clone(),
                self.manager_config.clone(),
            ) {
                Ok(conn) => start_worker(Arc::downgrade(self), conn),
                Err(_) => self.fallback_worker.clone(),
            }
        });
        worker.clone()
    }

    /// Keep the quota usage of a settlement Redis did not take.
    fn defer_settle(&self, lease: &Lease, used: Option<u64>) {
        if let (Some(id), Some(used), true) = (&lease.identity, used, lease.persist) {
            self.defer(id, used);
        }
    }

    /// One login attempt for `scope` (see [`LOGIN`]): `Some(wait)` when the
    /// address has used its `per_minute` attempts.
    pub(crate) async fn login_attempt(
        &self,
        scope: &str,
        per_minute: u32,
    ) -> Result<Option<Duration>, StoreError> {
        let mut invocation = LOGIN_SCRIPT.prepare_invoke();
        invocation
            .key(self.key(&format!("login:{scope}"), "b"))
            .arg(per_minute.max(1));
        let mut conn = self.conn.clone();
        let cmd = invocation;
        let wait: u64 = self
            .call(async move { cmd.invoke_async(&mut conn).await })
            .await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait)))
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

/// How long a level's hash outlives its last use: an hour, or longer when
/// its buckets take longer to refill or a lease outlasts it.
fn hash_ttl_ms(level: &SharedLevel, lease_ms: u64) -> u64 {
    let refill = if level.rate > 0.0 {
        (level.burst / level.rate * 1000.0)
            .ceil()
            .min(u64::MAX as f64) as u64
    } else {
        0
    };
    3_600_000u64
        .max(refill.saturating_mul(2))
        .max(lease_ms.saturating_mul(2))
}

/// Sends what waits — settlements first, then admissions — in one round trip
/// per batch (what arrives while a call is out goes in the next), until the
/// store is gone. Nothing waits on purpose: a settlement does not wait for
/// an admission to go with (that admission would wait for its script).
async fn worker(
    store: Weak<RedisStore>,
    mut conn: ConnectionManager,
    mut admissions: tokio::sync::mpsc::UnboundedReceiver<AdmitJob>,
    mut settles: tokio::sync::mpsc::UnboundedReceiver<(Lease, Option<u64>)>,
) {
    let mut jobs = Vec::with_capacity(BATCH);
    let mut done = Vec::with_capacity(BATCH);
    loop {
        let open = tokio::select! {
            n = admissions.recv_many(&mut jobs, BATCH) => n > 0,
            n = settles.recv_many(&mut done, BATCH) => n > 0,
        };
        if !open {
            return;
        }
        while jobs.len() < BATCH {
            match admissions.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        while done.len() < BATCH {
            match settles.try_recv() {
                Ok(s) => done.push(s),
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else { return };
        store
            .exchange(
                &mut conn,
                std::mem::take(&mut jobs),
                std::mem::take(&mut done),
            )
            .await;
    }
}

/// Send script calls as one pipeline; a call whose script Redis does not
/// know is sent again after loading it. Returns each call's answer.
async fn run_scripts(
    conn: &mut ConnectionManager,
    calls: &[(&Script, redis::Cmd)],
) -> redis::RedisResult<Vec<Result<redis::Value, StoreError>>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (_, cmd) in calls {
        pipe.add_command(cmd.clone());
    }
    let replies: Vec<redis::RedisResult<redis::Value>> = pipe.query_async(conn).await?;
    let mut out = Vec::with_capacity(calls.len());
    for ((script, cmd), reply) in calls.iter().zip(replies) {
        let reply = match reply {
            Err(e) if is_noscript(&e) => {
                script.load_async(conn).await?;
                cmd.query_async::<redis::Value>(conn).await
            }
            other => other,
        };
        out.push(reply.map_err(|e| StoreError(redacted(&e.to_string()))));
    }
    Ok(out)
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
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

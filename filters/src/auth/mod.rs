//! `auth`: who is calling. API keys from a JSON file, users from a YAML file
//! who log in at `POST /user/user_login` for a JWT, the admin role for
//! `/admin/*`, and reloading both files without a restart.
//!
//! ```yaml
//! filters:
//!   - auth:
//!       api_keys_file: conf/api_keys.json     # optional
//!       users_file: conf/users.yaml           # optional; required when jwt is set
//!       jwt:                                  # optional
//!         algorithm: HS256                    # HS256|HS384|HS512|RS256|RS384|ES256|ES384
//!         secret_file: /etc/infergate/jwt.secret   # HS*: secret_file or secret_env
//!         public_key_file: /etc/infergate/jwt.pub  # RS*/ES*: verification key (PEM)
//!         private_key_file: /etc/infergate/jwt.key # RS*/ES*: signing key (optional)
//!         issuer: infergate                   # optional; checked and set when given
//!         audience: my-clients                # optional; checked and set when given
//!         leeway_seconds: 30
//!         token_ttl_seconds: 86400
//!       login_attempts_per_minute: 10         # per client address
//!       watch: true                           # reload when the files change
//! ```
//!
//! A credential is read from, in this order: `Authorization: Bearer <x>`,
//! `Authorization: <x>`, `x-api-key: <x>`, `?token=<x>`. A `token` query
//! parameter is always removed before the request goes upstream.

mod credential;
mod jwt;
mod keys;
mod login_rate;
mod users;
mod watch;

pub use keys::new_api_key;
pub use users::{add_user, hash_password, UserSummary};

use crate::{
    Access, Filter, FilterState, Flow, Identity, LimitSpec, Priority, Rejection, Request, Role,
    Share, MAX_SHARE_WEIGHT,
};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// The `auth` filter's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// JSON file of API keys (`{"keys": [{"key": ..., "user": ...}]}`).
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// YAML file of users who log in for a JWT; required when `jwt` is set.
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// Token signing and verification; without it users cannot log in.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Login attempts allowed per client address per minute (≥ 1).
    #[serde(default = "default_login_attempts")]
    pub login_attempts_per_minute: u32,
    /// Reload the files when they change (polled once a second; atomic
    /// renames and Kubernetes ConfigMap symlink swaps are seen).
    #[serde(default = "default_true")]
    pub watch: bool,
}

/// How tokens are signed and checked. The algorithm is pinned: a token
/// signed any other way (including `alg: none`) is refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The one accepted algorithm.
    #[serde(default)]
    pub algorithm: JwtAlgorithm,
    /// HS*: file holding the secret (≥ 32 bytes; surrounding whitespace is trimmed).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// HS*: environment variable holding the secret (≥ 32 bytes).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// RS*/ES*: PEM public key that verifies tokens.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// RS*/ES*: PEM private key that signs tokens at login; without it this
    /// gateway only verifies tokens issued elsewhere and login is disabled.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `iss`, and issued tokens carry it.
    #[serde(default)]
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`, and issued tokens carry it.
    /// When unset, `aud` is neither required nor checked.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// Lifetime of tokens issued at login, in seconds.
    #[serde(default = "default_ttl")]
    pub token_ttl_seconds: u64,
}

/// JWT signature algorithms infergate accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 (shared secret).
    #[default]
    HS256,
    /// HMAC with SHA-384 (shared secret).
    HS384,
    /// HMAC with SHA-512 (shared secret).
    HS512,
    /// RSA PKCS#1 v1.5 with SHA-256 (key pair).
    RS256,
    /// RSA PKCS#1 v1.5 with SHA-384 (key pair).
    RS384,
    /// ECDSA P-256 with SHA-256 (key pair).
    ES256,
    /// ECDSA P-384 with SHA-384 (key pair).
    ES384,
}

impl JwtAlgorithm {
    /// Whether the algorithm uses a shared secret (HS*) rather than a key pair.
    pub fn is_hmac(self) -> bool {
        matches!(
            self,
            JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512
        )
    }
}

fn default_login_attempts() -> u32 {
    10
}
fn default_true() -> bool {
    true
}
fn default_leeway() -> u64 {
    30
}
fn default_ttl() -> u64 {
    86_400
}

impl AuthConfig {
    /// Check what serde cannot; `Err((key path, message))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if self.api_keys_file.is_none() && self.users_file.is_none() {
            return err(
                "api_keys_file",
                "no credential source: set `api_keys_file`, or `users_file` with `jwt`",
            );
        }
        if self.jwt.is_some() && self.users_file.is_none() {
            return err(
                "users_file",
                "`jwt` needs `users_file` (tokens are checked against the current users)",
            );
        }
        if self.users_file.is_some() && self.jwt.is_none() {
            return err(
                "jwt",
                "`users_file` needs `jwt`: users authenticate with tokens from POST /user/user_login",
            );
        }
        if self.login_attempts_per_minute == 0 {
            return err("login_attempts_per_minute", "must be at least 1");
        }
        if let Some(jwt) = &self.jwt {
            jwt.validate().map_err(|(k, m)| (format!("jwt.{k}"), m))?;
        }
        Ok(())
    }
}

impl JwtConfig {
    /// Check what serde cannot; `Err((key path below jwt, message))`.
    /// The secret's length is checked when it is loaded.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        let alg = self.algorithm;
        if alg.is_hmac() {
            match (&self.secret_file, &self.secret_env) {
                (None, None) => {
                    return err(
                        "secret_file",
                        format!("{alg:?} needs a secret: set `secret_file` or `secret_env`"),
                    )
                }
                (Some(_), Some(_)) => {
                    return err(
                        "secret_env",
                        "set only one of `secret_file` and `secret_env`".to_string(),
                    )
                }
                _ => {}
            }
            if let Some(env) = &self.secret_env {
                if env.is_empty() {
                    return err("secret_env", "empty variable name".to_string());
                }
            }
            if self.public_key_file.is_some() || self.private_key_file.is_some() {
                return err(
                    "public_key_file",
                    format!("{alg:?} uses a shared secret; key files are for RS*/ES* algorithms"),
                );
            }
        } else {
            if self.public_key_file.is_none() {
                return err(
                    "public_key_file",
                    format!("{alg:?} needs `public_key_file` (PEM) to verify tokens"),
                );
            }
            if self.secret_file.is_some() || self.secret_env.is_some() {
                return err(
                    "secret_file",
                    format!("{alg:?} uses a key pair; `secret_file`/`secret_env` are for HS* algorithms"),
                );
            }
        }
        if self.token_ttl_seconds == 0 {
            return err("token_ttl_seconds", "must be at least 1".to_string());
        }
        if self.issuer.as_deref() == Some("") {
            return err(
                "issuer",
                "empty; remove the key or give a value".to_string(),
            );
        }
        if self.audience.as_deref() == Some("") {
            return err(
                "audience",
                "empty; remove the key or give a value".to_string(),
            );
        }
        Ok(())
    }
}

/// Reject limits the limiter cannot use (`what` names the entry).
/// A key's or user's queue share from its `priority` and `weight`.
pub(crate) fn share(priority: Option<Priority>, weight: Option<u32>) -> Result<Share, String> {
    let weight = weight.unwrap_or(1);
    if !(1..=MAX_SHARE_WEIGHT).contains(&weight) {
        return Err(format!("`weight` must be between 1 and {MAX_SHARE_WEIGHT}"));
    }
    Ok(Share {
        priority: priority.map_or(Priority::NORMAL, |p| p.0),
        weight,
    })
}

pub(crate) fn check_limits(limits: &LimitSpec) -> Result<(), String> {
    if let Some(rps) = limits.requests_per_second {
        if !rps.is_finite() || rps <= 0.0 {
            return Err("limits.requests_per_second must be a positive number".into());
        }
    }
    if limits.burst == Some(0) {
        return Err("limits.burst must be at least 1".into());
    }
    if limits.concurrent == Some(0) {
        return Err("limits.concurrent must be at least 1 (use `enabled: false` to block)".into());
    }
    if limits.tokens_per_minute == Some(0) {
        return Err(
            "limits.tokens_per_minute must be at least 1 (use `enabled: false` to block)".into(),
        );
    }
    Ok(())
}

/// Serde messages quote offending values (`invalid type: string "…"`);
/// those could be keys or hashes, so they are blanked out.
pub(crate) fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

/// The files as last loaded; replaced whole on reload.
pub(crate) struct Snapshot {
    pub keys: keys::KeyTable,
    pub users: users::UserTable,
    /// SHA-256 of each file's content as loaded (`None`: not configured).
    pub keys_hash: Option<[u8; 32]>,
    pub users_hash: Option<[u8; 32]>,
}

/// What a successful login returns (the seed's `data` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoginGrant {
    /// The JWT; send it as `Authorization: Bearer <token>` or `?token=`.
    pub token: String,
    /// The user's current version; raising it revokes this token.
    pub version: u64,
    /// The user's `user_id` from the users file.
    pub user_id: u64,
}

/// Key and user files read and checked by [`Auth::stage_reload`], not in
/// use yet.
pub struct StagedFiles {
    /// What was in use when they were read.
    base: Arc<Snapshot>,
    next: Snapshot,
}

impl StagedFiles {
    /// The identities the staged files define (as [`Auth::identities`]).
    pub fn identities(&self) -> Vec<Arc<Identity>> {
        let mut all = self.next.keys.identities();
        all.extend(self.next.users.identities());
        all
    }
}

impl std::fmt::Debug for StagedFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedFiles")
            .field("keys", &self.next.keys.len())
            .field("users", &self.next.users.len())
            .finish_non_exhaustive()
    }
}

/// What a reload loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Entries in the API key file (disabled ones included).
    pub keys: usize,
    /// Entries in the users file (disabled ones included).
    pub users: usize,
    /// Things worth fixing that did not stop the load (never contain secrets).
    pub warnings: Vec<String>,
}

/// API keys, users and token keys; shared by the filter, the login endpoint,
/// the admin endpoints and the file watcher.
pub struct Auth {
    config: AuthConfig,
    jwt: Option<jwt::JwtKeys>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// One reload at a time (watcher and admin endpoint).
    reload_lock: Mutex<()>,
    login_limiter: login_rate::LoginLimiter,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("config", &self.config)
            .field("keys", &self.key_count())
            .field("users", &self.user_count())
            .finish_non_exhaustive()
    }
}

fn unauthorized(message: &str) -> Rejection {
    Rejection::new(401, "invalid_request_error", "invalid_api_key", message)
}

const MISSING: &str = "You didn't provide an API key. Send `Authorization: Bearer <key>` \
                       (or log in at POST /user/user_login for a token).";
const WRONG_KEY: &str = "Incorrect API key provided.";

impl Auth {
    /// Validate `config`, load its files and token keys. `Err` names the file
    /// and the problem; the warnings are for the log.
    pub fn new(config: AuthConfig) -> Result<(Auth, Vec<String>), String> {
        config
            .validate()
            .map_err(|(k, m)| format!("auth.{k}: {m}"))?;
        let jwt = match &config.jwt {
            Some(j) => Some(jwt::JwtKeys::load(j)?),
            None => None,
        };
        let (snapshot, warnings) = load_snapshot(&config, jwt.is_some())?;
        let login_limiter = login_rate::LoginLimiter::new(config.login_attempts_per_minute);
        Ok((
            Auth {
                config,
                jwt,
                snapshot: RwLock::new(Arc::new(snapshot)),
                reload_lock: Mutex::new(()),
                login_limiter,
            },
            warnings,
        ))
    }

    /// The configuration this was built from.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn replace_snapshot(&self, next: Snapshot) {
        let next = Arc::new(next);
        match self.snapshot.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// Establish identity for `req` according to `req.access()`.
    ///
    /// Always removes a `token` query parameter (the other parameters are kept
    /// in order), whatever the access. `Public` and `Login`: `Ok(None)`, any
    /// credential ignored. `Api`: the caller's identity or 401. `Admin`: an
    /// identity with the admin role, else 401 (no or bad credential) or 403.
    pub fn authenticate(&self, req: &mut dyn Request) -> Result<Option<Arc<Identity>>, Rejection> {
        let found = credential::take(req);
        match req.access() {
            Access::Public | Access::Login => return Ok(None),
            Access::Api | Access::Admin => {}
        }
        let identity = match found {
            credential::Found::Nothing => return Err(unauthorized(MISSING)),
            credential::Found::UnsupportedScheme(scheme) => {
                let message = format!(
                    "Unsupported Authorization scheme `{scheme}`. \
                     Send `Authorization: Bearer <key>`."
                );
                return Err(unauthorized(&message));
            }
            credential::Found::Credential(cred) => self.verify(&cred)?,
        };
        if req.access() == Access::Admin && identity.role != Role::Admin {
            return Err(Rejection::new(
                403,
                "invalid_request_error",
                "permission_denied",
                "This endpoint requires the admin role; use a key or user with `role: admin`.",
            ));
        }
        Ok(Some(identity))
    }

    /// The identity behind a credential (API key or JWT), or a 401.
    fn verify(&self, credential: &str) -> Result<Arc<Identity>, Rejection> {
        let snapshot = self.snapshot();
        match &self.jwt {
            Some(jwt) if credential::looks_like_jwt(credential) => {
                let claims = jwt
                    .verify(credential)
                    .map_err(|e| unauthorized(e.message()))?;
                snapshot
                    .users
                    .current(claims.user_id, claims.version)
                    .ok_or_else(|| unauthorized(jwt::JwtError::Revoked.message()))
            }
            _ => snapshot
                .keys
                .lookup(credential)
                .ok_or_else(|| unauthorized(WRONG_KEY)),
        }
    }

    /// Check an email and password and issue a token. Blocking (argon2 takes
    /// tens of milliseconds): call it from a blocking thread.
    ///
    /// An unknown email, a wrong password and a disabled user all give the
    /// same 401 after comparable work. Without `jwt` (or, for RS*/ES*, without
    /// `private_key_file`) login is not configured: 404.
    pub fn login(&self, email: &str, password: &str) -> Result<LoginGrant, Rejection> {
        let Some(jwt) = self.jwt.as_ref().filter(|j| j.can_sign()) else {
            return Err(Rejection::new(
                404,
                "invalid_request_error",
                "login_not_configured",
                "Login is not configured on this gateway (set `jwt` with a signing key in the auth filter); use an API key.",
            ));
        };
        let refused = || {
            Rejection::new(
                401,
                "invalid_request_error",
                "invalid_credentials",
                "Incorrect email or password.",
            )
        };
        let snapshot = self.snapshot();
        let user = snapshot.users.by_email(email);
        let hash = user
            .map(|u| u.password_hash.as_str())
            .unwrap_or(users::DUMMY_HASH);
        let password_ok = users::verify_password(password, hash);
        let user = match user {
            Some(u) if password_ok && u.enabled => u,
            _ => return Err(refused()),
        };
        let token = jwt
            .issue(user)
            .map_err(|e| Rejection::new(500, "server_error", "token_signing_failed", e))?;
        Ok(LoginGrant {
            token,
            version: user.version,
            user_id: user.user_id,
        })
    }

    /// Take one login attempt for `ip` (IPv6 addresses count per /64).
    /// Over `login_attempts_per_minute`: 429 with `retry_after`.
    pub fn check_login_rate(&self, ip: Option<IpAddr>) -> Result<(), Rejection> {
        self.login_limiter.try_take(ip).map_err(login_refused)
    }

    /// What login attempts from `ip` are counted under, as a string (the
    /// address; IPv6 per /64), for a limit shared across replicas.
    pub fn login_scope(ip: Option<IpAddr>) -> String {
        login_rate::client_key(ip).map_or_else(|| "unknown".to_string(), |ip| ip.to_string())
    }

    /// `login_attempts_per_minute`.
    pub fn login_attempts_per_minute(&self) -> u32 {
        self.config.login_attempts_per_minute
    }
}

/// 429 for a login attempt over `login_attempts_per_minute`; retry after `wait`.
pub fn login_refused(wait: std::time::Duration) -> Rejection {
    // the bucket's float arithmetic may say 6.000000001 s for 6 s
    let secs = (wait.as_secs_f64() - 0.001)
        .ceil()
        .clamp(1.0, f64::from(u32::MAX));
    let secs = secs as u32;
    let mut r = Rejection::new(
        429,
        "requests",
        "rate_limit_exceeded",
        format!("Too many login attempts from your address; retry in {secs} s."),
    );
    r.retry_after = Some(secs);
    r.limit = Some("login");
    r
}

impl Auth {
    /// Reload both files. On any error nothing changes and `Err` names the
    /// file and the problem.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let _one_at_a_time = self
            .reload_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (staged, report) = self.stage_reload()?;
        self.replace_snapshot(staged.next);
        Ok(report)
    }

    /// Read and check both files for a config reload without using them yet:
    /// the rest of the new config may still fail. [`Auth::apply_staged`]
    /// puts them in use.
    pub fn stage_reload(&self) -> Result<(StagedFiles, ReloadReport), String> {
        let base = self.snapshot();
        let (next, warnings) = load_snapshot(&self.config, self.jwt.is_some())?;
        let report = ReloadReport {
            keys: next.keys.len(),
            users: next.users.len(),
            warnings,
        };
        Ok((StagedFiles { base, next }, report))
    }

    /// Put staged files in use, unless the files were reloaded since they
    /// were staged (the watcher got there first, with content at least as
    /// new): then the staged copy is dropped.
    pub fn apply_staged(&self, staged: StagedFiles) {
        let _one_at_a_time = self
            .reload_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if Arc::ptr_eq(&self.snapshot(), &staged.base) {
            self.replace_snapshot(staged.next);
        }
    }

    /// Watch the files (when `watch: true`; otherwise this does nothing) and
    /// reload when their content changes, calling `on_result` with each
    /// reload's outcome. A background thread polls once a second, following
    /// symlinks, so atomic renames and ConfigMap `..data` swaps are seen; a
    /// change is reloaded once it has been stable for 200 ms. The thread ends
    /// when the last `Arc<Auth>` is dropped.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        on_result: Box<dyn Fn(Result<ReloadReport, String>) + Send + Sync>,
    ) -> Result<(), String> {
        if !self.config.watch {
            return Ok(());
        }
        watch::spawn(self, watch::Timing::default(), on_result)
    }

    /// Entries in the API key file (disabled ones included).
    pub fn key_count(&self) -> usize {
        self.snapshot().keys.len()
    }

    /// Entries in the users file (disabled ones included).
    pub fn user_count(&self) -> usize {
        self.snapshot().users.len()
    }

    /// Every enabled identity currently loaded (keys, then users), for admin
    /// listings and quota cross-checks. Never includes secrets.
    pub fn identities(&self) -> Vec<Arc<Identity>> {
        let snapshot = self.snapshot();
        let mut all = snapshot.keys.identities();
        all.extend(snapshot.users.identities());
        all
    }
}

/// Load every configured file; `jwt` says whether tokens are in use.
fn load_snapshot(config: &AuthConfig, jwt: bool) -> Result<(Snapshot, Vec<String>), String> {
    let mut warnings = Vec::new();
    let (keys, keys_hash) = match &config.api_keys_file {
        Some(path) => {
            let bytes = read_file(path, "api_keys_file")?;
            let loaded = keys::KeyTable::parse(&bytes, path, jwt)?;
            warnings.extend(loaded.1);
            (loaded.0, Some(sha256(&bytes)))
        }
        None => (keys::KeyTable::default(), None),
    };
    let (users, users_hash) = match &config.users_file {
        Some(path) => {
            let bytes = read_file(path, "users_file")?;
            (users::UserTable::parse(&bytes, path)?, Some(sha256(&bytes)))
        }
        None => (users::UserTable::default(), None),
    };
    Ok((
        Snapshot {
            keys,
            users,
            keys_hash,
            users_hash,
        },
        warnings,
    ))
}

fn read_file(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: cannot read: {e}", path.display()))
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// The `auth` filter: establishes `state.identity` before the body is read.
pub struct AuthFilter(pub Arc<Auth>);

impl Filter for AuthFilter {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn on_request(
        &self,
        req: &mut dyn Request,
        state: &mut FilterState,
    ) -> Result<Flow, Rejection> {
        state.identity = self.0.authenticate(req)?;
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests;

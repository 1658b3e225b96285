//! The `limits` filter's config: YAML shape and the checks serde cannot do.

use crate::LimitSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The `limits` filter's config. Every field is optional.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Limits on the whole gateway, all callers together.
    pub global: LimitSpec,
    /// Default limits of every identity (key or user); an identity's own
    /// `limits` override these field by field.
    pub per_key: LimitSpec,
    /// Limits per model, keyed by the name the client sends (alias or served
    /// name); a model not listed has no model-level limit.
    pub models: BTreeMap<String, LimitSpec>,
    /// Output tokens reserved when a request gives neither `max_tokens` nor
    /// `max_completion_tokens`. Default 1024.
    pub default_max_tokens: u64,
    /// Directory of the quota store (`quota.sqlite3`), created if missing.
    /// Needed for quotas to survive a restart: without it quotas are counted
    /// in memory only and a warning says so.
    pub data_dir: Option<PathBuf>,
    /// Where the counters live: this process (`memory`, the default) or a
    /// Redis shared by every replica (`redis`).
    pub store: StoreConfig,
}

/// `limits.store`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `redis://host:port/db`, or `rediss://` for TLS. No password here:
    /// it comes from `password_file` / `password_env`, or the whole URL from
    /// `url_file` / `url_env`.
    pub url: Option<String>,
    /// A file holding the whole URL (a mounted secret); read at start and reload.
    pub url_file: Option<PathBuf>,
    /// An environment variable holding the whole URL.
    pub url_env: Option<String>,
    /// A file holding the password, put into `url`.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password, put into `url`.
    pub password_env: Option<String>,
    /// Prefix of every key, so several gateways (or environments) can share
    /// one Redis. Default `infergate:`.
    pub key_prefix: String,
    /// A Redis call that takes longer has failed (and `on_error` applies).
    /// Default 100ms.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Concurrency slots and quota reservations are leases of this length,
    /// renewed every third of it while the request runs: a replica that dies
    /// frees its slots within it. Default 30s.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// What admission does when Redis is slow or down. Required with `redis`
    /// (no default: the trade-off is the operator's to make).
    pub on_error: Option<OnStoreError>,
    /// With `fail_open`, each limit is divided by this while Redis is down
    /// (each replica enforces its share). Default 1: every replica enforces
    /// the full limit.
    pub replicas: u32,
    /// With `rediss://`: the CA that signed Redis' certificate (default: the
    /// system's roots) and a client certificate for mutual TLS.
    pub tls: Option<StoreTls>,
}

/// `limits.store.tls`: PEM files, read when the store opens.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTls {
    /// The CA certificate(s) to verify Redis' certificate against, instead
    /// of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (with `key_file`) for Redis' `tls-auth-clients`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            url: None,
            url_file: None,
            url_env: None,
            password_file: None,
            password_env: None,
            key_prefix: "infergate:".to_string(),
            timeout: Duration::from_millis(100),
            lease: Duration::from_secs(30),
            on_error: None,
            replicas: 1,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Admit on this replica's own counters (limits / `replicas`); usage
    /// counted meanwhile goes to Redis when it is back.
    FailOpen,
    /// Refuse with 503 until Redis answers again.
    FailClosed,
}

impl StoreConfig {
    /// The URL to connect to, with the password from its file or variable.
    /// `Err` names the key to fix (and never contains the password).
    pub fn resolved_url(&self) -> Result<String, String> {
        let read_env = |key: &str, var: &str| {
            std::env::var(var).map_err(|_| {
                format!("limits.store.{key}: the environment variable {var} is not set")
            })
        };
        let read_file = |key: &str, path: &PathBuf| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("limits.store.{key}: cannot read {}: {e}", path.display()))
        };
        let url = match (&self.url, &self.url_file, &self.url_env) {
            (Some(url), None, None) => url.clone(),
            (None, Some(path), None) => read_file("url_file", path)?,
            (None, None, Some(var)) => read_env("url_env", var)?,
            (None, None, None) => {
                return Err("limits.store.url: Redis needs an address, e.g. url: \"redis://127.0.0.1:6379/0\" (or url_file / url_env)".to_string())
            }
            _ => return Err("limits.store: give one of url, url_file, url_env".to_string()),
        };
        check_scheme(&url).map_err(|msg| format!("limits.store.url: {msg}"))?;
        let password = match (&self.password_file, &self.password_env) {
            (Some(path), None) => Some(read_file("password_file", path)?),
            (None, Some(var)) => Some(read_env("password_env", var)?),
            (None, None) => None,
            _ => {
                return Err("limits.store: give password_file or password_env, not both".to_string())
            }
        };
        match password {
            None => Ok(url),
            Some(password) => {
                let (scheme, rest) = url.split_once("://").unwrap_or(("redis", &url));
                if rest.split('/').next().is_some_and(|a| a.contains('@')) {
                    return Err("limits.store: the URL already has credentials; drop password_file/password_env or the user:password@ part".to_string());
                }
                let encoded: String = percent_encoding::utf8_percent_encode(
                    &password,
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .collect();
                Ok(format!("{scheme}://:{encoded}@{rest}"))
            }
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.kind == StoreKind::Memory {
            return Ok(());
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err((
                    "store.tls".to_string(),
                    "give cert_file and key_file together (a client certificate and its key)"
                        .to_string(),
                ));
            }
            if self
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("redis://"))
            {
                return Err((
                    "store.tls".to_string(),
                    "is set but the url is redis:// (plain TCP); use rediss:// for TLS".to_string(),
                ));
            }
        }
        if self.on_error.is_none() {
            return Err((
                "store.on_error".to_string(),
                "is required with kind: redis: fail_open (admit on this replica's own counters while Redis is down) or fail_closed (refuse with 503)".to_string(),
            ));
        }
        if let Some(url) = &self.url {
            let authority = url
                .split_once("://")
                .map_or("", |(_, r)| r)
                .split('/')
                .next()
                .unwrap_or("");
            if authority.contains('@') {
                return Err((
                    "store.url".to_string(),
                    "holds credentials; keep secrets out of the YAML: put the password in password_file or password_env (or the whole URL in url_file / url_env)".to_string(),
                ));
            }
            check_scheme(url).map_err(|msg| ("store.url".to_string(), msg))?;
        }
        let sources = [
            self.url.is_some(),
            self.url_file.is_some(),
            self.url_env.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => return Err(("store.url".to_string(), "Redis needs an address, e.g. url: \"redis://127.0.0.1:6379/0\" (or url_file / url_env)".to_string())),
            1 => {}
            _ => return Err(("store".to_string(), "give one of url, url_file, url_env".to_string())),
        }
        if self.timeout.is_zero() {
            return Err((
                "store.timeout".to_string(),
                "must be above 0, e.g. 100ms".to_string(),
            ));
        }
        if self.lease < Duration::from_secs(1) {
            return Err((
                "store.lease".to_string(),
                "must be at least 1s (leases are renewed every third of it)".to_string(),
            ));
        }
        if self.replicas == 0 {
            return Err((
                "store.replicas".to_string(),
                "must be at least 1".to_string(),
            ));
        }
        if self.key_prefix.is_empty() {
            return Err((
                "store.key_prefix".to_string(),
                "is empty; keep the default infergate: or give another".to_string(),
            ));
        }
        Ok(())
    }
}

/// `redis://` only: this build has no TLS client for Redis.
fn check_scheme(url: &str) -> Result<(), String> {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        Ok(())
    } else {
        Err(
            "must start with redis:// (or rediss:// for TLS), e.g. redis://127.0.0.1:6379/0"
                .to_string(),
        )
    }
}

/// `"100ms"`, `"30s"`, `"1m"` (humantime).
mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({e}); write e.g. 100ms or 30s"
            ))
        })
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            global: LimitSpec::default(),
            per_key: LimitSpec::default(),
            models: BTreeMap::new(),
            default_max_tokens: 1024,
            data_dir: None,
            store: StoreConfig::default(),
        }
    }
}

impl LimitsConfig {
    /// Check values serde cannot: `Err((key path, message))`, e.g.
    /// `("per_key.requests_per_second", "must be a number above 0 ...")`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let specs = [
            ("global".to_string(), &self.global),
            ("per_key".to_string(), &self.per_key),
        ];
        let models = self.models.iter().map(|(m, s)| (format!("models.{m}"), s));
        for (path, spec) in specs.into_iter().chain(models) {
            validate_spec(spec).map_err(|(field, msg)| (format!("{path}.{field}"), msg))?;
            if path != "per_key" && spec.burst.is_some() && spec.requests_per_second.is_none() {
                return Err((
                    format!("{path}.burst"),
                    "burst only sizes a requests_per_second limit; set requests_per_second too, or remove burst".to_string(),
                ));
            }
        }
        if self.models.keys().any(String::is_empty) {
            return Err(("models".to_string(), "a model name is empty".to_string()));
        }
        if self.default_max_tokens < 1 {
            return Err((
                "default_max_tokens".to_string(),
                "must be at least 1 (output tokens reserved when a request sets no max_tokens)"
                    .to_string(),
            ));
        }
        if self
            .data_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err((
                "data_dir".to_string(),
                "is empty; give a directory for the quota store or remove the key".to_string(),
            ));
        }
        self.store.validate()
    }
}

/// Check one [`LimitSpec`] (also for identities' own limits in keys/users
/// files): `Err((field, message))`. At run time an invalid identity field is
/// ignored and `per_key`'s value applies.
pub fn validate_spec(spec: &LimitSpec) -> Result<(), (&'static str, String)> {
    if let Some(rps) = spec.requests_per_second {
        if !(rps.is_finite() && rps > 0.0) {
            return Err((
                "requests_per_second",
                format!("is {rps}; it must be a number above 0 (e.g. 0.5 or 10); remove it for no limit"),
            ));
        }
    }
    let at_least_one = |field: &'static str, value: Option<u64>| match value {
        Some(0) => Err((
            field,
            "is 0; it must be at least 1; remove it for no limit".to_string(),
        )),
        _ => Ok(()),
    };
    at_least_one("burst", spec.burst.map(u64::from))?;
    at_least_one("concurrent", spec.concurrent.map(u64::from))?;
    at_least_one("tokens_per_minute", spec.tokens_per_minute)
}

/// An identity's effective limits: its own fields, `per_key`'s where unset
/// (or invalid).
pub(crate) fn effective_spec(per_key: &LimitSpec, own: &LimitSpec) -> LimitSpec {
    LimitSpec {
        requests_per_second: own
            .requests_per_second
            .filter(|r| r.is_finite() && *r > 0.0)
            .or(per_key.requests_per_second),
        burst: own.burst.filter(|b| *b >= 1).or(per_key.burst),
        concurrent: own.concurrent.filter(|c| *c >= 1).or(per_key.concurrent),
        tokens_per_minute: own
            .tokens_per_minute
            .filter(|t| *t >= 1)
            .or(per_key.tokens_per_minute),
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    fn redis(url: &str) -> StoreConfig {
        StoreConfig {
            kind: StoreKind::Redis,
            url: Some(url.to_string()),
            on_error: Some(OnStoreError::FailOpen),
            ..StoreConfig::default()
        }
    }

    #[test]
    fn the_password_comes_from_a_file_percent_encoded_and_never_from_the_yaml() {
        let dir = std::env::temp_dir().join(format!("ig-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "p@ss/word\n").unwrap();
        let mut c = redis("redis://10.0.0.5:6379/2");
        c.password_file = Some(file);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.resolved_url().unwrap(),
            "redis://:p%40ss%2Fword@10.0.0.5:6379/2"
        );
        let (key, msg) = redis("redis://u:pw@h:6379").validate().unwrap_err();
        assert_eq!(key, "store.url");
        assert!(!msg.contains("pw@"), "{msg}");
        assert!(redis("rediss://h:6379").validate().is_ok());
        assert!(redis("http://h:6379").validate().is_err());
        let mut missing = redis("redis://h");
        missing.on_error = None;
        assert_eq!(missing.validate().unwrap_err().0, "store.on_error");
        let mut short = redis("redis://h");
        short.lease = Duration::from_millis(200);
        assert_eq!(short.validate().unwrap_err().0, "store.lease");
        assert_eq!(
            StoreConfig::default().validate(),
            Ok(()),
            "memory needs nothing"
        );
    }

    #[test]
    fn durations_read_like_the_rest_of_the_config() {
        let c: StoreConfig = serde_yaml::from_str(
            "{kind: redis, url: \"redis://h\", on_error: fail_closed, timeout: 50ms, lease: 1m}",
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(50));
        assert_eq!(c.lease, Duration::from_secs(60));
        assert_eq!(c.on_error, Some(OnStoreError::FailClosed));
        let err = serde_yaml::from_str::<StoreConfig>("{timeout: soon}").unwrap_err();
        assert!(err.to_string().contains("not a duration"), "{err}");
    }
}

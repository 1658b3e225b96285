//! Shared by the auth targets: a plain-fields `Request`, and `Auth`
//! instances over files in a private temporary directory.
//!
//! The auth module reads its key and users files from paths only, so the
//! file targets write each input to a file there and reload it.

#![allow(dead_code)]

use infergate_filters::auth::{Auth, AuthConfig, JwtAlgorithm, JwtConfig};
use infergate_filters::{Access, Request};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// HS256 secret of the fixture (≥ 32 bytes, as the loader requires).
pub const SECRET: &[u8] = b"infergate-fuzz-secret-0123456789abcdef";

/// Plain-text keys of the fixture's keys file (no dots, so never JWT-shaped).
pub const USER_KEY: &str = "sk-fuzz-user-key";
pub const ADMIN_KEY: &str = "sk-fuzz-admin-key";
pub const DISABLED_KEY: &str = "sk-fuzz-disabled-key";

pub const KEYS_JSON: &str = r#"{"keys": [
  {"key": "sk-fuzz-user-key", "user": "alice", "models": ["tiny-chat"]},
  {"key": "sk-fuzz-admin-key", "user": "ops", "role": "admin"},
  {"key": "sk-fuzz-disabled-key", "user": "gone", "enabled": false},
  {"key": "sha256:5db01fc4e41156f6be779b53c3c34761e0611d3449666500fb44b877bff98c09", "user": "hashed",
   "limits": {"requests_per_second": 5, "concurrent": 4, "tokens_per_minute": 100000}}
]}
"#;

/// Users 1 (admin, version 1), 123 (user, version 3) and 7 (disabled).
pub const USERS_YAML: &str = r#"users:
- user_id: 1
  email: admin@example.com
  password_hash: $argon2id$v=19$m=19456,t=2,p=1$jlr0nr0Vbgc0/5UEN48TZw$xHx0KmfcVbCUlkGvVrWCLNSE7Uf9+38+C8YGb6q0KcY
  version: 1
  role: admin
- user_id: 123
  email: test@example.com
  password_hash: $argon2id$v=19$m=19456,t=2,p=1$0hQFawdrkawPlpMd0wBGbg$sWlXGOsM4BuWk/wC7B8PUKm0vLh+88gLUmfRf4fAQsI
  version: 3
- user_id: 7
  email: gone@example.com
  password_hash: $argon2id$v=19$m=19456,t=2,p=1$0hQFawdrkawPlpMd0wBGbg$sWlXGOsM4BuWk/wC7B8PUKm0vLh+88gLUmfRf4fAQsI
  enabled: false
"#;

/// The auth module's test-only EC P-256 public key (public, never deployed).
pub const EC_PUBLIC_PEM: &str = include_str!("../../../filters/src/auth/testdata/ec_public.pem");

/// A directory of this process's own under the temporary directory
/// (`scripts/fuzz.sh` points `TMPDIR` at a scratch directory it removes).
pub fn scratch_dir(target: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infergate-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The fixture's files, written once.
pub struct Files {
    pub keys: PathBuf,
    pub users: PathBuf,
    pub secret: PathBuf,
    pub ec_public: PathBuf,
}

impl Files {
    pub fn new(target: &str) -> Files {
        let dir = scratch_dir(target);
        let files = Files {
            keys: dir.join("api_keys.json"),
            users: dir.join("users.yaml"),
            secret: dir.join("jwt.secret"),
            ec_public: dir.join("ec_public.pem"),
        };
        write(&files.keys, KEYS_JSON.as_bytes());
        write(&files.users, USERS_YAML.as_bytes());
        write(&files.secret, SECRET);
        write(&files.ec_public, EC_PUBLIC_PEM.as_bytes());
        files
    }

    fn config(&self, keys: bool, jwt: Option<JwtConfig>) -> AuthConfig {
        AuthConfig {
            api_keys_file: keys.then(|| self.keys.clone()),
            users_file: jwt.is_some().then(|| self.users.clone()),
            jwt,
            login_attempts_per_minute: 10,
            watch: false,
        }
    }

    fn jwt(&self, algorithm: JwtAlgorithm) -> JwtConfig {
        let hmac = algorithm.is_hmac();
        JwtConfig {
            algorithm,
            secret_file: hmac.then(|| self.secret.clone()),
            secret_env: None,
            public_key_file: (!hmac).then(|| self.ec_public.clone()),
            private_key_file: None,
            issuer: None,
            audience: None,
            leeway_seconds: 30,
            token_ttl_seconds: 3600,
        }
    }

    fn build(config: AuthConfig) -> Auth {
        match Auth::new(config) {
            Ok((auth, _warnings)) => auth,
            Err(e) => panic!("fuzz fixture: {e}"),
        }
    }

    /// API keys only.
    pub fn keys_only(&self) -> Auth {
        Files::build(self.config(true, None))
    }

    /// API keys, users and HS256 tokens.
    pub fn hs256(&self) -> Auth {
        Files::build(self.config(true, Some(self.jwt(JwtAlgorithm::HS256))))
    }

    /// Users and ES256 tokens (verify-only: no private key).
    pub fn es256(&self) -> Auth {
        Files::build(self.config(false, Some(self.jwt(JwtAlgorithm::ES256))))
    }
}

/// A request as a filter sees it, over plain fields.
#[derive(Debug, Clone)]
pub struct FuzzRequest {
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub access: Access,
}

impl FuzzRequest {
    pub fn api() -> FuzzRequest {
        FuzzRequest {
            path: "/v1/chat/completions".into(),
            query: None,
            headers: Vec::new(),
            access: Access::Api,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> FuzzRequest {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }
}

impl Request for FuzzRequest {
    fn method(&self) -> &str {
        "POST"
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
    fn set_query(&mut self, query: Option<&str>) {
        self.query = query.map(str::to_string);
    }
    fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
    fn set_header(&mut self, name: &'static str, value: &str) {
        self.remove_header(name);
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
    }
    fn remove_header(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.headers.retain(|(n, _)| *n != name);
    }
    fn access(&self) -> Access {
        self.access
    }
    fn client_ip(&self) -> Option<IpAddr> {
        None
    }
}

/// `%XX` decoding as the query parser does it (`None` when malformed or not UTF-8).
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

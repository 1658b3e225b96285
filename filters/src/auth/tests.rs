//! Tests for the auth module: keys, users, JWT, reload, watcher, login.

use super::*;
use crate::testing::TestRequest;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

// ---------------------------------------------------------------- helpers

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "infergate-auth-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PASSWORD: &str = "correct horse battery";
const SECRET: &str = "0123456789abcdef0123456789abcdef-test-only";
const RSA_PRIVATE: &str = include_str!("testdata/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("testdata/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("testdata/ec_private.pem");
const EC_PUBLIC: &str = include_str!("testdata/ec_public.pem");

const PLAIN_KEY: &str = "sk-plain-user-key-0001";
const ADMIN_KEY: &str = "sk-hashed-admin-key-0002";
const DISABLED_KEY: &str = "sk-disabled-key-0003";

fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| hash_password(PASSWORD).unwrap())
}

fn stored(key: &str) -> String {
    format!("sha256:{}", hex::encode(sha256(key.as_bytes())))
}

fn keys_json() -> String {
    json!({"keys": [
        {"key": PLAIN_KEY, "user": "alice", "quota": 10000, "enabled": true},
        {"key": stored(ADMIN_KEY), "user": "ops", "role": "admin", "models": ["qwen", "llama"],
         "limits": {"requests_per_second": 5, "concurrent": 2, "tokens_per_minute": 20000}},
        {"key": DISABLED_KEY, "user": "gone", "enabled": false},
    ]})
    .to_string()
}

fn users_yaml(version: u64) -> String {
    let h = password_hash();
    format!(
        "users:\n\
         - user_id: 123\n  email: Test@Example.com\n  password_hash: \"{h}\"\n  version: {version}\n  models: [qwen]\n  quota: 100000\n\
         - user_id: 7\n  email: admin@example.com\n  password_hash: \"{h}\"\n  role: admin\n\
         - user_id: 9\n  email: disabled@example.com\n  password_hash: \"{h}\"\n  enabled: false\n"
    )
}

fn hs_jwt(alg: JwtAlgorithm) -> JwtConfig {
    JwtConfig {
        algorithm: alg,
        secret_file: None,
        secret_env: None,
        public_key_file: None,
        private_key_file: None,
        issuer: None,
        audience: None,
        leeway_seconds: 30,
        token_ttl_seconds: 3600,
    }
}

/// A deployment with the fixture files; `jwt` gets its secret/key paths filled in.
fn setup(jwt: Option<JwtConfig>) -> (TempDir, Arc<Auth>, Vec<String>) {
    let dir = TempDir::new("setup");
    let keys = dir.write("api_keys.json", &keys_json());
    let users = dir.write("users.yaml", &users_yaml(1));
    let jwt = jwt.map(|mut j| {
        if j.algorithm.is_hmac() {
            j.secret_file = Some(dir.write("jwt.secret", &format!("{SECRET}\n")));
        } else {
            let (public, private) = if matches!(j.algorithm, JwtAlgorithm::ES256) {
                (EC_PUBLIC, EC_PRIVATE)
            } else {
                (RSA_PUBLIC, RSA_PRIVATE)
            };
            j.public_key_file = Some(dir.write("jwt.pub", public));
            if j.private_key_file.is_some() {
                j.private_key_file = Some(dir.write("jwt.key", private));
            }
        }
        j
    });
    let config = AuthConfig {
        api_keys_file: Some(keys),
        users_file: jwt.as_ref().map(|_| users),
        jwt,
        login_attempts_per_minute: 10,
        watch: true,
    };
    let (auth, warnings) = Auth::new(config).unwrap();
    (dir, Arc::new(auth), warnings)
}

fn request(access: Access) -> TestRequest {
    TestRequest {
        access,
        ..TestRequest::default()
    }
}

fn bearer(access: Access, credential: &str) -> TestRequest {
    request(access).with_header("Authorization", &format!("Bearer {credential}"))
}

fn auth_id(auth: &Auth, mut req: TestRequest) -> Result<Option<Arc<Identity>>, Rejection> {
    auth.authenticate(&mut req)
}

fn user_of(auth: &Auth, req: TestRequest) -> String {
    auth_id(auth, req).unwrap().unwrap().user.clone()
}

fn rejection(auth: &Auth, req: TestRequest) -> Rejection {
    auth_id(auth, req).unwrap_err()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Claims as the gateway issues them for user 123, version 1.
fn claims(exp: u64) -> serde_json::Value {
    json!({"sub": "123", "user_id": 123, "email": "test@example.com", "version": 1,
           "iat": now(), "exp": exp})
}

fn sign_hs(alg: jsonwebtoken::Algorithm, secret: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn assert_invalid_key(r: &Rejection, message: &str) {
    assert_eq!(
        (r.status, r.error_type, r.code),
        (401, "invalid_request_error", "invalid_api_key"),
        "{r:?}"
    );
    assert_eq!(r.message, message);
}

// ---------------------------------------------------------------- config

#[test]
fn example_config_parses_and_unknown_keys_are_errors() {
    let yaml = "
api_keys_file: conf/api_keys.json
users_file: conf/users.yaml
jwt:
  algorithm: HS256
  secret_env: INFERGATE_JWT_SECRET
  issuer: infergate
  leeway_seconds: 30
  token_ttl_seconds: 86400
login_attempts_per_minute: 10
watch: true
";
    let cfg: AuthConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(cfg.validate(), Ok(()));
    let jwt = cfg.jwt.unwrap();
    assert_eq!(jwt.algorithm, JwtAlgorithm::HS256);
    assert_eq!(jwt.issuer.as_deref(), Some("infergate"));
    assert_eq!(jwt.audience, None);

    let minimal: AuthConfig = serde_yaml::from_str("api_keys_file: k.json").unwrap();
    assert_eq!(minimal.login_attempts_per_minute, 10);
    assert!(minimal.watch);
    assert_eq!(minimal.validate(), Ok(()));

    assert!(serde_yaml::from_str::<AuthConfig>("api_keys_file: k\ncolour: red").is_err());
    assert!(serde_yaml::from_str::<AuthConfig>(
        "users_file: u\njwt: {algorithm: HS256, secret_env: X, colour: red}"
    )
    .is_err());
    assert!(serde_yaml::from_str::<AuthConfig>(
        "users_file: u\njwt: {algorithm: none, secret_env: X}"
    )
    .is_err());
}

#[test]
fn validation_names_the_key() {
    let parse = |y: &str| serde_yaml::from_str::<AuthConfig>(y).unwrap().validate();
    let key = |y: &str| parse(y).unwrap_err().0;
    assert_eq!(key("watch: true"), "api_keys_file");
    assert_eq!(key("api_keys_file: k\njwt: {secret_env: X}"), "users_file");
    assert_eq!(key("users_file: u"), "jwt");
    assert_eq!(key("users_file: u\njwt: {}"), "jwt.secret_file");
    assert_eq!(
        key("users_file: u\njwt: {secret_env: X, secret_file: f}"),
        "jwt.secret_env"
    );
    assert_eq!(
        key("users_file: u\njwt: {secret_env: X, public_key_file: p}"),
        "jwt.public_key_file"
    );
    assert_eq!(
        key("users_file: u\njwt: {algorithm: RS256}"),
        "jwt.public_key_file"
    );
    assert_eq!(
        key("users_file: u\njwt: {algorithm: ES256, public_key_file: p, secret_env: X}"),
        "jwt.secret_file"
    );
    assert_eq!(
        key("users_file: u\njwt: {secret_env: X, token_ttl_seconds: 0}"),
        "jwt.token_ttl_seconds"
    );
    assert_eq!(
        key("api_keys_file: k\nlogin_attempts_per_minute: 0"),
        "login_attempts_per_minute"
    );
    assert_eq!(
        parse("users_file: u\njwt: {algorithm: RS256, public_key_file: p}"),
        Ok(())
    );
}

#[test]
fn short_or_missing_secret_is_refused_at_load_without_echoing_it() {
    let dir = TempDir::new("secret");
    let users = dir.write("users.yaml", &users_yaml(1));
    let mut jwt = hs_jwt(JwtAlgorithm::HS256);
    jwt.secret_file = Some(dir.write("short.secret", "tooshort-secret-value\n"));
    let config = AuthConfig {
        api_keys_file: None,
        users_file: Some(users),
        jwt: Some(jwt.clone()),
        login_attempts_per_minute: 10,
        watch: false,
    };
    let err = Auth::new(config.clone()).unwrap_err();
    assert!(
        err.contains("21 bytes") && err.contains("at least 32"),
        "{err}"
    );
    assert!(!err.contains("tooshort"), "{err}");

    let mut missing = config.clone();
    let mut j = jwt.clone();
    j.secret_file = None;
    j.secret_env = Some("INFERGATE_TEST_UNSET_SECRET_VARIABLE".into());
    missing.jwt = Some(j);
    let err = Auth::new(missing).unwrap_err();
    assert!(err.contains("INFERGATE_TEST_UNSET_SECRET_VARIABLE") && err.contains("not set"));
}

#[test]
fn mismatched_key_pair_is_refused_at_load() {
    let dir = TempDir::new("pair");
    let users = dir.write("users.yaml", &users_yaml(1));
    let mut jwt = hs_jwt(JwtAlgorithm::ES256);
    // EC public key with an RSA private key: cannot even be parsed for ES256
    jwt.public_key_file = Some(dir.write("ec.pub", EC_PUBLIC));
    jwt.private_key_file = Some(dir.write("rsa.key", RSA_PRIVATE));
    let config = AuthConfig {
        api_keys_file: None,
        users_file: Some(users),
        jwt: Some(jwt.clone()),
        login_attempts_per_minute: 10,
        watch: false,
    };
    let err = Auth::new(config.clone()).unwrap_err();
    assert!(err.contains("private_key_file"), "{err}");

    // RS256 public key that belongs to another pair (EC file given as RSA)
    let mut rs = hs_jwt(JwtAlgorithm::RS256);
    rs.public_key_file = Some(dir.write("wrong.pub", EC_PUBLIC));
    let err = Auth::new(AuthConfig {
        jwt: Some(rs),
        ..config
    })
    .unwrap_err();
    assert!(err.contains("public_key_file"), "{err}");
}

// ---------------------------------------------------------------- key file

#[test]
fn the_seed_key_file_loads_unchanged_with_one_plain_text_warning() {
    let seed = r#"{
  "keys": [
    {
      "key": "sk-your-api-key-here",
      "user": "user1",
      "quota": 10000,
      "enabled": true
    }
  ]
}"#;
    let dir = TempDir::new("seed");
    let file = dir.write("api_keys.json", seed);
    let (auth, warnings) = Auth::new(AuthConfig {
        api_keys_file: Some(file.clone()),
        users_file: None,
        jwt: None,
        login_attempts_per_minute: 10,
        watch: false,
    })
    .unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("1 key in "), "{warnings:?}");
    assert!(warnings[0].contains("sha256:<hex>"));
    assert!(warnings[0].contains(&file.display().to_string()));
    assert!(!warnings[0].contains("sk-your-api-key-here"));

    let id = user_of(&auth, bearer(Access::Api, "sk-your-api-key-here"));
    assert_eq!(id, "user1");
    let identity = auth_id(&auth, bearer(Access::Api, "sk-your-api-key-here"))
        .unwrap()
        .unwrap();
    let digest = hex::encode(sha256(b"sk-your-api-key-here"));
    assert_eq!(identity.id, format!("key:{}", &digest[..12]));
    assert_eq!(identity.quota, Some(10000));
    assert_eq!(identity.role, Role::User);
    assert_eq!(identity.models, None);
    assert_eq!(identity.limits, LimitSpec::default());
}

#[test]
fn key_file_entries_are_checked_and_errors_name_the_entry_without_secrets() {
    let parse = |v: serde_json::Value| {
        keys::KeyTable::parse(v.to_string().as_bytes(), Path::new("k.json"), true)
    };
    let err = |v: serde_json::Value| parse(v).err().unwrap();

    let e = err(json!({"keys": [{"key": "sk-a", "user": "a"}, {"key": "sk-b", "colour": 1}]}));
    assert!(
        e.contains("k.json") && e.contains("keys[1]") && e.contains("colour"),
        "{e}"
    );

    // the same key twice, once plain, once hashed
    let e = err(json!({"keys": [{"key": "sk-same"}, {"key": stored("sk-same")}]}));
    assert!(e.contains("keys[1]") && e.contains("keys[0]"), "{e}");
    assert!(!e.contains("sk-same"), "{e}");

    let e = err(json!({"keys": [{"key": "sha256:abc"}]}));
    assert!(e.contains("64 hex"), "{e}");

    // a key pasted into the wrong field is not echoed
    let e = err(json!({"keys": [{"key": "sk-secret-value", "quota": "sk-secret-value"}]}));
    assert!(
        e.contains("keys[0]") && !e.contains("sk-secret-value"),
        "{e}"
    );

    let e = err(json!({"keys": [{"key": "has space"}]}));
    assert!(e.contains("whitespace"), "{e}");
    let e = err(json!({"keys": [{"key": "a.b.c"}]}));
    assert!(e.contains("JWT"), "{e}");
    let e = err(json!({"keys": [{"key": "sk-x", "limits": {"concurrent": 0}}]}));
    assert!(e.contains("limits.concurrent"), "{e}");
    let e = err(json!({"keys": [{"key": "sk-x", "limits": {"rps": 1}}]}));
    assert!(e.contains("rps"), "{e}");
    let e = err(json!({"tokens": []}));
    assert!(e.contains("k.json"), "{e}");
    let e = parse(json!({})).err().unwrap();
    assert!(e.contains("keys"), "{e}");

    // hashed keys give no warning; two plain keys one warning
    let (table, warnings) = parse(json!({"keys": [{"key": stored("sk-1")}]})).unwrap();
    assert_eq!((table.len(), warnings.len()), (1, 0));
    let (_, warnings) = parse(json!({"keys": [{"key": "sk-1"}, {"key": "sk-2"}]})).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].starts_with("2 keys in k.json are stored in plain text"));
}

#[test]
fn key_matrix() {
    let (_dir, auth, warnings) = setup(None);
    assert_eq!(
        warnings.len(),
        1,
        "two plain keys, one warning: {warnings:?}"
    );
    assert!(warnings[0].starts_with("2 keys"));

    // every way of sending a key
    assert_eq!(user_of(&auth, bearer(Access::Api, PLAIN_KEY)), "alice");
    let lower =
        request(Access::Api).with_header("authorization", &format!("bEaReR   {PLAIN_KEY} "));
    assert_eq!(user_of(&auth, lower), "alice");
    let bare = request(Access::Api).with_header("Authorization", PLAIN_KEY);
    assert_eq!(user_of(&auth, bare), "alice");
    let x_api_key = request(Access::Api).with_header("x-api-key", ADMIN_KEY);
    assert_eq!(user_of(&auth, x_api_key), "ops");

    let mut in_query = request(Access::Api);
    in_query.query = Some(format!("a=1&token={}&b=two", ADMIN_KEY.replace('-', "%2D")));
    let identity = auth.authenticate(&mut in_query).unwrap().unwrap();
    assert_eq!(identity.user, "ops");
    assert_eq!(in_query.query.as_deref(), Some("a=1&b=two"));
    let mut only_token = request(Access::Api);
    only_token.query = Some(format!("token={PLAIN_KEY}"));
    assert!(auth.authenticate(&mut only_token).unwrap().is_some());
    assert_eq!(only_token.query, None);

    // the header wins over x-api-key and the query
    let mut both = bearer(Access::Api, PLAIN_KEY).with_header("x-api-key", ADMIN_KEY);
    both.query = Some(format!("token={ADMIN_KEY}"));
    assert_eq!(auth.authenticate(&mut both).unwrap().unwrap().user, "alice");
    assert_eq!(both.query, None);

    // hashed key: its identity carries the file's role, models and limits
    let ops = auth_id(&auth, bearer(Access::Api, ADMIN_KEY))
        .unwrap()
        .unwrap();
    assert_eq!(ops.role, Role::Admin);
    assert_eq!(
        ops.models,
        Some(vec!["qwen".to_string(), "llama".to_string()])
    );
    assert_eq!(ops.limits.requests_per_second, Some(5.0));
    assert_eq!(ops.limits.concurrent, Some(2));
    assert_eq!(ops.limits.tokens_per_minute, Some(20000));
    assert_eq!(
        ops.id,
        format!("key:{}", &hex::encode(sha256(ADMIN_KEY.as_bytes()))[..12])
    );
    // the same Arc is handed out each time (built once at load)
    let again = auth_id(&auth, bearer(Access::Api, ADMIN_KEY))
        .unwrap()
        .unwrap();
    assert!(Arc::ptr_eq(&ops, &again));

    // disabled and wrong keys look the same and are not echoed
    let disabled = rejection(&auth, bearer(Access::Api, DISABLED_KEY));
    let wrong = rejection(&auth, bearer(Access::Api, "sk-not-a-key"));
    assert_invalid_key(&disabled, WRONG_KEY);
    assert_eq!(disabled, wrong);
    assert!(!wrong.message.contains("sk-"));

    // missing: nothing, empty, scheme only
    for req in [
        request(Access::Api),
        request(Access::Api).with_header("Authorization", "  "),
        request(Access::Api).with_header("Authorization", "Bearer"),
        request(Access::Api).with_header("Authorization", "Bearer   "),
        request(Access::Api).with_header("x-api-key", ""),
    ] {
        assert_invalid_key(&rejection(&auth, req), MISSING);
    }
    let mut empty_token = request(Access::Api);
    empty_token.query = Some("token=".into());
    assert_invalid_key(&auth.authenticate(&mut empty_token).unwrap_err(), MISSING);

    // another scheme: said so, without the credential
    let basic = rejection(
        &auth,
        request(Access::Api).with_header("Authorization", "Basic dXNlcjpwYXNz"),
    );
    assert_eq!(basic.status, 401);
    assert!(basic.message.contains("`Basic`") && !basic.message.contains("dXNlcjpwYXNz"));
}

#[test]
fn admin_gating() {
    let (_dir, auth, _) = setup(None);
    let forbidden = rejection(&auth, bearer(Access::Admin, PLAIN_KEY));
    assert_eq!(
        (forbidden.status, forbidden.error_type, forbidden.code),
        (403, "invalid_request_error", "permission_denied")
    );
    assert!(forbidden.message.contains("admin role"));
    assert_eq!(user_of(&auth, bearer(Access::Admin, ADMIN_KEY)), "ops");
    assert_invalid_key(&rejection(&auth, request(Access::Admin)), MISSING);
    assert_invalid_key(
        &rejection(&auth, bearer(Access::Admin, "sk-wrong")),
        WRONG_KEY,
    );
    assert_invalid_key(
        &rejection(&auth, bearer(Access::Admin, DISABLED_KEY)),
        WRONG_KEY,
    );
}

#[test]
fn public_and_login_ignore_credentials_but_strip_the_token_parameter() {
    let (_dir, auth, _) = setup(None);
    for access in [Access::Public, Access::Login] {
        let mut req = bearer(access, "sk-wrong");
        req.query = Some("verbose=1&token=sk-whatever".into());
        assert_eq!(auth.authenticate(&mut req), Ok(None));
        assert_eq!(req.query.as_deref(), Some("verbose=1"));
        let mut valid = bearer(access, ADMIN_KEY);
        assert_eq!(auth.authenticate(&mut valid), Ok(None));
    }
    // no token parameter: the query is left alone
    let mut req = request(Access::Public);
    req.query = Some("a=1&&b".into());
    assert_eq!(auth.authenticate(&mut req), Ok(None));
    assert_eq!(req.query.as_deref(), Some("a=1&&b"));
}

#[test]
fn credentials_are_removed_from_the_request_once_read() {
    let (_dir, auth, _) = setup(None);
    for access in [Access::Api, Access::Public] {
        let mut req = request(access)
            .with_header("Authorization", &format!("Bearer {PLAIN_KEY}"))
            .with_header("x-api-key", ADMIN_KEY)
            .with_header("x-other", "kept");
        req.query = Some("token=sk-x&a=1".into());
        let _ = auth.authenticate(&mut req);
        let names: Vec<&str> = req.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["x-other"], "{access:?}");
        assert_eq!(req.query.as_deref(), Some("a=1"));
    }
    // a refused credential is removed too
    let mut wrong = bearer(Access::Api, "sk-wrong");
    assert!(auth.authenticate(&mut wrong).is_err());
    assert!(wrong.headers.is_empty());
}

#[test]
fn the_filter_records_the_identity() {
    let (_dir, auth, _) = setup(None);
    let filter = AuthFilter(Arc::clone(&auth));
    assert_eq!(filter.name(), "auth");
    let mut state = FilterState::default();
    let mut req = bearer(Access::Api, PLAIN_KEY);
    assert_eq!(filter.on_request(&mut req, &mut state), Ok(Flow::Continue));
    assert_eq!(
        state.identity.as_ref().map(|i| i.user.as_str()),
        Some("alice")
    );
    let mut state = FilterState::default();
    let mut req = request(Access::Api);
    assert_eq!(
        filter.on_request(&mut req, &mut state).unwrap_err().status,
        401
    );
    assert!(state.identity.is_none());
}

#[test]
fn identities_lists_enabled_principals_without_secrets() {
    let (_dir, auth, _) = setup(Some(hs_jwt(JwtAlgorithm::HS256)));
    assert_eq!((auth.key_count(), auth.user_count()), (3, 3));
    let all = auth.identities();
    let mut names: Vec<_> = all.iter().map(|i| i.user.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["Test@Example.com", "admin@example.com", "alice", "ops"]
    );
    let ids: Vec<_> = all.iter().map(|i| i.id.as_str()).collect();
    assert!(ids.contains(&"user:123") && ids.contains(&"user:7"));
    let debug = format!("{all:?}{auth:?}");
    for secret in [PLAIN_KEY, ADMIN_KEY, SECRET, "$argon2"] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
}

// ---------------------------------------------------------------- users file

#[test]
fn users_file_entries_are_checked() {
    let h = password_hash();
    let parse = |y: String| users::UserTable::parse(y.as_bytes(), Path::new("u.yaml"));
    let err = |y: String| parse(y).err().unwrap();

    let e = err(format!(
        "users:\n- {{user_id: 1, email: a@x, password_hash: '{h}'}}\n- {{user_id: 1, email: b@x, password_hash: '{h}'}}\n"
    ));
    assert!(e.contains("users[1]") && e.contains("user_id 1"), "{e}");
    let e = err(format!(
        "users:\n- {{user_id: 1, email: A@X, password_hash: '{h}'}}\n- {{user_id: 2, email: a@x, password_hash: '{h}'}}\n"
    ));
    assert!(
        e.contains("users[1]") && e.contains("case-insensitive"),
        "{e}"
    );
    let e = err("users:\n- {user_id: 1, email: a@x, password_hash: 'hunter2'}\n".into());
    assert!(
        e.contains("users[0]") && e.contains("argon2") && !e.contains("hunter2"),
        "{e}"
    );
    let greedy = h.replace("m=19456", "m=4194304");
    let e = err(format!(
        "users:\n- {{user_id: 1, email: a@x, password_hash: '{greedy}'}}\n"
    ));
    assert!(e.contains("users[0]") && e.contains("1 GiB"), "{e}");
    let e = err(format!(
        "users:\n- {{user_id: 1, email: a@x, password_hash: '{h}', colour: red}}\n"
    ));
    assert!(e.contains("users[0]") && e.contains("colour"), "{e}");
    let e = err("people: []\n".into());
    assert!(e.contains("u.yaml"), "{e}");

    // JSON is YAML too; an empty file has no users
    let table = parse(format!(
        r#"{{"users": [{{"user_id": 5, "email": "j@x", "password_hash": "{h}"}}]}}"#
    ))
    .unwrap();
    assert_eq!(table.len(), 1);
    let id = table.current(5, 1).unwrap();
    assert_eq!(
        (id.id.as_str(), id.user.as_str(), id.role),
        ("user:5", "j@x", Role::User)
    );
    assert_eq!(parse(String::new()).unwrap().len(), 0);
}

#[test]
fn password_hashing() {
    let h = password_hash();
    assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
    assert!(users::verify_password(PASSWORD, h));
    assert!(!users::verify_password("wrong password", h));
    assert!(!users::verify_password(PASSWORD, "not a hash"));
    // the dummy hash costs the same as a real one and matches nothing
    assert!(users::DUMMY_HASH.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    assert!(argon2::password_hash::PasswordHash::new(users::DUMMY_HASH).is_ok());
    assert!(!users::verify_password("", users::DUMMY_HASH));
    assert!(!users::verify_password(PASSWORD, users::DUMMY_HASH));
}

#[test]
fn new_api_keys_are_random_and_hash_to_their_stored_form() {
    let (key, hashed) = new_api_key();
    assert!(key.starts_with("sk-") && key.len() == 51, "{key}");
    assert!(key[3..]
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_eq!(hashed, stored(&key));
    assert_ne!(new_api_key().0, key);
    let table = keys::KeyTable::parse(
        json!({"keys": [{"key": hashed}]}).to_string().as_bytes(),
        Path::new("k"),
        true,
    )
    .unwrap()
    .0;
    assert!(table.lookup(&key).is_some());
}

// ---------------------------------------------------------------- JWT

#[test]
fn login_issues_a_token_that_authenticates_as_the_current_user() {
    let mut jwt = hs_jwt(JwtAlgorithm::HS256);
    jwt.issuer = Some("infergate".into());
    let (_dir, auth, _) = setup(Some(jwt));
    let grant = auth.login(" test@EXAMPLE.com ", PASSWORD).unwrap();
    assert_eq!((grant.user_id, grant.version), (123, 1));
    let id = auth_id(&auth, bearer(Access::Api, &grant.token))
        .unwrap()
        .unwrap();
    assert_eq!(id.id, "user:123");
    assert_eq!(id.user, "Test@Example.com");
    assert_eq!(id.models, Some(vec!["qwen".to_string()]));
    assert_eq!(id.quota, Some(100000));

    // the claims the seed's clients see
    let payload = grant.token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&decode_b64url(payload)).unwrap();
    assert_eq!(claims["sub"], "123");
    assert_eq!(claims["user_id"], 123);
    assert_eq!(claims["version"], 1);
    assert_eq!(claims["email"], "Test@Example.com");
    assert_eq!(claims["iss"], "infergate");
    assert!(claims.get("aud").is_none());
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 3600);

    // ?token= works too (EventSource), and is removed
    let mut req = request(Access::Api);
    req.query = Some(format!("token={}&stream=true", grant.token));
    assert!(auth.authenticate(&mut req).unwrap().is_some());
    assert_eq!(req.query.as_deref(), Some("stream=true"));

    // a user token is not admin; an admin user's token is
    assert_eq!(
        rejection(&auth, bearer(Access::Admin, &grant.token)).status,
        403
    );
    let admin = auth.login("admin@example.com", PASSWORD).unwrap();
    assert_eq!(
        user_of(&auth, bearer(Access::Admin, &admin.token)),
        "admin@example.com"
    );
    // API keys keep working next to JWTs
    assert_eq!(user_of(&auth, bearer(Access::Api, PLAIN_KEY)), "alice");
}

fn decode_b64url(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        acc = (acc << 6) | u32::from(val(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn jwt_rejection(auth: &Auth, token: &str) -> Rejection {
    let r = rejection(auth, bearer(Access::Api, token));
    assert_eq!((r.status, r.code), (401, "invalid_api_key"), "{r:?}");
    assert!(!r.message.contains(token));
    r
}

const INVALID: &str =
    "Invalid token: bad signature or format. Log in again at POST /user/user_login.";

#[test]
fn hs256_token_checks() {
    use jsonwebtoken::Algorithm::{HS256, HS512};
    let (_dir, auth, _) = setup(Some(hs_jwt(JwtAlgorithm::HS256)));
    let secret = SECRET.as_bytes();

    // valid, hand-signed with the configured secret
    let ok = sign_hs(HS256, secret, &claims(now() + 600));
    assert_eq!(user_of(&auth, bearer(Access::Api, &ok)), "Test@Example.com");

    // expired: within the 30 s leeway accepted, beyond refused
    let recent = sign_hs(HS256, secret, &claims(now() - 10));
    assert!(auth_id(&auth, bearer(Access::Api, &recent)).is_ok());
    let expired = sign_hs(HS256, secret, &claims(now() - 100));
    assert!(jwt_rejection(&auth, &expired).message.contains("expired"));

    // wrong algorithm, same secret
    assert_eq!(
        jwt_rejection(&auth, &sign_hs(HS512, secret, &claims(now() + 600))).message,
        INVALID
    );

    // wrong secret
    let other = sign_hs(
        HS256,
        b"another-secret-another-secret-another",
        &claims(now() + 600),
    );
    assert_eq!(jwt_rejection(&auth, &other).message, INVALID);

    // alg: none, empty signature
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims(now() + 600).to_string().as_bytes())
    );
    assert_eq!(jwt_rejection(&auth, &none).message, INVALID);
    // alg: HS256 header but no signature
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64url(claims(now() + 600).to_string().as_bytes())
    );
    assert_eq!(jwt_rejection(&auth, &unsigned).message, INVALID);

    // exp as a string, or absent
    let mut c = claims(0);
    c["exp"] = json!("9999999999");
    assert_eq!(
        jwt_rejection(&auth, &sign_hs(HS256, secret, &c)).message,
        INVALID
    );
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        jwt_rejection(&auth, &sign_hs(HS256, secret, &c)).message,
        INVALID
    );

    // no audience configured: a token's aud is not checked
    let mut c = claims(now() + 600);
    c["aud"] = json!("someone");
    assert!(auth_id(&auth, bearer(Access::Api, &sign_hs(HS256, secret, &c))).is_ok());

    // not yet valid
    let mut c = claims(now() + 600);
    c["nbf"] = json!(now() + 300);
    assert_eq!(
        jwt_rejection(&auth, &sign_hs(HS256, secret, &c)).message,
        INVALID
    );

    // user checks: unknown user, disabled user, old version; sub must agree
    let revoked = "This token has been revoked (user changed, disabled or removed); \
                   log in again at POST /user/user_login.";
    let mut c = claims(now() + 600);
    c["user_id"] = json!(999);
    c["sub"] = json!("999");
    assert_eq!(
        jwt_rejection(&auth, &sign_hs(HS256, secret, &c)).message,
        revoked
    );
    c["user_id"] = json!(9);
    c["sub"] = json!("9");
    assert_eq!(
        jwt_rejection(&auth, &sign_hs(HS256, secret, &c)).message,
        revoked
    );
    let mut c = claims(now() + 600);
    c["version"] = json!(0);
    assert_eq!(
        jwt_rejection(&auth, &sign_hs(HS256, secret, &c)).message,
        revoked
    );
    let mut c = claims(now() + 600);
    c["sub"] = json!("7");
    assert_eq!(
        jwt_rejection(&auth, &sign_hs(HS256, secret, &c)).message,
        INVALID
    );
    // sub alone is enough (tokens from other issuers)
    let mut c = claims(now() + 600);
    c.as_object_mut().unwrap().remove("user_id");
    assert!(auth_id(&auth, bearer(Access::Api, &sign_hs(HS256, secret, &c))).is_ok());

    // garbage with two dots
    assert_eq!(jwt_rejection(&auth, "a.b.c").message, INVALID);
}

#[test]
fn issuer_and_audience_are_required_when_configured() {
    use jsonwebtoken::Algorithm::HS256;
    let mut jwt = hs_jwt(JwtAlgorithm::HS256);
    jwt.issuer = Some("infergate".into());
    jwt.audience = Some("chat-ui".into());
    let (_dir, auth, _) = setup(Some(jwt));
    let secret = SECRET.as_bytes();
    let with = |iss: Option<&str>, aud: Option<&str>| {
        let mut c = claims(now() + 600);
        if let Some(i) = iss {
            c["iss"] = json!(i);
        }
        if let Some(a) = aud {
            c["aud"] = json!(a);
        }
        sign_hs(HS256, secret, &c)
    };
    assert!(auth_id(
        &auth,
        bearer(Access::Api, &with(Some("infergate"), Some("chat-ui")))
    )
    .is_ok());
    let wrong_iss = jwt_rejection(&auth, &with(Some("evil"), Some("chat-ui")));
    assert!(wrong_iss.message.contains("(iss)"), "{wrong_iss:?}");
    let wrong_aud = jwt_rejection(&auth, &with(Some("infergate"), Some("other")));
    assert!(wrong_aud.message.contains("(aud)"), "{wrong_aud:?}");
    assert_eq!(
        jwt_rejection(&auth, &with(None, Some("chat-ui"))).message,
        INVALID
    );
    assert_eq!(
        jwt_rejection(&auth, &with(Some("infergate"), None)).message,
        INVALID
    );
    // and login sets both
    let grant = auth.login("test@example.com", PASSWORD).unwrap();
    assert!(auth_id(&auth, bearer(Access::Api, &grant.token)).is_ok());
}

#[test]
fn rs256_refuses_hs256_tokens_signed_with_the_public_key() {
    let mut jwt = hs_jwt(JwtAlgorithm::RS256);
    jwt.private_key_file = Some(PathBuf::new()); // filled in by setup
    let (_dir, auth, _) = setup(Some(jwt));
    let grant = auth.login("test@example.com", PASSWORD).unwrap();
    assert!(grant
        .token
        .starts_with(&b64url(br#"{"typ":"JWT","alg":"RS256"}"#)));
    assert_eq!(
        user_of(&auth, bearer(Access::Api, &grant.token)),
        "Test@Example.com"
    );

    // the classic confusion: HS256 with the public key PEM as the HMAC secret
    let forged = sign_hs(
        jsonwebtoken::Algorithm::HS256,
        RSA_PUBLIC.as_bytes(),
        &claims(now() + 600),
    );
    assert_eq!(jwt_rejection(&auth, &forged).message, INVALID);
    // also re-signing the real token's header+payload with HS256
    let mut parts = grant.token.split('.');
    let (_, payload) = (parts.next().unwrap(), parts.next().unwrap());
    let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let message = format!("{header}.{payload}");
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    assert_eq!(
        jwt_rejection(&auth, &format!("{message}.{sig}")).message,
        INVALID
    );
    // and an RS256 token from another key pair's holder (here: the EC key cannot sign RS256;
    // sign RS256 with our key but tamper the payload)
    let tampered_payload = b64url(
        json!({"sub": "7", "user_id": 7, "version": 1, "exp": now() + 600})
            .to_string()
            .as_bytes(),
    );
    let sig = grant.token.rsplit('.').next().unwrap();
    let tampered = format!(
        "{}.{tampered_payload}.{sig}",
        grant.token.split('.').next().unwrap()
    );
    assert_eq!(jwt_rejection(&auth, &tampered).message, INVALID);
}

#[test]
fn es256_and_verify_only_deployments() {
    let mut jwt = hs_jwt(JwtAlgorithm::ES256);
    jwt.private_key_file = Some(PathBuf::new());
    let (_dir, auth, _) = setup(Some(jwt));
    let grant = auth.login("admin@example.com", PASSWORD).unwrap();
    assert_eq!(
        user_of(&auth, bearer(Access::Admin, &grant.token)),
        "admin@example.com"
    );

    // RS256 without a private key: tokens from elsewhere verify, login is off
    let (_dir2, verify_only, _) = setup(Some(hs_jwt(JwtAlgorithm::RS256)));
    let not_configured = verify_only.login("test@example.com", PASSWORD).unwrap_err();
    assert_eq!(
        (not_configured.status, not_configured.code),
        (404, "login_not_configured")
    );
    let token = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::RS256),
        &claims(now() + 600),
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        user_of(&verify_only, bearer(Access::Api, &token)),
        "Test@Example.com"
    );
    // ES256 token to an RS256 deployment
    let es = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::ES256),
        &claims(now() + 600),
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(jwt_rejection(&verify_only, &es).message, INVALID);

    // no jwt at all: login is off, and a JWT-shaped credential is just a wrong key
    let (_dir3, keys_only, _) = setup(None);
    assert_eq!(
        keys_only
            .login("test@example.com", PASSWORD)
            .unwrap_err()
            .status,
        404
    );
    assert_invalid_key(
        &rejection(&keys_only, bearer(Access::Api, &token)),
        WRONG_KEY,
    );
}

// ---------------------------------------------------------------- login

#[test]
fn failed_logins_are_indistinguishable() {
    let (_dir, auth, _) = setup(Some(hs_jwt(JwtAlgorithm::HS256)));
    let wrong_password = auth
        .login("test@example.com", "not the password")
        .unwrap_err();
    let unknown_email = auth.login("nobody@example.com", PASSWORD).unwrap_err();
    let disabled = auth.login("disabled@example.com", PASSWORD).unwrap_err();
    assert_eq!(wrong_password, unknown_email);
    assert_eq!(wrong_password, disabled);
    assert_eq!(
        (wrong_password.status, wrong_password.code),
        (401, "invalid_credentials")
    );
    assert!(!wrong_password.message.contains("not the password"));
    assert!(auth.login("test@example.com", "").is_err());
}

#[test]
fn login_attempts_are_limited_per_address() {
    let (_dir, auth, _) = setup(Some(hs_jwt(JwtAlgorithm::HS256)));
    let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
    let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
    for _ in 0..10 {
        assert_eq!(auth.check_login_rate(a), Ok(()));
    }
    let r = auth.check_login_rate(a).unwrap_err();
    assert_eq!(
        (r.status, r.error_type, r.code, r.retry_after),
        (429, "requests", "rate_limit_exceeded", Some(6))
    );
    assert!(r.message.contains("6 s"), "{r:?}");
    assert_eq!(auth.check_login_rate(b), Ok(()));
}

#[test]
fn add_user_then_login_and_password_change_revokes_old_tokens() {
    let dir = TempDir::new("adduser");
    let users = dir.path("conf-users.yaml");
    let created = add_user(
        &users,
        "new@example.com",
        "first password",
        Role::User,
        None,
    )
    .unwrap();
    assert_eq!(
        created,
        UserSummary {
            user_id: 1,
            email: "new@example.com".into(),
            role: Role::User,
            version: 1,
            enabled: true,
            created: true,
        }
    );
    let second = add_user(
        &users,
        "boss@example.com",
        "boss password",
        Role::Admin,
        Some(40),
    )
    .unwrap();
    assert_eq!((second.user_id, second.role), (40, Role::Admin));
    let third = add_user(
        &users,
        "third@example.com",
        "third password",
        Role::User,
        None,
    )
    .unwrap();
    assert_eq!(third.user_id, 41);
    assert!(add_user(&users, "x@example.com", "long enough", Role::User, Some(40)).is_err());
    assert!(add_user(&users, "short@example.com", "short", Role::User, None).is_err());
    assert!(add_user(&users, "not an email", "long enough", Role::User, None).is_err());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&users).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(!text.contains("first password"));

    let mut jwt = hs_jwt(JwtAlgorithm::HS256);
    jwt.secret_file = Some(dir.write("jwt.secret", SECRET));
    let (auth, _) = Auth::new(AuthConfig {
        api_keys_file: None,
        users_file: Some(users.clone()),
        jwt: Some(jwt),
        login_attempts_per_minute: 10,
        watch: false,
    })
    .unwrap();
    let old = auth.login("NEW@example.com", "first password").unwrap();
    assert_eq!((old.user_id, old.version), (1, 1));
    assert!(auth_id(&auth, bearer(Access::Api, &old.token)).is_ok());

    // same email again: new hash, version bumped, old tokens revoked
    let updated = add_user(
        &users,
        "new@EXAMPLE.com",
        "second password",
        Role::User,
        None,
    )
    .unwrap();
    assert_eq!(
        (updated.user_id, updated.version, updated.created),
        (1, 2, false)
    );
    assert!(add_user(
        &users,
        "new@example.com",
        "third password",
        Role::User,
        Some(5)
    )
    .is_err());
    let report = auth.reload().unwrap();
    assert_eq!((report.keys, report.users), (0, 3));
    assert!(jwt_rejection(&auth, &old.token).message.contains("revoked"));
    assert!(auth.login("new@example.com", "first password").is_err());
    let fresh = auth.login("new@example.com", "second password").unwrap();
    assert_eq!(fresh.version, 2);
    assert!(auth_id(&auth, bearer(Access::Api, &fresh.token)).is_ok());
    // no temporary files left behind
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

// ---------------------------------------------------------------- reload

#[test]
fn reload_is_all_or_nothing() {
    let (dir, auth, _) = setup(Some(hs_jwt(JwtAlgorithm::HS256)));
    let keys_file = dir.path("api_keys.json");

    // a corrupt key file: Err naming it, old keys still work
    std::fs::write(&keys_file, "{\"keys\": [").unwrap();
    let err = auth.reload().unwrap_err();
    assert!(err.contains("api_keys.json"), "{err}");
    assert_eq!(user_of(&auth, bearer(Access::Api, PLAIN_KEY)), "alice");
    // a corrupt users file with a good key file: nothing changes either
    std::fs::write(
        &keys_file,
        json!({"keys": [{"key": stored("sk-brand-new-key"), "user": "newbie"}]}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.path("users.yaml"), "users: [{user_id: 1}]").unwrap();
    let err = auth.reload().unwrap_err();
    assert!(
        err.contains("users.yaml") && err.contains("users[0]"),
        "{err}"
    );
    assert_eq!(user_of(&auth, bearer(Access::Api, PLAIN_KEY)), "alice");
    assert_eq!(
        rejection(&auth, bearer(Access::Api, "sk-brand-new-key")).status,
        401
    );

    // both good: the new key works, the removed one does not
    std::fs::write(dir.path("users.yaml"), users_yaml(1)).unwrap();
    let report = auth.reload().unwrap();
    assert_eq!(
        report,
        ReloadReport {
            keys: 1,
            users: 3,
            warnings: vec![]
        }
    );
    assert_eq!(
        user_of(&auth, bearer(Access::Api, "sk-brand-new-key")),
        "newbie"
    );
    assert_invalid_key(&rejection(&auth, bearer(Access::Api, PLAIN_KEY)), WRONG_KEY);
}

// ---------------------------------------------------------------- watcher

fn fast() -> watch::Timing {
    watch::Timing {
        poll: Duration::from_millis(20),
        settle: Duration::from_millis(30),
    }
}

type Reports = mpsc::Receiver<Result<ReloadReport, String>>;

fn watched(auth: &Arc<Auth>) -> Reports {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    watch::spawn(
        auth,
        fast(),
        Box::new(move |r| {
            let _ = tx.lock().unwrap().send(r);
        }),
    )
    .unwrap();
    rx
}

fn next_report(rx: &Reports) -> Result<ReloadReport, String> {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the watcher did not reload within 10 s")
}

fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn one_key(key: &str, user: &str) -> String {
    json!({"keys": [{"key": stored(key), "user": user}]}).to_string()
}

#[test]
fn watcher_reloads_after_an_atomic_rename_and_skips_no_op_writes() {
    let dir = TempDir::new("watch-rename");
    let keys_file = dir.write("api_keys.json", &one_key("sk-watch-one", "one"));
    let (auth, _) = Auth::new(AuthConfig {
        api_keys_file: Some(keys_file.clone()),
        users_file: None,
        jwt: None,
        login_attempts_per_minute: 10,
        watch: true,
    })
    .unwrap();
    let auth = Arc::new(auth);
    let rx = watched(&auth);

    write_atomically(&keys_file, &one_key("sk-watch-two", "two"));
    assert_eq!(next_report(&rx).unwrap().keys, 1);
    assert_eq!(user_of(&auth, bearer(Access::Api, "sk-watch-two")), "two");
    assert_eq!(
        rejection(&auth, bearer(Access::Api, "sk-watch-one")).status,
        401
    );

    // the same content again: no reload
    write_atomically(&keys_file, &one_key("sk-watch-two", "two"));
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());

    // a broken file is reported once, and nothing changes
    write_atomically(&keys_file, "{ not json");
    let err = next_report(&rx).unwrap_err();
    assert!(err.contains("api_keys.json"), "{err}");
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(user_of(&auth, bearer(Access::Api, "sk-watch-two")), "two");

    // fixed: reloaded
    write_atomically(&keys_file, &one_key("sk-watch-three", "three"));
    assert!(next_report(&rx).is_ok());
    assert_eq!(
        user_of(&auth, bearer(Access::Api, "sk-watch-three")),
        "three"
    );
}

#[cfg(unix)]
#[test]
fn watcher_follows_a_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    let dir = TempDir::new("watch-configmap");
    // the layout kubelet makes for a mounted ConfigMap
    std::fs::create_dir(dir.path("..2026_01_01_a")).unwrap();
    std::fs::write(
        dir.path("..2026_01_01_a/api_keys.json"),
        one_key("sk-cm-first", "first"),
    )
    .unwrap();
    symlink("..2026_01_01_a", dir.path("..data")).unwrap();
    symlink("..data/api_keys.json", dir.path("api_keys.json")).unwrap();

    let (auth, _) = Auth::new(AuthConfig {
        api_keys_file: Some(dir.path("api_keys.json")),
        users_file: None,
        jwt: None,
        login_attempts_per_minute: 10,
        watch: true,
    })
    .unwrap();
    let auth = Arc::new(auth);
    assert_eq!(user_of(&auth, bearer(Access::Api, "sk-cm-first")), "first");
    let rx = watched(&auth);

    // kubelet: new timestamped dir, new symlink, renamed over ..data
    std::fs::create_dir(dir.path("..2026_01_02_b")).unwrap();
    std::fs::write(
        dir.path("..2026_01_02_b/api_keys.json"),
        one_key("sk-cm-second", "second"),
    )
    .unwrap();
    symlink("..2026_01_02_b", dir.path("..data_tmp")).unwrap();
    std::fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    std::fs::remove_dir_all(dir.path("..2026_01_01_a")).unwrap();

    assert_eq!(next_report(&rx).unwrap().keys, 1);
    assert_eq!(
        user_of(&auth, bearer(Access::Api, "sk-cm-second")),
        "second"
    );
    assert_eq!(
        rejection(&auth, bearer(Access::Api, "sk-cm-first")).status,
        401
    );
}

#[test]
fn watcher_is_off_when_watch_is_false_and_stops_with_auth() {
    let dir = TempDir::new("watch-off");
    let keys_file = dir.write("api_keys.json", &one_key("sk-off-one", "one"));
    let config = AuthConfig {
        api_keys_file: Some(keys_file.clone()),
        users_file: None,
        jwt: None,
        login_attempts_per_minute: 10,
        watch: false,
    };
    let auth = Arc::new(Auth::new(config).unwrap().0);
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    auth.spawn_watcher(Box::new(move |r| {
        let _ = tx.lock().unwrap().send(r);
    }))
    .unwrap();
    write_atomically(&keys_file, &one_key("sk-off-two", "two"));
    // the callback (and its sender) was dropped at once: nothing ever arrives
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(2)),
        Err(mpsc::RecvTimeoutError::Disconnected)
    );
    assert_eq!(user_of(&auth, bearer(Access::Api, "sk-off-one")), "one");

    // a watcher holds no strong reference: dropping Auth ends its thread,
    // which drops the callback and disconnects the channel
    let auth2 = Arc::new(
        Auth::new(AuthConfig {
            api_keys_file: Some(keys_file),
            users_file: None,
            jwt: None,
            login_attempts_per_minute: 10,
            watch: true,
        })
        .unwrap()
        .0,
    );
    let rx2 = watched(&auth2);
    drop(auth2);
    assert_eq!(
        rx2.recv_timeout(Duration::from_secs(10)),
        Err(mpsc::RecvTimeoutError::Disconnected)
    );
}

#[test]
fn files_that_are_not_a_mapping_are_errors_not_empty_tables() {
    // found by the fuzzer: serde reads a struct from a sequence, so these
    // loaded as "no keys" / "no users" without a word
    for text in ["[]", "[[]]", " [[], 1]"] {
        let err = keys::KeyTable::parse(text.as_bytes(), Path::new("k.json"), false)
            .err()
            .unwrap_or_else(|| panic!("{text} loaded"));
        assert!(err.contains("not a JSON object"), "{err}");
    }
    for text in ["[]", "[[]]", "!!x", "- users: []"] {
        let err = users::UserTable::parse(text.as_bytes(), Path::new("u.yaml"))
            .err()
            .unwrap_or_else(|| panic!("{text} loaded"));
        assert!(err.contains("users_file"), "{err}");
    }
    // an empty users file is still an empty table (a fresh install)
    assert!(users::UserTable::parse(b"", Path::new("u.yaml")).is_ok());
    assert!(users::UserTable::parse(b"users: []", Path::new("u.yaml")).is_ok());
    assert!(keys::KeyTable::parse(br#"{"keys": []}"#, Path::new("k.json"), false).is_ok());
}

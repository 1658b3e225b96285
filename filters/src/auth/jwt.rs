//! Tokens issued at `POST /user/user_login` and checked on every request.
//!
//! The algorithm is pinned (only the configured one verifies, so `alg: none`
//! and HS/RS confusion are refused), `exp` is required and must be a number,
//! `iss`/`aud` are required and checked only when configured. A valid token
//! still only names a user: the identity (role, models, limits) comes from
//! the users file as currently loaded, and the token's `version` must equal
//! the user's.

use super::users::UserRecord;
use super::{JwtAlgorithm, JwtConfig};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Why a token was refused; the messages never contain the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwtError {
    Expired,
    Invalid,
    WrongIssuer,
    WrongAudience,
    Revoked,
}

impl JwtError {
    pub(crate) fn message(self) -> &'static str {
        match self {
            JwtError::Expired => "Your token has expired; log in again at POST /user/user_login.",
            JwtError::Invalid => {
                "Invalid token: bad signature or format. Log in again at POST /user/user_login."
            }
            JwtError::WrongIssuer => "Invalid token: it was issued by someone else (iss).",
            JwtError::WrongAudience => "Invalid token: it is meant for another audience (aud).",
            JwtError::Revoked => {
                "This token has been revoked (user changed, disabled or removed); \
                 log in again at POST /user/user_login."
            }
        }
    }
}

/// What a verified token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verified {
    pub user_id: u64,
    pub version: u64,
}

/// Claims issued at login.
#[derive(Serialize)]
struct Issued<'a> {
    sub: String,
    user_id: u64,
    email: &'a str,
    version: u64,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Claims read back (`exp`, `iss`, `aud` are checked by the library).
#[derive(Deserialize)]
struct Incoming {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    user_id: Option<u64>,
    version: u64,
}

pub(crate) struct JwtKeys {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    ttl: u64,
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::HS384 => Algorithm::HS384,
        JwtAlgorithm::HS512 => Algorithm::HS512,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::RS384 => Algorithm::RS384,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::ES384 => Algorithm::ES384,
    }
}

/// Minimum HMAC secret length, in bytes.
const MIN_SECRET: usize = 32;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl JwtKeys {
    /// Load the secret or key files named in `cfg` (already validated).
    pub(crate) fn load(cfg: &JwtConfig) -> Result<JwtKeys, String> {
        let alg = algorithm(cfg.algorithm);
        let (decoding, encoding) = if cfg.algorithm.is_hmac() {
            let (secret, source) = match (&cfg.secret_file, &cfg.secret_env) {
                (Some(path), _) => {
                    let shown = format!("auth.jwt.secret_file {}", path.display());
                    let bytes =
                        std::fs::read(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
                    (bytes.trim_ascii().to_vec(), shown)
                }
                (None, Some(var)) => {
                    let shown = format!("auth.jwt.secret_env {var}");
                    let value = std::env::var_os(var)
                        .ok_or_else(|| format!("{shown}: the variable is not set"))?;
                    (value.as_encoded_bytes().trim_ascii().to_vec(), shown)
                }
                (None, None) => {
                    return Err("auth.jwt: set `secret_file` or `secret_env`".to_string())
                }
            };
            if secret.len() < MIN_SECRET {
                return Err(format!(
                    "{source}: the secret has {} bytes; use at least {MIN_SECRET} random bytes \
                     (e.g. `openssl rand -base64 48`)",
                    secret.len()
                ));
            }
            (
                DecodingKey::from_secret(&secret),
                Some(EncodingKey::from_secret(&secret)),
            )
        } else {
            let Some(public) = &cfg.public_key_file else {
                return Err("auth.jwt.public_key_file: required for RS*/ES* algorithms".into());
            };
            let shown = format!("auth.jwt.public_key_file {}", public.display());
            let pem = std::fs::read(public).map_err(|e| format!("{shown}: cannot read: {e}"))?;
            let rsa = matches!(cfg.algorithm, JwtAlgorithm::RS256 | JwtAlgorithm::RS384);
            let decoding = if rsa {
                DecodingKey::from_rsa_pem(&pem)
            } else {
                DecodingKey::from_ec_pem(&pem)
            }
            .map_err(|e| format!("{shown}: not a PEM public key for {:?}: {e}", cfg.algorithm))?;
            let encoding = match &cfg.private_key_file {
                None => None,
                Some(private) => {
                    let shown = format!("auth.jwt.private_key_file {}", private.display());
                    let pem =
                        std::fs::read(private).map_err(|e| format!("{shown}: cannot read: {e}"))?;
                    let key = if rsa {
                        EncodingKey::from_rsa_pem(&pem)
                    } else {
                        EncodingKey::from_ec_pem(&pem)
                    }
                    .map_err(|e| {
                        format!(
                            "{shown}: not a PEM private key for {:?} (PKCS#8 `BEGIN PRIVATE KEY`): {e}",
                            cfg.algorithm
                        )
                    })?;
                    Some(key)
                }
            };
            (decoding, encoding)
        };

        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required: HashSet<String> = HashSet::from(["exp".to_string()]);
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            required.insert("iss".into());
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        validation.required_spec_claims = required;

        let keys = JwtKeys {
            algorithm: alg,
            decoding,
            encoding,
            validation,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            ttl: cfg.token_ttl_seconds,
        };
        if keys.encoding.is_some() {
            keys.self_test()?;
        }
        Ok(keys)
    }

    /// Sign and verify a probe token, so a key pair that does not match (or
    /// does not fit the algorithm) fails at startup, not at first login.
    fn self_test(&self) -> Result<(), String> {
        let token = self.sign(0, "probe@infergate", 0, now()).map_err(|e| {
            format!(
                "auth.jwt.private_key_file: cannot sign {:?} tokens with this key: {e}",
                self.algorithm
            )
        })?;
        self.verify(&token).map(|_| ()).map_err(|_| {
            "auth.jwt.private_key_file: a token it signs does not verify with \
             public_key_file; they are not a key pair for this algorithm"
                .to_string()
        })
    }

    /// Whether this gateway can issue tokens (login enabled).
    pub(crate) fn can_sign(&self) -> bool {
        self.encoding.is_some()
    }

    /// A token for `user`, valid for `token_ttl_seconds`.
    pub(crate) fn issue(&self, user: &UserRecord) -> Result<String, String> {
        self.sign(user.user_id, user.email(), user.version, now())
    }

    fn sign(&self, user_id: u64, email: &str, version: u64, iat: u64) -> Result<String, String> {
        let Some(key) = &self.encoding else {
            return Err("no signing key configured".into());
        };
        let claims = Issued {
            sub: user_id.to_string(),
            user_id,
            email,
            version,
            iat,
            exp: iat.saturating_add(self.ttl),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| format!("signing failed: {e}"))
    }

    /// Check signature, algorithm and claims; the user is checked by the caller.
    pub(crate) fn verify(&self, token: &str) -> Result<Verified, JwtError> {
        let data = jsonwebtoken::decode::<Incoming>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => JwtError::Expired,
                ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
                ErrorKind::InvalidAudience => JwtError::WrongAudience,
                _ => JwtError::Invalid,
            })?;
        let claims = data.claims;
        let user_id = match (claims.user_id, claims.sub.as_deref()) {
            (Some(id), _) => id,
            (None, Some(sub)) => sub.parse().map_err(|_| JwtError::Invalid)?,
            (None, None) => return Err(JwtError::Invalid),
        };
        if let Some(sub) = claims.sub.as_deref() {
            if sub != user_id.to_string() {
                return Err(JwtError::Invalid);
            }
        }
        Ok(Verified {
            user_id,
            version: claims.version,
        })
    }
}

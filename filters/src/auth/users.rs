//! The users file (YAML; JSON parses too):
//!
//! ```yaml
//! users:
//!   - user_id: 123
//!     email: test@example.com
//!     password_hash: "$argon2id$v=19$m=19456,t=2,p=1$..."   # infergate users add
//!     version: 1          # raise to revoke every token issued to this user
//!     role: user          # or admin
//!     enabled: true
//!     models: [qwen]      # optional; absent = all
//!     limits: {requests_per_second: 2}   # optional
//!     quota: 100000       # optional, total tokens
//! ```

use super::{check_limits, redact_quoted};
use crate::{Identity, LimitSpec, Priority, Role};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<serde_yaml::Value>,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    user_id: u64,
    email: String,
    password_hash: String,
    #[serde(default = "one")]
    version: u64,
    #[serde(default = "user_role")]
    role: Role,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limits: Option<LimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quota: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

fn one() -> u64 {
    1
}
fn user_role() -> Role {
    Role::User
}
fn yes() -> bool {
    true
}

/// One loaded user.
pub(crate) struct UserRecord {
    pub user_id: u64,
    pub password_hash: String,
    pub version: u64,
    pub enabled: bool,
    pub identity: Arc<Identity>,
}

impl UserRecord {
    pub(crate) fn email(&self) -> &str {
        &self.identity.user
    }
}

/// Loaded users, by id and by lower-cased email.
#[derive(Default)]
pub(crate) struct UserTable {
    by_id: HashMap<u64, UserRecord>,
    by_email: HashMap<String, u64>,
}

/// A user as `add_user` leaves it (no password hash), for printing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserSummary {
    /// The user's id (`user:<id>` in logs and quota).
    pub user_id: u64,
    /// The email as written in the file.
    pub email: String,
    /// `user` or `admin`.
    pub role: Role,
    /// Tokens carrying an older version are refused.
    pub version: u64,
    /// Disabled users cannot log in and their tokens are refused.
    pub enabled: bool,
    /// Whether the user was created (false: an existing user was updated).
    pub created: bool,
}

/// A valid argon2id hash whose password nobody knows: unknown emails are
/// verified against it so they cost as much as wrong passwords.
pub(crate) const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$\
    aW5mZXJnYXRlLWR1bW15LXNhbHQ$\
    v7ZlRQO3y0Hf8XqkQ2cXm0J1sXw8a5Jq0bGm7wQ1c2M";

fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Entries of a users file, each checked; `Err` names the entry.
fn parse_entries(bytes: &[u8], file: &Path) -> Result<Vec<UserEntry>, String> {
    let shown = file.display();
    let text =
        std::str::from_utf8(bytes).map_err(|_| format!("users_file {shown}: not UTF-8 text"))?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let expected = "expected `users: [{user_id, email, password_hash}]`";
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        format!(
            "users_file {shown}: {}; {expected}",
            redact_quoted(&e.to_string())
        )
    })?;
    // serde reads a struct from a sequence too: `[]` or `[[]]` would load as
    // no users at all, silently
    if !value.is_mapping() {
        return Err(format!(
            "users_file {shown}: the file is not a mapping; {expected}"
        ));
    }
    let parsed: UsersFile = serde_yaml::from_value(value).map_err(|e| {
        format!(
            "users_file {shown}: {}; {expected}",
            redact_quoted(&e.to_string())
        )
    })?;
    let mut entries = Vec::with_capacity(parsed.users.len());
    let mut ids: HashMap<u64, usize> = HashMap::new();
    let mut emails: HashMap<String, usize> = HashMap::new();
    for (i, value) in parsed.users.into_iter().enumerate() {
        let at = |msg: String| format!("users_file {shown}: users[{i}]: {msg}");
        let entry: UserEntry =
            serde_yaml::from_value(value).map_err(|e| at(redact_quoted(&e.to_string())))?;
        let email = normalize_email(&entry.email);
        if email.is_empty() || email.chars().any(char::is_whitespace) {
            return Err(at("`email` is empty or contains whitespace".into()));
        }
        match PasswordHash::new(&entry.password_hash) {
            Ok(h) if h.algorithm.as_str().starts_with("argon2") && h.hash.is_some() => {
                if !affordable(&h) {
                    return Err(at(format!(
                        "({email}) `password_hash` asks for more than m=1048576 (1 GiB), \
                         t=64 or p=16; every login would cost that much"
                    )));
                }
            }
            _ => {
                return Err(at(format!(
                    "({email}) `password_hash` is not an argon2 PHC string \
                     ($argon2id$v=19$...); set it with `infergate users add`"
                )))
            }
        }
        if let Some(limits) = &entry.limits {
            check_limits(limits).map_err(at)?;
        }
        super::share(entry.priority, entry.weight).map_err(at)?;
        if let Some(first) = ids.insert(entry.user_id, i) {
            return Err(at(format!(
                "user_id {} is also used by users[{first}]",
                entry.user_id
            )));
        }
        if let Some(first) = emails.insert(email.clone(), i) {
            return Err(at(format!(
                "email {email} is also used by users[{first}] (emails are case-insensitive)"
            )));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Whether verifying against `hash` costs a sane amount of memory and time
/// (a typo in `m=` must not make every login allocate gigabytes).
fn affordable(hash: &PasswordHash<'_>) -> bool {
    let get = |name: &str, default: u32| hash.params.get_decimal(name).unwrap_or(default);
    get("m", 19_456) <= 1_048_576 && get("t", 2) <= 64 && get("p", 1) <= 16
}

impl UserTable {
    /// Parse a users file; `Err` names the file and the entry.
    pub(crate) fn parse(bytes: &[u8], file: &Path) -> Result<UserTable, String> {
        let entries = parse_entries(bytes, file)?;
        let mut table = UserTable::default();
        for e in entries {
            let identity = Identity {
                id: format!("user:{}", e.user_id),
                user: e.email.trim().to_string(),
                role: e.role,
                models: e.models,
                limits: e.limits.unwrap_or_default(),
                quota: e.quota,
                share: super::share(e.priority, e.weight).unwrap_or_default(),
            };
            table.by_email.insert(normalize_email(&e.email), e.user_id);
            table.by_id.insert(
                e.user_id,
                UserRecord {
                    user_id: e.user_id,
                    password_hash: e.password_hash,
                    version: e.version,
                    enabled: e.enabled,
                    identity: Arc::new(identity),
                },
            );
        }
        Ok(table)
    }

    /// The user with this email (case-insensitive), enabled or not.
    pub(crate) fn by_email(&self, email: &str) -> Option<&UserRecord> {
        let id = self.by_email.get(&normalize_email(email))?;
        self.by_id.get(id)
    }

    /// The identity of an enabled user whose version is still `version`.
    pub(crate) fn current(&self, user_id: u64, version: u64) -> Option<Arc<Identity>> {
        self.by_id
            .get(&user_id)
            .filter(|u| u.enabled && u.version == version)
            .map(|u| Arc::clone(&u.identity))
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Enabled users' identities, by user id.
    pub(crate) fn identities(&self) -> Vec<Arc<Identity>> {
        let mut all: Vec<_> = self.by_id.values().filter(|u| u.enabled).collect();
        all.sort_by_key(|u| u.user_id);
        all.into_iter().map(|u| Arc::clone(&u.identity)).collect()
    }
}

/// Hash a password with argon2id and the library's default parameters
/// (m=19456 KiB, t=2, p=1), as a PHC string for `password_hash`.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt_bytes: [u8; 16] = rand::rng().random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| format!("salt: {e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `password` matches the PHC string `hash` (parameters are read
/// from the string). A malformed hash never matches.
pub(crate) fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Create or update a user in `users_file` (created if missing), written
/// atomically (temporary file, then rename).
///
/// An existing email (case-insensitive) gets the new password hash and role,
/// and its `version` is raised, which revokes every token issued before. A
/// new user gets `user_id` or, if `None`, the highest id + 1. Passwords must
/// have at least 8 characters.
pub fn add_user(
    users_file: &Path,
    email: &str,
    password: &str,
    role: Role,
    user_id: Option<u64>,
) -> Result<UserSummary, String> {
    let shown = users_file.display();
    let email = email.trim();
    if email.is_empty() || email.chars().any(char::is_whitespace) || !email.contains('@') {
        return Err(format!("`{email}` is not an email address"));
    }
    if password.chars().count() < 8 {
        return Err("the password must have at least 8 characters".into());
    }
    let bytes = match std::fs::read(users_file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("users_file {shown}: cannot read: {e}")),
    };
    let mut entries = parse_entries(&bytes, users_file)?;
    let password_hash = hash_password(password)?;
    let wanted = normalize_email(email);
    let summary = match entries
        .iter_mut()
        .find(|e| normalize_email(&e.email) == wanted)
    {
        Some(existing) => {
            if let Some(id) = user_id.filter(|id| *id != existing.user_id) {
                return Err(format!(
                    "{email} already exists with user_id {}, not {id}",
                    existing.user_id
                ));
            }
            existing.password_hash = password_hash;
            existing.role = role;
            existing.version = existing.version.saturating_add(1);
            summary_of(existing, false)
        }
        None => {
            let id = match user_id {
                Some(id) if entries.iter().any(|e| e.user_id == id) => {
                    return Err(format!("user_id {id} is already taken"))
                }
                Some(id) => id,
                None => entries
                    .iter()
                    .map(|e| e.user_id)
                    .max()
                    .map_or(1, |m| m.saturating_add(1)),
            };
            let entry = UserEntry {
                user_id: id,
                email: email.to_string(),
                password_hash,
                version: 1,
                role,
                enabled: true,
                models: None,
                limits: None,
                quota: None,
                priority: None,
                weight: None,
            };
            let summary = summary_of(&entry, true);
            entries.push(entry);
            summary
        }
    };
    write_users(users_file, &entries)?;
    Ok(summary)
}

fn summary_of(e: &UserEntry, created: bool) -> UserSummary {
    UserSummary {
        user_id: e.user_id,
        email: e.email.clone(),
        role: e.role,
        version: e.version,
        enabled: e.enabled,
        created,
    }
}

#[derive(Serialize)]
struct UsersOut<'a> {
    users: &'a [UserEntry],
}

/// Write the file through a temporary file in the same directory and a
/// rename, so readers (and the watcher) never see half a file. New files
/// are readable by the owner only.
fn write_users(path: &Path, entries: &[UserEntry]) -> Result<(), String> {
    let shown = path.display();
    let text = serde_yaml::to_string(&UsersOut { users: entries })
        .map_err(|e| format!("users_file {shown}: cannot serialize: {e}"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "users".into());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::rng().random::<u32>()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("users_file {shown}: cannot write: {e}"));
    }
    Ok(())
}

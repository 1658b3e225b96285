//! The request path as routing, authorisation and the engine all see it.
//!
//! Normalised before anything decides on it (RFC 3986 §6.2.2): escapes of
//! unreserved characters are decoded (`%2e` → `.`, `%41` → `A`), the hex of
//! the other escapes is upper-cased, `//` runs are merged and dot segments
//! are removed (§5.2.4). The engine gets the normalised form, so a path the
//! gateway authorised is the path the engine serves.
//!
//! What normalising cannot make unambiguous is refused (400) instead of being
//! guessed at, as nginx does for `..` above the root:
//! - a `;` anywhere (path parameters: `/v1/..;/metrics` is `..` to Tomcat);
//! - a `\` or `%5C` (a separator to some servers);
//! - an encoded separator that would spell a dot segment or an empty segment
//!   once decoded (`..%2f`, `%2e%2e%2f`, `%2f%2f`); `%2F` inside a name, as in
//!   `/v1/models/Qwen%2FQwen2`, is kept;
//! - `%00`, control characters, a malformed escape, `..` above the root, a
//!   path that does not start with `/`.

use std::borrow::Cow;
use std::fmt;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    Parameters,
    Backslash,
    BadEscape,
    ControlCharacter,
    AboveRoot,
    EncodedDotSegment,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path must start with `/`",
            PathError::Parameters => "`;` path parameters are not accepted",
            PathError::Backslash => "`\\` (or `%5C`) is not accepted in a path",
            PathError::BadEscape => "a `%` must be followed by two hex digits",
            PathError::ControlCharacter => "control characters (and `%00`) are not accepted",
            PathError::AboveRoot => "`..` climbs above the root",
            PathError::EncodedDotSegment => {
                "an encoded `/` (`%2F`) would form a `.`, `..` or empty segment once decoded"
            }
        })
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The normalised path, borrowed when it was already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. escapes: decode unreserved, upper-case the rest, refuse the dangerous
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b';' => return Err(PathError::Parameters),
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let value = h * 16 + l;
                if value < 0x20 || value == 0x7f {
                    return Err(PathError::ControlCharacter);
                }
                if value == b'\\' {
                    return Err(PathError::Backslash);
                }
                if value == b';' {
                    return Err(PathError::Parameters);
                }
                if is_unreserved(value) {
                    decoded.push(value as char);
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                }
                i += 3;
                continue;
            }
            _ if b < 0x20 || b == 0x7f => return Err(PathError::ControlCharacter),
            _ => {}
        }
        // a multi-byte UTF-8 character is copied whole
        let len = utf8_len(b);
        let end = (i + len).min(bytes.len());
        decoded.push_str(path.get(i..end).ok_or(PathError::BadEscape)?);
        i = end;
    }
    // 2. segments: merge `//`, remove `.` and `..`
    let trailing_slash = decoded.len() > 1 && decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => segments.push(s),
        }
    }
    // 3. an encoded `/` must not hide a segment a decoding server would remove
    for segment in &segments {
        if segment.contains("%2F") {
            let hidden = segment.split("%2F");
            if hidden
                .clone()
                .any(|s| s.is_empty() || s == "." || s == "..")
            {
                return Err(PathError::EncodedDotSegment);
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xF7 => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Which forwarded paths users may reach, and which engine-internal paths
/// outside `/v1` admins may reach. An allowlist: a `/v1/*` path that is not
/// on it is an engine's business (its LoRA, cache, sleep and profiling
/// endpoints today, whatever an engine adds tomorrow) and needs the admin
/// role. Entries are exact paths, or a prefix ending in `/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPolicy {
    user: Vec<String>,
    engine: Vec<String>,
}

/// Forwarded to the engine for any caller with a key (besides the inference
/// endpoints and `/v1/models`, which are always served).
pub const DEFAULT_USER_PATHS: &[&str] = &[
    "/v1/responses",
    "/v1/responses/*",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/images/generations",
    "/v1/moderations",
    "/v1/rerank",
    "/v1/score",
    "/v1/classify",
    "/v1/pooling",
    "/v2/rerank",
    "/rerank",
    "/score",
    "/classify",
    "/pooling",
    "/tokenize",
    "/detokenize",
];

/// Engine management endpoints outside `/v1` (vLLM, SGLang) that an admin
/// may reach through the gateway. `/v1/*` paths not on the user list are
/// engine-internal without being listed.
pub const DEFAULT_ENGINE_PATHS: &[&str] = &[
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/start_profile",
    "/stop_profile",
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
    "/server_info",
    "/load_lora_adapter",
    "/unload_lora_adapter",
    "/flush_cache",
    "/get_server_info",
    "/get_model_info",
    "/update_weights_from_disk",
    "/pause_generation",
    "/continue_generation",
    "/abort_request",
];

impl Default for PathPolicy {
    fn default() -> Self {
        PathPolicy::new(&[], &[])
    }
}

impl PathPolicy {
    /// The defaults plus the configured extra entries.
    pub fn new(extra_user: &[String], extra_engine: &[String]) -> PathPolicy {
        let list = |defaults: &[&str], extra: &[String]| {
            defaults
                .iter()
                .map(|s| s.to_string())
                .chain(extra.iter().cloned())
                .collect()
        };
        PathPolicy {
            user: list(DEFAULT_USER_PATHS, extra_user),
            engine: list(DEFAULT_ENGINE_PATHS, extra_engine),
        }
    }

    fn listed(list: &[String], path: &str) -> bool {
        list.iter().any(|entry| match entry.strip_suffix("/*") {
            Some(prefix) => path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
            None => entry == path,
        })
    }

    pub fn user_may_reach(&self, path: &str) -> bool {
        PathPolicy::listed(&self.user, path)
    }

    pub fn is_engine_internal(&self, path: &str) -> bool {
        PathPolicy::listed(&self.engine, path)
    }
}

/// What an entry of `routing.user_paths` / `routing.engine_admin_paths` must
/// look like: a normalised absolute path, optionally ending in `/*`.
pub fn check_policy_entry(entry: &str) -> Result<(), String> {
    let base = entry.strip_suffix("/*").unwrap_or(entry);
    if base.is_empty() || base.contains('*') || base.contains('?') {
        return Err(format!(
            "`{entry}`: give an exact path such as /v1/audio/speech, or a prefix ending in /*"
        ));
    }
    match normalize(base) {
        Ok(normal) if normal == base => Ok(()),
        Ok(normal) => Err(format!("`{entry}` is not in normal form; write `{normal}`")),
        Err(e) => Err(format!("`{entry}`: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str) -> String {
        match normalize(path) {
            Ok(p) => p.into_owned(),
            Err(e) => format!("ERR {e:?}"),
        }
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/v1/chat/completions",
            "/v1/models/Qwen%2FQwen2",
            "/v1/models/",
        ] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn dot_segments_are_removed_in_every_spelling() {
        assert_eq!(ok("/v1/../admin/engines"), "/admin/engines");
        assert_eq!(ok("/v1/%2e%2e/admin/engines"), "/admin/engines");
        assert_eq!(ok("/v1/%2E%2e/admin/engines"), "/admin/engines");
        assert_eq!(ok("/v1/.%2e/metrics"), "/metrics");
        assert_eq!(ok("/v1/../metrics"), "/metrics");
        assert_eq!(ok("/v1/./chat/./completions"), "/v1/chat/completions");
        assert_eq!(ok("/v1/chat/completions/.."), "/v1/chat/");
        assert_eq!(ok("/v1/x/."), "/v1/x/");
    }

    #[test]
    fn slashes_are_merged() {
        assert_eq!(ok("//v1//chat///completions"), "/v1/chat/completions");
        assert_eq!(ok("//"), "/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_uppercased() {
        assert_eq!(ok("/v1/%63hat/completions"), "/v1/chat/completions");
        assert_eq!(ok("/v1/models/a%2fb"), "/v1/models/a%2Fb");
        assert_eq!(ok("/v1/models/a%20b"), "/v1/models/a%20b");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(normalize("/../metrics"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/v1/../../x"), Err(PathError::AboveRoot));
        assert_eq!(
            normalize("/v1/..%2fmetrics"),
            Err(PathError::EncodedDotSegment)
        );
        assert_eq!(
            normalize("/v1/%2e%2e%2fmetrics"),
            Err(PathError::EncodedDotSegment)
        );
        assert_eq!(
            normalize("/v1/%2f%2fmetrics"),
            Err(PathError::EncodedDotSegment)
        );
        assert_eq!(
            normalize("/v1/models/%2F"),
            Err(PathError::EncodedDotSegment)
        );
        assert_eq!(normalize("/v1/..;/metrics"), Err(PathError::Parameters));
        assert_eq!(
            normalize("/v1/chat/completions;x=1"),
            Err(PathError::Parameters)
        );
        assert_eq!(normalize("/v1/%3b/x"), Err(PathError::Parameters));
        assert_eq!(normalize("/v1\\..\\metrics"), Err(PathError::Backslash));
        assert_eq!(normalize("/v1/%5c../metrics"), Err(PathError::Backslash));
        assert_eq!(normalize("/v1/%00"), Err(PathError::ControlCharacter));
        assert_eq!(normalize("/v1/%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/v1/%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("v1/x"), Err(PathError::NotAbsolute));
        assert_eq!(normalize(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn utf8_is_kept() {
        assert_eq!(ok("/v1/models/é/../ü"), "/v1/models/ü");
    }

    #[test]
    fn normalizing_is_idempotent() {
        for p in [
            "/v1/%2e%2e/admin",
            "//a//b/./c/..",
            "/v1/models/a%2fb",
            "/x/%7e/",
        ] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p}");
        }
    }
}

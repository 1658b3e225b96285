//! Path normalisation (`src/path.rs`, `normalize`).
//!
//! Input: the request path (UTF-8; anything else is not a `&str` path).
//!
//! Checks on every accepted path: the result is absolute and itself normal
//! (`normalize(out)` is `out`, borrowed); it has no `//`, no `.` or `..`
//! segment, no `;`, `\`, control character or malformed escape; every escape
//! is upper-case and of a reserved character; no `%2F` hides an empty or dot
//! segment; an input returned borrowed was already its own normal form; and
//! `check_policy_entry` accepts it.

#![no_main]

use infergate::path::{check_policy_entry, normalize};
use libfuzzer_sys::fuzz_target;
use std::borrow::Cow;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(out) = normalize(path) else {
        return;
    };
    if let Cow::Borrowed(b) = &out {
        assert_eq!(*b, path);
    }
    let out: &str = &out;
    assert!(out.starts_with('/'), "{out:?}");
    assert!(!out.contains("//"), "{path:?} -> {out:?}");
    for segment in out.split('/').skip(1) {
        assert!(segment != "." && segment != "..", "{path:?} -> {out:?}");
        if segment.contains("%2F") {
            assert!(
                segment
                    .split("%2F")
                    .all(|s| !s.is_empty() && s != "." && s != ".."),
                "{path:?} -> {out:?}"
            );
        }
    }
    let bytes = out.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        assert!(b >= 0x20 && b != 0x7f && b != b';' && b != b'\\', "{out:?}");
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).unwrap_or_else(|| panic!("{out:?}"));
            assert!(
                hex.iter()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                "{path:?} -> {out:?}"
            );
            let value = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16);
            let value = value.unwrap_or_else(|_| panic!("{out:?}"));
            assert!(
                !unreserved(value),
                "{path:?} -> {out:?}: %{value:02X} left encoded"
            );
        }
    }
    match normalize(out) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, out),
        other => panic!("not idempotent: {path:?} -> {out:?} -> {other:?}"),
    }
    if !out.contains('*') && !out.contains('?') {
        assert_eq!(check_policy_entry(out), Ok(()), "{path:?} -> {out:?}");
    }
});

//! Percent-decoding, one behaviour for the whole gateway: `%XX` escapes are
//! decoded (by the `percent-encoding` crate), `+` stays `+`, and a malformed
//! escape or a result that is not UTF-8 is refused (`None`) rather than
//! guessed at. Used for `?token=` credentials and for ids in paths.

/// `%XX` decoding; `None` if an escape is malformed or the result is not UTF-8.
pub fn decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|text| text.into_owned())
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decodes_strictly() {
        assert_eq!(decode("a%20b+c").as_deref(), Some("a b+c"));
        assert_eq!(decode("Qwen%2FQwen2").as_deref(), Some("Qwen/Qwen2"));
        assert_eq!(decode("plain").as_deref(), Some("plain"));
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%4"), None);
        assert_eq!(decode("a%"), None);
        assert_eq!(decode("%ff"), None, "not UTF-8");
        assert_eq!(decode("%C3%A9").as_deref(), Some("é"));
    }
}

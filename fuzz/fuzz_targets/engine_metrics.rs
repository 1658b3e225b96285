//! Engine metrics (`routing::signals::parse`) and the prefix index
//! (`routing::PromptKey`, `PrefixIndex::route`) on arbitrary bytes.
//!
//! Input: any bytes, read as (lossy) UTF-8 Prometheus text, and as a prompt.
//!
//! Checks: the parser never panics; what it returns is a signal set with
//! finite, non-negative counts and usage ratios in 0..=1; a prompt routes
//! to the position chosen and its second lookup matches all its blocks.

#![no_main]

use infergate::routing::signals::parse;
use infergate::routing::{PrefixIndex, PromptKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(s) = parse(&text) {
        for v in [s.running, s.waiting, s.prefix_queries, s.prefix_hits].into_iter().flatten() {
            assert!(v.is_finite() && v >= 0.0, "{s:?}");
        }
        for v in [s.kv_usage, s.hit_rate].into_iter().flatten() {
            assert!((0.0..=1.0).contains(&v), "{s:?}");
        }
        assert!(s.running.is_some() || s.waiting.is_some() || s.kv_usage.is_some());
    }
    let index = PrefixIndex::new(64 * 1024, 16);
    let key = PromptKey::new(&[b"m"], data, 16).with_session(Some(b"s"));
    assert_eq!(index.route(&key, |_| Some(3)), Some(3));
    index.route(&key, |found| {
        if key.blocks.len() < 500 {
            // all of them fit the 64 KiB index (585 entries)
            assert_eq!(found.blocks, key.blocks.len());
        }
        if !key.blocks.is_empty() {
            assert_eq!(found.holders, 1 << 3);
        }
        assert_eq!(found.session, Some(3));
        None
    });
});

//! OpenAI's `x-ratelimit-*` response headers.
//!
//! Values are taken at admission, after this request's share was taken, from
//! the most constraining bucket of each kind (lowest remaining) among the
//! levels that apply (gateway, model, key): `limit` is the bucket size,
//! `remaining` what is left (never below 0), `reset` the time until the bucket
//! is full again, in OpenAI's Go-style format (`"1s"`, `"6m0s"`, `"20ms"`).
//! The requests trio is sent only when a requests-per-second limit applies,
//! the tokens trio only when a tokens-per-minute limit applies.

use super::TokenBucket;
use std::time::Duration;

/// `x-ratelimit-limit-requests`
pub const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
/// `x-ratelimit-remaining-requests`
pub const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
/// `x-ratelimit-reset-requests`
pub const RESET_REQUESTS: &str = "x-ratelimit-reset-requests";
/// `x-ratelimit-limit-tokens`
pub const LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
/// `x-ratelimit-remaining-tokens`
pub const REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
/// `x-ratelimit-reset-tokens`
pub const RESET_TOKENS: &str = "x-ratelimit-reset-tokens";

/// Every header this module can emit (for CORS `Access-Control-Expose-Headers`).
pub const RATE_LIMIT_HEADERS: [&str; 6] = [
    LIMIT_REQUESTS,
    REMAINING_REQUESTS,
    RESET_REQUESTS,
    LIMIT_TOKENS,
    REMAINING_TOKENS,
    RESET_TOKENS,
];

/// One bucket as the headers report it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BucketView {
    capacity: f64,
    level: f64,
    reset: Duration,
}

impl BucketView {
    /// From figures reported elsewhere (the Redis store).
    pub(crate) fn new(capacity: f64, level: f64, reset: Duration) -> Self {
        BucketView {
            capacity,
            level,
            reset,
        }
    }

    pub(crate) fn of(bucket: &mut TokenBucket) -> Self {
        BucketView {
            level: bucket.remaining(),
            reset: bucket.until_full(),
            capacity: bucket.capacity(),
        }
    }

    /// Keep whichever of `self` and `other` has less left.
    pub(crate) fn tighter(self, other: Option<BucketView>) -> BucketView {
        match other {
            Some(o) if o.level <= self.level => o,
            _ => self,
        }
    }
}

/// The header list for the tightest requests and tokens buckets, if any.
pub(crate) fn rate_limit_headers(
    requests: Option<BucketView>,
    tokens: Option<BucketView>,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(6);
    let trios = [
        (
            requests,
            [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS],
        ),
        (tokens, [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS]),
    ];
    for (view, [limit, remaining, reset]) in trios {
        if let Some(v) = view {
            out.push((limit, whole(v.capacity).to_string()));
            out.push((remaining, whole(v.level).to_string()));
            out.push((reset, format_duration(v.reset)));
        }
    }
    out
}

/// floor(x) as an integer, 0 for negatives and NaN (`as` saturates).
fn whole(x: f64) -> u64 {
    if x > 0.0 {
        x.floor() as u64
    } else {
        0
    }
}

/// A duration the way OpenAI (Go) writes it: `"0s"`, `"20ms"`, `"1s"`,
/// `"1.5s"`, `"6m0s"`, `"1h0m0s"`. Rounded up to the millisecond, so a bucket
/// that is not yet full never reports `"0s"`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let frac = format!("{frac:03}");
        out.push_str(&format!("{s}.{}s", frac.trim_end_matches('0')));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::clock::{advance, pause};

    #[test]
    fn durations_look_like_openai() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ms"),
            (Duration::from_millis(20), "20ms"),
            (Duration::from_millis(999), "999ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(1250), "1.25s"),
            (Duration::from_millis(59_001), "59.001s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(90_500), "1m30.5s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(3723), "1h2m3s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want, "{d:?}");
        }
        assert!(format_duration(Duration::MAX).ends_with('s'), "no overflow");
    }

    #[test]
    fn headers_report_the_tightest_bucket_and_only_kinds_that_apply() {
        pause();
        let mut roomy = TokenBucket::new(100.0, 10.0);
        let mut tight = TokenBucket::new(10.0, 10.0);
        tight.take(9.5);
        let requests = BucketView::of(&mut roomy).tighter(Some(BucketView::of(&mut tight)));
        let h = rate_limit_headers(Some(requests), None);
        assert_eq!(
            h,
            vec![
                (LIMIT_REQUESTS, "10".to_string()),
                (REMAINING_REQUESTS, "0".to_string()),
                (RESET_REQUESTS, "950ms".to_string()),
            ]
        );
        let mut tokens = TokenBucket::new(60_000.0, 1000.0);
        tokens.take(70_000.0);
        let h = rate_limit_headers(None, Some(BucketView::of(&mut tokens)));
        assert_eq!(
            h,
            vec![
                (LIMIT_TOKENS, "60000".to_string()),
                (REMAINING_TOKENS, "0".to_string(),),
                (RESET_TOKENS, "1m10s".to_string()),
            ],
            "a debt shows as 0 remaining and a longer reset"
        );
        advance(Duration::from_secs(70));
        let h = rate_limit_headers(None, Some(BucketView::of(&mut tokens)));
        assert_eq!(h[1].1, "60000");
        assert_eq!(h[2].1, "0s");
        assert!(rate_limit_headers(None, None).is_empty());
    }
}

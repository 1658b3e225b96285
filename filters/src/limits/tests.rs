//! Admission as the gateway drives it: `Limits::admit`, settle, drop.
//! Time is this thread's paused clock (see `clock`).

use super::clock::{advance, pause};
use super::quota_store::tests::TempDir;
use super::*;
use crate::LimitSpec;
use crate::{Rejection, Role};
use std::path::PathBuf;
use std::time::Duration;

fn spec(
    rps: Option<f64>,
    burst: Option<u32>,
    concurrent: Option<u32>,
    tpm: Option<u64>,
) -> LimitSpec {
    LimitSpec {
        requests_per_second: rps,
        burst,
        concurrent,
        tokens_per_minute: tpm,
    }
}

fn key(id: &str) -> Identity {
    Identity {
        id: id.to_string(),
        user: format!("{id}-owner"),
        role: Role::User,
        models: None,
        limits: LimitSpec::default(),
        quota: None,
        share: Default::default(),
    }
}

fn limits(config: LimitsConfig) -> Limits {
    pause();
    Limits::new(config).unwrap()
}

fn per_key(s: LimitSpec) -> LimitsConfig {
    LimitsConfig {
        per_key: s,
        ..LimitsConfig::default()
    }
}

/// A request with a prompt estimate and max_tokens.
fn req(prompt: u64, max_out: Option<u64>) -> AdmitInfo<'static> {
    AdmitInfo {
        model: None,
        prompt_tokens_estimate: prompt,
        max_output_tokens: max_out,
    }
}

fn header<'a>(headers: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
}

fn status(l: &Limits, id: &str) -> PrincipalStatus {
    l.snapshot().into_iter().find(|s| s.id == id).unwrap()
}

fn usage(prompt: u64, completion: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        estimated: false,
    }
}

#[test]
fn limits_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Limits>();
    check::<LimitsFilter>();
    check::<Admission>();
}

#[test]
fn requests_per_second_refuses_then_recovers() {
    let l = limits(per_key(spec(Some(2.0), None, None, None)));
    let k = key("key:a");
    assert!(l.admit(Some(&k), &req(1, Some(1))).is_ok());
    assert!(l.admit(Some(&k), &req(1, Some(1))).is_ok());
    let r = l.admit(Some(&k), &req(1, Some(1))).unwrap_err();
    assert_eq!(
        (r.status, r.error_type, r.code),
        (429, "requests", "rate_limit_exceeded")
    );
    assert_eq!(r.retry_after, Some(1));
    assert_eq!(
        r.message,
        "Rate limit reached for requests per second (limit 2/s) on this key. Retry after 1 s."
    );
    advance(Duration::from_millis(499));
    assert!(l.admit(Some(&k), &req(1, Some(1))).is_err());
    advance(Duration::from_millis(1));
    assert!(l.admit(Some(&k), &req(1, Some(1))).is_ok());
    // Another key has its own bucket.
    assert!(l.admit(Some(&key("key:b")), &req(1, Some(1))).is_ok());
}

#[test]
fn slow_rates_give_long_retry_after() {
    let l = limits(per_key(spec(Some(0.1), None, None, None)));
    let k = key("key:a");
    assert!(l.admit(Some(&k), &req(1, None)).is_ok());
    let r = l.admit(Some(&k), &req(1, None)).unwrap_err();
    assert_eq!(r.retry_after, Some(10));
    assert!(r.message.contains("limit 0.1/s"), "{}", r.message);
}

#[test]
fn burst_allows_a_spike_at_the_gateway_level() {
    let l = limits(LimitsConfig {
        global: spec(Some(1.0), Some(5), None, None),
        ..LimitsConfig::default()
    });
    for i in 0..5 {
        assert!(l
            .admit(Some(&key(&format!("key:{i}"))), &req(1, None))
            .is_ok());
    }
    let r = l.admit(None, &req(1, None)).unwrap_err();
    assert!(r.message.contains("on the gateway"), "{}", r.message);
    advance(Duration::from_secs(1));
    assert!(l.admit(None, &req(1, None)).is_ok());
    assert!(l.admit(None, &req(1, None)).is_err());
}

#[test]
fn concurrency_slots_free_on_settle_and_on_drop() {
    let l = limits(per_key(spec(None, None, Some(2), None)));
    let k = key("key:a");
    let a = l.admit(Some(&k), &req(1, None)).unwrap();
    let b = l.admit(Some(&k), &req(1, None)).unwrap();
    let r = l.admit(Some(&k), &req(1, None)).unwrap_err();
    assert_eq!(
        (r.error_type, r.code, r.retry_after),
        ("requests", "rate_limit_exceeded", Some(1))
    );
    assert!(
        r.message.contains("this key (limit 2 at once)"),
        "{}",
        r.message
    );
    assert_eq!(status(&l, "key:a").in_flight, 2);
    a.settle(usage(1, 1));
    let c = l.admit(Some(&k), &req(1, None)).unwrap();
    drop(b);
    let d = l.admit(Some(&k), &req(1, None)).unwrap();
    assert!(l.admit(Some(&k), &req(1, None)).is_err());
    drop((c, d));
    assert_eq!(status(&l, "key:a").in_flight, 0);
}

#[test]
fn model_limits_apply_to_that_model_only() {
    let mut models = BTreeMap::new();
    models.insert("qwen".to_string(), spec(None, None, Some(1), None));
    let l = limits(LimitsConfig {
        models,
        ..LimitsConfig::default()
    });
    let qwen = AdmitInfo {
        model: Some("qwen"),
        ..req(1, None)
    };
    let llama = AdmitInfo {
        model: Some("llama"),
        ..req(1, None)
    };
    let held = l.admit(None, &qwen).unwrap();
    let r = l.admit(Some(&key("key:b")), &qwen).unwrap_err();
    assert!(r.message.contains("model `qwen`"), "{}", r.message);
    let _other = l.admit(None, &llama).unwrap();
    drop(held);
    assert!(l.admit(None, &qwen).is_ok());
}

#[test]
fn tokens_reservation_is_settled_to_real_usage() {
    let l = limits(LimitsConfig {
        default_max_tokens: 100,
        ..per_key(spec(None, None, None, Some(1000)))
    });
    let k = key("key:a");
    let a = l.admit(Some(&k), &req(50, None)).unwrap();
    assert_eq!(a.reserved_tokens(), 150);
    assert_eq!(
        header(a.rate_limit_headers(), "x-ratelimit-remaining-tokens"),
        Some("850")
    );
    assert_eq!(status(&l, "key:a").reserved_tokens, 150);
    a.settle(usage(30, 20));
    let s = status(&l, "key:a");
    assert_eq!(
        s.tokens_remaining_this_minute,
        Some(950),
        "100 unused tokens refunded"
    );
    assert_eq!((s.reserved_tokens, s.tokens_used_since_start), (0, 50));

    // Using more than reserved is a debt.
    let b = l.admit(Some(&k), &req(10, Some(10))).unwrap();
    b.settle(usage(10, 990));
    assert_eq!(status(&l, "key:a").tokens_remaining_this_minute, Some(0));
    let r = l.admit(Some(&k), &req(10, Some(10))).unwrap_err();
    assert_eq!((r.error_type, r.code), ("tokens", "rate_limit_exceeded"));
    // Level is 950 - 1000 = -50; 20 tokens at 1000/60 per second: 4.2 s.
    assert_eq!(r.retry_after, Some(5));
    assert!(
        r.message.contains("limit 1000/min) on this key"),
        "{}",
        r.message
    );
    assert_eq!(header(&r.headers, "x-should-retry"), None);
    advance(Duration::from_millis(4200));
    assert!(l.admit(Some(&k), &req(10, Some(10))).is_ok());
}

#[test]
fn dropped_admission_refunds_the_whole_reservation() {
    let l = limits(per_key(spec(None, None, None, Some(600))));
    let k = key("key:a");
    let a = l.admit(Some(&k), &req(100, Some(400))).unwrap();
    assert!(l.admit(Some(&k), &req(100, Some(400))).is_err());
    drop(a);
    let s = status(&l, "key:a");
    assert_eq!(
        (s.tokens_remaining_this_minute, s.reserved_tokens),
        (Some(600), 0)
    );
    assert_eq!(s.tokens_used_since_start, 0);
    assert!(l.admit(Some(&k), &req(100, Some(400))).is_ok());
}

#[test]
fn request_larger_than_the_minute_limit_is_not_retryable() {
    let l = limits(per_key(spec(None, None, None, Some(1000))));
    let r = l
        .admit(Some(&key("key:a")), &req(200, Some(2000)))
        .unwrap_err();
    assert_eq!(
        (r.status, r.error_type, r.code),
        (429, "tokens", "rate_limit_exceeded")
    );
    assert_eq!(r.retry_after, None);
    assert_eq!(header(&r.headers, "x-should-retry"), Some("false"));
    assert_eq!(
        r.message,
        "Request too large: it may use up to 2200 tokens but the limit is 1000 tokens per minute; lower max_tokens or shorten the prompt."
    );
    assert_eq!(status(&l, "key:a").tokens_remaining_this_minute, Some(1000));
}

fn quota_limits(dir: &TempDir) -> Limits {
    limits(LimitsConfig {
        data_dir: Some(dir.0.clone()),
        ..LimitsConfig::default()
    })
}

fn with_quota(id: &str, quota: u64) -> Identity {
    Identity {
        quota: Some(quota),
        ..key(id)
    }
}

#[test]
fn exhausted_quota_is_insufficient_quota_and_persists() {
    let dir = TempDir::new();
    let l = quota_limits(&dir);
    assert!(l.has_store());
    let k = with_quota("key:q", 100);
    l.admit(Some(&k), &req(10, Some(10)))
        .unwrap()
        .settle(usage(60, 40));
    assert_eq!(l.quota_used("key:q"), 100);
    let r = l.admit(Some(&k), &req(1, Some(1))).unwrap_err();
    assert_eq!(
        (r.status, r.error_type, r.code),
        (429, "insufficient_quota", "insufficient_quota")
    );
    assert_eq!(r.retry_after, None);
    assert_eq!(header(&r.headers, "x-should-retry"), Some("false"));
    assert_eq!(
        r.message,
        "This key's token quota (100 tokens) is used up. Ask the gateway operator to raise the quota."
    );
    // Raising the quota in the keys file lets it through at once.
    assert!(l
        .admit(Some(&with_quota("key:q", 101)), &req(1, Some(1)))
        .is_ok());
    drop(l);

    let l = quota_limits(&dir);
    assert_eq!(l.quota_used("key:q"), 100);
    assert!(
        l.admit(Some(&k), &req(1, Some(1))).is_err(),
        "still used up after a restart"
    );
    let s = status(&l, "key:q");
    assert_eq!(
        (s.quota, s.quota_used, s.user.as_deref()),
        (Some(100), 100, Some("key:q-owner"))
    );
}

#[test]
fn quota_counts_reserved_tokens_by_running_requests() {
    let dir = TempDir::new();
    let l = quota_limits(&dir);
    let k = with_quota("key:q", 1000);
    let a = l.admit(Some(&k), &req(100, Some(500))).unwrap();
    let b = l.admit(Some(&k), &req(100, Some(500))).unwrap(); // 600 reserved < 1000
    let r = l.admit(Some(&k), &req(1, Some(1))).unwrap_err(); // 1200 reserved
    assert_eq!(r.code, "insufficient_quota");
    drop(a);
    b.settle(usage(100, 100));
    assert_eq!(
        l.quota_used("key:q"),
        200,
        "only settled usage is persisted"
    );
    assert_eq!(status(&l, "key:q").reserved_tokens, 0);
    assert!(l.admit(Some(&k), &req(1, Some(1))).is_ok());
}

#[test]
fn quota_is_checked_before_rate_limits() {
    let dir = TempDir::new();
    let l = limits(LimitsConfig {
        data_dir: Some(dir.0.clone()),
        ..per_key(spec(Some(1.0), None, None, None))
    });
    let k = with_quota("key:q", 10);
    l.admit(Some(&k), &req(5, Some(5)))
        .unwrap()
        .settle(usage(5, 5));
    let r = l.admit(Some(&k), &req(1, Some(1))).unwrap_err();
    assert_eq!(r.code, "insufficient_quota");
}

#[test]
fn identities_without_quota_are_not_persisted() {
    let dir = TempDir::new();
    let l = quota_limits(&dir);
    l.admit(Some(&key("key:free")), &req(1, None))
        .unwrap()
        .settle(usage(5, 5));
    assert_eq!(l.quota_used("key:free"), 0);
    assert_eq!(status(&l, "key:free").tokens_used_since_start, 10);
}

#[test]
fn quota_without_data_dir_counts_in_memory_and_warns_once() {
    let l = limits(LimitsConfig::default());
    assert!(!l.has_store());
    let k = with_quota("key:q", 10);
    l.admit(Some(&k), &req(1, Some(1)))
        .unwrap()
        .settle(usage(6, 4));
    assert_eq!(l.quota_used("key:q"), 10);
    assert!(l.admit(Some(&k), &req(1, Some(1))).is_err());
    let w = l.take_warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("key:q") && w[0].contains("data_dir"),
        "{}",
        w[0]
    );
}

#[test]
fn failed_check_gives_back_what_earlier_checks_took() {
    let l = limits(LimitsConfig {
        global: spec(Some(1.0), Some(3), Some(2), None),
        ..per_key(spec(None, None, Some(1), Some(100)))
    });
    let a = key("key:a");
    let _a1 = l.admit(Some(&a), &req(25, Some(25))).unwrap();
    // Fails at the key's concurrency, after the gateway's request and slot.
    let r = l.admit(Some(&a), &req(1, Some(1))).unwrap_err();
    assert!(r.message.contains("concurrent"), "{}", r.message);
    let b = key("key:b");
    // Fails at the key's tokens, after the gateway's request and slot.
    let r = l.admit(Some(&b), &req(100, Some(100))).unwrap_err();
    assert!(r.message.starts_with("Request too large"), "{}", r.message);
    assert_eq!(status(&l, "key:a").reserved_tokens, 50);
    assert_eq!(status(&l, "key:b").reserved_tokens, 0);
    assert_eq!(status(&l, "key:b").in_flight, 0);
    // The gateway's bucket of 3 lost only a1's request; its 2 slots only a1's.
    let _b1 = l.admit(Some(&b), &req(1, Some(1))).unwrap();
    let r = l.admit(Some(&key("key:c")), &req(1, Some(1))).unwrap_err();
    assert!(
        r.message.contains("concurrent requests on the gateway"),
        "{}",
        r.message
    );
    drop(_b1);
    let _c1 = l.admit(Some(&key("key:c")), &req(1, Some(1))).unwrap();
    // Now the bucket is empty: a1, b1, c1 (refused ones were given back).
    let r = l.admit(Some(&key("key:d")), &req(1, Some(1))).unwrap_err();
    assert!(r.message.contains("requests per second"), "{}", r.message);
}

#[test]
fn identity_limits_override_per_key_field_by_field() {
    let l = limits(per_key(spec(Some(1.0), None, Some(1), Some(500))));
    let k = Identity {
        limits: spec(Some(100.0), None, Some(3), None),
        ..key("key:big")
    };
    let held: Vec<_> = (0..3)
        .map(|_| l.admit(Some(&k), &req(10, Some(10))).unwrap())
        .collect();
    assert!(l
        .admit(Some(&k), &req(10, Some(10)))
        .unwrap_err()
        .message
        .contains("limit 3 at once"));
    drop(held);
    let s = status(&l, "key:big");
    assert_eq!(
        (s.concurrent, s.requests_per_second),
        (Some(3), Some(100.0))
    );
    assert_eq!(
        s.tokens_per_minute,
        Some(500),
        "unset field falls back to per_key"
    );
    let r = l.admit(Some(&k), &req(400, Some(200))).unwrap_err();
    assert!(r.message.contains("limit is 500 tokens"), "{}", r.message);
    // Invalid own values are ignored, not "unlimited".
    let odd = Identity {
        limits: spec(Some(f64::NAN), Some(0), Some(0), Some(0)),
        ..key("key:odd")
    };
    l.admit(Some(&odd), &req(1, Some(1)))
        .unwrap()
        .settle(usage(1, 1));
    let s = status(&l, "key:odd");
    assert_eq!(
        (s.concurrent, s.requests_per_second, s.tokens_per_minute),
        (Some(1), Some(1.0), Some(500))
    );
}

#[test]
fn identity_state_survives_reload_and_follows_new_limits() {
    let l = limits(per_key(spec(Some(1.0), Some(2), Some(1), None)));
    let k = key("key:a");
    let running = l.admit(Some(&k), &req(1, None)).unwrap();
    // Keys file reloaded: same id, new Identity value, bigger limits.
    let reloaded = Identity {
        limits: spec(None, Some(10), Some(2), None),
        user: "renamed".to_string(),
        ..key("key:a")
    };
    let s = status(&l, "key:a");
    assert_eq!((s.in_flight, s.requests_remaining), (1, Some(1)));
    let second = l.admit(Some(&reloaded), &req(1, None)).unwrap();
    let s = status(&l, "key:a");
    assert_eq!(s.in_flight, 2, "the running request is still counted");
    assert_eq!(s.concurrent, Some(2));
    assert_eq!(
        s.requests_remaining,
        Some(0),
        "a bigger bucket grants nothing at once"
    );
    assert_eq!(s.user.as_deref(), Some("renamed"));
    assert_eq!(
        header(second.rate_limit_headers(), "x-ratelimit-limit-requests"),
        Some("10")
    );
    drop((running, second));
    assert_eq!(status(&l, "key:a").in_flight, 0);
}

#[test]
fn headers_report_the_tightest_level_after_taking() {
    let l = limits(LimitsConfig {
        global: spec(Some(100.0), None, None, Some(1_000_000)),
        ..per_key(spec(Some(2.0), None, None, None))
    });
    let a = l.admit(Some(&key("key:a")), &req(40, Some(60))).unwrap();
    let h = a.rate_limit_headers();
    assert_eq!(header(h, "x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(header(h, "x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(header(h, "x-ratelimit-reset-requests"), Some("500ms"));
    assert_eq!(header(h, "x-ratelimit-limit-tokens"), Some("1000000"));
    assert_eq!(header(h, "x-ratelimit-remaining-tokens"), Some("999900"));
    assert_eq!(header(h, "x-ratelimit-reset-tokens"), Some("6ms"));
    assert_eq!(h.len(), 6);
    // Without identity only the gateway applies.
    let b = l.admit(None, &req(1, Some(1))).unwrap();
    assert_eq!(
        header(b.rate_limit_headers(), "x-ratelimit-limit-requests"),
        Some("100")
    );
    // A refusal carries them too, reflecting the state after give-back.
    l.admit(Some(&key("key:a")), &req(1, None)).unwrap();
    let r = l.admit(Some(&key("key:a")), &req(1, None)).unwrap_err();
    assert_eq!(
        header(&r.headers, "x-ratelimit-remaining-requests"),
        Some("0")
    );
    assert_eq!(header(&r.headers, "x-ratelimit-reset-requests"), Some("1s"));
    // No limits at all: no headers.
    let l = limits(LimitsConfig::default());
    assert!(l
        .admit(Some(&key("key:a")), &req(1, None))
        .unwrap()
        .rate_limit_headers()
        .is_empty());
}

#[test]
fn filter_stores_admission_and_headers_in_state() {
    let l = Arc::new(limits(per_key(spec(Some(1.0), None, None, None))));
    let filter = LimitsFilter(l.clone());
    assert_eq!(filter.name(), "limits");
    let mut state = FilterState {
        identity: Some(Arc::new(key("key:a"))),
        ..FilterState::default()
    };
    assert_eq!(filter.on_admit(&req(1, None), &mut state), Ok(()));
    assert!(state.admission.is_some());
    assert_eq!(
        header(&state.response_headers, "x-ratelimit-limit-requests"),
        Some("1")
    );
    let mut state2 = FilterState {
        identity: Some(Arc::new(key("key:a"))),
        ..FilterState::default()
    };
    let r: Rejection = filter.on_admit(&req(1, None), &mut state2).unwrap_err();
    assert_eq!(r.retry_after, Some(1));
    assert!(state2.admission.is_none());
    let mut http = crate::testing::TestRequest::default();
    assert_eq!(
        filter.on_request(&mut http, &mut state2),
        Ok(Flow::Continue)
    );
}

#[test]
fn snapshot_lists_seen_and_persisted_identities() {
    let dir = TempDir::new();
    let l = quota_limits(&dir);
    l.admit(Some(&with_quota("key:old", 50)), &req(1, None))
        .unwrap()
        .settle(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            estimated: true,
        });
    drop(l);
    let l = quota_limits(&dir);
    let _running = l.admit(Some(&key("key:new")), &req(1, None)).unwrap();
    let snap = l.snapshot();
    assert_eq!(snap.len(), 2);
    assert_eq!(
        (
            snap[0].id.as_str(),
            snap[0].in_flight,
            snap[0].user.as_deref()
        ),
        ("key:new", 1, Some("key:new-owner"))
    );
    assert_eq!(
        (
            snap[1].id.as_str(),
            snap[1].quota_used,
            snap[1].user.as_deref()
        ),
        ("key:old", 7, Some("key:old-owner")),
        "named from the store before it is seen again"
    );
    assert_eq!((snap[1].in_flight, snap[1].quota), (0, None));
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json[1]["quota_used"], 7);
}

#[test]
fn estimated_usage_is_charged_and_counted() {
    let l = limits(per_key(spec(None, None, None, Some(1000))));
    let a = l.admit(Some(&key("key:a")), &req(100, Some(100))).unwrap();
    a.settle(Usage {
        prompt_tokens: 100,
        completion_tokens: 50,
        estimated: true,
    });
    let s = status(&l, "key:a");
    assert_eq!(
        (s.tokens_remaining_this_minute, s.estimated_usage_requests),
        (Some(850), 1)
    );
}

#[test]
fn config_parses_the_documented_yaml() {
    let yaml = r#"
global:  { requests_per_second: 200, burst: 400, concurrent: 128, tokens_per_minute: 2000000 }
per_key: { requests_per_second: 10, concurrent: 5, tokens_per_minute: 100000 }
models:
  qwen: { concurrent: 32, tokens_per_minute: 500000 }
default_max_tokens: 1024
data_dir: /var/lib/infergate
"#;
    let c: LimitsConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(
        c.global,
        spec(Some(200.0), Some(400), Some(128), Some(2_000_000))
    );
    assert_eq!(c.per_key.requests_per_second, Some(10.0));
    assert_eq!(c.models["qwen"], spec(None, None, Some(32), Some(500_000)));
    assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/infergate")));
    assert_eq!(c.validate(), Ok(()));
    let empty: LimitsConfig = serde_yaml::from_str("{}").unwrap();
    assert_eq!(empty, LimitsConfig::default());
    assert_eq!(empty.default_max_tokens, 1024);
    assert!(serde_yaml::from_str::<LimitsConfig>("per_kee: {}").is_err());
    assert!(serde_yaml::from_str::<LimitsConfig>("per_key: { rps: 1 }").is_err());
}

#[test]
fn config_validation_names_the_bad_key() {
    let bad = |c: LimitsConfig| c.validate().unwrap_err().0;
    assert_eq!(
        bad(per_key(spec(Some(0.0), None, None, None))),
        "per_key.requests_per_second"
    );
    assert_eq!(
        bad(per_key(spec(Some(f64::INFINITY), None, None, None))),
        "per_key.requests_per_second"
    );
    assert_eq!(
        bad(per_key(spec(Some(1.0), Some(0), None, None))),
        "per_key.burst"
    );
    assert_eq!(
        bad(LimitsConfig {
            global: spec(None, None, Some(0), None),
            ..LimitsConfig::default()
        }),
        "global.concurrent"
    );
    let mut models = BTreeMap::new();
    models.insert("qwen".to_string(), spec(None, None, None, Some(0)));
    assert_eq!(
        bad(LimitsConfig {
            models,
            ..LimitsConfig::default()
        }),
        "models.qwen.tokens_per_minute"
    );
    assert_eq!(
        bad(LimitsConfig {
            global: spec(None, Some(5), None, None),
            ..LimitsConfig::default()
        }),
        "global.burst"
    );
    assert_eq!(
        bad(LimitsConfig {
            default_max_tokens: 0,
            ..LimitsConfig::default()
        }),
        "default_max_tokens"
    );
    // per_key burst alone is fine: an identity may supply the rate.
    assert_eq!(per_key(spec(None, Some(5), None, None)).validate(), Ok(()));
    let err = Limits::new(per_key(spec(Some(-1.0), None, None, None)))
        .err()
        .unwrap();
    assert!(
        err.starts_with("limits.per_key.requests_per_second:"),
        "{err}"
    );
}

#[test]
fn unusable_data_dir_fails_new_with_the_path() {
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("occupied");
    std::fs::write(&file, b"x").unwrap();
    let err = Limits::new(LimitsConfig {
        data_dir: Some(file.clone()),
        ..LimitsConfig::default()
    })
    .err()
    .unwrap();
    assert!(err.contains(&file.display().to_string()), "{err}");
}

//! (f) of the performance ladder: the cost of the routing decision.
//!
//! `route/resolve_pick/<M>models_<B>backends`: `Router::resolve_pool` for a
//! model name (cycling through all configured names, so the hash table is
//! not always hit on one hot entry) plus `Pool::pick_backend` and dropping
//! its in-flight guard: everything routing adds to a request. Models are
//! spread over min(M, 10) pools of B backends each, round robin.
//! `route/resolve/<M>models`: the name lookup alone.
//! `body/inspect/<size>_model_<first|last>`: `body::inspect` (find `model`
//! and the other fields the gateway reads) on a chat request with a prompt
//! of that size.
//!
//! Run: `cargo bench --bench routing` (or `make bench-routing`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench setup: fail loudly

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use infergate::routing::Router;

fn config_yaml(models: usize, backends: usize) -> String {
    let pools = models.clamp(1, 10);
    let mut y = String::from("server: { listen: \"127.0.0.1:0\" }\npools:\n");
    for p in 0..pools {
        let names: Vec<String> = (p..models)
            .step_by(pools)
            .map(|m| format!("\"model-{m}\""))
            .collect();
        let addrs: Vec<String> = (0..backends)
            .map(|b| format!("\"127.0.0.1:{}\"", 20000 + p * 100 + b))
            .collect();
        y.push_str(&format!(
            "  - name: pool-{p}\n    models: [{}]\n    backends: [{}]\n",
            names.join(", "),
            addrs.join(", ")
        ));
    }
    y
}

/// A router whose backends all take traffic (as after a passing health check).
fn router(rt: &tokio::runtime::Runtime, models: usize, backends: usize) -> Router {
    let config = infergate::config::parse_str(&config_yaml(models, backends))
        .unwrap_or_else(|e| panic!("bench config rejected: {e:?}"));
    let router = Router::new(&config).expect("router");
    for pool in router.pools() {
        rt.block_on(pool.load_backends()).expect("load backends");
        for state in pool.backend_states() {
            state
                .checked_ok
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    router
}

fn routing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("route");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for models in [1usize, 100, 10_000] {
        let names: Vec<String> = (0..models).map(|m| format!("model-{m}")).collect();
        for backends in [1usize, 8, 64] {
            let r = router(&rt, models, backends);
            let mut i = 0usize;
            g.bench_function(
                BenchmarkId::new("resolve_pick", format!("{models}models_{backends}backends")),
                |b| {
                    b.iter(|| {
                        i = (i + 1) % names.len();
                        let route = r.resolve_pool(black_box(&names[i])).expect("route");
                        let pool = r.pool(route.pool).expect("pool");
                        black_box(pool.pick_backend(None, &[]).expect("backend"))
                    })
                },
            );
            if backends == 1 {
                let mut i = 0usize;
                g.bench_function(
                    BenchmarkId::new("resolve", format!("{models}models")),
                    |b| {
                        b.iter(|| {
                            i = (i + 1) % names.len();
                            black_box(r.resolve_pool(black_box(&names[i])))
                        })
                    },
                );
            }
        }
    }
    g.finish();
}

fn chat_body(prompt_bytes: usize, model_last: bool) -> Vec<u8> {
    let prompt = "a".repeat(prompt_bytes);
    let body = if model_last {
        format!(
            r#"{{"messages":[{{"role":"user","content":"{prompt}"}}],"max_tokens":8,"model":"model-1"}}"#
        )
    } else {
        format!(
            r#"{{"model":"model-1","messages":[{{"role":"user","content":"{prompt}"}}],"max_tokens":8}}"#
        )
    };
    body.into_bytes()
}

fn body(c: &mut Criterion) {
    let mut g = c.benchmark_group("body");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (size, label) in [(1usize << 10, "1KB"), (1 << 20, "1MB"), (8 << 20, "8MB")] {
        for last in [false, true] {
            let b = chat_body(size, last);
            let id = format!("{label}_model_{}", if last { "last" } else { "first" });
            g.throughput(criterion::Throughput::Bytes(b.len() as u64));
            g.bench_function(BenchmarkId::new("inspect", id), |bench| {
                bench.iter(|| black_box(infergate::body::inspect(black_box(&b)).expect("inspect")))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, routing, body);
criterion_main!(benches);

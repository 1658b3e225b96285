//! Engine load signals: what a backend's engine says about its own load on
//! its Prometheus `/metrics` (vLLM, SGLang, llama.cpp server names).
//!
//! Pure: text in, numbers out. The sample syntax (label escaping, numbers,
//! `NaN`, timestamps) is parsed by `openmetrics-parser`; this file only picks
//! the families it knows out of the exposition first, one family per parse,
//! so that metadata the engines write differently (a counter's `# TYPE` with
//! or without `_total`, families without `# TYPE`) or a broken family the
//! gateway does not read cannot spoil the signals it does read.

use openmetrics_parser::{prometheus::parse_prometheus, MetricNumber, PrometheusValue};

/// The signals of one scrape. Counts are summed over label sets (an engine
/// serving several models or data-parallel ranks), usage is the highest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineSignals {
    /// `vllm`, `sglang` or `llamacpp`: whose names were found.
    pub family: &'static str,
    /// Requests the engine is running (prefill or decode) now.
    pub running: Option<f64>,
    /// Requests waiting in the engine's own queue.
    pub waiting: Option<f64>,
    /// KV-cache use, 0 to 1.
    pub kv_usage: Option<f64>,
    /// Prefix-cache hit rate reported as a gauge, 0 to 1.
    pub hit_rate: Option<f64>,
    /// Prefix-cache queried and hit tokens since the engine started (counters).
    pub prefix_queries: Option<f64>,
    pub prefix_hits: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Field {
    Running,
    Waiting,
    KvUsage,
    HitRate,
    PrefixQueries,
    PrefixHits,
}

const FIELDS: [Field; 6] = [
    Field::Running,
    Field::Waiting,
    Field::KvUsage,
    Field::HitRate,
    Field::PrefixQueries,
    Field::PrefixHits,
];

/// Metric name → what it says, and whose it is.
const KNOWN: &[(&str, Field, &str)] = &[
    ("vllm:num_requests_running", Field::Running, "vllm"),
    ("vllm:num_requests_waiting", Field::Waiting, "vllm"),
    ("vllm:kv_cache_usage_perc", Field::KvUsage, "vllm"),
    ("vllm:gpu_cache_usage_perc", Field::KvUsage, "vllm"),
    ("vllm:gpu_prefix_cache_hit_rate", Field::HitRate, "vllm"),
    (
        "vllm:prefix_cache_queries_total",
        Field::PrefixQueries,
        "vllm",
    ),
    ("vllm:prefix_cache_queries", Field::PrefixQueries, "vllm"),
    ("vllm:prefix_cache_hits_total", Field::PrefixHits, "vllm"),
    ("vllm:prefix_cache_hits", Field::PrefixHits, "vllm"),
    ("sglang:num_running_reqs", Field::Running, "sglang"),
    ("sglang:num_queue_reqs", Field::Waiting, "sglang"),
    ("sglang:token_usage", Field::KvUsage, "sglang"),
    ("sglang:cache_hit_rate", Field::HitRate, "sglang"),
    ("llamacpp:requests_processing", Field::Running, "llamacpp"),
    ("llamacpp:requests_deferred", Field::Waiting, "llamacpp"),
    ("llamacpp:kv_cache_usage_ratio", Field::KvUsage, "llamacpp"),
];

/// The metric name a sample line starts with.
fn sample_name(line: &str) -> &str {
    let end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    &line[..end]
}

/// Why an engine's `/metrics` answer gave no load signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoLoadMetrics {
    #[error("no vLLM, SGLang or llama.cpp load metrics in the answer")]
    NoFamily,
    #[error("no load metric (running, waiting, KV-cache use) in the answer")]
    NoSignal,
    #[error("unreadable samples of {}", .0.join(", "))]
    Unreadable(Vec<String>),
}

/// Read the known signals off a Prometheus text exposition. `Err` when none
/// of the known names is there (not an engine we know, or not metrics).
pub fn parse(text: &str) -> Result<EngineSignals, NoLoadMetrics> {
    // one buffer per (name) so each family is parsed on its own
    let mut found: Vec<(usize, String)> = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name = sample_name(line);
        let Some(index) = KNOWN.iter().position(|(known, _, _)| *known == name) else {
            continue;
        };
        match found.iter_mut().find(|(i, _)| *i == index) {
            Some((_, buf)) => {
                buf.push_str(line);
                buf.push('\n');
            }
            None => found.push((index, format!("{line}\n"))),
        }
    }
    if found.is_empty() {
        return Err(NoLoadMetrics::NoFamily);
    }
    let mut signals = EngineSignals::default();
    let mut broken = Vec::new();
    for field in FIELDS {
        for (index, buf) in found.iter().filter(|(i, _)| KNOWN[*i].1 == field) {
            let (name, _, family) = KNOWN[*index];
            let Some(values) = family_values(buf) else {
                broken.push(name.to_string());
                continue;
            };
            if values.is_empty() {
                continue;
            }
            let value = match field {
                Field::KvUsage | Field::HitRate => {
                    values.iter().copied().fold(0.0, f64::max).clamp(0.0, 1.0)
                }
                _ => values.iter().sum::<f64>().max(0.0),
            };
            let slot = match field {
                Field::Running => &mut signals.running,
                Field::Waiting => &mut signals.waiting,
                Field::KvUsage => &mut signals.kv_usage,
                Field::HitRate => &mut signals.hit_rate,
                Field::PrefixQueries => &mut signals.prefix_queries,
                Field::PrefixHits => &mut signals.prefix_hits,
            };
            if slot.is_none() {
                *slot = Some(value);
                if signals.family.is_empty() {
                    signals.family = family;
                }
            }
        }
    }
    if signals.running.is_none() && signals.waiting.is_none() && signals.kv_usage.is_none() {
        return Err(if broken.is_empty() {
            NoLoadMetrics::NoSignal
        } else {
            NoLoadMetrics::Unreadable(broken)
        });
    }
    Ok(signals)
}

/// The finite values of one family's sample lines; `None` when the parser
/// refuses them.
fn family_values(lines: &str) -> Option<Vec<f64>> {
    let exposition = parse_prometheus(lines).ok()?;
    let mut out = Vec::new();
    for family in exposition.families.values() {
        for sample in family.iter_samples() {
            let number = match &sample.value {
                PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => n,
                PrometheusValue::Counter(c) => &c.value,
                _ => continue,
            };
            let v = match number {
                MetricNumber::Float(f) => *f,
                MetricNumber::Int(i) => *i as f64,
            };
            if v.is_finite() {
                out.push(v);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-0.5B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen2.5-0.5B"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-0.5B"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-0.5B"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen2.5-0.5B"} 0.5
# HELP vllm:prefix_cache_queries_total Prefix cache queries.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen2.5-0.5B"} 4096.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen2.5-0.5B"} 1024.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 5.0
python_gc_objects_collected_total{generation="0"} 12345.0
"#;

    #[test]
    fn reads_vllm_and_sums_ranks() {
        let s = parse(VLLM).unwrap();
        assert_eq!(s.family, "vllm");
        assert_eq!(s.running, Some(5.0));
        assert_eq!(s.waiting, Some(4.0));
        assert_eq!(s.kv_usage, Some(0.5));
        assert_eq!(s.prefix_queries, Some(4096.0));
        assert_eq!(s.prefix_hits, Some(1024.0));
    }

    #[test]
    fn reads_sglang_and_llamacpp() {
        let s = parse(
            "# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name=\"m\"} 7\nsglang:num_queue_reqs{model_name=\"m\"} 2\nsglang:token_usage{model_name=\"m\"} 0.9\nsglang:cache_hit_rate{model_name=\"m\"} 0.4\n",
        )
        .unwrap();
        assert_eq!(
            (s.family, s.running, s.waiting, s.kv_usage, s.hit_rate),
            ("sglang", Some(7.0), Some(2.0), Some(0.9), Some(0.4))
        );
        let s = parse(
            "# HELP llamacpp:requests_processing x\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\nllamacpp:requests_deferred 3\nllamacpp:kv_cache_usage_ratio 0.125\n",
        )
        .unwrap();
        assert_eq!(
            (s.family, s.running, s.waiting, s.kv_usage),
            ("llamacpp", Some(1.0), Some(3.0), Some(0.125))
        );
    }

    #[test]
    fn older_vllm_names_count() {
        let s = parse(
            "vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.75\nvllm:num_requests_waiting 0\n",
        )
        .unwrap();
        assert_eq!((s.kv_usage, s.waiting), (Some(0.75), Some(0.0)));
    }

    #[test]
    fn garbage_and_foreign_metrics_are_errors_not_signals() {
        for text in [
            "",
            "<html>502 Bad Gateway</html>",
            "node_cpu_seconds_total{cpu=\"0\"} 1\n",
            "vllm:num_requests_running{model_name=\"m\" 3\n",
            "vllm:num_requests_running{model_name=\"m\"} three\n",
            "vllm:num_requests_running NaN\n",
            "\u{0}\u{ffff}{}\"\\",
        ] {
            let parsed = parse(text);
            assert!(
                parsed.as_ref().map_or(true, |s| s.running.is_none()),
                "{text:?} gave {parsed:?}"
            );
        }
    }

    #[test]
    fn one_broken_family_spoils_only_itself() {
        let s = parse("vllm:num_requests_running 2\nvllm:num_requests_waiting{x=} 1\n").unwrap();
        assert_eq!((s.running, s.waiting), (Some(2.0), None));
    }

    #[test]
    fn never_panics_on_mutated_expositions() {
        // a small deterministic mutation fuzz (the fuzz/ targets run longer)
        let base = VLLM.as_bytes().to_vec();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut b = base.clone();
            for _ in 0..(next() % 6 + 1) {
                let p = (next() as usize) % b.len().max(1);
                match next() % 3 {
                    0 if !b.is_empty() => b[p] = next() as u8,
                    1 if !b.is_empty() => {
                        b.remove(p);
                    }
                    _ => b.insert(
                        p.min(b.len()),
                        b"{}\"\\\n =#,+-eE.0:_"[(next() % 17) as usize],
                    ),
                }
            }
            let _ = parse(&String::from_utf8_lossy(&b));
        }
    }
}

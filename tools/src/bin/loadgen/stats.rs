//! Percentile summaries of raw samples (all samples kept, sorted once).

use serde_json::{json, Value};

/// Nearest-rank percentile of sorted samples; `None` when empty.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `{"n","min","p50","p90","p99","p999","max","mean"}` of the samples (µs).
pub fn summary(samples: &mut [u64]) -> Value {
    samples.sort_unstable();
    let n = samples.len();
    let mean = if n == 0 {
        None
    } else {
        Some(samples.iter().map(|&v| v as f64).sum::<f64>() / n as f64)
    };
    json!({
        "n": n,
        "min": samples.first(),
        "p50": percentile(samples, 50.0),
        "p90": percentile(samples, 90.0),
        "p99": percentile(samples, 99.0),
        "p999": percentile(samples, 99.9),
        "max": samples.last(),
        "mean": mean.map(|m| (m * 10.0).round() / 10.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
        let mut w = vec![3, 1, 2];
        assert_eq!(summary(&mut w)["p50"], 2);
    }
}

//! What the harness reads from the server's `/metrics`: the kernel-dispatch latency histogram,
//! before and after a run, so that a quantile covers exactly the run.

use std::collections::BTreeMap;

const KERNEL_BUCKET: &str = "tensor_wasm_kernel_latency_seconds_bucket{";

/// Cumulative bucket counts of `tensor_wasm_kernel_latency_seconds`, summed over every label but
/// `le`, keyed by the bucket's upper bound in nanoseconds (`u64::MAX` for `+Inf`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelHistogram {
    buckets: BTreeMap<u64, f64>,
}

impl KernelHistogram {
    pub fn parse(metrics: &str) -> KernelHistogram {
        let mut buckets = BTreeMap::new();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix(KERNEL_BUCKET) else { continue };
            let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
            let Some(le) = labels.split(',').find_map(|l| l.strip_prefix("le=\"")).map(|l| l.trim_end_matches('"'))
            else {
                continue;
            };
            let bound = if le == "+Inf" {
                u64::MAX
            } else {
                match le.parse::<f64>() {
                    Ok(seconds) => (seconds * 1e9).round() as u64,
                    Err(_) => continue,
                }
            };
            if let Ok(v) = value.trim().parse::<f64>() {
                *buckets.entry(bound).or_default() += v;
            }
        }
        KernelHistogram { buckets }
    }

    /// The counts that arrived between `earlier` and `self`.
    pub fn since(&self, earlier: &KernelHistogram) -> KernelHistogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, v)| (*le, (v - earlier.buckets.get(le).copied().unwrap_or(0.0)).max(0.0)))
            .collect();
        KernelHistogram { buckets }
    }

    pub fn count(&self) -> f64 {
        self.buckets.get(&u64::MAX).copied().unwrap_or(0.0)
    }

    /// The upper bound, in seconds, of the bucket that holds quantile `q`: the value is at most
    /// that. `None` without samples, or when the quantile lies past the last finite bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        self.buckets
            .iter()
            .find(|(_, cumulative)| **cumulative >= rank)
            .and_then(|(le, _)| (*le != u64::MAX).then(|| *le as f64 / 1e9))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_difference_of_two_scrapes() {
        let before = KernelHistogram::parse(
            "tensor_wasm_kernel_latency_seconds_bucket{op=\"add\",le=\"0.000001\"} 5\n\
             tensor_wasm_kernel_latency_seconds_bucket{op=\"add\",le=\"0.000005\"} 10\n\
             tensor_wasm_kernel_latency_seconds_bucket{op=\"add\",le=\"+Inf\"} 10\n",
        );
        let after = KernelHistogram::parse(
            "# HELP x\n\
             tensor_wasm_kernel_latency_seconds_bucket{op=\"add\",le=\"0.000001\"} 5\n\
             tensor_wasm_kernel_latency_seconds_bucket{op=\"add\",le=\"0.000005\"} 100\n\
             tensor_wasm_kernel_latency_seconds_bucket{op=\"add\",le=\"+Inf\"} 110\n\
             tensor_wasm_kernel_latency_seconds_bucket{op=\"mul\",le=\"0.000001\"} 0\n\
             tensor_wasm_kernel_latency_seconds_bucket{op=\"mul\",le=\"0.000005\"} 0\n\
             tensor_wasm_kernel_latency_seconds_bucket{op=\"mul\",le=\"+Inf\"} 0\n",
        );
        let run = after.since(&before);
        assert_eq!(run.count(), 100.0);
        // 90 of the run's 100 samples are ≤ 5 µs, the other 10 past every finite bucket.
        assert_eq!(run.quantile_bound(0.5), Some(0.000005));
        assert_eq!(run.quantile_bound(0.90), Some(0.000005));
        assert_eq!(run.quantile_bound(0.95), None);
        assert_eq!(KernelHistogram::default().quantile_bound(0.5), None);
    }
}

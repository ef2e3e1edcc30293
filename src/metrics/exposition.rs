//! Reading the Prometheus text format that `/metrics` writes, from outside the server: for
//! `tensor-wasm observe` and the SLO harness (`tensor-wasm-bench`), which both take two scrapes and
//! read what happened between them.
//!
//! ```
//! use tensor_wasm::exposition::{parse, ScrapedHistogram};
//!
//! let before = parse("d_bucket{route=\"/a\",le=\"0.1\"} 10\nd_bucket{route=\"/a\",le=\"+Inf\"} 10\n");
//! let after = parse("d_bucket{route=\"/a\",le=\"0.1\"} 50\nd_bucket{route=\"/a\",le=\"+Inf\"} 60\n");
//! let run = ScrapedHistogram::of(&after, "d", &[("route", "/a")])
//!     .since(&ScrapedHistogram::of(&before, "d", &[("route", "/a")]));
//! assert_eq!(run.count(), 50.0);
//! // 40 of the 50 are at most 0.1; the 10 others lie past every finite bucket.
//! assert_eq!(run.quantile_bound(0.8), Some(0.1));
//! assert_eq!(run.quantile_bound(0.9), None);
//! ```

use std::collections::BTreeMap;

/// One sample of the exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text format as this server writes it: no escapes in label values but `\"`, `\\`
/// and `\n`. Lines that are not samples are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    samples
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    labels
}

/// The samples named `name` whose labels include every pair of `want`.
pub fn matching<'a>(
    samples: &'a [Sample],
    name: &'a str,
    want: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples
        .iter()
        .filter(move |s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
}

/// A histogram as scraped: cumulative counts by upper bound, ascending, `+Inf` last, summed over
/// every label but `le` of the series that match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScrapedHistogram {
    buckets: Vec<(f64, f64)>,
}

impl ScrapedHistogram {
    /// Histogram `name` (its `NAME_bucket` samples) in `samples`, over the series whose labels
    /// include every pair of `want`.
    pub fn of(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> ScrapedHistogram {
        let bucket = format!("{name}_bucket");
        let mut series: Vec<(f64, f64)> = matching(samples, &bucket, want)
            .filter_map(|s| {
                let le = match s.labels.get("le")?.as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().ok()?,
                };
                Some((le, s.value))
            })
            .collect();
        series.sort_by(|a, b| a.0.total_cmp(&b.0));
        // The same bound in several series (one per label set) sums into one bucket.
        let mut buckets: Vec<(f64, f64)> = Vec::with_capacity(series.len());
        for (le, count) in series {
            match buckets.last_mut() {
                Some((last, total)) if *last == le => *total += count,
                _ => buckets.push((le, count)),
            }
        }
        ScrapedHistogram { buckets }
    }

    /// What was observed between `earlier` and `self`.
    pub fn since(&self, earlier: &ScrapedHistogram) -> ScrapedHistogram {
        let before = |le: f64| earlier.buckets.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
        let buckets = self.buckets.iter().map(|&(le, count)| (le, (count - before(le)).max(0.0))).collect();
        ScrapedHistogram { buckets }
    }

    /// Every observation: the `+Inf` bucket's count.
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |(_, count)| *count)
    }

    /// The `q` quantile, interpolated within its bucket as Prometheus's `histogram_quantile`
    /// does. `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let rank = self.rank(q)?;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &self.buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = count - lower.1;
                let fraction = if in_bucket > 0.0 { (rank - lower.1) / in_bucket } else { 1.0 };
                return Some(lower.0 + (le - lower.0) * fraction);
            }
            lower = (le, count);
        }
        Some(lower.0)
    }

    /// The upper bound of the bucket that holds the `q` quantile: the quantile is at most that,
    /// which is what an objective can be judged by. `None` without observations, or when the
    /// quantile lies past the last finite bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let rank = self.rank(q)?;
        self.buckets.iter().find(|(_, count)| *count >= rank).and_then(|(le, _)| le.is_finite().then_some(*le))
    }

    fn rank(&self, q: f64) -> Option<f64> {
        let total = self.count();
        (total > 0.0).then_some(q * total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exposition() {
        let s = parse("# HELP x y\nup 1\nreq{route=\"/a\",status=\"200\"} 5\nreq{route=\"q\\\"x\",le=\"+Inf\"} 2.5\n");
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].labels["route"], "/a");
        assert_eq!(s[2].labels["route"], "q\"x");
        assert_eq!(s[2].labels["le"], "+Inf");
        assert_eq!(s[2].value, 2.5);
    }

    fn histogram(buckets: &[(f64, f64)]) -> ScrapedHistogram {
        ScrapedHistogram { buckets: buckets.to_vec() }
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let b = histogram(&[(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)]);
        assert!((b.quantile(0.95).unwrap() - 0.19).abs() < 1e-9);
        assert!((b.quantile(0.5).unwrap() - 0.1).abs() < 1e-9);
        assert_eq!(histogram(&[(0.1, 0.0), (f64::INFINITY, 0.0)]).quantile(0.95), None);
        assert_eq!(histogram(&[(0.1, 1.0), (f64::INFINITY, 100.0)]).quantile(0.99), Some(0.1));
    }

    #[test]
    fn a_histogram_sums_the_matching_series_and_subtracts_an_earlier_scrape() {
        let text = |healthz: u32, head: u32, invoke: u32| {
            format!(
                "d_bucket{{route=\"/healthz\",method=\"GET\",le=\"0.00001\"}} {healthz}\n\
                 d_bucket{{route=\"/healthz\",method=\"GET\",le=\"+Inf\"}} {healthz}\n\
                 d_bucket{{route=\"/healthz\",method=\"HEAD\",le=\"0.00001\"}} 0\n\
                 d_bucket{{route=\"/healthz\",method=\"HEAD\",le=\"+Inf\"}} {head}\n\
                 d_bucket{{route=\"/functions/:id/invoke\",method=\"POST\",le=\"0.00001\"}} 0\n\
                 d_bucket{{route=\"/functions/:id/invoke\",method=\"POST\",le=\"+Inf\"}} {invoke}\n\
                 d_count{{route=\"/healthz\",method=\"GET\"}} {healthz}\n"
            )
        };
        let healthz = |t: &str| ScrapedHistogram::of(&parse(t), "d", &[("route", "/healthz")]);
        let (before, after) = (text(10, 1, 3), text(60, 3, 10));
        let run = healthz(&after).since(&healthz(&before));
        // 50 GETs within 10 µs and 2 HEADs past every bucket; the invokes are another route's.
        assert_eq!(run.count(), 52.0);
        assert_eq!(run.quantile_bound(0.5), Some(0.00001));
        assert_eq!(run.quantile_bound(0.99), None);
        let invoke = ScrapedHistogram::of(&parse(&after), "d", &[("route", "/functions/:id/invoke")]);
        assert_eq!((invoke.count(), invoke.quantile_bound(0.5)), (10.0, None));
        // A label value is matched whole, never by prefix.
        assert_eq!(ScrapedHistogram::of(&parse(&after), "d", &[("route", "/health")]).count(), 0.0);
        assert_eq!(ScrapedHistogram::default().quantile_bound(0.5), None);
    }
}

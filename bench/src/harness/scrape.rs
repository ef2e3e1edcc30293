//! What the harness reads from the server's `/metrics`, scraped before and after a run so that
//! the figures cover the run (warm-up included): the kernel-dispatch latency, which the dispatch
//! objectives judge, and the server's own time per request on the scenario's route, which says how
//! much of the latency the client measured was spent inside the server.

use tensor_wasm::exposition::{Sample, ScrapedHistogram};

/// One histogram of the server's metrics: its name, and the label every counted series must carry
/// (`None`: every series, summed).
#[derive(Clone, Copy, Debug)]
pub struct HistogramSeries {
    pub name: &'static str,
    pub label: Option<(&'static str, &'static str)>,
}

/// The kernel-dispatch latency, over every op.
pub const KERNEL_LATENCY: HistogramSeries = HistogramSeries { name: "tensor_wasm_kernel_latency_seconds", label: None };

/// The server's time per request on `route` (as the `route` label names it): from the parsed
/// head to the answer queued for writing. The kernel's TCP, the wake-ups and the client are
/// outside it.
pub fn request_duration(route: &'static str) -> HistogramSeries {
    HistogramSeries { name: "tensor_wasm_http_request_duration_seconds", label: Some(("route", route)) }
}

/// `series` as observed between the scrapes `before` and `after` (each parsed once, with
/// `exposition::parse`, and read for every series).
pub fn between(before: &[Sample], after: &[Sample], series: HistogramSeries) -> ScrapedHistogram {
    let want: Vec<(&str, &str)> = series.label.into_iter().collect();
    ScrapedHistogram::of(after, series.name, &want).since(&ScrapedHistogram::of(before, series.name, &want))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_wasm::exposition::parse;

    #[test]
    fn a_series_is_read_over_the_run_between_two_scrapes() {
        let scrape = |add: u32, mul: u32, invokes: u32| {
            format!(
                "tensor_wasm_kernel_latency_seconds_bucket{{op=\"add\",le=\"0.000005\"}} {add}\n\
                 tensor_wasm_kernel_latency_seconds_bucket{{op=\"add\",le=\"+Inf\"}} {add}\n\
                 tensor_wasm_kernel_latency_seconds_bucket{{op=\"mul\",le=\"0.000005\"}} 0\n\
                 tensor_wasm_kernel_latency_seconds_bucket{{op=\"mul\",le=\"+Inf\"}} {mul}\n\
                 tensor_wasm_http_request_duration_seconds_bucket{{route=\"/functions/:id/invoke\",method=\"POST\",le=\"0.00005\"}} {invokes}\n\
                 tensor_wasm_http_request_duration_seconds_bucket{{route=\"/functions/:id/invoke\",method=\"POST\",le=\"+Inf\"}} {invokes}\n\
                 tensor_wasm_http_request_duration_seconds_bucket{{route=\"/healthz\",method=\"GET\",le=\"0.00005\"}} 0\n\
                 tensor_wasm_http_request_duration_seconds_bucket{{route=\"/healthz\",method=\"GET\",le=\"+Inf\"}} 500\n"
            )
        };
        let (before, after) = (parse(&scrape(10, 0, 7)), parse(&scrape(100, 10, 107)));
        // Every op counts: 90 adds within 5 µs, 10 muls past every bucket.
        let kernels = between(&before, &after, KERNEL_LATENCY);
        assert_eq!((kernels.count(), kernels.quantile_bound(0.9)), (100.0, Some(0.000005)));
        assert_eq!(kernels.quantile_bound(0.95), None);
        // Only the route asked for.
        let invokes = between(&before, &after, request_duration("/functions/:id/invoke"));
        assert_eq!((invokes.count(), invokes.quantile_bound(0.99)), (100.0, Some(0.00005)));
    }
}

//! The benchmarks of TensorWasm: the SLO harness (`tensor-wasm-bench`, in [`harness`]), the
//! conventional server it is compared with ([`baseline`]), and the micro-benchmarks' shared helpers
//! below: the built-in configuration, pinning, and reporting.

pub mod baseline;
pub mod harness;

use std::time::Duration;

use hdrhistogram::Histogram;
use tensor_wasm::settings::{Limits, ServerConfig};

/// The server's built-in defaults, as `tensor-wasm serve` with no flags would use them.
pub fn default_config() -> ServerConfig {
    tensor_wasm::settings::serve_config(std::iter::empty::<&str>()).expect("the built-in defaults are valid")
}

pub fn default_limits() -> Limits {
    default_config().limits
}

/// Pins the calling thread to the first allowed CPU, as a shard would be.
pub fn pin_like_a_shard() {
    if let Ok(cpus) = tensor_wasm::cpu::allowed_cpus() {
        let _ = tensor_wasm::cpu::pin_current_thread(cpus[0]);
    }
}

/// The largest duration the histograms hold: one hour, in nanoseconds. The harness records
/// whole-request latencies, which a stalled server can stretch to seconds.
const MAX_NANOS: u64 = 3_600_000_000_000;

/// A histogram of nanoseconds, 1 ns to an hour, at 3 significant digits: the micro-benchmarks'
/// and the SLO harness's alike.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NANOS, 3).expect("valid bounds")
}

/// Records `d`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_nanos().min(MAX_NANOS as u128) as u64).max(1));
}

/// One Markdown table row: name, count, P50, P99, P99.9, max, in microseconds.
pub fn row(name: &str, h: &Histogram<u64>) -> String {
    let us = |v: u64| v as f64 / 1000.0;
    format!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        h.len(),
        us(h.value_at_quantile(0.50)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    )
}

pub const TABLE_HEAD: &str =
    "| what | n | P50 µs | P99 µs | P99.9 µs | max µs |\n| --- | --- | --- | --- | --- | --- |";

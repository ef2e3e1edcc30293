//! The benchmarks of TensorWasm: the SLO harness (`tensor-wasm-bench`, in [`harness`]), the
//! conventional server it is compared with ([`baseline`]), and the micro-benchmarks' shared helpers
//! below: the built-in configuration, pinning, and reporting.

pub mod baseline;
pub mod harness;

use std::time::Duration;

use hdrhistogram::Histogram;
use tensor_wasm::config::{Limits, ServerConfig};

/// The server's built-in defaults, as `tensor-wasm serve` with no flags would use them.
pub fn default_config() -> ServerConfig {
    tensor_wasm::cli::serve_config(std::iter::empty::<&str>()).expect("the built-in defaults are valid")
}

pub fn default_limits() -> Limits {
    default_config().limits
}

/// Pins the calling thread to the first allowed CPU, as a shard would be.
pub fn pin_like_a_shard() {
    if let Ok(cpus) = tensor_wasm::server::cpu::allowed_cpus() {
        let _ = tensor_wasm::server::cpu::pin_current_thread(cpus[0]);
    }
}

/// A histogram of nanoseconds, 1 ns to 10 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record(d.as_nanos().clamp(1, 10_000_000_000) as u64);
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

//! The audit segment reader and recovery: any bytes (a torn, zero-padded or tampered segment)
//! scan without panicking, and the valid prefix it reports is one that scans clean again.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensor_wasm_fuzz::audit_segment(data));

//! The functions directory's manifests: `NAME.toml`, `NAME.pipeline.toml` and durations.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensor_wasm_fuzz::manifests(data));

//! The functions directory's manifests: `NAME.toml`, `NAME.pipeline.toml` and durations.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm::functions::manifest::{duration_ms, FunctionManifest};
use tensor_wasm::pipelines::PipelineSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = FunctionManifest::parse(text) {
        let _ = m.timeout_ms();
    }
    let _ = toml::from_str::<PipelineSpec>(text);
    let _ = duration_ms(text);
});

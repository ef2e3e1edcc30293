//! Every JSON request body and the envelope ABI: any bytes are accepted or refused with an error
//! kind, and never panic. Envelope input keeps its payload byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm::functions::worker::DeployBody;
use tensor_wasm::functions::FunctionRecord;
use tensor_wasm::pipelines::{PipelineRecord, PipelineSpec};
use tensor_wasm::wasm::envelope::{decode_output, encode_input, Headers};

fuzz_target!(|data: &[u8]| {
    if let Err(e) = DeployBody::parse(data) {
        assert!(matches!(e.kind(), "invalid_json" | "invalid_request"));
    }
    let _ = serde_json::from_slice::<PipelineSpec>(data);
    let _ = serde_json::from_slice::<FunctionRecord>(data);
    let _ = serde_json::from_slice::<PipelineRecord>(data);
    let headers = Headers::from([("x-fuzz".to_string(), "1".to_string())]);
    match encode_input(data, &headers) {
        Ok(stdin) => {
            let text = std::str::from_utf8(data).unwrap();
            assert!(std::str::from_utf8(&stdin).unwrap().contains(text.trim()));
        }
        Err(e) => assert_eq!(e.kind(), "invalid_payload"),
    }
    if let Err(e) = decode_output(data, 64) {
        assert!(matches!(e.kind(), "invalid_envelope_output" | "envelope_missing_payload"));
    }
});

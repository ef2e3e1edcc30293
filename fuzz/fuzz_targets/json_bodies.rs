//! Every JSON request body and the envelope ABI: any bytes are accepted or refused with an error
//! kind, and never panic. Envelope input keeps its payload byte for byte.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensor_wasm_fuzz::json_bodies(data));

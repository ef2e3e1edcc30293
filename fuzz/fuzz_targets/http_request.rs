//! Request heads and chunked bodies: any bytes, at any split, never panic, and a parsed head
//! never claims more bytes than it was given.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensor_wasm_fuzz::http_request(data));

//! `tensor_create`'s arguments, read from guest memory: any memory and any five i32s give a
//! shape and data within that memory, or a status code. Nothing reads outside `mem`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensor_wasm_fuzz::tensor_args(data));

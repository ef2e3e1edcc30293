//! The token-list grammar (`TOKEN:tenant=*,TOKEN:tenant=7,…`): any text parses or is refused
//! with an error, and the error never holds a token.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tensor_wasm_fuzz::token_list(data));

//! The token-list grammar (`TOKEN:tenant=*,TOKEN:tenant=7,…`): any text parses or is refused
//! with an error, and the error never holds a token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm::auth::tokens::{TokenPolicy, TokenSet};

fuzz_target!(|data: &[u8]| {
    let Ok(list) = std::str::from_utf8(data) else { return };
    let policy = TokenPolicy { token_id_key: b"fuzz".to_vec(), rate_limit: None, shards: 2 };
    match TokenSet::parse(list, &policy, None) {
        Ok(set) => assert!(set.len() <= list.len()),
        Err(e) => {
            let message = e.to_string();
            // A token is visible ASCII without spaces; shorter strings, or ones with spaces, may
            // be words of the message itself.
            let tokens = list.split([',', '\n']).filter_map(|e| e.split(':').next().map(str::trim));
            for token in tokens.filter(|t| t.len() >= 16 && !t.contains(char::is_whitespace)) {
                assert!(!message.contains(token), "an error message holds a token");
            }
        }
    }
});

//! The audit segment reader and recovery: any bytes (a torn, zero-padded or tampered segment)
//! scan without panicking, and the valid prefix it reports is one that scans clean again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm::audit::record::check_line;
use tensor_wasm::audit::segment::scan;

fuzz_target!(|data: &[u8]| {
    let found = scan(data, None);
    assert!(found.valid_len <= data.len());
    let again = scan(&data[..found.valid_len], None);
    assert_eq!(again.valid_len, found.valid_len, "the recovered prefix does not rescan whole");
    for line in data.split(|b| *b == b'\n') {
        let _ = check_line(line);
    }
});

//! Request heads and chunked bodies: any bytes, at any split, never panic, and a parsed head
//! never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm::http::{parse_head, ChunkedDecoder, HeadParse, RequestHead};

fuzz_target!(|data: &[u8]| {
    let mut head = RequestHead::default();
    if let Ok(HeadParse::Complete(len)) = parse_head(data, &mut head, 16 * 1024, 64) {
        assert!(len <= data.len());
        let _ = (head.path(), head.framing(), head.headers().count());
    }
    // The same bytes as a chunked body, fed whole and then in two pieces.
    let split = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let mut whole = Vec::new();
    let whole_result = ChunkedDecoder::new(1 << 20).decode(data, &mut whole);
    let mut decoder = ChunkedDecoder::new(1 << 20);
    let mut pieces = Vec::new();
    if let Ok(used) = decoder.decode(&data[..split], &mut pieces) {
        assert!(used <= split);
        let rest = [&data[used..split], &data[split..]].concat();
        if let (Ok(_), Ok(_)) = (decoder.decode(&rest, &mut pieces), &whole_result) {
            if decoder.is_done() {
                assert_eq!(pieces, whole, "a split changed the decoded body");
            }
        }
    }
});

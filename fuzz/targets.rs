//! The fuzz targets' bodies: what each one feeds the parser and what it checks beyond "no
//! panic". libFuzzer runs them through the binaries in fuzz_targets/ (docs/FUZZING.md), and the
//! workspace's `tests/fuzz_smoke.rs` runs them on stable, in CI, over the seeds and mutations of
//! them. One body serves both, so the smoke run checks exactly what the fuzzer does.

use tensor_wasm::audit_log::{check_line, scan};
use tensor_wasm::catalog::{duration_ms, DeployBody, FunctionManifest, FunctionRecord, PipelineRecord, PipelineSpec};
use tensor_wasm::guest::{decode_create_args, decode_output, decode_typed_create_args, encode_input, Headers};
use tensor_wasm::http_codec::{parse_head, ChunkedDecoder, HeadParse, RequestHead};
use tensor_wasm::tokens::{TokenPolicy, TokenSet};

/// A target's body: panics when a check fails.
pub type Target = fn(&[u8]);

/// Every target, by the name cargo-fuzz knows it by (and its folder in `seeds/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("http_request", http_request),
    ("token_list", token_list),
    ("json_bodies", json_bodies),
    ("audit_segment", audit_segment),
    ("manifests", manifests),
    ("tensor_args", tensor_args),
];

/// Request heads and chunked bodies: any bytes, at any split, never panic, and a parsed head
/// never claims more bytes than it was given.
pub fn http_request(data: &[u8]) {
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
}

/// The token-list grammar (`TOKEN:tenant=*,TOKEN:tenant=7,…`): any text parses or is refused
/// with an error, and the error never holds a token.
pub fn token_list(data: &[u8]) {
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
}

/// Every JSON request body and the envelope ABI: any bytes are accepted or refused with an error
/// kind, and never panic. Envelope input keeps its payload byte for byte.
pub fn json_bodies(data: &[u8]) {
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
}

/// The audit segment reader and recovery: any bytes (a torn, zero-padded or tampered segment)
/// scan without panicking, and the valid prefix it reports is one that scans clean again.
pub fn audit_segment(data: &[u8]) {
    let found = scan(data, None);
    assert!(found.valid_len <= data.len());
    let again = scan(&data[..found.valid_len], None);
    assert_eq!(again.valid_len, found.valid_len, "the recovered prefix does not rescan whole");
    for line in data.split(|b| *b == b'\n') {
        let _ = check_line(line);
    }
}

/// The functions directory's manifests: `NAME.toml`, `NAME.pipeline.toml` and durations.
pub fn manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = FunctionManifest::parse(text) {
        let _ = m.timeout_ms();
    }
    let _ = toml::from_str::<PipelineSpec>(text);
    let _ = duration_ms(text);
}

/// `tensor_create`'s arguments, read from guest memory: any memory and any five i32s give a
/// shape and data within that memory, or a status code. Nothing reads outside `mem`.
pub fn tensor_args(data: &[u8]) {
    if data.len() < 20 {
        return;
    }
    let arg = |i: usize| i32::from_le_bytes([data[i * 4], data[i * 4 + 1], data[i * 4 + 2], data[i * 4 + 3]]);
    let (dtype, shape_ptr, rank, data_ptr, data_len) = (arg(0) & 1, arg(1), arg(2) & 15, arg(3), arg(4));
    let mem = &data[20..];
    match decode_create_args(mem, dtype, shape_ptr, rank, data_ptr, data_len) {
        Ok((shape, values)) => {
            assert_eq!(shape.len(), rank as usize);
            assert_eq!(values.len() * 4, data_len as usize);
            assert!(shape_ptr as u32 as usize + shape.len() * 4 <= mem.len());
        }
        Err((code, message)) => assert!(code < 0 && !message.is_empty(), "{code} {message}"),
    }
    // `tensor_create_typed`: any dtype code, valid or not (4 to 7 are not).
    match decode_typed_create_args(mem, arg(0) & 7, shape_ptr, rank, data_ptr, data_len) {
        Ok((shape, dtype, bytes)) => {
            assert_eq!(shape.len(), rank as usize);
            assert!((dtype as i32) < 4);
            assert_eq!(bytes.len(), data_len as usize);
        }
        Err((code, message)) => assert!(code < 0 && !message.is_empty(), "{code} {message}"),
    }
}

//! Property tests of the parsers that read untrusted input: the CI-run counterparts of the fuzz
//! targets in fuzz/ (docs/FUZZING.md). Arbitrary input never panics; generated valid input comes
//! back as it went in.

use proptest::prelude::*;
use tensor_wasm::audit_log::{encode, scan, Actor, AuditEvent, ReplicaField, GENESIS};
use tensor_wasm::catalog::{duration_ms, DeployBody, FunctionManifest, PipelineSpec};
use tensor_wasm::guest::{decode_create_args, decode_output, encode_input, Headers};
use tensor_wasm::http_codec::{parse_head, ChunkedDecoder, HeadParse, RequestHead};
use tensor_wasm::tokens::{TokenPolicy, TokenSet};

fn config() -> ProptestConfig {
    ProptestConfig { cases: 512, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn request_heads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut head = RequestHead::default();
        if let Ok(HeadParse::Complete(len)) = parse_head(&bytes, &mut head, 16 * 1024, 64) {
            prop_assert!(len <= bytes.len());
        }
    }

    #[test]
    fn generated_heads_parse_back(
        path in "/[a-z0-9/_.-]{0,40}",
        headers in proptest::collection::vec(("x-[a-z]{1,12}", "[ -~]{0,30}"), 0..10),
    ) {
        let mut text = format!("POST {path} HTTP/1.1\r\nhost: t\r\n");
        for (name, value) in &headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("content-length: 0\r\n\r\n");
        let mut head = RequestHead::default();
        let parsed = parse_head(text.as_bytes(), &mut head, 16 * 1024, 64).unwrap();
        prop_assert!(matches!(parsed, HeadParse::Complete(len) if len == text.len()));
        prop_assert_eq!(head.path(), path.as_str());
        for (name, value) in &headers {
            let found = head.headers().filter(|(n, _)| n == name).any(|(_, v)| v == value.trim().as_bytes());
            prop_assert!(found, "{} lost", name);
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_split(
        body in proptest::collection::vec(any::<u8>(), 0..4096),
        chunk in 1usize..700,
        splits in proptest::collection::vec(1usize..300, 1..20),
    ) {
        let mut encoded = Vec::new();
        for piece in body.chunks(chunk) {
            encoded.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            encoded.extend_from_slice(piece);
            encoded.extend_from_slice(b"\r\n");
        }
        encoded.extend_from_slice(b"0\r\n\r\n");
        let mut decoder = ChunkedDecoder::new(1 << 20);
        let (mut out, mut pending, mut at) = (Vec::new(), Vec::new(), 0);
        for n in splits.iter().cycle() {
            if decoder.is_done() || at >= encoded.len() {
                break;
            }
            let end = (at + n).min(encoded.len());
            pending.extend_from_slice(&encoded[at..end]);
            at = end;
            let used = decoder.decode(&pending, &mut out).unwrap();
            pending.drain(..used);
        }
        if !decoder.is_done() {
            let used = decoder.decode(&pending, &mut out).unwrap();
            pending.drain(..used);
        }
        prop_assert!(decoder.is_done());
        prop_assert_eq!(out, body);
    }

    #[test]
    fn chunked_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = ChunkedDecoder::new(4096).decode(&bytes, &mut Vec::new());
    }

    #[test]
    fn token_lists_parse_or_refuse(list in "[ -~\n]{0,200}") {
        let policy = TokenPolicy { token_id_key: b"k".to_vec(), rate_limit: None, shards: 2 };
        let _ = TokenSet::parse(&list, &policy, None);
    }

    #[test]
    fn generated_token_lists_parse(tokens in proptest::collection::vec(("[a-f0-9]{16,64}", 0u64..100), 1..8)) {
        let list: Vec<String> = tokens.iter().map(|(t, tenant)| format!("{t}:tenant={tenant}")).collect();
        let unique: std::collections::BTreeSet<_> = tokens.iter().map(|(t, _)| t).collect();
        let policy = TokenPolicy { token_id_key: b"k".to_vec(), rate_limit: None, shards: 2 };
        match TokenSet::parse(&list.join(","), &policy, None) {
            Ok(set) => prop_assert_eq!(set.len(), unique.len()),
            // A repeated token is refused, never merged.
            Err(_) => prop_assert!(unique.len() < tokens.len()),
        }
    }

    #[test]
    fn json_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = DeployBody::parse(&bytes) {
            prop_assert!(matches!(e.kind(), "invalid_json" | "invalid_request"));
        }
        let _ = serde_json::from_slice::<PipelineSpec>(&bytes);
        if let Err(e) = decode_output(&bytes, 64) {
            prop_assert!(matches!(e.kind(), "invalid_envelope_output" | "envelope_missing_payload"));
        }
        if let Err(e) = encode_input(&bytes, &Headers::new()) {
            prop_assert_eq!(e.kind(), "invalid_payload");
        }
    }

    #[test]
    fn envelopes_round_trip(
        payload in proptest::collection::btree_map("[a-z]{1,8}", -1000i64..1000, 0..6),
        headers in proptest::collection::btree_map("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~]{0,20}", 0..6),
    ) {
        let payload = serde_json::to_vec(&payload).unwrap();
        let stdin = encode_input(&payload, &Headers::new()).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&stdin).unwrap();
        prop_assert_eq!(serde_json::to_vec(&parsed["payload"]).unwrap(), payload.clone());
        let headers: Headers = headers.into_iter().map(|(k, v)| (k, v.trim().to_string())).collect();
        let out = serde_json::json!({"payload": serde_json::from_slice::<serde_json::Value>(&payload).unwrap(), "headers": headers});
        let decoded = decode_output(out.to_string().as_bytes(), 64).unwrap();
        prop_assert_eq!(decoded.headers, headers);
        prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&decoded.payload).unwrap(), out["payload"].clone());
    }

    #[test]
    fn manifests_parse_or_refuse(text in "[ -~\n]{0,300}") {
        if let Ok(m) = FunctionManifest::parse(&text) {
            let _ = m.timeout_ms();
        }
        let _ = toml::from_str::<PipelineSpec>(&text);
        let _ = duration_ms(&text);
    }

    #[test]
    fn durations_round_trip(n in 0u64..1_000_000, unit in prop_oneof![Just(("ms", 1u64)), Just(("s", 1000)), Just(("m", 60_000))]) {
        prop_assert_eq!(duration_ms(&format!("{n}{}", unit.0)), Ok(n * unit.1));
    }

    #[test]
    fn tensor_arguments_stay_inside_guest_memory(
        mem in proptest::collection::vec(any::<u8>(), 0..256),
        dtype in 0i32..2, shape_ptr in any::<i32>(), rank in -2i32..10, data_ptr in any::<i32>(), data_len in any::<i32>(),
    ) {
        match decode_create_args(&mem, dtype, shape_ptr, rank, data_ptr, data_len) {
            Ok((shape, values)) => {
                prop_assert_eq!(shape.len(), rank as usize);
                prop_assert!(shape_ptr as u32 as usize + shape.len() * 4 <= mem.len());
                prop_assert!(data_ptr as u32 as usize + values.len() * 4 <= mem.len());
            }
            Err((code, message)) => prop_assert!(code < 0 && !message.is_empty()),
        }
    }

    #[test]
    fn audit_segments_recover_their_valid_prefix(count in 1usize..20, cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>()) {
        let mut segment = Vec::new();
        let mut prev = GENESIS;
        let mut line = String::new();
        for seq in 1..=count as u64 {
            let event = AuditEvent {
                ts_unix_ms: 1_795_000_000_000 + seq,
                request_id: format!("r-{seq}"),
                actor: Actor::Dev,
                action: "invoke_function",
                function_id: None,
                pipeline_id: None,
                tenant_id: Some(seq),
                status_code: 200,
                error_kind: None,
                failed_step: None,
                latency_us: seq,
                peer_addr: "127.0.0.1:1".parse().unwrap(),
                client_cert_subject: None,
                repeated: 0,
                integrity: None,
            };
            prev = encode(&event, &ReplicaField::NONE, 0, seq, &prev, &mut line);
            segment.extend_from_slice(line.as_bytes());
        }
        let whole = scan(&segment, None);
        prop_assert_eq!((whole.valid_len, whole.records), (segment.len(), count as u64));
        // A torn tail (a crash mid-write, the rest zeros): the valid prefix is whole records.
        let at = cut.index(segment.len());
        let mut torn = segment[..at].to_vec();
        torn.resize(segment.len(), 0);
        let found = scan(&torn, None);
        prop_assert!(found.valid_len <= at);
        prop_assert!(found.valid_len == 0 || segment[found.valid_len - 1] == b'\n');
        // A flipped byte: the scan stops at or before the damaged record.
        let at = flip.index(segment.len());
        let mut tampered = segment.clone();
        tampered[at] ^= 0x20;
        let found = scan(&tampered, None);
        prop_assert!(found.valid_len <= at || tampered == segment);
    }
}

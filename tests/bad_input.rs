//! The bad-input matrix (docs/BAD-INPUT.md): one test per row. Each sends its bad input to a real
//! server while a bystander client keeps calling `/healthz` and a function on its own connection;
//! the bad input gets its precise status and kind, and the bystander is never refused.
//! `cargo test --test bad_input -- --nocapture` prints the bystander's latencies, which
//! docs/BAD-INPUT.md records.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::bystander::Bystander;
use common::{guests, Server};
use serde_json::json;

fn expect(r: &common::Response, status: u16, kind: &str) {
    assert_eq!((r.status, r.error_kind().as_str()), (status, kind), "{}", r.text());
}

/// Deploys `wasm` and invokes it once; the answer.
fn deploy_and_invoke(server: &Server, wasm: &[u8], extra: serde_json::Value) -> common::Response {
    let r = server.client().deploy("bad", wasm, extra);
    assert_eq!(r.status, 201, "{}", r.text());
    server.client().invoke(r.json()["id"].as_str().unwrap(), b"")
}

#[test]
fn invalid_wasm() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    for bytes in [&b"not wasm"[..], b"\0asm\x01\0\0\0\x01\xff", b""] {
        expect(&server.client().deploy("bad", bytes, json!({})), 400, "invalid_module");
    }
    b.finish("invalid wasm");
}

#[test]
fn a_module_of_64_mib_plus_one() {
    let functions = tempfile::tempdir().unwrap();
    let server = Server::start(&["--functions-dir", functions.path().to_str().unwrap()]);
    let b = Bystander::start(&server);
    // Through the API: its base64 alone is past the 64 MiB body limit, refused from the head.
    let module_len: usize = 64 * 1024 * 1024 + 1;
    let body_len = 40 + module_len.div_ceil(3) * 4;
    let mut client = server.client();
    let head = format!("POST /functions HTTP/1.1\r\nhost: t\r\ncontent-length: {body_len}\r\n\r\n");
    client.send_raw(head.as_bytes());
    client.send_raw(b"{\"name\":\"big\",\"wasm_b64\":\"AGFzbQEAAAA");
    let r = client.read_response();
    expect(&r, 413, "body_too_large");
    // Through the functions directory: refused by its size, counted, never read whole.
    let mut big = vec![0u8; module_len];
    big[..8].copy_from_slice(b"\0asm\x01\0\0\0");
    // Written elsewhere and renamed in, as docs/FUNCTIONS-DIR.md asks: the directory is polled
    // while a 64 MiB write is under way, and a half-written file is another error.
    let staging = tempfile::NamedTempFile::new_in(functions.path().parent().unwrap()).unwrap();
    std::fs::write(staging.path(), &big).unwrap();
    drop(big);
    staging.persist(functions.path().join("big.wasm")).unwrap();
    let log = server.wait_for_stderr("big.wasm");
    assert!(log.contains("is larger than 67108864 bytes"), "{log}");
    assert_eq!(server.metric("tensor_wasm_functions_dir_errors_total", &[]), 1.0);
    b.finish("a module of 64 MiB + 1");
}

#[test]
fn disallowed_imports() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    expect(&server.client().deploy("bad", &guests::env_import(), json!({})), 400, "unsupported_import");
    expect(&server.client().deploy("bad", &guests::mismatched_wasi_import(), json!({})), 400, "import_mismatch");
    b.finish("disallowed imports");
}

#[test]
fn a_guest_that_traps() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    expect(&deploy_and_invoke(&server, &guests::trap(), json!({})), 502, "guest_trap");
    b.finish("a trap");
}

#[test]
fn a_guest_that_loops_forever() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    let started = Instant::now();
    expect(&deploy_and_invoke(&server, &guests::infinite_loop(), json!({"timeout_ms": 500})), 504, "invoke_timeout");
    assert!(started.elapsed() < Duration::from_secs(10));
    b.finish("an infinite loop");
}

#[test]
fn a_guest_that_grows_memory_without_end() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    let r = deploy_and_invoke(&server, &guests::memory_hog(), json!({"memory_limit_mb": 16}));
    expect(&r, 502, "memory_limit_exceeded");
    b.finish("unbounded memory growth");
}

#[test]
fn a_guest_that_floods_stdout() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    expect(&deploy_and_invoke(&server, &guests::stdout_flood(), json!({})), 502, "output_too_large");
    b.finish("a stdout flood");
}

#[test]
fn a_guest_that_floods_stderr() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    // 4 MiB to stderr, then success: stderr is kept to --max-stderr-bytes, the rest counted.
    let r = deploy_and_invoke(&server, &guests::stderr_flood(64), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    // Forever: the deadline ends it.
    let r = deploy_and_invoke(&server, &guests::stderr_flood(u32::MAX), json!({"timeout_ms": 300}));
    expect(&r, 504, "invoke_timeout");
    let log = server.wait_for_stderr("stderr_dropped=");
    let line = log.lines().find(|l| l.contains("stderr_dropped=")).unwrap();
    let kept = line.split(" stderr=").nth(1).unwrap().split(" stderr_dropped=").next().unwrap();
    // Kept raw up to the cap, then escaped for the log: at most four characters a byte (`\xNN`).
    assert!(kept.len() <= 4 * 8 * 1024 + 64, "stderr kept for the log is capped: {} bytes", kept.len());
    b.finish("a stderr flood");
}

#[test]
fn a_guest_that_recurses_until_its_stack_runs_out() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    let r = deploy_and_invoke(&server, &guests::deep_recursion(), json!({}));
    expect(&r, 502, "guest_trap");
    assert!(r.text().contains("stack overflow"), "{}", r.text());
    b.finish("unbounded recursion");
}

#[test]
fn json_nested_100000_deep() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    // A deploy body nested deep is refused by its shape, before any recursion.
    expect(&server.client().request("POST", "/functions", &[], deep.as_bytes()), 400, "invalid_request");
    // Where nesting is read, serde_json's recursion limit (128) stops it: no stack is at risk.
    let body = format!(r#"{{"name":"deep","steps":{deep}}}"#);
    let r = server.client().request("POST", "/pipelines", &[], body.as_bytes());
    expect(&r, 400, "invalid_json");
    assert!(r.text().contains("recursion limit exceeded"), "{}", r.text());
    let arithmetic = server.deploy("arith", &guests::arithmetic());
    let call = format!(r#"{{"export":"add","args":{deep}}}"#);
    expect(&server.client().invoke(&arithmetic, call.as_bytes()), 400, "invalid_invoke_request");
    // As an envelope function's payload it is valid JSON: the runtime checks it without
    // recursing and passes it on, and the guest's own parser refuses it.
    let r = server.client().deploy("env", &guests::fiso_module("enrich"), json!({"abi": "envelope"}));
    let id = r.json()["id"].as_str().unwrap().to_string();
    expect(&server.client().invoke(&id, deep.as_bytes()), 502, "guest_exit");
    let log = server.wait_for_stderr("invalid JSON: recursion limit exceeded");
    assert!(log.contains("guest_exit"));
    b.finish("JSON nested 100,000 deep");
}

#[test]
fn invalid_base64() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    for b64 in ["%%%", "AGFzbQ=A", "A"] {
        let body = json!({"name": "x", "wasm_b64": b64}).to_string();
        expect(&server.client().request("POST", "/functions", &[], body.as_bytes()), 400, "invalid_base64");
    }
    b.finish("invalid base64");
}

#[test]
fn invalid_utf8_and_path_characters_in_names() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    let hello = base64::engine::general_purpose::STANDARD.encode(guests::hello());
    let mut body = br#"{"name":"a"#.to_vec();
    body.extend_from_slice(b"\xff\xfe");
    body.extend_from_slice(format!(r#"","wasm_b64":"{hello}"}}"#).as_bytes());
    expect(&server.client().request("POST", "/functions", &[], &body), 400, "invalid_json");
    for name in ["../../etc/passwd", "a/b", "a\\b", "a\u{0}b", ".hidden", "é"] {
        let body = json!({"name": name, "wasm_b64": hello}).to_string();
        expect(&server.client().request("POST", "/functions", &[], body.as_bytes()), 400, "invalid_name");
    }
    expect(&server.client().request("GET", "/functions/..%2F..%2Fetc", &[], b""), 404, "function_not_found");
    b.finish("invalid UTF-8 and path characters in names");
}

#[test]
fn header_bombs() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    let many: Vec<(String, String)> = (0..10_000).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let headers: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let mut client = server.client();
    client.send_raw(&common::encode_request("GET", "/healthz", &headers, b""));
    let kind = client.read_response().error_kind();
    assert!(kind == "too_many_headers" || kind == "headers_too_large", "{kind}");
    // 8 MiB, far past what socket buffers hold: the server answers after 16 KiB and keeps reading
    // and discarding the rest (`--linger-ms`), so the client's write completes and it reads the
    // answer, where a close with unread bytes would reset the connection under it.
    let huge = "v".repeat(8 << 20);
    let mut client = server.client();
    client.send_raw(&common::encode_request("GET", "/healthz", &[("x-big", &huge)], b""));
    expect(&client.read_response(), 431, "headers_too_large");
    b.finish("header bombs");
}

#[test]
fn slowloris_one_byte_a_second() {
    let server = Server::start(&["--header-timeout-ms", "2500"]);
    let b = Bystander::start(&server);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    for byte in b"GET /healthz HTTP/1.1\r\nx-slow: aaaaaaaaaaaaaaaa" {
        if stream.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"));
    b.finish("slowloris");
}

#[test]
fn pipelining_10000_requests_on_one_connection() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    // Alternating 200s and 404s, so that the order of the answers shows.
    let pair =
        [common::encode_request("GET", "/healthz", &[], b""), common::encode_request("GET", "/missing", &[], b"")]
            .concat();
    let all: Vec<u8> = pair.iter().copied().cycle().take(pair.len() * 5_000).collect();
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&all).is_ok());
    let mut reader = stream;
    let (mut received, mut statuses) = (Vec::new(), Vec::new());
    let mut chunk = vec![0u8; 64 * 1024];
    let mut scanned = 0;
    while statuses.len() < 10_000 {
        let n = reader.read(&mut chunk).unwrap();
        assert!(n > 0, "the connection closed after {} answers", statuses.len());
        received.extend_from_slice(&chunk[..n]);
        while let Some(at) = received[scanned..].windows(12).position(|w| w.starts_with(b"HTTP/1.1 ")) {
            let start = scanned + at;
            statuses.push(String::from_utf8_lossy(&received[start + 9..start + 12]).into_owned());
            scanned = start + 12;
        }
    }
    assert!(sender.join().unwrap());
    for (i, status) in statuses.iter().enumerate() {
        assert_eq!(status, if i % 2 == 0 { "200" } else { "404" }, "answer {i} is out of order");
    }
    b.finish("10,000 pipelined requests");
}

#[test]
fn absurd_timeouts() {
    let server = Server::start(&[]);
    let b = Bystander::start(&server);
    for timeout in [json!(0), json!(-1), json!(1_000_000_000_000u64)] {
        let r = server.client().deploy("t", &guests::hello(), json!({ "timeout_ms": timeout }));
        expect(&r, 400, "invalid_timeout");
    }
    for timeout in [json!(0), json!(-5), json!(1_000_000_000_000u64)] {
        let body = json!({"name": "p", "steps": ["bystander"], "timeout_ms": timeout}).to_string();
        expect(&server.client().request("POST", "/pipelines", &[], body.as_bytes()), 400, "invalid_pipeline");
    }
    b.finish("absurd timeouts");
}

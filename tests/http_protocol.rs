//! The HTTP/1.1 layer against a real server: keep-alive, pipelining, chunked bodies, limits,
//! deadlines and the error shape.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{encode_request, guests, Server};

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let server = Server::start(&[]);
    let mut c = server.client();
    for _ in 0..50 {
        let r = c.request("GET", "/healthz", &[], b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
        assert_eq!(r.header("connection"), None);
    }
    // The readiness poll's connection, this one, and the scrape's own.
    assert_eq!(server.metric("tensor_wasm_shard_connections_accepted_total", &[]), 3.0);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(&[]);
    let echo = server.deploy("echo", &guests::echo());
    let mut c = server.client();
    let mut batch = Vec::new();
    for i in 0..200 {
        if i % 2 == 0 {
            batch.extend(encode_request(
                "POST",
                &format!("/functions/{echo}/invoke"),
                &[],
                format!("[{i}]").as_bytes(),
            ));
        } else {
            batch.extend(encode_request("GET", "/healthz", &[], b""));
        }
    }
    c.send_raw(&batch);
    for i in 0..200 {
        let r = c.read_response();
        assert_eq!(r.status, 200);
        if i % 2 == 0 {
            assert_eq!(r.text(), format!("[{i}]"));
        } else {
            assert_eq!(r.text(), r#"{"status":"ok"}"#);
        }
    }
}

#[test]
fn chunked_bodies_are_decoded_across_reads() {
    let server = Server::start(&[]);
    let echo = server.deploy("echo", &guests::echo());
    let mut c = server.client();
    let head = format!("POST /functions/{echo}/invoke HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n");
    c.send_raw(head.as_bytes());
    for piece in ["4;ext=1\r\n{\"a\"", "\r\n", "6\r\n:[1,2]\r\n", "1\r\n}\r\n0\r\nx-trailer: 1\r\n", "\r\n"] {
        c.send_raw(piece.as_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), r#"{"a":[1,2]}"#);
    assert_eq!(r.header("content-type"), Some("application/json"));
    // The connection is still usable after a chunked body.
    assert_eq!(c.request("GET", "/healthz", &[], b"").status, 200);

    let bad = format!("POST /functions/{echo}/invoke HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n");
    let mut c = server.client();
    c.send_raw(bad.as_bytes());
    let r = c.read_response();
    assert_eq!((r.status, r.error_kind().as_str()), (400, "malformed_request"));
}

#[test]
fn oversized_bodies_get_413_and_the_connection_closes() {
    let server = Server::start(&["--max-body-bytes", "1024"]);
    let mut c = server.client();
    c.send_raw(b"POST /functions HTTP/1.1\r\nhost: t\r\ncontent-length: 1025\r\n\r\n");
    let r = c.read_response();
    assert_eq!((r.status, r.error_kind().as_str()), (413, "body_too_large"));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed(Duration::from_secs(5)));

    let mut c = server.client();
    let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
    c.send_raw(
        format!("POST /functions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}").as_bytes(),
    );
    let r = c.read_response();
    assert_eq!((r.status, r.error_kind().as_str()), (413, "body_too_large"));

    // Exactly at the limit is fine (and then a bad deploy body, not a size error).
    let mut c = server.client();
    let r = c.request("POST", "/functions", &[], &[b' '; 1024]);
    assert_eq!(r.status, 400);
}

#[test]
fn a_client_still_sending_after_its_error_answer_is_let_go_after_the_linger() {
    let server = Server::start(&["--max-body-bytes", "1024", "--linger-ms", "200"]);
    let mut c = server.client();
    c.send_raw(b"POST /functions HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000000\r\n\r\n");
    let r = c.read_response();
    assert_eq!((r.status, r.error_kind().as_str()), (413, "body_too_large"));
    // The server reads and discards the body it refused for 200 ms, then closes: a write fails
    // soon after, where a server lingering without end would take all of it.
    let chunk = vec![b'x'; 64 * 1024];
    let started = Instant::now();
    let mut sent = 0usize;
    while c.try_send_raw(&chunk).is_ok() {
        sent += chunk.len();
        assert!(started.elapsed() < Duration::from_secs(20) && sent < 1_000_000_000, "still taken after {sent} bytes");
    }
    // A connection still served the while.
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn oversized_or_too_many_headers_get_431() {
    let server = Server::start(&["--max-header-bytes", "1024", "--max-headers", "8"]);
    let mut c = server.client();
    let r = c.request("GET", "/healthz", &[("x-big", &"a".repeat(2000))], b"");
    assert_eq!((r.status, r.error_kind().as_str()), (431, "headers_too_large"));

    let mut c = server.client();
    let many: Vec<(String, String)> = (0..12).map(|i| (format!("x-h{i}"), "v".to_string())).collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let r = c.request("GET", "/healthz", &refs, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (431, "too_many_headers"));

    // An endless head without a line break is cut off at the limit too.
    let mut c = server.client();
    c.send_raw(&vec![b'G'; 4096]);
    let r = c.read_response();
    assert_eq!(r.status, 431);
}

#[test]
fn malformed_requests_get_400() {
    let server = Server::start(&[]);
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nhost: t\r\ncontent-length: abc\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"POST /functions HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        b"GET healthz HTTP/1.1\r\nhost: t\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: t\r\nbad header\r\n\r\n",
    ] {
        let mut c = server.client();
        c.send_raw(raw);
        let r = c.read_response();
        assert_eq!((r.status, r.error_kind().as_str()), (400, "malformed_request"), "{}", String::from_utf8_lossy(raw));
        assert!(c.is_closed(Duration::from_secs(5)));
    }
    let mut c = server.client();
    c.send_raw(b"POST /functions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip\r\n\r\n");
    let r = c.read_response();
    assert_eq!((r.status, r.error_kind().as_str()), (501, "unsupported_transfer_encoding"));
    // The server keeps serving everyone.
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn unknown_routes_404_and_wrong_methods_405_with_allow() {
    let server = Server::start(&[]);
    let mut c = server.client();
    let r = c.request("GET", "/nope", &[], b"");
    assert_eq!((r.status, r.error_kind().as_str()), (404, "not_found"));
    assert_eq!(r.header("content-type"), Some("application/json"));

    for (method, path, allow) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("PUT", "/functions", "GET, HEAD, POST"),
        ("POST", "/functions/0123456789abcdef0123456789abcdef", "GET, HEAD, DELETE"),
        ("GET", "/functions/0123456789abcdef0123456789abcdef/invoke", "POST"),
    ] {
        let r = c.request(method, path, &[], b"");
        assert_eq!((r.status, r.error_kind().as_str()), (405, "method_not_allowed"), "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
    // 404 and 405 keep the connection open.
    assert_eq!(c.request("GET", "/healthz", &[], b"").status, 200);
    assert!(server.metric("tensor_wasm_http_requests_total", &[("route", "unmatched"), ("status", "404")]) >= 1.0);
}

#[test]
fn head_connection_close_and_expect_continue() {
    let server = Server::start(&[]);
    let mut c = server.client();
    let r = c.request("HEAD", "/healthz", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("15"));
    assert!(r.body.is_empty());

    let r = c.request("GET", "/healthz", &[("connection", "close")], b"");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed(Duration::from_secs(5)));

    let echo = server.deploy("echo", &guests::echo());
    let mut c = server.client();
    let body = b"{\"big\":true}";
    c.send_raw(
        format!(
            "POST /functions/{echo}/invoke HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    // The server asks for the body before it is sent.
    let mut interim = [0u8; 25];
    std::io::Read::read_exact(&mut c.stream, &mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.stream.write_all(body).unwrap();
    let r = c.read_response();
    assert_eq!(r.text(), String::from_utf8_lossy(body));
}

#[test]
fn slow_and_idle_clients_cannot_hold_a_shard() {
    let server = Server::start(&[
        "--shards",
        "1",
        "--header-timeout-ms",
        "300",
        "--body-timeout-ms",
        "300",
        "--idle-timeout-ms",
        "400",
    ]);
    // A client that sends half a head and stalls gets 408, then is closed.
    let mut slow = server.client();
    slow.send_raw(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-slow: ");
    let started = Instant::now();
    // Meanwhile the single shard answers others at once.
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    let r = slow.read_response();
    assert_eq!((r.status, r.error_kind().as_str()), (408, "request_timeout"));
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(slow.is_closed(Duration::from_secs(5)));

    // A body that stops arriving is cut off as well.
    let mut stalled = server.client();
    stalled.send_raw(b"POST /functions HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n{");
    let r = stalled.read_response();
    assert_eq!(r.status, 408);

    // An idle keep-alive connection is closed after the idle timeout.
    let mut idle = server.client();
    assert_eq!(idle.request("GET", "/healthz", &[], b"").status, 200);
    assert!(idle.is_closed(Duration::from_secs(5)));
}

#[test]
fn chunk_size_lines_outside_the_grammar_get_400() {
    let server = Server::start(&[]);
    let echo = server.deploy("echo", &guests::echo());
    let head = format!("POST /functions/{echo}/invoke HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n");
    for (body, says) in [
        // A bare CR inside the size: decoded as 16 before, which a proxy reading it as 1 frames
        // differently.
        ("1\r0\r\n[1,2,3,4,5,6,7,8]\r\n0\r\n\r\n", "not ended by CRLF"),
        // A bare LF as a line end, after a size and after chunk data.
        ("2\n[]\r\n0\r\n\r\n", "not ended by CRLF"),
        ("2\r\n[]\n0\r\n\r\n", "missing CRLF after chunk data"),
        // Whitespace inside the size, and a bare CR in an extension.
        ("1 0\r\n", "invalid chunk extension"),
        ("2;a\rb\r\n[]\r\n0\r\n\r\n", "not ended by CRLF"),
        // A bare LF ending a trailer.
        ("2\r\n[]\r\n0\r\nx-t: 1\n\r\n", "trailer line not ended by CRLF"),
    ] {
        let mut c = server.client();
        c.send_raw(format!("{head}{body}").as_bytes());
        let r = c.read_response();
        assert_eq!((r.status, r.error_kind().as_str()), (400, "malformed_request"), "{body:?}: {}", r.text());
        assert!(r.text().contains(says), "{body:?}: {}", r.text());
        assert!(c.is_closed(Duration::from_secs(5)), "{body:?}");
    }
    // The same body in the grammar is served, and so is everyone else.
    let mut c = server.client();
    c.send_raw(format!("{head}2;a=\"b c\"\r\n[]\r\n0\r\nx-t: 1\r\n\r\n").as_bytes());
    let r = c.read_response();
    assert_eq!((r.status, r.text()), (200, "[]".to_string()));
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn http11_needs_exactly_one_host_and_http10_needs_none() {
    let server = Server::start(&[]);
    for (raw, says) in [
        (&b"GET /healthz HTTP/1.1\r\n\r\n"[..], "must have a Host header"),
        (b"GET /healthz HTTP/1.1\r\nx-a: 1\r\n\r\n", "must have a Host header"),
        (b"GET /healthz HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n", "more than one Host header"),
        (b"GET /healthz HTTP/1.0\r\nhost: a\r\nhost: a\r\n\r\n", "more than one Host header"),
    ] {
        let mut c = server.client();
        c.send_raw(raw);
        let r = c.read_response();
        let text = String::from_utf8_lossy(raw);
        assert_eq!((r.status, r.error_kind().as_str()), (400, "malformed_request"), "{text}: {}", r.text());
        assert!(r.text().contains(says), "{text}: {}", r.text());
        assert!(c.is_closed(Duration::from_secs(5)), "{text}");
    }
    // HTTP/1.0 predates Host.
    let mut c = server.client();
    c.send_raw(b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn http10_keep_alive_is_answered_with_keep_alive() {
    let server = Server::start(&[]);
    let mut c = server.client();
    // An HTTP/1.0 client closes unless the answer says keep-alive: it must say so, every time,
    // and then serve the next request on the same connection.
    for _ in 0..3 {
        c.send_raw(b"GET /healthz HTTP/1.0\r\nconnection: keep-alive\r\n\r\n");
        let r = c.read_response();
        assert_eq!((r.status, r.header("connection")), (200, Some("keep-alive")));
    }
    // Without it, HTTP/1.0 closes, and says so.
    c.send_raw(b"GET /healthz HTTP/1.0\r\n\r\n");
    let r = c.read_response();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(c.is_closed(Duration::from_secs(5)));
    // HTTP/1.1 keeps alive without a word, as before.
    let r = server.client().request("GET", "/healthz", &[("connection", "keep-alive")], b"");
    assert_eq!((r.status, r.header("connection")), (200, None));
    // And HTTP/1.0 has no chunked coding: on a kept-alive connection a chunked body is refused.
    let mut c = server.client();
    c.send_raw(b"POST /functions HTTP/1.0\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n");
    let r = c.read_response();
    assert_eq!((r.status, r.error_kind().as_str()), (400, "malformed_request"), "{}", r.text());
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn max_headers_is_kept_as_given_up_to_its_cap_and_refused_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for given in ["257", "1000"] {
        let args = ["serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--max-headers", given];
        let (code, _, stderr) = common::tensor_wasm(&args, &[]);
        assert_eq!(code, 2, "--max-headers {given}: {stderr}");
        assert!(stderr.contains("--max-headers must be at most 256"), "{stderr}");
    }
    // At the cap, exactly 256 fields are served (`host` is one of them) and 257 are not.
    let server = Server::start(&["--max-headers", "256"]);
    let names: Vec<String> = (0..256).map(|i| format!("x-h{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let r = server.client().request("GET", "/healthz", &headers[..255], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.client().request("GET", "/healthz", &headers, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (431, "too_many_headers"));
    assert!(r.text().contains("more than 256"), "{}", r.text());
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn two_authorization_headers_get_400_on_protected_routes_and_metrics() {
    const TOKEN: &str = "admin-0123456789abcdef0123456789";
    const METRICS: &str = "metrics-0123456789abcdef01234567";
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &[], |cmd| {
        cmd.env("TENSOR_WASM_API_TOKENS", format!("{TOKEN}:tenant=*")).env("TENSOR_WASM_API_METRICS_TOKEN", METRICS);
    });
    let good = format!("Bearer {TOKEN}");
    let metrics = format!("Bearer {METRICS}");
    // Whichever comes first, and even when both are the same valid token.
    for (path, first, second) in [
        ("/functions", good.as_str(), "Bearer someone-else-0123456789abcdef"),
        ("/functions", "Bearer someone-else-0123456789abcdef", good.as_str()),
        ("/functions", good.as_str(), good.as_str()),
        ("/pipelines", good.as_str(), good.as_str()),
        ("/metrics", metrics.as_str(), metrics.as_str()),
        ("/metrics", metrics.as_str(), "Bearer wrong"),
    ] {
        let mut c = server.client();
        let r = c.request("GET", path, &[("authorization", first), ("Authorization", second)], b"");
        assert_eq!((r.status, r.error_kind().as_str()), (400, "duplicate_authorization_header"), "{path}");
        // Not a framing error: the connection stays open for the next request.
        let valid = if path == "/metrics" { metrics.as_str() } else { good.as_str() };
        assert_eq!(c.request("GET", path, &[("authorization", valid)], b"").status, 200, "{path}");
    }
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

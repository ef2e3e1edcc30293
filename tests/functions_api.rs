//! Deploying, listing, getting, deleting and invoking functions, with real guests.

mod common;

use std::time::{Duration, Instant};

use common::{guests, Server};
use serde_json::json;

#[test]
fn deploy_list_get_delete() {
    let server = Server::start(&[]);
    let mut c = server.client();
    assert_eq!(c.request("GET", "/functions", &[], b"").json(), json!({"functions": []}));

    let r = c.deploy("hello", &guests::hello(), json!({"timeout_ms": 1500, "memory_limit_mb": 16}));
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(created["name"], "hello");
    assert!(created["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(created["created_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!((created["timeout_ms"].as_u64(), created["memory_limit_mb"].as_u64()), (Some(1500), Some(16)));

    // The same bytes again: a new function, the same digest.
    let second = server.deploy("hello-again", &guests::hello());
    let listed = c.request("GET", "/functions", &[], b"").json();
    let items = listed["functions"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0], created);
    assert_eq!(items[1]["digest"], created["digest"]);
    assert_eq!(server.metric("tensor_wasm_functions_total", &[]), 2.0);

    assert_eq!(c.request("GET", &format!("/functions/{id}"), &[], b"").json(), created);
    let r = c.request("DELETE", &format!("/functions/{id}"), &[], b"");
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    for (method, path) in [
        ("GET", format!("/functions/{id}")),
        ("DELETE", format!("/functions/{id}")),
        ("POST", format!("/functions/{id}/invoke")),
    ] {
        let r = c.request(method, &path, &[], b"");
        assert_eq!((r.status, r.error_kind().as_str()), (404, "function_not_found"), "{method} {path}");
    }
    // The other function sharing the module still runs.
    assert_eq!(c.invoke(&second, b"").status, 200);
    let r = c.request("GET", "/functions/..%2F..%2Fetc", &[], b"");
    assert_eq!(r.status, 404);
}

#[test]
fn bad_deploys_are_refused_with_precise_kinds() {
    let server = Server::start(&["--max-timeout-ms", "10000", "--max-memory-limit-mb", "256"]);
    let mut c = server.client();
    let cases: Vec<(&[u8], &str, &str)> = vec![
        (b"{not json", "invalid_json", ""),
        (br#"{"name":"x"}"#, "invalid_request", "wasm_b64"),
        (br#"{"name":"x","wasm_b64":"AA==","extra":1}"#, "invalid_request", "extra"),
        (br#"{"name":"x","wasm_b64":"%%%"}"#, "invalid_base64", ""),
        (br#"{"name":"x","wasm_b64":"aGVsbG8="}"#, "invalid_module", ""),
        (br#"{"name":"a/b","wasm_b64":"AA=="}"#, "invalid_name", ""),
        (br#"{"name":"","wasm_b64":"AA=="}"#, "invalid_name", ""),
    ];
    for (body, kind, mentions) in cases {
        let r = c.request("POST", "/functions", &[], body);
        assert_eq!((r.status, r.error_kind().as_str()), (400, kind), "{}", String::from_utf8_lossy(body));
        assert!(r.json()["error"]["message"].as_str().unwrap().contains(mentions), "{}", r.text());
    }
    let hello = guests::hello();
    for timeout in [json!(0), json!(-1), json!(1e12), json!(10001), json!("5")] {
        let r = c.deploy("t", &hello, json!({ "timeout_ms": timeout }));
        assert_eq!(r.status, 400, "{timeout}");
        let kind = r.error_kind();
        assert!(kind == "invalid_timeout" || kind == "invalid_request", "{timeout}: {kind}");
    }
    for limit in [json!(0), json!(257), json!(-5)] {
        let r = c.deploy("m", &hello, json!({ "memory_limit_mb": limit }));
        assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_memory_limit"), "{limit}");
    }
    let r = c.deploy("env", &guests::env_import(), json!({}));
    assert_eq!((r.status, r.error_kind().as_str()), (400, "unsupported_import"));
    assert!(r.text().contains("env::launch_missiles"), "{}", r.text());
    let r = c.deploy("mismatch", &guests::mismatched_wasi_import(), json!({}));
    assert_eq!((r.status, r.error_kind().as_str()), (400, "import_mismatch"));
    assert!(r.text().contains("fd_write"), "{}", r.text());
    assert_eq!(c.request("GET", "/functions", &[], b"").json(), json!({"functions": []}));
}

#[test]
fn invoke_runs_wasi_commands() {
    let server = Server::start(&[]);
    let mut c = server.client();
    let hello = server.deploy("hello", &guests::hello());
    let r = c.invoke(&hello, b"{}");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"result": "ok", "function_id": hello}));

    let echo = server.deploy("echo", &guests::echo());
    let r = c.invoke(&echo, br#"{"x":[1,2,3]}"#);
    assert_eq!((r.status, r.header("content-type")), (200, Some("application/json")));
    assert_eq!(r.text(), r#"{"x":[1,2,3]}"#);
    let r = c.invoke(&echo, b"plain text");
    assert_eq!((r.header("content-type"), r.text().as_str()), (Some("application/octet-stream"), "plain text"));
    let big: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(c.invoke(&echo, &big).body, big);

    // Both iovecs of one fd_write reach stdout; exit code 0 is success.
    let ok = server.deploy("ok", &guests::write_and_exit("hello world", "a warning", 0));
    assert_eq!(c.invoke(&ok, b"").text(), "hello world");
    let failing = server.deploy("fails", &guests::write_and_exit("partial", "it broke", 3));
    let r = c.invoke(&failing, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (502, "guest_exit"));
    assert!(r.text().contains("code 3"), "{}", r.text());
    server.wait_for_stderr("it broke"); // the guest's stderr is kept in the log
}

#[test]
fn guest_failures_map_to_their_kinds() {
    let server = Server::start(&["--max-output-bytes", "1048576"]);
    let mut c = server.client();
    let trap = server.deploy("trap", &guests::trap());
    let r = c.invoke(&trap, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (502, "guest_trap"));
    assert!(r.text().contains("unreachable"), "{}", r.text());

    let deep = server.deploy("deep", &guests::deep_recursion());
    let r = c.invoke(&deep, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (502, "guest_trap"));
    assert!(r.text().contains("stack overflow"), "{}", r.text());

    let hog = c.deploy("hog", &guests::memory_hog(), json!({"memory_limit_mb": 8})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = c.invoke(&hog, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (502, "memory_limit_exceeded"));
    assert!(r.text().contains("8 MiB"), "{}", r.text());

    let flood = server.deploy("flood", &guests::stdout_flood());
    let r = c.invoke(&flood, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (502, "output_too_large"));

    let spin = c.deploy("spin", &guests::infinite_loop(), json!({"timeout_ms": 300})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    let r = c.invoke(&spin, b"");
    let took = started.elapsed();
    assert_eq!((r.status, r.error_kind().as_str()), (504, "invoke_timeout"));
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");

    assert_eq!(server.metric("tensor_wasm_invocations_failed_total", &[]), 5.0);
    assert_eq!(server.metric("tensor_wasm_active_instances", &[]), 0.0);
    // After all that, the server and its guests still work.
    let hello = server.deploy("hello", &guests::hello());
    assert_eq!(c.invoke(&hello, b"").status, 200);
}

#[test]
fn exports_are_callable_without_start_and_instances_are_fresh() {
    let server = Server::start(&[]);
    let mut c = server.client();
    let math = server.deploy("math", &guests::arithmetic());
    assert_eq!(c.invoke(&math, br#"{"export":"add","args":[2,40]}"#).json(), json!({"result": [42]}));
    assert_eq!(c.invoke(&math, br#"{"export":"scale","args":[4]}"#).json(), json!({"result": [10.0]}));
    for (body, kind) in [
        (&br#"{"export":"missing","args":[]}"#[..], "export_not_found"),
        (br#"{"export":"add","args":[1]}"#, "invalid_invoke_request"),
        (br#"{"export":"add","args":["a","b"]}"#, "invalid_invoke_request"),
        (b"not json", "invalid_invoke_request"),
    ] {
        let r = c.invoke(&math, body);
        assert_eq!((r.status, r.error_kind().as_str()), (400, kind), "{}", String::from_utf8_lossy(body));
    }

    let counter = server.deploy(
        "counter",
        &guests::wasm(
            r#"(module (global $n (mut i32) (i32.const 0))
                 (func (export "next") (result i32)
                   (global.set $n (i32.add (global.get $n) (i32.const 1))) (global.get $n)))"#,
        ),
    );
    for _ in 0..5 {
        assert_eq!(
            c.invoke(&counter, br#"{"export":"next"}"#).json(),
            json!({"result": [1]}),
            "state leaked between calls"
        );
    }

    // Memory too: a recycled slot is reset in place (src/wasm/engine.rs), for the pages just
    // above the data, below it, in a data segment, and far beyond any reset window.
    let bumper = server.deploy(
        "bumper",
        &guests::wasm(
            r#"(module (memory 64) (data (i32.const 2000000) "\29\00\00\00")
                 (func (export "bump") (param i32) (result i32)
                   (i32.store (local.get 0) (i32.add (i32.load (local.get 0)) (i32.const 1)))
                   (i32.load (local.get 0))))"#,
        ),
    );
    for _ in 0..5 {
        for (addr, fresh) in [(100, 1), (1_100_000, 1), (2_000_000, 42), (4_000_000, 1)] {
            let r = c.invoke(&bumper, format!(r#"{{"export":"bump","args":[{addr}]}}"#).as_bytes());
            assert_eq!(r.json(), json!({"result": [fresh]}), "memory at {addr} leaked between calls");
        }
    }
}

#[test]
fn a_looping_guest_does_not_stall_its_shard() {
    // One shard: the loop and everything else share it.
    let server = Server::start(&["--shards", "1", "--header-timeout-ms", "200"]);
    let spin = server.client().deploy("spin", &guests::infinite_loop(), json!({"timeout_ms": 3000})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let addr = server.addr;
    let looping = std::thread::spawn(move || common::Client::connect(addr).invoke(&spin, b""));
    server.wait_for_metric("tensor_wasm_active_instances", &[], 1.0);

    // Health checks are answered while the guest still loops: were the shard held by it, the
    // first would wait for its 3 s deadline.
    for _ in 0..20 {
        assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
        assert!(!looping.is_finished(), "a health check was answered only after the looping guest ended");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Timers fire (a stalled client gets its 408) and wakes from other threads arrive (a deploy,
    // compiled on the catalog worker, completes), although the guest never stops yielding: all
    // of it before the guest's deadline ends the loop.
    let mut slow = server.client();
    slow.send_raw(b"GET /healthz HTTP/1.1\r\n");
    let deployed = server.deploy("hello", &guests::hello());
    assert!(!looping.is_finished(), "the deploy completed only after the looping guest ended");
    assert_eq!(server.client().invoke(&deployed, b"").status, 200);
    assert_eq!(slow.read_response().status, 408);
    assert!(!looping.is_finished(), "the 408 came only after the looping guest ended");

    let r = looping.join().unwrap();
    assert_eq!((r.status, r.error_kind().as_str()), (504, "invoke_timeout"));
}

#[test]
fn concurrent_invokes_spread_over_all_shards() {
    let server = Server::start(&["--shards", "2"]);
    let echo = server.deploy("echo", &guests::echo());
    let addr = server.addr;
    let workers: Vec<_> = (0..16)
        .map(|t| {
            let echo = echo.clone();
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                for i in 0..25 {
                    let body = format!("{{\"t\":{t},\"i\":{i}}}");
                    let r = c.invoke(&echo, body.as_bytes());
                    assert_eq!((r.status, r.text()), (200, body));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    for shard in ["0", "1"] {
        let n = server.metric("tensor_wasm_shard_requests_total", &[("shard", shard)]);
        assert!(n > 0.0, "shard {shard} served nothing");
    }
    let invokes = server.metric(
        "tensor_wasm_http_requests_total",
        &[("route", "/functions/:id/invoke"), ("method", "POST"), ("status", "200")],
    );
    assert_eq!(invokes, 400.0);
    assert_eq!(server.metric("tensor_wasm_instance_spawns_total", &[]), 400.0);
}

#[test]
fn instance_slots_are_bounded() {
    let server = Server::start(&["--shards", "1", "--max-instances", "1", "--max-concurrent-per-tenant", "2"]);
    let busy = server.deploy("busy", &guests::busy(1500));
    let addr = server.addr;
    let id = busy.clone();
    let first = std::thread::spawn(move || common::Client::connect(addr).invoke(&id, b""));
    server.wait_for_metric("tensor_wasm_instance_spawns_total", &[], 1.0);
    let r = server.client().invoke(&busy, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (503, "overloaded"));
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = first.join().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, r#"{"done":true}"#));
}

#[test]
fn a_spent_instance_frees_its_slot_once_answered_and_before_the_next_step() {
    // One slot: every invoke and every pipeline step must find the previous one's freed.
    let server = Server::start(&["--shards", "1", "--max-instances", "1", "--max-concurrent-per-tenant", "2"]);
    let echo = server.deploy("echo", &guests::echo());
    let mut c = server.client();
    for i in 0..20 {
        assert_eq!(c.invoke(&echo, format!("[{i}]").as_bytes()).text(), format!("[{i}]"));
    }
    let spec = serde_json::json!({"name": "three", "steps": ["echo", "echo", "echo"]}).to_string();
    let r = c.request("POST", "/pipelines", &[("content-type", "application/json")], spec.as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    let pipeline = r.json()["id"].as_str().unwrap().to_string();
    let r = c.request("POST", &format!("/pipelines/{pipeline}/invoke"), &[], b"[7]");
    assert_eq!((r.status, r.text().as_str()), (200, "[7]"));
    // Answered and idle: no instance is left alive.
    common::within(Duration::from_secs(5), "no live instance", || {
        server.metric("tensor_wasm_active_instances", &[]) == 0.0
    });
    assert_eq!(server.metric("tensor_wasm_instance_spawns_total", &[]), 23.0);
}

/// Issue 33's bug: each shard's share of `--max-instances` was rounded up, while the pool holds
/// exactly `--max-instances`, so an invoke a shard admitted could fail inside the pool as 502
/// `guest_trap`. Shares are exact now: every invoke beyond them is 503 `overloaded`, and no more
/// than the pool ever run.
#[test]
fn invokes_past_an_odd_instance_pool_over_three_shards_are_503_never_502() {
    // 5 over 3 shards: rounded-up shares were 2 + 2 + 2 = 6, one past the pool, so once every
    // shard ran two invokes the sixth failed in the pool; exact shares are 2 + 2 + 1. With 18
    // connections each shard gets at least two however the kernel hashes them, but with a
    // chance of about 2 %, so the old shares failed this test in nearly every run.
    let args = ["--shards", "3", "--max-instances", "5", "--max-concurrent-per-tenant", "18"];
    let server = Server::start(&args);
    let id = server.deploy("busy", &guests::busy(1500));
    let statuses: Vec<(u16, String)> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..18)
            .map(|_| {
                let (server, id) = (&server, &id);
                scope.spawn(move || {
                    let r = server.client().invoke(id, b"");
                    let kind = if r.status == 200 { String::new() } else { r.error_kind() };
                    (r.status, kind)
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let overloaded = statuses.iter().filter(|(s, k)| *s == 503 && k == "overloaded").count();
    assert_eq!(ok + overloaded, statuses.len(), "only 200 or 503 overloaded: {statuses:?}");
    assert!((1..=5).contains(&ok) && overloaded >= 13, "{statuses:?}");
}

#[test]
fn fewer_instances_than_shards_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let args = ["serve", "--shards", "3", "--max-instances", "2", "--listen", "127.0.0.1:0", "--data-dir", data_dir];
    let (code, _, err) = common::tensor_wasm(&args, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-instances 2 is fewer than the 3 shards"), "{err}");
}

//! A real Rust program, built for wasm32-wasip1 at test time, deployed and invoked: JSON in on
//! stdin, JSON out on stdout, arguments, stderr and exit codes through our WASI.

mod common;

use common::{guests, Server};
use serde_json::json;

#[test]
fn rust_json_guest_reads_stdin_and_writes_stdout() {
    let wasm = guests::rust_json_stats();
    let server = Server::start(&[]);
    let id = server.deploy("json-stats", &wasm);
    let mut c = server.client();

    let r = c.invoke(&id, br#"{"values": [1, 2.5, 3.5, 9], "label": "demo"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        json!({"count": 4, "sum": 16.0, "mean": 4.0, "max": 9.0, "label": "demo", "args": ["json-stats"]})
    );

    // A large input crosses many fd_read calls.
    let values: Vec<u32> = (0..50_000).collect();
    let r = c.invoke(&id, json!({ "values": values }).to_string().as_bytes());
    assert_eq!(r.json()["sum"], json!(1_249_975_000.0));

    // Its own failure: exit code 2, message on stderr (kept in the server's log).
    let r = c.invoke(&id, b"[not json");
    assert_eq!((r.status, r.error_kind().as_str()), (502, "guest_exit"));
    assert!(r.text().contains("code 2"));
    server.wait_for_stderr("json-stats: invalid JSON");

    // Many invocations in a row, each on a fresh instance.
    for i in 0..200 {
        let r = c.invoke(&id, format!(r#"{{"values":[{i}]}}"#).as_bytes());
        assert_eq!(r.json()["sum"], json!(i as f64));
    }
}

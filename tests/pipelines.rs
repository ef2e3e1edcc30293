//! Pipelines: chains of functions through the API and the functions directory, their deadlines,
//! their errors, and delivery of the final output to an HTTP sink.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{guests, within, Server};
use serde_json::{json, Value};

fn deploy_envelope(server: &Server, name: &str) -> String {
    let r = server.client().deploy(name, &guests::fiso_module(name), json!({"abi": "envelope"}));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn create(server: &Server, spec: Value) -> common::Response {
    server.client().request("POST", "/pipelines", &[("content-type", "application/json")], spec.to_string().as_bytes())
}

fn invoke(server: &Server, id: &str, body: &[u8]) -> common::Response {
    server.client().request("POST", &format!("/pipelines/{id}/invoke"), &[("x-trace", "t-1")], body)
}

const ORDER: &[u8] = br#"{"order_id":"123","amount":99.99}"#;

/// Every audit record, via `audit tail`.
fn audit_records(data_dir: &Path) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["audit", "tail", "-n", "100000"])
        .arg(data_dir.join("audit"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn validate_enrich_transform_chain() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_in(data.path(), &["--audit-sync", "always"]);
    let validate = deploy_envelope(&server, "validate");
    for name in ["enrich", "transform"] {
        deploy_envelope(&server, name);
    }
    // Steps by name or by id.
    let r = create(&server, json!({"name": "orders", "steps": [validate, "enrich", "transform"], "timeout_ms": 5000}));
    assert_eq!(r.status, 201, "{}", r.text());
    let pipeline = r.json();
    let id = pipeline["id"].as_str().unwrap().to_string();
    assert_eq!(pipeline["steps"][1], json!({"function": "enrich", "timeout_ms": null}));

    let r = invoke(&server, &id, ORDER);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"id": "123", "amount_cents": 9999, "processed_by": "wasm-module"}));
    // Headers accumulate along the chain: each step's output headers are the next one's input.
    assert_eq!(
        (r.header("x-validated"), r.header("x-wasm-processed"), r.header("x-trace")),
        (Some("true"), Some("true"), Some("t-1"))
    );

    // A failing step is named, in the answer and in the audit record.
    let r = invoke(&server, &id, br#"{"order_id":"123"}"#);
    assert_eq!((r.status, r.error_kind().as_str()), (502, "guest_exit"), "{}", r.text());
    let error = &r.json()["error"];
    assert_eq!(error["step"], json!({"index": 0, "function": validate, "function_id": validate}));
    let r = invoke(&server, &id, b"not json");
    assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_payload"));
    assert_eq!(r.json()["error"]["step"]["index"], 0);
    let records = audit_records(data.path());
    let failed: Vec<_> =
        records.iter().filter(|r| r["action"] == "invoke_pipeline" && r["outcome"]["status_code"] != 200).collect();
    assert_eq!(failed.len(), 2);
    let exit = failed.iter().find(|r| r["outcome"]["error_kind"] == "guest_exit").expect("the guest_exit record");
    assert_eq!(exit["resource"]["pipeline_id"], id.as_str());
    assert_eq!(exit["outcome"]["failed_step"], json!({"index": 0, "function_id": validate}));

    // Get, list, and other tenants.
    assert_eq!(server.client().request("GET", &format!("/pipelines/{id}"), &[], b"").json()["name"], "orders");
    let list = server.client().request("GET", "/pipelines", &[], b"").json();
    assert_eq!(list["pipelines"].as_array().unwrap().len(), 1);
    let other = [("x-tensor-wasm-tenant", "9")];
    assert_eq!(server.client().request("GET", &format!("/pipelines/{id}"), &other, b"").status, 404);
    assert_eq!(server.client().request("POST", &format!("/pipelines/{id}/invoke"), &other, ORDER).status, 404);
    assert_eq!(server.client().request("GET", "/pipelines", &other, b"").json()["pipelines"], json!([]));

    // Redeploying a function by name moves the pipeline to the new version.
    let r = server.client().deploy(
        "transform",
        &guests::write_and_exit(r#"{"payload":"v2","headers":{}}"#, "", 0),
        json!({"abi": "envelope"}),
    );
    assert_eq!(r.status, 201);
    assert_eq!(invoke(&server, &id, ORDER).text(), r#""v2""#);

    // Pipelines outlive restarts; deleting one is final.
    drop(server);
    let server = Server::start_in(data.path(), &[]);
    assert_eq!(invoke(&server, &id, ORDER).status, 200);
    assert_eq!(server.client().request("DELETE", &format!("/pipelines/{id}"), &[], b"").status, 204);
    let r = invoke(&server, &id, ORDER);
    assert_eq!((r.status, r.error_kind().as_str()), (404, "pipeline_not_found"));
    drop(server);
    let server = Server::start_in(data.path(), &[]);
    assert_eq!(invoke(&server, &id, ORDER).status, 404);
}

#[test]
fn bad_pipelines_are_refused_with_reasons() {
    let server = Server::start(&[]);
    deploy_envelope(&server, "enrich");
    server.deploy("arith", &guests::arithmetic());
    for (spec, kind, says) in [
        (json!({"name": "p", "steps": ["missing"]}), "invalid_pipeline", "no function `missing`"),
        (json!({"name": "p", "steps": []}), "invalid_pipeline", "1 to 32 steps"),
        (json!({"steps": ["enrich"]}), "invalid_pipeline", "`name` is required"),
        (json!({"name": "p", "steps": ["arith"]}), "invalid_pipeline", "no `_start`"),
        (json!({"name": "p", "steps": ["enrich"], "timeout_ms": 0}), "invalid_pipeline", "between 1 and"),
        (json!({"name": "p", "steps": [{"function": "enrich", "timeout": "soon"}]}), "invalid_pipeline", "step 0"),
        (json!({"name": "p", "steps": ["enrich"], "tenant": 3}), "invalid_pipeline", "tenant header"),
        (
            json!({"name": "p", "steps": ["enrich"], "sink": {"url": "ftp://x"}}),
            "invalid_pipeline",
            "only http:// and https://",
        ),
        (
            json!({"name": "p", "steps": ["enrich"], "sink": {"url": "http://x", "method": "GET"}}),
            "invalid_pipeline",
            "POST, PUT or PATCH",
        ),
        (json!({"name": "p", "steps": ["enrich"], "extra": 1}), "invalid_pipeline", "unknown field"),
        (json!({"name": "a b", "steps": ["enrich"]}), "invalid_pipeline", "may contain only"),
    ] {
        let r = create(&server, spec.clone());
        assert_eq!((r.status, r.error_kind().as_str()), (400, kind), "{spec}: {}", r.text());
        assert!(r.text().contains(says), "{spec}: {}", r.text());
    }
    let r = server.client().request("POST", "/pipelines", &[], b"{not json");
    assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_json"));
    let r = server.client().request("PUT", "/pipelines", &[], b"");
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD, POST")));
    assert_eq!(server.client().request("DELETE", "/pipelines/0123456789abcdef0123456789abcdef", &[], b"").status, 404);
    assert_eq!(server.client().request("GET", "/pipelines/..%2f", &[], b"").error_kind(), "pipeline_not_found");
    // The server kept serving through all of it.
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn step_and_pipeline_deadlines() {
    let server = Server::start(&[]);
    server.deploy("spin", &guests::infinite_loop());
    server.deploy("wait200", &guests::busy(200));
    let r = create(&server, json!({"name": "per-step", "steps": ["wait200", {"function": "spin", "timeout_ms": 150}]}));
    let per_step = r.json()["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let r = invoke(&server, &per_step, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (504, "invoke_timeout"), "{}", r.text());
    assert_eq!(r.json()["error"]["step"]["index"], 1);
    assert!(r.text().contains("150 ms"), "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(3));

    let r = create(&server, json!({"name": "whole", "steps": ["wait200", "wait200", "wait200"], "timeout": "500ms"}));
    let whole = r.json()["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let r = invoke(&server, &whole, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (504, "pipeline_timeout"), "{}", r.text());
    assert_eq!(r.json()["error"]["step"]["index"], 2);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(3), "{took:?}");
}

/// What a sink received: the request line, its headers (names lowercased) and its body.
type Received = (String, Vec<(String, String)>, String);

/// A loopback HTTP sink that answers its requests with `statuses` in turn and records what it got.
fn sink(statuses: &'static [u16]) -> (String, std::thread::JoinHandle<Vec<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let mut got = Vec::new();
        for status in statuses {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (n, v) = h.split_once(':').unwrap();
                headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
            }
            let len: usize = headers.iter().find(|(n, _)| n == "content-length").unwrap().1.parse().unwrap();
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            got.push((line.trim_end().to_string(), headers, String::from_utf8(body).unwrap()));
            let retry = if *status == 429 { "retry-after: 0\r\n" } else { "" };
            let mut stream = stream;
            write!(stream, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\n{retry}connection: close\r\n\r\n").unwrap();
        }
        got
    });
    (url, thread)
}

/// Sinks in these tests listen on loopback, which the default policy refuses.
const LOOPBACK_SINKS: [&str; 2] = ["--sink-allowed-cidrs", "127.0.0.0/8,::1"];

#[test]
fn sink_delivery_retries_then_reports() {
    let server = Server::start(&LOOPBACK_SINKS);
    deploy_envelope(&server, "enrich");

    // 503, then 429, then 200: delivered on the third attempt.
    let (url, sink_thread) = sink(&[503, 429, 200]);
    let r = create(
        &server,
        json!({"name": "to-sink", "steps": ["enrich"], "sink": {"url": url, "max_attempts": 4, "backoff_ms": 10}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = invoke(&server, &id, ORDER);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["delivered"], true);
    assert_eq!(r.json()["sink"]["attempts"], 3);
    assert_eq!(r.json()["sink"]["status"], 200);
    let got = sink_thread.join().unwrap();
    assert_eq!(got.len(), 3);
    let (line, headers, body) = &got[2];
    assert_eq!(line, "POST /events HTTP/1.1");
    let header = |n: &str| headers.iter().find(|(h, _)| h == n).map(|(_, v)| v.as_str());
    assert_eq!((header("x-wasm-processed"), header("content-type")), (Some("true"), Some("application/json")));
    assert_eq!(serde_json::from_str::<Value>(body).unwrap()["processed_by"], "wasm-module");

    // Out of attempts on 5xx: 502 with the last answer; a 4xx is not retried.
    let (url, sink_thread) = sink(&[500, 502]);
    let r = create(
        &server,
        json!({"name": "down", "steps": ["enrich"], "sink": {"url": url, "max_attempts": 2, "backoff_ms": 1}}),
    );
    let r = invoke(&server, r.json()["id"].as_str().unwrap(), ORDER);
    assert_eq!((r.status, r.error_kind().as_str()), (502, "sink_delivery_failed"), "{}", r.text());
    assert!(r.text().contains("2 attempt(s)") && r.text().contains("HTTP 502"), "{}", r.text());
    sink_thread.join().unwrap();
    let (url, sink_thread) = sink(&[400]);
    let r = create(&server, json!({"name": "refused", "steps": ["enrich"], "sink": {"url": url, "max_attempts": 5}}));
    let r = invoke(&server, r.json()["id"].as_str().unwrap(), ORDER);
    assert!(r.text().contains("1 attempt(s)") && r.text().contains("not retried"), "{}", r.text());
    assert_eq!(sink_thread.join().unwrap().len(), 1);

    // Nobody listening: connection errors are retried, then reported.
    let closed = common::free_port();
    let r = create(
        &server,
        json!({"name": "nobody", "steps": ["enrich"], "sink": {"url": format!("http://{closed}/"), "max_attempts": 2, "backoff_ms": 1}}),
    );
    let r = invoke(&server, r.json()["id"].as_str().unwrap(), ORDER);
    assert_eq!(r.error_kind(), "sink_delivery_failed");
    assert!(r.text().contains("connecting"), "{}", r.text());
}

#[test]
fn a_server_with_a_delivery_in_flight_joins_its_sink_workers_and_exits_zero() {
    // The drain cuts the waiting request at 200 ms; the worker's delivery to a sink that never
    // answers runs on to --sink-max-delivery-ms, and the drain joins the worker after it.
    let args = [LOOPBACK_SINKS[0], LOOPBACK_SINKS[1], "--sink-max-delivery-ms", "1000"];
    let mut server = Server::start(&[&args[..], &["--drain-grace-ms", "0", "--drain-timeout-ms", "200"]].concat());
    deploy_envelope(&server, "enrich");
    let tarpit = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", tarpit.local_addr().unwrap());
    let r = create(&server, json!({"name": "tarpit", "steps": ["enrich"], "sink": {"url": url, "max_attempts": 1}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let addr = server.addr;
    let in_flight = std::thread::spawn(move || {
        common::Client::connect(addr).try_request("POST", &format!("/pipelines/{id}/invoke"), &[], ORDER)
    });
    // A worker is delivering once the sink has its connection.
    let (_held, _) = tarpit.accept().unwrap();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}: {}", server.stderr());
    let log = server.wait_for_stderr("drained; exiting");
    assert!(log.contains("sink workers stopped") && !log.contains("not waiting for them"), "{log}");
    let _ = in_flight.join().unwrap();
}

#[test]
fn pipelines_from_the_functions_directory() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["validate", "enrich", "transform"] {
        std::fs::write(dir.path().join(format!("{name}.wasm")), guests::fiso_module(name)).unwrap();
        std::fs::write(dir.path().join(format!("{name}.toml")), "abi = \"envelope\"\ntimeout = \"2s\"\n").unwrap();
    }
    std::fs::write(
        dir.path().join("orders.pipeline.toml"),
        "steps = [\"validate\", \"enrich\", \"transform\"]\ntimeout = \"5s\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("later.pipeline.toml"), "steps = [\"late\"]\n").unwrap();
    let server = Server::start(&["--functions-dir", dir.path().to_str().unwrap()]);
    let list = server.client().request("GET", "/pipelines", &[], b"").json();
    let pipelines = list["pipelines"].as_array().unwrap();
    assert_eq!(pipelines.len(), 1, "`later` names a function that does not exist yet: {list}");
    assert_eq!((pipelines[0]["name"].as_str(), pipelines[0]["source"].as_str()), (Some("orders"), Some("directory")));
    let id = pipelines[0]["id"].as_str().unwrap().to_string();
    let r = invoke(&server, &id, ORDER);
    assert_eq!(r.json(), json!({"id": "123", "amount_cents": 9999, "processed_by": "wasm-module"}));

    // Directory pipelines are the directory's to change.
    let r = server.client().request("DELETE", &format!("/pipelines/{id}"), &[], b"");
    assert_eq!((r.status, r.error_kind().as_str()), (409, "managed_by_directory"));
    let r = create(&server, json!({"name": "orders", "steps": ["enrich"]}));
    assert_eq!((r.status, r.error_kind().as_str()), (409, "managed_by_directory"));

    // A pipeline waiting for its function loads when the function arrives.
    std::fs::write(dir.path().join("late.wasm"), guests::write_and_exit("late", "", 0)).unwrap();
    let mut later = String::new();
    within(Duration::from_secs(2), "the waiting pipeline's load", || {
        let list = server.client().request("GET", "/pipelines", &[], b"").json();
        let found = list["pipelines"].as_array().unwrap().iter().find(|p| p["name"] == "later");
        found.map(|p| later = p["id"].as_str().unwrap().to_string()).is_some()
    });
    assert_eq!(invoke(&server, &later, b"").text(), "late");
    // Removing its file removes it.
    std::fs::remove_file(dir.path().join("orders.pipeline.toml")).unwrap();
    within(Duration::from_secs(2), "the removed pipeline's 404", || invoke(&server, &id, ORDER).status == 404);
}

#[test]
fn sinks_reach_only_the_networks_the_operator_allows() {
    // By default only public addresses: a literal address that is not is refused when the
    // pipeline is made, before anything connects to it.
    let server = Server::start(&[]);
    deploy_envelope(&server, "enrich");
    for (url, says) in [
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data", "AWS's IPv6 metadata"),
        ("http://100.100.100.200/latest/meta-data", "Alibaba"),
        ("http://192.0.0.192/opc/v2/instance", "Oracle"),
        ("http://127.0.0.1:8080/functions", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://0.0.0.0:8080/", "this network"),
        ("http://[::]/", "unspecified"),
        ("http://10.0.0.1/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://100.64.0.1/", "shared address space"),
        ("http://[fc00::1]/", "unique-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://198.18.0.1/", "benchmarking"),
        ("http://224.0.0.1/", "multicast"),
        ("http://255.255.255.255/", "broadcast"),
        ("http://[2001:db8::1]/", "documentation"),
        ("http://[::ffff:169.254.169.254]/", "IPv4-mapped form of 169.254.169.254"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped form of 127.0.0.1"),
        ("http://[::127.0.0.1]/", "IPv4-compatible"),
        ("http://[64:ff9b::a9fe:a9fe]/", "NAT64 form of 169.254.169.254"),
        ("http://[64:ff9b:1::a9fe:a9fe]/", "local-use NAT64"),
        ("http://[2002:a9fe:a9fe::1]/", "6to4 form of 169.254.169.254"),
        ("http://[2001:0:4136:e378:8000:63bf:5601:5601]/", "Teredo form of 169.254.169.254"),
    ] {
        let r = create(&server, json!({"name": "m", "steps": ["enrich"], "sink": {"url": url}}));
        assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_pipeline"), "{url}: {}", r.text());
        assert!(r.text().contains(says) && r.text().contains("--sink-allowed-cidrs"), "{url}: {}", r.text());
    }
    // A host name is checked against what it resolves to, at delivery, before any connect:
    // `localhost` is loopback, so the sink listening there never hears of it.
    let (url, sink_thread) = sink(&[200]);
    let named = url.replace("127.0.0.1", "localhost");
    let r = create(&server, json!({"name": "named", "steps": ["enrich"], "sink": {"url": named, "max_attempts": 3}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = invoke(&server, r.json()["id"].as_str().unwrap(), ORDER);
    assert_eq!((r.status, r.error_kind().as_str()), (502, "sink_delivery_failed"), "{}", r.text());
    assert!(r.text().contains("loopback") && r.text().contains("1 attempt(s)"), "{}", r.text());
    assert!(r.text().contains("not retried"), "{}", r.text());
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
    drop(server);

    // Only the networks listed: a literal address outside them is refused when the pipeline is
    // made, and a host name that resolves outside them when it delivers, without connecting.
    let server = Server::start(&["--sink-allowed-cidrs", "10.0.0.0/8"]);
    deploy_envelope(&server, "enrich");
    let r = create(&server, json!({"name": "literal", "steps": ["enrich"], "sink": {"url": url}}));
    assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_pipeline"), "{}", r.text());
    assert!(r.text().contains("outside --sink-allowed-cidrs"), "{}", r.text());
    let r = create(&server, json!({"name": "public", "steps": ["enrich"], "sink": {"url": "http://8.8.8.8/"}}));
    assert!(r.text().contains("outside --sink-allowed-cidrs"), "a list without `public` replaces it: {}", r.text());
    let r = create(&server, json!({"name": "named", "steps": ["enrich"], "sink": {"url": named, "max_attempts": 3}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = invoke(&server, r.json()["id"].as_str().unwrap(), ORDER);
    assert_eq!((r.status, r.error_kind().as_str()), (502, "sink_delivery_failed"), "{}", r.text());
    assert!(r.text().contains("outside --sink-allowed-cidrs") && r.text().contains("1 attempt(s)"), "{}", r.text());
    drop(server);

    // `public` beside a network keeps public addresses and adds the network; the rest stays
    // refused. Listed, the same sink is delivered to; the refused attempts never reached it.
    let server = Server::start(&["--sink-allowed-cidrs", "public,127.0.0.0/8,::1"]);
    deploy_envelope(&server, "enrich");
    let r = create(&server, json!({"name": "private", "steps": ["enrich"], "sink": {"url": "http://10.0.0.1/"}}));
    assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_pipeline"), "{}", r.text());
    assert!(r.text().contains("private (10.0.0.0/8)"), "{}", r.text());
    let r = create(&server, json!({"name": "public", "steps": ["enrich"], "sink": {"url": "http://8.8.8.8/"}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = create(&server, json!({"name": "named", "steps": ["enrich"], "sink": {"url": named}}));
    let r = invoke(&server, r.json()["id"].as_str().unwrap(), ORDER);
    assert_eq!((r.status, r.json()["delivered"].clone()), (200, json!(true)), "{}", r.text());
    assert_eq!(sink_thread.join().unwrap().len(), 1);
}

#[test]
fn guest_credentials_forwarding_and_hop_by_hop_headers_never_reach_a_sink() {
    let server = Server::start(&LOOPBACK_SINKS);
    // A guest that copies everything a hostile caller could hand it into its output headers.
    let refused = [
        ("authorization", "Bearer t"),
        ("proxy-authorization", "B"),
        ("cookie", "c=1"),
        ("set-cookie", "c=1"),
        ("forwarded", "for=1.2.3.4"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-client-cert", "Subject=CN"),
        ("x-real-ip", "1.2.3.4"),
        ("x-tensor-wasm-tenant", "9"),
        ("connection", "close"),
        ("keep-alive", "5"),
        ("proxy-connection", "x"),
        ("te", "trailers"),
        ("trailer", "x"),
        ("upgrade", "h2c"),
        ("transfer-encoding", "chunked"),
    ];
    let mut headers: serde_json::Map<String, Value> = refused.iter().map(|(n, v)| (n.to_string(), json!(v))).collect();
    headers.insert("x-kept".into(), json!("yes"));
    let output = json!({"payload": {"n": 1}, "headers": headers}).to_string();
    let r = server.client().deploy("copier", &guests::write_and_exit(&output, "", 0), json!({"abi": "envelope"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let (url, sink_thread) = sink(&[200]);
    let r = create(&server, json!({"name": "copy", "steps": ["copier"], "sink": {"url": url}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = invoke(&server, r.json()["id"].as_str().unwrap(), ORDER);
    assert_eq!((r.status, r.json()["delivered"].clone()), (200, json!(true)), "{}", r.text());
    let got = sink_thread.join().unwrap();
    let (_, received, body) = &got[0];
    let header = |n: &str| received.iter().filter(|(h, _)| h == n).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    for (name, value) in refused {
        // The client writes its own `connection: close`; the guest's value never arrives.
        let ours: &[&str] = if name == "connection" { &["close"] } else { &[] };
        assert_eq!(header(name), ours, "{name}: {value} reached the sink: {received:?}");
    }
    assert_eq!(header("x-kept"), ["yes"]);
    assert_eq!(body, r#"{"n":1}"#);
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

/// A loopback sink that accepts connections and never answers, holding each until the test
/// ends; counts what it accepted. Bounded: it stops after 64 connections or 60 s.
fn tarpit() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/slow", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut held = Vec::new();
        while held.len() < 64 && started.elapsed() < Duration::from_secs(60) {
            match listener.accept() {
                Ok((stream, _)) => {
                    held.push(stream);
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (url, accepted)
}

/// Deploys the Fiso `enrich` module for `tenant`.
fn deploy_for(server: &Server, tenant: &str) {
    let body = json!({
        "name": "enrich",
        "abi": "envelope",
        "wasm_b64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, guests::fiso_module("enrich")),
    });
    let headers = [("content-type", "application/json"), ("x-tensor-wasm-tenant", tenant)];
    let r = server.client().request("POST", "/functions", &headers, body.to_string().as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
}

fn create_for(server: &Server, tenant: &str, spec: Value) -> String {
    let headers = [("content-type", "application/json"), ("x-tensor-wasm-tenant", tenant)];
    let r = server.client().request("POST", "/pipelines", &headers, spec.to_string().as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn invoke_for(server: &Server, tenant: &str, id: &str) -> common::Response {
    server.client().request("POST", &format!("/pipelines/{id}/invoke"), &[("x-tensor-wasm-tenant", tenant)], ORDER)
}

#[test]
fn a_tenants_tarpit_sink_holds_at_most_its_share_of_workers_and_each_delivery_ends_at_the_cap() {
    use std::sync::atomic::Ordering;
    let server = Server::start(&[
        "--sink-workers",
        "4",
        "--sink-max-inflight-per-tenant",
        "2",
        "--sink-max-delivery-ms",
        "1500",
        "--sink-allowed-cidrs",
        "127.0.0.0/8",
    ]);
    let server = std::sync::Arc::new(server);
    for tenant in ["1", "2"] {
        deploy_for(&server, tenant);
    }
    // Tenant 1's sink never answers, and its pipeline would wait a minute a try, ten times.
    let (slow, accepted) = tarpit();
    let spec =
        json!({"name": "p", "steps": ["enrich"], "sink": {"url": slow, "max_attempts": 10, "timeout_ms": 60000}});
    let attacker = create_for(&server, "1", spec);
    let hanging: Vec<_> = (0..2)
        .map(|_| {
            let (server, id) = (server.clone(), attacker.clone());
            std::thread::spawn(move || invoke_for(&server, "1", &id))
        })
        .collect();
    within(Duration::from_secs(10), "the tarpit holding two deliveries", || accepted.load(Ordering::SeqCst) >= 2);

    // A third is refused at once: the tenant has its two deliveries in flight.
    let r = invoke_for(&server, "1", &attacker);
    assert_eq!((r.status, r.error_kind().as_str()), (429, "sink_concurrency_limited"), "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.text().contains("--sink-max-inflight-per-tenant"), "{}", r.text());

    // Another tenant's delivery meanwhile finds a free worker and is done at once.
    let (fast, sink_thread) = sink(&[200]);
    let bystander = create_for(&server, "2", json!({"name": "p", "steps": ["enrich"], "sink": {"url": fast}}));
    let r = invoke_for(&server, "2", &bystander);
    assert_eq!((r.status, r.json()["delivered"].clone()), (200, json!(true)), "{}", r.text());
    // Delivered while the tarpit still held both of the attacker's: it waited for none of them.
    assert!(
        hanging.iter().all(|t| !t.is_finished()),
        "the bystander was delivered only after the tarpit's deliveries ended"
    );
    sink_thread.join().unwrap();

    // The tarpit's deliveries end at the cap, not after ten minutes of attempts.
    for thread in hanging {
        let r = thread.join().unwrap();
        assert_eq!((r.status, r.error_kind().as_str()), (504, "sink_delivery_timeout"), "{}", r.text());
        assert!(r.text().contains("--sink-max-delivery-ms (1500 ms)"), "{}", r.text());
    }
    // Their places are free again: the next one is delivered to (and cut at the cap), not refused.
    let r = invoke_for(&server, "1", &attacker);
    assert_eq!((r.status, r.error_kind().as_str()), (504, "sink_delivery_timeout"), "{}", r.text());
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn a_sink_delivery_counts_its_backoff_against_the_cap() {
    // A sink that asks for a 5 s pause: within a 1 s cap no attempt could follow, so the
    // delivery ends after the first, at once, where it used to sleep and retry.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/busy", listener.local_addr().unwrap());
    let sink_thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = stream.read(&mut [0u8; 16 * 1024]).unwrap();
        stream.write_all(b"HTTP/1.1 503 Busy\r\nretry-after: 5\r\ncontent-length: 0\r\n\r\n").unwrap();
    });
    let server = Server::start(&["--sink-max-delivery-ms", "1000", "--sink-allowed-cidrs", "127.0.0.0/8"]);
    deploy_envelope(&server, "enrich");
    let spec = json!({"name": "busy", "steps": ["enrich"], "sink": {"url": url, "max_attempts": 10}});
    let r = create(&server, spec);
    assert_eq!(r.status, 201, "{}", r.text());
    let r = invoke(&server, r.json()["id"].as_str().unwrap(), ORDER);
    assert_eq!((r.status, r.error_kind().as_str()), (504, "sink_delivery_timeout"), "{}", r.text());
    // One attempt, not a 5 s sleep and another: the cap was counted before the backoff.
    assert!(r.text().contains("after 1 attempt(s); last: HTTP 503"), "{}", r.text());
    sink_thread.join().unwrap();
    assert_eq!(server.client().request("GET", "/healthz", &[], b"").status, 200);
}

//! The functions directory (`--functions-dir`): modules and manifests from a mounted folder,
//! applied without a restart, and the JSON envelope ABI that Fiso's modules speak.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::configmap::ConfigMapVolume;
use common::{guests, within, Server};
use serde_json::json;

/// How long a test waits for a change to be live. The promise is 1 s; it is measured in a release
/// build by perf/reload-dir.py (perf/CORE.md), not here, where a debug build shares the machine
/// with every other test.
const RELOAD_LIMIT: Duration = Duration::from_secs(10);

fn start(dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--functions-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Writes `bytes` to `dir/name` atomically, as `kubectl cp` of a whole file or a CI job would.
fn put(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn a_fiso_module_runs_unchanged_with_its_manifest() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "enrich.wasm", &guests::fiso_module("enrich"));
    put(dir.path(), "enrich.toml", b"abi = \"envelope\"\ntimeout = \"2s\"\nmemory_limit_mb = 32\n");
    put(dir.path(), "tagged.wasm", &guests::fiso_module("enrich"));
    put(dir.path(), "tagged.toml", b"abi = \"envelope\"\ntenant = 7\n[env]\nENRICH_BY = \"tensor-wasm\"\n");
    std::fs::write(dir.path().join("README.md"), b"not a module").unwrap();
    let server = start(dir.path(), &[]);

    // Ready means loaded: the function is there on the first request.
    let id = server.function_id("enrich").expect("listed once ready");
    let f = server.client().request("GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!(
        (f["abi"].as_str(), f["source"].as_str(), f["timeout_ms"].as_u64()),
        (Some("envelope"), Some("directory"), Some(2000))
    );
    assert_eq!(f["memory_limit_mb"], 32);

    // The seed's own example input and output.
    let r = server.client().request(
        "POST",
        &format!("/functions/{id}/invoke"),
        &[("content-type", "application/json"), ("x-trace", "abc"), ("authorization", "Bearer secret")],
        br#"{"order_id":"123","amount":99.99}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"order_id":"123","amount":99.99,"processed_by":"wasm-module","timestamp":"2024-01-15T10:00:00Z"})
    );
    assert_eq!(r.header("x-wasm-processed"), Some("true"));
    assert_eq!(r.header("x-trace"), Some("abc"), "request headers reach the guest, which echoes them");
    assert_eq!(r.header("authorization"), None, "credentials never reach the guest");
    assert_eq!(r.header("content-type"), Some("application/json"));

    // The manifest's tenant and environment.
    let tagged = |tenant: &str| {
        let list = server.client().request("GET", "/functions", &[("x-tensor-wasm-tenant", tenant)], b"").json();
        list["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "tagged")
            .map(|f| f["id"].as_str().unwrap().to_string())
    };
    assert_eq!(tagged("0"), None);
    let tagged_id = tagged("7").unwrap();
    let r = server.client().request(
        "POST",
        &format!("/functions/{tagged_id}/invoke"),
        &[("x-tensor-wasm-tenant", "7")],
        br#"{}"#,
    );
    assert_eq!(r.json()["processed_by"], "tensor-wasm");

    // Envelope errors, each with its own kind.
    let r = server.client().invoke(&id, b"order=123");
    assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_payload"), "{}", r.text());
    let r = server.client().invoke(&id, b"");
    assert_eq!((r.status, r.error_kind().as_str()), (400, "invalid_payload"));
    let r = server.client().invoke(&id, b"[1,2]");
    assert_eq!((r.status, r.error_kind().as_str()), (502, "guest_exit"), "the module itself refuses a non-object");

    // The API may not delete or shadow it.
    let r = server.client().request("DELETE", &format!("/functions/{id}"), &[], b"");
    assert_eq!((r.status, r.error_kind().as_str()), (409, "managed_by_directory"), "{}", r.text());
    let r = server.client().deploy("enrich", &guests::hello(), json!({}));
    assert_eq!((r.status, r.error_kind().as_str()), (409, "managed_by_directory"));
    assert_eq!(server.client().deploy("enrich", &guests::hello(), json!({})).status, 409);

    // The same bytes deployed through the API are stored for that function, even though a
    // directory function already had them compiled.
    let data = tempfile::tempdir().unwrap();
    drop(server);
    let server = Server::start_in(data.path(), &["--functions-dir", dir.path().to_str().unwrap()]);
    let r = server.client().deploy("copy", &guests::fiso_module("enrich"), json!({"abi": "envelope"}));
    let copy = r.json()["id"].as_str().unwrap().to_string();
    drop(server);
    let server = Server::start_in(data.path(), &[]);
    assert_eq!(server.client().invoke(&copy, b"{}").status, 200, "the API copy outlives the directory");
    drop(server);

    // The id is derived from the name: the same after a restart.
    let server = start(dir.path(), &[]);
    assert_eq!(server.function_id("enrich"), Some(id));
}

#[test]
fn envelope_output_errors_are_precise() {
    let dir = tempfile::tempdir().unwrap();
    let envelope = b"abi = \"envelope\"\n";
    for (name, out) in [
        ("text", "hello"),
        ("nopayload", r#"{"headers":{}}"#),
        ("badheader", r#"{"payload":1,"headers":{"x":"a\nb"}}"#),
        ("framing", r#"{"payload":{"ok":true},"headers":{"Content-Length":"1","X-Fine":"yes"}}"#),
    ] {
        put(dir.path(), &format!("{name}.wasm"), &guests::write_and_exit(out, "", 0));
        put(dir.path(), &format!("{name}.toml"), envelope);
    }
    let server = start(dir.path(), &[]);
    for (name, status, kind) in [
        ("text", 502, "invalid_envelope_output"),
        ("nopayload", 502, "envelope_missing_payload"),
        ("badheader", 502, "invalid_envelope_output"),
    ] {
        let r = server.client().invoke(&server.function_id(name).unwrap(), b"{}");
        assert_eq!((r.status, r.error_kind().as_str()), (status, kind), "{name}: {}", r.text());
    }
    let r = server.client().invoke(&server.function_id("framing").unwrap(), b"{}");
    assert_eq!((r.status, r.text().as_str(), r.header("x-fine")), (200, r#"{"ok":true}"#, Some("yes")));
    assert_eq!(r.header("content-length"), Some("11"), "the server frames the response, not the guest");
}

fn version(n: u32) -> Vec<u8> {
    guests::write_and_exit(&format!("v{n}"), "", 0)
}

#[test]
fn twenty_swaps_under_load_lose_no_invoke() {
    let dir = tempfile::tempdir().unwrap();
    let mut volume = ConfigMapVolume::new(dir.path(), &[("mounted.wasm", version(0))]);
    put(dir.path(), "plain.wasm", &version(0));
    let server = start(dir.path(), &[]);
    let ids = [server.function_id("mounted").unwrap(), server.function_id("plain").unwrap()];

    // Load: two clients invoking both functions back to back until told to stop (at most 120 s).
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = (0..2)
        .map(|_| {
            let (addr, ids, stop, done) = (server.addr, ids.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut client = common::Client::connect(addr);
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                    for id in &ids {
                        let r = client.invoke(id, b"");
                        if r.status != 200 || !r.text().starts_with('v') {
                            failures.push(format!("{} {}", r.status, r.text()));
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                failures
            })
        })
        .collect();

    let mut slowest = Duration::ZERO;
    for swap in 1..=20u32 {
        let (which, id) = if swap % 2 == 0 { ("mounted", &ids[0]) } else { ("plain", &ids[1]) };
        if which == "mounted" {
            volume.update(&[("mounted.wasm", version(swap))]);
        } else {
            put(dir.path(), "plain.wasm", &version(swap));
        }
        let expect = format!("v{swap}");
        let took = within(RELOAD_LIMIT, &format!("swap {swap} of {which}"), || {
            server.client().invoke(id, b"").text() == expect
        });
        slowest = slowest.max(took);
    }
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        let failures = loader.join().unwrap();
        assert!(failures.is_empty(), "invokes failed during swaps: {failures:?}");
    }
    assert!(done.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(server.metric("tensor_wasm_functions_dir_errors_total", &[]), 0.0);
    assert_eq!(server.metric("tensor_wasm_functions_dir_changes_total", &[]), 22.0, "2 first loads, 20 swaps");
    eprintln!("20 swaps under load; slowest to become visible: {slowest:?}");
}

#[test]
fn an_invocation_finishes_on_the_version_it_started_with() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "slow.wasm", &guests::busy_then_write(600, "old"));
    let server = start(dir.path(), &[]);
    let id = server.function_id("slow").unwrap();
    let in_flight = {
        let (addr, id) = (server.addr, id.clone());
        std::thread::spawn(move || common::Client::connect(addr).invoke(&id, b"").text())
    };
    // Running: it took an instance slot, with the version it resolved.
    server.wait_for_metric("tensor_wasm_instance_spawns_total", &[], 1.0);
    put(dir.path(), "slow.wasm", &guests::busy_then_write(0, "new"));
    within(RELOAD_LIMIT, "the new version", || server.client().invoke(&id, b"").text() == "new");
    assert_eq!(in_flight.join().unwrap(), "old");
}

#[test]
fn a_bad_module_or_manifest_leaves_the_previous_version_serving() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "f.wasm", &version(1));
    put(dir.path(), "broken.wasm", b"\0asm but not really");
    let server = start(dir.path(), &[]);
    // A bad module at start-up is left out; the rest serve, and readiness is not held back.
    assert_eq!(server.function_id("broken"), None);
    let errors = || server.metric("tensor_wasm_functions_dir_errors_total", &[]);
    assert_eq!(errors(), 1.0);
    let id = server.function_id("f").unwrap();

    let cases: [(&str, &[u8], &str); 4] = [
        ("f.wasm", b"not wasm at all", "invalid module"),
        ("f.wasm", &guests::env_import(), "an import we do not provide"),
        ("f.toml", b"abi = \"grpc\"\n", "an unknown abi"),
        ("f.toml", b"timeout_ms = 99999999\n", "a timeout over the maximum"),
    ];
    for (i, (file, bytes, what)) in cases.into_iter().enumerate() {
        put(dir.path(), file, bytes);
        within(RELOAD_LIMIT, what, || errors() == 2.0 + i as f64);
        let r = server.client().invoke(&id, b"");
        assert_eq!((r.status, r.text().as_str()), (200, "v1"), "{what}");
        if file == "f.wasm" {
            put(dir.path(), "f.wasm", &version(1));
        }
    }
    assert!(server.stderr().contains("the previous version keeps serving"));

    // Fixing the manifest applies it; removing the module removes the function.
    put(dir.path(), "f.toml", b"timeout_ms = 1234\n");
    within(RELOAD_LIMIT, "the fixed manifest", || {
        server.client().request("GET", &format!("/functions/{id}"), &[], b"").json()["timeout_ms"] == 1234
    });
    std::fs::remove_file(dir.path().join("f.wasm")).unwrap();
    within(RELOAD_LIMIT, "the removal", || server.client().invoke(&id, b"").status == 404);
    // An orphaned manifest and an unusable name are reported once each.
    put(dir.path(), "bad name.wasm", &version(1));
    within(RELOAD_LIMIT, "the ignored files", || errors() == 7.0);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(errors(), 7.0, "each unusable file is counted once");
}

#[test]
fn timeout_and_memory_limit_come_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "spin.wasm", &guests::infinite_loop());
    put(dir.path(), "spin.toml", b"timeout = \"200ms\"\n");
    put(dir.path(), "hog.wasm", &guests::memory_hog());
    put(dir.path(), "hog.toml", b"memory_limit_mb = 2\n");
    let server = start(dir.path(), &[]);
    let r = server.client().invoke(&server.function_id("hog").unwrap(), b"");
    assert_eq!((r.status, r.error_kind().as_str()), (502, "memory_limit_exceeded"), "{}", r.text());
    assert!(r.text().contains("2 MiB"), "{}", r.text());
    let started = Instant::now();
    let r = server.client().invoke(&server.function_id("spin").unwrap(), b"");
    assert_eq!((r.status, r.error_kind().as_str()), (504, "invoke_timeout"));
    assert!(r.text().contains("200 ms"), "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_missing_functions_dir_is_a_configuration_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--functions-dir", "/nonexistent/functions"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

/// The digests of the precompiled artifacts in a data dir, and whether each has its module beside it.
fn artifacts(data: &Path) -> Vec<(String, bool)> {
    let mut found: Vec<_> = std::fs::read_dir(data.join("modules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p.with_extension("wasm").exists()))
        .collect();
    found.sort();
    found
}

fn sha256_hex(bytes: &[u8]) -> String {
    common::sha256(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_restart_reuses_compiled_folder_modules_and_drops_unused_ones() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--functions-dir", dir.path().to_str().unwrap()];
    let (v1, v2) = (version(1), version(2));
    put(dir.path(), "mounted.wasm", &v1);
    {
        let server = Server::start_in(data.path(), &args);
        assert!(server.function_id("mounted").is_some());
        server.wait_for_stderr("functions directory module compiled");
    }
    // The artifact alone: the module's bytes stay in the folder.
    assert_eq!(artifacts(data.path()), [(sha256_hex(&v1), false)]);

    let server = Server::start_in(data.path(), &args);
    let id = server.function_id("mounted").expect("listed once ready");
    assert_eq!(server.client().invoke(&id, b"").text(), "v1");
    assert!(!server.stderr().contains("module compiled"), "compiled again:\n{}", server.stderr());

    // Replaced: the new version's artifact takes the old one's place.
    put(dir.path(), "mounted.wasm", &v2);
    within(RELOAD_LIMIT, "v2 live", || server.client().invoke(&id, b"").text() == "v2");
    within(RELOAD_LIMIT, "v1's artifact removed", || artifacts(data.path()) == [(sha256_hex(&v2), false)]);
    drop(server);

    // Gone from the folder while the server was down: swept at the next start.
    std::fs::remove_file(dir.path().join("mounted.wasm")).unwrap();
    let server = Server::start_in(data.path(), &args);
    assert_eq!(server.function_id("mounted"), None);
    assert_eq!(artifacts(data.path()), []);
}

#[test]
fn an_api_function_and_a_folder_function_of_the_same_bytes_leave_nothing_behind() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(data.path(), &["--functions-dir", dir.path().to_str().unwrap()]);
    let v1 = version(1);
    let hex = sha256_hex(&v1);
    put(dir.path(), "mounted.wasm", &v1);
    within(RELOAD_LIMIT, "the folder function", || server.function_id("mounted").is_some());
    let api = server.deploy("same-bytes", &v1);
    assert_eq!(artifacts(data.path()), [(hex.clone(), true)], "stored once, for the API function");

    // The API function goes first: its stored copy goes, the folder function's artifact stays.
    assert_eq!(server.client().request("DELETE", &format!("/functions/{api}"), &[], b"").status, 204);
    assert_eq!(artifacts(data.path()), [(hex, false)]);
    let id = server.function_id("mounted").unwrap();
    assert_eq!(server.client().invoke(&id, b"").text(), "v1");
    // Then the folder function, and its artifact with it.
    std::fs::remove_file(dir.path().join("mounted.wasm")).unwrap();
    within(RELOAD_LIMIT, "the artifact swept", || artifacts(data.path()).is_empty());
    let left: Vec<_> =
        std::fs::read_dir(data.path().join("modules")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
}

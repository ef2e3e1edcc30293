//! A fleet on NATS JetStream (issue 35, items 1 to 3): three replicas, each with a data dir of its
//! own, share a real `nats-server -js` started here. A deploy answered by one serves on all, a
//! delete stops all, NATS going away leaves every replica serving what it had while changes are
//! refused with 503 `registry_unavailable`, and a replica catches up with what it missed.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::nats::Nats;
use common::{guests, within, Server};
use serde_json::json;

/// How long a change may take to reach every replica here: the issue's bound is 1 s; a loaded CI
/// machine gets room, and each test prints what it measured.
const PROPAGATION: Duration = Duration::from_secs(5);

fn replica(nats: &Nats, data_dir: &std::path::Path) -> Server {
    Server::start_in(data_dir, &["--registry", &nats.url(), "--registry-timeout-ms", "2000"])
}

fn status_of(server: &Server, id: &str) -> u16 {
    server.client().invoke(id, b"").status
}

/// Waits until `id` answers `status` on every replica; returns how long the slowest took.
fn everywhere(servers: &[&Server], id: &str, status: u16, what: &str) -> Duration {
    let started = Instant::now();
    for s in servers {
        within(PROPAGATION, what, || status_of(s, id) == status);
    }
    started.elapsed()
}

#[test]
fn a_deploy_on_one_replica_serves_on_every_replica_and_a_delete_stops_every_one() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<Server> = dirs.iter().map(|d| replica(&nats, d.path())).collect();
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
    for s in &servers {
        s.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    }

    let id = a.deploy("hello", &guests::hello());
    // The answering replica serves it at once.
    assert_eq!(status_of(a, &id), 200);
    let took = everywhere(&[b, c], &id, 200, "the deploy reaching B and C");
    eprintln!("fleet: a deploy reached the other two replicas within {took:?}");
    let listed = b.client().request("GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!((listed["name"].as_str(), listed["source"].as_str()), (Some("hello"), Some("api")));

    // Resident tensors travel too: the digits example, deployed on B with its weights, classifies
    // on C, which fetched the module and the safetensors file from the object store.
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let weights = std::fs::read(repo.join("examples/digits/digits.safetensors")).unwrap();
    let holdout = std::fs::read_to_string(repo.join("examples/digits/holdout.jsonl")).unwrap();
    let sample = holdout.lines().next().unwrap();
    let tensors = base64::engine::general_purpose::STANDARD.encode(&weights);
    let r = b.client().deploy("digits", &guests::digits_example(), json!({ "tensors_b64": tensors }));
    assert_eq!(r.status, 201, "{}", r.text());
    let digits = r.json()["id"].as_str().unwrap().to_string();
    within(PROPAGATION, "digits reaching C", || c.client().invoke(&digits, sample.as_bytes()).status == 200);
    let classified = c.client().invoke(&digits, sample.as_bytes()).json();
    assert_eq!(classified["class"], 1, "sample 1000 is a 1: {classified}");

    // A delete on C stops every replica.
    let r = c.client().request("DELETE", &format!("/functions/{id}"), &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    let took = everywhere(&[a, b, c], &id, 404, "the delete reaching every replica");
    eprintln!("fleet: a delete reached every replica within {took:?}");
    // Each replica deployed and deleted through the registry alone: one sync each, no reconnect.
    for s in &servers {
        assert_eq!(s.metric("tensor_wasm_registry_syncs_total", &[]), 1.0);
    }
}

#[test]
fn without_nats_replicas_serve_on_refuse_changes_and_catch_up_when_it_returns() {
    let mut nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = replica(&nats, dirs[0].path());
    let mut b = replica(&nats, dirs[1].path());
    let kept = a.deploy("kept", &guests::hello());
    let doomed = a.deploy("doomed", &guests::hello());
    everywhere(&[&b], &kept, 200, "kept reaching B");
    everywhere(&[&b], &doomed, 200, "doomed reaching B");

    nats.stop();
    for s in [&a, &b] {
        within(PROPAGATION, "the replica noticing NATS is gone", || {
            s.metric("tensor_wasm_registry_connected", &[]) == 0.0
        });
        // Serving its last known catalog.
        assert_eq!(status_of(s, &kept), 200);
    }
    // Changes are refused, not half made.
    let r = a.client().deploy("refused", &guests::hello(), json!({}));
    assert_eq!((r.status, r.error_kind()), (503, "registry_unavailable".to_string()), "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let r = b.client().request("DELETE", &format!("/functions/{kept}"), &[], b"");
    assert_eq!((r.status, r.error_kind()), (503, "registry_unavailable".to_string()), "{}", r.text());
    assert_eq!(status_of(&a, &kept), 200);
    assert!(a.function_id("refused").is_none(), "a refused deploy left a function behind");
    assert!(a.metric("tensor_wasm_registry_stale_seconds", &[]) > 0.0);
    // The operator's board says so, and calls the replica unhealthy; /readyz stays 200 on the
    // last known catalog.
    let server = format!("http://{}", a.addr);
    let (code, out, _) = common::tensor_wasm(&["observe", "--once", "--interval", "200ms", "--server", &server], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("registry     AWAY for") && out.contains("the registry is away for"), "{out}");
    assert!(out.contains("readyz 200"), "{out}");

    // B goes away too; meanwhile NATS returns, and A deletes one function and deploys another.
    b.kill9();
    nats.restart();
    a.wait_for_metric("tensor_wasm_registry_syncs_total", &[], 2.0);
    assert_eq!(a.metric("tensor_wasm_registry_connected", &[]), 1.0);
    let r = a.client().request("DELETE", &format!("/functions/{doomed}"), &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    // The deploy refused during the outage, retried.
    let retried = a.deploy("refused", &guests::hello());
    drop(b);

    // B restarts from its cache: it serves at once what it knew, then catches up with what it
    // missed: the deploy made while it was away, and the delete.
    let b = replica(&nats, dirs[1].path());
    assert_eq!(status_of(&b, &kept), 200);
    everywhere(&[&b], &retried, 200, "B catching up with a deploy it missed");
    everywhere(&[&b], &doomed, 404, "B catching up with a delete it missed");
}

#[test]
fn a_replica_without_a_cache_is_ready_only_once_in_step_with_nats() {
    let mut nats = Nats::start();
    nats.stop();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(dir.path(), &["--registry", &nats.url(), "--registry-timeout-ms", "2000"], |_| {});
    // It listens, but with no catalog to serve it is not ready.
    within(PROPAGATION, "the replica listening", || {
        server.client().try_request("GET", "/healthz", &[], b"").is_ok_and(|r| r.status == 200)
    });
    assert_eq!(server.client().request("GET", "/readyz", &[], b"").status, 503);
    nats.restart();
    within(PROPAGATION, "the replica ready once in step", || {
        server.client().request("GET", "/readyz", &[], b"").status == 200
    });
}

#[test]
fn a_replica_started_while_nats_is_down_serves_from_its_cache() {
    let mut nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let a = replica(&nats, dir.path());
        a.deploy("cached", &guests::hello())
    };
    nats.stop();
    // Ready from its data dir, with NATS nowhere: it serves, and refuses changes.
    let a = replica(&nats, dir.path());
    assert_eq!(status_of(&a, &id), 200);
    assert_eq!(a.metric("tensor_wasm_registry_connected", &[]), 0.0);
    // How old its catalog is counts from the cache's last sync, kept in the data dir.
    assert!(a.metric("tensor_wasm_registry_stale_seconds", &[]) > 0.0);
    let r = a.client().deploy("new", &guests::hello(), json!({}));
    assert_eq!(r.status, 503, "{}", r.text());
    // And joins once NATS is back.
    nats.restart();
    a.wait_for_metric("tensor_wasm_registry_connected", &[], 1.0);
    let r = a.client().deploy("new", &guests::hello(), json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn a_registry_that_lost_its_storage_is_filled_again_from_the_replicas_caches() {
    let mut nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(&nats, dir.path());
    let id = a.deploy("survivor", &guests::hello());
    // NATS comes back empty: a new bucket, not a fleet that deleted everything.
    nats.wipe();
    within(PROPAGATION, "A in step with the new registry", || {
        a.metric("tensor_wasm_registry_syncs_total", &[]) >= 2.0
            && a.metric("tensor_wasm_registry_connected", &[]) == 1.0
    });
    assert_eq!(status_of(&a, &id), 200, "A kept its function");
    assert!(a.stderr().contains("publishing this cache's functions to it"), "{}", a.stderr());
    // A replica that joins now gets it from the registry A filled again.
    let fresh = tempfile::tempdir().unwrap();
    let b = replica(&nats, fresh.path());
    everywhere(&[&b], &id, 200, "the republished function reaching a new replica");
}

#[test]
fn a_function_whose_files_could_not_be_fetched_is_fetched_again() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = replica(&nats, dirs[0].path());
    let id = a.deploy("first", &guests::hello());
    let digest =
        a.client().request("GET", &format!("/functions/{id}"), &[], b"").json()["digest"].as_str().unwrap().to_string();
    // The module's object goes missing from the store.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let objects = async_nats::jetstream::new(client).get_object_store("tensor-wasm-objects").await.unwrap();
        objects.delete(digest.strip_prefix("sha256:").unwrap()).await.unwrap();
    });
    // A new replica lists the function as broken: it cannot fetch its module.
    let b = replica(&nats, dirs[1].path());
    within(PROPAGATION, "B listing the function", || {
        b.client().request("GET", &format!("/functions/{id}"), &[], b"").status == 200
    });
    let r = b.client().invoke(&id, b"");
    assert_eq!((r.status, r.error_kind()), (503, "function_unavailable".to_string()), "{}", r.text());
    // The same module deployed again puts the object back; B fetches it at its next retry.
    a.deploy("again", &guests::hello());
    within(Duration::from_secs(15), "B fetching the module again", || status_of(&b, &id) == 200);
}

#[test]
fn a_full_object_store_refuses_deploys_with_507_and_changes_nothing() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--registry", &nats.url(), "--registry-max-object-mb", "1"];
    let a = Server::start_in(dir.path(), &args);
    // A module of 1.5 MiB (a data segment of zeros) cannot fit a store of 1 MiB.
    let big = wat::parse_str(format!(
        r#"(module (memory 32) (data (i32.const 0) "{}") (func (export "_start")))"#,
        "\\00".repeat(3 << 19)
    ))
    .unwrap();
    let r = a.client().deploy("big", &big, json!({}));
    assert_eq!((r.status, r.error_kind()), (507, "registry_full".to_string()), "{}", r.text());
    assert!(r.text().contains("object store is full"), "{}", r.text());
    assert!(r.header("retry-after").is_none(), "a retry cannot help");
    assert!(a.function_id("big").is_none());
    // Small ones still fit, and the replica serves on.
    let small = a.deploy("small", &guests::hello());
    assert_eq!(status_of(&a, &small), 200);
}

/// Puts `value` under `key` in the registry's bucket, as anyone with access to NATS could.
fn put_raw(nats: &Nats, key: &str, value: serde_json::Value) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let kv = async_nats::jetstream::new(client).get_key_value("tensor-wasm-functions").await.unwrap();
        kv.put(key, value.to_string().into()).await.unwrap();
    });
}

#[test]
fn records_written_into_the_bucket_by_others_are_checked_before_anything_is_trusted() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let a = replica(&nats, dir.path());
    let good = a.deploy("good", &guests::hello());
    let record = a.client().request("GET", &format!("/functions/{good}"), &[], b"").json();
    let digest = record["digest"].as_str().unwrap().to_string();
    let base = json!({
        "id": "", "name": "evil", "digest": digest, "created_unix_ms": 1, "timeout_ms": 1000,
        "memory_limit_mb": 16, "tenant_id": 0, "abi": "command", "source": "api", "env": {},
    });
    let hex = "0123456789abcdef0123456789abcdef";
    // The record with `id`, and `field` set to `value`.
    let record_with = |id: &str, field: &str, value: serde_json::Value| {
        let mut r = base.clone();
        r["id"] = json!(id);
        r[field] = value;
        r
    };
    let outside = dir.path().join("functions").join("a");
    let key = format!("f.{hex}");
    for (key, value) in [
        // An id that would name a file in another folder (NATS refuses keys with empty tokens,
        // so `..` cannot come through as `a/../..`; a slash can).
        ("f.a/escaped".to_string(), record_with("a/escaped", "name", json!("evil"))),
        // An id that is not its key's.
        (key.clone(), record_with("ffffffffffffffffffffffffffffffff", "name", json!("evil"))),
        (key.clone(), record_with(hex, "digest", json!("sha256:../../x"))),
        (key.clone(), record_with(hex, "tensors", json!("../weights"))),
        (key.clone(), record_with(hex, "source", json!("directory"))),
        (key.clone(), record_with(hex, "timeout_ms", json!(u64::MAX))),
        (key.clone(), record_with(hex, "name", json!("../x"))),
        ("f.notjson".to_string(), json!("just a string")),
    ] {
        put_raw(&nats, &key, value);
    }
    // Well-formed, but an envelope function whose module is no WASI command: listed as broken,
    // as a deploy here would have been refused.
    let exports = a.deploy("exports", &guests::arithmetic());
    let exports_digest = a.client().request("GET", &format!("/functions/{exports}"), &[], b"").json()["digest"].clone();
    let envelope = "abcdefabcdefabcdefabcdefabcdefab";
    let mut record = record_with(envelope, "abi", json!("envelope"));
    record["digest"] = exports_digest;
    put_raw(&nats, &format!("f.{envelope}"), record);
    // A well-formed record after them all: once it serves, the others have been looked at.
    let later = "fedcba9876543210fedcba9876543210";
    put_raw(&nats, &format!("f.{later}"), record_with(later, "name", json!("later")));
    within(PROPAGATION, "the well-formed record serving", || status_of(&a, later) == 200);
    for id in [hex, "ffffffffffffffffffffffffffffffff"] {
        assert_eq!(status_of(&a, id), 404, "{id}");
    }
    assert!(!outside.exists(), "a record's id named a folder in the data dir");
    let r = a.client().invoke(envelope, b"{}");
    assert_eq!((r.status, r.error_kind()), (503, "function_unavailable".to_string()), "{}", r.text());
    // good, exports, the envelope one (broken) and the later one.
    assert_eq!(a.metric("tensor_wasm_functions_total", &[]), 4.0);
    assert_eq!(a.metric("tensor_wasm_functions_broken", &[]), 1.0);
    let log = a.stderr();
    assert!(log.contains("a registry record refused"), "{log}");
}

#[test]
fn each_replicas_audit_records_name_it_by_default_its_host_name() {
    let nats = Nats::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = replica(&nats, dirs[0].path());
    let b = Server::start_in(
        dirs[1].path(),
        &["--registry", &nats.url(), "--registry-timeout-ms", "2000", "--replica-id", "b-1"],
    );
    for server in [&a, &b] {
        assert_eq!(server.client().request("GET", &format!("/functions/{:032x}", 7), &[], b"").status, 404);
    }
    // In Kubernetes the host name is the pod's name: what tells a fleet's replicas apart.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for (dir, named) in [(dirs[0].path(), host.as_str()), (dirs[1].path(), "b-1")] {
        let audit = dir.join("audit");
        let (code, out, err) = common::tensor_wasm(&["audit", "tail", "-n", "100", audit.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{err}");
        let records: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(!records.is_empty());
        assert!(records.iter().all(|r| r["replica"] == named), "{named}: {out}");
    }
}

#[test]
fn registry_flags_that_cannot_work_are_refused_at_start() {
    for (args, says) in [
        (&["--registry", "redis://127.0.0.1:6379"][..], "is not `file` or nats://"),
        (&["--registry", "nats://127.0.0.1"][..], "is not `file` or nats://"),
        (&["--registry", "nats://:4222"][..], "is not `file` or nats://"),
        (&["--registry", "file", "--registry-creds", "/nonexistent"][..], "--registry-creds needs --registry nats://"),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-timeout-ms", "0"][..], "registry-timeout-ms"),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-creds", "/nonexistent.creds"][..], "/nonexistent.creds"),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-creds", "/tmp"][..], "is not a file"),
        (
            &["--registry", "nats://127.0.0.1:4222", "--registry-replicas", "0"][..],
            "--registry-replicas must be 1 to 5",
        ),
        (
            &["--registry", "nats://127.0.0.1:4222", "--registry-replicas", "6"][..],
            "--registry-replicas must be 1 to 5",
        ),
        (&["--registry", "nats://127.0.0.1:4222", "--registry-max-object-mb", "0"][..], "registry-max-object-mb"),
    ] {
        let mut full = vec!["serve", "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        let (code, _out, err) = common::tensor_wasm(&full, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

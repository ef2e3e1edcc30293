//! Upgrades keep yesterday's data (docs/UPGRADE.md): a data dir written by an earlier release,
//! kept as a fixture, is opened by this build, which serves every function and pipeline as
//! recorded, trusts no artifact it did not check, and continues the audit chain and its signed
//! checkpoints. It also leaves the files an older build reads as they were (§8, rollback).
//!
//! `tests/fixtures/datadir-v1/` was written by the release of 2026-12-07 with
//! `cargo test --test upgrade -- --ignored make_fixture_datadir_v1` (its README says more). When
//! a format changes, it gets a version and a migration, a new fixture is added beside this one,
//! and this one stays.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{guests, tensor_wasm, Server};
use serde_json::{json, Value};

const FIXTURE: &str = "tests/fixtures/datadir-v1";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)
}

/// The flags the fixture was written with, which the upgraded server runs with too.
fn flags(root: &Path) -> Vec<String> {
    [
        "--audit-segment-bytes",
        "65536",
        "--audit-checkpoint-interval-ms",
        "50",
        "--audit-signing-key",
        root.join("audit-key").to_str().unwrap(),
        "--functions-dir",
        root.join("functions-dir").to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn start(root: &Path) -> Server {
    let flags = flags(root);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start_in(&root.join("data"), &args)
}

fn stop(mut server: Server) {
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success(), "{}", server.stderr());
}

/// `(module (func (export "add") (param i32 i32) (result i32) ...))`: a module without `_start`,
/// called by export.
fn add() -> Vec<u8> {
    guests::wasm(r#"(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))"#)
}

/// Each recorded call: what was sent where, and what came back.
fn calls() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("hello", "function", json!({})),
        ("echo", "function", json!({"text": "kept across upgrades"})),
        ("add", "function", json!({"export": "add", "args": [40, 2]})),
        ("envelope-echo", "function", json!({"order": 7})),
        ("twice", "pipeline", json!({"order": 8})),
        ("dir-hello", "function", json!({})),
    ]
}

fn invoke(server: &Server, ids: &BTreeMap<String, String>, name: &str, kind: &str, body: &Value) -> (u16, String) {
    let path = format!("/{kind}s/{}/invoke", ids[name]);
    let r =
        server.client().request("POST", &path, &[("content-type", "application/json")], body.to_string().as_bytes());
    (r.status, r.text())
}

/// Writes the fixture. Run by hand, once per format version, with the release being recorded.
#[test]
#[ignore]
fn make_fixture_datadir_v1() {
    let root = fixture();
    assert!(!root.exists(), "{} exists: a fixture is never rewritten", root.display());
    std::fs::create_dir_all(root.join("functions-dir")).unwrap();
    let key = root.join("audit-key");
    let (code, out, err) =
        tensor_wasm(&["audit", "keygen", "--out", key.to_str().unwrap(), "--name", "fixture.example/audit"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    // A functions-directory module: its artifact is all the data dir keeps of it.
    let dir_hello = guests::wasm(r#"(module (memory 1) (data (i32.const 0) "dir") (func (export "_start")))"#);
    std::fs::write(root.join("functions-dir/dir-hello.wasm"), dir_hello).unwrap();

    let server = start(&root);
    let mut ids = BTreeMap::new();
    for (name, wasm, abi) in [
        ("hello", guests::hello(), "command"),
        ("echo", guests::echo(), "command"),
        ("add", add(), "command"),
        ("envelope-echo", guests::echo(), "envelope"),
    ] {
        let r = server.client().deploy(name, &wasm, json!({"abi": abi}));
        assert_eq!(r.status, 201, "{}", r.text());
        ids.insert(name.to_string(), r.json()["id"].as_str().unwrap().to_string());
    }
    let spec = json!({"name": "twice", "steps": ["envelope-echo", "envelope-echo"]});
    let r = server.client().request(
        "POST",
        "/pipelines",
        &[("content-type", "application/json")],
        spec.to_string().as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    ids.insert("twice".into(), r.json()["id"].as_str().unwrap().to_string());
    ids.insert("dir-hello".into(), server.function_id("dir-hello").unwrap());

    let mut recorded = Vec::new();
    for (name, kind, body) in calls() {
        let (status, answer) = invoke(&server, &ids, name, kind, &body);
        assert_eq!(status, 200, "{name}: {answer}");
        recorded.push(json!({"name": name, "kind": kind, "body": body, "status": status, "answer": answer}));
    }
    // Enough audited requests for several sealed segments on each shard, and an active one.
    for i in 0..900 {
        assert_eq!(server.client().request("GET", &format!("/functions/{i:032x}"), &[], b"").status, 404);
    }
    let listing = server.client().request("GET", "/functions", &[], b"").json();
    stop(server);
    let expected = json!({"ids": ids, "calls": recorded, "functions": listing});
    std::fs::write(root.join("expected.json"), serde_json::to_vec_pretty(&expected).unwrap()).unwrap();
}

/// Every file under `dir`, relative, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn copy(from: &Path, to: &Path) {
    for (relative, bytes) in files(from) {
        let target = to.join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
    // The key must stay owner-only, as keygen wrote it: the server refuses one others may read.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(to.join("audit-key"), std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn verify(root: &Path) -> (i32, String) {
    let audit = root.join("data/audit");
    let public = root.join("audit-key.pub");
    let (code, out, err) =
        tensor_wasm(&["audit", "verify", audit.to_str().unwrap(), "--public-key", public.to_str().unwrap()], &[]);
    (code, format!("{out}{err}"))
}

#[test]
fn a_data_dir_written_by_the_first_release_serves_as_recorded_and_stays_readable_by_it() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path();
    copy(&fixture(), root);
    let expected: Value = serde_json::from_slice(&std::fs::read(root.join("expected.json")).unwrap()).unwrap();
    let ids: BTreeMap<String, String> = serde_json::from_value(expected["ids"].clone()).unwrap();
    let (code, out) = verify(root);
    assert_eq!(code, 0, "the fixture verifies as it is: {out}");
    // One artifact as another wasmtime's would be to this one: framed and checksummed as this
    // store writes them, but no artifact this engine accepts. It must be compiled again from its
    // module, not trusted.
    let hello = expected["functions"]["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "hello")
        .map(|f| f["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string())
        .unwrap();
    let payload = b"an artifact of another wasmtime".to_vec();
    let mut stale = b"TWART01\n".to_vec();
    stale.extend_from_slice(&common::sha256(&payload));
    stale.extend_from_slice(&payload);
    std::fs::write(root.join(format!("data/modules/{hello}.cwasm")), stale).unwrap();
    let before = files(&root.join("data"));

    let server = start(root);
    let log = server.wait_for_stderr("stored functions loaded");
    // Artifacts are checked, never trusted: reused when this wasmtime accepts them, else compiled
    // again; either way no function is broken or lost.
    assert!(log.contains("functions=4") && log.contains("broken=0") && log.contains("unreadable=0"), "{log}");
    // Every artifact of the first release predates the bulk-memory rewrite (its version string
    // lacks `wasm::engine::CODE_REVISION`), so each of its three modules is compiled again, the
    // stale one among them: none keeps code whose bulk-memory instructions a deadline cannot stop.
    assert!(log.contains("modules=3") && log.contains("recompiled=3"), "the old artifacts were compiled again: {log}");
    let listing = server.client().request("GET", "/functions", &[], b"").json();
    let shape = |list: &Value| -> Vec<(Value, Value, Value, Value)> {
        let items = list["functions"].as_array().unwrap();
        let mut shape: Vec<_> =
            items.iter().map(|f| (f["id"].clone(), f["name"].clone(), f["digest"].clone(), f["abi"].clone())).collect();
        // By id: a directory function is created anew at each start, so its place in the
        // oldest-first listing moves.
        shape.sort_by_key(|f| f.0.to_string());
        shape
    };
    assert_eq!(shape(&listing), shape(&expected["functions"]));
    for call in expected["calls"].as_array().unwrap() {
        let (name, kind) = (call["name"].as_str().unwrap(), call["kind"].as_str().unwrap());
        let (status, answer) = invoke(&server, &ids, name, kind, &call["body"]);
        assert_eq!((status, answer.as_str()), (200, call["answer"].as_str().unwrap()), "{name}");
    }
    for i in 0..50 {
        assert_eq!(server.client().request("GET", &format!("/functions/{i:032x}"), &[], b"").status, 404);
    }
    stop(server);

    // The chain continued across the old segments and the new ones, under checkpoints old and new.
    let (code, out) = verify(root);
    assert_eq!(code, 0, "{out}");
    // What a rolled-back build reads (docs/UPGRADE.md §8) is as it was: records and modules byte
    // for byte, sealed segments byte for byte, the active ones continued (their old bytes a
    // prefix); artifacts, where compiled again, still framed as before.
    let after = files(&root.join("data"));
    for (path, old) in &before {
        let name = path.to_str().unwrap();
        let new = after.get(path).unwrap_or_else(|| panic!("{name} is gone"));
        if name.ends_with(".cwasm") {
            assert!(new.starts_with(b"TWART01\n"), "{name}");
        } else if name.starts_with("audit/") {
            assert!(new.starts_with(old), "{name} was rewritten, not continued");
        } else if name != ".lock" {
            assert_eq!(new, old, "{name} changed");
        }
    }
}

/// A first release's single node joining a fleet: the same data dir started with a replica id.
/// Its records named no replica; the chain goes on under one, in new segments, and the old
/// checkpoints (which name none) still verify beside the new ones (which do).
#[test]
fn the_first_releases_log_goes_on_under_a_replica_id_and_its_checkpoints_still_verify() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path();
    copy(&fixture(), root);
    let audit = root.join("data/audit");
    let old_records = |audit: &Path| -> usize {
        files(audit)
            .iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "jsonl"))
            .map(|(_, b)| b.iter().filter(|c| **c == b'\n').count())
            .sum()
    };
    let before = old_records(&audit);
    assert!(before > 0);
    let flags = flags(root);
    let args: Vec<&str> = flags.iter().map(String::as_str).chain(["--shards", "1", "--replica-id", "r-1"]).collect();
    let server = Server::start_in(&root.join("data"), &args);
    for i in 0..10 {
        assert_eq!(server.client().request("GET", &format!("/functions/{i:032x}"), &[], b"").status, 404);
    }
    let shipped = server.checkpoint_lines();
    stop(server);
    assert!(shipped.iter().all(|l| l.contains("\"replica\":\"r-1\"")), "{shipped:?}");

    let (code, out) = verify(root);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("replicas: r-1 ({before} records name none)")), "{out}");
    assert!(out.contains("goes on as replica r-1 (the chain's records before it name no replica)"), "{out}");
    let verified: usize =
        out.lines().find_map(|l| l.strip_prefix("checkpoints: ")?.strip_suffix(" verified")?.parse().ok()).unwrap();
    let (code, old_out) = {
        let fixture_copy = tempfile::tempdir().unwrap();
        copy(&fixture(), fixture_copy.path());
        verify(fixture_copy.path())
    };
    assert_eq!(code, 0, "{old_out}");
    let old_verified: usize =
        old_out.lines().find_map(|l| l.strip_prefix("checkpoints: ")?.strip_suffix(" verified")?.parse().ok()).unwrap();
    assert!(verified > old_verified, "the old checkpoints and new ones of r-1: {out}");
    // Every record written since names r-1, in segments of its own.
    let shard0 = audit.join("shard-0");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&shard0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    segments.sort();
    let newest = std::fs::read_to_string(segments.last().unwrap()).unwrap();
    assert_eq!(newest.lines().count(), 10, "{newest}");
    assert!(newest.lines().all(|l| l.contains(",\"replica\":\"r-1\",\"shard\":0,")), "{newest}");
    assert_eq!(old_records(&audit), before + 10);
}

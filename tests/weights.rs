//! A function's resident tensors (issue 34, item 4), end to end on the host back-end: deployed
//! with the function in a safetensors file (API, functions directory), uploaded to a device once
//! per function version, read through `tensor_weight`, counted against the tenant's device quota
//! and its storage quota, listed, stored across restarts, and freed when the function goes.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::{guests, within, Server};
use serde_json::{json, Value};

/// A safetensors file, written by hand as the format says: an 8-byte little-endian header
/// length, the JSON header (dtype, shape, data offsets per tensor), then the data.
fn safetensors(tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(name.to_string(), json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let header = Value::Object(header).to_string().into_bytes();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&data);
    file
}

const W: [f32; 6] = [1.5, -2.0, 0.25, 3.0, -0.5, 8.0];

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `w` f32 [2, 3], `ids` i32 [3], `h` bf16 [2]: 24 + 12 + 4 bytes.
fn model() -> Vec<u8> {
    let ids: Vec<u8> = [2i32, 0, 1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let h: Vec<u8> = [0x3f80u16, 0xc000].iter().flat_map(|x| x.to_le_bytes()).collect();
    safetensors(&[("w", "F32", &[2, 3], f32_bytes(&W)), ("ids", "I32", &[3], ids), ("h", "BF16", &[2], h)])
}
const MODEL_BYTES: f64 = 40.0;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A guest that names weights from its data segment: "w" at 0, "ids" at 16, "missing" at 32.
fn weights_guest() -> Vec<u8> {
    guests::wasm(
        r#"(module
  (import "tensor_wasm" "tensor_weight" (func $weight (param i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_read_typed" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_add" (func $add (param i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_free" (func $free (param i32) (result i32)))
  (import "tensor_wasm" "tensor_reshape" (func $reshape (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "w")
  (data (i32.const 16) "ids")
  (data (i32.const 32) "missing")
  (func (export "weight") (param $ptr i32) (param $len i32) (result i32)
    (call $weight (local.get $ptr) (local.get $len)))
  ;; Element k of `h`, read as f32 bits: of the weight itself, or of w + w.
  (func $element (param $h i32) (param $k i32) (result i32) (local $n i32)
    (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (local.get $h))))
    (local.set $n (call $read (local.get $h) (i32.const 0) (i32.const 4096) (i32.const 24)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (local.get $n))))
    (i32.load (i32.add (i32.const 4096) (i32.shl (local.get $k) (i32.const 2)))))
  (func (export "w_element") (param $k i32) (result i32)
    (call $element (call $weight (i32.const 0) (i32.const 1)) (local.get $k)))
  (func (export "doubled_element") (param $k i32) (result i32) (local $w i32)
    (local.set $w (call $weight (i32.const 0) (i32.const 1)))
    (if (i32.lt_s (local.get $w) (i32.const 0)) (then (return (local.get $w))))
    (call $element (call $add (local.get $w) (local.get $w)) (local.get $k)))
  ;; Freeing a weight's handle, or a view of it, forgets the handle only.
  (func (export "free_then_read") (param $k i32) (result i32) (local $w i32) (local $v i32)
    (local.set $w (call $weight (i32.const 0) (i32.const 1)))
    (i32.store (i32.const 64) (i32.const 6))
    (local.set $v (call $reshape (local.get $w) (i32.const 64) (i32.const 1)))
    (drop (call $free (local.get $v)))
    (drop (call $free (local.get $w)))
    (call $element (call $weight (i32.const 0) (i32.const 1)) (local.get $k))))"#,
    )
}

fn call(server: &Server, id: &str, export: &str, args: Value) -> i64 {
    let r = server.client().invoke(id, json!({ "export": export, "args": args }).to_string().as_bytes());
    assert_eq!(r.status, 200, "{export}: {}", r.text());
    r.json()["result"][0].as_i64().unwrap()
}

fn deploy_with_tensors(server: &Server, name: &str, tensors: &[u8]) -> String {
    let r = server.client().deploy(name, &weights_guest(), json!({ "tensors_b64": b64(tensors) }));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn uploads(server: &Server) -> f64 {
    server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "upload")])
}

fn tenant_device_bytes(server: &Server) -> f64 {
    server.metric("tensor_wasm_tenant_gpu_memory_used_bytes", &[("tenant", "0")])
}

#[test]
fn weights_are_uploaded_once_read_exactly_and_freed_with_their_function() {
    let server = Server::start(&["--gpu", "host"]);
    let id = deploy_with_tensors(&server, "weights", &model());
    for (k, want) in W.iter().enumerate() {
        assert_eq!(call(&server, &id, "w_element", json!([k])), i64::from(want.to_bits() as i32), "w[{k}]");
        let doubled = (want * 2.0).to_bits() as i32;
        assert_eq!(call(&server, &id, "doubled_element", json!([k])), i64::from(doubled), "(w + w)[{k}]");
    }
    // The three tensors went up once, at the first invocation; twelve invocations later they are
    // still the only uploads, held once against the tenant's quota and the device's memory.
    assert_eq!(uploads(&server), 3.0);
    assert_eq!(tenant_device_bytes(&server), MODEL_BYTES);
    within(Duration::from_secs(10), "only the weights on the device", || {
        server.metric("tensor_wasm_gpu_memory_used_bytes", &[("device", "0")]) == MODEL_BYTES
    });
    // Freeing a weight's handle, or a view's, does not free the weight.
    assert_eq!(call(&server, &id, "free_then_read", json!([5])), i64::from(W[5].to_bits() as i32));
    assert_eq!(uploads(&server), 3.0);
    // Names: a missing one, one longer than any, one outside memory.
    assert_eq!(call(&server, &id, "weight", json!([32, 7])), -16);
    assert_eq!(call(&server, &id, "weight", json!([0, 300])), -16);
    assert_eq!(call(&server, &id, "weight", json!([65530, 100])), -3);
    assert_eq!(call(&server, &id, "weight", json!([-1, 1])), -3);
    assert!(call(&server, &id, "weight", json!([16, 3])) > 0, "ids");

    // Listed with names, dtypes, shapes and bytes.
    let f = server.client().request("GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!(
        f["tensors"],
        json!([
            {"name": "h", "dtype": "bf16", "shape": [2], "bytes": 4},
            {"name": "ids", "dtype": "i32", "shape": [3], "bytes": 12},
            {"name": "w", "dtype": "f32", "shape": [2, 3], "bytes": 24},
        ])
    );
    assert!(f["tensors_digest"].as_str().unwrap().starts_with("sha256:"));
    let list = server.client().request("GET", "/functions", &[], b"").json();
    assert_eq!(list["functions"][0]["tensors_count"], 3);
    assert_eq!(list["functions"][0]["tensors_bytes"], 40);
    assert!(list["functions"][0].get("tensors").is_none(), "a listing stays small");

    // Another function of the tenant with the same file shares the copy: no upload, no quota.
    let twin = deploy_with_tensors(&server, "twin", &model());
    assert_eq!(call(&server, &twin, "w_element", json!([1])), i64::from(W[1].to_bits() as i32));
    assert_eq!(uploads(&server), 3.0);
    assert_eq!(tenant_device_bytes(&server), MODEL_BYTES);

    // Deleted, the first function leaves the copy to its twin; with the twin, it goes, and the
    // quota comes back.
    let r = server.client().request("DELETE", &format!("/functions/{id}"), &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(tenant_device_bytes(&server), MODEL_BYTES, "the twin still holds the copy");
    assert_eq!(call(&server, &twin, "w_element", json!([2])), i64::from(W[2].to_bits() as i32));
    let r = server.client().request("DELETE", &format!("/functions/{twin}"), &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    within(Duration::from_secs(10), "the weights freed", || {
        tenant_device_bytes(&server) == 0.0
            && server.metric("tensor_wasm_gpu_memory_used_bytes", &[("device", "0")]) == 0.0
    });
}

#[test]
fn a_function_without_tensors_gets_no_such_weight() {
    let server = Server::start(&["--gpu", "host"]);
    let id = server.deploy("bare", &weights_guest());
    assert_eq!(call(&server, &id, "weight", json!([0, 1])), -16);
    assert_eq!(call(&server, &id, "w_element", json!([0])), -16);
}

#[test]
fn weights_past_the_tenant_device_quota_are_refused_and_hold_nothing() {
    let server = Server::start(&["--gpu", "host", "--gpu-memory-per-tenant-mb", "1"]);
    // 1.5 MB of weights in a 1 MiB quota.
    let big = safetensors(&[("w", "F32", &[384, 1024], vec![0u8; 384 * 1024 * 4])]);
    let id = deploy_with_tensors(&server, "big", &big);
    assert_eq!(call(&server, &id, "w_element", json!([0])), -5);
    assert_eq!(tenant_device_bytes(&server), 0.0);
    assert_eq!(uploads(&server), 0.0, "refused before anything was sent");
    // The server serves the tenant's other work.
    let small = deploy_with_tensors(&server, "small", &model());
    assert_eq!(call(&server, &small, "w_element", json!([1])), i64::from(W[1].to_bits() as i32));
}

#[test]
fn bad_tensor_files_are_refused_with_invalid_tensors() {
    let server = Server::start(&["--gpu", "host", "--max-function-tensors-mb", "1"]);
    let mut c = server.client();
    let rank5 = safetensors(&[("w", "F32", &[1, 1, 1, 1, 2], f32_bytes(&[1.0, 2.0]))]);
    let f64s = safetensors(&[("w", "F64", &[1], vec![0u8; 8])]);
    let zero = safetensors(&[("w", "F32", &[0, 3], Vec::new())]);
    let short = {
        let mut f = model();
        f.truncate(f.len() - 1);
        f
    };
    let over = safetensors(&[("w", "F32", &[300_000], vec![0u8; 1_200_000])]);
    let cases: [(&str, String, &str); 7] = [
        ("not base64", "@@@".into(), "not base64"),
        ("not a file", b64(b"hello"), "not a safetensors file"),
        ("cut short", b64(&short), "not a safetensors file"),
        ("rank 5", b64(&rank5), "rank 5"),
        ("f64", b64(&f64s), "F64"),
        ("a zero dimension", b64(&zero), "zero dimension"),
        ("over the limit", b64(&over), "--max-function-tensors-mb"),
    ];
    for (what, tensors, says) in cases {
        let r = c.deploy("bad", &weights_guest(), json!({ "tensors_b64": tensors }));
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.json()["error"]["kind"], "invalid_tensors", "{what}");
        assert!(r.text().contains(says), "{what}: {}", r.text());
    }
    let empty = safetensors(&[]);
    let r = c.deploy("bad", &weights_guest(), json!({ "tensors_b64": b64(&empty) }));
    assert_eq!(r.json()["error"]["kind"], "invalid_tensors");
    // Nothing was created, and the server serves.
    assert_eq!(server.function_id("bad"), None);
    deploy_with_tensors(&server, "good", &model());
}

#[test]
fn tensor_files_count_against_the_tenant_storage_quota() {
    let server = Server::start(&["--gpu", "host", "--max-storage-mb-per-tenant", "1"]);
    let big = safetensors(&[("w", "F32", &[300_000], vec![0u8; 1_200_000])]);
    let r = server.client().deploy("big", &weights_guest(), json!({ "tensors_b64": b64(&big) }));
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["kind"], "quota_exceeded");
    assert!(r.text().contains("storage"), "{}", r.text());
}

fn stored_tensor_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("modules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

#[test]
fn stored_tensors_survive_a_restart_and_a_damaged_file_breaks_only_its_function_until_redeployed() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &["--gpu", "host"]);
    let id = deploy_with_tensors(&server, "weights", &model());
    let plain = server.deploy("plain", &weights_guest());
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    let files = stored_tensor_files(dir.path());
    assert_eq!(files.len(), 1);

    let mut server = Server::start_in(dir.path(), &["--gpu", "host"]);
    assert_eq!(call(&server, &id, "w_element", json!([3])), i64::from(W[3].to_bits() as i32));
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());

    // A flipped byte: the function is listed broken, the other one runs.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&files[0], &bytes).unwrap();
    let server = Server::start_in(dir.path(), &["--gpu", "host"]);
    let r = server.client().invoke(&id, br#"{"export": "w_element", "args": [0]}"#);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["kind"], "function_unavailable");
    assert!(r.text().contains("tensors"), "{}", r.text());
    assert_eq!(call(&server, &plain, "weight", json!([0, 1])), -16);
    // The same tensors deployed again repair the file, and the broken function runs again.
    deploy_with_tensors(&server, "weights-again", &model());
    assert_eq!(call(&server, &id, "w_element", json!([2])), i64::from(W[2].to_bits() as i32));

    // Deleting every function that uses the file removes it.
    for name in ["weights", "weights-again"] {
        let id = server.function_id(name).unwrap();
        assert_eq!(server.client().request("DELETE", &format!("/functions/{id}"), &[], b"").status, 204);
    }
    assert!(stored_tensor_files(dir.path()).is_empty());
}

#[test]
fn a_folder_function_carries_the_safetensors_file_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.wasm"), weights_guest()).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), model()).unwrap();
    std::fs::write(dir.path().join("orphan.safetensors"), model()).unwrap();
    std::fs::write(dir.path().join("broken.wasm"), weights_guest()).unwrap();
    std::fs::write(dir.path().join("broken.safetensors"), b"not tensors").unwrap();
    let server = Server::start(&["--gpu", "host", "--functions-dir", dir.path().to_str().unwrap()]);
    let id = server.function_id("model").expect("the folder's function is listed");
    assert_eq!(call(&server, &id, "w_element", json!([0])), i64::from(W[0].to_bits() as i32));
    let f = server.client().request("GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!(f["tensors"].as_array().unwrap().len(), 3);
    // A module whose tensors cannot be read is not loaded; the log names the file.
    assert_eq!(server.function_id("broken"), None);
    server.wait_for_stderr("broken.safetensors");
}

#[test]
fn concurrent_first_invocations_on_several_shards_upload_one_copy() {
    let server = Server::start(&["--gpu", "host", "--shards", "2"]);
    let id = deploy_with_tensors(&server, "weights", &model());
    // Sixteen invocations at once on fresh connections, spread over both shards by the kernel:
    // one uploads, the others wait for it or find the copy there.
    let results: Vec<i64> = std::thread::scope(|s| {
        let (server, id) = (&server, &id);
        let handles: Vec<_> = (0..16).map(|k| s.spawn(move || call(server, id, "w_element", json!([k % 6])))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (k, got) in results.iter().enumerate() {
        assert_eq!(*got, i64::from(W[k % 6].to_bits() as i32), "invocation {k}");
    }
    assert_eq!(uploads(&server), 3.0);
    assert_eq!(tenant_device_bytes(&server), MODEL_BYTES);
}

#[test]
fn the_cli_deploys_a_function_with_its_tensors() {
    let server = Server::start(&["--gpu", "host"]);
    let dir = tempfile::tempdir().unwrap();
    let (wasm, tensors) = (dir.path().join("w.wasm"), dir.path().join("w.safetensors"));
    std::fs::write(&wasm, weights_guest()).unwrap();
    std::fs::write(&tensors, model()).unwrap();
    let url = format!("http://{}", server.addr);
    let env = [("TENSOR_WASM_SERVER", url.as_str())];
    let args = ["deploy", wasm.to_str().unwrap(), "--name", "w", "--tensors", tensors.to_str().unwrap()];
    let (code, out, err) = common::tensor_wasm(&args, &env);
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(call(&server, &id, "w_element", json!([4])), i64::from(W[4].to_bits() as i32));
    let args = ["deploy", wasm.to_str().unwrap(), "--name", "w", "--tensors", "/nonexistent.safetensors"];
    let (code, _, err) = common::tensor_wasm(&args, &env);
    assert!(code == 1 && err.contains("cannot read /nonexistent.safetensors"), "{err}");
}

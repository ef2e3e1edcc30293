//! The tensor ABI end to end, on the host back-end: guests call `tensor_wasm`, the shard sends
//! each request through its ring to a device worker, and the guest resumes on the completion.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guests, within, Server};
use serde_json::{json, Value};

fn call(c: &mut common::Client, id: &str, export: &str, args: Value) -> i64 {
    let r = c.invoke(id, json!({ "export": export, "args": args }).to_string().as_bytes());
    assert_eq!(r.status, 200, "{export}: {}", r.text());
    r.json()["result"][0].as_i64().unwrap()
}

#[test]
fn rust_guest_runs_a_dense_layer_through_the_dispatch_path() {
    let server = Server::start(&["--gpu", "host"]);
    let id = server.deploy("tensor-ops", &guests::rust_tensor_ops());
    let mut c = server.client();
    let x = [[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]];
    let w = [[0.5, -1.0, 2.0, 0.0], [1.5, 0.25, -0.5, 1.0], [-2.0, 1.0, 0.75, 0.5]];
    let r = c.invoke(&id, json!({ "x": x, "w": w, "scale": 0.5 }).to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["shape"], json!([2, 4]));
    // The float64 reference: softmax(relu(x·w) * 0.5), row by row.
    for (i, row) in x.iter().enumerate() {
        let z: Vec<f64> = (0..4).map(|j| (0..3).map(|k| row[k] * w[k][j]).sum::<f64>().max(0.0) * 0.5).collect();
        let max = z.iter().cloned().fold(f64::MIN, f64::max);
        let total: f64 = z.iter().map(|v| (v - max).exp()).sum();
        for j in 0..4 {
            let want = (z[j] - max).exp() / total;
            let got = out["y"][i * 4 + j].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-6, "y[{i}][{j}] = {got}, want {want}");
        }
    }
    assert!((out["sum"].as_f64().unwrap() - 2.0).abs() < 1e-5, "two rows of probabilities sum to 2");

    // The latency probe: many adds, timed inside the guest.
    let r = c.invoke(&id, br#"{"probe": 2000, "len": 1024}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json();
    assert_eq!(p["samples"], json!(2000));
    assert!(p["p50_ns"].as_u64().unwrap() > 0);

    // Every call was counted, per op and device, with its guest-visible latency.
    assert!(
        server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "add"), ("backend", "host"), ("device", "0")])
            >= 2000.0
    );
    assert_eq!(server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "matmul")]), 1.0);
    assert!(server.metric("tensor_wasm_kernel_latency_seconds_count", &[("op", "add")]) >= 2000.0);
    // The invocations ended, so their tensors are gone.
    within(Duration::from_secs(10), "device memory freed", || {
        server.metric("tensor_wasm_gpu_memory_used_bytes", &[("device", "0")]) == 0.0
    });
    assert_eq!(server.metric("tensor_wasm_tenant_gpu_memory_used_bytes", &[("tenant", "0")]), 0.0);
}

#[test]
fn every_pointer_is_checked_and_errors_have_codes_and_messages() {
    let server = Server::start(&["--gpu", "host"]);
    let id = server.deploy("abi", &guests::tensor_abi());
    let mut c = server.client();
    // Memory is 4 MiB: a shape or data pointer past it is out of bounds, never a host read.
    assert_eq!(call(&mut c, &id, "create", json!([5_000_000, 1, 16, 4])), -3);
    assert_eq!(call(&mut c, &id, "create", json!([0, 1, 4_194_300, 8])), -3);
    assert_eq!(call(&mut c, &id, "create", json!([0, 1, -1, 4])), -3);
    assert_eq!(call(&mut c, &id, "create", json!([0, 0, 16, 4])), -1, "rank 0");
    assert_eq!(call(&mut c, &id, "create", json!([0, 5, 16, 4])), -1, "rank 5");
    assert_eq!(call(&mut c, &id, "create_dtype", json!([1])), -10);
    // Memory starts zeroed: shape [0] is a zero dimension.
    assert_eq!(call(&mut c, &id, "create", json!([0, 1, 16, 4])), -1);
    assert_eq!(call(&mut c, &id, "read", json!([1, 0, 4])), -2, "no tensor 1 in a fresh invocation");
    assert_eq!(call(&mut c, &id, "free", json!([7])), -2);
    assert_eq!(call(&mut c, &id, "add", json!([1, 2])), -2);
    // Each export call is its own invocation: a handle from the last one means nothing here.
    assert_eq!(call(&mut c, &id, "create_dtype", json!([0])), 1);
    assert_eq!(call(&mut c, &id, "read", json!([1, 0, 4])), -2);
    // The server is fine after all that.
    assert_eq!(c.request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn tenant_quota_is_enforced_counted_and_returned() {
    let server = Server::start(&["--gpu", "host", "--gpu-memory-per-tenant-mb", "1"]);
    let id = server.deploy("abi", &guests::tensor_abi());
    let mut c = server.client();
    // 400×400 f32 is 640 KB: the input fits in 1 MiB, the product does not.
    assert_eq!(call(&mut c, &id, "matmul_loop", json!([400, 1])), -5);
    assert_eq!(server.metric("tensor_wasm_gpu_quota_rejections_total", &[("tenant", "0")]), 1.0);
    // The invocation's input went back when it ended: the next one fits again.
    assert_eq!(server.metric("tensor_wasm_tenant_gpu_memory_used_bytes", &[("tenant", "0")]), 0.0);
    assert_eq!(call(&mut c, &id, "matmul_loop", json!([200, 1])), 2);
}

#[test]
fn the_shard_serves_other_requests_while_a_kernel_runs() {
    let server = Server::start(&["--gpu", "host", "--shards", "1"]);
    let id = server.deploy("abi", &guests::tensor_abi());
    let done = Arc::new(AtomicBool::new(false));
    let (addr, flag, fid) = (server.addr, done.clone(), id.clone());
    let long = std::thread::spawn(move || {
        let mut c = common::Client::connect(addr);
        // Three 800×800 matmuls on the host back-end: hundreds of milliseconds of worker time.
        let r = call(&mut c, &fid, "matmul_loop", json!([800, 3]));
        flag.store(true, Ordering::SeqCst);
        r
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut c = server.client();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(c.request("GET", "/healthz", &[], b"").status, 200);
        slowest = slowest.max(t.elapsed());
    }
    assert!(!done.load(Ordering::SeqCst), "the kernels outlast the probes, or this test shows nothing");
    assert!(slowest < Duration::from_millis(100), "healthz waited {slowest:?} behind a kernel");
    assert!(long.join().unwrap() > 0);
}

#[test]
fn a_timeout_during_a_kernel_answers_504_and_frees_everything() {
    let server = Server::start(&["--gpu", "host"]);
    let mut c = server.client();
    let r = c.deploy("abi", &guests::tensor_abi(), json!({ "timeout_ms": 150 }));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let r = c.invoke(&id, json!({ "export": "matmul_loop", "args": [800, 20] }).to_string().as_bytes());
    assert_eq!((r.status, r.error_kind().as_str()), (504, "invoke_timeout"), "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(5), "answered at the deadline, not after the kernels");
    // The abandoned kernel finishes on the worker; then the release frees its tensors.
    within(Duration::from_secs(10), "device memory freed", || {
        server.metric("tensor_wasm_gpu_memory_used_bytes", &[("device", "0")]) == 0.0
    });
    assert_eq!(server.metric("tensor_wasm_tenant_gpu_memory_used_bytes", &[("tenant", "0")]), 0.0);
}

#[test]
fn invocations_spread_over_several_host_devices() {
    let server = Server::start(&["--gpu", "host", "--gpu-host-devices", "3"]);
    let id = server.deploy("abi", &guests::tensor_abi());
    let mut c = server.client();
    for _ in 0..12 {
        assert!(call(&mut c, &id, "matmul_loop", json!([8, 1])) > 0);
    }
    assert_eq!(server.metric("tensor_wasm_gpu_devices", &[("backend", "host")]), 3.0);
    for device in ["0", "1", "2"] {
        let n = server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "matmul"), ("device", device)]);
        assert!(n > 0.0, "device {device} got no work");
    }
}

#[test]
fn a_module_importing_an_unknown_tensor_function_is_refused_at_deploy() {
    let server = Server::start(&["--gpu", "host"]);
    let wasm = guests::wasm(r#"(module (import "tensor_wasm" "tensor_fft" (func)) (func (export "_start")))"#);
    let r = server.client().deploy("fft", &wasm, json!({}));
    assert_eq!((r.status, r.error_kind().as_str()), (400, "unsupported_import"), "{}", r.text());
}

#[test]
fn gpu_cuda_without_a_device_refuses_to_start_and_auto_falls_back() {
    if tensor_wasm_dispatch::backend::cuda::driver_present() {
        eprintln!("SKIPPED: this host has a CUDA driver");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--gpu", "cuda", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("CUDA is not available: libcuda was not found"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The default, `auto`, serves on the host back-end.
    let server = Server::start(&[]);
    assert_eq!(server.metric("tensor_wasm_gpu_devices", &[("backend", "host")]), 1.0);
}

#[test]
fn a_full_ring_makes_the_guest_wait_then_busy() {
    let server = Server::start(&[
        "--gpu",
        "host",
        "--shards",
        "1",
        "--dispatch-ring-depth",
        "1",
        "--dispatch-max-wait-ms",
        "20",
    ]);
    let id = server.deploy("abi", &guests::tensor_abi());
    let addr = server.addr;
    let run = |n: u32, times: u32| {
        let id = id.clone();
        std::thread::spawn(move || call(&mut common::Client::connect(addr), &id, "matmul_loop", json!([n, times])))
    };
    // The worker is busy for hundreds of milliseconds with each multiplication of the long run;
    // one request then fills the one-place ring, and the others wait their 20 ms for a place.
    // The small ones go only once the long run's first multiplication is on its way to the worker
    // (the count goes up as it is sent): sent by a clock instead, they could all find the worker
    // between two multiplications, or before the first, and pass.
    let long = run(1000, 2);
    server.wait_for_metric("tensor_wasm_kernel_dispatches_total", &[("op", "matmul")], 1.0);
    let small: Vec<_> = (0..3).map(|_| run(8, 1)).collect();
    let codes: Vec<i64> = small.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(codes.contains(&-6), "someone found the ring full for 20 ms: {codes:?}");
    assert!(long.join().unwrap() > 0);
    assert!(server.metric("tensor_wasm_dispatch_busy_total", &[]) >= 1.0);
    assert!(server.metric("tensor_wasm_dispatch_ring_waits_total", &[]) >= 1.0);
}

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
    server.wait_for_metric("tensor_wasm_active_instances", &[], 1.0);
    let mut c = server.client();
    // Were the shard waiting on the kernels, the probes would be answered only after them.
    for _ in 0..20 {
        assert_eq!(c.request("GET", "/healthz", &[], b"").status, 200);
        assert!(!done.load(Ordering::SeqCst), "a probe was answered only after the kernels");
    }
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

/// bf16 rounding of the inputs and of each op's output along the chain (matmul, add, gelu,
/// layer norm: four roundings of at most 2^-8 relative each), on outputs of unit scale.
const BF16_CHAIN_BOUND: f64 = 4e-2;

#[test]
fn rust_guest_runs_bf16_ops_broadcasts_and_gathers_end_to_end() {
    let server = Server::start(&["--gpu", "host"]);
    let id = server.deploy("tensor-ops", &guests::rust_tensor_ops());
    let mut c = server.client();
    let x = [[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]];
    let w = [[0.5, -1.0, 2.0, 0.0], [1.5, 0.25, -0.5, 1.0], [-2.0, 1.0, 0.75, 0.5]];
    let b = [0.1, -0.2, 0.3, 0.05];
    let table = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]];
    let ids = [[2, 0], [1, 1]];
    let req = json!({ "block": { "x": x, "w": w, "b": b, "table": table, "ids": ids } });
    let r = c.invoke(&id, req.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["dtype"], json!(2), "the chain stays in bf16");
    // The float64 reference: layer_norm(gelu(x·w + b)), row by row, no weight or bias.
    let gelu = |v: f64| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
    for (i, row) in x.iter().enumerate() {
        let h: Vec<f64> = (0..4).map(|j| gelu((0..3).map(|k| row[k] * w[k][j]).sum::<f64>() + b[j])).collect();
        let mean = h.iter().sum::<f64>() / 4.0;
        let var = h.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        let want: Vec<f64> = h.iter().map(|v| (v - mean) / (var + 1e-5).sqrt()).collect();
        for (j, &wv) in want.iter().enumerate() {
            let got = out["y"][i * 4 + j].as_f64().unwrap();
            assert!((got - wv).abs() <= BF16_CHAIN_BOUND, "y[{i}][{j}] = {got}, want {wv}");
        }
        let best = (0..4).fold(0, |m, j| if want[j] > want[m] { j } else { m });
        assert_eq!(out["argmax"][i], json!(best), "argmax of row {i}: {want:?}");
    }
    // gather(table, ids) is [2, 2, 4]; permuted [1, 0, 2], element (p, q, k) is table[ids[q][p]][k].
    assert_eq!(out["gathered_shape"], json!([2, 2, 4]));
    let got: Vec<f64> = out["gathered"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let want: Vec<f64> = (0..2).flat_map(|p| (0..2).flat_map(move |q| table[ids[q][p]].to_vec())).collect();
    assert_eq!(got, want);
    assert_eq!(out["wrong_read"], json!(-12), "a bf16 tensor read as f32 is dtype_mismatch");
    assert_eq!(out["wrong_id"], json!(-14), "an id past the table is index_out_of_range");
    assert_eq!(server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "gelu")]), 1.0);
    assert_eq!(server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "layer_norm")]), 1.0);
}

/// A WAT guest for the newer imports' failure paths. Memory: a shape [2, 3, 1, 1, 1] at 0, zeroed
/// data at 1024.
fn typed_abi_guest() -> Vec<u8> {
    guests::wasm(
        r#"(module
  (import "tensor_wasm" "tensor_create_typed" (func $create (param i32 i32 i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_read_typed" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_dtype" (func $dtype (param i32) (result i32)))
  (import "tensor_wasm" "tensor_cast" (func $cast (param i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_sum_axis" (func $sum_axis (param i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_slice" (func $slice (param i32 i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_matmul_ex" (func $matmul_ex (param i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_reshape" (func $reshape (param i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_permute" (func $permute (param i32 i32 i32) (result i32)))
  (memory (export "memory") 64)
  (func $shape
    (i32.store (i32.const 0) (i32.const 2)) (i32.store (i32.const 4) (i32.const 3))
    (i32.store (i32.const 8) (i32.const 1)) (i32.store (i32.const 12) (i32.const 1))
    (i32.store (i32.const 16) (i32.const 1)))
  (func $f32_2x3 (result i32) (call $shape) (call $create (i32.const 0) (i32.const 0) (i32.const 2) (i32.const 1024) (i32.const 24)))
  (func (export "create") (param $dtype i32) (param $rank i32) (param $len i32) (result i32)
    (call $shape) (call $create (local.get $dtype) (i32.const 0) (local.get $rank) (i32.const 1024) (local.get $len)))
  (func (export "read_as") (param $made i32) (param $len i32) (param $as i32) (result i32) (local $h i32)
    (call $shape)
    (local.set $h (call $create (local.get $made) (i32.const 0) (i32.const 2) (i32.const 1024) (local.get $len)))
    (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (local.get $h))))
    (call $read (local.get $h) (local.get $as) (i32.const 2048) (i32.const 64)))
  (func (export "dtype") (param $made i32) (param $len i32) (result i32)
    (call $shape)
    (call $dtype (call $create (local.get $made) (i32.const 0) (i32.const 2) (i32.const 1024) (local.get $len))))
  (func (export "sum_axis") (param $axis i32) (result i32) (call $sum_axis (call $f32_2x3) (local.get $axis) (i32.const 1)))
  (func (export "slice") (param $start i32) (param $len i32) (result i32)
    (call $slice (call $f32_2x3) (i32.const 1) (local.get $start) (local.get $len)))
  (func (export "matmul_ex") (param $flags i32) (result i32) (local $h i32)
    (local.set $h (call $f32_2x3))
    (call $matmul_ex (local.get $h) (local.get $h) (local.get $flags)))
  (func (export "reshape") (param $rank i32) (result i32) (call $reshape (call $f32_2x3) (i32.const 0) (local.get $rank)))
  (func (export "permute") (param $ptr i32) (result i32) (call $permute (call $f32_2x3) (local.get $ptr) (i32.const 2)))
  (func (export "cast") (param $n i32) (param $to i32) (result i32) (local $h i32)
    (i32.store (i32.const 0) (local.get $n))
    (local.set $h (call $create (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 1024) (i32.mul (local.get $n) (i32.const 2))))
    (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (local.get $h))))
    (call $cast (local.get $h) (local.get $to))))"#,
    )
}

#[test]
fn typed_imports_check_dtypes_ranks_axes_and_ranges_and_count_quota_by_dtype() {
    let server = Server::start(&["--gpu", "host", "--gpu-memory-per-tenant-mb", "1"]);
    let id = server.deploy("typed-abi", &typed_abi_guest());
    let mut c = server.client();
    // Dtypes: the data length is the element count times the dtype's size.
    assert_eq!(call(&mut c, &id, "create", json!([2, 2, 12])), 1, "six bf16 are 12 bytes");
    assert_eq!(call(&mut c, &id, "create", json!([1, 2, 24])), -4, "six f16 are not 24 bytes");
    assert_eq!(call(&mut c, &id, "create", json!([4, 2, 24])), -10, "no dtype 4");
    assert_eq!(call(&mut c, &id, "create", json!([-1, 2, 24])), -10);
    assert_eq!(call(&mut c, &id, "create", json!([0, 5, 24])), -1, "rank 5 is over MAX_RANK");
    assert_eq!(call(&mut c, &id, "dtype", json!([3, 24])), 3);
    // Reads: the tensor's own dtype only, and a buffer of its bytes.
    assert_eq!(call(&mut c, &id, "read_as", json!([2, 12, 2])), 12);
    assert_eq!(call(&mut c, &id, "read_as", json!([2, 12, 0])), -12, "bf16 read as f32");
    assert_eq!(call(&mut c, &id, "read_as", json!([3, 24, 0])), -12, "i32 read as f32");
    assert_eq!(call(&mut c, &id, "read_as", json!([2, 12, 9])), -10);
    // Axes and ranges.
    assert!(call(&mut c, &id, "sum_axis", json!([-1])) > 0);
    assert_eq!(call(&mut c, &id, "sum_axis", json!([2])), -13);
    assert_eq!(call(&mut c, &id, "sum_axis", json!([-3])), -13);
    assert!(call(&mut c, &id, "slice", json!([1, 2])) > 0);
    assert_eq!(call(&mut c, &id, "slice", json!([2, 2])), -14);
    assert_eq!(call(&mut c, &id, "slice", json!([-1, 2])), -14);
    // Matmul flags: [2, 3] · [2, 3]ᵀ fits, untransposed it does not, and unknown bits are refused.
    assert!(call(&mut c, &id, "matmul_ex", json!([2])) > 0);
    assert_eq!(call(&mut c, &id, "matmul_ex", json!([0])), -4);
    assert_eq!(call(&mut c, &id, "matmul_ex", json!([4])), -1);
    // Views and permutations read their arguments from checked guest memory.
    assert_eq!(call(&mut c, &id, "reshape", json!([2])), 2, "a view is a new handle");
    assert_eq!(call(&mut c, &id, "reshape", json!([3])), 2, "[2, 3] viewed as [2, 3, 1]");
    assert_eq!(call(&mut c, &id, "reshape", json!([1])), -4, "[2] has not the 6 elements of [2, 3]");
    assert_eq!(call(&mut c, &id, "reshape", json!([5])), -1);
    assert_eq!(call(&mut c, &id, "permute", json!([5_000_000])), -3);
    // The quota counts bytes by dtype: 512 KiB of bf16, then its f32 cast (1 MiB) exceeds 1 MiB,
    // and its f16 cast (512 KiB) fits exactly.
    assert_eq!(call(&mut c, &id, "cast", json!([262_144, 0])), -5);
    assert_eq!(server.metric("tensor_wasm_gpu_quota_rejections_total", &[("tenant", "0")]), 1.0);
    assert!(call(&mut c, &id, "cast", json!([262_144, 1])) > 0);
    assert_eq!(call(&mut c, &id, "cast", json!([262_144, 7])), -10);
    within(Duration::from_secs(10), "device memory freed", || {
        server.metric("tensor_wasm_gpu_memory_used_bytes", &[("device", "0")]) == 0.0
    });
    assert_eq!(server.metric("tensor_wasm_tenant_gpu_memory_used_bytes", &[("tenant", "0")]), 0.0);
}

#[test]
fn a_chain_of_dependent_adds_is_streamed_and_one_read_sees_all_of_it() {
    // A ring of 8: the guest sends a sync after every op and waits for the one before, and fills
    // the ring too; the result is the same.
    let server = Server::start(&["--gpu", "host", "--dispatch-ring-depth", "8"]);
    let id = server.deploy("tensor-ops", &guests::rust_tensor_ops());
    let r = server.client().invoke(&id, br#"{"chain": 2000, "len": 1024}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!((out["ops"].as_u64(), out["value"].as_f64()), (Some(2000), Some(2001.0)));
    assert!(server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "add")]) >= 2000.0);
    // Every intermediate was freed, and the invocation's end released the rest.
    within(Duration::from_secs(10), "device memory freed", || {
        server.metric("tensor_wasm_gpu_memory_used_bytes", &[("device", "0")]) == 0.0
    });
}

#[test]
fn tensor_sync_waits_for_the_streamed_calls_before_it() {
    let server = Server::start(&["--gpu", "host"]);
    let wasm = guests::wasm(&format!(
        r#"(module {}
  (import "tensor_wasm" "tensor_sync" (func $sync (result i32)))
  (memory (export "memory") 1)
  (func (export "sync_after") (param $n i32) (result i32) (local $h i32)
    (i32.store (i32.const 0) (i32.const 4))
    (local.set $h (call $create (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 64) (i32.const 16)))
    (block $done (loop $more
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $h (call $add (local.get $h) (local.get $h)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $more)))
    (call $sync)))"#,
        guests::TENSOR
    ));
    let id = server.deploy("sync", &wasm);
    let mut c = server.client();
    assert_eq!(call(&mut c, &id, "sync_after", json!([0])), 0, "nothing to wait for");
    assert_eq!(call(&mut c, &id, "sync_after", json!([300])), 0, "more than a ring holds");
    assert_eq!(server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "sync")]), 2.0);
}

//! Every op against a float64 reference on fresh random inputs, through the real rings and
//! workers, on every back-end this machine has. The host back-end always runs. CUDA runs where a
//! device is present; elsewhere its half prints why it was skipped, and with
//! `TENSOR_WASM_REQUIRE_CUDA=1` (the GPU machine's run) a missing device is a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{deadline, Rng};
use tensor_wasm_dispatch::backend::cuda;
use tensor_wasm_dispatch::{status, BackendChoice, DispatchConfig, Dispatcher, Done, Op, Session};

fn upload(s: &mut Session, shape: &[u32], data: &[f32]) -> i32 {
    let call = s.upload(shape, data.to_vec()).unwrap();
    match s.call_blocking(call, deadline()).unwrap() {
        Done::Tensor(h) => h,
        other => panic!("upload gave {other:?}"),
    }
}

fn run(s: &mut Session, op: Op, a: i32, b: i32, scalar: f32) -> Result<i32, i32> {
    let call = s.kernel(op, a, b, scalar)?;
    match s.call_blocking(call, deadline())? {
        Done::Tensor(h) => Ok(h),
        other => panic!("{op:?} gave {other:?}"),
    }
}

fn download(s: &mut Session, h: i32) -> Vec<f32> {
    let call = s.download(h).unwrap();
    match s.call_blocking(call, deadline()).unwrap() {
        Done::Data(d) => d,
        other => panic!("download gave {other:?}"),
    }
}

/// max |got - want| / max |want|: relative to the output's scale, so that elements near zero do
/// not dominate. NaN (a poisoned, unwritten element) fails every bound.
fn rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs())).max(f64::MIN_POSITIVE);
    got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).abs() / scale).fold(0.0, |m, e| {
        if e.is_nan() {
            f64::INFINITY
        } else {
            m.max(e)
        }
    })
}

fn check(name: &str, got: &[f32], want: &[f64], bound: f64) {
    assert!(got.iter().all(|g| !g.is_nan()), "{name}: unwritten (poisoned) elements in the output");
    let err = rel_error(got, want);
    assert!(err <= bound, "{name}: relative error {err:e} over the bound {bound:e}");
}

fn reference_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            for j in 0..n {
                out[i * n + j] += f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
            }
        }
    }
    out
}

fn reference_softmax(a: &[f32], cols: usize) -> Vec<f64> {
    a.chunks(cols)
        .flat_map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let e: Vec<f64> = row.iter().map(|&x| (f64::from(x) - max).exp()).collect();
            let total: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / total)
        })
        .collect()
}

fn every_op_matches_the_reference(dispatcher: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    let mut s = Session::new(dispatcher.clone(), 0, 1);
    for n in [1usize, 1000, 1024, 4097] {
        let (a, b, c) = (rng.vec(n), rng.vec(n), rng.value());
        let (ha, hb) = (upload(&mut s, &[n as u32], &a), upload(&mut s, &[n as u32], &b));
        assert_eq!(download(&mut s, ha), a, "upload then download is exact");
        let cases: [(Op, Vec<f64>, f64); 4] = [
            (Op::Add, a.iter().zip(&b).map(|(&x, &y)| f64::from(x) + f64::from(y)).collect(), 1e-6),
            (Op::Mul, a.iter().zip(&b).map(|(&x, &y)| f64::from(x) * f64::from(y)).collect(), 1e-6),
            (Op::Scale, a.iter().map(|&x| f64::from(x) * f64::from(c)).collect(), 1e-6),
            (Op::Relu, a.iter().map(|&x| f64::from(x).max(0.0)).collect(), 0.0),
        ];
        for (op, want, bound) in cases {
            let h = run(&mut s, op, ha, hb, c).unwrap();
            check(&format!("{op:?} n={n}"), &download(&mut s, h), &want, bound);
        }
        let h = run(&mut s, Op::Sum, ha, 0, 0.0).unwrap();
        let want: f64 = a.iter().map(|&x| f64::from(x)).sum();
        let l1: f64 = a.iter().map(|&x| f64::from(x).abs()).sum();
        let got = download(&mut s, h);
        assert_eq!(got.len(), 1);
        let err = (f64::from(got[0]) - want).abs() / l1;
        assert!(err <= 1e-6, "sum n={n}: error {err:e} relative to Σ|x|");
    }
    for (rows, cols) in [(1usize, 1usize), (7, 300), (64, 1024)] {
        let a = rng.vec(rows * cols);
        let ha = upload(&mut s, &[rows as u32, cols as u32], &a);
        let h = run(&mut s, Op::Softmax, ha, 0, 0.0).unwrap();
        check(&format!("softmax {rows}x{cols}"), &download(&mut s, h), &reference_softmax(&a, cols), 1e-5);
    }
    for (m, k, n) in [(1usize, 1usize, 1usize), (33, 65, 17), (128, 256, 64)] {
        let (a, b) = (rng.vec(m * k), rng.vec(k * n));
        let ha = upload(&mut s, &[m as u32, k as u32], &a);
        let hb = upload(&mut s, &[k as u32, n as u32], &b);
        let h = run(&mut s, Op::Matmul, ha, hb, 0.0).unwrap();
        assert_eq!(s.tensor(h).unwrap().shape(), &[m as u32, n as u32]);
        check(&format!("matmul {m}x{k}x{n}"), &download(&mut s, h), &reference_matmul(&a, &b, m, k, n), 1e-5);
    }
    drop(s);
    dispatcher.shutdown();
}

fn host(devices: usize) -> Arc<Dispatcher> {
    Dispatcher::start(DispatchConfig { backend: BackendChoice::Host, host_devices: devices, ..Default::default() })
        .unwrap()
}

#[test]
fn host_backend_ops_match_a_float64_reference() {
    every_op_matches_the_reference(host(1));
}

#[test]
fn cuda_backend_ops_match_a_float64_reference() {
    let required = std::env::var("TENSOR_WASM_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    match Dispatcher::start(DispatchConfig { backend: BackendChoice::Cuda, ..Default::default() }) {
        Ok(d) => {
            eprintln!("running on {}", d.devices[0].name);
            every_op_matches_the_reference(d)
        }
        Err(e) if required => panic!("TENSOR_WASM_REQUIRE_CUDA=1 but {e}"),
        Err(e) => eprintln!("SKIPPED: the CUDA half of this test needs a GPU: {e}"),
    }
}

#[test]
fn cuda_start_fails_cleanly_without_a_driver() {
    if cuda::driver_present() {
        eprintln!("SKIPPED: this host has a CUDA driver");
        return;
    }
    let err = Dispatcher::start(DispatchConfig { backend: BackendChoice::Cuda, ..Default::default() }).err().unwrap();
    assert!(err.to_string().contains("libcuda was not found"), "{err}");
    // `auto` falls back to the host back-end instead.
    let d = Dispatcher::start(DispatchConfig { backend: BackendChoice::Auto, ..Default::default() }).unwrap();
    assert_eq!(d.backend().label(), "host");
    d.shutdown();
}

#[test]
fn bad_requests_get_their_own_codes() {
    let d = host(1);
    let mut s = Session::new(d.clone(), 0, 2);
    let a = upload(&mut s, &[2, 3], &[1.0; 6]);
    // [2, 3] and [2] do not broadcast ([2, 3] and [3] would, since add broadcasts).
    let b = upload(&mut s, &[2], &[1.0; 2]);
    assert_eq!(run(&mut s, Op::Add, a, b, 0.0), Err(status::SHAPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Matmul, a, a, 0.0), Err(status::SHAPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Relu, 99, 0, 0.0), Err(status::BAD_HANDLE));
    assert_eq!(run(&mut s, Op::Relu, 0, 0, 0.0), Err(status::BAD_HANDLE));
    assert_eq!(s.upload(&[2], vec![1.0; 3]).err(), Some(status::SHAPE_MISMATCH));
    assert_eq!(s.upload(&[0], vec![]).err(), Some(status::INVALID_ARGUMENT));
    assert_eq!(s.upload(&[1, 1, 1, 1, 1], vec![1.0]).err(), Some(status::INVALID_ARGUMENT));
    s.free(b).unwrap();
    assert_eq!(s.free(b), Err(status::BAD_HANDLE), "a freed handle is gone");
    drop(s);
    d.shutdown();
}

#[test]
fn tenant_quota_refuses_allocations_past_it_and_sessions_give_it_back() {
    let d = Dispatcher::start(DispatchConfig {
        backend: BackendChoice::Host,
        tenant_quota_bytes: 4096,
        ..Default::default()
    })
    .unwrap();
    let mut s = Session::new(d.clone(), 0, 9);
    let a = upload(&mut s, &[512], &[1.0; 512]); // 2 KiB
    let _b = run(&mut s, Op::Relu, a, 0, 0.0).unwrap(); // 4 KiB in all
    assert_eq!(s.kernel(Op::Relu, a, 0, 0.0).err(), Some(status::QUOTA_EXCEEDED));
    assert_eq!(d.quotas.snapshot(), vec![(9, 4096, 1)]);
    // Another tenant has its own quota.
    let mut other = Session::new(d.clone(), 0, 10);
    upload(&mut other, &[512], &[1.0; 512]);
    drop(s);
    drop(other);
    assert_eq!(d.quotas.snapshot(), vec![(9, 0, 1), (10, 0, 0)]);
    // The workers freed the memory too (the release is asynchronous).
    let until = Instant::now() + Duration::from_secs(5);
    while d.devices[0].memory_used() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.devices[0].memory_used(), 0);
    d.shutdown();
}

#[test]
fn too_many_tensors_is_its_own_error() {
    let d = Dispatcher::start(DispatchConfig {
        backend: BackendChoice::Host,
        max_tensors_per_session: 2,
        ..Default::default()
    })
    .unwrap();
    let mut s = Session::new(d.clone(), 0, 1);
    let a = upload(&mut s, &[1], &[1.0]);
    let b = upload(&mut s, &[1], &[1.0]);
    assert_eq!(s.upload(&[1], vec![1.0]).err(), Some(status::TOO_MANY_TENSORS));
    s.free(a).unwrap();
    let c = upload(&mut s, &[1], &[2.0]);
    assert_eq!(download(&mut s, c), vec![2.0]);
    assert_eq!(download(&mut s, b), vec![1.0]);
    drop(s);
    d.shutdown();
}

#[test]
fn sessions_spread_over_several_devices() {
    let d = host(4);
    let mut used = [0usize; 4];
    // Sessions hold their tensors, so each one is in flight while the next is placed.
    let mut sessions = Vec::new();
    for _ in 0..16 {
        let mut s = Session::new(d.clone(), 0, 1);
        upload(&mut s, &[4], &[1.0; 4]);
        used[s.device().unwrap()] += 1;
        sessions.push(s);
    }
    assert!(used.iter().all(|&n| n > 0), "every device got sessions: {used:?}");
    drop(sessions);
    d.shutdown();
}

#[test]
fn a_full_ring_gives_the_call_back_and_busy_after_the_deadline() {
    let d = Dispatcher::start(DispatchConfig { backend: BackendChoice::Host, ring_depth: 1, ..Default::default() })
        .unwrap();
    let mut s = Session::new(d.clone(), 0, 1);
    let n = 768u32;
    let x = upload(&mut s, &[n, n], &vec![0.5; (n * n) as usize]);
    // Occupy the worker with matmuls, then fill the one-place ring behind them.
    let mut sent = 0;
    let mut refused = None;
    let until = Instant::now() + Duration::from_secs(5);
    while refused.is_none() && Instant::now() < until {
        let call = s.kernel(Op::Matmul, x, x, 0.0).unwrap();
        match s.try_send(call) {
            // Never waited for: the session's release frees whatever they made.
            Ok(_) => sent += 1,
            Err(call) => refused = Some(call),
        }
    }
    let call = refused.expect("a one-place ring behind a busy worker fills up");
    assert!(sent >= 1);
    assert!(d.devices[0].permits(0) <= 1);
    s.abort(call);
    let call = s.kernel(Op::Relu, x, 0, 0.0).unwrap();
    // The worker is still inside a matmul of hundreds of milliseconds: the ring stays full.
    assert_eq!(s.call_blocking(call, Instant::now()).err(), Some(status::BUSY));
    drop(s);
    d.shutdown();
}

#[test]
fn calls_and_pending_requests_dropped_midway_leak_no_ticket() {
    let d = host(1);
    let mut s = Session::new(d.clone(), 0, 1);
    let a = upload(&mut s, &[64], &[1.0; 64]);
    // A call dropped unsent: its invocation ended while it waited for room.
    drop(s.kernel(Op::Relu, a, 0, 0.0).unwrap());
    // A request sent and never waited for: its completion recycles the ticket.
    let call = s.kernel(Op::Relu, a, 0, 0.0).unwrap();
    let pending = s.try_send(call).ok().unwrap();
    drop(pending);
    let port = d.port(0).clone();
    let until = Instant::now() + Duration::from_secs(5);
    while port.tickets_in_use() > 0 && Instant::now() < until {
        port.drain();
        std::thread::yield_now();
    }
    assert_eq!(port.tickets_in_use(), 0);
    drop(s);
    d.shutdown();
}

/// NVRTC needs no GPU: wherever it is installed (CI installs the wheel's library), the kernels
/// must compile for the architectures we ship to.
#[test]
fn cuda_kernels_compile_with_nvrtc() {
    for (major, minor) in [(8, 0), (8, 9), (9, 0)] {
        let ptx = match cuda::compile_ptx(major, minor) {
            Ok(ptx) => ptx,
            Err(e) if e.contains("libnvrtc was not found") => {
                eprintln!("SKIPPED: {e}");
                return;
            }
            Err(e) => panic!("sm_{major}{minor}: {e}"),
        };
        let src = ptx.to_src();
        for kernel in cuda::KERNEL_NAMES {
            assert!(src.contains(&format!(".entry {kernel}(")), "sm_{major}{minor}: no {kernel} in the PTX");
        }
    }
}

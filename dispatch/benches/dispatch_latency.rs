//! Dispatch latency through the real rings and workers, and on CUDA the raw floor beside it.
//!
//! Protects: host dispatch P95 ≤ 5 µs for a 1,024-element add; CUDA launch-to-completion P95 of
//! a tiny kernel ≤ 15 µs and within 2× of the raw cudarc launch-plus-synchronize floor; and a large
//! matmul's rate against the device's measured FP32 peak. Results: perf/DISPATCH.md.
//!
//! `cargo bench -p tensor-wasm-dispatch --bench dispatch_latency` (CUDA parts run where a device is).
//! `DISPATCH_BENCH_ITERS` sets the samples per case (default 20,000).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tensor_wasm_dispatch::backend::cuda;
use tensor_wasm_dispatch::{BackendChoice, DispatchConfig, Dispatcher, Done, OnWorkerStart, Op, Session};

fn iters() -> usize {
    std::env::var("DISPATCH_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

fn tensor(s: &mut Session, shape: &[u32], value: f32) -> i32 {
    let n = shape.iter().product::<u32>() as usize;
    let call = s.upload(shape, vec![value; n]).unwrap();
    match s.call_blocking(call, far()).unwrap() {
        Done::Tensor(h) => h,
        d => panic!("{d:?}"),
    }
}

/// One `add` of two 1,024-element tensors, from the call to the new handle, then its free.
fn add_round_trip(s: &mut Session, a: i32, b: i32) -> Duration {
    let t = Instant::now();
    let call = s.kernel(Op::Add, a, b, 0.0).unwrap();
    let Done::Tensor(h) = s.call_blocking(call, far()).unwrap() else { unreachable!() };
    let d = t.elapsed();
    s.free(h).unwrap();
    d
}

/// Chain links per streamed chain: issue 34's host target is per op over 2,000 dependent adds.
const CHAIN: usize = 2_000;

/// A chain of `CHAIN` dependent streamed adds (x = x + y, each old x freed), then a sync: the
/// time per op, amortised. As the server's `wasm::tensor::mark` does, a sync goes on the ring after
/// every ring depth / 8 ops, and the one before it is waited for, so the ring never fills and a
/// free always finds room. The dispatch path alone, without the Wasm host call.
fn streamed_chain(s: &mut Session, x0: i32, y: i32) -> Duration {
    let every = s.dispatcher().config.ring_depth / 8;
    let t = Instant::now();
    let (mut x, mut mark) = (x0, None);
    for _ in 0..CHAIN {
        let mut call = s.kernel(Op::Add, x, y, 0.0).unwrap();
        let next = loop {
            match s.try_stream(call) {
                Ok(h) => break h,
                Err(back) => call = back,
            }
        };
        if x != x0 {
            s.free(x).unwrap();
        }
        x = next;
        if s.streamed_since_sync() >= every {
            if let Some(previous) = mark.take() {
                s.wait_blocking(previous, far()).unwrap();
            }
            let sync = s.sync().unwrap();
            mark = Some(s.try_send(sync).unwrap_or_else(|_| panic!("the ring has room")));
        }
    }
    if let Some(previous) = mark {
        s.wait_blocking(previous, far()).unwrap();
    }
    let sync = s.sync().unwrap();
    s.call_blocking(sync, far()).unwrap();
    let d = t.elapsed() / CHAIN as u32;
    s.free(x).unwrap();
    d
}

fn row(name: &str, h: &Histogram<u64>) -> String {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        h.len(),
        us(0.5),
        us(0.95),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    )
}

fn measure(n: usize, mut f: impl FnMut() -> Duration) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new(3).unwrap();
    for _ in 0..n / 10 {
        f(); // warm-up
    }
    for _ in 0..n {
        h.record(f().as_nanos() as u64).unwrap();
    }
    h
}

/// The add round trip on `dispatcher`, alone and with `load` other shards submitting adds to the
/// same devices at full speed.
fn dispatch_rows(label: &str, dispatcher: &Arc<Dispatcher>, load: usize, out: &mut Vec<String>) {
    let mut s = Session::new(dispatcher.clone(), 0, 1);
    let a = tensor(&mut s, &[1024], 1.5);
    let b = tensor(&mut s, &[1024], 2.5);
    out.push(row(&format!("{label}: add 1,024, idle"), &measure(iters(), || add_round_trip(&mut s, a, b))));
    // Calls 1 ms apart: the worker has parked (after `worker_spin`) before each, so each call pays
    // for waking it. The difference to the row above is what the worker's spin saves a call.
    let parked = measure(iters() / 20, || {
        std::thread::sleep(Duration::from_millis(1));
        add_round_trip(&mut s, a, b)
    });
    out.push(row(&format!("{label}: add 1,024, calls 1 ms apart (worker parked)"), &parked));
    let mut streamed = Session::new(dispatcher.clone(), 0, 3);
    let (x, y) = (tensor(&mut streamed, &[1024], 0.0), tensor(&mut streamed, &[1024], 1.0));
    streamed.set_streaming(true);
    let chains = measure((iters() / 200).max(10), || streamed_chain(&mut streamed, x, y));
    out.push(row(&format!("{label}: streamed chain of {CHAIN} adds of 1,024, per op"), &chains));
    drop(streamed);
    if load > 0 {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (1..=load)
            .map(|shard| {
                let (d, stop) = (dispatcher.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut s = Session::new(d, shard, 2);
                    let a = tensor(&mut s, &[1024], 1.0);
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        add_round_trip(&mut s, a, a);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let h = measure(iters(), || add_round_trip(&mut s, a, b));
        stop.store(true, Ordering::Relaxed);
        threads.into_iter().for_each(|t| t.join().unwrap());
        out.push(row(&format!("{label}: add 1,024, {load} other shards submitting"), &h));
    }
}

fn cuda_floor_and_peak(out: &mut Vec<String>, notes: &mut Vec<String>) -> Result<(), String> {
    use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
    let ctx = CudaContext::new(0).map_err(|e| e.to_string())?;
    let module = cuda::compile(&ctx)?;
    let add = module.load_function("tw_add").map_err(|e| e.to_string())?;
    let stream = ctx.new_stream().map_err(|e| e.to_string())?;
    let n = 1024u32;
    let a = stream.clone_htod(&vec![1.0f32; 1024]).map_err(|e| e.to_string())?;
    let mut o = stream.alloc_zeros::<f32>(1024).map_err(|e| e.to_string())?;
    let cfg = LaunchConfig { grid_dim: (4, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let h = measure(iters(), || {
        let t = Instant::now();
        // SAFETY: tw_add(a, b, out, n) with 1,024-element buffers.
        unsafe { stream.launch_builder(&add).arg(&a).arg(&a).arg(&mut o).arg(&n).launch(cfg) }.unwrap();
        stream.synchronize().unwrap();
        t.elapsed()
    });
    out.push(row("cuda raw floor: cudarc launch + stream synchronize, add 1,024", &h));

    // FP32 peak: eight independent FMA chains per thread, enough blocks to fill every SM.
    let peak = module.load_function("tw_fma_peak").map_err(|e| e.to_string())?;
    let sms = ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| e.to_string())? as u32;
    let (blocks, threads, iters) = (sms * 16, 256u32, 20_000u32);
    let mut sink = stream.alloc_zeros::<f32>(1).map_err(|e| e.to_string())?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        // SAFETY: tw_fma_peak(out, iters).
        unsafe { stream.launch_builder(&peak).arg(&mut sink).arg(&iters).launch(cfg) }.unwrap();
        stream.synchronize().unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let peak_flops = f64::from(blocks) * f64::from(threads) * f64::from(iters) * 8.0 * 2.0 / best;
    notes.push(format!("measured FP32 FMA peak: {:.1} TFLOP/s ({sms} SMs)", peak_flops / 1e12));

    // A large matmul through the dispatcher (cuBLAS sgemm on a worker stream).
    let d = Dispatcher::start(DispatchConfig {
        backend: BackendChoice::Cuda,
        tenant_quota_bytes: 8 << 30,
        max_tensor_elements: 1 << 28,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let mut s = Session::new(d.clone(), 0, 1);
    let n = 8192u32;
    let x = tensor(&mut s, &[n, n], 0.5);
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        let call = s.kernel(Op::Matmul, x, x, 0.0).unwrap();
        let Done::Tensor(h) = s.call_blocking(call, far()).unwrap() else { unreachable!() };
        best = best.min(t.elapsed().as_secs_f64());
        s.free(h).unwrap();
    }
    let rate = 2.0 * f64::from(n).powi(3) / best;
    notes.push(format!(
        "matmul {n}×{n}×{n} f32 through the dispatcher (cuBLAS sgemm, best of 4 after a warm-up): {:.1} TFLOP/s, {:.0}% of the measured FP32 peak",
        rate / 1e12,
        100.0 * rate / peak_flops
    ));
    drop(s);
    d.shutdown();
    Ok(())
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET is given a CPU the kernel listed, and
    // sched_setaffinity only reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The bench's thread on the first allowed CPU and each device worker on one of the next, as the
/// server places a shard and its workers when it has a CPU for each (`cpu::placement`): floating,
/// a worker now and then shares the submitting thread's CPU and a case measures the scheduler.
/// Everything floats where there are too few CPUs.
fn pinned_apart(config: DispatchConfig, allowed: &[usize]) -> DispatchConfig {
    let allowed = allowed.to_vec();
    let hook = move |device: usize, workers: usize| {
        if allowed.len() > workers {
            pin(allowed[1 + device]);
        }
    };
    DispatchConfig { on_worker_start: Some(OnWorkerStart(Arc::new(hook))), ..config }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let mut rows = vec![
        "| case | samples | P50 µs | P95 µs | P99 µs | P99.9 µs | max µs |".to_string(),
        "| --- | --- | --- | --- | --- | --- | --- |".to_string(),
    ];
    let mut notes = Vec::new();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let load = (cpus.saturating_sub(2)).min(4);
    let shards = load + 1;

    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    let allowed: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    };
    if allowed.len() > 1 {
        pin(allowed[0]);
    }
    let config = |backend| pinned_apart(DispatchConfig { backend, shards, ..Default::default() }, &allowed);
    let host = Dispatcher::start(config(BackendChoice::Host)).unwrap();
    dispatch_rows("host", &host, load, &mut rows);
    host.shutdown();

    if cuda::driver_present() {
        match Dispatcher::start(config(BackendChoice::Cuda)) {
            Ok(d) => {
                notes.push(format!("device: {}", d.devices[0].name));
                dispatch_rows("cuda", &d, load, &mut rows);
                d.shutdown();
                if let Err(e) = cuda_floor_and_peak(&mut rows, &mut notes) {
                    notes.push(format!("CUDA floor and peak failed: {e}"));
                }
            }
            Err(e) => notes.push(format!("CUDA skipped: {e}")),
        }
    } else {
        notes.push("CUDA skipped: no NVIDIA driver on this host".into());
    }
    println!("{}", rows.join("\n"));
    println!();
    for n in notes {
        println!("- {n}");
    }
}

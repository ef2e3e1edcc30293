//! What one invocation costs on a shard, below HTTP:
//!
//! - instantiating from an `InstancePre` with the pooling allocator (a fresh store each time);
//! - a whole hello invoke through `tensor_wasm::guest::invoke` (store, instantiate, `_start`, drop),
//!   on a pinned monoio executor, as a shard runs it;
//! - the same for a WASI guest that echoes a small JSON body through stdin and stdout;
//! - the Rust guest `json-stats` with the json scenario's body, ours and the way the baseline
//!   server runs it (on-demand allocator, linked and instantiated per request).
//!
//! Protects: instantiation P99 ≤ 5 µs, and a hello invoke well under the 20 µs of server CPU a
//! whole HTTP invoke may cost (perf/CORE.md). The json-stats pair says how much of a JSON
//! request is the guest's own work, which both servers pay: the ceiling on how far ahead of
//! the baseline a faster server can get on that scenario (perf/HISTORY.md, "How much of a JSON request is the guest's").
//!
//! `cargo bench -p tensor-wasm-bench --bench instantiate`

use std::sync::Arc;
use std::time::{Duration, Instant};

use tensor_wasm::guest::{
    build_engine, check_module, invoke, new_linker, Entry, GuestProfiler, GuestState, InvokeLimits, WasiArgs,
};
use tensor_wasm_bench::{histogram, pin_like_a_shard, record, row, TABLE_HEAD};
use wasmtime::Store;

const WARMUP: usize = 20_000;
const ROUNDS: usize = 200_000;

const ECHO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start") (local $n i32)
    (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 65536))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (i32.store (i32.const 16) (i32.const 1024)) (i32.store (i32.const 20) (local.get $n))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#;

fn main() {
    pin_like_a_shard();
    let limits = tensor_wasm_bench::default_limits();
    let engine = build_engine(&limits, GuestProfiler::Off).expect("engine");
    let linker = new_linker(&engine).expect("linker");
    let shape = limits.module_shape;
    let hello =
        check_module(&engine, &linker, &wat::parse_str(r#"(module (func (export "_start")))"#).unwrap(), &shape)
            .unwrap();
    let echo = check_module(&engine, &linker, &wat::parse_str(ECHO).unwrap(), &shape).unwrap();
    let json_wasm =
        tensor_wasm_bench::harness::guests::GuestSource::Build.rust_guest("json-stats").expect("json-stats");
    let json_module = check_module(&engine, &linker, &json_wasm, &shape).unwrap();
    let json_pre = linker.instantiate_pre(&json_module).unwrap();
    let json_body = tensor_wasm_bench::harness::guests::json_stats_body();
    let hello_pre = linker.instantiate_pre(&hello).unwrap();
    let echo_pre = linker.instantiate_pre(&echo).unwrap();
    let wasi = Arc::new(WasiArgs::new(&["bench"], &[]));
    let invoke_limits = InvokeLimits {
        timeout: Duration::from_secs(5),
        memory_limit_mb: limits.default_memory_limit_mb,
        max_output_bytes: limits.max_output_bytes,
        max_stderr_bytes: limits.max_stderr_bytes,
        slice: limits.guest_slice(),
        max_table_elements: limits.module_shape.max_table_elements,
    };
    let _ticker = tensor_wasm::guest::EpochTicker::start(
        engine.clone(),
        Duration::from_millis(limits.epoch_tick_ms),
        limits.guest_slice(),
    )
    .unwrap();

    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("runtime");
    let inst = rt.block_on(async {
        let mut inst = histogram();
        for i in 0..WARMUP + ROUNDS {
            let mut store = Store::new(&engine, GuestState::new(wasi.clone(), Vec::new(), invoke_limits));
            store.set_epoch_deadline(1_000);
            let t = Instant::now();
            let instance = hello_pre.instantiate_async(&mut store).await.unwrap();
            let took = t.elapsed();
            std::hint::black_box(instance);
            drop(store);
            if i >= WARMUP {
                record(&mut inst, took);
            }
        }
        inst
    });
    let hello_h = rt.block_on(timed(ROUNDS, || async {
        let out = invoke(&engine, &hello_pre, wasi.clone(), Vec::new(), Entry::Start, invoke_limits, None).await;
        assert!(out.outcome.is_ok());
    }));
    let body = br#"{"values":[1,2,3],"label":"bench"}"#.to_vec();
    let echo_h = rt.block_on(timed(ROUNDS, || async {
        let out = invoke(&engine, &echo_pre, wasi.clone(), body.clone(), Entry::Start, invoke_limits, None).await;
        assert_eq!(out.outcome.unwrap().stdout, body);
    }));
    let json_ours = rt.block_on(timed(JSON_ROUNDS, || async {
        let out = invoke(&engine, &json_pre, wasi.clone(), json_body.clone(), Entry::Start, invoke_limits, None).await;
        assert!(out.outcome.unwrap().stdout.starts_with(b"{"));
    }));
    let baseline_engine = tensor_wasm_bench::baseline::engine().expect("engine");
    let baseline_linker = new_linker(&baseline_engine).expect("linker");
    let baseline_module = check_module(&baseline_engine, &baseline_linker, &json_wasm, &shape).unwrap();
    let _baseline_ticker = tensor_wasm::guest::EpochTicker::start(
        baseline_engine.clone(),
        Duration::from_millis(10),
        Duration::from_millis(10),
    )
    .unwrap();
    let json_baseline = rt.block_on(timed(JSON_ROUNDS, || async {
        let (outcome, store) = tensor_wasm_bench::baseline::run_fresh_instance(
            &baseline_engine,
            &baseline_linker,
            &baseline_module,
            wasi.clone(),
            json_body.clone(),
        )
        .await;
        outcome.unwrap();
        assert!(store.data().stdout().starts_with(b"{"));
    }));
    println!("{TABLE_HEAD}");
    println!("{}", row("instantiate (InstancePre, pooling, CoW)", &inst));
    println!("{}", row("hello invoke: store + instantiate + _start + drop", &hello_h));
    println!("{}", row("echo invoke: the same + 34 B stdin→stdout", &echo_h));
    println!("{}", row("json-stats invoke, ours (the json scenario's body)", &json_ours));
    println!("{}", row("json-stats invoke, the baseline's way (link + instantiate, on demand)", &json_baseline));
}

/// The Rust guest runs far longer than the WAT ones: fewer rounds keep the bench short.
const JSON_ROUNDS: usize = 20_000;

/// Times `rounds` runs of `one` after a tenth as many unrecorded ones (for `ROUNDS`, `WARMUP`).
async fn timed<F: std::future::Future<Output = ()>>(
    rounds: usize,
    one: impl Fn() -> F,
) -> hdrhistogram::Histogram<u64> {
    let mut h = histogram();
    for i in 0..rounds / 10 + rounds {
        let t = Instant::now();
        one().await;
        if i >= rounds / 10 {
            record(&mut h, t.elapsed());
        }
    }
    h
}

//! What one invocation costs on a shard, below HTTP:
//!
//! - instantiating from an `InstancePre` with the pooling allocator (a fresh store each time);
//! - a whole hello invoke through `tensor_wasm::wasm::invoke` (store, instantiate, `_start`, drop),
//!   on a pinned monoio executor, as a shard runs it;
//! - the same for a WASI guest that echoes a small JSON body through stdin and stdout.
//!
//! Protects: instantiation P99 ≤ 5 µs, and a hello invoke well under the 20 µs of server CPU a
//! whole HTTP invoke may cost (perf/CORE.md).
//!
//! `cargo bench -p tensor-wasm-bench --bench instantiate`

use std::sync::Arc;
use std::time::{Duration, Instant};

use tensor_wasm::wasm::{build_engine, check_module, invoke, new_linker, Entry, GuestState, InvokeLimits, WasiArgs};
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
    let engine = build_engine(&limits).expect("engine");
    let linker = new_linker(&engine).expect("linker");
    let hello =
        check_module(&engine, &linker, &wat::parse_str(r#"(module (func (export "_start")))"#).unwrap()).unwrap();
    let echo = check_module(&engine, &linker, &wat::parse_str(ECHO).unwrap()).unwrap();
    let hello_pre = linker.instantiate_pre(&hello).unwrap();
    let echo_pre = linker.instantiate_pre(&echo).unwrap();
    let wasi = Arc::new(WasiArgs::new(&["bench"], &[]));
    let invoke_limits = InvokeLimits {
        timeout: Duration::from_secs(5),
        memory_limit_mb: limits.default_memory_limit_mb,
        max_output_bytes: limits.max_output_bytes,
        max_stderr_bytes: limits.max_stderr_bytes,
    };
    let _ticker =
        tensor_wasm::wasm::EpochTicker::start(engine.clone(), Duration::from_millis(limits.epoch_tick_ms)).unwrap();

    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("runtime");
    let (inst, hello_h, echo_h) = rt.block_on(async {
        let mut inst = histogram();
        let mut hello_h = histogram();
        let mut echo_h = histogram();
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
        for i in 0..WARMUP + ROUNDS {
            let t = Instant::now();
            let out = invoke(&engine, &hello_pre, wasi.clone(), Vec::new(), Entry::Start, invoke_limits, None).await;
            let took = t.elapsed();
            assert!(out.outcome.is_ok());
            if i >= WARMUP {
                record(&mut hello_h, took);
            }
        }
        let body = br#"{"values":[1,2,3],"label":"bench"}"#.to_vec();
        for i in 0..WARMUP + ROUNDS {
            let t = Instant::now();
            let out = invoke(&engine, &echo_pre, wasi.clone(), body.clone(), Entry::Start, invoke_limits, None).await;
            let took = t.elapsed();
            assert_eq!(out.outcome.unwrap().stdout, body);
            if i >= WARMUP {
                record(&mut echo_h, took);
            }
        }
        (inst, hello_h, echo_h)
    });
    println!("{TABLE_HEAD}");
    println!("{}", row("instantiate (InstancePre, pooling, CoW)", &inst));
    println!("{}", row("hello invoke: store + instantiate + _start + drop", &hello_h));
    println!("{}", row("echo invoke: the same + 34 B stdin→stdout", &echo_h));
}

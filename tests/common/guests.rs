//! Guests: WAT compiled with the `wat` crate, and a Rust guest built for wasm32-wasip1 at test time.

use std::sync::OnceLock;

pub fn wasm(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("valid WAT")
}

const WASI: &str = r#"
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
"#;

/// The seed's hello.wasm: an empty `_start`.
pub fn hello() -> Vec<u8> {
    wasm(r#"(module (func (export "_start")))"#)
}

/// Copies stdin to stdout, 64 KiB at a time.
pub fn echo() -> Vec<u8> {
    wasm(&format!(
        r#"(module {WASI}
  (memory (export "memory") 2)
  (func (export "_start") (local $n i32)
    (block $done
      (loop $again
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (i32.const 65536))
        (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $done (i32.eqz (local.get $n)))
        (i32.store (i32.const 16) (i32.const 1024))
        (i32.store (i32.const 20) (local.get $n))
        (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
        (br $again)))))"#
    ))
}

/// Writes `text` to stdout in two iovecs of one fd_write call, then `text2` to stderr, then exits
/// with `code`.
pub fn write_and_exit(text: &str, stderr: &str, code: i32) -> Vec<u8> {
    let (a, b) = text.split_at(text.len() / 2);
    let data = |s: &str| s.bytes().map(|b| format!("\\{b:02x}")).collect::<String>();
    wasm(&format!(
        r#"(module {WASI}
  (memory (export "memory") 1)
  (data (i32.const 256) "{a}")
  (data (i32.const 512) "{b}")
  (data (i32.const 768) "{e}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 256)) (i32.store (i32.const 4) (i32.const {la}))
    (i32.store (i32.const 8) (i32.const 512)) (i32.store (i32.const 12) (i32.const {lb}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 2) (i32.const 32)))
    (i32.store (i32.const 0) (i32.const 768)) (i32.store (i32.const 4) (i32.const {le}))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 32)))
    (call $proc_exit (i32.const {code}))))"#,
        a = data(a),
        b = data(b),
        e = data(stderr),
        la = a.len(),
        lb = b.len(),
        le = stderr.len(),
    ))
}

/// Spins forever without a host call.
pub fn infinite_loop() -> Vec<u8> {
    wasm(r#"(module (func (export "_start") (loop $l (br $l))))"#)
}

/// Busy for `ms` milliseconds of monotonic time, then writes `{"done":true}`.
pub fn busy(ms: u64) -> Vec<u8> {
    busy_then_write(ms, r#"{"done":true}"#)
}

/// Busy for `ms` milliseconds of monotonic time, then writes `out` to stdout.
pub fn busy_then_write(ms: u64, out: &str) -> Vec<u8> {
    wasm(&format!(
        r#"(module {WASI}
  (memory (export "memory") 1)
  (data (i32.const 256) "{out_esc}")
  (func (export "_start") (local $start i64)
    (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
    (local.set $start (i64.load (i32.const 0)))
    (loop $l
      (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
      (br_if $l (i64.lt_u (i64.sub (i64.load (i32.const 0)) (local.get $start)) (i64.const {ns}))))
    (i32.store (i32.const 16) (i32.const 256)) (i32.store (i32.const 20) (i32.const {len}))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#,
        out_esc = out.replace('"', "\\\""),
        ns = ms * 1_000_000,
        len = out.len(),
    ))
}

pub fn trap() -> Vec<u8> {
    wasm(r#"(module (func (export "_start") unreachable))"#)
}

pub fn deep_recursion() -> Vec<u8> {
    wasm(r#"(module (func $f (export "_start") (call $f)))"#)
}

/// Grows its memory 1 MiB at a time, forever.
pub fn memory_hog() -> Vec<u8> {
    wasm(r#"(module (memory 1) (func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l))))"#)
}

/// Writes 64 KiB to stdout, forever.
pub fn stdout_flood() -> Vec<u8> {
    wasm(&format!(
        r#"(module {WASI}
  (memory (export "memory") 2)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 65536))
    (loop $l (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))) (br $l))))"#
    ))
}

/// Writes 64 KiB to stderr `times` times (`u32::MAX`: until stopped), then exits 0.
pub fn stderr_flood(times: u32) -> Vec<u8> {
    wasm(&format!(
        r#"(module {WASI}
  (memory (export "memory") 2)
  (func (export "_start") (local $n i32)
    (local.set $n (i32.const {times}))
    (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 65536))
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $n)))
        (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $l)))))"#,
        times = times as i32
    ))
}

/// No `_start`: exports `add(i32, i32) -> i32` and `scale(f64) -> f64`.
pub fn arithmetic() -> Vec<u8> {
    wasm(
        r#"(module
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "scale") (param f64) (result f64) (f64.mul (local.get 0) (f64.const 2.5))))"#,
    )
}

pub fn env_import() -> Vec<u8> {
    wasm(r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#)
}

pub fn mismatched_wasi_import() -> Vec<u8> {
    wasm(r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32))) (func (export "_start")))"#)
}

/// The Rust guest in tests/guests/json-stats, built once per test binary for wasm32-wasip1.
pub fn rust_json_stats() -> Vec<u8> {
    static BUILT: OnceLock<Vec<u8>> = OnceLock::new();
    BUILT.get_or_init(|| crate_guest("tests/guests/json-stats", "json-stats")).clone()
}

/// The example tensor guest in tests/guests/tensor-ops (docs/ABI.md).
pub fn rust_tensor_ops() -> Vec<u8> {
    static BUILT: OnceLock<Vec<u8>> = OnceLock::new();
    BUILT.get_or_init(|| crate_guest("tests/guests/tensor-ops", "tensor-ops")).clone()
}

/// The digits classifier of examples/digits (its README), built from its own crate.
pub fn digits_example() -> Vec<u8> {
    static BUILT: OnceLock<Vec<u8>> = OnceLock::new();
    BUILT.get_or_init(|| crate_guest("examples/digits/guest", "digits")).clone()
}

/// The transformer encoder block of examples/encoder (its README), built from its own crate.
pub fn encoder_example() -> Vec<u8> {
    static BUILT: OnceLock<Vec<u8>> = OnceLock::new();
    BUILT.get_or_init(|| crate_guest("examples/encoder/guest", "encoder")).clone()
}

/// A module of tests/guests/fiso-modules, written for Fiso's JSON envelope ABI: `validate`,
/// `enrich` (the seed's Go example) or `transform`.
pub fn fiso_module(bin: &str) -> Vec<u8> {
    static BUILT: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| build("tests/guests/fiso-modules", "fiso-modules"));
    std::fs::read(dir.join(format!("{bin}.wasm"))).expect("fiso module wasm")
}

#[path = "../guests/cargo_build.rs"]
mod cargo_build;

/// Builds the guest crate in `folder` of the repository; returns the folder of its binaries.
fn build(folder: &str, name: &str) -> std::path::PathBuf {
    cargo_build::build_crate(env!("CARGO_MANIFEST_DIR").as_ref(), folder, name).unwrap_or_else(|e| panic!("{e}"))
}

/// Builds the guest crate in `folder` of the repository; returns its binary `NAME.wasm`.
fn crate_guest(folder: &str, name: &str) -> Vec<u8> {
    let wasm = build(folder, name).join(format!("{name}.wasm"));
    std::fs::read(&wasm).unwrap_or_else(|e| panic!("{}: {e}", wasm.display()))
}

/// Imports of the tensor ABI, for WAT guests.
pub const TENSOR: &str = r#"
  (import "tensor_wasm" "tensor_create" (func $create (param i32 i32 i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_read" (func $read (param i32 i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_free" (func $free (param i32) (result i32)))
  (import "tensor_wasm" "tensor_matmul" (func $matmul (param i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_add" (func $add (param i32 i32) (result i32)))
  (import "tensor_wasm" "tensor_last_error" (func $last_error (param i32 i32) (result i32)))
"#;

/// Calls with raw arguments, for the ABI's edge cases: exports `create(shape_ptr, rank, data_ptr,
/// len) -> code`, `read(h, ptr, len) -> code`, `add(a, b)`, `free(h)`, and `matmul_loop(n, times)`,
/// which makes an n×n tensor and multiplies it by itself `times` times, returning the last code.
pub fn tensor_abi() -> Vec<u8> {
    wasm(&format!(
        r#"(module {TENSOR}
  (memory (export "memory") 64)
  (func (export "create") (param i32 i32 i32 i32) (result i32)
    (call $create (i32.const 0) (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
  (func (export "create_dtype") (param i32) (result i32)
    (i32.store (i32.const 0) (i32.const 1))
    (call $create (local.get 0) (i32.const 0) (i32.const 1) (i32.const 16) (i32.const 4)))
  (func (export "read") (param i32 i32 i32) (result i32) (call $read (local.get 0) (local.get 1) (local.get 2)))
  (func (export "add") (param i32 i32) (result i32) (call $add (local.get 0) (local.get 1)))
  (func (export "free") (param i32) (result i32) (call $free (local.get 0)))
  (func (export "error_len") (result i32) (call $last_error (i32.const 0) (i32.const 0)))
  (func (export "matmul_loop") (param $n i32) (param $times i32) (result i32) (local $h i32) (local $r i32)
    (i32.store (i32.const 0) (local.get $n))
    (i32.store (i32.const 4) (local.get $n))
    (local.set $h (call $create (i32.const 0) (i32.const 0) (i32.const 2) (i32.const 1024)
      (i32.mul (i32.const 4) (i32.mul (local.get $n) (local.get $n)))))
    (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (local.get $h))))
    (block $done
      (loop $again
        (br_if $done (i32.eqz (local.get $times)))
        (local.set $r (call $matmul (local.get $h) (local.get $h)))
        (br_if $done (i32.lt_s (local.get $r) (i32.const 0)))
        (local.set $times (i32.sub (local.get $times) (i32.const 1)))
        (br $again)))
    (local.get $r)))"#
    ))
}

/// A hello whose compile takes a while (a few thousand small functions): deploys of it that start
/// together are still compiling when the first of them publishes. `variant` makes its bytes, and
/// so its digest, differ.
pub fn slow_to_compile(variant: u32) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut text = String::from("(module\n");
    for i in 0..3000u32 {
        let _ = writeln!(
            text,
            "(func $f{i} (param i32) (result i32) (i32.add (i32.mul (local.get 0) (i32.const {k})) \
             (i32.xor (local.get 0) (i32.const {i}))))",
            k = variant.wrapping_mul(7919).wrapping_add(i)
        );
    }
    text.push_str("(func (export \"_start\")))");
    wasm(&text)
}

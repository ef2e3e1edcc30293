//! The guests the scenarios deploy: WAT for the trivial ones, and the repository's Rust guests,
//! built for wasm32-wasip1 on first use (or taken prebuilt from a folder).

use std::path::{Path, PathBuf};

/// The seed's hello.wasm: an empty `_start`.
pub fn hello() -> Vec<u8> {
    wat::parse_str(r#"(module (func (export "_start")))"#).expect("valid WAT")
}

/// A hello whose bytes differ for every `n`, so that each deploy of the storm compiles anew.
pub fn unique_hello(n: u64) -> Vec<u8> {
    wat::parse_str(format!(r#"(module (memory 1) (data (i32.const 0) "storm-{n}") (func (export "_start")))"#))
        .expect("valid WAT")
}

/// Spins `iterations` times through a loop of integer work, then exits: CPU-bound, with no host
/// call, so only the epoch deadline and yields interrupt it.
pub fn spin(iterations: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module (func (export "_start") (local $i i32) (local $x i32)
  (loop $l
    (local.set $x (i32.add (i32.mul (local.get $x) (i32.const 1664525)) (i32.const 1013904223)))
    (local.set $i (i32.add (local.get $i) (i32.const 1)))
    (br_if $l (i32.lt_u (local.get $i) (i32.const {iterations}))))
  (if (i32.eq (local.get $x) (i32.const 7)) (then unreachable))))"#
    ))
    .expect("valid WAT")
}

/// Never returns on its own: a loop with no host call, which only the epoch deadline ends.
pub fn infinite_loop() -> Vec<u8> {
    wat::parse_str(r#"(module (func (export "_start") (loop $l (br $l))))"#).expect("valid WAT")
}

/// Calls `random_get` over all of its `pages` of memory, again and again: host work in proportion
/// to a length the guest chose, which the host does in chunks and stops at the deadline.
pub fn random_get_loop(pages: u64) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (memory (export "memory") {pages})
  (func (export "_start") (loop $l (drop (call $random_get (i32.const 0) (i32.const {bytes}))) (br $l))))"#,
        bytes = pages * 65536
    ))
    .expect("valid WAT")
}

/// Fills all of its `pages` of memory with one `memory.fill`, again and again: one instruction,
/// which wasmtime runs as a libcall that nothing interrupts unless the server cuts it into
/// chunks before compiling (`wasm::bulk_memory`).
pub fn memory_fill_loop(pages: u64) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (memory (export "memory") {pages})
  (func (export "_start") (loop $l (memory.fill (i32.const 0) (i32.const 90) (i32.const {bytes})) (br $l))))"#,
        bytes = pages * 65536
    ))
    .expect("valid WAT")
}

/// A module of `functions` small functions (ten instructions each) and an empty `_start`: cheap to
/// send, costly to compile (tests/hostile.rs's `module_of`).
pub fn many_functions(functions: usize) -> Vec<u8> {
    let body = "(drop (i32.const 0))".repeat(10);
    let funcs = (0..functions).map(|_| format!("(func {body})")).collect::<String>();
    wat::parse_str(format!(r#"(module {funcs} (func (export "_start")))"#)).expect("valid WAT")
}

/// The json scenario's request body for `json-stats`: 64 numbers and a label (about 400 bytes).
pub fn json_stats_body() -> Vec<u8> {
    let body = serde_json::json!({
        "values": (0..64).map(|i| i as f64 * 1.5).collect::<Vec<_>>(),
        "label": "tensor-wasm-bench",
    });
    body.to_string().into_bytes()
}

/// Where the Rust guests come from.
#[derive(Clone, Debug)]
pub enum GuestSource {
    /// `NAME.wasm` files in this folder.
    Prebuilt(PathBuf),
    /// Built from `tests/guests/NAME` or `examples/NAME/guest` of this repository, with cargo.
    Build,
}

impl GuestSource {
    /// The module of the Rust guest `name` (`json-stats` or `tensor-ops`).
    pub fn rust_guest(&self, name: &str) -> Result<Vec<u8>, String> {
        self.load(name, &format!("tests/guests/{name}"))
    }

    /// The guest of the example `name` (`examples/NAME/guest`, whose binary is `NAME.wasm`).
    pub fn example(&self, name: &str) -> Result<Vec<u8>, String> {
        self.load(name, &format!("examples/{name}/guest"))
    }

    /// `NAME.wasm`, prebuilt or built from the crate in `folder` of this repository.
    fn load(&self, name: &str, folder: &str) -> Result<Vec<u8>, String> {
        let path = match self {
            GuestSource::Prebuilt(dir) => dir.join(format!("{name}.wasm")),
            GuestSource::Build => {
                let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                let built = cargo_build::build_crate(&repo, folder, name).map_err(|e| {
                    format!("{e}: run the harness from its repository, or give --guests-dir with {name}.wasm")
                })?;
                built.join(format!("{name}.wasm"))
            }
        };
        std::fs::read(&path).map_err(|e| format!("cannot read the guest {}: {e}", path.display()))
    }
}

#[path = "../../../tests/guests/cargo_build.rs"]
mod cargo_build;

//! WebAssembly execution: one process-wide [`Engine`](wasmtime::Engine) with the pooling allocator,
//! a WASI preview-1 subset written for this runtime, and the per-invocation store and instance.

pub mod bulk_memory;
pub mod compile;
pub mod engine;
pub mod envelope;
pub mod invoke;
pub mod module;
pub mod state;
pub mod tensor;
pub mod wasi;

pub use engine::{build_engine, EpochTicker};
pub use invoke::{invoke, release_memory, Entry, InvokeOutput};
pub use module::{check_module, new_linker};
pub use state::{GuestState, InvokeLimits, TensorContext, WasiArgs};

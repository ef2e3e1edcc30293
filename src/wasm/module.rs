//! Checking a module at deploy time: that it compiles, imports only what the runtime provides, and
//! has a usable entry point. Everything refused here is a 400 with a precise kind.

use wasmtime::{Engine, ExternType, Linker, Module};

use super::{tensor, wasi, GuestState};
use crate::error::ApiError;

/// A linker with everything a guest may import. One per shard, plus one per catalog worker.
pub fn new_linker(engine: &Engine) -> wasmtime::Result<Linker<GuestState>> {
    let mut linker = Linker::new(engine);
    wasi::add_to_linker(&mut linker, engine)?;
    tensor::add_to_linker(&mut linker)?;
    Ok(linker)
}

pub use crate::config::ModuleShape;

/// Reads the module's sections, without compiling, and refuses one over `shape`. Stops at the
/// first limit passed, so an oversized module costs a scan of its section headers at most.
pub fn check_shape(wasm: &[u8], shape: &ModuleShape) -> Result<(), ApiError> {
    use wasmparser::Payload;
    let invalid = |e: wasmparser::BinaryReaderError| ApiError::InvalidModule(e.to_string());
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload.map_err(invalid)? {
            Payload::FunctionSection(functions) if functions.count() > shape.max_functions => {
                return Err(ApiError::TooManyFunctions { count: functions.count(), limit: shape.max_functions });
            }
            Payload::CodeSectionStart { size, .. } if u64::from(size) > shape.max_code_bytes => {
                return Err(ApiError::CodeTooLarge { bytes: size.into(), limit: shape.max_code_bytes });
            }
            Payload::CodeSectionEntry(body) => {
                let bytes = body.range().len();
                if bytes > shape.max_function_body_bytes as usize {
                    return Err(ApiError::FunctionTooLarge { bytes, limit: shape.max_function_body_bytes });
                }
            }
            // The instance pool holds no more and no larger tables or memories: past either,
            // loading the module fails.
            Payload::TableSection(tables) if tables.count() as usize > ModuleShape::MAX_TABLES => {
                return Err(ApiError::TooManyTables { count: tables.count() as usize, limit: ModuleShape::MAX_TABLES });
            }
            Payload::MemorySection(memories) if memories.count() as usize > ModuleShape::MAX_MEMORIES => {
                let count = memories.count() as usize;
                return Err(ApiError::TooManyMemories { count, limit: ModuleShape::MAX_MEMORIES });
            }
            Payload::MemorySection(memories) => {
                for memory in memories {
                    let memory = memory.map_err(invalid)?;
                    let bytes = memory.initial.saturating_mul(1 << memory.page_size_log2.unwrap_or(16));
                    if bytes > u64::from(shape.max_memory_limit_mb) * 1024 * 1024 {
                        return Err(ApiError::MemoryTooLarge { bytes, limit_mb: shape.max_memory_limit_mb });
                    }
                }
            }
            Payload::TableSection(tables) => {
                for table in tables {
                    let elements = table.map_err(invalid)?.ty.initial;
                    if elements > shape.max_table_elements as u64 {
                        return Err(ApiError::TableTooLarge { elements, limit: shape.max_table_elements });
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks `wasm`'s shape, validates and compiles it, then checks its imports and entry point
/// against `linker`.
pub fn check_module(
    engine: &Engine,
    linker: &Linker<GuestState>,
    wasm: &[u8],
    shape: &ModuleShape,
) -> Result<Module, ApiError> {
    check_shape(wasm, shape)?;
    let wasm = super::bulk_memory::prepare(engine, wasm).map_err(ApiError::InvalidModule)?;
    let module = Module::new(engine, &wasm).map_err(|e| ApiError::InvalidModule(format!("{e:#}")))?;
    check_compiled(linker, &module)?;
    Ok(module)
}

/// [`check_module`], with the compile in a child process within `budget` (`wasm::compile`).
pub fn check_module_in_child(
    engine: &Engine,
    linker: &Linker<GuestState>,
    wasm: &[u8],
    shape: &ModuleShape,
    budget: super::compile::CompileBudget,
    profiler: crate::config::GuestProfiler,
) -> Result<Module, ApiError> {
    check_shape(wasm, shape)?;
    let module = super::compile::compile_in_child(engine, wasm, budget, profiler)?;
    check_compiled(linker, &module)?;
    Ok(module)
}

/// Whether the module calls the tensor ABI: only such invocations get a dispatch session.
pub fn uses_tensors(module: &Module) -> bool {
    module.imports().any(|i| i.module() == tensor::MODULE)
}

/// The checks that do not need compiling again: used for artifacts loaded from disk too.
pub fn check_compiled(linker: &Linker<GuestState>, module: &Module) -> Result<(), ApiError> {
    for import in module.imports() {
        let kind = match import.ty() {
            ExternType::Func(_) => "function",
            ExternType::Memory(_) => "memory",
            ExternType::Table(_) => "table",
            ExternType::Global(_) => "global",
            ExternType::Tag(_) => "tag",
        };
        let provided = matches!(import.ty(), ExternType::Func(_))
            && match import.module() {
                wasi::MODULE => wasi::provides(import.name()),
                tensor::MODULE => tensor::provides(import.name()),
                _ => false,
            };
        if !provided {
            return Err(ApiError::UnsupportedImport(format!(
                "the module imports {kind} `{}::{}`, which the runtime does not provide \
                 (it provides the functions of `{}` and `{}`)",
                import.module(),
                import.name(),
                wasi::MODULE,
                tensor::MODULE
            )));
        }
    }
    linker.instantiate_pre(module).map_err(|e| ApiError::ImportMismatch(format!("{e:#}")))?;
    if let Some(start) = module.get_export("_start") {
        let ok = matches!(&start, ExternType::Func(f) if f.params().len() == 0 && f.results().len() == 0);
        if !ok {
            return Err(ApiError::InvalidModule(
                "`_start` must be a function with no parameters and no results".into(),
            ));
        }
    }
    Ok(())
}

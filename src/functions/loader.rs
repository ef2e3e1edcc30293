//! Turning a module's digest into a compiled module: from its precompiled artifact when that is
//! intact, else by compiling its bytes within the deploy's budget. At start-up many digests are
//! loaded at once, on `--load-threads` threads, so that a restart without artifacts (an
//! upgrade of wasmtime, a restored backup) compiles the store in parallel rather than one module
//! after another.
//!
//! Nothing here trusts a file it did not check: a module's bytes are hashed against their digest
//! before they are compiled or counted as stored, and an artifact's checksum before wasmtime
//! deserializes it (`store`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use wasmtime::{Engine, Linker, Module};

use super::store::{describe, FunctionStore};
use crate::config::GuestProfiler;
use crate::error::ApiError;
use crate::wasm::compile::CompileBudget;
use crate::wasm::module::{check_compiled, check_module, check_module_in_child, ModuleShape};
use crate::wasm::GuestState;

/// What loading and compiling a module needs; shared by the loading threads.
pub struct ModuleLoader<'a> {
    pub engine: &'a Engine,
    pub linker: &'a Linker<GuestState>,
    pub store: &'a FunctionStore,
    pub shape: ModuleShape,
    /// `None`: compile in-process (`config::Limits::compile_budget`).
    pub budget: Option<CompileBudget>,
    pub profiler: GuestProfiler,
}

/// One stored module, loaded or not.
pub struct Loaded {
    /// The module, or why its functions cannot run (shown as their `reason`).
    pub module: Result<Module, String>,
    /// It had no usable artifact and was compiled again.
    pub compiled: bool,
    /// Its file is missing or corrupt while its artifact is intact: its functions run, and the
    /// next deploy of the same bytes rewrites the file.
    pub damaged: bool,
    /// Its compile ran out of time or could not start: a retry may succeed.
    pub transient: bool,
}

/// Checks and compiles a tenant's `wasm`: in a child process within `budget` where there is one
/// (the server), else in-process (`config::Limits::compile_budget`).
pub fn compile(
    engine: &Engine,
    linker: &Linker<GuestState>,
    wasm: &[u8],
    (shape, budget): (&ModuleShape, Option<CompileBudget>),
    profiler: GuestProfiler,
) -> Result<Module, ApiError> {
    match budget {
        Some(budget) => check_module_in_child(engine, linker, wasm, shape, budget, profiler),
        None => check_module(engine, linker, wasm, shape),
    }
}

impl ModuleLoader<'_> {
    /// [`compile`] with this loader's engine, limits and profiler.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, ApiError> {
        compile(self.engine, self.linker, wasm, (&self.shape, self.budget), self.profiler)
    }

    /// The module from its precompiled artifact, if that is present, intact and still accepted.
    pub fn load_artifact(&self, digest: &str) -> Option<Module> {
        let bytes = match self.store.read_artifact(digest) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(digest, "artifact unreadable or corrupt: {e}");
                return None;
            }
        };
        // SAFETY: the bytes are wasmtime's own serialisation, written by this program and
        // verified against their SHA-256 just now; wasmtime itself rejects artifacts of another
        // version or configuration.
        match unsafe { Module::deserialize(self.engine, &bytes) } {
            Ok(m) if check_compiled(self.linker, &m).is_ok() => Some(m),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(digest, "artifact not usable: {e:#}");
                None
            }
        }
    }

    /// Saves `module`'s artifact, so that the next start deserializes instead of compiling. Not
    /// fatal when it fails: the next start compiles again.
    pub fn save_artifact(&self, digest: &str, module: &Module) {
        let saved = module
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|bytes| self.store.write_artifact(digest, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = saved {
            tracing::warn!(digest, "cannot save the precompiled artifact: {e}");
        }
    }

    /// A stored module: its file is checked against its digest first, then its artifact is used,
    /// or its bytes are compiled (within the budget: a module that no longer fits is refused in
    /// at most `--compile-wall-timeout-ms`, and its memory is the child's).
    pub fn load_stored(&self, digest: &str) -> Loaded {
        let mut transient = false;
        let file = self.store.verify_module(digest);
        let (module, compiled) = match (self.load_artifact(digest), &file) {
            (Some(module), _) => (Ok(module), false),
            (None, Err(e)) => (
                Err(format!(
                    "the module file is {}, and there is no usable artifact: deploy the same module again to repair it",
                    describe(e)
                )),
                false,
            ),
            (None, Ok(())) => {
                tracing::warn!(digest, "no usable artifact, recompiling");
                let compiled =
                    self.store.read_module(digest).map_err(|e| format!("the module file is {}", describe(&e)));
                let compiled = compiled.and_then(|wasm| {
                    self.compile(&wasm).map_err(|e| {
                        // Starved of CPU or out of luck starting the child: a later try, with the
                        // machine quieter, may succeed. Out of CPU time it would not.
                        transient = matches!(e, ApiError::CompileStarved { .. } | ApiError::Internal(_));
                        match transient {
                            true => format!("compiling it failed ({e}); the next start tries again"),
                            false => format!("the module is no longer accepted: {e}"),
                        }
                    })
                });
                if let Ok(module) = &compiled {
                    self.save_artifact(digest, module);
                }
                let ok = compiled.is_ok();
                (compiled, ok)
            }
        };
        match (&module, &file) {
            (Err(reason), _) => tracing::error!(digest, "stored module cannot be loaded, its functions are broken: {reason}"),
            (Ok(_), Err(e)) => tracing::warn!(
                digest,
                "the module file is {}; its functions run from the artifact, and the next deploy of the same bytes rewrites it",
                describe(e)
            ),
            (Ok(_), Ok(())) => {}
        }
        Loaded { damaged: module.is_ok() && file.is_err(), module, compiled, transient }
    }

    /// [`Self::load_stored`] for every digest, on at most `threads` threads.
    /// A compile starved of CPU beside the others is tried once more alone, so that a module is
    /// not left broken for having shared the CPUs.
    pub fn load_all(&self, digests: &[String], threads: usize) -> HashMap<String, Loaded> {
        let loaded = in_parallel(digests, threads, |digest| self.load_stored(digest));
        let mut loaded: HashMap<String, Loaded> = digests.iter().cloned().zip(loaded).collect();
        for (digest, one) in loaded.iter_mut().filter(|(_, l)| l.transient) {
            tracing::warn!(digest, "retrying the compile alone");
            *one = self.load_stored(digest);
        }
        loaded
    }

    /// Compiles each module that has neither a live module (`live`) nor a usable artifact, and
    /// saves its artifact, on at most `threads` threads: what a functions directory's new files
    /// need, compiled together rather than one after another. What fails is left to the caller's
    /// own load, which reports it.
    pub fn precompile(&self, modules: &[(String, Vec<u8>)], live: impl Fn(&str) -> bool, threads: usize) {
        let missing: Vec<&(String, Vec<u8>)> =
            modules.iter().filter(|(digest, _)| !live(digest) && self.store.read_artifact(digest).is_err()).collect();
        in_parallel(&missing, threads, |(digest, wasm)| {
            if let Ok(module) = self.compile(wasm) {
                self.save_artifact(digest, &module);
            }
        });
    }
}

/// `f` of every item, in the items' order, on at most `threads` threads (this one among them).
fn in_parallel<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(items.len()));
    let work = || loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(index) else { return };
        let result = f(item);
        done.lock().unwrap_or_else(|p| p.into_inner()).push((index, result));
    };
    std::thread::scope(|scope| {
        for _ in 1..threads.clamp(1, items.len().max(1)) {
            // One thread fewer is slower, not wrong: this one works through the rest.
            let _ = std::thread::Builder::new().name("tw-load".into()).spawn_scoped(scope, work);
        }
        work();
    });
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_unstable_by_key(|(index, _)| *index);
    done.into_iter().map(|(_, result)| result).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn in_parallel_keeps_order_and_does_each_once() {
        let items: Vec<u32> = (0..100).collect();
        for threads in [0, 1, 3, 200] {
            assert_eq!(super::in_parallel(&items, threads, |i| i * 2), items.iter().map(|i| i * 2).collect::<Vec<_>>());
        }
        assert!(super::in_parallel(&Vec::<u32>::new(), 4, |i| *i).is_empty());
    }
}

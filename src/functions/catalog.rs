use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use wasmtime::Module;

use super::FunctionRecord;
use crate::wasm::WasiArgs;

/// A live function: its record and its compiled module, shared by every shard.
pub struct DeployedFunction {
    pub record: FunctionRecord,
    pub module: Module,
    pub wasi: Arc<WasiArgs>,
}

impl DeployedFunction {
    pub fn new(record: FunctionRecord, module: Module) -> Self {
        let wasi = Arc::new(WasiArgs::new(&[record.name.as_str()], &[]));
        DeployedFunction { record, module, wasi }
    }
}

/// The authoritative set of live functions: the one piece of function state shared across shards.
///
/// The worker writes it; a shard reads `generation` (an atomic load, no write) on each function
/// request and copies the map into its own cache only when the generation moved. A deploy or delete
/// is acknowledged only after the generation moved, so the next request on any shard sees it.
#[derive(Default)]
pub struct Catalog {
    functions: RwLock<BTreeMap<String, Arc<DeployedFunction>>>,
    generation: AtomicU64,
    loaded: AtomicBool,
}

impl Catalog {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current generation and every live function.
    pub fn snapshot(&self) -> (u64, Vec<Arc<DeployedFunction>>) {
        let map = self.functions.read().unwrap_or_else(|p| p.into_inner());
        (self.generation(), map.values().cloned().collect())
    }

    pub fn get(&self, id: &str) -> Option<Arc<DeployedFunction>> {
        self.functions.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.functions.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A compiled module with this digest, if some live function has it: deploying the same bytes
    /// twice compiles once.
    pub fn module_with_digest(&self, digest: &str) -> Option<Module> {
        let map = self.functions.read().unwrap_or_else(|p| p.into_inner());
        map.values().find(|f| f.record.digest == digest).map(|f| f.module.clone())
    }

    pub fn insert_all(&self, functions: impl IntoIterator<Item = DeployedFunction>) {
        let mut map = self.functions.write().unwrap_or_else(|p| p.into_inner());
        for f in functions {
            map.insert(f.record.id.clone(), Arc::new(f));
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn remove(&self, id: &str) -> Option<Arc<DeployedFunction>> {
        let mut map = self.functions.write().unwrap_or_else(|p| p.into_inner());
        let removed = map.remove(id);
        self.generation.fetch_add(1, Ordering::AcqRel);
        removed
    }

    pub fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
}

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use wasmtime::Module;

use super::FunctionRecord;
use crate::server::published::Published;
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

/// Live functions by id.
pub type FunctionMap = BTreeMap<String, Arc<DeployedFunction>>;

/// The authoritative set of live functions: the one piece of function state shared across shards.
///
/// It is a [`Published`] map. Only the catalog worker writes it, copy-on-write, so a deploy or
/// delete replaces the whole map. A shard compares the generation (an atomic load, no write) on
/// each function request and copies the map into its own cache only when it moved. A deploy or
/// delete is acknowledged only after the new map is published, so the next request on any shard
/// sees it.
pub struct Catalog {
    functions: Published<FunctionMap>,
    loaded: AtomicBool,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog { functions: Published::new(FunctionMap::new()), loaded: AtomicBool::new(false) }
    }
}

impl Catalog {
    pub fn generation(&self) -> u64 {
        self.functions.generation()
    }

    /// The current generation and every live function.
    pub fn snapshot(&self) -> (u64, Arc<FunctionMap>) {
        self.functions.load()
    }

    fn current(&self) -> Arc<FunctionMap> {
        self.functions.load().1
    }

    pub fn get(&self, id: &str) -> Option<Arc<DeployedFunction>> {
        self.current().get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A compiled module with this digest, if some live function has it: deploying the same bytes
    /// twice compiles once.
    pub fn module_with_digest(&self, digest: &str) -> Option<Module> {
        self.current().values().find(|f| f.record.digest == digest).map(|f| f.module.clone())
    }

    /// Adds functions. The catalog worker's alone: writes are not serialised with each other.
    pub fn insert_all(&self, functions: impl IntoIterator<Item = DeployedFunction>) {
        let mut map = FunctionMap::clone(&self.current());
        for f in functions {
            map.insert(f.record.id.clone(), Arc::new(f));
        }
        self.functions.publish(map);
    }

    /// Removes a function. The catalog worker's alone, as `insert_all`.
    pub fn remove(&self, id: &str) -> Option<Arc<DeployedFunction>> {
        let mut map = FunctionMap::clone(&self.current());
        let removed = map.remove(id);
        self.functions.publish(map);
        removed
    }

    pub fn mark_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
}

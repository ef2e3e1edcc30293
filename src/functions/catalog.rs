use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tensor_wasm_dispatch::Weights;
use wasmtime::Module;

use super::FunctionRecord;
use crate::functions::PipelineRecord;
use crate::metrics::DirectoryStats;
use crate::runtime::published::Published;
use crate::wasm::WasiArgs;

/// A live function: its record and its compiled module, shared by every shard.
pub struct DeployedFunction {
    pub record: FunctionRecord,
    /// The compiled module, or why a stored function's module cannot be loaded (its file is
    /// missing or corrupt, or no longer accepted). A broken function stays listed, counted and
    /// deletable, so that a tenant's acknowledged deploy never vanishes silently; invoking it is
    /// 503 `function_unavailable` until the same bytes are deployed again.
    pub module: Result<Module, Arc<str>>,
    pub wasi: Arc<WasiArgs>,
    /// Its resident tensors (`record.tensors`), uploaded to a device at an invocation's first
    /// `tensor_weight` there and freed when the last holder of this version drops it.
    pub weights: Option<Arc<Weights>>,
}

impl DeployedFunction {
    pub fn new(record: FunctionRecord, module: Module) -> Self {
        Self::with(record, Ok(module))
    }

    /// A stored function whose module cannot be loaded, and why.
    pub fn broken(record: FunctionRecord, reason: String) -> Self {
        Self::with(record, Err(reason.into()))
    }

    fn with(record: FunctionRecord, module: Result<Module, Arc<str>>) -> Self {
        let env: Vec<(&str, &str)> = record.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let wasi = Arc::new(WasiArgs::new(&[record.name.as_str()], &env));
        DeployedFunction { record, module, wasi, weights: None }
    }

    /// The function with its resident tensors.
    pub fn with_weights(self, weights: Option<Arc<Weights>>) -> Self {
        DeployedFunction { weights, ..self }
    }

    /// The API's view in a listing (`function_json`), with how many tensors it carries and their
    /// bytes: a listing of many functions stays small whatever their files hold.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = function_json(&self.record, self.module.as_ref().err().map(|reason| &**reason));
        if let Some(weights) = &self.weights {
            json["tensors_count"] = weights.iter().count().into();
            json["tensors_bytes"] = weights.total_bytes().into();
        }
        json
    }

    /// The API's view of this one function: the listing's, and each tensor's name, dtype, shape
    /// and bytes.
    pub fn to_json_detailed(&self) -> serde_json::Value {
        let mut json = self.to_json();
        if let Some(weights) = &self.weights {
            json["tensors"] = weights_json(weights);
        }
        json
    }
}

/// A function's tensors as the API lists them.
pub fn weights_json(weights: &Weights) -> serde_json::Value {
    let tensors: Vec<serde_json::Value> = weights
        .iter()
        .map(|w| serde_json::json!({"name": w.name, "dtype": w.dtype.name(), "shape": w.shape, "bytes": w.bytes()}))
        .collect();
    tensors.into()
}

/// The API's view of a function: its record, its state (`ready`, or `broken` with the reason).
pub fn function_json(record: &FunctionRecord, broken: Option<&str>) -> serde_json::Value {
    let mut json = record.to_json();
    match broken {
        None => json["state"] = "ready".into(),
        Some(reason) => {
            json["state"] = "broken".into();
            json["reason"] = reason.into();
        }
    }
    json
}

/// Live functions by id.
pub type FunctionMap = BTreeMap<String, Arc<DeployedFunction>>;
/// Pipelines by id.
pub type PipelineMap = BTreeMap<String, Arc<PipelineRecord>>;

/// The authoritative set of live functions: the one piece of function state shared across shards.
///
/// It is a [`Published`] map. Only the catalog worker writes it, copy-on-write, so a deploy or
/// delete replaces the whole map. A shard compares the generation (an atomic load, no write) on
/// each function request and copies the map into its own cache only when it moved. A deploy or
/// delete is acknowledged only after the new map is published, so the next request on any shard
/// sees it.
///
/// Pipelines are a second published map beside it, written the same way.
pub struct Catalog {
    functions: Published<FunctionMap>,
    pipelines: Published<PipelineMap>,
    loaded: AtomicBool,
    pub directory: DirectoryStats,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            functions: Published::new(FunctionMap::new()),
            pipelines: Published::new(PipelineMap::new()),
            loaded: AtomicBool::new(false),
            directory: DirectoryStats::default(),
        }
    }
}

impl Catalog {
    pub fn current(&self) -> Arc<FunctionMap> {
        self.functions.load().1
    }

    /// Replaces the function map. The catalog worker's alone: writes are not serialised.
    pub fn publish_functions(&self, map: FunctionMap) {
        self.functions.publish(map);
    }

    /// The live functions, as shards derive their caches from them.
    pub fn functions(&self) -> &Published<FunctionMap> {
        &self.functions
    }

    /// Every pipeline, for a shard's subscription.
    pub fn pipelines(&self) -> &Published<PipelineMap> {
        &self.pipelines
    }

    /// Replaces the pipeline map. The catalog worker's alone, as `publish_functions`.
    pub fn publish_pipelines(&self, map: PipelineMap) {
        self.pipelines.publish(map);
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

    /// Functions listed but not runnable (`DeployedFunction::broken`).
    pub fn broken_count(&self) -> usize {
        self.current().values().filter(|f| f.module.is_err()).count()
    }

    /// A compiled module with this digest, if some live function has it: deploying the same bytes
    /// twice compiles once.
    pub fn module_with_digest(&self, digest: &str) -> Option<Module> {
        self.current().values().filter(|f| f.record.digest == digest).find_map(|f| f.module.clone().ok())
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

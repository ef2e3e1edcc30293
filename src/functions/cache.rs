use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use wasmtime::{Engine, InstancePre, Linker};

use super::catalog::PipelineMap;
use super::record::{is_valid_id, name_rank};
use super::{Catalog, DeployedFunction, FunctionRecord};
use crate::server::published::Subscription;
use crate::wasm::module::uses_tensors;
use crate::wasm::{new_linker, GuestState};

/// A function as one shard runs it: the shared module, pre-linked against this shard's linker.
pub struct LocalFunction {
    pub deployed: Arc<DeployedFunction>,
    pub pre: InstancePre<GuestState>,
    pub has_start: bool,
    /// It imports the tensor ABI, so its invocations get a dispatch session.
    pub uses_tensors: bool,
}

/// A shard's own copy of the catalog. On each lookup it compares the catalog's generation with the
/// one it copied (one atomic load); only when they differ does it take the catalog's read lock.
///
/// It also keeps the shard's view of the pipelines, and an index of function names for their steps.
pub struct FunctionCache {
    linker: Linker<GuestState>,
    generation: Cell<u64>,
    map: RefCell<HashMap<String, Rc<LocalFunction>>>,
    /// (tenant, name) to the id a pipeline step of that name runs (`record::name_rank`).
    names: RefCell<HashMap<(u64, String), String>>,
    pipelines: Subscription<PipelineMap>,
}

impl FunctionCache {
    pub fn new(engine: &Engine) -> wasmtime::Result<Self> {
        Ok(FunctionCache {
            linker: new_linker(engine)?,
            generation: Cell::new(u64::MAX),
            map: RefCell::default(),
            names: RefCell::default(),
            pipelines: Subscription::default(),
        })
    }

    pub fn get(&self, catalog: &Catalog, id: &str) -> Option<Rc<LocalFunction>> {
        self.sync(catalog);
        self.map.borrow().get(id).cloned()
    }

    /// The function of `tenant` that `reference`, an id or a name, means (`record::resolve`).
    pub fn resolve(&self, catalog: &Catalog, tenant: u64, reference: &str) -> Option<Rc<LocalFunction>> {
        self.sync(catalog);
        let map = self.map.borrow();
        let found = if is_valid_id(reference) {
            map.get(reference)
        } else {
            self.names.borrow().get(&(tenant, reference.to_string())).and_then(|id| map.get(id))
        };
        found.filter(|f| f.deployed.record.tenant_id == tenant).cloned()
    }

    /// Every pipeline: an atomic load, plus a copy only when they changed.
    pub fn pipelines(&self, catalog: &Catalog) -> Arc<PipelineMap> {
        self.pipelines.get(catalog.pipelines())
    }

    pub fn list(&self, catalog: &Catalog) -> Vec<FunctionRecord> {
        self.sync(catalog);
        self.map.borrow().values().map(|f| f.deployed.record.clone()).collect()
    }

    fn sync(&self, catalog: &Catalog) {
        if catalog.generation() == self.generation.get() {
            return;
        }
        let (generation, functions) = catalog.snapshot();
        let mut old = self.map.take();
        let mut map = HashMap::with_capacity(functions.len());
        for (id, deployed) in functions.iter() {
            let (id, deployed) = (id.clone(), deployed.clone());
            if let Some(kept) = old.remove(&id).filter(|f| Arc::ptr_eq(&f.deployed, &deployed)) {
                map.insert(id, kept);
                continue;
            }
            match self.linker.instantiate_pre(&deployed.module) {
                Ok(pre) => {
                    let has_start = deployed.module.get_export("_start").is_some();
                    let uses_tensors = uses_tensors(&deployed.module);
                    map.insert(id, Rc::new(LocalFunction { deployed, pre, has_start, uses_tensors }));
                }
                // The worker linked this module against an identical linker; failing here is a bug.
                Err(e) => tracing::error!(function = %id, "cannot pre-link on this shard: {e:#}"),
            }
        }
        let mut names: HashMap<(u64, String), &FunctionRecord> = HashMap::with_capacity(map.len());
        for f in map.values() {
            let r = &f.deployed.record;
            let slot = names.entry((r.tenant_id, r.name.clone())).or_insert(r);
            if name_rank(r) > name_rank(slot) {
                *slot = r;
            }
        }
        let names = names.into_iter().map(|(key, r)| (key, r.id.clone())).collect();
        self.names.replace(names);
        self.map.replace(map);
        self.generation.set(generation);
    }
}

use std::cell::Ref;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use wasmtime::{Engine, InstancePre, Linker};

use super::catalog::{FunctionMap, PipelineMap};
use super::record::{is_valid_id, name_rank};
use super::{Catalog, DeployedFunction, FunctionRecord};
use crate::error::bug;
use crate::runtime::published::{Derived, Subscription};
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

/// Why a lookup found nothing to run.
pub enum Missing {
    /// No such function (or another tenant's: the caller answers the same).
    NotFound,
    /// Listed, but its module cannot be loaded (`DeployedFunction::broken`).
    Broken(Arc<DeployedFunction>),
}

/// A shard's own copy of the catalog. On each lookup it compares the catalog's generation with the
/// one it copied (one atomic load); only when they differ does it take the catalog's read lock.
///
/// It also keeps the shard's view of the pipelines, and an index of function names for their steps.
pub struct FunctionCache {
    linker: Linker<GuestState>,
    local: Derived<LocalCatalog>,
    pipelines: Subscription<PipelineMap>,
}

/// The shard's functions, derived from one generation of the catalog.
#[derive(Default)]
struct LocalCatalog {
    map: HashMap<String, Rc<LocalFunction>>,
    /// Broken functions by id: listed and found, never run.
    broken: HashMap<String, Arc<DeployedFunction>>,
    /// (tenant, name) to the id a pipeline step of that name runs (`record::name_rank`).
    names: HashMap<(u64, String), String>,
}

impl LocalCatalog {
    fn find(&self, tenant: u64, id: &str) -> Result<Rc<LocalFunction>, Missing> {
        if let Some(f) = self.map.get(id).filter(|f| f.deployed.record.tenant_id == tenant) {
            return Ok(f.clone());
        }
        match self.broken.get(id).filter(|f| f.record.tenant_id == tenant) {
            Some(f) => Err(Missing::Broken(f.clone())),
            None => Err(Missing::NotFound),
        }
    }
}

impl FunctionCache {
    pub fn new(engine: &Engine) -> wasmtime::Result<Self> {
        Ok(FunctionCache { linker: new_linker(engine)?, local: Derived::default(), pipelines: Subscription::default() })
    }

    /// The function `id` of `tenant`, ready to run.
    pub fn get(&self, catalog: &Catalog, tenant: u64, id: &str) -> Result<Rc<LocalFunction>, Missing> {
        self.sync(catalog).find(tenant, id)
    }

    /// The function of `tenant` that `reference`, an id or a name, means (`record::resolve`).
    pub fn resolve(&self, catalog: &Catalog, tenant: u64, reference: &str) -> Result<Rc<LocalFunction>, Missing> {
        let local = self.sync(catalog);
        if is_valid_id(reference) {
            return local.find(tenant, reference);
        }
        match local.names.get(&(tenant, reference.to_string())) {
            Some(id) => local.find(tenant, id),
            None => Err(Missing::NotFound),
        }
    }

    /// The function `id` of `tenant` as the API shows it, broken or not.
    pub fn describe(&self, catalog: &Catalog, tenant: u64, id: &str) -> Option<Arc<DeployedFunction>> {
        match self.get(catalog, tenant, id) {
            Ok(f) => Some(f.deployed.clone()),
            Err(Missing::Broken(f)) => Some(f),
            Err(Missing::NotFound) => None,
        }
    }

    /// Every pipeline: an atomic load, plus a copy only when they changed.
    pub fn pipelines(&self, catalog: &Catalog) -> Arc<PipelineMap> {
        self.pipelines.get(catalog.pipelines())
    }

    /// Every function of `tenant`, broken ones included.
    pub fn list(&self, catalog: &Catalog, tenant: u64) -> Vec<Arc<DeployedFunction>> {
        let local = self.sync(catalog);
        let ready = local.map.values().map(|f| f.deployed.clone()).collect::<Vec<_>>();
        let broken = local.broken.values().cloned().collect::<Vec<_>>();
        ready.into_iter().chain(broken).filter(|f| f.record.tenant_id == tenant).collect()
    }

    /// Brings the shard's copy up to date with the catalog: what a lookup does first, for a shard
    /// that has none to do. A deleted or replaced function's last holders are these copies, and
    /// its resident tensors stay on the device until every shard has let go of it.
    pub fn refresh(&self, catalog: &Catalog) {
        drop(self.sync(catalog));
    }

    /// The shard's functions: an atomic load, plus a rebuild only when the catalog changed.
    fn sync(&self, catalog: &Catalog) -> Ref<'_, LocalCatalog> {
        self.local.get(catalog.functions(), |functions, old| self.rebuild(functions, old))
    }

    /// Pre-links what is new in `functions`, keeping what `old` already holds of the same
    /// deploys.
    fn rebuild(&self, functions: &FunctionMap, old: LocalCatalog) -> LocalCatalog {
        let mut old = old.map;
        let mut map = HashMap::with_capacity(functions.len());
        let mut broken = HashMap::new();
        for (id, deployed) in functions.iter() {
            let (id, deployed) = (id.clone(), deployed.clone());
            if let Some(kept) = old.remove(&id).filter(|f| Arc::ptr_eq(&f.deployed, &deployed)) {
                map.insert(id, kept);
                continue;
            }
            let Ok(module) = &deployed.module else {
                broken.insert(id, deployed);
                continue;
            };
            match self.linker.instantiate_pre(module) {
                Ok(pre) => {
                    let has_start = module.get_export("_start").is_some();
                    let uses_tensors = uses_tensors(module);
                    map.insert(id, Rc::new(LocalFunction { deployed, pre, has_start, uses_tensors }));
                }
                // The worker linked this module against an identical linker; failing here is a bug.
                // A release build logs it and leaves the function out of this shard's map.
                Err(e) => {
                    let _ = bug!("a module the worker linked pre-links on every shard", "function {id}: {e:#}");
                }
            }
        }
        // Broken functions take part in name resolution: a step naming one is told it is broken,
        // not sent to an older function of the same name.
        let mut names: HashMap<(u64, String), &FunctionRecord> = HashMap::with_capacity(map.len());
        for r in map.values().map(|f| &f.deployed.record).chain(broken.values().map(|f| &f.record)) {
            let slot = names.entry((r.tenant_id, r.name.clone())).or_insert(r);
            if name_rank(r) > name_rank(slot) {
                *slot = r;
            }
        }
        let names = names.into_iter().map(|(key, r)| (key, r.id.clone())).collect();
        LocalCatalog { map, broken, names }
    }
}

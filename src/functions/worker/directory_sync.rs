//! Directory sync: what the worker last loaded from `--functions-dir`, and applying its changes
//! between jobs.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::Module;

use super::deploys::{check_abi, same_function};
use super::pipelines::{check_steps, same_pipeline};
use super::Worker;
use crate::config::DirectoryConfig;
use crate::error::ApiError;
use crate::functions::catalog::{FunctionMap, PipelineMap};
use crate::functions::directory::{self, FileStamps, FunctionFiles, Stamp};
use crate::functions::manifest::FunctionManifest;
use crate::functions::record::{directory_id, validate_env, Source};
use crate::functions::store::digest_of;
use crate::functions::{DeployedFunction, FunctionRecord};
use crate::functions::{PipelineRecord, PipelineSpec};

/// What the worker last loaded from the functions directory.
pub(super) struct Watch {
    pub(super) config: DirectoryConfig,
    pub(super) last_scan: Cell<Instant>,
    /// Each function's file stamps when last tried, loaded or not: a file that failed is tried
    /// again only when it changes.
    pub(super) functions: RefCell<HashMap<String, FileStamps>>,
    /// Each pipeline's stamp when last tried, and whether it loaded.
    pub(super) pipelines: RefCell<HashMap<String, (Stamp, bool)>>,
    /// Unusable files already logged, so that each is logged (and counted) once.
    pub(super) reported: RefCell<HashSet<String>>,
    pub(super) listing_failed: Cell<bool>,
}

impl Watch {
    pub(super) fn new(config: DirectoryConfig) -> Self {
        Watch {
            config,
            last_scan: Cell::new(Instant::now()),
            functions: RefCell::default(),
            pipelines: RefCell::default(),
            reported: RefCell::default(),
            listing_failed: Cell::new(false),
        }
    }
}

impl Worker {
    /// Lists the directory and applies what changed since the last listing: functions first, then
    /// pipelines, which may name them. Each is published once, so shards see one new generation.
    /// Returns whether functions changed (and unused artifacts were swept).
    pub(super) fn sync_directory(&self) -> bool {
        let Some(watch) = &self.directory else { return false };
        watch.last_scan.set(Instant::now());
        let stats = &self.catalog.directory;
        let listing = match directory::list(&watch.config.root) {
            Ok(listing) => {
                watch.listing_failed.set(false);
                listing
            }
            Err(e) => {
                if !watch.listing_failed.replace(true) {
                    tracing::error!(dir = %watch.config.root.display(), "cannot list the functions directory; what was loaded keeps serving: {e}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                return false;
            }
        };
        let mut reported = watch.reported.borrow_mut();
        reported.retain(|file| listing.ignored.iter().any(|(f, _)| f == file));
        for (file, why) in &listing.ignored {
            if reported.insert(file.clone()) {
                tracing::warn!(file = %file, "functions directory entry ignored: {why}");
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }

        let current = self.catalog.current();
        let mut functions: Option<FunctionMap> = None;
        let mut changes = 0u64;
        let mut seen = watch.functions.borrow_mut();
        let changed: Vec<&FunctionFiles> = listing
            .functions
            .iter()
            .filter(|(name, files)| files.stamps().is_ok_and(|stamps| seen.get(*name) != Some(&stamps)))
            .map(|(_, files)| files)
            .collect();
        self.precompile_directory(&changed);
        for (name, files) in &listing.functions {
            // A file removed since the listing: the next listing sees it gone.
            let Ok(stamps) = files.stamps() else { continue };
            if seen.get(name) == Some(&stamps) {
                continue;
            }
            seen.insert(name.clone(), stamps);
            let id = directory_id("function", name);
            match self.load_directory_function(name, &id, files) {
                Ok(f) if current.get(&id).is_some_and(|old| same_function(&old.record, &f.record)) => {}
                Ok(f) => {
                    tracing::info!(function = %name, id = %id, digest = %f.record.digest, tenant = f.record.tenant_id, "function loaded from the functions directory");
                    functions.get_or_insert_with(|| FunctionMap::clone(&current)).insert(id, Arc::new(f));
                    changes += 1;
                }
                Err(e) => {
                    let serving = if current.contains_key(&id) {
                        "the previous version keeps serving"
                    } else {
                        "it is not served"
                    };
                    tracing::error!(function = %name, file = %files.wasm.display(), "cannot load from the functions directory; {serving}: {e}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let gone: Vec<String> = seen.keys().filter(|n| !listing.functions.contains_key(*n)).cloned().collect();
        for name in gone {
            seen.remove(&name);
            let id = directory_id("function", &name);
            if current.contains_key(&id) {
                tracing::info!(function = %name, id = %id, "function removed with its file from the functions directory");
                functions.get_or_insert_with(|| FunctionMap::clone(&current)).remove(&id);
                changes += 1;
            }
        }
        let functions_changed = functions.is_some();
        let live = match functions {
            Some(map) => {
                stats.changes.fetch_add(changes, Ordering::Relaxed);
                self.catalog.publish_functions(map);
                self.sweep_directory_artifacts();
                self.catalog.current()
            }
            None => current,
        };
        self.sync_directory_pipelines(watch, &listing.pipelines, &live, functions_changed);
        functions_changed
    }

    pub(super) fn sync_directory_pipelines(
        &self,
        watch: &Watch,
        files: &BTreeMap<String, PathBuf>,
        functions: &FunctionMap,
        functions_changed: bool,
    ) {
        let stats = &self.catalog.directory;
        let current = self.catalog.pipelines().load().1;
        let mut pipelines: Option<PipelineMap> = None;
        let mut changes = 0u64;
        let mut seen = watch.pipelines.borrow_mut();
        for (name, path) in files {
            let Ok(stamp) = directory::stamp(path) else { continue };
            // A pipeline that failed may name a function that has just arrived: try it again then.
            match seen.get(name) {
                Some(&(s, loaded)) if s == stamp && (loaded || !functions_changed) => continue,
                _ => {}
            }
            let id = directory_id("pipeline", name);
            let loaded = self.load_directory_pipeline(name, &id, path).and_then(|p| {
                check_steps(functions, &p)?;
                Ok(p)
            });
            seen.insert(name.clone(), (stamp, loaded.is_ok()));
            match loaded {
                Ok(p) if current.get(&id).is_some_and(|old| same_pipeline(old, &p)) => {}
                Ok(p) => {
                    tracing::info!(pipeline = %name, id = %id, "pipeline loaded from the functions directory");
                    pipelines.get_or_insert_with(|| PipelineMap::clone(&current)).insert(id, Arc::new(p));
                    changes += 1;
                }
                Err(e) => {
                    tracing::error!(pipeline = %name, file = %path.display(), "cannot load from the functions directory: {e}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let gone: Vec<String> = seen.keys().filter(|n| !files.contains_key(*n)).cloned().collect();
        for name in gone {
            seen.remove(&name);
            let id = directory_id("pipeline", &name);
            if current.contains_key(&id) {
                tracing::info!(pipeline = %name, id = %id, "pipeline removed with its file from the functions directory");
                pipelines.get_or_insert_with(|| PipelineMap::clone(&current)).remove(&id);
                changes += 1;
            }
        }
        if let Some(map) = pipelines {
            stats.changes.fetch_add(changes, Ordering::Relaxed);
            self.catalog.publish_pipelines(map);
        }
    }

    pub(super) fn load_directory_function(
        &self,
        name: &str,
        id: &str,
        files: &FunctionFiles,
    ) -> Result<DeployedFunction, String> {
        let manifest = match &files.manifest {
            Some(path) => FunctionManifest::parse(&directory::read_manifest(path)?)
                .map_err(|e| format!("{}: {e}", path.display()))?,
            None => FunctionManifest::default(),
        };
        let timeout_ms = manifest.timeout_ms()?.map(serde_json::Number::from);
        let memory_limit_mb = manifest.memory_limit_mb.map(serde_json::Number::from);
        let (timeout_ms, memory_limit_mb) =
            self.resolve_limits(timeout_ms, memory_limit_mb).map_err(|e| e.to_string())?;
        validate_env(&manifest.env)?;
        // No larger than the API would accept (--max-body-bytes).
        let wasm = directory::read_limited(&files.wasm, self.limits.max_body_bytes)?;
        let digest = digest_of(&wasm);
        let module = self.directory_module(&digest, &wasm).map_err(|e| format!("{}: {e}", e.kind()))?;
        let tenant_id = manifest.tenant.unwrap_or(0);
        let tensors = match &files.tensors {
            Some(path) => {
                let file = directory::read_limited(path, self.limits.max_function_tensors_bytes)?;
                let digest = digest_of(&file);
                let weights =
                    self.weights_of(tenant_id, &digest, &file).map_err(|e| format!("{}: {e}", path.display()))?;
                Some((digest, weights))
            }
            None => None,
        };
        let abi = manifest.abi.unwrap_or_default();
        check_abi(abi, &module)?;
        let record = FunctionRecord {
            id: id.to_string(),
            name: name.to_string(),
            digest,
            created_unix_ms: self.next_created_ms(),
            timeout_ms,
            memory_limit_mb,
            tenant_id,
            abi,
            source: Source::Directory,
            env: manifest.env,
            tensors: tensors.as_ref().map(|(digest, _)| digest.clone()),
        };
        Ok(DeployedFunction::new(record, module).with_weights(tensors.map(|(_, weights)| weights)))
    }

    /// Compiles the new modules among `changed` together, a batch of `--load-threads` at a time
    /// (so that at most that many modules are held at once), before they are loaded one by one:
    /// a first start on a folder of many modules takes a fraction of compiling them in turn.
    pub(super) fn precompile_directory(&self, changed: &[&FunctionFiles]) {
        if changed.len() < 2 {
            return;
        }
        let (loader, threads) = (self.directory_loader(), self.limits.load_threads.max(1));
        for batch in changed.chunks(threads) {
            let modules: Vec<(String, Vec<u8>)> = batch
                .iter()
                .filter_map(|files| directory::read_limited(&files.wasm, self.limits.max_body_bytes).ok())
                .map(|wasm| (digest_of(&wasm), wasm))
                .collect();
            loader.precompile(&modules, |digest| self.catalog.module_with_digest(digest).is_some(), threads);
        }
    }

    /// A directory function's module: live already, or from the artifact an earlier start or
    /// listing saved, or compiled now with its artifact saved, so that a restart does not compile
    /// the whole folder again.
    pub(super) fn directory_module(&self, digest: &str, wasm: &[u8]) -> Result<Module, ApiError> {
        let loader = self.directory_loader();
        if let Some(module) = self.catalog.module_with_digest(digest).or_else(|| loader.load_artifact(digest)) {
            return Ok(module);
        }
        let module = loader.compile(wasm)?;
        tracing::info!(digest, "functions directory module compiled");
        loader.save_artifact(digest, &module);
        Ok(module)
    }

    /// Removes the artifacts of directory modules that no function uses any more: replaced,
    /// removed, or gone from the folder while the server was down.
    pub(super) fn sweep_directory_artifacts(&self) {
        let digests = match self.store.artifacts_without_module() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("cannot list the artifacts: {e}");
                return;
            }
        };
        for digest in digests.iter().filter(|d| self.catalog.module_with_digest(d).is_none()) {
            if let Err(e) = self.store.remove_artifact(digest) {
                tracing::warn!(digest, "cannot remove an unused artifact: {e}");
            }
        }
    }

    pub(super) fn load_directory_pipeline(
        &self,
        name: &str,
        id: &str,
        path: &std::path::Path,
    ) -> Result<PipelineRecord, String> {
        let spec: PipelineSpec =
            toml::from_str(&directory::read_manifest(path)?).map_err(|e| format!("{}: {e}", path.display()))?;
        if spec.name.is_some() {
            return Err("`name` is not set in the file: the file's name is the pipeline's".into());
        }
        let tenant = spec.tenant.unwrap_or(0);
        spec.into_record(
            id.to_string(),
            name.to_string(),
            tenant,
            self.next_created_ms(),
            Source::Directory,
            &self.limits,
        )
        .map_err(|e| e.to_string())
    }
}

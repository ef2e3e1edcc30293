//! The fleet's changes, applied on this replica (`--registry nats://…`): a function another replica
//! deployed is fetched, stored and published here as a deploy would be, one deleted is forgotten,
//! and after a resynchronisation what the bucket no longer holds goes. A change already applied
//! (this replica's own deploy, seen again by its watch) changes nothing.
//!
//! Nothing is checked against this replica's quotas: the replica that answered the deploy checked
//! them against the same fleet-wide catalog. What is checked is what this replica must trust: the
//! fetched bytes' digests, the module's validity (by compiling it), the tensor file's shape.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::deploys::{check_abi, same_function};
use super::pipelines::same_pipeline;
use super::Worker;
use crate::functions::record::{is_valid_id, validate_env, validate_name, Source};
use crate::functions::registry::{now_unix_ms, Change};
use crate::functions::store::digest_of;
use crate::functions::{DeployedFunction, FunctionRecord, PipelineRecord};

/// How often the files of a function from the registry whose fetch failed are fetched again.
const REGISTRY_RETRY: Duration = Duration::from_secs(5);

impl Worker {
    /// Drains the client's channel. The flag is cleared first, so that a change sent while this
    /// runs queues the job again rather than waiting for the next one.
    pub(super) fn apply_registry_changes(&self) {
        loop {
            let change = {
                let mut changes = self.changes.borrow_mut();
                let Some((rx, nudged)) = changes.as_mut() else { return };
                nudged.store(false, Ordering::Release);
                match rx.try_recv() {
                    Ok(change) => change,
                    Err(_) => return,
                }
            };
            let (applied, published_ms) = match change {
                Change::Put { record, published_ms } => (self.apply_put(record), published_ms),
                Change::Removed { id, published_ms } => (self.apply_removed(&id), published_ms),
                Change::PipelinePut { record, published_ms } => (self.apply_pipeline_put(record), published_ms),
                Change::PipelineRemoved { id, published_ms } => (self.apply_pipeline_removed(&id), published_ms),
                Change::Synced { ids, pipelines, bucket, revision } => {
                    self.apply_synced(ids, pipelines, &bucket, revision);
                    (false, None)
                }
            };
            if applied {
                self.propagated(published_ms);
            }
        }
    }

    /// A change applied from the watch: how long it took from JetStream to serving here, and a
    /// warning past `--registry-propagation-ms`.
    fn propagated(&self, published_ms: Option<u64>) {
        let (Some(at), Some(registry)) = (published_ms, &self.registry) else { return };
        let took = Duration::from_millis(now_unix_ms().saturating_sub(at));
        registry.status.propagation.observe(took);
        if took > registry.propagation_bound {
            registry.status.late_changes.add(1);
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                bound_ms = registry.propagation_bound.as_millis() as u64,
                "a registry change reached this replica later than --registry-propagation-ms"
            );
        }
    }

    /// Whether this record now serves here (its own deploy, seen again, changes nothing, and one
    /// whose files could not be fetched is listed broken: neither is timed as propagated).
    fn apply_put(&self, record: FunctionRecord) -> bool {
        if let Err(why) = self.check_remote(&record) {
            // Whoever can write the bucket can write anything: nothing unchecked reaches a file
            // name, the catalog or a guest.
            tracing::warn!(key_id = %record.id.escape_debug(), "a registry record refused: {why}");
            return false;
        }
        if let Some(live) = self.catalog.get(&record.id) {
            if live.module.is_ok() && same_function(&live.record, &record) {
                return false;
            }
        }
        self.last_created_ms.set(self.last_created_ms.get().max(record.created_unix_ms));
        let deployed = match self.fetch_files(&record) {
            Ok(()) => match self
                .loaded_module(&record.digest)
                // As a deploy here would be checked: an envelope function must be a WASI command.
                .and_then(|m| check_abi(record.abi, &m).map(|()| m))
                .and_then(|m| Ok((m, self.stored_weights(&record)?)))
            {
                Ok((module, weights)) => DeployedFunction::new(record.clone(), module).with_weights(weights),
                Err(reason) => DeployedFunction::broken(record.clone(), reason),
            },
            // Listed as broken, and fetched again every REGISTRY_RETRY (`retry_registry_fetches`).
            Err(reason) => {
                self.registry_retry.borrow_mut().0.insert(record.id.clone());
                DeployedFunction::broken(record.clone(), reason)
            }
        };
        if let Err(e) = self.store.write_record(&record) {
            tracing::warn!(id = record.id, "cannot store a function from the registry: {e}");
            return false;
        }
        let serving = deployed.module.is_ok();
        if let Err(reason) = &deployed.module {
            tracing::warn!(id = record.id, name = record.name, "a function from the registry is broken here: {reason}");
        } else {
            tracing::info!(id = record.id, name = record.name, "function deployed from the registry");
        }
        self.catalog.insert_all([deployed]);
        serving
    }

    /// How long until the next retry of failed fetches: `Duration::MAX` with none to retry.
    pub(super) fn registry_retry_in(&self) -> Duration {
        let retry = self.registry_retry.borrow();
        match (&retry.0, retry.1) {
            (ids, _) if ids.is_empty() => Duration::MAX,
            (_, None) => Duration::ZERO,
            (_, Some(at)) => REGISTRY_RETRY.saturating_sub(at.elapsed()),
        }
    }

    /// How long until the next check of the object store (`--registry-repair-interval-ms`):
    /// `Duration::MAX` without a registry.
    pub(super) fn registry_repair_in(&self) -> Duration {
        match (&self.registry, self.registry_repaired.get()) {
            (None, _) => Duration::MAX,
            (Some(_), None) => Duration::ZERO,
            (Some(r), Some(at)) => r.repair_interval.saturating_sub(at.elapsed()),
        }
    }

    /// Stores again, from this replica's copies, the modules and tensor files of its functions
    /// that the object store no longer holds: a store that lost an object (a delete's clean-up
    /// racing a deploy of the same module elsewhere, a NATS that lost part of its storage) is
    /// repaired by any replica that has it, and the replicas waiting on it fetch it at their next
    /// retry.
    pub(super) fn repair_registry_objects(&self) {
        self.registry_repaired.set(Some(Instant::now()));
        let Some(registry) = self.registry.as_ref().filter(|r| r.status.connected()) else { return };
        let current = self.catalog.current();
        // Digest → whether it is a tensor file; only what this replica can serve from its store.
        let mut held = std::collections::BTreeMap::new();
        for f in current.values().filter(|f| f.record.source == Source::Api && f.module.is_ok()) {
            held.insert(f.record.digest.clone(), false);
            if let Some(t) = &f.record.tensors {
                held.insert(t.clone(), true);
            }
        }
        if held.is_empty() {
            return;
        }
        let missing = match registry.missing(held.keys().cloned().collect()) {
            Ok(missing) => missing,
            Err(e) => return tracing::debug!("cannot check the object store: {e:?}"),
        };
        for digest in missing {
            let bytes = match held.get(&digest) {
                Some(true) => self.store.read_tensors(&digest, self.limits.max_function_tensors_bytes),
                Some(false) => self.store.read_module(&digest),
                None => continue,
            };
            let stored = match bytes {
                Ok(bytes) if digest_of(&bytes) == digest => registry.store_object(&digest, bytes),
                // This copy cannot repair it; another replica's may.
                _ => continue,
            };
            match stored {
                Ok(()) => {
                    registry.status.repairs.add(1);
                    tracing::warn!(digest, "the registry's object store had lost a file of a function: stored again");
                }
                Err(e) => tracing::warn!(digest, "cannot store again a file the object store lost: {e:?}"),
            }
        }
    }

    /// Fetches again the files of the registry's functions that are broken here for want of them.
    pub(super) fn retry_registry_fetches(&self) {
        let ids = {
            let mut retry = self.registry_retry.borrow_mut();
            retry.1 = Some(Instant::now());
            std::mem::take(&mut retry.0)
        };
        for id in ids {
            // Deleted meanwhile, or working again (a resync applied it): nothing to do.
            let Some(function) = self.catalog.get(&id).filter(|f| f.module.is_err()) else { continue };
            let _ = self.apply_put(function.record.clone());
        }
    }

    /// What a record from the bucket must be before this replica trusts it: an id and digests of
    /// the forms this server makes (they name files in the data dir), and the name, environment
    /// and limits a deploy here would accept.
    fn check_remote(&self, record: &FunctionRecord) -> Result<(), String> {
        let hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let digest = |d: &str| d.strip_prefix("sha256:").is_some_and(|h| hex(h, 64));
        if !is_valid_id(&record.id) {
            return Err("its id is not 32 lowercase hex digits".into());
        }
        if !digest(&record.digest) || record.tensors.as_deref().is_some_and(|t| !digest(t)) {
            return Err("a digest is not sha256:<64 lowercase hex digits>".into());
        }
        if record.source != Source::Api {
            return Err("it is a directory function's, which each replica loads from its own folder".into());
        }
        validate_name(&record.name)?;
        validate_env(&record.env)?;
        let limits = &self.limits;
        if !(1..=limits.max_timeout_ms).contains(&record.timeout_ms) {
            return Err(format!("its timeout {} ms is outside 1 to --max-timeout-ms", record.timeout_ms));
        }
        if !(1..=limits.max_memory_limit_mb).contains(&record.memory_limit_mb) {
            return Err(format!(
                "its memory limit {} MiB is outside 1 to --max-memory-limit-mb",
                record.memory_limit_mb
            ));
        }
        Ok(())
    }

    /// The record's module and tensor file in the local store: fetched from the object store
    /// where missing, checked against their digests.
    fn fetch_files(&self, record: &FunctionRecord) -> Result<(), String> {
        if self.store.verify_module(&record.digest).is_err() {
            let wasm = self.fetch_verified(&record.digest, self.limits.max_body_bytes)?;
            self.store.write_module(&record.digest, &wasm).map_err(|e| format!("storing {}: {e}", record.digest))?;
        }
        if let Some(tensors) = &record.tensors {
            let limit = self.limits.max_function_tensors_bytes;
            if self.store.read_tensors(tensors, limit).is_err() {
                let file = self.fetch_verified(tensors, limit)?;
                self.store.write_tensors(tensors, &file).map_err(|e| format!("storing {tensors}: {e}"))?;
            }
        }
        Ok(())
    }

    /// The object `digest` from the registry, at most `limit` bytes, checked against its digest
    /// and against the audit log's reserve (which holds for a deploy from the fleet as for one
    /// from the API) before the caller writes it.
    fn fetch_verified(&self, digest: &str, limit: u64) -> Result<Vec<u8>, String> {
        let registry = self.registry.as_ref().ok_or("no registry to fetch from")?;
        let bytes = registry.fetch(digest, limit).map_err(|e| format!("fetching {digest}: {e:?}"))?;
        if digest_of(&bytes) != digest {
            return Err(format!("the registry's copy of {digest} has another digest"));
        }
        self.check_reserve(bytes.len() as u64).map_err(|e| e.to_string())?;
        Ok(bytes)
    }

    /// The module a live function runs, or the stored one, loaded (its artifact, or compiled).
    fn loaded_module(&self, digest: &str) -> Result<wasmtime::Module, String> {
        if let Some(module) = self.catalog.module_with_digest(digest) {
            return Ok(module);
        }
        let mut loaded = self.loader().load_all(&[digest.to_string()], 1);
        loaded.remove(digest).ok_or_else(|| format!("its module {digest} was not loaded"))?.module
    }

    /// Whether a function went (this replica's own delete, seen again, finds none).
    fn apply_removed(&self, id: &str) -> bool {
        let Some(function) = self.catalog.get(id).filter(|f| f.record.source == Source::Api) else { return false };
        match self.forget(&function) {
            Ok(()) => tracing::info!(id, name = function.record.name, "function deleted through the registry"),
            Err(e) => tracing::warn!(id, "cannot forget a function the registry deleted: {e}"),
        }
        true
    }

    /// Whether the pipeline record changed anything here (its own create, seen again, does not).
    fn apply_pipeline_put(&self, record: PipelineRecord) -> bool {
        if let Err(why) = self.check_remote_pipeline(&record) {
            tracing::warn!(key_id = %record.id.escape_debug(), "a registry pipeline refused: {why}");
            return false;
        }
        let pipelines = self.catalog.pipelines().load().1;
        if pipelines.get(&record.id).is_some_and(|live| same_pipeline(live, &record)) {
            return false;
        }
        // Kept beside a directory pipeline of the same name, as a function from the registry is:
        // the replica that answered checked the name against its own folder.
        let (id, name) = (record.id.clone(), record.name.clone());
        match self.keep_pipeline(record) {
            Ok(()) => {
                tracing::info!(id, name, "pipeline created from the registry");
                true
            }
            Err(e) => {
                tracing::warn!(id, "cannot store a pipeline from the registry: {e}");
                false
            }
        }
    }

    /// Whether a pipeline went (this replica's own delete, seen again, finds none).
    fn apply_pipeline_removed(&self, id: &str) -> bool {
        let pipelines = self.catalog.pipelines().load().1;
        if !pipelines.get(id).is_some_and(|p| p.source == Source::Api) {
            return false;
        }
        match self.forget_pipeline(id) {
            Ok(()) => tracing::info!(id, "pipeline deleted through the registry"),
            Err(e) => tracing::warn!(id, "cannot forget a pipeline the registry deleted: {e}"),
        }
        true
    }

    /// What a pipeline record from the bucket must be before this replica trusts it: an API
    /// pipeline with an id of this server's form (it names a file), and exactly what this
    /// server's own checks make of its fields (name, steps, timeouts, sink and its address).
    /// Its steps are not looked up: names resolve at each invocation, and a function may arrive
    /// after the pipeline that names it.
    fn check_remote_pipeline(&self, record: &PipelineRecord) -> Result<(), String> {
        if !is_valid_id(&record.id) {
            return Err("its id is not 32 lowercase hex digits".into());
        }
        if record.source != Source::Api {
            return Err("it is not an API pipeline".into());
        }
        let rebuilt = record
            .as_spec()
            .into_record(
                record.id.clone(),
                record.name.clone(),
                record.tenant_id,
                record.created_unix_ms,
                Source::Api,
                &self.limits,
            )
            .map_err(|e| e.to_string())?;
        if rebuilt != *record {
            return Err("its fields are not what this server's checks make of them".into());
        }
        Ok(())
    }

    /// After a resynchronisation: the API functions the bucket no longer holds were deleted while
    /// this replica was away, if the bucket is the one this data dir was last in step with. If it
    /// is another (a NATS whose storage was lost, a registry pointed elsewhere), or this data dir
    /// never was in step with one (a single node joining a fleet), they are not deletions: they are
    /// published from this cache instead, so that a wiped registry is filled again, never the
    /// fleet's copies emptied.
    fn apply_synced(&self, ids: Vec<String>, pipelines: Vec<String>, bucket: &str, revision: u64) {
        let held: HashSet<String> = ids.into_iter().collect();
        let held_pipelines: HashSet<String> = pipelines.into_iter().collect();
        let known = self.store.registry_synced_at().map(|(_, b)| b);
        let current = self.catalog.current();
        let same_bucket = known.as_deref() == Some(bucket);
        if !same_bucket {
            // Revisions of another bucket say nothing of this one's.
            self.published.borrow_mut().clear();
        }
        // Published by this replica after the listing's revision: the listing could not hold it.
        let newer = |id: &str| self.published.borrow().get(id).is_some_and(|&r| r > revision);
        let missing: Vec<_> = current
            .values()
            .filter(|f| f.record.source == Source::Api && !held.contains(&f.record.id) && !newer(&f.record.id))
            .cloned()
            .collect();
        let live_pipelines = self.catalog.pipelines().load().1;
        let missing_pipelines: Vec<_> = live_pipelines
            .values()
            .filter(|p| p.source == Source::Api && !held_pipelines.contains(&p.id) && !newer(&p.id))
            .cloned()
            .collect();
        let mut in_step = true;
        if same_bucket {
            for function in &missing {
                self.apply_removed(&function.record.id);
            }
            for pipeline in &missing_pipelines {
                self.apply_pipeline_removed(&pipeline.id);
            }
        } else if !missing.is_empty() || !missing_pipelines.is_empty() {
            tracing::warn!(
                functions = missing.len(),
                known = known.as_deref().unwrap_or("none"),
                bucket,
                "the registry is not the one this data dir was last in step with: publishing this cache's functions to it"
            );
            for function in &missing {
                match self.republish(&function.record) {
                    Ok(revision) => self.published_at(&function.record.id, revision),
                    Err(e) => {
                        // The data dir stays marked with the bucket it knew, so that the next
                        // resync tries again rather than taking the function for deleted.
                        in_step = false;
                        tracing::warn!(
                            id = function.record.id,
                            "cannot publish a cached function to the registry: {e}"
                        );
                    }
                }
            }
            for pipeline in &missing_pipelines {
                let published = self.registry.as_ref().map_or(Ok(0), |r| r.publish_pipeline(pipeline));
                match published {
                    Ok(revision) => self.published_at(&pipeline.id, revision),
                    Err(e) => {
                        in_step = false;
                        tracing::warn!(id = pipeline.id, "cannot publish a cached pipeline to the registry: {e:?}");
                    }
                }
            }
        }
        self.published.borrow_mut().retain(|_, &mut r| r > revision);
        if in_step {
            // The cache's age, for a restart while NATS is away (`RegistryStatus::stale_seconds`).
            if let Err(e) = self.store.mark_registry_synced(now_unix_ms(), bucket) {
                tracing::warn!("cannot mark the data dir as in step with the registry: {e}");
            }
        }
        if !self.catalog.is_loaded() {
            tracing::info!("in step with the registry: ready");
            self.catalog.mark_loaded();
        }
    }

    /// Remembers the revision of a function or pipeline this replica published, for the next
    /// resync; the map holds only those still in the catalog, so it is as bounded as the catalog.
    pub(super) fn published_at(&self, id: &str, revision: u64) {
        let current = self.catalog.current();
        let pipelines = self.catalog.pipelines().load().1;
        let mut published = self.published.borrow_mut();
        published.retain(|id, _| current.contains_key(id) || pipelines.contains_key(id));
        published.insert(id.to_string(), revision);
    }

    /// Publishes a function of this cache, with its stored files, to the registry.
    fn republish(&self, record: &FunctionRecord) -> Result<u64, String> {
        let Some(registry) = &self.registry else { return Ok(0) };
        let wasm = self.store.read_module(&record.digest).map_err(|e| format!("its module: {e}"))?;
        let tensors = match &record.tensors {
            Some(t) => Some((
                t.as_str(),
                self.store
                    .read_tensors(t, self.limits.max_function_tensors_bytes)
                    .map_err(|e| format!("its tensors: {e}"))?,
            )),
            None => None,
        };
        registry
            .publish(record, &wasm, tensors.as_ref().map(|(d, f)| (*d, f.as_slice())), None)
            .map_err(|e| format!("{e:?}"))
    }
}

//! Deploys and deletes through the API: a deploy is checked on the worker, compiled on the compile
//! thread, then stored and published; a delete removes the record and unpublishes.

use std::collections::{BTreeMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use wasmtime::Module;

use super::Worker;
use crate::error::ApiError;
use crate::functions::catalog::FunctionMap;
use crate::functions::record::{new_id, validate_env, validate_name, Abi, Source};
use crate::functions::registry;
use crate::functions::store::digest_of;
use crate::functions::{DeployedFunction, FunctionRecord};
use futures_channel::oneshot;
use std::sync::{Arc, Weak};
use tensor_wasm_dispatch::Weights;

/// What `check_deploy` found: the body (its module and tensors taken out), the timeout, the
/// memory cap, the module's bytes and the tensors.
pub(super) type CheckedDeploy = (DeployBody, u64, u32, Vec<u8>, Option<DeployTensors>);

/// A deploy as it arrives: the raw JSON body, parsed on the worker so that a 64 MiB body never
/// stalls a shard.
pub struct DeployRequest {
    pub body: Vec<u8>,
    pub tenant_id: u64,
}

pub(super) type DeployReply = oneshot::Sender<Result<FunctionRecord, ApiError>>;

/// A deploy checked up to its compile, while its module compiles on the compile thread.
pub struct PendingDeploy {
    pub(super) name: String,
    pub(super) abi: Abi,
    pub(super) env: BTreeMap<String, String>,
    pub(super) timeout_ms: u64,
    pub(super) memory_limit_mb: u32,
    pub(super) tenant_id: u64,
    pub(super) wasm: Vec<u8>,
    pub(super) digest: String,
    pub(super) tensors: Option<DeployTensors>,
    /// With a NATS registry: the name's revision when the deploy started, which it must still
    /// have when the deploy is published (`registry::NameClaim`).
    pub(super) claim: Option<registry::NameClaim>,
    pub(super) reply: DeployReply,
}

/// A deploy's resident tensors: the safetensors file as sent, and what it holds.
pub struct DeployTensors {
    pub(super) digest: String,
    pub(super) file: Vec<u8>,
    pub(super) weights: Arc<Weights>,
}

/// The body of `POST /functions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployBody {
    pub name: String,
    pub wasm_b64: String,
    pub timeout_ms: Option<serde_json::Number>,
    pub memory_limit_mb: Option<serde_json::Number>,
    pub abi: Option<Abi>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A safetensors file, base64: the function's resident tensors (`tensor_weight`).
    pub tensors_b64: Option<String>,
}

impl DeployBody {
    /// Parses a deploy body: `invalid_json` when it is not JSON, `invalid_request` when its
    /// fields are wrong.
    pub fn parse(body: &[u8]) -> Result<DeployBody, ApiError> {
        serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                ApiError::InvalidRequest(format!("invalid deploy request: {e}"))
            } else {
                ApiError::InvalidJson(e.to_string())
            }
        })
    }
}

impl Worker {
    /// The storage quota's lower bound before a compile: what the tenant's modules take, plus
    /// this module's bytes (its artifact, unknown yet, comes on top and is checked after).
    pub(super) fn check_storage_floor(&self, pending: &PendingDeploy) -> Result<(), ApiError> {
        let current = self.catalog.current();
        let digests: HashSet<&str> = current
            .values()
            .map(|f| &f.record)
            .filter(|r| r.source == Source::Api && r.tenant_id == pending.tenant_id)
            .map(|r| r.digest.as_str())
            .collect();
        let module = if digests.contains(pending.digest.as_str()) { 0 } else { pending.wasm.len() as u64 };
        let tensors = match &pending.tensors {
            Some(t) if !self.tenant_tensors(pending.tenant_id).contains(&t.digest) => t.file.len() as u64,
            _ => 0,
        };
        if module + tensors == 0 {
            return Ok(());
        }
        let used = self.storage_used(pending.tenant_id) + module + tensors;
        let limit = self.limits.max_storage_bytes_per_tenant;
        if used > limit {
            return Err(ApiError::QuotaExceeded { what: "storage", used, limit });
        }
        Ok(())
    }

    /// Refuses a write of `needed` bytes that would leave the data dir's file system with less
    /// than the audit log's reserve: deploys must never take the room every tenant's audit
    /// records need.
    pub(super) fn check_reserve(&self, needed: u64) -> Result<(), ApiError> {
        let free = self.store.free_bytes().map_err(|e| ApiError::Storage(format!("cannot read free space: {e}")))?;
        let reserve = self.limits.audit_reserve_bytes;
        if free.saturating_sub(needed) < reserve {
            return Err(ApiError::InsufficientStorage { needed, reserve });
        }
        Ok(())
    }

    /// Checks a deploy up to its compile: answered at once when refused or when its module is
    /// live already, else handed to the compile thread.
    pub(super) fn start_deploy(&self, req: DeployRequest, reply: DeployReply) {
        let mut pending = match self.prepare_deploy(req, reply) {
            Ok(pending) => pending,
            Err((reply, e)) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        // The name's revision now, before the compile: a deploy of the same name published on any
        // replica from here until this one publishes makes this one lose (409 `conflict`).
        if let Some(registry) = &self.registry {
            match registry.name_revision(pending.tenant_id, &pending.name) {
                Ok(claim) => pending.claim = Some(claim),
                Err(e) => {
                    let _ = pending.reply.send(Err(e.into()));
                    return;
                }
            }
        }
        if let Some(module) = self.catalog.module_with_digest(&pending.digest) {
            let outcome = self.finish_deploy(&pending, module);
            let _ = pending.reply.send(outcome);
            return;
        }
        // Refused before compiling when even the module alone would pass the tenant's storage
        // quota or eat into the reserve: a compile can take --compile-wall-timeout-ms.
        let early = self.check_storage_floor(&pending).and_then(|()| match self.store.verify_module(&pending.digest) {
            Ok(()) => Ok(()),
            Err(_) => self.check_reserve(pending.wasm.len() as u64),
        });
        if let Err(e) = early {
            let _ = pending.reply.send(Err(e));
            return;
        }
        match self.compiler.send(pending) {
            Ok(()) => self.compiling.set(true),
            Err(std::sync::mpsc::SendError(pending)) => {
                let _ = pending.reply.send(Err(ApiError::Internal("the compile thread stopped".into())));
            }
        }
    }

    pub(super) fn prepare_deploy(
        &self,
        req: DeployRequest,
        reply: DeployReply,
    ) -> Result<PendingDeploy, (DeployReply, ApiError)> {
        match self.check_deploy(&req) {
            Ok((body, timeout_ms, memory_limit_mb, wasm, tensors)) => Ok(PendingDeploy {
                digest: digest_of(&wasm),
                tensors,
                name: body.name,
                abi: body.abi.unwrap_or_default(),
                env: body.env,
                timeout_ms,
                memory_limit_mb,
                tenant_id: req.tenant_id,
                wasm,
                claim: None,
                reply,
            }),
            Err(e) => Err((reply, e)),
        }
    }

    /// The checks before a compile: the body, the name, the limits, the function quota; and the
    /// module's bytes.
    pub(super) fn check_deploy(&self, req: &DeployRequest) -> Result<CheckedDeploy, ApiError> {
        let body = DeployBody::parse(&req.body)?;
        validate_name(&body.name).map_err(ApiError::InvalidName)?;
        let (timeout_ms, memory_limit_mb) = self.resolve_limits(body.timeout_ms, body.memory_limit_mb)?;
        validate_env(&body.env).map_err(ApiError::InvalidRequest)?;
        let current = self.catalog.current();
        let taken = current
            .values()
            .map(|f| &f.record)
            .find(|r| r.source == Source::Directory && r.tenant_id == req.tenant_id && r.name == body.name);
        if taken.is_some() {
            return Err(ApiError::ManagedByDirectory { what: "function", name: body.name });
        }
        // The cheap quota first: before anything is decoded or compiled.
        let owned: Vec<&FunctionRecord> = current
            .values()
            .map(|f| &f.record)
            .filter(|r| r.source == Source::Api && r.tenant_id == req.tenant_id)
            .collect();
        let limit = self.limits.max_functions_per_tenant;
        if owned.len() >= limit as usize {
            return Err(ApiError::QuotaExceeded { what: "functions", used: owned.len() as u64, limit: limit.into() });
        }
        let wasm = base64::engine::general_purpose::STANDARD
            .decode(body.wasm_b64.trim())
            .map_err(|e| ApiError::InvalidBase64(e.to_string()))?;
        let tensors = match &body.tensors_b64 {
            Some(b64) => Some(self.check_tensors(b64, req.tenant_id)?),
            None => None,
        };
        let body =
            DeployBody { wasm_b64: String::new(), tensors_b64: None, timeout_ms: None, memory_limit_mb: None, ..body };
        Ok((body, timeout_ms, memory_limit_mb, wasm, tensors))
    }

    /// A deploy's `tensors_b64`: decoded within `--max-function-tensors-mb` and read as a
    /// safetensors file (`Weights::parse`), or 400 `invalid_tensors` saying what is wrong.
    fn check_tensors(&self, b64: &str, tenant: u64) -> Result<DeployTensors, ApiError> {
        let limit = self.limits.max_function_tensors_bytes;
        let b64 = b64.trim();
        // Refused from its length, before a byte is decoded: base64 is 4 characters per 3 bytes.
        if (b64.len() as u64 / 4).saturating_mul(3) > limit {
            return Err(ApiError::InvalidTensors(format!(
                "the tensors take more than --max-function-tensors-mb ({limit} bytes)"
            )));
        }
        let file = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::InvalidTensors(format!("`tensors_b64` is not base64: {e}")))?;
        if file.len() as u64 > limit {
            return Err(ApiError::InvalidTensors(format!(
                "the tensors take {} bytes, more than --max-function-tensors-mb ({limit} bytes)",
                file.len()
            )));
        }
        let digest = digest_of(&file);
        let weights = self.weights_of(tenant, &digest, &file).map_err(ApiError::InvalidTensors)?;
        Ok(DeployTensors { digest, file, weights })
    }

    /// The tenant's parsed copy of the tensor file `digest`: the one a live function already
    /// shares, or `file` parsed now. One host copy and one device copy per tenant and file, however
    /// many of its functions carry it.
    pub(super) fn weights_of(&self, tenant: u64, digest: &str, file: &[u8]) -> Result<Arc<Weights>, String> {
        let key = (tenant, digest.to_string());
        let mut interned = self.weights.borrow_mut();
        if let Some(weights) = interned.get(&key).and_then(Weak::upgrade) {
            return Ok(weights);
        }
        // Dead entries go when a new one comes: the map stays as large as the live files.
        interned.retain(|_, w| w.strong_count() > 0);
        let weights = Arc::new(Weights::parse(file, tenant, self.limits.max_tensor_elements)?);
        interned.insert(key, Arc::downgrade(&weights));
        Ok(weights)
    }

    /// Distinct tensor files the tenant's API functions use.
    fn tenant_tensors(&self, tenant: u64) -> HashSet<String> {
        let current = self.catalog.current();
        current
            .values()
            .map(|f| &f.record)
            .filter(|r| r.source == Source::Api && r.tenant_id == tenant)
            .filter_map(|r| r.tensors.clone())
            .collect()
    }

    /// What the tenant's API functions take in the store: each distinct module (with its
    /// artifact) and each distinct tensor file once.
    fn storage_used(&self, tenant: u64) -> u64 {
        let current = self.catalog.current();
        let owned: Vec<&FunctionRecord> =
            current.values().map(|f| &f.record).filter(|r| r.source == Source::Api && r.tenant_id == tenant).collect();
        let modules: HashSet<&str> = owned.iter().map(|r| r.digest.as_str()).collect();
        let tensors: HashSet<&str> = owned.iter().filter_map(|r| r.tensors.as_deref()).collect();
        modules.iter().map(|d| self.store.stored_bytes(d)).sum::<u64>()
            + tensors.iter().map(|d| self.store.tensors_bytes(d)).sum::<u64>()
    }

    /// A stored function's resident tensors: none, or read from the store and parsed again. The
    /// reason names the file, for a broken function's listing.
    pub(super) fn stored_weights(&self, record: &FunctionRecord) -> Result<Option<Arc<Weights>>, String> {
        let Some(digest) = &record.tensors else { return Ok(None) };
        let key = (record.tenant_id, digest.clone());
        if let Some(weights) = self.weights.borrow().get(&key).and_then(Weak::upgrade) {
            return Ok(Some(weights));
        }
        let file = self
            .store
            .read_tensors(digest, self.limits.max_function_tensors_bytes)
            .map_err(|e| format!("its tensors {digest}: {}", crate::functions::store::describe(&e)))?;
        let weights =
            self.weights_of(record.tenant_id, digest, &file).map_err(|e| format!("its tensors {digest}: {e}"))?;
        Ok(Some(weights))
    }

    /// Stores a compiled deploy and publishes it, within the tenant's storage quota and the
    /// audit log's reserve.
    pub(super) fn finish_deploy(&self, pending: &PendingDeploy, module: Module) -> Result<FunctionRecord, ApiError> {
        let PendingDeploy { wasm, digest, tenant_id, .. } = pending;
        // Before anything is written: a refused deploy must leave no file behind.
        check_abi(pending.abi, &module).map_err(ApiError::InvalidRequest)?;
        let current = self.catalog.current();
        let owned: Vec<&FunctionRecord> = current
            .values()
            .map(|f| &f.record)
            .filter(|r| r.source == Source::Api && r.tenant_id == *tenant_id)
            .collect();
        // A module or tensor file the tenant does not use yet counts against its storage quota (a
        // file shared with another tenant counts for each), and a new file against the audit
        // log's reserve. Checked before anything is written: a refused deploy leaves no file.
        let module_new = !owned.iter().any(|r| r.digest == *digest);
        let module_stored = self.store.verify_module(digest).is_ok();
        let artifact = if module_stored {
            None
        } else {
            Some(module.serialize().map_err(|e| ApiError::Internal(format!("{e:#}")))?)
        };
        let module_adding = match (&artifact, module_new) {
            (_, false) => 0,
            (Some(artifact), true) => (wasm.len() + artifact.len()) as u64,
            (None, true) => self.store.stored_bytes(digest),
        };
        let tensors = pending.tensors.as_ref();
        let tensors_new = tensors.is_some_and(|t| !owned.iter().any(|r| r.tensors.as_ref() == Some(&t.digest)));
        let tensors_stored =
            tensors.is_some_and(|t| self.store.read_tensors(&t.digest, self.limits.max_function_tensors_bytes).is_ok());
        let tensors_adding = match tensors {
            Some(t) if tensors_new => t.file.len() as u64,
            _ => 0,
        };
        if module_adding + tensors_adding > 0 {
            let used = self.storage_used(*tenant_id) + module_adding + tensors_adding;
            let limit = self.limits.max_storage_bytes_per_tenant;
            if used > limit {
                return Err(ApiError::QuotaExceeded { what: "storage", used, limit });
            }
        }
        let writing = artifact.as_ref().map_or(0, |a| (wasm.len() + a.len()) as u64)
            + tensors.filter(|_| !tensors_stored).map_or(0, |t| t.file.len() as u64);
        if writing > 0 {
            self.check_reserve(writing)?;
        }
        // Live modules of directory functions are not in the store, and a stored copy may be
        // missing or corrupt: these bytes store or repair it (and its artifact).
        let module_written = artifact.is_some();
        if let Some(artifact) = artifact {
            self.store.write_module(digest, wasm).map_err(|e| ApiError::Storage(e.to_string()))?;
            if let Err(e) = self.store.write_artifact(digest, &artifact) {
                // Not fatal: the next start recompiles.
                tracing::warn!(digest, "cannot save the precompiled artifact: {e}");
            }
        }
        if let Some(t) = tensors.filter(|_| !tensors_stored) {
            if let Err(e) = self.store.write_tensors(&t.digest, &t.file) {
                // A module this deploy wrote and no record refers to would count against no quota.
                if module_written && !current.values().any(|f| f.record.digest == *digest) {
                    let _ = self.store.remove_module(digest);
                }
                return Err(ApiError::Storage(e.to_string()));
            }
        }
        let record = FunctionRecord {
            id: new_id(),
            name: pending.name.clone(),
            digest: digest.clone(),
            created_unix_ms: self.next_created_ms(),
            timeout_ms: pending.timeout_ms,
            memory_limit_mb: pending.memory_limit_mb,
            tenant_id: *tenant_id,
            abi: pending.abi,
            source: Source::Api,
            env: pending.env.clone(),
            tensors: tensors.map(|t| t.digest.clone()),
        };
        // Files no record refers to would count against no quota: gone with a deploy that fails
        // from here. A broken function's record refers to them too, so its files stay.
        let discard = || {
            if !current.values().any(|f| f.record.digest == *digest) {
                let _ = self.store.remove_module(digest);
            }
            if let Some(t) = tensors.filter(|t| !current.values().any(|f| f.record.tensors.as_ref() == Some(&t.digest)))
            {
                let _ = self.store.remove_tensors(&t.digest);
            }
        };
        // The fleet's copy first: answered 201 only once JetStream holds the module, the tensors
        // and the record; refused, nothing changed anywhere.
        if let Some(registry) = &self.registry {
            let files = tensors.map(|t| (t.digest.as_str(), t.file.as_slice()));
            match registry.publish(&record, wasm, files, pending.claim.as_ref()) {
                Ok(revision) => self.published_at(&record.id, revision),
                Err(e) => {
                    discard();
                    return Err(e.into());
                }
            }
        }
        if let Err(e) = self.store.write_record(&record) {
            discard();
            return Err(ApiError::Storage(e.to_string()));
        }
        let revived = self.revive(&current, digest, &module, tensors.map(|t| t.digest.as_str()));
        let deployed = DeployedFunction::new(record.clone(), module).with_weights(tensors.map(|t| t.weights.clone()));
        self.catalog.insert_all(revived.into_iter().chain([deployed]));
        Ok(record)
    }

    /// A module a live function runs, or else the store's (its artifact, or compiled again).
    fn live_or_stored_module(&self, digest: &str) -> Option<Module> {
        if let Some(module) = self.catalog.module_with_digest(digest) {
            return Some(module);
        }
        let mut loaded = self.loader().load_all(&[digest.to_string()], 1);
        loaded.remove(digest)?.module.ok()
    }

    /// Functions left broken by a missing or corrupt copy of the module (`digest`) or tensor file
    /// (`tensors`) that a deploy just stored intact, which run again if their other files are
    /// intact too.
    fn revive(
        &self,
        current: &FunctionMap,
        digest: &str,
        module: &Module,
        tensors: Option<&str>,
    ) -> Vec<DeployedFunction> {
        let revived: Vec<DeployedFunction> = current
            .values()
            .filter(|f| f.module.is_err())
            .filter(|f| f.record.digest == digest || (tensors.is_some() && f.record.tensors.as_deref() == tensors))
            .filter_map(|f| {
                let module = if f.record.digest == digest {
                    Some(module.clone())
                } else {
                    self.live_or_stored_module(&f.record.digest)
                }?;
                let weights = self.stored_weights(&f.record).ok()?;
                Some(DeployedFunction::new(f.record.clone(), module).with_weights(weights))
            })
            .collect();
        if !revived.is_empty() {
            tracing::info!(digest, functions = revived.len(), "broken functions repaired by a deploy of their files");
        }
        revived
    }

    /// A function's timeout and memory cap: the defaults, or the given values within the maxima.
    pub(super) fn resolve_limits(
        &self,
        timeout_ms: Option<serde_json::Number>,
        memory_limit_mb: Option<serde_json::Number>,
    ) -> Result<(u64, u32), ApiError> {
        let limits = &self.limits;
        let timeout_ms = match timeout_ms {
            None => limits.default_timeout_ms,
            Some(n) => in_range(&n, limits.max_timeout_ms)
                .ok_or(ApiError::InvalidTimeout { given: clamp_i128(&n), max: limits.max_timeout_ms })?,
        };
        let memory_limit_mb = match memory_limit_mb {
            None => limits.default_memory_limit_mb,
            Some(n) => in_range(&n, limits.max_memory_limit_mb.into())
                .ok_or(ApiError::InvalidMemoryLimit { given: clamp_i128(&n), max: limits.max_memory_limit_mb })?
                as u32,
        };
        Ok((timeout_ms, memory_limit_mb))
    }

    pub(super) fn next_created_ms(&self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let created = now.max(self.last_created_ms.get() + 1);
        self.last_created_ms.set(created);
        created
    }

    pub(super) fn delete(&self, id: &str, tenant: u64) -> Result<(), ApiError> {
        let Some(function) = self.catalog.get(id).filter(|f| f.record.tenant_id == tenant) else {
            return Err(ApiError::FunctionNotFound(id.to_string()));
        };
        if function.record.source == Source::Directory {
            return Err(ApiError::ManagedByDirectory { what: "function", name: function.record.name.clone() });
        }
        // The fleet's copy first: every replica's watch then removes the function. Its files go
        // from the object store too when no other function of the fleet's catalog (which this
        // replica's mirrors) uses them: left there, a tenant deploying and deleting new modules
        // would fill the store for every tenant.
        if let Some(registry) = &self.registry {
            let current = self.catalog.current();
            let others = || current.values().map(|f| &f.record).filter(|r| r.source == Source::Api && r.id != id);
            let mut unused = Vec::new();
            if !others().any(|r| r.digest == function.record.digest) {
                unused.push(function.record.digest.clone());
            }
            if let Some(tensors) = &function.record.tensors {
                if !others().any(|r| r.tensors.as_ref() == Some(tensors)) {
                    unused.push(tensors.clone());
                }
            }
            registry.remove(&function.record, unused)?;
        }
        self.forget(&function)
    }

    /// Removes an API function from this replica: its record, its catalog entry, and the files
    /// that no other function uses.
    pub(super) fn forget(&self, function: &DeployedFunction) -> Result<(), ApiError> {
        let id = function.record.id.as_str();
        self.store.remove_record(id).map_err(|e| ApiError::Storage(e.to_string()))?;
        self.catalog.remove(id);
        // The module goes with its last API function. Where folder functions still run the same
        // bytes, only the stored copy goes: the folder has them, and the artifact is swept with
        // the last of those functions.
        let digest = &function.record.digest;
        let current = self.catalog.current();
        let used_by = |source| current.values().any(|f| f.record.digest == *digest && f.record.source == source);
        let removed = match (used_by(Source::Api), used_by(Source::Directory)) {
            (true, _) => Ok(()),
            (false, true) => self.store.remove_module_bytes(digest),
            (false, false) => self.store.remove_module(digest),
        };
        if let Err(e) = removed {
            tracing::warn!(digest, "cannot remove an unused module: {e}");
        }
        // The tensor file goes with its last API function too (directory functions read theirs
        // from the folder). The device copies go with the function's last holder (`Resident`).
        if let Some(tensors) = &function.record.tensors {
            let used =
                current.values().any(|f| f.record.tensors.as_ref() == Some(tensors) && f.record.source == Source::Api);
            if !used {
                if let Err(e) = self.store.remove_tensors(tensors) {
                    tracing::warn!(tensors, "cannot remove an unused tensor file: {e}");
                }
            }
        }
        Ok(())
    }
}

/// `n` as an integer in `1..=max`.
fn in_range(n: &serde_json::Number, max: u64) -> Option<u64> {
    n.as_u64().filter(|v| (1..=max).contains(v))
}

fn clamp_i128(n: &serde_json::Number) -> i128 {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
        .or_else(|| n.as_f64().map(|f| f as i128))
        .unwrap_or(0)
}

/// An envelope function is a WASI command: its envelope is its stdin and stdout.
pub(super) fn check_abi(abi: Abi, module: &Module) -> Result<(), String> {
    if abi == Abi::Envelope && module.get_export("_start").is_none() {
        return Err("`abi = \"envelope\"` needs a module with `_start` (a WASI command)".into());
    }
    Ok(())
}

/// Whether a reloaded function is the one already live: then shards keep their pre-linked copy.
pub(super) fn same_function(a: &FunctionRecord, b: &FunctionRecord) -> bool {
    FunctionRecord { created_unix_ms: b.created_unix_ms, ..a.clone() } == *b
}

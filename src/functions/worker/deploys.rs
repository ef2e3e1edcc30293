//! Deploys and deletes through the API: a deploy is checked on the worker, compiled on the compile
//! thread, then stored and published; a delete removes the record and unpublishes.

use std::collections::{BTreeMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use wasmtime::Module;

use super::Worker;
use crate::error::ApiError;
use crate::functions::record::{new_id, validate_env, validate_name, Abi, Source};
use crate::functions::store::digest_of;
use crate::functions::{DeployedFunction, FunctionRecord};
use futures_channel::oneshot;

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
    pub(super) reply: DeployReply,
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
        if digests.contains(pending.digest.as_str()) {
            return Ok(());
        }
        let used: u64 = digests.iter().map(|d| self.store.stored_bytes(d)).sum::<u64>() + pending.wasm.len() as u64;
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
        let pending = match self.prepare_deploy(req, reply) {
            Ok(pending) => pending,
            Err((reply, e)) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
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
            Ok((body, timeout_ms, memory_limit_mb, wasm)) => Ok(PendingDeploy {
                digest: digest_of(&wasm),
                name: body.name,
                abi: body.abi.unwrap_or_default(),
                env: body.env,
                timeout_ms,
                memory_limit_mb,
                tenant_id: req.tenant_id,
                wasm,
                reply,
            }),
            Err(e) => Err((reply, e)),
        }
    }

    /// The checks before a compile: the body, the name, the limits, the function quota; and the
    /// module's bytes.
    pub(super) fn check_deploy(&self, req: &DeployRequest) -> Result<(DeployBody, u64, u32, Vec<u8>), ApiError> {
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
        let body = DeployBody { wasm_b64: String::new(), timeout_ms: None, memory_limit_mb: None, ..body };
        Ok((body, timeout_ms, memory_limit_mb, wasm))
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
        // A module the tenant does not use yet counts against its storage quota (a module shared
        // with another tenant counts for each), and a new file against the audit log's reserve.
        if !owned.iter().any(|r| r.digest == *digest) {
            let used: u64 = owned
                .iter()
                .map(|r| r.digest.as_str())
                .collect::<HashSet<_>>()
                .iter()
                .map(|d| self.store.stored_bytes(d))
                .sum();
            let stored = self.store.verify_module(digest).is_ok();
            let artifact =
                if stored { None } else { Some(module.serialize().map_err(|e| ApiError::Internal(format!("{e:#}")))?) };
            let adding = match &artifact {
                Some(artifact) => (wasm.len() + artifact.len()) as u64,
                None => self.store.stored_bytes(digest),
            };
            let limit = self.limits.max_storage_bytes_per_tenant;
            if used + adding > limit {
                return Err(ApiError::QuotaExceeded { what: "storage", used: used + adding, limit });
            }
            // Live modules of directory functions are not in the store: a deploy of the same bytes
            // must still store them, or the function would not survive a restart.
            if let Some(artifact) = artifact {
                self.check_reserve(adding)?;
                self.store.write_module(digest, wasm).map_err(|e| ApiError::Storage(e.to_string()))?;
                if let Err(e) = self.store.write_artifact(digest, &artifact) {
                    // Not fatal: the next start recompiles.
                    tracing::warn!(digest, "cannot save the precompiled artifact: {e}");
                }
            }
        } else if self.store.verify_module(digest).is_err() {
            // Missing or corrupt: these bytes repair it (and its artifact, which may be gone too).
            self.check_reserve(wasm.len() as u64)?;
            self.store.write_module(digest, wasm).map_err(|e| ApiError::Storage(e.to_string()))?;
            self.loader().save_artifact(digest, &module);
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
        };
        if let Err(e) = self.store.write_record(&record) {
            // Files no record refers to would count against no quota: gone with the deploy. A
            // broken function's record refers to them too, so its files stay.
            if !current.values().any(|f| f.record.digest == *digest) {
                let _ = self.store.remove_module(digest);
            }
            return Err(ApiError::Storage(e.to_string()));
        }
        // Functions left broken by a missing or corrupt copy of these bytes run again: the store
        // has them intact now.
        let revived: Vec<DeployedFunction> = current
            .values()
            .filter(|f| f.module.is_err() && f.record.digest == *digest)
            .map(|f| DeployedFunction::new(f.record.clone(), module.clone()))
            .collect();
        if !revived.is_empty() {
            tracing::info!(digest, functions = revived.len(), "broken functions repaired by a deploy of their module");
        }
        self.catalog.insert_all(revived.into_iter().chain([DeployedFunction::new(record.clone(), module)]));
        Ok(record)
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

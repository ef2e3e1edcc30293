//! The catalog worker: one thread that loads the store at start-up, then performs deploys and
//! deletes one at a time. Serialising mutations here keeps the store and the catalog consistent
//! without any locking protocol; compiling itself still uses wasmtime's parallel compiler.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_channel::oneshot;
use serde::Deserialize;
use wasmtime::{Engine, Linker, Module};

use super::record::{new_id, validate_name};
use super::store::digest_of;
use super::{Catalog, DeployedFunction, FunctionRecord, FunctionStore};
use crate::config::Limits;
use crate::error::ApiError;
use crate::wasm::{check_module, module::check_compiled, new_linker, GuestState};

/// A deploy as it arrives: the raw JSON body, parsed on the worker so that a 64 MiB body never
/// stalls a shard.
pub struct DeployRequest {
    pub body: Vec<u8>,
    pub tenant_id: u64,
}

enum Job {
    Deploy(DeployRequest, oneshot::Sender<Result<FunctionRecord, ApiError>>),
    Delete { id: String, tenant: u64, reply: oneshot::Sender<Result<(), ApiError>> },
}

/// A shard's handle to the worker. Submitting never blocks: a full queue is 503 `overloaded`.
#[derive(Clone)]
pub struct AdminHandle {
    tx: SyncSender<Job>,
}

impl AdminHandle {
    pub async fn deploy(&self, req: DeployRequest) -> Result<FunctionRecord, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Deploy(req, tx))?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// Deletes `id` if `tenant` owns it; another tenant's function is "not found".
    pub async fn delete(&self, id: String, tenant: u64) -> Result<(), ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Delete { id, tenant, reply: tx })?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => ApiError::Overloaded("the deploy queue is full"),
            TrySendError::Disconnected(_) => ApiError::Internal("the catalog worker stopped".into()),
        })
    }
}

/// Starts the worker; it loads the store before serving its queue of `queue_depth` jobs.
pub fn spawn(
    engine: Engine,
    store: FunctionStore,
    catalog: Arc<Catalog>,
    limits: Arc<Limits>,
    queue_depth: usize,
) -> std::io::Result<(AdminHandle, JoinHandle<()>)> {
    let (tx, rx) = sync_channel(queue_depth);
    let thread = std::thread::Builder::new().name("tw-catalog".into()).spawn(move || {
        let linker = match new_linker(&engine) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot build the WASI linker: {e:#}");
                return;
            }
        };
        let worker = Worker { engine, linker, store, catalog, limits, last_created_ms: Cell::new(0) };
        worker.load();
        worker.serve(rx);
    })?;
    Ok((AdminHandle { tx }, thread))
}

struct Worker {
    engine: Engine,
    linker: Linker<GuestState>,
    store: FunctionStore,
    catalog: Arc<Catalog>,
    limits: Arc<Limits>,
    /// Creation times handed out are strictly increasing, so listing by creation is exact even
    /// for deploys within one millisecond (which then land a millisecond apart).
    last_created_ms: Cell<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    name: String,
    wasm_b64: String,
    timeout_ms: Option<serde_json::Number>,
    memory_limit_mb: Option<serde_json::Number>,
}

impl Worker {
    fn serve(&self, rx: Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Deploy(req, reply) => {
                    let _ = reply.send(self.deploy(req));
                }
                Job::Delete { id, tenant, reply } => {
                    let _ = reply.send(self.delete(&id, tenant));
                }
            }
        }
    }

    /// Loads every stored function. A function whose module cannot be loaded is logged and left
    /// out; the others serve. Artifacts are reused; a corrupt or incompatible one is recompiled.
    fn load(&self) {
        let started = Instant::now();
        let records = match self.store.list_records() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot list stored functions: {e}");
                self.catalog.mark_loaded();
                return;
            }
        };
        let mut modules: HashMap<String, Option<Module>> = HashMap::new();
        let mut live = Vec::new();
        let (mut recompiled, mut failed) = (0usize, 0usize);
        for record in records {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("skipping unreadable function record {e}");
                    failed += 1;
                    continue;
                }
            };
            let module = modules
                .entry(record.digest.clone())
                .or_insert_with(|| self.load_module(&record.digest, &mut recompiled))
                .clone();
            self.last_created_ms.set(self.last_created_ms.get().max(record.created_unix_ms));
            match module {
                Some(module) => live.push(DeployedFunction::new(record, module)),
                None => failed += 1,
            }
        }
        // Logged before readiness flips, so that anything watching the log sees it by then.
        tracing::info!(
            functions = live.len(),
            modules = modules.len(),
            recompiled,
            failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "stored functions loaded"
        );
        self.catalog.insert_all(live);
        self.catalog.mark_loaded();
    }

    fn load_module(&self, digest: &str, recompiled: &mut usize) -> Option<Module> {
        if let Ok(bytes) = self.store.read_artifact(digest) {
            // SAFETY: the bytes are wasmtime's own serialisation, written by this program and
            // verified against their SHA-256 just now; wasmtime itself rejects artifacts of
            // another version or configuration.
            match unsafe { Module::deserialize(&self.engine, &bytes) } {
                Ok(m) if check_compiled(&self.linker, &m).is_ok() => return Some(m),
                Ok(_) => {}
                Err(e) => tracing::warn!(digest, "artifact not usable, recompiling: {e:#}"),
            }
        } else {
            tracing::warn!(digest, "artifact missing or corrupt, recompiling");
        }
        let wasm = match self.store.read_module(digest) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(digest, "module unreadable, its functions are not served: {e}");
                return None;
            }
        };
        match check_module(&self.engine, &self.linker, &wasm) {
            Ok(module) => {
                *recompiled += 1;
                self.save_artifact(digest, &module);
                Some(module)
            }
            Err(e) => {
                tracing::error!(digest, "module no longer accepted, its functions are not served: {e}");
                None
            }
        }
    }

    fn save_artifact(&self, digest: &str, module: &Module) {
        let saved = module
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|bytes| self.store.write_artifact(digest, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = saved {
            // Not fatal: the next start recompiles.
            tracing::warn!(digest, "cannot save the precompiled artifact: {e}");
        }
    }

    fn deploy(&self, req: DeployRequest) -> Result<FunctionRecord, ApiError> {
        let body: DeployBody = serde_json::from_slice(&req.body).map_err(|e| {
            if e.is_data() {
                ApiError::InvalidRequest(format!("invalid deploy request: {e}"))
            } else {
                ApiError::InvalidJson(e.to_string())
            }
        })?;
        validate_name(&body.name).map_err(ApiError::InvalidName)?;
        let timeout_ms = match body.timeout_ms {
            None => self.limits.default_timeout_ms,
            Some(n) => in_range(&n, self.limits.max_timeout_ms)
                .ok_or(ApiError::InvalidTimeout { given: clamp_i128(&n), max: self.limits.max_timeout_ms })?,
        };
        let memory_limit_mb = match body.memory_limit_mb {
            None => self.limits.default_memory_limit_mb,
            Some(n) => in_range(&n, self.limits.max_memory_limit_mb.into())
                .ok_or(ApiError::InvalidMemoryLimit { given: clamp_i128(&n), max: self.limits.max_memory_limit_mb })?
                as u32,
        };
        let wasm = base64::engine::general_purpose::STANDARD
            .decode(body.wasm_b64.trim())
            .map_err(|e| ApiError::InvalidBase64(e.to_string()))?;
        let digest = digest_of(&wasm);
        let module = match self.catalog.module_with_digest(&digest) {
            Some(m) => m,
            None => {
                let module = check_module(&self.engine, &self.linker, &wasm)?;
                self.store.write_module(&digest, &wasm).map_err(|e| ApiError::Storage(e.to_string()))?;
                self.save_artifact(&digest, &module);
                module
            }
        };
        let record = FunctionRecord {
            id: new_id(),
            name: body.name,
            digest,
            created_unix_ms: self.next_created_ms(),
            timeout_ms,
            memory_limit_mb,
            tenant_id: req.tenant_id,
        };
        self.store.write_record(&record).map_err(|e| ApiError::Storage(e.to_string()))?;
        self.catalog.insert_all([DeployedFunction::new(record.clone(), module)]);
        Ok(record)
    }

    fn next_created_ms(&self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let created = now.max(self.last_created_ms.get() + 1);
        self.last_created_ms.set(created);
        created
    }

    fn delete(&self, id: &str, tenant: u64) -> Result<(), ApiError> {
        let Some(function) = self.catalog.get(id).filter(|f| f.record.tenant_id == tenant) else {
            return Err(ApiError::FunctionNotFound(id.to_string()));
        };
        self.store.remove_record(id).map_err(|e| ApiError::Storage(e.to_string()))?;
        self.catalog.remove(id);
        let digest = &function.record.digest;
        if self.catalog.module_with_digest(digest).is_none() {
            if let Err(e) = self.store.remove_module(digest) {
                tracing::warn!(digest, "cannot remove an unused module: {e}");
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

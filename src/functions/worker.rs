//! The catalog worker: one thread that loads the store at start-up, then performs deploys and
//! deletes one at a time, and applies the functions directory's changes between them. Serialising
//! mutations here keeps the store and the catalog consistent without any locking protocol;
//! compiling itself still uses wasmtime's parallel compiler.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_channel::oneshot;
use serde::Deserialize;
use wasmtime::{Engine, Linker, Module};

use super::catalog::{FunctionMap, PipelineMap};
use super::directory::{self, FunctionFiles, Stamp};
use super::loader::{self, ModuleLoader};
use super::manifest::FunctionManifest;
use super::queue;
use super::record::{directory_id, new_id, resolve, validate_env, validate_name, Abi, Source};
use super::store::digest_of;
use super::{Catalog, DeployedFunction, FunctionRecord, FunctionStore};
use crate::config::Limits;
use crate::error::ApiError;
use crate::pipelines::{PipelineRecord, PipelineSpec};
use crate::wasm::compile::CompileBudget;
use crate::wasm::module::ModuleShape;
use crate::wasm::GuestProfiler;
use crate::wasm::{new_linker, GuestState};

/// A deploy as it arrives: the raw JSON body, parsed on the worker so that a 64 MiB body never
/// stalls a shard.
pub struct DeployRequest {
    pub body: Vec<u8>,
    pub tenant_id: u64,
}

type DeployReply = oneshot::Sender<Result<FunctionRecord, ApiError>>;

enum Job {
    Deploy(DeployRequest, DeployReply),
    /// A deploy's module, back from the compile thread.
    Compiled(Box<PendingDeploy>, Result<Module, ApiError>),
    Delete {
        id: String,
        tenant: u64,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    CreatePipeline {
        body: Vec<u8>,
        tenant: u64,
        reply: oneshot::Sender<Result<PipelineRecord, ApiError>>,
    },
    DeletePipeline {
        id: String,
        tenant: u64,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// A shard's handle to the worker. Submitting never blocks: a full queue is 503 `overloaded`, a
/// tenant's full share of it 429 `admin_queue_limited`.
#[derive(Clone)]
pub struct AdminHandle {
    tx: queue::Sender<Job>,
    per_tenant: usize,
}

impl AdminHandle {
    pub async fn deploy(&self, req: DeployRequest) -> Result<FunctionRecord, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(req.tenant_id, false, Job::Deploy(req, tx))?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// Deletes `id` if `tenant` owns it; another tenant's function is "not found". Never waits
    /// behind a compile.
    pub async fn delete(&self, id: String, tenant: u64) -> Result<(), ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(tenant, true, Job::Delete { id, tenant, reply: tx })?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// Creates a pipeline from a `POST /pipelines` body.
    pub async fn create_pipeline(&self, body: Vec<u8>, tenant: u64) -> Result<PipelineRecord, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(tenant, true, Job::CreatePipeline { body, tenant, reply: tx })?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// Deletes pipeline `id` if `tenant` owns it, as `delete`.
    pub async fn delete_pipeline(&self, id: String, tenant: u64) -> Result<(), ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(tenant, true, Job::DeletePipeline { id, tenant, reply: tx })?;
        rx.await.map_err(|_| ApiError::Internal("the catalog worker stopped".into()))?
    }

    /// `urgent`: a cheap job, served before any deploy and while a compile runs.
    fn submit(&self, tenant: u64, urgent: bool, job: Job) -> Result<(), ApiError> {
        self.tx.push(tenant, urgent, job).map_err(|e| match e {
            queue::Refused::Full => ApiError::Overloaded("the deploy queue is full"),
            queue::Refused::TenantFull => ApiError::AdminQueueLimited { limit: self.per_tenant },
            queue::Refused::Closed => ApiError::Internal("the catalog worker stopped".into()),
        })
    }
}

/// A deploy checked up to its compile, while its module compiles on the compile thread.
pub struct PendingDeploy {
    name: String,
    abi: Abi,
    env: BTreeMap<String, String>,
    timeout_ms: u64,
    memory_limit_mb: u32,
    tenant_id: u64,
    wasm: Vec<u8>,
    digest: String,
    reply: DeployReply,
}

pub use crate::config::DirectoryConfig;

/// Starts the worker; it loads the store and the functions directory before serving its queue of
/// `queue_depth` jobs.
pub fn spawn(
    engine: Engine,
    store: FunctionStore,
    catalog: Arc<Catalog>,
    limits: Arc<Limits>,
    (queue_depth, per_tenant): (usize, usize),
    directory: Option<DirectoryConfig>,
    profiler: GuestProfiler,
) -> std::io::Result<(AdminHandle, JoinHandle<()>)> {
    let (jobs, tx) = queue::FairQueue::new(queue_depth, per_tenant);
    let compiler =
        spawn_compiler(engine.clone(), (limits.module_shape, limits.compile_budget), profiler, jobs.clone())?;
    let thread = std::thread::Builder::new().name("tw-catalog".into()).spawn(move || {
        // However this thread ends (a panic included), the shards waiting on its jobs hear of it.
        let _gone = ConsumerGone(jobs.clone());
        let linker = match new_linker(&engine) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot build the WASI linker: {e:#}");
                return;
            }
        };
        let directory = directory.map(Watch::new);
        let worker = Worker {
            engine,
            linker,
            store,
            catalog,
            limits,
            last_created_ms: Cell::new(0),
            directory,
            compiler,
            compiling: Cell::new(false),
            profiler,
        };
        worker.load();
        worker.serve(&jobs);
    })?;
    Ok((AdminHandle { tx, per_tenant }, thread))
}

/// Closes the queue's consumer side when dropped (`FairQueue::close_consumer`).
struct ConsumerGone(Arc<queue::FairQueue<Job>>);

impl Drop for ConsumerGone {
    fn drop(&mut self) {
        self.0.close_consumer();
    }
}

/// The compile thread: compiles one deploy's module at a time, off the worker, so that deletes
/// and pipeline changes never wait behind a compile; hands the result back through the queue.
/// The compile itself runs in a child process within the budget (`wasm::compile`).
fn spawn_compiler(
    engine: Engine,
    (shape, budget): (ModuleShape, Option<CompileBudget>),
    profiler: GuestProfiler,
    jobs: Arc<queue::FairQueue<Job>>,
) -> std::io::Result<std::sync::mpsc::Sender<PendingDeploy>> {
    let (tx, rx) = std::sync::mpsc::channel::<PendingDeploy>();
    std::thread::Builder::new().name("tw-compile".into()).spawn(move || {
        let linker = match new_linker(&engine) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot build the WASI linker: {e:#}");
                return;
            }
        };
        // Ends when the worker, the only sender, is gone.
        for pending in rx {
            // A panic here must still hand a result back: the worker takes no other deploy until
            // one comes.
            let compile = || loader::compile(&engine, &linker, &pending.wasm, (&shape, budget), profiler);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(compile))
                .unwrap_or_else(|_| Err(ApiError::Internal("the compile failed unexpectedly".into())));
            jobs.push_result(Job::Compiled(Box::new(pending), result));
        }
    })?;
    Ok(tx)
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
    directory: Option<Watch>,
    /// Deploys to compile; at most one at a time (`compiling`).
    compiler: std::sync::mpsc::Sender<PendingDeploy>,
    /// A deploy's module is on the compile thread: no other deploy is taken until it is back.
    compiling: Cell<bool>,
    profiler: GuestProfiler,
}

/// What the worker last loaded from the functions directory.
struct Watch {
    config: DirectoryConfig,
    last_scan: Cell<Instant>,
    /// Each function's file stamps when last tried, loaded or not: a file that failed is tried
    /// again only when it changes.
    functions: RefCell<HashMap<String, (Stamp, Option<Stamp>)>>,
    /// Each pipeline's stamp when last tried, and whether it loaded.
    pipelines: RefCell<HashMap<String, (Stamp, bool)>>,
    /// Unusable files already logged, so that each is logged (and counted) once.
    reported: RefCell<HashSet<String>>,
    listing_failed: Cell<bool>,
}

impl Watch {
    fn new(config: DirectoryConfig) -> Self {
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
    fn serve(&self, jobs: &queue::FairQueue<Job>) {
        loop {
            let wait = match &self.directory {
                None => Duration::from_secs(3600),
                Some(watch) => watch.config.poll.saturating_sub(watch.last_scan.get().elapsed()),
            };
            match jobs.pop(wait, !self.compiling.get()) {
                Ok(job) => self.perform(job),
                Err(queue::Empty::TimedOut) => {}
                Err(queue::Empty::Closed) => return,
            }
            // After every job too, so that a steady stream of deploys cannot hold the directory back.
            if self.directory.as_ref().is_some_and(|w| w.last_scan.get().elapsed() >= w.config.poll) {
                self.sync_directory();
            }
        }
    }

    fn perform(&self, job: Job) {
        match job {
            Job::Deploy(req, reply) => self.start_deploy(req, reply),
            Job::Compiled(pending, result) => {
                self.compiling.set(false);
                let outcome = result.and_then(|module| self.finish_deploy(&pending, module));
                let _ = pending.reply.send(outcome);
            }
            Job::Delete { id, tenant, reply } => {
                let _ = reply.send(self.delete(&id, tenant));
            }
            Job::CreatePipeline { body, tenant, reply } => {
                let _ = reply.send(self.create_pipeline(&body, tenant));
            }
            Job::DeletePipeline { id, tenant, reply } => {
                let _ = reply.send(self.delete_pipeline(&id, tenant));
            }
        }
    }

    /// Loads every stored function, the modules in parallel (`loader`). A function whose module
    /// cannot be loaded is listed as broken, never dropped; the others serve. Files no record uses
    /// are swept first.
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
        let mut unreadable = 0usize;
        let records: Vec<FunctionRecord> = records
            .into_iter()
            .filter_map(|r| {
                r.map_err(|e| {
                    tracing::error!("skipping unreadable function record {e}");
                    unreadable += 1;
                })
                .ok()
            })
            .collect();
        let referenced: HashSet<&str> = records.iter().map(|r| r.digest.as_str()).collect();
        // An unreadable record may be the one that uses a module: then none is taken for an orphan.
        match self.store.sweep(&referenced, unreadable == 0) {
            Ok(swept) => tracing::info!(
                temp_files = swept.temp_files,
                orphaned_modules = swept.orphaned_modules,
                orphans_kept_for_unreadable_records = unreadable > 0,
                "store swept of what no record uses"
            ),
            Err(e) => tracing::warn!("cannot sweep the store: {e}"),
        }
        let digests: Vec<String> = referenced.iter().map(|d| d.to_string()).collect();
        let loaded = self.loader().load_all(&digests, self.limits.load_threads);
        let (mut live, mut broken) = (Vec::with_capacity(records.len()), 0usize);
        for record in records {
            self.last_created_ms.set(self.last_created_ms.get().max(record.created_unix_ms));
            live.push(match &loaded[&record.digest].module {
                Ok(module) => DeployedFunction::new(record, module.clone()),
                Err(reason) => {
                    broken += 1;
                    DeployedFunction::broken(record, reason.clone())
                }
            });
        }
        // Logged before readiness flips, so that anything watching the log sees it by then.
        tracing::info!(
            functions = live.len(),
            modules = loaded.len(),
            recompiled = loaded.values().filter(|l| l.compiled).count(),
            damaged = loaded.values().filter(|l| l.damaged).count(),
            broken,
            unreadable,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "stored functions loaded"
        );
        self.catalog.insert_all(live);
        self.load_pipelines();
        // A published change swept already; without one, sweep anyway: the folder may have lost
        // files while the server was down.
        if !self.sync_directory() {
            self.sweep_directory_artifacts();
        }
        self.catalog.mark_loaded();
    }

    fn loader(&self) -> ModuleLoader<'_> {
        ModuleLoader {
            engine: &self.engine,
            linker: &self.linker,
            store: &self.store,
            shape: self.limits.module_shape,
            budget: self.limits.compile_budget,
            profiler: self.profiler,
        }
    }

    fn load_pipelines(&self) {
        let records = match self.store.list_pipelines() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot list stored pipelines: {e}");
                return;
            }
        };
        let mut map = PipelineMap::clone(&self.catalog.pipelines().load().1);
        for record in records {
            match record {
                Ok(p) => {
                    self.last_created_ms.set(self.last_created_ms.get().max(p.created_unix_ms));
                    map.insert(p.id.clone(), Arc::new(p));
                }
                Err(e) => tracing::error!("skipping unreadable pipeline record {e}"),
            }
        }
        tracing::info!(pipelines = map.len(), "stored pipelines loaded");
        self.catalog.publish_pipelines(map);
    }

    /// The storage quota's lower bound before a compile: what the tenant's modules take, plus
    /// this module's bytes (its artifact, unknown yet, comes on top and is checked after).
    fn check_storage_floor(&self, pending: &PendingDeploy) -> Result<(), ApiError> {
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
    fn check_reserve(&self, needed: u64) -> Result<(), ApiError> {
        let free = self.store.free_bytes().map_err(|e| ApiError::Storage(format!("cannot read free space: {e}")))?;
        let reserve = self.limits.audit_reserve_bytes;
        if free.saturating_sub(needed) < reserve {
            return Err(ApiError::InsufficientStorage { free, needed, reserve });
        }
        Ok(())
    }

    /// Checks a deploy up to its compile: answered at once when refused or when its module is
    /// live already, else handed to the compile thread.
    fn start_deploy(&self, req: DeployRequest, reply: DeployReply) {
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
        // quota or eat into the reserve: a compile can take --compile-timeout-ms.
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

    fn prepare_deploy(&self, req: DeployRequest, reply: DeployReply) -> Result<PendingDeploy, (DeployReply, ApiError)> {
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
    fn check_deploy(&self, req: &DeployRequest) -> Result<(DeployBody, u64, u32, Vec<u8>), ApiError> {
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
    fn finish_deploy(&self, pending: &PendingDeploy, module: Module) -> Result<FunctionRecord, ApiError> {
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
            // Files no record refers to would count against no quota: gone with the deploy.
            if self.catalog.module_with_digest(digest).is_none() {
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
    fn resolve_limits(
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

/// Pipelines through the API.
impl Worker {
    fn create_pipeline(&self, body: &[u8], tenant: u64) -> Result<PipelineRecord, ApiError> {
        let spec: PipelineSpec = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                ApiError::InvalidPipeline(format!("invalid pipeline: {e}"))
            } else {
                ApiError::InvalidJson(e.to_string())
            }
        })?;
        let Some(name) = spec.name.clone() else {
            return Err(ApiError::InvalidPipeline("`name` is required".into()));
        };
        if spec.tenant.is_some() {
            return Err(ApiError::InvalidPipeline(
                "`tenant` is not part of the body; the request's tenant header sets it".into(),
            ));
        }
        let pipelines = self.catalog.pipelines().load().1;
        if pipelines.values().any(|p| p.source == Source::Directory && p.tenant_id == tenant && p.name == name) {
            return Err(ApiError::ManagedByDirectory { what: "pipeline", name });
        }
        let record = spec.into_record(new_id(), name, tenant, self.next_created_ms(), Source::Api, &self.limits)?;
        check_steps(&self.catalog.current(), &record).map_err(ApiError::InvalidPipeline)?;
        self.store.write_pipeline(&record).map_err(|e| ApiError::Storage(e.to_string()))?;
        let mut map = PipelineMap::clone(&pipelines);
        map.insert(record.id.clone(), Arc::new(record.clone()));
        self.catalog.publish_pipelines(map);
        Ok(record)
    }

    fn delete_pipeline(&self, id: &str, tenant: u64) -> Result<(), ApiError> {
        let pipelines = self.catalog.pipelines().load().1;
        let Some(pipeline) = pipelines.get(id).filter(|p| p.tenant_id == tenant) else {
            return Err(ApiError::PipelineNotFound(id.to_string()));
        };
        if pipeline.source == Source::Directory {
            return Err(ApiError::ManagedByDirectory { what: "pipeline", name: pipeline.name.clone() });
        }
        self.store.remove_pipeline(id).map_err(|e| ApiError::Storage(e.to_string()))?;
        let mut map = PipelineMap::clone(&pipelines);
        map.remove(id);
        self.catalog.publish_pipelines(map);
        Ok(())
    }
}

/// Every step names a function of the pipeline's tenant that can run as a step (has `_start`).
fn check_steps(functions: &FunctionMap, pipeline: &PipelineRecord) -> Result<(), String> {
    for (index, step) in pipeline.steps.iter().enumerate() {
        let records = functions.values().map(|f| &f.record);
        let Some(record) = resolve(records, pipeline.tenant_id, &step.function) else {
            return Err(format!("step {index}: no function `{}` in this tenant", step.function));
        };
        let module = match &functions[&record.id].module {
            Ok(module) => module,
            Err(reason) => return Err(format!("step {index}: function `{}` is broken: {reason}", step.function)),
        };
        if module.get_export("_start").is_none() {
            return Err(format!("step {index}: function `{}` has no `_start`, so it cannot be a step", step.function));
        }
    }
    Ok(())
}

/// The functions directory.
impl Worker {
    /// Lists the directory and applies what changed since the last listing: functions first, then
    /// pipelines, which may name them. Each is published once, so shards see one new generation.
    /// Returns whether functions changed (and unused artifacts were swept).
    fn sync_directory(&self) -> bool {
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

    fn sync_directory_pipelines(
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

    fn load_directory_function(&self, name: &str, id: &str, files: &FunctionFiles) -> Result<DeployedFunction, String> {
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
        let abi = manifest.abi.unwrap_or_default();
        check_abi(abi, &module)?;
        let record = FunctionRecord {
            id: id.to_string(),
            name: name.to_string(),
            digest,
            created_unix_ms: self.next_created_ms(),
            timeout_ms,
            memory_limit_mb,
            tenant_id: manifest.tenant.unwrap_or(0),
            abi,
            source: Source::Directory,
            env: manifest.env,
        };
        Ok(DeployedFunction::new(record, module))
    }

    /// Compiles the new modules among `changed` together, a batch of `--load-threads` at a time
    /// (so that at most that many modules are held at once), before they are loaded one by one:
    /// a first start on a folder of many modules takes a fraction of compiling them in turn.
    fn precompile_directory(&self, changed: &[&FunctionFiles]) {
        if changed.len() < 2 {
            return;
        }
        let (loader, threads) = (self.loader(), self.limits.load_threads.max(1));
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
    fn directory_module(&self, digest: &str, wasm: &[u8]) -> Result<Module, ApiError> {
        let loader = self.loader();
        if let Some(module) = self.catalog.module_with_digest(digest).or_else(|| loader.from_artifact(digest)) {
            return Ok(module);
        }
        let module = loader.compile(wasm)?;
        tracing::info!(digest, "functions directory module compiled");
        loader.save_artifact(digest, &module);
        Ok(module)
    }

    /// Removes the artifacts of directory modules that no function uses any more: replaced,
    /// removed, or gone from the folder while the server was down.
    fn sweep_directory_artifacts(&self) {
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

    fn load_directory_pipeline(&self, name: &str, id: &str, path: &std::path::Path) -> Result<PipelineRecord, String> {
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

/// An envelope function is a WASI command: its envelope is its stdin and stdout.
fn check_abi(abi: Abi, module: &Module) -> Result<(), String> {
    if abi == Abi::Envelope && module.get_export("_start").is_none() {
        return Err("`abi = \"envelope\"` needs a module with `_start` (a WASI command)".into());
    }
    Ok(())
}

/// Whether a reloaded function is the one already live: then shards keep their pre-linked copy.
fn same_function(a: &FunctionRecord, b: &FunctionRecord) -> bool {
    FunctionRecord { created_unix_ms: b.created_unix_ms, ..a.clone() } == *b
}

fn same_pipeline(a: &PipelineRecord, b: &PipelineRecord) -> bool {
    PipelineRecord { created_unix_ms: b.created_unix_ms, ..a.clone() } == *b
}

//! The catalog worker: one thread that loads the store at start-up, then performs deploys and
//! deletes one at a time, and applies the functions directory's changes between them. Serialising
//! mutations here keeps the store and the catalog consistent without any locking protocol;
//! compiling itself still uses wasmtime's parallel compiler.
//!
//! Here: start-up (`spawn`, the compile thread, loading the store) and the job loop. Beside it:
//! `jobs` (what shards send, through `AdminHandle`), `deploys` (deploys and deletes),
//! `pipelines` (pipelines through the API) and `directory_sync` (`--functions-dir`).

mod deploys;
mod directory_sync;
mod jobs;
mod pipelines;
mod registry_sync;

pub use deploys::{DeployBody, DeployRequest, PendingDeploy};
pub use jobs::AdminHandle;

use directory_sync::Watch;
use jobs::Job;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tensor_wasm_dispatch::Weights;
use wasmtime::{Engine, Linker};

use super::catalog::PipelineMap;
use super::loader::{self, ModuleLoader};
use super::queue;
use super::registry::{self, Change, Registry, RegistryConfig, RegistryStatus};
use super::{Catalog, DeployedFunction, FunctionRecord, FunctionStore};
use crate::config::{CompilePriority, GuestProfiler, Limits};
use crate::error::ApiError;
use crate::wasm::compile::CompileBudget;
use crate::wasm::module::ModuleShape;
use crate::wasm::{new_linker, GuestState};

pub use crate::config::DirectoryConfig;

/// What [`spawn`] started: the shards' handle, the worker's thread, and with a registry its
/// status (for `/metrics`) and its client thread.
pub struct Spawned {
    pub admin: AdminHandle,
    pub thread: JoinHandle<()>,
    pub registry: Option<(Arc<RegistryStatus>, JoinHandle<()>)>,
}

/// Starts the worker; it loads the store and the functions directory before serving its queue of
/// `queue_depth` jobs. With a NATS registry it starts the client thread too, whose changes the
/// worker applies between jobs.
#[allow(clippy::too_many_arguments)] // each is one of the worker's inputs, named at the call
pub fn spawn(
    engine: Engine,
    store: FunctionStore,
    catalog: Arc<Catalog>,
    limits: Arc<Limits>,
    (queue_depth, per_tenant): (usize, usize),
    directory: Option<DirectoryConfig>,
    profiler: GuestProfiler,
    registry: RegistryConfig,
) -> std::io::Result<Spawned> {
    let (jobs, tx) = queue::FairQueue::new(queue_depth, per_tenant);
    let compiler =
        spawn_compiler(engine.clone(), (limits.module_shape, limits.compile_budget), profiler, jobs.clone())?;
    let (registry, changes, registry_thread) = match registry {
        RegistryConfig::File => (None, None, None),
        RegistryConfig::Nats(config) => {
            let (changes_tx, changes_rx) = tokio::sync::mpsc::channel(registry::CHANGE_DEPTH);
            let nudged = Arc::new(AtomicBool::new(false));
            let nudge = {
                let (jobs, nudged) = (jobs.clone(), nudged.clone());
                // At most one drain job is queued: the changes themselves wait in their channel.
                Box::new(move || {
                    if !nudged.swap(true, Ordering::AcqRel) {
                        jobs.push_result(Job::RegistryChanges);
                    }
                })
            };
            let sink = registry::ChangeSink { changes: changes_tx, nudge };
            let (client, thread) = registry::spawn(config, sink, store.registry_synced_at().map(|(at, _)| at))?;
            (Some(client), Some((changes_rx, nudged)), Some(thread))
        }
    };
    let status = registry.as_ref().map(|r| r.status.clone());
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
            weights: RefCell::default(),
            registry,
            changes: RefCell::new(changes),
            registry_retry: RefCell::default(),
            registry_repaired: Cell::new(None),
            published: RefCell::default(),
        };
        worker.load();
        worker.serve(&jobs);
    })?;
    let registry = status.zip(registry_thread);
    Ok(Spawned { admin: AdminHandle { tx, per_tenant }, thread, registry })
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
    /// Every tensor file a live function carries, parsed once per tenant and digest: functions of
    /// one tenant deployed with the same file share its host copy and its device copies.
    weights: RefCell<HashMap<(u64, String), Weak<Weights>>>,
    /// The fleet's registry (`--registry nats://…`): deploys and deletes go through it first.
    registry: Option<Registry>,
    /// Its changes, and whether a job to drain them is queued.
    changes: RefCell<Option<(tokio::sync::mpsc::Receiver<Change>, Arc<AtomicBool>)>>,
    /// Functions from the registry whose files could not be fetched, and when they were last
    /// tried (`registry_sync`): tried again every `REGISTRY_RETRY`.
    registry_retry: RefCell<(HashSet<String>, Option<Instant>)>,
    /// When this replica last checked that the object store holds the files of its functions
    /// (`registry_sync::repair_registry_objects`).
    registry_repaired: Cell<Option<Instant>>,
    /// The bucket's revision of each function this replica published, until a resync listed a
    /// later revision: a resync's listing may predate them (`registry_sync::apply_synced`).
    published: RefCell<HashMap<String, u64>>,
}

impl Worker {
    fn serve(&self, jobs: &queue::FairQueue<Job>) {
        loop {
            let wait = match &self.directory {
                None => Duration::from_secs(3600),
                Some(watch) => watch.config.poll.saturating_sub(watch.last_scan.get().elapsed()),
            };
            let wait = wait.min(self.registry_retry_in()).min(self.registry_repair_in());
            match jobs.pop(wait, !self.compiling.get()) {
                Ok(job) => self.perform(job),
                Err(queue::Empty::TimedOut) => {}
                Err(queue::Empty::Closed) => return,
            }
            // After every job too, so that a steady stream of deploys cannot hold the directory back.
            if self.directory.as_ref().is_some_and(|w| w.last_scan.get().elapsed() >= w.config.poll) {
                self.sync_directory();
            }
            if self.registry_retry_in().is_zero() {
                self.retry_registry_fetches();
            }
            if self.registry_repair_in().is_zero() {
                self.repair_registry_objects();
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
            Job::RegistryChanges => self.apply_registry_changes(),
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
        let modules: HashSet<&str> = records.iter().map(|r| r.digest.as_str()).collect();
        let tensors = records.iter().filter_map(|r| r.tensors.as_deref());
        let referenced: HashSet<&str> = modules.iter().copied().chain(tensors).collect();
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
        let digests: Vec<String> = modules.iter().map(|d| d.to_string()).collect();
        let loaded = self.loader().load_all(&digests, self.limits.load_threads);
        let (mut live, mut broken) = (Vec::with_capacity(records.len()), 0usize);
        for record in records {
            self.last_created_ms.set(self.last_created_ms.get().max(record.created_unix_ms));
            let module = loaded[&record.digest].module.clone();
            live.push(match module.and_then(|module| Ok((module, self.stored_weights(&record)?))) {
                Ok((module, weights)) => DeployedFunction::new(record, module).with_weights(weights),
                Err(reason) => {
                    broken += 1;
                    DeployedFunction::broken(record, reason)
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
        // A replica of a fleet whose data dir never was in step with the registry has no catalog
        // to serve: it is ready at its first resynchronisation (`registry_sync`), not before.
        if self.registry.is_none() || self.store.registry_synced_at().is_some() {
            self.catalog.mark_loaded();
        }
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

    /// The loader for the functions directory's modules: the operator's, not a tenant's, so their
    /// compiles run at the server's own priority rather than `--compile-priority`. Under
    /// SCHED_IDLE, a folder swap on a host whose shards were busy waited for a free CPU past
    /// ten seconds (tests/functions_dir.rs, twenty swaps under load, in CI).
    fn directory_loader(&self) -> ModuleLoader<'_> {
        let budget = self.limits.compile_budget.map(|b| CompileBudget { priority: CompilePriority::Inherit, ..b });
        ModuleLoader { budget, ..self.loader() }
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
}

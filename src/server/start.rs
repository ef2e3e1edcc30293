//! Start-up: everything the server runs, started in a fixed order and handed to the
//! [`Running`] that owns it. A step that fails returns at once; what the steps before it
//! started is dropped on the way out, and each helper thread stops and is joined as it drops.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::running::{Helpers, Running, ShardThread, Started};
use super::{listener, shard, ServerError};
use crate::audit::helpers::HelperThreads;
use crate::audit::{self, AuditConfig, AuditSync, CommitSlot};
use crate::auth::fleet::{FleetLimitConfig, FleetLimiter};
use crate::auth::{self, AuthConfig, TokenPolicy, TokenSet, TokenSource};
use crate::config::RegistryConfig;
use crate::config::{Limits, ServerConfig};
use crate::functions::store::DataDirLock;
use crate::functions::{worker, AdminHandle, Catalog, FunctionStore};
use crate::metrics::{Histogram, ShardMetrics};
use crate::runtime::cpu;
use crate::runtime::periodic::Periodic;
use crate::runtime::published::Published;
use crate::shard::{Lifecycle, ShardParts, Shared};
use crate::tls::TlsWatcher;
use crate::wasm::{build_engine, EpochTicker};
use tensor_wasm_dispatch::{DispatchConfig, Dispatcher, OnWorkerStart};

/// Starts the server, up to shards that are starting: the caller waits for them
/// ([`Running::wait_started`]).
pub fn start(config: &ServerConfig) -> Result<Running, ServerError> {
    let limits = Arc::new(config.limits.clone());
    // Held until the drain ends; the kernel drops it with the process however that ends.
    let data_dir_lock = DataDirLock::acquire(&config.data_dir)
        .map_err(|e| ServerError::Config(format!("cannot lock data dir {}: {e}", config.data_dir.display())))?;
    let store = FunctionStore::open(&config.data_dir)
        .map(|store| store.with_max_module_bytes(limits.max_body_bytes))
        .map_err(|e| ServerError::Config(format!("cannot use data dir {}: {e}", config.data_dir.display())))?;
    let mut plan = ShardPlan::new(config, &limits)?;
    let tokens = start_tokens(config, plan.count)?;
    let tls = start_tls(config)?;
    let engine = build_engine(&limits, config.guest_profiler)
        .map_err(|e| ServerError::Runtime(format!("cannot create the Wasm engine: {e:#}")))?;
    let epoch_ticker =
        EpochTicker::start(engine.clone(), Duration::from_millis(limits.epoch_tick_ms), limits.guest_slice())
            .map_err(|e| ServerError::Runtime(format!("cannot start the epoch ticker: {e}")))?;
    plan.warn_if_crowded();
    let listeners = listener::bind_reuseport(config.listen, plan.count)
        .map_err(|e| ServerError::Runtime(format!("cannot listen on {}: {e}", config.listen)))?;
    let local_addr = listeners[0].local_addr().map_err(|e| ServerError::Runtime(e.to_string()))?;
    let catalog = Arc::new(Catalog::default());
    let worker::Spawned { admin, thread: catalog_worker, registry } =
        start_catalog_worker(config, &engine, store, &catalog, &limits)?;
    let (registry, registry_client) = registry.unzip();
    let (sinks, sink_workers) = crate::pipelines::sink::spawn(
        config.sink_workers,
        config.sink_queue_depth,
        config.sink_max_inflight_per_tenant,
        Duration::from_millis(config.sink_max_delivery_ms),
        limits.sink_networks.clone(),
    )
    .map_err(|e| ServerError::Runtime(format!("cannot start the sink workers: {e}")))?;
    let audit = start_audit(config, plan.count)?;
    let fleet_limiter = start_fleet_limits(config, &tokens)?;
    let dispatcher = start_dispatcher(config, &plan)?;
    plan.place(config, dispatcher.devices.len());
    let shared = Arc::new(Shared {
        shard_metrics: (0..plan.count).map(|i| Arc::new(ShardMetrics::new(i, dispatcher.devices.len()))).collect(),
        dispatcher: dispatcher.clone(),
        catalog,
        sinks,
        watches_directory: config.functions_dir.is_some(),
        tokens: tokens.published.clone(),
        audit_sync: audit.sync_seconds.clone(),
        lifecycle: Lifecycle::default(),
        registry,
        fleet: fleet_limiter.as_ref().map(|f| f.status.clone()),
    });
    let template = ShardTemplate { config, limits, engine, admin, tokens: &tokens, tls: &tls, audit: &audit, shared };
    let (shards, started) = spawn_shards(listeners, &plan, &template)?;
    // The shards hold their copies now: the catalog worker's queue closes when the last one goes.
    let ShardTemplate { shared, admin, .. } = template;
    drop(admin);
    let helpers = Helpers {
        audit_group_commit: audit.group_commit,
        audit_helpers: audit.helper_threads,
        dispatcher,
        sink_workers,
        epoch_ticker,
        token_watcher: tokens.watcher,
        tls_watcher: tls.watcher,
        catalog_worker,
        registry_client,
        fleet_limiter,
    };
    let drain_grace = Duration::from_millis(config.drain_grace_ms);
    Ok(Running { local_addr, shared, shards, started, drain_grace, helpers, data_dir_lock })
}

/// How many shards there are, and where they and the device workers run.
#[derive(Clone)]
struct ShardPlan {
    count: usize,
    /// The CPUs the process may run on.
    allowed: Vec<usize>,
    /// The cgroups' CPU limit, read once so that the workers and the shards are placed alike.
    cpu_limit: Option<usize>,
    /// One CPU per shard; `None`: the shards float over `allowed` (`--pin-shards`). Decided once
    /// the device workers are counted ([`ShardPlan::place`]), before any shard starts.
    pinned: Option<Vec<usize>>,
}

impl ShardPlan {
    fn new(config: &ServerConfig, limits: &Limits) -> Result<ShardPlan, ServerError> {
        let allowed = cpu::allowed_cpus().map_err(|e| ServerError::Runtime(format!("sched_getaffinity: {e}")))?;
        let cpu_limit = cpu::cgroup_cpu_limit();
        let count = config.shards.unwrap_or_else(|| cpu::default_shard_count(allowed.len(), cpu_limit));
        // Each shard runs guests from its exact share of the instance pool (`shard::exact_share`).
        if (limits.max_instances as usize) < count {
            return Err(ServerError::Config(format!(
                "--max-instances {} is fewer than the {count} shards: each shard needs at least one instance",
                limits.max_instances
            )));
        }
        Ok(ShardPlan { count, allowed, cpu_limit, pinned: None })
    }

    /// Where everything runs once there are `workers` device workers (`cpu::placement`).
    fn placement(&self, mode: cpu::PinShards, workers: usize) -> cpu::Placement {
        cpu::placement(mode, self.count, workers, &self.allowed, self.cpu_limit)
    }

    /// What each device worker runs first: it pins itself to its CPU, where it has one of its own.
    /// A worker that cannot be pinned floats, which is correct, only slower.
    fn pin_worker(&self, mode: cpu::PinShards) -> OnWorkerStart {
        let plan = self.clone();
        OnWorkerStart(Arc::new(move |device, workers| {
            let Some(cpu) = plan.placement(mode, workers).workers.and_then(|cpus| cpus.get(device).copied()) else {
                return;
            };
            if let Err(e) = cpu::pin_current_thread(cpu) {
                tracing::warn!(device, cpu, "cannot pin the device worker, it floats: {e}");
            }
        }))
    }

    /// Decides where the shards run, now that the device workers are counted (each pinned itself
    /// by the same placement, `pin_worker`).
    fn place(&mut self, config: &ServerConfig, workers: usize) {
        let placement = self.placement(config.pin_shards, workers);
        self.pinned = placement.shards;
        self.log(config);
        if let Some(cpus) = placement.workers {
            tracing::info!(cpus = %cpu::format_list(&cpus), "device workers pinned, one per CPU after the shards'");
        }
    }

    fn log(&self, config: &ServerConfig) {
        let Some(pinned) = &self.pinned else {
            tracing::info!(
                shards = self.count,
                allowed = %cpu::format_list(&self.allowed),
                "shards not pinned: they float over the allowed CPUs (--pin-shards)"
            );
            if !config.idle_spin.is_zero() {
                tracing::warn!(
                    idle_spin_us = config.idle_spin.as_micros() as u64,
                    "shards spin after requests but share their CPUs: the spinning takes CPU time from the other threads"
                );
            }
            return;
        };
        tracing::info!(shards = self.count, cpus = %cpu::format_list(pinned), "shards pinned, one per CPU");
    }

    fn warn_if_crowded(&self) {
        if self.count > self.allowed.len() {
            tracing::warn!(
                shards = self.count,
                cpus = self.allowed.len(),
                "more shards than allowed CPUs; shards will share CPUs"
            );
        }
    }
}

/// The API tokens: the list the shards copy, and the thread that re-reads its file.
struct Tokens {
    config: Arc<AuthConfig>,
    /// `None` in dev mode.
    published: Option<Arc<Published<TokenSet>>>,
    /// Only when the tokens come from a file.
    watcher: Option<Periodic>,
}

fn start_tokens(config: &ServerConfig, shard_count: usize) -> Result<Tokens, ServerError> {
    let auth_config = Arc::new(config.auth.clone());
    let policy = TokenPolicy {
        token_id_key: auth_config.token_id_key.clone(),
        rate_limit: auth_config.rate_limit,
        shards: shard_count,
    };
    let published = auth::reload::initial(&auth_config.source, &policy)
        .map_err(ServerError::Config)?
        .map(|set| Arc::new(Published::new(set)));
    // SIGHUP re-reads the token file; handled always, so that it never kills the process.
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())
        .map_err(|e| ServerError::Runtime(format!("cannot install the SIGHUP handler: {e}")))?;
    let watcher = match (&auth_config.source, &published) {
        (TokenSource::File(path), Some(published)) => Some(
            auth::reload::spawn_watcher(path.clone(), policy, published.clone(), hangup)
                .map_err(|e| ServerError::Runtime(format!("cannot start the token watcher: {e}")))?,
        ),
        _ => None,
    };
    match &published {
        None if !config.listen.ip().is_loopback() => tracing::warn!(
            "SERVING WITHOUT AUTHENTICATION on {}: anyone who can reach it can deploy and run code \
             (--allow-unauthenticated)",
            config.listen
        ),
        None => tracing::info!("no API tokens configured: dev mode, loopback only"),
        Some(t) => tracing::info!(tokens = t.load().1.len(), "API tokens loaded"),
    }
    Ok(Tokens { config: auth_config, published, watcher })
}

/// With a NATS registry and a rate limit per token: the thread that sets this replica's share of
/// each token's rate from the fleet's demand (`auth::fleet`).
fn start_fleet_limits(config: &ServerConfig, tokens: &Tokens) -> Result<Option<FleetLimiter>, ServerError> {
    let (RegistryConfig::Nats(nats), Some(published), Some(_)) =
        (&config.registry, &tokens.published, tokens.config.rate_limit)
    else {
        return Ok(None);
    };
    let fleet = FleetLimitConfig {
        nats: nats.clone(),
        interval: tokens.config.fleet_share_interval,
        peer_timeout: tokens.config.fleet_peer_timeout,
        count_file: config.data_dir.join("fleet-replicas"),
    };
    let limiter = auth::fleet::spawn(fleet, published.clone())
        .map_err(|e| ServerError::Runtime(format!("cannot start the fleet's rate-limit thread: {e}")))?;
    tracing::info!(replicas = limiter.status.replicas(), "rate limits: shared across the fleet through NATS");
    Ok(Some(limiter))
}

/// The TLS configuration the shards read, and the thread that rebuilds it when its files change;
/// both `None` without TLS.
struct Tls {
    published: Option<Arc<Published<rustls::ServerConfig>>>,
    watcher: Option<Periodic>,
}

fn start_tls(config: &ServerConfig) -> Result<Tls, ServerError> {
    let Some(files) = &config.tls else {
        return Ok(Tls { published: None, watcher: None });
    };
    let initial = files.load().map_err(ServerError::Config)?;
    let published = Arc::new(Published::new(initial));
    let watcher = TlsWatcher::spawn(files.clone(), published.clone())
        .map_err(|e| ServerError::Runtime(format!("cannot start the TLS watcher: {e}")))?;
    tracing::info!(cert = %files.cert.display(), mtls = files.client_ca.is_some(), "TLS enabled");
    Ok(Tls { published: Some(published), watcher: Some(watcher) })
}

fn start_catalog_worker(
    config: &ServerConfig,
    engine: &wasmtime::Engine,
    store: FunctionStore,
    catalog: &Arc<Catalog>,
    limits: &Arc<Limits>,
) -> Result<worker::Spawned, ServerError> {
    if let Some(dir) = &config.functions_dir {
        tracing::info!(dir = %dir.root.display(), poll_ms = dir.poll.as_millis() as u64, "functions directory");
    }
    if let RegistryConfig::Nats(nats) = &config.registry {
        let servers = crate::nats::redacted(&nats.servers);
        tracing::info!(?servers, "registry: NATS JetStream; the data dir is this replica's cache");
    }
    worker::spawn(
        engine.clone(),
        store,
        catalog.clone(),
        limits.clone(),
        (config.admin_queue_depth, config.admin_queue_depth_per_tenant),
        config.functions_dir.clone(),
        config.guest_profiler,
        config.registry.clone(),
    )
    .map_err(|e| ServerError::Runtime(format!("cannot start the catalog worker: {e}")))
}

/// What the shards share of the audit log, and its threads.
struct Audit {
    config: Arc<AuditConfig>,
    /// One per shard, for the group commit.
    commit_slots: Vec<Arc<CommitSlot>>,
    sync_seconds: Arc<Histogram>,
    /// Only with a directory and `--audit-sync interval`.
    group_commit: Option<Periodic>,
    helper_threads: HelperThreads,
}

fn start_audit(config: &ServerConfig, shard_count: usize) -> Result<Audit, ServerError> {
    let audit_config = Arc::new(config.audit.clone());
    let commit_slots: Vec<Arc<CommitSlot>> = (0..shard_count).map(|_| Arc::default()).collect();
    let sync_seconds = Arc::new(Histogram::default());
    let group_commit = if audit_config.dir.is_some() && audit_config.sync == AuditSync::Interval {
        Some(
            audit::spawn_group_commit(commit_slots.clone(), sync_seconds.clone())
                .map_err(|e| ServerError::Runtime(format!("cannot start the audit group commit: {e}")))?,
        )
    } else {
        None
    };
    match (&audit_config.dir, audit_config.stdout) {
        (Some(dir), _) => {
            tracing::info!(dir = %dir.display(), stdout = audit_config.stdout, sync = ?audit_config.sync, "audit log")
        }
        (None, true) => tracing::info!("audit log: stdout only"),
        (None, false) => tracing::warn!("audit log disabled (TENSOR_WASM_API_AUDIT_LOG=none)"),
    }
    // Before the shards pin themselves: these threads must not inherit a shard's CPU.
    let helper_threads = HelperThreads::start();
    Ok(Audit { config: audit_config, commit_slots, sync_seconds, group_commit, helper_threads })
}

fn start_dispatcher(config: &ServerConfig, plan: &ShardPlan) -> Result<Arc<Dispatcher>, ServerError> {
    let on_worker_start = Some(plan.pin_worker(config.pin_shards));
    let dispatcher =
        Dispatcher::start(DispatchConfig { shards: plan.count, on_worker_start, ..config.dispatch.clone() })
            .map_err(|e| ServerError::Config(e.to_string()))?;
    if let Some(why) = &dispatcher.cuda_fallback {
        tracing::info!("--gpu auto: kernels run on the host back-end ({why})");
    }
    for d in dispatcher.devices.iter() {
        tracing::info!(device = d.index, name = %d.name, backend = d.kind.label(), "kernel dispatch device");
    }
    Ok(dispatcher)
}

/// What every shard starts from, apart from its own id, CPU, listener and drain signal.
struct ShardTemplate<'a> {
    config: &'a ServerConfig,
    limits: Arc<Limits>,
    engine: wasmtime::Engine,
    admin: AdminHandle,
    tokens: &'a Tokens,
    tls: &'a Tls,
    audit: &'a Audit,
    shared: Arc<Shared>,
}

/// Starts one thread per listener. The receiver hears from each shard once, when it serves or
/// when it failed to start; it ends early if a shard thread ends without a word.
fn spawn_shards(
    listeners: Vec<std::net::TcpListener>,
    plan: &ShardPlan,
    template: &ShardTemplate<'_>,
) -> Result<(Vec<ShardThread>, Started), ServerError> {
    let (started_tx, started_rx) = mpsc::channel();
    let mut shards = Vec::with_capacity(plan.count);
    for (i, listener) in listeners.into_iter().enumerate() {
        let (drain, drain_rx) = futures_channel::oneshot::channel::<()>();
        let init = template.init(i, plan, listener, drain_rx, started_tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("tw-shard-{i}"))
            .spawn(move || shard::run(init))
            .map_err(|e| ServerError::Runtime(format!("cannot start shard {i}: {e}")))?;
        shards.push(ShardThread { drain, thread });
    }
    Ok((shards, started_rx))
}

impl ShardTemplate<'_> {
    fn init(
        &self,
        id: usize,
        plan: &ShardPlan,
        listener: std::net::TcpListener,
        drain_rx: futures_channel::oneshot::Receiver<()>,
        started: mpsc::Sender<Result<(), String>>,
    ) -> shard::ShardInit {
        let config = self.config;
        let parts = ShardParts {
            id,
            shard_count: plan.count,
            limits: self.limits.clone(),
            engine: self.engine.clone(),
            admin: self.admin.clone(),
            auth: self.tokens.config.clone(),
            tokens: self.tokens.published.clone(),
            audit: self.audit.config.clone(),
            commit: self.audit.commit_slots[id].clone(),
            audit_helpers: self.audit.helper_threads.helpers(),
            shared: self.shared.clone(),
        };
        shard::ShardInit {
            parts,
            cpu: plan.pinned.as_ref().map(|pinned| pinned[id]),
            listener,
            tls: self.tls.published.clone(),
            io_driver: config.io_driver,
            spin_window: config.idle_spin,
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            drain_rx,
            started,
        }
    }
}

//! The server process: start-up, the shards, and shutdown.
//!
//! [`run`] opens the data dir, builds the engine and its epoch ticker, starts the catalog worker,
//! binds one SO_REUSEPORT listener per shard, starts the shards (each a pinned thread running a
//! monoio executor), then waits for SIGTERM or SIGINT and drains.

pub mod conn;
pub mod listener;
pub mod logging;
pub mod shard;

/// Still named here by `wasm::tensor` (another change owns that file); the module lives in
/// [`crate::runtime`].
use std::fmt;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{self, AuditSync, CommitSlot};
use crate::auth::{self, TokenPolicy, TokenSource};
use crate::config::ServerConfig;
use crate::functions::{worker, Catalog, FunctionStore};
use crate::metrics::Histogram;
use crate::metrics::ShardMetrics;
use crate::runtime::cpu;
use crate::runtime::published::Published;
use crate::shard::{Shared, SharedParts};
use crate::tls::TlsWatcher;
use crate::wasm::{build_engine, EpochTicker};
use tensor_wasm_dispatch::{DispatchConfig, Dispatcher};

/// Why the server could not start or run.
#[derive(Debug)]
pub enum ServerError {
    /// The operator must fix a setting (exit status 2).
    Config(String),
    /// The environment failed us (exit status 1).
    Runtime(String),
}

impl ServerError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Config(_) => crate::config::EXIT_USAGE,
            ServerError::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Config(m) | ServerError::Runtime(m) => f.write_str(m),
        }
    }
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub fn run(config: ServerConfig) -> Result<(), ServerError> {
    // A file-size limit (RLIMIT_FSIZE) must surface as an EFBIG error, which the audit log's
    // failure policy handles, not as SIGXFSZ killing the process.
    // SAFETY: setting a signal's disposition to "ignore" before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Before any shard serves: a supervisor may send SIGTERM as soon as the port answers, and
    // until these handlers exist that signal kills the process without a drain.
    let termination = termination_signals()?;
    let limits = Arc::new(config.limits.clone());
    // Held until `run` returns; the kernel drops it with the process however that ends.
    let _data_dir_lock = crate::functions::store::DataDirLock::acquire(&config.data_dir)
        .map_err(|e| ServerError::Config(format!("cannot lock data dir {}: {e}", config.data_dir.display())))?;
    let store = FunctionStore::open(&config.data_dir)
        .map(|store| store.with_max_module_bytes(limits.max_body_bytes))
        .map_err(|e| ServerError::Config(format!("cannot use data dir {}: {e}", config.data_dir.display())))?;
    let cpus = cpu::allowed_cpus().map_err(|e| ServerError::Runtime(format!("sched_getaffinity: {e}")))?;
    let shard_count = config.shards.unwrap_or_else(|| cpu::default_shard_count(cpus.len(), cpu::cgroup_cpu_limit()));
    let shard_cpus = cpu::shard_cpus(config.pin_shards, shard_count, &cpus);
    // Each shard runs guests from its exact share of the instance pool (`shard::exact_share`).
    if (limits.max_instances as usize) < shard_count {
        return Err(ServerError::Config(format!(
            "--max-instances {} is fewer than the {shard_count} shards: each shard needs at least one instance",
            limits.max_instances
        )));
    }
    match &shard_cpus {
        Some(pinned) => {
            tracing::info!(shards = shard_count, cpus = %cpu::format_list(pinned), "shards pinned, one per CPU")
        }
        None => {
            tracing::info!(
                shards = shard_count,
                allowed = %cpu::format_list(&cpus),
                "shards not pinned: they float over the allowed CPUs (--pin-shards)"
            );
            if !config.idle_spin.is_zero() {
                tracing::warn!(
                    idle_spin_us = config.idle_spin.as_micros() as u64,
                    "shards spin after requests but share their CPUs: the spinning takes CPU time from the other threads"
                );
            }
        }
    }

    let auth_config = Arc::new(config.auth.clone());
    let policy = TokenPolicy {
        token_id_key: auth_config.token_id_key.clone(),
        rate_limit: auth_config.rate_limit,
        shards: shard_count,
    };
    let tokens = auth::reload::initial(&auth_config.source, &policy)
        .map_err(ServerError::Config)?
        .map(|set| Arc::new(Published::new(set)));
    // SIGHUP re-reads the token file; handled always, so that it never kills the process.
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())
        .map_err(|e| ServerError::Runtime(format!("cannot install the SIGHUP handler: {e}")))?;
    if let (TokenSource::File(path), Some(published)) = (&auth_config.source, &tokens) {
        auth::reload::spawn_watcher(path.clone(), policy, published.clone(), hangup)
            .map_err(|e| ServerError::Runtime(format!("cannot start the token watcher: {e}")))?;
    }
    match &tokens {
        None if !config.listen.ip().is_loopback() => tracing::warn!(
            "SERVING WITHOUT AUTHENTICATION on {}: anyone who can reach it can deploy and run code \
             (--allow-unauthenticated)",
            config.listen
        ),
        None => tracing::info!("no API tokens configured: dev mode, loopback only"),
        Some(t) => tracing::info!(tokens = t.load().1.len(), "API tokens loaded"),
    }

    let tls = match &config.tls {
        None => None,
        Some(files) => {
            let initial = files.load().map_err(ServerError::Config)?;
            let published = Arc::new(Published::new(initial));
            TlsWatcher::spawn(files.clone(), published.clone())
                .map_err(|e| ServerError::Runtime(format!("cannot start the TLS watcher: {e}")))?;
            tracing::info!(cert = %files.cert.display(), mtls = files.client_ca.is_some(), "TLS enabled");
            Some(published)
        }
    };

    let engine = build_engine(&limits, config.guest_profiler)
        .map_err(|e| ServerError::Runtime(format!("cannot create the Wasm engine: {e:#}")))?;
    let ticker = EpochTicker::start(engine.clone(), Duration::from_millis(limits.epoch_tick_ms))
        .map_err(|e| ServerError::Runtime(format!("cannot start the epoch ticker: {e}")))?;

    if shard_count > cpus.len() {
        tracing::warn!(
            shards = shard_count,
            cpus = cpus.len(),
            "more shards than allowed CPUs; shards will share CPUs"
        );
    }
    let listeners = listener::bind_reuseport(config.listen, shard_count)
        .map_err(|e| ServerError::Runtime(format!("cannot listen on {}: {e}", config.listen)))?;
    let local_addr = listeners[0].local_addr().map_err(|e| ServerError::Runtime(e.to_string()))?;

    let catalog = Arc::new(Catalog::default());
    if let Some(dir) = &config.functions_dir {
        tracing::info!(dir = %dir.root.display(), poll_ms = dir.poll.as_millis() as u64, "functions directory");
    }
    let (admin, worker_thread) = worker::spawn(
        engine.clone(),
        store,
        catalog.clone(),
        limits.clone(),
        (config.admin_queue_depth, config.admin_queue_depth_per_tenant),
        config.functions_dir.clone(),
        config.guest_profiler,
    )
    .map_err(|e| ServerError::Runtime(format!("cannot start the catalog worker: {e}")))?;
    let sinks = crate::pipelines::sink::spawn(
        config.sink_workers,
        config.sink_queue_depth,
        config.sink_max_inflight_per_tenant,
        std::time::Duration::from_millis(config.sink_max_delivery_ms),
        limits.sink_networks.clone(),
    )
    .map_err(|e| ServerError::Runtime(format!("cannot start the sink workers: {e}")))?;

    let audit_config = Arc::new(config.audit.clone());
    let commit_slots: Vec<Arc<CommitSlot>> = (0..shard_count).map(|_| Arc::default()).collect();
    let audit_sync = Arc::new(Histogram::default());
    if audit_config.dir.is_some() && audit_config.sync == AuditSync::Interval {
        audit::spawn_group_commit(commit_slots.clone(), audit_sync.clone())
            .map_err(|e| ServerError::Runtime(format!("cannot start the audit group commit: {e}")))?;
    }
    match (&audit_config.dir, audit_config.stdout) {
        (Some(dir), _) => {
            tracing::info!(dir = %dir.display(), stdout = audit_config.stdout, sync = ?audit_config.sync, "audit log")
        }
        (None, true) => tracing::info!("audit log: stdout only"),
        (None, false) => tracing::warn!("audit log disabled (TENSOR_WASM_API_AUDIT_LOG=none)"),
    }

    // Before the shards pin themselves: these threads must not inherit a shard's CPU.
    let audit_threads = audit::segment::HelperThreads::start();
    let dispatcher = Dispatcher::start(DispatchConfig { shards: shard_count, ..config.dispatch.clone() })
        .map_err(|e| ServerError::Config(e.to_string()))?;
    if let Some(why) = &dispatcher.cuda_fallback {
        tracing::info!("--gpu auto: kernels run on the host back-end ({why})");
    }
    for d in dispatcher.devices.iter() {
        tracing::info!(device = d.index, name = %d.name, backend = d.kind.label(), "kernel dispatch device");
    }

    let shared = Arc::new(Shared::new(SharedParts {
        shard_metrics: (0..shard_count).map(|i| Arc::new(ShardMetrics::new(i, dispatcher.devices.len()))).collect(),
        dispatcher: dispatcher.clone(),
        catalog,
        sinks,
        watches_directory: config.functions_dir.is_some(),
        tokens: tokens.clone(),
        audit_sync: audit_sync.clone(),
    }));

    let (started_tx, started_rx) = mpsc::channel();
    let mut shards = Vec::with_capacity(shard_count);
    for (i, listener) in listeners.into_iter().enumerate() {
        let (drain_tx, drain_rx) = futures_channel::oneshot::channel::<()>();
        let init = shard::ShardInit {
            id: i,
            cpu: shard_cpus.as_ref().map(|pinned| pinned[i]),
            listener,
            engine: engine.clone(),
            limits: limits.clone(),
            admin: admin.clone(),
            auth: auth_config.clone(),
            tokens: tokens.clone(),
            tls: tls.clone(),
            audit: audit_config.clone(),
            commit: commit_slots[i].clone(),
            audit_helpers: audit_threads.helpers(),
            shared: shared.clone(),
            io_driver: config.io_driver,
            spin_window: config.idle_spin,
            shard_count,
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            drain_rx,
            started: started_tx.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("tw-shard-{i}"))
            .spawn(move || shard::run(init))
            .map_err(|e| ServerError::Runtime(format!("cannot start shard {i}: {e}")))?;
        shards.push((drain_tx, thread));
    }
    drop(started_tx);
    drop(admin);

    let mut failure = None;
    for _ in 0..shard_count {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert_with(|| "a shard stopped during start-up".to_string());
            }
        }
    }

    if failure.is_none() {
        tracing::info!(addr = %local_addr, shards = shard_count, "listening");
        {
            // Released before the wait: shards write audit records and checkpoints to stdout, and
            // a lock held here for the process's life would block them at their first line.
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "listening on {local_addr}");
            let _ = stdout.flush();
        }
        wait_for_termination(termination)?;
        tracing::info!("signal received: draining");
    }

    shared.start_draining();
    if failure.is_none() && config.drain_grace_ms > 0 {
        std::thread::sleep(Duration::from_millis(config.drain_grace_ms));
    }
    // Dropping a shard's sender completes its receiver: that is the drain signal.
    let (drain_senders, threads): (Vec<_>, Vec<_>) = shards.into_iter().unzip();
    drop(drain_senders);
    for (i, thread) in threads.into_iter().enumerate() {
        if thread.join().is_err() {
            tracing::error!(shard = i, "shard thread panicked");
        }
    }
    // Segments handed to the background sealer are cut and fsynced before the process exits.
    audit_threads.stop();
    dispatcher.shutdown();
    drop(ticker);
    drop(worker_thread);
    match failure {
        Some(e) => Err(ServerError::Runtime(e)),
        None => {
            tracing::info!("drained; exiting");
            Ok(())
        }
    }
}

/// Catches SIGTERM and SIGINT from now on; a signal that arrives before the wait is kept for it.
fn termination_signals() -> Result<signal_hook::iterator::Signals, ServerError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| ServerError::Runtime(format!("cannot install signal handlers: {e}")))
}

/// Blocks until SIGTERM or SIGINT. A second SIGINT during the drain (an operator's second Ctrl-C)
/// exits at once; repeated SIGTERMs, which supervisors send, do not cut the drain short.
fn wait_for_termination(mut signals: signal_hook::iterator::Signals) -> Result<(), ServerError> {
    use signal_hook::consts::SIGINT;
    let _ = signals.forever().next();
    std::thread::Builder::new()
        .name("tw-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGINT {
                    tracing::warn!("second interrupt: exiting without finishing the drain");
                    std::process::exit(130);
                }
            }
        })
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    Ok(())
}

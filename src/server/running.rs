//! A started server ([`Running`]): the one owner of its shards and of every thread beside them,
//! and the drain that stops them in a stated order.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::ServerError;
use crate::audit::helpers::HelperThreads;
use crate::functions::store::DataDirLock;
use crate::pipelines::sink::SinkWorkers;
use crate::runtime::periodic::Periodic;
use crate::shard::Shared;
use crate::wasm::EpochTicker;
use tensor_wasm_dispatch::Dispatcher;

/// Each shard's word on its start-up: `Ok` once it serves, or why it could not.
pub type Started = mpsc::Receiver<Result<(), String>>;

/// A shard's thread, and the sender whose drop is its drain signal.
pub struct ShardThread {
    pub(super) drain: futures_channel::oneshot::Sender<()>,
    pub(super) thread: JoinHandle<()>,
}

/// The threads beside the shards, each with the handle that stops it.
pub struct Helpers {
    /// Fdatasyncs the shards' segments every 10 ms (`--audit-sync interval` with a directory).
    pub(super) audit_group_commit: Option<Periodic>,
    /// The audit log's sealer and prefaulter.
    pub(super) audit_helpers: HelperThreads,
    /// Its device workers (`tw-device-N`), joined by `Dispatcher::shutdown`.
    pub(super) dispatcher: Arc<Dispatcher>,
    /// Deliver pipeline outputs (`tw-sink-N`).
    pub(super) sink_workers: SinkWorkers,
    pub(super) epoch_ticker: EpochTicker,
    /// Re-reads the token file (tokens from a file only).
    pub(super) token_watcher: Option<Periodic>,
    /// Rebuilds the TLS configuration when its files change (with TLS only).
    pub(super) tls_watcher: Option<Periodic>,
    /// Stores, deletes and loads functions; its compile thread ends with it.
    pub(super) catalog_worker: JoinHandle<()>,
    /// The NATS client (`--registry nats://…`): ends when the catalog worker drops its handle.
    pub(super) registry_client: Option<JoinHandle<()>>,
    /// Sets this replica's share of each token's rate (`--registry nats://…` with a rate limit).
    pub(super) fleet_limiter: Option<crate::auth::fleet::FleetLimiter>,
}

/// A server whose shards are starting or serving.
pub struct Running {
    pub(super) local_addr: SocketAddr,
    pub(super) shared: Arc<Shared>,
    pub(super) shards: Vec<ShardThread>,
    pub(super) started: Started,
    /// How long readiness is off before the shards drain (`--drain-grace-ms`).
    pub(super) drain_grace: Duration,
    pub(super) helpers: Helpers,
    /// Held until the drain ends, so that no second server opens the data dir meanwhile.
    pub(super) data_dir_lock: DataDirLock,
}

impl Running {
    /// Waits until every shard has started; the first failure, if one did not.
    pub fn wait_started(&self) -> Result<(), String> {
        let mut failure = None;
        for _ in 0..self.shards.len() {
            match self.started.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert_with(|| "a shard stopped during start-up".to_string());
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Says where the server listens, in the log and on stdout (where scripts wait for it).
    pub fn announce(&self) {
        let addr = self.local_addr;
        tracing::info!(addr = %addr, shards = self.shards.len(), "listening");
        // Released at once: shards write audit records and checkpoints to stdout, and a lock
        // held here for the process's life would block them at their first line.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on {addr}");
        let _ = stdout.flush();
    }

    /// Stops everything, in this order:
    ///
    /// 1. readiness goes off, and after a successful start-up `--drain-grace-ms` passes, so that
    ///    load balancers stop sending before anything closes;
    /// 2. the shards drain (each within `--drain-timeout-ms`), close their audit chains and are
    ///    joined: nothing writes to the audit log, runs a guest or sends a kernel after this;
    /// 3. the audit group commit, then the sealer and prefaulter, once every segment handed to
    ///    the sealer is cut and fsynced;
    /// 4. the dispatcher's device workers; the sink workers, once the deliveries queued are done
    ///    (each within `--sink-max-delivery-ms`, see `SinkWorkers::stop`); the epoch ticker, the
    ///    token and TLS watchers;
    /// 5. the catalog worker is let go, not joined (see `Helpers::stop`), and the data dir's lock
    ///    is released last.
    ///
    /// Returns the start-up failure, if there was one.
    pub fn drain(self, started: Result<(), String>) -> Result<(), ServerError> {
        let Running { shared, shards, drain_grace, helpers, data_dir_lock, .. } = self;
        shared.start_draining();
        if started.is_ok() && !drain_grace.is_zero() {
            std::thread::sleep(drain_grace);
        }
        stop_shards(shards);
        helpers.stop();
        // What the shards shared goes before the lock. It is not the last copy: tasks still
        // pending when a shard's executor ends are leaked with theirs (monoio does not drop them).
        drop(shared);
        drop(data_dir_lock);
        match started {
            Err(e) => Err(ServerError::Runtime(e)),
            Ok(()) => {
                tracing::info!("drained; exiting");
                Ok(())
            }
        }
    }
}

/// Signals every shard to drain, then joins them all.
fn stop_shards(shards: Vec<ShardThread>) {
    // Dropping a shard's sender completes its receiver: that is the drain signal. All are sent
    // before the first join, so the shards drain side by side.
    let (signals, threads): (Vec<_>, Vec<_>) = shards.into_iter().map(|s| (s.drain, s.thread)).unzip();
    drop(signals);
    for (i, thread) in threads.into_iter().enumerate() {
        if thread.join().is_err() {
            tracing::error!(shard = i, "shard thread panicked");
        }
    }
}

impl Helpers {
    /// Stops the helper threads once the shards are gone, in the order of [`Running::drain`].
    fn stop(self) {
        let Helpers {
            audit_group_commit,
            audit_helpers,
            dispatcher,
            sink_workers,
            epoch_ticker,
            token_watcher,
            tls_watcher,
            catalog_worker,
            registry_client,
            fleet_limiter,
        } = self;
        if let Some(group_commit) = audit_group_commit {
            group_commit.stop();
        }
        // Segments handed to the background sealer are cut and fsynced before the process exits.
        audit_helpers.stop();
        dispatcher.shutdown();
        if sink_workers.stop() == 0 {
            tracing::info!("sink workers stopped");
        }
        // Joins it: no guest is left for its epochs to interrupt.
        drop(epoch_ticker);
        for watcher in [token_watcher, tls_watcher].into_iter().flatten() {
            watcher.stop();
        }
        // Not joined: it may be loading stored modules at start-up or waiting on a compile child
        // (up to `--compile-wall-timeout-ms`), and the drain has never waited for either. Every store
        // write is atomic, so the exit that ends it leaves nothing half-written.
        drop(catalog_worker);
        // Not joined either: it may wait on NATS up to --registry-timeout-ms.
        drop(registry_client);
        // Joined: told to stop, it leaves whatever it waits on at once.
        drop(fleet_limiter);
    }
}

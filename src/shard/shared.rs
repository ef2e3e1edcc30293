//! State every shard can see: readiness, the drain flag, every shard's metrics, and the
//! process-wide services (catalog, dispatcher, sinks, token list).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tensor_wasm_dispatch::Dispatcher;

use crate::auth::fleet::FleetStatus;
use crate::auth::TokenSet;
use crate::functions::registry::RegistryStatus;
use crate::functions::Catalog;
use crate::metrics::{Histogram, ShardMetrics};
use crate::pipelines::sink::SinkHandle;
use crate::runtime::published::Published;

/// State every shard can see. Sharing across shards is limited to this and the catalog; the
/// request path only reads it.
pub struct Shared {
    pub shard_metrics: Vec<Arc<ShardMetrics>>,
    /// Kernel dispatch: every device's rings and worker.
    pub dispatcher: Arc<Dispatcher>,
    pub catalog: Arc<Catalog>,
    /// The pool delivering pipeline outputs to sinks.
    pub sinks: SinkHandle,
    /// Whether `--functions-dir` is set (its figures are on `/metrics` then).
    pub watches_directory: bool,
    /// The token list (for `/metrics`); `None` in dev mode.
    pub tokens: Option<Arc<Published<TokenSet>>>,
    /// The audit group commit's fdatasync durations (written by its thread alone).
    pub audit_sync: Arc<Histogram>,
    /// Readiness and the drain flag: built empty (`Lifecycle::default()`).
    pub lifecycle: Lifecycle,
    /// The fleet's registry, when there is one (`--registry nats://…`): for `/metrics`.
    pub registry: Option<Arc<RegistryStatus>>,
    /// The fleet's rate-limit shares, when they are on (`auth::fleet`): for `/metrics`.
    pub fleet: Option<Arc<FleetStatus>>,
}

/// How many shards serve, and whether the process drains. Its fields change only through
/// [`Shared`]'s methods.
#[derive(Default)]
pub struct Lifecycle {
    shards_serving: AtomicUsize,
    draining: AtomicBool,
}

impl Shared {
    pub fn is_ready(&self) -> bool {
        self.lifecycle.shards_serving.load(Ordering::Acquire) == self.shard_metrics.len() && self.catalog.is_loaded()
    }

    pub fn is_draining(&self) -> bool {
        self.lifecycle.draining.load(Ordering::Acquire)
    }

    /// A shard is serving: it counts towards readiness.
    pub fn shard_started(&self) {
        self.lifecycle.shards_serving.fetch_add(1, Ordering::AcqRel);
    }

    /// The process drains: readiness fails from now on.
    pub fn start_draining(&self) {
        self.lifecycle.draining.store(true, Ordering::Release);
    }
}

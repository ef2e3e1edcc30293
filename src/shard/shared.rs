//! State every shard can see: readiness, the drain flag, every shard's metrics, and the
//! process-wide services (catalog, dispatcher, sinks, token list).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tensor_wasm_dispatch::Dispatcher;

use crate::auth::TokenSet;
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
    shards_serving: AtomicUsize,
    draining: AtomicBool,
}

/// What [`Shared::new`] holds: everything but the readiness count and the drain flag.
pub struct SharedParts {
    pub shard_metrics: Vec<Arc<ShardMetrics>>,
    pub dispatcher: Arc<Dispatcher>,
    pub catalog: Arc<Catalog>,
    pub sinks: SinkHandle,
    pub watches_directory: bool,
    pub tokens: Option<Arc<Published<TokenSet>>>,
    pub audit_sync: Arc<Histogram>,
}

impl Shared {
    pub fn new(parts: SharedParts) -> Shared {
        let SharedParts { shard_metrics, dispatcher, catalog, sinks, watches_directory, tokens, audit_sync } = parts;
        Shared {
            shard_metrics,
            dispatcher,
            catalog,
            sinks,
            watches_directory,
            tokens,
            audit_sync,
            shards_serving: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.shards_serving.load(Ordering::Acquire) == self.shard_metrics.len() && self.catalog.is_loaded()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A shard is serving: it counts towards readiness.
    pub fn shard_started(&self) {
        self.shards_serving.fetch_add(1, Ordering::AcqRel);
    }

    /// The process drains: readiness fails from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

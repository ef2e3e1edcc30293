//! A shard's state: what its tasks share through `Rc`, on one thread. The accept loop that
//! drives it is `server::shard`; the request path (`api`, `server::conn`) uses it.
//!
//! Boundary: no other thread touches a `Shard`, except through [`Shared`].

mod audit;
mod shared;
mod slots;

pub use shared::{Lifecycle, Shared};
pub use slots::{exact_share, BodyReservation, ConnectionGuard};

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use wasmtime::{Engine, Store};

use crate::audit::helpers::Helpers;
use crate::audit::{AuditConfig, CommitSlot, ShardAudit};
use crate::auth::refusals::Refusals;
use crate::auth::{AuthConfig, ShardAuth, TokenSet};
use crate::config::Limits;
use crate::functions::{AdminHandle, FunctionCache};
use crate::metrics::ShardMetrics;
use crate::runtime::event::LocalEvent;
use crate::runtime::idle_spin::IdleSpin;
use crate::runtime::published::Published;
use crate::wasm::GuestState;

/// A shard's state, shared by its tasks through `Rc`: never by another thread, except `shared`.
pub struct Shard {
    pub id: usize,
    pub limits: Arc<Limits>,
    pub engine: Engine,
    pub functions: FunctionCache,
    pub admin: AdminHandle,
    pub auth: ShardAuth,
    /// Refused sources and tokens: their rate, and the coalescing of their audit records.
    pub refusals: Refusals,
    pub audit: ShardAudit,
    /// Numbers this shard's requests (`x-request-id`), after the prefix `{process}-{shard}-`.
    next_request: Cell<u64>,
    request_id_prefix: String,
    pub metrics: Arc<ShardMetrics>,
    pub shared: Arc<Shared>,
    /// Fired when the process drains: stop accepting, close idle connections.
    pub drain: LocalEvent,
    /// Told of every request, for the spinner of `--idle-spin-us`.
    pub idle_spin: Rc<IdleSpin>,
    /// Fired when draining and the last connection closed.
    all_closed: LocalEvent,
    connections: Cell<usize>,
    max_connections: usize,
    instances: Cell<usize>,
    max_instances: usize,
    /// Spent stores whose answers are not sent yet, each still holding its instance slot.
    spent: RefCell<Vec<Store<GuestState>>>,
    /// Request-body bytes reserved by this shard's connections, at most `--max-inflight-body-bytes`.
    inflight_body_bytes: Cell<u64>,
    /// The same per tenant, at most `--max-inflight-body-bytes-per-tenant` each; a tenant leaves
    /// the map at zero.
    inflight_body_per_tenant: RefCell<HashMap<u64, u64>>,
    /// Invocations running per tenant on this shard; a tenant leaves the map at zero, so it holds
    /// at most as many entries as instance slots.
    running_per_tenant: RefCell<HashMap<u64, u32>>,
    /// This shard's share of `--max-concurrent-per-tenant`.
    max_running_per_tenant: u32,
}

/// What [`Shard::new`] builds a shard from, besides the function cache its thread sets up:
/// start-up fills it in on the main thread and sends it to the shard's thread.
pub struct ShardParts {
    pub id: usize,
    pub shard_count: usize,
    pub limits: Arc<Limits>,
    pub engine: Engine,
    pub admin: AdminHandle,
    pub auth: Arc<AuthConfig>,
    pub tokens: Option<Arc<Published<TokenSet>>>,
    pub audit: Arc<AuditConfig>,
    pub commit: Arc<CommitSlot>,
    /// The audit log's helper threads, which the server's start-up owns.
    pub audit_helpers: Helpers,
    pub shared: Arc<Shared>,
}

impl Shard {
    /// A shard's state, with its shares of the process's limits.
    pub fn new(parts: ShardParts, functions: FunctionCache) -> Shard {
        let ShardParts { id, shard_count, limits, engine, admin, auth, tokens, audit, commit, audit_helpers, shared } =
            parts;
        let per_shard = |total: usize| total.div_ceil(shard_count).max(1);
        let limits_max_concurrent = limits.max_concurrent_per_tenant as usize;
        // Exactly, not rounded up: the pooling allocator holds `--max-instances` and no more, so
        // shares that sum past it would let an invoke past the shard's check fail inside the pool
        // (a 502 guest_trap where 503 overloaded is the answer). `server::start` refuses fewer
        // instances than shards.
        let instance_share = exact_share(limits.max_instances as usize, shard_count, id);
        Shard {
            id,
            metrics: shared.shard_metrics[id].clone(),
            max_connections: per_shard(limits.max_connections),
            max_instances: instance_share,
            limits,
            engine,
            functions,
            admin,
            refusals: Refusals::new(auth.unauthenticated_rate_limit, auth.max_refusal_sources),
            auth: ShardAuth::new(auth, tokens, id, shard_count),
            audit: ShardAudit::open(id, audit, shared.shard_metrics[id].clone(), commit, audit_helpers),
            next_request: Cell::new(0),
            request_id_prefix: request_id_prefix(id),
            shared,
            drain: LocalEvent::default(),
            idle_spin: Rc::default(),
            all_closed: LocalEvent::default(),
            connections: Cell::new(0),
            instances: Cell::new(0),
            spent: RefCell::new(Vec::new()),
            inflight_body_bytes: Cell::new(0),
            inflight_body_per_tenant: RefCell::default(),
            running_per_tenant: RefCell::default(),
            max_running_per_tenant: per_shard(limits_max_concurrent) as u32,
        }
    }

    /// A request id unique in this process's life: a per-process random prefix, the shard, and
    /// the shard's own count. Built without `format!`: with it, formatting and the allocations it
    /// made took about 3% of a shard's CPU on the empty guest at 70,000 req/s (`perf record`).
    pub fn next_request_id(&self) -> String {
        let n = self.next_request.get() + 1;
        self.next_request.set(n);
        let mut count = itoa::Buffer::new();
        let count = count.format(n);
        let mut id = String::with_capacity(self.request_id_prefix.len() + count.len());
        id.push_str(&self.request_id_prefix);
        id.push_str(count);
        id
    }

    /// Connections open on this shard now.
    pub fn open_connections(&self) -> usize {
        self.connections.get()
    }

    /// Whether the shard holds its share of `--max-connections`.
    pub fn connections_full(&self) -> bool {
        self.connections.get() >= self.max_connections
    }

    /// Resolves once the shard drains and its last connection has closed.
    pub async fn all_closed(&self) {
        self.all_closed.wait().await
    }
}

/// `{process}-{shard}-`: the process part is random, drawn once per process.
fn request_id_prefix(shard: usize) -> String {
    static PROCESS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let process = PROCESS.get_or_init(|| crate::functions::record::new_id()[..8].to_string());
    format!("{process}-{shard}-")
}

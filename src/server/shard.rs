//! A shard: one OS thread pinned to one CPU, running a monoio executor. It owns its listener, its
//! connections, its function cache (with one `InstancePre` per function) and its metrics.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use monoio::net::{TcpListener, TcpStream};
use std::net::SocketAddr;
use wasmtime::{Engine, Store};

use super::Shared;
use crate::audit::{Actor, ActorScope, AuditEvent};
use crate::audit::{AuditConfig, CommitSlot, ShardAudit};
use crate::auth::refusals::{LeftOut, Refusals, Refused, WINDOW};
use crate::auth::{AuthConfig, ShardAuth, TokenSet};
use crate::config::{IoDriverChoice, Limits};
use crate::error::ApiError;
use crate::functions::{AdminHandle, FunctionCache};
use crate::http::conn::{self, Peer};
use crate::metrics::{IoDriverKind, ShardMetrics};
use crate::runtime::cpu;
use crate::runtime::event::{race, Either, LocalEvent};
use crate::runtime::idle_spin::IdleSpin;
use crate::runtime::published::{Published, Subscription};
use crate::tls::TlsStream;
use crate::wasm::GuestState;

/// io_uring submission queue depth per shard.
pub(crate) const URING_ENTRIES: u32 = 1024;

/// What a shard thread starts from.
pub struct ShardInit {
    pub id: usize,
    /// `None`: the shard floats over the process's allowed CPUs.
    pub cpu: Option<usize>,
    pub listener: StdListener,
    pub engine: Engine,
    pub limits: Arc<Limits>,
    pub admin: AdminHandle,
    pub auth: Arc<AuthConfig>,
    pub tokens: Option<Arc<Published<TokenSet>>>,
    pub tls: Option<Arc<Published<rustls::ServerConfig>>>,
    pub audit: Arc<AuditConfig>,
    pub commit: Arc<CommitSlot>,
    pub shared: Arc<Shared>,
    pub io_driver: IoDriverChoice,
    /// How long the shard polls after a request before it sleeps (`--idle-spin-us`); zero: no spinner.
    pub spin_window: Duration,
    pub shard_count: usize,
    pub drain_timeout: Duration,
    pub drain_rx: oneshot::Receiver<()>,
    pub started: Sender<Result<(), String>>,
}

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

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// The shard thread's body.
pub fn run(init: ShardInit) {
    if let Some(cpu) = init.cpu {
        if let Err(e) = cpu::pin_current_thread(cpu) {
            tracing::warn!(shard = init.id, cpu, "cannot pin shard to its CPU: {e}");
        }
    }
    let metrics = init.shared.shard_metrics[init.id].clone();
    match init.io_driver {
        IoDriverChoice::Epoll => run_epoll(init, metrics),
        choice => {
            let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(URING_ENTRIES)
                .enable_timer()
                .build();
            match built {
                Ok(mut rt) => {
                    metrics.set_io_driver(IoDriverKind::IoUring);
                    rt.block_on(serve(init));
                }
                Err(e) if choice == IoDriverChoice::Auto => {
                    // Seen in containers: seccomp forbids io_uring_setup, or a low memlock limit
                    // makes it fail with ENOMEM. monoio's FusionDriver does not fall back from
                    // the latter, so we do it here.
                    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::warn!("io_uring unavailable ({e}); shards use the epoll driver");
                    }
                    run_epoll(init, metrics);
                }
                Err(e) => {
                    let _ = init.started.send(Err(format!("io_uring unavailable on shard {}: {e}", init.id)));
                }
            }
        }
    }
}

fn run_epoll(init: ShardInit, metrics: Arc<ShardMetrics>) {
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            metrics.set_io_driver(IoDriverKind::Epoll);
            rt.block_on(serve(init));
        }
        Err(e) => {
            let _ = init.started.send(Err(format!("cannot start shard {}: {e}", init.id)));
        }
    }
}

async fn serve(init: ShardInit) {
    let ShardInit {
        id,
        listener,
        engine,
        limits,
        admin,
        auth,
        tokens,
        tls,
        audit,
        commit,
        shared,
        spin_window,
        shard_count,
        drain_timeout,
        drain_rx,
        started,
        ..
    } = init;
    let tls_config = Subscription::default();
    let setup = (|| -> Result<(TcpListener, FunctionCache), String> {
        let listener = TcpListener::from_std(listener).map_err(|e| format!("shard {id}: listener: {e}"))?;
        let functions = FunctionCache::new(&engine).map_err(|e| format!("shard {id}: linker: {e:#}"))?;
        Ok((listener, functions))
    })();
    let (listener, functions) = match setup {
        Ok(v) => v,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let per_shard = |total: usize| total.div_ceil(shard_count).max(1);
    let limits_max_concurrent = limits.max_concurrent_per_tenant as usize;
    // Exactly, not rounded up: the pooling allocator holds `--max-instances` and no more, so
    // shares that sum past it would let an invoke past the shard's check fail inside the pool
    // (a 502 guest_trap where 503 overloaded is the answer). `server::run` refuses fewer
    // instances than shards.
    let instance_share = exact_share(limits.max_instances as usize, shard_count, id);
    let shard = Rc::new(Shard {
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
        audit: ShardAudit::open(id, audit, shared.shard_metrics[id].clone(), commit),
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
    });

    // Before any request: damage recovery found is the first thing the new segment records.
    shard.record_integrity_failures();
    monoio::spawn(crate::runtime::fair_yield::pump());
    monoio::spawn(record_left_out_refusals(shard.clone()));
    if let Some(interval) = shard.audit.checkpoint_interval() {
        monoio::spawn(sign_checkpoints(shard.clone(), interval));
    }
    if !spin_window.is_zero() {
        monoio::spawn(shard.idle_spin.clone().spin(spin_window));
    }
    // Routes kernel completions from the device workers to this shard's waiting guests.
    monoio::spawn(shard.shared.dispatcher.poller(id));
    let on_drain = shard.clone();
    monoio::spawn(async move {
        let _ = drain_rx.await;
        on_drain.drain.fire();
    });
    shard.shared.shard_started();
    let _ = started.send(Ok(()));

    loop {
        match race(listener.accept(), shard.drain.wait()).await {
            Either::Left(Ok((stream, addr))) => {
                shard.metrics.connections_accepted.inc();
                let _ = stream.set_nodelay(true);
                set_cloexec(&stream);
                if shard.connections.get() >= shard.max_connections {
                    shard.metrics.connections_refused.inc();
                    // Over TLS a plain-text answer would be noise: just close.
                    if tls.is_none() {
                        monoio::spawn(conn::refuse(stream, ApiError::Overloaded("too many connections")));
                    }
                    continue;
                }
                let guard = ConnectionGuard::new(shard.clone());
                match &tls {
                    None => {
                        monoio::spawn(conn::serve(guard, stream, Peer { addr, client_cert_subject: None }));
                    }
                    Some(published) => {
                        monoio::spawn(serve_tls(guard, stream, addr, tls_config.get(published)));
                    }
                }
            }
            Either::Left(Err(e)) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(shard = id, "accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            Either::Right(()) => break,
        }
    }
    // Closing the listener stops new connections to this shard at once.
    drop(listener);
    if shard.connections.get() > 0 {
        let _ = monoio::time::timeout(drain_timeout, shard.all_closed.wait()).await;
    }
    if shard.connections.get() > 0 {
        tracing::warn!(shard = id, open = shard.connections.get(), "drain timeout: closing remaining connections");
    }
    shard.audit.close();
}

/// Marks an accepted socket close-on-exec: monoio's io_uring accept does not, and a child the
/// server spawns (the module compiler) would otherwise hold its clients' connections open.
fn set_cloexec(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor this shard owns.
    unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Once a window, writes the refusals that coalescing left out of the audit log and that no later
/// record counted: one summary record per source (or token) and kind.
async fn record_left_out_refusals(shard: Rc<Shard>) {
    loop {
        monoio::time::sleep(WINDOW).await;
        for (i, left) in shard.refusals.ended(std::time::Instant::now()).into_iter().enumerate() {
            // Up to two records per remembered source: in turns, so requests are not held back.
            if i % 64 == 63 {
                crate::runtime::fair_yield::yield_now().await;
            }
            shard.record_left_out(left);
        }
    }
}

/// Every `--audit-checkpoint-interval-ms`, signs a checkpoint of the shard's chain if it moved:
/// one signature a tick, off every request's path (`ShardAudit::checkpoint`).
async fn sign_checkpoints(shard: Rc<Shard>, interval: Duration) {
    loop {
        monoio::time::sleep(interval).await;
        shard.audit.checkpoint();
    }
}

/// Completes the TLS handshake (under the header deadline), then serves the connection.
async fn serve_tls(guard: ConnectionGuard, stream: TcpStream, addr: SocketAddr, config: Arc<rustls::ServerConfig>) {
    let shard = guard.shard.clone();
    match monoio::time::timeout(shard.limits.header_timeout(), TlsStream::accept(stream, config)).await {
        Ok(Ok(tls)) => {
            let client_cert_subject = tls.client_cert_subject();
            conn::serve(guard, tls, Peer { addr, client_cert_subject }).await;
        }
        Ok(Err(e)) => {
            shard.metrics.tls_handshake_failures.inc();
            tracing::debug!(shard = shard.id, %addr, "TLS handshake failed: {e}");
        }
        Err(_) => {
            shard.metrics.tls_handshake_failures.inc();
            tracing::debug!(shard = shard.id, %addr, "TLS handshake timed out");
        }
    }
}

/// Counts a connection for its whole life; the last one out during a drain ends the shard's wait.
pub struct ConnectionGuard {
    pub shard: Rc<Shard>,
}

impl ConnectionGuard {
    fn new(shard: Rc<Shard>) -> Self {
        shard.connections.set(shard.connections.get() + 1);
        shard.metrics.connections.set(shard.connections.get() as u64);
        ConnectionGuard { shard }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let shard = &self.shard;
        // However the connection ended, no spent store of its answers outlives it.
        shard.drop_spent();
        shard.connections.set(shard.connections.get() - 1);
        shard.metrics.connections.set(shard.connections.get() as u64);
        if shard.connections.get() == 0 && shard.drain.is_fired() {
            shard.all_closed.fire();
        }
    }
}

/// `{process}-{shard}-`: the process part is random, drawn once per process.
fn request_id_prefix(shard: usize) -> String {
    static PROCESS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let process = PROCESS.get_or_init(|| crate::functions::record::new_id()[..8].to_string());
    format!("{process}-{shard}-")
}

/// A claim on one of the shard's instance slots, held for one invocation.
pub struct InstanceSlot<'a> {
    shard: &'a Shard,
}

impl Shard {
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

    /// Claims an instance slot, or refuses with 503 `overloaded` when the shard's share of the
    /// instance pool is in use: a bounded pool, never a queue without end.
    /// Spent stores are dropped first, so that they never hold a slot an invocation needs (a
    /// pipeline's earlier step, or an answer another connection has not sent yet).
    pub fn acquire_instance_slot(&self) -> Result<InstanceSlot<'_>, ApiError> {
        self.drop_spent();
        if self.instances.get() >= self.max_instances {
            return Err(ApiError::Overloaded("every instance slot of this shard is busy"));
        }
        self.instances.set(self.instances.get() + 1);
        self.metrics.active_instances.set(self.instances.get() as u64);
        self.metrics.instance_spawns.inc();
        Ok(InstanceSlot { shard: self })
    }

    /// Keeps `store`, whose invocation is over, and its slot until [`Self::drop_spent`]: dropping
    /// a store resets the memory its guest dirtied (a PAGEMAP_SCAN and a memset per page, about a
    /// tenth of a JSON request's CPU), which need not delay the answer.
    pub fn keep_spent(&self, slot: InstanceSlot<'_>, store: Store<GuestState>) {
        // The slot stays counted until its store is dropped: the pool has no more slots than that.
        std::mem::forget(slot);
        self.spent.borrow_mut().push(store);
    }

    /// Drops the spent stores and frees their slots. Called once an answer has been sent, when a
    /// connection ends, and before a slot is claimed, so that no more are held than invocations
    /// running.
    pub fn drop_spent(&self) {
        let mut spent = self.spent.borrow_mut();
        let count = spent.len();
        if count == 0 {
            return;
        }
        // Kept, not freed: the vector serves the next answers without allocating.
        spent.clear();
        drop(spent);
        self.release_slots(count);
    }

    fn release_slots(&self, count: usize) {
        self.instances.set(self.instances.get() - count);
        self.metrics.active_instances.set(self.instances.get() as u64);
    }
}

/// Request-body bytes held for one request, given back when it is dropped.
pub struct BodyReservation<'a> {
    shard: &'a Shard,
    tenant: Option<u64>,
    bytes: Cell<u64>,
}

impl BodyReservation<'_> {
    /// Grows the reservation to `total` bytes: a chunked body, as it is decoded.
    pub fn grow_to(&self, total: u64) -> Result<(), ApiError> {
        let more = total.saturating_sub(self.bytes.get());
        if more > 0 {
            self.shard.take_body_bytes(self.tenant, more)?;
            self.bytes.set(total);
        }
        Ok(())
    }
}

impl Drop for BodyReservation<'_> {
    fn drop(&mut self) {
        let (shard, bytes) = (self.shard, self.bytes.get());
        shard.inflight_body_bytes.set(shard.inflight_body_bytes.get() - bytes);
        if let Some(tenant) = self.tenant {
            let mut per_tenant = shard.inflight_body_per_tenant.borrow_mut();
            if let Some(held) = per_tenant.get_mut(&tenant) {
                *held -= bytes;
                if *held == 0 {
                    per_tenant.remove(&tenant);
                }
            }
        }
    }
}

/// One running invocation of a tenant, counted against its share of `--max-concurrent-per-tenant`.
pub struct TenantSlot<'a> {
    shard: &'a Shard,
    tenant: u64,
}

impl Drop for TenantSlot<'_> {
    fn drop(&mut self) {
        let mut running = self.shard.running_per_tenant.borrow_mut();
        if let Some(n) = running.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.tenant);
            }
        }
    }
}

impl Shard {
    /// One `audit_integrity` record for each damaged segment recovery found: the first records of
    /// the segment the chain goes on in.
    fn record_integrity_failures(&self) {
        for found in self.audit.take_damage() {
            let Ok(ticket) = self.audit.ticket() else {
                self.metrics.audit_errors.inc();
                continue;
            };
            let event = AuditEvent {
                ts_unix_ms: AuditEvent::now_unix_ms(),
                request_id: self.next_request_id(),
                actor: Actor::System,
                action: crate::audit::record::INTEGRITY_ACTION,
                function_id: None,
                pipeline_id: None,
                tenant_id: None,
                // No request: no HTTP status.
                status_code: 0,
                error_kind: None,
                failed_step: None,
                latency_us: 0,
                peer_addr: SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0),
                client_cert_subject: None,
                repeated: 0,
                integrity: Some(found),
            };
            self.audit.record(ticket, &event);
        }
    }

    /// One audit record summing up refusals left out of the log.
    fn record_left_out(&self, left: LeftOut) {
        let Ok(ticket) = self.audit.ticket() else {
            // The log cannot be written (and refuses): counted as a lost record.
            self.metrics.audit_errors.inc();
            return;
        };
        let (token_id, ip) = match left.who {
            Refused::Source(ip) => (None, ip),
            Refused::Token(id) => (Some(id.to_string()), std::net::Ipv4Addr::UNSPECIFIED.into()),
        };
        let status = if left.kind == "unauthorized" { 401 } else { 429 };
        let event = AuditEvent {
            ts_unix_ms: AuditEvent::now_unix_ms(),
            request_id: self.next_request_id(),
            actor: Actor::Bearer { token_id, scope: ActorScope::None },
            // Not a refusal itself: `repeated` counts the ones it stands for.
            action: "refusals_left_out",
            function_id: None,
            pipeline_id: None,
            tenant_id: None,
            status_code: status,
            error_kind: Some(left.kind),
            failed_step: None,
            latency_us: 0,
            peer_addr: SocketAddr::new(ip, 0),
            client_cert_subject: None,
            repeated: left.count,
            integrity: None,
        };
        self.audit.record(ticket, &event);
    }

    /// Reserves `bytes` of the shard's in-flight body budget for a request about to be read, or
    /// refuses it with 503 `overloaded` before any of its body is read.
    /// A tenant's request past its own share gets 429 `inflight_body_limited` instead, so that one
    /// tenant's slow uploads cannot take the whole budget.
    pub fn reserve_body(&self, tenant: Option<u64>, bytes: u64) -> Result<BodyReservation<'_>, ApiError> {
        self.take_body_bytes(tenant, bytes)?;
        Ok(BodyReservation { shard: self, tenant, bytes: Cell::new(bytes) })
    }

    fn take_body_bytes(&self, tenant: Option<u64>, bytes: u64) -> Result<(), ApiError> {
        if bytes == 0 {
            // Most requests (reads, probes): nothing to hold, and no map to touch.
            return Ok(());
        }
        let held = self.inflight_body_bytes.get();
        if held.saturating_add(bytes) > self.limits.max_inflight_body_bytes {
            self.metrics.body_budget_refusals.inc();
            return Err(ApiError::Overloaded("this shard holds as many request bodies as it may"));
        }
        if let Some(tenant) = tenant {
            let limit = self.limits.max_inflight_body_bytes_per_tenant;
            let mut per_tenant = self.inflight_body_per_tenant.borrow_mut();
            let tenant_held = per_tenant.entry(tenant).or_insert(0);
            if tenant_held.saturating_add(bytes) > limit {
                if *tenant_held == 0 {
                    per_tenant.remove(&tenant);
                }
                self.metrics.body_budget_refusals.inc();
                return Err(ApiError::InflightBodyLimited { limit });
            }
            *tenant_held += bytes;
        }
        self.inflight_body_bytes.set(held + bytes);
        Ok(())
    }

    /// Counts one more running invocation for `tenant`, or refuses it with 429
    /// `concurrency_limited` when the tenant already runs its share on this shard.
    pub fn acquire_tenant_slot(&self, tenant: u64) -> Result<TenantSlot<'_>, ApiError> {
        let mut running = self.running_per_tenant.borrow_mut();
        let n = running.entry(tenant).or_insert(0);
        if *n >= self.max_running_per_tenant {
            self.metrics.concurrency_refusals.inc();
            return Err(ApiError::ConcurrencyLimited { limit: self.limits.max_concurrent_per_tenant });
        }
        *n += 1;
        Ok(TenantSlot { shard: self, tenant })
    }
}

impl Drop for InstanceSlot<'_> {
    fn drop(&mut self) {
        self.shard.release_slots(1);
    }
}

/// Shard `id`'s share of `total` split over `shards`: the first `total % shards` shards take one
/// more, so the shares sum to exactly `total`.
pub fn exact_share(total: usize, shards: usize, id: usize) -> usize {
    debug_assert!(id < shards && shards > 0);
    total / shards + usize::from(id < total % shards)
}

#[cfg(test)]
mod share_tests {
    #[test]
    fn exact_shares_sum_to_the_total() {
        for total in [1usize, 2, 3, 4, 5, 999, 1000, 1001] {
            for shards in 1..=total.min(7) {
                let shares: Vec<usize> = (0..shards).map(|id| super::exact_share(total, shards, id)).collect();
                assert_eq!(shares.iter().sum::<usize>(), total, "{total} over {shards}");
                assert!(shares.iter().all(|&s| s >= 1 && s <= total.div_ceil(shards)), "{shares:?}");
            }
        }
    }
}

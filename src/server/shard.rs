//! A shard's thread: pinned to one CPU, running a monoio executor. It builds the shard's state
//! ([`crate::shard::Shard`]), runs its accept loop and its background tasks, and drains.

use std::future::Future;
use std::net::SocketAddr;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use monoio::net::{TcpListener, TcpStream};
use wasmtime::Engine;

use super::conn;
use crate::auth::refusals::WINDOW;
use crate::config::IoDriverChoice;
use crate::error::ApiError;
use crate::functions::FunctionCache;
use crate::http::Peer;
use crate::metrics::{IoDriverKind, ShardMetrics};
use crate::runtime::cpu;
use crate::runtime::event::{race, Either};
use crate::runtime::published::{Published, Subscription};
use crate::runtime::slice_timer::SliceTimer;
use crate::shard::{ConnectionGuard, Shard, ShardParts};
use crate::tls::TlsStream;

/// io_uring submission queue depth per shard.
pub(crate) const URING_ENTRIES: u32 = 1024;

/// What a shard thread starts from: the parts of its state, and what only its thread uses.
pub struct ShardInit {
    pub parts: ShardParts,
    /// `None`: the shard floats over the process's allowed CPUs.
    pub cpu: Option<usize>,
    pub listener: StdListener,
    pub tls: Option<Arc<Published<rustls::ServerConfig>>>,
    pub io_driver: IoDriverChoice,
    /// How long the shard polls after a request before it sleeps (`--idle-spin-us`); zero: no spinner.
    pub spin_window: Duration,
    pub drain_timeout: Duration,
    pub drain_rx: oneshot::Receiver<()>,
    pub started: Sender<Result<(), String>>,
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// The shard thread's body.
pub fn run(init: ShardInit) {
    if let Some(cpu) = init.cpu {
        if let Err(e) = cpu::pin_current_thread(cpu) {
            tracing::warn!(shard = init.parts.id, cpu, "cannot pin shard to its CPU: {e}");
        }
    }
    let metrics = init.parts.shared.shard_metrics[init.parts.id].clone();
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
                    rt.block_on(serve(init, IoDriverKind::IoUring));
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
                    let _ = init.started.send(Err(format!("io_uring unavailable on shard {}: {e}", init.parts.id)));
                }
            }
        }
    }
}

fn run_epoll(init: ShardInit, metrics: Arc<ShardMetrics>) {
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            metrics.set_io_driver(IoDriverKind::Epoll);
            rt.block_on(serve(init, IoDriverKind::Epoll));
        }
        Err(e) => {
            let _ = init.started.send(Err(format!("cannot start shard {}: {e}", init.parts.id)));
        }
    }
}

async fn serve(init: ShardInit, driver: IoDriverKind) {
    let ShardInit { parts, listener, tls, spin_window, drain_timeout, drain_rx, started, .. } = init;
    let metrics = parts.shared.shard_metrics[parts.id].clone();
    let slice_timer = slice_timer(parts.id, &parts.engine, parts.limits.guest_slice(), metrics);
    let (listener, functions, pump) = match open(parts.id, listener, &parts.engine, driver, slice_timer) {
        Ok(opened) => opened,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let shard = Rc::new(Shard::new(parts, functions));
    start_tasks(&shard, pump, spin_window, drain_rx);
    shard.shared.shard_started();
    let _ = started.send(Ok(()));
    accept_until_drained(&listener, &shard, tls.as_deref()).await;
    // Closing the listener stops new connections to this shard at once.
    drop(listener);
    close(&shard, drain_timeout).await;
}

/// What a shard cannot serve without: its listener on this executor, its function cache's
/// linker, and the pump of guest turns (without it a looping guest would hold the shard until
/// its deadline).
fn open(
    id: usize,
    listener: StdListener,
    engine: &Engine,
    driver: IoDriverKind,
    slice_timer: Option<SliceTimer>,
) -> Result<(TcpListener, FunctionCache, impl Future<Output = ()>), String> {
    let listener = TcpListener::from_std(listener).map_err(|e| format!("shard {id}: listener: {e}"))?;
    let functions = FunctionCache::new(engine).map_err(|e| format!("shard {id}: linker: {e:#}"))?;
    // io_uring hands a task's sends to the kernel only when the executor polls its driver.
    let flush = driver == IoDriverKind::IoUring;
    let pump =
        crate::runtime::fair_yield::pump(flush, slice_timer).map_err(|e| format!("shard {id}: guest turns: {e}"))?;
    Ok((listener, functions, pump))
}

/// The shard's slice timer, which advances the engine's epoch every guest slice while the shard
/// has long runners (`runtime::slice_timer`). Without one (a seccomp policy that forbids
/// `timer_create`, say), slices end on the epoch ticker's ticks alone, later on a busy CPU.
fn slice_timer(id: usize, engine: &Engine, guest_slice: Duration, metrics: Arc<ShardMetrics>) -> Option<SliceTimer> {
    let engine = engine.clone();
    let tick = move || {
        engine.increment_epoch();
        metrics.slice_timer_ticks.inc();
    };
    match SliceTimer::new(guest_slice, tick) {
        Ok(timer) => Some(timer),
        Err(e) => {
            tracing::warn!(shard = id, "no slice timer ({e}): guest slices end on the epoch ticker's ticks only");
            None
        }
    }
}

/// Starts the shard's own tasks, beside its connections: the guest-turn pump, the audit's
/// summaries and checkpoints, the idle spinner, the completions from the device workers, and the
/// wait for the drain signal.
fn start_tasks(
    shard: &Rc<Shard>,
    pump: impl Future<Output = ()> + 'static,
    spin_window: Duration,
    drain_rx: oneshot::Receiver<()>,
) {
    // Before any request: damage recovery found is the first thing the new segment records.
    shard.record_integrity_failures();
    monoio::spawn(pump);
    monoio::spawn(record_left_out_refusals(shard.clone()));
    monoio::spawn(refresh_functions(shard.clone()));
    if let Some(interval) = shard.audit.checkpoint_interval() {
        monoio::spawn(sign_checkpoints(shard.clone(), interval));
    }
    if !spin_window.is_zero() {
        monoio::spawn(shard.idle_spin.clone().spin(spin_window));
    }
    // Routes kernel completions from the device workers to this shard's waiting guests.
    monoio::spawn(shard.shared.dispatcher.poller(shard.id));
    let on_drain = shard.clone();
    monoio::spawn(async move {
        let _ = drain_rx.await;
        on_drain.drain.fire();
    });
}

/// Accepts connections until the shard drains, and spawns a task to serve each one it has room
/// for, over TLS when `tls` is given.
async fn accept_until_drained(
    listener: &TcpListener,
    shard: &Rc<Shard>,
    tls: Option<&Published<rustls::ServerConfig>>,
) {
    let tls_config = Subscription::default();
    loop {
        match race(listener.accept(), shard.drain.wait()).await {
            Either::Left(Ok((stream, addr))) => {
                shard.metrics.connections_accepted.inc();
                let _ = stream.set_nodelay(true);
                set_cloexec(&stream);
                if shard.connections_full() {
                    shard.metrics.connections_refused.inc();
                    // Over TLS a plain-text answer would be noise: just close.
                    if tls.is_none() {
                        monoio::spawn(conn::refuse(stream, ApiError::Overloaded("too many connections")));
                    }
                    continue;
                }
                let guard = ConnectionGuard::new(shard.clone());
                match tls {
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
                tracing::warn!(shard = shard.id, "accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            Either::Right(()) => break,
        }
    }
}

/// Waits up to `drain_timeout` for the shard's connections to close, then closes its audit chain.
async fn close(shard: &Shard, drain_timeout: Duration) {
    if shard.open_connections() > 0 {
        let _ = monoio::time::timeout(drain_timeout, shard.all_closed()).await;
    }
    if shard.open_connections() > 0 {
        tracing::warn!(
            shard = shard.id,
            open = shard.open_connections(),
            "drain timeout: closing remaining connections"
        );
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

/// How often an idle shard brings its copy of the catalog up to date.
const FUNCTIONS_REFRESH: Duration = Duration::from_secs(1);

/// Brings the shard's copy of the catalog up to date every [`FUNCTIONS_REFRESH`]: a shard that
/// serves no function requests would otherwise hold deleted functions, and their resident tensors
/// on a device, until its next one. An atomic load when nothing changed.
async fn refresh_functions(shard: Rc<Shard>) {
    loop {
        monoio::time::sleep(FUNCTIONS_REFRESH).await;
        shard.functions.refresh(&shard.shared.catalog);
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

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use tensor_wasm_dispatch::Op;

use crate::http::{Method, Status};
use crate::route::Route;

/// A histogram's upper bounds, in seconds (for rendering) and nanoseconds (for observing).
pub struct Buckets {
    pub seconds: &'static [f64],
    nanos: &'static [u64],
}

const fn nanos<const N: usize>(seconds: [f64; N]) -> [u64; N] {
    let mut out = [0u64; N];
    let mut i = 0;
    while i < N {
        out[i] = (seconds[i] * 1e9) as u64;
        i += 1;
    }
    out
}

const DURATION_SECONDS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Request durations: 10 µs to 10 s. A `/healthz` takes a few microseconds inside the server and
/// an invoke tens of them, so the low buckets are where the server's own share shows.
pub static DURATION_BUCKETS: Buckets = Buckets { seconds: &DURATION_SECONDS, nanos: &nanos(DURATION_SECONDS) };

const KERNEL_SECONDS: [f64; 16] = [
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.01,
    0.05,
    0.25,
    1.0,
    5.0,
];
/// Kernel dispatch latency: 1 µs to 5 s.
pub static KERNEL_BUCKETS: Buckets = Buckets { seconds: &KERNEL_SECONDS, nanos: &nanos(KERNEL_SECONDS) };

/// A counter with a single writer, its shard. The write is a plain load and store (no locked
/// read-modify-write, no contention); the scraper on another thread may read a value one
/// increment old, which a monotonic counter tolerates.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        let old = self.0.load(Ordering::Relaxed);
        let new = old.wrapping_add(n);
        if cfg!(debug_assertions) {
            // A second writer would lose increments to the plain store; debug builds write with a
            // compare-and-swap instead, which fails when one wrote between the load and the write.
            let raced = self.0.compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed).is_err();
            debug_assert!(!raced, "a single-writer counter was written by two threads at once");
        } else {
            self.0.store(new, Ordering::Relaxed);
        }
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge with a single writer, its shard.
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum IoDriverKind {
    Starting = 0,
    IoUring = 1,
    Epoll = 2,
}

impl IoDriverKind {
    pub fn label(self) -> &'static str {
        match self {
            IoDriverKind::Starting => "starting",
            IoDriverKind::IoUring => "io_uring",
            IoDriverKind::Epoll => "epoll",
        }
    }
}

const ROUTES: usize = Route::ALL.len();
const METHODS: usize = Method::ALL.len();
const STATUSES: usize = Status::ALL.len();

/// One histogram series: cumulative only at render time; here, one count per bucket plus +Inf.
pub struct Histogram {
    pub bounds: &'static Buckets,
    pub buckets: Box<[Counter]>,
    pub sum_nanos: Counter,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&DURATION_BUCKETS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static Buckets) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.nanos.len()).map(|_| Counter::default()).collect(),
            sum_nanos: Counter::default(),
        }
    }

    /// Records one duration. Single writer: the owning shard, or the one thread that owns it.
    pub fn observe(&self, d: Duration) {
        let nanos = d.as_nanos().min(u64::MAX as u128) as u64;
        let bounds = self.bounds.nanos;
        let i = bounds.iter().position(|&b| nanos <= b).unwrap_or(bounds.len());
        self.buckets[i].inc();
        self.sum_nanos.add(nanos);
    }
}

/// Everything one shard counts. Written only by the owning shard's thread.
///
/// Aligned to 128 bytes, so that its counters written on every request (connections, instances)
/// share no cache line with another allocation, another shard's metrics among them: every shard's
/// metrics are allocated on the main thread, one after another. Its boxed arrays are allocations
/// of their own: only their first and last lines can be shared with a neighbouring allocation.
#[repr(align(128))]
pub struct ShardMetrics {
    pub shard: usize,
    pub requests: Box<[Counter]>,
    pub durations: Box<[Histogram]>,
    pub connections: Gauge,
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    /// Requests refused with 503 because the shard held `--max-inflight-body-bytes` of bodies.
    pub body_budget_refusals: Counter,
    /// Invocations refused with 429 `concurrency_limited`.
    pub concurrency_refusals: Counter,
    /// Refusals left out of the audit log by coalescing (`auth::refusals`).
    pub audit_refusals_coalesced: Counter,
    pub active_instances: Gauge,
    pub instance_spawns: Counter,
    /// Ticks of the shard's slice timer (`runtime::slice_timer`), each a guest slice ended on time.
    /// Written by the timer's signal handler, which runs on the shard's thread: still one writer.
    pub slice_timer_ticks: Counter,
    pub invocations_failed: Counter,
    pub tls_handshake_failures: Counter,
    pub audit_records: Counter,
    pub audit_bytes: Counter,
    pub audit_errors: Counter,
    /// Damaged segments start-up found (`audit::recover`), each recorded as `audit_integrity`.
    pub audit_integrity_failures: Counter,
    /// Checkpoints signed.
    pub audit_checkpoints: Counter,
    pub xfcc_ignored: Counter,
    /// Kernel requests per device and op (`devices × Op::ALL`).
    pub kernel_dispatches: Box<[Counter]>,
    /// Guest-visible latency per op: from the host call to its result in the guest.
    pub kernel_latency: Box<[Histogram]>,
    /// Times a guest found its dispatch ring full and waited.
    pub dispatch_ring_waits: Counter,
    pub dispatch_busy: Counter,
    io_driver: AtomicU8,
}

impl ShardMetrics {
    pub fn new(shard: usize, devices: usize) -> Self {
        ShardMetrics {
            shard,
            requests: (0..ROUTES * METHODS * STATUSES).map(|_| Counter::default()).collect(),
            durations: (0..ROUTES * METHODS).map(|_| Histogram::default()).collect(),
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            body_budget_refusals: Counter::default(),
            concurrency_refusals: Counter::default(),
            audit_refusals_coalesced: Counter::default(),
            active_instances: Gauge::default(),
            instance_spawns: Counter::default(),
            slice_timer_ticks: Counter::default(),
            invocations_failed: Counter::default(),
            tls_handshake_failures: Counter::default(),
            audit_records: Counter::default(),
            audit_bytes: Counter::default(),
            audit_errors: Counter::default(),
            audit_integrity_failures: Counter::default(),
            audit_checkpoints: Counter::default(),
            xfcc_ignored: Counter::default(),
            kernel_dispatches: (0..devices * Op::ALL.len()).map(|_| Counter::default()).collect(),
            kernel_latency: Op::ALL.iter().map(|_| Histogram::new(&KERNEL_BUCKETS)).collect(),
            dispatch_ring_waits: Counter::default(),
            dispatch_busy: Counter::default(),
            io_driver: AtomicU8::new(IoDriverKind::Starting as u8),
        }
    }

    #[inline]
    pub fn record_request(&self, route: Route, method: Method, status: Status, elapsed: Duration) {
        let rm = route.index() * METHODS + method.index();
        self.requests[rm * STATUSES + status.index()].inc();
        self.durations[rm].observe(elapsed);
    }

    pub fn request_count(&self, route: Route, method: Method, status: Status) -> u64 {
        self.requests[(route.index() * METHODS + method.index()) * STATUSES + status.index()].get()
    }

    pub fn histogram(&self, route: Route, method: Method) -> &Histogram {
        &self.durations[route.index() * METHODS + method.index()]
    }

    pub fn set_io_driver(&self, kind: IoDriverKind) {
        self.io_driver.store(kind as u8, Ordering::Relaxed);
    }

    pub fn io_driver(&self) -> IoDriverKind {
        match self.io_driver.load(Ordering::Relaxed) {
            1 => IoDriverKind::IoUring,
            2 => IoDriverKind::Epoll,
            _ => IoDriverKind::Starting,
        }
    }

    /// Counts one request of `op` to `device` and the guest-visible time it took.
    pub fn record_kernel(&self, device: usize, op: Op, elapsed: Duration) {
        self.kernel_dispatches[device * Op::ALL.len() + op.index()].inc();
        self.kernel_latency[op.index()].observe(elapsed);
    }

    pub fn kernel_count(&self, device: usize, op: Op) -> u64 {
        self.kernel_dispatches[device * Op::ALL.len() + op.index()].get()
    }

    /// Requests this shard answered, all routes.
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().map(Counter::get).sum()
    }
}

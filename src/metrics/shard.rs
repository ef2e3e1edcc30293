use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use crate::api::Route;
use crate::http::{Method, Status};

/// Upper bounds of the request-duration histogram, in seconds: 50 µs to 10 s.
pub const DURATION_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BUCKET_NANOS: [u64; 17] = {
    let mut out = [0u64; 17];
    let mut i = 0;
    while i < 17 {
        out[i] = (DURATION_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// A counter with a single writer, its shard. The write is a plain load and store (no locked
/// read-modify-write, no contention); the scraper on another thread may read a value one
/// increment old, which a monotonic counter tolerates.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
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
#[derive(Default)]
pub struct Histogram {
    pub buckets: [Counter; 18],
    pub sum_nanos: Counter,
}

impl Histogram {
    /// Records one duration. Single writer: the owning shard, or the one thread that owns it.
    pub fn observe(&self, d: Duration) {
        let nanos = d.as_nanos().min(u64::MAX as u128) as u64;
        let i = BUCKET_NANOS.iter().position(|&b| nanos <= b).unwrap_or(BUCKET_NANOS.len());
        self.buckets[i].inc();
        self.sum_nanos.add(nanos);
    }
}

/// Everything one shard counts. Written only by the owning shard's thread.
pub struct ShardMetrics {
    pub shard: usize,
    pub requests: Box<[Counter]>,
    pub durations: Box<[Histogram]>,
    pub connections: Gauge,
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    pub active_instances: Gauge,
    pub instance_spawns: Counter,
    pub invocations_failed: Counter,
    pub tls_handshake_failures: Counter,
    pub audit_records: Counter,
    pub audit_bytes: Counter,
    pub audit_errors: Counter,
    pub xfcc_ignored: Counter,
    io_driver: AtomicU8,
}

impl ShardMetrics {
    pub fn new(shard: usize) -> Self {
        ShardMetrics {
            shard,
            requests: (0..ROUTES * METHODS * STATUSES).map(|_| Counter::default()).collect(),
            durations: (0..ROUTES * METHODS).map(|_| Histogram::default()).collect(),
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            active_instances: Gauge::default(),
            instance_spawns: Counter::default(),
            invocations_failed: Counter::default(),
            tls_handshake_failures: Counter::default(),
            audit_records: Counter::default(),
            audit_bytes: Counter::default(),
            audit_errors: Counter::default(),
            xfcc_ignored: Counter::default(),
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

    /// Requests this shard answered, all routes.
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().map(Counter::get).sum()
    }
}

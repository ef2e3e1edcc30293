//! The dispatcher: every device's worker and rings, every shard's port, the tenant quotas. Built
//! once at start-up and shared by the shards through an `Arc`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::backend::{cuda, host::HostBackend, Backend, BackendKind};
use crate::port::{ShardPort, UNTRACKED};
use crate::quota::Quotas;
use crate::record::{Op, Request, RELEASE_SHARED};
use crate::worker;

/// Which back-end to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// CUDA when a device is present, else the host back-end.
    Auto,
    /// CUDA, or start-up fails.
    Cuda,
    /// The host back-end.
    Host,
}

/// What each device worker runs first on its own thread, given its index and the number of
/// workers: the server pins it there (`cpu::placement`), so that the dispatch crate needs no
/// knowledge of CPUs. [`Dispatcher::start`] returns once every worker has run it.
#[derive(Clone)]
pub struct OnWorkerStart(pub Arc<dyn Fn(usize, usize) + Send + Sync>);

impl std::fmt::Debug for OnWorkerStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnWorkerStart")
    }
}

/// Every limit of the dispatch path.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    pub backend: BackendChoice,
    /// Host "devices" (workers) when the host back-end runs.
    pub host_devices: usize,
    /// Shards that submit: one ring per shard and device.
    pub shards: usize,
    /// Requests each shard-to-device ring holds. Full: the guest waits, then gets `busy`.
    pub ring_depth: usize,
    /// CUDA streams per shard on each device (`--gpu-streams`): every shard has its own, so that
    /// one shard's queue cannot sit in front of another's; at most
    /// [`cuda::MAX_STREAMS_PER_DEVICE`] per device over all shards, and one per shard at least
    /// ([`cuda::streams_per_shard`]). The name is from before streams were per shard.
    pub streams_per_device: usize,
    /// Requests one shard may have in flight (its ticket table).
    pub max_tickets_per_shard: usize,
    /// How long a call waits for room in a full ring (within its invocation's deadline) before it
    /// fails with `busy`.
    pub max_ring_wait: Duration,
    /// How long a waiting guest spins before it parks its task.
    pub guest_spin: Duration,
    /// How long an idle worker spins before it sleeps.
    pub worker_spin: Duration,
    /// Device memory a tenant may hold, over all devices.
    pub tenant_quota_bytes: u64,
    /// Tensors one invocation may hold at once.
    pub max_tensors_per_session: usize,
    /// Elements one tensor may have: at most `u32::MAX`, a flat request's length.
    pub max_tensor_elements: u64,
    /// Tenants the quota table keeps; past it, idle ones (nothing held, no invocation using them)
    /// are dropped. It refuses no one: a bound on the table's memory, not a limit on tenants.
    pub max_quota_tenants: usize,
    /// Run by each worker on its thread before it takes a request.
    pub on_worker_start: Option<OnWorkerStart>,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            backend: BackendChoice::Auto,
            host_devices: 1,
            shards: 1,
            ring_depth: 256,
            streams_per_device: 4,
            max_tickets_per_shard: 4096,
            max_ring_wait: Duration::from_millis(1000),
            guest_spin: Duration::from_micros(20),
            worker_spin: Duration::from_micros(50),
            tenant_quota_bytes: 1 << 30,
            max_tensors_per_session: 1024,
            max_tensor_elements: 64 << 20,
            max_quota_tenants: 4096,
            on_worker_start: None,
        }
    }
}

#[derive(Debug)]
pub enum DispatchError {
    /// `--gpu cuda` where no CUDA device can be used; the reason.
    CudaUnavailable(String),
    Config(String),
    Spawn(std::io::Error),
}

impl std::fmt::Display for DispatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DispatchError::CudaUnavailable(why) => write!(f, "CUDA is not available: {why}"),
            DispatchError::Config(why) => write!(f, "invalid dispatch configuration: {why}"),
            DispatchError::Spawn(e) => write!(f, "cannot start a device worker: {e}"),
        }
    }
}

impl std::error::Error for DispatchError {}

/// A request waiting for room in its ring: (device, request).
type Deferred = (usize, Request);

/// One device as the shards see it.
///
/// Aligned to 128 bytes (two cache lines, as the rings' own indices are padded): every shard
/// writes its `in_flight` and the worker its `memory_used`, and in the slice of devices one
/// device's counters would otherwise share a line with the next device's.
#[repr(align(128))]
pub struct Device {
    pub index: usize,
    pub kind: BackendKind,
    pub name: String,
    /// One ring per shard: each has a single producer, its shard, and a single consumer, this
    /// device's worker. crossbeam's `ArrayQueue` keeps its head (the consumer's index) and its tail
    /// (the producer's) in `CachePadded` fields, 128 bytes each on x86-64 and AArch64, so the two
    /// ends never write one line (`tests::ring_indices_are_on_lines_of_their_own`).
    pub(crate) rings: Box<[ArrayQueue<Request>]>,
    /// Requests pushed and not yet completed; the placement policy reads it.
    pub(crate) in_flight: AtomicU64,
    pub(crate) memory_used: AtomicU64,
    pub(crate) sleeping: AtomicBool,
    pub(crate) thread: OnceLock<Thread>,
    /// Debug builds: per ring, whether a thread is pushing onto it now (`OneProducer`).
    #[cfg(debug_assertions)]
    producing: Box<[AtomicBool]>,
}

/// Debug builds: holds a ring's "pushing" flag for one push, and fails when another thread holds
/// it. A ring has one producer, its shard; a second one at the same moment would be a shard's
/// request sent from another thread, which this design rules out.
#[cfg(debug_assertions)]
struct OneProducer<'a>(&'a AtomicBool);

#[cfg(debug_assertions)]
impl<'a> OneProducer<'a> {
    fn enter(flag: &'a AtomicBool) -> Self {
        let busy = flag.swap(true, Ordering::Acquire);
        debug_assert!(!busy, "two threads pushed onto one shard's ring at once");
        OneProducer(flag)
    }
}

#[cfg(debug_assertions)]
impl Drop for OneProducer<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Device {
    /// Free places in `shard`'s ring to this device.
    pub fn permits(&self, shard: usize) -> usize {
        let ring = &self.rings[shard];
        ring.capacity() - ring.len()
    }

    pub fn memory_used(&self) -> u64 {
        self.memory_used.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn wake(&self) {
        // Pairs with the worker's fence between announcing sleep and re-checking the rings: either
        // it sees this request, or this sees it sleeping.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }
}

pub struct Dispatcher {
    pub config: DispatchConfig,
    pub devices: Box<[Device]>,
    pub(crate) ports: Box<[Arc<ShardPort>]>,
    pub quotas: Quotas,
    /// Requests that found their ring full when nobody could wait: frees and releases, and
    /// releases of resident weights from other threads. The shard's poller retries them; bounded
    /// by the tensors and sessions a shard can have.
    deferred: Box<[Mutex<Vec<Deferred>>]>,
    /// Per shard: a request was deferred since the poller last looked (a full ring, or a release
    /// from another thread). The poller checks it after registering its waker, so that a wake
    /// between its look at the list and its registration is not lost.
    deferred_added: Box<[AtomicBool]>,
    /// Per shard: its deferred list is not empty. The worker wakes the shard's poller, to push
    /// them, whenever it has made room on that shard's ring and before it sleeps, while it is set:
    /// frees and streamed kernels get no completion that would wake it.
    deferred_waiting: Box<[AtomicBool]>,
    pub(crate) stop: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// With `auto`: why CUDA was not used, for the operator's log.
    pub cuda_fallback: Option<String>,
}

impl Dispatcher {
    /// Opens the back-ends and starts one worker per device.
    pub fn start(config: DispatchConfig) -> Result<Arc<Dispatcher>, DispatchError> {
        if config.shards == 0 || config.ring_depth == 0 || config.streams_per_device == 0 {
            return Err(DispatchError::Config("shards, ring depth and streams must be at least 1".into()));
        }
        // A ticket's index is the low 16 bits of its number (`port`).
        if config.max_tickets_per_shard == 0 || config.max_tickets_per_shard >= usize::from(u16::MAX) {
            return Err(DispatchError::Config(format!("tickets per shard must be 1 to {}", u16::MAX - 1)));
        }
        // At most what cuBLAS's int sizes and CUDA's grids take (`--max-tensor-elements`).
        if config.max_tensor_elements == 0 || config.max_tensor_elements > i32::MAX as u64 {
            return Err(DispatchError::Config(format!("tensor elements must be 1 to {}", i32::MAX)));
        }
        let mut cuda_fallback = None;
        let backends: Vec<Box<dyn Backend>> = match config.backend {
            BackendChoice::Host => host_backends(config.host_devices),
            BackendChoice::Cuda => {
                cuda::open_all(config.shards, config.streams_per_device).map_err(DispatchError::CudaUnavailable)?
            }
            BackendChoice::Auto => match cuda::open_all(config.shards, config.streams_per_device) {
                Ok(devices) => devices,
                Err(why) => {
                    cuda_fallback = Some(why);
                    host_backends(config.host_devices)
                }
            },
        };
        if backends.is_empty() {
            return Err(DispatchError::Config("no device to dispatch to".into()));
        }
        let shards = config.shards;
        // A worker never drops a completion: when the ring is full it keeps it and retries. The
        // depth covers every request a shard can have in flight, so that rarely happens.
        let completion_depth = (config.ring_depth * backends.len()).max(config.max_tickets_per_shard) + 64;
        debug_assert!(completion_depth > config.ring_depth * backends.len());
        let devices = backends
            .iter()
            .enumerate()
            .map(|(index, b)| Device {
                index,
                kind: b.kind(),
                name: b.describe(),
                rings: (0..shards).map(|_| ArrayQueue::new(config.ring_depth)).collect(),
                in_flight: AtomicU64::new(0),
                memory_used: AtomicU64::new(0),
                sleeping: AtomicBool::new(false),
                thread: OnceLock::new(),
                #[cfg(debug_assertions)]
                producing: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            })
            .collect();
        let dispatcher = Arc::new(Dispatcher {
            ports: (0..shards)
                .map(|s| Arc::new(ShardPort::new(s, completion_depth, config.max_tickets_per_shard)))
                .collect(),
            deferred: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            deferred_added: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            deferred_waiting: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            quotas: Quotas::new(config.tenant_quota_bytes, config.max_quota_tenants),
            config,
            devices,
            stop: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
            cuda_fallback,
        });
        let workers = backends.len();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        for (index, backend) in backends.into_iter().enumerate() {
            let d = dispatcher.clone();
            let started = started_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("tw-device-{index}"))
                .spawn(move || {
                    if let Some(hook) = &d.config.on_worker_start {
                        (hook.0)(index, workers);
                    }
                    drop(started);
                    worker::run(d, index, backend)
                })
                .map_err(DispatchError::Spawn)?;
            let _ = dispatcher.devices[index].thread.set(handle.thread().clone());
            dispatcher.workers.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
        }
        // Every worker has run its start hook (each drops its sender after it; a worker that
        // panicked in it drops it too), so that what the hook set, a CPU, holds from here on.
        drop(started_tx);
        let _ = started_rx.recv();
        Ok(dispatcher)
    }

    /// The back-end every device runs.
    pub fn backend(&self) -> BackendKind {
        self.devices[0].kind
    }

    pub fn port(&self, shard: usize) -> &Arc<ShardPort> {
        &self.ports[shard]
    }

    /// The device for a new session: the one with the fewest requests in flight; ties go to the
    /// lowest index after a rotating start, so idle devices share the sessions.
    pub fn place(&self, shard: usize) -> usize {
        let n = self.devices.len();
        let start = (self.ports[shard].next_id() as usize) % n;
        (0..n).map(|i| (start + i) % n).min_by_key(|&i| self.devices[i].in_flight()).unwrap_or(0)
    }

    /// Pushes `req` onto `shard`'s ring to `device`. `Err` gives it back when the ring is full.
    pub fn try_submit(&self, shard: usize, device: usize, req: Request) -> Result<(), Request> {
        debug_assert_eq!(usize::from(req.shard), shard);
        let d = &self.devices[device];
        #[cfg(debug_assertions)]
        let _one = OneProducer::enter(&d.producing[shard]);
        // Counted before the push: the worker may complete the request before this thread runs
        // again, and its decrement must never find the count at zero (it wrapped, for a moment,
        // when the count followed the push).
        d.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Err(req) = d.rings[shard].push(req) {
            d.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(req);
        }
        d.wake();
        Ok(())
    }

    /// Sends a request nobody waits for (`Free`, `Release`). A full ring defers it to the shard's
    /// poller: it is never dropped, since it returns device memory.
    pub(crate) fn send_untracked(&self, shard: usize, device: usize, mut req: Request) {
        req.ticket = UNTRACKED;
        if let Err(req) = self.try_submit(shard, device, req) {
            self.defer(shard, device, req);
        }
    }

    fn defer(&self, shard: usize, device: usize, req: Request) {
        let mut deferred = self.deferred[shard].lock().unwrap_or_else(|e| e.into_inner());
        deferred.push((device, req));
        self.deferred_waiting[shard].store(true, Ordering::Release);
        self.deferred_added[shard].store(true, Ordering::Release);
    }

    /// Whether requests wait in `shard`'s deferred list: the worker then answers an untracked
    /// request with a completion, to wake the shard's poller to push them. Otherwise it answers
    /// none, and a guest freeing each tensor of a chain costs no wake-up across threads.
    pub(crate) fn deferred_waiting(&self, shard: usize) -> bool {
        self.deferred_waiting[shard].load(Ordering::Acquire)
    }

    /// Releases a function's resident weights (session `owner`) on `device`, from any thread: the
    /// last holder of a function version may be the catalog worker or any shard's cache. A ring
    /// has one producer, its shard, so the request waits in the deferred list of `shard`, the one
    /// that uploaded the weights, and its poller, woken here, pushes it: behind every upload that
    /// shard sent, so that a copy cut short by a deadline never has an upload land after its
    /// release. It is a shared release ([`RELEASE_SHARED`]).
    pub(crate) fn release_from_anywhere(&self, shard: usize, device: usize, owner: u64) {
        let mut req = self.request(shard, Op::Release, owner);
        req.ticket = UNTRACKED;
        req.dtype = RELEASE_SHARED;
        self.defer(shard, device, req);
        self.ports[shard].poller.wake();
    }

    fn retry_deferred(&self, shard: usize) {
        let mut deferred = self.deferred[shard].lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = Vec::new();
        for (device, req) in deferred.drain(..) {
            if let Err(req) = self.try_submit(shard, device, req) {
                kept.push((device, req));
            }
        }
        self.deferred_waiting[shard].store(!kept.is_empty(), Ordering::Release);
        *deferred = kept;
    }

    /// The task each shard runs for as long as it lives: it routes completions to the waiting
    /// guests and retries deferred frees. Workers wake it after each completion they push.
    pub fn poller(self: &Arc<Self>, shard: usize) -> Poller {
        Poller { dispatcher: self.clone(), shard }
    }

    /// A request for `op` from `shard`; the caller fills in the operands.
    pub fn request(&self, shard: usize, op: Op, session: u64) -> Request {
        Request { session, shard: shard as u16, op: op as u8, ..Default::default() }
    }

    /// Stops the workers; requests still on the rings are dropped with the process.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        for d in self.devices.iter() {
            if let Some(t) = d.thread.get() {
                t.unpark();
            }
        }
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

fn host_backends(count: usize) -> Vec<Box<dyn Backend>> {
    (0..count.max(1)).map(|i| Box::new(HostBackend::new(i)) as Box<dyn Backend>).collect()
}

/// See [`Dispatcher::poller`].
pub struct Poller {
    dispatcher: Arc<Dispatcher>,
    shard: usize,
}

impl Future for Poller {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let port = &self.dispatcher.ports[self.shard];
        loop {
            port.drain();
            self.dispatcher.deferred_added[self.shard].store(false, Ordering::Relaxed);
            self.dispatcher.retry_deferred(self.shard);
            port.poller.register(cx.waker());
            let added = self.dispatcher.deferred_added[self.shard].load(Ordering::Acquire);
            if port.completions.is_empty() && !added {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crossbeam_queue::ArrayQueue;

    use crate::record::Request;

    /// A ring's producer index and consumer index each fill 128 bytes of their own (crossbeam's
    /// `CachePadded`), and devices and ports start on lines of their own.
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ring_indices_are_on_lines_of_their_own() {
        assert!(std::mem::align_of::<ArrayQueue<Request>>() >= 128);
        // The head and the tail, 128 bytes each, come before the buffer's pointer and capacity.
        assert!(std::mem::size_of::<ArrayQueue<Request>>() >= 2 * 128 + 2 * std::mem::size_of::<usize>());
        assert_eq!(std::mem::align_of::<super::Device>(), 128);
        assert_eq!(std::mem::align_of::<crate::port::ShardPort>(), 128);
    }
}

//! Open-loop, constant-rate load with latency corrected for coordinated omission.
//!
//! Each connection has its own schedule: request `i` of connection `c` is due at
//! `start + c·period/connections + i·period`, whatever happened to the requests before it. A few
//! threads (`LoadPlan::threads`) each run an epoll loop over their share of the connections,
//! waking at each due time with nanosecond timeouts (`epoll_pwait2`); few threads rather than one
//! per connection, so that the generator does not crowd the server's pinned shards off the CPUs. A
//! connection carries one request at a time (HTTP/1.1 without pipelining), so when the server is
//! slow the next request waits for the previous answer. That wait is the server's doing and is
//! counted. Precisely,
//!
//! ```text
//! latency = (done − sent) + max(0, previous_done − due)
//! ```
//!
//! The first term is the round trip. The second is the queueing the server caused by answering the
//! previous request late. `sent` is read just before the request is written; `done` is when the
//! answer's last bytes reached the generator's socket, as the kernel stamped them on arrival
//! (`SO_TIMESTAMPNS`), not when the generator got round to reading them: on a VM a sleeping
//! thread takes tens of microseconds to wake, and that wake is the instrument's, not the
//! server's. Where the kernel gives no stamp the time of the read stands in. What is not counted
//! either is the generator's own lateness in sending (a sleep that woke late, a thread that was
//! not scheduled): it is recorded apart, as `lag`, and reported so that a run whose generator
//! could not keep up is visible as such. A closed loop (wrk, hey) would send
//! the next request only after the answer and so never see the queue the server built up.
//!
//! Requests still unsent when the run ends, because their connection was stuck behind a slow
//! answer, are recorded with the time they had already waited: a lower bound.
//!
//! The generator's parts: this file holds the plan, its outcome and [`run`]; [`event_loop`] is
//! one thread's loop over its connections; [`timing`] is what it asks of the kernel (arrival
//! stamps, epoll with nanosecond waits, timer slack) and the latency arithmetic.

mod event_loop;
mod timing;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::client::{open, Tls};
use crate::histogram;
use event_loop::{EventConn, EventLoop, READ_CHUNK};
pub(crate) use timing::set_timer_slack_ns;
use timing::stamp_arrivals;

/// The stack of a generator thread; its loop needs little.
const THREAD_STACK: usize = 256 * 1024;

/// One kind of request in the mix, pre-encoded.
#[derive(Clone, Debug)]
pub struct RequestClass {
    pub name: String,
    pub request: Arc<[u8]>,
    /// Its share of the schedule, relative to the other classes' weights.
    pub weight: u32,
}

/// What to send, how fast, and for how long.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    pub addr: SocketAddr,
    /// For an https:// server: each connection's handshake runs before the schedule starts (or,
    /// for a connection the server closed, before its next request is sent), outside any latency.
    pub tls: Option<Tls>,
    /// Requests per second, over all connections.
    pub rate: f64,
    /// Requests due in the warm-up are sent but not recorded.
    pub warmup: Duration,
    pub duration: Duration,
    pub connections: usize,
    /// Generator threads; the connections are dealt out among them.
    pub threads: usize,
    pub classes: Vec<RequestClass>,
    /// The longest a connect, write or read may take before it counts as an error.
    pub io_timeout: Duration,
    /// Each thread polls without sleeping, taking its whole CPU: no wake-up of a parked generator
    /// for the server's answer to pay, as with a client on another machine.
    pub spin: bool,
}

/// The outcome for one class of requests.
#[derive(Clone, Debug)]
pub struct ClassOutcome {
    pub name: String,
    /// Nanoseconds, corrected for coordinated omission.
    pub latency: Histogram<u64>,
    /// The same, of the non-2xx answers only: rare in most runs, so the generator's per-answer
    /// cost stays one record; `admitted` derives the 2xx latency from it.
    pub refused: Histogram<u64>,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer: connect, write or read failed or timed out.
    pub io_errors: u64,
    /// Requests due in the measured window that were never sent (see the module's comment).
    pub unsent: u64,
}

impl ClassOutcome {
    fn new(name: &str) -> Self {
        ClassOutcome {
            name: name.to_string(),
            latency: histogram(),
            refused: histogram(),
            statuses: BTreeMap::new(),
            io_errors: 0,
            unsent: 0,
        }
    }

    /// The latency of the 2xx answers alone: what admitted requests saw while others were shed.
    pub fn admitted(&self) -> Histogram<u64> {
        let mut admitted = self.latency.clone();
        // `refused` holds a subset of `latency`'s counts, so this cannot underflow.
        let _ = admitted.subtract(&self.refused);
        admitted
    }

    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    fn merge(&mut self, other: &ClassOutcome) {
        let _ = self.latency.add(&other.latency);
        let _ = self.refused.add(&other.refused);
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        self.io_errors += other.io_errors;
        self.unsent += other.unsent;
    }
}

/// The outcome of one plan.
#[derive(Clone, Debug)]
pub struct LoadOutcome {
    pub offered_rate: f64,
    pub measured: Duration,
    pub classes: Vec<ClassOutcome>,
    /// The generator's own lateness in sending, in nanoseconds: not part of any latency.
    pub lag: Histogram<u64>,
}

impl LoadOutcome {
    /// Every class together.
    pub fn total(&self) -> ClassOutcome {
        let mut all = ClassOutcome::new("all");
        for class in &self.classes {
            all.merge(class);
        }
        all
    }

    pub fn class(&self, name: &str) -> Option<&ClassOutcome> {
        self.classes.iter().find(|c| c.name == name)
    }
}

/// Counters the progress line reads while a plan runs.
#[derive(Default)]
pub struct Progress {
    pub answered: AtomicU64,
    pub failed: AtomicU64,
}

/// Runs `plan` to its end and returns what was measured. Errors only when the plan is unusable.
pub fn run(plan: &LoadPlan, progress: &Progress) -> Result<LoadOutcome, String> {
    if !(plan.rate.is_finite() && plan.rate > 0.0) {
        return Err(format!("the rate must be a positive number of requests per second, not {}", plan.rate));
    }
    if plan.connections == 0 || plan.classes.is_empty() || plan.classes.iter().all(|c| c.weight == 0) {
        return Err("a plan needs at least one connection and one request class with a weight".into());
    }
    let threads = plan.threads.clamp(1, plan.connections);
    // Connect everything first, so that connection set-up is not in anyone's latency.
    let mut shares: Vec<Vec<EventConn>> = (0..threads).map(|_| Vec::new()).collect();
    for index in 0..plan.connections {
        let (stream, tls) = connect(plan)?;
        shares[index % threads].push(EventConn::new(index, stream, tls));
    }
    let schedule: Vec<usize> =
        plan.classes.iter().enumerate().flat_map(|(i, c)| std::iter::repeat_n(i, c.weight as usize)).collect();
    // Whole nanoseconds, so that due times are exact and a window holds a predictable count.
    let period_ns = ((plan.connections as f64 / plan.rate) * 1e9).round().max(1.0) as u64;
    let barrier = Barrier::new(threads + 1);
    let start_cell = std::sync::OnceLock::<Instant>::new();
    let mut outcome = LoadOutcome {
        offered_rate: plan.rate,
        measured: plan.duration,
        classes: plan.classes.iter().map(|c| ClassOutcome::new(&c.name)).collect(),
        lag: histogram(),
    };
    std::thread::scope(|scope| -> Result<(), String> {
        let mut handles = Vec::with_capacity(threads);
        for (n, conns) in shares.into_iter().enumerate() {
            let worker = EventLoop { plan, period_ns, schedule: &schedule, conns, chunk: Box::new([0; READ_CHUNK]) };
            let (barrier, start_cell) = (&barrier, &start_cell);
            let handle = std::thread::Builder::new()
                .name(format!("load-{n}"))
                .stack_size(THREAD_STACK)
                .spawn_scoped(scope, move || {
                    barrier.wait();
                    let start = *start_cell.get().expect("the start is set before the barrier opens");
                    worker.run(start, progress)
                })
                .map_err(|e| format!("cannot start a load thread: {e}"))?;
            handles.push(handle);
        }
        // A short lead, so that every thread is waiting on its first due time rather than late.
        start_cell.set(Instant::now() + Duration::from_millis(20)).expect("set once");
        barrier.wait();
        for handle in handles {
            let part = handle.join().map_err(|_| "a load thread panicked".to_string())??;
            for (mine, theirs) in outcome.classes.iter_mut().zip(&part.classes) {
                mine.merge(theirs);
            }
            let _ = outcome.lag.add(&part.lag);
        }
        Ok(())
    })?;
    Ok(outcome)
}

/// A connection ready for the event loop: connected, past its TLS handshake, non-blocking.
fn connect(plan: &LoadPlan) -> Result<(TcpStream, Option<Box<rustls::ClientConnection>>), String> {
    let (stream, tls) = open(plan.addr, plan.tls.as_ref(), plan.io_timeout)
        .map_err(|e| format!("cannot connect to {}: {e}", plan.addr))?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    stamp_arrivals(&stream);
    Ok((stream, tls.map(Box::new)))
}

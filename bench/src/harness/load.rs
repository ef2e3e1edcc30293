//! Open-loop, constant-rate load with latency corrected for coordinated omission.
//!
//! Each connection has its own thread and its own schedule: request `i` of connection `c` is due
//! at `start + c·period/connections + i·period`, whatever happened to the requests before it. A
//! connection carries one request at a time (HTTP/1.1 without pipelining), so when the server is
//! slow the next request waits for the previous answer. That wait is the server's doing and is
//! counted. Precisely,
//!
//! ```text
//! latency = (done − sent) + max(0, previous_done − due)
//! ```
//!
//! The first term is the round trip. The second is the queueing the server caused by answering the
//! previous request late. What is not counted is the generator's own lateness (a sleep that woke
//! late, a thread that was not scheduled): it is recorded apart, as `lag`, and reported so that a
//! run whose generator could not keep up is visible as such. A closed loop (wrk, hey) would send
//! the next request only after the answer and so never see the queue the server built up.
//!
//! Requests still unsent when the run ends, because their connection was stuck behind a slow
//! answer, are recorded with the time they had already waited: a lower bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::client::Connection;

/// The largest latency the histograms hold: one hour, in nanoseconds.
const MAX_LATENCY_NS: u64 = 3_600_000_000_000;
/// The stack of a connection thread; the loop needs little.
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
    /// Requests per second, over all connections.
    pub rate: f64,
    /// Requests due in the warm-up are sent but not recorded.
    pub warmup: Duration,
    pub duration: Duration,
    pub connections: usize,
    pub classes: Vec<RequestClass>,
    /// The longest a connect, write or read may take before it counts as an error.
    pub io_timeout: Duration,
}

/// The outcome for one class of requests.
#[derive(Clone, Debug)]
pub struct ClassOutcome {
    pub name: String,
    /// Nanoseconds, corrected for coordinated omission.
    pub latency: Histogram<u64>,
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
            latency: latency_histogram(),
            statuses: BTreeMap::new(),
            io_errors: 0,
            unsent: 0,
        }
    }

    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    fn merge(&mut self, other: &ClassOutcome) {
        let _ = self.latency.add(&other.latency);
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

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_nanos() as u64).clamp(1, MAX_LATENCY_NS));
}

/// Runs `plan` to its end and returns what was measured. Errors only when the plan is unusable.
pub fn run(plan: &LoadPlan, progress: &Progress) -> Result<LoadOutcome, String> {
    if !(plan.rate.is_finite() && plan.rate > 0.0) {
        return Err(format!("the rate must be a positive number of requests per second, not {}", plan.rate));
    }
    if plan.connections == 0 || plan.classes.is_empty() || plan.classes.iter().all(|c| c.weight == 0) {
        return Err("a plan needs at least one connection and one request class with a weight".into());
    }
    // Connect everything first, so that connection set-up is not in anyone's latency.
    let mut conns = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        conns.push(
            Connection::connect(plan.addr, plan.io_timeout)
                .map_err(|e| format!("cannot connect to {}: {e}", plan.addr))?,
        );
    }
    let schedule: Vec<usize> =
        plan.classes.iter().enumerate().flat_map(|(i, c)| std::iter::repeat_n(i, c.weight as usize)).collect();
    // Whole nanoseconds, so that due times are exact and a window holds a predictable count.
    let period_ns = ((plan.connections as f64 / plan.rate) * 1e9).round().max(1.0) as u64;
    let barrier = Barrier::new(plan.connections + 1);
    let start_cell = std::sync::OnceLock::<Instant>::new();
    let mut outcome = LoadOutcome {
        offered_rate: plan.rate,
        measured: plan.duration,
        classes: plan.classes.iter().map(|c| ClassOutcome::new(&c.name)).collect(),
        lag: latency_histogram(),
    };
    std::thread::scope(|scope| -> Result<(), String> {
        let mut threads = Vec::with_capacity(plan.connections);
        for (index, conn) in conns.into_iter().enumerate() {
            let worker = ConnectionWorker { plan, index, period_ns, schedule: &schedule, conn: Some(conn) };
            let (barrier, start_cell) = (&barrier, &start_cell);
            let handle = std::thread::Builder::new()
                .name(format!("load-{index}"))
                .stack_size(THREAD_STACK)
                .spawn_scoped(scope, move || {
                    barrier.wait();
                    let start = *start_cell.get().expect("the start is set before the barrier opens");
                    worker.run(start, progress)
                })
                .map_err(|e| format!("cannot start a load thread: {e}"))?;
            threads.push(handle);
        }
        // A short lead, so that every thread is waiting on its first due time rather than late.
        start_cell.set(Instant::now() + Duration::from_millis(20)).expect("set once");
        barrier.wait();
        for handle in threads {
            let part = handle.join().map_err(|_| "a load thread panicked".to_string())?;
            for (mine, theirs) in outcome.classes.iter_mut().zip(&part.classes) {
                mine.merge(theirs);
            }
            let _ = outcome.lag.add(&part.lag);
        }
        Ok(())
    })?;
    Ok(outcome)
}

struct ConnectionWorker<'a> {
    plan: &'a LoadPlan,
    index: usize,
    period_ns: u64,
    schedule: &'a [usize],
    conn: Option<Connection>,
}

struct WorkerOutcome {
    classes: Vec<ClassOutcome>,
    lag: Histogram<u64>,
}

impl ConnectionWorker<'_> {
    fn run(mut self, start: Instant, progress: &Progress) -> WorkerOutcome {
        set_timer_slack_ns(1_000);
        let plan = self.plan;
        let mut out = WorkerOutcome {
            classes: plan.classes.iter().map(|c| ClassOutcome::new(&c.name)).collect(),
            lag: latency_histogram(),
        };
        let measure_from = start + plan.warmup;
        let end = measure_from + plan.duration;
        // Stagger the connections evenly over one period.
        let first = start + Duration::from_nanos(self.period_ns * self.index as u64 / plan.connections as u64);
        let mut previous_done = start;
        let mut i: u64 = 0;
        loop {
            let due = first + Duration::from_nanos(self.period_ns.saturating_mul(i));
            let now = Instant::now();
            // A connection that fell behind stops at the end too; what it owes is counted below.
            if due >= end || now >= end {
                break;
            }
            let class = self.schedule[(self.index + i as usize) % self.schedule.len()];
            i += 1;
            if now < due {
                std::thread::sleep(due - now);
            }
            let measured = due >= measure_from;
            let sent = Instant::now();
            let free_at = due.max(previous_done);
            let result = self.exchange(&plan.classes[class].request);
            let done = Instant::now();
            previous_done = done;
            let target = &mut out.classes[class];
            match result {
                Ok(status) => {
                    progress.answered.fetch_add(1, Ordering::Relaxed);
                    if measured {
                        record(&mut target.latency, (done - sent) + previous_wait(free_at, due));
                        *target.statuses.entry(status).or_default() += 1;
                        record(&mut out.lag, sent.saturating_duration_since(free_at));
                    }
                }
                Err(_) => {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    if measured {
                        target.io_errors += 1;
                    }
                    // Do not spin on a dead server: the next due time paces the retries, and a
                    // failed connect has already waited up to the I/O timeout.
                }
            }
        }
        // Requests due in the measured window that the connection never got to send.
        let stopped = Instant::now();
        loop {
            let due = first + Duration::from_nanos(self.period_ns.saturating_mul(i));
            if due >= end {
                break;
            }
            let class = self.schedule[(self.index + i as usize) % self.schedule.len()];
            i += 1;
            if due >= measure_from {
                let target = &mut out.classes[class];
                target.unsent += 1;
                record(&mut target.latency, stopped.saturating_duration_since(due));
            }
        }
        out
    }

    /// One request and its answer; reconnects when the connection is gone.
    fn exchange(&mut self, request: &[u8]) -> std::io::Result<u16> {
        let mut conn = match self.conn.take() {
            Some(c) if !c.closed => c,
            _ => Connection::connect(self.plan.addr, self.plan.io_timeout)?,
        };
        conn.send(request)?;
        let response = conn.receive(false)?;
        self.conn = Some(conn);
        Ok(response.status)
    }
}

/// How long the request waited for its connection, past its due time.
fn previous_wait(free_at: Instant, due: Instant) -> Duration {
    free_at.saturating_duration_since(due)
}

/// Asks the kernel to wake this thread's sleeps within `ns` of their time, rather than the
/// default 50 µs, so that the schedule is kept at microsecond resolution.
pub(crate) fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and touches only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0);
    }
}

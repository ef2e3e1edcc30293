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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use super::client::{frame, open, Tls};
use super::interrupt;
use crate::{histogram, record};

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

/// Asks the kernel to stamp the arrival of everything `stream` receives (see [`recv_stamped`]).
/// Where it cannot, reads are timed as they happen.
fn stamp_arrivals(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is open; `on` is a c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One connection of an event loop, with its place in the schedule.
struct EventConn {
    index: usize,
    stream: Option<TcpStream>,
    /// The TLS session over `stream`, toward an https:// server. It holds the ciphertext not yet
    /// written, so `unsent` stays empty.
    tls: Option<Box<rustls::ClientConnection>>,
    /// Epoll watches the socket for writability: a write found its buffer full.
    watching_writable: bool,
    /// The number of the next request to fall due.
    next: u64,
    in_flight: Option<InFlight>,
    previous_done: Option<Instant>,
    buf: Vec<u8>,
    /// When the bytes of the last read reached the socket: the kernel's stamp, wall-clock ns.
    arrived: Option<i128>,
    /// Part of the request not yet written (a full socket buffer).
    unsent: Option<(Arc<[u8]>, usize)>,
}

struct InFlight {
    class: usize,
    due: Instant,
    sent: Instant,
    free_at: Instant,
}

impl EventConn {
    fn new(index: usize, stream: TcpStream, tls: Option<Box<rustls::ClientConnection>>) -> Self {
        EventConn {
            index,
            stream: Some(stream),
            tls,
            watching_writable: false,
            next: 0,
            in_flight: None,
            previous_done: None,
            buf: Vec::with_capacity(16 * 1024),
            arrived: None,
            unsent: None,
        }
    }
}

struct EventLoop<'a> {
    plan: &'a LoadPlan,
    period_ns: u64,
    schedule: &'a [usize],
    conns: Vec<EventConn>,
    /// What each read lands in before it joins its connection's buffer. Kept for the loop's life:
    /// zeroing 16 KiB on every readable event was 1.6% of the generator's time at 50,000 hello/s.
    chunk: Box<[u8; READ_CHUNK]>,
}

struct WorkerOutcome {
    classes: Vec<ClassOutcome>,
    lag: Histogram<u64>,
}

/// How long after the end a request that fell due before it may still be sent: long enough that
/// the generator's own lateness at the end (a late wake) is not counted against the server.
const END_GRACE: Duration = Duration::from_secs(1);

/// The largest number of events taken from one `epoll_pwait2`.
const EVENTS: usize = 256;

/// The most one read takes from a socket.
const READ_CHUNK: usize = 16 * 1024;

impl EventLoop<'_> {
    fn run(mut self, start: Instant, progress: &Progress) -> Result<WorkerOutcome, String> {
        // epoll_pwait2's timeout is a timer like any other: without this it may wake 50 µs late.
        set_timer_slack_ns(1_000);
        let plan = self.plan;
        let mut out = WorkerOutcome {
            classes: plan.classes.iter().map(|c| ClassOutcome::new(&c.name)).collect(),
            lag: histogram(),
        };
        let measure_from = start + plan.warmup;
        let end = measure_from + plan.duration;
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        for (slot, conn) in self.conns.iter().enumerate() {
            epoll.add(conn.stream.as_ref().expect("connected"), slot).map_err(|e| format!("epoll: {e}"))?;
        }
        // Connections waiting for their next due time, earliest first.
        let mut waiting: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
        for (slot, conn) in self.conns.iter().enumerate() {
            waiting.push(Reverse((self.due(conn, 0, start), slot)));
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        loop {
            // The caller sees the flag too and discards this plan's outcome.
            if interrupt::interrupted() {
                break;
            }
            let now = Instant::now();
            // Send whatever has fallen due; a connection that fell behind sends at once.
            while let Some(Reverse((due, slot))) = waiting.peek().copied() {
                if due > now {
                    break;
                }
                waiting.pop();
                // A connection still sends what fell due before the end, unless it is so far
                // behind that the grace is over too; the rest is counted as unsent below.
                if due >= end || now >= end + END_GRACE {
                    continue;
                }
                if !self.send(slot, due, start, &epoll, &mut out, progress) {
                    // Not even connected: try again at the connection's next due time.
                    let next_due = self.due(&self.conns[slot], self.conns[slot].next, start);
                    waiting.push(Reverse((next_due, slot)));
                }
            }
            let busy = self.conns.iter().any(|c| c.in_flight.is_some());
            if waiting.is_empty() && !busy {
                break;
            }
            // Sleep until the next due time, or (only answers outstanding) until the I/O deadline.
            let wake = waiting.peek().map(|Reverse((due, _))| *due);
            let oldest = self.conns.iter().filter_map(|c| c.in_flight.as_ref().map(|f| f.sent)).min();
            let deadline = oldest.map(|t| t + plan.io_timeout);
            let until = [wake, deadline].into_iter().flatten().min().unwrap_or(now);
            let timeout = if plan.spin { Duration::ZERO } else { until.saturating_duration_since(Instant::now()) };
            let n = epoll.wait(&mut events, timeout);
            for event in &events[..n] {
                self.on_readable(event.u64 as usize, start, measure_from, &epoll, &mut out, &mut waiting, progress);
            }
            // Answers that did not come in time.
            let now = Instant::now();
            for slot in 0..self.conns.len() {
                if self.conns[slot].in_flight.as_ref().is_some_and(|f| now >= f.sent + plan.io_timeout) {
                    self.fail(slot, measure_from, &epoll, &mut out, &mut waiting, start, progress);
                }
            }
        }
        // Requests due in the measured window that their connections never got to send.
        let stopped = Instant::now();
        for conn in &self.conns {
            let mut i = conn.next;
            loop {
                let due = self.due(conn, i, start);
                if due >= end {
                    break;
                }
                let class = self.schedule[(conn.index + i as usize) % self.schedule.len()];
                i += 1;
                if due >= measure_from {
                    let target = &mut out.classes[class];
                    target.unsent += 1;
                    record(&mut target.latency, stopped.saturating_duration_since(due));
                }
            }
        }
        Ok(out)
    }

    fn due(&self, conn: &EventConn, i: u64, start: Instant) -> Instant {
        let offset = self.period_ns * conn.index as u64 / self.plan.connections as u64;
        start + Duration::from_nanos(offset + self.period_ns.saturating_mul(i))
    }

    /// Sends the connection's next request; false when it could not even connect.
    fn send(
        &mut self,
        slot: usize,
        due: Instant,
        start: Instant,
        epoll: &Epoll,
        out: &mut WorkerOutcome,
        progress: &Progress,
    ) -> bool {
        let class = {
            let conn = &self.conns[slot];
            self.schedule[(conn.index + conn.next as usize) % self.schedule.len()]
        };
        let request = self.plan.classes[class].request.clone();
        let conn = &mut self.conns[slot];
        conn.next += 1;
        if conn.stream.is_none() {
            match connect(self.plan) {
                Ok((stream, tls)) if epoll.add(&stream, slot).is_ok() => {
                    conn.stream = Some(stream);
                    conn.tls = tls;
                }
                _ => {
                    // No server to talk to: the request fails, and the next due time paces the
                    // retries, having already waited for the connect timeout.
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    if due >= start + self.plan.warmup {
                        out.classes[class].io_errors += 1;
                    }
                    return false;
                }
            }
        }
        let sent = Instant::now();
        let free_at = conn.previous_done.map_or(due, |p| p.max(due));
        conn.in_flight = Some(InFlight { class, due, sent, free_at });
        match conn.tls.as_mut() {
            // Encrypted into the session's buffer; a failure shows when the answer does not come.
            Some(tls) => {
                let _ = tls.writer().write_all(&request);
            }
            None => conn.unsent = Some((request, 0)),
        }
        let _ = Self::write_pending(conn, slot, epoll);
        true
    }

    /// Writes what is left of the request; false when the connection failed. A full socket buffer
    /// leaves the rest for when epoll reports the socket writable.
    fn write_pending(conn: &mut EventConn, slot: usize, epoll: &Epoll) -> bool {
        let Some(stream) = conn.stream.as_mut() else { return false };
        let written = match conn.tls.as_mut() {
            Some(tls) => flush_tls(tls, stream),
            None => flush_plain(&mut conn.unsent, stream),
        };
        let Ok(all) = written else { return false };
        if all == conn.watching_writable {
            // The buffer filled, or drained after filling: epoll's interest follows.
            conn.watching_writable = !all;
            return epoll.watch(stream, slot, !all).is_ok();
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn on_readable(
        &mut self,
        slot: usize,
        start: Instant,
        measure_from: Instant,
        epoll: &Epoll,
        out: &mut WorkerOutcome,
        waiting: &mut BinaryHeap<Reverse<(Instant, usize)>>,
        progress: &Progress,
    ) {
        let conn = &mut self.conns[slot];
        if !Self::write_pending(conn, slot, epoll) {
            return self.fail(slot, measure_from, epoll, out, waiting, start, progress);
        }
        let chunk = &mut self.chunk[..];
        let mut closed = false;
        loop {
            let Some(stream) = conn.stream.as_ref() else { return };
            match recv_stamped(stream.as_raw_fd(), chunk) {
                Ok((0, _)) => {
                    closed = true;
                    break;
                }
                Ok((n, stamp)) => {
                    match conn.tls.as_mut() {
                        None => conn.buf.extend_from_slice(&chunk[..n]),
                        Some(tls) => match decrypt(tls, &chunk[..n], &mut conn.buf) {
                            Ok(peer_closed) => closed |= peer_closed,
                            Err(_) => return self.fail(slot, measure_from, epoll, out, waiting, start, progress),
                        },
                    }
                    conn.arrived = stamp;
                    // A short read drained the socket; level-triggered epoll reports anything
                    // newer, so the extra read that would only say WouldBlock is skipped.
                    if n < chunk.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let framed = match frame(&conn.buf) {
            Ok(f) => f,
            Err(_) => return self.fail(slot, measure_from, epoll, out, waiting, start, progress),
        };
        let Some(framed) = framed else {
            if closed {
                self.fail(slot, measure_from, epoll, out, waiting, start, progress);
            }
            return;
        };
        conn.buf.drain(..framed.len);
        let Some(flight) = conn.in_flight.take() else {
            // An answer nobody asked for: the stream's framing is lost.
            return self.fail(slot, measure_from, epoll, out, waiting, start, progress);
        };
        let done = arrival(Instant::now(), wall_clock_ns(), conn.arrived.take(), flight.sent);
        conn.previous_done = Some(done);
        progress.answered.fetch_add(1, Ordering::Relaxed);
        if flight.due >= measure_from {
            let target = &mut out.classes[flight.class];
            let latency = (done - flight.sent) + previous_wait(flight.free_at, flight.due);
            record(&mut target.latency, latency);
            if !(200..300).contains(&framed.status) {
                record(&mut target.refused, latency);
            }
            *target.statuses.entry(framed.status).or_default() += 1;
            record(&mut out.lag, flight.sent.saturating_duration_since(flight.free_at));
        }
        if framed.close || closed {
            Self::drop_stream(conn, epoll);
        }
        let next_due = self.due(&self.conns[slot], self.conns[slot].next, start);
        waiting.push(Reverse((next_due, slot)));
    }

    /// The in-flight request failed: count it, drop the connection, and schedule the next one.
    #[allow(clippy::too_many_arguments)]
    fn fail(
        &mut self,
        slot: usize,
        measure_from: Instant,
        epoll: &Epoll,
        out: &mut WorkerOutcome,
        waiting: &mut BinaryHeap<Reverse<(Instant, usize)>>,
        start: Instant,
        progress: &Progress,
    ) {
        let conn = &mut self.conns[slot];
        Self::drop_stream(conn, epoll);
        if let Some(flight) = conn.in_flight.take() {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            if flight.due >= measure_from {
                out.classes[flight.class].io_errors += 1;
            }
            conn.previous_done = Some(Instant::now());
            let next_due = self.due(&self.conns[slot], self.conns[slot].next, start);
            waiting.push(Reverse((next_due, slot)));
        }
    }

    fn drop_stream(conn: &mut EventConn, epoll: &Epoll) {
        if let Some(stream) = conn.stream.take() {
            epoll.remove(&stream);
        }
        conn.tls = None;
        conn.watching_writable = false;
        conn.buf.clear();
        conn.unsent = None;
    }
}

/// Writes what is left of a plain request; Ok(true) when all of it is written, Ok(false) when the
/// socket buffer filled first.
fn flush_plain(unsent: &mut Option<(Arc<[u8]>, usize)>, stream: &mut TcpStream) -> std::io::Result<bool> {
    let Some((request, mut written)) = unsent.take() else { return Ok(true) };
    while written < request.len() {
        match stream.write(&request[written..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                *unsent = Some((request, written));
                return Ok(false);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes the TLS session's pending records, as [`flush_plain`] does a plain request.
fn flush_tls(tls: &mut rustls::ClientConnection, stream: &mut TcpStream) -> std::io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Feeds the records in `wire` to the TLS session and appends what they decrypt to `plain`; true
/// when the server closed the session.
fn decrypt(tls: &mut rustls::ClientConnection, mut wire: &[u8], plain: &mut Vec<u8>) -> std::io::Result<bool> {
    while !wire.is_empty() {
        if tls.read_tls(&mut wire)? == 0 {
            break;
        }
        let state = tls.process_new_packets().map_err(std::io::Error::other)?;
        let (at, n) = (plain.len(), state.plaintext_bytes_to_read());
        plain.resize(at + n, 0);
        tls.reader().read_exact(&mut plain[at..])?;
        if state.peer_has_closed() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A level-triggered epoll set with nanosecond waits.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> std::io::Result<Epoll> {
        // SAFETY: epoll_create1 has no preconditions; a non-negative result is a new descriptor.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, stream: &TcpStream, slot: usize) -> std::io::Result<()> {
        let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: slot as u64 };
        // SAFETY: both descriptors are open; `event` lives across the call.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut event) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `stream` for writability too, or no longer.
    fn watch(&self, stream: &TcpStream, slot: usize, writable: bool) -> std::io::Result<()> {
        let events = if writable { libc::EPOLLIN | libc::EPOLLOUT } else { libc::EPOLLIN };
        let mut event = libc::epoll_event { events: events as u32, u64: slot as u64 };
        // SAFETY: both descriptors are open; `event` lives across the call.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_MOD, stream.as_raw_fd(), &mut event) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn remove(&self, stream: &TcpStream) {
        // SAFETY: both descriptors are open; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, stream.as_raw_fd(), std::ptr::null_mut());
        }
    }

    /// Waits at most `timeout` for readiness; returns how many of `events` were filled.
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> usize {
        let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
        // SAFETY: `events` is writable for its length; `ts` outlives the call; no signal mask.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        n.max(0) as usize
    }
}

/// Reads what `fd` holds into `buf`: the byte count and, where the kernel attached one, the
/// wall-clock time in ns at which the last of those bytes arrived.
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<i128>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // Room for one control message holding a timespec, aligned as a cmsghdr must be.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control) until filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, all of which outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within msg_controllen;
    // SCM_TIMESTAMPNS carries a timespec, read unaligned as the data may not be.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                stamp = Some(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, stamp))
}

fn wall_clock_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

/// When an answer arrived, on the monotonic clock: `now` less the age of its arrival stamp
/// `stamp_ns`, `now_wall_ns` being the wall clock read with `now`. The stamp is on the wall clock,
/// which may be stepped; a stamp that does not fall between `sent` and `now` is not believed,
/// and `now` stands in, as it does where there is no stamp.
fn arrival(now: Instant, now_wall_ns: i128, stamp_ns: Option<i128>, sent: Instant) -> Instant {
    let Some(age) = stamp_ns.map(|stamp| now_wall_ns - stamp).and_then(|age| u64::try_from(age).ok()) else {
        return now;
    };
    match now.checked_sub(Duration::from_nanos(age)) {
        Some(arrived) if arrived >= sent => arrived,
        _ => now,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_kernel_stamps_when_an_answer_arrived() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        stamp_arrivals(&client);
        let (mut server, _) = listener.accept().unwrap();
        // The kernel turns stamping on from a work item, soon after the first socket asks.
        std::thread::sleep(Duration::from_millis(50));
        let before = wall_clock_ns();
        server.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
        // Read well after the bytes arrived: the stamp is their arrival, not the read.
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 256];
        let (n, stamp) = recv_stamped(client.as_raw_fd(), &mut buf).unwrap();
        let read = wall_clock_ns();
        assert_eq!(n, 38);
        let stamp = stamp.expect("loopback TCP carries SO_TIMESTAMPNS stamps");
        assert!(before <= stamp && stamp + 40_000_000 < read, "{before} {stamp} {read}");
    }

    #[test]
    fn an_arrival_is_placed_on_the_monotonic_clock_when_it_can_be_believed() {
        let sent = Instant::now();
        let now = sent + Duration::from_micros(500);
        let wall = 1_000_000_000_000i128;
        // Stamped 200 µs before `now`: arrived 300 µs after sending.
        assert_eq!(arrival(now, wall, Some(wall - 200_000), sent), sent + Duration::from_micros(300));
        // No stamp, a stamp from before the send or from the future (the wall clock was stepped
        // between): the read's time stands in.
        assert_eq!(arrival(now, wall, None, sent), now);
        assert_eq!(arrival(now, wall, Some(wall - 600_000), sent), now);
        assert_eq!(arrival(now, wall, Some(wall + 1), sent), now);
    }
}

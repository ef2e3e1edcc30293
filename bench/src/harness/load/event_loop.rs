//! One generator thread: an epoll loop over its share of the connections, each on its own
//! schedule, sending each request when it falls due and timing its answer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::super::client::frame;
use super::super::interrupt;
use super::timing::{arrival, previous_wait, recv_stamped, set_timer_slack_ns, wall_clock_ns, Epoll};
use super::{connect, ClassOutcome, LoadPlan, Progress};
use crate::{histogram, record};

/// One connection of an event loop, with its place in the schedule.
pub(super) struct EventConn {
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
    pub(super) fn new(index: usize, stream: TcpStream, tls: Option<Box<rustls::ClientConnection>>) -> Self {
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

pub(super) struct EventLoop<'a> {
    pub(super) plan: &'a LoadPlan,
    pub(super) period_ns: u64,
    pub(super) schedule: &'a [usize],
    pub(super) conns: Vec<EventConn>,
    /// What each read lands in before it joins its connection's buffer. Kept for the loop's life:
    /// zeroing 16 KiB on every readable event was 1.6% of the generator's time at 50,000 hello/s.
    pub(super) chunk: Box<[u8; READ_CHUNK]>,
}

pub(super) struct WorkerOutcome {
    pub(super) classes: Vec<ClassOutcome>,
    pub(super) lag: Histogram<u64>,
}

/// How long after the end a request that fell due before it may still be sent: long enough that
/// the generator's own lateness at the end (a late wake) is not counted against the server.
const END_GRACE: Duration = Duration::from_secs(1);

/// The largest number of events taken from one `epoll_pwait2`.
const EVENTS: usize = 256;

/// The most one read takes from a socket.
pub(super) const READ_CHUNK: usize = 16 * 1024;

impl EventLoop<'_> {
    pub(super) fn run(mut self, start: Instant, progress: &Progress) -> Result<WorkerOutcome, String> {
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

//! A shard's end of the dispatch: its completion ring, and its ticket table, which tells each
//! completion to the guest waiting for it.
//!
//! # Who owns a staging buffer
//! Uploads and downloads go through a staging buffer that the ticket's entry owns. The worker
//! reads or writes it between taking the request off the ring and pushing the completion; the
//! shard touches it only before the push and after the completion. When the waiting guest is gone
//! (its invocation timed out), the entry becomes `Orphaned` and keeps the buffer until the
//! completion arrives, so the worker never writes into freed memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

use crate::record::Completion;

/// The ticket of requests nobody waits for (`Free`, `Release`). No completion comes back: the
/// worker wakes the shard's poller when it has deferred ones to push (`Dispatcher::defer`).
pub const UNTRACKED: u32 = u32::MAX;

/// The ticket of a streamed kernel: the guest got its handle when it was sent and waits only at
/// its next read or sync. No completion comes back; a failure is kept by the worker for that wait
/// (`worker::Failures`). Its staging buffer, a descriptor, is the worker's to free once it has run.
pub const STREAMED: u32 = u32::MAX - 1;

/// A shard's receiving end. Shared with the device workers, which push completions and wake.
///
/// Aligned to 128 bytes: its shard writes the ticket table and the id counter on every tensor
/// call, and ports of neighbouring shards must not share those lines.
#[repr(align(128))]
pub struct ShardPort {
    pub(crate) completions: ArrayQueue<Completion>,
    pub(crate) poller: AtomicWaker,
    tickets: Mutex<Tickets>,
    /// Source of tensor and session ids: the shard index in the top 16 bits, so ids are unique
    /// across shards without coordination.
    next_id: AtomicU64,
}

struct Tickets {
    entries: Vec<Entry>,
    free: Vec<u16>,
    capacity: usize,
}

impl Tickets {
    /// Puts entry `index`, which was in use, back on the free list.
    fn recycle(&mut self, index: usize) {
        debug_assert!(self.free.len() < self.entries.len(), "more free tickets than entries");
        self.free.push(index as u16);
    }
}

struct Entry {
    generation: u16,
    state: State,
}

enum State {
    Free,
    Waiting { waker: Option<Waker>, staging: Vec<f32> },
    Done { completion: Completion, staging: Vec<f32> },
    Orphaned { _staging: Vec<f32> },
}

/// A request's place in the ticket table. The generation makes a late completion for a recycled
/// entry harmless.
fn encode(index: u16, generation: u16) -> u32 {
    (u32::from(generation) << 16) | u32::from(index)
}

fn decode(ticket: u32) -> (usize, u16) {
    ((ticket & 0xffff) as usize, (ticket >> 16) as u16)
}

impl ShardPort {
    /// `max_tickets`: requests this shard may have in flight at once (at most 65,535).
    pub(crate) fn new(shard: usize, completion_depth: usize, max_tickets: usize) -> Self {
        assert!(max_tickets > 0 && max_tickets < usize::from(u16::MAX));
        ShardPort {
            completions: ArrayQueue::new(completion_depth),
            poller: AtomicWaker::new(),
            tickets: Mutex::new(Tickets { entries: Vec::new(), free: Vec::new(), capacity: max_tickets }),
            next_id: AtomicU64::new((shard as u64) << 48 | 1),
        }
    }

    /// A fresh id for a tensor or a session. Only the owning shard calls it.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Tickets> {
        // Poisoning would need a panic while the lock is held, and nothing in the critical
        // sections below panics; the table stays consistent either way.
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a ticket that owns `staging`. Returns it with the buffer's address, or `None` when
    /// the table is full.
    pub(crate) fn open(&self, staging: Vec<f32>) -> Option<(u32, u64, usize)> {
        let addr = staging.as_ptr() as u64;
        let len = staging.len();
        let mut t = self.lock();
        let index = match t.free.pop() {
            Some(i) => usize::from(i),
            None if t.entries.len() < t.capacity => {
                t.entries.push(Entry { generation: 0, state: State::Free });
                t.entries.len() - 1
            }
            None => return None,
        };
        debug_assert!(t.entries.len() <= t.capacity && t.free.len() < t.entries.len());
        let entry = &mut t.entries[index];
        debug_assert!(matches!(entry.state, State::Free));
        entry.generation = entry.generation.wrapping_add(1);
        entry.state = State::Waiting { waker: None, staging };
        Some((encode(index as u16, entry.generation), addr, len))
    }

    /// Gives up a ticket whose request never entered a ring, and returns its buffer.
    pub(crate) fn cancel(&self, ticket: u32) -> Vec<f32> {
        let mut t = self.lock();
        let (index, _) = decode(ticket);
        let staging = match std::mem::replace(&mut t.entries[index].state, State::Free) {
            State::Waiting { staging, .. } => staging,
            _ => Vec::new(),
        };
        t.recycle(index);
        staging
    }

    /// Routes every completion on the ring to its ticket, waking its guest.
    pub fn drain(&self) {
        if self.completions.is_empty() {
            return;
        }
        let mut t = self.lock();
        while let Some(c) = self.completions.pop() {
            debug_assert!(c.ticket != UNTRACKED, "no completion comes for an untracked request");
            let (index, generation) = decode(c.ticket);
            let Some(entry) = t.entries.get_mut(index) else { continue };
            if entry.generation != generation {
                continue;
            }
            match std::mem::replace(&mut entry.state, State::Free) {
                State::Waiting { waker, staging } => {
                    entry.state = State::Done { completion: c, staging };
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
                State::Orphaned { .. } => t.recycle(index),
                other => entry.state = other,
            }
        }
    }

    /// Checks whether `ticket` is done; if so, frees it and returns its completion and buffer.
    fn take(&self, ticket: u32, waker: Option<&Waker>) -> Option<(Completion, Vec<f32>)> {
        let mut t = self.lock();
        let (index, _) = decode(ticket);
        let entry = &mut t.entries[index];
        match &mut entry.state {
            State::Done { .. } => {
                let State::Done { completion, staging } = std::mem::replace(&mut entry.state, State::Free) else {
                    unreachable!()
                };
                t.recycle(index);
                Some((completion, staging))
            }
            State::Waiting { waker: slot, .. } => {
                if let Some(w) = waker {
                    match slot {
                        Some(old) if old.will_wake(w) => {}
                        _ => *slot = Some(w.clone()),
                    }
                }
                None
            }
            State::Free | State::Orphaned { .. } => {
                // Cannot happen: the waiter holds its ticket until it takes the completion. Debug
                // builds stop here; a release build ends this wait with a device error rather than
                // the shard's thread (the dispatch crate's form of the server's `bug!`).
                debug_assert!(false, "ticket {ticket:#x} is neither waiting nor done");
                let completion =
                    Completion { ticket, status: crate::record::status::DEVICE_ERROR, ..Default::default() };
                Some((completion, Vec::new()))
            }
        }
    }

    /// The guest is gone: keep the buffer until the completion comes, then recycle the entry.
    pub(crate) fn abandon(&self, ticket: u32) {
        let mut t = self.lock();
        let (index, _) = decode(ticket);
        match std::mem::replace(&mut t.entries[index].state, State::Free) {
            State::Waiting { staging, .. } => t.entries[index].state = State::Orphaned { _staging: staging },
            State::Done { .. } => t.recycle(index),
            other => t.entries[index].state = other,
        }
    }

    /// Tickets in use (waiting, done or orphaned).
    pub fn tickets_in_use(&self) -> usize {
        let t = self.lock();
        t.entries.len() - t.free.len()
    }

    /// Waits on the calling thread, spinning, until `ticket` completes or `deadline` passes. For
    /// callers without an executor: benchmarks and tests.
    pub fn wait_blocking(&self, ticket: u32, deadline: Instant) -> Option<(Completion, Vec<f32>)> {
        loop {
            self.drain();
            if let Some(done) = self.take(ticket, None) {
                return Some(done);
            }
            if Instant::now() >= deadline {
                self.abandon(ticket);
                return None;
            }
            std::hint::spin_loop();
        }
    }
}

/// Waits for one ticket. It first spins for up to `spin` (most kernels finish in less time than a
/// trip through the executor costs), then parks the task; the shard's poller wakes it.
pub struct TicketWait {
    port: Arc<ShardPort>,
    ticket: u32,
    spin: Duration,
    finished: bool,
}

impl TicketWait {
    pub(crate) fn new(port: Arc<ShardPort>, ticket: u32, spin: Duration) -> Self {
        TicketWait { port, ticket, spin, finished: false }
    }
}

impl Future for TicketWait {
    type Output = (Completion, Vec<f32>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.spin.is_zero() {
            let until = Instant::now() + std::mem::take(&mut this.spin);
            loop {
                this.port.drain();
                if let Some(done) = this.port.take(this.ticket, None) {
                    this.finished = true;
                    return Poll::Ready(done);
                }
                if Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        this.port.drain();
        match this.port.take(this.ticket, Some(cx.waker())) {
            Some(done) => {
                this.finished = true;
                Poll::Ready(done)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for TicketWait {
    fn drop(&mut self) {
        if !self.finished {
            self.port.abandon(self.ticket);
        }
    }
}

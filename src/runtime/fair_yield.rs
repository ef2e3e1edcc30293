//! A yield that lets every other task on the shard run first, and the turns of long-running
//! guests.
//!
//! monoio puts a task that wakes itself during its own poll at the *front* of the run queue, so
//! wasmtime's built-in `UpdateDeadline::Yield` (which does exactly that) lets a looping guest run
//! again at once, forever: its shard would answer nothing else until the guest's deadline.
//!
//! Here a yielding guest parks its waker in a shard-local queue instead and signals the pump, a
//! task that lets parked guests go *one at a time*: the next only once the one let go yielded
//! again or ended. So a ready connection waits behind one guest's slice, never behind all of them
//! (with a wake-all pump and 500 spinning guests on a shard, `/healthz` waited half a second).
//!
//! The signal is a byte on a socket pair whose other end the pump reads, not a wake. A wake from
//! the shard's own thread puts the pump on the run queue at once, ahead of the connections whose
//! sockets became ready during the guest's slice (the executor polls its sockets only when the
//! queue is empty or between batches of tasks): the pump let the next guest go, and a ready
//! connection waited behind that guest's whole slice too, two slices in all. A read completes
//! only when the executor polls its driver, together with every socket that became ready, and
//! with the queue empty by then the executor also parks, so timers fire and other threads' wakes
//! (the drain signal, a finished deploy, a kernel's completion) are taken at every slice.
//!
//! Guests are let go in two classes. An invocation's first [`FRESH_YIELDS`] yields queue as
//! *fresh*; an invocation that has yielded more is a long runner. (Yields of the shard's own tasks
//! all go at every look, before the next invocation.) The pump lets fresh yields go first, and a long runner at least once in every
//! [`FRESH_PER_LONG`] + 1 turns: so a short invocation that a tick happened to catch (a tenant's
//! hello runs tens of microseconds, the tick comes every hundred while guests take turns) waits
//! behind one slice, not behind every spinning guest of the shard's (perf/HOSTILE.md), and a
//! stream of fresh ones cannot starve the long runners either.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use monoio::io::AsyncReadRent;

use super::slice_timer::SliceTimer;

/// Yields of an invocation that queue as fresh: the rest queue as a long runner's.
pub const FRESH_YIELDS: u32 = 2;

/// Fresh yields the pump lets go in a row while a long runner waits.
pub const FRESH_PER_LONG: u32 = 4;

/// Whether a long runner on a shard without a slice timer yielded into the turns since the epoch
/// ticker last looked (a shard with one ends its slices itself). Shared
/// by every shard and the ticker (docs/ARCHITECTURE.md): a shard only sets it, on a yield, and only
/// when it is clear, so that a shard whose guests keep yielding reads the line rather than writes
/// it; the ticker clears it once a tick.
static TURNS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Whether a long runner yielded into the turns since the last call: the ticker then ticks at the
/// guest slice rather than at the idle tick (`wasm::engine::EpochTicker`).
pub fn guests_took_turns() -> bool {
    TURNS_TAKEN.swap(false, Ordering::Relaxed)
}

#[derive(Default)]
struct YieldQueue {
    /// The pump's end of its signal socket, once the pump runs on this thread.
    signal: RefCell<Option<UnixStream>>,
    /// Whether a signal is on its way to the pump: one is enough.
    signaled: Cell<bool>,
    /// Yielded tasks, oldest first per class: they run again in the order they yielded. Each is
    /// named by its yield's id, so that a yield dropped while parked can take itself out.
    fresh: RefCell<VecDeque<Parked>>,
    long: RefCell<VecDeque<Parked>>,
    /// Yields of the shard's own tasks: all let go at every look, before the next invocation.
    /// They run briefly, and need not yield again or end to hand the turn on.
    own: RefCell<VecDeque<Parked>>,
    /// Fresh invocations let go since a long runner was.
    fresh_in_a_row: Cell<u32>,
    next_id: Cell<u64>,
    /// The id of the invocation's yield the pump let go last.
    last_released: Cell<u64>,
    /// Whether the invocation let go last has not run since: the pump lets the next one go only
    /// once it has, so that at most one guest is ever on the executor's run queue through here.
    released: Cell<bool>,
    /// Invocations on this shard that have yielded as long runners and not ended.
    long_runners: Cell<u32>,
    /// The shard's own slice timer, armed while `long_runners` is not zero (`slice_timer`).
    slice_timer: RefCell<Option<SliceTimer>>,
}

struct Parked {
    id: u64,
    task: Waker,
}

impl YieldQueue {
    fn is_empty(&self) -> bool {
        self.fresh.borrow().is_empty() && self.long.borrow().is_empty() && self.own.borrow().is_empty()
    }

    /// The next invocation to let go: fresh first, a long runner at least every
    /// `FRESH_PER_LONG` + 1.
    fn pop(&self) -> Option<Parked> {
        let long_waits = !self.long.borrow().is_empty();
        let fresh_turn = self.fresh_in_a_row.get() < FRESH_PER_LONG || !long_waits;
        let fresh = if fresh_turn { self.fresh.borrow_mut().pop_front() } else { None };
        match fresh {
            Some(next) => {
                self.fresh_in_a_row.set(self.fresh_in_a_row.get() + 1);
                Some(next)
            }
            None => {
                self.fresh_in_a_row.set(0);
                self.long.borrow_mut().pop_front().or_else(|| self.fresh.borrow_mut().pop_front())
            }
        }
    }

    /// Takes a queued yield out; whether it was queued.
    fn remove(&self, id: u64) -> bool {
        [&self.fresh, &self.long, &self.own].into_iter().any(|class| {
            let mut class = class.borrow_mut();
            match class.iter().position(|queued| queued.id == id) {
                Some(at) => class.remove(at).is_some(),
                None => false,
            }
        })
    }

    /// Tells the pump to look at the queue after the executor's next poll of its driver.
    fn signal_pump(&self) {
        if self.signaled.replace(true) {
            return;
        }
        self.write_signal();
    }

    /// A byte for the pump's socket, whether or not one is on its way.
    fn write_signal(&self) {
        if let Some(signal) = self.signal.borrow().as_ref() {
            // A full socket already tells the pump all it needs to know: the error is dropped.
            let _ = (&*signal).write(&[1]);
        }
    }

    /// Lets every parked task of the shard's own go, and the next parked invocation unless the
    /// one let go last has not run yet.
    fn release_next(&self) {
        self.signaled.set(false);
        let own = std::mem::take(&mut *self.own.borrow_mut());
        for parked in own {
            parked.task.wake();
        }
        if self.released.get() {
            return;
        }
        if let Some(next) = self.pop() {
            self.released.set(true);
            self.last_released.set(next.id);
            next.task.wake();
        }
    }

    /// An invocation yielded as a long runner for the first time: the shard's slice timer ticks
    /// from now on, if it was not already.
    fn long_runner_started(&self) {
        self.long_runners.set(self.long_runners.get() + 1);
        if let Some(timer) = self.slice_timer.borrow_mut().as_mut() {
            timer.arm();
        }
    }

    /// A long runner ended: with none left, the slice timer stops.
    fn long_runner_ended(&self) {
        let left = self.long_runners.get();
        debug_assert!(left > 0, "a long runner ended that never started");
        self.long_runners.set(left.saturating_sub(1));
        if left <= 1 {
            if let Some(timer) = self.slice_timer.borrow_mut().as_mut() {
                timer.disarm();
            }
        }
    }

    /// Lets everything parked go at once: the pump is gone, and a task left here would never run.
    fn release_all(&self) {
        self.released.set(false);
        for class in [&self.own, &self.fresh, &self.long] {
            let parked = std::mem::take(&mut *class.borrow_mut());
            for p in parked {
                p.task.wake();
            }
        }
    }
}

thread_local! {
    static QUEUE: YieldQueue = YieldQueue::default();
}

/// The pump of this shard's turns: spawn the future once per shard, on the shard's executor. It
/// completes only if its signal socket fails, which a socket pair does not.
///
/// With `flush`, for io_uring: after a signal the pump sends itself another byte and waits for it
/// before it lets the next guest go. The connections that became ready during the slice have run
/// by then and queued their sends, but io_uring submits a task's operations only when the executor
/// polls its driver, which without this was after the next guest's slice: each answer waited one
/// slice more than on epoll (perf/HOSTILE.md). The second read completes at that poll, with the
/// sends submitted. On epoll a task's send is its own syscall, and the round would only cost one.
///
/// With a `slice_timer` (made on this thread), long runners' slices end on its ticks as well as
/// the epoch ticker's: it is armed while one of this shard's invocations has yielded as a long
/// runner and not ended.
pub fn pump(flush: bool, slice_timer: Option<SliceTimer>) -> std::io::Result<impl Future<Output = ()>> {
    let (ours, theirs) = UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    // The epoll driver reads once the socket looks ready, and a blocking read of an empty socket
    // would stop the shard for good.
    theirs.set_nonblocking(true)?;
    let mut reader = monoio::net::UnixStream::from_std(theirs)?;
    QUEUE.with(|q| {
        // One pump per thread: a second would inherit wakers of the first's executor.
        debug_assert!(q.signal.borrow().is_none() && q.is_empty(), "a second pump on one thread");
        *q.signal.borrow_mut() = Some(ours);
        *q.slice_timer.borrow_mut() = slice_timer;
    });
    Ok(async move {
        // Signals that came together are taken together: one look at the queue serves them all.
        let mut buf = vec![0u8; 256];
        loop {
            let (mut read, back) = reader.read(buf).await;
            buf = back;
            if flush && matches!(read, Ok(n) if n > 0) {
                QUEUE.with(YieldQueue::write_signal);
                (read, buf) = reader.read(buf).await;
            }
            match read {
                Ok(n) if n > 0 => QUEUE.with(YieldQueue::release_next),
                outcome => {
                    tracing::error!(?outcome, "the shard's guest turns stopped: their signal socket failed");
                    QUEUE.with(|q| {
                        *q.signal.borrow_mut() = None;
                        q.release_all();
                    });
                    return;
                }
            }
        }
    })
}

/// One invocation's place in the turns: the id of its latest yield, so that when it ends the
/// turn is handed on only if it is the guest the pump let go last (any invocation that ended
/// handing it on would let one more guest into the run queue each time, and under a stream of
/// short requests the spinning guests would pile up there again); and how often it yielded.
///
/// `Sync` (atomics and an uncontended mutex in an `Arc`) only because wasmtime's epoch callback
/// must be: one shard's thread is the only one that touches it.
#[derive(Clone, Default)]
pub struct Turn(Arc<TurnState>);

pub struct TurnState {
    latest: AtomicU64,
    /// How often the invocation yielded: its first [`FRESH_YIELDS`] yields queue as fresh.
    yields: AtomicU32,
    /// Whether it is counted among the shard's long runners (it yielded as one, and has not
    /// ended).
    long: AtomicBool,
    /// When its current slice began: when the invocation started, then each time the pump let
    /// it go.
    slice_started: std::sync::Mutex<std::time::Instant>,
}

impl Default for TurnState {
    fn default() -> Self {
        TurnState {
            latest: AtomicU64::new(0),
            yields: AtomicU32::new(0),
            long: AtomicBool::new(false),
            slice_started: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Turn {
    /// A yield of this invocation's: [`yield_now`], remembered as its latest, queued as fresh
    /// while the invocation has yielded fewer than [`FRESH_YIELDS`] times.
    pub fn yield_now(&self) -> FairYield {
        let yields = self.0.yields.load(Ordering::Relaxed);
        self.0.yields.store(yields.saturating_add(1), Ordering::Relaxed);
        let class = if yields < FRESH_YIELDS { Class::Fresh } else { Class::Long };
        if class == Class::Long && !self.0.long.swap(true, Ordering::Relaxed) {
            let _ = QUEUE.try_with(YieldQueue::long_runner_started);
        }
        FairYield { state: YieldState::New, turn: Some(self.0.clone()), class }
    }

    /// Whether the invocation's current slice began less than `within` ago, so that a tick now
    /// is not the end of it: the epoch is the engine's, and every shard's slice timer and the
    /// ticker advance it, so a tick may come microseconds after the guest started or was let go
    /// (its epoch deadline, set when it yielded, also passed while it waited). Yielding at such a
    /// tick would shorten every guest's slices by the number of shards ticking, make a short
    /// invocation yield (and count as a long runner) for another shard's guests, and cycle
    /// parked guests through the pump for nothing.
    pub fn within_slice(&self, within: std::time::Duration) -> bool {
        self.0.slice_started.lock().unwrap_or_else(|e| e.into_inner()).elapsed() < within
    }

    /// Whether the invocation ever yielded: one that did not ran less than a slice.
    pub fn yielded(&self) -> bool {
        self.0.yields.load(Ordering::Relaxed) > 0
    }

    /// The invocation is over: if it held the turn, the pump may let the next guest go.
    pub fn done(&self) {
        let id = self.0.latest.load(Ordering::Relaxed);
        // `try_with`: also runs while the shard thread's locals are torn down (a drained shard
        // drops its in-flight invocations then), when there is no turn to pass.
        let long = self.0.long.swap(false, Ordering::Relaxed);
        let _ = QUEUE.try_with(|q| {
            if long {
                q.long_runner_ended();
            }
            if id != 0 && q.last_released.get() == id {
                hand_on(q);
            }
        });
    }
}

/// The invocation let go last will not run: the pump may let the next one go.
fn hand_on(q: &YieldQueue) {
    if q.released.replace(false) && !q.is_empty() {
        q.signal_pump();
    }
}

/// Yields once, behind every task already queued on this shard: a yield of the shard's own tasks,
/// not of an invocation's (those use [`Turn::yield_now`]). The pump lets it go at its next look,
/// with every other such yield and before the next invocation. Off a shard (no pump), it falls
/// back to an immediate self-wake.
pub fn yield_now() -> FairYield {
    FairYield { state: YieldState::New, turn: None, class: Class::Own }
}

pub struct FairYield {
    state: YieldState,
    /// The invocation's [`Turn`], told this yield's id.
    turn: Option<Arc<TurnState>>,
    class: Class,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Fresh,
    Long,
    /// A yield of the shard's own tasks.
    Own,
}

enum YieldState {
    New,
    /// In the queue (or let go and not polled since), under this id.
    Parked(u64),
    /// Woken off a shard, or done.
    Done,
}

impl Future for FairYield {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.state {
            YieldState::New => {}
            YieldState::Parked(id) => {
                // Polled again: let go by the pump, or woken by something else while still queued,
                // whose entry must not be let go later (it would wake a task that is past it).
                QUEUE.with(|q| {
                    if q.last_released.get() == id {
                        // Running now: the pump may let the next one go once this one yields,
                        // ends or waits on something else, whichever comes first, so it looks
                        // again after the executor's next poll of its driver.
                        q.released.set(false);
                        q.signal_pump();
                        if let Some(turn) = &self.turn {
                            *turn.slice_started.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
                        }
                    } else {
                        q.remove(id);
                    }
                });
                self.state = YieldState::Done;
                return Poll::Ready(());
            }
            YieldState::Done => return Poll::Ready(()),
        }
        let parked = QUEUE.with(|q| {
            if q.signal.borrow().is_none() {
                return None;
            }
            // From 1: `last_released` starts at 0, which names no yield.
            let id = q.next_id.get() + 1;
            q.next_id.set(id);
            let class = match self.class {
                Class::Fresh => &q.fresh,
                Class::Long => &q.long,
                Class::Own => &q.own,
            };
            class.borrow_mut().push_back(Parked { id, task: cx.waker().clone() });
            if let Some(turn) = &self.turn {
                turn.latest.store(id, Ordering::Relaxed);
                // A long runner taking turns on a shard without a slice timer: the ticker ticks
                // at the guest slice. Not where the shard's own timer already does (the ticker's
                // wake-ups then only take the shard's CPU: 5% of it beside memory-filling guests,
                // 7,700 context switches a second, perf/HOSTILE.md), nor for a short invocation
                // that a tick caught (a JSON guest of 40 µs is caught by one tick in 25; ticking
                // fast for it would catch ten times as many), nor for the shard's own tasks (an
                // idle spinner yields all the time).
                if self.class == Class::Long && q.slice_timer.borrow().is_none() && !TURNS_TAKEN.load(Ordering::Relaxed)
                {
                    TURNS_TAKEN.store(true, Ordering::Relaxed);
                }
            }
            // The pump lets the next one go once the executor has polled its sockets.
            q.signal_pump();
            Some(id)
        });
        match parked {
            Some(id) => self.state = YieldState::Parked(id),
            None => {
                cx.waker().wake_by_ref();
                self.state = YieldState::Done;
            }
        }
        Poll::Pending
    }
}

impl Drop for FairYield {
    /// A yield dropped while parked (its invocation's deadline timer won a race, its connection
    /// went away) leaves no waker behind; one dropped after it was let go hands the turn on.
    fn drop(&mut self) {
        let YieldState::Parked(id) = self.state else { return };
        // As in `Turn::done`: also runs while the thread's locals are torn down.
        let _ = QUEUE.try_with(|q| {
            // Let go, and dropped before it ran: its turn is over.
            if !q.remove(id) && q.last_released.get() == id {
                hand_on(q);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::io::Write;
    use std::rc::Rc;
    use std::time::Duration;

    use monoio::io::AsyncReadRent;

    use super::*;

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("a legacy monoio runtime")
    }

    /// A guest: `turns` yields of an invocation's, each after recording `name`.
    async fn guest(log: Rc<RefCell<Vec<String>>>, name: &'static str, turns: usize) {
        let turn = Turn::default();
        for _ in 0..turns {
            log.borrow_mut().push(name.to_string());
            turn.yield_now().await;
        }
        turn.done();
    }

    #[test]
    fn a_socket_that_became_ready_in_a_slice_is_served_before_the_next_guest() {
        runtime().block_on(async {
            monoio::spawn(pump(false, None).expect("the pump's socket pair"));
            let log = Rc::new(RefCell::new(Vec::new()));
            let (ours, theirs) = UnixStream::pair().expect("a socket pair");
            let mut conn = monoio::net::UnixStream::from_std(theirs).expect("registered");
            let served = log.clone();
            let connection = monoio::spawn(async move {
                let (read, _) = conn.read(vec![0u8; 8]).await;
                read.expect("a byte");
                served.borrow_mut().push("conn".into());
            });
            // Guest a's slice makes the connection ready, as a request arriving mid-slice does.
            let a_log = log.clone();
            let a = monoio::spawn(async move {
                let turn = Turn::default();
                a_log.borrow_mut().push("a".into());
                turn.yield_now().await;
                (&ours).write_all(&[1]).expect("written");
                a_log.borrow_mut().push("a".into());
                turn.yield_now().await;
                a_log.borrow_mut().push("a".into());
                turn.done();
            });
            let b = monoio::spawn(guest(log.clone(), "b", 3));
            a.await;
            b.await;
            connection.await;
            let log = log.borrow();
            // Where guest a logged after it wrote: the connection is next.
            let written = log.iter().enumerate().filter(|(_, e)| *e == "a").nth(1).map(|(i, _)| i).expect("a ran");
            assert_eq!(log.get(written + 1).map(String::as_str), Some("conn"), "{log:?}");
        });
    }

    /// io_uring submits a task's operations only when the executor polls its driver: with the
    /// pump's flush, an answer a connection queued during a guest's slice has reached the kernel
    /// before the next guest runs. Fails with `pump(false, None)`.
    #[test]
    fn on_io_uring_an_answer_queued_in_a_slice_is_sent_before_the_next_guest_runs() {
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build();
        let Ok(mut runtime) = built else {
            eprintln!("io_uring unavailable here: nothing to check");
            return;
        };
        runtime.block_on(async {
            monoio::spawn(pump(true, None).expect("the pump's socket pair"));
            let (peer, theirs) = UnixStream::pair().expect("a socket pair");
            peer.set_nonblocking(true).expect("nonblocking");
            let mut conn = monoio::net::UnixStream::from_std(theirs).expect("registered");
            let connection = monoio::spawn(async move {
                let (read, _) = conn.read(vec![0u8; 8]).await;
                read.expect("a request");
                let (written, _) = monoio::io::AsyncWriteRentExt::write_all(&mut conn, b"answer".to_vec()).await;
                written.expect("the answer");
            });
            let guest = monoio::spawn(async move {
                let turn = Turn::default();
                turn.yield_now().await;
                // A request arrives during this slice.
                (&peer).write_all(&[1]).expect("written");
                turn.yield_now().await;
                let mut answer = [0u8; 16];
                let sent = std::io::Read::read(&mut &peer, &mut answer);
                turn.done();
                sent.map(|n| answer[..n].to_vec())
            });
            let sent = guest.await;
            connection.await;
            assert_eq!(sent.expect("the answer had reached the socket"), b"answer");
        });
    }

    #[test]
    fn a_fresh_invocation_goes_before_the_long_runners() {
        runtime().block_on(async {
            monoio::spawn(pump(false, None).expect("the pump's socket pair"));
            let log = Rc::new(RefCell::new(Vec::new()));
            let names = ["t", "u", "v", "x", "y", "z"];
            let long: Vec<_> = names.into_iter().map(|name| monoio::spawn(guest(log.clone(), name, 12))).collect();
            // Until every long runner is past its fresh yields.
            while log.borrow().len() < names.len() * (FRESH_YIELDS as usize + 2) {
                yield_now().await;
            }
            let start = log.borrow().len();
            let fresh = monoio::spawn(guest(log.clone(), "f", 2));
            fresh.await;
            for guest in long {
                guest.await;
            }
            let log = log.borrow();
            let f: Vec<usize> = log.iter().enumerate().skip(start).filter(|(_, e)| *e == "f").map(|(i, _)| i).collect();
            assert_eq!(f.len(), 2, "{log:?}");
            // Between its yield and its next turn, at most the guest already let go and one long
            // runner owed a turn ran: in turn order, all six would have.
            assert!(f[1] - f[0] <= 3, "the fresh invocation waited behind the long runners: {log:?}");
        });
    }

    #[test]
    fn long_runners_are_not_starved_by_fresh_invocations() {
        runtime().block_on(async {
            monoio::spawn(pump(false, None).expect("the pump's socket pair"));
            let log = Rc::new(RefCell::new(Vec::new()));
            let long = monoio::spawn(guest(log.clone(), "long", 3 + FRESH_YIELDS as usize));
            // A steady stream of short invocations, three at a time, each of two fresh yields.
            let done = Rc::new(Cell::new(0u32));
            let stream_done = done.clone();
            let stream_log = log.clone();
            let stream = monoio::spawn(async move {
                let mut running = Vec::new();
                for _ in 0..200 {
                    if running.len() == 3 {
                        let first: monoio::task::JoinHandle<()> = running.remove(0);
                        first.await;
                        stream_done.set(stream_done.get() + 1);
                    }
                    running.push(monoio::spawn(guest(stream_log.clone(), "short", FRESH_YIELDS as usize)));
                }
                for guest in running {
                    guest.await;
                }
            });
            long.await;
            // Every long turn came within the first of the 200 short ones: with fresh first and
            // no long turn owed, the long runner would have waited for all of them.
            let short_done = done.get();
            assert!(short_done < 100, "the long runner waited for {short_done} short invocations");
            stream.await;
        });
    }

    #[test]
    fn timers_fire_while_guests_spin() {
        runtime().block_on(async {
            monoio::spawn(pump(false, None).expect("the pump's socket pair"));
            let fired = Rc::new(Cell::new(false));
            let timer = fired.clone();
            monoio::spawn(async move {
                monoio::time::sleep(Duration::from_millis(2)).await;
                timer.set(true);
            });
            let spinners: Vec<_> = (0..2)
                .map(|_| {
                    let fired = fired.clone();
                    monoio::spawn(async move {
                        let turn = Turn::default();
                        // Bounded: a shard that never parked would run these out and fail below.
                        for _ in 0..5_000_000u64 {
                            if fired.get() {
                                break;
                            }
                            turn.yield_now().await;
                        }
                        turn.done();
                        fired.get()
                    })
                })
                .collect();
            for spinner in spinners {
                assert!(spinner.await, "the timer never fired while the guests took turns");
            }
        });
    }

    #[test]
    fn a_guest_waiting_on_something_else_does_not_hold_the_turn() {
        runtime().block_on(async {
            monoio::spawn(pump(false, None).expect("the pump's socket pair"));
            let log = Rc::new(RefCell::new(Vec::new()));
            let waiting_log = log.clone();
            let waiting = monoio::spawn(async move {
                let turn = Turn::default();
                turn.yield_now().await;
                // Let go, it now waits on a timer rather than yield or end.
                monoio::time::sleep(Duration::from_millis(200)).await;
                waiting_log.borrow_mut().push("waited".to_string());
                turn.done();
            });
            let other = monoio::spawn(guest(log.clone(), "other", 5));
            other.await;
            waiting.await;
            let log = log.borrow();
            assert_eq!(log.iter().position(|e| e == "waited"), Some(5), "{log:?}");
        });
    }

    #[test]
    fn off_a_shard_a_yield_wakes_itself() {
        runtime().block_on(async {
            // No pump on this thread: the yield must not hang.
            yield_now().await;
            Turn::default().yield_now().await;
        });
    }
}

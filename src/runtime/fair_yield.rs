//! A yield that lets every other task on the shard run first.
//!
//! monoio puts a task that wakes itself during its own poll at the *front* of the run queue, so
//! wasmtime's built-in `UpdateDeadline::Yield` (which does exactly that) lets a looping guest run
//! again at once, forever: its shard would answer nothing else until the guest's deadline.
//!
//! Here a yielding guest parks its waker in a shard-local FIFO instead, and wakes a pump task. The
//! pump was idle, so it is queued at the *back*; when it runs, after the tasks already waiting
//! (I/O completions included), it wakes the oldest parked guest, which then queues behind them
//! too. Only one guest at a time is let go: the next only once that one yielded again or the
//! shard parked, so a ready connection waits behind one guest's slice, never behind all of them.
//!
//! monoio also processes timers and cross-thread wakes (the drain signal, a finished deploy) only
//! when it parks, and it parks only when its run queue is empty, which a yielding guest never lets
//! happen. So the first yield after a park arms a zero-length timer, the heartbeat: it fires at the
//! executor's next park, which proves that the queue emptied. If guests are still yielding
//! [`PARK_INTERVAL`] after the heartbeat was armed and it has not fired, the pump holds them back
//! until it does: the queue empties, the executor parks (returning within a millisecond, as timers
//! round up to the next one), and everything it owes is delivered. A guest that runs for long
//! thereby loses at most about a millisecond in every `PARK_INTERVAL`.
//!
//! Counted from the pump's last forced park instead, as it once was, the first yield after a quiet
//! spell found the interval long past and waited up to a millisecond although the shard had parked
//! all along; for a guest that often runs across a tick, that wait was the invoke P99
//! (perf/CORE.md).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// How long guests may keep a shard from parking.
pub const PARK_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Default)]
struct YieldQueue {
    pump_running: Cell<bool>,
    /// Yielded guests, oldest first: they run again in the order they yielded. Each is named by
    /// its yield's id, so that a yield dropped while parked can take itself out.
    parked: RefCell<VecDeque<(u64, Waker)>>,
    next_id: Cell<u64>,
    /// The id of the yield the pump let go last.
    last_released: Cell<u64>,
    pump: RefCell<Option<Waker>>,
    /// Whether a guest the pump let go may still be queued or running: the pump lets the next one
    /// go only once it is not (it yielded again, or the shard parked, so it finished or waits).
    released: Cell<bool>,
}

thread_local! {
    static QUEUE: YieldQueue = YieldQueue::default();
}

/// The pump: spawn once per shard, on the shard's executor. It never completes.
///
/// It lets yielded guests go *one at a time*: at most one guest is ever in the executor's run
/// queue through here, however many are runnable. So a connection task that becomes ready (a
/// probe, another tenant's short request) waits behind at most one guest's slice (an epoch tick),
/// not one slice per runnable guest: with 500 spinning guests on a shard and a wake-all pump,
/// `/healthz` waited half a second.
pub async fn pump() {
    QUEUE.with(|q| q.pump_running.set(true));
    // Armed at the first yield after a park, gone once it fired. Zero-length, so its deadline is
    // when it was armed.
    let mut heartbeat: Option<Pin<Box<monoio::time::Sleep>>> = None;
    loop {
        // Until a guest is parked here and none let go is still about. Polling the heartbeat
        // registers it with the timer; a firing heartbeat means the shard parked, which it does
        // only with an empty run queue: the guest let go last is done or waits on something else.
        poll_fn(|cx| {
            let fired = heartbeat.as_mut().is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
            if fired {
                heartbeat = None;
            }
            QUEUE.with(|q| {
                if fired {
                    q.released.set(false);
                }
                *q.pump.borrow_mut() = Some(cx.waker().clone());
                if q.parked.borrow().is_empty() || q.released.get() {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
        })
        .await;
        match heartbeat.as_mut() {
            None => heartbeat = Some(Box::pin(monoio::time::sleep(Duration::ZERO))),
            Some(timer) if timer.deadline().elapsed() >= PARK_INTERVAL => {
                timer.await;
                // Parked since. Armed again, so that the next park tells of the guest let go below.
                heartbeat = Some(Box::pin(monoio::time::sleep(Duration::ZERO)));
            }
            Some(_) => {}
        }
        QUEUE.with(|q| {
            let next = q.parked.borrow_mut().pop_front();
            if let Some((id, guest)) = next {
                q.released.set(true);
                q.last_released.set(id);
                guest.wake();
            }
        });
    }
}

/// One invocation's place in the turns: the id of its latest yield, so that when it ends the
/// turn is handed on only if it is the guest the pump let go last. Any invocation that ended
/// handing it on would let one more guest into the run queue each time, and under a stream of
/// short requests the spinning guests would pile up there again.
#[derive(Clone, Default)]
pub struct Turn(Arc<AtomicU64>);

impl Turn {
    /// A yield of this invocation's: [`yield_now`], remembered as its latest.
    pub fn yield_now(&self) -> FairYield {
        FairYield { state: YieldState::New, turn: Some(self.0.clone()) }
    }

    /// The invocation is over: if it held the turn, the pump need not wait for the shard to park
    /// before it lets the next guest go.
    pub fn done(&self) {
        let id = self.0.load(Ordering::Relaxed);
        // `try_with`: also runs while the shard thread's locals are torn down (a drained shard
        // drops its in-flight invocations then), when there is no turn to pass.
        let _ = QUEUE.try_with(|q| {
            if id != 0 && q.last_released.get() == id {
                hand_on(q);
            }
        });
    }
}

/// The guest let go last is done with its turn: the pump may let the next one go.
fn hand_on(q: &YieldQueue) {
    if q.released.replace(false) && !q.parked.borrow().is_empty() {
        if let Some(pump) = q.pump.borrow().as_ref() {
            pump.wake_by_ref();
        }
    }
}

/// Yields once, behind every task already queued on this shard and every guest that yielded
/// before. Off a shard (no pump), it falls back to an immediate self-wake.
pub fn yield_now() -> FairYield {
    FairYield { state: YieldState::New, turn: None }
}

pub struct FairYield {
    state: YieldState,
    /// The invocation's [`Turn`], told this yield's id.
    turn: Option<Arc<AtomicU64>>,
}

enum YieldState {
    New,
    /// In the FIFO (or let go and not polled since), under this id.
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
                    if q.last_released.get() != id {
                        q.parked.borrow_mut().retain(|(queued, _)| *queued != id);
                    }
                });
                self.state = YieldState::Done;
                return Poll::Ready(());
            }
            YieldState::Done => return Poll::Ready(()),
        }
        self.state = QUEUE.with(|q| {
            let pump = q.pump.borrow();
            match (q.pump_running.get(), pump.as_ref()) {
                (true, Some(pump)) => {
                    // From 1: `last_released` starts at 0, which names no yield.
                    let id = q.next_id.get() + 1;
                    q.next_id.set(id);
                    if let Some(turn) = &self.turn {
                        turn.store(id, Ordering::Relaxed);
                    }
                    q.parked.borrow_mut().push_back((id, cx.waker().clone()));
                    // Whichever guest was let go, one is parked again now: the pump may let the
                    // next one go.
                    q.released.set(false);
                    pump.wake_by_ref();
                    YieldState::Parked(id)
                }
                _ => {
                    cx.waker().wake_by_ref();
                    YieldState::Done
                }
            }
        });
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
            let mut parked = q.parked.borrow_mut();
            match parked.iter().position(|(queued, _)| *queued == id) {
                Some(at) => {
                    parked.remove(at);
                }
                // Let go, and dropped before it ran: its turn is over.
                None if q.last_released.get() == id => {
                    drop(parked);
                    hand_on(q);
                }
                None => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    /// Timers fire only when the executor parks, so a zero-length timer armed just before a yield
    /// tells whether the pump held the yielding task until a park.
    fn yield_after_quiet_spell_waited_for_a_park(quiet: Duration) -> bool {
        let mut runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("a legacy monoio runtime");
        runtime.block_on(async move {
            monoio::spawn(pump());
            monoio::time::sleep(quiet).await;
            let fired = Rc::new(Cell::new(false));
            let timer_fired = fired.clone();
            monoio::spawn(async move {
                monoio::time::sleep(Duration::ZERO).await;
                timer_fired.set(true);
            });
            monoio::spawn(async move {
                yield_now().await;
                fired.get()
            })
            .await
        })
    }

    #[test]
    fn a_yield_after_a_quiet_spell_is_not_held_for_a_park() {
        // The shard parked all through the quiet spell: the guest's first yield owes it nothing.
        assert!(!yield_after_quiet_spell_waited_for_a_park(PARK_INTERVAL * 2));
    }
}

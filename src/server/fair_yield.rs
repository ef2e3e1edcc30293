//! A yield that lets every other task on the shard run first.
//!
//! monoio puts a task that wakes itself during its own poll at the *front* of the run queue, so
//! wasmtime's built-in `UpdateDeadline::Yield` (which does exactly that) lets a looping guest run
//! again at once, forever: its shard would answer nothing else until the guest's deadline.
//!
//! Here a yielding guest parks its waker in a shard-local list instead, and wakes a pump task. The
//! pump was idle, so it is queued at the *back*; when it runs, after the tasks already waiting
//! (I/O completions included), it wakes the parked guests, which then queue behind them too.
//!
//! monoio also processes timers and cross-thread wakes (the drain signal, a finished deploy) only
//! when it parks, and it parks only when its run queue is empty, which a yielding guest never lets
//! happen. So after [`PARK_INTERVAL`] of continuous yielding the pump holds the guests back until
//! a zero-length timer fires: the queue empties, the executor parks (returning within a
//! millisecond, as timers round up to the next one), and everything it owes is delivered. A guest
//! that runs for long thereby loses at most about a millisecond in every `PARK_INTERVAL`.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How long guests may keep a shard from parking.
pub const PARK_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Default)]
struct YieldQueue {
    pump_running: Cell<bool>,
    parked: RefCell<Vec<Waker>>,
    pump: RefCell<Option<Waker>>,
}

thread_local! {
    static QUEUE: YieldQueue = YieldQueue::default();
}

/// The pump: spawn once per shard, on the shard's executor. It never completes.
pub async fn pump() {
    QUEUE.with(|q| q.pump_running.set(true));
    let mut last_park = Instant::now();
    loop {
        // Until a guest parks itself here.
        poll_fn(|cx| {
            QUEUE.with(|q| {
                *q.pump.borrow_mut() = Some(cx.waker().clone());
                if q.parked.borrow().is_empty() {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
        })
        .await;
        if last_park.elapsed() >= PARK_INTERVAL {
            monoio::time::sleep(Duration::ZERO).await;
            last_park = Instant::now();
        }
        let parked = QUEUE.with(|q| std::mem::take(&mut *q.parked.borrow_mut()));
        for w in parked {
            w.wake();
        }
    }
}

/// Yields once, behind every task already queued on this shard. Off a shard (no pump), it falls
/// back to an immediate self-wake.
pub fn yield_now() -> FairYield {
    FairYield { yielded: false }
}

pub struct FairYield {
    yielded: bool,
}

impl Future for FairYield {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        QUEUE.with(|q| {
            let pump = q.pump.borrow();
            match (q.pump_running.get(), pump.as_ref()) {
                (true, Some(pump)) => {
                    q.parked.borrow_mut().push(cx.waker().clone());
                    pump.wake_by_ref();
                }
                _ => cx.waker().wake_by_ref(),
            }
        });
        Poll::Pending
    }
}

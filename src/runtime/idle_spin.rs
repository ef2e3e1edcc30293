//! Spin before parking: for a while after each request, a shard keeps polling its sockets without
//! sleeping, so that the next request is read the moment it arrives.
//!
//! A parked shard sleeps in `epoll_wait` (or `io_uring_enter`). A request arriving then costs the
//! sender's CPU a wake-up and this thread a trip through the scheduler before its first byte is
//! read: tens of microseconds on a virtual machine. With `--idle-spin-us`, a shard that served a
//! request within the window polls instead (a zero-timeout `epoll_wait` per turn), and parks only
//! once the window passes quietly. That spends its CPU, so it is for shards on CPUs of their own
//! (Kubernetes' static CPU policy, a whole latency-critical host): on a shared CPU the spinning
//! shard takes the time from its neighbours. Off (0) by default.
//!
//! Spinning needs the epoll driver, whose non-blocking poll also takes the wakes other threads
//! send (a kernel's completion from a GPU worker, a finished deploy); monoio's io_uring driver
//! takes them only when it parks, so there they would wait. `auto` therefore picks epoll when
//! spinning is on, and `io-uring` with spinning is a configuration error.
//!
//! The spinner is a task that yields after every turn ([`fair_yield::yield_now`], behind every
//! task already queued), so its turns never keep a connection from running. Timers fire only when
//! monoio parks, which a queue never empty would postpone for good; a fair yield goes through the
//! pump, which lets the yielded task go only after the executor polled its driver, and with the
//! queue empty then, it parks there: at every turn, as for a looping guest.

use std::cell::Cell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::fair_yield;

/// What a shard's connections tell its spinner.
#[derive(Default)]
pub struct IdleSpin {
    /// Requests the shard has begun, wrapping.
    requests: Cell<u64>,
    /// The spinner, when it waits for a request to start spinning again.
    idle: Cell<Option<Waker>>,
}

impl IdleSpin {
    /// Counts a request; a spinner that went idle starts again.
    pub fn note_request(&self) {
        self.requests.set(self.requests.get().wrapping_add(1));
        if let Some(spinner) = self.idle.take() {
            spinner.wake();
        }
    }

    /// The spinner: spawn once per shard, on the shard's executor, where `window` is not zero. It
    /// never completes.
    pub async fn spin(self: Rc<Self>, window: Duration) {
        debug_assert!(!window.is_zero());
        let mut seen = self.requests.get();
        loop {
            poll_fn(|cx| {
                if self.requests.get() != seen {
                    return Poll::Ready(());
                }
                self.idle.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            let mut last_request = Instant::now();
            loop {
                if self.requests.get() != seen {
                    seen = self.requests.get();
                    last_request = Instant::now();
                } else if last_request.elapsed() >= window {
                    break;
                }
                fair_yield::yield_now().await;
            }
        }
    }
}

//! Shard-local synchronisation: a one-shot event many tasks can wait on, and a two-way race.
//! Shards are single-threaded, so these use `Cell`/`RefCell` and never a lock.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::{Poll, Waker};

/// Fires once; every waiter, present or future, then completes. Waiters that are dropped
/// unregister themselves, so a long-lived connection polling it per request leaks nothing.
#[derive(Default)]
pub struct LocalEvent {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl LocalEvent {
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    pub fn fire(&self) {
        self.fired.set(true);
        let wakers: Vec<_> = self.waiters.borrow_mut().iter_mut().filter_map(Option::take).collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Completes once the event has fired.
    pub async fn wait(&self) {
        struct Slot<'a>(&'a LocalEvent, Option<usize>);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                if let Some(i) = self.1 {
                    if let Some(w) = self.0.waiters.borrow_mut().get_mut(i) {
                        *w = None;
                    }
                    self.0.free.borrow_mut().push(i);
                }
            }
        }
        let mut slot = Slot(self, None);
        poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            match slot.1 {
                Some(i) => waiters[i] = Some(cx.waker().clone()),
                None => {
                    let i = match self.free.borrow_mut().pop() {
                        Some(i) => {
                            waiters[i] = Some(cx.waker().clone());
                            i
                        }
                        None => {
                            waiters.push(Some(cx.waker().clone()));
                            waiters.len() - 1
                        }
                    };
                    slot.1 = Some(i);
                }
            }
            Poll::Pending
        })
        .await
    }
}

pub enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Polls both futures; the first to finish wins and the other is dropped.
pub async fn race<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = pin!(a);
    let mut b = pin!(b);
    poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}

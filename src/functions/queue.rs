//! The catalog worker's queue: bounded in total and per tenant, served round robin over tenants,
//! with a lane for cheap jobs that never waits behind a compile.
//!
//! One queue in arrival order let a tenant with a 300k-function module in compilation make every
//! other tenant's deploy wait 15.9 s, and with the queue full their deploys *and deletes* got 503.
//! Here each tenant has its own line, the worker takes the next tenant's job in turn, and a tenant
//! can fill only its own share of the depth. Jobs that are cheap (deletes, pipeline changes, and a
//! finished compile coming back) go in the `urgent` lane, which the worker serves first, also while
//! a compile runs on the compile thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds its whole depth.
    Full,
    /// This tenant holds its share of the depth.
    TenantFull,
    /// The worker is gone.
    Closed,
}

/// Why nothing was taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Empty {
    TimedOut,
    /// Every sender is gone and nothing is left.
    Closed,
}

struct State<T> {
    urgent: VecDeque<T>,
    /// The tenant of each urgent job, `None` for a compile's result (outside the bounds).
    urgent_tenants: VecDeque<Option<u64>>,
    lines: HashMap<u64, VecDeque<T>>,
    /// Tenants with a queued job, in the order they are served.
    turn: VecDeque<u64>,
    /// Jobs queued per tenant, both lanes.
    per_tenant: HashMap<u64, usize>,
    total: usize,
    /// The worker is gone: nothing queued will ever be taken.
    consumer_gone: bool,
    /// Urgent jobs taken in a row while lines waited: past [`URGENT_STREAK`] a line goes first.
    urgent_streak: usize,
}

/// Urgent jobs the worker takes in a row before a waiting line's job: cheap jobs go first, but a
/// steady stream of them cannot starve every deploy.
const URGENT_STREAK: usize = 8;

pub struct FairQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    max_total: usize,
    max_per_tenant: usize,
    /// Live [`Sender`]s; at zero the queue is closed.
    senders: AtomicUsize,
}

/// A handle that submits jobs; the queue closes when the last one is dropped.
pub struct Sender<T> {
    queue: Arc<FairQueue<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::Relaxed);
        Sender { queue: self.queue.clone() }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Taken so that a waiting worker sees the count and the notification together.
            let _state = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
            self.queue.ready.notify_all();
        }
    }
}

impl<T> Sender<T> {
    /// Queues `job` of `tenant` in its line, or in the urgent lane. Urgent jobs count against the
    /// tenant's share too, so that a flood of deletes is bounded like one of deploys.
    pub fn push(&self, tenant: u64, urgent: bool, job: T) -> Result<(), Refused> {
        let q = &self.queue;
        let mut state = q.lock();
        if state.consumer_gone {
            return Err(Refused::Closed);
        }
        if state.total >= q.max_total {
            return Err(Refused::Full);
        }
        let held = state.per_tenant.get(&tenant).copied().unwrap_or(0);
        if held >= q.max_per_tenant {
            return Err(Refused::TenantFull);
        }
        state.total += 1;
        state.per_tenant.insert(tenant, held + 1);
        if urgent {
            state.urgent.push_back(job);
            state.urgent_tenants.push_back(Some(tenant));
        } else {
            let line = state.lines.entry(tenant).or_default();
            let first = line.is_empty();
            line.push_back(job);
            if first {
                state.turn.push_back(tenant);
            }
        }
        drop(state);
        q.ready.notify_one();
        Ok(())
    }
}

impl<T> State<T> {
    fn release(&mut self, tenant: Option<u64>) {
        let Some(tenant) = tenant else { return };
        self.total -= 1;
        if let Some(held) = self.per_tenant.get_mut(&tenant) {
            *held -= 1;
            if *held == 0 {
                self.per_tenant.remove(&tenant);
            }
        }
    }
}

impl<T> FairQueue<T> {
    /// A queue of at most `max_total` jobs, `max_per_tenant` of them any one tenant's; and its
    /// first sender.
    pub fn new(max_total: usize, max_per_tenant: usize) -> (Arc<FairQueue<T>>, Sender<T>) {
        assert!(max_total > 0 && max_per_tenant > 0);
        let queue = Arc::new(FairQueue {
            state: Mutex::new(State {
                urgent: VecDeque::new(),
                urgent_tenants: VecDeque::new(),
                lines: HashMap::new(),
                turn: VecDeque::new(),
                per_tenant: HashMap::new(),
                total: 0,
                consumer_gone: false,
                urgent_streak: 0,
            }),
            ready: Condvar::new(),
            max_total,
            max_per_tenant,
            senders: AtomicUsize::new(1),
        });
        (queue.clone(), Sender { queue })
    }

    /// Queues a job that bypasses the bounds: a compile's result, which the worker must take
    /// whatever else is queued. Never more than one per compile running. Not a [`Sender`]'s, so
    /// that the compile thread does not keep the queue open.
    pub fn push_result(&self, job: T) {
        let mut state = self.lock();
        state.urgent.push_back(job);
        state.urgent_tenants.push_back(None);
        drop(state);
        self.ready.notify_one();
    }

    /// The worker is gone (it stopped, or its thread died): every queued job is dropped, so that
    /// whoever waits on one hears so, and later pushes are refused.
    pub fn close_consumer(&self) {
        let mut state = self.lock();
        state.consumer_gone = true;
        let dropped = (std::mem::take(&mut state.urgent), std::mem::take(&mut state.lines));
        state.turn.clear();
        state.urgent_tenants.clear();
        state.per_tenant.clear();
        state.total = 0;
        drop(state);
        drop(dropped);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding it leaves consistent counts: every update is a single step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next job, waiting at most `timeout`: an urgent one first; else, when `take_lines`, the
    /// next tenant's in turn.
    pub fn pop(&self, timeout: Duration, take_lines: bool) -> Result<T, Empty> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let line_due = take_lines && state.urgent_streak >= URGENT_STREAK && !state.turn.is_empty();
            if !line_due {
                if let Some(job) = state.urgent.pop_front() {
                    let tenant = state.urgent_tenants.pop_front().flatten();
                    state.release(tenant);
                    if take_lines && !state.turn.is_empty() {
                        state.urgent_streak += 1;
                    }
                    return Ok(job);
                }
            }
            if take_lines {
                if let Some(tenant) = state.turn.pop_front() {
                    let line = state.lines.get_mut(&tenant).expect("a tenant in turn has a line");
                    let job = line.pop_front().expect("a tenant in turn has a job");
                    if line.is_empty() {
                        state.lines.remove(&tenant);
                    } else {
                        state.turn.push_back(tenant);
                    }
                    state.release(Some(tenant));
                    state.urgent_streak = 0;
                    return Ok(job);
                }
            }
            if self.senders.load(Ordering::Acquire) == 0 && state.urgent.is_empty() {
                return Err(Empty::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Empty::TimedOut);
            }
            state = self.ready.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_served_in_turn_and_urgent_jobs_first() {
        let (queue, tx) = FairQueue::new(16, 4);
        for job in ["a1", "a2", "a3"] {
            tx.push(1, false, job).unwrap();
        }
        tx.push(2, false, "b1").unwrap();
        tx.push(3, true, "c-delete").unwrap();
        let order: Vec<_> = (0..5).map(|_| queue.pop(Duration::ZERO, true).unwrap()).collect();
        assert_eq!(order, ["c-delete", "a1", "b1", "a2", "a3"]);
        assert_eq!(queue.pop(Duration::ZERO, true), Err(Empty::TimedOut));
    }

    #[test]
    fn a_tenant_fills_only_its_share_and_a_result_always_gets_in() {
        let (queue, tx) = FairQueue::new(3, 2);
        tx.push(1, false, 1).unwrap();
        tx.push(1, true, 2).unwrap();
        assert_eq!(tx.push(1, false, 3), Err(Refused::TenantFull));
        tx.push(2, false, 4).unwrap();
        assert_eq!(tx.push(3, true, 5), Err(Refused::Full));
        queue.push_result(6);
        // Lines wait while a compile runs; urgent jobs and results do not.
        assert_eq!(queue.pop(Duration::ZERO, false), Ok(2));
        assert_eq!(queue.pop(Duration::ZERO, false), Ok(6));
        assert_eq!(queue.pop(Duration::ZERO, false), Err(Empty::TimedOut));
        assert_eq!(queue.pop(Duration::ZERO, true), Ok(1));
        tx.push(1, false, 7).unwrap();
    }

    #[test]
    fn a_stream_of_urgent_jobs_lets_a_line_through_now_and_then() {
        let (queue, tx) = FairQueue::new(64, 64);
        tx.push(1, false, "deploy").unwrap();
        for _ in 0..20 {
            tx.push(2, true, "delete").unwrap();
        }
        let order: Vec<_> = (0..10).map(|_| queue.pop(Duration::ZERO, true).unwrap()).collect();
        assert_eq!(order.iter().position(|j| *j == "deploy"), Some(URGENT_STREAK));
    }

    #[test]
    fn a_gone_worker_refuses_new_jobs_and_drops_the_queued_ones() {
        let (queue, tx) = FairQueue::new(4, 4);
        let job = std::rc::Rc::new(());
        tx.push(1, false, job.clone()).unwrap();
        queue.close_consumer();
        assert_eq!(std::rc::Rc::strong_count(&job), 1, "the queued job was dropped");
        assert_eq!(tx.push(1, true, job.clone()), Err(Refused::Closed));
    }

    #[test]
    fn the_queue_closes_when_the_last_sender_goes() {
        let (queue, tx) = FairQueue::new(4, 4);
        let second = tx.clone();
        tx.push(1, false, 1).unwrap();
        drop(tx);
        drop(second);
        assert_eq!(queue.pop(Duration::from_secs(5), true), Ok(1));
        assert_eq!(queue.pop(Duration::from_secs(5), true), Err(Empty::Closed));
    }
}

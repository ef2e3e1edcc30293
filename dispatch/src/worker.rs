//! A device's worker thread: the only user of its back-end. It takes requests from every shard's
//! ring in turn, runs them, and pushes each completion to the issuing shard's ring.

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, Finished, Submitted};
use crate::dispatcher::{Device, Dispatcher};
use crate::port::{STREAMED, UNTRACKED};
use crate::record::{status, Completion, Op, Request};

/// Each session's first failed streamed request: (its seq, its op code, its status). Its later
/// streamed requests are skipped, and its next waited-for request is answered with it, so the
/// guest learns which op failed at its next read or sync. Gone with the session's release.
#[derive(Default)]
struct Failures(HashMap<u64, (u64, u32, i32)>);

impl Failures {
    fn get(&self, session: u64) -> Option<(u64, u32, i32)> {
        self.0.get(&session).copied()
    }

    fn record(&mut self, req: &Request, status: i32) {
        self.0.entry(req.session).or_insert((req.seq, u32::from(req.op), status));
    }

    fn forget(&mut self, session: u64) {
        self.0.remove(&session);
    }
}

/// Frees a streamed request's staging buffer, which the shard handed over with the request
/// (`Session::try_stream`).
///
/// # Safety
/// Once per streamed request, after the back-end is done reading it (its descriptor is copied out
/// in `submit`).
unsafe fn free_streamed_staging(req: &Request) {
    if req.ticket == STREAMED && req.host_len > 0 {
        let words = std::ptr::slice_from_raw_parts_mut(req.host_addr as *mut f32, req.host_len as usize);
        drop(Box::from_raw(words));
    }
}

/// Requests taken from one ring before the worker moves to the next, so that one busy shard
/// cannot starve the others. The worker's fairness quantum, not a limit anyone waits against: a
/// constant rather than a `DispatchConfig` field.
const BATCH: usize = 32;

pub(crate) fn run(dispatcher: Arc<Dispatcher>, index: usize, mut backend: Box<dyn Backend>) {
    let device = &dispatcher.devices[index];
    let shards = device.rings.len();
    let mut finished: Vec<Finished> = Vec::new();
    // Completions whose shard ring was full; retried every turn, never dropped.
    let mut backlog: Vec<(usize, Completion)> = Vec::new();
    let mut idle_since = Instant::now();
    let mut next_shard = 0;
    let mut failures = Failures::default();
    // Sessions released this turn: their failures are forgotten once the turn's finished requests
    // (a CUDA release settles the session's, which the poll below then reports) are answered.
    let mut released: Vec<u64> = Vec::new();
    loop {
        let mut worked = false;
        for k in 0..shards {
            let shard = (next_shard + k) % shards;
            let mut popped = false;
            for _ in 0..BATCH {
                let Some(req) = device.rings[shard].pop() else { break };
                (worked, popped) = (true, true);
                let started = Instant::now();
                if req.op == Op::Release as u8 {
                    released.push(req.session);
                }
                // After a session's streamed request failed, its later ones would only fail on
                // the missing tensor, or run on a state the guest never meant: they are skipped,
                // but for frees, and a waited-for one is answered with the failure.
                let frees = req.op == Op::Free as u8 || req.op == Op::Release as u8;
                let skipped = !frees && failures.get(req.session).is_some();
                let submitted = if skipped { Submitted::Done(status::OK) } else { backend.submit(&req, started) };
                // SAFETY: the back-end has read the request's descriptor, and nothing else will.
                unsafe { free_streamed_staging(&req) };
                match submitted {
                    Submitted::Done(status) => {
                        // Kept at once, in ring order: the session's next request, in this batch
                        // or a later one, is skipped.
                        if req.ticket == STREAMED && status != status::OK {
                            failures.record(&req, status);
                        }
                        finished.push(Finished { req, status, started });
                    }
                    Submitted::InFlight => {}
                }
            }
            // The ring has room now: a shard whose frees or releases wait for it is woken to push
            // them (streamed kernels and frees get no completion that would wake it).
            if popped && dispatcher.deferred_waiting(shard) {
                dispatcher.ports[shard].poller.wake();
            }
        }
        next_shard = (next_shard + 1) % shards;
        backend.poll(&mut finished);
        if !finished.is_empty() {
            device.memory_used.store(backend.memory_used(), Ordering::Relaxed);
            for f in finished.drain(..) {
                let completion = answer(&mut failures, &f);
                complete(&dispatcher, device, &f.req, completion, &mut backlog);
            }
        }
        for session in released.drain(..) {
            failures.forget(session);
        }
        if !backlog.is_empty() {
            backlog.retain(|&(shard, c)| push(&dispatcher, shard, c).is_err());
        }

        if worked || backend.in_flight() > 0 || !backlog.is_empty() {
            // Kernels in flight are polled without a pause: their completion is the latency.
            idle_since = Instant::now();
            if !worked {
                std::hint::spin_loop();
            }
            continue;
        }
        if dispatcher.stop.load(Ordering::Acquire) {
            return;
        }
        if idle_since.elapsed() < dispatcher.config.worker_spin {
            std::hint::spin_loop();
            continue;
        }
        // Before sleeping: a shard that deferred a free after this worker last looked at its ring
        // has room now, and nothing else would wake its poller.
        for shard in 0..shards {
            if dispatcher.deferred_waiting(shard) {
                dispatcher.ports[shard].poller.wake();
            }
        }
        device.sleeping.store(true, Ordering::Relaxed);
        // Pairs with `Device::wake`: announce sleep, then look at the rings once more.
        fence(Ordering::SeqCst);
        if device.rings.iter().all(|r| r.is_empty()) && !dispatcher.stop.load(Ordering::Acquire) {
            // The timeout only bounds the damage of a lost wake-up; none is expected.
            std::thread::park_timeout(std::time::Duration::from_millis(100));
        }
        device.sleeping.store(false, Ordering::Relaxed);
        idle_since = Instant::now();
    }
}

/// What a finished request's waiter is told: its own status, or the session's first failure when
/// an earlier streamed request failed (then the request itself was a read or a sync that must not
/// report success). A streamed request's failure is kept for that.
fn answer(failures: &mut Failures, f: &Finished) -> Completion {
    let device_nanos = f.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
    let mut completion = Completion { ticket: f.req.ticket, status: f.status, device_nanos, ..Default::default() };
    if f.req.ticket == STREAMED {
        // One that failed within `submit` is kept already; `record` keeps the first.
        if f.status != status::OK {
            failures.record(&f.req, f.status);
        }
        return completion;
    }
    if let Some((seq, op, failed)) = failures.get(f.req.session) {
        completion.status = failed;
        (completion.failed_seq, completion.failed_op) = (seq, op);
    }
    completion
}

fn complete(
    dispatcher: &Dispatcher,
    device: &Device,
    req: &Request,
    completion: Completion,
    backlog: &mut Vec<(usize, Completion)>,
) {
    let shard = usize::from(req.shard);
    let before = device.in_flight.fetch_sub(1, Ordering::Relaxed);
    // Each request is counted before it is pushed (`Dispatcher::try_submit`).
    debug_assert!(before > 0, "a completion for a request that was never counted");
    // Nobody waits for a streamed request: the shard learns of it only through a failure kept
    // for its session's next wait, and no wake crosses threads per op. Nor for an untracked one
    // (a free): the shard's poller is woken above when it has deferred requests to push.
    if req.ticket == STREAMED || req.ticket == UNTRACKED {
        return;
    }
    if push(dispatcher, shard, completion).is_err() {
        backlog.push((shard, completion));
    }
}

fn push(dispatcher: &Dispatcher, shard: usize, completion: Completion) -> Result<(), ()> {
    let Some(port) = dispatcher.ports.get(shard) else { return Ok(()) };
    port.completions.push(completion).map_err(|_| ())?;
    port.poller.wake();
    Ok(())
}

//! A device's worker thread: the only user of its back-end. It takes requests from every shard's
//! ring in turn, runs them, and pushes each completion to the issuing shard's ring.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, Finished, Submitted};
use crate::dispatcher::{Device, Dispatcher};
use crate::record::{Completion, Request};

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
    loop {
        let mut worked = false;
        for k in 0..shards {
            let shard = (next_shard + k) % shards;
            for _ in 0..BATCH {
                let Some(req) = device.rings[shard].pop() else { break };
                worked = true;
                let started = Instant::now();
                match backend.submit(&req, started) {
                    Submitted::Done(status) => {
                        finished.push(Finished { req, status, started });
                    }
                    Submitted::InFlight => {}
                }
            }
        }
        next_shard = (next_shard + 1) % shards;
        backend.poll(&mut finished);
        if !finished.is_empty() {
            device.memory_used.store(backend.memory_used(), Ordering::Relaxed);
            for f in finished.drain(..) {
                complete(&dispatcher, device, &f.req, f.status, f.started, &mut backlog);
            }
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

fn complete(
    dispatcher: &Dispatcher,
    device: &Device,
    req: &Request,
    status: i32,
    started: Instant,
    backlog: &mut Vec<(usize, Completion)>,
) {
    let device_nanos = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
    let shard = usize::from(req.shard);
    let completion = Completion { ticket: req.ticket, status, device_nanos };
    let before = device.in_flight.fetch_sub(1, Ordering::Relaxed);
    // Each request is counted before it is pushed (`Dispatcher::try_submit`).
    debug_assert!(before > 0, "a completion for a request that was never counted");
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

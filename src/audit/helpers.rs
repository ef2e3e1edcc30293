//! The audit log's two helper threads, the sealer and the prefaulter, which do slow work off the
//! shards. Whoever opens the log starts them ([`HelperThreads::start`]), hands each chain a
//! [`Helpers`] handle, and stops them after the last writer closed ([`HelperThreads::stop`]).
//!
//! They know nothing of the segment format: the prefaulter faults in ranges of a mapping, and the
//! sealer runs the jobs `segment.rs` hands it.

use std::io;
use std::sync::Arc;

use memmap2::MmapRaw;

/// What a chain asks of the audit log's helper threads: a cheap handle, cloned into each shard's
/// chain and each of its segments. `Helpers::default()` has no threads: then sealing runs on the
/// caller and nothing is prefaulted, as when a helper could not be started.
#[derive(Clone, Default)]
pub struct Helpers {
    sealer: Option<Sealer>,
    pub(super) prefaulter: Option<Prefaulter>,
}

/// The audit log's helper threads, the [`Sealer`] and the [`Prefaulter`], owned by whoever opens
/// the log (the server's start-up, a benchmark, a test), which stops them after the last writer
/// has closed. Dropped without `stop`, they are stopped the same way.
pub struct HelperThreads {
    helpers: Helpers,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HelperThreads {
    /// Starts the sealer and the prefaulter. Call it before any thread is pinned: a thread
    /// inherits its creator's CPUs, and a helper sharing a shard's CPU would stall that shard
    /// while it works. A helper that cannot be started is logged, and its work runs on the shards.
    pub fn start() -> HelperThreads {
        let mut threads = Vec::with_capacity(2);
        let sealer = Sealer::start().map(|(sealer, thread)| {
            threads.push(thread);
            sealer
        });
        let prefaulter = Prefaulter::start().map(|(prefaulter, thread)| {
            threads.push(thread);
            prefaulter
        });
        HelperThreads { helpers: Helpers { sealer, prefaulter }, threads }
    }

    /// The handle to give each chain opened while these threads run.
    pub fn helpers(&self) -> Helpers {
        self.helpers.clone()
    }

    /// Stops both threads once every job queued before is done, so that segments handed to the
    /// sealer are cut and fsynced before this returns, and joins them. A handle still held
    /// elsewhere does its work itself from then on.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // Blocking sends, unlike `Helpers`' own: each stop must queue behind every job.
        if let Some(sealer) = self.helpers.sealer.take() {
            let _ = sealer.tx.send(Ask::Stop);
        }
        if let Some(prefaulter) = self.helpers.prefaulter.take() {
            let _ = prefaulter.tx.send(Ask::Stop);
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("audit: a helper thread panicked");
            }
        }
    }
}

impl Drop for HelperThreads {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What a helper thread is sent: an item of work, or the order to stop after the work queued
/// before it.
enum Ask<T> {
    Work(T),
    Stop,
}

/// How a helper thread yields to the shards. Where the server has no CPU to spare (fewer CPUs
/// than shards plus helpers, as under a Kubernetes CPU limit), a helper runs on a shard's CPU, and
/// at normal priority a freshly woken helper takes that CPU for a whole time slice: `perf sched`
/// caught the prefault thread holding a lone shard off its CPU for 10 ms.
#[derive(Clone, Copy)]
enum HelperPriority {
    /// SCHED_IDLE: runs only on a CPU with nothing else to run. For work the shard does itself
    /// when the helper falls behind (prefaulting).
    Idle,
    /// Nice 19: the least CPU of the normal threads, but never starved. For work whose delay
    /// delays durability (sealing).
    Background,
}

impl HelperPriority {
    /// Applies to the calling thread. A refusal only costs latency, so it is logged, not fatal.
    fn apply(self, name: &str) {
        // SAFETY: both calls only change the calling thread's scheduling; the parameters are
        // plain data.
        let rc = unsafe {
            match self {
                HelperPriority::Idle => {
                    let param = libc::sched_param { sched_priority: 0 };
                    libc::sched_setscheduler(0, libc::SCHED_IDLE, &param)
                }
                HelperPriority::Background => libc::setpriority(libc::PRIO_PROCESS, 0, 19),
            }
        };
        if rc != 0 {
            tracing::warn!("audit: {name} keeps normal priority: {}", io::Error::last_os_error());
        }
    }
}

/// A helper thread named `name` that does `work` on each item sent to it, behind a queue of
/// `depth`, at `priority`, until it is asked to stop. `None` when the thread cannot be started:
/// then the callers do the work themselves.
fn spawn_helper<T: Send + 'static>(
    name: &'static str,
    depth: usize,
    priority: HelperPriority,
    mut work: impl FnMut(T) + Send + 'static,
) -> Option<(std::sync::mpsc::SyncSender<Ask<T>>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Ask<T>>(depth);
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        priority.apply(name);
        while let Ok(Ask::Work(item)) = rx.recv() {
            work(item);
        }
    });
    match spawned {
        Ok(thread) => Some((tx, thread)),
        Err(e) => {
            tracing::error!("audit: cannot start {name} ({e}); the shards do its work themselves");
            None
        }
    }
}

/// A window of a segment's mapping to fault in.
type PrefaultJob = (Arc<MmapRaw>, std::ops::Range<usize>);

/// Faults in pages of active segments ahead of their shards' writes (MADV_POPULATE_WRITE, one
/// call per window instead of a fault per page). One thread for the log, with a bounded queue; a
/// request that does not fit is dropped, and its pages are faulted in by the writes.
#[derive(Clone)]
pub(super) struct Prefaulter {
    tx: std::sync::mpsc::SyncSender<Ask<PrefaultJob>>,
}

impl Prefaulter {
    fn start() -> Option<(Prefaulter, std::thread::JoinHandle<()>)> {
        let spawned = spawn_helper("tw-audit-prefault", 256, HelperPriority::Idle, |(map, range): PrefaultJob| {
            // A segment sealed since (its last holder is this request) is not worth it.
            // Kernels before 5.14 refuse the advice; a sealed segment's cut tail answers
            // EFAULT. Either way the writes fault the pages in themselves.
            if Arc::strong_count(&map) > 1 {
                let _ = map.advise_range(memmap2::Advice::PopulateWrite, range.start, range.len());
            }
        });
        spawned.map(|(tx, thread)| (Prefaulter { tx }, thread))
    }

    pub(super) fn ask(&self, map: &Arc<MmapRaw>, range: std::ops::Range<usize>) {
        let _ = self.tx.try_send(Ask::Work((map.clone(), range)));
    }
}

/// Work for the sealer: sealing a full segment, making a directory entry durable, reserving a
/// spare, applying retention (`segment.rs` says which).
pub(super) type SealJob = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// Work done off the shards: sealing full segments (msync, cut, fsync), making new segments'
/// directory entries durable, and reserving spares. One thread for the log; its queue is bounded,
/// and when it is full the shard does the work itself.
#[derive(Clone)]
struct Sealer {
    tx: std::sync::mpsc::SyncSender<Ask<SealJob>>,
}

impl Sealer {
    fn start() -> Option<(Sealer, std::thread::JoinHandle<()>)> {
        let spawned = spawn_helper("tw-audit-seal", 64, HelperPriority::Background, |job: SealJob| {
            if let Err(e) = job() {
                tracing::error!("audit: background work failed: {e}");
            }
        });
        spawned.map(|(tx, thread)| (Sealer { tx }, thread))
    }
}

impl Helpers {
    /// Queues `job` for the sealer, or runs it here when its queue is full, it has stopped, or
    /// there is none.
    pub(super) fn submit(&self, job: SealJob) -> io::Result<()> {
        use std::sync::mpsc::TrySendError;
        let job = match &self.sealer {
            Some(sealer) => match sealer.tx.try_send(Ask::Work(job)) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(refused) | TrySendError::Disconnected(refused)) => match refused {
                    Ask::Work(job) => job,
                    Ask::Stop => unreachable!("a refused send gives back what was sent: work"),
                },
            },
            None => job,
        };
        job()
    }

    /// Queues `job` for the sealer if its queue has room; `false`, and the job dropped, when it
    /// has none, has stopped, or there is no sealer.
    pub(super) fn offer(&self, job: SealJob) -> bool {
        self.sealer.as_ref().is_some_and(|s| s.tx.try_send(Ask::Work(job)).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::segment::{segment_name, ActiveSegment};
    use std::fs;

    #[test]
    fn stopping_the_helpers_finishes_the_seals_handed_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let threads = HelperThreads::start();
        let helpers = threads.helpers();
        let path = dir.path().join(segment_name(1));
        let mut segment = ActiveSegment::create(path.clone(), 64 * 1024, false, &helpers).unwrap();
        segment.append(b"{\"record\":1}\n");
        helpers.seal(segment).unwrap();
        threads.stop();
        assert_eq!(fs::read(&path).unwrap(), b"{\"record\":1}\n", "cut to its records");
        // A handle that outlives its threads does the work itself.
        let next = ActiveSegment::create(dir.path().join(segment_name(2)), 64 * 1024, false, &helpers).unwrap();
        helpers.seal(next).unwrap();
        assert_eq!(fs::read(dir.path().join(segment_name(2))).unwrap(), b"");
    }
}

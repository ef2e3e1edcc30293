//! A helper thread that does its work every interval until its owner stops it (`Periodic`): the
//! watched files' pollers and the audit log's group commit. Stopping wakes the thread at once,
//! rather than after its interval, and waits for it to end, so that a server's drain can say when
//! each of its threads is gone.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A running periodic thread. Dropping it stops it too.
#[must_use = "dropping a Periodic stops its thread"]
pub struct Periodic {
    stop: Arc<StopFlag>,
    thread: Option<JoinHandle<()>>,
}

/// Set once, by the owner; the thread sleeps on it between ticks.
#[derive(Default)]
struct StopFlag {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopFlag {
    /// Sleeps `interval`, or less if stopped meanwhile; whether stopped.
    fn sleep(&self, interval: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        // `wait_timeout_while` sleeps again after a spurious wake, so a tick never comes early.
        let (stopped, _) =
            self.wake.wait_timeout_while(stopped, interval, |stopped| !*stopped).unwrap_or_else(|p| p.into_inner());
        *stopped
    }

    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }
}

impl Periodic {
    /// Starts thread `name`, which sleeps `interval` and then calls `tick`, over and over, until
    /// stopped.
    pub fn spawn(name: &str, interval: Duration, mut tick: impl FnMut() + Send + 'static) -> io::Result<Periodic> {
        let stop = Arc::new(StopFlag::default());
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            while !flag.sleep(interval) {
                tick();
            }
        })?;
        Ok(Periodic { stop, thread: Some(thread) })
    }

    /// Stops the thread, after the tick it may be in, and waits for it to end.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.set();
        if let Some(thread) = self.thread.take() {
            let name = thread.thread().name().unwrap_or("unnamed").to_string();
            if thread.join().is_err() {
                tracing::error!(thread = %name, "a periodic thread panicked");
            }
        }
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn it_ticks_until_stopped_and_stops_without_waiting_out_its_interval() {
        let ticks = Arc::new(AtomicUsize::new(0));
        let counted = ticks.clone();
        let periodic = Periodic::spawn("tw-test-periodic", Duration::from_millis(1), move || {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ticks.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        periodic.stop();
        let after_stop = ticks.load(Ordering::SeqCst);
        assert!(after_stop >= 3, "it ticked: {after_stop}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ticks.load(Ordering::SeqCst), after_stop, "no tick after stop returned");

        // An hour's interval: `stop` wakes it rather than waiting the hour.
        let idle = Periodic::spawn("tw-test-periodic", Duration::from_secs(3600), || {}).unwrap();
        let started = Instant::now();
        drop(idle);
        assert!(started.elapsed() < Duration::from_secs(600), "stopped by the drop, not by the interval");
    }
}

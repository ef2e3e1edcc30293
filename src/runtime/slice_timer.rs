//! A shard's own slice timer: a POSIX timer whose signal goes to the shard's thread, so that the
//! tick ending a long-running guest's slice arrives on time however busy the shard's CPU is.
//!
//! The epoch ticker is a thread, and a thread that wakes must be scheduled. On a CPU where a
//! shard's guests spin, EEVDF now and then left the woken ticker waiting for the next scheduler
//! tick: beside spinning guests, `perf sched timehist` showed the ticker's scheduling delay at 1
//! to 4 ms some ten times a second, the guest ran on meanwhile, and those milliseconds were the
//! bystander's P99 (perf/HOSTILE.md). A timer's signal needs no scheduling: the kernel delivers it
//! to the running thread on its way back to user space from the timer interrupt, and the handler
//! runs the tick (the server's: advance the engine's epoch) there and then.
//!
//! The timer is armed only while the shard has a long runner (`fair_yield`), so a shard of short
//! invocations takes no signal at all. The handler is installed with `SA_RESTART` (syscalls that
//! can be restarted are) and `SA_ONSTACK` (it runs on the thread's alternate signal stack, which
//! Rust's threads and wasmtime both set up, and never on a guest's nearly full stack). The
//! syscalls that a signal still interrupts, epoll's and io_uring's waits, are ones monoio retries;
//! one that would fail instead (tmpfs's `fallocate`, which gives up on any pending signal) runs
//! inside [`ticks_held`].
//!
//! The timer stays armed while a long runner waits on something else (a kernel's completion, say):
//! the shard then takes up to one signal per slice for nothing, about one percent of its CPU.
//! Arming it only while a long runner is on the CPU would cost two `timer_settime` calls a slice.

use std::cell::Cell;
use std::io;
use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;
use std::time::Duration;

/// What the timer's signal runs. It must be async-signal-safe: an atomic add, say, and no lock,
/// allocation or I/O.
type Tick = Box<dyn Fn() + Send + Sync>;

/// The shortest period a timer takes: a signal costs its thread a microsecond or two, and at a
/// period near that the thread would do nothing but take them (`--guest-slice-us` has the same
/// floor).
pub const MIN_PERIOD: Duration = Duration::from_micros(10);

/// One timer of the calling thread's, disarmed until [`SliceTimer::arm`].
pub struct SliceTimer {
    timer: libc::timer_t,
    /// Owned: the pointer the timer's signals carry, freed in `drop` once none can be pending.
    tick: *mut Tick,
    period: Duration,
    armed: bool,
    /// The thread the signals go to, which alone may drop the timer (it drains them there).
    thread: libc::pid_t,
}

thread_local! {
    /// The tick of this thread's timer, while it has one: the handler runs a tick only if the
    /// signal's value is this pointer, so a signal of the same number queued by another process of
    /// the same user (`rt_sigqueueinfo` lets it choose the value) cannot make it call anything
    /// else. Const-initialised and without a destructor, so the handler's read of it is a plain
    /// thread-local load.
    static REGISTERED: Cell<*const Tick> = const { Cell::new(std::ptr::null()) };
}

/// The real-time signal the timers use: above the ones glibc keeps for itself (which
/// `SIGRTMIN()` already skips), and used by nothing else in this process.
fn signal() -> c_int {
    libc::SIGRTMIN() + 6
}

/// Installs the handler once per process; the error, where that failed, every time after.
fn install_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        // SAFETY: sigaction with a zeroed, then filled, struct; the previous action is read into
        // a second one.
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal(), std::ptr::null(), &mut previous) != 0 {
                return Err(io::Error::last_os_error().to_string());
            }
            if previous.sa_sigaction != libc::SIG_DFL {
                return Err(format!("signal {} already has a handler", signal()));
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal(), &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error().to_string());
            }
        }
        Ok(())
    });
    installed.clone().map_err(io::Error::other)
}

/// The signal handler: runs the tick whose pointer the timer's signal carries.
extern "C" fn on_signal(_signal: c_int, info: *mut libc::siginfo_t, _context: *mut c_void) {
    // SAFETY: the kernel hands the handler a valid siginfo. Every signal of this number comes from
    // a `SliceTimer` (the handler is ours, and only they raise it), whose value is its `tick`
    // pointer, alive until its `drop` has drained every signal still pending.
    unsafe {
        if (*info).si_code != libc::SI_TIMER {
            return;
        }
        let tick = (*info).si_value().sival_ptr as *const Tick;
        if !tick.is_null() && REGISTERED.with(Cell::get) == tick {
            (*tick)();
        }
    }
}

/// The set of the one signal the timers use.
fn signal_set() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t, then filled by sigemptyset and sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal());
        set
    }
}

/// Runs `f` with this thread's slice-timer signal held back: for a syscall that a signal would
/// make fail rather than restart. A tick that comes meanwhile runs when `f` returns.
pub fn ticks_held<T>(f: impl FnOnce() -> T) -> T {
    let set = signal_set();
    // SAFETY: the mask changed is this thread's own, and put back as it was.
    unsafe {
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous);
        let out = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        out
    }
}

impl SliceTimer {
    /// A timer for the calling thread that runs `tick` every `period` while armed; one per thread.
    pub fn new(period: Duration, tick: impl Fn() + Send + Sync + 'static) -> io::Result<Self> {
        if period < MIN_PERIOD {
            return Err(io::Error::other(format!("a slice timer's period is at least {MIN_PERIOD:?}, not {period:?}")));
        }
        if !REGISTERED.with(Cell::get).is_null() {
            return Err(io::Error::other("this thread already has a slice timer"));
        }
        install_handler()?;
        let tick: *mut Tick = Box::into_raw(Box::new(Box::new(tick) as Tick));
        // SAFETY: gettid has no preconditions.
        let thread = unsafe { libc::gettid() };
        // SAFETY: a zeroed sigevent is valid (its padding is private), then filled in.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = signal();
        event.sigev_value = libc::sigval { sival_ptr: tick.cast() };
        event.sigev_notify_thread_id = thread;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: both pointers are valid for the call.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            let error = io::Error::last_os_error();
            // SAFETY: from `Box::into_raw` above, and no timer carries it.
            drop(unsafe { Box::from_raw(tick) });
            return Err(error);
        }
        REGISTERED.with(|r| r.set(tick));
        Ok(SliceTimer { timer, tick, period, armed: false, thread })
    }

    /// Ticks every period from now on, if not already.
    pub fn arm(&mut self) {
        if !self.armed {
            self.set(self.period);
            self.armed = true;
        }
    }

    /// Stops ticking, if it was.
    pub fn disarm(&mut self) {
        if self.armed {
            self.set(Duration::ZERO);
            self.armed = false;
        }
    }

    /// First expiry after `period`, then every `period`; zero disarms.
    fn set(&self, period: Duration) {
        let spec = libc::timespec { tv_sec: period.as_secs() as libc::time_t, tv_nsec: period.subsec_nanos() as _ };
        let value = libc::itimerspec { it_interval: spec, it_value: spec };
        // SAFETY: a timer this struct created and has not deleted, and a valid itimerspec. It
        // fails only for an invalid timer or value, neither of which it can be given.
        let done = unsafe { libc::timer_settime(self.timer, 0, &value, std::ptr::null_mut()) };
        debug_assert_eq!(done, 0, "timer_settime: {}", io::Error::last_os_error());
    }
}

impl Drop for SliceTimer {
    /// Deletes the timer, then takes every one of its signals still pending before it frees what
    /// they point to: a real-time signal queued before `timer_delete` is still delivered after it.
    fn drop(&mut self) {
        // SAFETY: gettid has no preconditions.
        let on_its_thread = unsafe { libc::gettid() } == self.thread;
        ticks_held(|| {
            // SAFETY: the timer is ours and deleted once; sigtimedwait with a zero timeout only
            // takes what is already pending, of the one signal held back here.
            unsafe {
                libc::timer_delete(self.timer);
                if on_its_thread {
                    let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                    while libc::sigtimedwait(&signal_set(), std::ptr::null_mut(), &zero) >= 0 {}
                }
            }
            // Before the mask is put back: a signal the caller held back is then no longer this
            // timer's to run.
            if on_its_thread {
                REGISTERED.with(|r| r.set(std::ptr::null()));
            }
        });
        if on_its_thread {
            // SAFETY: from `Box::into_raw` in `new`; no signal can reach it any more.
            drop(unsafe { Box::from_raw(self.tick) });
        }
        // Off its thread a signal may still be pending there: the tick is left allocated rather
        // than freed under it (a few bytes, and no caller drops it elsewhere).
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::SliceTimer;

    /// Ticks reach a thread that never sleeps or makes a syscall, only while the timer is armed.
    #[test]
    fn ticks_interrupt_a_spinning_thread_only_while_armed() {
        let ticks = Arc::new(AtomicU64::new(0));
        let counted = ticks.clone();
        let mut timer = SliceTimer::new(Duration::from_micros(200), move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .expect("a slice timer");
        let spin = |d: Duration| {
            let until = Instant::now() + d;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        };
        spin(Duration::from_millis(20));
        assert_eq!(ticks.load(Ordering::Relaxed), 0, "ticked while disarmed");
        timer.arm();
        // Bounded: at most ten seconds of spinning for the first ticks.
        let started = Instant::now();
        while ticks.load(Ordering::Relaxed) < 3 && started.elapsed() < Duration::from_secs(10) {
            std::hint::spin_loop();
        }
        assert!(ticks.load(Ordering::Relaxed) >= 3, "no ticks reached the spinning thread");
        timer.disarm();
        let after = ticks.load(Ordering::Relaxed);
        spin(Duration::from_millis(20));
        // One expiry may have been on its way when it was disarmed.
        assert!(ticks.load(Ordering::Relaxed) <= after + 1, "ticked after it was disarmed");
        drop(timer);
    }

    /// A timer dropped while its signal is held back and pending: the tick never runs, neither
    /// at the drop nor when the signal is let through again.
    #[test]
    fn a_signal_pending_at_the_drop_runs_no_tick() {
        let ticks = Arc::new(AtomicU64::new(0));
        let counted = ticks.clone();
        let mut timer = SliceTimer::new(super::MIN_PERIOD, move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .expect("a slice timer");
        super::ticks_held(|| {
            timer.arm();
            let until = Instant::now() + Duration::from_millis(5);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            drop(timer);
        });
        let until = Instant::now() + Duration::from_millis(5);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        assert_eq!(ticks.load(Ordering::Relaxed), 0, "a tick ran for a timer that was dropped");
        // And the thread may have a timer again.
        drop(SliceTimer::new(super::MIN_PERIOD, || {}).expect("a second slice timer"));
    }

    /// A timer dropped while it fires as often as it may: no tick runs after the drop.
    #[test]
    fn dropping_an_armed_timer_takes_its_pending_signals() {
        for _ in 0..20 {
            let ticks = Arc::new(AtomicU64::new(0));
            let counted = ticks.clone();
            let mut timer = SliceTimer::new(super::MIN_PERIOD, move || {
                counted.fetch_add(1, Ordering::Relaxed);
            })
            .expect("a slice timer");
            timer.arm();
            let until = Instant::now() + Duration::from_millis(2);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            drop(timer);
            let after = ticks.load(Ordering::Relaxed);
            let until = Instant::now() + Duration::from_millis(2);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            assert_eq!(ticks.load(Ordering::Relaxed), after, "a tick ran after its timer was dropped");
        }
    }
}

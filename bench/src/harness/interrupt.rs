//! Ctrl-C and SIGTERM end a run early and cleanly: the measurement in progress stops within a
//! moment, [`Session`](super::session::Session)s are dropped as their errors unwind, and so what the
//! harness deployed on a live server is deleted and any server it started is stopped before it
//! exits. Killed outright instead, it would leave its `bench-*` functions on the live deployment.
//! A second signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status after an interrupted run, as a shell reports a process that SIGINT ended.
pub const EXIT_INTERRUPTED: i32 = 130;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Catches SIGINT and SIGTERM for the rest of the process's life. Call it before any thread
/// starts. The handlers do not restart system calls, so that a generator asleep in epoll wakes
/// to see the flag; the standard library retries its own interrupted reads, writes and sleeps.
pub fn catch_signals() -> std::io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is valid (no flags, empty mask) until filled in; the
        // handler only touches an atomic and may call `_exit`, both async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe; a second signal means "now".
        unsafe { libc::_exit(EXIT_INTERRUPTED) }
    }
}

/// Whether a signal asked the run to end.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// The error that unwinds an interrupted run; by the time it is printed, the drops have run.
pub const MESSAGE: &str =
    "interrupted; stopped started servers and deleted what it deployed (see above for anything it could not)";

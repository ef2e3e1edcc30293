//! The server process: start-up, the shards, and shutdown.
//!
//! [`run`] is three steps. [`start::start`] opens the data dir, builds the engine and its epoch
//! ticker, starts the catalog worker, binds one SO_REUSEPORT listener per shard and starts the
//! shards (each a pinned thread running a monoio executor); it returns a [`running::Running`],
//! the one owner of every thread it started. `run` then waits for SIGTERM or SIGINT, and
//! [`running::Running::drain`] stops and joins those threads in the order it states.

pub mod conn;
pub mod listener;
pub mod logging;
pub mod running;
pub mod shard;
pub mod start;

use std::fmt;

use crate::config::ServerConfig;

/// Why the server could not start or run.
#[derive(Debug)]
pub enum ServerError {
    /// The operator must fix a setting (exit status 2).
    Config(String),
    /// The environment failed us (exit status 1).
    Runtime(String),
}

impl ServerError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Config(_) => crate::config::EXIT_USAGE,
            ServerError::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Config(m) | ServerError::Runtime(m) => f.write_str(m),
        }
    }
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub fn run(config: ServerConfig) -> Result<(), ServerError> {
    ignore_file_size_signal();
    // Before any shard serves: a supervisor may send SIGTERM as soon as the port answers, and
    // until these handlers exist that signal kills the process without a drain.
    let termination = termination_signals()?;
    let running = start::start(&config)?;
    // A shard that failed to start ends the run at once: no wait, and no grace period.
    let started = running.wait_started();
    if started.is_ok() {
        running.announce();
        wait_for_termination(termination)?;
        tracing::info!("signal received: draining");
    }
    running.drain(started)
}

/// A file-size limit (RLIMIT_FSIZE) must surface as an EFBIG error, which the audit log's failure
/// policy handles, not as SIGXFSZ killing the process.
fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to "ignore" before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Catches SIGTERM and SIGINT from now on; a signal that arrives before the wait is kept for it.
fn termination_signals() -> Result<signal_hook::iterator::Signals, ServerError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| ServerError::Runtime(format!("cannot install signal handlers: {e}")))
}

/// Blocks until SIGTERM or SIGINT. A second SIGINT during the drain (an operator's second Ctrl-C)
/// exits at once; repeated SIGTERMs, which supervisors send, do not cut the drain short. The
/// thread that listens for them is the one thread no owner joins: it must outlive the drain, and
/// it holds the handlers until the process exits, so that a late SIGTERM never kills it.
fn wait_for_termination(mut signals: signal_hook::iterator::Signals) -> Result<(), ServerError> {
    use signal_hook::consts::SIGINT;
    let _ = signals.forever().next();
    std::thread::Builder::new()
        .name("tw-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGINT {
                    tracing::warn!("second interrupt: exiting without finishing the drain");
                    std::process::exit(130);
                }
            }
        })
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    Ok(())
}

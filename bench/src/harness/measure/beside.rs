//! The work that runs beside the load during a measurement: the deploy storm, and the progress
//! line.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::super::guests;
use super::super::load::Progress;
use super::super::scenario::deploy;
use super::super::target::Endpoint;
use super::{LatencySummary, StormReport};
use crate::histogram;

/// Deploys a fresh module and deletes it again, `rate` times a second, until `running` clears.
/// Deploys are paced, not open-loop: a slow one delays the next.
pub(super) fn storm(endpoint: &Endpoint, rate: f64, running: &AtomicBool) -> StormReport {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut latency = histogram();
    let (mut deploys, mut failed, mut first_error) = (0u64, 0u64, None);
    let start = Instant::now();
    let mut n = 0u64;
    while running.load(Ordering::Relaxed) {
        let due = start + period.mul_f64(n as f64);
        let now = Instant::now();
        if now < due {
            // Sleep in short slices so that the end of the load is noticed promptly.
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        n += 1;
        let t = Instant::now();
        let name = format!("bench-storm-{n}");
        match deploy(endpoint, &name, &guests::unique_hello(n)) {
            Ok(id) => {
                let _ = latency.record((t.elapsed().as_nanos() as u64).max(1));
                deploys += 1;
                if let Err(e) = endpoint.call("DELETE", &format!("/functions/{id}"), b"") {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
            Err(e) => {
                deploys += 1;
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    StormReport { deploys, failed, deploy_latency: LatencySummary::of(&latency), first_error }
}

/// A progress line on stderr, once a second: rewritten in place on a terminal, a line each
/// otherwise.
pub(super) fn report_progress(label: &str, total: Duration, progress: &Progress, running: &AtomicBool) {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut next = start + Duration::from_secs(1);
    while running.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        next += Duration::from_secs(1);
        let line = format!(
            "{label}: {:.0}/{:.0} s, {} answered, {} failed",
            start.elapsed().as_secs_f64().min(total.as_secs_f64()),
            total.as_secs_f64(),
            progress.answered.load(Ordering::Relaxed),
            progress.failed.load(Ordering::Relaxed),
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
}

//! A host too busy to compile, made on purpose: a server confined to one CPU and a thread that
//! keeps that CPU busy at normal priority. Beside it, a SCHED_IDLE thread on that CPU (the compile
//! child, at `--compile-priority idle`) gets a fraction of a percent of it.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Spins on `cpu` until dropped.
pub struct CpuHog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CpuHog {
    pub fn on(cpu: usize) -> CpuHog {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            confine(cpu).expect("confine the hog");
            while !stopped.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        CpuHog { stop, thread: Some(thread) }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Confines the command's process, and so every thread and child it starts, to `cpu`.
pub fn on_cpu(cmd: &mut Command, cpu: usize) {
    // SAFETY: between fork and exec only sched_setaffinity, with a set on the stack.
    unsafe { cmd.pre_exec(move || confine(cpu)) };
}

/// The highest-numbered CPU this thread may run on.
pub fn last_cpu() -> usize {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the calling thread's mask, into a set of the size given.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity: {}", std::io::Error::last_os_error());
    // SAFETY: CPU_ISSET only reads the set, below its size.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).max().expect("a CPU")
}

/// Confines the calling thread to `cpu`.
fn confine(cpu: usize) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the calling thread's mask, from a set of the size given.
    match unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

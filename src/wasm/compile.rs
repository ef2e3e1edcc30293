//! Compiling a tenant's module in a child process with a memory and a time budget.
//!
//! Cranelift's memory and time grow with a module's size and shape, and neither can be bounded
//! or interrupted from inside: a 5 MB module of a million empty functions took 98.7 s and
//! 5.8 GB, and 5.2 GB stayed resident in the server after it was deleted (the allocator keeps what
//! it freed). So a deploy's module is compiled by `tensor-wasm compile-guest`, this binary again,
//! under `RLIMIT_AS` (`--compile-memory-mb`) and a wall-clock deadline (`--compile-timeout-ms`),
//! and dies with its parent. What the compile takes is given back to the system when the child
//! exits; the server only deserializes the artifact. A child that runs out of either budget is
//! 400 `module_too_complex`.
//!
//! The child reads the module on stdin and writes `Engine::precompile_module`'s artifact on
//! stdout; the engine it compiles with has the server's compiler settings (`engine::base_config`),
//! so that the artifact loads into the server's engine, which checks that it does.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasmtime::{Engine, Module};

use super::engine::{compiler_engine, GuestProfiler};
use crate::config::CompilePriority;
use crate::error::ApiError;

/// The subcommand the child runs. Hidden from `--help`: it is the server's, not an operator's.
pub const SUBCOMMAND: &str = "compile-guest";

pub use crate::config::CompileBudget;

/// Exit status of a child whose module does not compile (its message is on stderr).
const EXIT_INVALID: i32 = 3;

/// The child's body: the module on stdin, the artifact on stdout.
pub fn child_main(profiler: GuestProfiler) -> i32 {
    // A compile outliving a killed server would hold the memory its budget is about. The parent
    // may already be gone by now: then so are we.
    // Whatever the server left open (a connection accepted without CLOEXEC, say) is not the
    // compiler's to hold: closed before anything else.
    // SAFETY: the close_range syscall on descriptors this process does not use.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let parent = std::os::unix::process::parent_id();
    // SAFETY: plain prctl on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if std::os::unix::process::parent_id() != parent || parent == 1 {
        return 1;
    }
    let mut wasm = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut wasm) {
        eprintln!("cannot read the module: {e}");
        return 1;
    }
    let engine = match compiler_engine(profiler) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("cannot build the engine: {e:#}");
            return 1;
        }
    };
    match engine.precompile_module(&wasm) {
        // Flushed here, checked: an exit after a short write must not pass for a whole artifact.
        Ok(artifact) => match std::io::stdout().lock().write_all(&artifact).and_then(|()| std::io::stdout().flush()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("cannot write the artifact: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("{e:#}");
            EXIT_INVALID
        }
    }
}

/// Puts the child's one thread below the shards, as `priority` says.
fn lower_priority(pid: libc::pid_t, priority: CompilePriority) -> std::io::Result<()> {
    // SAFETY: both calls only change our own child's scheduling; the parameters are plain data.
    let rc = unsafe {
        match priority {
            CompilePriority::Idle => {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(pid, libc::SCHED_IDLE, &param)
            }
            CompilePriority::Nice(nice) => libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice),
        }
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Compiles `wasm` in a child process within `budget`, and loads the artifact into `engine`.
pub fn compile_in_child(
    engine: &Engine,
    wasm: &[u8],
    budget: CompileBudget,
    profiler: GuestProfiler,
) -> Result<Module, ApiError> {
    // The running binary's inode, also after an upgrade renamed another over its path.
    let mut command = Command::new("/proc/self/exe");
    command.arg(SUBCOMMAND).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Nothing of the server's environment (its tokens among it) reaches the compiler. glibc
    // reserves 64 MiB of address space per malloc arena, one per thread up to 8 per CPU; under an
    // address-space limit those reservations, not the compile, would run out first.
    command.env_clear().env("MALLOC_ARENA_MAX", "2").current_dir("/");
    if profiler == GuestProfiler::PerfMap {
        command.arg("--guest-perf-map");
    }
    // No `pre_exec`: with one, std forks the whole server (its page tables, every guest's memory)
    // instead of spawning. The limit is set on the child before it is sent the module, and it
    // reads all of the module before it allocates for compiling.
    let mut child = command.spawn().map_err(|e| ApiError::Internal(format!("cannot start the compiler: {e}")))?;
    let limit = libc::rlimit { rlim_cur: budget.memory_bytes, rlim_max: budget.memory_bytes };
    // SAFETY: prlimit on our own child, with a valid rlimit and no old-value pointer.
    if unsafe { libc::prlimit(child.id() as libc::pid_t, libc::RLIMIT_AS, &limit, std::ptr::null_mut()) } != 0 {
        let e = std::io::Error::last_os_error();
        let _ = child.kill();
        let _ = child.wait();
        return Err(ApiError::Internal(format!("cannot limit the compiler's memory: {e}")));
    }
    // Before it is sent the module, so before its compile threads exist: they inherit it (policy
    // and nice value are per thread on Linux).
    if let Err(e) = lower_priority(child.id() as libc::pid_t, budget.priority) {
        tracing::warn!("cannot lower the compiler's priority: {e}");
    }
    let started = Instant::now();
    let (mut stdin, mut stdout, mut stderr) =
        (child.stdin.take().expect("piped"), child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let artifact = std::thread::scope(|scope| {
        // Both pipes are drained by threads of their own, so that neither side blocks the other.
        let writer = scope.spawn(move || {
            let _ = stdin.write_all(wasm);
        });
        let reader = scope.spawn(move || {
            let mut out = Vec::new();
            stdout.read_to_end(&mut out).map(|_| out)
        });
        let errors = scope.spawn(move || {
            let mut out = Vec::new();
            // The message of a module that does not compile; capped, the rest read and dropped so
            // that the child never fails on a closed pipe.
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut out);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            out
        });
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if started.elapsed() >= budget.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let _ = writer.join();
        let artifact = reader.join().unwrap_or_else(|_| Err(std::io::Error::other("reader panicked")));
        (status, artifact, errors.join().unwrap_or_default())
    });
    let (status, artifact, errors) = artifact;
    let errors = String::from_utf8_lossy(&errors);
    let Some(status) = status else {
        return Err(ApiError::CompileTimeout { timeout_ms: budget.timeout.as_millis() as u64 });
    };
    let artifact = match (status.code(), artifact) {
        (Some(0), Ok(artifact)) => artifact,
        (Some(0), Err(e)) => return Err(ApiError::Internal(format!("cannot read the compiled artifact: {e}"))),
        (_, _) => Vec::new(),
    };
    match status.code() {
        Some(0) => {}
        Some(EXIT_INVALID) => return Err(ApiError::InvalidModule(errors.trim().to_string())),
        // Out of address space: Rust reports the failed allocation and aborts; a thread the
        // compiler could not start fails the same way.
        _ if errors.contains("memory allocation") || errors.contains("failed to spawn") || status.code().is_none() => {
            return Err(ApiError::ModuleTooComplex(format!(
                "compiling it needed more than --compile-memory-mb ({} MiB)",
                budget.memory_bytes / (1024 * 1024)
            )));
        }
        _ => {
            // Its stderr stays in the log: paths and panic text are not for the client.
            tracing::error!(%status, stderr = %errors.trim().escape_debug(), "the compile child failed");
            return Err(ApiError::Internal("the compiler failed; the server's log says why".into()));
        }
    }
    // SAFETY: the bytes are what this binary, run as our child, wrote after a successful compile;
    // wasmtime checks that they were made for this engine's settings before it maps the code. The
    // child is a resource boundary, not a security one: a compiler bug that let a module take
    // over the child could hand back code of its choosing, as it could in-process.
    unsafe { Module::deserialize(engine, &artifact) }
        .map_err(|e| ApiError::Internal(format!("the compiled artifact does not load: {e:#}")))
}

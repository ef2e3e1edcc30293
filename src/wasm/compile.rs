//! Compiling a tenant's module in a child process with a memory and a time budget.
//!
//! Cranelift's memory and time grow with a module's size and shape, and neither can be bounded
//! or interrupted from inside: a 5 MB module of a million empty functions took 98.7 s and
//! 5.8 GB, and 5.2 GB stayed resident in the server after it was deleted (the allocator keeps what
//! it freed). So a deploy's module is compiled by `tensor-wasm compile-guest`, this binary again,
//! under `RLIMIT_AS` (`--compile-memory-mb`) and a budget of CPU time (`--compile-timeout-ms`),
//! and dies with its parent. What the compile takes is given back to the system when the child
//! exits; the server only deserializes the artifact. A child that runs out of either budget is
//! 400 `module_too_complex`.
//!
//! The child runs below the shards' priority (`--compile-priority`, SCHED_IDLE by default), so a
//! busy host may leave it little CPU: that is why its budget is CPU time, not wall-clock time,
//! which would refuse a module for the host's load. A wall-clock backstop
//! (`--compile-wall-timeout-ms`) still bounds how long a deploy waits; past it the deploy gets
//! 503, since a later try may find the CPU the compile needs.
//!
//! The child reads the module on stdin and writes `Engine::precompile_module`'s artifact on
//! stdout; the engine it compiles with has the server's compiler settings (`engine::base_config`),
//! so that the artifact loads into the server's engine, which checks that it does.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use wasmtime::{Engine, Module};

use super::engine::compiler_engine;
use crate::config::{CompilePriority, GuestProfiler};
use crate::error::ApiError;
use crate::runtime::cpu::cpu_time_from_stat;

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
    let wasm = match super::bulk_memory::prepare(&engine, &wasm) {
        Ok(wasm) => wasm,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_INVALID;
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

/// Compiles `wasm` in a child process within `budget`, and loads the artifact into `engine`.
pub fn compile_in_child(
    engine: &Engine,
    wasm: &[u8],
    budget: CompileBudget,
    profiler: GuestProfiler,
) -> Result<Module, ApiError> {
    let mut child = spawn(profiler)?;
    // Before it is sent the module, so before its compile threads exist: they inherit its
    // scheduling (per thread on Linux), and its limits hold for all of them (per process).
    let pid = child.id() as libc::pid_t;
    if let Err(e) = limit(pid, &budget) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ApiError::Internal(format!("cannot limit the compiler: {e}")));
    }
    if let Err(e) = lower_priority(pid, budget.priority) {
        tracing::warn!("cannot lower the compiler's priority: {e}");
    }
    let (ending, artifact, errors) = run(&mut child, wasm, &budget);
    let ending = ending.map_err(|e| ApiError::Internal(format!("cannot wait for the compiler: {e}")))?;
    let artifact = judge(ending, artifact, &String::from_utf8_lossy(&errors), &budget)?;
    // SAFETY: the bytes are what this binary, run as our child, wrote after a successful compile;
    // wasmtime checks that they were made for this engine's settings before it maps the code. The
    // child is a resource boundary, not a security one: a compiler bug that let a module take
    // over the child could hand back code of its choosing, as it could in-process.
    unsafe { Module::deserialize(engine, &artifact) }
        .map_err(|e| ApiError::Internal(format!("the compiled artifact does not load: {e:#}")))
}

/// Starts the child, its three pipes open.
fn spawn(profiler: GuestProfiler) -> Result<Child, ApiError> {
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
    // instead of spawning. The limits are set on the child before it is sent the module, and it
    // reads all of the module before it allocates for compiling.
    command.spawn().map_err(|e| ApiError::Internal(format!("cannot start the compiler: {e}")))
}

/// The limits the kernel enforces on the child whatever this process does. Its address space.
/// Its CPU time, as a backstop to `watch`, which holds the budget to the clock tick but only
/// while it can read the child's count: `RLIMIT_CPU` counts whole seconds, so one past the budget
/// rounded up, where SIGXCPU ends the child and says why in its exit status, and SIGKILL a second
/// later for a child that outlived that. And no core file: a child ended by its limits holds
/// nothing but the compile, up to `--compile-memory-mb` of it.
fn limit(pid: libc::pid_t, budget: &CompileBudget) -> std::io::Result<()> {
    let cpu_seconds = budget.cpu.as_millis().div_ceil(1000) as u64 + 1;
    for (resource, soft, hard) in [
        (libc::RLIMIT_AS, budget.memory_bytes, budget.memory_bytes),
        (libc::RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (libc::RLIMIT_CORE, 0, 0),
    ] {
        let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        // SAFETY: prlimit on our own child, with a valid rlimit and no old-value pointer.
        if unsafe { libc::prlimit(pid, resource, &limit, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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
            CompilePriority::Inherit => 0,
        }
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// How a compile child ended.
enum Ending {
    Exited(ExitStatus),
    /// Killed for using up its CPU budget, by `watch` or by the kernel (SIGXCPU).
    OutOfCpu,
    /// Killed at the wall-clock backstop, its CPU budget not used up.
    Starved,
}

/// Sends the child the module and waits for it within the budget, while threads of their own
/// drain its stdout (the artifact) and its stderr (the message of a module that does not
/// compile), so that neither side blocks the other.
fn run(
    child: &mut Child,
    wasm: &[u8],
    budget: &CompileBudget,
) -> (std::io::Result<Ending>, std::io::Result<Vec<u8>>, Vec<u8>) {
    let (mut stdin, mut stdout, mut stderr) =
        (child.stdin.take().expect("piped"), child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || {
            let _ = stdin.write_all(wasm);
        });
        let reader = scope.spawn(move || {
            let mut out = Vec::new();
            stdout.read_to_end(&mut out).map(|_| out)
        });
        let errors = scope.spawn(move || {
            let mut out = Vec::new();
            // Capped, the rest read and dropped so that the child never fails on a closed pipe.
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut out);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            out
        });
        let ending = watch(child, budget);
        let _ = writer.join();
        let artifact = reader.join().unwrap_or_else(|_| Err(std::io::Error::other("reader panicked")));
        (ending, artifact, errors.join().unwrap_or_default())
    })
}

/// Waits for the child, and kills it once it has used its CPU budget (every thread of it
/// together, as the kernel counts it in `/proc`) or, short of that, once the wall-clock backstop
/// has passed. The child is reaped either way.
fn watch(child: &mut Child, budget: &CompileBudget) -> std::io::Result<Ending> {
    let started = Instant::now();
    let stat = format!("/proc/{}/stat", child.id());
    loop {
        let exited = child.try_wait().inspect_err(|_| {
            let _ = child.kill();
            let _ = child.wait();
        })?;
        if let Some(status) = exited {
            return Ok(match status.signal() {
                Some(libc::SIGXCPU) => Ending::OutOfCpu,
                _ => Ending::Exited(status),
            });
        }
        let cpu = std::fs::read_to_string(&stat).ok().and_then(|text| cpu_time_from_stat(&text));
        let ending = match cpu {
            Some(cpu) if cpu >= budget.cpu => Some(Ending::OutOfCpu),
            _ if started.elapsed() >= budget.wall => Some(Ending::Starved),
            _ => None,
        };
        if let Some(ending) = ending {
            let _ = child.kill();
            child.wait()?;
            return Ok(ending);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The artifact of a child that compiled the module, or the error its ending means.
fn judge(
    ending: Ending,
    artifact: std::io::Result<Vec<u8>>,
    errors: &str,
    budget: &CompileBudget,
) -> Result<Vec<u8>, ApiError> {
    let status = match ending {
        Ending::OutOfCpu => return Err(ApiError::CompileTimeout { timeout_ms: budget.cpu.as_millis() as u64 }),
        Ending::Starved => return Err(ApiError::CompileStarved { wall_ms: budget.wall.as_millis() as u64 }),
        Ending::Exited(status) => status,
    };
    match status.code() {
        Some(0) => artifact.map_err(|e| ApiError::Internal(format!("cannot read the compiled artifact: {e}"))),
        Some(EXIT_INVALID) => Err(ApiError::InvalidModule(errors.trim().to_string())),
        // Out of address space: Rust reports the failed allocation and aborts; a thread the
        // compiler could not start fails the same way.
        _ if errors.contains("memory allocation") || errors.contains("failed to spawn") || status.code().is_none() => {
            Err(ApiError::ModuleTooComplex(format!(
                "compiling it needed more than --compile-memory-mb ({} MiB)",
                budget.memory_bytes / (1024 * 1024)
            )))
        }
        _ => {
            // Its stderr stays in the log: paths and panic text are not for the client.
            tracing::error!(%status, stderr = %errors.trim().escape_debug(), "the compile child failed");
            Err(ApiError::Internal("the compiler failed; the server's log says why".into()))
        }
    }
}

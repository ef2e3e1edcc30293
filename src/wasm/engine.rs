use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, ModuleVersionStrategy, PoolingAllocationConfig};

use crate::config::{GuestProfiler, Limits};

/// The one engine of the process: async (guests yield to their shard), epoch interruption
/// (deadlines without a timer per request), and the pooling allocator with copy-on-write memory
/// images (an instantiation is a few microseconds).
pub fn build_engine(limits: &Limits, profiler: GuestProfiler) -> wasmtime::Result<Engine> {
    let mut config = base_config(profiler);

    // A recycled memory slot is reset in place, page by page, rather than unmapped, so that the next
    // guest touches it without page faults. With PAGEMAP_SCAN (Linux 6.7+) only the pages the last
    // guest dirtied are reset, wherever they are, up to `keep_resident` bytes; without it the lowest
    // `keep_resident` bytes are memset whether dirty or not, so the window must stay small.
    // Measured: a Rust JSON guest (tests/guests/json-stats, whose stack and heap sit above 1 MiB)
    // cost 107 µs of server CPU per request with a 16 KiB window and 83 to 89 µs with 1 MiB and
    // scanning (tensor-wasm-bench, json scenario at 8,000/s); without scanning, the echo guest
    // (bench/benches/instantiate.rs) gave 8.3 µs per invoke at 0 KiB, 3.6 µs at 16 KiB and 4.9 µs
    // at 64 KiB.
    let scan = pagemap_scan_supported() && !swap_possible();
    let keep_resident = if scan { 1024 * 1024 } else { 16 * 1024 };
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(limits.max_instances)
        .total_memories(limits.max_instances)
        .total_tables(limits.max_instances)
        .total_stacks(limits.max_instances)
        .max_memories_per_module(crate::config::ModuleShape::MAX_MEMORIES as u32)
        .max_tables_per_module(crate::config::ModuleShape::MAX_TABLES as u32)
        .table_elements(limits.module_shape.max_table_elements)
        .max_memory_size(limits.max_memory_limit_mb as usize * 1024 * 1024)
        .linear_memory_keep_resident(keep_resident)
        .table_keep_resident(16 * 1024)
        .pagemap_scan(if scan { wasmtime::Enabled::Yes } else { wasmtime::Enabled::No });
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// Names what this runtime changes in a module before wasmtime compiles it; part of every
/// artifact's version string. Change it whenever that changes, so that no artifact compiled
/// before is served again.
pub const CODE_REVISION: &str = "tensor-wasm.interruptible-bulk-memory.1";

/// What decides how guest code is compiled; the server's engine and the compile child's
/// (`wasm::compile`) share it, so that the child's artifacts load into the server.
fn base_config(profiler: GuestProfiler) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.memory_init_cow(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // What an artifact's code was made from is not only wasmtime's version: its bulk-memory
    // instructions were rewritten (`bulk_memory`). wasmtime refuses an artifact whose version string
    // differs, so a store's artifacts from before the rewrite are compiled again at start-up
    // (`functions::loader`) rather than served with instructions a deadline cannot stop.
    let version = format!("{}+{CODE_REVISION}", ModuleVersionStrategy::WasmtimeVersion.as_str());
    config.module_version(ModuleVersionStrategy::Custom(version)).expect("a version string of a few bytes");
    config.profiler(match profiler {
        GuestProfiler::Off => wasmtime::ProfilingStrategy::None,
        GuestProfiler::PerfMap => wasmtime::ProfilingStrategy::PerfMap,
    });
    config
}

/// An engine that only compiles: the server's compiler settings without its instance pool, whose
/// address-space reservation would not fit the compile child's memory budget.
pub fn compiler_engine(profiler: GuestProfiler) -> wasmtime::Result<Engine> {
    Engine::new(&base_config(profiler))
}

/// Whether this process's memory may be swapped out. wasmtime 48's PAGEMAP_SCAN reset finds the
/// pages a guest dirtied by their being present: a dirtied page that was swapped out is neither
/// reset nor decommitted, and the next guest in the slot, perhaps another tenant's, would read it
/// (bytecodealliance/wasmtime#14357). So the scan is used only where nothing can be swapped: no
/// swap at all, or a cgroup v2 `memory.swap.max` of 0. Swap turned on after start-up is not seen;
/// docs/CONFIG.md says to restart then.
fn swap_possible() -> bool {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let swap_max = cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .and_then(|path| std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.swap.max", path.trim_end())).ok());
    swap_possible_from(&meminfo, swap_max.as_deref())
}

/// `swap_possible` from `/proc/meminfo` and the cgroup's `memory.swap.max`: in doubt (either
/// unreadable), possible.
fn swap_possible_from(meminfo: &str, swap_max: Option<&str>) -> bool {
    let swap_total_kb = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("SwapTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    swap_total_kb != Some(0) && swap_max.map(str::trim) != Some("0")
}

/// Whether the kernel has the PAGEMAP_SCAN ioctl: Linux 6.7 or newer.
fn pagemap_scan_supported() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

/// Guest slices the ticker keeps ticking fast after it last saw a guest take a turn.
const BUSY_TICKS_AFTER_A_TURN: u32 = 8;

/// The process's single epoch ticker: one thread that advances the engine's epoch. Every store's
/// deadline and yield point is measured in these ticks.
///
/// It ticks every `idle_tick` while no guest is taking turns with other work on its shard, and
/// every `busy_tick` (the guest slice) while one is on a shard whose own slice timer
/// (`runtime::slice_timer`) could not be made (`fair_yield::guests_took_turns`). A guest
/// yields at the first tick after it started or resumed, so the tick is how long a ready
/// connection waits behind a spinning guest: at a millisecond, a bystander's P99 beside spinners
/// was 20 times its quiet P99 (perf/HOSTILE.md). Ticking that fast always would cost an idle
/// server ten thousand wake-ups a second; only invocations that run across several ticks count,
/// so a server of short invocations stays on the idle tick.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: Engine, idle_tick: Duration, busy_tick: Duration) -> std::io::Result<Self> {
        assert!(busy_tick <= idle_tick, "the guest slice is at most the idle tick");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("tw-epoch".into()).spawn(move || {
            // The kernel may add up to the thread's timer slack (50 µs by default) to each sleep:
            // half of a 100 µs slice. One microsecond keeps the slice what it says.
            // SAFETY: prctl on the calling thread with an integer argument.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000u64) };
            ask_for_short_slices(busy_tick);
            // Busy ticks left: a guest yields at most every other tick (it is owed a whole slice
            // after it was let go), so one tick without a yield does not mean that none wait.
            let mut busy_ticks_left = 0u32;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(if busy_ticks_left > 0 { busy_tick } else { idle_tick });
                engine.increment_epoch();
                if crate::runtime::fair_yield::guests_took_turns() {
                    busy_ticks_left = BUSY_TICKS_AFTER_A_TURN;
                } else {
                    busy_ticks_left = busy_ticks_left.saturating_sub(1);
                }
            }
        })?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

/// Asks the kernel for scheduler slices of `slice` for the calling thread (Linux 6.12 or newer,
/// where EEVDF honours `sched_attr.sched_runtime` for ordinary threads; older kernels ignore it).
///
/// The ticker shares CPUs with shards, and a shard whose guests spin never sleeps. EEVDF lets a
/// running thread finish its slice (a few milliseconds) before a thread that woke takes the CPU,
/// unless the woken one asked for a shorter slice: without this, a tick waited behind the
/// spinning shard on its CPU, and every guest slice was milliseconds long whatever
/// `--guest-slice-us` said (perf/HOSTILE.md). A shorter slice changes neither the thread's
/// priority nor its share of the CPU, so it needs no privilege.
fn ask_for_short_slices(slice: Duration) {
    /// `struct sched_attr` of sched_setattr(2), as far as `SCHED_OTHER` uses it.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime_ns: u64,
        deadline_ns: u64,
        period_ns: u64,
    }
    let size = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr =
        SchedAttr { size, policy: 0, flags: 0, nice: 0, priority: 0, runtime_ns: 0, deadline_ns: 0, period_ns: 0 };
    // SAFETY: sched_getattr on the calling thread into a sized attribute.
    if unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, size, 0u32) } != 0 {
        return;
    }
    // Policy, nice and priority as they are (changed, they could need privilege): only an
    // ordinary thread's slice, and not a real-time one's, which the operator chose.
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return;
    }
    attr.size = size;
    attr.flags = 0;
    // The kernel clamps it to between 0.1 and 100 ms.
    attr.runtime_ns = slice.as_nanos() as u64;
    // SAFETY: sched_setattr on the calling thread (pid 0) with a valid, sized attribute.
    if unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) } != 0 {
        tracing::debug!("the epoch ticker keeps the default scheduler slice: {}", std::io::Error::last_os_error());
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::swap_possible_from;

    #[test]
    fn pagemap_scanning_only_where_nothing_can_be_swapped() {
        let none = "MemTotal:       24000000 kB\nSwapTotal:             0 kB\n";
        let some = "MemTotal:       24000000 kB\nSwapTotal:       8388604 kB\n";
        assert!(!swap_possible_from(none, None));
        assert!(!swap_possible_from(none, Some("max\n")));
        assert!(swap_possible_from(some, None));
        assert!(swap_possible_from(some, Some("max\n")));
        assert!(swap_possible_from(some, Some("1073741824\n")));
        // The cgroup may not swap, whatever the host has.
        assert!(!swap_possible_from(some, Some("0\n")));
        // Unreadable: in doubt, possible.
        assert!(swap_possible_from("", None));
    }
}

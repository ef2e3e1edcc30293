use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::config::Limits;

/// The one engine of the process: async (guests yield to their shard), epoch interruption
/// (deadlines without a timer per request), and the pooling allocator with copy-on-write memory
/// images (an instantiation is a few microseconds).
pub fn build_engine(limits: &Limits) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.memory_init_cow(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);

    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(limits.max_instances)
        .total_memories(limits.max_instances)
        .total_tables(limits.max_instances)
        .total_stacks(limits.max_instances)
        .max_memories_per_module(1)
        .max_tables_per_module(4)
        .max_memory_size(limits.max_memory_limit_mb as usize * 1024 * 1024)
        // The first pages of a recycled slot are zeroed in place rather than unmapped, so a small
        // guest touches them without page faults. Measured (bench/benches/instantiate.rs, echo
        // guest): 0 KiB 8.3 µs, 16 KiB 3.6 µs, 64 KiB 4.9 µs per invoke at P50; the memset of a
        // larger window costs more than the faults it saves.
        .linear_memory_keep_resident(16 * 1024)
        .table_keep_resident(16 * 1024);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// The process's single epoch ticker: one thread that advances the engine's epoch every tick.
/// Every store's deadline and yield point is measured in these ticks.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: Engine, tick: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("tw-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                engine.increment_epoch();
            }
        })?;
        Ok(EpochTicker { stop, thread: Some(thread) })
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

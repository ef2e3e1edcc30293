//! The validated server configuration. Every limit the server enforces is named here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod registry;
mod sink_networks;

/// Exit status for a bad flag, env var or start-up condition the operator must fix.
pub const EXIT_USAGE: i32 = 2;

pub use registry::{NatsConfig, RegistryConfig};
pub use sink_networks::SinkNetworks;

use crate::audit::AuditConfig;
use crate::auth::AuthConfig;
use crate::tls::TlsFiles;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDriverChoice {
    /// io_uring, falling back to epoll where it cannot be set up.
    Auto,
    /// io_uring only: start-up fails where it cannot be set up.
    IoUring,
    /// epoll only.
    Epoll,
}

/// No `Debug`: it holds secrets.
#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None`: one shard per CPU in the allowed set, at most the cgroups' CPU limit.
    pub shards: Option<usize>,
    pub pin_shards: crate::runtime::cpu::PinShards,
    pub data_dir: PathBuf,
    pub io_driver: IoDriverChoice,
    /// How long a shard keeps polling without sleeping after a request (`--idle-spin-us`); zero:
    /// it parks as soon as it has nothing to do.
    pub idle_spin: std::time::Duration,
    pub drain_grace_ms: u64,
    pub drain_timeout_ms: u64,
    pub admin_queue_depth: usize,
    /// The share of that queue one tenant's jobs may hold.
    pub admin_queue_depth_per_tenant: usize,
    /// The functions directory to load and watch, if any.
    pub functions_dir: Option<DirectoryConfig>,
    /// Where the catalog lives: the data dir, or a NATS JetStream shared by a fleet.
    pub registry: RegistryConfig,
    /// Threads delivering pipeline outputs to sinks, and deliveries that may wait for one.
    pub sink_workers: usize,
    pub sink_queue_depth: usize,
    /// Deliveries one tenant may have queued or running, fewer than `sink_workers`.
    pub sink_max_inflight_per_tenant: u32,
    /// How long a delivery may take from being queued, attempts and backoff included.
    pub sink_max_delivery_ms: u64,
    /// Kernel dispatch; its `shards` is set when the shard count is known.
    pub dispatch: tensor_wasm_dispatch::DispatchConfig,
    pub auth: AuthConfig,
    pub audit: AuditConfig,
    /// `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Whether the engine names compiled guest code for `perf` (`--guest-perf-map`).
    pub guest_profiler: GuestProfiler,
    pub limits: Limits,
}

/// Whether the engine tells a profiler the names of the guest code it compiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestProfiler {
    Off,
    /// perf reads /tmp/perf-PID.map to name JIT code; without it a guest is bare addresses under
    /// `catch_traps`. The map grows by a line per function of every module compiled and is never
    /// trimmed, so it is for profiling sessions, not for production.
    PerfMap,
}

/// Limits shared read-only by every shard.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest body of a control-plane request: a deploy (the module, base64-encoded, with its
    /// settings) or a pipeline's definition.
    pub max_body_bytes: u64,
    /// The largest body of an invoke, of a function or a pipeline.
    pub max_invoke_body_bytes: u64,
    /// Most body bytes one shard holds for requests in flight, whatever their routes; past it,
    /// 503 `overloaded`.
    pub max_inflight_body_bytes: u64,
    /// The share of that one tenant's requests may hold; past it, 429 `inflight_body_limited`.
    pub max_inflight_body_bytes_per_tenant: u64,
    /// Functions one tenant may deploy through the API; past it, 403 `quota_exceeded`.
    pub max_functions_per_tenant: u32,
    /// Bytes of modules, artifacts and tensor files one tenant's functions may take; past it, 403
    /// `quota_exceeded`.
    pub max_storage_bytes_per_tenant: u64,
    /// The largest safetensors file one function carries (`tensors_b64`, `NAME.safetensors`).
    pub max_function_tensors_bytes: u64,
    /// Elements one tensor may have (`--max-tensor-elements`): a function's tensors too.
    pub max_tensor_elements: u64,
    /// Free bytes a deploy must leave on the data dir's file system, for the audit log; past it,
    /// 507 `insufficient_storage`.
    pub audit_reserve_bytes: u64,
    /// What a deploy's compile may take, in a child process that runs this process's own binary
    /// (`wasm::compile`). `None`: compile in-process, for a program other than `tensor-wasm` that
    /// embeds the catalog (a benchmark), whose binary has no compile subcommand.
    pub compile_budget: Option<CompileBudget>,
    /// Threads that load stored modules at start-up, and compile a functions directory's new
    /// modules, side by side (`functions::loader`).
    pub load_threads: usize,
    /// What a module may be before it is compiled (`wasm::module::check_shape`).
    pub module_shape: ModuleShape,
    /// Most invocations one tenant may run at once in the process, split over the shards; past
    /// it, 429 `concurrency_limited`.
    pub max_concurrent_per_tenant: u32,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub linger_ms: u64,
    pub max_connections: usize,
    pub max_instances: u32,
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub default_memory_limit_mb: u32,
    pub max_memory_limit_mb: u32,
    pub max_output_bytes: usize,
    pub max_stderr_bytes: usize,
    pub epoch_tick_ms: u64,
    /// How long a guest runs before it yields to its shard's other work while guests take turns
    /// there: the epoch ticker's period then (`wasm::engine::EpochTicker`).
    pub guest_slice_us: u64,
    /// Where pipeline sinks may be delivered to.
    pub sink_networks: SinkNetworks,
}

impl Limits {
    pub fn guest_slice(&self) -> Duration {
        Duration::from_micros(self.guest_slice_us)
    }
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
}

/// The functions directory the worker watches.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    pub root: PathBuf,
    /// How often it is listed: changes are live within this, plus a compile.
    pub poll: Duration,
}

/// How much one compile may take.
#[derive(Clone, Copy, Debug)]
pub struct CompileBudget {
    /// The child's address-space limit, in bytes.
    pub memory_bytes: u64,
    /// CPU time, every thread of the child together: what the module costs to compile, whatever
    /// else the host runs. Past it the module is too complex.
    pub cpu: Duration,
    /// Wall-clock time: a backstop for a compile the host leaves too little CPU to finish, which
    /// a later try may not be.
    pub wall: Duration,
    /// How the child is scheduled beside the shards.
    pub priority: CompilePriority,
}

/// How the compile child is scheduled. A compile takes a CPU for seconds; below the shards'
/// priority it leaves them the CPU whenever they have requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompilePriority {
    /// SCHED_IDLE: the child runs only on CPU time no other thread wants.
    Idle,
    /// The normal policy at this nice value (0 to 19): the child shares the CPU, at a weight
    /// below the shards'.
    Nice(i32),
    /// The server's own policy and nice value, unchanged: for the operator's modules (the
    /// functions directory), which are not a tenant's to deprioritise. Not an operator's choice.
    Inherit,
}

impl CompilePriority {
    /// `--compile-priority`: `idle`, or a nice value from 0 to 19.
    ///
    /// ```
    /// use tensor_wasm::settings::CompilePriority;
    /// assert_eq!(CompilePriority::parse("idle"), Ok(CompilePriority::Idle));
    /// assert_eq!(CompilePriority::parse("10"), Ok(CompilePriority::Nice(10)));
    /// assert!(CompilePriority::parse("20").is_err() && CompilePriority::parse("-1").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<CompilePriority, String> {
        match text {
            "idle" => Ok(CompilePriority::Idle),
            _ => match text.parse::<i32>() {
                Ok(nice @ 0..=19) => Ok(CompilePriority::Nice(nice)),
                _ => Err(format!("`{text}` is neither `idle` nor a nice value from 0 to 19")),
            },
        }
    }
}

/// How large a module may be where compiling costs, or where the instance pool has room: what is
/// checked before compiling. A 5 MB module of a million empty functions took Cranelift 98.7 s and
/// 5.8 GB; each limit is a configured flag with its own 400 kind.
#[derive(Clone, Copy, Debug)]
pub struct ModuleShape {
    /// Functions the module defines (imports aside).
    pub max_functions: u32,
    /// Bytes of the code section, every body together.
    pub max_code_bytes: u64,
    /// Bytes of the largest function body.
    pub max_function_body_bytes: u32,
    /// Elements one guest table may have (`--max-table-elements`): a table that starts larger is
    /// refused with the shape; it is also the instance pool's reservation per table, and the cap
    /// on `table.grow`.
    pub max_table_elements: usize,
    /// Bytes a guest memory may have (`--max-memory-limit-mb`): a memory that starts larger is
    /// refused with the shape, since no pooled memory slot holds it.
    pub max_memory_limit_mb: u32,
}

impl ModuleShape {
    /// Tables one instance slot of the pool holds: a module that defines more is refused with
    /// the shape. Four leaves room for what toolchains emit (one, for indirect calls).
    pub const MAX_TABLES: usize = 4;
    /// Memories one instance slot holds: one, the guest's linear memory.
    pub const MAX_MEMORIES: usize = 1;
}

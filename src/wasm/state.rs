//! The store's data: what one invocation's guest sees as its process (stdio, args, limits) and,
//! for functions that import `tensor_wasm`, its tensor context. `invoke`, `wasi` and `tensor` all
//! name it, and it names none of them, so that they need not name each other for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tensor_wasm_dispatch::{status, Dispatcher, Pending, Resident, Session, Weights};
use wasmtime::ResourceLimiter;

use crate::metrics::ShardMetrics;

/// Why a host function stopped the guest. Carried out of wasmtime as its error, then classified.
#[derive(Debug)]
pub enum GuestStop {
    /// `proc_exit(code)`.
    Exit(i32),
    /// Stdout passed its cap.
    OutputCap,
    /// Memory growth past the function's cap.
    MemoryCap,
    /// The export call named no function export.
    ExportNotFound(String),
    /// The export call's arguments or results do not fit.
    ExportArgs(String),
}

impl std::fmt::Display for GuestStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestStop::Exit(code) => write!(f, "guest exited with code {code}"),
            GuestStop::OutputCap => write!(f, "stdout cap reached"),
            GuestStop::MemoryCap => write!(f, "memory cap reached"),
            GuestStop::ExportNotFound(n) => write!(f, "no export `{n}`"),
            GuestStop::ExportArgs(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for GuestStop {}

pub(super) fn stop(reason: GuestStop) -> wasmtime::Error {
    wasmtime::Error::new(reason)
}

/// What a function sees as its process: argv and environment, NUL-terminated. Built once per
/// function and shared by its invocations.
#[derive(Debug, Default)]
pub struct WasiArgs {
    pub args: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
}

impl WasiArgs {
    pub fn new(args: &[&str], env: &[(&str, &str)]) -> Self {
        let nul = |s: String| {
            let mut v = s.into_bytes();
            v.push(0);
            v
        };
        WasiArgs {
            args: args.iter().map(|a| nul(a.to_string())).collect(),
            env: env.iter().map(|(k, v)| nul(format!("{k}={v}"))).collect(),
        }
    }
}

/// The caps of one invocation.
#[derive(Clone, Copy, Debug)]
pub struct InvokeLimits {
    pub timeout: Duration,
    pub memory_limit_mb: u32,
    pub max_output_bytes: usize,
    pub max_stderr_bytes: usize,
    /// How long a host call that works in chunks runs before it yields to its shard, as guest
    /// code does at an epoch tick (`--guest-slice-us`).
    pub slice: Duration,
    /// Elements a table may grow to (`--max-table-elements`).
    pub max_table_elements: usize,
}

/// The store's data: the guest's stdio and its limiter.
pub struct GuestState {
    pub wasi: Arc<WasiArgs>,
    pub stdin: Vec<u8>,
    pub stdin_pos: usize,
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
    pub(super) stderr_dropped: usize,
    pub(super) limits: InvokeLimits,
    pub(super) memory_exceeded: bool,
    pub(super) output_exceeded: bool,
    /// The tensor ABI's state, for functions that import `tensor_wasm`.
    pub tensors: Option<TensorContext>,
    /// The instance's exported memory, once a host call has looked it up (`wasi::memory`).
    pub(super) memory: Option<wasmtime::Memory>,
    /// The instance, once instantiated: `invoke::release_memory` looks its memory up at the end.
    pub(super) instance: Option<wasmtime::Instance>,
    /// When the invocation's time is up: host calls that work in chunks stop there.
    pub deadline: Instant,
    /// The invocation's place in its shard's turns: host calls that work in chunks yield with it,
    /// so that their yields count as the guest's own (`fair_yield`).
    pub(super) turn: crate::runtime::fair_yield::Turn,
}

impl GuestState {
    /// How long a host call may work before it yields its shard (`InvokeLimits::slice`).
    pub(super) fn slice(&self) -> Duration {
        self.limits.slice
    }

    pub fn new(wasi: Arc<WasiArgs>, stdin: Vec<u8>, limits: InvokeLimits) -> Self {
        GuestState {
            wasi,
            stdin,
            stdin_pos: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stderr_dropped: 0,
            limits,
            memory_exceeded: false,
            output_exceeded: false,
            tensors: None,
            memory: None,
            instance: None,
            deadline: Instant::now() + limits.timeout,
            turn: Default::default(),
        }
    }

    pub fn write_stdout(&mut self, data: &[u8]) -> wasmtime::Result<()> {
        if self.stdout.len() + data.len() > self.limits.max_output_bytes {
            self.output_exceeded = true;
            return Err(stop(GuestStop::OutputCap));
        }
        self.stdout.extend_from_slice(data);
        Ok(())
    }

    /// What the guest has written to stdout so far.
    pub fn stdout(&self) -> &[u8] {
        &self.stdout
    }

    pub fn write_stderr(&mut self, data: &[u8]) {
        let room = self.limits.max_stderr_bytes.saturating_sub(self.stderr.len());
        let keep = room.min(data.len());
        self.stderr.extend_from_slice(&data[..keep]);
        self.stderr_dropped += data.len() - keep;
    }
}

impl ResourceLimiter for GuestState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limits.memory_limit_mb as usize * 1024 * 1024 {
            // A trap, not a -1 from memory.grow: the guest stops here and the caller learns why.
            self.memory_exceeded = true;
            return Err(stop(GuestStop::MemoryCap));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= self.limits.max_table_elements)
    }
}

/// What a tensor-using invocation carries in its store.
pub struct TensorContext {
    pub(super) dispatcher: Arc<Dispatcher>,
    pub(super) shard: usize,
    pub(super) tenant: u64,
    pub(super) metrics: Arc<ShardMetrics>,
    /// The invocation's deadline: no wait for ring room outlasts it.
    pub(super) deadline: Instant,
    /// Made at the first tensor call; dropping it frees every tensor and returns the quota.
    pub(super) session: Option<Session>,
    pub(super) last_error: String,
    /// The function's resident tensors (`tensor_weight`), if it carries any.
    pub(super) weights: Option<Arc<Weights>>,
    /// The device copies of them this invocation holds handles into: kept until it ends, so that
    /// a function replaced meanwhile cannot free a tensor it still reads.
    pub(super) residents: Vec<Arc<Resident>>,
    /// The last sync sent to bound how far the guest runs ahead of its device, not yet waited for
    /// (`wasm::tensor::mark`).
    pub(super) mark: Option<Pending>,
}

impl TensorContext {
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        shard: usize,
        tenant: u64,
        metrics: Arc<ShardMetrics>,
        weights: Option<Arc<Weights>>,
    ) -> Self {
        TensorContext {
            dispatcher,
            shard,
            tenant,
            metrics,
            deadline: Instant::now(),
            session: None,
            last_error: String::new(),
            weights,
            residents: Vec::new(),
            mark: None,
        }
    }

    pub(super) fn session(&mut self) -> &mut Session {
        let (d, shard, tenant) = (&self.dispatcher, self.shard, self.tenant);
        self.session.get_or_insert_with(|| {
            // A guest's kernels are streamed: it waits at its reads and syncs only.
            let mut session = Session::new(d.clone(), shard, tenant);
            session.set_streaming(true);
            session
        })
    }

    pub(super) fn fail(&mut self, code: i32, message: impl std::fmt::Display) -> i32 {
        self.last_error = format!("{}: {message}", status::name(code));
        code
    }
}

//! TensorWasm: a sharded, thread-per-core serverless runtime for WebAssembly functions.
//!
//! The map of this crate is docs/ARCHITECTURE.md. In short: `server` starts one pinned shard per
//! CPU; each shard's connections (`server::conn`, speaking `http`) hand requests to `api`, which
//! uses the shard's state (`shard`), the `functions` catalog and `wasm` execution; `metrics` are
//! per shard and merged on scrape. Below them all: `config` and `runtime`.
//!
//! Those modules are the crate's own. What other crates of this repository use is below, in small
//! facades, each saying who uses it: the binary (src/main.rs), the benchmarks (bench/), the fuzz
//! targets (fuzz/) and the integration tests (tests/). Nothing else is an API.

pub(crate) mod api;
pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod backup;
pub(crate) mod cidr;
pub(crate) mod cli;
pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod functions;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod nats;
pub(crate) mod pipelines;
pub(crate) mod route;
pub(crate) mod runtime;
pub(crate) mod server;
pub(crate) mod shard;
pub(crate) mod tls;
pub(crate) mod wasm;

/// The `tensor-wasm` binary (src/main.rs): runs its command line and returns the exit code.
pub use cli::main;

/// CPU sets, pinning and a thread's CPU time, as the shards use them. For the harness
/// (bench/src/harness), which keeps itself off the CPUs of the servers it starts, pins them and
/// reads their CPU time; the micro-benchmarks, which pin themselves like a shard
/// (bench/src/lib.rs); and the tests of pinning and of CPU per request (tests/lifecycle.rs,
/// tests/common, bench/tests).
pub mod cpu {
    pub use crate::runtime::cpu::{
        allowed_cpus, apply_cpu_set, confine_current_thread, cpu_set, cpu_time_from_stat, format_list, parse_list,
        pin_current_thread, placement, PinShards, Placement,
    };
}

/// The configuration `tensor-wasm serve` builds from its flags. For the micro-benchmarks, which
/// run with the built-in defaults (bench/src/lib.rs), and the test that the flags reach it
/// (tests/limits.rs).
pub mod settings {
    pub use crate::cli::serve_config;
    pub use crate::config::{CompilePriority, Limits, ServerConfig, SinkNetworks};
}

/// A client of a running server, plain or TLS: for the harness (bench/src/harness) and its flags
/// (bench/src/bin), and the TLS tests (tests/tls.rs, bench/tests).
pub mod client {
    pub use crate::cli::client::TlsArgs;
    pub use crate::http::client::{ClientStream, Target};
    pub use crate::tls::ClientTls;
}

/// Reading a server's `/metrics` from outside: the Prometheus text, histograms between two
/// scrapes, their buckets, and the routes that label the series. For the harness
/// (bench/src/harness) and its tests (bench/tests).
pub mod exposition {
    pub use crate::metrics::exposition::{parse, Sample, ScrapedHistogram};
    pub use crate::metrics::DURATION_BUCKETS;
    pub use crate::route::Route;
}

/// The HTTP codec's request side: for the fuzz targets (fuzz/targets.rs, run on stable by
/// tests/fuzz_smoke.rs), the property tests (tests/properties.rs) and the request-path
/// micro-benchmark (bench/benches/request_path.rs).
pub mod http_codec {
    pub use crate::http::{parse_head, ChunkedDecoder, HeadParse, RequestHead};
}

/// Bearer tokens and their rate limits: for the fuzz targets, the property tests and the
/// request-path micro-benchmark.
pub mod tokens {
    pub use crate::auth::rate_limit::{GlobalBucket, LocalAllowance};
    pub use crate::auth::{RateLimit, TokenPolicy, TokenSet};
}

/// What the catalog stores, the bodies and manifests it comes from, and the catalog worker: for
/// the fuzz targets and the property tests (the formats), and the restart micro-benchmark
/// (bench/benches/catalog_load.rs: deploys through the worker, loads, pre-links).
pub mod catalog {
    pub use crate::config::RegistryConfig;
    pub use crate::functions::manifest::{duration_ms, FunctionManifest};
    pub use crate::functions::worker::{spawn as spawn_worker, DeployBody, Spawned};
    pub use crate::functions::{Catalog, DeployRequest, FunctionCache, FunctionRecord, FunctionStore};
    pub use crate::functions::{PipelineRecord, PipelineSpec};
}

/// Running a guest below HTTP, and what guests and host exchange: the engine, linking, the
/// deploy-time check, one invocation, the epoch ticker; Fiso's envelope and the tensor ABI's
/// arguments. For the micro-benchmarks (bench/benches/instantiate.rs, catalog_load.rs), the
/// baseline server, which runs guests with our WASI (bench/src/baseline.rs), the fuzz targets
/// and the property tests.
pub mod guest {
    pub use crate::config::GuestProfiler;
    pub use crate::wasm::envelope::{decode_output, encode_input, Headers};
    pub use crate::wasm::tensor::{decode_create_args, decode_typed_create_args};
    pub use crate::wasm::{
        build_engine, check_module, invoke, new_linker, Entry, EpochTicker, GuestState, InvokeLimits, WasiArgs,
    };
}

/// The audit log: a shard's chain, its records and segments, checkpoint keys. For the append
/// micro-benchmark (bench/benches/audit_append.rs), the fuzz targets and the property tests.
pub mod audit_log {
    pub use crate::audit::checkpoint::SigningKey;
    pub use crate::audit::helpers::{HelperThreads, Helpers};
    pub use crate::audit::record::{check_line, encode, encode_into, ReplicaField, ReplicaId, GENESIS, MAX_RECORD};
    pub use crate::audit::segment::scan;
    pub use crate::audit::{
        Actor, ActorScope, AuditConfig, AuditEvent, AuditOnError, AuditSync, CheckpointConfig, CommitSlot, ShardAudit,
    };
    pub use crate::metrics::ShardMetrics;
}

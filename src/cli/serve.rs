//! `tensor-wasm serve`: its flags (each with a `TENSOR_WASM_*` env var), their validation into a
//! `ServerConfig`, and the run.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::ValueEnum;
use tensor_wasm_dispatch::{BackendChoice, DispatchConfig};

use super::token::DEFAULT_TOKEN_ID_KEY;
use super::EXIT_USAGE;
use crate::audit::{parse_destination, AuditConfig, AuditOnError, AuditSync, CheckpointConfig, ReplicaId};
use crate::auth::{AuthConfig, RateLimit, TokenSource};
use crate::cidr::parse_cidrs;
use crate::config::RegistryConfig;
use crate::config::SinkNetworks;
use crate::config::{CompileBudget, CompilePriority, IoDriverChoice, Limits, ServerConfig};
use crate::runtime::cpu::PinShards;
use crate::tls::TlsFiles;

/// No `Debug`: it holds secrets.
#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on. Every shard binds it with SO_REUSEPORT. Port 0 picks a free port.
    #[arg(long, env = "TENSOR_WASM_API_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Number of shards (threads). Default: one per CPU in the process's allowed CPU set, and no
    /// more than its cgroups' CPU limit (a container's `resources.limits.cpu`).
    #[arg(long, env = "TENSOR_WASM_SHARDS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: Option<u16>,

    /// Whether each shard is pinned to a CPU. `auto` pins when the allowed CPU set has exactly one
    /// CPU per shard (Kubernetes' static CPU policy, taskset, a whole machine) and lets the shards
    /// float over a larger, shared set.
    #[arg(long, env = "TENSOR_WASM_PIN_SHARDS", value_enum, default_value_t = PinShardsArg::Auto)]
    pub pin_shards: PinShardsArg,

    /// Directory for stored modules, precompiled artifacts and function records.
    #[arg(long, env = "TENSOR_WASM_DATA_DIR", default_value = "./tensor-wasm-data")]
    pub data_dir: PathBuf,

    /// I/O driver of each shard. `auto` tries io_uring and falls back to epoll.
    #[arg(long, env = "TENSOR_WASM_IO_DRIVER", value_enum, default_value_t = IoDriverArg::Auto)]
    pub io_driver: IoDriverArg,

    /// For this long after a request, a shard keeps polling its sockets instead of sleeping, so
    /// that the next request is read without a wake-up. It spends that CPU time spinning: for
    /// shards on CPUs of their own (a static CPU policy, pinned shards). Runs on the epoll driver,
    /// which `auto` then picks. 0: sleep at once.
    #[arg(long, env = "TENSOR_WASM_IDLE_SPIN_US", default_value_t = 0)]
    pub idle_spin_us: u64,

    /// Largest body of a deploy or a pipeline definition; larger bodies get 413 before they are read.
    #[arg(long, env = "TENSOR_WASM_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: u64,

    /// Largest body of an invoke (a function's or a pipeline's); larger bodies get 413 before they
    /// are read.
    #[arg(long, env = "TENSOR_WASM_MAX_INVOKE_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_invoke_body_bytes: u64,

    /// Most request-body bytes one shard holds at once, over all its connections. A request whose
    /// declared body would pass it gets 503 `overloaded` with `retry-after`, before its body is read.
    #[arg(long, env = "TENSOR_WASM_MAX_INFLIGHT_BODY_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub max_inflight_body_bytes: u64,

    /// Most request-body bytes one tenant's requests hold at once on one shard; past it, 429
    /// `inflight_body_limited`. 0: half of --max-inflight-body-bytes, and at least --max-body-bytes.
    #[arg(long, env = "TENSOR_WASM_MAX_INFLIGHT_BODY_BYTES_PER_TENANT", default_value_t = 0)]
    pub max_inflight_body_bytes_per_tenant: u64,

    /// Most invocations one tenant may run at once, in the whole process (split evenly over the
    /// shards); more get 429 `concurrency_limited` with `retry-after`. 0: a quarter of
    /// --max-instances, or all of it in dev mode (no tokens: one caller).
    #[arg(long, env = "TENSOR_WASM_MAX_CONCURRENT_PER_TENANT", default_value_t = 0)]
    pub max_concurrent_per_tenant: u32,

    /// Largest request head (request line and headers); larger heads get 431.
    #[arg(long, env = "TENSOR_WASM_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: u32,

    /// Most header fields in one request; more get 431. At most 256.
    #[arg(long, env = "TENSOR_WASM_MAX_HEADERS", default_value_t = 64)]
    pub max_headers: u16,

    /// Time allowed to receive a whole request head once its first byte arrived.
    #[arg(long, env = "TENSOR_WASM_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,

    /// Time allowed to receive a whole request body.
    #[arg(long, env = "TENSOR_WASM_BODY_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_timeout_ms: u64,

    /// Time allowed to write a whole response.
    #[arg(long, env = "TENSOR_WASM_WRITE_TIMEOUT_MS", default_value_t = 30_000)]
    pub write_timeout_ms: u64,

    /// An idle keep-alive connection is closed after this long.
    #[arg(long, env = "TENSOR_WASM_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,

    /// After an answer that closes the connection on a request too large or malformed to read
    /// (400, 413, 431), what the client still sends is read and discarded for at most this long,
    /// so that it reads the answer rather than a reset. 0: close at once.
    #[arg(long, env = "TENSOR_WASM_LINGER_MS", default_value_t = 2_000)]
    pub linger_ms: u64,

    /// Most open connections in the process, split evenly over the shards.
    #[arg(long, env = "TENSOR_WASM_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: u32,

    /// Most live Wasm instances in the process (the pooling allocator's size), split over the shards.
    /// An invoke beyond its shard's share gets 503 `overloaded`.
    #[arg(long, env = "TENSOR_WASM_MAX_INSTANCES", default_value_t = 1_000)]
    pub max_instances: u32,

    /// Deadline of an invocation when the function sets none.
    #[arg(long, env = "TENSOR_WASM_DEFAULT_TIMEOUT_MS", default_value_t = 5_000)]
    pub default_timeout_ms: u64,

    /// Largest `timeout_ms` a function may ask for.
    #[arg(long, env = "TENSOR_WASM_MAX_TIMEOUT_MS", default_value_t = 60_000)]
    pub max_timeout_ms: u64,

    /// Most functions one tenant may deploy through the API; more get 403 `quota_exceeded`.
    #[arg(long, env = "TENSOR_WASM_MAX_FUNCTIONS_PER_TENANT", default_value_t = 1_000)]
    pub max_functions_per_tenant: u32,

    /// Most MiB of modules, their precompiled artifacts and tensor files one tenant's functions may take on
    /// disk; a deploy past it gets 403 `quota_exceeded`.
    #[arg(long, env = "TENSOR_WASM_MAX_STORAGE_MB_PER_TENANT", default_value_t = 1_024)]
    pub max_storage_mb_per_tenant: u64,

    /// MiB of free space a deploy must leave on the data dir's file system, for the audit log; a
    /// deploy that would leave less gets 507 `insufficient_storage`.
    #[arg(long, env = "TENSOR_WASM_AUDIT_RESERVE_MB", default_value_t = 256)]
    pub audit_reserve_mb: u64,

    /// Address space, in MiB, of the child process that compiles a deployed module; a module
    /// whose compile needs more gets 400 `module_too_complex`.
    #[arg(long, env = "TENSOR_WASM_COMPILE_MEMORY_MB", default_value_t = 2_048)]
    pub compile_memory_mb: u64,

    /// CPU time a deployed module's compile may take, every compile thread together; past it the
    /// child is killed and the deploy gets 400 `module_too_complex`.
    #[arg(long, env = "TENSOR_WASM_COMPILE_TIMEOUT_MS", default_value_t = 30_000)]
    pub compile_timeout_ms: u64,

    /// Wall-clock time a deployed module's compile may take, at least --compile-timeout-ms: past
    /// it the host gave the compile too little CPU, the child is killed and the deploy gets 503
    /// `overloaded`.
    #[arg(long, env = "TENSOR_WASM_COMPILE_WALL_TIMEOUT_MS", default_value_t = 120_000)]
    pub compile_wall_timeout_ms: u64,

    /// How the child that compiles a deployed module is scheduled: `idle` (SCHED_IDLE, only CPU
    /// time nothing else wants) or a nice value from 0 to 19.
    #[arg(long, env = "TENSOR_WASM_COMPILE_PRIORITY", default_value = "idle", value_parser = CompilePriority::parse)]
    pub compile_priority: CompilePriority,

    /// Threads that load stored modules at start-up (each checks a module's digest, then loads
    /// its artifact or compiles it in a child within the compile budget), and that compile a
    /// functions directory's new modules side by side. 0: one per CPU the server may run on.
    #[arg(long, env = "TENSOR_WASM_LOAD_THREADS", default_value_t = 0)]
    pub load_threads: usize,

    /// Most functions a deployed module may define; more get 400 `too_many_functions` before
    /// anything is compiled.
    #[arg(long, env = "TENSOR_WASM_MAX_MODULE_FUNCTIONS", default_value_t = 100_000)]
    pub max_module_functions: u32,

    /// Most bytes of code (every function body together) a deployed module may have; more get
    /// 400 `code_too_large` before anything is compiled.
    #[arg(long, env = "TENSOR_WASM_MAX_MODULE_CODE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_module_code_bytes: u64,

    /// Largest function body a deployed module may have; a larger one gets 400
    /// `function_too_large` before anything is compiled.
    #[arg(long, env = "TENSOR_WASM_MAX_FUNCTION_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_function_body_bytes: u32,

    /// Linear-memory cap of a function that sets none.
    #[arg(long, env = "TENSOR_WASM_DEFAULT_MEMORY_LIMIT_MB", default_value_t = 64)]
    pub default_memory_limit_mb: u32,

    /// Largest `memory_limit_mb` a function may ask for (its GC heap's too); also the size of each
    /// pooled memory slot. It bounds how long the longest instruction no deadline interrupts, a GC
    /// array's allocation, holds a shard: about 0.6 ms per MiB (perf/HOSTILE.md).
    #[arg(long, env = "TENSOR_WASM_MAX_MEMORY_LIMIT_MB", default_value_t = 64)]
    pub max_memory_limit_mb: u32,

    /// Most bytes a guest may write to stdout; more is an `output_too_large` error, never a truncation.
    #[arg(long, env = "TENSOR_WASM_MAX_OUTPUT_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_output_bytes: u32,

    /// Most bytes of a guest's stderr kept for the log; the rest is counted and dropped.
    #[arg(long, env = "TENSOR_WASM_MAX_STDERR_BYTES", default_value_t = 8 * 1024)]
    pub max_stderr_bytes: u32,

    /// Most elements a guest's table may have; a module whose table starts larger is refused at
    /// deploy (400 `table_too_large`), and a `table.grow` past it fails. Each instance slot reserves 8 bytes of
    /// address space per element for each of up to 4 tables.
    #[arg(long, env = "TENSOR_WASM_MAX_TABLE_ELEMENTS", default_value_t = 20_000)]
    pub max_table_elements: u32,

    /// Period of the process-wide epoch ticker: the granularity of deadlines and of guest yields.
    #[arg(long, env = "TENSOR_WASM_EPOCH_TICK_MS", default_value_t = 1)]
    pub epoch_tick_ms: u64,

    /// While guests on a shard take turns with its other work, the epoch ticks this often: how
    /// long a spinning guest keeps a ready connection waiting. At most the epoch tick.
    #[arg(long, env = "TENSOR_WASM_GUEST_SLICE_US", default_value_t = 100)]
    pub guest_slice_us: u64,

    /// Name compiled guest functions for `perf` in /tmp/perf-PID.map, so that profiles and flame
    /// graphs of a shard show a guest's own functions instead of bare addresses.
    #[arg(long, env = "TENSOR_WASM_GUEST_PERF_MAP", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub guest_perf_map: bool,

    /// After SIGTERM/SIGINT, /readyz answers 503 and responses close their connections, but new
    /// connections are still accepted for this long, so that load balancers can stop sending.
    #[arg(long, env = "TENSOR_WASM_DRAIN_GRACE_MS", default_value_t = 0)]
    pub drain_grace_ms: u64,

    /// After the grace period, in-flight requests get this long to finish before the process exits.
    #[arg(long, env = "TENSOR_WASM_DRAIN_TIMEOUT_MS", default_value_t = 25_000)]
    pub drain_timeout_ms: u64,

    /// Deploys and deletes waiting for the catalog worker; more get 503 `overloaded`.
    #[arg(long, env = "TENSOR_WASM_ADMIN_QUEUE_DEPTH", default_value_t = 64)]
    pub admin_queue_depth: u32,

    /// Deploys and changes one tenant may have waiting for the catalog worker; more get 429
    /// `admin_queue_limited`. 0: a quarter of --admin-queue-depth.
    #[arg(long, env = "TENSOR_WASM_ADMIN_QUEUE_DEPTH_PER_TENANT", default_value_t = 0)]
    pub admin_queue_depth_per_tenant: u32,

    /// Load every NAME.wasm in this folder as a function (NAME.toml beside it sets tenant, abi,
    /// timeout, memory and env), and NAME.pipeline.toml as a pipeline; changes apply without a
    /// restart. The API may not change these (409).
    #[arg(long, env = "TENSOR_WASM_FUNCTIONS_DIR")]
    pub functions_dir: Option<PathBuf>,

    /// How often the functions directory is checked for changes.
    #[arg(long, env = "TENSOR_WASM_FUNCTIONS_DIR_POLL_MS", default_value_t = 250)]
    pub functions_dir_poll_ms: u64,

    /// Where the catalog lives: `file` (the data dir alone) or nats://HOST:PORT[,…] (tls://
    /// too): a NATS JetStream every replica of a fleet shares, the data dir then being this
    /// replica's cache.
    #[arg(long, env = "TENSOR_WASM_REGISTRY", default_value = "file")]
    pub registry: String,

    /// A NATS credentials file (JWT and NKey seed) for the registry.
    #[arg(long, env = "TENSOR_WASM_REGISTRY_CREDS")]
    pub registry_creds: Option<PathBuf>,

    /// How long a deploy or delete waits for NATS to acknowledge it before 503
    /// `registry_unavailable`; also the connection's and each request's timeout.
    #[arg(long, env = "TENSOR_WASM_REGISTRY_TIMEOUT_MS", default_value_t = 5000)]
    pub registry_timeout_ms: u64,

    /// A registry change that reaches this replica later than this after JetStream stored it is
    /// counted and logged: the fleet's propagation bound.
    #[arg(long, env = "TENSOR_WASM_REGISTRY_PROPAGATION_MS", default_value_t = 1000)]
    pub registry_propagation_ms: u64,

    /// How often each replica checks that the registry's object store holds its functions'
    /// files, storing again from its own copies what the store lost.
    #[arg(long, env = "TENSOR_WASM_REGISTRY_REPAIR_INTERVAL_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    pub registry_repair_interval_ms: u64,

    /// The bytes the registry's object store may hold (modules and tensor files of every tenant),
    /// set when this replica creates it.
    #[arg(long, env = "TENSOR_WASM_REGISTRY_MAX_OBJECT_MB", default_value_t = 10240)]
    pub registry_max_object_mb: u64,

    /// JetStream replicas of the registry's bucket and object store, set when this replica
    /// creates them: 3 on a NATS cluster that must survive a node.
    #[arg(long, env = "TENSOR_WASM_REGISTRY_REPLICAS", default_value_t = 1)]
    pub registry_replicas: u8,

    /// This replica's name in a fleet, which every audit record and checkpoint carries: 1 to 63
    /// of A-Z a-z 0-9 . _ -, the first a letter or digit. Default: with --registry nats://…, the
    /// host name (in Kubernetes the pod's name); with the file registry, none.
    #[arg(long, env = "TENSOR_WASM_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Threads delivering pipeline outputs to their sinks.
    #[arg(long, env = "TENSOR_WASM_SINK_WORKERS", default_value_t = 4)]
    pub sink_workers: u16,

    /// Sink deliveries that may wait for a free thread; more get 503 `overloaded`.
    #[arg(long, env = "TENSOR_WASM_SINK_QUEUE_DEPTH", default_value_t = 256)]
    pub sink_queue_depth: u32,

    /// Deliveries one tenant may have queued or running at once; more get 429
    /// `sink_concurrency_limited`. Must be below --sink-workers (but for a single worker), so
    /// that one tenant's slow sink never holds every worker. Default: half the workers, rounded up.
    #[arg(long, env = "TENSOR_WASM_SINK_MAX_INFLIGHT_PER_TENANT")]
    pub sink_max_inflight_per_tenant: Option<u32>,

    /// Longest a sink delivery may take from being queued, every attempt and backoff included;
    /// past it, 504 `sink_delivery_timeout`.
    #[arg(long, env = "TENSOR_WASM_SINK_MAX_DELIVERY_MS", default_value_t = 30_000)]
    pub sink_max_delivery_ms: u64,

    /// The only networks pipeline sinks may be delivered to, e.g. `10.0.0.0/8,fd00::/8`, checked
    /// against every address a sink's host resolves to and again at connect; the word `public`
    /// in the list allows public addresses beside them. Default: public addresses only, never
    /// loopback, private, link-local, unique-local, CGNAT, special-purpose or cloud metadata
    /// addresses, nor IPv6 forms that embed one.
    #[arg(long, env = "TENSOR_WASM_SINK_ALLOWED_CIDRS", default_value = "")]
    pub sink_allowed_cidrs: String,

    /// Where guests' tensor kernels run: `auto` takes CUDA when a device is present (as
    /// CUDA_VISIBLE_DEVICES shows them), else the host back-end.
    #[arg(long, env = "TENSOR_WASM_GPU", value_enum, default_value_t = GpuArg::Auto)]
    pub gpu: GpuArg,

    /// Host-back-end "devices": one worker thread each.
    #[arg(long, env = "TENSOR_WASM_GPU_HOST_DEVICES", default_value_t = 1)]
    pub gpu_host_devices: u16,

    /// CUDA streams per shard on each device (at most 64 per device over all shards, and at least
    /// one per shard).
    #[arg(long, env = "TENSOR_WASM_GPU_STREAMS", default_value_t = 4)]
    pub gpu_streams: u16,

    /// Requests each shard-to-device ring holds. When it is full, a guest waits (yielding) up to
    /// its deadline, then gets `busy`.
    #[arg(long, env = "TENSOR_WASM_DISPATCH_RING_DEPTH", default_value_t = 256)]
    pub dispatch_ring_depth: u32,

    /// How long a tensor call waits for room in a full dispatch ring before it fails with `busy`
    /// (never past the invocation's deadline).
    #[arg(long, env = "TENSOR_WASM_DISPATCH_MAX_WAIT_MS", default_value_t = 1000)]
    pub dispatch_max_wait_ms: u64,

    /// How long a guest spins for a kernel's completion before its task parks and the shard serves
    /// others. 0: park at once.
    #[arg(long, env = "TENSOR_WASM_DISPATCH_SPIN_US", default_value_t = 20)]
    pub dispatch_spin_us: u64,

    /// Device memory one tenant may hold, across devices and invocations.
    #[arg(long, env = "TENSOR_WASM_GPU_MEMORY_PER_TENANT_MB", default_value_t = 1024)]
    pub gpu_memory_per_tenant_mb: u64,

    /// Tensors one invocation may hold at once.
    #[arg(long, env = "TENSOR_WASM_MAX_TENSORS_PER_INVOCATION", default_value_t = 1024)]
    pub max_tensors_per_invocation: u32,

    /// Elements one tensor may have; a larger shape is refused before anything is allocated.
    #[arg(long, env = "TENSOR_WASM_MAX_TENSOR_ELEMENTS", default_value_t = 64 << 20)]
    pub max_tensor_elements: u64,

    /// Most MiB of the safetensors file a function carries, its resident tensors (`tensors_b64` on
    /// a deploy, `NAME.safetensors` in the functions directory); a larger one gets 400
    /// `invalid_tensors`.
    #[arg(long, env = "TENSOR_WASM_MAX_FUNCTION_TENSORS_MB", default_value_t = 32)]
    pub max_function_tensors_mb: u64,

    /// Tensor calls one shard may have waiting for their completions at once (its ticket table);
    /// past it, a call gets `busy`. At most 65534.
    #[arg(long, env = "TENSOR_WASM_DISPATCH_MAX_TICKETS_PER_SHARD", default_value_t = 4096)]
    pub dispatch_max_tickets_per_shard: u32,

    /// How long an idle device worker spins for new requests before it sleeps. 0: sleep at once.
    #[arg(long, env = "TENSOR_WASM_DISPATCH_WORKER_SPIN_US", default_value_t = 50)]
    pub dispatch_worker_spin_us: u64,

    /// Bearer tokens and the tenants each may act for: `TOKEN:tenant=*,TOKEN:tenant=7,TOKEN:tenant=1,2,3`.
    /// Prefer the env var or a file: command-line arguments are visible to other local users.
    #[arg(long, env = "TENSOR_WASM_API_TOKENS", hide_env_values = true)]
    pub api_tokens: Option<String>,

    /// A file holding the token list (a mounted Secret). Re-read when it changes and on SIGHUP.
    #[arg(long, env = "TENSOR_WASM_API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,

    /// Key of the `token_id` hash that logs and metrics carry instead of tokens. Give every replica
    /// the same key for the same ids.
    #[arg(long, env = "TENSOR_WASM_API_TOKEN_ID_KEY", hide_env_values = true)]
    pub api_token_id_key: Option<String>,

    /// When set, `/metrics` needs `Authorization: Bearer <this token>`.
    #[arg(long, env = "TENSOR_WASM_API_METRICS_TOKEN", hide_env_values = true)]
    pub api_metrics_token: Option<String>,

    /// Refuse requests without `x-tensor-wasm-tenant` (400 `missing_tenant`) instead of using tenant 0.
    #[arg(long, env = "TENSOR_WASM_API_REQUIRE_TENANT", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub require_tenant: bool,

    /// Serve without tokens on a non-loopback address. Anyone who can reach it can deploy code.
    #[arg(long, env = "TENSOR_WASM_API_ALLOW_UNAUTHENTICATED", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_unauthenticated: bool,

    /// PEM certificate chain: with --tls-key, every listener speaks TLS. Reloaded when it changes.
    #[arg(long, env = "TENSOR_WASM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert. Reloaded when it changes.
    #[arg(long, env = "TENSOR_WASM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: clients must present a certificate they signed (mTLS).
    #[arg(long, env = "TENSOR_WASM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Networks of proxies whose `X-Forwarded-Client-Cert` header is believed, e.g.
    /// `10.0.0.0/8,fd00::/8`. From any other peer the header is ignored.
    #[arg(long, env = "TENSOR_WASM_API_TRUSTED_PROXY_CIDRS", default_value = "")]
    pub trusted_proxy_cidrs: String,

    /// Where audit records go: `file:/path` (a directory of segments), `stdout`, `none`, or a list
    /// such as `file:/var/lib/tensor-wasm/audit,stdout`. Default: `file:<data dir>/audit`.
    #[arg(long, env = "TENSOR_WASM_API_AUDIT_LOG")]
    pub audit_log: Option<String>,

    /// When audit records are durable: `interval` (group commit every 10 ms), `always` (before each
    /// response), or `none` (the page cache: survives a process crash, not a machine crash).
    #[arg(long, env = "TENSOR_WASM_AUDIT_SYNC", value_enum, default_value_t = AuditSyncArg::Interval)]
    pub audit_sync: AuditSyncArg,

    /// When the audit log cannot be written: `reject` protected requests with 503, or `continue`.
    #[arg(long, env = "TENSOR_WASM_AUDIT_ON_ERROR", value_enum, default_value_t = AuditOnErrorArg::Reject)]
    pub audit_on_error: AuditOnErrorArg,

    /// Size of an audit segment file (at least 64 KiB).
    #[arg(long, env = "TENSOR_WASM_AUDIT_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub audit_segment_bytes: u64,

    /// Sealed audit segments kept per shard (the oldest go first). Default: all.
    #[arg(long, env = "TENSOR_WASM_AUDIT_RETENTION_SEGMENTS")]
    pub audit_retention_segments: Option<usize>,

    /// Bytes of sealed audit segments kept per shard (the oldest go first); 0 keeps all.
    #[arg(long, env = "TENSOR_WASM_AUDIT_RETENTION_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub audit_retention_bytes: u64,

    /// Private key (`audit keygen`) that signs checkpoints of every shard's chain. Without it no
    /// checkpoints are made, and a log cut at its end cannot be told from one that ended there.
    #[arg(long, env = "TENSOR_WASM_AUDIT_SIGNING_KEY")]
    pub audit_signing_key: Option<PathBuf>,

    /// With --audit-signing-key: a shard signs its chain head at least this often while records
    /// flow (and at shutdown). Records after the last checkpoint that left the host can be cut
    /// undetected: this is that window.
    #[arg(long, env = "TENSOR_WASM_AUDIT_CHECKPOINT_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub audit_checkpoint_interval_ms: u64,

    /// With --audit-signing-key: a shard's `checkpoints` file is renamed to `checkpoints.1`
    /// (replacing the one before) when it would pass this size.
    #[arg(long, env = "TENSOR_WASM_AUDIT_CHECKPOINT_FILE_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(4096..))]
    pub audit_checkpoint_file_bytes: u64,

    /// Requests per second each token may make, across all shards; 0 means unlimited.
    #[arg(long, env = "TENSOR_WASM_API_RATE_LIMIT_QPS", default_value_t = 0)]
    pub rate_limit_qps: u32,

    /// Requests a token may make at once above its rate. Default: the qps.
    #[arg(long, env = "TENSOR_WASM_API_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,

    /// With --registry nats://…: how often each replica publishes its demand per token and sets
    /// its share of each token's rate (auth::fleet).
    #[arg(long, env = "TENSOR_WASM_RATE_LIMIT_SHARE_INTERVAL_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub rate_limit_share_interval_ms: u64,

    /// With --registry nats://…: a replica not heard from for this long no longer counts in the
    /// fleet's shares.
    #[arg(long, env = "TENSOR_WASM_RATE_LIMIT_PEER_TIMEOUT_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(20..=60_000))]
    pub rate_limit_peer_timeout_ms: u64,

    /// Requests per second one source address may make that fail authentication, across all
    /// shards; past it they get 429 `unauthenticated_rate_limited`. 0 means unlimited.
    #[arg(long, env = "TENSOR_WASM_UNAUTHENTICATED_RATE_LIMIT_QPS", default_value_t = 20)]
    pub unauthenticated_rate_limit_qps: u32,

    /// Failed authentications one source address may make at once above that rate.
    #[arg(long, env = "TENSOR_WASM_UNAUTHENTICATED_RATE_LIMIT_BURST", default_value_t = 40)]
    pub unauthenticated_rate_limit_burst: u32,

    /// Refused source addresses and tokens each shard remembers, for their rate and for coalescing
    /// their audit records; past it the oldest is forgotten.
    #[arg(long, env = "TENSOR_WASM_MAX_REFUSAL_SOURCES", default_value_t = 4096)]
    pub max_refusal_sources: u32,

    /// Log filter, e.g. `info` or `tensor_wasm=debug`.
    #[arg(long, env = "TENSOR_WASM_LOG", default_value = "info")]
    pub log_level: String,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditSyncArg {
    Interval,
    Always,
    None,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditOnErrorArg {
    Reject,
    Continue,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuArg {
    Auto,
    Cuda,
    Host,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinShardsArg {
    Auto,
    Always,
    Never,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDriverArg {
    Auto,
    IoUring,
    Epoll,
}

impl ServeArgs {
    /// Checks the values that clap's types alone cannot, section by section in this order (the
    /// first flag found wrong is the error), and builds the server's configuration.
    pub fn into_config(mut self) -> Result<ServerConfig, String> {
        let per_tenant_body_bytes = self.check_requests()?;
        let compile_budget = self.compile_budget()?;
        let sink_max_inflight_per_tenant = self.check_capacity()?;
        self.check_guests()?;
        let (auth, dev_mode) = self.auth_config()?;
        let mut audit = self.audit_config()?;
        let sink_networks = SinkNetworks::parse(&self.sink_allowed_cidrs)
            .map_err(|e| format!("TENSOR_WASM_SINK_ALLOWED_CIDRS: {e}"))?;
        let io_driver = self.io_driver()?;
        positive("registry-timeout-ms", self.registry_timeout_ms)?;
        positive("registry-max-object-mb", self.registry_max_object_mb)?;
        positive("registry-propagation-ms", self.registry_propagation_ms)?;
        let registry = RegistryConfig::parse(
            &self.registry,
            self.registry_creds.clone(),
            (
                std::time::Duration::from_millis(self.registry_timeout_ms),
                std::time::Duration::from_millis(self.registry_propagation_ms),
                std::time::Duration::from_millis(self.registry_repair_interval_ms),
            ),
            (self.registry_max_object_mb.saturating_mul(1 << 20), self.registry_replicas.into()),
        )?;
        audit.replica = replica_id(self.replica_id.as_deref(), &registry, super::host_name)?;
        let dispatch = self.dispatch_config();
        let limits = self.limits(per_tenant_body_bytes, dev_mode, sink_networks, compile_budget);
        Ok(ServerConfig {
            listen: self.listen,
            shards: self.shards.map(usize::from),
            pin_shards: match self.pin_shards {
                PinShardsArg::Auto => PinShards::Auto,
                PinShardsArg::Always => PinShards::Always,
                PinShardsArg::Never => PinShards::Never,
            },
            data_dir: self.data_dir,
            io_driver,
            idle_spin: std::time::Duration::from_micros(self.idle_spin_us),
            drain_grace_ms: self.drain_grace_ms,
            drain_timeout_ms: self.drain_timeout_ms,
            admin_queue_depth: self.admin_queue_depth as usize,
            admin_queue_depth_per_tenant: match self.admin_queue_depth_per_tenant {
                0 => self.admin_queue_depth.div_ceil(4),
                n => n.min(self.admin_queue_depth),
            } as usize,
            functions_dir: self.functions_dir.map(|root| crate::config::DirectoryConfig {
                root,
                poll: std::time::Duration::from_millis(self.functions_dir_poll_ms),
            }),
            registry,
            sink_workers: self.sink_workers.into(),
            sink_queue_depth: self.sink_queue_depth as usize,
            sink_max_inflight_per_tenant,
            sink_max_delivery_ms: self.sink_max_delivery_ms,
            dispatch,
            auth,
            audit,
            guest_profiler: match self.guest_perf_map {
                true => crate::config::GuestProfiler::PerfMap,
                false => crate::config::GuestProfiler::Off,
            },
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: self.tls_client_ca }),
                _ => None,
            },
            limits,
        })
    }

    /// Request sizes, modules and heads; returns each tenant's share of in-flight body bytes.
    fn check_requests(&self) -> Result<u64, String> {
        positive("max-body-bytes", self.max_body_bytes)?;
        positive("max-invoke-body-bytes", self.max_invoke_body_bytes)?;
        let per_tenant_body_bytes = match self.max_inflight_body_bytes_per_tenant {
            0 => (self.max_inflight_body_bytes / 2)
                .max(self.max_body_bytes.max(self.max_invoke_body_bytes))
                .min(self.max_inflight_body_bytes),
            n if n < self.max_body_bytes.max(self.max_invoke_body_bytes) => {
                return Err(format!(
                    "--max-inflight-body-bytes-per-tenant ({n}) is smaller than the largest body a tenant may send: \
                     no such request could ever be read"
                ));
            }
            n => n,
        };
        positive("max-module-functions", self.max_module_functions.into())?;
        positive("compile-memory-mb", self.compile_memory_mb)?;
        positive("max-functions-per-tenant", self.max_functions_per_tenant.into())?;
        positive("max-storage-mb-per-tenant", self.max_storage_mb_per_tenant)?;
        positive("max-module-code-bytes", self.max_module_code_bytes)?;
        positive("max-function-body-bytes", self.max_function_body_bytes.into())?;
        positive("max-inflight-body-bytes", self.max_inflight_body_bytes)?;
        for (name, body) in
            [("max-body-bytes", self.max_body_bytes), ("max-invoke-body-bytes", self.max_invoke_body_bytes)]
        {
            if body > self.max_inflight_body_bytes {
                return Err(format!(
                    "--{name} ({body}) is larger than --max-inflight-body-bytes ({}): no such request could ever be read",
                    self.max_inflight_body_bytes
                ));
            }
        }
        positive("max-header-bytes", self.max_header_bytes.into())?;
        positive("max-headers", self.max_headers.into())?;
        if usize::from(self.max_headers) > crate::http::MAX_HEADERS_CAP {
            return Err(format!(
                "--max-headers must be at most {}: a request head is parsed into that many slots on the shard's stack",
                crate::http::MAX_HEADERS_CAP
            ));
        }
        Ok(per_tenant_body_bytes)
    }

    /// Connections, instances, queues, sinks and the functions directory; returns each tenant's
    /// share of sink deliveries.
    fn check_capacity(&self) -> Result<u32, String> {
        positive("max-connections", self.max_connections.into())?;
        positive("max-instances", self.max_instances.into())?;
        positive("max-output-bytes", self.max_output_bytes.into())?;
        positive("admin-queue-depth", self.admin_queue_depth.into())?;
        positive("functions-dir-poll-ms", self.functions_dir_poll_ms)?;
        positive("sink-workers", self.sink_workers.into())?;
        positive("sink-queue-depth", self.sink_queue_depth.into())?;
        positive("sink-max-delivery-ms", self.sink_max_delivery_ms)?;
        let sink_max_inflight_per_tenant = match self.sink_max_inflight_per_tenant {
            None => u32::from(self.sink_workers).div_ceil(2),
            Some(0) => return Err("--sink-max-inflight-per-tenant must be greater than 0".into()),
            Some(n) if n >= u32::from(self.sink_workers) && self.sink_workers > 1 => {
                return Err(format!(
                    "--sink-max-inflight-per-tenant must be below --sink-workers ({}), so that one tenant's slow \
                     sink cannot hold every worker",
                    self.sink_workers
                ));
            }
            Some(n) if n > 1 && self.sink_workers == 1 => {
                return Err("--sink-max-inflight-per-tenant must be 1 with a single sink worker".into());
            }
            Some(n) => n,
        };
        if let Some(dir) = &self.functions_dir {
            if !dir.is_dir() {
                return Err(format!("--functions-dir {}: not a directory", dir.display()));
            }
        }
        Ok(sink_max_inflight_per_tenant)
    }

    /// Kernel dispatch, deadlines and guest memory.
    fn check_guests(&self) -> Result<(), String> {
        positive("gpu-host-devices", self.gpu_host_devices.into())?;
        positive("gpu-streams", self.gpu_streams.into())?;
        positive("dispatch-ring-depth", self.dispatch_ring_depth.into())?;
        positive("gpu-memory-per-tenant-mb", self.gpu_memory_per_tenant_mb)?;
        positive("max-tensors-per-invocation", self.max_tensors_per_invocation.into())?;
        positive("max-tensor-elements", self.max_tensor_elements)?;
        positive("max-function-tensors-mb", self.max_function_tensors_mb)?;
        // cuBLAS takes a matrix's sizes as C ints, and CUDA's one-dimensional grids count blocks
        // in 31 bits: a larger tensor would pass the host's checks and fail on the device, where a
        // streamed op's failure comes late (a request's u32 length is the looser bound).
        if self.max_tensor_elements > i32::MAX as u64 {
            return Err(format!("--max-tensor-elements must be at most {}", i32::MAX));
        }
        positive("dispatch-max-tickets-per-shard", self.dispatch_max_tickets_per_shard.into())?;
        // A ticket's index is 16 bits of its number (`port`), and one value is never used.
        if self.dispatch_max_tickets_per_shard >= u32::from(u16::MAX) {
            return Err(format!("--dispatch-max-tickets-per-shard must be at most {}", u16::MAX - 1));
        }
        positive("max-table-elements", self.max_table_elements.into())?;
        for (name, v) in [
            ("header-timeout-ms", self.header_timeout_ms),
            ("body-timeout-ms", self.body_timeout_ms),
            ("write-timeout-ms", self.write_timeout_ms),
            ("idle-timeout-ms", self.idle_timeout_ms),
            ("epoch-tick-ms", self.epoch_tick_ms),
            ("default-timeout-ms", self.default_timeout_ms),
            ("max-timeout-ms", self.max_timeout_ms),
        ] {
            positive(name, v)?;
        }
        positive("default-memory-limit-mb", self.default_memory_limit_mb.into())?;
        positive("max-memory-limit-mb", self.max_memory_limit_mb.into())?;
        if self.default_timeout_ms > self.max_timeout_ms {
            return Err("--default-timeout-ms must not exceed --max-timeout-ms".into());
        }
        if self.default_memory_limit_mb > self.max_memory_limit_mb {
            return Err("--default-memory-limit-mb must not exceed --max-memory-limit-mb".into());
        }
        // Below ten microseconds the ticker's own wake-ups and the guests' yields would be most of
        // what the CPU does.
        if self.guest_slice_us < 10 || self.guest_slice_us > self.epoch_tick_ms.saturating_mul(1000) {
            return Err(format!(
                "--guest-slice-us must be between 10 and the epoch tick ({} µs)",
                self.epoch_tick_ms.saturating_mul(1000)
            ));
        }
        if self.max_memory_limit_mb > 64 * 1024 {
            return Err("--max-memory-limit-mb must be at most 65536 (64 GiB)".into());
        }
        Ok(())
    }

    /// Tokens, rate limits and trusted proxies; also whether the server runs in dev mode (no
    /// tokens).
    fn auth_config(&mut self) -> Result<(AuthConfig, bool), String> {
        let source = match (self.api_tokens.take(), self.api_tokens_file.take()) {
            (Some(_), Some(_)) => {
                return Err("set TENSOR_WASM_API_TOKENS or TENSOR_WASM_API_TOKENS_FILE, not both".into());
            }
            (Some(list), None) => TokenSource::Inline(list),
            (None, Some(path)) => TokenSource::File(path),
            (None, None) => TokenSource::Dev,
        };
        if matches!(source, TokenSource::Dev) && !self.listen.ip().is_loopback() && !self.allow_unauthenticated {
            return Err(format!(
                "no API tokens are configured and {} is not a loopback address; set TENSOR_WASM_API_TOKENS \
                 or TENSOR_WASM_API_TOKENS_FILE, or pass --allow-unauthenticated",
                self.listen
            ));
        }
        // Without tokens every request is the one dev caller: no tenants to share between.
        let dev_mode = matches!(source, TokenSource::Dev);
        let auth = AuthConfig {
            source,
            token_id_key: self.api_token_id_key.take().unwrap_or_else(|| DEFAULT_TOKEN_ID_KEY.into()).into_bytes(),
            metrics_token: self.api_metrics_token.take(),
            require_tenant: self.require_tenant,
            trusted_proxies: parse_cidrs(&self.trusted_proxy_cidrs)
                .map_err(|e| format!("TENSOR_WASM_API_TRUSTED_PROXY_CIDRS: {e}"))?,
            rate_limit: match (self.rate_limit_qps, self.rate_limit_burst) {
                (0, Some(_)) => return Err("--rate-limit-burst needs --rate-limit-qps".into()),
                (0, None) => None,
                (_, Some(0)) => return Err("--rate-limit-burst must be greater than 0".into()),
                (qps, _) if qps > RateLimit::MAX_QPS => {
                    return Err(format!("--rate-limit-qps must be at most {}", RateLimit::MAX_QPS));
                }
                (qps, burst) => Some(RateLimit { qps, burst: burst.unwrap_or(qps) }),
            },
            unauthenticated_rate_limit: match (
                self.unauthenticated_rate_limit_qps,
                self.unauthenticated_rate_limit_burst,
            ) {
                (0, _) => None,
                (_, 0) => return Err("--unauthenticated-rate-limit-burst must be greater than 0".into()),
                (qps, _) if qps > RateLimit::MAX_QPS => {
                    return Err(format!("--unauthenticated-rate-limit-qps must be at most {}", RateLimit::MAX_QPS));
                }
                (qps, burst) => Some(RateLimit { qps, burst }),
            },
            max_refusal_sources: positive("max-refusal-sources", self.max_refusal_sources.into())? as usize,
            fleet_share_interval: std::time::Duration::from_millis(self.rate_limit_share_interval_ms),
            fleet_peer_timeout: std::time::Duration::from_millis(self.rate_limit_peer_timeout_ms),
        };
        // A peer must get to report more than once within the timeout, or a replica would forget
        // live peers between two of their reports.
        if self.rate_limit_peer_timeout_ms < 2 * self.rate_limit_share_interval_ms {
            return Err(format!(
                "--rate-limit-peer-timeout-ms ({}) must be at least twice --rate-limit-share-interval-ms ({})",
                self.rate_limit_peer_timeout_ms, self.rate_limit_share_interval_ms
            ));
        }
        Ok((auth, dev_mode))
    }

    /// Where the audit log goes, how it syncs and whether checkpoints are signed.
    fn audit_config(&self) -> Result<AuditConfig, String> {
        if (self.audit_segment_bytes as usize) < crate::audit::MIN_SEGMENT_BYTES {
            return Err("--audit-segment-bytes must be at least 65536".into());
        }
        let (audit_dir, audit_stdout) = match &self.audit_log {
            None => (Some(self.data_dir.join("audit")), false),
            Some(spec) => parse_destination(spec).map_err(|e| format!("TENSOR_WASM_API_AUDIT_LOG: {e}"))?,
        };
        let has_audit_dir = audit_dir.is_some();
        let audit = AuditConfig {
            dir: audit_dir,
            stdout: audit_stdout,
            segment_bytes: self.audit_segment_bytes as usize,
            retain_segments: self.audit_retention_segments,
            retain_bytes: Some(self.audit_retention_bytes).filter(|&b| b > 0),
            sync: match self.audit_sync {
                AuditSyncArg::Interval => AuditSync::Interval,
                AuditSyncArg::Always => AuditSync::Always,
                AuditSyncArg::None => AuditSync::None,
            },
            on_error: match self.audit_on_error {
                AuditOnErrorArg::Reject => AuditOnError::Reject,
                AuditOnErrorArg::Continue => AuditOnError::Continue,
            },
            // Set with the registry's section, which decides its default.
            replica: None,
            checkpoints: match &self.audit_signing_key {
                None => None,
                // A checkpoint is checked against the segment files: without them it proves nothing.
                Some(_) if !has_audit_dir => {
                    return Err("--audit-signing-key needs an audit directory (TENSOR_WASM_API_AUDIT_LOG=file:…)".into())
                }
                Some(path) => Some(CheckpointConfig {
                    key: std::sync::Arc::new(
                        crate::audit::checkpoint::SigningKey::load(path)
                            .map_err(|e| format!("--audit-signing-key: {e}"))?,
                    ),
                    interval: std::time::Duration::from_millis(self.audit_checkpoint_interval_ms),
                    file_bytes: self.audit_checkpoint_file_bytes,
                }),
            },
        };
        Ok(audit)
    }

    /// The I/O driver, with `--idle-spin-us`.
    fn io_driver(&self) -> Result<IoDriverChoice, String> {
        // Spinning needs epoll's non-blocking poll, which also takes other threads' wakes
        // (server/idle_spin.rs).
        let io_driver = match (self.io_driver, self.idle_spin_us) {
            (IoDriverArg::IoUring, 1..) => {
                return Err("--idle-spin-us needs the epoll driver: io_uring takes other threads' wakes only when it \
                            sleeps (use --io-driver auto or epoll, or --idle-spin-us 0)"
                    .into())
            }
            (IoDriverArg::Auto, 1..) | (IoDriverArg::Epoll, _) => IoDriverChoice::Epoll,
            (IoDriverArg::Auto, 0) => IoDriverChoice::Auto,
            (IoDriverArg::IoUring, 0) => IoDriverChoice::IoUring,
        };
        Ok(io_driver)
    }

    /// What one compile may take.
    fn compile_budget(&self) -> Result<CompileBudget, String> {
        positive("compile-timeout-ms", self.compile_timeout_ms)?;
        // A compile on one thread uses at most as much CPU time as wall-clock time: under its CPU
        // budget, the backstop would refuse a module that is too complex as if the host were busy.
        if self.compile_wall_timeout_ms < self.compile_timeout_ms {
            return Err(format!(
                "--compile-wall-timeout-ms ({}) is less than --compile-timeout-ms ({}): a compile could never use its CPU budget",
                self.compile_wall_timeout_ms, self.compile_timeout_ms
            ));
        }
        Ok(CompileBudget {
            memory_bytes: self.compile_memory_mb.saturating_mul(1024 * 1024),
            cpu: std::time::Duration::from_millis(self.compile_timeout_ms),
            wall: std::time::Duration::from_millis(self.compile_wall_timeout_ms),
            priority: self.compile_priority,
        })
    }

    /// The kernel dispatcher's settings (checked in `check_guests`).
    fn dispatch_config(&self) -> DispatchConfig {
        DispatchConfig {
            backend: match self.gpu {
                GpuArg::Auto => BackendChoice::Auto,
                GpuArg::Cuda => BackendChoice::Cuda,
                GpuArg::Host => BackendChoice::Host,
            },
            host_devices: self.gpu_host_devices.into(),
            streams_per_device: self.gpu_streams.into(),
            ring_depth: self.dispatch_ring_depth as usize,
            guest_spin: std::time::Duration::from_micros(self.dispatch_spin_us),
            max_ring_wait: std::time::Duration::from_millis(self.dispatch_max_wait_ms),
            tenant_quota_bytes: self.gpu_memory_per_tenant_mb.saturating_mul(1 << 20),
            max_tensors_per_session: self.max_tensors_per_invocation as usize,
            max_tensor_elements: self.max_tensor_elements,
            max_tickets_per_shard: self.dispatch_max_tickets_per_shard as usize,
            worker_spin: std::time::Duration::from_micros(self.dispatch_worker_spin_us),
            ..DispatchConfig::default()
        }
    }

    /// The limits every shard enforces (checked in `check_requests`, `check_capacity` and
    /// `check_guests`; the compile budget built and checked by `compile_budget`).
    fn limits(
        &self,
        per_tenant_body_bytes: u64,
        dev_mode: bool,
        sink_networks: SinkNetworks,
        compile_budget: CompileBudget,
    ) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_invoke_body_bytes: self.max_invoke_body_bytes,
            max_inflight_body_bytes: self.max_inflight_body_bytes,
            max_inflight_body_bytes_per_tenant: per_tenant_body_bytes,
            max_functions_per_tenant: self.max_functions_per_tenant,
            max_storage_bytes_per_tenant: self.max_storage_mb_per_tenant.saturating_mul(1024 * 1024),
            max_function_tensors_bytes: self.max_function_tensors_mb.saturating_mul(1024 * 1024),
            max_tensor_elements: self.max_tensor_elements,
            audit_reserve_bytes: self.audit_reserve_mb.saturating_mul(1024 * 1024),
            compile_budget: Some(compile_budget),
            load_threads: match self.load_threads {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            module_shape: crate::config::ModuleShape {
                max_functions: self.max_module_functions,
                max_code_bytes: self.max_module_code_bytes,
                max_function_body_bytes: self.max_function_body_bytes,
                max_table_elements: self.max_table_elements as usize,
                max_memory_limit_mb: self.max_memory_limit_mb,
            },
            max_concurrent_per_tenant: match self.max_concurrent_per_tenant {
                0 if dev_mode => self.max_instances,
                0 => self.max_instances.div_ceil(4),
                n => n,
            },
            max_header_bytes: self.max_header_bytes as usize,
            max_headers: self.max_headers as usize,
            header_timeout_ms: self.header_timeout_ms,
            body_timeout_ms: self.body_timeout_ms,
            write_timeout_ms: self.write_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            linger_ms: self.linger_ms,
            max_connections: self.max_connections as usize,
            max_instances: self.max_instances,
            default_timeout_ms: self.default_timeout_ms,
            max_timeout_ms: self.max_timeout_ms,
            default_memory_limit_mb: self.default_memory_limit_mb,
            max_memory_limit_mb: self.max_memory_limit_mb,
            max_output_bytes: self.max_output_bytes as usize,
            max_stderr_bytes: self.max_stderr_bytes as usize,
            epoch_tick_ms: self.epoch_tick_ms,
            guest_slice_us: self.guest_slice_us,
            sink_networks,
        }
    }
}

/// `--replica-id`, checked; without it, in a fleet (`--registry nats://…`) the host name, which
/// is the pod's name in Kubernetes and so tells the fleet's replicas apart, and on a single node
/// none, so that its records stay as they were. A host name that is no replica id stops start-up
/// too: records that do not say which replica wrote them would merge ambiguously.
fn replica_id(
    given: Option<&str>,
    registry: &RegistryConfig,
    host_name: impl FnOnce() -> Option<String>,
) -> Result<Option<ReplicaId>, String> {
    match (given, registry) {
        (Some(given), _) => ReplicaId::parse(given).map(Some).map_err(|e| format!("--replica-id {given:?} {e}")),
        (None, RegistryConfig::File) => Ok(None),
        (None, RegistryConfig::Nats(_)) => {
            let host = host_name().ok_or("--registry nats://… needs --replica-id: the host name cannot be read")?;
            ReplicaId::parse(&host).map(Some).map_err(|e| {
                format!("the host name {host:?}, the default --replica-id in a fleet, {e}: pass --replica-id")
            })
        }
    }
}

/// `v`, or an error naming `--{name}` when it is zero.
fn positive(name: &str, v: u64) -> Result<u64, String> {
    if v == 0 {
        return Err(format!("--{name} must be greater than 0"));
    }
    Ok(v)
}

/// `tensor-wasm serve`: validates the flags, then runs the server until it drains.
pub fn run(args: ServeArgs) -> i32 {
    crate::server::logging::init(&args.log_level);
    let config = match args.into_config() {
        Ok(c) => c,
        Err(reason) => {
            eprintln!("tensor-wasm: {reason}");
            return EXIT_USAGE;
        }
    };
    match crate::server::run(config) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tensor-wasm: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats() -> RegistryConfig {
        let timeout = std::time::Duration::from_secs(1);
        RegistryConfig::parse("nats://127.0.0.1:4222", None, (timeout, timeout, timeout), (1 << 20, 1)).unwrap()
    }

    #[test]
    fn the_replica_id_defaults_to_the_host_name_in_a_fleet_and_to_none_on_one_node() {
        let id = |text: &str| Some(ReplicaId::parse(text).unwrap());
        let host = || Some("tensor-wasm-7c9f-x2".to_string());
        assert_eq!(replica_id(None, &nats(), host), Ok(id("tensor-wasm-7c9f-x2")));
        assert_eq!(replica_id(None, &RegistryConfig::File, host), Ok(None));
        assert_eq!(replica_id(Some("r-1"), &RegistryConfig::File, host), Ok(id("r-1")));
        assert_eq!(replica_id(Some("r-1"), &nats(), host), Ok(id("r-1")));
        // A host name that is no replica id, or none at all, is not papered over.
        let err = replica_id(None, &nats(), || Some("a b".into())).unwrap_err();
        assert!(err.contains("\"a b\"") && err.contains("pass --replica-id"), "{err}");
        assert!(replica_id(None, &nats(), || None).unwrap_err().contains("needs --replica-id"));
        let err = replica_id(Some("r/1"), &nats(), host).unwrap_err();
        assert!(err.starts_with("--replica-id \"r/1\" holds '/'"), "{err}");
    }
}

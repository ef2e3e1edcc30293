//! Every error a request can end in, and the one place that maps each to an HTTP status and a
//! machine-readable `kind`. Bodies are always `{"error":{"kind":"…","message":"…"}}`.

use std::fmt;

use crate::http::{HeadError, Response, Status};

#[derive(Debug)]
pub enum ApiError {
    // --- protocol ---
    MalformedRequest(String),
    HeadersTooLarge {
        limit: usize,
    },
    TooManyHeaders {
        limit: usize,
    },
    BodyTooLarge {
        limit: u64,
    },
    RequestTimeout,
    UnsupportedTransferEncoding(String),
    ExpectationFailed(String),
    RouteNotFound,
    MethodNotAllowed {
        allow: &'static str,
    },
    // --- who may call ---
    Unauthorized,
    MissingTenant,
    InvalidTenant,
    DuplicateTenantHeader,
    DuplicateAuthorizationHeader,
    TenantScopeDenied {
        tenant: u64,
    },
    /// The tenant is at one of its quotas: `what` names it (`functions` or `storage`).
    QuotaExceeded {
        what: &'static str,
        used: u64,
        limit: u64,
    },
    RateLimited {
        retry_after_secs: u64,
    },
    /// A source address that keeps failing authentication is over its rate.
    UnauthenticatedRateLimited {
        retry_after_secs: u64,
    },
    /// The tenant's requests on this shard already hold `--max-inflight-body-bytes-per-tenant`.
    InflightBodyLimited {
        limit: u64,
    },
    /// The tenant's deploys and changes already fill its share of the catalog worker's queue.
    AdminQueueLimited {
        limit: usize,
    },
    /// The tenant already runs as many invocations as `--max-concurrent-per-tenant` allows.
    ConcurrencyLimited {
        limit: u32,
    },
    // --- request content ---
    InvalidJson(String),
    InvalidRequest(String),
    InvalidBase64(String),
    /// A deploy's `tensors_b64`, or a folder's `NAME.safetensors`: not base64, too large, not a
    /// safetensors file, or holding tensors no op can use.
    InvalidTensors(String),
    InvalidName(String),
    InvalidTimeout {
        given: i128,
        max: u64,
    },
    InvalidMemoryLimit {
        given: i128,
        max: u32,
    },
    InvalidModule(String),
    /// Compiling the module needed more than `--compile-memory-mb`.
    ModuleTooComplex(String),
    /// The compile used more than `--compile-timeout-ms` of CPU time: the module is too complex,
    /// however busy the host.
    CompileTimeout {
        timeout_ms: u64,
    },
    /// The compile ran past `--compile-wall-timeout-ms` within its CPU budget: the host left it
    /// too little CPU, which a later try may not.
    CompileStarved {
        wall_ms: u64,
    },
    /// The module defines more functions than `--max-module-functions`.
    TooManyFunctions {
        count: u32,
        limit: u32,
    },
    /// The module's code section is over `--max-module-code-bytes`.
    CodeTooLarge {
        bytes: u64,
        limit: u64,
    },
    /// One function body is over `--max-function-body-bytes`.
    FunctionTooLarge {
        bytes: usize,
        limit: u32,
    },
    /// A table of the module starts with more elements than `--max-table-elements`.
    TableTooLarge {
        elements: u64,
        limit: usize,
    },
    /// The module defines more tables than an instance slot holds.
    TooManyTables {
        count: usize,
        limit: usize,
    },
    /// The module defines more memories than an instance slot holds.
    TooManyMemories {
        count: usize,
        limit: usize,
    },
    /// A memory of the module starts larger than `--max-memory-limit-mb`.
    MemoryTooLarge {
        bytes: u64,
        limit_mb: u32,
    },
    UnsupportedImport(String),
    ImportMismatch(String),
    FunctionNotFound(String),
    /// A stored function whose module cannot be loaded (`DeployedFunction::broken`).
    FunctionUnavailable {
        id: String,
        reason: String,
    },
    InvalidInvokeRequest(String),
    ExportNotFound(String),
    /// An envelope function's request body is not JSON.
    InvalidPayload(String),
    /// The function or pipeline is managed by the functions directory; the API may not change it.
    ManagedByDirectory {
        what: &'static str,
        name: String,
    },
    PipelineNotFound(String),
    InvalidPipeline(String),
    // --- guest outcome ---
    InvokeTimeout {
        timeout_ms: u64,
    },
    MemoryLimitExceeded {
        limit_mb: u32,
    },
    GuestTrap(String),
    GuestExit {
        code: i32,
    },
    OutputTooLarge {
        limit: usize,
    },
    /// An envelope function's stdout is not a `{"payload", "headers"}` object.
    InvalidEnvelopeOutput(String),
    EnvelopeMissingPayload,
    /// A pipeline's own deadline passed (each step's deadline is `InvokeTimeout`).
    PipelineTimeout {
        timeout_ms: u64,
    },
    /// A pipeline step failed: the step's own error, and which step it was.
    /// `function` is the step's reference as written, `function_id` what it resolved to.
    PipelineStep {
        index: usize,
        function: String,
        function_id: Option<String>,
        error: Box<ApiError>,
    },
    SinkDeliveryFailed {
        url: String,
        attempts: u32,
        last: String,
    },
    /// The delivery did not succeed within `--sink-max-delivery-ms`, retries included.
    SinkDeliveryTimeout {
        url: String,
        limit_ms: u64,
        attempts: u32,
        last: String,
    },
    /// The tenant already has `--sink-max-inflight-per-tenant` deliveries queued or running.
    SinkConcurrencyLimited {
        limit: u32,
    },
    // --- server state ---
    Overloaded(&'static str),
    AuditUnavailable,
    /// `--registry nats://…` and NATS did not acknowledge a deploy or delete: nothing changed.
    RegistryUnavailable(String),
    /// The registry's object store has no room for a deploy's files (`--registry-max-object-mb`):
    /// a retry cannot help until room is made.
    RegistryFull(String),
    /// Another replica deployed a function of the same name and tenant while this deploy was
    /// under way: the registry's compare-and-set on the name decided for the other.
    DeployConflict(String),
    NotReady,
    Draining,
    /// A deploy would leave the data dir's file system with less free space than the audit log's
    /// reserve.
    InsufficientStorage {
        needed: u64,
        reserve: u64,
    },
    Storage(String),
    Internal(String),
    /// A branch that cannot happen did (`bug!`): what the code expected, said to the client; the
    /// log has where and the details.
    Bug(&'static str),
}

/// `bug!("what was expected")` or `bug!("what was expected", "details {}", x)`: a branch that
/// cannot happen. Debug builds panic, so tests find it; release builds log it with where it
/// happened and evaluate to [`ApiError::Bug`], so one request fails with 500 `internal`, not the
/// shard. Only the details, which may name internals, stay out of the answer. Like wasmtime's
/// `bail_bug!`.
macro_rules! bug {
    ($what:literal) => {
        $crate::error::report_bug($what, format_args!(""))
    };
    ($what:literal, $($details:tt)+) => {
        $crate::error::report_bug($what, format_args!($($details)+))
    };
}
pub(crate) use bug;

/// What [`bug!`] calls.
#[track_caller]
#[doc(hidden)]
pub fn report_bug(what: &'static str, details: fmt::Arguments<'_>) -> ApiError {
    on_bug(what, details, cfg!(debug_assertions))
}

#[track_caller]
fn on_bug(what: &'static str, details: fmt::Arguments<'_>, panic: bool) -> ApiError {
    let at = std::panic::Location::caller();
    if panic {
        panic!("bug at {at}: {what} {details}");
    }
    tracing::error!(%at, "bug: {what} {details}");
    ApiError::Bug(what)
}

impl ApiError {
    pub fn status(&self) -> Status {
        use ApiError::*;
        match self {
            MalformedRequest(_)
            | InvalidJson(_)
            | InvalidRequest(_)
            | InvalidBase64(_)
            | InvalidTensors(_)
            | InvalidName(_)
            | InvalidTimeout { .. }
            | InvalidMemoryLimit { .. }
            | InvalidModule(_)
            | TooManyFunctions { .. }
            | ModuleTooComplex(_)
            | CompileTimeout { .. }
            | CodeTooLarge { .. }
            | FunctionTooLarge { .. }
            | TableTooLarge { .. }
            | TooManyTables { .. }
            | TooManyMemories { .. }
            | MemoryTooLarge { .. }
            | UnsupportedImport(_)
            | ImportMismatch(_)
            | InvalidInvokeRequest(_)
            | ExportNotFound(_)
            | InvalidPayload(_)
            | InvalidPipeline(_)
            | MissingTenant
            | InvalidTenant
            | DuplicateTenantHeader
            | DuplicateAuthorizationHeader => Status::BadRequest,
            Unauthorized => Status::Unauthorized,
            TenantScopeDenied { .. } | QuotaExceeded { .. } => Status::Forbidden,
            InsufficientStorage { .. } | RegistryFull(_) => Status::InsufficientStorage,
            RateLimited { .. }
            | ConcurrencyLimited { .. }
            | UnauthenticatedRateLimited { .. }
            | InflightBodyLimited { .. }
            | AdminQueueLimited { .. }
            | SinkConcurrencyLimited { .. } => Status::TooManyRequests,
            HeadersTooLarge { .. } | TooManyHeaders { .. } => Status::RequestHeaderFieldsTooLarge,
            BodyTooLarge { .. } => Status::PayloadTooLarge,
            RequestTimeout => Status::RequestTimeout,
            UnsupportedTransferEncoding(_) => Status::NotImplemented,
            ExpectationFailed(_) => Status::ExpectationFailed,
            RouteNotFound | FunctionNotFound(_) | PipelineNotFound(_) => Status::NotFound,
            ManagedByDirectory { .. } | DeployConflict(_) => Status::Conflict,
            MethodNotAllowed { .. } => Status::MethodNotAllowed,
            // The function, not the server, failed: the gateway convention.
            GuestTrap(_)
            | GuestExit { .. }
            | MemoryLimitExceeded { .. }
            | OutputTooLarge { .. }
            | InvalidEnvelopeOutput(_)
            | EnvelopeMissingPayload
            | SinkDeliveryFailed { .. } => Status::BadGateway,
            InvokeTimeout { .. } | PipelineTimeout { .. } | SinkDeliveryTimeout { .. } => Status::GatewayTimeout,
            PipelineStep { error, .. } => error.status(),
            Overloaded(_)
            | CompileStarved { .. }
            | AuditUnavailable
            | RegistryUnavailable(_)
            | NotReady
            | Draining
            | FunctionUnavailable { .. } => Status::ServiceUnavailable,
            Storage(_) | Internal(_) | Bug(_) => Status::InternalServerError,
        }
    }

    pub fn kind(&self) -> &'static str {
        use ApiError::*;
        match self {
            MalformedRequest(_) => "malformed_request",
            HeadersTooLarge { .. } => "headers_too_large",
            TooManyHeaders { .. } => "too_many_headers",
            BodyTooLarge { .. } => "body_too_large",
            RequestTimeout => "request_timeout",
            UnsupportedTransferEncoding(_) => "unsupported_transfer_encoding",
            ExpectationFailed(_) => "expectation_failed",
            RouteNotFound => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            Unauthorized => "unauthorized",
            MissingTenant => "missing_tenant",
            InvalidTenant => "invalid_tenant",
            DuplicateTenantHeader => "duplicate_tenant_header",
            DuplicateAuthorizationHeader => "duplicate_authorization_header",
            TenantScopeDenied { .. } => "tenant_scope_denied",
            QuotaExceeded { .. } => "quota_exceeded",
            InsufficientStorage { .. } => "insufficient_storage",
            RegistryFull(_) => "registry_full",
            DeployConflict(_) => "conflict",
            RateLimited { .. } => "rate_limited",
            ConcurrencyLimited { .. } => "concurrency_limited",
            InflightBodyLimited { .. } => "inflight_body_limited",
            AdminQueueLimited { .. } => "admin_queue_limited",
            UnauthenticatedRateLimited { .. } => "unauthenticated_rate_limited",
            InvalidJson(_) => "invalid_json",
            InvalidRequest(_) => "invalid_request",
            InvalidBase64(_) => "invalid_base64",
            InvalidTensors(_) => "invalid_tensors",
            InvalidName(_) => "invalid_name",
            InvalidTimeout { .. } => "invalid_timeout",
            InvalidMemoryLimit { .. } => "invalid_memory_limit",
            InvalidModule(_) => "invalid_module",
            TooManyFunctions { .. } => "too_many_functions",
            ModuleTooComplex(_) | CompileTimeout { .. } => "module_too_complex",
            CodeTooLarge { .. } => "code_too_large",
            FunctionTooLarge { .. } => "function_too_large",
            TableTooLarge { .. } => "table_too_large",
            TooManyTables { .. } => "too_many_tables",
            TooManyMemories { .. } => "too_many_memories",
            MemoryTooLarge { .. } => "memory_too_large",
            UnsupportedImport(_) => "unsupported_import",
            ImportMismatch(_) => "import_mismatch",
            FunctionNotFound(_) => "function_not_found",
            FunctionUnavailable { .. } => "function_unavailable",
            InvalidInvokeRequest(_) => "invalid_invoke_request",
            ExportNotFound(_) => "export_not_found",
            InvalidPayload(_) => "invalid_payload",
            ManagedByDirectory { .. } => "managed_by_directory",
            PipelineNotFound(_) => "pipeline_not_found",
            InvalidPipeline(_) => "invalid_pipeline",
            InvalidEnvelopeOutput(_) => "invalid_envelope_output",
            EnvelopeMissingPayload => "envelope_missing_payload",
            PipelineTimeout { .. } => "pipeline_timeout",
            PipelineStep { error, .. } => error.kind(),
            SinkDeliveryFailed { .. } => "sink_delivery_failed",
            SinkDeliveryTimeout { .. } => "sink_delivery_timeout",
            SinkConcurrencyLimited { .. } => "sink_concurrency_limited",
            InvokeTimeout { .. } => "invoke_timeout",
            MemoryLimitExceeded { .. } => "memory_limit_exceeded",
            GuestTrap(_) => "guest_trap",
            GuestExit { .. } => "guest_exit",
            OutputTooLarge { .. } => "output_too_large",
            Overloaded(_) | CompileStarved { .. } => "overloaded",
            AuditUnavailable => "audit_unavailable",
            RegistryUnavailable(_) => "registry_unavailable",
            NotReady => "not_ready",
            Draining => "draining",
            Storage(_) => "storage_error",
            Internal(_) | Bug(_) => "internal",
        }
    }

    /// Headers this error adds to its response.
    pub fn extra_headers(&self) -> Option<(&'static str, String)> {
        match self {
            ApiError::PipelineStep { error, .. } => error.extra_headers(),
            ApiError::MethodNotAllowed { allow } => Some(("allow", allow.to_string())),
            ApiError::Unauthorized => Some(("www-authenticate", "Bearer realm=\"tensor-wasm\"".into())),
            ApiError::Overloaded(_)
            | ApiError::CompileStarved { .. }
            | ApiError::AuditUnavailable
            | ApiError::RegistryUnavailable(_)
            | ApiError::NotReady
            | ApiError::Draining
            | ApiError::ConcurrencyLimited { .. }
            | ApiError::InflightBodyLimited { .. }
            | ApiError::AdminQueueLimited { .. }
            | ApiError::SinkConcurrencyLimited { .. } => Some(("retry-after", "1".into())),
            ApiError::RateLimited { retry_after_secs } | ApiError::UnauthenticatedRateLimited { retry_after_secs } => {
                Some(("retry-after", retry_after_secs.to_string()))
            }
            _ => None,
        }
    }

    /// Whether the connection must close after this error: the request framing may be lost.
    pub fn closes_connection(&self) -> bool {
        use ApiError::*;
        matches!(
            self,
            MalformedRequest(_)
                | HeadersTooLarge { .. }
                | TooManyHeaders { .. }
                | BodyTooLarge { .. }
                | RequestTimeout
                | UnsupportedTransferEncoding(_)
                | ExpectationFailed(_)
        )
    }

    /// `{"error":{"kind":…,"message":…}}`, plus `"step":{"index":…,"function":…}` when a pipeline
    /// step failed.
    pub fn to_body(&self) -> Vec<u8> {
        let mut error = serde_json::json!({"kind": self.kind(), "message": self.to_string()});
        if let ApiError::PipelineStep { index, function, function_id, .. } = self {
            error["step"] = serde_json::json!({"index": index, "function": function, "function_id": function_id});
        }
        serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default()
    }
}

impl From<HeadError> for ApiError {
    fn from(e: HeadError) -> Self {
        match e {
            HeadError::Malformed(m) => ApiError::MalformedRequest(m),
            HeadError::TooLarge { limit } => ApiError::HeadersTooLarge { limit },
            HeadError::TooManyHeaders { limit } => ApiError::TooManyHeaders { limit },
            HeadError::UnsupportedTransferEncoding(coding) => ApiError::UnsupportedTransferEncoding(coding),
            HeadError::ExpectationFailed(expect) => ApiError::ExpectationFailed(expect),
        }
    }
}

impl ApiError {
    /// The answer to a request that ended in this error: its status, `{"error":{...}}` body, kind
    /// (for the metrics and the audit log) and any header it carries (`retry-after`, `allow`).
    pub fn response(&self) -> Response {
        let mut r = Response::json(self.status(), self.to_body());
        r.error_kind = Some(self.kind());
        if let Some((name, value)) = self.extra_headers() {
            r.headers.push((std::borrow::Cow::Borrowed(name), value));
        }
        r
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ApiError::*;
        match self {
            MalformedRequest(m) => write!(f, "malformed HTTP request: {m}"),
            HeadersTooLarge { limit } => write!(f, "request head exceeds {limit} bytes"),
            TooManyHeaders { limit } => write!(f, "request has more than {limit} header fields"),
            BodyTooLarge { limit } => write!(f, "request body exceeds {limit} bytes"),
            RequestTimeout => write!(f, "the request was not received in time"),
            UnsupportedTransferEncoding(te) => {
                write!(f, "transfer-encoding `{te}` is not supported; use chunked")
            }
            ExpectationFailed(e) => write!(f, "expectation `{e}` is not supported"),
            Unauthorized => write!(f, "a valid `authorization: Bearer <token>` header is required"),
            MissingTenant => write!(f, "the `x-tensor-wasm-tenant` header is required"),
            InvalidTenant => write!(f, "`x-tensor-wasm-tenant` must be an unsigned 64-bit integer"),
            DuplicateTenantHeader => write!(f, "`x-tensor-wasm-tenant` appears more than once"),
            DuplicateAuthorizationHeader => write!(f, "`authorization` appears more than once"),
            TenantScopeDenied { tenant } => write!(f, "this token may not act for tenant {tenant}"),
            QuotaExceeded { what: "functions", used, limit } => {
                write!(f, "quota `functions` exceeded: the tenant has {used} functions, and may have {limit}")
            }
            QuotaExceeded { what, used, limit } => {
                write!(f, "quota `{what}` exceeded: the tenant's modules would take {used} bytes, and may take {limit}")
            }
            // Not the free space itself: that is the host's, not a tenant's to learn.
            InsufficientStorage { needed, reserve } => write!(
                f,
                "storing this module ({needed} bytes) would leave less free space than the {reserve} bytes kept \
                 for the audit log"
            ),
            RateLimited { retry_after_secs } => {
                write!(f, "this token is over its request rate; retry in {retry_after_secs} s")
            }
            UnauthenticatedRateLimited { retry_after_secs } => {
                write!(f, "too many requests from this address failed authentication; retry in {retry_after_secs} s")
            }
            AdminQueueLimited { limit } => write!(
                f,
                "this tenant already has {limit} deploys and changes waiting for the catalog worker; retry shortly"
            ),
            InflightBodyLimited { limit } => {
                write!(f, "this tenant's requests on this shard already hold {limit} bytes of bodies; retry shortly")
            }
            ConcurrencyLimited { limit } => write!(
                f,
                "this tenant already runs as many invocations as it may ({limit} in the whole server); retry shortly"
            ),
            RouteNotFound => write!(f, "no such route"),
            MethodNotAllowed { allow } => {
                write!(f, "method not allowed on this route; allowed: {allow}")
            }
            InvalidJson(m) => write!(f, "request body is not valid JSON: {m}"),
            InvalidRequest(m) => write!(f, "{m}"),
            InvalidBase64(m) => write!(f, "`wasm_b64` is not valid base64: {m}"),
            InvalidTensors(m) => write!(f, "invalid tensors: {m}"),
            InvalidName(m) => write!(f, "{m}"),
            InvalidTimeout { given, max } => {
                write!(f, "`timeout_ms` must be between 1 and {max}, got {given}")
            }
            InvalidMemoryLimit { given, max } => {
                write!(f, "`memory_limit_mb` must be between 1 and {max}, got {given}")
            }
            InvalidModule(m) => write!(f, "not a valid WebAssembly module: {m}"),
            ModuleTooComplex(why) => write!(f, "the module is too complex for this server to compile: {why}"),
            CompileTimeout { timeout_ms } => write!(
                f,
                "the module is too complex for this server to compile: compiling it took more than \
                 --compile-timeout-ms ({timeout_ms} ms) of CPU time"
            ),
            CompileStarved { wall_ms } => write!(
                f,
                "the server is too busy to compile the module now: it got too little CPU to finish within \
                 --compile-wall-timeout-ms ({wall_ms} ms); try again later"
            ),
            TooManyFunctions { count, limit } => {
                write!(f, "the module defines {count} functions, more than the {limit} this server compiles")
            }
            CodeTooLarge { bytes, limit } => {
                write!(f, "the module has {bytes} bytes of code, more than the {limit} this server compiles")
            }
            FunctionTooLarge { bytes, limit } => {
                write!(f, "the module has a function body of {bytes} bytes, more than the {limit} this server compiles")
            }
            TableTooLarge { elements, limit } => write!(
                f,
                "the module has a table of {elements} elements, which exceeds the limit of {limit} \
                 (--max-table-elements)"
            ),
            TooManyTables { count, limit } => {
                write!(f, "the module defines {count} tables, more than the {limit} an instance may have")
            }
            TooManyMemories { count, limit } => {
                write!(f, "the module defines {count} memories, more than the {limit} an instance may have")
            }
            MemoryTooLarge { bytes, limit_mb } => write!(
                f,
                "the module has a memory that starts at {bytes} bytes, more than the limit of {limit_mb} MiB \
                 (--max-memory-limit-mb)"
            ),
            UnsupportedImport(m) => write!(f, "{m}"),
            ImportMismatch(m) => write!(f, "{m}"),
            FunctionNotFound(id) => write!(f, "function `{id}` not found"),
            FunctionUnavailable { id, reason } => write!(f, "function `{id}` is stored but cannot run: {reason}"),
            InvalidInvokeRequest(m) => write!(f, "{m}"),
            ExportNotFound(name) => write!(f, "the module exports no function `{name}`"),
            InvalidPayload(m) => {
                write!(f, "the function speaks the JSON envelope ABI, so the request body must be JSON, but {m}")
            }
            ManagedByDirectory { what, name } => write!(
                f,
                "the {what} `{name}` is loaded from the functions directory; change it there, not through the API"
            ),
            PipelineNotFound(id) => write!(f, "pipeline `{id}` not found"),
            InvalidPipeline(m) => write!(f, "{m}"),
            InvalidEnvelopeOutput(m) => {
                write!(f, "the function's output is not a JSON envelope {{\"payload\", \"headers\"}}: {m}")
            }
            EnvelopeMissingPayload => write!(f, "the function's output envelope has no `payload`"),
            PipelineTimeout { timeout_ms } => write!(f, "the pipeline did not finish within {timeout_ms} ms"),
            PipelineStep { index, function, error, .. } => write!(f, "step {index} (`{function}`) failed: {error}"),
            SinkDeliveryFailed { url, attempts, last } => {
                write!(f, "delivery to the sink {url} failed after {attempts} attempt(s); last: {last}")
            }
            SinkDeliveryTimeout { url, limit_ms, attempts, last } => write!(
                f,
                "delivery to the sink {url} did not succeed within --sink-max-delivery-ms ({limit_ms} ms), \
                 retries included, after {attempts} attempt(s); last: {last}"
            ),
            SinkConcurrencyLimited { limit } => write!(
                f,
                "this tenant already has {limit} sink deliveries in flight, the most \
                 --sink-max-inflight-per-tenant allows; retry later"
            ),
            InvokeTimeout { timeout_ms } => {
                write!(f, "the function did not finish within {timeout_ms} ms")
            }
            MemoryLimitExceeded { limit_mb } => {
                write!(f, "the function tried to grow its memory beyond its {limit_mb} MiB limit")
            }
            GuestTrap(m) => write!(f, "the function trapped: {m}"),
            GuestExit { code } => write!(f, "the function exited with code {code}"),
            OutputTooLarge { limit } => {
                write!(f, "the function wrote more than {limit} bytes to stdout")
            }
            Overloaded(what) => write!(f, "server overloaded: {what}; retry later"),
            AuditUnavailable => write!(f, "the audit log cannot be written, so protected requests are refused"),
            RegistryFull(why) => {
                write!(f, "the fleet's registry has no room for this deploy's files, so nothing changed: {why}")
            }
            DeployConflict(why) => write!(f, "a concurrent deploy of the same name won, so nothing changed: {why}"),
            RegistryUnavailable(why) => {
                write!(f, "the fleet's registry did not take the change, so nothing changed; retry later: {why}")
            }
            NotReady => write!(f, "the server is starting and has not loaded its functions yet"),
            Draining => write!(f, "the server is shutting down"),
            Storage(m) => write!(f, "storage error: {m}"),
            Internal(m) => write!(f, "internal error: {m}"),
            Bug(what) => write!(f, "internal error: a bug in the server ({what}); its log says where"),
        }
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::{on_bug, ApiError};
    use crate::http::Status;

    #[test]
    fn a_bug_in_a_release_build_is_a_500_internal_without_its_details() {
        let e = on_bug("a live ticket is waiting or done", format_args!("ticket {}", 7), false);
        assert!(matches!(e, ApiError::Bug("a live ticket is waiting or done")));
        assert_eq!(e.status(), Status::InternalServerError);
        assert_eq!(e.kind(), "internal");
        assert!(e.to_string().contains("a live ticket is waiting or done"), "{e}");
        assert!(!e.to_string().contains("ticket 7"), "the details stay in the log: {e}");
    }

    #[test]
    #[should_panic(expected = "bug at src/error.rs")]
    fn a_bug_in_a_debug_build_panics_where_it_happened() {
        let _ = on_bug("it cannot happen", format_args!(""), true);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "it cannot happen: details 3")]
    fn the_macro_panics_in_this_debug_build() {
        let _ = super::bug!("it cannot happen:", "details {}", 3);
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn the_macro_is_an_error_in_this_release_build() {
        assert!(matches!(super::bug!("it cannot happen"), ApiError::Bug("it cannot happen")));
    }
}

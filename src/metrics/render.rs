use std::fmt::Write;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tensor_wasm_dispatch::{Dispatcher, Op};

use super::shard::{Histogram, ShardMetrics};
use crate::http::{Method, Status};
use crate::route::Route;

/// What the functions directory's watcher has done, for `/metrics`.
#[derive(Default)]
pub struct DirectoryStats {
    /// Functions and pipelines added, replaced or removed.
    pub changes: AtomicU64,
    /// Modules, manifests and files that could not be loaded.
    pub errors: AtomicU64,
}

/// One token's requests, summed over the shards.
pub struct TokenCounts<'a> {
    /// The token's `token_id`.
    pub id: &'a str,
    pub admitted: u64,
    /// Refused with 429 for the token's rate.
    pub limited: u64,
}

/// What a scrape reads besides the shards' own figures.
pub struct ScrapeContext<'a> {
    pub shards: &'a [Arc<ShardMetrics>],
    pub functions: usize,
    /// Of those, the ones whose stored module cannot be loaded.
    pub broken_functions: usize,
    pub pipelines: usize,
    /// `None` without `--functions-dir`.
    pub directory: Option<&'a DirectoryStats>,
    pub ready: bool,
    /// Every token of the current list; `None` in dev mode.
    pub tokens: Option<Vec<TokenCounts<'a>>>,
    /// The audit group commit's fdatasync durations.
    pub audit_sync: &'a Histogram,
    pub dispatcher: &'a Dispatcher,
    /// `None` without a fleet registry (`--registry file`).
    pub registry: Option<RegistryFigures<'a>>,
    /// With fleet-wide rate limits: the replicas this one counts (itself included) and whether
    /// it hears the fleet now.
    pub fleet: Option<(u64, bool)>,
}

/// The fleet registry's state, as `/metrics` shows it.
pub struct RegistryFigures<'a> {
    /// Watching the registry's bucket now.
    pub connected: bool,
    /// Seconds since the replica was last in step with it; `None` before it ever was.
    pub stale_seconds: Option<f64>,
    /// Resynchronisations: the first connect and every reconnect.
    pub syncs: u64,
    /// From publication to serving here, for the watch's changes.
    pub propagation: &'a Histogram,
    pub late_changes: u64,
    pub repairs: u64,
}

/// Renders every metric in the Prometheus text exposition format (0.0.4).
pub fn render(ctx: &ScrapeContext<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let shards = ctx.shards;

    header(&mut out, "tensor_wasm_build_info", "gauge", "Build information; always 1.");
    let _ = writeln!(out, "tensor_wasm_build_info{{version=\"{}\",wasmtime=\"48.0.8\"}} 1", env!("CARGO_PKG_VERSION"));
    header(&mut out, "tensor_wasm_shards", "gauge", "Number of shards (pinned threads) serving.");
    let _ = writeln!(out, "tensor_wasm_shards {}", shards.len());
    header(&mut out, "tensor_wasm_ready", "gauge", "1 when /readyz answers 200.");
    let _ = writeln!(out, "tensor_wasm_ready {}", u8::from(ctx.ready));
    header(
        &mut out,
        "tensor_wasm_functions_total",
        "gauge",
        "Functions deployed, broken ones (tensor_wasm_functions_broken) included.",
    );
    let _ = writeln!(out, "tensor_wasm_functions_total {}", ctx.functions);
    header(
        &mut out,
        "tensor_wasm_functions_broken",
        "gauge",
        "Functions listed whose stored module cannot be loaded; invoking one answers 503 function_unavailable.",
    );
    let _ = writeln!(out, "tensor_wasm_functions_broken {}", ctx.broken_functions);
    header(&mut out, "tensor_wasm_pipelines_total", "gauge", "Pipelines defined.");
    let _ = writeln!(out, "tensor_wasm_pipelines_total {}", ctx.pipelines);
    if let Some(dir) = ctx.directory {
        use std::sync::atomic::Ordering::Relaxed;
        header(
            &mut out,
            "tensor_wasm_functions_dir_changes_total",
            "counter",
            "Functions and pipelines added, replaced or removed from the functions directory.",
        );
        let _ = writeln!(out, "tensor_wasm_functions_dir_changes_total {}", dir.changes.load(Relaxed));
        header(
            &mut out,
            "tensor_wasm_functions_dir_errors_total",
            "counter",
            "Modules, manifests and files in the functions directory that could not be loaded.",
        );
        let _ = writeln!(out, "tensor_wasm_functions_dir_errors_total {}", dir.errors.load(Relaxed));
    }

    if let Some(registry) = &ctx.registry {
        registry_metrics(&mut out, registry);
    }
    if let Some((replicas, hearing)) = ctx.fleet {
        header(
            &mut out,
            "tensor_wasm_fleet_replicas",
            "gauge",
            "Replicas sharing each token's rate, this one included: heard within --rate-limit-peer-timeout-ms, or the last known while NATS is away.",
        );
        let _ = writeln!(out, "tensor_wasm_fleet_replicas {replicas}");
        header(
            &mut out,
            "tensor_wasm_fleet_limits_connected",
            "gauge",
            "1 while the replica hears the fleet's demand; 0: it admits each token's rate divided by tensor_wasm_fleet_replicas.",
        );
        let _ = writeln!(out, "tensor_wasm_fleet_limits_connected {}", u8::from(hearing));
    }

    header(&mut out, "tensor_wasm_http_requests_total", "counter", "HTTP requests answered.");
    for route in Route::ALL {
        for method in Method::ALL {
            for status in Status::ALL {
                let n: u64 = shards.iter().map(|s| s.request_count(route, method, status)).sum();
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "tensor_wasm_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{}\"}} {n}",
                        route.template(),
                        method.as_str(),
                        status.code()
                    );
                }
            }
        }
    }

    header(&mut out, "tensor_wasm_http_request_duration_seconds", "histogram", "Server time per HTTP request.");
    for route in Route::ALL {
        for method in Method::ALL {
            let labels = format!("route=\"{}\",method=\"{}\"", route.template(), method.as_str());
            let series: Vec<&Histogram> = shards.iter().map(|s| s.histogram(route, method)).collect();
            histogram(&mut out, "tensor_wasm_http_request_duration_seconds", &labels, &series);
        }
    }

    header(&mut out, "tensor_wasm_audit_sync_seconds", "histogram", "Time of each audit group commit (fdatasync).");
    histogram(&mut out, "tensor_wasm_audit_sync_seconds", "", &[ctx.audit_sync]);

    let sum = |f: fn(&ShardMetrics) -> u64| shards.iter().map(|s| f(s)).sum::<u64>();
    let process_wide: [(&str, &str, &str, u64); 16] = [
        ("tensor_wasm_audit_records_total", "counter", "Audit records written.", sum(|s| s.audit_records.get())),
        ("tensor_wasm_audit_bytes_total", "counter", "Bytes of audit records written.", sum(|s| s.audit_bytes.get())),
        (
            "tensor_wasm_audit_errors_total",
            "counter",
            "Audit log failures: a segment that could not be created or synced, a record lost.",
            sum(|s| s.audit_errors.get()),
        ),
        (
            "tensor_wasm_audit_integrity_failures_total",
            "counter",
            "Audit segments found at start-up holding a complete record that does not verify (tampering).",
            sum(|s| s.audit_integrity_failures.get()),
        ),
        (
            "tensor_wasm_audit_checkpoints_total",
            "counter",
            "Signed audit checkpoints written.",
            sum(|s| s.audit_checkpoints.get()),
        ),
        (
            "tensor_wasm_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed (a missing or untrusted client certificate included).",
            sum(|s| s.tls_handshake_failures.get()),
        ),
        (
            "tensor_wasm_xfcc_ignored_total",
            "counter",
            "X-Forwarded-Client-Cert headers ignored because the peer is not a trusted proxy.",
            sum(|s| s.xfcc_ignored.get()),
        ),
        ("tensor_wasm_active_instances", "gauge", "Wasm instances running now.", sum(|s| s.active_instances.get())),
        (
            "tensor_wasm_slice_timer_ticks_total",
            "counter",
            "Ticks of the shards' slice timers, which end long-running guests' slices while a shard has some.",
            sum(|s| s.slice_timer_ticks.get()),
        ),
        (
            "tensor_wasm_instance_spawns_total",
            "counter",
            "Wasm instances created (one per invocation).",
            sum(|s| s.instance_spawns.get()),
        ),
        (
            "tensor_wasm_invocations_failed_total",
            "counter",
            "Invocations that ended in an error.",
            sum(|s| s.invocations_failed.get()),
        ),
        ("tensor_wasm_connections", "gauge", "Open HTTP connections.", sum(|s| s.connections.get())),
        (
            "tensor_wasm_connections_refused_total",
            "counter",
            "Connections refused at the connection limit.",
            sum(|s| s.connections_refused.get()),
        ),
        (
            "tensor_wasm_body_budget_refusals_total",
            "counter",
            "Requests refused with 503 before their body was read: the shard held --max-inflight-body-bytes.",
            sum(|s| s.body_budget_refusals.get()),
        ),
        (
            "tensor_wasm_concurrency_limited_total",
            "counter",
            "Invocations refused with 429 concurrency_limited: the tenant ran its --max-concurrent-per-tenant.",
            sum(|s| s.concurrency_refusals.get()),
        ),
        (
            "tensor_wasm_audit_refusals_coalesced_total",
            "counter",
            "401s and 429s left out of the audit log: at most one record per source or token and kind per second carries the count.",
            sum(|s| s.audit_refusals_coalesced.get()),
        ),
    ];
    for (name, kind, help, value) in process_wide {
        header(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }

    if let Some(tokens) = &ctx.tokens {
        let mut entries: Vec<_> = tokens.iter().collect();
        entries.sort_by(|a, b| a.id.cmp(b.id));
        let per_token: [(&str, &str, TokenSample); 2] = [
            ("tensor_wasm_rate_limit_admitted_total", "Requests admitted, per token.", |e| e.admitted),
            ("tensor_wasm_rate_limit_limited_total", "Requests refused with 429 for the token's rate.", |e| e.limited),
        ];
        for (name, help, value) in per_token {
            header(&mut out, name, "counter", help);
            for e in &entries {
                let _ = writeln!(out, "{name}{{token_id=\"{}\"}} {}", e.id, value(e));
            }
        }
    }

    dispatch(&mut out, shards, ctx.dispatcher);

    let per_shard: [(&str, &str, &str, ShardSample); 3] = [
        ("tensor_wasm_shard_requests_total", "counter", "HTTP requests answered, per shard.", |s| {
            (String::new(), s.total_requests())
        }),
        ("tensor_wasm_shard_connections_accepted_total", "counter", "Connections accepted, per shard.", |s| {
            (String::new(), s.connections_accepted.get())
        }),
        ("tensor_wasm_shard_io_driver", "gauge", "The I/O driver of each shard: io_uring or epoll.", |s| {
            (format!(",driver=\"{}\"", s.io_driver().label()), 1)
        }),
    ];
    for (name, kind, help, sample) in per_shard {
        header(&mut out, name, kind, help);
        for s in shards {
            let (labels, value) = sample(s);
            let _ = writeln!(out, "{name}{{shard=\"{}\"{labels}}} {value}", s.shard);
        }
    }
    out
}

/// The fleet's registry: whether this replica watches it, how stale its catalog may be, how often
/// it resynchronised.
fn registry_metrics(out: &mut String, registry: &RegistryFigures) {
    header(out, "tensor_wasm_registry_connected", "gauge", "1 while the replica watches the registry's bucket.");
    let _ = writeln!(out, "tensor_wasm_registry_connected {}", u8::from(registry.connected));
    header(
        out,
        "tensor_wasm_registry_stale_seconds",
        "gauge",
        "Seconds since the replica was last in step with the registry (0 while it watches it); absent before it ever was.",
    );
    if let Some(stale) = registry.stale_seconds {
        let _ = writeln!(out, "tensor_wasm_registry_stale_seconds {stale:.3}");
    }
    header(
        out,
        "tensor_wasm_registry_syncs_total",
        "counter",
        "Resynchronisations from the registry's bucket: the first connect and every reconnect.",
    );
    let _ = writeln!(out, "tensor_wasm_registry_syncs_total {}", registry.syncs);
    header(
        out,
        "tensor_wasm_registry_propagation_seconds",
        "histogram",
        "From a change's publication in JetStream to this replica serving it, for changes its watch applied.",
    );
    histogram(out, "tensor_wasm_registry_propagation_seconds", "", &[registry.propagation]);
    header(
        out,
        "tensor_wasm_registry_late_changes_total",
        "counter",
        "Changes applied here later than --registry-propagation-ms after their publication.",
    );
    let _ = writeln!(out, "tensor_wasm_registry_late_changes_total {}", registry.late_changes);
    header(
        out,
        "tensor_wasm_registry_repairs_total",
        "counter",
        "Files of this replica's functions that the registry's object store had lost, stored again from this replica's copies.",
    );
    let _ = writeln!(out, "tensor_wasm_registry_repairs_total {}", registry.repairs);
}

/// Kernel dispatch: per device and op, the guest-visible latency, device and tenant memory, the
/// rings' free places.
fn dispatch(out: &mut String, shards: &[Arc<ShardMetrics>], dispatcher: &Dispatcher) {
    let backend = dispatcher.backend().label();
    header(out, "tensor_wasm_kernel_dispatches_total", "counter", "Requests sent to a device, per op.");
    for device in dispatcher.devices.iter() {
        for op in Op::ALL {
            let n: u64 = shards.iter().map(|s| s.kernel_count(device.index, op)).sum();
            if n > 0 {
                let _ = writeln!(
                    out,
                    "tensor_wasm_kernel_dispatches_total{{op=\"{}\",backend=\"{backend}\",device=\"{}\"}} {n}",
                    op.name(),
                    device.index
                );
            }
        }
    }
    header(
        out,
        "tensor_wasm_kernel_latency_seconds",
        "histogram",
        "From a guest's tensor host call to its result being visible to the guest (docs/SLO.md).",
    );
    for op in Op::ALL {
        let series: Vec<&Histogram> = shards.iter().map(|s| &s.kernel_latency[op.index()]).collect();
        histogram(out, "tensor_wasm_kernel_latency_seconds", &format!("op=\"{}\"", op.name()), &series);
    }
    header(out, "tensor_wasm_gpu_devices", "gauge", "Devices kernels are dispatched to, by back-end.");
    let _ = writeln!(out, "tensor_wasm_gpu_devices{{backend=\"{backend}\"}} {}", dispatcher.devices.len());
    header(out, "tensor_wasm_gpu_memory_used_bytes", "gauge", "Bytes of tensors each device holds.");
    for d in dispatcher.devices.iter() {
        let _ = writeln!(
            out,
            "tensor_wasm_gpu_memory_used_bytes{{device=\"{}\",backend=\"{backend}\"}} {}",
            d.index,
            d.memory_used()
        );
    }
    let tenants = dispatcher.quotas.snapshot();
    header(out, "tensor_wasm_tenant_gpu_memory_used_bytes", "gauge", "Device memory each tenant holds, all devices.");
    for (tenant, used, _) in &tenants {
        let _ = writeln!(out, "tensor_wasm_tenant_gpu_memory_used_bytes{{tenant=\"{tenant}\"}} {used}");
    }
    header(
        out,
        "tensor_wasm_gpu_quota_rejections_total",
        "counter",
        "Allocations refused by the tenant's device-memory quota.",
    );
    for (tenant, _, rejected) in &tenants {
        let _ = writeln!(out, "tensor_wasm_gpu_quota_rejections_total{{tenant=\"{tenant}\"}} {rejected}");
    }
    header(
        out,
        "tensor_wasm_dispatch_ring_permits_available",
        "gauge",
        "Free places in each shard's ring to each device.",
    );
    for d in dispatcher.devices.iter() {
        for s in shards {
            let _ = writeln!(
                out,
                "tensor_wasm_dispatch_ring_permits_available{{device=\"{}\",shard=\"{}\"}} {}",
                d.index,
                s.shard,
                d.permits(s.shard)
            );
        }
    }
    let total = |f: fn(&ShardMetrics) -> u64| shards.iter().map(|s| f(s)).sum::<u64>();
    header(
        out,
        "tensor_wasm_dispatch_ring_waits_total",
        "counter",
        "Times a guest found its dispatch ring full and waited.",
    );
    let _ = writeln!(out, "tensor_wasm_dispatch_ring_waits_total {}", total(|s| s.dispatch_ring_waits.get()));
    header(
        out,
        "tensor_wasm_dispatch_busy_total",
        "counter",
        "Dispatches that failed with `busy`: the ring stayed full to the deadline.",
    );
    let _ = writeln!(out, "tensor_wasm_dispatch_busy_total {}", total(|s| s.dispatch_busy.get()));
}

/// Renders the sum of `series` as one Prometheus histogram with `labels` (`k="v",…` or empty);
/// nothing when it has no observation.
fn histogram(out: &mut String, name: &str, labels: &str, series: &[&Histogram]) {
    let Some(first) = series.first() else { return };
    let bounds = first.bounds.seconds;
    let mut buckets = vec![0u64; bounds.len() + 1];
    let mut sum_nanos = 0u64;
    for h in series {
        for (acc, c) in buckets.iter_mut().zip(&h.buckets) {
            *acc += c.get();
        }
        sum_nanos = sum_nanos.wrapping_add(h.sum_nanos.get());
    }
    let count: u64 = buckets.iter().sum();
    if count == 0 {
        return;
    }
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, bound) in bounds.iter().enumerate() {
        cumulative += buckets[i];
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
    let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let _ = writeln!(out, "{name}_sum{braced} {}", sum_nanos as f64 / 1e9);
    let _ = writeln!(out, "{name}_count{braced} {count}");
}

/// A per-token sample.
type TokenSample = fn(&TokenCounts<'_>) -> u64;

/// A per-shard sample: extra labels (`,name="value"`…) and the value.
type ShardSample = fn(&ShardMetrics) -> (String, u64);

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

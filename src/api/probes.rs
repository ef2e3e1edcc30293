use crate::error::ApiError;
use crate::http::{Response, Status};
use crate::metrics::{render, RegistryFigures, ScrapeContext, TokenCounts};
use crate::shard::Shard;

pub fn healthz() -> Response {
    Response::json(Status::Ok, br#"{"status":"ok"}"#.to_vec())
}

/// Ready once every shard serves and the stored functions are loaded; not ready while draining.
pub fn readyz(shard: &Shard) -> Response {
    let shared = &shard.shared;
    if shared.is_draining() {
        return ApiError::Draining.response();
    }
    if !shared.is_ready() {
        return ApiError::NotReady.response();
    }
    Response::json(Status::Ok, br#"{"status":"ready"}"#.to_vec())
}

pub fn metrics(shard: &Shard) -> Response {
    let shared = &shard.shared;
    let tokens = shared.tokens.as_ref().map(|t| t.load().1);
    let text = render(&ScrapeContext {
        shards: &shared.shard_metrics,
        functions: shared.catalog.len(),
        broken_functions: shared.catalog.broken_count(),
        pipelines: shared.catalog.pipelines().load().1.len(),
        directory: shared.watches_directory.then_some(&shared.catalog.directory),
        ready: shared.is_ready() && !shared.is_draining(),
        tokens: tokens.as_deref().map(|set| {
            set.entries()
                .map(|(_, e)| {
                    let (admitted, limited) = e.totals();
                    TokenCounts { id: &e.id, admitted, limited }
                })
                .collect()
        }),
        audit_sync: &shared.audit_sync,
        dispatcher: &shared.dispatcher,
        registry: shared.registry.as_deref().map(|r| RegistryFigures {
            connected: r.connected(),
            stale_seconds: r.stale_seconds(),
            syncs: r.syncs(),
            propagation: &r.propagation,
            late_changes: r.late_changes.get(),
            repairs: r.repairs.get(),
        }),
        fleet: shared.fleet.as_deref().map(|f| (f.replicas(), f.connected())),
    });
    Response::new(Status::Ok, "text/plain; version=0.0.4; charset=utf-8", text.into_bytes())
}

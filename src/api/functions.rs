use serde::Deserialize;
use serde_json::json;

use super::run::{execute, run_step, Message};
use super::RequestContext;
use crate::error::ApiError;
use crate::functions::cache::Missing;
use crate::functions::catalog::function_json;
use crate::functions::record::{is_valid_id, Abi};
use crate::functions::{DeployRequest, LocalFunction};
use crate::http::{RequestHead, Response, Status};
use crate::shard::Shard;
use crate::wasm::Entry;

pub fn require_loaded(shard: &Shard) -> Result<(), ApiError> {
    if shard.shared.catalog.is_loaded() {
        Ok(())
    } else {
        Err(ApiError::NotReady)
    }
}

pub fn list(shard: &Shard, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_loaded(shard)?;
    let mut functions = shard.functions.list(&shard.shared.catalog, ctx.tenant);
    functions.sort_by(|a, b| (a.record.created_unix_ms, &a.record.id).cmp(&(b.record.created_unix_ms, &b.record.id)));
    let items: Vec<_> = functions.iter().map(|f| f.to_json()).collect();
    Ok(Response::json_value(Status::Ok, &json!({ "functions": items })))
}

/// A broken function is shown too, with its state and reason.
pub fn get(shard: &Shard, ctx: &RequestContext, id: &str) -> Result<Response, ApiError> {
    require_loaded(shard)?;
    let f = shard.functions.describe(&shard.shared.catalog, ctx.tenant, id).ok_or_else(|| not_found(id))?;
    Ok(Response::json_value(Status::Ok, &f.to_json_detailed()))
}

/// Deploys; returns the answer and the new function's id.
pub async fn deploy(shard: &Shard, ctx: &RequestContext, body: Vec<u8>) -> Result<(Response, String), ApiError> {
    require_loaded(shard)?;
    let record = shard.admin.deploy(DeployRequest { body, tenant_id: ctx.tenant }).await?;
    tracing::info!(
        id = %record.id,
        name = %record.name,
        digest = %record.digest,
        tenant = ctx.tenant,
        token_id = ctx.token_id(),
        client = ctx.client(),
        "function deployed"
    );
    Ok((Response::json_value(Status::Created, &function_json(&record, None)), record.id))
}

pub async fn delete(shard: &Shard, ctx: &RequestContext, id: &str) -> Result<Response, ApiError> {
    require_loaded(shard)?;
    if !is_valid_id(id) {
        return Err(not_found(id));
    }
    shard.admin.delete(id.to_string(), ctx.tenant).await?;
    tracing::info!(id, tenant = ctx.tenant, token_id = ctx.token_id(), client = ctx.client(), "function deleted");
    Ok(Response::empty(Status::NoContent))
}

/// The tenant's function `id`, ready to run. Another tenant's function is "not found", exactly
/// like a missing one, so that its existence does not leak.
fn lookup(shard: &Shard, tenant: u64, id: &str) -> Result<std::rc::Rc<LocalFunction>, ApiError> {
    require_loaded(shard)?;
    shard.functions.get(&shard.shared.catalog, tenant, id).map_err(|missing| missing_error(missing, id))
}

/// The error for a lookup of `reference` that found nothing to run: not found, or broken.
pub(super) fn missing_error(missing: Missing, reference: &str) -> ApiError {
    match missing {
        Missing::NotFound => not_found(reference),
        Missing::Broken(f) => ApiError::FunctionUnavailable {
            id: f.record.id.clone(),
            reason: f.module.as_ref().err().map(|reason| reason.to_string()).unwrap_or_default(),
        },
    }
}

fn not_found(id: &str) -> ApiError {
    // Echo only ids of the valid shape, so arbitrary path bytes never reach a response body.
    ApiError::FunctionNotFound(if is_valid_id(id) { id.to_string() } else { "<invalid id>".into() })
}

/// `{"export": "name", "args": [..]}`: how a module without `_start` is called.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportCall {
    export: String,
    #[serde(default)]
    args: Vec<serde_json::Value>,
}

pub async fn invoke(
    shard: &Shard,
    ctx: &RequestContext,
    id: &str,
    head: &RequestHead,
    body: Vec<u8>,
) -> Result<Response, ApiError> {
    let function = lookup(shard, ctx.tenant, id)?;
    let record = &function.deployed.record;
    let timeout = std::time::Duration::from_millis(record.timeout_ms);
    if record.abi == Abi::Envelope {
        let message = run_step(shard, ctx.tenant, &function, Message::from_request(head, body), timeout).await?;
        return Ok(message.into_response());
    }
    let (entry, stdin) = if function.has_start {
        (Entry::Start, body)
    } else {
        let call: ExportCall = serde_json::from_slice(&body).map_err(|e| {
            ApiError::InvalidInvokeRequest(format!(
                "the module has no `_start`; call an export with {{\"export\":\"name\",\"args\":[..]}} ({e})"
            ))
        })?;
        (Entry::Export { name: call.export, args: call.args }, Vec::new())
    };
    let output = execute(shard, ctx.tenant, &function, stdin, entry, timeout).await?;
    // Structs, not `json!`: these answer every export call and every empty-output invoke, and a
    // map costs allocations.
    if let Some(results) = output.results {
        #[derive(serde::Serialize)]
        struct Returned {
            result: Vec<serde_json::Value>,
        }
        return Ok(Response::json_value(Status::Ok, &Returned { result: results }));
    }
    if output.stdout.is_empty() {
        #[derive(serde::Serialize)]
        struct Done<'a> {
            result: &'static str,
            function_id: &'a str,
        }
        return Ok(Response::json_value(Status::Ok, &Done { result: "ok", function_id: &record.id }));
    }
    Ok(Message { body: output.stdout, headers: Default::default(), guest_headers: false }.into_response())
}

//! `/pipelines`: create, list, get, delete, and invoke a chain of functions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::functions::{missing_error, require_loaded};
use super::run::{run_step, Message};
use super::RequestContext;
use crate::error::ApiError;
use crate::functions::cache::Missing;
use crate::functions::record::is_valid_id;
use crate::functions::PipelineRecord;
use crate::http::{RequestHead, Response, Status};
use crate::pipelines::sink::Delivery;
use crate::shard::Shard;
use crate::wasm::envelope::Headers;

pub fn list(shard: &Shard, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_loaded(shard)?;
    let pipelines = shard.functions.pipelines(&shard.shared.catalog);
    let mut mine: Vec<_> = pipelines.values().filter(|p| p.tenant_id == ctx.tenant).collect();
    mine.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
    let items: Vec<_> = mine.iter().map(|p| p.to_json()).collect();
    Ok(Response::json_value(Status::Ok, &json!({ "pipelines": items })))
}

pub fn get(shard: &Shard, ctx: &RequestContext, id: &str) -> Result<Response, ApiError> {
    Ok(Response::json_value(Status::Ok, &lookup(shard, ctx.tenant, id)?.to_json()))
}

/// Creates; returns the answer and the new pipeline's id.
pub async fn create(shard: &Shard, ctx: &RequestContext, body: Vec<u8>) -> Result<(Response, String), ApiError> {
    require_loaded(shard)?;
    let record = shard.admin.create_pipeline(body, ctx.tenant).await?;
    tracing::info!(
        id = %record.id,
        name = %record.name,
        tenant = ctx.tenant,
        token_id = ctx.token_id(),
        client = ctx.client(),
        "pipeline created"
    );
    Ok((Response::json_value(Status::Created, &record.to_json()), record.id))
}

pub async fn delete(shard: &Shard, ctx: &RequestContext, id: &str) -> Result<Response, ApiError> {
    require_loaded(shard)?;
    if !is_valid_id(id) {
        return Err(not_found(id));
    }
    shard.admin.delete_pipeline(id.to_string(), ctx.tenant).await?;
    tracing::info!(id, tenant = ctx.tenant, token_id = ctx.token_id(), client = ctx.client(), "pipeline deleted");
    Ok(Response::empty(Status::NoContent))
}

/// Runs the steps in order, each one's output the next one's input, then answers with the last
/// output, or delivers it to the sink and answers with the delivery's outcome.
///
/// Each step has its own deadline (the step's `timeout_ms`, else its function's), and none may
/// run past the pipeline's. A failure is `ApiError::PipelineStep`, naming the step.
pub async fn invoke(
    shard: &Shard,
    ctx: &RequestContext,
    id: &str,
    head: &RequestHead,
    body: Vec<u8>,
) -> Result<Response, ApiError> {
    let pipeline = lookup(shard, ctx.tenant, id)?;
    if pipeline.sink.is_some() {
        // Running the steps only to be refused at the hand-over would waste a shard's time.
        shard.shared.sinks.admit(ctx.tenant)?;
    }
    let deadline = Instant::now() + Duration::from_millis(pipeline.timeout_ms);
    let mut message = Message::from_request(head, body);
    for (index, step) in pipeline.steps.iter().enumerate() {
        let fail = |function_id: Option<&str>, error: ApiError| ApiError::PipelineStep {
            index,
            function: step.function.clone(),
            function_id: function_id.map(str::to_string),
            error: Box::new(error),
        };
        let function = match shard.functions.resolve(&shard.shared.catalog, ctx.tenant, &step.function) {
            Ok(function) => function,
            Err(Missing::NotFound) => return Err(fail(None, ApiError::FunctionNotFound(step.function.clone()))),
            Err(broken) => return Err(fail(None, missing_error(broken, &step.function))),
        };
        let function_id = Some(function.deployed.record.id.as_str());
        if !function.has_start {
            return Err(fail(function_id, ApiError::InvalidPipeline("the function has no `_start`".into())));
        }
        let own = Duration::from_millis(step.timeout_ms.unwrap_or(function.deployed.record.timeout_ms));
        let left = deadline.saturating_duration_since(Instant::now());
        let pipeline_timeout = ApiError::PipelineTimeout { timeout_ms: pipeline.timeout_ms };
        if left.is_zero() {
            return Err(fail(function_id, pipeline_timeout));
        }
        message = match run_step(shard, ctx.tenant, &function, message, own.min(left)).await {
            Ok(next) => next,
            Err(ApiError::InvokeTimeout { .. }) if left < own => return Err(fail(function_id, pipeline_timeout)),
            Err(e) => return Err(fail(function_id, e)),
        };
    }
    let Some(sink) = &pipeline.sink else {
        return Ok(message.into_response());
    };
    let headers = if message.guest_headers { message.headers } else { Headers::new() };
    let delivery = Delivery { sink: sink.clone(), headers, body: message.body };
    let delivered = shard.shared.sinks.deliver(ctx.tenant, delivery).await?;
    Ok(Response::json_value(
        Status::Ok,
        &json!({
            "pipeline_id": pipeline.id,
            "delivered": true,
            "sink": { "url": sink.url, "status": delivered.status, "attempts": delivered.attempts },
        }),
    ))
}

/// The tenant's pipeline `id`; another tenant's is "not found", as for functions.
fn lookup(shard: &Shard, tenant: u64, id: &str) -> Result<Arc<PipelineRecord>, ApiError> {
    require_loaded(shard)?;
    shard
        .functions
        .pipelines(&shard.shared.catalog)
        .get(id)
        .filter(|p| p.tenant_id == tenant)
        .cloned()
        .ok_or_else(|| not_found(id))
}

fn not_found(id: &str) -> ApiError {
    ApiError::PipelineNotFound(if is_valid_id(id) { id.to_string() } else { "<invalid id>".into() })
}

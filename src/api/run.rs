//! Running one function on the shard: for `POST /functions/:id/invoke` and for each pipeline step.
//!
//! A [`Message`] is what flows between a client, functions and a sink: a body and, once an
//! envelope function has spoken, its headers. A command function reads the body as stdin and its
//! stdout becomes the next body; an envelope function gets `{payload, headers, direction}` and
//! answers `{payload, headers}` (`wasm::envelope`).

use std::borrow::Cow;
use std::time::Duration;

use crate::error::ApiError;
use crate::functions::record::Abi;
use crate::functions::LocalFunction;
use crate::http::{header_rules, RequestHead, Response, Status};
use crate::shard::Shard;
use crate::wasm::envelope::{self, Headers};
use crate::wasm::{invoke as run_invocation, release_memory, Entry, InvokeLimits, InvokeOutput, TensorContext};

/// A body on its way through functions.
pub struct Message {
    pub body: Vec<u8>,
    pub headers: Headers,
    /// An envelope function produced `headers`; they go out on the response and to a sink.
    pub guest_headers: bool,
}

impl Message {
    /// A request's body, with the headers an envelope guest may see. Repeated headers are joined
    /// with `, ` as RFC 9110 allows.
    pub fn from_request(head: &RequestHead, body: Vec<u8>) -> Message {
        let mut headers = Headers::new();
        for (name, value) in head.headers().filter(|(name, _)| header_rules::passes_to_guest(name)) {
            let value = String::from_utf8_lossy(value);
            headers
                .entry(name.to_string())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        Message { body, headers, guest_headers: false }
    }

    /// The response that carries this message to the client. A guest's headers were checked when
    /// its output was read; those the server writes itself are left out.
    pub fn into_response(self) -> Response {
        if !self.guest_headers {
            let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&self.body).is_ok();
            let content_type = if is_json { "application/json" } else { "application/octet-stream" };
            return Response::new(Status::Ok, content_type, self.body);
        }
        let mut response = Response::json(Status::Ok, self.body);
        response.headers.extend(
            self.headers
                .into_iter()
                .filter(|(name, _)| header_rules::passes_from_guest(name))
                .map(|(n, v)| (Cow::Owned(n), v)),
        );
        response
    }
}

/// Runs `function` once on `message` (through `_start`) within `timeout`.
pub async fn run_step(
    shard: &Shard,
    tenant: u64,
    function: &LocalFunction,
    message: Message,
    timeout: Duration,
) -> Result<Message, ApiError> {
    match function.deployed.record.abi {
        Abi::Command => {
            let output = execute(shard, tenant, function, message.body, Entry::Start, timeout).await?;
            Ok(Message { body: output.stdout, ..message })
        }
        Abi::Envelope => {
            let stdin = envelope::encode_input(&message.body, &message.headers)?;
            let output = execute(shard, tenant, function, stdin, Entry::Start, timeout).await?;
            let answer = envelope::decode_output(&output.stdout, shard.limits.max_headers)?;
            Ok(Message { body: answer.payload, headers: answer.headers, guest_headers: true })
        }
    }
}

/// One invocation in an instance slot of this shard, with the function's memory cap and
/// `timeout`. A failure is counted and logged with the guest's stderr.
pub async fn execute(
    shard: &Shard,
    tenant: u64,
    function: &LocalFunction,
    stdin: Vec<u8>,
    entry: Entry,
    timeout: Duration,
) -> Result<InvokeOutput, ApiError> {
    let record = &function.deployed.record;
    // The tenant's share first: a tenant at its limit never takes a slot another could use.
    let _running = shard.acquire_tenant_slot(tenant)?;
    let slot = shard.acquire_instance_slot()?;
    let limits = InvokeLimits {
        timeout,
        memory_limit_mb: record.memory_limit_mb,
        max_output_bytes: shard.limits.max_output_bytes,
        max_stderr_bytes: shard.limits.max_stderr_bytes,
        slice: shard.limits.guest_slice(),
        max_table_elements: shard.limits.module_shape.max_table_elements,
    };
    let tensors = function.uses_tensors.then(|| {
        let (dispatcher, metrics, weights) =
            (shard.shared.dispatcher.clone(), shard.metrics.clone(), function.deployed.weights.clone());
        TensorContext::new(dispatcher, shard.id, tenant, metrics, weights)
    });
    let mut invocation =
        run_invocation(&shard.engine, &function.pre, function.deployed.wasi.clone(), stdin, entry, limits, tensors)
            .await;
    // Before the store is kept for dropping: a large dirtied memory is given back in steps, with
    // the shard's other work between them, not in the one `madvise` of the slot's reset.
    release_memory(&mut invocation.spent).await;
    shard.keep_spent(slot, invocation.spent);
    match invocation.outcome {
        Ok(output) => {
            if !invocation.stderr.is_empty() {
                tracing::debug!(function = %record.id, stderr = %invocation.stderr.escape_ascii(), "guest stderr");
            }
            Ok(output)
        }
        Err(err) => {
            shard.metrics.invocations_failed.inc();
            tracing::warn!(
                function = %record.id,
                kind = err.kind(),
                // Escaped: raw, a guest's newlines and terminal escapes could forge whole log lines.
                stderr = %invocation.stderr.escape_ascii(),
                stderr_dropped = invocation.stderr_dropped,
                // The message can carry the guest's own names (a backtrace of its name section).
                "invocation failed: {}",
                err.to_string().escape_debug()
            );
            Err(err)
        }
    }
}

//! Routes: which handler answers which request, and the handlers themselves. Every handler returns
//! `Result<Response, ApiError>`; errors become responses in one place, here.
//!
//! Order of checks: the route and method (404, 405), then for function routes the caller (401),
//! its rate (429) and the tenant (400, 403). Probes are open; `/metrics` has its own optional token.

mod functions;
mod pipelines;
mod probes;
mod route;
mod run;

pub use route::Route;

use crate::audit::{Actor, ActorScope, AuditEvent, AuditTicket};
use crate::auth::{Caller, Scope};
use crate::error::ApiError;
use crate::functions::record::is_valid_id;
use crate::http::conn::Peer;
use crate::http::{Method, RequestHead, Response};
use crate::server::shard::Shard;
use crate::tls::forwarded::xfcc_subject;

/// Who a function request is from, once authenticated.
pub struct RequestContext {
    pub caller: Caller,
    pub tenant: u64,
    /// The client certificate's subject: from this server's own mTLS handshake, else from
    /// `X-Forwarded-Client-Cert` when the peer is a trusted proxy.
    pub client_cert_subject: Option<String>,
}

impl RequestContext {
    pub fn token_id(&self) -> &str {
        self.caller.token_id().unwrap_or("dev")
    }

    pub fn client(&self) -> &str {
        self.client_cert_subject.as_deref().unwrap_or("-")
    }
}

/// The client certificate subject of a request. XFCC from a peer outside the trusted proxies is
/// ignored, and counted: anyone can send the header.
fn client_cert_subject(shard: &Shard, peer: &Peer, head: &RequestHead) -> Option<String> {
    if let Some(subject) = &peer.client_cert_subject {
        return Some(subject.clone());
    }
    head.header("x-forwarded-client-cert")?;
    if shard.auth.trusts_proxy(peer.addr.ip()) {
        // Every line of the header, as one list: the trusted proxy's element is the last.
        xfcc_subject(head.header_values("x-forwarded-client-cert"))
    } else {
        shard.metrics.xfcc_ignored.inc();
        None
    }
}

/// What a request to a function route asks for.
enum Action<'a> {
    List,
    Deploy,
    Get(&'a str),
    Delete(&'a str),
    Invoke(&'a str),
    ListPipelines,
    CreatePipeline,
    GetPipeline(&'a str),
    DeletePipeline(&'a str),
    InvokePipeline(&'a str),
}

impl Action<'_> {
    /// The audit log's name for it.
    fn audit_name(&self) -> &'static str {
        match self {
            Action::List => "list_functions",
            Action::Deploy => "create_function",
            Action::Get(_) => "get_function",
            Action::Delete(_) => "delete_function",
            Action::Invoke(_) => "invoke_function",
            Action::ListPipelines => "list_pipelines",
            Action::CreatePipeline => "create_pipeline",
            Action::GetPipeline(_) => "get_pipeline",
            Action::DeletePipeline(_) => "delete_pipeline",
            Action::InvokePipeline(_) => "invoke_pipeline",
        }
    }

    fn function_id(&self) -> Option<&str> {
        match self {
            Action::Get(id) | Action::Delete(id) | Action::Invoke(id) => Some(*id).filter(|id| is_valid_id(id)),
            _ => None,
        }
    }

    fn pipeline_id(&self) -> Option<&str> {
        match self {
            Action::GetPipeline(id) | Action::DeletePipeline(id) | Action::InvokePipeline(id) => {
                Some(*id).filter(|id| is_valid_id(id))
            }
            _ => None,
        }
    }
}

/// The audit record of a protected request, filled in as the request goes and written by the
/// connection before the response leaves.
pub struct PendingAudit {
    pub ticket: AuditTicket,
    pub request_id: String,
    pub action: &'static str,
    pub actor: Actor,
    pub function_id: Option<String>,
    pub pipeline_id: Option<String>,
    pub tenant_id: Option<u64>,
    pub client_cert_subject: Option<String>,
    /// A failed pipeline's step: its index and function.
    pub failed_step: Option<(usize, String)>,
}

impl PendingAudit {
    pub fn into_event(
        self,
        response: &Response,
        latency: std::time::Duration,
        peer: std::net::SocketAddr,
    ) -> (AuditTicket, AuditEvent) {
        let ts_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let event = AuditEvent {
            ts_unix_ms,
            request_id: self.request_id,
            actor: self.actor,
            action: self.action,
            function_id: self.function_id,
            pipeline_id: self.pipeline_id,
            tenant_id: self.tenant_id,
            status_code: response.status.code(),
            error_kind: response.error_kind,
            failed_step: self.failed_step,
            latency_us: latency.as_micros() as u64,
            peer_addr: peer,
            client_cert_subject: self.client_cert_subject,
        };
        (self.ticket, event)
    }
}

fn actor_of(caller: &Caller) -> Actor {
    match caller {
        Caller::Dev => Actor::Dev,
        Caller::Bearer(t) => Actor::Bearer {
            token_id: Some(t.id.to_string()),
            scope: match &t.entry.scope {
                Scope::Wildcard => ActorScope::Wildcard,
                Scope::Tenants(set) => ActorScope::TenantSet(set.iter().copied().collect()),
            },
        },
    }
}

/// Answers one request. Returns the matched route (for metrics), the response, and for a
/// protected request its pending audit record.
pub async fn handle(
    shard: &Shard,
    peer: &Peer,
    head: &RequestHead,
    body: Vec<u8>,
) -> (Route, Response, Option<PendingAudit>) {
    let (route, id) = Route::match_path(head.path());
    let mut audit = None;
    let result = dispatch(shard, peer, route, id, head, body, &mut audit).await;
    (route, result.unwrap_or_else(|e| Response::error(&e)), audit)
}

async fn dispatch(
    shard: &Shard,
    peer: &Peer,
    route: Route,
    id: &str,
    head: &RequestHead,
    body: Vec<u8>,
    audit: &mut Option<PendingAudit>,
) -> Result<Response, ApiError> {
    let method = head.method();
    let read = matches!(method, Method::Get | Method::Head);
    let action = match (route, method) {
        (Route::Healthz, _) if read => return Ok(probes::healthz()),
        (Route::Readyz, _) if read => return Ok(probes::readyz(shard)),
        (Route::Metrics, _) if read => {
            shard.auth.authorize_metrics(head)?;
            return Ok(probes::metrics(shard));
        }
        (Route::Functions, _) if read => Action::List,
        (Route::Functions, Method::Post) => Action::Deploy,
        (Route::Function, _) if read => Action::Get(id),
        (Route::Function, Method::Delete) => Action::Delete(id),
        (Route::Invoke, Method::Post) => Action::Invoke(id),
        (Route::Pipelines, _) if read => Action::ListPipelines,
        (Route::Pipelines, Method::Post) => Action::CreatePipeline,
        (Route::Pipeline, _) if read => Action::GetPipeline(id),
        (Route::Pipeline, Method::Delete) => Action::DeletePipeline(id),
        (Route::PipelineInvoke, Method::Post) => Action::InvokePipeline(id),
        (Route::Unmatched, _) => return Err(ApiError::RouteNotFound),
        (route, _) => return Err(ApiError::MethodNotAllowed { allow: route.allow() }),
    };
    // Room for the record first: when the log cannot be written, nothing happens unaudited.
    let ticket = shard.audit.ticket()?;
    let subject = client_cert_subject(shard, peer, head);
    let pending = audit.insert(PendingAudit {
        ticket,
        request_id: shard.next_request_id(),
        action: action.audit_name(),
        actor: Actor::Bearer { token_id: None, scope: ActorScope::None },
        function_id: action.function_id().map(str::to_string),
        pipeline_id: action.pipeline_id().map(str::to_string),
        tenant_id: None,
        client_cert_subject: subject.clone(),
        failed_step: None,
    });
    let caller = shard.auth.authenticate(head).inspect_err(|_| pending.action = "auth_failure")?;
    pending.actor = actor_of(&caller);
    shard.auth.admit(&caller)?;
    let tenant = shard.auth.tenant(head, &caller)?;
    pending.tenant_id = Some(tenant);
    let ctx = RequestContext { caller, tenant, client_cert_subject: subject };
    match action {
        Action::List => functions::list(shard, &ctx),
        Action::Deploy => {
            let (response, id) = functions::deploy(shard, &ctx, body).await?;
            pending.function_id = Some(id);
            Ok(response)
        }
        Action::Get(id) => functions::get(shard, &ctx, id),
        Action::Delete(id) => functions::delete(shard, &ctx, id).await,
        Action::Invoke(id) => functions::invoke(shard, &ctx, id, head, body).await,
        Action::ListPipelines => pipelines::list(shard, &ctx),
        Action::CreatePipeline => {
            let (response, id) = pipelines::create(shard, &ctx, body).await?;
            pending.pipeline_id = Some(id);
            Ok(response)
        }
        Action::GetPipeline(id) => pipelines::get(shard, &ctx, id),
        Action::DeletePipeline(id) => pipelines::delete(shard, &ctx, id).await,
        Action::InvokePipeline(id) => pipelines::invoke(shard, &ctx, id, head, body).await.inspect_err(|e| {
            if let ApiError::PipelineStep { index, function, function_id, .. } = e {
                pending.failed_step = Some((*index, function_id.clone().unwrap_or_else(|| function.clone())));
            }
        }),
    }
}

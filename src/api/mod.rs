//! Routes: which handler answers which request, and the handlers themselves. Every handler returns
//! `Result<Response, ApiError>`; errors become responses in one place, here.
//!
//! Order of checks, all on the head before any body byte is read ([`admit`]): the route and method
//! (404, 405), then for function routes room in the audit log (503), the caller (401), its rate
//! (429) and the tenant (400, 403); then the body's size against the route's limit (413). Probes
//! are open; `/metrics` has its own optional token.

mod functions;
mod pipelines;
mod probes;

mod run;

pub use crate::route::Route;

use std::time::Instant;

use crate::audit::{Actor, ActorScope, AuditEvent, AuditTicket};
use crate::auth::refusals::{Refused, Verdict};
use crate::auth::{Caller, Scope};
use crate::error::{bug, ApiError};
use crate::functions::record::is_valid_id;
use crate::http::Peer;
use crate::http::{Method, RequestHead, Response};
use crate::shard::Shard;
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
    /// For a coalesced refusal, how many like it were left out before (`auth::refusals`).
    pub repeated: u64,
}

impl PendingAudit {
    pub fn into_event(
        self,
        response: &Response,
        latency: std::time::Duration,
        peer: std::net::SocketAddr,
    ) -> (AuditTicket, AuditEvent) {
        let event = AuditEvent {
            ts_unix_ms: AuditEvent::now_unix_ms(),
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
            repeated: self.repeated,
            integrity: None,
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

/// A request whose head passed every check a head allows: route and method, and for a function
/// route room in the audit log, the caller, its rate and its tenant. Only then is its body read,
/// at most `body_limit` bytes of it: a request that will be refused never costs its body.
pub struct Admitted<'h> {
    pub body_limit: u64,
    what: Admit<'h>,
}

impl Admitted<'_> {
    /// The tenant it acts for, for a function route.
    pub fn tenant(&self) -> Option<u64> {
        match &self.what {
            Admit::Call { ctx, .. } => Some(ctx.tenant),
            Admit::Healthz | Admit::Readyz | Admit::Metrics => None,
        }
    }
}

enum Admit<'h> {
    Healthz,
    Readyz,
    Metrics,
    Call { action: Action<'h>, ctx: RequestContext },
}

/// Decides, on the head alone, whether a request will be served. Returns the matched route (for
/// metrics) and the admission or the refusal; for a function route `audit` holds its pending
/// record either way.
pub fn admit<'h>(
    shard: &Shard,
    peer: &Peer,
    head: &'h RequestHead,
    audit: &mut Option<PendingAudit>,
) -> (Route, Result<Admitted<'h>, ApiError>) {
    let (route, id) = Route::match_path(head.path());
    (route, admit_route(shard, peer, route, id, head, audit))
}

fn admit_route<'h>(
    shard: &Shard,
    peer: &Peer,
    route: Route,
    id: &'h str,
    head: &RequestHead,
    audit: &mut Option<PendingAudit>,
) -> Result<Admitted<'h>, ApiError> {
    let method = head.method();
    let read = matches!(method, Method::Get | Method::Head);
    // Probes, metrics and reads take no body; a deploy takes a module, an invoke its input.
    let limits = &shard.limits;
    let (action, body_limit) = match (route, method) {
        (Route::Healthz, _) if read => return Ok(Admitted { body_limit: 0, what: Admit::Healthz }),
        (Route::Readyz, _) if read => return Ok(Admitted { body_limit: 0, what: Admit::Readyz }),
        (Route::Metrics, _) if read => {
            shard.auth.authorize_metrics(head)?;
            return Ok(Admitted { body_limit: 0, what: Admit::Metrics });
        }
        (Route::Functions, _) if read => (Action::List, 0),
        (Route::Functions, Method::Post) => (Action::Deploy, limits.max_body_bytes),
        (Route::Function, _) if read => (Action::Get(id), 0),
        (Route::Function, Method::Delete) => (Action::Delete(id), 0),
        (Route::Invoke, Method::Post) => (Action::Invoke(id), limits.max_invoke_body_bytes),
        (Route::Pipelines, _) if read => (Action::ListPipelines, 0),
        (Route::Pipelines, Method::Post) => (Action::CreatePipeline, limits.max_body_bytes),
        (Route::Pipeline, _) if read => (Action::GetPipeline(id), 0),
        (Route::Pipeline, Method::Delete) => (Action::DeletePipeline(id), 0),
        (Route::PipelineInvoke, Method::Post) => (Action::InvokePipeline(id), limits.max_invoke_body_bytes),
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
        repeated: 0,
    });
    let caller = match shard.auth.authenticate(head) {
        Ok(caller) => caller,
        Err(e) => {
            pending.action = "auth_failure";
            // A source that keeps failing is slowed down, and its refusals are coalesced.
            let err = match shard.refusals.charge_unauthenticated(peer.addr.ip(), Instant::now()) {
                Ok(()) => e,
                Err(wait) => ApiError::UnauthenticatedRateLimited { retry_after_secs: whole_seconds(wait) },
            };
            coalesce(shard, audit, Refused::source(peer.addr.ip()), &err);
            return Err(err);
        }
    };
    pending.actor = actor_of(&caller);
    if let Err(e) = shard.auth.admit(&caller) {
        if let Caller::Bearer(token) = &caller {
            coalesce(shard, audit, Refused::Token(token.id.clone()), &e);
        }
        return Err(e);
    }
    let pending = audit.as_mut().ok_or_else(|| bug!("the audit record filled in above is there"))?;
    let tenant = shard.auth.tenant(head, &caller)?;
    pending.tenant_id = Some(tenant);
    let ctx = RequestContext { caller, tenant, client_cert_subject: subject };
    Ok(Admitted { body_limit, what: Admit::Call { action, ctx } })
}

/// Records a repeated refusal only once per window of its source (or token) and kind: the
/// others are left out of the audit log, and counted in the next record (`auth::refusals`).
fn coalesce(shard: &Shard, audit: &mut Option<PendingAudit>, who: Refused, err: &ApiError) {
    match shard.refusals.audit(who, err.kind(), Instant::now()) {
        Verdict::Record { repeated } => {
            if let Some(pending) = audit {
                pending.repeated = repeated;
            }
        }
        Verdict::LeaveOut => {
            if let Some(pending) = audit.take() {
                shard.audit.forget(pending.ticket);
            }
            shard.metrics.audit_refusals_coalesced.inc();
        }
    }
}

/// A wait as `retry-after` says it: whole seconds, at least one.
pub fn whole_seconds(wait: std::time::Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// Answers an admitted request with its body.
pub async fn respond(
    shard: &Shard,
    admitted: Admitted<'_>,
    head: &RequestHead,
    body: Vec<u8>,
    audit: &mut Option<PendingAudit>,
) -> Response {
    let result = match admitted.what {
        Admit::Healthz => Ok(probes::healthz()),
        Admit::Readyz => Ok(probes::readyz(shard)),
        Admit::Metrics => Ok(probes::metrics(shard)),
        Admit::Call { action, ctx } => call(shard, action, ctx, head, body, audit).await,
    };
    result.unwrap_or_else(|e| e.response())
}

async fn call(
    shard: &Shard,
    action: Action<'_>,
    ctx: RequestContext,
    head: &RequestHead,
    body: Vec<u8>,
    audit: &mut Option<PendingAudit>,
) -> Result<Response, ApiError> {
    let pending = audit.as_mut().ok_or_else(|| bug!("an admitted call has its pending audit record"))?;
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

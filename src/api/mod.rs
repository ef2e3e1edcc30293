//! Routes: which handler answers which request, and the handlers themselves. Every handler returns
//! `Result<Response, ApiError>`; errors become responses in one place, here.
//!
//! Order of checks: the route and method (404, 405), then for function routes the caller (401),
//! its rate (429) and the tenant (400, 403). Probes are open; `/metrics` has its own optional token.

mod functions;
mod probes;
mod route;

pub use route::Route;

use crate::auth::Caller;
use crate::error::ApiError;
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
    let xfcc = head.header("x-forwarded-client-cert")?;
    if shard.auth.trusts_proxy(peer.addr.ip()) {
        xfcc_subject(xfcc)
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
}

/// Answers one request. Returns the matched route (for metrics) and the response.
pub async fn handle(shard: &Shard, peer: &Peer, head: &RequestHead, body: Vec<u8>) -> (Route, Response) {
    let (route, id) = Route::match_path(head.path());
    let result = dispatch(shard, peer, route, id, head, body).await;
    (route, result.unwrap_or_else(|e| Response::error(&e)))
}

async fn dispatch(
    shard: &Shard,
    peer: &Peer,
    route: Route,
    id: &str,
    head: &RequestHead,
    body: Vec<u8>,
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
        (Route::Unmatched, _) => return Err(ApiError::RouteNotFound),
        (route, _) => return Err(ApiError::MethodNotAllowed { allow: route.allow() }),
    };
    let caller = shard.auth.authenticate(head)?;
    shard.auth.admit(&caller)?;
    let tenant = shard.auth.tenant(head, &caller)?;
    let ctx = RequestContext { caller, tenant, client_cert_subject: client_cert_subject(shard, peer, head) };
    match action {
        Action::List => functions::list(shard, &ctx),
        Action::Deploy => functions::deploy(shard, &ctx, body).await,
        Action::Get(id) => functions::get(shard, &ctx, id),
        Action::Delete(id) => functions::delete(shard, &ctx, id).await,
        Action::Invoke(id) => functions::invoke(shard, &ctx, id, body).await,
    }
}

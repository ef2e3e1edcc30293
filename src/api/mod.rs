//! Routes: which handler answers which request, and the handlers themselves. Every handler returns
//! `Result<Response, ApiError>`; errors become responses in one place, here.
//!
//! Order of checks: the route and method (404, 405), then for function routes the caller (401),
//! its rate (429) and the tenant (400, 403). Probes are open; `/metrics` has its own optional token.

mod functions;
mod probes;
mod route;

pub use route::Route;

use crate::error::ApiError;
use crate::http::{Method, RequestHead, Response};
use crate::server::shard::Shard;

/// What a request to a function route asks for.
enum Action<'a> {
    List,
    Deploy,
    Get(&'a str),
    Delete(&'a str),
    Invoke(&'a str),
}

/// Answers one request. Returns the matched route (for metrics) and the response.
pub async fn handle(shard: &Shard, head: &RequestHead, body: Vec<u8>) -> (Route, Response) {
    let (route, id) = Route::match_path(head.path());
    let result = dispatch(shard, route, id, head, body).await;
    (route, result.unwrap_or_else(|e| Response::error(&e)))
}

async fn dispatch(
    shard: &Shard,
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
    match action {
        Action::List => functions::list(shard, tenant),
        Action::Deploy => functions::deploy(shard, tenant, body).await,
        Action::Get(id) => functions::get(shard, tenant, id),
        Action::Delete(id) => functions::delete(shard, tenant, id).await,
        Action::Invoke(id) => functions::invoke(shard, tenant, id, body).await,
    }
}

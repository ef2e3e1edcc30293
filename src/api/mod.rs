//! Routes: which handler answers which request, and the handlers themselves. Every handler returns
//! `Result<Response, ApiError>`; errors become responses in one place, here.

mod functions;
mod probes;
mod route;

pub use route::Route;

use crate::error::ApiError;
use crate::http::{Method, RequestHead, Response};
use crate::server::shard::Shard;

/// Answers one request. Returns the matched route (for metrics) and the response.
pub async fn handle(shard: &Shard, head: &RequestHead, body: Vec<u8>) -> (Route, Response) {
    let (route, id) = Route::match_path(head.path());
    let method = head.method();
    let read = matches!(method, Method::Get | Method::Head);
    let result = match (route, method) {
        (Route::Healthz, _) if read => Ok(probes::healthz()),
        (Route::Readyz, _) if read => Ok(probes::readyz(shard)),
        (Route::Metrics, _) if read => Ok(probes::metrics(shard)),
        (Route::Functions, _) if read => functions::list(shard),
        (Route::Functions, Method::Post) => functions::deploy(shard, body).await,
        (Route::Function, _) if read => functions::get(shard, id),
        (Route::Function, Method::Delete) => functions::delete(shard, id).await,
        (Route::Invoke, Method::Post) => functions::invoke(shard, id, body).await,
        (Route::Unmatched, _) => Err(ApiError::RouteNotFound),
        (route, _) => Err(ApiError::MethodNotAllowed { allow: route.allow() }),
    };
    (route, result.unwrap_or_else(|e| Response::error(&e)))
}

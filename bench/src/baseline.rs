//! The conventional design that TensorWasm is measured against, built the way a typical team
//! builds it (and the way the public reference implementation serves): tokio's multi-threaded
//! runtime, hyper, and wasmtime with its default on-demand allocator, linking and instantiating a
//! fresh instance for every request.
//!
//! It serves the same routes as TensorWasm for the scenarios it can run, in dev mode:
//! `GET /healthz`, `GET /readyz`, `POST /functions` (`{"name", "wasm_b64"}`),
//! `DELETE /functions/:id` and `POST /functions/:id/invoke`. Guests get the same WASI preview-1
//! functions as on TensorWasm (its own implementation, so that both run identical guest code) and
//! the same deadline and memory cap; what differs is the serving architecture alone.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tensor_wasm::guest::{new_linker, EpochTicker, GuestState, InvokeLimits, WasiArgs};
use wasmtime::{Config, Engine, Linker, Module, Store, UpdateDeadline};

/// The largest request body, as on TensorWasm.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
const LIMITS: InvokeLimits = InvokeLimits {
    timeout: Duration::from_secs(5),
    memory_limit_mb: 64,
    max_output_bytes: 4 * 1024 * 1024,
    max_stderr_bytes: 64 * 1024,
    slice: Duration::from_micros(100),
    // The guest table cap TensorWasm serves with by default (`--max-table-elements`).
    max_table_elements: 20_000,
};

struct State {
    engine: Engine,
    linker: Linker<GuestState>,
    functions: RwLock<HashMap<String, Module>>,
    next_id: AtomicU64,
    wasi: Arc<WasiArgs>,
}

/// The baseline's engine: wasmtime's defaults (the on-demand allocator), with epoch
/// interruption for the deadline.
pub fn engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    Engine::new(&config)
}

/// Runs one request the baseline's way: a fresh store, `module` linked and instantiated from
/// scratch, then `_start`. Returns the outcome and the store, which holds the guest's stdout.
pub async fn run_fresh_instance(
    engine: &Engine,
    linker: &Linker<GuestState>,
    module: &Module,
    wasi: Arc<WasiArgs>,
    stdin: Vec<u8>,
) -> (wasmtime::Result<()>, Store<GuestState>) {
    let deadline = Instant::now() + LIMITS.timeout;
    let mut store = Store::new(engine, GuestState::new(wasi, stdin, LIMITS));
    store.limiter(|s| s);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
    });
    let outcome = async {
        let instance = linker.instantiate_async(&mut store, module).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await
    }
    .await;
    (outcome, store)
}

/// Serves on `listen` with `threads` tokio workers until the process ends. Prints
/// `listening on ADDR` on stdout once bound, as `tensor-wasm serve` does.
pub fn serve(listen: SocketAddr, threads: usize) -> std::io::Result<()> {
    let engine = engine().map_err(std::io::Error::other)?;
    let _ticker = EpochTicker::start(engine.clone(), Duration::from_millis(10), Duration::from_millis(10))?;
    let linker = new_linker(&engine).map_err(std::io::Error::other)?;
    let state = Arc::new(State {
        engine,
        linker,
        functions: RwLock::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        wasi: Arc::new(WasiArgs::new(&["function"], &[])),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("listening on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "the body is too large")),
    };
    let segments: Vec<&str> = parts.uri.path().trim_matches('/').split('/').collect();
    let response = match (&parts.method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        (&Method::GET, ["readyz"]) => json(StatusCode::OK, serde_json::json!({ "status": "ready" })),
        (&Method::POST, ["functions"]) => deploy(&state, &body),
        (&Method::DELETE, ["functions", id]) => match state.functions.write().expect("not poisoned").remove(*id) {
            Some(_) => Response::builder().status(StatusCode::NO_CONTENT).body(Full::default()).expect("valid"),
            None => error(StatusCode::NOT_FOUND, "function_not_found", "no such function"),
        },
        (&Method::POST, ["functions", id, "invoke"]) => invoke(&state, id, body.to_vec()).await,
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    };
    Ok(response)
}

fn deploy(state: &State, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_json", "the body is not JSON");
    };
    let (Some(name), Some(b64)) = (request["name"].as_str(), request["wasm_b64"].as_str()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "`name` and `wasm_b64` are required");
    };
    let Ok(wasm) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return error(StatusCode::BAD_REQUEST, "invalid_base64", "`wasm_b64` is not base64");
    };
    // Compiled on the request's worker thread, as a typical handler does.
    let module = match Module::new(&state.engine, &wasm) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_module", &format!("{e:#}")),
    };
    let id = format!("fn-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    state.functions.write().expect("not poisoned").insert(id.clone(), module);
    json(StatusCode::CREATED, serde_json::json!({ "id": id, "name": name }))
}

async fn invoke(state: &State, id: &str, stdin: Vec<u8>) -> Response<Full<Bytes>> {
    let Some(module) = state.functions.read().expect("not poisoned").get(id).cloned() else {
        return error(StatusCode::NOT_FOUND, "function_not_found", "no such function");
    };
    let (outcome, store) = run_fresh_instance(&state.engine, &state.linker, &module, state.wasi.clone(), stdin).await;
    match outcome {
        Ok(()) if store.data().stdout().is_empty() => {
            json(StatusCode::OK, serde_json::json!({ "result": "ok", "function_id": id }))
        }
        Ok(()) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::copy_from_slice(store.data().stdout())))
            .expect("valid"),
        Err(e) => error(StatusCode::BAD_GATEWAY, "guest_trap", &format!("{e:#}")),
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("valid")
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": { "kind": kind, "message": message } }))
}

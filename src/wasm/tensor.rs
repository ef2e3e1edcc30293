//! The guest's tensor ABI: import module `tensor_wasm` (docs/ABI.md). Each call builds a request
//! through the invocation's `Session`, pushes it onto the shard's ring to the session's device,
//! and awaits the completion without blocking the shard: the guest's task parks, and the shard's
//! dispatch poller wakes it.
//!
//! Every pointer and length from the guest is checked against its memory before anything is
//! sent. Failures are negative codes (`tensor_wasm_dispatch::status`), with a message that
//! `tensor_last_error` copies out. Handles index the invocation's own table, so a guest cannot name
//! another invocation's tensor, and the `Session` frees them all when the store is dropped.

use std::time::Instant;

use std::sync::Arc;

use tensor_wasm_dispatch::weights::MAX_NAME_BYTES;
use tensor_wasm_dispatch::{status, Args, Call, Claim, DType, Done, LoadGuard, Op, Resident, Session, MAX_RANK};
use wasmtime::{Caller, Linker};

use super::state::{GuestState, TensorContext};
use super::wasi::{memory, slice, slice_mut};
use crate::runtime::fair_yield;

pub const MODULE: &str = "tensor_wasm";

/// Every function of the module; `module::check_compiled` refuses any other import from it.
const FUNCTIONS: &[&str] = &[
    "tensor_create",
    "tensor_read",
    "tensor_shape",
    "tensor_free",
    "tensor_add",
    "tensor_mul",
    "tensor_scale",
    "tensor_relu",
    "tensor_softmax",
    "tensor_matmul",
    "tensor_sum",
    "tensor_last_error",
    // Dtypes, N-d shapes and the ops of MLPs and transformer blocks.
    "tensor_create_typed",
    "tensor_read_typed",
    "tensor_dtype",
    "tensor_cast",
    "tensor_sub",
    "tensor_div",
    "tensor_maximum",
    "tensor_gelu",
    "tensor_silu",
    "tensor_exp",
    "tensor_tanh",
    "tensor_sqrt",
    "tensor_rsqrt",
    "tensor_neg",
    "tensor_log_softmax",
    "tensor_sum_axis",
    "tensor_mean",
    "tensor_max",
    "tensor_argmax",
    "tensor_layer_norm",
    "tensor_rms_norm",
    "tensor_matmul_ex",
    "tensor_reshape",
    "tensor_permute",
    "tensor_concat",
    "tensor_slice",
    "tensor_gather",
    // A function's resident tensors.
    "tensor_weight",
    // Stream-ordered execution: waits for the calls before it.
    "tensor_sync",
];

/// `tensor_matmul_ex` flags.
const MATMUL_TRANSPOSE_A: i32 = 1;
const MATMUL_TRANSPOSE_B: i32 = 2;

pub fn provides(name: &str) -> bool {
    FUNCTIONS.contains(&name)
}

/// The one dtype the original `tensor_create` takes; `tensor_create_typed` takes them all.
const DTYPE_F32: i32 = DType::F32 as i32;

type Ctx<'a> = Caller<'a, GuestState>;

fn context<'a>(caller: &'a mut Ctx<'_>) -> wasmtime::Result<&'a mut TensorContext> {
    caller
        .data_mut()
        .tensors
        .as_mut()
        .ok_or_else(|| wasmtime::Error::msg("tensor call from an invocation without a tensor context"))
}

/// Why a call failed, as the guest's negative code and `tensor_last_error` message.
struct Failure(i32, String);

impl Failure {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Failure(code, message.into())
    }

    fn code(code: i32) -> Self {
        Failure(code, describe(code).to_string())
    }
}

fn describe(code: i32) -> &'static str {
    match code {
        status::BAD_HANDLE => "no such tensor in this invocation",
        status::SHAPE_MISMATCH => "the operands' shapes do not fit the op",
        status::QUOTA_EXCEEDED => "the tenant's device-memory quota is used up",
        status::BUSY => "the dispatch ring stayed full for --dispatch-max-wait-ms",
        status::DEVICE_ERROR => "the device failed the operation",
        status::TOO_MANY_TENSORS => "the invocation holds as many tensors as it may",
        status::INVALID_ARGUMENT => "a dimension is zero, the rank is outside 1..4, or the tensor is too large",
        status::UNSUPPORTED_DTYPE => "no such dtype",
        status::DTYPE_MISMATCH => "an operand's dtype does not fit the op",
        status::INVALID_AXIS => "the axis or permutation does not fit the tensor's rank",
        status::INDEX_OUT_OF_RANGE => {
            "an index is outside its range (a gather id past the table, a slice past the axis)"
        }
        status::UNSUPPORTED_ON_DEVICE => "the invocation's device does not run this op or dtype",
        status::NO_SUCH_WEIGHT => "the function carries no tensor of that name",
        _ => "the request failed",
    }
}

/// Sends the call that `prepare` builds and waits for it: a full ring is retried, yielding to the
/// shard between tries, for up to `--dispatch-max-wait-ms` within the invocation's deadline.
/// Returns what finished and the device it ran on.
async fn dispatch(
    caller: &mut Ctx<'_>,
    prepare: impl FnOnce(&mut Session) -> Result<Call, i32>,
) -> wasmtime::Result<Result<(Done, usize, Op), Failure>> {
    let ctx = context(caller)?;
    let call = match prepare(ctx.session()) {
        Ok(c) => c,
        Err(code) => return Ok(Err(Failure::code(code))),
    };
    if call.is_streamed() {
        mark(caller).await?;
        let busy_at = busy_at(context(caller)?);
        return stream(caller, call, busy_at).await;
    }
    let busy_at = busy_at(context(caller)?);
    let mut pending = match push_with_room(caller, call, busy_at, Session::try_send).await? {
        Ok(pending) => pending,
        Err(failure) => return Ok(Err(failure)),
    };
    let op = pending.op();
    let wait = context(caller)?.session().wait(&mut pending);
    let (completion, staging) = wait.await;
    let session = context(caller)?.session();
    let device = session.device().unwrap_or(0);
    let finished = session.finish(pending, completion, staging);
    Ok(finished.map(|done| (done, device, op)).map_err(|code| failure_of(session, code)))
}

/// When a call waiting for room in a full ring gives up with `busy`: `--dispatch-max-wait-ms` from
/// now, within the invocation's deadline, so that the guest sees `busy` rather than a timeout.
fn busy_at(ctx: &TensorContext) -> Instant {
    ctx.deadline.min(Instant::now() + ctx.dispatcher.config.max_ring_wait)
}

/// Sends a streamed kernel: its result's handle comes back as soon as the request is on the ring.
async fn stream(
    caller: &mut Ctx<'_>,
    call: Call,
    busy_at: Instant,
) -> wasmtime::Result<Result<(Done, usize, Op), Failure>> {
    let op = call.op().unwrap_or(Op::Sync);
    let sent = push_with_room(caller, call, busy_at, Session::try_stream).await?;
    let device = context(caller)?.session().device().unwrap_or(0);
    Ok(sent.map(|handle| (Done::Tensor(handle), device, op)))
}

/// Pushes `call` with `push` (waited for or streamed). A full ring is retried, yielding to the
/// shard between tries, until `busy_at`; then the call is given up with `busy`.
async fn push_with_room<T>(
    caller: &mut Ctx<'_>,
    mut call: Call,
    busy_at: Instant,
    push: fn(&mut Session, Call) -> Result<T, Call>,
) -> wasmtime::Result<Result<T, Failure>> {
    loop {
        let ctx = context(caller)?;
        match push(ctx.session(), call) {
            Ok(sent) => return Ok(Ok(sent)),
            Err(c) if Instant::now() < busy_at => {
                call = c;
                ctx.metrics.dispatch_ring_waits.inc();
                fair_yield::yield_now().await;
            }
            Err(c) => {
                ctx.session().abort(c);
                ctx.metrics.dispatch_busy.inc();
                return Ok(Err(Failure::code(status::BUSY)));
            }
        }
    }
}

/// Bounds how far a guest runs ahead of its device: every eighth of a ring of streamed kernels it
/// sends a sync, and first waits for the one before, so at most a quarter of the ring is ever
/// unfinished. An invocation cut off at its deadline leaves at most that much work behind, and
/// the shard's other invocations keep room on the ring; the device stays busy meanwhile, since
/// the guest waits for work an eighth of a ring behind its last op, not for all of it.
async fn mark(caller: &mut Ctx<'_>) -> wasmtime::Result<()> {
    let ctx = context(caller)?;
    // A ring shallower than 8 bounds the work left behind by itself, and a sync would take a
    // place the guest's own kernels need.
    let every = ctx.dispatcher.config.ring_depth / 8;
    if every == 0 || ctx.session().streamed_since_sync() < every {
        return Ok(());
    }
    if let Some(mut previous) = ctx.mark.take() {
        let wait = ctx.session().wait(&mut previous);
        let (completion, staging) = wait.await;
        // A failure it reports is the session's, reported again at the guest's next wait.
        let _ = context(caller)?.session().finish(previous, completion, staging);
    }
    let ctx = context(caller)?;
    let session = ctx.session();
    if let Ok(call) = session.sync() {
        match session.try_send(call) {
            Ok(pending) => ctx.mark = Some(pending),
            // A full ring: the guest's own send waits for room, and the next mark tries again.
            Err(call) => session.abort(call),
        }
    }
    Ok(())
}

/// A wait's failure: its own, or a streamed kernel's that failed earlier on the device, named by
/// its place in the invocation's calls.
fn failure_of(session: &Session, code: i32) -> Failure {
    match session.failure().filter(|f| f.status == code) {
        Some(f) => {
            let op = f.op.map_or("an op", |op| op.name());
            Failure::new(code, format!("call #{} ({op}) failed on the device: {}", f.seq, describe(code)))
        }
        None => Failure::code(code),
    }
}

/// Waits, within the invocation's deadline, for the kernels a guest streamed and never waited
/// for, so that an invocation ends once its device work has. A failure among them is the guest's
/// to have asked about (`tensor_sync`); here it changes nothing.
pub async fn finish_streamed(tensors: &mut TensorContext) {
    // An earlier mark is covered by the sync below; dropped, its ticket is recycled on arrival.
    drop(tensors.mark.take());
    let deadline = tensors.deadline;
    let Some(session) = tensors.session.as_mut().filter(|s| s.unsynced()) else { return };
    let Ok(mut call) = session.sync() else { return };
    let mut pending = loop {
        match session.try_send(call) {
            Ok(p) => break p,
            Err(c) if Instant::now() < deadline => {
                call = c;
                fair_yield::yield_now().await;
            }
            Err(c) => return session.abort(c),
        }
    };
    let (completion, staging) = session.wait(&mut pending).await;
    let _ = session.finish(pending, completion, staging);
}

/// `tensor_sync`: waits until every call the guest made before it has run on the device. 0, or
/// the failure of the first that did not (its place among the invocation's calls is in
/// `tensor_last_error`).
async fn sync(caller: &mut Ctx<'_>) -> wasmtime::Result<i32> {
    let started = Instant::now();
    let outcome = dispatch(caller, |s| s.sync()).await?.map(|(_, device, _)| (status::OK, device));
    settle(caller, started, Op::Sync, outcome)
}

/// Ends a call: counts it, keeps the message of a failure, and gives the guest its i32.
fn settle(
    caller: &mut Ctx<'_>,
    started: Instant,
    op: Op,
    outcome: Result<(i32, usize), Failure>,
) -> wasmtime::Result<i32> {
    let ctx = context(caller)?;
    Ok(match outcome {
        Ok((value, device)) => {
            ctx.metrics.record_kernel(device, op, started.elapsed());
            value
        }
        Err(Failure(code, message)) => ctx.fail(code, message),
    })
}

fn handle_of(done: Done) -> i32 {
    match done {
        Done::Tensor(h) => h,
        Done::Data(_) => status::INVALID_ARGUMENT,
    }
}

/// Reads `tensor_create`'s arguments out of guest memory `mem`: the shape (`rank` u32s at
/// `shape_ptr`) and the data (`data_len` bytes of little-endian f32 at `data_ptr`). Every pointer
/// and length comes from the guest, so every one is checked; a failure is a status code and a
/// message. Public for the fuzzer and the property tests.
pub fn decode_create_args(
    mem: &[u8],
    dtype: i32,
    shape_ptr: i32,
    rank: i32,
    data_ptr: i32,
    data_len: i32,
) -> Result<(Vec<u32>, Vec<f32>), (i32, String)> {
    if dtype != DTYPE_F32 {
        return Err((status::UNSUPPORTED_DTYPE, format!("dtype {dtype}: only 0 (f32) exists")));
    }
    let (shape, data) = read_shape_and_data(mem, shape_ptr, rank, data_ptr, data_len)?;
    if data.len() % 4 != 0 {
        return Err((status::SHAPE_MISMATCH, "the data is not a whole number of f32".to_string()));
    }
    let values: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok((shape, values))
}

/// Reads `rank` little-endian u32s at `ptr`: a shape or a permutation.
fn read_dims(mem: &[u8], ptr: i32, rank: i32) -> Result<Vec<u32>, (i32, String)> {
    let rank = usize::try_from(rank)
        .ok()
        .filter(|r| (1..=MAX_RANK).contains(r))
        .ok_or_else(|| (status::INVALID_ARGUMENT, format!("rank {rank}: a tensor has 1 to {MAX_RANK} dimensions")))?;
    let bytes = slice(mem, ptr, (rank * 4) as u32)
        .ok_or_else(|| (status::OUT_OF_BOUNDS, "the shape lies outside guest memory".to_string()))?;
    Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A create call's shape and the bytes of its data, in guest memory.
type ShapeAndData<'m> = (Vec<u32>, &'m [u8]);

/// The shape (`rank` u32s at `shape_ptr`) and the data (`data_len` bytes at `data_ptr`) of a
/// create call, both checked to lie in guest memory.
fn read_shape_and_data(
    mem: &[u8],
    shape_ptr: i32,
    rank: i32,
    data_ptr: i32,
    data_len: i32,
) -> Result<ShapeAndData<'_>, (i32, String)> {
    let shape = read_dims(mem, shape_ptr, rank)?;
    let data = slice(mem, data_ptr, data_len as u32)
        .ok_or_else(|| (status::OUT_OF_BOUNDS, "the data lies outside guest memory".to_string()))?;
    Ok((shape, data))
}

/// A decoded `tensor_create_typed` call: shape, dtype, data bytes.
pub type TypedCreateArgs = (Vec<u32>, DType, Vec<u8>);

/// `tensor_create_typed`'s arguments: the shape, the dtype, and the data's bytes (little-endian
/// elements of the dtype). Public for the fuzzer.
pub fn decode_typed_create_args(
    mem: &[u8],
    dtype: i32,
    shape_ptr: i32,
    rank: i32,
    data_ptr: i32,
    data_len: i32,
) -> Result<TypedCreateArgs, (i32, String)> {
    let dt = DType::from_code(dtype)
        .ok_or_else(|| (status::UNSUPPORTED_DTYPE, format!("dtype {dtype}: 0 f32, 1 f16, 2 bf16, 3 i32")))?;
    let (shape, data) = read_shape_and_data(mem, shape_ptr, rank, data_ptr, data_len)?;
    Ok((shape, dt, data.to_vec()))
}

/// `tensor_create` and `tensor_create_typed`, which differ only in how they read their arguments
/// out of guest memory (`decode`) and how the session uploads them (`upload`).
async fn create<A>(
    caller: &mut Ctx<'_>,
    decode: impl FnOnce(&[u8]) -> Result<A, (i32, String)>,
    upload: impl FnOnce(&mut Session, A) -> Result<Call, i32>,
) -> wasmtime::Result<i32> {
    let started = Instant::now();
    let read = match memory(caller) {
        Ok((mem, _)) => decode(mem).map_err(|(code, message)| Failure::new(code, message)),
        Err(_) => Err(Failure::new(status::OUT_OF_BOUNDS, "the module exports no memory")),
    };
    let outcome = match read {
        Ok(args) => dispatch(caller, |s| upload(s, args)).await?.map(|(d, dev, _)| (handle_of(d), dev)),
        Err(f) => Err(f),
    };
    settle(caller, started, Op::Upload, outcome)
}

/// `tensor_read` (dtype 0) and `tensor_read_typed`: the dtype must be the tensor's, so that a
/// guest never takes a tensor's bytes for another dtype's.
async fn read(caller: &mut Ctx<'_>, handle: i32, dtype: i32, out_ptr: i32, out_len: i32) -> wasmtime::Result<i32> {
    let started = Instant::now();
    let check = (|| {
        let t = *context(caller)
            .map_err(|_| Failure::code(status::BAD_HANDLE))?
            .session()
            .tensor(handle)
            .map_err(Failure::code)?;
        let want = DType::from_code(dtype).ok_or_else(|| Failure::code(status::UNSUPPORTED_DTYPE))?;
        if t.dtype != want {
            return Err(Failure::new(
                status::DTYPE_MISMATCH,
                format!(
                    "the tensor is {}, read as {} (tensor_read_typed reads any dtype)",
                    t.dtype.name(),
                    want.name()
                ),
            ));
        }
        let bytes = t.bytes();
        if (out_len as u32 as u64) < bytes {
            return Err(Failure::new(
                status::BUFFER_TOO_SMALL,
                format!("the tensor has {bytes} bytes, the buffer {out_len}"),
            ));
        }
        let (mem, _) =
            memory(caller).map_err(|_| Failure::new(status::OUT_OF_BOUNDS, "the module exports no memory"))?;
        // Checked before sending: guest memory only grows, so the range stays valid.
        slice(mem, out_ptr, bytes as u32)
            .ok_or_else(|| Failure::new(status::OUT_OF_BOUNDS, "the buffer lies outside guest memory"))?;
        Ok(bytes)
    })();
    let outcome = match check {
        Ok(bytes) => match dispatch(caller, |s| s.download(handle)).await? {
            Ok((Done::Data(values), device, _)) => {
                let (mem, _) = memory(caller)?;
                let dst =
                    slice_mut(mem, out_ptr, bytes as u32).ok_or_else(|| wasmtime::Error::msg("guest memory shrank"))?;
                // The words hold the tensor's bytes; a 2-byte dtype's odd count ends mid-word.
                for (d, v) in dst.chunks_mut(4).zip(values) {
                    d.copy_from_slice(&v.to_bits().to_le_bytes()[..d.len()]);
                }
                Ok((bytes as i32, device))
            }
            Ok((Done::Tensor(_), _, _)) => Err(Failure::code(status::INVALID_ARGUMENT)),
            Err(f) => Err(f),
        },
        Err(f) => Err(f),
    };
    settle(caller, started, Op::Download, outcome)
}

/// `tensor_weight`: a handle to the function's resident tensor `name`. The first invocation on a
/// device to ask uploads all of the function's tensors there (once per function version and
/// device, counted once against the tenant's quota); one that finds another uploading waits for
/// it, yielding to the shard, within its deadline.
async fn weight(caller: &mut Ctx<'_>, name_ptr: i32, name_len: i32) -> wasmtime::Result<i32> {
    let outcome = weight_handle(caller, name_ptr, name_len).await?;
    let ctx = context(caller)?;
    Ok(match outcome {
        Ok(handle) => handle,
        Err(Failure(code, message)) => ctx.fail(code, message),
    })
}

async fn weight_handle(caller: &mut Ctx<'_>, name_ptr: i32, name_len: i32) -> wasmtime::Result<Result<i32, Failure>> {
    let name = match memory(caller) {
        Err(_) => return Ok(Err(Failure::new(status::OUT_OF_BOUNDS, "the module exports no memory"))),
        Ok((mem, _)) => match slice(mem, name_ptr, name_len as u32) {
            None => return Ok(Err(Failure::new(status::OUT_OF_BOUNDS, "the name lies outside guest memory"))),
            Some(bytes) if bytes.len() > MAX_NAME_BYTES => {
                return Ok(Err(Failure::new(
                    status::NO_SUCH_WEIGHT,
                    format!("no tensor name is over {MAX_NAME_BYTES} bytes"),
                )))
            }
            Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        },
    };
    let ctx = context(caller)?;
    let Some(weights) = ctx.weights.clone() else {
        return Ok(Err(Failure::new(status::NO_SUCH_WEIGHT, "the function was deployed without tensors")));
    };
    let Some(index) = weights.index(&name) else {
        return Ok(Err(Failure::new(status::NO_SUCH_WEIGHT, format!("the function carries no tensor named {name:?}"))));
    };
    loop {
        let ctx = context(caller)?;
        let device = ctx.session().place();
        if let Some(resident) = ctx.residents.iter().find(|r| r.device() == device).cloned() {
            let Some(info) = resident.info(index) else {
                return Ok(Err(Failure::new(status::INVALID_ARGUMENT, "the device copy lacks a tensor")));
            };
            return Ok(ctx.session().adopt(info).map_err(Failure::code));
        }
        match weights.claim(device) {
            Claim::Ready(resident) => ctx.residents.push(resident),
            Claim::Wait if Instant::now() < ctx.deadline => fair_yield::yield_now().await,
            Claim::Wait => {
                let message = "another invocation is still uploading the function's tensors";
                return Ok(Err(Failure::new(status::TIMEOUT, message)));
            }
            Claim::Load(guard) => match upload_weights(caller, guard).await? {
                Ok(resident) => context(caller)?.residents.push(resident),
                Err(failure) => return Ok(Err(failure)),
            },
        }
    }
}

/// Uploads every tensor of `guard`'s function to its device, each a tracked upload on the
/// invocation's ring. On any failure the partial copy is dropped: its tensors freed, its quota
/// returned, and the device left without a copy for a later invocation to try again.
async fn upload_weights(caller: &mut Ctx<'_>, guard: LoadGuard) -> wasmtime::Result<Result<Arc<Resident>, Failure>> {
    let weights = guard.weights().clone();
    let ctx = context(caller)?;
    let mut resident = Resident::new(ctx.dispatcher.clone(), ctx.shard, guard.device(), weights.tenant());
    if !resident.reserve(weights.total_bytes()) {
        let message = format!("the function's tensors take {} bytes, past the tenant's quota", weights.total_bytes());
        return Ok(Err(Failure::new(status::QUOTA_EXCEEDED, message)));
    }
    for weight in weights.iter() {
        let started = Instant::now();
        match dispatch(caller, |s| s.upload_weight(&mut resident, weight)).await? {
            Ok((_, device, _)) => context(caller)?.metrics.record_kernel(device, Op::Upload, started.elapsed()),
            Err(failure) => return Ok(Err(failure)),
        }
    }
    let resident = Arc::new(resident);
    guard.loaded(resident.clone());
    Ok(Ok(resident))
}

async fn kernel(caller: &mut Ctx<'_>, op: Op, a: i32, b: i32, scalar: f32) -> wasmtime::Result<i32> {
    let started = Instant::now();
    let outcome = dispatch(caller, |s| s.kernel(op, a, b, scalar)).await?.map(|(d, dev, _)| (handle_of(d), dev));
    settle(caller, started, op, outcome)
}

/// Any op in its general form ([`Session::op`]).
async fn general(caller: &mut Ctx<'_>, op: Op, args: Args) -> wasmtime::Result<i32> {
    let started = Instant::now();
    let outcome = dispatch(caller, |s| s.op(op, &args)).await?.map(|(d, dev, _)| (handle_of(d), dev));
    settle(caller, started, op, outcome)
}

fn keepdims(flag: i32) -> bool {
    flag != 0
}

async fn cast(caller: &mut Ctx<'_>, a: i32, dtype: i32) -> wasmtime::Result<i32> {
    match DType::from_code(dtype) {
        Some(to) => general(caller, Op::Cast, Args { a, dtype: Some(to), ..Default::default() }).await,
        None => {
            Ok(context(caller)?.fail(status::UNSUPPORTED_DTYPE, format!("dtype {dtype}: 0 f32, 1 f16, 2 bf16, 3 i32")))
        }
    }
}

async fn matmul_ex(caller: &mut Ctx<'_>, a: i32, b: i32, flags: i32) -> wasmtime::Result<i32> {
    if flags & !(MATMUL_TRANSPOSE_A | MATMUL_TRANSPOSE_B) != 0 {
        return Ok(context(caller)?.fail(status::INVALID_ARGUMENT, format!("matmul flags {flags}: only bits 1 and 2")));
    }
    let args = Args {
        a,
        b,
        transpose_a: flags & MATMUL_TRANSPOSE_A != 0,
        transpose_b: flags & MATMUL_TRANSPOSE_B != 0,
        ..Default::default()
    };
    general(caller, Op::Matmul, args).await
}

async fn permute(caller: &mut Ctx<'_>, a: i32, perm_ptr: i32, rank: i32) -> wasmtime::Result<i32> {
    let perm = match memory(caller) {
        Ok((mem, _)) => read_dims(mem, perm_ptr, rank),
        Err(_) => Err((status::OUT_OF_BOUNDS, "the module exports no memory".to_string())),
    };
    let perm = match perm {
        Ok(p) => p,
        Err((code, message)) => return Ok(context(caller)?.fail(code, message)),
    };
    let mut args = Args { a, perm_len: perm.len() as u8, ..Default::default() };
    for (slot, &p) in args.perm.iter_mut().zip(&perm) {
        // An axis past the rank is refused by the shape rules; past a u8 it is refused here.
        *slot = u8::try_from(p).unwrap_or(u8::MAX);
    }
    general(caller, Op::Permute, args).await
}

/// A view with another shape: made on the host, no device call (docs/ABI.md).
fn reshape(caller: &mut Ctx<'_>, a: i32, shape_ptr: i32, rank: i32) -> wasmtime::Result<i32> {
    let shape = match memory(caller) {
        Ok((mem, _)) => read_dims(mem, shape_ptr, rank),
        Err(_) => Err((status::OUT_OF_BOUNDS, "the module exports no memory".to_string())),
    };
    let ctx = context(caller)?;
    Ok(match shape.and_then(|s| ctx.session().reshape(a, &s).map_err(|c| (c, describe(c).to_string()))) {
        Ok(h) => h,
        Err((code, message)) => ctx.fail(code, message),
    })
}

fn dtype_of(caller: &mut Ctx<'_>, handle: i32) -> wasmtime::Result<i32> {
    let ctx = context(caller)?;
    Ok(match ctx.session().tensor(handle) {
        Ok(t) => t.dtype as i32,
        Err(code) => ctx.fail(code, describe(code)),
    })
}

fn shape(caller: &mut Ctx<'_>, handle: i32, out_ptr: i32, max_rank: i32) -> wasmtime::Result<i32> {
    let info = match context(caller)?.session().tensor(handle) {
        Ok(t) => *t,
        Err(code) => return Ok(context(caller)?.fail(code, describe(code))),
    };
    let rank = info.shape().len();
    if (max_rank as u32 as usize) < rank {
        return Ok(context(caller)?.fail(status::BUFFER_TOO_SMALL, format!("the tensor has rank {rank}")));
    }
    let (mem, state) = memory(caller)?;
    match slice_mut(mem, out_ptr, (rank * 4) as u32) {
        Some(dst) => {
            for (d, v) in dst.chunks_exact_mut(4).zip(info.shape()) {
                d.copy_from_slice(&v.to_le_bytes());
            }
            Ok(rank as i32)
        }
        None => Ok(state
            .tensors
            .as_mut()
            .map_or(status::OUT_OF_BOUNDS, |c| c.fail(status::OUT_OF_BOUNDS, "the buffer lies outside guest memory"))),
    }
}

fn free(caller: &mut Ctx<'_>, handle: i32) -> wasmtime::Result<i32> {
    let ctx = context(caller)?;
    Ok(match ctx.session().free(handle) {
        Ok(()) => status::OK,
        Err(code) => ctx.fail(code, describe(code)),
    })
}

fn last_error(caller: &mut Ctx<'_>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let (mem, state) = memory(caller)?;
    let message = state.tensors.as_ref().map(|c| c.last_error.as_bytes()).unwrap_or_default();
    let n = message.len().min(len.max(0) as usize);
    match slice_mut(mem, ptr, n as u32) {
        Some(dst) => {
            dst.copy_from_slice(&message[..n]);
            Ok(message.len() as i32)
        }
        None => Ok(status::OUT_OF_BOUNDS),
    }
}

pub fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker
        .func_wrap_async(MODULE, "tensor_sync", |mut c: Ctx<'_>, (): ()| Box::new(async move { sync(&mut c).await }))?;
    linker.func_wrap_async(MODULE, "tensor_weight", |mut c: Ctx<'_>, (ptr, len): (i32, i32)| {
        Box::new(async move { weight(&mut c, ptr, len).await })
    })?;
    linker.func_wrap_async(
        MODULE,
        "tensor_create",
        |mut c: Ctx<'_>, (dtype, shape, rank, data, len): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let decode = |mem: &[u8]| decode_create_args(mem, dtype, shape, rank, data, len);
                create(&mut c, decode, |s, (dims, values): (Vec<u32>, _)| s.upload(&dims, values)).await
            })
        },
    )?;
    linker.func_wrap_async(MODULE, "tensor_read", |mut c: Ctx<'_>, (h, ptr, len): (i32, i32, i32)| {
        Box::new(async move { read(&mut c, h, DType::F32 as i32, ptr, len).await })
    })?;
    linker.func_wrap_async(
        MODULE,
        "tensor_create_typed",
        |mut c: Ctx<'_>, (dtype, shape, rank, data, len): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let decode = |mem: &[u8]| decode_typed_create_args(mem, dtype, shape, rank, data, len);
                create(&mut c, decode, |s, (dims, dt, bytes): TypedCreateArgs| s.upload_bytes(&dims, dt, &bytes)).await
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "tensor_read_typed",
        |mut c: Ctx<'_>, (h, dtype, ptr, len): (i32, i32, i32, i32)| {
            Box::new(async move { read(&mut c, h, dtype, ptr, len).await })
        },
    )?;
    linker.func_wrap(MODULE, "tensor_dtype", |mut c: Ctx<'_>, h: i32| dtype_of(&mut c, h))?;
    linker.func_wrap_async(MODULE, "tensor_cast", |mut c: Ctx<'_>, (a, dtype): (i32, i32)| {
        Box::new(async move { cast(&mut c, a, dtype).await })
    })?;
    let binary = [
        ("tensor_sub", Op::Sub),
        ("tensor_div", Op::Div),
        ("tensor_maximum", Op::Maximum),
        ("tensor_gather", Op::Gather),
    ];
    for (name, op) in binary {
        linker.func_wrap_async(MODULE, name, move |mut c: Ctx<'_>, (a, b): (i32, i32)| {
            Box::new(async move { general(&mut c, op, Args { a, b, ..Default::default() }).await })
        })?;
    }
    let unary = [
        ("tensor_gelu", Op::Gelu),
        ("tensor_silu", Op::Silu),
        ("tensor_exp", Op::Exp),
        ("tensor_tanh", Op::Tanh),
        ("tensor_sqrt", Op::Sqrt),
        ("tensor_rsqrt", Op::Rsqrt),
        ("tensor_neg", Op::Neg),
        ("tensor_log_softmax", Op::LogSoftmax),
    ];
    for (name, op) in unary {
        linker.func_wrap_async(MODULE, name, move |mut c: Ctx<'_>, (a,): (i32,)| {
            Box::new(async move { general(&mut c, op, Args::new(a)).await })
        })?;
    }
    let reductions = [
        ("tensor_sum_axis", Op::Sum),
        ("tensor_mean", Op::Mean),
        ("tensor_max", Op::Max),
        ("tensor_argmax", Op::Argmax),
    ];
    for (name, op) in reductions {
        linker.func_wrap_async(MODULE, name, move |mut c: Ctx<'_>, (a, axis, keep): (i32, i32, i32)| {
            Box::new(async move {
                general(&mut c, op, Args { a, axis, keepdims: keepdims(keep), ..Default::default() }).await
            })
        })?;
    }
    linker.func_wrap_async(
        MODULE,
        "tensor_layer_norm",
        |mut c: Ctx<'_>, (a, weight, bias, eps): (i32, i32, i32, f32)| {
            Box::new(async move {
                general(&mut c, Op::LayerNorm, Args { a, b: weight, c: bias, eps, ..Default::default() }).await
            })
        },
    )?;
    linker.func_wrap_async(MODULE, "tensor_rms_norm", |mut c: Ctx<'_>, (a, weight, eps): (i32, i32, f32)| {
        Box::new(async move { general(&mut c, Op::RmsNorm, Args { a, b: weight, eps, ..Default::default() }).await })
    })?;
    linker.func_wrap_async(MODULE, "tensor_matmul_ex", |mut c: Ctx<'_>, (a, b, flags): (i32, i32, i32)| {
        Box::new(async move { matmul_ex(&mut c, a, b, flags).await })
    })?;
    linker.func_wrap_async(MODULE, "tensor_permute", |mut c: Ctx<'_>, (a, perm, rank): (i32, i32, i32)| {
        Box::new(async move { permute(&mut c, a, perm, rank).await })
    })?;
    linker.func_wrap_async(MODULE, "tensor_concat", |mut c: Ctx<'_>, (a, b, axis): (i32, i32, i32)| {
        Box::new(async move { general(&mut c, Op::Concat, Args { a, b, axis, ..Default::default() }).await })
    })?;
    linker.func_wrap_async(MODULE, "tensor_slice", |mut c: Ctx<'_>, (a, axis, start, len): (i32, i32, i32, i32)| {
        Box::new(async move {
            // Negative starts and lengths become huge ones, which the range check refuses.
            let args = Args { a, axis, start: start as u32, len: len as u32, ..Default::default() };
            general(&mut c, Op::Slice, args).await
        })
    })?;
    linker.func_wrap(MODULE, "tensor_reshape", |mut c: Ctx<'_>, a: i32, shape: i32, rank: i32| {
        reshape(&mut c, a, shape, rank)
    })?;
    for (name, op) in [("tensor_add", Op::Add), ("tensor_mul", Op::Mul), ("tensor_matmul", Op::Matmul)] {
        linker.func_wrap_async(MODULE, name, move |mut c: Ctx<'_>, (a, b): (i32, i32)| {
            Box::new(async move { kernel(&mut c, op, a, b, 0.0).await })
        })?;
    }
    for (name, op) in [("tensor_relu", Op::Relu), ("tensor_softmax", Op::Softmax), ("tensor_sum", Op::Sum)] {
        linker.func_wrap_async(MODULE, name, move |mut c: Ctx<'_>, (a,): (i32,)| {
            Box::new(async move { kernel(&mut c, op, a, 0, 0.0).await })
        })?;
    }
    linker.func_wrap_async(MODULE, "tensor_scale", |mut c: Ctx<'_>, (a, s): (i32, f32)| {
        Box::new(async move { kernel(&mut c, Op::Scale, a, 0, s).await })
    })?;
    linker
        .func_wrap(MODULE, "tensor_shape", |mut c: Ctx<'_>, h: i32, ptr: i32, max: i32| shape(&mut c, h, ptr, max))?;
    linker.func_wrap(MODULE, "tensor_free", |mut c: Ctx<'_>, h: i32| free(&mut c, h))?;
    linker.func_wrap(MODULE, "tensor_last_error", |mut c: Ctx<'_>, ptr: i32, len: i32| last_error(&mut c, ptr, len))?;
    Ok(())
}

//! What runs a request: the `host` back-end (CPU, always built) or `cuda` (cudarc, loaded at run
//! time). A device worker owns one back-end value and is its only user, so back-ends need no
//! locking of their own.

use std::time::Instant;

use crate::record::{status, Op, Request};

pub mod cuda;
pub mod host;

/// Which implementation a device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Host,
    Cuda,
}

impl BackendKind {
    pub fn label(self) -> &'static str {
        match self {
            BackendKind::Host => "host",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// The result of starting a request.
pub enum Submitted {
    /// Finished within the call, with this status.
    Done(i32),
    /// Running on the device; a later [`Backend::poll`] reports it.
    InFlight,
}

/// A request that finished after [`Submitted::InFlight`].
pub struct Finished {
    pub req: Request,
    pub status: i32,
    pub started: Instant,
}

/// One device's implementation of the ops. Called only from that device's worker thread.
pub trait Backend: Send + 'static {
    fn kind(&self) -> BackendKind;

    /// A human-readable name for logs: "host:0", "cuda:0 NVIDIA H100 80GB HBM3".
    fn describe(&self) -> String;

    /// Starts `req`. A request that fails validation finishes at once with its status.
    fn submit(&mut self, req: &Request, started: Instant) -> Submitted;

    /// Appends every in-flight request that finished since the last call.
    fn poll(&mut self, finished: &mut Vec<Finished>);

    /// Requests started and not yet reported.
    fn in_flight(&self) -> usize;

    /// Bytes of tensors this device holds.
    fn memory_used(&self) -> u64;
}

/// The staging buffer a request names.
///
/// # Safety
/// `req.host_addr` must point to `req.host_len` four-byte words that nothing else touches until the request's
/// completion is delivered. The shard's ticket table guarantees it (see `port::Tickets`): it owns
/// the buffer and keeps it, even when the waiting guest is gone, until the completion arrives.
pub(crate) unsafe fn staging<'a>(req: &Request) -> &'a mut [f32] {
    if req.host_len == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(req.host_addr as *mut f32, req.host_len as usize)
}

/// A kernel request's descriptor, if it is one of the general form (see [`crate::record::Desc`]).
///
/// # Safety
/// As for [`staging`].
pub(crate) unsafe fn descriptor(req: &Request) -> Option<Result<crate::record::Desc, i32>> {
    if req.host_len == 0 {
        return None;
    }
    Some(crate::record::Desc::from_words(staging(req)).ok_or(status::INVALID_ARGUMENT))
}

/// Elements the request's operands and output have, checked against one another: the worker's own
/// guard, after the shard's validation, so that a bad request is an error and never a wild read.
pub(crate) struct Shape {
    /// Elements of `a` (and `b` for element-wise ops).
    pub a: usize,
    /// Elements of `b` where it differs from `a` (matmul).
    pub b: usize,
    /// Elements of the output.
    pub out: usize,
}

pub(crate) fn shape_of(op: Op, req: &Request) -> Result<Shape, i32> {
    let [d0, d1, d2] = req.dims.map(|d| d as usize);
    Ok(match op {
        Op::Add | Op::Mul | Op::Scale | Op::Relu => Shape { a: d0, b: d0, out: d0 },
        Op::Softmax => Shape { a: d0 * d1, b: 0, out: d0 * d1 },
        Op::Matmul => Shape { a: d0 * d1, b: d1 * d2, out: d0 * d2 },
        Op::Sum => Shape { a: d0, b: 0, out: 1 },
        _ => return Err(status::INVALID_ARGUMENT),
    })
}

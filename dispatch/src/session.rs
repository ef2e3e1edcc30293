//! One invocation's tensors. A guest names tensors by small handles that index this table, so it
//! cannot name another invocation's tensor; everything the session created is freed, and its quota
//! returned, when it is dropped, whatever ended the invocation.

use std::sync::Arc;
use std::time::Instant;

use zerocopy::IntoBytes;

use crate::dispatcher::Dispatcher;
use crate::port::{ShardPort, TicketWait, STREAMED};
use crate::quota::TenantMemory;
use crate::record::{flags, status, Completion, DType, Desc, Op, Request, MAX_RANK, SLOT_A, SLOT_B, SLOT_C, SLOT_OUT};
use crate::shape::{self, Dims};
use crate::weights::{Resident, Weight};

/// What the session knows of one tensor: enough to validate every op before it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub id: u64,
    pub dims: [u32; MAX_RANK],
    pub rank: u8,
    pub elements: u64,
    pub dtype: DType,
    /// Another handle may name the same device tensor (a reshape view): freeing this handle
    /// frees the memory only when no other handle names it.
    pub aliased: bool,
    /// A function's resident weight (`weights`): freeing the handle only forgets it, and the
    /// session's quota never counted it.
    pub borrowed: bool,
}

impl TensorInfo {
    pub fn shape(&self) -> &[u32] {
        &self.dims[..usize::from(self.rank)]
    }

    /// Device bytes, by dtype: what the tenant's quota counts.
    pub fn bytes(&self) -> u64 {
        self.elements * self.dtype.size()
    }
}

fn info(id: u64, shape: &[u32], dtype: DType, max_elements: u64) -> Result<TensorInfo, i32> {
    let Dims { dims, rank } = Dims::new(shape)?;
    let elements = shape::elements(shape)?;
    if elements > max_elements {
        return Err(status::INVALID_ARGUMENT);
    }
    Ok(TensorInfo { id, dims, rank, elements, dtype, aliased: false, borrowed: false })
}

/// Four-byte staging words for `bytes` bytes.
fn words_for(bytes: u64) -> usize {
    bytes.div_ceil(4) as usize
}

/// The operands and parameters of a general op ([`Session::op`]). A handle of 0 is absent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Args {
    pub a: i32,
    pub b: i32,
    /// Layer norm's bias.
    pub c: i32,
    /// Reductions, concat, slice: NumPy-style, negative counts from the end.
    pub axis: i32,
    pub keepdims: bool,
    pub transpose_a: bool,
    pub transpose_b: bool,
    /// Slice: the first index and the length along `axis`.
    pub start: u32,
    pub len: u32,
    /// Permute: output axis i is input axis `perm[i]`, for `perm_len` (the rank) axes.
    pub perm: [u8; MAX_RANK],
    pub perm_len: u8,
    /// Norms' epsilon.
    pub eps: f32,
    /// Scale's factor.
    pub scalar: f32,
    /// Cast's target.
    pub dtype: Option<DType>,
}

impl Args {
    pub fn new(a: i32) -> Args {
        Args { a, ..Default::default() }
    }
}

fn put(d: &mut Desc, slot: usize, t: &TensorInfo) {
    d.shapes[slot] = t.dims;
    d.ranks[slot] = t.rank;
    d.dtypes[slot] = t.dtype as u8;
}

/// A request that is ready to send: its ticket is open, and its quota is reserved. Dropped
/// unsent (its invocation ended while it waited for room), it closes its ticket; the session
/// returns its quota.
pub struct Call {
    req: Request,
    out: Option<TensorInfo>,
    port: Option<Arc<ShardPort>>,
    /// A streamed call's descriptor, which `req.host_addr` points into: the call's until it is
    /// sent, then the worker's to free (`try_stream`).
    descriptor: Option<Box<[f32]>>,
}

impl Call {
    pub fn op(&self) -> Option<Op> {
        Op::from_u8(self.req.op)
    }

    /// Sent with [`Session::try_stream`]: nobody waits for it.
    pub fn is_streamed(&self) -> bool {
        self.req.ticket == STREAMED
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(port) = self.port.take() {
            drop(port.cancel(self.req.ticket));
        }
    }
}

/// A streamed request's failure, as the worker reported it at the session's next wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeferredFailure {
    /// The failed request's place among the session's requests, from 1.
    pub seq: u64,
    pub op: Option<Op>,
    pub status: i32,
}

/// A request on its way: what `finish` needs. Dropped before it is waited on, it abandons its
/// ticket, which then keeps the staging buffer until the completion comes.
pub struct Pending {
    ticket: u32,
    op: Op,
    out: Option<TensorInfo>,
    port: Option<Arc<ShardPort>>,
    /// Its completion shows that everything the session streamed before it has run: a sync, a
    /// read or a create of the session's own, run on its device after them.
    orders_session: bool,
    seq: u64,
}

impl Pending {
    pub fn op(&self) -> Op {
        self.op
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(port) = self.port.take() {
            port.abandon(self.ticket);
        }
    }
}

/// What a finished request gives the guest.
#[derive(Debug)]
pub enum Done {
    /// A new tensor's handle.
    Tensor(i32),
    /// A downloaded tensor's bytes, in four-byte words (for f32, its elements).
    Data(Vec<f32>),
}

pub struct Session {
    dispatcher: Arc<Dispatcher>,
    shard: usize,
    tenant: Arc<TenantMemory>,
    id: u64,
    /// Chosen at the first tensor: all of a session's tensors live on one device.
    device: Option<usize>,
    tensors: Vec<Option<TensorInfo>>,
    free_slots: Vec<u32>,
    live: usize,
    /// Quota this session reserved and has not returned.
    held_bytes: u64,
    /// Kernels are streamed ([`Session::set_streaming`]).
    streaming: bool,
    /// The last request's `seq`.
    seq: u64,
    /// Streamed requests were sent since the session last waited for one.
    unsynced: bool,
    /// Streamed requests sent since the session last sent a sync.
    streamed_since_sync: usize,
    /// The `seq` of the last streamed request.
    last_streamed: u64,
    /// The first streamed failure, once a wait reported it.
    failure: Option<DeferredFailure>,
}

impl Session {
    pub fn new(dispatcher: Arc<Dispatcher>, shard: usize, tenant: u64) -> Session {
        let tenant = dispatcher.quotas.tenant(tenant);
        let id = dispatcher.port(shard).next_id();
        Session {
            dispatcher,
            shard,
            tenant,
            id,
            device: None,
            tensors: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            held_bytes: 0,
            streaming: false,
            seq: 0,
            unsynced: false,
            streamed_since_sync: 0,
            last_streamed: 0,
            failure: None,
        }
    }

    /// Kernels are streamed from now on: [`Session::try_stream`] sends one and hands its result's
    /// handle back at once, and the session's device runs them in order; the guest waits only at
    /// its next read or sync, where an earlier failure is reported (`DeferredFailure`). Gather
    /// stays waited for: whether its ids are in range is known only from their values.
    pub fn set_streaming(&mut self, on: bool) {
        self.streaming = on;
    }

    /// Streamed requests were sent since the session last waited.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Streamed requests sent since the session last sent a sync: a caller bounds how far a
    /// guest runs ahead of its device with it, so that an invocation cut off at its deadline
    /// leaves a bounded amount of work behind it on the ring.
    pub fn streamed_since_sync(&self) -> usize {
        self.streamed_since_sync
    }

    /// The failure of a streamed request, once a wait has reported it.
    pub fn failure(&self) -> Option<DeferredFailure> {
        self.failure
    }

    /// A request that completes once everything the session sent before it has run.
    pub fn sync(&mut self) -> Result<Call, i32> {
        let req = self.request(Op::Sync);
        self.prepare(req, None, Vec::new())
    }

    /// The session's id, which its requests carry.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// The device this session's tensors live on, once it has one.
    pub fn device(&self) -> Option<usize> {
        self.device
    }

    pub fn tensor(&self, handle: i32) -> Result<&TensorInfo, i32> {
        usize::try_from(handle)
            .ok()
            .and_then(|h| h.checked_sub(1))
            .and_then(|i| self.tensors.get(i))
            .and_then(Option::as_ref)
            .ok_or(status::BAD_HANDLE)
    }

    /// A new f32 tensor of `shape` holding `data` (row-major).
    pub fn upload(&mut self, shape: &[u32], data: Vec<f32>) -> Result<Call, i32> {
        let out = info(0, shape, DType::F32, self.dispatcher.config.max_tensor_elements)?;
        if out.elements != data.len() as u64 {
            return Err(status::SHAPE_MISMATCH);
        }
        let mut req = self.request(Op::Upload);
        req.host_len = data.len() as u64;
        self.prepare(req, Some(out), data)
    }

    /// A new tensor of `shape` and `dtype` holding `bytes`: its elements, little-endian,
    /// row-major.
    pub fn upload_bytes(&mut self, shape: &[u32], dtype: DType, bytes: &[u8]) -> Result<Call, i32> {
        let out = info(0, shape, dtype, self.dispatcher.config.max_tensor_elements)?;
        if out.bytes() != bytes.len() as u64 {
            return Err(status::SHAPE_MISMATCH);
        }
        let mut words = vec![0.0f32; words_for(out.bytes())];
        words.as_mut_bytes()[..bytes.len()].copy_from_slice(bytes);
        let mut req = self.request(Op::Upload);
        req.host_len = words.len() as u64;
        req.dtype = dtype as u8;
        self.prepare(req, Some(out), words)
    }

    /// Reads tensor `handle` back: `Done::Data` holds its bytes ([`TensorInfo::bytes`]) in
    /// four-byte words, which for f32 are the elements.
    pub fn download(&mut self, handle: i32) -> Result<Call, i32> {
        let t = *self.tensor(handle)?;
        let mut req = self.request(Op::Download);
        req.a = t.id;
        let words = words_for(t.bytes());
        req.host_len = words as u64;
        // All ones, not zeros: NaN in every float dtype (and -1 as i32), so an element the device
        // failed to write shows.
        self.prepare(req, None, vec![f32::from_bits(u32::MAX); words])
    }

    /// Runs one of the original ops on `a` (and `b`, for add, mul and matmul); the result is a
    /// new tensor. f32 operands of the original shapes take the original short request; anything
    /// else (other dtypes, broadcasting, batched matmul) goes the general way ([`Session::op`]).
    pub fn kernel(&mut self, op: Op, a: i32, b: i32, scalar: f32) -> Result<Call, i32> {
        let ta = *self.tensor(a)?;
        let tb = match op {
            Op::Add | Op::Mul | Op::Matmul => Some(*self.tensor(b)?),
            _ => None,
        };
        let short = ta.dtype == DType::F32
            && tb.is_none_or(|t| t.dtype == DType::F32)
            && match (op, tb) {
                (Op::Add | Op::Mul, Some(tb)) => tb.shape() == ta.shape(),
                (Op::Matmul, Some(tb)) => ta.rank == 2 && tb.rank == 2,
                (Op::Scale | Op::Relu | Op::Softmax | Op::Sum, _) => true,
                _ => false,
            };
        if !short {
            // `tensor_sum` sums every element: the general reduction over a flat view.
            return self.general(op, &Args { a, b, scalar, ..Default::default() }, op == Op::Sum);
        }
        let mut req = self.request(op);
        req.a = ta.id;
        req.scalar = scalar;
        let max = self.dispatcher.config.max_tensor_elements;
        let elements = u32::try_from(ta.elements).map_err(|_| status::INVALID_ARGUMENT)?;
        let f32_info = |shape: &[u32]| info(0, shape, DType::F32, max);
        let out = match (op, tb) {
            (Op::Add | Op::Mul, Some(tb)) => {
                req.b = tb.id;
                req.dims = [elements, 0, 0];
                f32_info(ta.shape())?
            }
            (Op::Scale | Op::Relu, _) => {
                req.dims = [elements, 0, 0];
                f32_info(ta.shape())?
            }
            (Op::Softmax, _) => {
                let cols = *ta.shape().last().unwrap_or(&1);
                req.dims = [elements / cols, cols, 0];
                f32_info(ta.shape())?
            }
            (Op::Matmul, Some(tb)) => {
                let (&[m, k], &[k2, n]) = (ta.shape(), tb.shape()) else { return Err(status::SHAPE_MISMATCH) };
                if k != k2 {
                    return Err(status::SHAPE_MISMATCH);
                }
                req.b = tb.id;
                req.dims = [m, k, n];
                f32_info(&[m, n])?
            }
            (Op::Sum, _) => {
                req.dims = [elements, 0, 0];
                f32_info(&[1])?
            }
            _ => return Err(status::INVALID_ARGUMENT),
        };
        self.prepare(req, Some(out), Vec::new())
    }

    /// Runs any kernel in its general form: every dtype, N-d shapes, broadcasting, an axis. The
    /// shape rules (`shape::output`) are checked here, before anything is sent.
    pub fn op(&mut self, op: Op, args: &Args) -> Result<Call, i32> {
        self.general(op, args, false)
    }

    /// `flat`: operand `a` is read as one dimension (`tensor_sum` of any dtype).
    fn general(&mut self, op: Op, args: &Args, flat: bool) -> Result<Call, i32> {
        if !op.is_kernel() {
            return Err(status::INVALID_ARGUMENT);
        }
        let ta = *self.tensor(args.a)?;
        let mut d = Desc::default();
        put(&mut d, SLOT_A, &ta);
        if flat {
            let n = u32::try_from(ta.elements).map_err(|_| status::INVALID_ARGUMENT)?;
            d.shapes[SLOT_A] = [n, 0, 0, 0];
            d.ranks[SLOT_A] = 1;
        }
        let mut req = self.request(op);
        req.a = ta.id;
        req.scalar = args.scalar;
        match op {
            Op::Add | Op::Mul | Op::Sub | Op::Div | Op::Maximum | Op::Matmul | Op::Concat | Op::Gather => {
                let tb = *self.tensor(args.b)?;
                put(&mut d, SLOT_B, &tb);
                req.b = tb.id;
            }
            Op::LayerNorm | Op::RmsNorm => {
                if args.b != 0 {
                    let tb = *self.tensor(args.b)?;
                    put(&mut d, SLOT_B, &tb);
                    d.flags |= flags::HAS_B;
                    req.b = tb.id;
                }
                if op == Op::LayerNorm && args.c != 0 {
                    let tc = *self.tensor(args.c)?;
                    put(&mut d, SLOT_C, &tc);
                    d.flags |= flags::HAS_C;
                    d.c = tc.id;
                }
                d.eps = args.eps;
            }
            Op::Sum | Op::Mean | Op::Max | Op::Argmax | Op::Slice => {
                d.axis = shape::axis(args.axis, usize::from(d.ranks[SLOT_A]))? as u32;
            }
            Op::Permute => {
                if args.perm_len != ta.rank {
                    return Err(status::INVALID_AXIS);
                }
                d.perm = args.perm;
            }
            Op::Cast => d.dtypes[SLOT_OUT] = args.dtype.ok_or(status::UNSUPPORTED_DTYPE)? as u8,
            _ => {}
        }
        if op == Op::Concat {
            d.axis = shape::axis(args.axis, usize::from(ta.rank))? as u32;
        }
        if args.keepdims {
            d.flags |= flags::KEEPDIMS;
        }
        if args.transpose_a {
            d.flags |= flags::TRANSPOSE_A;
        }
        if args.transpose_b {
            d.flags |= flags::TRANSPOSE_B;
        }
        (d.start, d.len) = (args.start, args.len);
        let (dims, dtype) = shape::output(op, &d)?;
        let out = info(0, dims.as_slice(), dtype, self.dispatcher.config.max_tensor_elements)?;
        d.shapes[SLOT_OUT] = dims.dims;
        d.ranks[SLOT_OUT] = dims.rank;
        d.dtypes[SLOT_OUT] = dtype as u8;
        let words = d.to_words();
        req.host_len = words.len() as u64;
        self.prepare(req, Some(out), words)
    }

    /// A view of tensor `a` with another shape of the same element count: a new handle to the
    /// same device memory, made on the host alone (no request, no quota: the memory is counted
    /// once). Ops never write into a tensor, so a view cannot change what another handle sees.
    pub fn reshape(&mut self, a: i32, shape: &[u32]) -> Result<i32, i32> {
        let ta = *self.tensor(a)?;
        let mut view = info(ta.id, shape, ta.dtype, self.dispatcher.config.max_tensor_elements)?;
        if view.elements != ta.elements {
            return Err(status::SHAPE_MISMATCH);
        }
        if self.live >= self.dispatcher.config.max_tensors_per_session {
            return Err(status::TOO_MANY_TENSORS);
        }
        view.aliased = true;
        view.borrowed = ta.borrowed;
        if let Some(Some(t)) = self.tensors.get_mut((a - 1) as usize) {
            t.aliased = true;
        }
        Ok(self.insert(view))
    }

    /// The device for this session's tensors: chosen now if it has none yet. A resident weight
    /// must be on it before the session can adopt a handle to it.
    pub fn place(&mut self) -> usize {
        *self.device.get_or_insert_with(|| self.dispatcher.place(self.shard))
    }

    /// Uploads one of a function's weights into `resident`, the copy on this session's device:
    /// the tensor is the copy's (its owner's session id), not this session's, so the session's
    /// quota and `Release` never touch it. The caller has placed the session
    /// ([`Session::place`]) on the copy's device, and `resident` has reserved the quota.
    pub fn upload_weight(&mut self, resident: &mut Resident, weight: &Weight) -> Result<Call, i32> {
        debug_assert_eq!(self.device, Some(resident.device()));
        let out = info(0, &weight.shape, weight.dtype, u64::MAX)?;
        if out.bytes() != weight.bytes() {
            return Err(status::SHAPE_MISMATCH);
        }
        let mut words = vec![0.0f32; words_for(out.bytes())];
        words.as_mut_bytes()[..weight.data.len()].copy_from_slice(&weight.data);
        let mut req = self.dispatcher.request(self.shard, Op::Upload, resident.owner());
        req.host_len = words.len() as u64;
        req.dtype = weight.dtype as u8;
        req.out = self.dispatcher.port(self.shard).next_id();
        req.out_bytes = out.bytes();
        resident.push(req.out, weight)?;
        self.prepare(req, None, words)
    }

    /// A handle to a resident weight ([`Resident::info`]), on this session's device.
    pub fn adopt(&mut self, weight: TensorInfo) -> Result<i32, i32> {
        debug_assert!(weight.borrowed, "only a resident weight is adopted");
        if self.live >= self.dispatcher.config.max_tensors_per_session {
            return Err(status::TOO_MANY_TENSORS);
        }
        Ok(self.insert(weight))
    }

    fn insert(&mut self, t: TensorInfo) -> i32 {
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.tensors[s as usize] = Some(t);
                s as usize
            }
            None => {
                self.tensors.push(Some(t));
                self.tensors.len() - 1
            }
        };
        self.live += 1;
        // Callers check the limit first; the table holds the live tensors and the free slots.
        debug_assert!(self.live <= self.dispatcher.config.max_tensors_per_session);
        debug_assert_eq!(self.live + self.free_slots.len(), self.tensors.len());
        slot as i32 + 1
    }

    /// Frees tensor `handle` now rather than at the end of the invocation. The memory of a tensor
    /// that views share goes with the last handle.
    pub fn free(&mut self, handle: i32) -> Result<(), i32> {
        let t = *self.tensor(handle)?;
        let slot = (handle - 1) as usize;
        self.tensors[slot] = None;
        self.free_slots.push(slot as u32);
        self.live -= 1;
        if t.borrowed || (t.aliased && self.tensors.iter().flatten().any(|o| o.id == t.id)) {
            return Ok(());
        }
        let mut req = self.request(Op::Free);
        req.a = t.id;
        if let Some(device) = self.device {
            self.dispatcher.send_untracked(self.shard, device, req);
        }
        self.return_quota(t.bytes());
        Ok(())
    }

    fn request(&self, op: Op) -> Request {
        self.dispatcher.request(self.shard, op, self.id)
    }

    fn return_quota(&mut self, bytes: u64) {
        debug_assert!(bytes <= self.held_bytes, "returned more quota than the session holds");
        self.held_bytes -= bytes;
        self.tenant.release(bytes);
    }

    /// Reserves the output's quota and opens the ticket; for a kernel of a streaming session, hands
    /// its staging (a descriptor) to the request instead, for the worker to free.
    fn prepare(&mut self, mut req: Request, out: Option<TensorInfo>, staging: Vec<f32>) -> Result<Call, i32> {
        let op = Op::from_u8(req.op);
        let streamed = self.streaming && out.is_some() && op.is_some_and(Session::streamable);
        let out = match out {
            Some(mut t) => {
                if self.live >= self.dispatcher.config.max_tensors_per_session {
                    return Err(status::TOO_MANY_TENSORS);
                }
                if !self.tenant.reserve(t.bytes(), self.dispatcher.quotas.limit_bytes) {
                    return Err(status::QUOTA_EXCEEDED);
                }
                self.held_bytes += t.bytes();
                t.id = self.dispatcher.port(self.shard).next_id();
                req.out = t.id;
                req.out_bytes = t.bytes();
                Some(t)
            }
            None => None,
        };
        // Counted once it passed the host's checks: what a deferred failure's number counts.
        self.seq += 1;
        req.seq = self.seq;
        if streamed {
            let descriptor = staging.into_boxed_slice();
            req.host_addr = descriptor.as_ptr() as u64;
            req.host_len = descriptor.len() as u64;
            req.ticket = STREAMED;
            return Ok(Call { req, out, port: None, descriptor: Some(descriptor) });
        }
        let Some((ticket, addr, len)) = self.dispatcher.port(self.shard).open(staging) else {
            if let Some(t) = out {
                self.return_quota(t.bytes());
            }
            return Err(status::BUSY);
        };
        req.ticket = ticket;
        req.host_addr = addr;
        debug_assert_eq!(len as u64, req.host_len);
        Ok(Call { req, out, port: Some(self.dispatcher.port(self.shard).clone()), descriptor: None })
    }

    /// Whether kernel `op` may be streamed: its failures must be ones the device alone can know
    /// (memory, a launch), since a streamed call's own return value is its handle. Every back-end
    /// runs every op on every dtype that the host's checks let through (CUDA too, since it runs
    /// f16, bf16 and i32 as the host back-end does), so that holds for every kernel but gather,
    /// whose ids are checked against the table by their values, which only the device holds.
    fn streamable(op: Op) -> bool {
        op.is_kernel() && op != Op::Gather
    }

    /// Pushes the call onto the ring of the session's device. A full ring gives the call back:
    /// the caller waits and tries again, or gives up with [`Session::abort`].
    #[allow(clippy::result_large_err)] // the call comes back whole, to be retried
    pub fn try_send(&mut self, mut call: Call) -> Result<Pending, Call> {
        // A streamed call has no ticket to wait on, and its descriptor is handed over only by
        // `try_stream`: sent here, it would be freed under the worker.
        assert!(!call.is_streamed(), "a streamed call is sent with try_stream");
        let device = *self.device.get_or_insert_with(|| self.dispatcher.place(self.shard));
        let op = Op::from_u8(call.req.op).unwrap_or(Op::Add);
        let orders_session =
            call.req.session == self.id && matches!(op, Op::Sync | Op::Download | Op::Upload | Op::Gather);
        match self.dispatcher.try_submit(self.shard, device, call.req) {
            Ok(()) => {
                // Counted from a sync that is on the ring, not one refused or given up.
                if op == Op::Sync {
                    self.streamed_since_sync = 0;
                }
                Ok(Pending {
                    ticket: call.req.ticket,
                    op,
                    out: call.out.take(),
                    port: call.port.take(),
                    orders_session,
                    seq: call.req.seq,
                })
            }
            Err(_) => Err(call),
        }
    }

    /// Pushes a streamed call ([`Call::is_streamed`]) onto the ring of the session's device and
    /// returns its result's handle at once: the tensor is the session's from now on, in the
    /// device's order. A full ring gives the call back, as [`Session::try_send`].
    #[allow(clippy::result_large_err)] // the call comes back whole, to be retried
    pub fn try_stream(&mut self, mut call: Call) -> Result<i32, Call> {
        debug_assert!(call.is_streamed());
        let device = *self.device.get_or_insert_with(|| self.dispatcher.place(self.shard));
        if self.dispatcher.try_submit(self.shard, device, call.req).is_err() {
            return Err(call);
        }
        // The worker owns the descriptor now, and frees it once it has read it
        // (`worker::free_streamed_staging`).
        if let Some(descriptor) = call.descriptor.take() {
            let _ = Box::into_raw(descriptor);
        }
        self.unsynced = true;
        self.streamed_since_sync += 1;
        // The highest number given out, not this call's: a sync prepared after this call but
        // pushed before it (`wasm::tensor::mark`) must not count as following it.
        self.last_streamed = self.seq;
        let out = call.out.take().expect("a streamed call makes a tensor");
        Ok(self.insert(out))
    }

    /// Gives up a call that was never sent, and returns its quota now.
    pub fn abort(&mut self, mut call: Call) {
        if let Some(t) = call.out.take() {
            self.return_quota(t.bytes());
        }
        drop(call);
    }

    /// The future that resolves when `pending` completes. From here on the wait owns the ticket.
    pub fn wait(&self, pending: &mut Pending) -> TicketWait {
        pending.port = None;
        TicketWait::new(self.dispatcher.port(self.shard).clone(), pending.ticket, self.dispatcher.config.guest_spin)
    }

    /// Applies a completion: registers the new tensor, or hands back the data.
    pub fn finish(&mut self, mut pending: Pending, completion: Completion, staging: Vec<f32>) -> Result<Done, i32> {
        pending.port = None;
        // Everything the session streamed before has run once a waited-for request of its own
        // completed on its device after them; not a weight's upload (another session's stream),
        // nor a request refused at once while earlier ones still ran.
        // And only when nothing was streamed after it (an earlier sync completing late).
        if pending.orders_session && completion.status == status::OK && pending.seq > self.last_streamed {
            self.unsynced = false;
        }
        if completion.failed_seq != 0 && self.failure.is_none() {
            let op = u8::try_from(completion.failed_op).ok().and_then(Op::from_u8);
            self.failure = Some(DeferredFailure { seq: completion.failed_seq, op, status: completion.status });
        }
        let out = pending.out.take();
        if completion.status != status::OK {
            if let Some(t) = out {
                self.return_quota(t.bytes());
            }
            return Err(completion.status);
        }
        match out {
            Some(t) => Ok(Done::Tensor(self.insert(t))),
            None => Ok(Done::Data(staging)),
        }
    }

    /// Sends `call` and waits for it on this thread, spinning: for benchmarks and tests, which have
    /// no executor. A full ring is retried until `deadline`, then `busy`.
    pub fn call_blocking(&mut self, mut call: Call, deadline: Instant) -> Result<Done, i32> {
        let pending = loop {
            match self.try_send(call) {
                Ok(p) => break p,
                Err(c) if Instant::now() < deadline => {
                    call = c;
                    std::hint::spin_loop();
                }
                Err(c) => {
                    self.abort(c);
                    return Err(status::BUSY);
                }
            }
        };
        self.wait_blocking(pending, deadline)
    }

    /// Waits for `pending` on this thread, spinning, until `deadline`: for benchmarks and tests.
    pub fn wait_blocking(&mut self, mut pending: Pending, deadline: Instant) -> Result<Done, i32> {
        let port = self.dispatcher.port(self.shard).clone();
        pending.port = None; // `wait_blocking` abandons the ticket itself on timeout.
        match port.wait_blocking(pending.ticket, deadline) {
            Some((completion, staging)) => self.finish(pending, completion, staging),
            None => Err(status::TIMEOUT),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(device) = self.device {
            let req = self.request(Op::Release);
            self.dispatcher.send_untracked(self.shard, device, req);
        }
        if self.held_bytes > 0 {
            self.tenant.release(self.held_bytes);
        }
    }
}

//! One invocation's tensors. A guest names tensors by small handles that index this table, so it
//! cannot name another invocation's tensor; everything the session created is freed, and its quota
//! returned, when it is dropped, whatever ended the invocation.

use std::sync::Arc;
use std::time::Instant;

use crate::dispatcher::Dispatcher;
use crate::port::{ShardPort, TicketWait};
use crate::quota::TenantMemory;
use crate::record::{status, Completion, Op, Request};

/// Dimensions a tensor may have.
pub const MAX_RANK: usize = 4;

/// What the session knows of one tensor: enough to validate every op before it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub id: u64,
    pub dims: [u32; MAX_RANK],
    pub rank: u8,
    pub elements: u64,
}

impl TensorInfo {
    pub fn shape(&self) -> &[u32] {
        &self.dims[..usize::from(self.rank)]
    }

    pub fn bytes(&self) -> u64 {
        self.elements * 4
    }
}

fn info(id: u64, shape: &[u32], max_elements: u64) -> Result<TensorInfo, i32> {
    if shape.is_empty() || shape.len() > MAX_RANK || shape.contains(&0) {
        return Err(status::INVALID_ARGUMENT);
    }
    let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)));
    let elements = elements.filter(|&e| e <= max_elements).ok_or(status::INVALID_ARGUMENT)?;
    let mut dims = [0; MAX_RANK];
    dims[..shape.len()].copy_from_slice(shape);
    Ok(TensorInfo { id, dims, rank: shape.len() as u8, elements })
}

/// A request that is ready to send: its ticket is open, and its quota is reserved. Dropped
/// unsent (its invocation ended while it waited for room), it closes its ticket; the session
/// returns its quota.
pub struct Call {
    req: Request,
    out: Option<TensorInfo>,
    port: Option<Arc<ShardPort>>,
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(port) = self.port.take() {
            drop(port.cancel(self.req.ticket));
        }
    }
}

/// A request on its way: what `finish` needs. Dropped before it is waited on, it abandons its
/// ticket, which then keeps the staging buffer until the completion comes.
pub struct Pending {
    ticket: u32,
    op: Op,
    out: Option<TensorInfo>,
    port: Option<Arc<ShardPort>>,
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
    /// A downloaded tensor.
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
        }
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

    /// A new tensor of `shape` holding `data` (row-major).
    pub fn upload(&mut self, shape: &[u32], data: Vec<f32>) -> Result<Call, i32> {
        let out = info(0, shape, self.dispatcher.config.max_tensor_elements)?;
        if out.elements != data.len() as u64 {
            return Err(status::SHAPE_MISMATCH);
        }
        let mut req = self.request(Op::Upload);
        req.host_len = data.len() as u64;
        self.prepare(req, Some(out), data)
    }

    /// Reads tensor `handle` back.
    pub fn download(&mut self, handle: i32) -> Result<Call, i32> {
        let t = *self.tensor(handle)?;
        let mut req = self.request(Op::Download);
        req.a = t.id;
        req.host_len = t.elements;
        // NaN, not zeros: an element the device failed to write shows.
        self.prepare(req, None, vec![f32::NAN; t.elements as usize])
    }

    /// Runs a kernel on `a` (and `b`, for add, mul and matmul); the result is a new tensor.
    pub fn kernel(&mut self, op: Op, a: i32, b: i32, scalar: f32) -> Result<Call, i32> {
        let ta = *self.tensor(a)?;
        let mut req = self.request(op);
        req.a = ta.id;
        req.scalar = scalar;
        let max = self.dispatcher.config.max_tensor_elements;
        let elements = u32::try_from(ta.elements).map_err(|_| status::INVALID_ARGUMENT)?;
        let out = match op {
            Op::Add | Op::Mul => {
                let tb = *self.tensor(b)?;
                if tb.shape() != ta.shape() {
                    return Err(status::SHAPE_MISMATCH);
                }
                req.b = tb.id;
                req.dims = [elements, 0, 0];
                info(0, ta.shape(), max)?
            }
            Op::Scale | Op::Relu => {
                req.dims = [elements, 0, 0];
                info(0, ta.shape(), max)?
            }
            Op::Softmax => {
                let cols = *ta.shape().last().unwrap_or(&1);
                req.dims = [elements / cols, cols, 0];
                info(0, ta.shape(), max)?
            }
            Op::Matmul => {
                let tb = *self.tensor(b)?;
                let (&[m, k], &[k2, n]) = (ta.shape(), tb.shape()) else { return Err(status::SHAPE_MISMATCH) };
                if k != k2 {
                    return Err(status::SHAPE_MISMATCH);
                }
                req.b = tb.id;
                req.dims = [m, k, n];
                info(0, &[m, n], max)?
            }
            Op::Sum => {
                req.dims = [elements, 0, 0];
                info(0, &[1], max)?
            }
            Op::Upload | Op::Download | Op::Free | Op::Release => return Err(status::INVALID_ARGUMENT),
        };
        self.prepare(req, Some(out), Vec::new())
    }

    /// Frees tensor `handle` now rather than at the end of the invocation.
    pub fn free(&mut self, handle: i32) -> Result<(), i32> {
        let t = *self.tensor(handle)?;
        let slot = (handle - 1) as usize;
        self.tensors[slot] = None;
        self.free_slots.push(slot as u32);
        self.live -= 1;
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
        self.held_bytes -= bytes;
        self.tenant.release(bytes);
    }

    /// Reserves the output's quota and opens the ticket.
    fn prepare(&mut self, mut req: Request, out: Option<TensorInfo>, staging: Vec<f32>) -> Result<Call, i32> {
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
        let Some((ticket, addr, len)) = self.dispatcher.port(self.shard).open(staging) else {
            if let Some(t) = out {
                self.return_quota(t.bytes());
            }
            return Err(status::BUSY);
        };
        req.ticket = ticket;
        req.host_addr = addr;
        debug_assert_eq!(len as u64, req.host_len);
        Ok(Call { req, out, port: Some(self.dispatcher.port(self.shard).clone()) })
    }

    /// Pushes the call onto the ring of the session's device. A full ring gives the call back:
    /// the caller waits and tries again, or gives up with [`Session::abort`].
    #[allow(clippy::result_large_err)] // the call comes back whole, to be retried
    pub fn try_send(&mut self, mut call: Call) -> Result<Pending, Call> {
        let device = *self.device.get_or_insert_with(|| self.dispatcher.place(self.shard));
        match self.dispatcher.try_submit(self.shard, device, call.req) {
            Ok(()) => Ok(Pending {
                ticket: call.req.ticket,
                op: Op::from_u8(call.req.op).unwrap_or(Op::Add),
                out: call.out.take(),
                port: call.port.take(),
            }),
            Err(_) => Err(call),
        }
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
        let out = pending.out.take();
        if completion.status != status::OK {
            if let Some(t) = out {
                self.return_quota(t.bytes());
            }
            return Err(completion.status);
        }
        match out {
            Some(t) => {
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
                Ok(Done::Tensor(slot as i32 + 1))
            }
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
        let port = self.dispatcher.port(self.shard).clone();
        let mut pending = pending;
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

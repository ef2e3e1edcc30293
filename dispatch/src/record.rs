//! The records that cross the rings: fixed-size, plain old data, no pointers that own anything.
//! A staging buffer's address travels as a number; who may touch it when is the ticket's rule
//! (see `port`).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// What a request asks of a device worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Copy `host_len` f32 from the staging buffer into a new tensor `out`.
    Upload = 1,
    /// Copy tensor `a` (`host_len` f32) into the staging buffer.
    Download = 2,
    /// Free tensor `a`.
    Free = 3,
    /// Free every tensor of `session`: the end of an invocation.
    Release = 4,
    /// `out = a + b`, `dims[0]` elements.
    Add = 5,
    /// `out = a * b`, element-wise.
    Mul = 6,
    /// `out = a * scalar`.
    Scale = 7,
    /// `out = max(a, 0)`.
    Relu = 8,
    /// Row-wise softmax of `a`: `dims[0]` rows of `dims[1]` columns.
    Softmax = 9,
    /// `out[m×n] = a[m×k] · b[k×n]`, `dims = [m, k, n]`, row-major.
    Matmul = 10,
    /// `out[0] = Σ a`, `dims[0]` elements.
    Sum = 11,
}

impl Op {
    /// The kernels a guest can call, in the order metrics list them.
    pub const KERNELS: [Op; 7] = [Op::Add, Op::Mul, Op::Scale, Op::Relu, Op::Softmax, Op::Matmul, Op::Sum];
    /// Every op, for per-op metric tables.
    pub const ALL: [Op; 11] = [
        Op::Upload,
        Op::Download,
        Op::Free,
        Op::Release,
        Op::Add,
        Op::Mul,
        Op::Scale,
        Op::Relu,
        Op::Softmax,
        Op::Matmul,
        Op::Sum,
    ];

    /// Whether this op is a kernel (creates a tensor from others).
    pub fn is_kernel(self) -> bool {
        Op::KERNELS.contains(&self)
    }

    pub fn from_u8(v: u8) -> Option<Op> {
        Op::ALL.get(usize::from(v).wrapping_sub(1)).copied()
    }

    /// Dense index for metric tables.
    pub fn index(self) -> usize {
        self as usize - 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Upload => "upload",
            Op::Download => "download",
            Op::Free => "free",
            Op::Release => "release",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale => "scale",
            Op::Relu => "relu",
            Op::Softmax => "softmax",
            Op::Matmul => "matmul",
            Op::Sum => "sum",
        }
    }
}

/// One request from a shard to a device worker: 80 bytes, no padding (zerocopy checks it).
#[derive(Clone, Copy, Debug, Default, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Request {
    /// The invocation that owns every tensor this request creates.
    pub session: u64,
    /// The tensor this request creates (Upload and every kernel).
    pub out: u64,
    /// First operand (or the tensor to download or free).
    pub a: u64,
    /// Second operand (Add, Mul, Matmul).
    pub b: u64,
    /// Address of the staging buffer (Upload, Download): `host_len` f32, owned by the ticket.
    pub host_addr: u64,
    /// Elements in the staging buffer.
    pub host_len: u64,
    /// Bytes the created tensor takes on the device, for the device's memory gauge.
    pub out_bytes: u64,
    /// Op-specific sizes: see [`Op`].
    pub dims: [u32; 3],
    pub scalar: f32,
    /// Where the completion goes: the issuing shard's ticket.
    pub ticket: u32,
    pub shard: u16,
    pub op: u8,
    pub _reserved: u8,
}

/// A request's outcome, sent back on the issuing shard's completion ring: 16 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Completion {
    pub ticket: u32,
    /// `status::OK` or a negative status.
    pub status: i32,
    /// Time the worker spent on it, from taking it off the ring to finishing it.
    pub device_nanos: u64,
}

#[path = "status.rs"]
pub mod status;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_fixed_size_and_round_trip_as_bytes() {
        assert_eq!(std::mem::size_of::<Request>(), 80);
        assert_eq!(std::mem::size_of::<Completion>(), 16);
        let req = Request {
            session: 7,
            out: 9,
            dims: [3, 4, 5],
            scalar: 0.5,
            ticket: 42,
            op: Op::Matmul as u8,
            ..Default::default()
        };
        let back = Request::read_from_bytes(req.as_bytes()).unwrap();
        assert_eq!((back.session, back.out, back.dims, back.ticket), (7, 9, [3, 4, 5], 42));
        assert_eq!(Op::from_u8(back.op), Some(Op::Matmul));
    }

    #[test]
    fn op_codes_are_dense() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), i);
            assert_eq!(Op::from_u8(*op as u8), Some(*op));
        }
        assert_eq!(Op::from_u8(0), None);
        assert_eq!(Op::from_u8(12), None);
    }
}

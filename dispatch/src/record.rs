//! The records that cross the rings: fixed-size, plain old data, no pointers that own anything.
//! A staging buffer's address travels as a number; who may touch it when is the ticket's rule
//! (see `port`).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Dimensions a tensor may have. Four covers a transformer block's `[batch, heads, seq, dim]`,
/// and keeps a shape inside one fixed-size descriptor (see [`Desc`]).
pub const MAX_RANK: usize = 4;

/// A tensor's element type. The codes are the ABI's (docs/ABI.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    /// Indices: gather's ids and argmax's output. Arithmetic ops refuse it.
    I32 = 3,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::I32];

    pub fn from_code(code: i32) -> Option<DType> {
        usize::try_from(code).ok().and_then(|i| DType::ALL.get(i)).copied()
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Whether arithmetic (element-wise, reductions, norms, matmul) accepts it.
    pub fn is_float(self) -> bool {
        self != DType::I32
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }
}

/// What a request asks of a device worker.
///
/// The first eleven are the original f32 ops, whose requests describe themselves in `dims`. A
/// kernel request with a [`Desc`] in its staging buffer (`host_len > 0`) is the general form:
/// any dtype, N-d shapes, broadcasting, an axis. The session sends the short form whenever it
/// fits (f32, same shapes), so the original ops cost what they did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Copy the staging buffer (`out_bytes` bytes of dtype `dtype`) into a new tensor `out`.
    Upload = 1,
    /// Copy tensor `a` into the staging buffer (`host_len` four-byte words).
    Download = 2,
    /// Free tensor `a`.
    Free = 3,
    /// Free every tensor of `session`: the end of an invocation. With `dtype` [`RELEASE_SHARED`],
    /// a function's resident weights, which other sessions' requests may be reading.
    Release = 4,
    /// `out = a + b`: `dims[0]` elements, or broadcast with a descriptor.
    Add = 5,
    /// `out = a * b`, element-wise.
    Mul = 6,
    /// `out = a * scalar`.
    Scale = 7,
    /// `out = max(a, 0)`.
    Relu = 8,
    /// Softmax along the last axis: `dims[0]` rows of `dims[1]` columns.
    Softmax = 9,
    /// `out[m×n] = a[m×k] · b[k×n]`, `dims = [m, k, n]`, row-major; with a descriptor, batched
    /// and with transpose flags.
    Matmul = 10,
    /// `out[0] = Σ a`, `dims[0]` elements; with a descriptor, along an axis.
    Sum = 11,
    Sub = 12,
    Div = 13,
    Maximum = 14,
    Gelu = 15,
    Silu = 16,
    Exp = 17,
    Tanh = 18,
    Sqrt = 19,
    Rsqrt = 20,
    Neg = 21,
    Mean = 22,
    Max = 23,
    Argmax = 24,
    LogSoftmax = 25,
    LayerNorm = 26,
    RmsNorm = 27,
    Permute = 28,
    Concat = 29,
    Slice = 30,
    Gather = 31,
    Cast = 32,
    /// Completes once every earlier request of `session` has run: where a guest waits for the
    /// ops it streamed (`tensor_sync`). Its completion carries the session's first failure.
    Sync = 33,
}

impl Op {
    /// The kernels a guest can call, in the order metrics list them.
    pub const KERNELS: [Op; 28] = [
        Op::Add,
        Op::Mul,
        Op::Scale,
        Op::Relu,
        Op::Softmax,
        Op::Matmul,
        Op::Sum,
        Op::Sub,
        Op::Div,
        Op::Maximum,
        Op::Gelu,
        Op::Silu,
        Op::Exp,
        Op::Tanh,
        Op::Sqrt,
        Op::Rsqrt,
        Op::Neg,
        Op::Mean,
        Op::Max,
        Op::Argmax,
        Op::LogSoftmax,
        Op::LayerNorm,
        Op::RmsNorm,
        Op::Permute,
        Op::Concat,
        Op::Slice,
        Op::Gather,
        Op::Cast,
    ];
    /// Every op, for per-op metric tables: the four that move or free tensors, then the kernels.
    /// In discriminant order, which `from_u8` relies on.
    pub const ALL: [Op; 33] = {
        let mut all = [Op::Upload; 33];
        (all[1], all[2], all[3]) = (Op::Download, Op::Free, Op::Release);
        let mut i = 0;
        while i < Op::KERNELS.len() {
            all[4 + i] = Op::KERNELS[i];
            i += 1;
        }
        all[32] = Op::Sync;
        all
    };

    /// Whether this op is a kernel (creates a tensor from others).
    pub fn is_kernel(self) -> bool {
        self as u8 >= Op::Add as u8 && self != Op::Sync
    }

    /// Whether this op maps each element alone (`tw_unary` on CUDA): the shape and dtype of its
    /// one operand are its output's.
    pub fn is_unary(self) -> bool {
        matches!(self, Op::Scale | Op::Relu | Op::Gelu | Op::Silu | Op::Exp | Op::Tanh | Op::Sqrt | Op::Rsqrt | Op::Neg)
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
            Op::Sub => "sub",
            Op::Div => "div",
            Op::Maximum => "maximum",
            Op::Gelu => "gelu",
            Op::Silu => "silu",
            Op::Exp => "exp",
            Op::Tanh => "tanh",
            Op::Sqrt => "sqrt",
            Op::Rsqrt => "rsqrt",
            Op::Neg => "neg",
            Op::Mean => "mean",
            Op::Max => "max",
            Op::Argmax => "argmax",
            Op::LogSoftmax => "log_softmax",
            Op::LayerNorm => "layer_norm",
            Op::RmsNorm => "rms_norm",
            Op::Permute => "permute",
            Op::Concat => "concat",
            Op::Slice => "slice",
            Op::Gather => "gather",
            Op::Cast => "cast",
            Op::Sync => "sync",
        }
    }
}

/// The general form of a kernel request: every operand's shape and dtype, and the op's
/// parameters. It travels in the request's staging buffer, so the fixed-size [`Request`] (and
/// with it the original ops' hot path) stays as it was. The worker re-derives the output shape
/// from it (`shape::output`) and checks every operand against the tensors it holds before it
/// touches one, so a wrong descriptor is an error, never a wild read.
#[derive(Clone, Copy, Debug, Default, PartialEq, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Desc {
    /// The third operand (layer norm's bias), or 0.
    pub c: u64,
    /// Shapes of a, b, c and the output; dimensions past the rank are 0.
    pub shapes: [[u32; MAX_RANK]; 4],
    pub ranks: [u8; 4],
    /// [`DType`] codes of a, b, c and the output.
    pub dtypes: [u8; 4],
    /// The axis (reductions, concat, slice), already made non-negative.
    pub axis: u32,
    /// [`flags`] bits.
    pub flags: u32,
    /// Slice: the first index and the length along `axis`.
    pub start: u32,
    pub len: u32,
    /// Permute: output axis i is input axis `perm[i]`.
    pub perm: [u8; MAX_RANK],
    /// Norms' epsilon.
    pub eps: f32,
}

/// Bits of [`Desc::flags`].
pub mod flags {
    /// Matmul: use `a` transposed (its last two axes swapped).
    pub const TRANSPOSE_A: u32 = 1;
    /// Matmul: use `b` transposed.
    pub const TRANSPOSE_B: u32 = 2;
    /// Reductions: keep the reduced axis, with length 1.
    pub const KEEPDIMS: u32 = 4;
    /// The `b` operand is present (norms: the weight).
    pub const HAS_B: u32 = 8;
    /// The `c` operand is present (layer norm: the bias).
    pub const HAS_C: u32 = 16;
}

/// Operand slots in [`Desc`]'s arrays.
pub const SLOT_A: usize = 0;
pub const SLOT_B: usize = 1;
pub const SLOT_C: usize = 2;
pub const SLOT_OUT: usize = 3;

/// Four-byte words a [`Desc`] takes in a staging buffer.
pub const DESC_WORDS: usize = std::mem::size_of::<Desc>() / 4;

impl Desc {
    pub fn shape(&self, slot: usize) -> &[u32] {
        &self.shapes[slot][..usize::from(self.ranks[slot]).min(MAX_RANK)]
    }

    pub fn dtype(&self, slot: usize) -> Option<DType> {
        DType::from_code(i32::from(self.dtypes[slot]))
    }

    /// The descriptor as staging words.
    pub fn to_words(&self) -> Vec<f32> {
        let mut words = vec![0.0f32; DESC_WORDS];
        words.as_mut_bytes().copy_from_slice(self.as_bytes());
        words
    }

    /// Reads a descriptor back from staging words: `None` when they are not one.
    pub fn from_words(words: &[f32]) -> Option<Desc> {
        Desc::read_from_bytes(words.as_bytes()).ok()
    }
}

/// A `Release`'s `dtype` when other sessions may be reading the tensors (a function's resident
/// weights, `weights`): a back-end that runs requests asynchronously first waits for every request
/// in flight, not only the session's own.
pub const RELEASE_SHARED: u8 = 1;

/// One request from a shard to a device worker: 88 bytes, no padding (zerocopy checks it).
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
    /// Address of the staging buffer: `host_len` four-byte words, owned by the ticket. It holds
    /// an upload's data, a download's destination, or a kernel's [`Desc`].
    pub host_addr: u64,
    /// Words in the staging buffer.
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
    /// An upload's [`DType`] code (0, f32, in the original records).
    pub dtype: u8,
    /// The request's place among its session's requests, from 1: what a deferred failure names.
    pub seq: u64,
}

/// A request's outcome, sent back on the issuing shard's completion ring: 32 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Completion {
    pub ticket: u32,
    /// `status::OK` or a negative status.
    pub status: i32,
    /// Time the worker spent on it, from taking it off the ring to finishing it.
    pub device_nanos: u64,
    /// When an earlier streamed request of the session failed (and `status` is its status): that
    /// request's `seq` and op code; else 0.
    pub failed_seq: u64,
    pub failed_op: u32,
    pub reserved: u32,
}

/// The ABI's status codes: the crate `tensor-wasm-abi`, which the guests' helper crate shares.
pub use tensor_wasm_abi as status;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_fixed_size_and_round_trip_as_bytes() {
        assert_eq!(std::mem::size_of::<Request>(), 88);
        assert_eq!(std::mem::size_of::<Completion>(), 32);
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
    fn descriptors_round_trip_through_staging_words() {
        assert_eq!(std::mem::size_of::<Desc>() % 8, 0);
        let mut d = Desc { c: 5, axis: 2, flags: flags::KEEPDIMS, eps: 1e-5, ..Default::default() };
        d.shapes[SLOT_A] = [2, 3, 4, 0];
        d.ranks[SLOT_A] = 3;
        d.dtypes[SLOT_A] = DType::BF16 as u8;
        let back = Desc::from_words(&d.to_words()).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.shape(SLOT_A), &[2, 3, 4]);
        assert_eq!(back.dtype(SLOT_A), Some(DType::BF16));
        assert_eq!(Desc::from_words(&[0.0; 3]), None);
    }

    #[test]
    fn op_codes_are_dense() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), i);
            assert_eq!(Op::from_u8(*op as u8), Some(*op));
        }
        assert_eq!(Op::from_u8(0), None);
        assert_eq!(Op::from_u8(Op::ALL.len() as u8 + 1), None);
    }
}

//! The status codes of the tensor ABI (docs/ABI.md), shared by the rings and the guests.
//! Negative means failure.
//!
//! One crate for both sides of the ABI: the host re-exports it as
//! `tensor_wasm_dispatch::record::status`, and the guests' helper crate (`dispatch/guest`, built
//! for wasm32 outside this workspace) as `tensor_wasm_guest::code`. It has no dependencies, so
//! that it builds for any target.

pub const OK: i32 = 0;
/// A malformed argument: dtype, rank, a zero or too large dimension.
pub const INVALID_ARGUMENT: i32 = -1;
/// No such tensor in this invocation.
pub const BAD_HANDLE: i32 = -2;
/// A pointer and length outside the guest's memory.
pub const OUT_OF_BOUNDS: i32 = -3;
/// The operands' shapes do not fit the op.
pub const SHAPE_MISMATCH: i32 = -4;
/// The tenant's device-memory quota would be exceeded.
pub const QUOTA_EXCEEDED: i32 = -5;
/// The dispatch ring stayed full until the invocation's deadline.
pub const BUSY: i32 = -6;
/// The device failed the operation (out of memory, a launch failure).
pub const DEVICE_ERROR: i32 = -7;
/// The invocation holds as many tensors as it may.
pub const TOO_MANY_TENSORS: i32 = -8;
/// The destination is smaller than the tensor.
pub const BUFFER_TOO_SMALL: i32 = -9;
/// A dtype code that does not exist, or (`tensor_create`, `tensor_read`) one other than f32.
pub const UNSUPPORTED_DTYPE: i32 = -10;
/// The request did not complete before the caller's deadline.
pub const TIMEOUT: i32 = -11;
/// An operand's dtype does not fit the op (i32 into arithmetic, two different dtypes, a read
/// with another dtype than the tensor's).
pub const DTYPE_MISMATCH: i32 = -12;
/// An axis outside the tensor's rank, or a permutation that is not one.
pub const INVALID_AXIS: i32 = -13;
/// An index outside its range: a gather id past the table, a slice past the axis.
pub const INDEX_OUT_OF_RANGE: i32 = -14;
/// The invocation's back-end does not run the op or dtype. Every back-end runs every op on every
/// dtype today (docs/ABI.md, "Back-ends"); the code stays for one that may not.
pub const UNSUPPORTED_ON_DEVICE: i32 = -15;
/// `tensor_weight`: the function carries no tensor of that name.
pub const NO_SUCH_WEIGHT: i32 = -16;

/// A stable name per code, for logs and docs.
pub fn name(code: i32) -> &'static str {
    match code {
        OK => "ok",
        INVALID_ARGUMENT => "invalid_argument",
        BAD_HANDLE => "bad_handle",
        OUT_OF_BOUNDS => "out_of_bounds",
        SHAPE_MISMATCH => "shape_mismatch",
        QUOTA_EXCEEDED => "quota_exceeded",
        BUSY => "busy",
        DEVICE_ERROR => "device_error",
        TOO_MANY_TENSORS => "too_many_tensors",
        BUFFER_TOO_SMALL => "buffer_too_small",
        UNSUPPORTED_DTYPE => "unsupported_dtype",
        TIMEOUT => "timeout",
        DTYPE_MISMATCH => "dtype_mismatch",
        INVALID_AXIS => "invalid_axis",
        INDEX_OUT_OF_RANGE => "index_out_of_range",
        UNSUPPORTED_ON_DEVICE => "unsupported_on_device",
        NO_SUCH_WEIGHT => "no_such_weight",
        _ => "unknown",
    }
}

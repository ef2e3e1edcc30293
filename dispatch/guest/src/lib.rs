//! Tensors for TensorWasm guests: safe Rust over the host's `tensor_wasm` imports (docs/ABI.md).
//!
//! A [`Tensor`] lives on the device the host chose for this invocation; it is freed when dropped,
//! and the host frees whatever is left when the invocation ends.
//!
//! ```ignore
//! use tensor_wasm_guest::Tensor;
//! let a = Tensor::new(&[2, 2], &[1.0, -2.0, 3.0, -4.0])?;
//! let b = a.relu()?.scale(0.5)?;
//! assert_eq!(b.to_vec()?, vec![0.5, 0.0, 1.5, 0.0]);
//! ```

#[link(wasm_import_module = "tensor_wasm")]
extern "C" {
    fn tensor_create(dtype: i32, shape_ptr: *const u32, rank: i32, data_ptr: *const f32, data_len: i32) -> i32;
    fn tensor_read(handle: i32, out_ptr: *mut f32, out_len: i32) -> i32;
    fn tensor_shape(handle: i32, out_ptr: *mut u32, max_rank: i32) -> i32;
    fn tensor_free(handle: i32) -> i32;
    fn tensor_add(a: i32, b: i32) -> i32;
    fn tensor_mul(a: i32, b: i32) -> i32;
    fn tensor_scale(a: i32, s: f32) -> i32;
    fn tensor_relu(a: i32) -> i32;
    fn tensor_softmax(a: i32) -> i32;
    fn tensor_matmul(a: i32, b: i32) -> i32;
    fn tensor_sum(a: i32) -> i32;
    fn tensor_last_error(ptr: *mut u8, len: i32) -> i32;
    fn tensor_create_typed(dtype: i32, shape_ptr: *const u32, rank: i32, data_ptr: *const u8, data_len: i32) -> i32;
    fn tensor_read_typed(handle: i32, dtype: i32, out_ptr: *mut u8, out_len: i32) -> i32;
    fn tensor_dtype(handle: i32) -> i32;
    fn tensor_cast(a: i32, dtype: i32) -> i32;
    fn tensor_sub(a: i32, b: i32) -> i32;
    fn tensor_div(a: i32, b: i32) -> i32;
    fn tensor_maximum(a: i32, b: i32) -> i32;
    fn tensor_gelu(a: i32) -> i32;
    fn tensor_silu(a: i32) -> i32;
    fn tensor_exp(a: i32) -> i32;
    fn tensor_tanh(a: i32) -> i32;
    fn tensor_sqrt(a: i32) -> i32;
    fn tensor_rsqrt(a: i32) -> i32;
    fn tensor_neg(a: i32) -> i32;
    fn tensor_log_softmax(a: i32) -> i32;
    fn tensor_sum_axis(a: i32, axis: i32, keepdims: i32) -> i32;
    fn tensor_mean(a: i32, axis: i32, keepdims: i32) -> i32;
    fn tensor_max(a: i32, axis: i32, keepdims: i32) -> i32;
    fn tensor_argmax(a: i32, axis: i32, keepdims: i32) -> i32;
    fn tensor_layer_norm(a: i32, weight: i32, bias: i32, eps: f32) -> i32;
    fn tensor_rms_norm(a: i32, weight: i32, eps: f32) -> i32;
    fn tensor_matmul_ex(a: i32, b: i32, flags: i32) -> i32;
    fn tensor_reshape(a: i32, shape_ptr: *const u32, rank: i32) -> i32;
    fn tensor_permute(a: i32, perm_ptr: *const u32, rank: i32) -> i32;
    fn tensor_concat(a: i32, b: i32, axis: i32) -> i32;
    fn tensor_slice(a: i32, axis: i32, start: i32, len: i32) -> i32;
    fn tensor_gather(table: i32, ids: i32) -> i32;
    fn tensor_weight(name_ptr: *const u8, name_len: i32) -> i32;
    fn tensor_sync() -> i32;
}

/// Waits until every tensor call made before it has run on the device. Ops return their result's
/// handle as soon as the host has checked them and run in order on the device, so a guest waits
/// only here and in reads; a device failure of an earlier op comes back here (or at the next read)
/// with the failed call's place in the invocation in its message.
pub fn sync() -> Result<(), Error> {
    // SAFETY: plain call.
    check(unsafe { tensor_sync() }).map(|_| ())
}

/// A tensor's element type (the ABI's dtype codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    /// Indices: gather's ids, argmax's output.
    I32 = 3,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    fn from_code(code: i32) -> Option<DType> {
        [DType::F32, DType::F16, DType::BF16, DType::I32].get(usize::try_from(code).ok()?).copied()
    }
}

/// The most dimensions a tensor has.
pub const MAX_RANK: usize = 4;

/// A failed call: the host's negative code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// The codes of docs/ABI.md: the crate `tensor-wasm-abi`, which the host uses too.
pub use tensor_wasm_abi as code;

fn check(rc: i32) -> Result<i32, Error> {
    if rc >= 0 {
        return Ok(rc);
    }
    let mut buf = vec![0u8; 256];
    // SAFETY: the host writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { tensor_last_error(buf.as_mut_ptr(), buf.len() as i32) }.max(0) as usize;
    buf.truncate(n.min(256));
    Err(Error { code: rc, message: String::from_utf8_lossy(&buf).into_owned() })
}

/// A tensor on the invocation's device.
#[derive(Debug)]
pub struct Tensor(i32);

impl Tensor {
    /// An f32 tensor of `shape` (1 to 4 dimensions) holding `data`, row-major.
    pub fn new(shape: &[u32], data: &[f32]) -> Result<Tensor, Error> {
        // SAFETY: both pointers and lengths describe live slices.
        let h = unsafe { tensor_create(0, shape.as_ptr(), shape.len() as i32, data.as_ptr(), (data.len() * 4) as i32) };
        check(h).map(Tensor)
    }

    /// A tensor of `shape` and `dtype` from its elements' little-endian bytes (for f16 and bf16,
    /// the `half` crate's `to_le_bytes`).
    pub fn from_bytes(shape: &[u32], dtype: DType, bytes: &[u8]) -> Result<Tensor, Error> {
        // SAFETY: both pointers and lengths describe live slices.
        let h = unsafe {
            tensor_create_typed(dtype as i32, shape.as_ptr(), shape.len() as i32, bytes.as_ptr(), bytes.len() as i32)
        };
        check(h).map(Tensor)
    }

    /// The function's resident tensor `name` (deployed with it in a safetensors file): on the
    /// device since an earlier invocation, or uploaded once now. Read-only, as every tensor is
    /// (ops make new ones); dropping the handle leaves the weight on the device.
    pub fn weight(name: &str) -> Result<Tensor, Error> {
        // SAFETY: the pointer and length describe a live slice.
        let h = unsafe { tensor_weight(name.as_ptr(), name.len() as i32) };
        check(h).map(Tensor)
    }

    /// An i32 tensor: ids for [`Tensor::gather`].
    pub fn from_i32(shape: &[u32], ids: &[i32]) -> Result<Tensor, Error> {
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        Tensor::from_bytes(shape, DType::I32, &bytes)
    }

    pub fn dtype(&self) -> Result<DType, Error> {
        // SAFETY: plain call.
        let code = check(unsafe { tensor_dtype(self.0) })?;
        DType::from_code(code).ok_or(Error { code: code::UNSUPPORTED_DTYPE, message: format!("dtype {code}") })
    }

    /// The tensor's bytes, in its own dtype.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let dtype = self.dtype()?;
        let n: usize = self.shape()?.iter().map(|&d| d as usize).product();
        let mut out = vec![0u8; n * dtype.size()];
        // SAFETY: `out` has exactly the tensor's size.
        check(unsafe { tensor_read_typed(self.0, dtype as i32, out.as_mut_ptr(), out.len() as i32) })?;
        Ok(out)
    }

    /// Reads an i32 tensor (argmax's output) back.
    pub fn to_i32_vec(&self) -> Result<Vec<i32>, Error> {
        if self.dtype()? != DType::I32 {
            return Err(Error { code: code::DTYPE_MISMATCH, message: "not an i32 tensor".into() });
        }
        Ok(self.to_bytes()?.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    pub fn shape(&self) -> Result<Vec<u32>, Error> {
        let mut dims = [0u32; MAX_RANK];
        // SAFETY: `dims` has room for MAX_RANK dimensions, the most a tensor has.
        let rank = check(unsafe { tensor_shape(self.0, dims.as_mut_ptr(), MAX_RANK as i32) })?;
        Ok(dims[..rank as usize].to_vec())
    }

    /// Reads an f32 tensor back (cast others first, or use [`Tensor::to_bytes`]).
    pub fn to_vec(&self) -> Result<Vec<f32>, Error> {
        let n: u32 = self.shape()?.iter().product();
        let mut out = vec![0f32; n as usize];
        // SAFETY: `out` has exactly the tensor's size.
        check(unsafe { tensor_read(self.0, out.as_mut_ptr(), (out.len() * 4) as i32) })?;
        Ok(out)
    }

    /// A new tensor of another dtype (float to i32 truncates toward zero).
    pub fn cast(&self, dtype: DType) -> Result<Tensor, Error> {
        check(unsafe { tensor_cast(self.0, dtype as i32) }).map(Tensor)
    }
    /// Element-wise, with NumPy broadcasting (as are `add`, `mul`, `div` and `maximum`).
    pub fn sub(&self, other: &Tensor) -> Result<Tensor, Error> {
        check(unsafe { tensor_sub(self.0, other.0) }).map(Tensor)
    }
    pub fn div(&self, other: &Tensor) -> Result<Tensor, Error> {
        check(unsafe { tensor_div(self.0, other.0) }).map(Tensor)
    }
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor, Error> {
        check(unsafe { tensor_maximum(self.0, other.0) }).map(Tensor)
    }
    /// GELU, tanh form.
    pub fn gelu(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_gelu(self.0) }).map(Tensor)
    }
    pub fn silu(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_silu(self.0) }).map(Tensor)
    }
    pub fn exp(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_exp(self.0) }).map(Tensor)
    }
    pub fn tanh(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_tanh(self.0) }).map(Tensor)
    }
    pub fn sqrt(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_sqrt(self.0) }).map(Tensor)
    }
    pub fn rsqrt(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_rsqrt(self.0) }).map(Tensor)
    }
    pub fn neg(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_neg(self.0) }).map(Tensor)
    }
    /// Log-softmax along the last axis.
    pub fn log_softmax(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_log_softmax(self.0) }).map(Tensor)
    }
    /// Sum along `axis` (negative counts from the end).
    pub fn sum_axis(&self, axis: i32, keepdims: bool) -> Result<Tensor, Error> {
        check(unsafe { tensor_sum_axis(self.0, axis, keepdims as i32) }).map(Tensor)
    }
    pub fn mean(&self, axis: i32, keepdims: bool) -> Result<Tensor, Error> {
        check(unsafe { tensor_mean(self.0, axis, keepdims as i32) }).map(Tensor)
    }
    pub fn max(&self, axis: i32, keepdims: bool) -> Result<Tensor, Error> {
        check(unsafe { tensor_max(self.0, axis, keepdims as i32) }).map(Tensor)
    }
    /// The index of the largest element along `axis`, as i32.
    pub fn argmax(&self, axis: i32, keepdims: bool) -> Result<Tensor, Error> {
        check(unsafe { tensor_argmax(self.0, axis, keepdims as i32) }).map(Tensor)
    }
    /// Layer norm over the last axis, with an optional weight and bias of that length.
    pub fn layer_norm(&self, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32) -> Result<Tensor, Error> {
        let (w, b) = (weight.map_or(0, |t| t.0), bias.map_or(0, |t| t.0));
        check(unsafe { tensor_layer_norm(self.0, w, b, eps) }).map(Tensor)
    }
    /// RMS norm over the last axis, with an optional weight.
    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f32) -> Result<Tensor, Error> {
        check(unsafe { tensor_rms_norm(self.0, weight.map_or(0, |t| t.0), eps) }).map(Tensor)
    }
    /// Batched matmul over broadcast leading dimensions, either operand transposed (its last two
    /// axes swapped).
    pub fn matmul_ex(&self, other: &Tensor, transpose_a: bool, transpose_b: bool) -> Result<Tensor, Error> {
        let flags = transpose_a as i32 | (transpose_b as i32) << 1;
        check(unsafe { tensor_matmul_ex(self.0, other.0, flags) }).map(Tensor)
    }
    /// A view with another shape of the same element count (no copy).
    pub fn reshape(&self, shape: &[u32]) -> Result<Tensor, Error> {
        // SAFETY: the pointer and length describe a live slice.
        check(unsafe { tensor_reshape(self.0, shape.as_ptr(), shape.len() as i32) }).map(Tensor)
    }
    /// Output axis i is input axis `perm[i]`.
    pub fn permute(&self, perm: &[u32]) -> Result<Tensor, Error> {
        // SAFETY: as above.
        check(unsafe { tensor_permute(self.0, perm.as_ptr(), perm.len() as i32) }).map(Tensor)
    }
    pub fn concat(&self, other: &Tensor, axis: i32) -> Result<Tensor, Error> {
        check(unsafe { tensor_concat(self.0, other.0, axis) }).map(Tensor)
    }
    /// `len` indices from `start` along `axis`.
    pub fn slice(&self, axis: i32, start: u32, len: u32) -> Result<Tensor, Error> {
        check(unsafe { tensor_slice(self.0, axis, start as i32, len as i32) }).map(Tensor)
    }
    /// Rows of `self` (axis 0) picked by the i32 `ids`: an embedding lookup.
    pub fn gather(&self, ids: &Tensor) -> Result<Tensor, Error> {
        check(unsafe { tensor_gather(self.0, ids.0) }).map(Tensor)
    }

    /// Element-wise, with NumPy broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor, Error> {
        check(unsafe { tensor_add(self.0, other.0) }).map(Tensor)
    }
    pub fn mul(&self, other: &Tensor) -> Result<Tensor, Error> {
        check(unsafe { tensor_mul(self.0, other.0) }).map(Tensor)
    }
    pub fn scale(&self, s: f32) -> Result<Tensor, Error> {
        check(unsafe { tensor_scale(self.0, s) }).map(Tensor)
    }
    pub fn relu(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_relu(self.0) }).map(Tensor)
    }
    /// Softmax along the last dimension, for each row.
    pub fn softmax(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_softmax(self.0) }).map(Tensor)
    }
    /// `self[m×k] · other[k×n]` (or batched, like [`Tensor::matmul_ex`]).
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor, Error> {
        check(unsafe { tensor_matmul(self.0, other.0) }).map(Tensor)
    }
    /// The sum of every element, as a one-element tensor.
    pub fn sum(&self) -> Result<Tensor, Error> {
        check(unsafe { tensor_sum(self.0) }).map(Tensor)
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        // SAFETY: plain call; an already-freed handle only returns an error code.
        unsafe { tensor_free(self.0) };
    }
}

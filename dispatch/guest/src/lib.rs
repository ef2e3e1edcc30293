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
}

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

/// The codes of docs/ABI.md, from the host's own definition.
#[path = "../../src/status.rs"]
pub mod code;

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

/// An f32 tensor on the invocation's device.
#[derive(Debug)]
pub struct Tensor(i32);

impl Tensor {
    /// A tensor of `shape` (1 to 4 dimensions) holding `data`, row-major.
    pub fn new(shape: &[u32], data: &[f32]) -> Result<Tensor, Error> {
        // SAFETY: both pointers and lengths describe live slices.
        let h = unsafe { tensor_create(0, shape.as_ptr(), shape.len() as i32, data.as_ptr(), (data.len() * 4) as i32) };
        check(h).map(Tensor)
    }

    pub fn shape(&self) -> Result<Vec<u32>, Error> {
        let mut dims = [0u32; 4];
        // SAFETY: `dims` has room for 4 dimensions, the most a tensor has.
        let rank = check(unsafe { tensor_shape(self.0, dims.as_mut_ptr(), 4) })?;
        Ok(dims[..rank as usize].to_vec())
    }

    /// Reads the tensor back.
    pub fn to_vec(&self) -> Result<Vec<f32>, Error> {
        let n: u32 = self.shape()?.iter().product();
        let mut out = vec![0f32; n as usize];
        // SAFETY: `out` has exactly the tensor's size.
        check(unsafe { tensor_read(self.0, out.as_mut_ptr(), (out.len() * 4) as i32) })?;
        Ok(out)
    }

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
    /// `self[m×k] · other[k×n]`.
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

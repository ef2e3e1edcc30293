//! The CPU back-end. It runs behind the same rings and worker as CUDA, so that CI and GPU-less
//! hosts exercise the whole dispatch path; only the arithmetic differs.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

use half::{bf16, f16};
use zerocopy::IntoBytes;

use super::{descriptor, shape_of, staging, Backend, BackendKind, Finished, Submitted};
use crate::record::{flags, status, DType, Desc, Op, Request, MAX_RANK, SLOT_A, SLOT_B, SLOT_C};
use crate::shape::{self, broadcast_strides, contiguous_strides, walk};

pub struct HostBackend {
    ordinal: usize,
    tensors: HashMap<u64, Buf>,
    /// Each session's tensors, so that `Release` frees them without a scan.
    sessions: HashMap<u64, Vec<u64>>,
    used_bytes: u64,
}

/// A tensor's elements, in its dtype. Arithmetic on f16 and bf16 runs in f32 and rounds the
/// result to the dtype (round to nearest even, through `half`).
enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
}

/// Applies `$body` to the vector inside `$buf`, whatever its element type, and wraps the result
/// in the same variant.
macro_rules! map_buf {
    ($buf:expr, |$v:ident| $body:expr) => {
        match $buf {
            Buf::F32($v) => Buf::F32($body),
            Buf::F16($v) => Buf::F16($body),
            Buf::BF16($v) => Buf::BF16($body),
            Buf::I32($v) => Buf::I32($body),
        }
    };
}

impl Buf {
    fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::F16(v) => v.len(),
            Buf::BF16(v) => v.len(),
            Buf::I32(v) => v.len(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Buf::F32(_) => DType::F32,
            Buf::F16(_) => DType::F16,
            Buf::BF16(_) => DType::BF16,
            Buf::I32(_) => DType::I32,
        }
    }

    fn bytes(&self) -> u64 {
        self.len() as u64 * self.dtype().size()
    }

    /// Elements of `dtype` from little-endian bytes.
    fn from_le(dtype: DType, bytes: &[u8]) -> Buf {
        let two = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        let four = |b: &[u8]| [b[0], b[1], b[2], b[3]];
        match dtype {
            DType::F32 => Buf::F32(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(four(b))).collect()),
            DType::F16 => Buf::F16(bytes.chunks_exact(2).map(|b| f16::from_bits(two(b))).collect()),
            DType::BF16 => Buf::BF16(bytes.chunks_exact(2).map(|b| bf16::from_bits(two(b))).collect()),
            DType::I32 => Buf::I32(bytes.chunks_exact(4).map(|b| i32::from_le_bytes(four(b))).collect()),
        }
    }

    /// Writes the elements as little-endian bytes at the start of `dst`.
    fn write_le(&self, dst: &mut [u8]) {
        match self {
            Buf::F32(v) => dst[..v.len() * 4].copy_from_slice(v.as_bytes()),
            Buf::I32(v) => dst[..v.len() * 4].copy_from_slice(v.as_bytes()),
            Buf::F16(v) => v.iter().zip(dst.chunks_exact_mut(2)).for_each(|(x, d)| d.copy_from_slice(&x.to_le_bytes())),
            Buf::BF16(v) => {
                v.iter().zip(dst.chunks_exact_mut(2)).for_each(|(x, d)| d.copy_from_slice(&x.to_le_bytes()))
            }
        }
    }

    /// The elements as f32: borrowed for f32, converted otherwise (i32 only for casts).
    fn floats(&self) -> Cow<'_, [f32]> {
        match self {
            Buf::F32(v) => Cow::Borrowed(v),
            Buf::F16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Buf::BF16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Buf::I32(v) => Cow::Owned(v.iter().map(|&x| x as f32).collect()),
        }
    }

    /// f32 results rounded to `dtype`. To i32, Rust's `as`: toward zero, saturating, NaN to 0.
    fn from_floats(v: Vec<f32>, dtype: DType) -> Buf {
        match dtype {
            DType::F32 => Buf::F32(v),
            DType::F16 => Buf::F16(v.into_iter().map(f16::from_f32).collect()),
            DType::BF16 => Buf::BF16(v.into_iter().map(bf16::from_f32).collect()),
            DType::I32 => Buf::I32(v.into_iter().map(|x| x as i32).collect()),
        }
    }
}

impl HostBackend {
    pub fn new(ordinal: usize) -> Self {
        HostBackend { ordinal, tensors: HashMap::new(), sessions: HashMap::new(), used_bytes: 0 }
    }

    fn insert(&mut self, req: &Request, data: Buf) -> i32 {
        if self.tensors.contains_key(&req.out) {
            return status::INVALID_ARGUMENT;
        }
        self.used_bytes += data.bytes();
        self.tensors.insert(req.out, data);
        self.sessions.entry(req.session).or_default().push(req.out);
        status::OK
    }

    fn remove(&mut self, id: u64) {
        if let Some(t) = self.tensors.remove(&id) {
            self.used_bytes -= t.bytes();
        }
    }

    /// An f32 operand of the original short requests.
    fn operand(&self, id: u64, len: usize) -> Result<&[f32], i32> {
        match self.tensors.get(&id).ok_or(status::BAD_HANDLE)? {
            Buf::F32(v) if v.len() == len => Ok(v),
            Buf::F32(_) => Err(status::SHAPE_MISMATCH),
            _ => Err(status::DTYPE_MISMATCH),
        }
    }

    /// Operand `slot` of a general request: it must have the dtype and element count the
    /// descriptor gives it, or nothing is read.
    fn typed(&self, id: u64, d: &Desc, slot: usize) -> Result<&Buf, i32> {
        let t = self.tensors.get(&id).ok_or(status::BAD_HANDLE)?;
        if Some(t.dtype()) != d.dtype(slot) {
            return Err(status::DTYPE_MISMATCH);
        }
        if t.len() as u64 != shape::elements(d.shape(slot))? {
            return Err(status::SHAPE_MISMATCH);
        }
        Ok(t)
    }

    fn run(&mut self, req: &Request) -> i32 {
        let Some(op) = Op::from_u8(req.op) else { return status::INVALID_ARGUMENT };
        match op {
            Op::Upload => {
                let Some(dtype) = DType::from_code(i32::from(req.dtype)) else { return status::UNSUPPORTED_DTYPE };
                // SAFETY: the ticket owns the staging buffer until this request completes.
                let src = unsafe { staging(req) };
                let bytes = req.out_bytes as usize;
                if !bytes.is_multiple_of(dtype.size() as usize) || src.len() != bytes.div_ceil(4) {
                    return status::SHAPE_MISMATCH;
                }
                let data = match dtype {
                    DType::F32 => Buf::F32(src.to_vec()),
                    other => Buf::from_le(other, &src.as_bytes()[..bytes]),
                };
                self.insert(req, data)
            }
            Op::Download => {
                let Some(t) = self.tensors.get(&req.a) else { return status::BAD_HANDLE };
                // SAFETY: as above.
                let dst = unsafe { staging(req) };
                if dst.len() as u64 != t.bytes().div_ceil(4) {
                    return status::BUFFER_TOO_SMALL;
                }
                match t {
                    Buf::F32(v) => dst.copy_from_slice(v),
                    other => other.write_le(dst.as_mut_bytes()),
                }
                status::OK
            }
            Op::Free => {
                self.remove(req.a);
                status::OK
            }
            Op::Release => {
                for id in self.sessions.remove(&req.session).unwrap_or_default() {
                    self.remove(id);
                }
                status::OK
            }
            // Every request runs within `submit`, in ring order: all before it have.
            Op::Sync => status::OK,
            // SAFETY: as above; a kernel's staging buffer holds its descriptor.
            kernel => match unsafe { descriptor(req) } {
                None => match self.kernel(kernel, req) {
                    Ok(out) => self.insert(req, Buf::F32(out)),
                    Err(code) => code,
                },
                Some(Err(code)) => code,
                Some(Ok(d)) => match self.general(kernel, req, &d) {
                    Ok(out) => self.insert(req, out),
                    Err(code) => code,
                },
            },
        }
    }

    /// The original f32 ops, from their short requests.
    fn kernel(&self, op: Op, req: &Request) -> Result<Vec<f32>, i32> {
        let shape = shape_of(op, req)?;
        let a = self.operand(req.a, shape.a)?;
        Ok(match op {
            Op::Add => zip(a, self.operand(req.b, shape.b)?, |x, y| x + y),
            Op::Mul => zip(a, self.operand(req.b, shape.b)?, |x, y| x * y),
            Op::Scale => a.iter().map(|x| x * req.scalar).collect(),
            Op::Relu => a.iter().map(|x| x.max(0.0)).collect(),
            Op::Softmax => softmax_rows(a, req.dims[1] as usize),
            Op::Matmul => {
                let b = self.operand(req.b, shape.b)?;
                matmul(a, b, req.dims[0] as usize, req.dims[1] as usize, req.dims[2] as usize)
            }
            // Accumulated in f64: a long f32 sum loses digits that the guest would see.
            Op::Sum => vec![a.iter().map(|&x| f64::from(x)).sum::<f64>() as f32],
            _ => return Err(status::INVALID_ARGUMENT),
        })
    }

    /// Every op in its general form. The output shape is derived again from the descriptor and
    /// must be the one the session reserved; every operand must match its description.
    fn general(&self, op: Op, req: &Request, d: &Desc) -> Result<Buf, i32> {
        let (out_dims, out_dtype) = shape::check_output(op, d, req.out_bytes)?;
        let out = out_dims.as_slice();
        let a = self.typed(req.a, d, SLOT_A)?;
        let sa = d.shape(SLOT_A);
        let float = |v: Vec<f32>| Buf::from_floats(v, out_dtype);
        let unary = |f: fn(f32) -> f32| float(a.floats().iter().map(|&x| f(x)).collect());
        Ok(match op {
            Op::Add | Op::Mul | Op::Sub | Op::Div | Op::Maximum => {
                let b = self.typed(req.b, d, SLOT_B)?;
                let f: fn(f32, f32) -> f32 = match op {
                    Op::Add => |x, y| x + y,
                    Op::Mul => |x, y| x * y,
                    Op::Sub => |x, y| x - y,
                    Op::Div => |x, y| x / y,
                    _ => f32::max,
                };
                float(broadcast_binary(&a.floats(), sa, &b.floats(), d.shape(SLOT_B), out, f))
            }
            Op::Scale => float(a.floats().iter().map(|&x| x * req.scalar).collect()),
            Op::Relu => unary(|x| x.max(0.0)),
            Op::Gelu => unary(gelu),
            Op::Silu => unary(|x| x / (1.0 + (-x).exp())),
            Op::Exp => unary(f32::exp),
            Op::Tanh => unary(f32::tanh),
            Op::Sqrt => unary(f32::sqrt),
            Op::Rsqrt => unary(|x| 1.0 / x.sqrt()),
            Op::Neg => unary(|x| -x),
            Op::Softmax => float(softmax_general(&a.floats(), last(sa), false)),
            Op::LogSoftmax => float(softmax_general(&a.floats(), last(sa), true)),
            Op::Sum | Op::Mean | Op::Max | Op::Argmax => reduce(op, &a.floats(), sa, d.axis as usize, out_dtype),
            Op::LayerNorm | Op::RmsNorm => {
                let weight = match d.flags & flags::HAS_B {
                    0 => None,
                    _ => Some(self.typed(req.b, d, SLOT_B)?.floats()),
                };
                let bias = match (op, d.flags & flags::HAS_C) {
                    (Op::LayerNorm, f) if f != 0 => Some(self.typed(d.c, d, SLOT_C)?.floats()),
                    _ => None,
                };
                let (w, b) = (weight.as_deref(), bias.as_deref());
                float(norm(&a.floats(), last(sa), w, b, d.eps, op == Op::LayerNorm))
            }
            Op::Matmul => {
                let b = self.typed(req.b, d, SLOT_B)?;
                float(batched_matmul(&a.floats(), sa, &b.floats(), d.shape(SLOT_B), out, d.flags))
            }
            Op::Permute => {
                let strides = contiguous_strides(sa);
                let mut walk_strides = [0usize; MAX_RANK];
                for (i, &p) in d.perm[..sa.len()].iter().enumerate() {
                    walk_strides[i] = strides[usize::from(p)];
                }
                take(a, walk(out, walk_strides))
            }
            Op::Slice => {
                let strides = contiguous_strides(sa);
                let base = d.start as usize * strides[d.axis as usize];
                take(a, walk(out, strides).map(|i| base + i))
            }
            Op::Concat => {
                let b = self.typed(req.b, d, SLOT_B)?;
                let ax = d.axis as usize;
                let outer: usize = sa[..ax].iter().map(|&x| x as usize).product();
                let ia: usize = sa[ax..].iter().map(|&x| x as usize).product();
                let ib: usize = d.shape(SLOT_B)[ax..].iter().map(|&x| x as usize).product();
                match (a, b) {
                    (Buf::F32(x), Buf::F32(y)) => Buf::F32(concat(x, y, outer, ia, ib)),
                    (Buf::F16(x), Buf::F16(y)) => Buf::F16(concat(x, y, outer, ia, ib)),
                    (Buf::BF16(x), Buf::BF16(y)) => Buf::BF16(concat(x, y, outer, ia, ib)),
                    (Buf::I32(x), Buf::I32(y)) => Buf::I32(concat(x, y, outer, ia, ib)),
                    _ => return Err(status::DTYPE_MISMATCH),
                }
            }
            Op::Gather => {
                let Buf::I32(ids) = self.typed(req.b, d, SLOT_B)? else { return Err(status::DTYPE_MISMATCH) };
                let rows = sa[0] as usize;
                let row: usize = sa[1..].iter().map(|&x| x as usize).product();
                if ids.iter().any(|&i| i < 0 || i as usize >= rows) {
                    return Err(status::INDEX_OUT_OF_RANGE);
                }
                take(a, ids.iter().flat_map(|&i| (i as usize * row)..(i as usize + 1) * row))
            }
            Op::Cast => match (a, out_dtype) {
                (Buf::I32(v), DType::I32) => Buf::I32(v.clone()),
                (a, to) => Buf::from_floats(a.floats().into_owned(), to),
            },
            Op::Upload | Op::Download | Op::Free | Op::Release | Op::Sync => return Err(status::INVALID_ARGUMENT),
        })
    }
}

fn last(shape: &[u32]) -> usize {
    shape[shape.len() - 1] as usize
}

/// GELU, tanh form: `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
fn gelu(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// The elements of `buf` at `offsets`, in that order, in the same dtype.
fn take(buf: &Buf, offsets: impl Iterator<Item = usize>) -> Buf {
    map_buf!(buf, |v| offsets.map(|i| v[i]).collect())
}

fn concat<T: Copy>(a: &[T], b: &[T], outer: usize, ia: usize, ib: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    for o in 0..outer {
        out.extend_from_slice(&a[o * ia..(o + 1) * ia]);
        out.extend_from_slice(&b[o * ib..(o + 1) * ib]);
    }
    out
}

fn broadcast_binary(x: &[f32], xs: &[u32], y: &[f32], ys: &[u32], out: &[u32], f: fn(f32, f32) -> f32) -> Vec<f32> {
    if xs == ys {
        return zip(x, y, f);
    }
    let (wx, wy) = (walk(out, broadcast_strides(xs, out)), walk(out, broadcast_strides(ys, out)));
    wx.zip(wy).map(|(i, j)| f(x[i], y[j])).collect()
}

/// Softmax (or log-softmax) of each row of `cols`, with the sums in f64.
fn softmax_general(a: &[f32], cols: usize, log: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.len());
    for row in a.chunks_exact(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
        if log {
            let log_total = total.ln();
            out.extend(row.iter().map(|&x| (f64::from(x - max) - log_total) as f32));
        } else {
            out.extend(row.iter().map(|&x| (f64::from(x - max).exp() / total) as f32));
        }
    }
    out
}

/// Sum, mean, max or argmax along `axis`, sums in f64. The output keeps the other axes in order,
/// which is its layout with or without keepdims.
fn reduce(op: Op, a: &[f32], shape: &[u32], axis: usize, dtype: DType) -> Buf {
    let outer: usize = shape[..axis].iter().map(|&x| x as usize).product();
    let n = shape[axis] as usize;
    let inner: usize = shape[axis + 1..].iter().map(|&x| x as usize).product();
    let mut values = Vec::with_capacity(outer * inner);
    let mut indices = Vec::new();
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| a[(o * n + k) * inner + i];
            match op {
                Op::Sum | Op::Mean => {
                    let s: f64 = (0..n).map(|k| f64::from(at(k))).sum();
                    values.push(if op == Op::Mean { s / n as f64 } else { s } as f32);
                }
                Op::Max => values.push((0..n).map(at).fold(f32::NEG_INFINITY, f32::max)),
                _ => {
                    // The first index of the largest element; NaN is never larger.
                    let best = (1..n).fold(0, |best, k| if at(k) > at(best) { k } else { best });
                    indices.push(best as i32);
                }
            }
        }
    }
    if op == Op::Argmax {
        Buf::I32(indices)
    } else {
        Buf::from_floats(values, dtype)
    }
}

/// Layer norm (`(x - mean) / √(var + eps)`) or RMS norm (`x / √(mean(x²) + eps)`) of each row of
/// `cols`, times the weight and plus the bias where given. Statistics in f64.
fn norm(a: &[f32], cols: usize, w: Option<&[f32]>, b: Option<&[f32]>, eps: f32, layer: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.len());
    for row in a.chunks_exact(cols) {
        let n = cols as f64;
        let mean = if layer { row.iter().map(|&x| f64::from(x)).sum::<f64>() / n } else { 0.0 };
        let var = row.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + f64::from(eps)).sqrt();
        out.extend(row.iter().enumerate().map(|(j, &x)| {
            let y = (f64::from(x) - mean) * inv;
            let y = w.map_or(y, |w| y * f64::from(w[j]));
            b.map_or(y, |b| y + f64::from(b[j])) as f32
        }));
    }
    out
}

/// A `rows×cols` matrix transposed.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.len());
    for c in 0..cols {
        out.extend((0..rows).map(|r| m[r * cols + c]));
    }
    out
}

/// Matmul over broadcast leading (batch) dimensions, with either operand transposed.
fn batched_matmul(a: &[f32], sa: &[u32], b: &[f32], sb: &[u32], out: &[u32], fl: u32) -> Vec<f32> {
    let (ra, rb, ro) = (sa.len(), sb.len(), out.len());
    let (m, n) = (out[ro - 2] as usize, out[ro - 1] as usize);
    let (ta, tb) = (fl & flags::TRANSPOSE_A != 0, fl & flags::TRANSPOSE_B != 0);
    let k = if ta { sa[ra - 2] } else { sa[ra - 1] } as usize;
    let batch = &out[..ro - 2];
    let (wa, wb) =
        (walk(batch, broadcast_strides(&sa[..ra - 2], batch)), walk(batch, broadcast_strides(&sb[..rb - 2], batch)));
    let mut result = Vec::with_capacity(out.iter().map(|&x| x as usize).product());
    for (ia, ib) in wa.zip(wb) {
        let ma = &a[ia * m * k..(ia + 1) * m * k];
        let mb = &b[ib * k * n..(ib + 1) * k * n];
        let ma: Cow<[f32]> = if ta { Cow::Owned(transposed(ma, k, m)) } else { Cow::Borrowed(ma) };
        let mb: Cow<[f32]> = if tb { Cow::Owned(transposed(mb, n, k)) } else { Cow::Borrowed(mb) };
        result.extend(matmul(&ma, &mb, m, k, n));
    }
    result
}

fn zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

fn softmax_rows(a: &[f32], cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.len());
    for row in a.chunks_exact(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let start = out.len();
        let mut total = 0.0f32;
        for &x in row {
            let e = (x - max).exp();
            total += e;
            out.push(e);
        }
        out[start..].iter_mut().for_each(|e| *e /= total);
    }
    out
}

/// Row-major `a[m×k] · b[k×n]`, in the i-k-j order so that the inner loop streams rows of `b`.
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        let row = &mut out[i * n..(i + 1) * n];
        for p in 0..k {
            let x = a[i * k + p];
            for (o, &y) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *o += x * y;
            }
        }
    }
    out
}

impl Backend for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn describe(&self) -> String {
        format!("host:{}", self.ordinal)
    }

    fn submit(&mut self, req: &Request, _started: Instant) -> Submitted {
        Submitted::Done(self.run(req))
    }

    fn poll(&mut self, _finished: &mut Vec<Finished>) {}

    fn in_flight(&self) -> usize {
        0
    }

    fn memory_used(&self) -> u64 {
        self.used_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SLOT_OUT;

    fn upload(b: &mut HostBackend, id: u64, data: &mut [f32]) {
        let req = Request {
            session: 1,
            out: id,
            host_addr: data.as_mut_ptr() as u64,
            host_len: data.len() as u64,
            out_bytes: data.len() as u64 * 4,
            op: Op::Upload as u8,
            ..Default::default()
        };
        assert_eq!(b.run(&req), status::OK);
    }

    /// A general request whose descriptor `edit` has tampered with after the session built it.
    fn forged(b: &mut HostBackend, op: Op, edit: impl Fn(&mut Desc, &mut Request)) -> i32 {
        let mut d = Desc::default();
        for slot in [SLOT_A, SLOT_B, SLOT_OUT] {
            d.shapes[slot] = [2, 3, 0, 0];
            d.ranks[slot] = 2;
        }
        let mut req = Request { session: 1, out: 99, a: 10, b: 11, out_bytes: 24, op: op as u8, ..Default::default() };
        edit(&mut d, &mut req);
        let mut words = d.to_words();
        req.host_addr = words.as_mut_ptr() as u64;
        req.host_len = words.len() as u64;
        b.run(&req)
    }

    /// The worker's guard: a descriptor that lies about an operand or the output is refused
    /// before anything is read, so a session bug can never become a wild read or a panic.
    #[test]
    fn forged_descriptors_are_refused_not_trusted() {
        let mut b = HostBackend::new(0);
        upload(&mut b, 10, &mut [1.0; 6]);
        upload(&mut b, 11, &mut [2.0; 6]);
        assert_eq!(forged(&mut b, Op::Add, |_, _| {}), status::OK, "the honest request runs");
        let bigger = |d: &mut Desc, r: &mut Request| {
            d.shapes[SLOT_A] = [4, 3, 0, 0];
            d.shapes[SLOT_OUT] = [4, 3, 0, 0];
            r.out = 100;
            r.out_bytes = 48;
        };
        assert_eq!(forged(&mut b, Op::Add, bigger), status::SHAPE_MISMATCH, "a claims 12 elements, holds 6");
        let out_lies = |d: &mut Desc, r: &mut Request| {
            d.shapes[SLOT_OUT] = [6, 1, 0, 0];
            r.out = 101;
        };
        assert_eq!(forged(&mut b, Op::Add, out_lies), status::INVALID_ARGUMENT);
        let bytes_lie = |_: &mut Desc, r: &mut Request| {
            r.out = 102;
            r.out_bytes = 8;
        };
        assert_eq!(forged(&mut b, Op::Add, bytes_lie), status::INVALID_ARGUMENT);
        let dtype_lies = |d: &mut Desc, r: &mut Request| {
            d.dtypes = [DType::BF16 as u8; 4];
            r.out = 103;
            r.out_bytes = 12;
        };
        assert_eq!(forged(&mut b, Op::Add, dtype_lies), status::DTYPE_MISMATCH);
        let axis_past = |d: &mut Desc, r: &mut Request| {
            d.axis = 7;
            r.out = 104;
        };
        assert_eq!(forged(&mut b, Op::Slice, axis_past), status::INVALID_AXIS);
        let rank_past = |d: &mut Desc, r: &mut Request| {
            d.ranks[SLOT_A] = 200;
            r.out = 105;
        };
        assert_eq!(forged(&mut b, Op::Relu, rank_past), status::INVALID_ARGUMENT);
        let req = Request { session: 1, out: 106, a: 10, op: Op::Gelu as u8, ..Default::default() };
        assert_eq!(b.run(&req), status::INVALID_ARGUMENT, "a new op without a descriptor");
        assert_eq!(b.tensors.len(), 3, "only the honest request made a tensor");
    }
}

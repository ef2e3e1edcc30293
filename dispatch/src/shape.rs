//! The shape and dtype rules of every op, in one place: the session applies them before it sends
//! a request (so a bad call fails without touching a device), and the worker applies them again to
//! the descriptor it receives before it touches memory (so a wrong descriptor is an error, never a
//! wild read). docs/ABI.md states the same rules for guests.

use crate::record::{flags, status, DType, Desc, Op, MAX_RANK, SLOT_A, SLOT_B, SLOT_C};

/// A shape of 1 to [`MAX_RANK`] dimensions, by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Dims {
    pub dims: [u32; MAX_RANK],
    pub rank: u8,
}

impl Dims {
    /// Checks rank and dimensions: 1 to [`MAX_RANK`] dimensions, none zero.
    pub fn new(shape: &[u32]) -> Result<Dims, i32> {
        if shape.is_empty() || shape.len() > MAX_RANK || shape.contains(&0) {
            return Err(status::INVALID_ARGUMENT);
        }
        let mut dims = [0; MAX_RANK];
        dims[..shape.len()].copy_from_slice(shape);
        Ok(Dims { dims, rank: shape.len() as u8 })
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.dims[..usize::from(self.rank)]
    }

    /// The element count, or `invalid_argument` when it overflows a u64.
    pub fn elements(&self) -> Result<u64, i32> {
        elements(self.as_slice())
    }
}

/// The product of `shape`, or `invalid_argument` when it overflows a u64.
pub fn elements(shape: &[u32]) -> Result<u64, i32> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d))).ok_or(status::INVALID_ARGUMENT)
}

/// Makes a NumPy-style axis (negative counts from the end) an index below `rank`.
pub fn axis(axis: i32, rank: usize) -> Result<usize, i32> {
    let rank = rank as i64;
    let a = if axis < 0 { i64::from(axis) + rank } else { i64::from(axis) };
    if (0..rank).contains(&a) {
        Ok(a as usize)
    } else {
        Err(status::INVALID_AXIS)
    }
}

/// NumPy broadcasting: shapes are aligned at their last axis, and each pair of dimensions must be
/// equal or one of them 1.
pub fn broadcast(a: &[u32], b: &[u32]) -> Result<Dims, i32> {
    let rank = a.len().max(b.len());
    let mut out = [0u32; MAX_RANK];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(status::SHAPE_MISMATCH),
        };
    }
    Dims::new(&out[..rank])
}

/// Strides (in elements) of an input of `shape` read along an output of `out`'s shape: 0 on the
/// axes it is broadcast over. `shape` must broadcast to `out`.
pub fn broadcast_strides(shape: &[u32], out: &[u32]) -> [usize; MAX_RANK] {
    let mut strides = [0usize; MAX_RANK];
    let offset = out.len() - shape.len();
    let mut stride = 1usize;
    for i in (0..shape.len()).rev() {
        if shape[i] != 1 {
            strides[offset + i] = stride;
        }
        stride *= shape[i] as usize;
    }
    strides
}

fn float(d: Desc, slot: usize) -> Result<DType, i32> {
    match d.dtype(slot) {
        Some(t) if t.is_float() => Ok(t),
        Some(_) => Err(status::DTYPE_MISMATCH),
        None => Err(status::UNSUPPORTED_DTYPE),
    }
}

fn any(d: Desc, slot: usize) -> Result<DType, i32> {
    d.dtype(slot).ok_or(status::UNSUPPORTED_DTYPE)
}

/// Same dtype as `a`, or `dtype_mismatch`.
fn same(d: Desc, slot: usize, want: DType) -> Result<(), i32> {
    if any(d, slot)? == want {
        Ok(())
    } else {
        Err(status::DTYPE_MISMATCH)
    }
}

/// The output's shape and dtype for `op` on the operands that `d` describes, or the status that
/// says why the op does not apply. Operand shapes in `d` must each be valid ([`Dims::new`]).
pub fn output(op: Op, d: &Desc) -> Result<(Dims, DType), i32> {
    let d = *d;
    let needs_b =
        matches!(op, Op::Add | Op::Mul | Op::Sub | Op::Div | Op::Maximum | Op::Matmul | Op::Concat | Op::Gather);
    for slot in [SLOT_A, SLOT_B, SLOT_C] {
        let present = match slot {
            SLOT_A => true,
            SLOT_B => needs_b || d.flags & flags::HAS_B != 0,
            _ => d.flags & flags::HAS_C != 0,
        };
        if present {
            Dims::new(d.shape(slot))?.elements()?;
        }
    }
    let a = d.shape(SLOT_A);
    let b = d.shape(SLOT_B);
    let same_shape = |dt| Ok((Dims::new(a)?, dt));
    match op {
        Op::Add | Op::Mul | Op::Sub | Op::Div | Op::Maximum => {
            let t = float(d, SLOT_A)?;
            same(d, SLOT_B, t)?;
            Ok((broadcast(a, b)?, t))
        }
        Op::Scale
        | Op::Relu
        | Op::Gelu
        | Op::Silu
        | Op::Exp
        | Op::Tanh
        | Op::Sqrt
        | Op::Rsqrt
        | Op::Neg
        | Op::Softmax
        | Op::LogSoftmax => same_shape(float(d, SLOT_A)?),
        Op::Sum | Op::Mean | Op::Max | Op::Argmax => {
            let t = float(d, SLOT_A)?;
            let ax = d.axis as usize;
            if ax >= a.len() {
                return Err(status::INVALID_AXIS);
            }
            let mut out: Vec<u32> = a.to_vec();
            if d.flags & flags::KEEPDIMS != 0 {
                out[ax] = 1;
            } else {
                out.remove(ax);
                if out.is_empty() {
                    // A tensor has at least one dimension: a full reduction is one element.
                    out.push(1);
                }
            }
            Ok((Dims::new(&out)?, if op == Op::Argmax { DType::I32 } else { t }))
        }
        Op::LayerNorm | Op::RmsNorm => {
            let t = float(d, SLOT_A)?;
            let last = a[a.len() - 1];
            let mut params = vec![];
            if d.flags & flags::HAS_B != 0 {
                params.push(SLOT_B);
            }
            if op == Op::LayerNorm && d.flags & flags::HAS_C != 0 {
                params.push(SLOT_C);
            }
            for slot in params {
                same(d, slot, t)?;
                if d.shape(slot) != [last] {
                    return Err(status::SHAPE_MISMATCH);
                }
            }
            if !(d.eps.is_finite() && d.eps >= 0.0) {
                return Err(status::INVALID_ARGUMENT);
            }
            same_shape(t)
        }
        Op::Matmul => {
            let t = float(d, SLOT_A)?;
            same(d, SLOT_B, t)?;
            if a.len() < 2 || b.len() < 2 {
                return Err(status::SHAPE_MISMATCH);
            }
            let (ra, rb) = (a.len(), b.len());
            let (m, k) =
                if d.flags & flags::TRANSPOSE_A != 0 { (a[ra - 1], a[ra - 2]) } else { (a[ra - 2], a[ra - 1]) };
            let (k2, n) =
                if d.flags & flags::TRANSPOSE_B != 0 { (b[rb - 1], b[rb - 2]) } else { (b[rb - 2], b[rb - 1]) };
            if k != k2 {
                return Err(status::SHAPE_MISMATCH);
            }
            let mut out = batch(&a[..ra - 2], &b[..rb - 2])?;
            out.extend([m, n]);
            Ok((Dims::new(&out)?, t))
        }
        Op::Permute => {
            let t = any(d, SLOT_A)?;
            let perm = &d.perm[..a.len()];
            let mut seen = [false; MAX_RANK];
            for &p in perm {
                let p = usize::from(p);
                if p >= a.len() || seen[p] {
                    return Err(status::INVALID_AXIS);
                }
                seen[p] = true;
            }
            let out: Vec<u32> = perm.iter().map(|&p| a[usize::from(p)]).collect();
            Ok((Dims::new(&out)?, t))
        }
        Op::Concat => {
            let t = any(d, SLOT_A)?;
            same(d, SLOT_B, t)?;
            let ax = d.axis as usize;
            if ax >= a.len() {
                return Err(status::INVALID_AXIS);
            }
            if a.len() != b.len() || (0..a.len()).any(|i| i != ax && a[i] != b[i]) {
                return Err(status::SHAPE_MISMATCH);
            }
            let mut out = a.to_vec();
            out[ax] = a[ax].checked_add(b[ax]).ok_or(status::INVALID_ARGUMENT)?;
            Ok((Dims::new(&out)?, t))
        }
        Op::Slice => {
            let t = any(d, SLOT_A)?;
            let ax = d.axis as usize;
            if ax >= a.len() {
                return Err(status::INVALID_AXIS);
            }
            let end = d.start.checked_add(d.len).ok_or(status::INDEX_OUT_OF_RANGE)?;
            if d.len == 0 || end > a[ax] {
                return Err(status::INDEX_OUT_OF_RANGE);
            }
            let mut out = a.to_vec();
            out[ax] = d.len;
            Ok((Dims::new(&out)?, t))
        }
        Op::Gather => {
            let t = any(d, SLOT_A)?;
            if any(d, SLOT_B)? != DType::I32 {
                return Err(status::DTYPE_MISMATCH);
            }
            let out: Vec<u32> = b.iter().chain(&a[1..]).copied().collect();
            if out.len() > MAX_RANK {
                return Err(status::INVALID_ARGUMENT);
            }
            Ok((Dims::new(&out)?, t))
        }
        Op::Cast => {
            any(d, SLOT_A)?;
            let to = d.dtype(crate::record::SLOT_OUT).ok_or(status::UNSUPPORTED_DTYPE)?;
            same_shape(to)
        }
        Op::Upload | Op::Download | Op::Free | Op::Release | Op::Sync => Err(status::INVALID_ARGUMENT),
    }
}

/// A back-end's guard on a general request: the output shape and dtype derived again from the
/// descriptor must be the ones it states, and the bytes the ones the session reserved.
pub fn check_output(op: Op, d: &Desc, out_bytes: u64) -> Result<(Dims, DType), i32> {
    let (dims, dtype) = output(op, d)?;
    if dims.as_slice() != d.shape(crate::record::SLOT_OUT) || d.dtype(crate::record::SLOT_OUT) != Some(dtype) {
        return Err(status::INVALID_ARGUMENT);
    }
    if dims.elements()? * dtype.size() != out_bytes {
        return Err(status::INVALID_ARGUMENT);
    }
    Ok((dims, dtype))
}

/// Row-major strides of a contiguous tensor of `shape`, in elements.
pub fn contiguous_strides(shape: &[u32]) -> [usize; MAX_RANK] {
    let mut strides = [0usize; MAX_RANK];
    let mut stride = 1;
    for i in (0..shape.len()).rev() {
        strides[i] = stride;
        stride *= shape[i] as usize;
    }
    strides
}

/// The offsets, one per element of an output of shape `dims` in row-major order, of an input
/// read with `strides` along the output's axes.
pub struct Walk {
    dims: [usize; MAX_RANK],
    strides: [usize; MAX_RANK],
    rank: usize,
    index: [usize; MAX_RANK],
    offset: usize,
    left: usize,
}

pub fn walk(dims: &[u32], strides: [usize; MAX_RANK]) -> Walk {
    let mut d = [0usize; MAX_RANK];
    for (o, &x) in d.iter_mut().zip(dims) {
        *o = x as usize;
    }
    let left = dims.iter().map(|&x| x as usize).product();
    Walk { dims: d, strides, rank: dims.len(), index: [0; MAX_RANK], offset: 0, left }
}

impl Iterator for Walk {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let current = self.offset;
        // Odometer: advance the last axis, carrying into the ones before it.
        for axis in (0..self.rank).rev() {
            self.index[axis] += 1;
            self.offset += self.strides[axis];
            if self.index[axis] < self.dims[axis] {
                break;
            }
            self.offset -= self.strides[axis] * self.dims[axis];
            self.index[axis] = 0;
        }
        Some(current)
    }
}

/// Matmul's leading (batch) dimensions, broadcast like element-wise operands; none for 2-D.
fn batch(a: &[u32], b: &[u32]) -> Result<Vec<u32>, i32> {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ok(vec![]),
        (false, true) => Ok(a.to_vec()),
        (true, false) => Ok(b.to_vec()),
        (false, false) => Ok(broadcast(a, b)?.as_slice().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[2, 3], &[3]).unwrap().as_slice(), &[2, 3]);
        assert_eq!(broadcast(&[4, 1, 3], &[2, 1]).unwrap().as_slice(), &[4, 2, 3]);
        assert_eq!(broadcast(&[2, 3], &[2]), Err(status::SHAPE_MISMATCH));
        assert_eq!(broadcast_strides(&[2, 1], &[4, 2, 3]), [0, 1, 0, 0]);
        assert_eq!(broadcast_strides(&[4, 1, 3], &[4, 2, 3]), [3, 0, 1, 0]);
    }

    #[test]
    fn axes_count_from_the_end_when_negative() {
        assert_eq!(axis(-1, 3), Ok(2));
        assert_eq!(axis(2, 3), Ok(2));
        assert_eq!(axis(3, 3), Err(status::INVALID_AXIS));
        assert_eq!(axis(-4, 3), Err(status::INVALID_AXIS));
        assert_eq!(axis(i32::MIN, 4), Err(status::INVALID_AXIS));
    }

    #[test]
    fn huge_shapes_are_refused_not_wrapped() {
        assert_eq!(Dims::new(&[u32::MAX; 4]).unwrap().elements(), Err(status::INVALID_ARGUMENT));
        assert!(Dims::new(&[u32::MAX; 2]).unwrap().elements().is_ok());
        assert_eq!(Dims::new(&[1; MAX_RANK + 1]), Err(status::INVALID_ARGUMENT));
    }
}

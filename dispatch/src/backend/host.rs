//! The CPU back-end. It runs behind the same rings and worker as CUDA, so that CI and GPU-less
//! hosts exercise the whole dispatch path; only the arithmetic differs.

use std::collections::HashMap;
use std::time::Instant;

use super::{shape_of, staging, Backend, BackendKind, Finished, Submitted};
use crate::record::{status, Op, Request};

pub struct HostBackend {
    ordinal: usize,
    tensors: HashMap<u64, Tensor>,
    /// Each session's tensors, so that `Release` frees them without a scan.
    sessions: HashMap<u64, Vec<u64>>,
    used_bytes: u64,
}

struct Tensor {
    data: Vec<f32>,
}

impl HostBackend {
    pub fn new(ordinal: usize) -> Self {
        HostBackend { ordinal, tensors: HashMap::new(), sessions: HashMap::new(), used_bytes: 0 }
    }

    fn insert(&mut self, req: &Request, data: Vec<f32>) -> i32 {
        if self.tensors.contains_key(&req.out) {
            return status::INVALID_ARGUMENT;
        }
        self.used_bytes += (data.len() * 4) as u64;
        self.tensors.insert(req.out, Tensor { data });
        self.sessions.entry(req.session).or_default().push(req.out);
        status::OK
    }

    fn remove(&mut self, id: u64) {
        if let Some(t) = self.tensors.remove(&id) {
            self.used_bytes -= (t.data.len() * 4) as u64;
        }
    }

    fn operand(&self, id: u64, len: usize) -> Result<&[f32], i32> {
        let t = self.tensors.get(&id).ok_or(status::BAD_HANDLE)?;
        if t.data.len() != len {
            return Err(status::SHAPE_MISMATCH);
        }
        Ok(&t.data)
    }

    fn run(&mut self, req: &Request) -> i32 {
        let Some(op) = Op::from_u8(req.op) else { return status::INVALID_ARGUMENT };
        match op {
            Op::Upload => {
                // SAFETY: the ticket owns the staging buffer until this request completes.
                let src = unsafe { staging(req) };
                self.insert(req, src.to_vec())
            }
            Op::Download => {
                let Some(t) = self.tensors.get(&req.a) else { return status::BAD_HANDLE };
                // SAFETY: as above.
                let dst = unsafe { staging(req) };
                if dst.len() != t.data.len() {
                    return status::BUFFER_TOO_SMALL;
                }
                dst.copy_from_slice(&t.data);
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
            kernel => match self.kernel(kernel, req) {
                Ok(out) => self.insert(req, out),
                Err(code) => code,
            },
        }
    }

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
            Op::Upload | Op::Download | Op::Free | Op::Release => return Err(status::INVALID_ARGUMENT),
        })
    }
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

//! The general ops (every dtype, N-d shapes, broadcasting, axes) against float64 references
//! written here, on fresh random inputs, through the real rings and workers of the host back-end;
//! and every malformed call refused with its own status. Each case is a function of the
//! dispatcher it runs on: the host back-end's tests run them all, and so does the CUDA test
//! wherever a GPU is, with the same checks and bounds, since CUDA runs every op on every dtype. Downloads are poisoned (all ones: NaN
//! in every float dtype) before the device writes them, so an op that writes nothing fails.
//!
//! Bounds, relative to the output's largest magnitude: f32 1e-5, f16 1e-3, bf16 1e-2. The inputs
//! of the reference are the values the device holds (rounded to the dtype), so the bound covers
//! the op's arithmetic and the rounding of its output.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{deadline, Rng};
use half::{bf16, f16};
use tensor_wasm_dispatch::{
    status, Args, BackendChoice, DType, DispatchConfig, Dispatcher, Done, Op, Session, MAX_RANK,
};

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn bound(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1e-3,
        DType::BF16 => 1e-2,
        DType::I32 => 0.0,
    }
}

fn host() -> Arc<Dispatcher> {
    Dispatcher::start(DispatchConfig { backend: BackendChoice::Host, ..Default::default() }).unwrap()
}

fn count(shape: &[u32]) -> usize {
    shape.iter().map(|&d| d as usize).product()
}

/// `values` as `dtype`'s little-endian bytes, and the values those bytes hold.
fn encode(dtype: DType, values: &[f32]) -> (Vec<u8>, Vec<f64>) {
    match dtype {
        DType::F32 => {
            (values.iter().flat_map(|v| v.to_le_bytes()).collect(), values.iter().map(|&v| v.into()).collect())
        }
        DType::F16 => {
            let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            (h.iter().flat_map(|v| v.to_le_bytes()).collect(), h.iter().map(|v| v.to_f64()).collect())
        }
        DType::BF16 => {
            let h: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            (h.iter().flat_map(|v| v.to_le_bytes()).collect(), h.iter().map(|v| v.to_f64()).collect())
        }
        DType::I32 => (
            values.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect(),
            values.iter().map(|&v| v as i32 as f64).collect(),
        ),
    }
}

fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()).into()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f64()).collect(),
        DType::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()).into()).collect(),
    }
}

/// Uploads `values` as `dtype`; returns the handle and the values the device holds.
fn upload(s: &mut Session, shape: &[u32], dtype: DType, values: &[f32]) -> (i32, Vec<f64>) {
    let (bytes, held) = encode(dtype, values);
    let call = s.upload_bytes(shape, dtype, &bytes).unwrap();
    match s.call_blocking(call, deadline()).unwrap() {
        Done::Tensor(h) => (h, held),
        other => panic!("upload gave {other:?}"),
    }
}

fn run(s: &mut Session, op: Op, args: Args) -> Result<i32, i32> {
    let call = s.op(op, &args)?;
    match s.call_blocking(call, deadline())? {
        Done::Tensor(h) => Ok(h),
        other => panic!("{op:?} gave {other:?}"),
    }
}

/// Reads a tensor back as f64, in its own dtype.
fn read(s: &mut Session, h: i32) -> Vec<f64> {
    let t = *s.tensor(h).unwrap();
    let call = s.download(h).unwrap();
    let Done::Data(words) = s.call_blocking(call, deadline()).unwrap() else { panic!("no data") };
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_bits().to_le_bytes()).collect();
    decode(t.dtype, &bytes[..t.bytes() as usize])
}

fn check(name: &str, got: &[f64], want: &[f64], bound: f64) {
    assert_eq!(got.len(), want.len(), "{name}: element count");
    assert!(got.iter().all(|g| !g.is_nan()), "{name}: unwritten (poisoned) or NaN elements in the output");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs())).max(f64::MIN_POSITIVE);
    let err = got.iter().zip(want).map(|(g, w)| (g - w).abs() / scale).fold(0.0, f64::max);
    assert!(err <= bound, "{name}: relative error {err:e} over the bound {bound:e}");
}

/// Row-major multi-index of element `i` of `shape`.
fn unravel(mut i: usize, shape: &[u32]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d] as usize;
        i /= shape[d] as usize;
    }
    idx
}

/// Offset in `shape` of the output index `idx` (aligned at the last axis, broadcast on 1s).
fn ravel_broadcast(idx: &[usize], shape: &[u32]) -> usize {
    let skip = idx.len() - shape.len();
    shape.iter().enumerate().fold(0, |off, (d, &n)| off * n as usize + if n == 1 { 0 } else { idx[skip + d] })
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

#[test]
fn binary_ops_broadcast_like_numpy_in_every_float_dtype() {
    binary_ops(host());
}

fn binary_ops(d: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    let mut s = Session::new(d.clone(), 0, 1);
    let cases: [(&[u32], &[u32], &[u32]); 5] = [
        (&[37], &[37], &[37]),
        (&[3, 4, 5], &[4, 1], &[3, 4, 5]),
        (&[2, 1, 3], &[5, 1], &[2, 5, 3]),
        (&[1], &[2, 3, 2, 2], &[2, 3, 2, 2]),
        (&[6, 1], &[1, 7], &[6, 7]),
    ];
    for dtype in FLOATS {
        for (sa, sb, so) in cases {
            let (ha, a) = upload(&mut s, sa, dtype, &rng.vec(count(sa)));
            // Denominators in [0.5, 2.5]: away from zero, so that div stays finite in f16.
            let positive: Vec<f32> = rng.vec(count(sb)).iter().map(|v| v.abs() / 2.0 + 0.5).collect();
            let (hb, b) = upload(&mut s, sb, dtype, &positive);
            type Case = (Op, fn(f64, f64) -> f64);
            let ops: [Case; 5] = [
                (Op::Add, |x, y| x + y),
                (Op::Sub, |x, y| x - y),
                (Op::Mul, |x, y| x * y),
                (Op::Div, |x, y| x / y),
                (Op::Maximum, f64::max),
            ];
            for (op, f) in ops {
                let h = run(&mut s, op, Args { a: ha, b: hb, ..Default::default() }).unwrap();
                assert_eq!(s.tensor(h).unwrap().shape(), so);
                assert_eq!(s.tensor(h).unwrap().dtype, dtype);
                let want: Vec<f64> = (0..count(so))
                    .map(|i| {
                        let idx = unravel(i, so);
                        f(a[ravel_broadcast(&idx, sa)], b[ravel_broadcast(&idx, sb)])
                    })
                    .collect();
                check(&format!("{op:?} {dtype:?} {sa:?} {sb:?}"), &read(&mut s, h), &want, bound(dtype));
                s.free(h).unwrap();
            }
        }
    }
    // The original imports broadcast too, and take the general path for other dtypes.
    let dtype = DType::BF16;
    let (ha, a) = upload(&mut s, &[2, 3], dtype, &rng.vec(6));
    let (hb, b) = upload(&mut s, &[3], dtype, &rng.vec(3));
    let call = s.kernel(Op::Add, ha, hb, 0.0).unwrap();
    let Done::Tensor(h) = s.call_blocking(call, deadline()).unwrap() else { panic!() };
    let want: Vec<f64> = (0..6).map(|i| a[i] + b[i % 3]).collect();
    check("tensor_add broadcast", &read(&mut s, h), &want, bound(dtype));
    drop(s);
    d.shutdown();
}

#[test]
fn unary_ops_match_the_reference_in_every_float_dtype() {
    unary_ops(host());
}

fn unary_ops(d: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    let mut s = Session::new(d.clone(), 0, 1);
    let shape = [3u32, 5, 7];
    type Case = (Op, fn(f64) -> f64, bool);
    let ops: [Case; 9] = [
        (Op::Relu, |x| x.max(0.0), false),
        (Op::Gelu, gelu, false),
        (Op::Silu, |x| x / (1.0 + (-x).exp()), false),
        (Op::Exp, f64::exp, false),
        (Op::Tanh, f64::tanh, false),
        (Op::Sqrt, f64::sqrt, true),
        (Op::Rsqrt, |x| 1.0 / x.sqrt(), true),
        (Op::Neg, |x| -x, false),
        (Op::Scale, |x| x * 0.75, false),
    ];
    for dtype in FLOATS {
        for (op, f, positive) in ops {
            let mut values = rng.vec(count(&shape));
            if positive {
                values.iter_mut().for_each(|v| *v = v.abs() + 0.1);
            }
            let (ha, a) = upload(&mut s, &shape, dtype, &values);
            let h = run(&mut s, op, Args { a: ha, scalar: 0.75, ..Default::default() }).unwrap();
            let want: Vec<f64> = a.iter().map(|&x| f(x)).collect();
            check(&format!("{op:?} {dtype:?}"), &read(&mut s, h), &want, bound(dtype));
        }
        s = Session::new(d.clone(), 0, 1);
    }
    drop(s);
    d.shutdown();
}

#[test]
fn reductions_along_every_axis_with_and_without_keepdims() {
    reductions(host());
}

fn reductions(d: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    let shape = [4u32, 6, 5];
    let ops = [Op::Sum, Op::Mean, Op::Max, Op::Argmax];
    for dtype in FLOATS {
        let mut s = Session::new(d.clone(), 0, 1);
        let (ha, a) = upload(&mut s, &shape, dtype, &rng.vec(count(&shape)));
        for axis in [0i32, 1, 2, -1] {
            let ax = axis.rem_euclid(3) as usize;
            for keepdims in [false, true] {
                let mut out_shape: Vec<u32> = shape.to_vec();
                if keepdims {
                    out_shape[ax] = 1;
                } else {
                    out_shape.remove(ax);
                }
                let rows: Vec<Vec<f64>> = (0..count(&out_shape))
                    .map(|i| {
                        let mut idx = unravel(i, &out_shape);
                        if !keepdims {
                            idx.insert(ax, 0);
                        }
                        (0..shape[ax] as usize)
                            .map(|k| {
                                idx[ax] = k;
                                a[idx.iter().zip(&shape).fold(0, |o, (&i, &n)| o * n as usize + i)]
                            })
                            .collect()
                    })
                    .collect();
                for op in ops {
                    let args = Args { a: ha, axis, keepdims, ..Default::default() };
                    let h = run(&mut s, op, args).unwrap();
                    let t = *s.tensor(h).unwrap();
                    assert_eq!(t.shape(), &out_shape[..], "{op:?} axis {axis} keepdims {keepdims}");
                    let want: Vec<f64> = rows
                        .iter()
                        .map(|r| match op {
                            Op::Sum => r.iter().sum(),
                            Op::Mean => r.iter().sum::<f64>() / r.len() as f64,
                            Op::Max => r.iter().cloned().fold(f64::MIN, f64::max),
                            _ => (1..r.len()).fold(0, |b, k| if r[k] > r[b] { k } else { b }) as f64,
                        })
                        .collect();
                    let name = format!("{op:?} {dtype:?} axis {axis} keepdims {keepdims}");
                    if op == Op::Argmax {
                        assert_eq!(t.dtype, DType::I32);
                        assert_eq!(read(&mut s, h), want, "{name}");
                    } else {
                        check(&name, &read(&mut s, h), &want, bound(dtype));
                    }
                    s.free(h).unwrap();
                }
            }
        }
        // `tensor_sum` (the original import) sums every element of any float dtype.
        let call = s.kernel(Op::Sum, ha, 0, 0.0).unwrap();
        let Done::Tensor(h) = s.call_blocking(call, deadline()).unwrap() else { panic!() };
        assert_eq!(s.tensor(h).unwrap().shape(), &[1]);
        check(&format!("tensor_sum {dtype:?}"), &read(&mut s, h), &[a.iter().sum()], bound(dtype));
        // A full reduction of a 1-D tensor is one element of shape [1].
        let (hv, v) = upload(&mut s, &[9], dtype, &rng.vec(9));
        let h = run(&mut s, Op::Sum, Args { a: hv, ..Default::default() }).unwrap();
        assert_eq!(s.tensor(h).unwrap().shape(), &[1]);
        check("sum 1-D", &read(&mut s, h), &[v.iter().sum()], bound(dtype));
    }
    d.shutdown();
}

#[test]
fn softmax_log_softmax_and_norms_match_the_reference() {
    softmax_and_norms(host());
}

fn softmax_and_norms(d: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    let shape = [2u32, 3, 16];
    let cols = 16;
    for dtype in FLOATS {
        let mut s = Session::new(d.clone(), 0, 1);
        let (ha, a) = upload(&mut s, &shape, dtype, &rng.vec(count(&shape)));
        let (hw, w) = upload(&mut s, &[16], dtype, &rng.vec(16));
        let (hb, b) = upload(&mut s, &[16], dtype, &rng.vec(16));
        let rows = || a.chunks(cols);
        let softmax: Vec<f64> = rows()
            .flat_map(|r| {
                let m = r.iter().cloned().fold(f64::MIN, f64::max);
                let t: f64 = r.iter().map(|x| (x - m).exp()).sum();
                r.iter().map(move |x| (x - m).exp() / t)
            })
            .collect();
        let h = run(&mut s, Op::Softmax, Args::new(ha)).unwrap();
        check(&format!("softmax {dtype:?}"), &read(&mut s, h), &softmax, bound(dtype));
        let log: Vec<f64> = softmax.iter().map(|p| p.ln()).collect();
        let h = run(&mut s, Op::LogSoftmax, Args::new(ha)).unwrap();
        check(&format!("log_softmax {dtype:?}"), &read(&mut s, h), &log, bound(dtype));

        let eps = 1e-5f32;
        let norm = |layer: bool, weight: bool, bias: bool| -> Vec<f64> {
            rows()
                .flat_map(|r| {
                    let n = r.len() as f64;
                    let mean = if layer { r.iter().sum::<f64>() / n } else { 0.0 };
                    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
                    let inv = 1.0 / (var + f64::from(eps)).sqrt();
                    let (w, b) = (&w, &b);
                    r.iter().enumerate().map(move |(j, x)| {
                        let y = (x - mean) * inv;
                        let y = if weight { y * w[j] } else { y };
                        if bias {
                            y + b[j]
                        } else {
                            y
                        }
                    })
                })
                .collect()
        };
        for (op, weight, bias) in [
            (Op::LayerNorm, true, true),
            (Op::LayerNorm, false, false),
            (Op::LayerNorm, true, false),
            (Op::RmsNorm, true, false),
            (Op::RmsNorm, false, false),
        ] {
            let args =
                Args { a: ha, b: if weight { hw } else { 0 }, c: if bias { hb } else { 0 }, eps, ..Default::default() };
            let h = run(&mut s, op, args).unwrap();
            let want = norm(op == Op::LayerNorm, weight, bias);
            check(&format!("{op:?} {dtype:?} weight {weight} bias {bias}"), &read(&mut s, h), &want, bound(dtype));
        }
    }
    d.shutdown();
}

#[test]
fn batched_matmul_with_transposes_matches_the_reference() {
    batched_matmul(host());
}

fn batched_matmul(d: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    // (a's shape, b's shape, transpose a, transpose b, out's shape)
    type Case<'a> = (&'a [u32], &'a [u32], bool, bool, &'a [u32]);
    let cases: [Case; 5] = [
        (&[5, 7], &[7, 3], false, false, &[5, 3]),
        (&[7, 5], &[7, 3], true, false, &[5, 3]),
        (&[5, 7], &[3, 7], false, true, &[5, 3]),
        (&[2, 3, 4, 16], &[3, 16, 6], false, false, &[2, 3, 4, 6]),
        (&[2, 1, 16, 4], &[3, 6, 16], true, true, &[2, 3, 4, 6]),
    ];
    for dtype in FLOATS {
        let mut s = Session::new(d.clone(), 0, 1);
        for (sa, sb, ta, tb, so) in cases {
            let (ha, a) = upload(&mut s, sa, dtype, &rng.vec(count(sa)));
            let (hb, b) = upload(&mut s, sb, dtype, &rng.vec(count(sb)));
            let args = Args { a: ha, b: hb, transpose_a: ta, transpose_b: tb, ..Default::default() };
            let h = run(&mut s, Op::Matmul, args).unwrap();
            assert_eq!(s.tensor(h).unwrap().shape(), so);
            let (m, n) = (so[so.len() - 2] as usize, so[so.len() - 1] as usize);
            let k = if ta { sa[sa.len() - 2] } else { sa[sa.len() - 1] } as usize;
            let want: Vec<f64> = (0..count(so))
                .map(|i| {
                    let idx = unravel(i, so);
                    let (r, c) = (idx[idx.len() - 2], idx[idx.len() - 1]);
                    let batch = &idx[..idx.len() - 2];
                    let base = |shape: &[u32]| {
                        let bs = &shape[..shape.len() - 2];
                        let mut full = batch.to_vec();
                        full.extend([0, 0]);
                        let mut with_matrix: Vec<u32> = bs.to_vec();
                        with_matrix.extend([1, 1]);
                        ravel_broadcast(&full, &with_matrix)
                    };
                    let (oa, ob) = (base(sa) * m * k, base(sb) * k * n);
                    (0..k)
                        .map(|p| {
                            let x = if ta { a[oa + p * m + r] } else { a[oa + r * k + p] };
                            let y = if tb { b[ob + c * k + p] } else { b[ob + p * n + c] };
                            x * y
                        })
                        .sum()
                })
                .collect();
            check(&format!("matmul {dtype:?} {sa:?}{ta} {sb:?}{tb}"), &read(&mut s, h), &want, bound(dtype));
        }
    }
    d.shutdown();
}

#[test]
fn views_permutes_slices_concats_gathers_and_casts_move_data_exactly() {
    data_movement(host());
}

/// Every dtype, on both back-ends.
fn data_movement(d: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    for dtype in DType::ALL {
        let mut s = Session::new(d.clone(), 0, 1);
        let values: Vec<f32> =
            (0..120).map(|i| if dtype == DType::I32 { i as f32 - 60.0 } else { rng.value() }).collect();
        let (ha, a) = upload(&mut s, &[2, 3, 4, 5], dtype, &values);

        // Reshape is a view: no request, same memory, another shape.
        let hv = s.reshape(ha, &[6, 20]).unwrap();
        assert_eq!(s.tensor(hv).unwrap().shape(), &[6, 20]);
        assert_eq!(read(&mut s, hv), a);
        assert_eq!(s.reshape(ha, &[7, 20]), Err(status::SHAPE_MISMATCH));

        let perm = [2u8, 0, 3, 1];
        let h = run(&mut s, Op::Permute, Args { a: ha, perm, perm_len: 4, ..Default::default() }).unwrap();
        let so = [4u32, 2, 5, 3];
        assert_eq!(s.tensor(h).unwrap().shape(), &so);
        let want: Vec<f64> = (0..120)
            .map(|i| {
                let o = unravel(i, &so);
                let mut src = [0usize; 4];
                for (k, &p) in perm.iter().enumerate() {
                    src[usize::from(p)] = o[k];
                }
                a[((src[0] * 3 + src[1]) * 4 + src[2]) * 5 + src[3]]
            })
            .collect();
        assert_eq!(read(&mut s, h), want, "permute {dtype:?}");

        let h = run(&mut s, Op::Slice, Args { a: ha, axis: -2, start: 1, len: 2, ..Default::default() }).unwrap();
        assert_eq!(s.tensor(h).unwrap().shape(), &[2, 3, 2, 5]);
        let want: Vec<f64> = (0..60)
            .map(|i| unravel(i, &[2, 3, 2, 5]))
            .map(|o| a[((o[0] * 3 + o[1]) * 4 + o[2] + 1) * 5 + o[3]])
            .collect();
        assert_eq!(read(&mut s, h), want, "slice {dtype:?}");

        let (hb, b) = upload(&mut s, &[2, 1, 4, 5], dtype, &values[..40]);
        let h = run(&mut s, Op::Concat, Args { a: ha, b: hb, axis: 1, ..Default::default() }).unwrap();
        assert_eq!(s.tensor(h).unwrap().shape(), &[2, 4, 4, 5]);
        let want: Vec<f64> =
            (0..2).flat_map(|o| a[o * 60..(o + 1) * 60].iter().chain(&b[o * 20..(o + 1) * 20]).copied()).collect();
        assert_eq!(read(&mut s, h), want, "concat {dtype:?}");

        // An embedding lookup: rows of a [6, 20] table by i32 ids of shape [2, 3].
        let ids = [5i32, 0, 2, 2, 4, 1];
        let (hi, _) = upload(&mut s, &[2, 3], DType::I32, &ids.map(|i| i as f32));
        let h = run(&mut s, Op::Gather, Args { a: hv, b: hi, ..Default::default() }).unwrap();
        assert_eq!(s.tensor(h).unwrap().shape(), &[2, 3, 20]);
        let want: Vec<f64> =
            ids.iter().flat_map(|&i| a[i as usize * 20..(i as usize + 1) * 20].iter().copied()).collect();
        assert_eq!(read(&mut s, h), want, "gather {dtype:?}");
        // An id outside the table's rows, known only from its value (on CUDA, read back first).
        for bad in [-1.0f32, 6.0] {
            let (hi, _) = upload(&mut s, &[2, 2], DType::I32, &[0.0, 1.0, bad, 5.0]);
            assert_eq!(
                run(&mut s, Op::Gather, Args { a: hv, b: hi, ..Default::default() }),
                Err(status::INDEX_OUT_OF_RANGE)
            );
        }

        // Casts round like the `half` crate (to nearest even), and truncate toward zero to i32.
        for to in DType::ALL {
            let h = run(&mut s, Op::Cast, Args { a: ha, dtype: Some(to), ..Default::default() }).unwrap();
            assert_eq!(s.tensor(h).unwrap().dtype, to);
            let want: Vec<f64> = a
                .iter()
                .map(|&x| match to {
                    DType::F32 => x as f32 as f64,
                    DType::F16 => f16::from_f64(x).to_f64(),
                    DType::BF16 => bf16::from_f64(x).to_f64(),
                    DType::I32 => (x as f32 as i32).into(),
                })
                .collect();
            assert_eq!(read(&mut s, h), want, "cast {dtype:?} to {to:?}");
        }
    }
    d.shutdown();
}

#[test]
fn casts_and_argmax_follow_rusts_rules_on_special_values() {
    special_values(host());
}

/// Casts to i32 are Rust's `as` (toward zero, saturating, NaN to 0), casts from i32 round to
/// nearest, i32 to i32 is exact; argmax takes the first of equal largest elements, and nothing
/// compares greater than NaN nor NaN greater than anything. Every dtype, on both back-ends.
fn special_values(d: Arc<Dispatcher>) {
    let mut s = Session::new(d.clone(), 0, 1);
    let floats = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3e9,
        -3e9,
        2_147_483_520.0,
        -2_147_483_648.0,
        2.7,
        -2.7,
        -0.0,
        65520.0,
    ];
    for dtype in FLOATS {
        let (h, held) = upload(&mut s, &[floats.len() as u32], dtype, &floats);
        let h = run(&mut s, Op::Cast, Args { a: h, dtype: Some(DType::I32), ..Default::default() }).unwrap();
        let want: Vec<f64> = held.iter().map(|&x| (x as f32 as i32).into()).collect();
        assert_eq!(read(&mut s, h), want, "{dtype:?} to i32");
    }
    let ints = [i32::MIN, i32::MAX, 16_777_217, -16_777_217, 33_554_435, 65_519, 65_520, 123_456_789, 0, -1];
    let bytes: Vec<u8> = ints.iter().flat_map(|i| i.to_le_bytes()).collect();
    let call = s.upload_bytes(&[ints.len() as u32], DType::I32, &bytes).unwrap();
    let Done::Tensor(hi) = s.call_blocking(call, deadline()).unwrap() else { panic!("upload") };
    assert_eq!(read(&mut s, hi), ints.map(f64::from), "i32 round trip");
    for to in DType::ALL {
        let h = run(&mut s, Op::Cast, Args { a: hi, dtype: Some(to), ..Default::default() }).unwrap();
        let want: Vec<f64> = ints
            .iter()
            .map(|&x| match to {
                DType::F32 => (x as f32).into(),
                DType::F16 => f16::from_f32(x as f32).to_f64(),
                DType::BF16 => bf16::from_f32(x as f32).to_f64(),
                DType::I32 => x.into(),
            })
            .collect();
        assert_eq!(read(&mut s, h), want, "i32 to {to:?}");
    }
    let nan = f32::NAN;
    let rows = [
        [nan, 1.0, 2.0, 2.0, 0.0],
        [1.0, nan, 3.0, 3.0, 2.0],
        [f32::NEG_INFINITY; 5],
        [0.0, -0.0, 0.0, 1e-3, f32::INFINITY],
    ];
    for dtype in FLOATS {
        let (h, _) = upload(&mut s, &[4, 5], dtype, rows.as_flattened());
        let h = run(&mut s, Op::Argmax, Args { a: h, axis: -1, ..Default::default() }).unwrap();
        assert_eq!(read(&mut s, h), [0.0, 2.0, 0.0, 4.0], "argmax {dtype:?}");
    }
    drop(s);
    d.shutdown();
}

#[test]
fn streamed_ops_of_every_dtype_run_in_order_and_gather_is_waited_for() {
    streamed(host());
}

/// Sends `op` streamed: its handle comes back at once. A full ring is retried until the deadline.
fn stream(s: &mut Session, op: Op, args: Args) -> i32 {
    let mut call = s.op(op, &args).unwrap();
    assert!(call.is_streamed(), "{op:?} is streamed");
    let until = deadline();
    loop {
        match s.try_stream(call) {
            Ok(h) => return h,
            Err(c) if Instant::now() < until => call = c,
            Err(_) => panic!("the ring stayed full"),
        }
    }
}

/// A streaming session's kernels are streamed whatever their dtypes, argmax and casts to and from
/// i32 included, and run in order; gather alone is waited for, since its ids are checked by value.
/// Each result is checked against a float64 reference of the values the device holds before it.
fn streamed(d: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    let mut s = Session::new(d.clone(), 0, 1);
    s.set_streaming(true);
    for dtype in FLOATS {
        let (hx, x) = upload(&mut s, &[4, 6], dtype, &rng.vec(24));
        let (hi, _) = upload(&mut s, &[3], DType::I32, &[3.0, 0.0, 3.0]);
        let square = stream(&mut s, Op::Mul, Args { a: hx, b: hx, ..Default::default() });
        let soft = stream(&mut s, Op::Softmax, Args::new(square));
        let best = stream(&mut s, Op::Argmax, Args { a: soft, axis: -1, ..Default::default() });
        let back = stream(&mut s, Op::Cast, Args { a: best, dtype: Some(dtype), ..Default::default() });
        let call = s.op(Op::Gather, &Args { a: hx, b: hi, ..Default::default() }).unwrap();
        assert!(!call.is_streamed(), "gather is waited for");
        let Done::Tensor(rows) = s.call_blocking(call, deadline()).unwrap() else { panic!("gather") };
        let want: Vec<f64> = [3, 0, 3].iter().flat_map(|&r| x[r * 6..(r + 1) * 6].to_vec()).collect();
        assert_eq!(read(&mut s, rows), want, "gather {dtype:?}");
        let squares = read(&mut s, square);
        check(&format!("streamed mul {dtype:?}"), &squares, &x.iter().map(|v| v * v).collect::<Vec<_>>(), bound(dtype));
        let softmax: Vec<f64> = squares
            .chunks(6)
            .flat_map(|r| {
                let m = r.iter().cloned().fold(f64::MIN, f64::max);
                let t: f64 = r.iter().map(|v| (v - m).exp()).sum();
                r.iter().map(move |v| (v - m).exp() / t)
            })
            .collect();
        let probabilities = read(&mut s, soft);
        check(&format!("streamed softmax {dtype:?}"), &probabilities, &softmax, bound(dtype));
        let argmax: Vec<f64> = probabilities
            .chunks(6)
            .map(|r| (1..r.len()).fold(0, |b, k| if r[k] > r[b] { k } else { b }) as f64)
            .collect();
        assert_eq!(read(&mut s, best), argmax, "streamed argmax {dtype:?}");
        assert_eq!(read(&mut s, back), argmax, "streamed cast of argmax to {dtype:?}");
    }
    drop(s);
    d.shutdown();
}

#[test]
fn sessions_of_every_shard_run_side_by_side() {
    let config =
        DispatchConfig { backend: BackendChoice::Host, shards: 3, streams_per_device: 2, ..Default::default() };
    shards(Dispatcher::start(config).unwrap());
}

/// Sessions of every shard (two per shard, more than a shard's two CUDA streams with the third
/// session of shard 0), their requests interleaved: each runs in its own order and gets its own
/// results, on CUDA from its shard's own streams.
fn shards(d: Arc<Dispatcher>) {
    let mut rng = Rng::new();
    let mut sessions: Vec<Session> = (0..d.config.shards)
        .flat_map(|shard| [0, 1].map(|_| shard))
        .chain([0])
        .map(|shard| Session::new(d.clone(), shard, 1))
        .collect();
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    let inputs: Vec<(i32, Vec<f64>)> =
        sessions.iter_mut().enumerate().map(|(i, s)| upload(s, &[8, 32], dtypes[i % 3], &rng.vec(256))).collect();
    for s in sessions.iter_mut() {
        s.set_streaming(true);
    }
    let results: Vec<(i32, i32)> = sessions
        .iter_mut()
        .zip(&inputs)
        .map(|(s, &(h, _))| {
            let e = stream(s, Op::Exp, Args::new(h));
            (e, stream(s, Op::Sum, Args { a: e, axis: -1, ..Default::default() }))
        })
        .collect();
    for (i, (s, ((_, x), &(e, sum)))) in sessions.iter_mut().zip(inputs.iter().zip(&results)).enumerate() {
        let dtype = dtypes[i % 3];
        let exps = read(s, e);
        check(&format!("exp, session {i}"), &exps, &x.iter().map(|v| v.exp()).collect::<Vec<_>>(), bound(dtype));
        let want: Vec<f64> = exps.chunks(32).map(|r| r.iter().sum()).collect();
        check(&format!("sum, session {i}"), &read(s, sum), &want, bound(dtype));
    }
    drop(sessions);
    d.shutdown();
}

#[test]
fn malformed_calls_get_their_own_status_and_never_reach_the_device() {
    let d = host();
    let mut s = Session::new(d.clone(), 0, 1);
    let (f, _) = upload(&mut s, &[2, 3], DType::F32, &[1.0; 6]);
    let (g, _) = upload(&mut s, &[2, 3], DType::BF16, &[1.0; 6]);
    let (ids, _) = upload(&mut s, &[2], DType::I32, &[0.0, 1.0]);
    let two = |a, b| Args { a, b, ..Default::default() };
    // Dtypes: no implicit promotion, no arithmetic on indices, ids must be i32.
    assert_eq!(run(&mut s, Op::Add, two(f, g)), Err(status::DTYPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Relu, Args::new(ids)), Err(status::DTYPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Matmul, two(ids, ids)), Err(status::DTYPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Gather, two(f, f)), Err(status::DTYPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Cast, Args::new(f)), Err(status::UNSUPPORTED_DTYPE), "a cast needs a target");
    // Shapes.
    let (h3, _) = upload(&mut s, &[3, 2], DType::F32, &[1.0; 6]);
    let (h2, _) = upload(&mut s, &[2], DType::F32, &[1.0; 2]);
    assert_eq!(run(&mut s, Op::Sub, two(f, h2)), Err(status::SHAPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Matmul, two(f, f)), Err(status::SHAPE_MISMATCH));
    assert_eq!(
        run(&mut s, Op::Matmul, Args { a: f, b: h3, transpose_b: true, ..Default::default() }),
        Err(status::SHAPE_MISMATCH)
    );
    assert_eq!(run(&mut s, Op::Matmul, two(h2, h2)), Err(status::SHAPE_MISMATCH), "matmul needs rank 2");
    assert_eq!(run(&mut s, Op::Concat, two(f, h3)), Err(status::SHAPE_MISMATCH));
    assert_eq!(
        run(&mut s, Op::LayerNorm, Args { a: f, b: h2, eps: 1e-5, ..Default::default() }),
        Err(status::SHAPE_MISMATCH)
    );
    assert_eq!(
        run(&mut s, Op::LayerNorm, Args { a: f, eps: f32::NAN, ..Default::default() }),
        Err(status::INVALID_ARGUMENT)
    );
    // Axes.
    assert_eq!(run(&mut s, Op::Sum, Args { a: f, axis: 2, ..Default::default() }), Err(status::INVALID_AXIS));
    assert_eq!(run(&mut s, Op::Max, Args { a: f, axis: -3, ..Default::default() }), Err(status::INVALID_AXIS));
    let perm = |p: [u8; 4], n| Args { a: f, perm: p, perm_len: n, ..Default::default() };
    assert_eq!(run(&mut s, Op::Permute, perm([0, 0, 0, 0], 2)), Err(status::INVALID_AXIS));
    assert_eq!(run(&mut s, Op::Permute, perm([1, 0, 2, 0], 3)), Err(status::INVALID_AXIS), "rank 3 for rank 2");
    assert_eq!(run(&mut s, Op::Permute, perm([2, 0, 0, 0], 2)), Err(status::INVALID_AXIS));
    // Ranges: slices past the axis, and gather ids outside the table (known only to the device).
    let slice = |start, len| Args { a: f, axis: 1, start, len, ..Default::default() };
    assert_eq!(run(&mut s, Op::Slice, slice(2, 2)), Err(status::INDEX_OUT_OF_RANGE));
    assert_eq!(run(&mut s, Op::Slice, slice(0, 0)), Err(status::INDEX_OUT_OF_RANGE));
    assert_eq!(run(&mut s, Op::Slice, slice(u32::MAX, 2)), Err(status::INDEX_OUT_OF_RANGE));
    for bad in [-1.0f32, 2.0] {
        let (hi, _) = upload(&mut s, &[3], DType::I32, &[0.0, bad, 1.0]);
        assert_eq!(run(&mut s, Op::Gather, two(f, hi)), Err(status::INDEX_OUT_OF_RANGE), "id {bad}");
    }
    // Ranks and sizes.
    assert_eq!(s.upload_bytes(&[1; MAX_RANK + 1], DType::F32, &[0; 4]).err(), Some(status::INVALID_ARGUMENT));
    assert_eq!(s.reshape(f, &[1, 1, 1, 2, 3]), Err(status::INVALID_ARGUMENT));
    let (big_ids, _) = upload(&mut s, &[1, 1, 2], DType::I32, &[0.0, 1.0]);
    assert!(run(&mut s, Op::Gather, two(f, big_ids)).is_ok(), "[1, 1, 2] ids of [2, 3] rows: rank 4");
    let (table4, _) = upload(&mut s, &[2, 1, 1, 3], DType::F32, &[1.0; 6]);
    assert!(run(&mut s, Op::Gather, two(table4, ids)).is_ok(), "[2] ids of [1, 1, 3] rows: rank 4");
    let (ids2, _) = upload(&mut s, &[1, 2], DType::I32, &[0.0, 1.0]);
    assert_eq!(run(&mut s, Op::Gather, two(table4, ids2)), Err(status::INVALID_ARGUMENT), "rank 5 out");
    assert_eq!(s.upload_bytes(&[u32::MAX; 4], DType::F32, &[]).err(), Some(status::INVALID_ARGUMENT), "overflow");
    assert_eq!(s.upload_bytes(&[65536, 65536], DType::BF16, &[]).err(), Some(status::INVALID_ARGUMENT), "too large");
    assert_eq!(s.upload_bytes(&[3], DType::F16, &[0; 4]).err(), Some(status::SHAPE_MISMATCH), "3 f16 are 6 bytes");
    // Handles.
    assert_eq!(run(&mut s, Op::Add, two(f, 99)), Err(status::BAD_HANDLE));
    assert_eq!(run(&mut s, Op::LayerNorm, Args { a: f, c: 99, ..Default::default() }), Err(status::BAD_HANDLE));
    assert_eq!(s.op(Op::Upload, &Args::new(f)).err(), Some(status::INVALID_ARGUMENT));
    // Nothing above leaked a ticket, and the session still works.
    assert_eq!(read(&mut s, f), vec![1.0; 6]);
    drop(s);
    d.shutdown();
}

#[test]
fn the_quota_counts_bytes_by_dtype_and_views_count_once() {
    let d = Dispatcher::start(DispatchConfig {
        backend: BackendChoice::Host,
        tenant_quota_bytes: 4096,
        ..Default::default()
    })
    .unwrap();
    let mut s = Session::new(d.clone(), 0, 5);
    let (h, _) = upload(&mut s, &[1024], DType::BF16, &[1.0; 1024]); // 2 KiB
    assert_eq!(d.quotas.snapshot(), vec![(5, 2048, 0)]);
    let cast = |to| Args { a: h, dtype: Some(to), ..Default::default() };
    assert_eq!(s.op(Op::Cast, &cast(DType::F32)).err(), Some(status::QUOTA_EXCEEDED), "4 KiB more");
    let v = s.reshape(h, &[32, 32]).unwrap();
    assert_eq!(d.quotas.snapshot(), vec![(5, 2048, 1)], "a view takes no quota");
    let half = run(&mut s, Op::Cast, cast(DType::F16)).unwrap();
    assert_eq!(d.quotas.snapshot(), vec![(5, 4096, 1)]);
    // Freeing the original keeps the memory while the view names it.
    s.free(h).unwrap();
    assert_eq!(d.quotas.snapshot(), vec![(5, 4096, 1)]);
    assert_eq!(read(&mut s, v), vec![1.0; 1024]);
    s.free(v).unwrap();
    assert_eq!(d.quotas.snapshot(), vec![(5, 2048, 1)]);
    s.free(half).unwrap();
    assert_eq!(d.quotas.snapshot(), vec![(5, 0, 1)]);
    let until = Instant::now() + Duration::from_secs(5);
    while d.devices[0].memory_used() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.devices[0].memory_used(), 0, "the device freed every byte it counted");
    drop(s);
    d.shutdown();
}

/// CUDA runs every general op on every dtype, as the host back-end does: the same cases, with
/// the same float64 checks and bounds, streamed as there (all but gather), and refused only where
/// the host refuses. Runs where a GPU is; `TENSOR_WASM_REQUIRE_CUDA=1` makes a missing one a
/// failure.
#[test]
fn cuda_runs_every_general_op_in_every_dtype_as_the_host_does() {
    let required = std::env::var("TENSOR_WASM_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let cuda = || Dispatcher::start(DispatchConfig { backend: BackendChoice::Cuda, ..Default::default() });
    let d = match cuda() {
        Ok(d) => d,
        Err(e) if required => panic!("TENSOR_WASM_REQUIRE_CUDA=1 but {e}"),
        Err(e) => return eprintln!("SKIPPED: needs a GPU: {e}"),
    };
    let mut s = Session::new(d.clone(), 0, 1);
    let mut rng = Rng::new();
    for dtype in DType::ALL {
        let (h, held) = upload(&mut s, &[2, 3], dtype, &rng.vec(6));
        assert_eq!(read(&mut s, h), held, "{dtype:?} round trip");
    }
    // Arithmetic on indices is refused as on the host, before the device is asked.
    let (ids, _) = upload(&mut s, &[2], DType::I32, &[0.0, 1.0]);
    let two = |a, b| Args { a, b, ..Default::default() };
    assert_eq!(run(&mut s, Op::Relu, Args::new(ids)), Err(status::DTYPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Add, two(ids, ids)), Err(status::DTYPE_MISMATCH));
    assert_eq!(run(&mut s, Op::Matmul, two(ids, ids)), Err(status::DTYPE_MISMATCH));
    // Views need no device.
    let (f, _) = upload(&mut s, &[2, 3], DType::F32, &[1.0; 6]);
    let v = s.reshape(f, &[6]).unwrap();
    assert_eq!(read(&mut s, v), vec![1.0; 6]);
    drop(s);
    d.shutdown();
    binary_ops(cuda().unwrap());
    unary_ops(cuda().unwrap());
    reductions(cuda().unwrap());
    softmax_and_norms(cuda().unwrap());
    batched_matmul(cuda().unwrap());
    data_movement(cuda().unwrap());
    special_values(cuda().unwrap());
    streamed(cuda().unwrap());
    let config =
        DispatchConfig { backend: BackendChoice::Cuda, shards: 3, streams_per_device: 2, ..Default::default() };
    shards(Dispatcher::start(config).unwrap());
}

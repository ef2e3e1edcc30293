//! The CUDA back-end, through cudarc with dynamic loading: the binary builds and starts where no
//! CUDA is installed, and this module is only entered after probing for the driver library,
//! because cudarc panics on first use when it is missing.
//!
//! The kernels ([`KERNEL_SOURCE`]: every op on every dtype it takes, as the host back-end runs
//! them) are compiled with NVRTC at start-up for the device's own architecture; matmul goes through
//! cuBLAS. Each shard has streams of its own on the device (`--gpu-streams`), and each session runs
//! on one of its shard's (an idle one first); an event recorded after each request tells the worker
//! when it finished, so requests of different invocations overlap on the device, and one shard's
//! queue never sits in front of another's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use zerocopy::IntoBytes;

use super::{descriptor, shape_of, staging, Backend, BackendKind, Finished, Submitted};
use crate::record::{flags, status, DType, Desc, Op, Request, MAX_RANK, RELEASE_SHARED, SLOT_A, SLOT_B, SLOT_C};
use crate::shape::{self, broadcast_strides, contiguous_strides, walk, Dims};

/// The kernels, in CUDA C. Public so that benchmarks launch exactly these. NVRTC compiles them
/// without any header, so they use no macro that headers define (`INFINITY` is undefined there).
pub const KERNEL_SOURCE: &str = r#"
// The original short requests' kernels, f32 only: the fast path of f32 operands of one shape, kept
// apart from the general form's so that it costs what it always did.
extern "C" __global__ void tw_add(const float* a, const float* b, float* out, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}
extern "C" __global__ void tw_mul(const float* a, const float* b, float* out, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] * b[i];
}
extern "C" __global__ void tw_scale(const float* a, float s, float* out, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] * s;
}
extern "C" __global__ void tw_relu(const float* a, float* out, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = fmaxf(a[i], 0.0f);
}
// One block of 256 threads per row.
extern "C" __global__ void tw_softmax(const float* x, float* out, unsigned rows, unsigned cols) {
    __shared__ float buf[256];
    unsigned r = blockIdx.x;
    if (r >= rows) return;
    const float* row = x + (unsigned long long)r * cols;
    float* o = out + (unsigned long long)r * cols;
    float m = __int_as_float(0xff800000); // -inf
    for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, row[c]);
    buf[threadIdx.x] = m;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] = fmaxf(buf[threadIdx.x], buf[threadIdx.x + s]);
        __syncthreads();
    }
    m = buf[0];
    __syncthreads();
    float sum = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) sum += expf(row[c] - m);
    buf[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    sum = buf[0];
    for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) o[c] = expf(row[c] - m) / sum;
}
// One block of 1024 threads, accumulating in double like the host back-end.
extern "C" __global__ void tw_sum(const float* x, float* out, unsigned n) {
    __shared__ double buf[1024];
    double acc = 0.0;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = (float)buf[0];
}
// Elements of any dtype, by code: f32 (0), f16 (1), bf16 (2), i32 (3). `tw_load` reads one as f32
// and `tw_store` rounds an f32 to the dtype, as the host back-end converts (the `half` crate and
// Rust's `as`): f16 by the PTX conversion and bf16 by its bits (NaN kept quiet), both to nearest
// even; i32 to f32 to nearest, f32 to i32 toward zero.
__device__ float tw_load(const void* p, unsigned long long i, int dt) {
    if (dt == 0) return ((const float*)p)[i];
    if (dt == 3) return __int2float_rn(((const int*)p)[i]);
    unsigned short h = ((const unsigned short*)p)[i];
    if (dt == 2) return __uint_as_float(((unsigned)h) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ void tw_store(void* p, unsigned long long i, int dt, float x) {
    if (dt == 0) { ((float*)p)[i] = x; return; }
    if (dt == 3) {
        // Rust's `as`: saturating, NaN to 0. cvt.rzi.s32.f32 (__float2int_rz) saturates too; the
        // bounds are spelled out so that the result rests on nothing but this code.
        int v;
        if (x != x) v = 0;
        else if (x >= 2147483648.0f) v = 2147483647;
        else if (x <= -2147483648.0f) v = -2147483647 - 1;
        else v = __float2int_rz(x);
        ((int*)p)[i] = v;
        return;
    }
    unsigned short h;
    if (dt == 2) {
        unsigned u = __float_as_uint(x);
        if ((u & 0x7fffffffu) > 0x7f800000u) h = (unsigned short)((u >> 16) | 0x40u);
        else h = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    }
    ((unsigned short*)p)[i] = h;
}
// Element j of `a` to element i of `out`, by its size in bytes (4 or 2): the data-movement
// kernels copy bits and never convert, so they serve every dtype alike.
__device__ void tw_copy(void* out, unsigned long long i, const void* a, unsigned long long j, int size) {
    if (size == 4) ((unsigned*)out)[i] = ((const unsigned*)a)[j];
    else ((unsigned short*)out)[i] = ((const unsigned short*)a)[j];
}
// The general form's arithmetic, on any float dtype `dt` (f32 0, f16 1, bf16 2): each element
// is read as f32 (`tw_load`), computed in f32 (sums and statistics in double), and rounded to the
// dtype once, on store (`tw_store`), as the host back-end does. `op` is the Rust `Op` code; an
// unknown one writes NaN, so that a mismatch between the two sides shows instead of passing as
// another op.
extern "C" __global__ void tw_unary(const void* a, void* out, unsigned n, int op, float s, int dt) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = tw_load(a, i, dt), y;
    switch (op) {
        case 7: y = x * s; break;                                   // scale
        case 8: y = fmaxf(x, 0.0f); break;                          // relu
        case 15: y = 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x))); break; // gelu
        case 16: y = x / (1.0f + expf(-x)); break;                  // silu
        case 17: y = expf(x); break;
        case 18: y = tanhf(x); break;
        case 19: y = sqrtf(x); break;
        case 20: y = 1.0f / sqrtf(x); break;                        // rsqrt, correctly rounded
        case 21: y = -x; break;
        default: y = __int_as_float(0x7fc00000);
    }
    tw_store(out, i, dt, y);
}
// Element-wise with broadcasting: the output padded to 4 dims d0..d3, each input read with its
// strides (0 on a broadcast axis).
extern "C" __global__ void tw_binary(const void* a, const void* b, void* out, unsigned n, int op,
        unsigned d0, unsigned d1, unsigned d2, unsigned d3,
        unsigned a0, unsigned a1, unsigned a2, unsigned a3,
        unsigned b0, unsigned b1, unsigned b2, unsigned b3, int dt) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned r = i;
    unsigned i3 = r % d3; r /= d3;
    unsigned i2 = r % d2; r /= d2;
    unsigned i1 = r % d1;
    unsigned i0 = r / d1;
    (void)d0;
    unsigned long long oa = (unsigned long long)i0 * a0 + (unsigned long long)i1 * a1 + (unsigned long long)i2 * a2 + (unsigned long long)i3 * a3;
    unsigned long long ob = (unsigned long long)i0 * b0 + (unsigned long long)i1 * b1 + (unsigned long long)i2 * b2 + (unsigned long long)i3 * b3;
    float x = tw_load(a, oa, dt), y = tw_load(b, ob, dt), z;
    switch (op) {
        case 5: z = x + y; break;
        case 6: z = x * y; break;
        case 12: z = x - y; break;
        case 13: z = x / y; break;
        case 14: z = fmaxf(x, y); break;
        default: z = __int_as_float(0x7fc00000);
    }
    tw_store(out, i, dt, z);
}
// out[i] = a[base + Σ index_k · stride_k] over an output of 4 dims: permute, slice and copies,
// of elements of `size` bytes.
extern "C" __global__ void tw_strided(const void* a, void* out, unsigned n,
        unsigned d0, unsigned d1, unsigned d2, unsigned d3,
        unsigned s0, unsigned s1, unsigned s2, unsigned s3, unsigned long long base, int size) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned r = i;
    unsigned i3 = r % d3; r /= d3;
    unsigned i2 = r % d2; r /= d2;
    unsigned i1 = r % d1;
    unsigned i0 = r / d1;
    (void)d0;
    tw_copy(out, i, a, base + (unsigned long long)i0 * s0 + (unsigned long long)i1 * s1 + (unsigned long long)i2 * s2 + (unsigned long long)i3 * s3, size);
}
// One thread per output element: sum (11), mean (22) or max (23) along an axis of length n,
// between `outer` and `inner` elements. Sums in double, like the host back-end, rounded to f32
// and then to the dtype, as there.
extern "C" __global__ void tw_reduce(const void* a, void* out, unsigned outer, unsigned n, unsigned inner, int op, int dt) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if ((unsigned long long)i >= (unsigned long long)outer * inner) return;
    unsigned o = i / inner, j = i % inner;
    unsigned long long p = (unsigned long long)o * n * inner + j;
    if (op == 23) {
        float m = __int_as_float(0xff800000);
        for (unsigned k = 0; k < n; k++) m = fmaxf(m, tw_load(a, p + (unsigned long long)k * inner, dt));
        tw_store(out, i, dt, m);
        return;
    }
    double s = 0.0;
    for (unsigned k = 0; k < n; k++) s += tw_load(a, p + (unsigned long long)k * inner, dt);
    if (op == 22) s /= n;
    tw_store(out, i, dt, (op == 11 || op == 22) ? (float)s : __int_as_float(0x7fc00000));
}
// Softmax (log = 0) or log-softmax (log = 1) of each row, one block of 256 threads per row, as the
// host back-end's general form computes them: the row's max in f32, Σ exp(x - max) in double, then
// exp(x - max) / Σ, or x - max - log(Σ), each rounded to f32 and then to the dtype.
extern "C" __global__ void tw_softmax_rows(const void* x, void* out, unsigned rows, unsigned cols, int log_, int dt) {
    __shared__ float top[256];
    __shared__ double total[256];
    unsigned r = blockIdx.x;
    if (r >= rows) return;
    unsigned long long row = (unsigned long long)r * cols;
    float m = __int_as_float(0xff800000); // -inf
    for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, tw_load(x, row + c, dt));
    top[threadIdx.x] = m;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) top[threadIdx.x] = fmaxf(top[threadIdx.x], top[threadIdx.x + s]);
        __syncthreads();
    }
    m = top[0];
    double sum = 0.0;
    for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) sum += exp((double)(tw_load(x, row + c, dt) - m));
    total[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) total[threadIdx.x] += total[threadIdx.x + s];
        __syncthreads();
    }
    sum = total[0];
    double lse = log(sum);
    for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) {
        double d = (double)(tw_load(x, row + c, dt) - m);
        tw_store(out, row + c, dt, (float)(log_ ? d - lse : exp(d) / sum));
    }
}
// Layer norm (layer = 1) or RMS norm of each row, one thread per row, statistics in double.
// `w` and `b` are read only where has_w and has_b say they are present; x, w, b and the output
// share the dtype `dt`.
extern "C" __global__ void tw_norm(const void* x, const void* w, const void* b, void* out, unsigned rows,
        unsigned cols, float eps, int layer, int has_w, int has_b, int dt) {
    unsigned r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    unsigned long long row = (unsigned long long)r * cols;
    double mean = 0.0;
    if (layer) {
        for (unsigned c = 0; c < cols; c++) mean += tw_load(x, row + c, dt);
        mean /= cols;
    }
    double var = 0.0;
    for (unsigned c = 0; c < cols; c++) { double d = tw_load(x, row + c, dt) - mean; var += d * d; }
    var /= cols;
    double inv = 1.0 / sqrt(var + (double)eps);
    for (unsigned c = 0; c < cols; c++) {
        double y = (tw_load(x, row + c, dt) - mean) * inv;
        if (has_w) y *= tw_load(w, c, dt);
        if (has_b) y += tw_load(b, c, dt);
        tw_store(out, row + c, dt, (float)y);
    }
}
// Concatenation along an axis: `outer` blocks of `ia` elements of a, then `ib` of b, of `size`
// bytes each.
extern "C" __global__ void tw_concat(const void* a, const void* b, void* out, unsigned outer, unsigned ia, unsigned ib,
        int size) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long w = (unsigned long long)ia + ib;
    if ((unsigned long long)i >= (unsigned long long)outer * w) return;
    unsigned long long o = i / w, r = i % w;
    if (r < ia) tw_copy(out, i, a, o * ia + r, size);
    else tw_copy(out, i, b, o * ib + (r - ia), size);
}
// Gather: out[i] is element i % row of the table's row ids[i / row], of `size` bytes. The worker
// has checked every id against `rows` before the launch; an id outside them would write zero
// bits here rather than read past the table.
extern "C" __global__ void tw_gather(const void* table, const int* ids, void* out, unsigned n, unsigned row,
        unsigned rows, int size) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int id = ids[i / row];
    if (id < 0 || (unsigned)id >= rows) {
        if (size == 4) ((unsigned*)out)[i] = 0u;
        else ((unsigned short*)out)[i] = (unsigned short)0;
        return;
    }
    tw_copy(out, i, table, (unsigned long long)id * row + i % row, size);
}
// Argmax along an axis of length n, between `outer` and `inner` elements, of a float dtype `dt`:
// one thread per output element, the first index of the largest, NaN never larger (a NaN first
// element stays the answer, as on the host: nothing compares greater than it).
extern "C" __global__ void tw_argmax(const void* a, int* out, unsigned outer, unsigned n, unsigned inner, int dt) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if ((unsigned long long)i >= (unsigned long long)outer * inner) return;
    unsigned o = i / inner, j = i % inner;
    unsigned long long p = (unsigned long long)o * n * inner + j;
    unsigned best = 0;
    float top = tw_load(a, p, dt);
    for (unsigned k = 1; k < n; k++) {
        float v = tw_load(a, p + (unsigned long long)k * inner, dt);
        if (v > top) { best = k; top = v; }
    }
    out[i] = (int)best;
}
// Casts between any two dtypes, through f32 as on the host back-end, but for i32 to i32: a copy
// on both (through f32 it would round above 2^24).
extern "C" __global__ void tw_cast(const void* a, void* out, unsigned n, int from, int to) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (from == 3 && to == 3) ((int*)out)[i] = ((const int*)a)[i];
    else tw_store(out, i, to, tw_load(a, i, from));
}
// The device's FP32 peak, for benchmarks: eight independent FMA chains per thread.
extern "C" __global__ void tw_fma_peak(float* out, unsigned iters) {
    float a0 = threadIdx.x, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5, a6 = a0 + 6, a7 = a0 + 7;
    const float m = 0.999999f, c = 1e-7f;
    for (unsigned i = 0; i < iters; i++) {
        a0 = fmaf(a0, m, c); a1 = fmaf(a1, m, c); a2 = fmaf(a2, m, c); a3 = fmaf(a3, m, c);
        a4 = fmaf(a4, m, c); a5 = fmaf(a5, m, c); a6 = fmaf(a6, m, c); a7 = fmaf(a7, m, c);
    }
    float r = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    if (r == 12345.678f) out[0] = r;
}
"#;

/// Whether the NVIDIA driver library can be loaded. Never touch cudarc's driver API without it.
pub fn driver_present() -> bool {
    // SAFETY: probing tries `dlopen` on the library's names and nothing more.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Compiles [`KERNEL_SOURCE`] to PTX for compute capability `major.minor`. Needs NVRTC only, not a
/// device.
pub fn compile_ptx(major: i32, minor: i32) -> Result<cudarc::nvrtc::Ptx, String> {
    // SAFETY: as above, a probe.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc was not found: install the CUDA toolkit's NVRTC".into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        // No multiply-add contraction: each product and sum is rounded as the host back-end rounds
        // it, so that the two agree to the bit where the ops are exact (casts, copies) and to the
        // last bit of the formula elsewhere (gelu, the norms' variance and affine step).
        fmad: Some(false),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts).map_err(|e| format!("NVRTC: {e:?}"))
}

/// Compiles [`KERNEL_SOURCE`] for the context's device and loads it.
pub fn compile(ctx: &Arc<CudaContext>) -> Result<Arc<cudarc::driver::CudaModule>, String> {
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("compute capability: {e}"))?;
    let ptx = compile_ptx(major, minor)?;
    ctx.load_module(ptx).map_err(|e| format!("loading the kernels: {e}"))
}

/// Streams one device holds in all, unless there are more shards than this: every shard always
/// gets one of its own. Each stream has a cuBLAS handle of its own, made at start-up, and each
/// handle holds device memory (cuBLAS's workspace among it: NVIDIA's guide recommends 32 MiB per
/// handle on Hopper, 4 MiB before), so `--gpu-streams` per shard cannot multiply without bound on
/// a host with many shards: 64 shards × 4 streams would be 256 handles. 64 keeps the default of 4
/// per shard whole up to 16 shards.
pub const MAX_STREAMS_PER_DEVICE: usize = 64;

/// Streams each shard gets on a device: `streams` (`--gpu-streams`), fewer where `shards` ×
/// `streams` would pass [`MAX_STREAMS_PER_DEVICE`], and never none.
pub fn streams_per_shard(shards: usize, streams: usize) -> usize {
    streams.min(MAX_STREAMS_PER_DEVICE / shards.max(1)).max(1)
}

/// Shard `shard`'s lanes, when each shard has `per_shard` of them: its own range of the device's.
fn shard_lanes(shard: usize, per_shard: usize) -> std::ops::Range<usize> {
    shard * per_shard..(shard + 1) * per_shard
}

/// Opens every visible device (CUDA_VISIBLE_DEVICES applies, as the driver reads it), each with
/// its own streams for every one of `shards` shards ([`streams_per_shard`]).
pub fn open_all(shards: usize, streams: usize) -> Result<Vec<Box<dyn Backend>>, String> {
    if !driver_present() {
        return Err("libcuda was not found: no NVIDIA driver on this host".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("libcublas was not found: install the CUDA toolkit's cuBLAS".into());
    }
    let count = CudaContext::device_count().map_err(|e| format!("cuInit or device count: {e}"))?;
    if count <= 0 {
        return Err("the driver sees no CUDA device (check CUDA_VISIBLE_DEVICES)".into());
    }
    (0..count as usize)
        .map(|ordinal| CudaBackend::open(ordinal, shards, streams).map(|b| Box::new(b) as Box<dyn Backend>))
        .collect()
}

struct Kernels {
    add: CudaFunction,
    mul: CudaFunction,
    scale: CudaFunction,
    relu: CudaFunction,
    softmax: CudaFunction,
    sum: CudaFunction,
    unary: CudaFunction,
    binary: CudaFunction,
    strided: CudaFunction,
    reduce: CudaFunction,
    softmax_rows: CudaFunction,
    norm: CudaFunction,
    concat: CudaFunction,
    gather: CudaFunction,
    argmax: CudaFunction,
    cast: CudaFunction,
}

/// Every kernel in [`KERNEL_SOURCE`], for the NVRTC test.
pub const KERNEL_NAMES: [&str; 17] = [
    "tw_cast",
    "tw_add",
    "tw_mul",
    "tw_scale",
    "tw_relu",
    "tw_softmax",
    "tw_sum",
    "tw_unary",
    "tw_binary",
    "tw_strided",
    "tw_reduce",
    "tw_softmax_rows",
    "tw_norm",
    "tw_concat",
    "tw_gather",
    "tw_argmax",
    "tw_fma_peak",
];

/// A tensor on the device, in its dtype: f16 and bf16 as their bits, which is all that kernels
/// and cuBLAS see of them.
enum DevBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
    BF16(CudaSlice<u16>),
    I32(CudaSlice<i32>),
}

impl DevBuf {
    fn len(&self) -> usize {
        match self {
            DevBuf::F32(s) => s.len(),
            DevBuf::F16(s) => s.len(),
            DevBuf::BF16(s) => s.len(),
            DevBuf::I32(s) => s.len(),
        }
    }

    fn num_bytes(&self) -> usize {
        match self {
            DevBuf::F32(s) => s.num_bytes(),
            DevBuf::F16(s) => s.num_bytes(),
            DevBuf::BF16(s) => s.num_bytes(),
            DevBuf::I32(s) => s.num_bytes(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            DevBuf::F32(_) => DType::F32,
            DevBuf::F16(_) => DType::F16,
            DevBuf::BF16(_) => DType::BF16,
            DevBuf::I32(_) => DType::I32,
        }
    }

    /// The device address, for kernels that take any dtype; the guard goes after the launch.
    fn ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match self {
            DevBuf::F32(s) => s.device_ptr(stream),
            DevBuf::F16(s) => s.device_ptr(stream),
            DevBuf::BF16(s) => s.device_ptr(stream),
            DevBuf::I32(s) => s.device_ptr(stream),
        }
    }

    /// A new tensor of `len` elements of `dtype`.
    ///
    /// # Safety
    /// Its memory is unset: the caller's launch must write every element before anyone reads it.
    unsafe fn alloc(stream: &Arc<CudaStream>, dtype: DType, len: usize) -> Result<DevBuf, i32> {
        let dev = |_| status::DEVICE_ERROR;
        Ok(match dtype {
            DType::F32 => DevBuf::F32(stream.alloc::<f32>(len).map_err(dev)?),
            DType::F16 => DevBuf::F16(stream.alloc::<u16>(len).map_err(dev)?),
            DType::BF16 => DevBuf::BF16(stream.alloc::<u16>(len).map_err(dev)?),
            DType::I32 => DevBuf::I32(stream.alloc::<i32>(len).map_err(dev)?),
        })
    }
}

struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Requests on this stream not yet reported.
    pending: usize,
}

struct InFlight {
    req: Request,
    started: Instant,
    lane: usize,
    event: CudaEvent,
}

pub struct CudaBackend {
    ordinal: usize,
    name: String,
    ctx: Arc<CudaContext>,
    /// Every shard's lanes, shard by shard: shard s has `shard_lanes(s, per_shard)`.
    lanes: Vec<Lane>,
    /// Shards the lanes are split among, and lanes each has.
    shards: usize,
    per_shard: usize,
    /// Per shard: its lane (counted within its own) last given out when none was idle.
    next_lane: Vec<usize>,
    kernels: Kernels,
    tensors: HashMap<u64, DevBuf>,
    sessions: HashMap<u64, Vec<u64>>,
    /// Each session's lane, from its first request to its release: a session's requests run in
    /// the order they were sent, which streamed kernels rely on, so they share one stream.
    session_lanes: HashMap<u64, usize>,
    in_flight: Vec<InFlight>,
    spare_events: Vec<CudaEvent>,
    used_bytes: u64,
}

impl CudaBackend {
    /// Opens device `ordinal` with `streams` (`--gpu-streams`) lanes for each of `shards` shards,
    /// fewer where the device's cap says so ([`streams_per_shard`]).
    pub fn open(ordinal: usize, shards: usize, streams: usize) -> Result<CudaBackend, String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("device {ordinal}: {e}"))?;
        // Ordering is ours: a session's requests share one stream (`lane_for`), so its streamed
        // kernels run in order; frees wait for the requests that use the tensor; a function's
        // resident weights are uploaded and complete before any other session reads them, and
        // their release waits for everything in flight. cudarc's per-buffer events would only
        // add cost.
        // SAFETY: no buffer is written on one stream while a request on another reads it.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let module = compile(&ctx)?;
        let f = |n: &str| module.load_function(n).map_err(|e| format!("kernel {n}: {e}"));
        let kernels = Kernels {
            add: f("tw_add")?,
            mul: f("tw_mul")?,
            scale: f("tw_scale")?,
            relu: f("tw_relu")?,
            softmax: f("tw_softmax")?,
            sum: f("tw_sum")?,
            unary: f("tw_unary")?,
            binary: f("tw_binary")?,
            strided: f("tw_strided")?,
            reduce: f("tw_reduce")?,
            softmax_rows: f("tw_softmax_rows")?,
            norm: f("tw_norm")?,
            concat: f("tw_concat")?,
            gather: f("tw_gather")?,
            argmax: f("tw_argmax")?,
            cast: f("tw_cast")?,
        };
        let shards = shards.max(1);
        let per_shard = streams_per_shard(shards, streams);
        let lanes = (0..shards * per_shard)
            .map(|_| {
                let stream = ctx.new_stream().map_err(|e| format!("stream: {e}"))?;
                let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))?;
                // f16 and bf16 GEMMs accumulate in f32 (`CUBLAS_COMPUTE_32F`), and without this
                // cuBLAS may still reduce split-K partial sums in the output's 16-bit type.
                use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
                let mode = cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
                // SAFETY: the handle was just made and is live; the call only sets its mode.
                match unsafe { cublasSetMathMode(*blas.handle(), mode) } {
                    cublasStatus_t::CUBLAS_STATUS_SUCCESS => {}
                    e => return Err(format!("cuBLAS math mode: {e:?}")),
                }
                Ok(Lane { stream, blas, pending: 0 })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(CudaBackend {
            ordinal,
            name,
            ctx,
            lanes,
            shards,
            per_shard,
            next_lane: vec![0; shards],
            kernels,
            tensors: HashMap::new(),
            sessions: HashMap::new(),
            session_lanes: HashMap::new(),
            in_flight: Vec::new(),
            spare_events: Vec::new(),
            used_bytes: 0,
        })
    }

    /// The session's lane: chosen at its first request among its shard's own lanes (an idle one
    /// if there is one, else the shard's next in turn), then kept until its release. A shard's
    /// sessions never queue on another shard's streams, so one shard's backlog cannot sit in front
    /// of another shard's requests.
    fn lane_for(&mut self, session: u64, shard: u16) -> usize {
        if let Some(&lane) = self.session_lanes.get(&session) {
            return lane;
        }
        // A request's shard is below the count the back-end was opened with (one ring each); the
        // modulo only keeps a wrong number inside the table.
        let shard = usize::from(shard) % self.shards;
        let own = shard_lanes(shard, self.per_shard);
        let lane = match self.lanes[own.clone()].iter().position(|l| l.pending == 0) {
            Some(i) => own.start + i,
            None => {
                let next = &mut self.next_lane[shard];
                *next = (*next + 1) % self.per_shard;
                own.start + *next
            }
        };
        self.session_lanes.insert(session, lane);
        lane
    }

    /// Waits for the in-flight requests that `matches` picks (a released session's; all of them
    /// for a shared release), so that a release never races a kernel on another lane. Only an
    /// invocation cut off mid-request, or resident weights, get here with work in flight.
    fn settle(&mut self, matches: impl Fn(&Request) -> bool) {
        for f in self.in_flight.iter().filter(|f| matches(&f.req)) {
            let _ = f.event.synchronize();
        }
    }

    fn drop_tensor(&mut self, id: u64) {
        if let Some(buf) = self.tensors.remove(&id) {
            self.used_bytes -= buf.num_bytes() as u64;
        }
    }

    /// An f32 operand of `len` elements, for the original short requests (checked in the host
    /// back-end's order: dtype, then length).
    fn operand(&self, id: u64, len: usize) -> Result<&CudaSlice<f32>, i32> {
        match self.tensors.get(&id).ok_or(status::BAD_HANDLE)? {
            DevBuf::F32(t) if t.len() == len => Ok(t),
            DevBuf::F32(_) => Err(status::SHAPE_MISMATCH),
            _ => Err(status::DTYPE_MISMATCH),
        }
    }

    /// Operand `slot` of a general request: it must have the dtype and element count the
    /// descriptor gives it, checked in the host back-end's order, or nothing is read.
    fn typed(&self, id: u64, d: &Desc, slot: usize) -> Result<&DevBuf, i32> {
        let t = self.tensors.get(&id).ok_or(status::BAD_HANDLE)?;
        if Some(t.dtype()) != d.dtype(slot) {
            return Err(status::DTYPE_MISMATCH);
        }
        if t.len() as u64 != shape::elements(d.shape(slot))? {
            return Err(status::SHAPE_MISMATCH);
        }
        Ok(t)
    }

    /// Enqueues `req` on `lane`. Returns the tensor it creates, if any.
    fn enqueue(&mut self, op: Op, req: &Request, lane: usize) -> Result<Option<DevBuf>, i32> {
        let stream = self.lanes[lane].stream.clone();
        let dev = |_| status::DEVICE_ERROR;
        match op {
            Op::Upload => {
                // SAFETY: the ticket owns the staging buffer until this request completes. A copy
                // from pageable memory returns once the data is staged, and we complete later.
                let src = unsafe { staging(req) };
                let dtype = DType::from_code(i32::from(req.dtype)).ok_or(status::UNSUPPORTED_DTYPE)?;
                let bytes = req.out_bytes as usize;
                if !bytes.is_multiple_of(dtype.size() as usize) || src.len() != bytes.div_ceil(4) {
                    return Err(status::SHAPE_MISMATCH);
                }
                let halves = || -> Vec<u16> {
                    src.as_bytes()[..bytes].chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
                };
                match dtype {
                    DType::F32 => stream.clone_htod(&*src).map(DevBuf::F32),
                    DType::F16 => stream.clone_htod(&halves()).map(DevBuf::F16),
                    DType::BF16 => stream.clone_htod(&halves()).map(DevBuf::BF16),
                    // The staging words hold the elements' little-endian bytes, which on a CUDA host
                    // (x86-64, AArch64: little-endian) are the i32 values as they are.
                    DType::I32 => stream.clone_htod(&*words_as_i32(src)).map(DevBuf::I32),
                }
                .map(Some)
                .map_err(dev)
            }
            Op::Download => {
                let t = self.tensors.get(&req.a).ok_or(status::BAD_HANDLE)?;
                // SAFETY: as above.
                let dst = unsafe { staging(req) };
                if dst.len() as u64 != (t.num_bytes() as u64).div_ceil(4) {
                    return Err(status::BUFFER_TOO_SMALL);
                }
                let copied = match t {
                    DevBuf::F32(t) => stream.memcpy_dtoh(t, dst),
                    // SAFETY: the staging words hold at least the tensor's bytes, and 2-byte
                    // elements need no more than the words' 4-byte alignment.
                    DevBuf::F16(t) | DevBuf::BF16(t) => stream.memcpy_dtoh(t, unsafe { halves_of(dst, t.len()) }),
                    DevBuf::I32(t) => stream.memcpy_dtoh(t, words_as_i32(dst)),
                };
                copied.map(|_| None).map_err(dev)
            }
            Op::Free | Op::Release => Err(status::INVALID_ARGUMENT),
            // Nothing to launch: its event, recorded on the session's lane after every earlier
            // request of the session, completes once they have run.
            Op::Sync => Ok(None),
            // SAFETY: a kernel's staging buffer holds its descriptor.
            kernel if req.host_len > 0 => match unsafe { descriptor(req) } {
                Some(Ok(d)) => self.general(kernel, req, &d, &stream, lane).map(Some),
                Some(Err(code)) => Err(code),
                None => Err(status::INVALID_ARGUMENT),
            },
            kernel => {
                let shape = shape_of(kernel, req)?;
                let a = self.operand(req.a, shape.a)?;
                // SAFETY: every element of `out` is written by the kernel below before anyone
                // reads it (the tests poison and check this).
                let mut out = unsafe { stream.alloc::<f32>(shape.out) }.map_err(dev)?;
                let n = req.dims[0];
                let k = &self.kernels;
                // SAFETY (all launches): arguments match the kernels' signatures in KERNEL_SOURCE,
                // and the buffers have the element counts checked by `shape_of`.
                let launched = unsafe {
                    match kernel {
                        Op::Add | Op::Mul => {
                            let b = self.operand(req.b, shape.b)?;
                            let f = if kernel == Op::Add { &k.add } else { &k.mul };
                            stream.launch_builder(f).arg(a).arg(b).arg(&mut out).arg(&n).launch(elementwise(n))
                        }
                        Op::Scale => stream
                            .launch_builder(&k.scale)
                            .arg(a)
                            .arg(&req.scalar)
                            .arg(&mut out)
                            .arg(&n)
                            .launch(elementwise(n)),
                        Op::Relu => stream.launch_builder(&k.relu).arg(a).arg(&mut out).arg(&n).launch(elementwise(n)),
                        Op::Softmax => {
                            let (rows, cols) = (req.dims[0], req.dims[1]);
                            stream
                                .launch_builder(&k.softmax)
                                .arg(a)
                                .arg(&mut out)
                                .arg(&rows)
                                .arg(&cols)
                                .launch(per_row(rows))
                        }
                        Op::Sum => {
                            let cfg =
                                LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
                            stream.launch_builder(&k.sum).arg(a).arg(&mut out).arg(&n).launch(cfg)
                        }
                        Op::Matmul => {
                            let b = self.operand(req.b, shape.b)?;
                            let [m, k, n] = req.dims;
                            let plan = gemm_plan(&[m, k], &[k, n], &[m, n], 0)?;
                            self.gemm(lane, &plan, GemmType::F32, a, b, &mut out)?;
                            return Ok(Some(DevBuf::F32(out)));
                        }
                        _ => return Err(status::INVALID_ARGUMENT),
                    }
                };
                launched.map(|_| Some(DevBuf::F32(out))).map_err(dev)
            }
        }
    }

    /// The general form of a kernel: every op, on every dtype it takes, as on the host back-end.
    /// Operands are checked against the descriptor as there (`typed`), and so is the output
    /// (`shape::check_output`), which refuses i32 in arithmetic with `dtype_mismatch` before
    /// anything else, as there.
    fn general(&self, op: Op, req: &Request, d: &Desc, stream: &Arc<CudaStream>, lane: usize) -> Result<DevBuf, i32> {
        let (out_dims, out_dtype) = shape::check_output(op, d, req.out_bytes)?;
        match op {
            Op::Cast => return self.cast(req, d, out_dtype, stream),
            Op::Permute | Op::Slice | Op::Concat | Op::Gather => return self.movement(op, req, d, &out_dims, stream),
            Op::Argmax => return self.argmax(req, d, &out_dims, stream),
            Op::Matmul => return self.matmul(req, d, &out_dims, stream, lane),
            _ => {}
        }
        // The rest is arithmetic on one float dtype, which `a`, `b`, `c` and the output share
        // (`shape::check_output`): the kernels take its code, read every element through
        // `tw_load` and round each result to it through `tw_store`.
        let a = self.typed(req.a, d, SLOT_A)?;
        let b = match op {
            Op::Add | Op::Mul | Op::Sub | Op::Div | Op::Maximum => Some(self.typed(req.b, d, SLOT_B)?),
            Op::LayerNorm | Op::RmsNorm if d.flags & flags::HAS_B != 0 => Some(self.typed(req.b, d, SLOT_B)?),
            _ => None,
        };
        let c = match op {
            Op::LayerNorm if d.flags & flags::HAS_C != 0 => Some(self.typed(d.c, d, SLOT_C)?),
            _ => None,
        };
        debug_assert_eq!(a.dtype(), out_dtype);
        let dt = out_dtype as i32;
        let out_shape = out_dims.as_slice();
        let n = u32::try_from(out_dims.elements()?).map_err(|_| status::INVALID_ARGUMENT)?;
        let sa = d.shape(SLOT_A);
        let dev = |_| status::DEVICE_ERROR;
        // SAFETY: every element of `out` is written by the launch below (the tests poison reads).
        let out = unsafe { DevBuf::alloc(stream, out_dtype, n as usize)? };
        {
            let k = &self.kernels;
            let code = i32::from(op as u8);
            let u = |x: usize| u32::try_from(x).map_err(|_| status::INVALID_ARGUMENT);
            let (pa, _pa_guard) = a.ptr(stream);
            let (po, _po_guard) = out.ptr(stream);
            // An absent `b` or `c` is never read: `a` stands in for its pointer.
            let (pb, _pb_guard) = b.unwrap_or(a).ptr(stream);
            let (pc, _pc_guard) = c.unwrap_or(a).ptr(stream);
            // SAFETY (all launches): the arguments match the kernels' signatures in KERNEL_SOURCE;
            // every operand has the dtype `dt` and the element count its descriptor states
            // (checked by `typed`), which is what the shape rules index it with.
            unsafe {
                match op {
                    op if op.is_unary() => stream
                        .launch_builder(&k.unary)
                        .arg(&pa)
                        .arg(&po)
                        .arg(&n)
                        .arg(&code)
                        .arg(&req.scalar)
                        .arg(&dt)
                        .launch(elementwise(n)),
                    Op::Add | Op::Mul | Op::Sub | Op::Div | Op::Maximum => {
                        let (dims, st_a) = pad4(out_shape, broadcast_strides(sa, out_shape))?;
                        let (_, st_b) = pad4(out_shape, broadcast_strides(d.shape(SLOT_B), out_shape))?;
                        let mut l = stream.launch_builder(&k.binary);
                        l.arg(&pa).arg(&pb).arg(&po).arg(&n).arg(&code);
                        for x in dims.iter().chain(&st_a).chain(&st_b) {
                            l.arg(x);
                        }
                        l.arg(&dt).launch(elementwise(n))
                    }
                    Op::Softmax | Op::LogSoftmax => {
                        let cols = sa[sa.len() - 1];
                        let rows = n / cols;
                        let log = i32::from(op == Op::LogSoftmax);
                        stream
                            .launch_builder(&k.softmax_rows)
                            .arg(&pa)
                            .arg(&po)
                            .arg(&rows)
                            .arg(&cols)
                            .arg(&log)
                            .arg(&dt)
                            .launch(per_row(rows))
                    }
                    Op::Sum | Op::Mean | Op::Max => {
                        let ax = d.axis as usize;
                        let outer = u(sa[..ax].iter().map(|&x| x as usize).product())?;
                        let inner = u(sa[ax + 1..].iter().map(|&x| x as usize).product())?;
                        let len_axis = sa[ax];
                        stream
                            .launch_builder(&k.reduce)
                            .arg(&pa)
                            .arg(&po)
                            .arg(&outer)
                            .arg(&len_axis)
                            .arg(&inner)
                            .arg(&code)
                            .arg(&dt)
                            .launch(elementwise(n))
                    }
                    Op::LayerNorm | Op::RmsNorm => {
                        let cols = sa[sa.len() - 1];
                        let rows = n / cols;
                        let (layer, has_w, has_b) =
                            (i32::from(op == Op::LayerNorm), i32::from(b.is_some()), i32::from(c.is_some()));
                        stream
                            .launch_builder(&k.norm)
                            .arg(&pa)
                            .arg(&pb)
                            .arg(&pc)
                            .arg(&po)
                            .arg(&rows)
                            .arg(&cols)
                            .arg(&d.eps)
                            .arg(&layer)
                            .arg(&has_w)
                            .arg(&has_b)
                            .arg(&dt)
                            .launch(elementwise(rows))
                    }
                    // Every kernel op is above or returned before; the others fail
                    // `check_output`.
                    _ => return Err(status::INVALID_ARGUMENT),
                }
            }
            .map_err(dev)?;
        }
        Ok(out)
    }

    /// Matmul of f32 through cuBLAS sgemm, of f16 and bf16 through GemmEx (`gemm`).
    fn matmul(
        &self,
        req: &Request,
        d: &Desc,
        out: &Dims,
        stream: &Arc<CudaStream>,
        lane: usize,
    ) -> Result<DevBuf, i32> {
        use cudarc::cublas::sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_16F};
        let (a, b) = (self.typed(req.a, d, SLOT_A)?, self.typed(req.b, d, SLOT_B)?);
        let n = out.elements()? as usize;
        let plan = gemm_plan(d.shape(SLOT_A), d.shape(SLOT_B), out.as_slice(), d.flags)?;
        let dev = |_| status::DEVICE_ERROR;
        // SAFETY (all three): cuBLAS writes every element of `out`: the plan has one GEMM per
        // output batch matrix, with beta 0.
        match (a, b) {
            (DevBuf::F32(a), DevBuf::F32(b)) => {
                let mut out = unsafe { stream.alloc::<f32>(n) }.map_err(dev)?;
                self.gemm(lane, &plan, GemmType::F32, a, b, &mut out)?;
                Ok(DevBuf::F32(out))
            }
            (DevBuf::F16(a), DevBuf::F16(b)) => {
                let mut out = unsafe { stream.alloc::<u16>(n) }.map_err(dev)?;
                self.gemm(lane, &plan, GemmType::Half(CUDA_R_16F), a, b, &mut out)?;
                Ok(DevBuf::F16(out))
            }
            (DevBuf::BF16(a), DevBuf::BF16(b)) => {
                let mut out = unsafe { stream.alloc::<u16>(n) }.map_err(dev)?;
                self.gemm(lane, &plan, GemmType::Half(CUDA_R_16BF), a, b, &mut out)?;
                Ok(DevBuf::BF16(out))
            }
            _ => Err(status::DTYPE_MISMATCH),
        }
    }

    /// Permute, slice, concat and gather, of any dtype: they move elements and never convert
    /// them, so their kernels copy each by its size (`tw_strided`, `tw_concat`, `tw_gather`).
    fn movement(&self, op: Op, req: &Request, d: &Desc, out: &Dims, stream: &Arc<CudaStream>) -> Result<DevBuf, i32> {
        let a = self.typed(req.a, d, SLOT_A)?;
        let sa = d.shape(SLOT_A);
        let n = u32::try_from(out.elements()?).map_err(|_| status::INVALID_ARGUMENT)?;
        let u = |x: usize| u32::try_from(x).map_err(|_| status::INVALID_ARGUMENT);
        let size = a.dtype().size() as i32;
        let dev = |_| status::DEVICE_ERROR;
        let b = match op {
            Op::Concat | Op::Gather => Some(self.typed(req.b, d, SLOT_B)?),
            _ => None,
        };
        if op == Op::Gather {
            let Some(DevBuf::I32(ids)) = b else { return Err(status::DTYPE_MISMATCH) };
            // Whether every id lies inside the table is known only from their values, which the
            // device holds: they are copied back on the session's stream, after whatever earlier
            // request made them, and the worker waits for that copy before it launches. That is
            // gather's cost on CUDA: the device's worker submits nothing else, for any shard,
            // until that stream has run everything queued on it before the gather (the session's
            // requests, and those of any session sharing the stream) and copied the ids, 4 bytes
            // each. Ids are small (a batch of token ids), and a gather's caller waits for it
            // anyway (`Session::streamable`).
            let mut values = vec![0i32; ids.len()];
            stream.memcpy_dtoh(ids, &mut values).map_err(dev)?;
            stream.synchronize().map_err(dev)?;
            let rows = sa[0];
            if values.iter().any(|&i| i < 0 || i as u32 >= rows) {
                return Err(status::INDEX_OUT_OF_RANGE);
            }
        }
        // SAFETY: the launch below writes every element of `buf`.
        let buf = unsafe { DevBuf::alloc(stream, a.dtype(), n as usize)? };
        {
            let k = &self.kernels;
            let (src, _src_guard) = a.ptr(stream);
            let (dst, _dst_guard) = buf.ptr(stream);
            // SAFETY (all launches): the arguments match the kernels' signatures in
            // KERNEL_SOURCE; every operand has the element count its descriptor states (checked
            // by `typed`), which is what the shape rules index it with, and `size` is the bytes
            // of the dtype that `a`, `b` (but gather's ids) and the output share.
            unsafe {
                match (op, b) {
                    (Op::Permute | Op::Slice, _) => {
                        let strides = contiguous_strides(sa);
                        let (walk, base) = if op == Op::Permute {
                            let mut w = [0usize; MAX_RANK];
                            for (i, &p) in d.perm[..sa.len()].iter().enumerate() {
                                w[i] = strides[usize::from(p)];
                            }
                            (w, 0u64)
                        } else {
                            (strides, u64::from(d.start) * strides[d.axis as usize] as u64)
                        };
                        let (dims, st) = pad4(out.as_slice(), walk)?;
                        let mut l = stream.launch_builder(&k.strided);
                        l.arg(&src).arg(&dst).arg(&n);
                        for x in dims.iter().chain(&st) {
                            l.arg(x);
                        }
                        l.arg(&base).arg(&size).launch(elementwise(n))
                    }
                    (Op::Concat, Some(b)) => {
                        let (pb, _pb_guard) = b.ptr(stream);
                        let ax = d.axis as usize;
                        let outer = u(sa[..ax].iter().map(|&x| x as usize).product())?;
                        let ia = u(sa[ax..].iter().map(|&x| x as usize).product())?;
                        let ib = u(d.shape(SLOT_B)[ax..].iter().map(|&x| x as usize).product())?;
                        stream
                            .launch_builder(&k.concat)
                            .arg(&src)
                            .arg(&pb)
                            .arg(&dst)
                            .arg(&outer)
                            .arg(&ia)
                            .arg(&ib)
                            .arg(&size)
                            .launch(elementwise(n))
                    }
                    (Op::Gather, Some(ids)) => {
                        let (pi, _pi_guard) = ids.ptr(stream);
                        let row = u(sa[1..].iter().map(|&x| x as usize).product())?;
                        let rows = sa[0];
                        stream
                            .launch_builder(&k.gather)
                            .arg(&src)
                            .arg(&pi)
                            .arg(&dst)
                            .arg(&n)
                            .arg(&row)
                            .arg(&rows)
                            .arg(&size)
                            .launch(elementwise(n))
                    }
                    _ => return Err(status::INVALID_ARGUMENT),
                }
            }
            .map_err(dev)?;
        }
        Ok(buf)
    }

    /// Argmax along an axis, of any float dtype: i32 indices (`tw_argmax`).
    fn argmax(&self, req: &Request, d: &Desc, out: &Dims, stream: &Arc<CudaStream>) -> Result<DevBuf, i32> {
        let a = self.typed(req.a, d, SLOT_A)?;
        let sa = d.shape(SLOT_A);
        let n = u32::try_from(out.elements()?).map_err(|_| status::INVALID_ARGUMENT)?;
        let u = |x: usize| u32::try_from(x).map_err(|_| status::INVALID_ARGUMENT);
        let ax = d.axis as usize;
        let outer = u(sa[..ax].iter().map(|&x| x as usize).product())?;
        let inner = u(sa[ax + 1..].iter().map(|&x| x as usize).product())?;
        let len_axis = sa[ax];
        let dt = a.dtype() as i32;
        let dev = |_| status::DEVICE_ERROR;
        // SAFETY: tw_argmax writes every one of the outer × inner = n elements of `out`.
        let mut out = unsafe { stream.alloc::<i32>(n as usize) }.map_err(dev)?;
        {
            let (src, _src_guard) = a.ptr(stream);
            // SAFETY: tw_argmax(a, out, outer, n, inner, dt) reads outer × len_axis × inner
            // elements of dtype `dt` at `src`, which is `a`'s element count (checked by `typed`).
            unsafe {
                stream
                    .launch_builder(&self.kernels.argmax)
                    .arg(&src)
                    .arg(&mut out)
                    .arg(&outer)
                    .arg(&len_axis)
                    .arg(&inner)
                    .arg(&dt)
                    .launch(elementwise(n))
            }
            .map_err(dev)?;
        }
        Ok(DevBuf::I32(out))
    }

    /// A cast between any two dtypes (`tw_cast`).
    fn cast(&self, req: &Request, d: &Desc, to: DType, stream: &Arc<CudaStream>) -> Result<DevBuf, i32> {
        let a = self.typed(req.a, d, SLOT_A)?;
        let len = a.len();
        let n = u32::try_from(len).map_err(|_| status::INVALID_ARGUMENT)?;
        let dev = |_| status::DEVICE_ERROR;
        // SAFETY: tw_cast writes every element of `out`.
        let out = unsafe { DevBuf::alloc(stream, to, len)? };
        let (from, to) = (a.dtype() as i32, to as i32);
        {
            let (src, _src_guard) = a.ptr(stream);
            let (dst, _dst_guard) = out.ptr(stream);
            // SAFETY: tw_cast(a, out, n, from, to) reads n elements of `from`'s size at `src` and
            // writes n of `to`'s size at `dst`: both buffers hold exactly n elements.
            unsafe {
                stream
                    .launch_builder(&self.kernels.cast)
                    .arg(&src)
                    .arg(&dst)
                    .arg(&n)
                    .arg(&from)
                    .arg(&to)
                    .launch(elementwise(n))
            }
            .map_err(dev)?;
        }
        Ok(out)
    }

    /// Runs `plan` on the lane's cuBLAS handle: one GEMM per batch matrix, each on its offset into
    /// `a`, `b` and `out`, whose element type `ty` names. Every matmul goes through here: the
    /// arguments are packed in this one place.
    fn gemm<T: DeviceRepr>(
        &self,
        lane: usize,
        plan: &GemmPlan,
        ty: GemmType,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<(), i32> {
        debug_assert_eq!(std::mem::size_of::<T>(), ty.bytes());
        let fits = |buf: usize, start: usize, len: usize| start.checked_add(len).is_some_and(|end| end <= buf);
        let inside = plan.batches.iter().all(|&(oa, ob, oc)| {
            fits(a.len(), oa, plan.a_len) && fits(b.len(), ob, plan.b_len) && fits(out.len(), oc, plan.c_len)
        });
        if !inside {
            return Err(status::SHAPE_MISMATCH);
        }
        let Lane { stream, blas, .. } = &self.lanes[lane];
        let (pa, _ga) = a.device_ptr(stream);
        let (pb, _gb) = b.device_ptr(stream);
        let (pc, _gc) = out.device_ptr_mut(stream);
        let at = |base: u64, offset: usize| base + (offset * ty.bytes()) as u64;
        let (alpha, beta) = (1.0f32, 0.0f32);
        for &(oa, ob, oc) in &plan.batches {
            // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: b is cuBLAS's first operand (GemmPlan).
            let (first, second, c) = (at(pb, ob), at(pa, oa), at(pc, oc));
            // SAFETY: every matrix lies inside its buffer (checked above), and the plan's leading
            // dimensions describe exactly those matrices; f16 and bf16 take f32 scalars and
            // accumulation (CUBLAS_COMPUTE_32F), on the tensor cores.
            unsafe {
                match ty {
                    GemmType::F32 => cudarc::cublas::result::sgemm(
                        *blas.handle(),
                        plan.transa,
                        plan.transb,
                        plan.m,
                        plan.n,
                        plan.k,
                        &alpha,
                        first as *const f32,
                        plan.lda,
                        second as *const f32,
                        plan.ldb,
                        &beta,
                        c as *mut f32,
                        plan.ldc,
                    ),
                    GemmType::Half(data_type) => cudarc::cublas::result::gemm_ex(
                        *blas.handle(),
                        plan.transa,
                        plan.transb,
                        plan.m,
                        plan.n,
                        plan.k,
                        (&alpha) as *const f32 as *const _,
                        first as *const _,
                        data_type,
                        plan.lda,
                        second as *const _,
                        data_type,
                        plan.ldb,
                        (&beta) as *const f32 as *const _,
                        c as *mut _,
                        data_type,
                        plan.ldc,
                        cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    ),
                }
            }
            .map_err(|_| status::DEVICE_ERROR)?;
        }
        Ok(())
    }

    fn event(&mut self) -> Result<CudaEvent, i32> {
        match self.spare_events.pop() {
            Some(e) => Ok(e),
            None => self.ctx.new_event(None).map_err(|_| status::DEVICE_ERROR),
        }
    }

    fn start(&mut self, req: &Request, started: Instant) -> Result<Submitted, i32> {
        let op = Op::from_u8(req.op).ok_or(status::INVALID_ARGUMENT)?;
        match op {
            Op::Free => {
                // No wait: the session's requests all run on its lane, and the buffer's drop
                // frees it on the stream that allocated it (that lane), after those requests.
                self.drop_tensor(req.a);
                return Ok(Submitted::Done(status::OK));
            }
            Op::Release => {
                let session = req.session;
                // A function's weights: an invocation cut off at its deadline may have left a
                // kernel reading one in flight, on any lane, under its own session.
                if req.dtype == RELEASE_SHARED {
                    self.settle(|_| true);
                } else {
                    self.settle(|r| r.session == session);
                }
                for id in self.sessions.remove(&session).unwrap_or_default() {
                    self.drop_tensor(id);
                }
                self.session_lanes.remove(&session);
                return Ok(Submitted::Done(status::OK));
            }
            _ => {}
        }
        if (op == Op::Upload || op.is_kernel()) && self.tensors.contains_key(&req.out) {
            return Err(status::INVALID_ARGUMENT);
        }
        let lane = self.lane_for(req.session, req.shard);
        let event = self.event()?;
        let created = match self.enqueue(op, req, lane) {
            Ok(created) => created,
            // A refused request (a gather's id out of range, say) gives its event back.
            Err(code) => {
                self.spare_events.push(event);
                return Err(code);
            }
        };
        if let Err(_e) = event.record(&self.lanes[lane].stream) {
            self.spare_events.push(event);
            return Err(status::DEVICE_ERROR);
        }
        if let Some(buf) = created {
            self.used_bytes += buf.num_bytes() as u64;
            self.tensors.insert(req.out, buf);
            self.sessions.entry(req.session).or_default().push(req.out);
        }
        self.lanes[lane].pending += 1;
        self.in_flight.push(InFlight { req: *req, started, lane, event });
        Ok(Submitted::InFlight)
    }
}

/// A batched row-major matmul as cuBLAS column-major GEMMs: row-major `C = op(A)·op(B)` is
/// column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ` (a row-major matrix read column-major is its transpose), so
/// the operands swap and each keeps its own flag. One GEMM per output batch matrix, over
/// broadcast batch dimensions.
struct GemmPlan {
    transa: cudarc::cublas::sys::cublasOperation_t,
    transb: cudarc::cublas::sys::cublasOperation_t,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
    /// Elements of one matrix of a, b and the output.
    a_len: usize,
    b_len: usize,
    c_len: usize,
    /// Each batch's first element in a, b and the output.
    batches: Vec<(usize, usize, usize)>,
}

fn gemm_plan(sa: &[u32], sb: &[u32], so: &[u32], fl: u32) -> Result<GemmPlan, i32> {
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let (ra, rb, ro) = (sa.len(), sb.len(), so.len());
    let (m, n) = (so[ro - 2] as usize, so[ro - 1] as usize);
    let (ta, tb) = (fl & flags::TRANSPOSE_A != 0, fl & flags::TRANSPOSE_B != 0);
    let k = if ta { sa[ra - 2] } else { sa[ra - 1] } as usize;
    let i = |x: usize| i32::try_from(x).map_err(|_| status::INVALID_ARGUMENT);
    let batch = &so[..ro - 2];
    let wa = walk(batch, broadcast_strides(&sa[..ra - 2], batch));
    let wb = walk(batch, broadcast_strides(&sb[..rb - 2], batch));
    let batches = wa.zip(wb).enumerate().map(|(c, (a, b))| (a * m * k, b * k * n, c * m * n)).collect();
    Ok(GemmPlan {
        transa: if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
        transb: if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
        m: i(n)?,
        n: i(m)?,
        k: i(k)?,
        lda: if tb { i(k)? } else { i(n)? },
        ldb: if ta { i(m)? } else { i(k)? },
        ldc: i(n)?,
        a_len: m * k,
        b_len: k * n,
        c_len: m * n,
        batches,
    })
}

/// The staging words as `len` 2-byte elements, for a download of an f16 or bf16 tensor.
///
/// # Safety
/// `words` must hold at least `len * 2` bytes, and nothing else may use it while the result lives.
unsafe fn halves_of(words: &mut [f32], len: usize) -> &mut [u16] {
    debug_assert!(len * 2 <= words.len() * 4);
    std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u16, len)
}

/// The staging words as i32 elements, for an upload or a download of an i32 tensor: the same
/// size and alignment as the f32 words, and every bit pattern is a value of both.
fn words_as_i32(words: &mut [f32]) -> &mut [i32] {
    // SAFETY: i32 and f32 have the same size and alignment and no invalid bit patterns, and the
    // result borrows `words` mutably for as long as it lives.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut i32, words.len()) }
}

/// What a GEMM's elements are: f32 runs through cublasSgemm, f16 and bf16 (their `cudaDataType`)
/// through cublasGemmEx.
#[derive(Clone, Copy)]
enum GemmType {
    F32,
    Half(cudarc::cublas::sys::cudaDataType_t),
}

impl GemmType {
    fn bytes(self) -> usize {
        match self {
            GemmType::F32 => 4,
            GemmType::Half(_) => 2,
        }
    }
}

/// A shape and its strides padded to the kernels' four dims (leading 1s, stride 0).
fn pad4(shape: &[u32], strides: [usize; MAX_RANK]) -> Result<([u32; 4], [u32; 4]), i32> {
    let (mut dims, mut st) = ([1u32; 4], [0u32; 4]);
    let off = 4 - shape.len();
    for i in 0..shape.len() {
        dims[off + i] = shape[i];
        st[off + i] = u32::try_from(strides[i]).map_err(|_| status::INVALID_ARGUMENT)?;
    }
    Ok((dims, st))
}

/// One thread per element, in blocks of 256.
fn elementwise(n: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// One block of 256 threads per row (softmax).
fn per_row(rows: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn describe(&self) -> String {
        format!("cuda:{} {}", self.ordinal, self.name)
    }

    fn submit(&mut self, req: &Request, started: Instant) -> Submitted {
        match self.start(req, started) {
            Ok(s) => s,
            Err(code) => Submitted::Done(code),
        }
    }

    fn poll(&mut self, finished: &mut Vec<Finished>) {
        let mut i = 0;
        while i < self.in_flight.len() {
            let status = match self.in_flight[i].event.try_is_complete() {
                Ok(false) => {
                    i += 1;
                    continue;
                }
                Ok(true) => status::OK,
                Err(_) => status::DEVICE_ERROR,
            };
            let f = self.in_flight.swap_remove(i);
            self.lanes[f.lane].pending -= 1;
            if status != status::OK {
                self.drop_tensor(f.req.out);
            }
            self.spare_events.push(f.event);
            finished.push(Finished { req: f.req, status, started: f.started });
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn memory_used(&self) -> u64 {
        self.used_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--gpu-streams` is per shard, cut to the device's cap over all shards, and every shard has
    /// a stream of its own even past the cap.
    #[test]
    fn each_shard_has_its_own_streams_within_the_devices_cap() {
        assert_eq!(streams_per_shard(1, 4), 4);
        assert_eq!(streams_per_shard(16, 4), 4);
        assert_eq!(streams_per_shard(17, 4), 3);
        assert_eq!(streams_per_shard(64, 4), 1);
        assert_eq!(streams_per_shard(200, 4), 1);
        assert_eq!(streams_per_shard(2, 100), MAX_STREAMS_PER_DEVICE / 2);
        assert_eq!(streams_per_shard(0, 0), 1);
        for (shards, streams) in [(1, 4), (3, 4), (16, 4), (17, 4), (64, 4), (100, 2), (7, 1)] {
            let per = streams_per_shard(shards, streams);
            assert!(shards * per <= MAX_STREAMS_PER_DEVICE.max(shards), "{shards} × {streams}");
            // The shards' ranges tile the device's lanes: each lane belongs to exactly one shard.
            let mut owner = vec![None; shards * per];
            for shard in 0..shards {
                for lane in shard_lanes(shard, per) {
                    assert_eq!(owner[lane].replace(shard), None, "lane {lane} of two shards");
                }
            }
            assert!(owner.iter().all(Option::is_some));
        }
    }
}

//! The encoder example's model: its shape, its seeded random weights, and the safetensors file and
//! request bodies the guest takes. Shared by the end-to-end test (tests/encoder.rs), the harness's
//! `encoder` scenario (bench/src/harness/scenario.rs) and the example's `encoder-weights` program, which
//! include this file with `#[path]`: they are separate crates, and none should depend on another.
//!
//! The guest (guest/src/main.rs) reads every size from the weights' shapes, and the head count
//! from `dim / HEAD_DIM`, so another `Config` needs no other guest.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};

/// Every attention head is this wide; the guest derives the head count from it.
pub const HEAD_DIM: usize = 16;
/// Layer norm's epsilon, in the guest and the reference.
pub const LN_EPS: f32 = 1e-5;

/// The sizes of one pre-norm encoder block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Token ids are `0..vocab`.
    pub vocab: usize,
    /// The model width; a multiple of [`HEAD_DIM`].
    pub dim: usize,
    /// The MLP's hidden width.
    pub ffn: usize,
    /// The longest sequence (rows of the position table).
    pub max_len: usize,
}

impl Config {
    /// The example's block: small enough for the host back-end to run it in about a millisecond,
    /// with every op of a transformer block (4 heads).
    pub const SMALL: Config = Config { vocab: 256, dim: 64, ffn: 256, max_len: 32 };

    pub fn heads(&self) -> usize {
        self.dim / HEAD_DIM
    }
}

/// How the weights are stored, and so how the guest runs the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Every tensor f32; every op in f32.
    F32,
    /// The embedding and the four matrices bf16, the norms' weights and the biases f32: the guest
    /// rounds each matmul's input to bf16 and widens its product back to f32 (the usual mixed
    /// precision: matmuls on the tensor cores, norms, softmax and residuals in f32).
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// One named weight: its shape and its values as stored (rounded to bf16 where the file holds
/// bf16, so that a reference computed from these sees exactly what the device sees).
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub bf16: bool,
}

/// SplitMix64: a seeded, portable sequence, so the test, the harness and the example's binary make
/// the same weights from the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f32) -> f32 {
        let unit = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * bound
    }
}

/// The block's weights for `seed`: matrices uniform in ±1/√fan_in (so activations stay near unit
/// scale through the block), embeddings in ±1, norms' weights near 1, biases near 0.
pub fn weights(config: Config, seed: u64, precision: Precision) -> Vec<Weight> {
    assert!(config.dim > 0 && config.dim.is_multiple_of(HEAD_DIM), "dim must be a multiple of {HEAD_DIM}");
    let mut rng = Rng(seed);
    let Config { vocab, dim, ffn, max_len } = config;
    let low = precision == Precision::Bf16;
    let mut make = |name: &'static str, shape: &[usize], bound: f32, around: f32, bf16: bool| {
        let n: usize = shape.iter().product();
        let mut values: Vec<f32> = (0..n).map(|_| around + rng.uniform(bound)).collect();
        if bf16 {
            values.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
        }
        Weight { name, shape: shape.to_vec(), values, bf16 }
    };
    let fan = |n: usize| 1.0 / (n as f32).sqrt();
    vec![
        make("embed", &[vocab, dim], 1.0, 0.0, low),
        make("pos", &[max_len, dim], 0.1, 0.0, false),
        make("ln1.weight", &[dim], 0.1, 1.0, false),
        make("ln1.bias", &[dim], 0.1, 0.0, false),
        make("wqkv", &[dim, 3 * dim], fan(dim), 0.0, low),
        make("bqkv", &[3 * dim], 0.1, 0.0, false),
        make("wo", &[dim, dim], fan(dim), 0.0, low),
        make("bo", &[dim], 0.1, 0.0, false),
        make("ln2.weight", &[dim], 0.1, 1.0, false),
        make("ln2.bias", &[dim], 0.1, 0.0, false),
        make("w1", &[dim, ffn], fan(dim), 0.0, low),
        make("b1", &[ffn], 0.1, 0.0, false),
        make("w2", &[ffn, dim], fan(ffn), 0.0, low),
        make("b2", &[dim], 0.1, 0.0, false),
    ]
}

/// The weights as a safetensors file, through the format's own crate.
pub fn safetensors(weights: &[Weight]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = weights
        .iter()
        .map(|w| {
            if w.bf16 {
                w.values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()
            } else {
                w.values.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        })
        .collect();
    let views = weights.iter().zip(&bytes).map(|(w, b)| {
        let dtype = if w.bf16 { Dtype::BF16 } else { Dtype::F32 };
        (w.name, TensorView::new(dtype, w.shape.clone(), b).expect("the shape fits the bytes"))
    });
    safetensors::tensor::serialize(views, None::<HashMap<String, String>>).expect("the views serialize")
}

/// A request for the sequence `ids`: the whole last hidden state back (`[len, dim]`, row by row),
/// or with `pooled` only its mean over the tokens (`[dim]`).
pub fn request(ids: &[u32], pooled: bool) -> String {
    let ids = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    format!(r#"{{"ids":[{ids}],"output":"{}"}}"#, if pooled { "pooled" } else { "hidden" })
}

/// `len` token ids from `seed`, each in `0..vocab`.
pub fn token_ids(config: Config, seed: u64, len: usize) -> Vec<u32> {
    let mut rng = Rng(seed);
    (0..len).map(|_| (rng.next() % config.vocab as u64) as u32).collect()
}

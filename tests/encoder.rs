//! examples/encoder end to end (issue 34, item 6): one pre-norm transformer encoder block (embedding
//! gather, layer norms, four-head attention with batched matmuls, softmax and transposes, a GELU
//! MLP, residuals), its guest built from its own crate and deployed with seeded random weights in
//! f32 and in bf16, run through a server on the host back-end and checked against a float64
//! reference written here.

mod common;

use std::collections::HashMap;

use base64::Engine as _;
use common::{guests, Server};
use serde_json::{json, Value};

#[path = "../examples/encoder/model.rs"]
mod model;

use model::{Config, Precision, Weight, HEAD_DIM, LN_EPS};

const SEED: u64 = 34;

/// The block in float64, on the weights as stored (bf16 ones exactly as rounded): `[len, dim]`.
fn reference(weights: &[Weight], config: Config, ids: &[u32]) -> Vec<f64> {
    let w: HashMap<&str, Vec<f64>> =
        weights.iter().map(|w| (w.name, w.values.iter().map(|&v| f64::from(v)).collect())).collect();
    let (len, dim, ffn, heads) = (ids.len(), config.dim, config.ffn, config.heads());
    let mut x: Vec<f64> = Vec::with_capacity(len * dim);
    for (t, &id) in ids.iter().enumerate() {
        let (row, pos) = (&w["embed"][id as usize * dim..][..dim], &w["pos"][t * dim..][..dim]);
        x.extend(row.iter().zip(pos).map(|(e, p)| e + p));
    }
    // Attention.
    let h = layer_norm(&x, dim, &w["ln1.weight"], &w["ln1.bias"]);
    let qkv = linear(&h, dim, &w["wqkv"], &w["bqkv"]);
    let at = |t: usize, part: usize, head: usize, i: usize| qkv[t * 3 * dim + part * dim + head * HEAD_DIM + i];
    let mut context = vec![0.0; len * dim];
    for head in 0..heads {
        for t in 0..len {
            let scores: Vec<f64> = (0..len)
                .map(|s| (0..HEAD_DIM).map(|i| at(t, 0, head, i) * at(s, 1, head, i)).sum::<f64>())
                .map(|dot| dot / (HEAD_DIM as f64).sqrt())
                .collect();
            let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - top).exp()).sum();
            for i in 0..HEAD_DIM {
                let mixed: f64 = (0..len).map(|s| (scores[s] - top).exp() / total * at(s, 2, head, i)).sum();
                context[t * dim + head * HEAD_DIM + i] = mixed;
            }
        }
    }
    let attended = linear(&context, dim, &w["wo"], &w["bo"]);
    let x: Vec<f64> = x.iter().zip(&attended).map(|(a, b)| a + b).collect();
    // The MLP.
    let h = layer_norm(&x, dim, &w["ln2.weight"], &w["ln2.bias"]);
    let hidden: Vec<f64> = linear(&h, dim, &w["w1"], &w["b1"]).into_iter().map(gelu).collect();
    let out = linear(&hidden, ffn, &w["w2"], &w["b2"]);
    x.iter().zip(&out).map(|(a, b)| a + b).collect()
}

/// `x · w + b` for `x` of rows of `inner`, `w` [inner, cols].
fn linear(x: &[f64], inner: usize, w: &[f64], b: &[f64]) -> Vec<f64> {
    let cols = b.len();
    assert_eq!(w.len(), inner * cols);
    x.chunks_exact(inner)
        .flat_map(|row| (0..cols).map(move |c| b[c] + (0..inner).map(|k| row[k] * w[k * cols + c]).sum::<f64>()))
        .collect()
}

fn layer_norm(x: &[f64], dim: usize, weight: &[f64], bias: &[f64]) -> Vec<f64> {
    x.chunks_exact(dim)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / dim as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (var + f64::from(LN_EPS)).sqrt();
            row.iter().enumerate().map(move |(i, v)| (v - mean) * inv * weight[i] + bias[i])
        })
        .collect()
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// The largest difference from the reference, over the reference's largest magnitude.
fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max) / scale
}

/// The bound per precision on the whole block's output, the issue's per-op bounds: f32 differs
/// from float64 only by rounding and summation order (measured 2.3e-7 here); bf16 rounds every
/// matmul's input and output to 8 bits of mantissa, five matmuls deep (measured 2.2e-3).
fn bound(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-5,
        Precision::Bf16 => 1e-2,
    }
}

fn deploy(server: &Server, name: &str, weights: &[Weight]) -> String {
    let tensors = base64::engine::general_purpose::STANDARD.encode(model::safetensors(weights));
    let r = server.client().deploy(name, &guests::encoder_example(), json!({ "tensors_b64": tensors }));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn values(out: &Value) -> Vec<f64> {
    out["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

#[test]
fn the_encoder_block_matches_a_float64_reference_in_f32_and_bf16() {
    let config = Config::SMALL;
    let server = Server::start(&["--gpu", "host"]);
    let mut c = server.client();
    let mut invocations = 0.0;
    let mut deployed = 0.0;
    for precision in [Precision::F32, Precision::Bf16] {
        let weights = model::weights(config, SEED, precision);
        let id = deploy(&server, &format!("encoder-{}", precision.name()), &weights);
        deployed += weights.len() as f64;
        // One token, a few, the longest sequence the position table allows.
        for (n, len) in [1, 5, 16, config.max_len].into_iter().enumerate() {
            let ids = model::token_ids(config, SEED + n as u64, len);
            let want = reference(&weights, config, &ids);

            let r = c.invoke(&id, model::request(&ids, false).as_bytes());
            assert_eq!(r.status, 200, "{precision:?}, {len} tokens: {}", r.text());
            let out = r.json();
            assert_eq!(out["shape"], json!([len, config.dim]));
            let error = relative_error(&values(&out), &want);
            eprintln!("encoder {}: {len} tokens, largest error {error:.2e} of the largest output", precision.name());
            assert!(error <= bound(precision), "{precision:?}, {len} tokens: {error:e}");

            // Pooled: the mean over the tokens, on the device too.
            let r = c.invoke(&id, model::request(&ids, true).as_bytes());
            assert_eq!(r.status, 200, "{}", r.text());
            let out = r.json();
            assert_eq!(out["shape"], json!([config.dim]));
            let pooled: Vec<f64> =
                (0..config.dim).map(|i| (0..len).map(|t| want[t * config.dim + i]).sum::<f64>() / len as f64).collect();
            let error = relative_error(&values(&out), &pooled);
            assert!(error <= bound(precision), "{precision:?}, {len} tokens pooled: {error:e}");
            invocations += 2.0;
        }
    }
    // The weights went up once per function; each invocation uploads only its ids.
    let uploads = server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "upload")]);
    assert_eq!(uploads, deployed + invocations);
}

#[test]
fn bad_requests_and_missing_weights_end_the_guest_with_its_exit_code() {
    let config = Config::SMALL;
    let server = Server::start(&["--gpu", "host"]);
    let id = deploy(&server, "encoder", &model::weights(config, SEED, Precision::F32));
    let mut c = server.client();
    let too_long = model::request(&vec![1; config.max_len + 1], false);
    let bad = [
        "not json".to_string(),
        r#"{"ids": 5}"#.into(),
        r#"{"ids": []}"#.into(),
        too_long,
        format!(r#"{{"ids": [1, {}]}}"#, config.vocab),
        r#"{"ids": [1, -1]}"#.into(),
        r#"{"ids": [1, 2.5]}"#.into(),
        r#"{"ids": [1], "output": "logits"}"#.into(),
        // Four million ids, 8 MB, under the server's body limit: parsed, they would take twice
        // the guest's 64 MiB (a JSON value is 32 bytes); refused by its size before that.
        format!(r#"{{"ids": [{}0]}}"#, "0,".repeat(4_000_000)),
        format!(r#"{{"ids": [1], "output": "{}"}}"#, "x".repeat(1 << 20)),
    ];
    for body in &bad {
        let shown = &body[..body.len().min(80)];
        let r = c.invoke(&id, body.as_bytes());
        assert_eq!(r.status, 502, "{shown}: {}", r.text());
        assert_eq!(r.json()["error"]["kind"], "guest_exit", "{shown}");
        assert!(r.text().contains("exited with code 2"), "{shown}: {}", r.text());
    }
    // Without its weights the guest cannot run: exit status 3, and the server serves on.
    let r = server.client().deploy("bare-encoder", &guests::encoder_example(), json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    let bare = r.json()["id"].as_str().unwrap().to_string();
    let r = c.invoke(&bare, model::request(&[1, 2], false).as_bytes());
    assert_eq!((r.status, r.json()["error"]["kind"].clone()), (502, json!("guest_exit")), "{}", r.text());
    assert!(r.text().contains("exited with code 3"), "{}", r.text());
    // Weights of the wrong shape: an embedding of rank 1. Exit status 3 again, not a trap.
    let mut flat = model::weights(config, SEED, Precision::F32);
    flat[0].shape = vec![flat[0].values.len()];
    let misshapen = deploy(&server, "misshapen-encoder", &flat);
    let r = c.invoke(&misshapen, model::request(&[1, 2], false).as_bytes());
    assert_eq!((r.status, r.json()["error"]["kind"].clone()), (502, json!("guest_exit")), "{}", r.text());
    assert!(r.text().contains("exited with code 3"), "{}", r.text());
    let r = c.invoke(&id, model::request(&[1, 2], true).as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
}

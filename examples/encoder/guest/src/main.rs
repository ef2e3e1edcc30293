//! The encoder example's guest: one pre-norm transformer encoder block.
//!
//! stdin:  `{"ids": [token ids], "output": "hidden" | "pooled"}` (`output` may be left out:
//!         `hidden`)
//! stdout: `{"shape": [len, dim], "values": [...]}`, the block's output row by row, or with
//!         `pooled` its mean over the tokens, `{"shape": [dim], "values": [...]}`
//!
//! The block, with `x` the ids' embeddings plus their positions:
//!
//! ```text
//! h = layer_norm1(x);  q, k, v = split(h · wqkv + bqkv)           [len, 3·dim]
//! per head: softmax(q·kᵀ / √16) · v, the heads side by side        [len, dim]
//! x = x + (heads · wo + bo)
//! x = x + (gelu(layer_norm2(x) · w1 + b1) · w2 + b2)
//! ```
//!
//! Every size comes from the weights (`../model.rs` makes them): `embed` [vocab, dim], `pos`
//! [max_len, dim], `w1` [dim, ffn]; heads are 16 wide, so there are dim/16 of them. Where the
//! matrices are bf16 the matmuls run in bf16 (each input rounded to bf16, the product widened back
//! to f32) and everything else in f32: mixed precision, as models are served. The weights are the
//! function's resident tensors, never copied through this guest; every arithmetic step runs
//! through the tensor ABI, and the guest only parses and prints.
//!
//! A bad request exits with status 2, a failed tensor call (the function deployed without its
//! weights, say) with status 3; the reason goes to stderr, and the caller gets 502 `guest_exit`.

use std::io::Read;
use std::process::ExitCode;

use serde_json::Value;
use tensor_wasm_guest::{code, DType, Error, Tensor};

/// The width of one attention head (`model.rs`'s `HEAD_DIM`).
const HEAD_DIM: u32 = 16;
/// Layer norm's epsilon (`model.rs`'s `LN_EPS`).
const LN_EPS: f32 = 1e-5;

const EXIT_BAD_REQUEST: u8 = 2;
const EXIT_TENSOR_ERROR: u8 = 3;

/// The largest request read: 32 ids take a few hundred bytes, and a body of millions of them
/// would be parsed into more memory than the guest has before its length could be checked.
const MAX_REQUEST_BYTES: usize = 64 << 10;
/// How much of a bad value an error message quotes.
const QUOTE_CHARS: usize = 40;

/// `value` as JSON, cut to [`QUOTE_CHARS`] characters.
fn quote(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The first `rank` dimensions of `t`, or `invalid_argument` when it has another rank: weights
/// of the wrong shape end the guest with exit status 3, not a trap.
fn dims<const N: usize>(t: &Tensor) -> Result<[u32; N], Error> {
    let shape = t.shape()?;
    <[u32; N]>::try_from(shape.as_slice()).map_err(|_| Error {
        code: code::INVALID_ARGUMENT,
        message: format!("a weight has shape {shape:?}, not rank {N}"),
    })
}

/// The block's weights, as handles to the function's resident tensors.
struct Block {
    embed: Tensor,
    pos: Tensor,
    ln1: (Tensor, Tensor),
    wqkv: Tensor,
    bqkv: Tensor,
    wo: Tensor,
    bo: Tensor,
    ln2: (Tensor, Tensor),
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    vocab: u32,
    dim: u32,
    max_len: u32,
    /// The matrices' dtype: f32, or bf16 for mixed precision.
    matrices: DType,
    /// The embedding table's dtype, which its rows are gathered in.
    embedding: DType,
}

impl Block {
    fn load() -> Result<Block, Error> {
        let w = Tensor::weight;
        let embed = w("embed")?;
        let [vocab, dim] = dims(&embed)?;
        let pos = w("pos")?;
        let [max_len, _] = dims(&pos)?;
        let wqkv = w("wqkv")?;
        let matrices = wqkv.dtype()?;
        if dim == 0 || dim % HEAD_DIM != 0 {
            let message = format!("the model is {dim} wide, not a multiple of {HEAD_DIM}");
            return Err(Error { code: code::INVALID_ARGUMENT, message });
        }
        Ok(Block {
            vocab,
            dim,
            max_len,
            matrices,
            embedding: embed.dtype()?,
            embed,
            pos,
            ln1: (w("ln1.weight")?, w("ln1.bias")?),
            wqkv,
            bqkv: w("bqkv")?,
            wo: w("wo")?,
            bo: w("bo")?,
            ln2: (w("ln2.weight")?, w("ln2.bias")?),
            w1: w("w1")?,
            b1: w("b1")?,
            w2: w("w2")?,
            b2: w("b2")?,
        })
    }

    /// `x · w + b`, in the matrices' dtype, the result in f32.
    fn linear(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor, Error> {
        let product = match self.matrices {
            DType::F32 => x.matmul(w)?,
            low => x.cast(low)?.matmul(w)?.cast(DType::F32)?,
        };
        product.add(b)
    }

    /// The block's output for `ids`: [len, dim], f32.
    fn forward(&self, ids: &[i32]) -> Result<Tensor, Error> {
        let (len, dim) = (ids.len() as u32, self.dim);
        let heads = dim / HEAD_DIM;
        let tokens = self.embed.gather(&Tensor::from_i32(&[len], ids)?)?;
        let tokens = if self.embedding == DType::F32 { tokens } else { tokens.cast(DType::F32)? };
        let x = tokens.add(&self.pos.slice(0, 0, len)?)?;

        // Attention: [len, 3·dim] split into q, k, v, each [heads, len, 16].
        let h = x.layer_norm(Some(&self.ln1.0), Some(&self.ln1.1), LN_EPS)?;
        let qkv = self.linear(&h, &self.wqkv, &self.bqkv)?;
        let head = |i: u32| -> Result<Tensor, Error> {
            qkv.slice(1, i * dim, dim)?.reshape(&[len, heads, HEAD_DIM])?.permute(&[1, 0, 2])
        };
        let (q, k, v) = (head(0)?, head(1)?, head(2)?);
        let scores = q.matmul_ex(&k, false, true)?.scale(1.0 / (HEAD_DIM as f32).sqrt())?;
        let context = scores.softmax()?.matmul(&v)?.permute(&[1, 0, 2])?.reshape(&[len, dim])?;
        let x = x.add(&self.linear(&context, &self.wo, &self.bo)?)?;

        // The MLP.
        let h = x.layer_norm(Some(&self.ln2.0), Some(&self.ln2.1), LN_EPS)?;
        let hidden = self.linear(&h, &self.w1, &self.b1)?.gelu()?;
        x.add(&self.linear(&hidden, &self.w2, &self.b2)?)
    }
}

/// The request's ids, checked against the model, and whether it asks for the pooled output.
fn request(body: &[u8], block: &Block) -> Result<(Vec<i32>, bool), String> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(format!("the request has {} bytes, more than {MAX_REQUEST_BYTES}", body.len()));
    }
    let request: Value = serde_json::from_slice(body).map_err(|e| format!("the request is not JSON: {e}"))?;
    let ids = request.get("ids").and_then(Value::as_array).ok_or("the request has no `ids` array")?;
    if ids.is_empty() || ids.len() > block.max_len as usize {
        return Err(format!("`ids` has {} elements, not 1 to {}", ids.len(), block.max_len));
    }
    let ids = ids
        .iter()
        .enumerate()
        .map(|(i, id)| match id.as_u64() {
            Some(t) if t < u64::from(block.vocab) => Ok(t as i32),
            _ => Err(format!("ids[{i}] is {}, not a token id from 0 to {}", quote(id), block.vocab - 1)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pooled = match request.get("output") {
        None => false,
        Some(v) if v == "hidden" => false,
        Some(v) if v == "pooled" => true,
        Some(v) => return Err(format!("`output` is {}, not \"hidden\" or \"pooled\"", quote(v))),
    };
    Ok((ids, pooled))
}

fn tensor_failure(e: Error) -> ExitCode {
    if e.code == code::NO_SUCH_WEIGHT {
        eprintln!("encoder: {e}: deploy the function with the block's weights (../README.md)");
    } else {
        eprintln!("encoder: {e}");
    }
    ExitCode::from(EXIT_TENSOR_ERROR)
}

fn main() -> ExitCode {
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("encoder: cannot read stdin: {e}");
        return ExitCode::from(EXIT_BAD_REQUEST);
    }
    let block = match Block::load() {
        Ok(b) => b,
        Err(e) => return tensor_failure(e),
    };
    let (ids, pooled) = match request(&body, &block) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("encoder: bad request: {e}");
            return ExitCode::from(EXIT_BAD_REQUEST);
        }
    };
    let output = block.forward(&ids).and_then(|out| if pooled { out.mean(0, false) } else { Ok(out) });
    let (shape, values) = match output.and_then(|t| Ok((t.shape()?, t.to_vec()?))) {
        Ok(r) => r,
        Err(e) => return tensor_failure(e),
    };
    // Serialized as f32 (`json!` would widen each to f64 and print digits that f32 never had).
    let values = serde_json::to_string(&values).expect("a Vec<f32> serializes");
    println!(r#"{{"shape":{shape:?},"values":{values}}}"#);
    ExitCode::SUCCESS
}

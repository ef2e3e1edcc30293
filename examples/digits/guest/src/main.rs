//! The digits example's guest: classifies one 8x8 handwritten digit.
//!
//! stdin:  `{"pixels": [64 numbers from 0 to 16, row by row]}` (other fields are ignored, so a
//!         line of `../holdout.py` is a request as it is)
//! stdout: `{"class": k, "probabilities": [10 numbers]}`
//!
//! The model is the MLP that `../train.py` trained and wrote to `../digits.safetensors`:
//! `softmax(relu(pixels / 16 · w1 + b1) · w2 + b2)`. Its weights are the function's resident
//! tensors (`Tensor::weight`): deployed once with the function, on the device from then on, and
//! never copied through this guest's memory. Every arithmetic operation runs through the tensor
//! ABI; the guest itself only parses, checks and picks the largest of ten numbers.
//!
//! A request that is not as above exits with status 2, and a failed tensor call (the function
//! deployed without the weights, say) with status 3; either way the reason goes to stderr, which
//! the server keeps for its log, and the caller gets 502 `guest_exit` naming the status.

use std::io::Read;
use std::process::ExitCode;

use serde_json::Value;
use tensor_wasm_guest::{code, Error, Tensor};

const PIXELS: usize = 64;
const CLASSES: usize = 10;
/// The data set's pixels count ink in 0..=16; the model was trained on them divided by 16.
const MAX_PIXEL: f64 = 16.0;

const EXIT_BAD_REQUEST: u8 = 2;
const EXIT_TENSOR_ERROR: u8 = 3;

/// The request's 64 pixels, checked.
fn pixels(body: &[u8]) -> Result<Vec<f32>, String> {
    let request: Value = serde_json::from_slice(body).map_err(|e| format!("the request is not JSON: {e}"))?;
    let pixels = request.get("pixels").and_then(Value::as_array).ok_or("the request has no `pixels` array")?;
    if pixels.len() != PIXELS {
        return Err(format!("`pixels` has {} elements, not {PIXELS}", pixels.len()));
    }
    pixels
        .iter()
        .enumerate()
        .map(|(i, p)| match p.as_f64() {
            Some(v) if (0.0..=MAX_PIXEL).contains(&v) => Ok(v as f32),
            _ => Err(format!("pixels[{i}] is {p}, not a number from 0 to 16")),
        })
        .collect()
}

/// The ten class probabilities, computed by the host's kernels.
fn probabilities(pixels: &[f32]) -> Result<Vec<f32>, Error> {
    // w1 [64, 32], b1 [32], w2 [32, 10], b2 [10], all f32.
    let (w1, b1) = (Tensor::weight("w1")?, Tensor::weight("b1")?);
    let (w2, b2) = (Tensor::weight("w2")?, Tensor::weight("b2")?);
    // Scaled on the device like every other step; 1/16 is a power of two, so the product is
    // exact and matches train.py's input on any back-end.
    let x = Tensor::new(&[1, PIXELS as u32], pixels)?.scale(1.0 / MAX_PIXEL as f32)?;
    // [1, 32] + [32] and [1, 10] + [10]: the bias adds broadcast, as in NumPy.
    let hidden = x.matmul(&w1)?.add(&b1)?.relu()?;
    let probabilities = hidden.matmul(&w2)?.add(&b2)?.softmax()?;
    probabilities.to_vec()
    // The handles are freed as they drop; the weights stay resident for the next invocation.
}

/// The first index of the largest probability: the tie rule of the ABI's `tensor_argmax`. The
/// guest reads the ten numbers back for its output anyway, so it compares them itself rather than
/// pay another call to the device.
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

fn main() -> ExitCode {
    let mut body = Vec::new();
    let pixels = match std::io::stdin().read_to_end(&mut body).map_err(|e| format!("cannot read stdin: {e}")) {
        Ok(_) => pixels(&body),
        Err(e) => Err(e),
    };
    let pixels = match pixels {
        Ok(p) => p,
        Err(e) => {
            eprintln!("digits: bad request: {e}");
            return ExitCode::from(EXIT_BAD_REQUEST);
        }
    };
    let probabilities = match probabilities(&pixels) {
        Ok(p) if p.len() == CLASSES => p,
        Ok(p) => {
            eprintln!("digits: the weights give {} outputs, not {CLASSES}: deploy with digits.safetensors", p.len());
            return ExitCode::from(EXIT_TENSOR_ERROR);
        }
        Err(e) if e.code == code::NO_SUCH_WEIGHT => {
            eprintln!("digits: {e}: deploy the function with its weights, digits.safetensors");
            return ExitCode::from(EXIT_TENSOR_ERROR);
        }
        Err(e) => {
            eprintln!("digits: {e}");
            return ExitCode::from(EXIT_TENSOR_ERROR);
        }
    };
    // Serialized as f32 (`json!` would widen each to f64 and print digits that f32 never had).
    let probabilities_json = serde_json::to_string(&probabilities).expect("a Vec<f32> serializes");
    println!(r#"{{"class":{},"probabilities":{probabilities_json}}}"#, argmax(&probabilities));
    ExitCode::SUCCESS
}

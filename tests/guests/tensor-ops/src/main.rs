//! Reads one JSON request on stdin and writes one JSON answer on stdout.
//!
//! - `{"x": [[..]..], "w": [[..]..], "scale": s}`: a dense layer, `softmax(relu(x·w) * s)`, with
//!   its shape, values and sum.
//! - `{"probe": n, "len": l}`: `n` adds of two `l`-element tensors, each timed from the guest's
//!   call to its result (nanoseconds, through WASI's clock): P50, P95, P99 and max.
//! - `{"block": {"x": .., "w": .., "b": [..], "table": .., "ids": [[..]..]}}`: the newer imports
//!   end to end: in bf16, `layer_norm(gelu(x·w + b))` (the bias broadcast over the rows) and
//!   its argmax per row; an embedding lookup of `ids` in `table`, transposed; and the codes of two
//!   calls that must fail (reading a bf16 tensor as f32, an id past the table).

use std::io::Read;
use std::time::Instant;

use serde_json::{json, Value};
use tensor_wasm_guest::{DType, Tensor};

fn matrix(v: &Value) -> Result<(Vec<u32>, Vec<f32>), String> {
    let rows = v.as_array().ok_or("a matrix is an array of rows")?;
    let cols = rows.first().and_then(Value::as_array).map_or(0, Vec::len);
    let mut data = Vec::new();
    for row in rows {
        let row = row.as_array().filter(|r| r.len() == cols).ok_or("rows must have equal lengths")?;
        for x in row {
            data.push(x.as_f64().ok_or("elements must be numbers")? as f32);
        }
    }
    Ok((vec![rows.len() as u32, cols as u32], data))
}

fn dense(req: &Value) -> Result<Value, String> {
    let (xs, xd) = matrix(&req["x"])?;
    let (ws, wd) = matrix(&req["w"])?;
    let scale = req["scale"].as_f64().unwrap_or(1.0) as f32;
    let x = Tensor::new(&xs, &xd).map_err(|e| e.to_string())?;
    let w = Tensor::new(&ws, &wd).map_err(|e| e.to_string())?;
    let y = x.matmul(&w).and_then(|t| t.relu()).and_then(|t| t.scale(scale)).and_then(|t| t.softmax());
    let y = y.map_err(|e| e.to_string())?;
    let sum = y.sum().and_then(|t| t.to_vec()).map_err(|e| e.to_string())?;
    Ok(json!({ "shape": y.shape().map_err(|e| e.to_string())?, "y": y.to_vec().map_err(|e| e.to_string())?, "sum": sum[0] }))
}

fn block(req: &Value) -> Result<Value, String> {
    let e = |e: tensor_wasm_guest::Error| e.to_string();
    let (xs, xd) = matrix(&req["x"])?;
    let (ws, wd) = matrix(&req["w"])?;
    let (ts, td) = matrix(&req["table"])?;
    let bias: Vec<f32> = req["b"].as_array().ok_or("b")?.iter().filter_map(Value::as_f64).map(|v| v as f32).collect();
    let (is, id) = matrix(&req["ids"])?;
    let ids: Vec<i32> = id.iter().map(|&v| v as i32).collect();

    let x = Tensor::new(&xs, &xd).and_then(|t| t.cast(DType::BF16)).map_err(e)?;
    let w = Tensor::new(&ws, &wd).and_then(|t| t.cast(DType::BF16)).map_err(e)?;
    let b = Tensor::new(&[bias.len() as u32], &bias).and_then(|t| t.cast(DType::BF16)).map_err(e)?;
    let h = x.matmul(&w).and_then(|t| t.add(&b)).and_then(|t| t.gelu()).and_then(|t| t.layer_norm(None, None, 1e-5));
    let h = h.map_err(e)?;
    let wrong_read = h.to_vec().err().map_or(0, |err| err.code);
    let y = h.cast(DType::F32).and_then(|t| t.to_vec()).map_err(e)?;
    let argmax = h.argmax(-1, false).and_then(|t| t.to_i32_vec()).map_err(e)?;

    let table = Tensor::new(&ts, &td).map_err(e)?;
    let ids = Tensor::from_i32(&is, &ids).map_err(e)?;
    let looked_up = table.gather(&ids).and_then(|t| t.permute(&[1, 0, 2])).map_err(e)?;
    let past_the_table = Tensor::from_i32(&[1], &[ts[0] as i32]).map_err(e)?;
    let wrong_id = table.gather(&past_the_table).err().map_or(0, |err| err.code);
    Ok(json!({
        "y": y,
        "argmax": argmax,
        "dtype": h.dtype().map_err(e)? as i32,
        "gathered_shape": looked_up.shape().map_err(e)?,
        "gathered": looked_up.to_vec().map_err(e)?,
        "wrong_read": wrong_read,
        "wrong_id": wrong_id,
    }))
}

fn probe(n: usize, len: usize) -> Result<Value, String> {
    let data: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 + 1.0).collect();
    let a = Tensor::new(&[len as u32], &data).map_err(|e| e.to_string())?;
    let mut nanos = Vec::with_capacity(n);
    for _ in 0..n {
        // One op's round trip: the add is streamed, and the sync waits for it to have run.
        let t = Instant::now();
        let c = a.add(&a).map_err(|e| e.to_string())?;
        tensor_wasm_guest::sync().map_err(|e| e.to_string())?;
        nanos.push(t.elapsed().as_nanos() as u64);
        drop(c);
    }
    nanos.sort_unstable();
    let q = |p: f64| nanos[((nanos.len() as f64 * p) as usize).min(nanos.len() - 1)];
    Ok(json!({ "samples": n, "p50_ns": q(0.5), "p95_ns": q(0.95), "p99_ns": q(0.99), "max_ns": nanos[nanos.len() - 1] }))
}

/// A chain of `n` dependent adds on `len` elements (x = x + y, each intermediate freed), then one
/// read: the cost per op of stream-ordered dispatch, amortised, the read included.
fn chain(n: usize, len: usize) -> Result<Value, String> {
    let e = |e: tensor_wasm_guest::Error| e.to_string();
    let ones = vec![1.0f32; len];
    let y = Tensor::new(&[len as u32], &ones).map_err(e)?;
    let mut x = Tensor::new(&[len as u32], &ones).map_err(e)?;
    let t = Instant::now();
    for _ in 0..n {
        x = x.add(&y).map_err(e)?;
    }
    let values = x.to_vec().map_err(e)?;
    let total_ns = t.elapsed().as_nanos() as u64;
    Ok(json!({ "ops": n, "len": len, "total_ns": total_ns, "per_op_ns": total_ns / n as u64, "value": values[0] }))
}

fn main() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    let answer = serde_json::from_str::<Value>(&input).map_err(|e| e.to_string()).and_then(|req| {
        if let Some(n) = req.get("chain").and_then(Value::as_u64) {
            return chain(n.max(1) as usize, req["len"].as_u64().unwrap_or(1024) as usize);
        }
        match req.get("probe").and_then(Value::as_u64) {
            Some(n) => probe(n.max(1) as usize, req["len"].as_u64().unwrap_or(1024) as usize),
            None if req.get("block").is_some() => block(&req["block"]),
            None => dense(&req),
        }
    });
    match answer {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", json!({ "error": e }));
            std::process::exit(1);
        }
    }
}

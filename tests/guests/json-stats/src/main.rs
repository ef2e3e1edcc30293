//! Reads `{"values": [numbers], "label": "..."}` from stdin and writes their statistics as JSON.
//! Exits 2 with a message on stderr when the input is not such an object.

use std::io::{Read, Write};

fn main() {
    let mut input = String::new();
    if std::io::stdin().read_to_string(&mut input).is_err() {
        fail("stdin is not UTF-8");
    }
    let value: serde_json::Value = match serde_json::from_str(&input) {
        Ok(v) => v,
        Err(e) => fail(&format!("invalid JSON: {e}")),
    };
    let Some(values) = value.get("values").and_then(|v| v.as_array()) else {
        fail("expected an object with a `values` array");
    };
    let numbers: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
    let sum: f64 = numbers.iter().sum();
    let out = serde_json::json!({
        "count": numbers.len(),
        "sum": sum,
        "mean": if numbers.is_empty() { 0.0 } else { sum / numbers.len() as f64 },
        "max": numbers.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        "label": value.get("label").cloned().unwrap_or(serde_json::Value::Null),
        "args": std::env::args().collect::<Vec<_>>(),
    });
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.to_string().as_bytes());
}

fn fail(message: &str) -> ! {
    eprintln!("json-stats: {message}");
    std::process::exit(2);
}

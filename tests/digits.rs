//! examples/digits end to end (issue 34, item 5): the example's guest, built from its own crate,
//! deployed with its committed weights, classifies every held-out sample through a running
//! server, on the host back-end.

mod common;

use std::path::Path;

use base64::Engine as _;
use common::{guests, Server};
use serde_json::{json, Value};

/// Samples 1000..1796 of scikit-learn's digits (`examples/digits/holdout.py`), which training
/// never saw.
const HELD_OUT: usize = 797;

#[test]
fn the_digits_example_classifies_the_held_out_samples_through_a_running_server() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let weights = std::fs::read(repo.join("examples/digits/digits.safetensors")).unwrap();
    let holdout = std::fs::read_to_string(repo.join("examples/digits/holdout.jsonl")).unwrap();
    let server = Server::start(&["--gpu", "host"]);
    let tensors = base64::engine::general_purpose::STANDARD.encode(&weights);
    let r = server.client().deploy("digits", &guests::digits_example(), json!({ "tensors_b64": tensors }));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();

    let mut c = server.client();
    let (mut total, mut correct) = (0usize, 0usize);
    for line in holdout.lines() {
        let label = serde_json::from_str::<Value>(line).unwrap()["label"].as_u64().unwrap();
        let r = c.invoke(&id, line.as_bytes());
        assert_eq!(r.status, 200, "sample {}: {}", 1000 + total, r.text());
        let out = r.json();
        let probabilities: Vec<f64> =
            out["probabilities"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
        assert_eq!(probabilities.len(), 10);
        assert!((probabilities.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{probabilities:?}");
        let class = out["class"].as_u64().unwrap();
        let top = probabilities.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(probabilities[class as usize], top, "the class is the most probable one");
        correct += usize::from(class == label);
        total += 1;
    }
    assert_eq!(total, HELD_OUT);
    eprintln!("digits: {correct} of {total} held-out samples classified correctly");
    // train.py's own f32 NumPy run of the same forward pass gets 744 (93.3%); the host back-end
    // computes in f32 too, in another summation order.
    assert!(correct * 10 >= total * 9, "{correct} of {total}");
    // The four weights went up once, for 797 invocations.
    assert_eq!(server.metric("tensor_wasm_kernel_dispatches_total", &[("op", "upload")]), 4.0 + HELD_OUT as f64);

    // What the guest refuses: its exit status reaches the caller as 502 `guest_exit`.
    for bad in [r#"{"pixels": [1, 2, 3]}"#, r#"{"pixels": 5}"#, "not json"] {
        let r = c.invoke(&id, bad.as_bytes());
        assert_eq!(r.status, 502, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["kind"], "guest_exit", "{bad}");
    }
    let mut pixels = vec![0; 64];
    pixels[10] = 17;
    let r = c.invoke(&id, json!({ "pixels": pixels }).to_string().as_bytes());
    assert_eq!(r.json()["error"]["kind"], "guest_exit");
}

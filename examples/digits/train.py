#!/usr/bin/env python3
"""Trains the digits example's classifier and writes its weights to digits.safetensors.

The model is a small MLP: 64 pixels -> 32 hidden units (ReLU) -> 10 classes (softmax). It is
trained on the first 1,000 of the 1,797 8x8 digits bundled with scikit-learn
(`sklearn.datasets.load_digits`, the UCI "optical recognition of handwritten digits" set) and
evaluated on the other 797 (samples 1000..1796), which it never sees in training.

The guest (guest/src/main.rs) runs the same forward pass through the tensor ABI:

    x = pixels / 16                      # pixels are 0..16; the guest scales with tensor_scale
    h = relu(x @ w1 + b1)                # w1 [64, 32], b1 [32]
    p = softmax(h @ w2 + b2)             # w2 [32, 10], b2 [10]
    class = the first index of max(p)

Only NumPy and scikit-learn are needed: Adam is written here in NumPy, and the safetensors file
is written by hand (see write_safetensors). Training is seeded and single-threaded, so a rerun on
the same machine writes the same bytes; another CPU or NumPy build may round differently, which
is why the file is committed rather than rebuilt.

Then it checks what it wrote:
- it reads digits.safetensors back with plain Python (struct and json, no NumPy);
- it runs the guest's forward pass in f32 NumPy on those weights and prints the accuracy on
  samples 1000..1796: the figure the README quotes;
- it runs the same forward pass again in pure-Python float64, a reference independent of
  NumPy, and checks that its class agrees with NumPy's on every one of the 797 samples.

Usage: python3 train.py        (writes digits.safetensors beside this script)
"""

import os

# One BLAS thread: a multi-threaded matmul may sum in another order from run to run.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import math  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "digits.safetensors")

TRAIN = 1000  # samples 0..999 train; 1000..1796 are held out
HIDDEN = 32
SEED = 0
# The settings below were picked by training on samples 0..799 and validating on 800..999 (three
# seeds each; weight decay 1e-4 to 1e-2, 50 to 300 epochs, learning rate 0.002 and 0.005). They
# scored 94.5 to 97.2% there, the best within the noise of 200 samples of each other; these tie
# for the best. (A first run, before that sweep, used weight decay 1e-4 and scored 93.2% on
# samples 1000..1796; the change to 1e-3 came from the validation split, not from that figure.)
EPOCHS = 300
BATCH = 50
LEARNING_RATE = 0.005
WEIGHT_DECAY = 1e-3  # L2 on the weight matrices (not the biases)
PIXEL_SCALE = 1.0 / 16.0  # exact in f32; the guest applies it with tensor_scale


def load():
    digits = load_digits()
    x = digits.data.astype(np.float64)  # 1797 x 64, integers 0..16
    y = digits.target.astype(np.int64)
    assert x.shape == (1797, 64) and x.min() == 0 and x.max() == 16
    return x, y


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(x, y):
    """Mini-batch Adam on the cross-entropy, in float64. Returns the parameters."""
    rng = np.random.default_rng(SEED)
    params = {
        # He initialisation for the ReLU layer, LeCun for the output layer.
        "w1": rng.normal(0.0, math.sqrt(2.0 / 64), (64, HIDDEN)),
        "b1": np.zeros(HIDDEN),
        "w2": rng.normal(0.0, math.sqrt(1.0 / HIDDEN), (HIDDEN, 10)),
        "b2": np.zeros(10),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    onehot = np.eye(10)[y]
    step = 0
    for _ in range(EPOCHS):
        order = rng.permutation(len(x))
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            xb, tb = x[idx] * PIXEL_SCALE, onehot[idx]
            pre = xb @ params["w1"] + params["b1"]
            h = np.maximum(pre, 0.0)
            p = softmax(h @ params["w2"] + params["b2"])
            dz = (p - tb) / len(idx)  # d(mean cross-entropy)/d(logits)
            dh = (dz @ params["w2"].T) * (pre > 0)
            grads = {
                "w2": h.T @ dz + WEIGHT_DECAY * params["w2"],
                "b2": dz.sum(axis=0),
                "w1": xb.T @ dh + WEIGHT_DECAY * params["w1"],
                "b1": dh.sum(axis=0),
            }
            step += 1
            for k, g in grads.items():
                m[k] = beta1 * m[k] + (1 - beta1) * g
                v[k] = beta2 * v[k] + (1 - beta2) * g * g
                m_hat = m[k] / (1 - beta1 ** step)
                v_hat = v[k] / (1 - beta2 ** step)
                params[k] -= LEARNING_RATE * m_hat / (np.sqrt(v_hat) + eps)
    return params


def write_safetensors(path, tensors):
    """Writes f32 tensors in the safetensors format (github.com/huggingface/safetensors):

    8 bytes: N, the header's length, u64 little-endian;
    N bytes: a JSON object {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}},
             offsets relative to the end of the header, padded with spaces so the data that
             follows starts 8-byte aligned;
    then the tensors' bytes, row-major, little-endian, back to back in the header's order.
    """
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        shape = list(tensors[name].shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    """Reads an F32 safetensors file with plain Python: {name: (shape, [floats], row-major)}."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "F32", name
        begin, end = info["data_offsets"]
        count = math.prod(info["shape"])
        assert end - begin == 4 * count, name
        out[name] = (info["shape"], list(struct.unpack_from(f"<{count}f", data, begin)))
    return out


def forward_numpy_f32(weights, pixels):
    """The guest's forward pass in f32, as the tensor ABI's host back-end computes it."""
    w = {k: np.array(values, dtype=np.float32).reshape(shape) for k, (shape, values) in weights.items()}
    x = pixels.astype(np.float32) * np.float32(PIXEL_SCALE)
    h = np.maximum(x @ w["w1"] + w["b1"], np.float32(0))
    z = h @ w["w2"] + w["b2"]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def forward_python_f64(weights, pixels):
    """The same forward pass for one sample, in pure-Python float64: loops, no NumPy."""
    (_, w1), (_, b1) = weights["w1"], weights["b1"]
    (_, w2), (_, b2) = weights["w2"], weights["b2"]
    x = [float(p) * PIXEL_SCALE for p in pixels]
    h = [max(0.0, b1[j] + sum(x[i] * w1[i * HIDDEN + j] for i in range(64))) for j in range(HIDDEN)]
    z = [b2[k] + sum(h[j] * w2[j * 10 + k] for j in range(HIDDEN)) for k in range(10)]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def first_argmax(values):
    """The first index of the largest value: the rule of the ABI's tensor_argmax and the guest."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def main():
    x, y = load()
    params = train(x[:TRAIN], y[:TRAIN])
    write_safetensors(WEIGHTS, {k: v.astype(np.float32) for k, v in params.items()})
    print(f"wrote {WEIGHTS} ({os.path.getsize(WEIGHTS)} bytes)")

    weights = read_safetensors(WEIGHTS)
    for name in sorted(weights):
        print(f"  {name}: F32 {weights[name][0]}")
    expected = {"w1": [64, HIDDEN], "b1": [HIDDEN], "w2": [HIDDEN, 10], "b2": [10]}
    assert {k: s for k, (s, _) in weights.items()} == expected

    test_x, test_y = x[TRAIN:], y[TRAIN:]
    p32 = forward_numpy_f32(weights, test_x)
    classes32 = [first_argmax(row.tolist()) for row in p32]
    train_classes = forward_numpy_f32(weights, x[:TRAIN]).argmax(axis=1)
    train_acc = float((train_classes == y[:TRAIN]).mean())
    correct = sum(int(c == t) for c, t in zip(classes32, test_y))
    print(f"training accuracy (samples 0..999, NumPy f32): {train_acc:.4f}")
    print(f"held-out accuracy (samples 1000..1796, NumPy f32): {correct}/{len(test_y)} = {correct / len(test_y):.4f}")

    # The independent reference: pure Python, float64, on the weights read back from the file.
    disagree, worst = [], 0.0
    for i, pixels in enumerate(test_x.tolist()):
        p64 = forward_python_f64(weights, pixels)
        worst = max(worst, max(abs(a - float(b)) for a, b in zip(p64, p32[i])))
        if first_argmax(p64) != classes32[i]:
            disagree.append(TRAIN + i)
    print(f"pure-Python float64 reference: class agrees with NumPy f32 on {len(test_y) - len(disagree)}/{len(test_y)}"
          f" held-out samples; largest probability difference {worst:.2e}")
    if disagree:
        print(f"disagreement on samples {disagree}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

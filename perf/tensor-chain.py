#!/usr/bin/env python3
"""The cost per op of a chain of dependent tensor ops through the server (issue 34's host target:
2,000 dependent adds on 1,024 elements, then one read, at most 0.4 µs per op amortised).

    perf/tensor-chain.py [SHARDS] [ROUNDS]

Deploys tests/guests/tensor-ops (built by `cargo test --test tensor`) to a release server on the
host back-end and calls its chain mode ROUNDS times (default 20): x = x + y 2,000 times, each
intermediate freed, then one read, timed inside the guest from its first add to the read's end.
Prints each round's nanoseconds per op and their median. TENSOR_WASM_BIN picks another build.
"""
import base64, json, os, sys

from release_server import ROOT, request, serving, wait_ready

TENSOR_OPS = os.path.join(ROOT, "target/guests/wasm32-wasip1/release/tensor-ops.wasm")


def main():
    shards = sys.argv[1] if len(sys.argv) > 1 else "1"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    wasm = open(TENSOR_OPS, "rb").read()
    with serving("--shards", shards, "--gpu", "host") as (host, port):
        wait_ready(host, port)
        body = json.dumps({"name": "tensor-ops", "wasm_b64": base64.b64encode(wasm).decode()})
        status, answer = request(host, port, "POST", "/functions", body)
        assert status == 201, answer
        fid = json.loads(answer)["id"]
        per_op = []
        for _ in range(rounds):
            status, answer = request(host, port, "POST", f"/functions/{fid}/invoke",
                                     json.dumps({"chain": 2000, "len": 1024}))
            assert status == 200, answer
            out = json.loads(answer)
            assert out["value"] == 2001.0, out
            per_op.append(out["per_op_ns"])
        print("per op ns:", " ".join(str(n) for n in per_op))
        print(f"median {sorted(per_op)[len(per_op) // 2]} ns per op over {rounds} chains of 2000, shards {shards}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A data dir of N stored functions, each its own tiny module (an empty `_start` with a custom
section naming it), deployed through the API of target/release/tensor-wasm (or $TENSOR_WASM_BIN):
what perf/restart-1000.py starts on.

    python3 perf/make-store.py DATA_DIR [N]
"""
import base64, json, os, sys

from release_server import distinct, request, serving, wait_ready

# (module (func (export "_start")))
HELLO = bytes.fromhex("0061736d01000000" "010401600000" "03020100" "070a01065f73746172740000" "0a040102000b")

data_dir = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
os.makedirs(data_dir, exist_ok=True)
with serving("--data-dir", data_dir, "--max-functions-per-tenant", str(count)) as (host, port):
    wait_ready(host, port)
    for i in range(count):
        body = json.dumps({"name": f"f{i}", "wasm_b64": base64.b64encode(distinct(HELLO, f"copy-{i}")).decode()})
        status, answer = request(host, port, "POST", "/functions", body, {"content-type": "application/json"})
        assert status == 201, answer
print(f"{count} functions stored in {data_dir}")
